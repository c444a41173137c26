"""Faults on real processes: a killed pipeline stage; every job accounted for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from prerequisites import needs_etcd
from servers import Echo, Last, Step

from pylm.chained import LoopClient
from pylm.registry import LocalEtcd, LocalEtcdCluster, Registry
from pylm.standalone import Client
from pylm.testing import SOAK

HERE = Path(__file__).resolve().parent
JOBS = int(10_000 * SOAK)  # 10,000 jobs; more in soak mode
WINDOW = 500  # a client's jobs in flight at most


@pytest.mark.timeout(120 * SOAK)
def test_sigkilled_stage_loses_no_job_and_repeats_none(
    pylm_etcd: LocalEtcd, pylm_cluster: str, pylm_registry: Registry, serve: Callable[..., object]
) -> None:
    serve(Last("last", registry=pylm_registry, log_stdout=False))
    serve(Step("step", next_call="last.done", registry=pylm_registry, ttl=1, log_stdout=False))
    env = {**os.environ, "PYLM_REGISTRY": pylm_etcd.url, "PYLM_CLUSTER": pylm_cluster}
    doomed = subprocess.Popen(
        [sys.executable, str(HERE / "chained_stage.py"), "step", "last.done"], env=env
    )
    try:
        deadline = time.monotonic() + 20
        while len(pylm_registry.instances("step")) < 2:
            assert time.monotonic() < deadline, "the second stage instance never registered"
            time.sleep(0.05)
        total = JOBS
        outcomes = []
        with LoopClient(
            "step", registry=pylm_registry, announce=False, timeout=3, max_in_flight=WINDOW
        ) as client:
            for outcome in client.results("tag", (b"%d" % n for n in range(total))):
                outcomes.append(outcome)
                assert len(outcomes) > 2_000 or outcome.error is None, "failed before the kill"
                if len(outcomes) == 2_000:
                    doomed.send_signal(signal.SIGKILL)  # holding jobs in its queues
        indexes = Counter(outcome.index for outcome in outcomes)
        assert len(outcomes) == total and set(indexes) == set(range(total))  # each once
        # What the killed stage held was sent again by the client's books.
        assert [o for o in outcomes if o.error is not None] == []
        for outcome in outcomes:
            assert outcome.value == b"%d>step>done" % outcome.index
        assert doomed.wait(10) == -signal.SIGKILL
    finally:
        doomed.kill()
        doomed.wait(10)


@pytest.mark.timeout(120 * SOAK)
def test_sigkilled_worker_during_10000_jobs_loses_none_and_repeats_none(
    pylm_etcd: LocalEtcd, pylm_cluster: str, pylm_registry: Registry, serve: Callable[..., object]
) -> None:
    from pylm.parallel import Client, Master

    master = serve(Master("m", registry=pylm_registry, heartbeat=0.2, log_stdout=False))
    env = {**os.environ, "PYLM_REGISTRY": pylm_etcd.url, "PYLM_CLUSTER": pylm_cluster}
    script = str(HERE / "parallel_worker.py")
    workers = [
        subprocess.Popen([sys.executable, script, name, "m", "0.2", "4", pause], env=env)
        for name, pause in (("doomed", "0.001"), ("survivor", "0"))
    ]
    try:
        results: list[bytes] = []
        with Client("m", registry=pylm_registry, timeout=30, max_in_flight=200) as client:
            deadline = time.monotonic() + 20
            while client.ping()["workers"] < 2:
                assert time.monotonic() < deadline, "the workers never joined"
                time.sleep(0.05)
            stream = client.job("who", [b"%d" % n for n in range(JOBS)])
            for result in stream:
                results.append(result)
                if sum(r.startswith(b"doomed:") for r in results[-1:]) and len(results) > 2_000:
                    workers[0].send_signal(signal.SIGKILL)
                    break
            results.extend(stream)
        payloads = Counter(result.split(b":")[1] for result in results)
        assert len(results) == JOBS and len(payloads) == JOBS  # 0 lost, 0 twice
        assert master.redispatched >= 1
    finally:
        for process in workers:
            process.kill()
            process.wait(10)


@needs_etcd
@pytest.mark.timeout(120 * SOAK)
def test_a_three_member_etcd_cluster_loses_a_member_then_its_leader() -> None:
    with LocalEtcdCluster(3) as etcd:
        # The registry tries the members in this order: it talks to a follower first.
        leader = etcd.leader()
        followers = [m for m in etcd.members if m is not leader]
        url = "etcd://" + ",".join(f"127.0.0.1:{m.client_port}" for m in [*followers, leader])
        run_with_cluster(etcd, url, followers[0])


def run_with_cluster(etcd: LocalEtcdCluster, url: str, follower: LocalEtcd) -> None:
    with Registry(url, cluster="trio", timeout=2) as registry:
        server_ttl = 2.0
        server = Echo("steady", log_stdout=False, registry=registry, ttl=server_ttl)
        failures: list[BaseException] = []
        calls = [0]
        done = threading.Event()
        with server, Client("steady", registry=registry, timeout=5) as client:

            def load() -> None:  # calls all along: none may fail
                while not done.is_set():
                    try:
                        assert client.job("echo", b"x") == b"x"
                        calls[0] += 1
                    except BaseException as exc:
                        failures.append(exc)

            caller = threading.Thread(target=load)
            caller.start()
            try:
                registration = server.registration
                assert registration is not None
                follower.stop()  # the member the registry talks to, down: no impact
                failures_before = registration.failures
                renewed = threading.Event()
                renewed.wait(2 * server_ttl)  # two leases' worth of keep-alives
                assert registration.registered and registration.failures == failures_before
                follower.start()
                etcd.leader().stop()  # the leader down: a brief pause while two elect one
                etcd.leader()
                deadline = time.monotonic() + 10
                while not (registration.registered and registry.instances("steady")):
                    assert time.monotonic() < deadline, "never registered again"
                    time.sleep(0.05)
            finally:
                done.set()
                caller.join(10)
        assert failures == [] and calls[0] > 0
