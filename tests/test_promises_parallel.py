"""The promises of docs/parallel.md that the other tests leave unguarded,
observed from outside: the results and errors clients get, the metrics
masters and workers export, their logs. Each test names the mechanism whose
removal makes it fail.

- a "dead" worker that was only slow (SIGSTOP, then SIGCONT) still gives
  every result exactly once; its late answers are counted as duplicates;
- a stream re-dispatched after its worker was killed mid-stream reaches its
  client once and in order;
- a long job on a worker that beats is not re-dispatched;
- a client that does not read gets at most its share of the master's
  backlog; the rest is dropped and counted as ``undeliverable``;
- a scattered job whose part fails: the client gets that error, its queued
  parts never run, its other parts' results never reach ``gather``; a hook
  that raises is named in the error (``<function>/scatter``, ``gather``);
- every instance of one master name gets every worker.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
from helpers import ANY, carried, lazy_dealer, unique
from prometheus_client import REGISTRY

from pylm import protocol
from pylm.errors import RemoteError
from pylm.parallel import Client, Master, Worker
from pylm.registry import LocalEtcd, Registry
from pylm.testing import wait_for

HERE = Path(__file__).resolve().parent
BEAT = 0.2  # s between heartbeats: a dead worker is noticed within 0.6 s


def sample(metric: str, **labels: str) -> float:
    """The value of one series of this process's Prometheus registry."""
    value = REGISTRY.get_sample_value(metric, labels)
    assert value is not None, f"no series {metric}{labels}"
    return value


def dropped(server: str, reason: str) -> float:
    return sample("pylm_results_dropped_total", server=server, reason=reason)


def redispatched(server: str) -> float:
    return sample("pylm_jobs_redispatched_total", server=server)


def running(server: str) -> float:
    return sample("pylm_jobs_running", server=server)


