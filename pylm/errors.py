"""The exception hierarchy of pylm: one root, :class:`PylmError`.

Errors raised by a server while handling a request travel back to the caller
as data (see :mod:`pylm.protocol`) and are rebuilt there as the matching class
below, so ``except pylm.UnknownFunction`` works the same on either side of the
wire.
"""

from __future__ import annotations

__all__ = [
    "CurveRefused",
    "InstanceLost",
    "InterfaceMismatch",
    "InvalidName",
    "NoInstance",
    "NoWiring",
    "PayloadTooLarge",
    "ProtocolError",
    "PylmError",
    "RegistryAccessDenied",
    "RegistryError",
    "RegistryUnavailable",
    "RemoteError",
    "RequestTimeout",
    "ServerCrashed",
    "UnknownFunction",
    "UnknownKey",
    "UnknownServer",
]


class PylmError(Exception):
    """Root of every exception pylm raises on purpose."""


class InvalidName(PylmError, ValueError):
    """A server name that does not follow the rule of :mod:`pylm.names`."""


class ProtocolError(PylmError):
    """A message does not follow the wire protocol (bad magic, version, frames)."""


class RemoteError(PylmError):
    """The remote function raised, or returned something that is not bytes.

    ``remote_type`` is the exception's class name on the server,
    ``remote_message`` its ``str()`` and ``remote_traceback`` the formatted
    traceback text of the user function.
    """

    def __init__(
        self,
        message: str,
        *,
        remote_type: str = "",
        remote_message: str = "",
        remote_traceback: str = "",
        server: str = "",
        function: str = "",
    ) -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        self.server = server
        self.function = function

    def __str__(self) -> str:
        text = super().__str__()
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip()
        return text


class UnknownFunction(PylmError, LookupError):
    """The server has no public function of that name."""

    def __init__(self, message: str, *, server: str = "", function: str = "") -> None:
        super().__init__(message)
        self.server = server
        self.function = function


class UnknownServer(PylmError, LookupError):
    """The request named a server other than the one that received it."""

    def __init__(self, message: str, *, server: str = "", function: str = "") -> None:
        super().__init__(message)
        self.server = server
        self.function = function


class PayloadTooLarge(PylmError, ValueError):
    """A payload is larger than the configured limit (``max_payload``)."""

    def __init__(self, message: str, *, size: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class UnknownKey(PylmError, KeyError):
    """The server's cache holds no value under that key."""

    def __init__(self, message: str, *, server: str = "", key: str = "") -> None:
        super().__init__(message)
        self.server = server
        self.key = key

    def __str__(self) -> str:  # KeyError would show the message's repr
        return PylmError.__str__(self)


class RequestTimeout(PylmError, TimeoutError):
    """No reply arrived within the call's timeout."""


class CurveRefused(RequestTimeout):
    """No reply arrived, and the server refused this client's CURVE
    handshake meanwhile: its public key is not on the server's allow-list,
    or the server's key it was given is wrong. (A :class:`RequestTimeout`
    too, as the call itself only ran out of time.)"""


class InstanceLost(RequestTimeout):
    """No reply arrived, and a connection to an instance of the server
    dropped while the call was out: the call may have run there. Raised for
    a call the client does not send again (its function is not declared
    idempotent); a :class:`RequestTimeout` too."""


class ServerCrashed(PylmError):
    """A server's serving thread died of an unexpected exception (the ``__cause__``)."""


class RegistryError(PylmError):
    """The service registry (etcd) refused or could not answer a request."""


class RegistryUnavailable(RegistryError):
    """The service registry cannot be reached."""


class RegistryAccessDenied(RegistryError):
    """etcd refused the credentials given (user, password, certificate), or
    the user may not touch pylm's keys."""


class NoInstance(RegistryError, LookupError):
    """No instance of the server a client asked for by name is registered
    (after waiting ``waited`` seconds for one): ``server``, ``cluster`` and
    ``registry`` (its address, password hidden) say where it was looked for."""

    def __init__(
        self,
        message: str,
        *,
        server: str = "",
        cluster: str = "",
        registry: str = "",
        waited: float = 0.0,
    ) -> None:
        super().__init__(message)
        self.server = server
        self.cluster = cluster
        self.registry = registry
        self.waited = waited


class NoWiring(RegistryError, LookupError):
    """A stage started with only its name finds no next stage in the
    registry: none was given, and ``pylm topology set`` or ``apply`` has not
    written one yet. ``stage``: its name."""

    def __init__(self, message: str, *, stage: str = "") -> None:
        super().__init__(message)
        self.stage = stage


class InterfaceMismatch(RegistryError):
    """A server was refused at start: the live instances of its name expose
    other functions (a different program, or another version started
    without ``rolling=True``). ``functions``: this server's;
    ``live``: those of the live instances, by instance id."""

    def __init__(
        self, message: str, *, functions: list[str] | None = None,
        live: dict[str, list[str]] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.functions = functions or []
        self.live = live or {}
