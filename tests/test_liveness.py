"""pylm.liveness: the monitors of a client's sockets, read as their events
come, so that a connection that keeps dropping cannot block the process."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import zmq

from pylm.liveness import Connections
from pylm.transport import default_context


@pytest.fixture
def slammer() -> Iterator[int]:
    """A TCP port whose listener accepts each connection and closes it at
    once (as a port that does not speak ZMTP would): every connection a
    ZeroMQ socket makes there drops."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.2)
    stop = threading.Event()

    def slam() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.close()

    thread = threading.Thread(target=slam, name="slammer")
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        listener.close()


def _delivers(context: zmq.Context) -> bool:
    """Whether a fresh pair of TCP sockets of ``context`` moves a message."""
    pull = context.socket(zmq.PULL)
    push = context.socket(zmq.PUSH)
    try:
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        push.send(b"ping")
        return bool(pull.poll(5000))
    finally:
        push.close(linger=0)
        pull.close(linger=0)


@pytest.mark.timeout(60)
def test_drops_nobody_asks_about_are_counted_and_block_nothing(slammer: int) -> None:
    """libzmq's I/O thread waits on a monitor nobody reads once a thousand
    events queue in it, and every socket of the context waits with it; the
    reader takes each drop as it comes, whether or not the client asks."""
    context = default_context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RECONNECT_IVL, 1)  # a drop a millisecond or so
    connections = Connections()
    try:
        connections.watch(dealer, drops=True)
        dealer.connect(f"tcp://127.0.0.1:{slammer}")
        deadline = time.monotonic() + 45
        while connections.drops < 3000:  # three times what would block libzmq
            assert time.monotonic() < deadline, f"only {connections.drops} drops seen"
            time.sleep(0.05)
        assert connections.dropped == f"tcp://127.0.0.1:{slammer}"
        assert _delivers(context)
        assert connections.dropped_since(0)
        assert not connections.dropped_since(connections.drops + 1)
    finally:
        connections.close()
        dealer.close(linger=0)


@pytest.mark.timeout(30)
def test_the_reader_thread_ends_with_the_last_monitor() -> None:
    context = default_context()
    sockets = [context.socket(zmq.DEALER) for _ in range(3)]
    connections = [Connections() for _ in sockets]
    for watcher, sock in zip(connections, sockets, strict=True):
        watcher.watch(sock, drops=True)
    assert any(t.name == "pylm-monitors" for t in threading.enumerate())
    for watcher, sock in zip(connections, sockets, strict=True):
        watcher.close()
        sock.close(linger=0)
    deadline = time.monotonic() + 10
    while any(t.name == "pylm-monitors" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the reader thread outlived its monitors"
        time.sleep(0.01)
