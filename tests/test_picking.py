"""Which instance a call or job goes to: with several instances, the
:class:`~pylm.standalone.AsyncClient` sends each call, and the
:class:`~pylm.chained.LoopClient` each job, to the live instance with the
fewest of its calls or jobs in flight, so a slow instance gets fewer instead
of an equal share (docs/operations.md, "A slow instance")."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from servers import Last

from pylm.chained import LoopClient
from pylm.chained import Server as Stage
from pylm.registry import Registry
from pylm.standalone import AsyncClient, Server
from pylm.testing import wait_for

pytestmark = pytest.mark.timeout(60)

Serve = Callable[[Any], Any]


class Paced(Server):
    """Answers with its label, after ``pause`` seconds."""

    label = b""
    pause = 0.0

    def which(self, message: bytes) -> bytes:
        time.sleep(self.pause)
        return self.label


def test_a_slow_instance_gets_fewer_calls(serve: Serve, pylm_registry: Registry) -> None:
    """Two instances, one 50 ms a call and one at once; 16 calls in flight,
    400 in all. Taking turns would give the slow one 200 (10 s of work); the
    least loaded pick gives it only what it holds while the fast one is as
    busy, a few dozen."""
    slow = Paced("paced", log_stdout=False, registry=pylm_registry)
    slow.label, slow.pause = b"slow", 0.05
    fast = Paced("paced", log_stdout=False, registry=pylm_registry)
    fast.label = b"fast"
    serve(slow)
    serve(fast)
    wait_for(lambda: len(pylm_registry.instances("paced")) == 2, 20, "both instances listed")
    served: Counter[bytes] = Counter()

    async def main() -> None:
        async with AsyncClient("paced", registry=pylm_registry, timeout=30) as client:
            calls = iter(range(400))

            async def caller() -> None:
                for _ in calls:
                    served[await client.job("which", b"")] += 1

            await asyncio.gather(*(caller() for _ in range(16)))

    asyncio.run(main())
    assert served[b"slow"] + served[b"fast"] == 400
    assert 0 < served[b"slow"] < 100, served


class PacedStage(Stage):
    """Passes its label on, after ``pause`` seconds."""

    label = b""
    pause = 0.0

    def tag(self, message: bytes) -> bytes:
        time.sleep(self.pause)
        return self.label


def test_a_slow_first_stage_instance_gets_fewer_jobs(serve: Serve, pylm_registry: Registry) -> None:
    """Two instances of a pipeline's first stage, one 50 ms a job and one at
    once; a LoopClient with 16 jobs in flight sends 400. Taking turns would
    give the slow one 200 (10 s of work); the least loaded pick gives it only
    what it holds while the fast one is as busy."""
    serve(Last("paced_last", registry=pylm_registry, log_stdout=False))
    slow = PacedStage(
        "paced_first", next_call="paced_last.done", registry=pylm_registry, log_stdout=False
    )
    slow.label, slow.pause = b"slow", 0.05
    fast = PacedStage(
        "paced_first", next_call="paced_last.done", registry=pylm_registry, log_stdout=False
    )
    fast.label = b"fast"
    serve(slow)
    serve(fast)
    wait_for(lambda: len(pylm_registry.instances("paced_first")) == 2, 20, "both listed")
    with LoopClient(
        "paced_first", registry=pylm_registry, announce=False, max_in_flight=16, timeout=30
    ) as client:
        served = Counter(client.job("tag", (b"" for _ in range(400))))
    assert served[b"slow>done"] + served[b"fast>done"] == 400
    assert 0 < served[b"slow>done"] < 100, served
