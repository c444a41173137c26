"""Concurrency inside a standalone server: ``async def`` functions on the
server's event loop, blocking functions on a pool (``concurrency=N``), at
most N calls in progress; each call answered once, errors per call, counted,
and the calls in progress answered on stop."""

from __future__ import annotations

import asyncio
import selectors
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import zmq
from helpers import Gate, GatedCalls, immediate_dealer, in_thread, read_answers

from pylm import protocol
from pylm.errors import RemoteError, RequestTimeout
from pylm.parallel import Client as ParallelClient
from pylm.parallel import Master, Worker
from pylm.registry import Registry
from pylm.standalone import AsyncClient, Server
from pylm.testing import wait_for

pytestmark = pytest.mark.timeout(60)


class Held(GatedCalls, Server):
    """Its calls wait until the test opens the gate: async and blocking ones."""

    async def fail(self, message: bytes) -> bytes:
        raise ValueError(f"no {message.decode()}")


def calls(
    address: str, function: str, count: int, timeout: float = 30
) -> list[bytes | BaseException]:
    """``count`` calls of ``function`` at once: their answers, or the
    errors they raised."""

    async def all_at_once() -> list[bytes | BaseException]:
        async with AsyncClient(address, "held", timeout=timeout) as client:
            jobs = [client.job(function, b"%d" % n) for n in range(count)]
            return list(await asyncio.gather(*jobs, return_exceptions=True))

    return asyncio.run(all_at_once())


@pytest.mark.parametrize(
    ("function", "concurrency", "peak"),
    [("wait", 8, 8), ("block", 4, 4), ("block", None, 1), ("wait", None, 40)],
    ids=["async-8", "blocking-4", "blocking-default-1", "async-default-all-40"],
)
def test_calls_run_concurrently_up_to_the_bound(
    function: str, concurrency: int | None, peak: int
) -> None:
    """40 calls at once: at most ``concurrency`` in progress (blocking
    functions one at a time by default, async ones up to 64), never more;
    once the gate opens, each gets its own answer."""
    Held.gate = Gate()
    with Held("held", "tcp://127.0.0.1:0", log_stdout=False, concurrency=concurrency) as server:
        assert server.address is not None
        answers = in_thread(lambda: calls(server.address, function, 40))  # type: ignore[arg-type]
        wait_for(lambda: Held.gate.peak == peak, 20, f"{peak} calls in progress")
        Held.gate.open.set()
        word = b"waited" if function == "wait" else b"blocked"
        assert answers() == [word + b" %d" % n for n in range(40)]
        assert Held.gate.peak == peak  # never more in progress at once
        assert server.stats is not None
        assert server.stats.functions[function].calls == 40
        wait_for(lambda: server.stats.in_flight == 0, 10, "every answer counted as sent")  # type: ignore[union-attr]


def test_errors_are_per_call_and_counted() -> None:
    with Held("held", "tcp://127.0.0.1:0", log_stdout=False) as server:
        assert server.address is not None
        answers = calls(server.address, "fail", 10)
        assert server.stats is not None
        assert server.stats.functions["fail"].errors == 10
    for n, answer in enumerate(answers):
        assert isinstance(answer, RemoteError)
        assert (answer.remote_type, answer.remote_message) == ("ValueError", f"no {n}")


def test_stop_answers_the_calls_in_progress(pylm_registry: Registry) -> None:
    """stop() while every slot holds a call: the server sees it (it cannot
    read stop's message then) and leaves the registry; the calls, released
    only then, each get their answer before the server ends."""
    Held.gate = Gate()
    server = Held("held", registry=pylm_registry, log_stdout=False, concurrency=16)
    server.start(background=True)
    try:
        assert server.address is not None
        answers = in_thread(lambda: calls(server.address, "wait", 16))  # type: ignore[arg-type]
        wait_for(lambda: Held.gate.peak == 16, 20, "16 calls in progress")
        stopping = threading.Thread(target=server.stop)
        stopping.start()
        wait_for(lambda: pylm_registry.instances("held") == [], 20, "the server leaving")
        Held.gate.open.set()
        stopping.join(20)
        assert not stopping.is_alive()
        assert answers() == [b"waited %d" % n for n in range(16)]
    finally:
        server.stop()


