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
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
_FORGET_WAIT = 2.0  # s a closing client waits for the reader to close its monitor


class Connections:
    """What the monitors of a client's sockets say of their connections: a
    CURVE handshake a server refused, so a call that times out can say why
    (libzmq does not retry such a connection, so a refusal stands until the
    client is made again); and connections that dropped, so a call that
    gets no answer can say it may have run on an instance that went away.
    One monitor per socket, read as its events come by the process's
    monitor reader (:class:`_Reader`): libzmq's I/O thread blocks on a
    monitor nobody reads once a thousand events wait in it, and with it
    every socket of the context."""

    def __init__(self) -> None:
        # socket -> (its monitor, refusals watched, drops watched)
        self._monitors: dict[zmq.Socket, tuple[zmq.Socket, bool, bool]] = {}
        self._refused: str | None = None
        self.drops = 0  # connections that dropped, so far (the reader counts)
        self.dropped: str | None = None  # the endpoint of the last one
        self._looked = 0  # drops when the client last looked

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
        _reader().add(monitor, self)

    def note(self, event: Mapping[str, Any]) -> None:
        """Take one event of a watched socket's monitor (the reader's thread)."""
        endpoint = event["endpoint"].decode(errors="replace")
        kind = event["event"]
        if kind == zmq.EVENT_DISCONNECTED:
            self.dropped = endpoint
            self.drops += 1
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self._refused = (
                f"the server at {endpoint} refused this client's key (ZAP status {event['value']})"
            )
        elif kind & _REFUSED:
            self._refused = (
                f"the server at {endpoint} failed the CURVE handshake (wrong server"
                " key, or not a CURVE server)"
            )

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
    _reader().remove(monitor)


class _Reader:
    """The thread that reads the monitors of every :class:`Connections` of
    the process as their events come. It runs while there is a monitor to
    read and ends with the last one; a pipe wakes it when monitors come or
    go (a monitor is used by its thread only: sockets are not thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._coming: list[tuple[zmq.Socket, Connections]] = []
        self._going: list[tuple[zmq.Socket, threading.Event]] = []
        self._thread: threading.Thread | None = None
        self._wake_in, self._wake_out = os.pipe()
        os.set_blocking(self._wake_in, False)
        os.set_blocking(self._wake_out, False)

    def add(self, monitor: zmq.Socket, connections: Connections) -> None:
        with self._lock:
            self._coming.append((monitor, connections))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="pylm-connections", daemon=True
                )
                self._thread.start()
        self._wake()

    def remove(self, monitor: zmq.Socket) -> None:
        """Close ``monitor``, once its thread let go of it."""
        closed = threading.Event()
        with self._lock:
            if self._thread is None:  # it ended (or never ran in this process)
                monitor.close(linger=0)
                return
            self._going.append((monitor, closed))
        self._wake()
        closed.wait(_FORGET_WAIT)

    def _wake(self) -> None:
        try:
            os.write(self._wake_out, b"!")
        except BlockingIOError:  # the pipe is full: the thread wakes anyway
            pass

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_in, zmq.POLLIN)
        monitors: dict[zmq.Socket, Connections] = {}
        while True:
            with self._lock:
                coming, self._coming = self._coming, []
                going, self._going = self._going, []
            for monitor, connections in coming:
                monitors[monitor] = connections
                poller.register(monitor, zmq.POLLIN)
            for monitor, closed in going:
                if monitors.pop(monitor, None) is not None:
                    poller.unregister(monitor)
                monitor.close(linger=0)
                closed.set()
            with self._lock:
                if not monitors and not self._coming and not self._going:
                    self._thread = None  # the next add starts another
                    return
            try:
                ready = poller.poll()
            except zmq.ZMQError:  # a context terminated under a monitor
                ready = []
                for monitor in [m for m in monitors if _gone(m)]:
                    poller.unregister(monitor)
                    del monitors[monitor]
                    monitor.close(linger=0)
            for item, _ in ready:
                if item == self._wake_in:
                    _drain(self._wake_in)
                    continue
                if item in monitors:
                    _read(item, monitors[item])


def _read(monitor: zmq.Socket, connections: Connections) -> None:
    while True:
        try:
            event = recv_monitor_message(monitor, zmq.NOBLOCK)
        except zmq.ZMQError:  # none waiting (Again), or closed
            return
        connections.note(event)


def _gone(monitor: zmq.Socket) -> bool:
    try:
        monitor.getsockopt(zmq.EVENTS)
    except zmq.ZMQError:
        return True
    return False


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


_READER: _Reader | None = None
_READER_LOCK = threading.Lock()


def _reader() -> _Reader:
    global _READER
    with _READER_LOCK:
        if _READER is None:
            _READER = _Reader()
        return _READER


def _forked() -> None:
    """In a forked child: the parent's reader thread did not come along."""
    global _READER, _READER_LOCK
    _READER, _READER_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forked)
