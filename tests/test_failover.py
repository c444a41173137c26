"""No call or job lost to a dead instance (docs/operations.md, "A server
instance dies"): real stage and server processes, killed (SIGKILL) or
frozen (SIGSTOP) while a client streams jobs or calls in a loop; every job
ends with its own result, once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import pylm_command
from prometheus_client import REGISTRY
from servers import Doer

from pylm.chained import LoopClient
from pylm.errors import InstanceLost, RequestTimeout
from pylm.parallel import Client as ParallelClient
from pylm.processes import end_process
from pylm.protocol import SPLIT_PAYLOAD
from pylm.registry import LocalEtcd, Registry
from pylm.standalone import AsyncClient, Client
from pylm.testing import SOAK, wait_for

HERE = Path(__file__).resolve().parent
JOBS = int(10_000 * SOAK)
STAGES = {"first": "second.tag", "second": "last.done", "last": None}


def start_stage(env: dict[str, str], *args: str) -> tuple[subprocess.Popen[str], list[str]]:
    """A stage process (tests/failover_stage.py ARGS) and the addresses it bound."""
    process = subprocess.Popen(
        [sys.executable, str(HERE / "failover_stage.py"), *args],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # printed once it serves; empty if it died
    assert line, f"stage {args} died before it served"
    return process, line.split()


def end(processes: list[subprocess.Popen[str]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)  # a stopped process ends only once continued
        end_process(process, 10)  # type: ignore[arg-type]


def stream(client: LoopClient, total: int, at: int, act: threading.Event) -> Counter[int]:
    """Stream ``total`` jobs through the pipeline, setting ``act`` once ``at``
    results are in; the count of outcomes by job, each checked right."""
    seen: Counter[int] = Counter()
    for outcome in client.results("tag", (b"%d" % n for n in range(total))):
        assert outcome.error is None, f"job {outcome.index}: {outcome.error!r}"
        assert outcome.value == b"%d>step>step>done" % outcome.index
        seen[outcome.index] += 1
        if len(seen) == at:
            act.set()
    return seen


@pytest.fixture
def by_name(
    pylm_etcd: LocalEtcd, pylm_cluster: str, pylm_registry: Registry
) -> Iterator[dict[str, list[subprocess.Popen[str]]]]:
    """Two instances of each stage of first -> second -> last, by name."""
    env = {**os.environ, "PYLM_REGISTRY": pylm_etcd.url, "PYLM_CLUSTER": pylm_cluster}
    stages: dict[str, list[subprocess.Popen[str]]] = {}
    try:
        for name, next_call in reversed(STAGES.items()):
            role = ["last", name] if next_call is None else ["step", name, next_call]
            stages[name] = [start_stage(env, *role)[0] for _ in range(2)]
        for name in STAGES:
            wait_for(lambda n=name: len(pylm_registry.instances(n)) == 2, 20, f"{name} x2")
        yield stages
    finally:
        end([process for processes in stages.values() for process in processes])


@pytest.mark.timeout(120 * SOAK)
@pytest.mark.parametrize("stage", ["first", "second", "last"])
def test_a_killed_instance_of_any_stage_loses_no_job_and_repeats_none(
    by_name: dict[str, list[subprocess.Popen[str]]], pylm_registry: Registry, stage: str
) -> None:
    """A name-only 3-stage pipeline with 2 instances of each stage; one
    instance of ``stage`` is SIGKILLed mid-run: all 10,000 jobs give their
    own result, once."""
    doomed = by_name[stage][0]
    kill = threading.Event()
    threading.Thread(target=lambda: kill.wait(60) and doomed.kill(), daemon=True).start()
    with LoopClient("first", registry=pylm_registry, announce=False) as client:
        seen = stream(client, JOBS, JOBS // 5, kill)
        dropped, duplicates = client.dropped, client.books.duplicates
    assert doomed.wait(10) == -signal.SIGKILL
    assert sorted(seen) == list(range(JOBS)) and set(seen.values()) == {1}
    assert dropped == duplicates  # every result dropped was a copy of a job sent again


@pytest.mark.timeout(120 * SOAK)
def test_large_jobs_a_killed_instance_held_are_sent_again_whole(
    by_name: dict[str, list[subprocess.Popen[str]]], pylm_registry: Registry
) -> None:
    """Jobs whose payload travels in a frame of its own (over SPLIT_PAYLOAD)
    are kept and sent again alike: a middle instance SIGKILLed mid-run, every
    job gives its own whole result, once."""
    doomed = by_name["second"][0]
    big = bytes(range(256)) * ((SPLIT_PAYLOAD + 1024) // 256)  # 1 MiB
    total = 100
    kill = threading.Event()
    threading.Thread(target=lambda: kill.wait(60) and doomed.kill(), daemon=True).start()
    seen: Counter[int] = Counter()
    with LoopClient("first", registry=pylm_registry, announce=False) as client:
        for outcome in client.results("tag", (b"%06d" % n + big for n in range(total))):
            assert outcome.error is None, f"job {outcome.index}: {outcome.error!r}"
            assert outcome.value == b"%06d" % outcome.index + big + b">step>step>done"
            seen[outcome.index] += 1
            if len(seen) == total // 4:
                kill.set()
    assert doomed.wait(10) == -signal.SIGKILL
    assert sorted(seen) == list(range(total)) and set(seen.values()) == {1}


@pytest.mark.timeout(120 * SOAK)
def test_a_frozen_instance_loses_no_job_and_its_late_copies_are_dropped(
    by_name: dict[str, list[subprocess.Popen[str]]], pylm_registry: Registry
) -> None:
    """One instance of the middle stage is SIGSTOPped mid-run: it leaves the
    rotation after the heartbeat timeout, every job gives its result once;
    continued afterwards, what it held comes late and is dropped, and the
    client's next run gets exactly its own results."""
    frozen = by_name["second"][0]
    freeze = threading.Event()
    threading.Thread(
        target=lambda: freeze.wait(60) and frozen.send_signal(signal.SIGSTOP), daemon=True
    ).start()
    with LoopClient("first", registry=pylm_registry, announce=False) as client:
        seen = stream(client, JOBS, JOBS // 5, freeze)
        assert sorted(seen) == list(range(JOBS)) and set(seen.values()) == {1}
        assert client.books.retried > 0  # what it held was sent again
        exported = REGISTRY.get_sample_value(
            "pylm_client_retries_total", {"server": "first", "outcome": "sent"}
        )
        assert exported is not None and exported >= client.books.retried
        frozen.send_signal(signal.SIGCONT)
        again = stream(client, 1_000, 0, threading.Event())
        assert sorted(again) == list(range(1_000)) and set(again.values()) == {1}
        assert client.dropped == client.books.duplicates


@pytest.mark.timeout(120 * SOAK)
def test_a_pipeline_by_address_loses_no_job_to_a_killed_instance() -> None:
    """No registry: the first stage is given the two middle instances'
    addresses; one is SIGKILLed mid-run: every job gives its result once."""
    env = dict(os.environ)
    processes: list[subprocess.Popen[str]] = []
    try:
        last, (last_pull, _, last_push) = start_stage(env, "last", "last", "--address")
        processes.append(last)
        middles = [start_stage(env, "step", "second", "last.done", last_pull, "--address")]
        middles.append(start_stage(env, "step", "second", "last.done", last_pull, "--address"))
        processes += [process for process, _ in middles]
        nexts = ",".join(addresses[0] for _, addresses in middles)
        first, (first_pull, first_db) = start_stage(
            env, "step", "first", "second.tag", nexts, "--address"
        )
        processes.append(first)
        doomed = middles[0][0]
        kill = threading.Event()
        threading.Thread(target=lambda: kill.wait(60) and doomed.kill(), daemon=True).start()
        with LoopClient(last_push, first_pull, first_db, "first", announce=False) as client:
            seen = stream(client, JOBS, JOBS // 5, kill)
        assert doomed.wait(10) == -signal.SIGKILL
        assert sorted(seen) == list(range(JOBS)) and set(seen.values()) == {1}
    finally:
        end(processes)


_SERVER = """
import sys, time
from pylm.standalone import Server, idempotent

class Who(Server):
    @idempotent
    def who(self, message):
        time.sleep(0.002)  # the kill comes while calls are in flight
        return sys.argv[1].encode()

    def once(self, message):
        time.sleep(0.002)
        return sys.argv[1].encode()

Who("who", ttl=10, log_stdout=False).start()
"""


def calls_through_a_kill(
    client: Client, function: str, doomed: subprocess.Popen[bytes]
) -> tuple[int, list[RequestTimeout]]:
    """Call ``function`` 600 times, ``doomed`` SIGKILLed by another thread
    after 200 answers; the answers and the failures."""
    answered = 0
    failures: list[RequestTimeout] = []
    kill = threading.Event()
    threading.Thread(target=lambda: kill.wait(60) and doomed.kill(), daemon=True).start()
    for n in range(600):
        if n == 200:
            kill.set()
        try:
            client.job(function, b"")
            answered += 1
        except RequestTimeout as error:
            failures.append(error)
    assert doomed.wait(10) == -signal.SIGKILL
    return answered, failures


@pytest.mark.timeout(60 * SOAK)
def test_calls_of_an_idempotent_function_survive_a_killed_instance_others_say_they_may_have_run(
    pylm_etcd: LocalEtcd, pylm_cluster: str, pylm_registry: Registry
) -> None:
    """Two name-only standalone instances; a client calls in a loop and one
    is SIGKILLed. Calls of the function marked @idempotent all succeed; of
    the other, at most the one in flight on the dead instance fails, with
    InstanceLost (a RequestTimeout saying the call may have run)."""
    env = {**os.environ, "PYLM_REGISTRY": pylm_etcd.url, "PYLM_CLUSTER": pylm_cluster}
    servers: list[subprocess.Popen[bytes]] = []

    def server(name: str) -> subprocess.Popen[bytes]:
        servers.append(subprocess.Popen([sys.executable, "-c", _SERVER, name], env=env))
        return servers[-1]

    try:
        doomed, _ = server("a"), server("b")
        wait_for(lambda: len(pylm_registry.instances("who")) == 2, 20, "both instances listed")
        with Client("who", registry=pylm_registry, timeout=3, wait=10) as client:
            answered, failures = calls_through_a_kill(client, "who", doomed)
        assert (answered, failures) == (600, [])
        doomed = server("c")
        wait_for(lambda: len(pylm_registry.instances("who")) == 3, 20, "the third listed")
        # The call lost with the instance fails at its timeout: a short one.
        with Client("who", registry=pylm_registry, timeout=1.5, wait=10) as client:
            answered, failures = calls_through_a_kill(client, "once", doomed)
        assert len(failures) <= 1 and answered == 600 - len(failures)
        assert all(isinstance(error, InstanceLost) for error in failures), failures
    finally:
        for process in servers:
            end_process(process, 10)


@pytest.mark.timeout(60 * SOAK)
def test_async_calls_of_an_idempotent_function_survive_a_killed_instance(
    pylm_etcd: LocalEtcd, pylm_cluster: str, pylm_registry: Registry
) -> None:
    """The same with the asyncio client, 8 calls in flight at a time: none of
    the idempotent function fails; of the other, at most the 8 in flight,
    each with InstanceLost."""
    env = {**os.environ, "PYLM_REGISTRY": pylm_etcd.url, "PYLM_CLUSTER": pylm_cluster}
    servers: list[subprocess.Popen[bytes]] = []

    def server(name: str) -> subprocess.Popen[bytes]:
        servers.append(subprocess.Popen([sys.executable, "-c", _SERVER, name], env=env))
        return servers[-1]

    async def calls(
        function: str, doomed: subprocess.Popen[bytes]
    ) -> tuple[int, list[BaseException]]:
        answered = 0
        failures: list[BaseException] = []
        timeout = 3 if function == "who" else 1.5  # a call lost fails at its timeout
        async with AsyncClient("who", registry=pylm_registry, timeout=timeout, wait=10) as client:
            for n in range(100):
                if n == 40:
                    doomed.kill()
                outcomes = await asyncio.gather(
                    *(client.job(function, b"") for _ in range(8)), return_exceptions=True
                )
                failures += [o for o in outcomes if isinstance(o, BaseException)]
                answered += sum(1 for o in outcomes if isinstance(o, bytes))
        assert doomed.wait(10) == -signal.SIGKILL
        return answered, failures

    try:
        doomed, _ = server("a"), server("b")
        wait_for(lambda: len(pylm_registry.instances("who")) == 2, 20, "both instances listed")
        assert asyncio.run(calls("who", doomed)) == (800, [])
        doomed = server("c")
        wait_for(lambda: len(pylm_registry.instances("who")) == 3, 20, "the third listed")
        answered, failures = asyncio.run(calls("once", doomed))
        assert len(failures) <= 8 and answered == 800 - len(failures)
        assert all(isinstance(error, InstanceLost) for error in failures), failures
    finally:
        for process in servers:
            end_process(process, 10)


def test_an_instance_its_peers_cannot_reach_is_shown_while_its_lease_runs(
    pylm_etcd: LocalEtcd, pylm_cluster: str, pylm_registry: Registry
) -> None:
    """first -> second (two instances, leases of 60 s) -> last; one second
    instance is SIGKILLed. Its record stays, but the first stage cannot
    reach it and says so in its metrics (pylm_peer_unreachable); ``pylm ls
    --peers`` marks that instance and no other, ``pylm top`` counts it."""
    env = {**os.environ, "PYLM_REGISTRY": pylm_etcd.url, "PYLM_CLUSTER": pylm_cluster}
    processes: list[subprocess.Popen[str]] = []
    try:
        processes.append(start_stage(env, "last", "last")[0])
        seconds = [start_stage(env, "step", "second", "last.done", "--ttl", "60")[0] for _ in "ab"]
        processes += seconds
        processes.append(start_stage(env, "step", "first", "second.tag")[0])
        wait_for(lambda: len(pylm_registry.instances("second")) == 2, 20, "second x2")
        doomed = seconds[0]
        doomed.kill()
        assert doomed.wait(10) == -signal.SIGKILL

        def reported() -> dict[int, int]:
            shown = subprocess.run(
                pylm_command(pylm_etcd, pylm_cluster, "ls", "--peers", "--json"),
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert shown.returncode == 0, shown.stderr
            listed = json.loads(shown.stdout)["servers"]["second"]["instances"]
            return {entry["pid"]: entry["unreachable_from"] for entry in listed}

        wait_for(lambda: reported().get(doomed.pid) == 1, 20, "the killed instance reported")
        assert reported() == {doomed.pid: 1, seconds[1].pid: 0}  # its lease runs; the other is fine
        top = subprocess.run(
            pylm_command(pylm_etcd, pylm_cluster, "top", "--once", "--interval", "0.2"),
            capture_output=True,
            text=True,
            timeout=30,
        )
        row = next(line for line in top.stdout.splitlines() if line.startswith("second "))
        assert "(1 unreachable from peers)" in row, top.stdout
    finally:
        end(processes)


_MASTER = """
from pylm.parallel import Master

Master("pool", ttl=10, log_stdout=False).start()
"""


def test_a_parallel_client_with_retry_survives_a_killed_master_instance(
    pylm_etcd: LocalEtcd, pylm_cluster: str, pylm_registry: Registry
) -> None:
    """Two instances of a master name, two workers serving both; a parallel
    Client with ``retry=True`` streams 2,000 jobs and one master instance is
    SIGKILLed at the 500th result: the jobs it held are sent again to the
    other, and every job gives its own result once."""
    env = {**os.environ, "PYLM_REGISTRY": pylm_etcd.url, "PYLM_CLUSTER": pylm_cluster}
    masters = [subprocess.Popen([sys.executable, "-c", _MASTER], env=env) for _ in range(2)]
    workers = [Doer(f"doer{n}", "pool", registry=pylm_registry, log_stdout=False) for n in range(2)]
    total = 2_000
    try:
        wait_for(lambda: len(pylm_registry.instances("pool")) == 2, 20, "both masters listed")
        for worker in workers:
            worker.start(background=True)
        seen: Counter[bytes] = Counter()
        with ParallelClient("pool", registry=pylm_registry, retry=True, timeout=10) as client:
            for result in client.job("echo", (b"%d" % n for n in range(total))):
                seen[result] += 1
                if len(seen) == 500:
                    masters[0].kill()
            assert client.books.retried > 0  # what the killed instance held was sent again
        assert masters[0].wait(10) == -signal.SIGKILL
        assert seen == Counter(b"%d" % n for n in range(total))  # each once, none lost
    finally:
        for worker in workers:
            worker.stop()
        for process in masters:
            end_process(process, 10)
