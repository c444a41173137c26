"""Master, workers and clients of the parallel pattern, on real sockets,
with a real etcd for the tests that start servers by name."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from helpers import ANY, carried, immediate_dealer, lazy_dealer, read_answers, trickle
from prometheus_client.parser import text_string_to_metric_families

from pylm import protocol
from pylm.errors import PylmError, RemoteError, RequestTimeout, UnknownFunction
from pylm.parallel import Client, Master, Worker
from pylm.registry import LocalEtcd, Registry
from pylm.testing import wait_for

HERE = Path(__file__).resolve().parent
BEAT = 0.2  # s between heartbeats: a dead worker is noticed within 0.6 s


class Tagger(Worker):
    def who(self, message: bytes) -> bytes:
        return self.name.encode() + b":" + message

    def slow(self, message: bytes) -> bytes:
        time.sleep(float(message))  # the job's work: it takes this long
        return self.name.encode()

    def count(self, message: bytes) -> Iterator[bytes]:
        for number in range(int(message)):
            yield str(number).encode()

    def count_then_fail(self, message: bytes) -> Iterator[bytes]:
        yield b"first"
        raise ValueError(f"failed after one item of {message!r}")

    def text(self, message: bytes) -> str:
        return message.decode()  # not bytes: the client gets an error

    def kib(self, message: bytes) -> Iterator[bytes]:
        for _ in range(int(message)):
            yield bytes(1024)

    def square(self, message: bytes) -> bytes:
        return str(int(message) ** 2).encode()


class SumOfSquares(Master):
    """Scatter ``b"1,2,3"`` into one job per number; gather the squares
    into their sum, given once the job's last square is in."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.sums: dict[int, int] = {}

    def scatter(self, message: bytes) -> Iterable[bytes]:
        return message.split(b",") if message else []

    def gather(self, message: bytes) -> Iterable[bytes]:
        job = self.gathering.job
        self.sums[job] = self.sums.get(job, 0) + int(message)
        if self.gathering.last:
            yield str(self.sums.pop(job)).encode()


@pytest.fixture
def master(serve: Callable[[Master], Master]) -> Master:
    return serve(
        Master("m", "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", heartbeat=BEAT, log_stdout=False)
    )


def tagger(master: Master, name: str, **options: object) -> Tagger:
    assert master.back is not None
    return Tagger(name, master.name, master.back, heartbeat=BEAT, log_stdout=False, **options)  # type: ignore[arg-type]


def client_of(master: Master, **options: object) -> Client:
    assert master.front is not None
    return Client(master.front, master.name, **options)  # type: ignore[arg-type]


def test_eval_job_and_stream(master: Master, serve: Callable[[Tagger], Tagger]) -> None:
    serve(tagger(master, "w1"))
    with client_of(master, timeout=10) as client:
        assert client.eval("who", b"a") == b"w1:a"
        results = list(client.job("who", [b"%d" % n for n in range(500)]))
        assert sorted(results) == sorted(b"w1:%d" % n for n in range(500))
        assert list(client.stream("count", b"5")) == [b"0", b"1", b"2", b"3", b"4"]
        assert list(client.stream("count", b"0")) == []  # a stream may be empty
        assert client.ping()["workers"] == 1


def test_a_slow_payload_source_gets_its_results_as_they_come(
    master: Master, serve: Callable[[Tagger], Tagger]
) -> None:
    """A source that yields a payload every 0.1 s for 1.5 s, with a 1 s job
    timeout: no job may time out, and results come out while it still runs."""
    serve(tagger(master, "w1"))
    source_done = threading.Event()
    source = trickle(15, 0.1, source_done)
    with client_of(master) as client:
        outcomes = [
            (r.error, source_done.is_set()) for r in client.results("who", source, timeout=1)
        ]
    assert [error for error, _ in outcomes] == [None] * 15
    assert not outcomes[0][1], "no result came out before the source ended"


