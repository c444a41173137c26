"""Which peer instances a sender routes to: only the live ones.

Every socket that sends work to a set of instances (a client to a server,
a :class:`~pylm.chained.LoopClient` to the first stage, a stage to its next
stage) is made a sender to live peers by :func:`to_live_peers`:

- libzmq attaches a connection to the socket's rotation only once its ZMTP
  handshake has completed (``ZMQ_IMMEDIATE``), and takes it out as soon as
  the connection drops: an instance killed on a reachable host leaves the
  rotation within milliseconds, and what was queued for it is dropped
  rather than kept for a reconnection that may never come (the client's
  books send it again, see :mod:`pylm.window`);
- ZMTP heartbeats both ways (``ZMQ_HEARTBEAT_IVL``, ``_TIMEOUT``): an
  instance that goes silent without a drop (a frozen process, a host gone,
  a partition) is taken out after ``timeout`` seconds without a sign of
  life. Listening sockets send heartbeats too (:func:`heartbeats`, which
  :func:`pylm.transport.bind` applies) but time nobody out: libzmq answers
  a heartbeat only once it reads what came before it, so a live server
  that is merely behind (it reads nothing while its queue is full) would
  look dead to its senders, and they to it; its own heartbeats, sent
  whatever it reads, say it lives;
- an instance that comes back (its process resumes, the network heals, a
  restart at the same address) re-enters the rotation once its handshake
  completes again; libzmq retries the connection every 100 ms.

None of this waits for the registry: a lease expires 10 s after its
process died, the rotation changed long before. The settings are the
process's (:func:`liveness`): ``PYLM_HEARTBEAT`` in seconds, the time a
silent peer keeps its place (default 1.5; a heartbeat goes every third of
it).
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from pylm.errors import PylmError

__all__ = [
    "DEFAULT_HEARTBEAT",
    "Connections",
    "Liveness",
    "LivenessError",
    "heartbeats",
    "liveness",
    "to_live_peers",
]

DEFAULT_HEARTBEAT = 1.5  # s a silent peer keeps its place in a rotation

_ENV = "PYLM_HEARTBEAT"
_SHORTEST, _LONGEST = 0.1, 3600.0


class LivenessError(PylmError, ValueError):
    """A heartbeat setting out of bounds or not a number."""


@dataclass(frozen=True)
class Liveness:
    """How long a silent peer keeps its place (``timeout``, seconds); a
    heartbeat goes every third of it."""

    timeout: float = DEFAULT_HEARTBEAT

    def __post_init__(self) -> None:
        timeout = self.timeout
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not math.isfinite(timeout)
            or not _SHORTEST <= timeout <= _LONGEST
        ):
            raise LivenessError(
                f"heartbeat timeout must be {_SHORTEST:g} to {_LONGEST:g} s, got {timeout!r}"
            )

    @classmethod
    def parse(cls, text: str, source: str = _ENV) -> Liveness:
        """From a number of seconds as text (``source`` names where it came from)."""
        try:
            timeout = float(text)
        except ValueError:
            raise LivenessError(
                f"{source} must be a number of seconds, got {text[:100]!r}"
            ) from None
        try:
            return cls(timeout)
        except LivenessError as exc:
            raise LivenessError(f"{source}: {exc}") from None

    @property
    def interval_ms(self) -> int:
        return max(1, round(self.timeout * 1000 / 3))

    @property
    def timeout_ms(self) -> int:
        return round(self.timeout * 1000)


def liveness() -> Liveness:
    """The process's settings: ``PYLM_HEARTBEAT`` if set, else the default."""
    text = os.environ.get(_ENV, "").strip()
    return Liveness.parse(text) if text else Liveness()


