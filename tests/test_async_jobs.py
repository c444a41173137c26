"""The asyncio clients of pipelines and masters (``AsyncLoopClient``, the
parallel ``AsyncClient``): results as async iterators, many runs at once in
one event loop, each with the blocking client's promises, and an event loop
that never blocks on a peer. Real sockets; the registry test uses a real
etcd."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq
from helpers import ANY
from servers import Last, Step

from pylm.chained import AsyncLoopClient, LastServer
from pylm.errors import PylmError, RemoteError, RequestTimeout
from pylm.parallel import AsyncClient, Master, Worker
from pylm.registry import Registry
from pylm.window import Outcome, Stop, Turn, wait_async

pytestmark = pytest.mark.timeout(60)

Serve = Callable[[Any], Any]
BEAT = 0.2


class Gated(LastServer):
    """A last stage whose ``hold`` jobs wait until the test opens the gate."""

    gate = threading.Event()

    def done(self, message: bytes) -> bytes:
        if message.startswith(b"fail"):
            raise ValueError("refused fail")
        return message + b">done"

    def hold(self, message: bytes) -> bytes:
        assert self.gate.wait(30)
        return message + b">held"


class Counter(Worker):
    def who(self, message: bytes) -> bytes:
        return self.name.encode() + b":" + message

    def count(self, message: bytes) -> Iterator[bytes]:
        for number in range(int(message)):
            yield b"%d" % number


def pipeline_client(serve: Serve, **options: Any) -> AsyncLoopClient:
    """A client of step -> last; its ``last.hold`` jobs go to the last stage
    straight (as a one-stage pipeline's)."""
    last = serve(Gated("last", ANY, ANY, ANY, log_stdout=False, concurrency=4))
    step = serve(Step("step", ANY, last.address, "last.done", ANY, log_stdout=False))
    return AsyncLoopClient(last.push, step.address, step.db, "step", timeout=20, **options)


def last_stage_client(serve: Serve) -> AsyncLoopClient:
    """A client of the Gated last stage alone."""
    last = serve(Gated("last", ANY, ANY, ANY, log_stdout=False, concurrency=4))
    return AsyncLoopClient(last.push, last.address, last.db, "last", timeout=20)


def test_a_pipeline_from_an_event_loop(serve: Serve) -> None:
    """Results as they come, errors per job, a failed job raising its
    typed error, ``messages`` ending a run early, the client usable after."""

    async def scenario(client: AsyncLoopClient) -> None:
        async with client:
            got = [result async for result in client.job("tag", [b"%d" % n for n in range(500)])]
            assert sorted(got) == sorted(b"%d>step>done" % n for n in range(500))
            outcomes = [r async for r in client.results("tag", [b"a", b"fail", b"b"])]
            assert sorted(o.index for o in outcomes) == [0, 1, 2]
            failed = next(o for o in outcomes if o.index == 1)
            assert isinstance(failed.error, RemoteError)
            assert "refused" in str(failed.error)
            with pytest.raises(RemoteError, match="refused"):
                async for _ in client.job("tag", [b"fail"]):
                    pass
            first = [r async for r in client.job("tag", [b"1", b"2", b"3"], messages=1)]
            assert len(first) == 1
            async for _ in client.job("tag", [b"x", b"y"]):
                break  # a run left early: the client goes on
            assert [r async for r in client.job("tag", [b"after"])] == [b"after>step>done"]

    asyncio.run(scenario(pipeline_client(serve)))


def test_many_runs_at_once_in_one_event_loop(serve: Serve) -> None:
    """20 runs of 100 jobs at once, through a client of 8 runs at most:
    each run gets exactly its own results."""

    async def scenario(client: AsyncLoopClient) -> list[list[bytes]]:
        async with client:

            async def run(number: int) -> list[bytes]:
                payloads = [b"%d-%d" % (number, n) for n in range(100)]
                return [result async for result in client.job("tag", payloads)]

            results = await asyncio.gather(*(run(number) for number in range(20)))
            assert len(client._idle) <= 8  # never more blocking clients than runs at once
            return results

    results = asyncio.run(scenario(pipeline_client(serve, runs=8)))
    for number, got in enumerate(results):
        assert sorted(got) == sorted(b"%d-%d>step>done" % (number, n) for n in range(100))


def test_a_run_waiting_for_a_slow_stage_blocks_no_other_run(serve: Serve) -> None:
    """While one run waits for jobs held in the last stage, another run in
    the same event loop gets all its results: the loop is never blocked."""
    Gated.gate = threading.Event()

    async def scenario(client: AsyncLoopClient) -> None:
        async with client:
            held = asyncio.ensure_future(
                asyncio.gather(*[_collect(client.job("hold", [b"h%d" % n])) for n in range(3)])
            )
            quick = [result async for result in client.job("done", [b"%d" % n for n in range(50)])]
            assert len(quick) == 50 and not held.done()
            Gated.gate.set()
            assert sorted(r for run in await held for r in run) == [
                b"h0>held",
                b"h1>held",
                b"h2>held",
            ]

    asyncio.run(scenario(last_stage_client(serve)))


async def _collect(results: Any) -> list[bytes]:
    return [result async for result in results]


def test_calls_made_at_once_go_out_in_one_run(serve: Serve) -> None:
    """100 call()s made at once: each gets its own result (or its own
    error), through one run, so one blocking client."""

    async def scenario(client: AsyncLoopClient) -> None:
        async with client:
            payloads = [b"fail%d" % n if n % 10 == 0 else b"%d" % n for n in range(100)]
            answers = await asyncio.gather(
                *(client.call("tag", payload) for payload in payloads), return_exceptions=True
            )
            for payload, answer in zip(payloads, answers, strict=True):
                if payload.startswith(b"fail"):
                    assert isinstance(answer, RemoteError)
                else:
                    assert answer == [payload + b">step>done"]
            assert len(client._idle) == 1 and not client._busy

    asyncio.run(scenario(pipeline_client(serve)))


def test_a_run_of_calls_whose_callers_all_went_away_gives_its_client_back(serve: Serve) -> None:
    """call()s held in the last stage, their callers cancelled: their run
    ends at once (its client back in the pool, not held until the jobs
    time out), and the client serves the next calls."""
    Gated.gate = threading.Event()

    async def scenario(client: AsyncLoopClient) -> None:
        async with client:
            callers = [asyncio.ensure_future(client.call("hold", b"%d" % n)) for n in range(3)]
            while not client._busy:  # the run took a client
                await asyncio.sleep(0.001)
            for caller in callers:
                caller.cancel()
            await asyncio.gather(*callers, return_exceptions=True)
            for _ in range(5000):  # the run ends within a turn or two of the loop
                if not client._busy:
                    break
                await asyncio.sleep(0.001)
            assert not client._busy and len(client._idle) == 1
            Gated.gate.set()
            assert await client.call("done", b"next") == [b"next>done"]

    asyncio.run(scenario(last_stage_client(serve)))


def test_a_job_without_a_result_times_out(serve: Serve) -> None:
    Gated.gate = threading.Event()

    async def scenario(client: AsyncLoopClient) -> None:
        async with client:
            with pytest.raises(RequestTimeout):
                async for _ in client.job("hold", [b"late"], timeout=0.3):
                    pass
        Gated.gate.set()

    asyncio.run(scenario(last_stage_client(serve)))


def test_a_closed_client_runs_no_more(serve: Serve) -> None:
    async def scenario(client: AsyncLoopClient) -> None:
        async with client:
            assert [r async for r in client.job("tag", [b"x"])] == [b"x>step>done"]
        with pytest.raises(RuntimeError, match="closed"):
            async for _ in client.job("tag", [b"y"]):
                pass

    asyncio.run(scenario(pipeline_client(serve)))


def test_a_pipeline_and_a_master_by_name(pylm_registry: Registry) -> None:
    last = Last("last", registry=pylm_registry, log_stdout=False)
    step = Step("step", next_call="last.done", registry=pylm_registry, log_stdout=False)
    master = Master("pool", registry=pylm_registry, heartbeat=BEAT, log_stdout=False)
    worker = Counter("w1", "pool", registry=pylm_registry, heartbeat=BEAT, log_stdout=False)

    async def scenario() -> None:
        async with (
            AsyncLoopClient("step", registry=pylm_registry, timeout=20) as pipeline,
            AsyncClient("pool", registry=pylm_registry, timeout=20) as pool,
        ):
            got = [r async for r in pipeline.job("tag", [b"%d" % n for n in range(100)])]
            assert sorted(got) == sorted(b"%d>step>done" % n for n in range(100))
            assert await pool.eval("who", b"a") == b"w1:a"

    with last, step, master, worker:
        asyncio.run(scenario())


@pytest.fixture
def master(serve: Serve) -> Master:
    master = serve(Master("m", ANY, ANY, heartbeat=BEAT, log_stdout=False))
    for name in ("w1", "w2"):
        serve(Counter(name, "m", master.back, heartbeat=BEAT, log_stdout=False))
    return master


def test_a_master_from_an_event_loop(master: Master) -> None:
    """eval, job, stream and results; many runs at once; a streaming
    function through eval() says how many results it gave."""

    async def scenario() -> None:
        async with AsyncClient(master.front, "m", timeout=20) as client:  # type: ignore[arg-type]
            assert (await client.eval("who", b"a")).endswith(b":a")
            got = [r async for r in client.job("who", [b"%d" % n for n in range(300)])]
            assert sorted(r.split(b":")[1] for r in got) == sorted(b"%d" % n for n in range(300))
            assert [item async for item in client.stream("count", b"4")] == [
                b"0",
                b"1",
                b"2",
                b"3",
            ]
            with pytest.raises(PylmError, match="gave 2 results, not one"):
                await client.eval("count", b"2")
            outcomes = [r async for r in client.results("nope", [b"x"])]
            assert len(outcomes) == 1 and outcomes[0].error is not None
            streams = await asyncio.gather(
                *(_collect(client.stream("count", b"%d" % n)) for n in range(20))
            )
            assert streams == [[b"%d" % i for i in range(n)] for n in range(20)]

    asyncio.run(scenario())


def test_runs_must_be_a_positive_int() -> None:
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="runs must be a positive int"):
            AsyncClient("tcp://127.0.0.1:1", "m", runs=bad)  # type: ignore[arg-type]