def test_names_only_through_the_registry(
    pylm_registry: Registry, serve: Callable[..., object]
) -> None:
    master = serve(Master("m", registry=pylm_registry, heartbeat=BEAT, log_stdout=False))
    serve(Tagger("w1", "m", registry=pylm_registry, heartbeat=BEAT, log_stdout=False))
    serve(Tagger("w2", "m", registry=pylm_registry, heartbeat=BEAT, log_stdout=False))
    (record,) = pylm_registry.instances("m")
    assert record.kind == "master" and set(record.endpoints) == {"front", "workers"}
    assert {r.kind for r in pylm_registry.instances("w1") + pylm_registry.instances("w2")} == {
        "worker"
    }
    with Client("m", registry=pylm_registry, timeout=10) as client:
        wait_for(lambda: client.ping()["workers"] == 2, 10, "two workers")
        by = Counter(result.split(b":")[0] for result in client.job("who", [b"x"] * 200))
    assert sum(by.values()) == 200
    assert master.workers == 2


def test_errors_reach_the_client_and_the_rest_goes_on(
    master: Master, serve: Callable[[Tagger], Tagger]
) -> None:
    serve(tagger(master, "w1"))
    with client_of(master, timeout=10) as client:
        with pytest.raises(UnknownFunction, match="'nope'"):
            client.eval("nope", b"x")
        with pytest.raises(RemoteError, match="returned str, expected bytes"):
            client.eval("text", b"x")
        items = []
        with pytest.raises(RemoteError, match="failed after one item of b'z'"):
            for item in client.stream("count_then_fail", b"z"):
                items.append(item)
        assert items == [b"first"]
        with pytest.raises(PylmError, match="gave 3 results, not one"):
            client.eval("count", b"3")
        outcomes = list(client.results("square", [b"2", b"x", b"3"]))
        assert sorted((o.index, o.value) for o in outcomes if o.error is None) == [
            (0, b"4"), (2, b"9"),
        ]  # fmt: skip
        assert [o.index for o in outcomes if isinstance(o.error, RemoteError)] == [1]
        assert client.eval("who", b"still") == b"w1:still"


def malformed_scraped(master: Master) -> float:
    """``pylm_messages_malformed_total`` of ``master``, all reasons, as
    Prometheus reads it from the master's /metrics."""
    assert master.metrics_url is not None
    with urllib.request.urlopen(master.metrics_url, timeout=5) as answer:
        body = answer.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(body)
        if family.name == "pylm_messages_malformed"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels["server"] == master.name
    )


@pytest.mark.timeout(60)
def test_malformed_messages_get_an_error_or_are_dropped(serve: Callable[[Any], Any]) -> None:
    """Each malformed message is answered with an ERROR when it says whom to
    answer, else dropped, and each is counted in /metrics; the master serves on."""
    name = f"m_{uuid.uuid4().hex[:8]}"  # series of one name in a process add up
    master = serve(Master(name, ANY, ANY, heartbeat=BEAT, metrics=True, log_stdout=False))
    serve(tagger(master, "w1"))
    before = malformed_scraped(master)
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(master.front)
    try:
        raw.send(b"garbage")  # no head: nothing to answer to
        bad_version = bytearray(protocol.encode(protocol.REQUEST, 7, b"x", b"m.who")[0])
        bad_version[2] = 9
        raw.send(bytes(bad_version))
        assert raw.poll(5000)
        answer = protocol.decode(raw.recv_multipart())
        assert answer.kind == protocol.ERROR and answer.msg_id == 7
        assert "unsupported protocol version 9" in answer.payload.decode()
        # Target and route sizes past the end: refused, not passed to a worker.
        raw.send(b"PL\x01\x01\x00\x00\x06\x00\x06" + bytes(7) + b"\x09" + bytes(8))
        assert raw.poll(5000)
        answer = protocol.decode(raw.recv_multipart())
        assert answer.kind == protocol.ERROR and answer.msg_id == 9
        assert "overrun" in answer.payload.decode()
        raw.send_multipart(protocol.encode(protocol.REPLY, 8, b"x"))
        assert raw.poll(5000)
        assert b"takes REQUEST, CACHE and PING, not REPLY" in raw.recv()
    finally:
        raw.close()
    with client_of(master, timeout=10) as client:
        assert client.eval("who", b"after") == b"w1:after"
    wait_for(lambda: malformed_scraped(master) - before == 4, 10, "4 malformed messages counted")


