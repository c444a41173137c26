"""Client-side call bookkeeping shared by the blocking and asyncio clients:
checking arguments, numbering calls, building requests and reading answers.
No sockets here, so both clients use exactly the same protocol code."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any

import zmq

from pylm import protocol
from pylm.discovery import DEFAULT_WAIT, Peers, check_wait
from pylm.errors import (
    CurveRefused,
    InstanceLost,
    ProtocolError,
    PylmError,
    RegistryError,
    RequestTimeout,
)
from pylm.liveness import Connections, to_live_peers
from pylm.names import check_name
from pylm.security import Curve
from pylm.telemetry.counting import ClientStats, FunctionStats, metrics_enabled
from pylm.telemetry.exposition import publish_client
from pylm.transport import check_address
from pylm.window import Books

if TYPE_CHECKING:
    from pylm.registry import InstanceRecord, Registry

__all__ = [
    "CALL_RETRY_BURST",
    "DEFAULT_TIMEOUT",
    "Caller",
    "Calls",
    "answers_in",
    "check_timeout",
    "curve_key",
    "pong_info",
    "read_answer",
]

DEFAULT_TIMEOUT = 10.0
CALL_RETRY_BURST = 10  # calls a standalone client may send again at once, beyond its earnings

_pack_id_deadline = protocol.pack_id_deadline


def check_timeout(timeout: object) -> float:
    """A timeout in seconds: a positive int or float."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


class Calls:
    """Requests to one server, numbered from 1, and the answers to them."""

    def __init__(self, server_name: str, max_payload: int) -> None:
        check_name(server_name, "server_name")
        self.server_name = server_name
        self.max_payload = max_payload
        self._prefix = server_name.encode("utf-8") + b"."
        self.ids = itertools.count(1)
        # function name -> (request prefix, target) of the functions called
        # so far, for the clients' fast paths
        self.targets: dict[str, tuple[bytes, bytes, FunctionStats | None]] = {}
        self.inline_limit = min(max_payload, protocol.SPLIT_PAYLOAD)  # one-frame payloads
        # What the calls took and how they ended (pylm.telemetry.counting), unless metrics are off.
        self.stats = publish_client(ClientStats(server_name)) if metrics_enabled() else None

    def finished(self, function: str, began: float, size_in: int, size_out: int | None) -> None:
        """Count a call begun at ``began`` (``perf_counter()``) that got an
        answer: a result (``size_out``) or an error (None)."""
        self.took(function, perf_counter() - began, size_in, size_out)

    def took(self, function: str, seconds: float, size_in: int, size_out: int | None) -> None:
        """Count a call that got an answer in ``seconds``: a result
        (``size_out``) or an error (None)."""
        if self.stats is not None:
            numbers = self.stats.function(function)
            if size_out is None:
                numbers.failed(seconds, size_in)
            else:
                numbers.done(seconds, size_in, size_out)

    def timed_out(self, function: str) -> None:
        if self.stats is not None:
            self.stats.timed_out(function)

    def request(self, function: str, payload: bytes, timeout: float) -> tuple[int, list[bytes]]:
        """A new message id and the frames of the request."""
        entry = self.targets.get(function)
        if entry is None:
            entry = self._target(function)
        msg_id = next(self.ids)
        if type(payload) is bytes and len(payload) <= self.inline_limit:
            prefix, target, _ = entry
            deadline = time.time() + timeout
            return msg_id, [prefix + _pack_id_deadline(msg_id, deadline) + target + payload]
        protocol.check_payload(payload, self.max_payload)
        return msg_id, protocol.encode(
            protocol.REQUEST, msg_id, payload, entry[1], deadline=time.time() + timeout
        )

    def ping(self, timeout: float) -> tuple[int, list[bytes]]:
        msg_id = next(self.ids)
        return msg_id, protocol.encode(protocol.PING, msg_id, deadline=time.time() + timeout)

    def _target(self, function: object) -> tuple[bytes, bytes, FunctionStats | None]:
        if not isinstance(function, str):
            raise TypeError(f"function name must be a str, got {type(function).__name__}")
        if not function or "." in function:
            raise ValueError(f"function name must be non-empty and without dots, got {function!r}")
        target = self._prefix + function.encode("utf-8")
        numbers = None if self.stats is None else self.stats.function(function)
        entry = (protocol.request_prefix(target), target, numbers)
        if len(self.targets) < 1024:  # bounded: names come from the caller
            self.targets[function] = entry
        return entry


