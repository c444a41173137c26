"""Batching on by default, with no added wait: the jobs a LoopClient or a
parallel Client has ready go out together, a job alone goes alone, a stage
sends the results of the jobs waiting in its input on together, and a master
sends a client the results it read together in one message. Real sockets:
raw ZeroMQ sockets stand in for the peers of the stage, client or master
under test, to see the messages themselves."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq
from helpers import (
    ANY,
    answer_greeting,
    carried,
    immediate_dealer,
    raw_pipeline_ends,
    read_answers,
)

from pylm import protocol
from pylm.chained import LoopClient, Server
from pylm.parallel import Client, Hub, Master, Worker
from pylm.parallel.hello import hello
from pylm.testing import wait_for

pytestmark = pytest.mark.timeout(60)

RawSocket = Callable[[int], zmq.Socket]


def a_first_stage(raw_socket: RawSocket, **options: object) -> tuple[zmq.Socket, LoopClient]:
    """A raw first stage and a LoopClient (its jobs time out: nothing answers
    them); the raw last stage answers the client's greeting."""
    first, last, client = raw_pipeline_ends(raw_socket, timeout=0.5, retry=False, **options)
    threading.Thread(target=answer_greeting, args=(last,), daemon=True).start()
    return first, client


def a_raw_master(raw_socket: RawSocket, **options: object) -> tuple[zmq.Socket, Client]:
    """A raw ROUTER as a master's front, and a parallel Client to it (its
    jobs time out: nothing answers them)."""
    front = raw_socket(zmq.ROUTER)
    port = front.bind_to_random_port("tcp://127.0.0.1")
    return front, Client(f"tcp://127.0.0.1:{port}", "m", timeout=0.5, **options)  # type: ignore[arg-type]


CLIENTS = ("LoopClient", "parallel Client")


def a_client(
    kind: str, raw_socket: RawSocket, **options: object
) -> tuple[LoopClient | Client, Callable[[list[bytes]], list[list[bytes]]]]:
    """A client of ``kind`` to raw peers, and how to run payloads through it
    (they time out: nothing answers) and get the messages its first peer
    (the first stage, or the master) received, without routing ids."""
    client: LoopClient | Client
    if kind == "LoopClient":
        peer, client = a_first_stage(raw_socket, **options)
        skip = 0
    else:
        peer, client = a_raw_master(raw_socket, **options)
        skip = 1  # the ROUTER's routing id frame

    def sent(payloads: list[bytes]) -> list[list[bytes]]:
        outcomes = list(client.results("f", payloads))
        assert all(outcome.error is not None for outcome in outcomes)
        messages = []
        while peer.poll(0):
            messages.append(peer.recv_multipart()[skip:])
        return messages

    return client, sent


@pytest.mark.parametrize("kind", CLIENTS)
def test_jobs_ready_at_once_go_together_and_a_job_alone_goes_alone(
    kind: str, raw_socket: RawSocket
) -> None:
    client, sent = a_client(kind, raw_socket)
    with client:
        messages = sent([b"%d" % n for n in range(100)])
        jobs = [job for message in messages for job in carried(message)]
        assert sorted(protocol.decode([job]).payload for job in jobs) == sorted(
            b"%d" % n for n in range(100)
        )
        assert len(messages) == 2  # 64 and 36: the default cap
        (alone,) = sent([b"alone"])
        assert alone[0][protocol.LEAD] != protocol.BATCH_PREFIX  # one job: a plain REQUEST
        assert protocol.decode(alone).payload == b"alone"


@pytest.mark.parametrize("kind", CLIENTS)
def test_batches_hold_8_kib_of_payloads_at_most(kind: str, raw_socket: RawSocket) -> None:
    client, sent = a_client(kind, raw_socket)
    with client:
        messages = sent([bytes(3000)] * 9 + [bytes(100_000)])  # two fit in 8 KiB, not three
        assert [len(carried(message)) for message in messages[:-1]] == [2, 2, 2, 2, 1]
        assert protocol.decode(messages[-1]).payload == bytes(100_000)  # a large one: alone


