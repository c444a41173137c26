"""Batching on by default, with no added wait: the jobs a LoopClient has
ready go out together, a job alone goes alone, and a stage sends the results
of the jobs waiting in its input on together. Real sockets: raw ZeroMQ
sockets stand in for the stage or client under test's peers, to see the
messages themselves."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
import zmq
from helpers import ANY, answer_greeting, raw_pipeline_ends

from pylm import protocol
from pylm.chained import LoopClient, Server

pytestmark = pytest.mark.timeout(60)

RawSocket = Callable[[int], zmq.Socket]


def carried(message: list[bytes]) -> list[bytes]:
    """The one-frame messages a message carries: those of a BATCH, or itself."""
    if message[0][protocol.LEAD] == protocol.BATCH_PREFIX:
        return protocol.unpack_batch(message[0])
    assert len(message) == 1
    return [message[0]]


def a_first_stage(raw_socket: RawSocket, **options: object) -> tuple[zmq.Socket, LoopClient]:
    """A raw first stage and a LoopClient (its jobs time out: nothing answers
    them); the raw last stage answers the client's greeting."""
    first, last, client = raw_pipeline_ends(raw_socket, timeout=0.5, retry=False, **options)
    threading.Thread(target=answer_greeting, args=(last,), daemon=True).start()
    return first, client


def sent(
    first: zmq.Socket, client: LoopClient, payloads: list[bytes] | Iterator[bytes]
) -> list[list[bytes]]:
    """Run ``payloads`` through ``client`` (their results never come: they
    time out) and give the messages the first stage got."""
    outcomes = list(client.results("f", payloads))
    assert all(outcome.error is not None for outcome in outcomes)
    messages = []
    while first.poll(0):
        messages.append(first.recv_multipart())
    return messages


def test_jobs_ready_at_once_go_together_and_a_job_alone_goes_alone(raw_socket: RawSocket) -> None:
    first, client = a_first_stage(raw_socket)
    with client:
        messages = sent(first, client, [b"%d" % n for n in range(100)])
        jobs = [job for message in messages for job in carried(message)]
        assert sorted(protocol.decode([job]).payload for job in jobs) == sorted(
            b"%d" % n for n in range(100)
        )
        assert len(messages) == 2  # 64 and 36: the default cap
        (alone,) = sent(first, client, [b"alone"])
        assert alone[0][protocol.LEAD] != protocol.BATCH_PREFIX  # one job: a plain REQUEST
        assert protocol.decode(alone).payload == b"alone"


def test_batches_hold_8_kib_of_payloads_at_most(raw_socket: RawSocket) -> None:
    first, client = a_first_stage(raw_socket)
    with client:
        messages = sent(first, client, [bytes(3000)] * 9)  # two fit in 8 KiB, not three
        assert [len(carried(message)) for message in messages] == [2, 2, 2, 2, 1]


def test_batch_1_sends_one_job_per_message(raw_socket: RawSocket) -> None:
    first, client = a_first_stage(raw_socket, batch=1)
    with client:
        messages = sent(first, client, [b"%d" % n for n in range(20)])
        assert len(messages) == 20
        assert all(message[0][protocol.LEAD] != protocol.BATCH_PREFIX for message in messages)


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
    results: list[bytes] = []
    messages = 0
    while len(results) < 51:
        assert after.poll(10_000), f"{len(results)} of 51 results"
        results += [protocol.decode([body]).payload for body in carried(after.recv_multipart())]
        messages += 1
    assert sorted(results) == sorted([b"first", *(b"%d" % n for n in range(50))])
    assert messages < 51
