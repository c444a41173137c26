"""A running pipeline rewired from the registry: ``pylm topology set`` on a
stage that reads its next stage there reroutes it while it runs, losing no
job (docs/registry.md, "Discovery and live rewiring")."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
import zmq
from helpers import pylm_command
from servers import Last, Step

from pylm.chained import LoopClient
from pylm.protocol import SPLIT_PAYLOAD
from pylm.registry import LocalEtcd, Registry
from pylm.security import Curve, Keys
from pylm.testing import wait_for

pytestmark = pytest.mark.timeout(90)


def streaming(
    client: LoopClient,
    payloads: Iterable[bytes],
    on_result: Callable[[bytes], object],
    failures: list[BaseException],
) -> threading.Thread:
    """A thread, started, that sends ``payloads`` as jobs of ``tag`` and
    hands each result to ``on_result``; what it raises goes to ``failures``."""

    def stream() -> None:
        try:
            for result in client.job("tag", payloads):
                on_result(result)
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=stream)
    thread.start()
    return thread


def test_topology_set_reroutes_a_running_stage_losing_no_job(
    pylm_etcd: LocalEtcd, pylm_cluster: str, pylm_registry: Registry
) -> None:
    """first -> second -> last, first's wiring in the registry; a LoopClient
    streams 3,000 jobs, one every millisecond. A third of the way through,
    ``pylm topology set first --next last.done``: within a second the jobs
    skip second; every job gives its result once, through one route or the
    other, and the registry's record of first names its new next stage."""
    import subprocess

    pylm_registry.set_config("first", next="second.tag")
    stages = [
        Last("last", registry=pylm_registry, log_stdout=False),
        Step("second", next_call="last.done", registry=pylm_registry, log_stdout=False),
        Step("first", registry=pylm_registry, log_stdout=False),
    ]
    total = 3_000
    switch = threading.Event()

    def payloads() -> Iterator[bytes]:
        for n in range(total):
            if n == total // 3:
                switch.set()
            time.sleep(0.001)  # a steady stream, not synchronisation
            yield b"%d" % n

    arrivals: list[tuple[float, bytes]] = []
    failures: list[BaseException] = []
    try:
        for stage in stages:
            stage.start(background=True)
        with LoopClient("first", registry=pylm_registry, announce=False) as client:
            thread = streaming(
                client,
                payloads(),
                lambda result: arrivals.append((time.monotonic(), result)),
                failures,
            )
            assert switch.wait(30)
            done = subprocess.run(
                pylm_command(
                    pylm_etcd, pylm_cluster, "topology", "set", "first", "--next", "last.done"
                ),
                capture_output=True,
                text=True,
                timeout=30,
            )
            set_at = time.monotonic()
            assert done.returncode == 0, done.stderr
            thread.join(60)
        assert failures == []
        results = [result for _, result in arrivals]
        via_second = {b"%d>step>step>done" % n for n in range(total)}
        direct = {b"%d>step>done" % n for n in range(total)}
        numbers = sorted(int(result.split(b">")[0]) for result in results)
        assert numbers == list(range(total))  # each job once
        assert all(result in via_second or result in direct for result in results)
        assert any(result in via_second for result in results)
        assert any(result in direct for result in results)
        late = [at - set_at for at, result in arrivals if result in via_second and at > set_at]
        assert max(late, default=0.0) < 1.0, f"through second {max(late):.2f} s after the set"
        wait_for(
            lambda: pylm_registry.instances("first")[0].next == "last.done",
            10,
            "first's record names its new next stage",
        )
    finally:
        for stage in reversed(stages):
            stage.stop()


class Held(Step):
    """A stage that passes no job on until ``release`` is set."""

    def __init__(self, name: str, release: threading.Event, **options: Any) -> None:
        super().__init__(name, **options)
        self.release = release

    def tag(self, message: bytes) -> bytes:
        self.release.wait(60)  # a bound for a failing test only
        return super().tag(message)


class Watched(Step):
    """A stage that counts the times it waits on a full next stage
    (``waits``) and says when it hears of a new next stage (``noted``)."""

    def __init__(self, name: str, **options: Any) -> None:
        super().__init__(name, **options)
        self.waits = 0
        self.noted = threading.Event()

    def _wait_for_room(self, socket: zmq.Socket) -> None:
        self.waits += 1
        super()._wait_for_room(socket)

    def _open_output(self) -> None:
        super()._open_output()
        output = self._output
        retarget = output.retarget

        def noted(call: str) -> None:  # from the registry's thread
            retarget(call)
            self.noted.set()

        output.retarget = noted  # type: ignore[method-assign]