def test_stop_lets_the_answers_of_the_calls_in_progress_be_read(
    raw_socket: Callable[[int], zmq.Socket],
) -> None:
    """A server with fixed addresses stopped with calls in progress answers
    them as they end, then keeps its socket open until its clients are
    quiet: a client set ZMQ_IMMEDIATE, as pylm's are, loses the answers it
    has not read yet when the connection drops."""
    Held.gate = Gate()
    server = Held("held", "tcp://127.0.0.1:0", log_stdout=False, concurrency=8)
    server.start(background=True)
    stopping = threading.Thread(target=server.stop)
    try:
        assert server.address is not None and server.stats is not None
        dealer = immediate_dealer(raw_socket, server.address)
        for number in range(4):
            dealer.send_multipart(
                protocol.encode(protocol.REQUEST, number, b"%d" % number, b"held.wait")
            )
        wait_for(lambda: Held.gate.peak == 4, 20, "4 calls in progress")
        stopping.start()
        # With room for more calls, the loop reads stop's message at once.
        loop = server._concurrent
        assert loop is not None
        wait_for(lambda: not loop.reading, 20, "the server reading no more")
        Held.gate.open.set()
        wait_for(lambda: server.stats.sent == 4, 20, "the 4 answers sent")
        answers = [answer.payload for answer in read_answers(dealer, 4)]
        assert sorted(answers) == [b"waited %d" % n for n in range(4)]
        stopping.join(20)
        assert not stopping.is_alive()
    finally:
        server.stop()


def test_the_messages_limit_answers_the_calls_in_progress_then_ends() -> None:
    """messages=16 and 16 calls in progress: the server reads no more, and
    ends once each of the 16 has its answer."""
    Held.gate = Gate()
    server = Held("held", "tcp://127.0.0.1:0", None, None, None, 20, 16, concurrency=16)
    server.start(background=True)
    try:
        assert server.address is not None
        answers = in_thread(lambda: calls(server.address, "wait", 16))  # type: ignore[arg-type]
        wait_for(lambda: Held.gate.peak == 16, 20, "16 calls in progress")
        Held.gate.open.set()
        assert answers() == [b"waited %d" % n for n in range(16)]
        wait_for(lambda: not server.running, 20, "the server ending by itself")
        assert server.served == 16
    finally:
        server.stop()


def test_stop_with_every_slot_busy_ends_within_the_drain_limit() -> None:
    """stop() while every slot holds a call that does not end: the server
    notices (it cannot read stop's message then), waits for the calls at
    most DRAIN_MAX (5 s), says so, and stop() returns in time; the calls'
    threads hold nothing up (daemons)."""
    Held.gate = Gate()
    server = Held("held", "tcp://127.0.0.1:0", log_stdout=False, concurrency=4)
    server.start(background=True)
    try:
        assert server.address is not None
        answers = in_thread(lambda: calls(server.address, "block", 4, timeout=6))  # type: ignore[arg-type]
        wait_for(lambda: Held.gate.peak == 4, 20, "every slot busy")
        began = time.monotonic()
        server.stop()  # within its 10 s, or TimeoutError
        assert time.monotonic() - began < 9
        assert not server.running
        assert all(isinstance(answer, RequestTimeout) for answer in answers())
    finally:
        Held.gate.open.set()  # the calls end, unanswered
        server.stop()


def test_a_sync_function_that_returns_a_coroutine_is_told_to_be_async_def() -> None:
    class Wrapped(Server):
        def sneaky(self, message: bytes) -> object:
            async def inner() -> bytes:
                return message

            return inner()

    with Wrapped("wrapped", "tcp://127.0.0.1:0", log_stdout=False, concurrency=2) as server:
        assert server.address is not None
        (answer,) = asyncio.run(_one(server.address, "wrapped", "sneaky"))
    assert isinstance(answer, RemoteError) and "declare the function async def" in str(answer)


async def _one(address: str, name: str, function: str) -> list[object]:
    async with AsyncClient(address, name, timeout=10) as client:
        return list(await asyncio.gather(client.job(function, b"x"), return_exceptions=True))


def test_bad_concurrency_and_async_generators_are_refused() -> None:
    class Doer(Worker):
        def do(self, message: bytes) -> bytes:
            return message

        async def stream(self, message: bytes) -> AsyncIterator[bytes]:
            yield message

    with pytest.raises(ValueError, match="async generator functions are not served"):
        Doer("doer", "master", log_stdout=False)
    with pytest.raises(ValueError, match="concurrency is at most 1024"):
        HeldWorker("doer", "master", log_stdout=False, concurrency=2000)
    with pytest.raises(ValueError, match=r"slots \(2\) must be at least concurrency \(4\)"):
        Held("held", log_stdout=False)  # fine
        HeldWorker("doer", "master", log_stdout=False, concurrency=4, slots=2)
    for bad in (0, -1, 10_001, 2.5, True, "8"):
        with pytest.raises(ValueError, match="concurrency must be an int"):
            Held("held", log_stdout=False, concurrency=bad)  # type: ignore[arg-type]


class HeldWorker(GatedCalls, Worker):
    """A worker whose jobs wait on the gate, async and blocking; and a stream."""

    def count(self, message: bytes) -> Iterator[bytes]:
        for n in range(int(message)):
            yield b"%d" % n


