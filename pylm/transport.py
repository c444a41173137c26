"""ZeroMQ helpers shared by servers and clients: context, addresses, sockets."""

from __future__ import annotations

import re
import socket as sockets
import threading
from collections import deque
from collections.abc import Callable, Iterable

import zmq

from pylm import monitors
from pylm.errors import PylmError
from pylm.liveness import heartbeats
from pylm.protocol import MAGIC

__all__ = [
    "MAX_FRAMES",
    "ZERO_COPY_MIN",
    "AddressError",
    "Backlog",
    "bind",
    "check_address",
    "close_listener",
    "close_socket",
    "copied",
    "default_context",
    "is_wildcard",
    "public_host",
    "read_envelope",
    "recv_message",
    "rest_of",
    "send_frame",
]


class AddressError(PylmError, ValueError):
    """An endpoint address is malformed or cannot be bound."""


# pyzmq's Socket.send is a Python method that looks at DRAFT routing ids and
# groups before it calls the compiled send of its base class; the hot paths
# call that one directly: ``send_frame(socket, data, flags)``, about 0.3 us
# less per frame. Blocking sockets only (an asyncio socket's send is its own).
send_frame: Callable[..., None] = getattr(zmq.backend, "Socket", zmq.Socket).send

_ADDRESS = re.compile(r"^(tcp|ipc|inproc|ws|wss|pgm|epgm|vmci|udp)://.+$")


def default_context(context: zmq.Context | None = None) -> zmq.Context:
    """The context to use: the one given, or the process-wide shared one."""
    return context if context is not None else zmq.Context.instance()


def check_address(address: object, what: str = "address") -> str:
    """Return ``address`` if it looks like a ZeroMQ endpoint, else raise."""
    if not isinstance(address, str):
        raise TypeError(
            f"{what} must be a str such as 'tcp://127.0.0.1:5555', got {type(address).__name__}"
        )
    if not _ADDRESS.match(address):
        raise AddressError(
            f"{what} {address!r} is not a ZeroMQ endpoint such as 'tcp://127.0.0.1:5555'"
        )
    return address


def bind(socket: zmq.Socket, address: str) -> str:
    """Bind ``socket`` and return the address it really listens on.

    A TCP port of ``0`` or ``*`` asks the OS for a free port; the returned
    address names the chosen one.
    """
    check_address(address)
    heartbeats(socket)  # a live server says so, however far behind (pylm.liveness)
    if address.startswith("tcp://"):
        host, _, port = address[len("tcp://") :].rpartition(":")
        if port == "0":
            address = f"tcp://{host}:*"
    try:
        socket.bind(address)
    except zmq.ZMQError as exc:
        raise AddressError(f"cannot bind {address!r}: {exc}") from exc
    endpoint = socket.getsockopt_string(zmq.LAST_ENDPOINT)
    return endpoint or address


def is_wildcard(host: str) -> bool:
    """Whether ``host`` (as bound, IPv6 in brackets or not) means every
    interface: then others reach it at :func:`public_host`."""
    return host in ("0.0.0.0", "*", "::", "[::]")


def public_host(peers: Iterable[tuple[str, int]]) -> str:
    """The address of this host that other hosts reach it at, for a server
    bound to a wildcard: the address of the interface that routes to the
    first reachable of ``peers`` (the registry's endpoints; no packet is
    sent), or the host name when there is none or it is a loopback address
    (a registry on this host tells nothing about the network)."""
    for host, port in peers:
        try:
            found = sockets.getaddrinfo(host, port, type=sockets.SOCK_DGRAM)
        except OSError:
            continue
        for family, kind, _, _, address in found:
            with sockets.socket(family, kind) as probe:
                try:
                    probe.connect(address)
                except OSError:  # no route
                    continue
                local = str(probe.getsockname()[0])
            if local.startswith("127.") or local == "::1":
                return sockets.gethostname()
            return f"[{local}]" if ":" in local else local
    return sockets.gethostname()


def close_socket(socket: zmq.Socket | None) -> None:
    """Close without waiting for unsent messages (``linger=0``)."""
    if socket is not None and not socket.closed:
        socket.close(linger=0)


def close_listener(socket: zmq.Socket | None, timeout: float = 1.0, linger: int = 0) -> None:
    """Close a socket that listens (it was bound), like :func:`close_socket`
    (``linger`` ms for what it still has to send: 0 by default),
    and return once libzmq has closed its listening sockets, so that their
    addresses can be bound again at once (it closes them in its I/O thread,
    after ``close`` returns); waits ``timeout`` seconds at most.

    A monitor on the socket reports each listener closed, then that the
    monitor stopped, which libzmq does last, as it destroys the socket."""
    if socket is None or socket.closed:
        return
    stopped = threading.Event()

    def note(event: monitors.Event) -> None:
        if event.kind == zmq.EVENT_MONITOR_STOPPED:
            stopped.set()

    try:
        # This monitor replaces any other the socket had (one a socket).
        monitors.watch(socket, zmq.EVENT_CLOSED, note)
    except zmq.ZMQError:  # no monitor (e.g. the context is ending): do not wait
        socket.close(linger=linger)
        return
    socket.close(linger=linger)
    stopped.wait(timeout)


