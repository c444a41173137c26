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
- an instance that leaves (it deregistered, and serves until its input is
  quiet) is not disconnected in place: libzmq would end its pipe later,
  in its I/O thread, with what was queued in it, and a message sent at
  once could still take it. The sender makes a new socket for the
  instances that stay and closes the old one with :func:`retire`: with a
  linger, what it queued still goes out;
- an instance that comes back (its process resumes, the network heals, a
  restart at the same address) re-enters the rotation once its handshake
  completes again; libzmq retries the connection every 100 ms, and gives
  a connection attempt at most a second (``ZMQ_CONNECT_TIMEOUT``) before
  it starts another.

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

from pylm import monitors
from pylm.errors import PylmError

__all__ = [
    "DEFAULT_HEARTBEAT",
    "Connections",
    "Liveness",
    "LivenessError",
    "heartbeats",
    "liveness",
    "retire",
    "to_live_peers",
]

DEFAULT_HEARTBEAT = 1.5  # s a silent peer keeps its place in a rotation

_ENV = "PYLM_HEARTBEAT"
_SHORTEST, _LONGEST = 0.1, 3600.0
_CONNECT_MS = 1000
_RETIRE_LINGER_MS = 1000  # at most, for what a retired socket queued (see retire)


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

    @property
    def connect_ms(self) -> int:
        """How long a TCP connection attempt may wait before a new one
        starts: at most a second, so that a peer that comes back (a healed
        partition) is reached within about a second, not after the backoff
        of a SYN sent while it was away (3 s, 7 s, ... by the kernel's)."""
        return min(self.timeout_ms, _CONNECT_MS)


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
    socket.setsockopt(zmq.CONNECT_TIMEOUT, settings.connect_ms)
    return socket


def heartbeats(socket: zmq.Socket, settings: Liveness | None = None) -> zmq.Socket:
    """Have ``socket`` (about to bind) send ZMTP heartbeats, and time no
    connection out (0: libzmq's default would be the interval). Returns it."""
    settings = settings or liveness()
    socket.setsockopt(zmq.HEARTBEAT_IVL, settings.interval_ms)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 0)
    return socket


def retire(socket: zmq.Socket, links: Connections | None = None) -> None:
    """Close a sender's ``socket`` replaced because instances left (no
    longer watched by ``links``), letting what it queued go out for a
    second at most: the instances that left serve until their input is
    quiet; one that is gone takes nothing, and the books send it again."""
    if links is not None:
        links.forget(socket)
    socket.close(linger=_RETIRE_LINGER_MS)


_REFUSED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_LINKS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED


class Connections:
    """What the monitors of a sender's sockets (a client's, a stage's to
    its next stages) say of their connections, read as their events come by
    :mod:`pylm.monitors`: a CURVE handshake a server refused, so a call that
    times out can say why (libzmq does not retry such a connection, so a
    refusal stands until the client is made again); the peers connected and
    live now; connections that dropped (an instance killed, or silent for
    the heartbeat timeout), so a call that gets no answer can say it may
    have run on an instance that went away; and the peers unreachable now
    (dropped, or never reached, and tried again since), whatever the
    registry still says of them. One monitor per socket."""

    def __init__(self) -> None:
        # socket -> (refusals watched, drops watched, the number of its monitor)
        self._watched: dict[zmq.Socket, tuple[bool, bool, int]] = {}
        self._refused: str | None = None
        self.drops = 0  # connections that dropped, so far (counted by the monitors' thread)
        self.dropped: str | None = None  # the endpoint of the last one
        self._looked = 0  # drops when the client last looked
        # (socket number, endpoint) of the connections whose handshake
        # completed and that have not dropped since: the live peers.
        self._live: set[tuple[int, str]] = set()
        # endpoint -> the sockets (numbers) that failed to reach it since
        # anyone last did: the peers unreachable now.
        self._down: dict[str, set[int]] = {}
        self._numbers = itertools.count()

    @property
    def live_peers(self) -> int:
        """The peer endpoints a watched socket has a live connection to now."""
        return len({endpoint for _, endpoint in list(self._live)})

    @property
    def unreachable(self) -> list[str]:
        """The peer endpoints a watched socket is connected to and cannot
        reach now: its connection dropped, or was tried and failed, and no
        watched socket has reached it since."""
        return sorted(endpoint for endpoint, numbers in list(self._down.items()) if numbers)

    def watch(self, socket: zmq.Socket, *, refusals: bool = False, drops: bool = False) -> None:
        """Watch ``socket`` (about to connect) for handshakes refused
        (``refusals``: it is a CURVE client) and for connections dropped."""
        old = self._watched.get(socket)
        if old is not None:  # its monitor is replaced by one that watches both
            refusals, drops = refusals or old[0], drops or old[1]
        number = next(self._numbers)
        self._watched[socket] = (refusals, drops, number)
        events = (_REFUSED if refusals else 0) | (_LINKS if drops else 0)
        monitors.watch(socket, events, lambda event: self._note(number, event))

    def _note(self, number: int, event: monitors.Event) -> None:
        if event.kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._live.add((number, event.endpoint))
            self._down.pop(event.endpoint, None)
        elif event.kind == zmq.EVENT_DISCONNECTED:
            # A drop is of a connection that was up: libzmq reports one that
            # failed its handshake (refused, not ZMTP) as disconnected too.
            link = (number, event.endpoint)
            if link in self._live:
                self._live.discard(link)
                self.dropped = event.endpoint
                self.drops += 1
                self._down.setdefault(event.endpoint, set()).add(number)
        elif event.kind == zmq.EVENT_CONNECT_RETRIED:  # refused, or timed out: tried again
            if (number, event.endpoint) not in self._live:
                self._down.setdefault(event.endpoint, set()).add(number)
        elif event.kind == zmq.EVENT_MONITOR_STOPPED:  # the socket closed, or stop()
            self._live = {link for link in self._live if link[0] != number}
            for endpoint, numbers in list(self._down.items()):
                numbers.discard(number)
                if not numbers:
                    self._down.pop(endpoint, None)
            for socket, watched in list(self._watched.items()):
                if watched[2] == number:
                    self._watched.pop(socket, None)
        elif event.kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self._refused = (
                f"the server at {event.endpoint} refused this client's key"
                f" (ZAP status {event.value})"
            )
        elif event.kind & _REFUSED:
            self._refused = (
                f"the server at {event.endpoint} failed the CURVE handshake (wrong server"
                " key, or not a CURVE server)"
            )

    def discard(self, endpoint: str) -> None:
        """``endpoint`` was disconnected on purpose (it left the registry):
        not a live peer any more (libzmq reports no event for it)."""
        self._live = {link for link in self._live if link[1] != endpoint}
        self._down.pop(endpoint, None)

    def refusal(self) -> str | None:
        """How a handshake of a watched socket failed, if one did."""
        return self._refused

    def drops_now(self) -> int:
        """The connections that dropped so far; the client looked now."""
        self._looked = drops = self.drops
        return drops

    def dropped_since(self, drops: int | None) -> bool:
        """Whether a connection dropped since there were ``drops`` (None:
        since the client last looked); the client looked now."""
        before = self._looked if drops is None else drops
        return self.drops_now() > before

    def forget(self, socket: zmq.Socket) -> None:
        """Stop watching ``socket`` (before it closes)."""
        if self._watched.pop(socket, None) is not None:
            monitors.stop(socket)

    def close(self) -> None:
        for socket in list(self._watched):
            monitors.stop(socket)
        self._watched.clear()