def test_a_stage_waiting_on_a_full_next_stage_lives_through_a_reroute_losing_no_job(
    pylm_registry: Registry,
) -> None:
    """first -> middle -> last, first's wiring in the registry. middle holds
    its jobs until released, so that first, with 300 large jobs coming,
    soon waits to send one on. Rerouted to last while it waits (what
    ``pylm topology set`` writes), first lives on: once middle lets go,
    every job gives its result once, through one route or the other, and
    first's record names its new next stage."""
    pylm_registry.set_config("first", next="middle.tag")
    release = threading.Event()
    options: dict[str, Any] = {"registry": pylm_registry, "log_stdout": False}
    first = Watched("first", hwm=1, **options)
    stages = [
        Last("last", **options),
        Held("middle", release, next_call="last.done", hwm=1, **options),
        first,
    ]
    total, big = 300, b"x" * (64 * 1024)  # large jobs: the sockets fill after a few
    results: list[bytes] = []
    failures: list[BaseException] = []
    with contextlib.ExitStack() as running:
        for stage in stages:
            running.enter_context(stage)  # stopped in reverse order, whatever fails
        running.callback(release.set)  # first of all
        with LoopClient("first", registry=pylm_registry, announce=False, timeout=20) as client:
            jobs = (b"%d:" % n + big for n in range(total))
            thread = streaming(client, jobs, results.append, failures)
            try:
                wait_for(lambda: first.waits > 0, 20, "first waiting on its full next stage")
                pylm_registry.set_config("first", next="last.done")
                assert first.noted.wait(10), "first did not hear of its new next stage"
                waits = first.waits
                # Two more rounds of its wait (or the new route taken): the
                # reroute had its chance to apply while first waited.
                wait_for(
                    lambda: first.waits >= waits + 2 or first.next_call == "last.done",
                    10,
                    "first waiting on, or rerouted",
                )
            finally:
                release.set()
                thread.join(60)
        assert first.running, "first died"
        assert failures == []
        numbers = sorted(int(result.split(b":")[0]) for result in results)
        assert numbers == list(range(total))  # each job once
        ends = {result.partition(b":")[2].removeprefix(big) for result in results}
        assert ends <= {b">step>step>done", b">step>done"}
        wait_for(
            lambda: pylm_registry.instances("first")[0].next == "last.done",
            10,
            "first's record names its new next stage",
        )


def test_a_stage_rerouted_under_curve_sends_its_jobs_to_the_new_next_stage(
    pylm_registry: Registry,
) -> None:
    """With CURVE (one key pair for every stage and the client; a stage's
    key travels in its registry record), first -> second -> last is
    rerouted to first -> last: first's new outlet takes last's key from its
    records, asking for no key given by address, and every job sent after
    the reroute reaches last straight from first, once."""
    keys = Keys.generate()
    options: dict[str, Any] = {"registry": pylm_registry, "log_stdout": False}
    pylm_registry.set_config("first", next="second.tag")
    first = Step("first", curve=Curve(keys), **options)
    stages = [
        Last("last", curve=Curve(keys), **options),
        Step("second", next_call="last.done", curve=Curve(keys), **options),
        first,
    ]
    with contextlib.ExitStack() as running:
        for stage in stages:
            running.enter_context(stage)  # stopped in reverse order, whatever fails
        with LoopClient(
            "first", registry=pylm_registry, announce=False, timeout=10, curve=Curve(keys)
        ) as client:
            assert list(client.job("tag", [b"before"])) == [b"before>step>step>done"]
            pylm_registry.set_config("first", next="last.done")
            wait_for(lambda: first.next_call == "last.done", 10, "first rerouted to last")
            results = client.job("tag", (b"%d" % n for n in range(100)))
            assert sorted(results) == sorted(b"%d>step>done" % n for n in range(100))
        assert first.running, "first died"


@pytest.mark.parametrize(
    "jobs",
    [[b"held"], [b"a", b"b" * SPLIT_PAYLOAD, b"c"]],
    ids=["one job", "a batch with a large result inside"],
)
def test_a_stage_blocked_on_a_gone_next_stage_sends_its_jobs_on_the_new_route(
    pylm_registry: Registry, jobs: list[bytes]
) -> None:
    """first -> middle -> last, first's wiring in the registry. middle
    stops (its only instance: gone), and jobs come to first, which holds
    one, with nowhere to send it. Rerouted to last (what ``pylm topology
    set`` writes), first sends what it holds on the new route: the results
    come back, straight from last, and so do the next jobs'. In one BATCH,
    the job whose result is sent on its own (too large for a batch) waits
    first; the results of the batch made before the reroute take the new
    route too."""
    pylm_registry.set_config("first", next="middle.tag")
    options: dict[str, Any] = {"registry": pylm_registry, "log_stdout": False}
    first = Watched("first", **options)
    middle = Step("middle", next_call="last.done", **options)
    results: list[bytes] = []
    failures: list[BaseException] = []
    with contextlib.ExitStack() as running:
        for stage in (Last("last", **options), middle, first):
            running.enter_context(stage)  # stopped in reverse order, whatever fails
        with LoopClient(
            "first", registry=pylm_registry, announce=False, timeout=10, batch=len(jobs)
        ) as client:
            assert list(client.job("tag", [b"before"])) == [b"before>step>step>done"]
            middle.stop()
            assert first.stats is not None
            links = first.stats.peers
            assert links is not None
            wait_for(lambda: links.live_peers == 0, 10, "first's link to middle dropping")

            thread = streaming(client, jobs, results.append, failures)
            try:
                wait_for(lambda: first.waits > 0, 10, "first holding a job")
                pylm_registry.set_config("first", next="last.done")
            finally:
                thread.join(30)
            assert failures == []
            assert sorted(results) == sorted(job + b">step>done" for job in jobs)
            assert list(client.job("tag", [b"after"])) == [b"after>step>done"]
        assert first.running, "first died"
