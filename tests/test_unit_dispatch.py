"""pylm.parallel.dispatch.Dispatcher on its own: built with recording
callables instead of a server, over an in-process ROUTER, with DEALER
sockets playing the workers."""

from __future__ import annotations

import json
import time
from collections.abc import Generator, Iterable
from typing import Any

import pytest
import zmq

from pylm import protocol
from pylm.errors import RemoteError
from pylm.parallel.dispatch import Dispatcher
from pylm.protocol import HEAD_SIZE
from pylm.testing import wait_for

DEADLINE = 1e12  # far away: no job here expires


class Owner:
    """What a Master or a Hub gives its dispatcher, recorded."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []
        self.finished = 0
        self.dropped: list[str] = []

    def send(
        self, origin: bytes, msg_id: int, deadline: float, kind: int, payload: bytes, flags: int
    ) -> None:
        self.sent.append((protocol.KIND_NAMES[kind], origin, msg_id, payload, flags))

    def send_fast(self, origin: bytes, msg_id: int, deadline: float, body: bytes) -> None:
        self.sent.append(("REPLY", origin, msg_id, body[HEAD_SIZE:], 0))

    def finish(self) -> None:
        self.finished += 1

    def drop(self, reason: str, detail: str, frames: list[bytes]) -> None:
        self.dropped.append(reason)

    def log(self, cause: str, level: int, message: str, *args: object, burst: int = 1) -> None:
        pass

    def remote_error(self, target: bytes, exc: Exception) -> RemoteError:
        return RemoteError(f"{target.decode()}: {exc}")


@pytest.fixture
def context() -> Generator[zmq.Context, None, None]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def dispatcher_of(owner: Owner, **options: Any) -> Dispatcher:
    """A Dispatcher whose answers, drops and errors go to ``owner``."""
    return Dispatcher(
        "books",
        send=owner.send,
        send_fast=owner.send_fast,
        finished=owner.finish,
        drop=owner.drop,
        log=owner.log,
        remote_error=owner.remote_error,
        **options,
    )


def books(context: zmq.Context, owner: Owner, **options: Any) -> Dispatcher:
    dispatcher = dispatcher_of(owner, **options)
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(f"inproc://books-{id(dispatcher)}")
    dispatcher.socket = socket
    return dispatcher


def worker(context: zmq.Context, dispatcher: Dispatcher, name: bytes, slots: int = 1) -> zmq.Socket:
    """A worker that said hello (``slots`` slots), once the dispatcher has read it."""
    socket: zmq.Socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.ROUTING_ID, name)
    socket.connect(f"inproc://books-{id(dispatcher)}")
    hello = json.dumps({"name": name.decode(), "slots": slots}).encode()
    socket.send_multipart(protocol.encode(protocol.PING, 0, hello, route=name))
    read(dispatcher)
    return socket


def read(dispatcher: Dispatcher) -> None:
    assert dispatcher.socket is not None and dispatcher.socket.poll(2000)
    dispatcher.drain()


def job_of(socket: zmq.Socket) -> protocol.Message:
    assert socket.poll(2000)
    return protocol.decode(socket.recv_multipart())


def request(msg_id: int, payload: bytes) -> protocol.Message:
    frames = protocol.encode(protocol.REQUEST, msg_id, payload, b"f", b"", DEADLINE)
    return protocol.decode(frames)


def test_a_job_goes_to_a_worker_and_its_answer_to_its_origin_once(context: zmq.Context) -> None:
    owner = Owner()
    dispatcher = books(context, owner)
    w1 = worker(context, dispatcher, b"w1")
    assert dispatcher.workers == 1
    dispatcher.take(b"client", request(7, b"x"))
    assert dispatcher.queued == 1
    dispatcher.dispatch()
    job = job_of(w1)
    assert job.payload == b"x" and dispatcher.running_jobs == 1
    for _ in range(2):  # the second answer is a duplicate
        w1.send_multipart(protocol.encode(protocol.REPLY, job.msg_id, b"X"))
        read(dispatcher)
    assert owner.sent == [("REPLY", b"client", 7, b"X", 0)]
    assert owner.finished == 1 and dispatcher.duplicates == 1 and dispatcher.open_jobs == 0


def test_a_silent_workers_job_goes_to_the_next_and_the_first_answer_wins(
    context: zmq.Context,
) -> None:
    owner = Owner()
    dispatcher = books(context, owner, heartbeat=0.05, misses=1)
    w1 = worker(context, dispatcher, b"w1")
    dispatcher.take(b"client", request(7, b"x"))
    dispatcher.dispatch()
    first = job_of(w1)
    time.sleep(0.1)
    dispatcher.check_workers()  # w1 is silent: declared dead
    assert dispatcher.workers == 0 and dispatcher.redispatched == 1 and dispatcher.queued == 1
    w2 = worker(context, dispatcher, b"w2")
    dispatcher.dispatch()
    second = job_of(w2)
    assert second.msg_id == first.msg_id  # the same job, on the books under its number
    w2.send_multipart(protocol.encode(protocol.REPLY, second.msg_id, b"from w2"))
    read(dispatcher)
    w1.send_multipart(protocol.encode(protocol.REPLY, first.msg_id, b"from w1"))
    read(dispatcher)
    assert owner.sent == [("REPLY", b"client", 7, b"from w2", 0)]
    assert dispatcher.duplicates == 1


def test_scatter_and_gather_are_the_owners_callables(context: zmq.Context) -> None:
    def scatter(message: bytes) -> Iterable[bytes]:
        return message.split(b",")

    def gather(result: bytes) -> Iterable[bytes]:
        if dispatcher.gathering.last:
            return (result, b"last")
        return (result,)

    owner = Owner()
    dispatcher = books(context, owner, scatter=scatter, gather=gather)
    assert not dispatcher.direct
    w1 = worker(context, dispatcher, b"w1")
    dispatcher.take(b"client", request(7, b"a,b"))
    for _ in range(2):
        dispatcher.dispatch()
        job = job_of(w1)
        w1.send_multipart(protocol.encode(protocol.REPLY, job.msg_id, job.payload.upper()))
        read(dispatcher)
    more = protocol.MORE
    assert owner.sent == [
        ("REPLY", b"client", 7, b"A", more),
        ("REPLY", b"client", 7, b"B", more),
        ("REPLY", b"client", 7, b"last", more),
        ("END", b"client", 7, protocol.COUNT.pack(3), 0),
    ]
    assert owner.finished == 1


def test_a_scatter_that_raises_fails_the_job_with_the_owners_error(
    context: zmq.Context,
) -> None:
    def scatter(message: bytes) -> Iterable[bytes]:
        raise ValueError("no parts")

    owner = Owner()
    dispatcher = books(context, owner, scatter=scatter)
    dispatcher.take(b"client", request(7, b"x"))
    ((kind, origin, msg_id, payload, _),) = owner.sent
    assert (kind, origin, msg_id) == ("ERROR", b"client", 7)
    assert "f/scatter: no parts" in str(protocol.decode_error(payload))
    assert owner.finished == 1 and dispatcher.open_jobs == 0


@pytest.mark.parametrize(
    "options", [{"heartbeat": 0}, {"heartbeat": True}, {"misses": 0}, {"max_queued": 0}]
)
def test_settings_out_of_range_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        dispatcher_of(Owner(), **options)


def test_jobs_sent_to_a_worker_whose_socket_is_gone_are_queued_once(context: zmq.Context) -> None:
    """A worker of 2 slots is gone (its socket closed) before the master
    heard so; two jobs too large to travel together in one BATCH go to it:
    the first send finds it gone, and each job is back on the queue once,
    not twice (the second must not be booked on the lost worker)."""
    owner = Owner()
    dispatcher = books(context, owner)
    assert dispatcher.socket is not None
    dispatcher.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # as a master's and a hub's
    w1 = worker(context, dispatcher, b"w1", slots=2)
    w1.close()

    def gone() -> bool:
        try:
            dispatcher.socket.send_multipart([b"w1", b""], zmq.NOBLOCK)  # type: ignore[union-attr]
        except zmq.ZMQError:
            return True
        return False

    wait_for(gone, 5, "w1's connection gone")
    dispatcher.take(b"client", request(1, bytes(5000)))
    dispatcher.take(b"client", request(2, bytes(5000)))
    dispatcher.dispatch()
    assert dispatcher.workers == 0 and dispatcher.queued == 2 and dispatcher.redispatched == 0
    w2 = worker(context, dispatcher, b"w2", slots=2)
    dispatcher.dispatch()  # each job once, to the live worker
    given = [job_of(w2), job_of(w2)]  # two messages: together they are over 8 KiB
    assert len({job.msg_id for job in given}) == 2 and dispatcher.queued == 0