@pytest.mark.parametrize("kind", CLIENTS)
def test_batch_1_sends_one_job_per_message(kind: str, raw_socket: RawSocket) -> None:
    client, sent = a_client(kind, raw_socket, batch=1)
    with client:
        messages = sent([b"%d" % n for n in range(20)])
        assert len(messages) == 20
        assert all(message[0][protocol.LEAD] != protocol.BATCH_PREFIX for message in messages)
    with pytest.raises(ValueError, match="batch must be an int from 1 to 1024, got 0"):
        a_client(kind, raw_socket, batch=0)


def test_once_the_payload_source_waits_each_job_leaves_before_the_next_is_taken(
    raw_socket: RawSocket,
) -> None:
    """An iterable that waits between items (here 10 ms, as a queue would):
    the message being filled goes as soon as the wait ends, and from then on
    each job reaches the first stage before the iterable is asked for the
    next one."""
    first, client = a_first_stage(raw_socket)
    got: list[list[bytes]] = []

    def source() -> Iterator[bytes]:
        yield b"0"
        threading.Event().wait(0.01)  # the iterable waits (what is under test, not a sync)
        yield b"1"
        for n in range(2, 6):
            assert first.poll(5_000), f"job {n - 1} held back"
            got.append(carried(first.recv_multipart()))
            yield b"%d" % n

    with client:
        outcomes = list(client.results("f", source()))
    assert len(outcomes) == 6
    payloads = [[protocol.decode([job]).payload for job in message] for message in got]
    assert payloads == [[b"0", b"1"], [b"2"], [b"3"], [b"4"]]


def read_together(socket: zmq.Socket, count: int) -> tuple[list[protocol.Message], int]:
    """The next ``count`` one-frame messages on ``socket``, those of a BATCH
    one by one, decoded, and how many messages carried them."""
    results: list[protocol.Message] = []
    messages = 0
    while len(results) < count:
        assert socket.poll(10_000), f"{len(results)} of {count} results"
        results += [protocol.decode([body]) for body in carried(socket.recv_multipart())]
        messages += 1
    return results, messages


class Held(Server):
    """Its first job waits until the test opens the gate; the rest do not."""

    gate = threading.Event()
    started = threading.Event()

    def f(self, message: bytes) -> bytes:
        if message == b"first":
            self.started.set()
            assert self.gate.wait(30)
        return message


def test_a_stage_sends_the_results_of_the_jobs_waiting_in_its_input_on_together(
    raw_socket: RawSocket, serve: Callable[[Held], Held]
) -> None:
    """50 one-job messages wait in a stage's input while it runs a first,
    held job; once it ends, the stage reads them in a row and sends their
    results on together (fewer messages than jobs), each result once."""
    Held.gate, Held.started = threading.Event(), threading.Event()
    after = raw_socket(zmq.PULL)
    port = after.bind_to_random_port("tcp://127.0.0.1")
    stage = serve(Held("held", ANY, f"tcp://127.0.0.1:{port}", "next.g", ANY, log_stdout=False))
    jobs = raw_socket(zmq.PUSH)
    jobs.connect(stage.address)
    for n, payload in enumerate([b"first", *(b"%d" % n for n in range(50))]):
        jobs.send_multipart(protocol.encode(protocol.REQUEST, n + 1, payload, b"held.f", b"route"))
    assert Held.started.wait(20)  # the others were sent before it: they wait in its input
    Held.gate.set()
    results, messages = read_together(after, 51)
    assert sorted(result.payload for result in results) == sorted(
        [b"first", *(b"%d" % n for n in range(50))]
    )
    assert messages < 51


class Grows(Server):
    """Answers a job with as many bytes as it asks for; a job ``hold``
    waits until the test opens the gate."""

    gate = threading.Event()

    def grow(self, message: bytes) -> bytes:
        if message == b"hold":
            assert self.gate.wait(30)
            return b"held"
        return b"r" * int(message)


