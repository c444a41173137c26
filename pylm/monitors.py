"""Socket monitors, read by one thread per process as their events come.

libzmq reports what happens to a socket's connections (connected, dropped,
a handshake failed, a listener closed) on a monitor: a PAIR socket it sends
each event to **with a blocking send, from its I/O thread**. A monitor that
nobody reads (a thousand events queued), or whose reading end was closed
while the socket could still report something, blocks that thread, and
with it every socket of the context: nothing connects, sends or closes any
more. So every monitor pylm uses goes through :func:`watch`: the events go
to a callback, called in this module's thread, which reads each monitor
until libzmq's last event for it, ``EVENT_MONITOR_STOPPED``, and only then
closes its end. A monitor stops when its socket closes, when :func:`stop`
is called, or when another :func:`watch` of the socket replaces it (a
socket has one monitor). The thread runs while there is a monitor to read.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

__all__ = ["Event", "stop", "watch"]


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a monitored socket: its kind (``zmq.EVENT_*``), its
    value (a file descriptor, an error number, a ZAP status...) and the
    endpoint it concerns."""

    kind: int
    value: int
    endpoint: str


OnEvent = Callable[[Event], None]


def watch(socket: zmq.Socket, events: int, on_event: OnEvent) -> None:
    """Call ``on_event`` (in the monitors' thread: keep it short, and let it
    raise nothing) with each of ``events`` that befalls ``socket`` from now
    until its monitor stops, then once with ``EVENT_MONITOR_STOPPED``,
    whether asked for or not. Called by the thread that owns ``socket``."""
    address = f"inproc://pylm-monitor-{os.getpid()}-{next(_NUMBERS)}"
    # The reading end first (inproc connects before the bind): a monitor
    # must never exist without its reader. A plain socket of the same
    # libzmq context, whatever kind of context the watched socket has (an
    # asyncio one would hand out sockets whose reads are futures).
    monitor: zmq.Socket = zmq.Context.shadow(socket.context.underlying).socket(zmq.PAIR)
    monitor.setsockopt(zmq.LINGER, 0)
    try:
        monitor.connect(address)
        socket.monitor(address, events | zmq.EVENT_MONITOR_STOPPED)
    except BaseException:
        monitor.close(linger=0)
        raise
    _reader().add(monitor, on_event)


def stop(socket: zmq.Socket) -> None:
    """Stop the monitor of ``socket`` (a socket that closes stops its own)."""
    try:
        socket.disable_monitor()
    except zmq.ZMQError:  # closed already: its monitor stopped with it
        pass


class _Reader:
    """The thread that reads every monitor; a pipe wakes it when one comes
    (a monitor is used by this thread only: sockets are not thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._coming: list[tuple[zmq.Socket, OnEvent]] = []
        self._thread: threading.Thread | None = None
        self._wake_in, self._wake_out = os.pipe()
        os.set_blocking(self._wake_in, False)
        os.set_blocking(self._wake_out, False)

    def add(self, monitor: zmq.Socket, on_event: OnEvent) -> None:
        with self._lock:
            self._coming.append((monitor, on_event))
            if self._thread is None:
                self._start()
        try:
            os.write(self._wake_out, b"!")
        except BlockingIOError:  # the pipe is full: the thread wakes anyway
            pass

    def _start(self) -> None:
        """Start the thread (under the lock)."""
        thread = threading.Thread(target=self._run, name="pylm-monitors", daemon=True)
        thread.start()
        self._thread = thread

    def _run(self) -> None:
        monitors: dict[zmq.Socket, OnEvent] = {}
        try:
            self._read_all(monitors)
        except Exception:  # a bug: another thread takes the monitors over
            _LOG.exception("the socket monitors' thread failed; another takes over")
            with self._lock:
                self._coming[:0] = list(monitors.items())
                self._thread = None
                self._start()

    def _read_all(self, monitors: dict[zmq.Socket, OnEvent]) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_in, zmq.POLLIN)
        while True:
            with self._lock:
                coming, self._coming = self._coming, []
                if not monitors and not coming:
                    self._thread = None  # the next add starts another
                    return
            for monitor, on_event in coming:
                monitors[monitor] = on_event
                poller.register(monitor, zmq.POLLIN)
            try:
                ready = poller.poll()
            except zmq.ZMQError:  # a context was terminated under a monitor
                ready = [(monitor, zmq.POLLIN) for monitor in monitors]
            for item, _ in ready:
                if item == self._wake_in:
                    _drain(self._wake_in)
                elif item in monitors and _read(item, monitors[item]):
                    poller.unregister(item)
                    del monitors[item]
                    item.close(linger=0)


def _read(monitor: zmq.Socket, on_event: OnEvent) -> bool:
    """Pass on the events waiting on ``monitor``; whether it stopped."""
    while True:
        try:
            message = recv_monitor_message(monitor, zmq.NOBLOCK)
        except zmq.Again:
            return False
        except zmq.ZMQError:  # its context was terminated: nothing more comes
            return True
        endpoint = message["endpoint"]
        event = Event(
            message["event"],
            message["value"],
            endpoint.decode(errors="replace") if isinstance(endpoint, bytes) else str(endpoint),
        )
        try:
            on_event(event)
        except Exception:  # a bug of the callback's: the thread reads on
            _LOG.exception("a monitor's callback failed on %s", event)
        if event.kind == zmq.EVENT_MONITOR_STOPPED:
            return True


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


_LOG = logging.getLogger(__name__)
_NUMBERS = itertools.count()  # each monitor at an address of its own
_READER: _Reader | None = None
_READER_LOCK = threading.Lock()


def _reader() -> _Reader:
    global _READER
    with _READER_LOCK:
        if _READER is None:
            _READER = _Reader()
        return _READER


def _forked() -> None:
    """In a forked child: the parent's thread did not come along."""
    global _READER, _READER_LOCK
    _READER, _READER_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forked)
