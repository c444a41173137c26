"""Chained servers and LoopClient, over real sockets."""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq
from helpers import ANY, trickle

import pylm.chained.client
import pylm.chained.servers
import pylm.chained.to_clients
from pylm import protocol
from pylm.cache import CacheClient
from pylm.chained import JobResult, LastServer, LoopClient, Server
from pylm.errors import (
    PayloadTooLarge,
    RemoteError,
    RequestTimeout,
    UnknownFunction,
    UnknownKey,
    UnknownServer,
)
from pylm.registry import Registry
from pylm.standalone import Client
from pylm.testing import wait_for

Serve = Callable[[Any], Any]


class Step1(Server):
    def foo(self, message: bytes) -> bytes:
        return b"you sent me " + message

    def prefixed(self, message: bytes) -> bytes:
        return self.cache.get("prefix", b"") + message


class Step2(Server):
    def bar(self, message: bytes) -> bytes:
        if b"fail" in message:
            raise ValueError("step2 refuses " + message.decode())
        return b"got it too, after " + message


class Last(LastServer):
    def baz(self, message: bytes) -> bytes:
        if message.endswith(b"int"):
            return 42  # type: ignore[return-value]
        return b"ACK: " + message


class Pipeline:
    """step1 -> step2 (one or more instances) -> last, all started here."""

    def __init__(self, serve: Serve, step2_instances: int = 1, **kwargs: Any) -> None:
        options = {"log_stdout": False, **kwargs}
        self.last = serve(Last("last", ANY, ANY, ANY, **options))
        self.step2 = [
            serve(Tagged("step2", ANY, self.last.address, "last.baz", ANY, tag=i, **options))
            if step2_instances > 1
            else serve(Step2("step2", ANY, self.last.address, "last.baz", ANY, **options))
            for i in range(step2_instances)
        ]
        nexts = [stage.address for stage in self.step2]
        self.step1 = serve(Step1("step1", ANY, nexts, "step2.bar", ANY, **options))

    def client(self, **kwargs: Any) -> LoopClient:
        kwargs.setdefault("announce", False)
        return LoopClient(self.last.push, self.step1.address, self.step1.db, "step1", **kwargs)