@pytest.mark.parametrize("form", ["one BATCH", "one-job messages read in a row"])
def test_a_stage_passes_results_on_in_the_jobs_order_8_kib_of_payloads_a_message(
    raw_socket: RawSocket, serve: Callable[[Grows], Grows], form: str
) -> None:
    """Jobs whose results are larger than they are: the stage sends the
    results on in the jobs' order, at most 8 KiB of payloads in a BATCH (a
    larger result alone), never one huge message; whether the jobs came in
    one BATCH or waited in its input one message each."""
    Grows.gate = threading.Event()
    after = raw_socket(zmq.PULL)
    port = after.bind_to_random_port("tcp://127.0.0.1")
    stage = serve(Grows("grows", ANY, f"tcp://127.0.0.1:{port}", "next.g", ANY, log_stdout=False))
    sizes = [100, 20_000, 100, 100, *[3_000] * 5, 100, 200_000, *[10] * 20, 9_000]
    asked = [b"hold", *(b"%d" % size for size in sizes)]
    bodies = [
        protocol.encode(protocol.REQUEST, n, payload, b"grows.grow", b"route")[0]
        for n, payload in enumerate(asked)
    ]
    jobs = raw_socket(zmq.PUSH)
    jobs.connect(stage.address)
    jobs.send(bodies[0])  # held: the others wait in the stage's input meanwhile
    if form == "one BATCH":
        jobs.send(protocol.pack_batch(bodies[1:]))
    else:
        for body in bodies[1:]:
            jobs.send(body)
    wait_for(lambda: stage.served >= 1, 20, "the held job running")
    Grows.gate.set()
    results: list[protocol.Message] = []
    while len(results) < len(asked):
        assert after.poll(10_000), f"{len(results)} of {len(asked)} results"
        carried_now = [protocol.decode([body]) for body in carried(after.recv_multipart())]
        payloads = [len(message.payload) for message in carried_now]
        assert len(carried_now) == 1 or sum(payloads) <= protocol.BATCH_BYTES
        results += carried_now
    assert [message.msg_id for message in results] == list(range(len(asked)))
    assert [len(message.payload) for message in results] == [4, *sizes]


# ------------------------------------------------------------------ master and workers


class Doubler(Worker):
    def double(self, message: bytes) -> bytes:
        return message * 2


def test_a_master_runs_each_job_of_a_batch_and_answers_it_once(
    raw_socket: RawSocket, serve: Callable[[Any], Any]
) -> None:
    """A raw client sends a master ten jobs in one BATCH: each is run and
    answered once, with its own id; a malformed BATCH is dropped and
    counted, and the master serves on."""
    master = serve(Master("m", ANY, ANY, log_stdout=False))
    serve(Doubler("w", "m", master.back, log_stdout=False))
    dealer = immediate_dealer(raw_socket, master.front)
    jobs = [
        protocol.encode(protocol.REQUEST, n, b"%d" % n, b"m.double", deadline=time.time() + 30)[0]
        for n in range(1, 11)
    ]
    dealer.send(protocol.pack_batch(jobs))
    answers: dict[int, bytes] = {}
    while len(answers) < 10:
        assert dealer.poll(10_000), f"answers: {answers}"
        for body in carried(dealer.recv_multipart()):
            message = protocol.decode([body])
            assert message.msg_id not in answers
            answers[message.msg_id] = protocol.result_of(message)
    assert answers == {n: b"%d" % n * 2 for n in range(1, 11)}
    dealer.send(protocol.BATCH_HEAD + b"\x00\x00\x00\x09short")  # a length past its end
    dealer.send(jobs[0])
    (answer,) = read_answers(dealer, 1)
    assert (answer.msg_id, answer.payload) == (1, b"11")
    assert master.stats.malformed == 1