HOSTILE_HELLOS = [
    {"slots": 10**7},  # more slots than a worker may claim: memory per slot
    {"slots": -1},
    {"slots": 2**64},
    {"slots": 1.5},
    {"slots": "3"},
    {"slots": True},
    {"slots": None},
    {"slots": [1]},
    {"free": 10**9},
    {"slots": 2, "free": -1},
    {"name": {"a": 1}},
    {"name": "n" * 5000},
    {"leaving": "yes"},
    {"bye": 1},
    [1, 2],
    "text",
]


def test_hostile_worker_hellos_are_dropped_and_counted(
    master: Master, serve: Callable[[Tagger], Tagger]
) -> None:
    """Well-formed PINGs on the workers port whose JSON fields have the wrong
    type or range (a slot count of 10**7 among them) stop nothing and
    allocate nothing: each is dropped and counted as a bad hello."""
    serve(tagger(master, "w1"))
    vandal = zmq.Context.instance().socket(zmq.DEALER)
    vandal.setsockopt(zmq.LINGER, 0)
    vandal.setsockopt(zmq.ROUTING_ID, b"vandal")
    vandal.connect(master.back)
    try:
        for hello in HOSTILE_HELLOS:
            payload = json.dumps(hello).encode()
            vandal.send_multipart(protocol.encode(protocol.PING, 0, payload, route=b"vandal"))
        vandal.send_multipart(protocol.encode(protocol.PING, 0, b"{not json", route=b"vandal"))
        vandal.send_multipart(protocol.encode(protocol.PING, 0, b"{}", route=b""))  # no socket
        assert master.stats is not None
        wait_for(
            lambda: master.stats.malformed_by["hello"] == len(HOSTILE_HELLOS) + 2,
            10,
            "every hostile hello counted",
        )
    finally:
        vandal.close()
    with client_of(master, timeout=10) as client:
        assert [client.eval("who", b"%d" % i) for i in range(5)] == [b"w1:%d" % i for i in range(5)]
        assert client.ping()["workers"] == 1  # the vandal never joined
    assert master.running


def deaf_peer(address: str, identity: bytes | None = None) -> zmq.Socket:
    """A DEALER that reads nothing, with room for almost nothing: what a
    server sends it fills its queue at once."""
    peer = zmq.Context.instance().socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.setsockopt(zmq.RCVHWM, 1)
    peer.setsockopt(zmq.RCVBUF, 4096)
    peer.setsockopt(zmq.SNDHWM, 0)
    if identity is not None:
        peer.setsockopt(zmq.ROUTING_ID, identity)
    peer.connect(address)
    return peer


def test_a_peer_that_does_not_read_holds_the_master_up_nowhere(
    master: Master, serve: Callable[[Tagger], Tagger]
) -> None:
    """Heartbeats of a worker the master does not know, from a peer that
    reads none of the answers (PONGs asking for a hello); and a worker that
    claims 1024 slots, takes jobs and reads none: the master waits for
    neither, serves its clients, and the jobs the deaf worker could not take
    go to a real one."""
    assert master.back is not None
    beats = deaf_peer(master.back)
    beat = protocol.encode(protocol.PING, 0, b"{}", route=b"nobody")[0]
    deaf = deaf_peer(master.back, b"deaf-worker")
    hello = json.dumps({"name": "deaf", "slots": 1024}).encode()
    try:
        for _ in range(150_000):  # more PONGs than the peer's queue and buffers hold
            beats.send(beat)
        deaf.send_multipart(protocol.encode(protocol.PING, 0, hello, route=b"deaf-worker"))
        with client_of(master, timeout=20) as client:
            wait_for(lambda: client.ping()["workers"] == 1, 20, "the deaf worker's hello")
            jobs = [b"%d" % n + b"." * 65_536 for n in range(1200)]  # more than it can queue
            serve(tagger(master, "w1"))
            results = list(client.job("who", jobs))
            assert sorted(results) == sorted(b"w1:" + job for job in jobs)
    finally:
        beats.close()
        deaf.close()


