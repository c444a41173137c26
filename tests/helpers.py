"""Small things several test files use: an OS-chosen address, unique server
names, a slow payload source, a client socket that does not read."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import zmq

__all__ = ["ANY", "lazy_dealer", "trickle", "unique"]

ANY = "tcp://127.0.0.1:0"  # a port the OS picks: the server says which


def unique(prefix: str) -> str:
    """A server name no other test of this process uses (loggers and metrics
    are by name)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def trickle(count: int, pause: float, done: threading.Event) -> Iterator[bytes]:
    """Payloads b"0", b"1", ... up to ``count``, one every ``pause`` seconds;
    ``done`` is set after the last."""
    for i in range(count):
        time.sleep(pause)  # a slow producer, not synchronisation
        yield b"%d" % i
    done.set()


def lazy_dealer(address: str) -> zmq.Socket:
    """A DEALER connected to ``address`` with a small receive queue and
    buffer, for a client that stops reading: what is sent to it soon waits
    at the sender. The caller closes it."""
    lazy = zmq.Context.instance().socket(zmq.DEALER)
    lazy.setsockopt(zmq.LINGER, 0)
    lazy.setsockopt(zmq.RCVHWM, 10)
    lazy.setsockopt(zmq.RCVBUF, 4096)
    lazy.connect(address)
    return lazy