def test_a_turn_waiting_for_room_to_send_is_not_kept_waiting(
    raw_socket: Callable[[int], zmq.Socket],
) -> None:
    """A socket's FD signals a change of its events only after they were
    read: a run whose wait(0) read them and found room to send (and no
    answer) takes its next turn at once, not after its timeout."""
    peer = raw_socket(zmq.ROUTER)
    port = peer.bind_to_random_port("tcp://127.0.0.1")
    sender = raw_socket(zmq.DEALER)
    sender.setsockopt(zmq.IMMEDIATE, 1)
    sender.connect(f"tcp://127.0.0.1:{port}")
    assert sender.poll(10_000, zmq.POLLOUT)  # connected; the events are read

    def wait(ms: int) -> list[Outcome]:
        sender.poll(ms, zmq.POLLIN | zmq.POLLOUT)  # as a client waiting to send does
        return []

    turn = Turn(lambda room, until: Stop.BLOCKED, wait, lambda: [(sender, zmq.POLLOUT)])

    async def waited() -> list[Outcome]:
        return list(await asyncio.wait_for(wait_async(turn, 60_000), 20))

    assert asyncio.run(waited()) == []


def test_a_last_stage_joining_mid_run_is_greeted_off_the_event_loop(
    pylm_registry: Registry, raw_socket: Callable[[int], zmq.Socket]
) -> None:
    """A last-stage instance that joins while a run goes is greeted in a
    thread: one that never answers fails the run once the greeting's time
    is up, and meanwhile the event loop goes on (a ticker keeps ticking)."""
    silent = raw_socket(zmq.ROUTER)  # takes the greeting, never answers it
    silent_address = f"tcp://127.0.0.1:{silent.bind_to_random_port('tcp://127.0.0.1')}"
    last = Last("last", registry=pylm_registry, log_stdout=False)
    step = Step("step", next_call="last.done", registry=pylm_registry, log_stdout=False)

    async def scenario() -> tuple[float, float]:
        assert last.registration is not None
        real = last.registration.record
        joining = dataclasses.replace(
            real, instance="joining0000a", endpoints={**real.endpoints, "push": silent_address}
        )
        loop = asyncio.get_running_loop()
        longest, ticking = 0.0, True

        async def ticker() -> None:
            nonlocal longest
            last_tick = loop.time()
            while ticking:
                await asyncio.sleep(0.01)
                longest = max(longest, loop.time() - last_tick)
                last_tick = loop.time()

        async with AsyncLoopClient("step", registry=pylm_registry, timeout=3) as client:
            assert [r async for r in client.job("tag", [b"0"])] == [b"0>step>done"]
            ticks = asyncio.ensure_future(ticker())
            registering: asyncio.Future[Any] | None = None
            began = loop.time()
            with pytest.raises(PylmError, match=re.escape(f"{silent_address} did not answer")):
                async for _ in client.job("tag", (b"%d" % n for n in itertools.count())):
                    if registering is None:  # results flow: the newcomer joins
                        registering = asyncio.ensure_future(
                            asyncio.to_thread(pylm_registry.register, joining)
                        )
            took = loop.time() - began
            ticking = False
            await ticks
            assert registering is not None
            (await registering).close()
        return took, longest

    with last, step:
        took, longest = asyncio.run(scenario())
    assert 3 <= took < 30, took  # the greeting waited its 3 s
    assert longest < 1, longest  # the loop did not