def test_load_goes_to_idle_workers(master: Master, serve: Callable[[Tagger], Tagger]) -> None:
    serve(tagger(master, "slow"))
    serve(tagger(master, "fast"))
    with client_of(master, timeout=30) as client:
        wait_for(lambda: client.ping()["workers"] == 2, 10, "two workers")
        # The slow worker gets one 1 s job; meanwhile the fast one does the rest.
        jobs = [b"1.0"] + [b"0.01"] * 40
        by = Counter(client.job("slow", jobs))
    assert by[b"slow"] <= 2 and by[b"fast"] >= 39 and sum(by.values()) == 41


def test_workers_join_and_leave_mid_run(master: Master, serve: Callable[[Tagger], Tagger]) -> None:
    first = serve(tagger(master, "w1"))
    results: list[bytes] = []
    with client_of(master, timeout=20, max_in_flight=50) as client:
        jobs = iter([b"%d" % n for n in range(2000)])
        stream = client.job("who", jobs)
        results.extend(next(stream) for _ in range(200))
        second = serve(tagger(master, "w2"))
        results.extend(next(stream) for _ in range(500))
        first.stop()  # leaves cleanly: finishes what it holds
        results.extend(stream)
    payloads = Counter(result.split(b":")[1] for result in results)
    assert len(payloads) == 2000 and set(payloads.values()) == {1}
    by = Counter(result.split(b":")[0] for result in results)
    assert by[b"w1"] > 0 and by[b"w2"] > 0
    assert second.running


def test_sigkilled_worker_loses_no_job_and_no_result_comes_twice(
    pylm_etcd: LocalEtcd, pylm_cluster: str, pylm_registry: Registry, serve: Callable[..., object]
) -> None:
    master = serve(Master("m", registry=pylm_registry, heartbeat=BEAT, log_stdout=False))
    env = {**os.environ, "PYLM_REGISTRY": pylm_etcd.url, "PYLM_CLUSTER": pylm_cluster}
    script = str(HERE / "parallel_worker.py")
    # The doomed worker takes 10 ms a job and holds 4: when killed, it holds jobs. The
    # survivor takes 2 ms a job, so jobs are still waiting then (at full speed it
    # could finish all the others before the doomed worker had given 20 results).
    workers = [
        subprocess.Popen([sys.executable, script, name, "m", str(BEAT), "4", pause], env=env)
        for name, pause in (("doomed", "0.01"), ("survivor", "0.002"))
    ]
    try:
        results: list[bytes] = []
        with Client("m", registry=pylm_registry, timeout=30, max_in_flight=100) as client:
            wait_for(lambda: client.ping()["workers"] == 2, 20, "two worker processes")
            stream = client.job("who", [b"%d" % n for n in range(1000)])
            for result in stream:
                results.append(result)
                if sum(r.startswith(b"doomed:") for r in results) == 20:
                    workers[0].send_signal(signal.SIGKILL)  # holding up to 4 jobs
                    break
            results.extend(stream)
        payloads = Counter(result.split(b":")[1] for result in results)
        assert len(results) == 1000 and len(payloads) == 1000  # all, each once
        assert master.redispatched >= 1 and master.workers == 1
        assert workers[0].wait(10) == -signal.SIGKILL
    finally:
        for process in workers:
            process.kill()
            process.wait(10)