class Caller:
    """What every client shares: the server it calls, where, and how long it
    waits by default.

    ``connection`` is an address (then ``server_name`` names the server), or,
    with ``server_name`` None, only the server's name: its instances' addresses
    then come from the registry (``registry``, default ``PYLM_REGISTRY``),
    waiting up to ``wait`` seconds for one to register (else
    :class:`~pylm.errors.NoInstance`), and the client follows the registry
    from then on (instances joining or leaving, see :mod:`pylm.discovery`)
    until it is closed.
    """

    endpoint_role = "rep"  # which of a record's endpoints this client calls
    # Standalone clients: which calls are sent again when they seem lost
    # (None: those of the functions the instances mark idempotent).
    retry: bool | None = None

    def __init__(
        self,
        connection: str,
        server_name: str | None,
        timeout: float,
        max_payload: int,
        registry: Registry | str | None = None,
        curve: Curve | None = None,
        wait: float = DEFAULT_WAIT,
    ) -> None:
        self.timeout = check_timeout(timeout)
        self.wait = check_wait(wait)
        self._registry: Registry | None = None  # while following, the one this client opened
        self._peers: Peers | None = None
        # While the instances differ in functions: sockets connected only to
        # the instances that have some function, by their endpoints.
        self._side: dict[tuple[str, ...], zmq.Socket] = {}
        self._cache_endpoint: str | None = None  # the instance whose cache this client uses
        # CURVE (pylm.security): given, or from PYLM_CURVE_KEYS; the server's
        # key from its registry record, or from the settings.
        self.curve = curve if curve is not None else Curve.from_env()
        self.server_key = None if self.curve is None else self.curve.server_key
        # A CURVE server refusing this client; connections that dropped.
        self._connections = Connections()
        if server_name is None:
            if not isinstance(connection, str) or "://" in connection:
                raise ValueError(
                    f"connection {connection!r} is an address: give the server_name too"
                )
            server_name = connection
            self._peers = self._resolve(server_name, registry)
            self.endpoints = self._peers.endpoints
        else:
            self.endpoints = [check_address(connection, "connection")]
        self.connection = ",".join(self.endpoints)
        self.server_name = server_name
        self._calls = Calls(server_name, max_payload)
        if self._calls.stats is not None:
            self._calls.stats.peers = self._connections

    @property
    def live_instances(self) -> int:
        """The instances this client has a live connection to now."""
        return self._connections.live_peers

    def _open_registry(self, registry: Registry | str | None) -> Registry:
        """The registry to resolve with: the one given, or one this client
        opens and closes with :meth:`_stop_following`."""
        from pylm.registry import Registry

        if isinstance(registry, Registry):
            return registry
        self._registry = Registry(registry)
        return self._registry

    def _resolve(self, name: str, registry: Registry | str | None) -> Peers:
        client = self._open_registry(registry)
        try:
            records = client.wait_for_instances(name, self.wait)
            self.server_key = curve_key(name, records, self.curve)
            if self.server_key is None:
                self.curve = None  # the server takes plain connections: so does this client
            if not any(self.endpoint_role in record.endpoints for record in records):
                raise RegistryError(
                    f"the instances of {name!r} have no {self.endpoint_role!r} endpoint:"
                    f" is it a {type(self).__name__}'s kind of server?"
                )
        except BaseException:
            self._stop_following()
            raise
        return Peers(client, name, self.endpoint_role, records)

    def _secure(self, socket: zmq.Socket, server_key: bytes | None = None) -> zmq.Socket:
        """Make ``socket`` (about to connect) a CURVE client of the server
        whose key is ``server_key`` (default: :attr:`server_key`), when
        CURVE is on, and watch its handshakes."""
        if self.curve is not None:
            self.curve.connect(socket, server_key or self.server_key)
            self._connections.watch(socket, refusals=True)
        return socket

    def _rewire(self, socket: zmq.Socket, *, renew: bool = False) -> bool:
        """Apply the instances the registry lists now to ``socket`` (the
        caller checked ``self._peers.changed``). With ``renew``, when some
        left, ``socket`` is left as it is and True says the caller replaces
        it: with IMMEDIATE, libzmq ends the pipe of a disconnected endpoint
        only later, in its I/O thread, and a call sent at once could still
        take it, to be dropped with it, while the instance that left still
        serves what reaches it."""
        assert self._peers is not None
        renewed = renew and self._peers.leaving(self.endpoints)
        if renewed:
            self._peers.take()
        else:
            self._peers.apply(socket)
        for endpoint in set(self.endpoints) - set(self._peers.endpoints):
            self._connections.discard(endpoint)
        self.endpoints = self._peers.endpoints
        self.connection = ",".join(self.endpoints)
        self._close_side()  # made again as needed, for the instances listed now
        return renewed

    def _socket_for(self, function: str, socket: zmq.Socket) -> zmq.Socket:
        """The socket for a call of ``function``: ``socket`` (connected to
        every instance) unless the instances differ in functions (a version
        rolling out) and only some have ``function``; then a socket
        connected to those only, so that no call of it meets an instance
        that would answer ``UnknownFunction``. Same options as ``socket``."""
        peers = self._peers
        if peers is None or not peers.partial:
            return socket
        endpoints = peers.serving(function)
        if endpoints is None:
            return socket
        return self._side_socket(endpoints, socket)

    def _cache_socket(self, socket: zmq.Socket) -> zmq.Socket:
        """The socket for calls to a server's cache: ``socket`` when it
        reaches one instance; otherwise one connected to one instance only,
        the same while it is listed, since every instance keeps a cache of
        its own (kept from a time it was the only one, too)."""
        if self._cache_endpoint not in self.endpoints:
            self._cache_endpoint = min(self.endpoints)
        if len(self.endpoints) < 2:
            return socket
        return self._side_socket((self._cache_endpoint,), socket)

    def _side_socket(self, endpoints: tuple[str, ...], socket: zmq.Socket) -> zmq.Socket:
        """A socket connected to ``endpoints`` only, with the options of
        ``socket``; kept until the instances change."""
        side = self._side.get(endpoints)
        if side is None:
            side = self._secure(to_live_peers(socket.context.socket(zmq.DEALER)))
            for option in (zmq.LINGER, zmq.RCVHWM, zmq.SNDTIMEO, zmq.RCVTIMEO):
                side.setsockopt(option, socket.getsockopt(option))
            for endpoint in endpoints:
                side.connect(endpoint)
            self._side[endpoints] = side
        return side

    def _close_side(self) -> None:
        sockets = list(self._side.values())
        self._side.clear()
        for socket in sockets:
            self._connections.forget(socket)
            socket.close(linger=0)

    def _stop_following(self) -> None:
        """Stop following the registry (and watching handshakes): the client closes."""
        self._connections.close()
        self._close_side()
        peers, self._peers = self._peers, None
        if peers is not None:
            peers.close()
        registry, self._registry = self._registry, None
        if registry is not None:
            registry.close()

    def _job_timeout(
        self, function: str, timeout: float
    ) -> Callable[[int, int, int], RequestTimeout]:
        """The error a job of ``function`` (index, timed out with how many
        others, sent how many times) ends with when it has no result within
        ``timeout``; counted."""

        def timed_out(index: int, together: int, attempts: int) -> RequestTimeout:
            self._calls.timed_out(function)
            sent = "once" if attempts == 1 else f"{attempts} times"
            return self._no_answer(
                f"no result for job {index} ({function!r} on {self.server_name!r} via"
                f" {self.connection}) within {timeout:g} s, sent {sent};"
                f" {together} job(s) timed out together",
                "; ",
            )

        return timed_out

    def _keep_books(self, books: Books) -> None:
        """Keep ``books`` (calls or jobs sent again, their copies) as
        :attr:`books`, exported with this client's calls."""
        self.books = books
        if self._calls.stats is not None:
            self._calls.stats.retries = books

    def _retried(self, function: str) -> bool:
        """Whether a call of ``function`` is sent again when it seems lost."""
        if self.retry is not None:
            return self.retry
        return self._peers is not None and function in self._peers.idempotent

    def _lost_or_timeout(
        self, what: str, timeout: float, drops: int | None, attempts: int = 1
    ) -> RequestTimeout:
        """The error of a call with no answer within ``timeout``: sent
        ``attempts`` times; :class:`InstanceLost` if a connection dropped
        since there were ``drops`` (None: since the client last looked)."""
        if self._connections.refusal() is None and self._connections.dropped_since(drops):
            return InstanceLost(
                f"no answer from server {self.server_name!r} to {what!r} within {timeout:g} s,"
                f" and the connection to its instance at {self._connections.dropped} dropped"
                " meanwhile: the call may have run there (mark the function @idempotent, or"
                " pass retry=True, to have such calls sent to another instance)"
            )
        error = self._timeout_error(what, timeout)
        if attempts > 1:
            return type(error)(f"{error}, sent {attempts} times")
        return error

    def _timeout_of(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else check_timeout(timeout)

    def _timeout_error(self, what: str, timeout: float) -> RequestTimeout:
        return self._no_answer(
            f"no answer from server {self.server_name!r} at {self.connection}"
            f" to {what!r} within {timeout:g} s"
        )

    def _no_answer(self, text: str, separator: str = ": ") -> RequestTimeout:
        """The error for a call that got no answer: :class:`CurveRefused`,
        saying why, if a server refused this client's handshake."""
        refused = self._connections.refusal()
        if refused is not None:
            return CurveRefused(f"{text}{separator}{refused}")
        return RequestTimeout(text)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.server_name!r} at {self.connection}>"


