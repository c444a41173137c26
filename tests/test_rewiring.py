"""A running pipeline rewired from the registry: ``pylm topology set`` on a
stage that reads its next stage there reroutes it while it runs, losing no
job (docs/registry.md, "Discovery and live rewiring")."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from helpers import pylm_command
from servers import Last, Step

from pylm.chained import LoopClient
from pylm.registry import LocalEtcd, Registry
from pylm.testing import wait_for

pytestmark = pytest.mark.timeout(90)


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

            def stream() -> None:
                try:
                    for result in client.job("tag", payloads()):
                        arrivals.append((time.monotonic(), result))
                except BaseException as exc:
                    failures.append(exc)

            thread = threading.Thread(target=stream)
            thread.start()
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