def test_scatter_and_gather_with_several_clients(serve: Callable[..., object]) -> None:
    master = serve(
        SumOfSquares(
            "m", "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", heartbeat=BEAT, log_stdout=False
        )
    )
    serve(tagger(master, "w1"))
    serve(tagger(master, "w2"))
    outcomes: dict[int, list[bytes]] = {}

    def run(number: int) -> None:
        with client_of(master, timeout=20) as client:
            jobs = [b",".join(b"%d" % n for n in range(k)) for k in range(1, 30)]
            outcomes[number] = list(client.job("square", jobs))
            assert list(client.stream("square", b"")) == []  # scattered into nothing

    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    expected = sorted(str(sum(n * n for n in range(k))).encode() for k in range(1, 30))
    assert len(outcomes) == 4
    for results in outcomes.values():
        assert sorted(results) == expected  # one sum per job, exactly
    assert master.sums == {}


def test_full_queue_holds_clients_within_its_bound(serve: Callable[..., object]) -> None:
    master = serve(
        Master(
            "m",
            "tcp://127.0.0.1:0",
            "tcp://127.0.0.1:0",
            heartbeat=BEAT,
            max_queued=50,
            log_stdout=False,
        )
    )
    results: list[bytes] = []
    with client_of(master, timeout=30, max_in_flight=5000) as client:
        done = threading.Event()

        def run() -> None:
            results.extend(client.job("who", [b"%d" % n for n in range(3000)]))
            done.set()

        thread = threading.Thread(target=run)
        thread.start()
        wait_for(lambda: master.queued == 50, 10, "a full queue")
        # No worker yet: it holds 50 and reads no more (the rest of a BATCH waits aside).
        assert master.queued == 50
        serve(tagger(master, "late"))
        assert done.wait(60)
        thread.join(10)
    assert len(set(results)) == 3000


def test_a_job_nobody_runs_times_out(master: Master) -> None:
    with client_of(master, timeout=0.3) as client:
        with pytest.raises(RequestTimeout, match="no result for job 0"):
            client.eval("who", b"x")


def test_master_exports_its_workers_and_jobs(
    master: Master, serve: Callable[[Tagger], Tagger]
) -> None:
    from prometheus_client import REGISTRY, generate_latest

    serve(tagger(master, "w1"))
    serve(tagger(master, "w2"))
    with client_of(master, timeout=10) as client:
        wait_for(lambda: client.ping()["workers"] == 2, 10, "two workers")
        assert len(list(client.job("who", [b"x"] * 50))) == 50
    text = generate_latest(REGISTRY).decode()
    assert 'pylm_workers{server="m"} 2.0' in text
    assert 'pylm_jobs_queued{server="m"} 0.0' in text
    assert 'pylm_jobs_redispatched_total{server="m"} 0.0' in text
    assert 'pylm_results_dropped_total{reason="duplicate",server="m"} 0.0' in text
    assert 'pylm_calls_total{function="who",outcome="ok",server="w1"}' in text