ZERO_COPY_MIN = 1 << 20
"""Bytes of a message's last frame (its payload) from which pylm sends it
without copying it into libzmq (pyzmq's ``copy=False``). Below, a copy costs
less than the zero-copy send's hand-off: pyzmq frees a zero-copy buffer in a
thread of its own, which takes the GIL from the serving thread (in one run of
2 processes echoing: 5-20 % more round trips copied at 100 KiB, level at 1 MiB)."""


def copied(frames: list[bytes]) -> bool:
    """The ``copy`` flag of a send of ``frames``: False for a large payload."""
    return len(frames[-1]) < ZERO_COPY_MIN


MAX_FRAMES = 16
"""Frames of one message that a server keeps: a pylm message has two at most,
an envelope a few (one per hop); the frames past these are read and dropped,
so a peer that sends thousands of empty frames costs no memory."""


def rest_of(socket: zmq.Socket, limit: int = MAX_FRAMES) -> list[bytes]:
    """The frames of the message being read that are still to come (none
    for a one-frame message), ``limit`` at most (the others are read and
    dropped). Read this way, never by a plain ``recv()``, a message that
    claims a payload frame it lacks cannot block the reader, and frames past
    the end of a message are not taken for messages."""
    frames: list[bytes] = []
    while socket.getsockopt(zmq.RCVMORE):
        frame = socket.recv()
        if len(frames) < limit:
            frames.append(frame)
    return frames


def recv_message(socket: zmq.Socket, limit: int = MAX_FRAMES) -> list[bytes]:
    """The next whole message, without waiting (``zmq.Again`` if there is
    none), ``limit`` frames at most as :func:`rest_of` keeps them."""
    return [socket.recv(zmq.NOBLOCK), *rest_of(socket, limit - 1)]


def read_envelope(frames: list[bytes]) -> tuple[list[bytes], list[bytes]] | None:
    """A ROUTER's message as (envelope, message), for a server that answers
    in the envelope a request came in: the peer's id alone when a pylm head
    follows it (a DEALER sending the message as it is), else the routing ids
    up to and including the first empty frame (a REQ, or a DEALER sending
    the delimiter a REQ would). None when neither fits."""
    if len(frames) >= 2 and frames[1].startswith(MAGIC):
        return frames[:1], frames[1:]
    for index in range(1, len(frames) - 1):
        if not frames[index]:
            return frames[: index + 1], frames[index + 1 :]
    return None


class Backlog:
    """Messages a ROUTER socket had no room for yet, per peer and in order
    (the peer is not reading), sent as the peer takes them, while the other
    peers are served; at most ``limit`` answers in all, and a quarter of
    that for one peer (a message counts as the answers it carries: a
    BATCH's count). ``gone(peer, frames, answers)`` is told of each message
    whose peer is not connected; ``sent`` counts the answers sent."""

    def __init__(self, limit: int, gone: Callable[[bytes, list[bytes], int], None]) -> None:
        self.socket: zmq.Socket | None = None  # the ROUTER, once its owner opened it
        self.limit = limit
        self.per_peer = max(1, limit // 4)
        self.size = 0  # answers held, in all
        self.sent = 0
        self._gone = gone
        self._held: dict[bytes, deque[tuple[list[bytes], int]]] = {}
        self._sizes: dict[bytes, int] = {}  # answers held per peer

    def __bool__(self) -> bool:
        return bool(self._held)

    def waiting(self, peer: bytes) -> int:
        """How many answers wait for ``peer``."""
        return self._sizes.get(peer, 0)

    def holds(self, peer: bytes) -> bool:
        """Whether messages wait for ``peer`` (a new one goes behind them)."""
        return peer in self._held

    def offer(self, peer: bytes, frames: list[bytes], answers: int = 1) -> bool:
        """Send now, or keep for later behind what waits for ``peer``;
        ``answers``: how many the message carries. False only when the peer
        has no room and the backlog is full (in all, or for that peer)."""
        held = self._held.get(peer)
        if held is None and self._try(peer, frames, answers):
            return True
        if self.size >= self.limit or self._sizes.get(peer, 0) >= self.per_peer:
            return False
        if held is None:
            held = self._held[peer] = deque()
        held.append((frames, answers))
        self._sizes[peer] = self._sizes.get(peer, 0) + answers
        self.size += answers
        return True

    def flush(self) -> None:
        """Send what waits, as far as the peers take it."""
        for peer, held in list(self._held.items()):
            while held and self._try(peer, *held[0]):
                answers = held.popleft()[1]
                self.size -= answers
                self._sizes[peer] -= answers
            if not held:
                del self._held[peer]
                del self._sizes[peer]

    def _try(self, peer: bytes, frames: list[bytes], answers: int) -> bool:
        """Send without waiting; False if the peer has no room now."""
        assert self.socket is not None
        try:
            self.socket.send_multipart([peer, *frames], zmq.NOBLOCK, copy=copied(frames))
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self._gone(peer, frames, answers)  # not connected (any more, or yet)
            return True
        self.sent += answers
        return True
