"""Counting the connections to a server's ports that fail their ZMTP
handshake: bytes that are not ZeroMQ, a greeting of another protocol
version or mechanism, a CURVE client with the wrong key.

libzmq drops such a connection by itself, before any message reaches the
server; only a monitor on the listening socket sees it. One thread per
process reads the monitors of every server's listening sockets (a serving
thread never waits for them) and counts each failed handshake, per server,
as ``pylm_messages_malformed_total{reason="handshake"}``. A connection that
closes before it sent a whole greeting (a TCP probe, a port scan) fails no
handshake in libzmq's eyes, and is not counted. A monitor ends when its
socket closes (or another monitor replaces it, as
:func:`pylm.transport.close_listener` does); the thread ends with the last.
"""

from __future__ import annotations

import itertools
import socket as sockets
import threading
from typing import Protocol

import zmq
from zmq.utils.monitor import parse_monitor_message

__all__ = ["HandshakeCounter", "watch"]

_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_EVENTS = zmq.EVENT_MONITOR_STOPPED | _FAILED


class HandshakeCounter(Protocol):
    """Where the failed handshakes of a server are counted (its ServerStats)."""

    handshakes_failed: int


def watch(socket: zmq.Socket, counter: HandshakeCounter) -> None:
    """Count the failed handshakes of the listening ``socket`` in
    ``counter.handshakes_failed``, from now until the socket closes. Called by
    the thread that owns ``socket``, once it is bound."""
    # Not socket.get_monitor_socket(): pyzmq would hand this monitor out
    # again to whoever asks for one; close_listener() needs its own.
    address = f"inproc://pylm-handshakes-{next(_NUMBERS)}"
    socket.monitor(address, _EVENTS)
    monitor = socket.context.socket(zmq.PAIR)
    monitor.connect(address)
    with _LOCK:
        global _WATCHER
        if _WATCHER is None or not _WATCHER.add(monitor, counter):
            _WATCHER = _Watcher()
            _WATCHER.add(monitor, counter)
            _WATCHER.start()


class _Monitor:
    __slots__ = ("counter", "socket")

    def __init__(self, socket: zmq.Socket, counter: HandshakeCounter) -> None:
        self.socket = socket
        self.counter = counter


class _Watcher(threading.Thread):
    """The thread that reads every monitor; it ends once it has none."""

    def __init__(self) -> None:
        super().__init__(name="pylm-handshakes", daemon=True)
        self._new: list[_Monitor] = []
        self._monitors: dict[zmq.Socket, _Monitor] = {}
        self._ending = False  # no monitor left: takes no more (under _LOCK)
        self._wake = sockets.socketpair()

    def add(self, socket: zmq.Socket, counter: HandshakeCounter) -> bool:
        """Hand a monitor over (under _LOCK); False once the thread is ending."""
        if self._ending:
            return False
        self._new.append(_Monitor(socket, counter))
        self._wake[1].send(b"x")
        return True

    def run(self) -> None:
        wake = self._wake[0]
        try:
            while True:
                with _LOCK:
                    for monitor in self._new:
                        self._monitors[monitor.socket] = monitor
                    self._new.clear()
                    if not self._monitors:
                        self._ending = True
                        return
                poller = zmq.Poller()
                poller.register(wake, zmq.POLLIN)
                for socket in self._monitors:
                    poller.register(socket, zmq.POLLIN)
                for ready, _ in poller.poll():
                    if ready == wake.fileno():  # a plain socket is reported by its number
                        wake.recv(4096)
                    else:
                        self._read(self._monitors[ready])
        finally:
            with _LOCK:  # ended, by design or by a bug: the next watch() starts a thread
                self._ending = True
                self._monitors.update((m.socket, m) for m in self._new)
                self._new.clear()
            for monitor in self._monitors.values():
                monitor.socket.close(linger=0)
            self._wake[0].close()
            self._wake[1].close()

    def _read(self, monitor: _Monitor) -> None:
        """The events waiting on one monitor."""
        while True:
            try:
                event = parse_monitor_message(monitor.socket.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            kind = event["event"]
            if kind & _FAILED:
                monitor.counter.handshakes_failed += 1
            elif kind == zmq.EVENT_MONITOR_STOPPED:
                monitor.socket.close(linger=0)
                del self._monitors[monitor.socket]
                return


_LOCK = threading.Lock()
_NUMBERS = itertools.count()
_WATCHER: _Watcher | None = None