def test_a_master_batches_the_jobs_of_a_worker_and_a_clients_results(
    raw_socket: RawSocket, serve: Callable[[Any], Any]
) -> None:
    """A client's 50 jobs, come in one BATCH, go to a raw worker with 50
    free slots in one BATCH; the worker answers 25 in a BATCH and 25 one by
    one, in a burst: the client gets each result once, those the master
    read together in one message (fewer messages than results)."""
    master = serve(Master("m", ANY, ANY, log_stdout=False))
    worker = raw_socket(zmq.DEALER)
    worker.setsockopt(zmq.IDENTITY, b"raw-worker")  # its hello names its job socket
    worker.connect(master.back)
    worker.send_multipart(hello(b"raw-worker", "raw", 50, 50))
    wait_for(lambda: master.workers == 1, 10, "the raw worker's hello")
    client = immediate_dealer(raw_socket, master.front)
    deadline = time.time() + 30
    jobs = [
        protocol.encode(protocol.REQUEST, n, b"%d" % n, b"m.f", deadline=deadline)[0]
        for n in range(1, 51)
    ]
    client.send(protocol.pack_batch(jobs))
    given, messages = read_together(worker, 50)
    assert sorted(job.payload for job in given) == sorted(b"%d" % n for n in range(1, 51))
    assert messages == 1  # one client message, 50 free slots of one worker: one BATCH
    replies = [protocol.encode(protocol.REPLY, job.msg_id, b"done")[0] for job in given]
    worker.send(protocol.pack_batch(replies[:25]))
    for reply in replies[25:]:
        worker.send(reply)
    results, messages = read_together(client, 50)
    assert sorted(result.msg_id for result in results) == list(range(1, 51))
    assert messages < 50


class Squares(Worker):
    def square(self, message: bytes) -> bytes:
        return b"%d" % int(message) ** 2


class AsyncSquares(Worker):
    async def square(self, message: bytes) -> bytes:
        return b"%d" % int(message) ** 2


def a_worker_of_a_raw_master(
    raw_socket: RawSocket, serve: Callable[[Any], Any], kind: type[Worker], slots: int
) -> tuple[zmq.Socket, bytes]:
    """A worker of ``kind`` with ``slots`` slots, connected to a raw ROUTER
    as its master; the ROUTER and the worker's job socket's routing id."""
    back = raw_socket(zmq.ROUTER)
    port = back.bind_to_random_port("tcp://127.0.0.1")
    serve(kind("w", "m", f"tcp://127.0.0.1:{port}", slots=slots, log_stdout=False))
    route = b""
    while not route:  # the hello comes from the job socket, which its route names
        assert back.poll(10_000), "no hello"
        sender, *frames = back.recv_multipart()
        ping = protocol.decode(frames)
        route = sender if ping.route == sender else b""
    return back, route


def answers_of(back: zmq.Socket, route: bytes, count: int) -> tuple[dict[int, bytes], int]:
    """The next ``count`` answers of the worker ``route`` (by job number,
    each once), and how many messages carried them; heartbeats skipped."""
    answers: dict[int, bytes] = {}
    messages = 0
    while len(answers) < count:
        assert back.poll(10_000), f"answers: {answers}"
        sender, *frames = back.recv_multipart()
        if sender != route:
            continue  # a heartbeat, from the worker's other socket
        messages += 1
        for body in carried(frames):
            message = protocol.decode([body])
            assert message.msg_id not in answers
            answers[message.msg_id] = message.payload
    return answers, messages


def jobs_batch(function: bytes, payloads: list[bytes]) -> bytes:
    """One BATCH of REQUESTs numbered from 1."""
    deadline = time.time() + 30
    return protocol.pack_batch(
        [
            protocol.encode(protocol.REQUEST, n, payload, function, deadline=deadline)[0]
            for n, payload in enumerate(payloads, 1)
        ]
    )


