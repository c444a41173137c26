"""pylm.liveness: the monitors of a client's sockets, read as their events
come, so that a connection that keeps dropping cannot block the process."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq
from helpers import ANY, scrape
from servers import Echo, Last, Step

from pylm import monitors
from pylm.liveness import Connections
from pylm.registry import Registry
from pylm.standalone import Client
from pylm.testing import wait_for
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
def test_events_nobody_asks_about_are_read_and_block_nothing(slammer: int) -> None:
    """libzmq's I/O thread waits on a monitor nobody reads once a thousand
    events queue in it, and every socket of the context waits with it; the
    monitors' thread reads each event as it comes. A connection that never
    completed its handshake is no drop (nothing could have run there)."""
    context = default_context()
    dealer, other = context.socket(zmq.DEALER), context.socket(zmq.DEALER)
    for socket_ in (dealer, other):
        socket_.setsockopt(zmq.LINGER, 0)
        socket_.setsockopt(zmq.RECONNECT_IVL, 1)  # a failed connection a millisecond or so
    seen: list[monitors.Event] = []
    connections = Connections()
    try:
        monitors.watch(dealer, zmq.EVENT_DISCONNECTED, seen.append)
        connections.watch(other, drops=True)
        dealer.connect(f"tcp://127.0.0.1:{slammer}")
        other.connect(f"tcp://127.0.0.1:{slammer}")
        deadline = time.monotonic() + 45
        while len(seen) < 3000:  # three times what would block libzmq
            assert time.monotonic() < deadline, f"only {len(seen)} events read"
            time.sleep(0.05)
        assert seen[0].endpoint == f"tcp://127.0.0.1:{slammer}"
        assert _delivers(context)
        assert connections.drops == 0 and connections.live_peers == 0
    finally:
        monitors.stop(dealer)
        connections.close()
        dealer.close(linger=0)
        other.close(linger=0)


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


def sample(text: str, name: str) -> float | None:
    """The value of the one sample ``name`` (with its labels) in ``text``."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


@pytest.mark.timeout(60)
def test_a_stage_and_a_client_count_the_instances_they_reach(
    serve: Callable[[Any], Any], pylm_registry: Registry
) -> None:
    """pylm_peers_live (a stage's next stages) and pylm_client_peers_live
    follow the connections: two instances reached, then one stopped, one."""
    seconds = [
        serve(Last("pl-second", ANY, ANY, ANY, metrics=True, log_stdout=False)) for _ in range(2)
    ]
    first = serve(
        Step(
            "pl-first",
            ANY,
            [s.address for s in seconds],
            "pl-second.done",
            ANY,
            metrics=True,
            log_stdout=False,
        )
    )
    echoes = [serve(Echo("pl-echo", registry=pylm_registry, log_stdout=False)) for _ in range(2)]
    live = 'pylm_peers_live{server="pl-first"}'
    client_live = 'pylm_client_peers_live{server="pl-echo"}'
    with Client("pl-echo", registry=pylm_registry, wait=10) as client:
        wait_for(lambda: client.job("echo", b"x") == b"x" and len(client.endpoints) == 2, 10, "two")
        wait_for(lambda: sample(scrape(first.metrics_url), live) == 2, 10, "two next instances")
        wait_for(lambda: sample(scrape(first.metrics_url), client_live) == 2, 10, "two echoes")
        seconds[0].stop()
        echoes[0].stop()
        wait_for(lambda: sample(scrape(first.metrics_url), live) == 1, 10, "one next instance")
        wait_for(lambda: sample(scrape(first.metrics_url), client_live) == 1, 10, "one echo")
        text = scrape(first.metrics_url)
        assert (sample(text, 'pylm_peer_drops_total{server="pl-first"}') or 0) >= 1
        assert (sample(text, 'pylm_client_peer_drops_total{server="pl-echo"}') or 0) >= 1
