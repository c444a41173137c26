"""Small things several test files use: an OS-chosen address, unique server
names, the pylm command line, a slow payload source, a client socket that does not read, clients
calling through a scale-down, a process's /metrics text."""

from __future__ import annotations

import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator

import zmq

from pylm.registry import LocalEtcd, Registry
from pylm.standalone import Client
from pylm.testing import wait_for

__all__ = [
    "ANY",
    "calls_through_a_scale_down",
    "lazy_dealer",
    "pylm_command",
    "scrape",
    "trickle",
    "unique",
]

ANY = "tcp://127.0.0.1:0"  # a port the OS picks: the server says which


def scrape(url: str | None) -> str:
    """What a process's metrics endpoint at ``url`` serves now."""
    assert url is not None, "the server serves no metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        return str(answer.read().decode())


def unique(prefix: str) -> str:
    """A server name no other test of this process uses (loggers and metrics
    are by name)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def pylm_command(etcd: LocalEtcd, cluster: str, *args: str) -> list[str]:
    """The command line ``pylm --registry ETCD --cluster CLUSTER ARGS...``,
    run by this Python."""
    return [sys.executable, "-m", "pylm.cli", "--registry", etcd.url, "--cluster", cluster, *args]


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


def calls_through_a_scale_down(
    registry: Registry, name: str, markers: set[bytes], leave: Callable[[], None]
) -> list[BaseException]:
    """Four by-name clients of ``name`` call its ``who`` without a pause;
    once each has had every answer of ``markers`` (each instance answers its
    own), ``leave()`` takes one instance away, then each client makes 50
    calls more. The calls' failures (none, when leaving drains)."""
    clients: list[Client] = []
    done, left = threading.Event(), threading.Event()
    answers: list[list[bytes]] = [[] for _ in range(4)]
    after_leave = [0] * len(answers)
    failures: list[BaseException] = []

    def call(index: int) -> None:
        try:
            while not done.is_set():
                was_left = left.is_set()
                answers[index].append(clients[index].job("who", b""))
                if was_left:
                    after_leave[index] += 1
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(answers))]
    try:
        for _ in answers:
            clients.append(Client(name, registry=registry, timeout=5, wait=10))
        for thread in threads:
            thread.start()
        wait_for(
            lambda: bool(failures) or all(markers <= set(a) for a in answers),
            30,
            "every client reaching every instance",
        )
        leave()
        left.set()
        wait_for(
            lambda: bool(failures) or min(after_leave) >= 50,
            30,
            "50 calls per client after one instance left",
        )
    finally:
        done.set()
        for thread in threads:
            if thread.is_alive():
                thread.join(30)
        for client in clients:
            client.close()
    return failures
