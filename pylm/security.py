"""CURVE: encryption and authentication of pylm's ZeroMQ traffic.

A server with :class:`Curve` settings listens with CURVE (every connection
encrypted, the server proved by its key) and lets in only the clients whose
public keys it allows, checked by a ZAP handler (one thread per ZeroMQ
context, :class:`zmq.auth.thread.ThreadAuthenticator`). A client needs its
own key pair and the server's public key, which the registry carries for
servers started by name (the ``curve`` field of their records). All
instances of one server name share one key pair: clients know the name, not
the instance.

Keys live in ZeroMQ's certificate files: ``NAME.key`` (public) and
``NAME.key_secret`` (both keys), made by ``pylm keys NAME FOLDER``. The
environment sets them for every server and client of a process:

- ``PYLM_CURVE_KEYS``: the ``.key_secret`` file of this process's key pair;
- ``PYLM_CURVE_ALLOW``: a folder of ``.key`` files of the clients a server
  lets in (``any``: every client with a key pair, i.e. encryption only);
- ``PYLM_CURVE_SERVER``: the ``.key`` file of the server a client calls by
  address (a client calling by name takes it from the registry).
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

__all__ = ["Curve", "Keys", "generate_keys"]

ALLOW_ANY = "any"


@dataclass(frozen=True)
class Keys:
    """A CURVE key pair (Z85 text as bytes); ``secret`` None for a public key alone."""

    public: bytes
    secret: bytes | None = None

    @classmethod
    def generate(cls) -> Keys:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Keys:
        """Read a ``.key`` or ``.key_secret`` certificate file."""
        try:
            public, secret = zmq.auth.load_certificate(os.fspath(path))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read CURVE keys from {os.fspath(path)!r}: {exc}") from exc
        return cls(public, secret)


def generate_keys(name: str, folder: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write a new key pair as ``folder/name.key`` and ``folder/name.key_secret``."""
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    for path in (target / f"{name}.key", target / f"{name}.key_secret"):
        if path.exists():
            raise FileExistsError(f"{path} exists: remove it first, or choose another name")
    old_mask = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        public, secret = zmq.auth.create_certificates(os.fspath(folder), name)
    finally:
        os.umask(old_mask)
    os.chmod(public, 0o644)
    return Path(public), Path(secret)


def _allowed_keys(folder: str | os.PathLike[str]) -> frozenset[bytes]:
    keys = set()
    for path in sorted(Path(folder).glob("*.key")):
        keys.add(Keys.load(path).public)
    return frozenset(keys)


class Curve:
    """The CURVE settings of a server or a client.

    ``keys``: this side's key pair. ``allowed``: for a server, the public
    keys of the clients it lets in (None: any client with a key pair).
    ``server_key``: for a client calling by address, the server's public key.
    """

    def __init__(
        self,
        keys: Keys,
        allowed: Iterable[bytes] | None = None,
        server_key: bytes | None = None,
    ) -> None:
        if keys.secret is None:
            raise ValueError("CURVE needs a key pair with its secret key (a .key_secret file)")
        self.keys = keys
        self.allowed = None if allowed is None else frozenset(allowed)
        self.server_key = server_key
        self._domain = "pylm-" + uuid.uuid4().hex[:12]

    @classmethod
    def from_env(cls) -> Curve | None:
        """The settings ``PYLM_CURVE_*`` give, or None when ``PYLM_CURVE_KEYS`` is unset."""
        secret = os.environ.get("PYLM_CURVE_KEYS")
        if not secret:
            return None
        allow = os.environ.get("PYLM_CURVE_ALLOW", "")
        allowed = None if allow in ("", ALLOW_ANY) else _allowed_keys(allow)
        server = os.environ.get("PYLM_CURVE_SERVER")
        return cls(Keys.load(secret), allowed, Keys.load(server).public if server else None)

    def serve(self, socket: zmq.Socket) -> None:
        """Make a socket about to bind a CURVE server that lets in allowed clients."""
        _authenticator(socket.context).configure_curve_callback(self._domain, self)
        socket.setsockopt(zmq.ZAP_DOMAIN, self._domain.encode())
        socket.setsockopt(zmq.CURVE_SERVER, 1)
        socket.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.public)
        assert self.keys.secret is not None
        socket.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret)

    def connect(self, socket: zmq.Socket, server_key: bytes | None = None) -> None:
        """Make a socket about to connect a CURVE client of the server whose
        public key is ``server_key`` (default: the one these settings name)."""
        key = server_key or self.require_server_key("the server")
        socket.setsockopt(zmq.CURVE_SERVERKEY, key)
        socket.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.public)
        assert self.keys.secret is not None
        socket.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret)

    def require_server_key(self, server: str) -> bytes:
        """The server key these settings name, to connect to ``server`` (its
        name and address, as the error should give them) by address;
        ValueError when there is none: the connection would go out in plain
        text."""
        if self.server_key is None:
            raise ValueError(
                f"CURVE: no public key for {server}: give it (PYLM_CURVE_SERVER, or"
                " Curve(server_key=...)), or call the server by name (the registry has it)"
            )
        return self.server_key

    def callback(self, domain: str, client_key: bytes) -> bool:
        """The ZAP handler's question: may the client with this key in?"""
        # A server's own key is in: stop() wakes its loop through its socket.
        return self.allowed is None or client_key in self.allowed or client_key == self.keys.public

    @property
    def public_key(self) -> str:
        return self.keys.public.decode("ascii")


_AUTHENTICATORS: dict[int, ThreadAuthenticator] = {}
_LOCK = threading.Lock()


def _authenticator(context: zmq.Context) -> ThreadAuthenticator:
    """The ZAP handler of ``context``, started once and kept for its life."""
    with _LOCK:
        found = _AUTHENTICATORS.get(id(context))
        if found is None:
            found = _AUTHENTICATORS[id(context)] = ThreadAuthenticator(context)
            found.start()
        return found