class StreamSums(Master):
    """Scatter ``b"2,3"`` into parts whose worker function streams
    (``count``: 0..n-1); gather every item into one sum per job."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.sums: dict[int, int] = {}

    def scatter(self, message: bytes) -> Iterable[bytes]:
        return message.split(b",")

    def gather(self, message: bytes) -> Iterable[bytes]:
        job = self.gathering.job
        self.sums[job] = self.sums.get(job, 0) + int(message)
        if self.gathering.last:
            yield b"%d" % self.sums.pop(job)


class Shout(Master):
    """Only gather: each result upper-cased, and an int now and then."""

    def gather(self, message: bytes) -> Iterable[bytes]:
        yield message.upper()


class BadScatter(Master):
    def scatter(self, message: bytes) -> Iterable[bytes]:
        return [1, 2]  # type: ignore[list-item]


def test_gather_knows_the_last_item_of_streaming_parts(serve: Callable[..., object]) -> None:
    master = serve(StreamSums("m", ANY, ANY, heartbeat=BEAT, log_stdout=False))
    serve(tagger(master, "w1"))
    serve(tagger(master, "w2"))
    with client_of(master, timeout=20) as client:
        jobs = [b"%d,%d,%d" % (n, n + 1, n % 3) for n in range(1, 30)]
        results = sorted(client.job("count", jobs))
    sums = [sum(range(n)) + sum(range(n + 1)) + sum(range(n % 3)) for n in range(1, 30)]
    assert results == sorted(b"%d" % total for total in sums)
    assert master.sums == {}


def test_gather_alone_and_hooks_that_give_no_bytes(serve: Callable[..., object]) -> None:
    shout = serve(Shout("m", ANY, ANY, heartbeat=BEAT, log_stdout=False))
    serve(tagger(shout, "w1"))
    with client_of(shout, timeout=10) as client:
        assert client.eval("who", b"x") == b"W1:X"
    bad = serve(BadScatter("b", ANY, ANY, heartbeat=BEAT, log_stdout=False))
    with client_of(bad, timeout=10) as client:
        with pytest.raises(RemoteError, match="scatter gave int, expected bytes"):
            client.eval("who", b"x")


def test_stop_with_a_full_queue_and_no_worker(serve: Callable[..., object]) -> None:
    master = Master("m", ANY, ANY, max_queued=5, log_stdout=False)
    master.start(background=True)
    try:
        with client_of(master, timeout=2) as client:
            outcomes = client.results("who", [b"x"] * 50)
            thread = threading.Thread(target=lambda: list(outcomes))
            thread.start()
            wait_for(lambda: master.queued == 5, 10, "a full queue")
            master.stop(timeout=5)  # stop's wake-up comes through the workers' socket
            assert not master.running
            thread.join(10)
    finally:
        master.stop()


def test_ping_while_running_jobs_is_refused(master: Master, serve: Callable[..., object]) -> None:
    serve(tagger(master, "w1"))
    with client_of(master, timeout=10) as client:
        stream = client.stream("count", b"3")
        assert next(stream) == b"0"
        with pytest.raises(RuntimeError, match="running jobs"):
            client.ping()
        assert list(stream) == [b"1", b"2"]


def test_a_client_that_stops_reading_holds_nobody_else_up(
    master: Master, serve: Callable[..., object]
) -> None:
    serve(tagger(master, "w1"))
    serve(tagger(master, "w2"))
    lazy = lazy_dealer(master.front)
    try:
        # A stream of 20,000 items of 1 KiB that nobody reads.
        lazy.send_multipart(protocol.encode(protocol.REQUEST, 1, b"20000", b"m.kib"))
        with client_of(master, timeout=10) as client:
            wait_for(lambda: bool(master._backlog), 10, "answers waiting for the lazy client")
            for n in range(20):
                assert client.eval("who", b"%d" % n).endswith(b":%d" % n)
        # The lazy client reads at last: it gets every item, then the END (the
        # time bound is for a failure only); items read together come in BATCHes.
        kinds: list[int] = []
        while len(kinds) < 20_001:
            assert lazy.poll(30_000), f"{len(kinds)} of 20,000 items and an END came"
            kinds += [protocol.decode([body]).kind for body in carried(lazy.recv_multipart())]
        assert kinds == [protocol.REPLY] * 20_000 + [protocol.END]
    finally:
        lazy.close()


def test_workers_come_back_to_a_restarted_master(serve: Callable[..., object]) -> None:
    first = Master("m", ANY, ANY, heartbeat=BEAT, log_stdout=False)
    first.start(background=True)
    try:
        front, back = first.front, first.back
        assert front is not None and back is not None
        serve(Tagger("w1", "m", back, heartbeat=BEAT, log_stdout=False))
        with Client(front, "m", timeout=10) as client:
            assert client.eval("who", b"before") == b"w1:before"
    finally:
        first.stop()  # returns once its ports are free again
    second = serve(Master("m", front, back, heartbeat=BEAT, log_stdout=False))
    # The worker's heartbeat reaches a master that does not know it: it says hello again.
    wait_for(lambda: second.workers == 1, 10, "the worker back")
    with Client(front, "m", timeout=10) as client:
        assert client.eval("who", b"after") == b"w1:after"


def test_a_worker_that_ends_by_its_messages_limit_says_goodbye(
    serve: Callable[..., object],
) -> None:
    master = serve(Master("m", ANY, ANY, heartbeat=30, log_stdout=False))
    assert master.back is not None
    brief = Tagger("brief", "m", master.back, messages=5, heartbeat=30, log_stdout=False)
    brief.start(background=True)
    try:
        with client_of(master, timeout=20, max_in_flight=1) as client:
            assert len(list(client.job("who", [b"x"] * 5))) == 5
            # Its goodbye, not 90 s of missed heartbeats, tells the master it left.
            wait_for(lambda: master.workers == 0, 5, "the worker gone")
            serve(Tagger("next", "m", master.back, heartbeat=30, log_stdout=False))
            assert client.eval("who", b"y") == b"next:y"
    finally:
        brief.stop()


def test_a_master_at_its_messages_limit_lets_its_last_answers_be_read(
    serve: Callable[..., object], raw_socket: Callable[[int], zmq.Socket]
) -> None:
    """A client set ZMQ_IMMEDIATE, as pylm's are, loses the answers it has
    not read yet when the connection drops: a master that ends at its
    messages limit keeps its socket open until its clients are quiet."""
    master = Master("m", ANY, ANY, heartbeat=BEAT, messages=3, log_stdout=False)
    master.start(background=True)
    try:
        assert master.back is not None and master.front is not None
        serve(Tagger("w1", "m", master.back, heartbeat=BEAT, log_stdout=False))
        wait_for(lambda: master.workers == 1, 10, "the worker")
        dealer = immediate_dealer(raw_socket, master.front)
        for number in range(3):
            dealer.send_multipart(protocol.encode(protocol.REQUEST, number, b"x", b"m.who"))
        wait_for(lambda: master.served == 3, 20, "three requests served")
        answers = [answer.payload for answer in read_answers(dealer, 3)]
        assert answers == [b"w1:x"] * 3
        wait_for(lambda: not master.running, 10, "the master ended")
    finally:
        master.stop()


def test_a_worker_whose_master_is_gone_gives_up_its_answers_and_can_stop(
    serve: Callable[..., object], caplog: pytest.LogCaptureFixture
) -> None:
    # A stream still running when its master goes fills the job socket's
    # queue; then its sends block. They give up after the send timeout.
    go_on = threading.Event()

    class Flood(Worker):
        def flood(self, message: bytes) -> Iterator[bytes]:
            yield b"first"
            go_on.wait(10)
            for _ in range(5000):  # more than the job socket's queue holds
                yield bytes(100)

    master = Master("m", ANY, ANY, heartbeat=BEAT, log_stdout=False)
    master.start(background=True)
    assert master.back is not None and master.front is not None
    worker = Flood("w", "m", master.back, heartbeat=BEAT, log_stdout=False)
    worker.start(background=True)
    try:
        with Client(master.front, "m", timeout=10) as client:
            assert next(iter(client.stream("flood", b"x"))) == b"first"
            master.stop()
            with caplog.at_level(logging.WARNING):
                go_on.set()
                wait_for(lambda: "is given up" in caplog.text, 10, "the answer given up")
    finally:
        worker.stop(timeout=10)  # its serving thread is not stuck in a send
    assert f"master at {master.back} took no answer" in caplog.text


def test_a_workers_wait_for_its_master_must_be_seconds() -> None:
    for bad in (-1, "10", True):
        with pytest.raises(ValueError, match="wait must be a non-negative number of seconds"):
            Tagger("w", "m", wait=bad, log_stdout=False)  # type: ignore[arg-type]
    assert Tagger("w", "m", wait=0, log_stdout=False).wait == 0.0
