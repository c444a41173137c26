"""Work past its deadline is dropped, not run (docs/protocol.md, "Deadlines"):
by a standalone server, a stage (one job, and jobs in a batch) and a
worker, each counted in ``pylm_messages_expired_total``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import zmq
from helpers import ANY, scrape

from pylm import protocol
from pylm.chained import LastServer, LoopClient
from pylm.chained import Server as Stage
from pylm.errors import RequestTimeout
from pylm.parallel import Client as ParallelClient
from pylm.parallel import Master, Worker
from pylm.protocol import CLOCK_SLACK, SPLIT_PAYLOAD
from pylm.standalone import Server
from pylm.testing import wait_for

PAST = 5 * CLOCK_SLACK  # s before now: a deadline passed for sure


class Noting(Server):
    """A standalone server that notes what it ran."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.ran: list[bytes] = []

    def echo(self, message: bytes) -> bytes:
        self.ran.append(message[:10])
        return message


@pytest.fixture
def dealer() -> Iterator[zmq.Socket]:
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, 10_000)
    yield socket
    socket.close()


def request(msg_id: int, target: bytes, payload: bytes, deadline: float) -> list[bytes]:
    return protocol.encode(protocol.REQUEST, msg_id, payload, target, b"", deadline)


@pytest.mark.timeout(60)
def test_a_server_drops_calls_past_their_deadline_and_answers_the_rest(
    serve: Callable[[Noting], Noting], dealer: zmq.Socket
) -> None:
    server = serve(Noting("dl", ANY, metrics=True, log_stdout=False))
    dealer.connect(server.address)
    now = time.time()
    big = b"late" + bytes(SPLIT_PAYLOAD)  # a payload in a frame of its own
    dealer.send_multipart(request(1, b"dl.echo", b"late", now - PAST))
    dealer.send_multipart(request(2, b"dl.echo", big, now - PAST))
    dealer.send_multipart(request(3, b"dl.echo", b"in time", now + 30))
    dealer.send_multipart(request(4, b"dl.echo", b"no deadline", 0.0))
    # One connection, answered in order: the first answer is the third call's.
    answers = [protocol.decode(dealer.recv_multipart()) for _ in range(2)]
    assert [(a.msg_id, a.payload) for a in answers] == [(3, b"in time"), (4, b"no deadline")]
    assert server.ran == [b"in time", b"no deadlin"]
    stats = server.stats
    assert stats is not None and stats.expired == 2
    # Counted as sent once sent: the answer may arrive first.
    wait_for(lambda: stats.in_flight == 0, 5, "every call read accounted for")
    assert 'pylm_messages_expired_total{server="dl"} 2.0' in scrape(server.metrics_url)


class Noted(Stage):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.ran: list[bytes] = []

    def tag(self, message: bytes) -> bytes:
        self.ran.append(message)
        return message + b">tag"


class Done(LastServer):
    def done(self, message: bytes) -> bytes:
        return message + b">done"


@pytest.mark.timeout(60)
def test_a_stage_drops_jobs_past_their_deadline_alone_or_in_a_batch(
    serve: Callable[[Stage], Stage],
) -> None:
    last = serve(Done("dl-last", ANY, ANY, ANY, metrics=True, log_stdout=False))
    first = serve(
        Noted("dl-first", ANY, last.address, "dl-last.done", ANY, metrics=True, log_stdout=False)
    )
    assert isinstance(first, Noted)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    try:
        push.connect(first.address)
        now = time.time()

        def job(msg_id: int, payload: bytes, deadline: float) -> bytes:
            return protocol.one_frame_request(msg_id, deadline, b"dl-first.tag", b"nobody", payload)

        push.send(job(1, b"late", now - PAST))
        push.send(
            protocol.pack_batch([job(2, b"late in a batch", now - PAST), job(3, b"fresh", 0)])
        )
        big = protocol.encode(
            protocol.REQUEST, 4, bytes(SPLIT_PAYLOAD + 1), b"dl-first.tag", b"x", now - PAST
        )
        push.send_multipart(big)
        assert first.stats is not None
        wait_for(lambda: first.stats.expired == 3, 10, "three jobs dropped as expired")
    finally:
        push.close()
    with LoopClient(last.push, first.address, first.db, "dl-first", announce=False) as client:
        assert list(client.job("tag", [b"in time"])) == [b"in time>tag>done"]
    assert first.ran == [b"fresh", b"in time"]
    assert 'pylm_messages_expired_total{server="dl-first"} 3.0' in scrape(first.metrics_url)


class Echoer(Worker):
    def echo(self, message: bytes) -> bytes:
        return message


@pytest.mark.timeout(60)
def test_a_worker_drops_a_job_past_its_deadline_and_tells_its_master(
    serve: Callable[[Master | Worker], Master | Worker], dealer: zmq.Socket
) -> None:
    master = serve(Master("dl-m", ANY, ANY, log_stdout=False))
    assert isinstance(master, Master) and master.back is not None and master.front is not None
    worker = serve(Echoer("dl-w", "dl-m", master.back, metrics=True, log_stdout=False))
    with ParallelClient(master.front, "dl-m", timeout=10) as client:
        assert client.eval("echo", b"ready") == b"ready"  # the worker serves
    dealer.connect(master.front)
    dealer.send_multipart(request(7, b"dl-m.echo", b"late", time.time() - PAST))
    answer = protocol.decode(dealer.recv_multipart())
    assert answer.kind == protocol.ERROR and answer.msg_id == 7
    error = protocol.decode_error(answer.payload)
    assert isinstance(error, RequestTimeout)
    assert "past its deadline" in str(error) and "not run" in str(error)
    assert worker.stats is not None and worker.stats.expired == 1
    with ParallelClient(master.front, "dl-m", timeout=10) as client:
        assert client.eval("echo", b"after") == b"after"  # its slot was freed
