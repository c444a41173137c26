"""Concurrency inside chained stages: ``async def`` functions on the stage's
event loop, blocking ones on a pool (``concurrency=N``), at most N jobs in
progress; each job's result once, errors per job, streams through a hub
whole, the jobs in progress sent on at stop. Real sockets; the registry
test uses a real etcd."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from helpers import ANY, Gate, GatedCalls, in_thread
from servers import Last
from test_fan import client_of, hub_to, workers

from pylm.chained import LastServer, LoopClient, Server
from pylm.errors import RemoteError
from pylm.parallel import Hub
from pylm.registry import Registry
from pylm.testing import wait_for

pytestmark = pytest.mark.timeout(60)

Serve = Callable[[Any], Any]


class HeldStage(GatedCalls, Server):
    """Its jobs wait until the test opens the gate: async and blocking ones."""

    async def fail(self, message: bytes) -> bytes:
        if int(message) % 2:
            raise ValueError(f"odd {message.decode()}")
        await asyncio.sleep(0.001)
        return message

    async def mark(self, message: bytes) -> bytes:
        await asyncio.sleep(0.001)
        return message + b">async"


class HeldLast(LastServer):
    """A last stage whose jobs wait on the gate."""

    gate = Gate()

    async def wait(self, message: bytes) -> bytes:
        return await self.gate.pass_async(b"last waited " + message)


def jobs_in_thread(client: LoopClient, function: str, count: int) -> Callable[[], list[bytes]]:
    """Send ``count`` jobs from a thread; a function that waits for their results."""
    return in_thread(lambda: client.job(function, [b"%d" % n for n in range(count)]))


@pytest.mark.parametrize(
    ("function", "concurrency", "peak"),
    [("wait", 8, 8), ("block", 4, 4), ("wait", None, 40)],
    ids=["async-8", "blocking-4", "async-default-all-40"],
)
def test_a_stage_runs_jobs_concurrently_up_to_the_bound(
    serve: Serve, function: str, concurrency: int | None, peak: int
) -> None:
    """40 jobs at once through a stage: at most ``concurrency`` in progress,
    never more; once the gate opens, each result reaches the client once,
    counted per function."""
    HeldStage.gate = Gate()
    last = serve(Last("last", ANY, ANY, ANY, log_stdout=False))
    step = serve(
        HeldStage(
            "step", ANY, last.address, "last.done", ANY, log_stdout=False, concurrency=concurrency
        )
    )
    with client_of(step, last, timeout=30) as client:
        results = jobs_in_thread(client, function, 40)
        wait_for(lambda: HeldStage.gate.peak == peak, 20, f"{peak} jobs in progress")
        HeldStage.gate.open.set()
        word = b"waited" if function == "wait" else b"blocked"
        assert sorted(results()) == sorted(word + b" %d>done" % n for n in range(40))
    assert HeldStage.gate.peak == peak  # never more in progress at once
    assert step.stats.functions[function].calls == 40
    wait_for(lambda: step.stats.in_flight == 0, 10, "every result counted as sent on")


def test_a_last_stage_answers_its_clients_concurrently(serve: Serve) -> None:
    HeldLast.gate = Gate()
    last = serve(HeldLast("last", ANY, ANY, ANY, log_stdout=False, concurrency=16))
    with LoopClient(last.push, last.address, last.db, "last", announce=False, timeout=30) as client:
        results = jobs_in_thread(client, "wait", 40)
        wait_for(lambda: HeldLast.gate.peak == 16, 20, "16 jobs in progress")
        HeldLast.gate.open.set()
        assert sorted(results()) == sorted(b"last waited %d" % n for n in range(40))
    assert HeldLast.gate.peak == 16


def test_errors_are_per_job_and_the_pipeline_flows_on(serve: Serve) -> None:
    last = serve(Last("last", ANY, ANY, ANY, log_stdout=False))
    step = serve(HeldStage("step", ANY, last.address, "last.done", ANY, log_stdout=False))
    with client_of(step, last, timeout=30) as client:
        outcomes = client.results("fail", [b"%d" % n for n in range(200)])
        by_index = {outcome.index: outcome for outcome in outcomes}
        assert sorted(by_index) == list(range(200))
        for index, outcome in by_index.items():
            if index % 2:
                assert isinstance(outcome.error, RemoteError)
                assert outcome.error.remote_message == f"odd {index}"
            else:
                assert outcome.error is None and outcome.value == b"%d>done" % index
        assert list(client.job("mark", [b"after"])) == [b"after>async>done"]
    assert step.stats.functions["fail"].errors == 100


def test_streams_through_a_concurrent_stage_arrive_whole(serve: Serve) -> None:
    """A hub's workers stream items and ENDs through a stage whose jobs
    overlap: items pass the END they follow, and each stream still ends
    once, with every item."""
    last = serve(Last("last", ANY, ANY, ANY, log_stdout=False))
    step = serve(HeldStage("step", ANY, last.address, "last.done", ANY, log_stdout=False))
    hub = serve(hub_to(step.address, "step.mark", "hub"))
    workers(serve, hub, 2)
    with LoopClient(last.push, hub.address, hub.db, "hub", announce=False, timeout=30) as client:
        results = list(client.job("split", [b"%d" % n for n in range(200)]))
    assert len(results) == sum(n % 4 for n in range(200))
    assert Counter(r.split(b":")[0] for r in results) == {
        b"%d" % n: n % 4 for n in range(200) if n % 4
    }
    assert all(r.endswith(b">async>done") for r in results)


def test_stop_sends_on_the_jobs_in_progress(pylm_registry: Registry) -> None:
    """A stage found by name stopped with jobs in progress leaves the
    registry, and still sends their results on before it ends."""
    HeldStage.gate = Gate()
    last = Last("last", registry=pylm_registry, log_stdout=False)
    step = HeldStage("step", next_call="last.done", registry=pylm_registry, log_stdout=False)
    with last, step, LoopClient("step", registry=pylm_registry, timeout=30) as client:
        results = jobs_in_thread(client, "wait", 20)
        wait_for(lambda: HeldStage.gate.peak == 20, 20, "20 jobs in progress")
        stopping = threading.Thread(target=step.stop)
        stopping.start()
        wait_for(lambda: not pylm_registry.instances("step"), 10, "the stage left the registry")
        HeldStage.gate.open.set()
        assert sorted(results()) == sorted(b"waited %d>done" % n for n in range(20))
        stopping.join(10)
        assert not stopping.is_alive()


def test_a_hub_refuses_concurrency() -> None:
    with pytest.raises(ValueError, match="not served by a hub server"):
        Hub("hub", next_call="last.done", concurrency=4, log_stdout=False)


def test_the_messages_limit_sends_on_the_jobs_in_progress(serve: Serve) -> None:
    """At its messages limit, a stage reads no more, and still sends on the
    results of the jobs in progress before it ends."""
    HeldStage.gate = Gate()
    last = serve(Last("last", ANY, ANY, ANY, log_stdout=False))
    step = serve(
        HeldStage("step", ANY, last.address, "last.done", ANY, messages=10, log_stdout=False)
    )
    with client_of(step, last, timeout=10) as client:
        results = jobs_in_thread(client, "wait", 10)
        wait_for(lambda: HeldStage.gate.peak == 10, 20, "10 jobs in progress")
        HeldStage.gate.open.set()
        assert sorted(results()) == sorted(b"waited %d>done" % n for n in range(10))
    wait_for(lambda: not step.running, 10, "the stage ended at its messages limit")
