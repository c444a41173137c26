"""Small things several test files use: an OS-chosen address, unique server
names, the pylm command line, a slow payload source, a client socket that does not read, clients
calling through a scale-down, a process's /metrics text, raw sockets standing in for a pipeline's
ends, and functions whose calls wait on a gate."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import zmq

from pylm import protocol
from pylm.chained import LoopClient
from pylm.registry import LocalEtcd, Registry
from pylm.standalone import Client
from pylm.testing import wait_for

__all__ = [
    "ANY",
    "Gate",
    "GatedCalls",
    "answer_greeting",
    "calls_through_a_scale_down",
    "in_thread",
    "lazy_dealer",
    "pylm_command",
    "raw_pipeline_ends",
    "scrape",
    "trickle",
    "unique",
]

T = TypeVar("T")

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


def raw_pipeline_ends(
    raw_socket: Callable[[int], zmq.Socket], **options: object
) -> tuple[zmq.Socket, zmq.Socket, LoopClient]:
    """Raw sockets bound as a pipeline's first stage (a PULL: the jobs the
    client sends) and last stage (a ROUTER: :func:`answer_greeting` answers
    the client's hello on it), a cache socket, and a LoopClient to them."""
    first, last, cache = raw_socket(zmq.PULL), raw_socket(zmq.ROUTER), raw_socket(zmq.ROUTER)
    first_port = first.bind_to_random_port("tcp://127.0.0.1")
    last_port = last.bind_to_random_port("tcp://127.0.0.1")
    cache_port = cache.bind_to_random_port("tcp://127.0.0.1")
    client = LoopClient(
        f"tcp://127.0.0.1:{last_port}",
        f"tcp://127.0.0.1:{first_port}",
        f"tcp://127.0.0.1:{cache_port}",
        "step1",
        announce=False,
        **options,  # type: ignore[arg-type]
    )
    return first, last, client


def answer_greeting(last: zmq.Socket) -> bytes:
    """Answer a LoopClient's hello on the raw last stage ``last`` as a last
    stage does; the client's routing id (where its results go)."""
    assert last.poll(10_000), "no greeting"
    peer, *greeting = last.recv_multipart()
    pong = b'{"name": "last", "kind": "chained-last"}'
    last.send_multipart(
        [peer, *protocol.encode(protocol.PONG, protocol.decode(greeting).msg_id, pong)]
    )
    return peer


class Gate:
    """Calls in progress, the most seen at once, and a gate they wait on."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = self.peak = 0
        self.open = threading.Event()

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1

    async def pass_async(self, answer: bytes) -> bytes:
        """An async call's way through: in, wait on its loop for the gate, out."""
        self.enter()
        while not self.open.is_set():
            await asyncio.sleep(0.002)  # the function's own waiting, on its loop
        self.leave()
        return answer

    def pass_blocking(self, answer: bytes) -> bytes:
        """A blocking call's way through: in, wait in its thread, out."""
        self.enter()
        assert self.open.wait(30)
        self.leave()
        return answer


class GatedCalls:
    """Exposed functions of any server kind whose calls wait until the test
    opens the class's gate: ``wait`` (async def) and ``block`` (blocking)."""

    gate = Gate()

    async def wait(self, message: bytes) -> bytes:
        return await self.gate.pass_async(b"waited " + message)

    def block(self, message: bytes) -> bytes:
        return self.gate.pass_blocking(b"blocked " + message)


def in_thread(run: Callable[[], Iterable[T]]) -> Callable[[], list[T]]:
    """Start ``run`` in a thread; a function that waits for what it gives."""
    box: list[T] = []
    thread = threading.Thread(target=lambda: box.extend(run()))
    thread.start()

    def value() -> list[T]:
        thread.join(30)
        assert not thread.is_alive()
        return box

    return value


def immediate_dealer(raw_socket: Callable[[int], zmq.Socket], address: str) -> zmq.Socket:
    """A raw DEALER connected to ``address``, set ZMQ_IMMEDIATE as pylm's
    clients are (so it loses the answers it has not read when the
    connection drops)."""
    dealer = raw_socket(zmq.DEALER)
    dealer.setsockopt(zmq.IMMEDIATE, 1)
    dealer.connect(address)
    return dealer


def carried(message: list[bytes]) -> list[bytes]:
    """The one-frame messages a message carries: those of a BATCH, or itself."""
    if message[0][protocol.LEAD] == protocol.BATCH_PREFIX:
        return protocol.unpack_batch(message[0])
    assert len(message) == 1
    return [message[0]]


def read_answers(dealer: zmq.Socket, count: int) -> list[protocol.Message]:
    """The next ``count`` answers on ``dealer``, decoded, those of a BATCH
    one by one (5 s a message at most)."""
    answers: list[protocol.Message] = []
    while len(answers) < count:
        assert dealer.poll(5000), f"answers read: {answers}"
        message = dealer.recv_multipart()
        bodies = carried(message) if len(message) == 1 else None
        answers += (
            [protocol.decode(message)]
            if bodies is None
            else [protocol.decode([body]) for body in bodies]
        )
    return answers