def curve_key(name: str, records: list[InstanceRecord], curve: Curve | None) -> bytes | None:
    """The CURVE public key the records of server ``name`` give, if any;
    :class:`~pylm.errors.PylmError` if the server requires CURVE and this
    side has no keys (its calls would time out, unexplained)."""
    key = next((record.curve for record in records if record.curve), None)
    if key is not None and curve is None:
        raise PylmError(
            f"server {name!r} requires CURVE: give this client keys (PYLM_CURVE_KEYS, or"
            " curve=Curve(...); `pylm keys` makes them)"
        )
    return None if key is None else key.encode("ascii")


def read_answer(frames: list[bytes]) -> protocol.Message | None:
    """The answer the frames carry, or None when they are malformed."""
    try:
        return protocol.decode(frames)
    except ProtocolError:
        return None


def answers_in(frames: list[bytes]) -> list[protocol.Message]:
    """The answers a message carries: those of a BATCH one by one, or
    itself; none when it is malformed."""
    if len(frames) == 1 and frames[0][protocol.LEAD] == protocol.BATCH_PREFIX:
        try:
            bodies = protocol.unpack_batch(frames[0])
        except ProtocolError:
            return []
        return [message for body in bodies if (message := read_answer([body])) is not None]
    message = read_answer(frames)
    return [] if message is None else [message]


def pong_info(payload: bytes) -> dict[str, Any]:
    try:
        info = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise ProtocolError(f"malformed PONG {payload[:200]!r}: {exc}") from None
    if not isinstance(info, dict):
        raise ProtocolError(f"malformed PONG {payload[:200]!r}: not a JSON object")
    return info