@pytest.mark.parametrize(
    ("function", "concurrency", "peak"),
    [("wait", 8, 8), ("block", 4, 4), ("wait", None, 30)],
    ids=["async-8", "blocking-4", "async-default"],
)
def test_a_worker_runs_jobs_concurrently_up_to_the_bound(
    pylm_registry: Registry, function: str, concurrency: int | None, peak: int
) -> None:
    """A worker with concurrency N (slots N by default) runs N jobs of a
    master at once, never more; each job's result once; streams still work."""
    HeldWorker.gate = Gate()
    master = Master("pool", registry=pylm_registry, log_stdout=False)
    worker = HeldWorker(
        "doer", "pool", registry=pylm_registry, log_stdout=False, concurrency=concurrency
    )
    with master, worker, ParallelClient("pool", registry=pylm_registry, timeout=30) as client:
        wait_for(lambda: client.ping()["workers"] == 1, 20, "the worker joined")
        box: list[bytes] = []
        jobs = threading.Thread(
            target=lambda: box.extend(client.job(function, [b"%d" % n for n in range(30)]))
        )
        jobs.start()
        wait_for(lambda: HeldWorker.gate.peak == peak, 20, f"{peak} jobs in progress")
        HeldWorker.gate.open.set()
        jobs.join(30)
        assert not jobs.is_alive()
        word = b"waited" if function == "wait" else b"blocked"
        assert sorted(box) == sorted(word + b" %d" % n for n in range(30))
        assert HeldWorker.gate.peak == peak
        assert sorted(client.job("count", [b"3"])) == [b"0", b"1", b"2"]


class Quick(Server):
    async def now(self, message: bytes) -> bytes:
        return message

    def soon(self, message: bytes) -> bytes:
        return message

    async def later(self, message: bytes) -> bytes:
        await asyncio.sleep(0.002)  # a call that waits: handed over 8 at a time
        return message


@pytest.mark.parametrize(("function", "concurrency"), [("now", 4), ("soon", 4), ("later", 64)])
def test_each_call_is_answered_as_soon_as_it_ends(function: str, concurrency: int) -> None:
    """2,000 calls, 64 at a time, each answered as it ends: none waits for
    the serving loop's idle timeout (1 s) to be answered, nor is left on the
    serving thread (async def calls that wait are handed to the event loop
    while a burst of them is read, the others at its end)."""

    async def rounds(address: str) -> float:
        async with AsyncClient(address, "quick", timeout=30) as client:
            began = time.monotonic()
            for round_ in range(32):
                jobs = [client.job(function, b"%d" % (round_ * 64 + n)) for n in range(64)]
                assert await asyncio.gather(*jobs) == [b"%d" % (round_ * 64 + n) for n in range(64)]
            return time.monotonic() - began

    with Quick("quick", "tcp://127.0.0.1:0", log_stdout=False, concurrency=concurrency) as server:
        assert server.address is not None
        took = asyncio.run(rounds(server.address))
    assert took < 10, took  # about 0.3 s here; a lost wake-up costs 1 s


class Reads(Server):
    """Its async def call reads a line from a TCP peer of the test's, then
    waits a millisecond."""

    async def fetch(self, message: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(message))
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            await asyncio.sleep(0.001)
            return line
        finally:
            writer.close()


def test_an_async_def_call_waits_on_its_own_sockets_and_timers() -> None:
    """The server's event loop (epoll, whose waits select() times to the
    microsecond) wakes an ``async def`` call for its socket's data and for
    its timer, as asyncio's own loop would."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def answer() -> None:
        peer, _ = listener.accept()
        with peer:
            peer.settimeout(10)
            peer.sendall(b"hello\n")
            peer.recv(1)  # until the call closes its end

    async def call(address: str) -> bytes:
        async with AsyncClient(address, "reads", timeout=10) as client:
            return await client.job("fetch", b"%d" % listener.getsockname()[1])

    peer = threading.Thread(target=answer, daemon=True)
    with listener, Reads("reads", "tcp://127.0.0.1:0", log_stdout=False) as server:
        assert server.address is not None
        peer.start()
        try:
            assert asyncio.run(call(server.address)) == b"hello\n"
        finally:
            peer.join(15)
    assert not peer.is_alive()


def test_the_event_loops_selector_waits_its_timeout_and_wakes_for_a_descriptor() -> None:
    """The selector of a server's event loop (on Linux): a wait with a
    timeout lasts it and sees nothing when nothing comes, and ends with the
    event when a registered descriptor becomes readable meanwhile."""
    if sys.platform != "linux":
        pytest.skip("epoll: Linux only")
    from pylm.running import _TimelySelector

    ours, theirs = socket.socketpair()
    with ours, theirs, _TimelySelector() as selector:
        key = selector.register(ours, selectors.EVENT_READ)
        began = time.monotonic()
        assert selector.select(0.005) == []
        assert time.monotonic() - began >= 0.005
        threading.Timer(0.01, theirs.send, (b"x",)).start()
        assert selector.select(10) == [(key, selectors.EVENT_READ)]
        assert selector.select(None) == [(key, selectors.EVENT_READ)]  # level-triggered