@pytest.mark.parametrize("kind", [Squares, AsyncSquares])
def test_a_worker_runs_each_job_of_a_batch_and_answers_it_once(
    kind: type[Worker], raw_socket: RawSocket, serve: Callable[[Any], Any]
) -> None:
    """A raw master sends a worker with 20 slots 20 jobs in one BATCH: each
    is run and answered once; a blocking worker sends the results of a
    BATCH's jobs together (fewer messages than results)."""
    back, route = a_worker_of_a_raw_master(raw_socket, serve, kind, 20)
    back.send_multipart([route, jobs_batch(b"m.square", [b"%d" % n for n in range(1, 21)])])
    answers, messages = answers_of(back, route, 20)
    assert answers == {n: b"%d" % n**2 for n in range(1, 21)}
    if kind is Squares:
        assert messages < 20


class Napper(Worker):
    def nap(self, message: bytes) -> bytes:
        time.sleep(float(message))  # the job's work: it takes this long
        return message


def test_a_worker_holds_no_result_past_1_ms_and_the_job_that_runs_after_it(
    raw_socket: RawSocket, serve: Callable[[Any], Any]
) -> None:
    """A BATCH of a quick job, a 50 ms one and a quick one: the results held
    for more than 1 ms go back before the third job runs, so they come in
    two messages at least (one, if held for the whole BATCH)."""
    back, route = a_worker_of_a_raw_master(raw_socket, serve, Napper, 3)
    back.send_multipart([route, jobs_batch(b"m.nap", [b"0", b"0.05", b"0"])])
    answers, messages = answers_of(back, route, 3)
    assert answers == {1: b"0", 2: b"0.05", 3: b"0"}
    assert messages >= 2


def test_a_hub_sends_its_workers_results_read_together_on_together(
    raw_socket: RawSocket, serve: Callable[[Any], Any]
) -> None:
    """A hub's raw worker answers 30 jobs in one BATCH: the hub sends the 30
    results on to its next stage in one message, each once, with its route."""
    after = raw_socket(zmq.PULL)
    port = after.bind_to_random_port("tcp://127.0.0.1")
    hub = serve(
        Hub(
            "hub",
            ANY,
            f"tcp://127.0.0.1:{port}",
            "next.g",
            ANY,
            workers_address=ANY,
            log_stdout=False,
        )
    )
    worker = raw_socket(zmq.DEALER)
    worker.setsockopt(zmq.IDENTITY, b"raw-worker")
    worker.connect(hub.back)
    worker.send_multipart(hello(b"raw-worker", "raw", 30, 30))
    wait_for(lambda: hub.workers == 1, 10, "the raw worker's hello")
    jobs = raw_socket(zmq.PUSH)
    jobs.connect(hub.address)
    jobs.send(
        protocol.pack_batch(
            [
                protocol.encode(protocol.REQUEST, n, b"%d" % n, b"hub.f", b"route-%d" % n)[0]
                for n in range(1, 31)
            ]
        )
    )
    given, _ = read_together(worker, 30)
    replies = [protocol.encode(protocol.REPLY, job.msg_id, job.payload * 2)[0] for job in given]
    worker.send(protocol.pack_batch(replies))
    results, messages = read_together(after, 30)
    assert messages == 1
    assert sorted((result.route, result.payload) for result in results) == sorted(
        (b"route-%d" % n, b"%d" % n * 2) for n in range(1, 31)
    )


def test_a_parallel_clients_ping_finds_its_pong_in_a_batch(raw_socket: RawSocket) -> None:
    """A master sends a client the answers of one round together: a PONG
    may come in a BATCH behind a late answer, and ping() still finds it."""
    front, client = a_raw_master(raw_socket)
    pong = b'{"name": "m", "kind": "master", "workers": 0, "queued": 0}'

    def answer() -> None:
        assert front.poll(10_000), "no ping"
        peer, *ping = front.recv_multipart()
        msg_id = protocol.decode(ping).msg_id
        late = protocol.encode(protocol.REPLY, msg_id + 1000, b"late")[0]
        answer = protocol.encode(protocol.PONG, msg_id, pong)[0]
        front.send_multipart([peer, protocol.pack_batch([late, answer])])

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    with client:
        assert client.ping(timeout=10)["name"] == "m"
        assert client.dropped == 1  # the late answer
    thread.join(10)