def worker_process(pylm_etcd: LocalEtcd, cluster: str, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYLM_REGISTRY": pylm_etcd.url, "PYLM_CLUSTER": cluster}
    return subprocess.Popen([sys.executable, *args], env=env)


def end(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.kill()  # SIGKILL ends a stopped process too
        process.wait(10)


# ---------------------------------------------------------------- slow, not dead


@pytest.mark.timeout(90)
def test_a_dead_worker_that_was_only_slow_gives_every_result_once(
    pylm_etcd: LocalEtcd, pylm_cluster: str, pylm_registry: Registry, serve: Callable[..., object]
) -> None:
    """A worker stopped (SIGSTOP) while holding jobs is declared dead and its
    jobs go to the other worker; resumed (SIGCONT) once the client has every
    result, it answers the jobs it held: each such answer is dropped and
    counted as a duplicate, none reaches the client. Fails without the
    re-dispatch of a lost worker's jobs (``Dispatcher._lost``) or without
    closing a job on its first answer (``_jobs.pop`` in ``Dispatcher.drain``)."""
    name = unique("m")
    serve(Master(name, registry=pylm_registry, heartbeat=BEAT, log_stdout=False))
    script = str(HERE / "parallel_worker.py")
    # The sleepy worker takes 20 ms a job and holds 4; the survivor 2 ms a job.
    workers = [
        worker_process(pylm_etcd, pylm_cluster, script, who, name, str(BEAT), "4", pause)
        for who, pause in (("sleepy", "0.02"), ("survivor", "0.002"))
    ]
    try:
        with Client(name, registry=pylm_registry, timeout=15, max_in_flight=100) as client:
            wait_for(lambda: client.ping()["workers"] == 2, 30, "two worker processes")
            results: list[bytes] = []
            stream = client.job("who", [b"%d" % n for n in range(400)])
            for result in stream:
                results.append(result)
                if sum(r.startswith(b"sleepy:") for r in results) == 10:
                    workers[0].send_signal(signal.SIGSTOP)  # holding jobs
                    break
            results.extend(stream)
            payloads = Counter(result.split(b":")[1] for result in results)
            assert len(results) == 400 and len(payloads) == 400  # all, each once
            lost = redispatched(name)
            assert lost >= 1, "the sleepy worker held no job when stopped: nothing was tested"
            assert dropped(name, "duplicate") == 0  # the sleepy worker said nothing yet

            workers[0].send_signal(signal.SIGCONT)  # it answers the jobs it held, late
            wait_for(
                lambda: dropped(name, "duplicate") == lost,
                20,
                f"the {lost:g} late answers dropped as duplicates",
            )
            # The woken worker is back (its heartbeat asks for a hello) and serves.
            wait_for(lambda: client.ping()["workers"] == 2, 20, "the sleepy worker back")
            more = list(client.job("who", [b"more%d" % n for n in range(50)]))
            assert sorted(r.split(b":")[1] for r in more) == sorted(
                b"more%d" % n for n in range(50)
            )
            assert client.dropped == 0  # no late answer reached the client
        assert redispatched(name) == lost
    finally:
        end(workers)


# ---------------------------------------------------------------- streams


class Counting(Worker):
    def count(self, message: bytes) -> Iterator[bytes]:
        for number in range(int(message)):
            yield b"%d" % number


@pytest.mark.timeout(60)
def test_a_redispatched_stream_reaches_its_client_once_and_in_order(
    pylm_etcd: LocalEtcd, pylm_cluster: str, pylm_registry: Registry, serve: Callable[..., object]
) -> None:
    """A worker streams 0, 1, 2 and is killed before 3; the stream runs again
    on another worker from 0: the client gets 0..9, each once, in order, and
    the master counts the three repeated items as duplicates. Fails without
    the master's stream item de-duplication (``seq != job.next_seq``)."""
    name = unique("m")
    master = serve(Master(name, registry=pylm_registry, heartbeat=BEAT, log_stdout=False))
    script = str(HERE / "parallel_stream_worker.py")
    doomed = worker_process(pylm_etcd, pylm_cluster, script, "doomed", name, str(BEAT), "3")
    try:
        with Client(name, registry=pylm_registry, timeout=20) as client:
            wait_for(lambda: client.ping()["workers"] == 1, 30, "the doomed worker")
            stream = client.stream("count", b"10")
            items = [next(stream) for _ in range(3)]  # the doomed worker now hangs
            survivor = unique("survivor")
            serve(Counting(survivor, name, master.back, heartbeat=BEAT, log_stdout=False))
            doomed.send_signal(signal.SIGKILL)
            items.extend(stream)
        assert items == [b"%d" % n for n in range(10)]
        assert redispatched(name) == 1
        assert dropped(name, "duplicate") == 3  # the survivor's 0, 1, 2
        assert sample("pylm_calls_total", server=survivor, function="count", outcome="ok") == 1
        assert doomed.wait(10) == -signal.SIGKILL
    finally:
        end([doomed])


# ---------------------------------------------------------------- long jobs


class Slow(Worker):
    def slow(self, message: bytes) -> bytes:
        time.sleep(float(message))  # the job's work: it takes this long
        return self.name.encode()


@pytest.mark.timeout(60)
def test_a_long_job_on_a_worker_that_beats_is_not_redispatched(
    serve: Callable[..., object], caplog: pytest.LogCaptureFixture
) -> None:
    """A job of three times ``heartbeat * misses`` on one of two workers: its
    worker's heartbeats (from a thread of their own) keep it alive, so the job
    is run once, by one worker, and nothing is re-dispatched or dropped.
    Fails when a busy worker sends no heartbeat (``Worker._beat``)."""
    name = unique("m")
    master = serve(Master(name, ANY, ANY, heartbeat=0.5, misses=3, log_stdout=False))
    workers = [unique("w1"), unique("w2")]
    for worker in workers:
        serve(Slow(worker, name, master.back, heartbeat=0.5, log_stdout=False))
    with caplog.at_level(logging.INFO), Client(master.front, name, timeout=30) as client:
        wait_for(lambda: client.ping()["workers"] == 2, 10, "two workers")
        began = time.monotonic()
        ran_by = client.eval("slow", b"4.5").decode()
        assert time.monotonic() - began >= 4.5  # three times heartbeat * misses (1.5 s)
        assert client.ping()["workers"] == 2
    assert ran_by in workers
    assert redispatched(name) == 0
    assert dropped(name, "duplicate") == 0
    calls = [
        sample("pylm_calls_total", server=worker, function="slow", outcome="ok")
        for worker in workers
    ]
    assert sorted(calls) == [0, 1]  # run once, by one worker
    assert "go to other workers" not in caplog.text


# ---------------------------------------------------------------- backlog limit


class Kib(Worker):
    def kib(self, message: bytes) -> Iterator[bytes]:
        for _ in range(int(message)):
            yield bytes(1024)


@pytest.mark.timeout(90)
def test_a_client_that_does_not_read_gets_its_share_of_the_backlog_the_rest_is_counted(
    serve: Callable[..., object],
) -> None:
    """A client asks for a stream of 50,000 items of 1 KiB and reads none
    until the stream is over: the master keeps a quarter of its 100,000
    answer backlog for it (25,000), drops the rest and counts every drop in
    ``pylm_results_dropped_total{reason="undeliverable"}``. The client then
    gets exactly what was not dropped, in order, and nothing after it.
    Fails without the backlog's limit per peer (``Backlog.offer``), with
    another share than a quarter, or without counting the drops
    (``Master._undeliverable``)."""
    name, worker = unique("m"), unique("w")
    master = serve(Master(name, ANY, ANY, heartbeat=BEAT, log_stdout=False))
    serve(Kib(worker, name, master.back, heartbeat=BEAT, log_stdout=False))
    items = 50_000
    lazy = lazy_dealer(master.front)
    try:
        lazy.send_multipart(
            protocol.encode(protocol.REQUEST, 1, b"%d" % items, f"{name}.kib".encode())
        )
        wait_for(
            lambda: sample("pylm_calls_total", server=worker, function="kib", outcome="ok") == 1,
            60,
            "the worker's stream over",
        )
        wait_for(lambda: running(name) == 0, 20, "the stream's END read by the master")
        lost = dropped(name, "undeliverable")
        assert lost > 0, "no drop counted: no limit per client, or drops not counted"
        kept = items + 1 - lost  # the items and the END, less what was dropped
        # The client's share of the backlog, a quarter of it, and no more than what ZeroMQ's
        # queues and the kernel's buffers hold on top: 1,000 messages (the socket's high-water
        # mark) of up to 8 items of 1 KiB each (a BATCH holds 8 KiB of payloads), and a few
        # thousand items in the kernel's buffers.
        assert 25_000 <= kept <= 25_000 + 8_000 + 5_000, kept
        numbers = Counter[int]()
        while sum(numbers.values()) < kept:
            assert lazy.poll(20_000), f"only {sum(numbers.values())} of {kept:g} answers came"
            for body in carried(lazy.recv_multipart()):  # answers read together: a BATCH
                message = protocol.decode([body])
                numbers[message.kind] += 1
                assert message.msg_id == 1
        # Nothing more is on its way: a PING's PONG comes next (answers keep their order).
        lazy.send_multipart(protocol.encode(protocol.PING, 2, b""))
        assert lazy.poll(20_000)
        pong = protocol.decode(lazy.recv_multipart())
        assert (pong.kind, pong.msg_id) == (protocol.PONG, 2)
        assert numbers[protocol.REPLY] + numbers[protocol.END] == kept
        assert dropped(name, "undeliverable") == lost
    finally:
        lazy.close()


# ---------------------------------------------------------------- scatter and gather


class Parts(Worker):
    """``part``: ``hold`` waits for the test, ``bad`` fails, the rest is
    upper-cased; every part run is noted in ``ran``."""

    ran: list[bytes]
    release: threading.Event

    def part(self, message: bytes) -> bytes:
        self.ran.append(message)
        if message == b"hold":
            assert self.release.wait(30)
        if message == b"bad":
            raise ValueError("a bad part")
        return message.upper()


class Split(Master):
    """Scatter ``b"a,b"`` into a part each; gather passes each result on
    and notes it. ``boom`` makes scatter raise, a ``GBAD`` result gather."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gathered: list[bytes] = []

    def scatter(self, message: bytes) -> Iterable[bytes]:
        if message == b"boom":
            raise ValueError("scatter cannot split boom")
        return message.split(b",")

    def gather(self, message: bytes) -> Iterable[bytes]:
        if message == b"GBAD":
            raise ValueError("gather refuses GBAD")
        self.gathered.append(message)
        yield message


@pytest.mark.timeout(60)
def test_a_failed_part_ends_its_job_its_other_parts_go_nowhere(
    serve: Callable[..., object],
) -> None:
    """A job scattered into ``hold, bad, q1, q2`` on two workers of one slot:
    ``bad`` fails and the client gets its error at once; ``q1`` and ``q2``,
    still queued, never run (the next job runs first); ``hold``'s result,
    when it comes, never reaches gather. The master serves on. Fails when
    the queued parts of a failed job are dispatched (``Dispatcher.dispatch``)
    or when a failed job's results are gathered (``Dispatcher._result``)."""
    ran: list[bytes] = []
    release = threading.Event()
    Parts.ran, Parts.release = ran, release
    name = unique("m")
    master = serve(Split(name, ANY, ANY, heartbeat=BEAT, log_stdout=False))
    for worker in ("p1", "p2"):
        serve(Parts(unique(worker), name, master.back, heartbeat=BEAT, log_stdout=False))
    try:
        with Client(master.front, name, timeout=20) as client:
            wait_for(lambda: client.ping()["workers"] == 2, 10, "two workers")
            items: list[bytes] = []
            with pytest.raises(RemoteError, match="a bad part") as failure:
                for item in client.stream("part", b"hold,bad,q1,q2"):
                    items.append(item)
            assert items == [] and failure.value.remote_type == "ValueError"
            # One worker holds "hold": the other runs what the queue has, oldest first.
            assert list(client.stream("part", b"x")) == [b"X"]
            assert b"q1" not in ran and b"q2" not in ran
            release.set()
            wait_for(lambda: running(name) == 0, 10, "hold's result in")
            assert sorted(ran) == [b"bad", b"hold", b"x"]
            assert master.gathered == [b"X"]  # hold's result was dropped
            assert sorted(client.stream("part", b"y,z")) == [b"Y", b"Z"]
    finally:
        release.set()


@pytest.mark.timeout(60)
def test_a_hook_that_raises_is_named_in_the_clients_error(serve: Callable[..., object]) -> None:
    """``scatter`` raising gives the client a RemoteError naming
    ``<function>/scatter``; ``gather`` raising, one naming ``gather``; the
    master serves on. Fails when the hooks' errors are named otherwise."""
    Parts.ran, Parts.release = [], threading.Event()
    name = unique("m")
    master = serve(Split(name, ANY, ANY, heartbeat=BEAT, log_stdout=False))
    serve(Parts(unique("p"), name, master.back, heartbeat=BEAT, log_stdout=False))
    with Client(master.front, name, timeout=20) as client:
        with pytest.raises(RemoteError, match="function 'part/scatter'") as scatter:
            client.eval("part", b"boom")
        assert scatter.value.remote_message == "scatter cannot split boom"
        with pytest.raises(RemoteError, match="function 'gather'") as gather:
            client.eval("part", b"gbad")
        assert gather.value.remote_message == "gather refuses GBAD"
        assert client.eval("part", b"fine") == b"FINE"


# ---------------------------------------------------------------- several instances


class Who(Worker):
    def who(self, message: bytes) -> bytes:
        return self.name.encode() + b":" + message


@pytest.mark.timeout(60)
def test_every_instance_of_a_master_name_gets_every_worker(
    pylm_registry: Registry, serve: Callable[..., object]
) -> None:
    """Two masters of one name, two workers and a client by that name only:
    each instance, asked at its own address, counts both workers (each
    worker connects to every instance), and the client's jobs, spread over
    the instances, give every result once. Fails when a worker connects to
    one instance only (``Worker._find_masters``)."""
    name = unique("m")
    instances = [
        serve(Master(name, registry=pylm_registry, heartbeat=BEAT, log_stdout=False))
        for _ in range(2)
    ]
    assert len(pylm_registry.instances(name)) == 2
    workers = [unique("w1"), unique("w2")]
    for worker in workers:
        serve(Who(worker, name, registry=pylm_registry, heartbeat=BEAT, log_stdout=False))
    for master in instances:
        with Client(master.front, name, timeout=10) as direct:
            wait_for(lambda: direct.ping()["workers"] == 2, 10, f"both workers at {master.front}")
    with Client(name, registry=pylm_registry, timeout=10) as client:
        results = list(client.job("who", [b"%d" % n for n in range(300)]))
    payloads = Counter(result.split(b":")[1] for result in results)
    assert len(results) == 300 and len(payloads) == 300
    assert {result.split(b":")[0].decode() for result in results} <= set(workers)