class Tagged(Step2):
    def __init__(self, *args: Any, tag: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tag = tag

    def bar(self, message: bytes) -> bytes:
        return b"%d:" % self.tag + message


@pytest.fixture
def pipeline(serve: Serve) -> Pipeline:
    return Pipeline(serve)


def test_seed_example(pipeline: Pipeline) -> None:
    with pipeline.client() as client:
        assert list(client.job("foo", [b"a message"])) == [
            b"ACK: got it too, after you sent me a message"
        ]


def test_import_paths() -> None:
    assert pylm.chained.servers.Server is Server
    assert pylm.chained.servers.LastServer is LastServer
    assert pylm.chained.client.LoopClient is LoopClient


def test_client_announces_its_connections(
    pipeline: Pipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    client = LoopClient(pipeline.last.push, pipeline.step1.address, pipeline.step1.db, "step1")
    client.close()
    assert capsys.readouterr().out.splitlines() == [
        "Client with the following connections:",
        f" *Listening to input from {pipeline.last.push}",
        f" *Sending jobs to {pipeline.step1.address}",
    ]


def test_positional_2016_signatures(serve: Serve) -> None:
    last = serve(Last("last", ANY, ANY, ANY, None, None, None, logging.CRITICAL, 5))
    step1 = serve(Step1("step1", ANY, last.address, "last.baz", ANY, None, None, None, 30))
    with LoopClient(last.push, step1.address, step1.db, "step1", announce=False) as client:
        assert list(client.job("foo", [b"x"])) == [b"ACK: you sent me x"]
    assert last.messages == 5 and step1.logger.level == 30


def test_generator_of_many_jobs(pipeline: Pipeline) -> None:
    def payloads() -> Iterator[bytes]:
        for i in range(3000):
            yield b"%d" % i

    with pipeline.client() as client:
        results = list(client.job("foo", payloads()))
    assert sorted(results) == sorted(
        b"ACK: got it too, after you sent me %d" % i for i in range(3000)
    )


def test_a_slow_payload_source_gets_its_results_as_they_come(pipeline: Pipeline) -> None:
    """A source that yields a payload every 0.1 s for 1.5 s, with a 1 s job
    timeout: each job is answered in milliseconds, so none may time out, and
    results come out while the source still runs (job() reads what came back
    between payloads)."""
    source_done = threading.Event()
    source = trickle(15, 0.1, source_done)
    with pipeline.client() as client:
        outcomes = [
            (r.error, source_done.is_set()) for r in client.results("foo", source, timeout=1)
        ]
    assert [error for error, _ in outcomes] == [None] * 15
    assert not outcomes[0][1], "no result came out before the source ended"


def test_many_clients_in_threads_get_exactly_their_own(pipeline: Pipeline) -> None:
    clients, jobs = 6, 500
    outcomes: dict[int, list[bytes]] = {}

    def run(number: int) -> None:
        with pipeline.client() as client:
            outcomes[number] = list(
                client.job("foo", (b"c%d-%d" % (number, i) for i in range(jobs)))
            )

    threads = [threading.Thread(target=run, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for number in range(clients):
        expected = {b"ACK: got it too, after you sent me c%d-%d" % (number, i) for i in range(jobs)}
        assert len(outcomes[number]) == jobs
        assert set(outcomes[number]) == expected


def _client_process(addresses: tuple[str, str, str], number: int, jobs: int, out: Any) -> None:
    push, pull, db = addresses
    with LoopClient(push, pull, db, "step1", announce=False) as client:
        out.put((number, sorted(client.job("foo", (b"p%d-%d" % (number, i) for i in range(jobs))))))


def test_many_clients_in_processes(pipeline: Pipeline) -> None:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    addresses = (pipeline.last.push, pipeline.step1.address, pipeline.step1.db)
    processes = [
        context.Process(target=_client_process, args=(addresses, n, 300, out)) for n in range(3)
    ]
    for process in processes:
        process.start()
    try:
        got = dict(out.get(timeout=60) for _ in processes)
    finally:
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join()
    for number in range(3):
        assert got[number] == sorted(
            b"ACK: got it too, after you sent me p%d-%d" % (number, i) for i in range(300)
        )


def test_several_instances_of_a_stage_share_the_load(serve: Serve) -> None:
    pipeline = Pipeline(serve, step2_instances=2)
    with pipeline.client() as client:
        results = list(client.job("foo", (b"%d" % i for i in range(400))))
    assert len(results) == 400
    by_instance = {tag: [r for r in results if r.startswith(b"ACK: %d:" % tag)] for tag in (0, 1)}
    assert len(by_instance[0]) > 50 and len(by_instance[1]) > 50
    assert {r.split(b"you sent me ")[1] for r in results} == {b"%d" % i for i in range(400)}


def test_errors_anywhere_reach_the_job_that_caused_them(pipeline: Pipeline) -> None:
    payloads = [b"ok1", b"fail here", b"ok2", b"make it int"]
    with pipeline.client() as client:
        outcomes = sorted(client.results("foo", payloads), key=lambda r: r.index)
        assert [o.index for o in outcomes] == [0, 1, 2, 3]
        assert outcomes[0].value == b"ACK: got it too, after you sent me ok1"
        assert isinstance(outcomes[1].error, RemoteError)
        assert outcomes[1].error.remote_type == "ValueError"
        assert outcomes[1].error.server == "step2" and "step2 refuses" in str(outcomes[1].error)
        assert outcomes[2].value == b"ACK: got it too, after you sent me ok2"
        assert isinstance(outcomes[3].error, RemoteError)
        assert "returned int, expected bytes" in str(outcomes[3].error)
        (unknown,) = client.results("nope", [b"x"])
        assert isinstance(unknown.error, UnknownFunction)
        assert unknown.error.server == "step1" and unknown.error.function == "nope"
        with pytest.raises(RemoteError, match="step2 refuses"):
            list(client.job("foo", [b"fail"]))
        # The pipeline keeps flowing, for this client too.
        assert list(client.job("foo", [b"after"])) == [b"ACK: got it too, after you sent me after"]


def test_job_timeout_then_client_usable(serve: Serve) -> None:
    release = threading.Event()

    class Slow(LastServer):
        def baz(self, message: bytes) -> bytes:
            if message == b"slow":
                release.wait(10)
            return message

    last = serve(Slow("last", ANY, ANY, ANY, log_stdout=False))
    step1 = serve(Step1("step1", ANY, last.address, "last.baz", ANY, log_stdout=False))
    with LoopClient(last.push, step1.address, step1.db, "step1", announce=False) as client:
        (outcome,) = client.results("prefixed", [b"slow"], timeout=0.3)
        assert isinstance(outcome.error, RequestTimeout)
        assert "no result for job 0" in str(outcome.error)
        with pytest.raises(RequestTimeout):
            list(client.job("prefixed", [b"slow"], timeout=0.3))
        release.set()
        assert list(client.job("prefixed", [b"fast"])) == [b"fast"]
        assert client.dropped <= 2  # the late results of the jobs that timed out


def test_cache_set_get_delete(pipeline: Pipeline) -> None:
    with pipeline.client() as client:
        key = client.set(b"value")
        assert isinstance(key, str) and client.get(key) == b"value"
        assert client.set(b">> ", "prefix") == "prefix"
        # The server's functions see the same cache.
        assert list(client.job("prefixed", [b"x"])) == [b"ACK: got it too, after >> x"]
        client.delete(key)
        with pytest.raises(UnknownKey, match=r"no key '.*' in the cache of server 'step1'") as info:
            client.get(key)
        assert isinstance(info.value, KeyError) and info.value.key == key
        with pytest.raises(UnknownKey):
            client.delete(key)
        assert client.get("prefix") == b">> "  # still serving


def test_bad_input_on_the_pipe_is_dropped(
    pipeline: Pipeline, raw_socket: Callable[[int], zmq.Socket]
) -> None:
    vandal = raw_socket(zmq.PUSH)
    vandal.connect(pipeline.step1.address)
    vandal.send(b"garbage")
    vandal.send_multipart(protocol.encode(protocol.REQUEST, 1, b"x", b"step1.foo"))  # no route
    vandal.send_multipart(protocol.encode(protocol.REPLY, 2, b"x", route=b"nobody"))
    with pipeline.client() as client:
        assert list(client.job("foo", [b"fine"])) == [b"ACK: got it too, after you sent me fine"]


def test_junk_on_the_cache_port_holds_nothing_up(
    pipeline: Pipeline, raw_socket: Callable[[int], zmq.Socket]
) -> None:
    """Frames without a REQ's envelope, or not pylm, on a stage's cache port
    are dropped and counted (a REP socket there once froze the stage), and
    the cache limits what others may store in it."""
    vandal = raw_socket(zmq.DEALER)
    vandal.connect(pipeline.step1.db)
    vandal.send(b"one junk frame, no delimiter")
    vandal.send_multipart([b"", b"not pylm"])
    vandal.send_multipart([b"", b""])  # a delimiter, then nothing
    with pipeline.client(timeout=5) as client:
        assert list(client.job("foo", [b"fine"])) == [b"ACK: got it too, after you sent me fine"]
        assert client.set(b"value", "k") == "k"
    stats = pipeline.step1.stats
    assert stats.malformed_by["envelope"] == 1 and stats.malformed_by["head"] == 2
    pipeline.step1.cache.limit = 400  # "k": b"value" takes 6 bytes and an entry's 160
    with CacheClient(pipeline.step1.db, "step1", timeout=5) as cache:
        with pytest.raises(PayloadTooLarge, match="holds 166 bytes: 200 more"):
            cache.set(b"x" * 200, "big")
        assert cache.get("k") == b"value"


def test_a_client_that_does_not_read_holds_no_other_up(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Results for a client that reads none fill its queue, then its share of
    the last stage's backlog; past it they are dropped and counted, and the
    stage serves the other clients at once: it never waits for one. (A
    backlog of 4,000 messages here, for a test of a few MB: the results of
    the jobs it finds waiting go on 8 to a message.)"""
    monkeypatch.setattr(pylm.chained.to_clients, "MAX_BACKLOG", 4000)
    pipeline = Pipeline(serve)
    deaf = zmq.Context.instance().socket(zmq.DEALER)
    deaf.setsockopt(zmq.LINGER, 0)
    deaf.setsockopt(zmq.RCVHWM, 1)
    deaf.setsockopt(zmq.RCVBUF, 4096)
    deaf.setsockopt(zmq.ROUTING_ID, b"deaf")
    deaf.connect(pipeline.last.push)
    pusher = zmq.Context.instance().socket(zmq.PUSH)
    pusher.setsockopt(zmq.LINGER, 0)
    pusher.setsockopt(zmq.SNDHWM, 0)
    pusher.connect(pipeline.last.address)
    stats = pipeline.last.stats
    assert stats is not None
    jobs = 8 * 1000 + 8000  # its share of the backlog (1,000 messages of 8), and more
    try:
        deaf.send_multipart(protocol.encode(protocol.PING, 1))  # connected: results go to it
        for i in range(jobs):
            job = protocol.encode(protocol.REQUEST, i, b"." * 1024, b"last.baz", b"deaf")
            pusher.send_multipart(job)
        wait_for(lambda: stats.undeliverable > 0, 30, "results for the deaf client dropped")
        with pipeline.client(timeout=5) as client:
            assert list(client.job("foo", [b"fine"])) == [
                b"ACK: got it too, after you sent me fine"
            ]
        # Every job read (and its result kept or dropped) before the deaf client goes.
        wait_for(lambda: stats.received >= jobs, 30, "every job read by the last stage")
    finally:
        deaf.close()
        pusher.close()


def test_slow_stage_bounds_what_the_producer_sends(serve: Serve) -> None:
    """A slow last stage holds the pipeline back: the client pulls only as
    many payloads ahead of it as the sockets' high-water marks (and kernel
    buffers) hold. The last stage runs one job per token; at each of 200
    tokens, given one at a time once the last was used, the producer is at
    most a bounded count ahead (no quiet gap is taken for a verdict)."""
    tokens, release = threading.Semaphore(0), threading.Event()

    class Slow(LastServer):
        def baz(self, message: bytes) -> bytes:
            if not release.is_set():
                tokens.acquire(timeout=30)
            return b"ok"

    last = serve(Slow("last", ANY, ANY, ANY, log_stdout=False, hwm=4))
    step1 = serve(Step1("step1", ANY, last.address, "last.baz", ANY, log_stdout=False, hwm=4))
    total, pulled = 2000, [0]
    big = b"x" * 65536

    def payloads() -> Iterator[bytes]:
        for _ in range(total):
            pulled[0] += 1
            yield big

    results: list[bytes] = []
    client = LoopClient(
        last.push,
        step1.address,
        step1.db,
        "step1",
        announce=False,
        timeout=60,
        max_in_flight=total,
        hwm=4,
    )
    thread = threading.Thread(target=lambda: results.extend(client.job("foo", payloads())))
    thread.start()
    ahead = []
    try:
        for step in range(200):
            ahead.append(pulled[0] - last.served)
            tokens.release()
            wait_for(lambda step=step: last.served > step, 30, f"job {step} through")
        ahead.append(pulled[0] - last.served)
    finally:
        release.set()
        tokens.release(total)
        thread.join(60)
        client.close()
    # 64 KiB payloads: 1,000 of them are far more than what the sockets and
    # the kernel's buffers hold (a few hundred at most, observed: ~100).
    assert max(ahead) < total // 2, ahead
    assert len(results) == total


def test_result_for_unknown_client_is_dropped_not_fatal(
    pipeline: Pipeline, raw_socket: Callable[[int], zmq.Socket]
) -> None:
    pusher = raw_socket(zmq.PUSH)
    pusher.connect(pipeline.step1.address)
    pusher.send_multipart(protocol.encode(protocol.REQUEST, 9, b"x", b"step1.foo", b"gone"))
    with pipeline.client() as client:
        assert list(client.job("foo", [b"y"])) == [b"ACK: got it too, after you sent me y"]


def test_job_result_fields() -> None:
    result = JobResult(3, b"v", None)
    assert (result.index, result.value, result.error) == (3, b"v", None)


def test_debug_log_lines(serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    last = serve(Last("last", ANY, ANY, ANY, log_stdout=False))
    step1 = serve(Step1("debug_step1", ANY, last.address, "last.baz", ANY, log_level=logging.DEBUG))
    with LoopClient(last.push, step1.address, step1.db, "debug_step1", announce=False) as client:
        assert list(client.job("foo", [b"x"])) == [b"ACK: you sent me x"]
    step1.stop()
    lines = [line.split(" - ", 3)[-1] for line in capsys.readouterr().out.splitlines()]
    assert "debug_step1 Waiting for a message" in lines
    assert "debug_step1 Got a message" in lines
    assert "Looking for foo" in lines


def test_stop_while_downstream_is_full(serve: Serve, free_tcp_address: str) -> None:
    """Nobody reads the next stage's address: the stage waits to send, and
    still stops at once when asked."""
    stage = Step1("step1", ANY, free_tcp_address, "step2.bar", ANY, log_stdout=False, hwm=2)
    stage.start(background=True)
    try:
        pusher = zmq.Context.instance().socket(zmq.PUSH)
        pusher.setsockopt(zmq.LINGER, 0)
        pusher.connect(stage.address)
        for i in range(20):
            pusher.send_multipart(protocol.encode(protocol.REQUEST, i, b"x", b"step1.foo", b"r"))
        pusher.close()
        # The cache still answers while the stage waits for room downstream.
        with CacheClient(stage.db, "step1", timeout=5) as cache:
            assert cache.set(b"v", "k") == "k"
        stage.stop(timeout=5)  # a TimeoutError if it waited on the full socket
        assert not stage.running
    finally:
        stage.stop()


def test_stop_while_waiting_on_a_full_next_stage_loses_no_result(
    free_tcp_address: str, pylm_registry: Registry, raw_socket: Callable[[int], zmq.Socket]
) -> None:
    """A stage found by name hears stop() while it waits for room to send
    (its next stage not up yet): it sends on what it holds once the next
    stage takes it, then drains and leaves; no job is lost."""
    stage = Step1(
        "step1", ANY, free_tcp_address, "step2.bar", ANY, registry=pylm_registry,
        log_stdout=False, hwm=2,
    )  # fmt: skip
    stage.start(background=True)
    stopping = threading.Thread(target=stage.stop)
    try:
        pusher = raw_socket(zmq.PUSH)
        pusher.connect(stage.address)
        for i in range(20):
            pusher.send_multipart(protocol.encode(protocol.REQUEST, i, b"x", b"step1.foo", b"r"))
        wait_for(lambda: stage.served >= 1, 10, "a job served: its result waits for room")
        stopping.start()
        wait_for(lambda: stage._stop_heard, 10, "stop() heard while waiting for room")
        puller = raw_socket(zmq.PULL)
        puller.bind(free_tcp_address)  # the next stage, up at last
        ids: list[int] = []
        while len(ids) < 20:
            assert puller.poll(10_000), f"results so far: {sorted(ids)}"
            body = puller.recv()
            batch = body[protocol.LEAD] == protocol.BATCH_PREFIX
            bodies = protocol.unpack_batch(body) if batch else [body]
            ids += [protocol.decode([one]).msg_id for one in bodies]
        assert sorted(ids) == list(range(20))
        stopping.join(20)
        assert not stage.running
    finally:
        stage.stop()
        if stopping.is_alive():
            stopping.join(20)


def test_cache_client_and_ping(pipeline: Pipeline) -> None:
    with CacheClient(pipeline.last.db, "last") as cache:
        key = cache.set(b"\x00binary\xff")
        assert cache.get(key) == b"\x00binary\xff"
        with pytest.raises(TypeError, match="cache key must be a str"):
            cache.get(b"bytes key")  # type: ignore[arg-type]
    with Client(pipeline.last.db, "last") as client:
        assert client.ping()["name"] == "last"
        with pytest.raises(UnknownFunction, match="unknown cache function 'foo'"):
            client.job("foo", b"x")
    with Client(pipeline.last.db, "other") as client:
        with pytest.raises(UnknownServer):
            client.job("get", b"k")


def test_several_last_stages(serve: Serve) -> None:
    lasts = [serve(Last("last", ANY, ANY, ANY, log_stdout=False)) for _ in range(2)]
    step1 = serve(
        Step1("step1", ANY, [last.address for last in lasts], "last.baz", ANY, log_stdout=False)
    )
    pushes = [last.push for last in lasts]
    with LoopClient(pushes, step1.address, step1.db, "step1", announce=False) as client:
        results = list(client.job("foo", (b"%d" % i for i in range(200))))
    assert sorted(results) == sorted(b"ACK: you sent me %d" % i for i in range(200))
    assert all(last.served > 20 for last in lasts)


def test_one_run_at_a_time_per_client(pipeline: Pipeline) -> None:
    with pipeline.client() as client:
        first = client.job("foo", [b"a", b"b"])
        next(first)
        with pytest.raises(RuntimeError, match="already running jobs"):
            list(client.job("foo", [b"x"]))
        assert len(list(first)) == 1
        assert list(client.job("foo", [b"c"])) == [b"ACK: got it too, after you sent me c"]


def test_last_stage_keeps_results_for_a_client_connecting_late(serve: Serve) -> None:
    """A job reaches the last stage before its client is connected there (a
    client that found a new instance in the registry a moment later): the
    result waits, and goes out once the client says hello."""
    last = serve(Last("last", ANY, ANY, ANY, log_stdout=False))
    context = zmq.Context.instance()
    route = b"pylm-late-client"
    with context.socket(zmq.PUSH) as jobs, context.socket(zmq.DEALER) as results:
        jobs.connect(last.address)
        jobs.send_multipart(protocol.encode(protocol.REQUEST, 7, b"x", b"last.baz", route))
        deadline = time.monotonic() + 10
        while last.served < 1:  # the job was run; its result has nowhere to go yet
            assert time.monotonic() < deadline, "the last stage never ran the job"
            time.sleep(0.01)
        results.setsockopt(zmq.ROUTING_ID, route)
        results.connect(last.push)
        results.send_multipart(protocol.encode(protocol.PING, 8))
        answers = []
        for _ in range(2):
            assert results.poll(10_000), "no answer from the last stage"
            answers.append(protocol.decode(results.recv_multipart()))
    assert [(a.kind, a.msg_id) for a in answers] == [(protocol.PONG, 8), (protocol.REPLY, 7)]
    assert answers[1].payload == b"ACK: x"


@pytest.mark.parametrize("batch", [2, 64])
def test_batches_of_jobs_come_back_whole_and_in_their_own_client(serve: Serve, batch: int) -> None:
    pipeline = Pipeline(serve)
    big = b"B" * (protocol.SPLIT_PAYLOAD + 10)  # too large for a batch: travels alone
    payloads = [b"%d" % i for i in range(500)] + [big, b"after", b"fail", b"int"]
    with pipeline.client(announce=False, batch=batch) as client:
        with pipeline.client(announce=False, batch=batch) as other:
            theirs = list(other.job("foo", [b"x"] * 100))
        outcomes = list(client.results("foo", payloads))
    assert theirs == [b"ACK: got it too, after you sent me x"] * 100
    values = {o.index: o.value for o in outcomes if o.error is None}
    errors = {o.index: o.error for o in outcomes if o.error is not None}
    assert len(outcomes) == len(payloads)
    done = b"ACK: got it too, after you sent me "
    assert [values[i] for i in range(500)] == [done + b"%d" % i for i in range(500)]
    assert values[500] == done + big and values[501] == done + b"after"
    assert set(errors) == {502, 503}  # errors inside a batch stay with their jobs
    assert "step2 refuses you sent me fail" in str(errors[502])  # failed in a middle stage
    assert "returned int, expected bytes" in str(errors[503])  # failed in the last stage


def test_a_corrupt_batch_is_dropped_and_the_stage_serves_on(serve: Serve) -> None:
    last = serve(Last("last", ANY, ANY, ANY, log_stdout=False))
    step1 = serve(Step1("step1", ANY, last.address, "last.baz", ANY, log_stdout=False))
    with zmq.Context.instance().socket(zmq.PUSH) as vandal:
        vandal.connect(step1.address)
        vandal.send(protocol.BATCH_HEAD + b"\x00\x00\x10\x00short")  # a length past the end
    with LoopClient(last.push, step1.address, step1.db, "step1", announce=False, batch=8) as client:
        assert list(client.job("foo", [b"a", b"b"])) == [
            b"ACK: you sent me a",
            b"ACK: you sent me b",
        ]


def test_batch_protocol_round_trip() -> None:
    messages = [b"one", b"", b"three" * 100]
    assert protocol.unpack_batch(protocol.pack_batch(messages)) == messages
    assert protocol.decode([protocol.pack_batch(messages)]).kind == protocol.BATCH
    with pytest.raises(ValueError, match="batch must be an int from 1 to 1024"):
        LoopClient(ANY, ANY, ANY, "x", batch=0)


def test_a_client_that_stops_reading_holds_no_other_client_up() -> None:
    import zmq as _zmq

    from pylm import protocol as _protocol

    class Echo(LastServer):
        def echo(self, message: bytes) -> bytes:
            return message

    with Echo("last", "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", "tcp://127.0.0.1:0",
              log_stdout=False) as last:  # fmt: skip
        assert last.address is not None and last.push is not None and last.db is not None
        route = b"lazy-client"
        lazy = _zmq.Context.instance().socket(_zmq.DEALER)
        lazy.setsockopt(_zmq.ROUTING_ID, route)
        lazy.setsockopt(_zmq.RCVHWM, 10)
        lazy.setsockopt(_zmq.RCVBUF, 4096)
        lazy.setsockopt(_zmq.LINGER, 0)
        lazy.connect(last.push)
        jobs = _zmq.Context.instance().socket(_zmq.PUSH)
        jobs.setsockopt(_zmq.LINGER, 0)
        jobs.connect(last.address)
        try:
            lazy.send_multipart(_protocol.encode(_protocol.PING, 1))
            assert lazy.poll(5000)
            lazy.recv_multipart()  # greeted: results have a way back
            for n in range(20_000):  # 1 KiB results it does not read
                jobs.send_multipart(
                    _protocol.encode(_protocol.REQUEST, n + 2, bytes(1024), b"last.echo", route)
                )
            with LoopClient(last.push, last.address, last.db, "last", announce=False,
                            timeout=10) as client:  # fmt: skip
                for n in range(20):
                    assert list(client.job("echo", [b"%d" % n])) == [b"%d" % n]
            # The lazy client reads at last: every one of its 20,000 results is
            # there, in order (the time bound is for a failure only); the
            # results of jobs read in a row came together, in BATCHes.
            ids: list[int] = []
            while len(ids) < 20_000:
                assert lazy.poll(30_000), f"{len(ids)} of 20,000 results came"
                frames = lazy.recv_multipart()
                if frames[0][_protocol.LEAD] == _protocol.BATCH_PREFIX:
                    bodies = _protocol.unpack_batch(frames[0])
                    ids += [_protocol.decode([body]).msg_id for body in bodies]
                else:
                    ids.append(_protocol.decode(frames).msg_id)
            assert ids == list(range(2, 20_002))
        finally:
            lazy.close()
            jobs.close()