def to_live_peers(
    socket: zmq.Socket, settings: Liveness | None = None, *, immediate: bool = True
) -> zmq.Socket:
    """Make ``socket`` (about to connect) route only to live peers, as the
    module says; ``settings`` default to :func:`liveness`. ``immediate``
    False keeps a connection's pipe while it reconnects (heartbeats only).
    Returns it."""
    settings = settings or liveness()
    if immediate:
        socket.setsockopt(zmq.IMMEDIATE, 1)
    socket.setsockopt(zmq.HEARTBEAT_IVL, settings.interval_ms)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, settings.timeout_ms)
    return socket


def heartbeats(socket: zmq.Socket, settings: Liveness | None = None) -> zmq.Socket:
    """Have ``socket`` (about to bind) send ZMTP heartbeats, and time no
    connection out (0: libzmq's default would be the interval). Returns it."""
    settings = settings or liveness()
    socket.setsockopt(zmq.HEARTBEAT_IVL, settings.interval_ms)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 0)
    return socket


_REFUSED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_MONITORS = itertools.count()  # each monitor at an address of its own


class Connections:
    """What the monitors of a client's sockets say of their connections,
    read when asked (no thread): a CURVE handshake a server refused, so a
    call that times out can say why (libzmq does not retry such a
    connection, so a refusal stands until the client is made again); and
    connections that dropped, so a call that gets no answer can say it may
    have run on an instance that went away. One monitor per socket."""

    def __init__(self) -> None:
        # socket -> (its monitor, refusals watched, drops watched)
        self._monitors: dict[zmq.Socket, tuple[zmq.Socket, bool, bool]] = {}
        self._refused: str | None = None
        self.drops = 0  # connections that dropped, so far
        self.dropped: str | None = None  # the endpoint of the last one

    def watch(self, socket: zmq.Socket, *, refusals: bool = False, drops: bool = False) -> None:
        """Watch ``socket`` (about to connect) for handshakes refused
        (``refusals``: it is a CURVE client) and for connections dropped."""
        old = self._monitors.get(socket)
        if old is not None:
            refusals, drops = refusals or old[1], drops or old[2]
            self.forget(socket)
        events = (_REFUSED if refusals else 0) | (zmq.EVENT_DISCONNECTED if drops else 0)
        address = f"inproc://pylm-connections-{os.getpid()}-{next(_MONITORS)}"
        socket.monitor(address, events)
        monitor = socket.context.socket(zmq.PAIR)
        monitor.connect(address)
        self._monitors[socket] = (monitor, refusals, drops)

    def _read(self) -> None:
        for monitor, _, _ in self._monitors.values():
            while True:
                try:
                    event = recv_monitor_message(monitor, zmq.NOBLOCK)
                except zmq.ZMQError:  # none waiting (Again), or closed
                    break
                endpoint = event["endpoint"].decode(errors="replace")
                kind = event["event"]
                if kind == zmq.EVENT_DISCONNECTED:
                    self.drops += 1
                    self.dropped = endpoint
                elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    self._refused = (
                        f"the server at {endpoint} refused this client's key"
                        f" (ZAP status {event['value']})"
                    )
                elif kind & _REFUSED:
                    self._refused = (
                        f"the server at {endpoint} failed the CURVE handshake (wrong server"
                        " key, or not a CURVE server)"
                    )

    def refusal(self) -> str | None:
        """How a handshake of a watched socket failed, if one did."""
        self._read()
        return self._refused

    def drops_now(self) -> int:
        """The connections that dropped so far (read from the monitors now)."""
        self._read()
        return self.drops

    def forget(self, socket: zmq.Socket) -> None:
        """Stop watching ``socket`` (before it closes)."""
        watched = self._monitors.pop(socket, None)
        if watched is not None:
            _end(socket, watched[0])

    def close(self) -> None:
        for socket, (monitor, _, _) in self._monitors.items():
            _end(socket, monitor)
        self._monitors.clear()


def _end(socket: zmq.Socket, monitor: zmq.Socket) -> None:
    try:
        socket.disable_monitor()
    except zmq.ZMQError:  # the socket closed first: its monitoring ended with it
        pass
    monitor.close(linger=0)
