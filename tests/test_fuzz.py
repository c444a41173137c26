"""Fuzzing the wire protocol against live servers (hypothesis): random
frames, valid heads with corrupt fields, huge sizes, wrong versions. Every
server must keep serving a well-behaved client running alongside, and keep
its memory bounded. ``PYLM_FUZZ_EXAMPLES`` sets how many inputs each server
gets (200 by default; raise it for a longer run)."""

from __future__ import annotations

import math
import os
import struct
import threading
from collections.abc import Callable, Iterator

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pylm import protocol
from pylm.chained import LastServer, LoopClient, Server
from pylm.parallel import Client as ParallelClient
from pylm.parallel import Master, Worker
from pylm.standalone import Client
from pylm.standalone import Server as RepServer
from pylm.testing import SOAK

EXAMPLES = int(os.environ.get("PYLM_FUZZ_EXAMPLES") or 200 * SOAK)
ANY = "tcp://127.0.0.1:0"
HEAD = struct.Struct(">2sBBBHHQd")


class Echo(RepServer):
    def echo(self, message: bytes) -> bytes:
        return message


class Step(Server):
    def echo(self, message: bytes) -> bytes:
        return message


class Last(LastServer):
    def echo(self, message: bytes) -> bytes:
        return message


class Doer(Worker):
    def echo(self, message: bytes) -> bytes:
        return message


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    """A pylm head with any field corrupt, and some bytes after it."""
    magic = draw(st.sampled_from([b"PL", b"PL", b"XX", b"\x00\x00"]))
    version = draw(st.sampled_from([1, 1, 1, 0, 2, 255]))
    kind = draw(st.integers(0, 255) | st.sampled_from(list(protocol.KIND_NAMES)))
    flags = draw(st.integers(0, 255) | st.just(0))
    target_size = draw(st.integers(0, 65535) | st.integers(0, 40))
    route_size = draw(st.integers(0, 65535) | st.integers(0, 40))
    msg_id = draw(st.integers(0, 2**64 - 1))
    deadline = draw(st.floats(allow_nan=True, allow_infinity=True))
    head = HEAD.pack(magic, version, kind, flags, target_size, route_size, msg_id, deadline)
    tail = draw(
        st.binary(max_size=120)
        | st.sampled_from([b"echo.echo", b"m.echo", b"step.echo", b'{"slots": 1}', b"\xff" * 70])
    )
    return head + tail


def frames() -> st.SearchStrategy[list[bytes]]:
    frame = st.binary(max_size=200) | heads() | st.just(protocol.BATCH_HEAD + b"\xff\xff\xff\xff")
    return st.lists(frame, min_size=1, max_size=3)


@pytest.fixture
def raw() -> Iterator[Callable[[int, str], zmq.Socket]]:
    sockets: list[zmq.Socket] = []

    def make(kind: int, address: str) -> zmq.Socket:
        socket = zmq.Context.instance().socket(kind)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDTIMEO, 2000)
        socket.connect(address)
        sockets.append(socket)
        return socket

    yield make
    for socket in sockets:
        socket.close()


def fuzz(send: Callable[[list[bytes]], None], check: Callable[[], None]) -> int:
    """Send EXAMPLES generated messages; every 25, a well-behaved call must work."""
    tried = [0]

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(frames())
    def run(message: list[bytes]) -> None:
        send(message)
        tried[0] += 1
        if tried[0] % 25 == 0:
            check()

    run()
    check()
    return tried[0]


def drain(socket: zmq.Socket) -> None:
    while socket.poll(0):
        socket.recv_multipart()


@pytest.mark.timeout(300 * SOAK)
def test_fuzz_a_standalone_server(
    serve: Callable[..., object], raw: Callable[..., zmq.Socket]
) -> None:
    server = serve(Echo("echo", ANY, log_stdout=False))
    dealer = raw(zmq.DEALER, server.address)
    before = rss_bytes()
    with Client(server.address, "echo", timeout=10) as client:

        def send(message: list[bytes]) -> None:
            dealer.send_multipart([b"", *message])  # as a REQ socket: every message answered
            assert dealer.poll(5000), "the server stopped answering"
            drain(dealer)

        tried = fuzz(send, lambda: check_echo(client.job("echo", b"still here")))
    assert tried >= EXAMPLES and server.running
    assert rss_bytes() - before < 100 * 2**20


def check_echo(answer: bytes) -> None:
    assert answer == b"still here"


@pytest.mark.timeout(300 * SOAK)
def test_fuzz_a_pipeline(serve: Callable[..., object], raw: Callable[..., zmq.Socket]) -> None:
    last = serve(Last("last", ANY, ANY, ANY, log_stdout=False))
    step = serve(Step("step", ANY, last.address, "last.echo", ANY, log_stdout=False))
    push = raw(zmq.PUSH, step.address)
    to_last = raw(zmq.PUSH, last.address)
    greeter = raw(zmq.DEALER, last.push)
    before = rss_bytes()
    with LoopClient(last.push, step.address, step.db, "step", announce=False, timeout=10) as client:

        def send(message: list[bytes]) -> None:
            push.send_multipart(message)
            to_last.send_multipart(message)
            greeter.send_multipart(message)  # the last stage's client socket takes PINGs only
            drain(greeter)

        def check() -> None:
            assert list(client.job("echo", [b"still here"])) == [b"still here"]

        tried = fuzz(send, check)
    assert tried >= EXAMPLES and step.running and last.running
    assert last._parked_count <= 10_000
    assert rss_bytes() - before < 100 * 2**20


@pytest.mark.timeout(300 * SOAK)
def test_fuzz_a_master_from_clients_and_workers(
    serve: Callable[..., object], raw: Callable[..., zmq.Socket]
) -> None:
    master = serve(Master("m", ANY, ANY, heartbeat=0.5, log_stdout=False))
    serve(Doer("w", "m", master.back, heartbeat=0.5, log_stdout=False))
    front = raw(zmq.DEALER, master.front)
    back = raw(zmq.DEALER, master.back)
    before = rss_bytes()
    with ParallelClient(master.front, "m", timeout=10) as client:

        def send(message: list[bytes]) -> None:
            front.send_multipart(message)
            back.send_multipart(message)  # as a rogue worker
            drain(front)
            drain(back)

        def check() -> None:
            assert client.eval("echo", b"still here") == b"still here"

        tried = fuzz(send, check)
        done = threading.Event()
        # Whatever the fuzz queued ran or was answered; the real worker is still there.
        for _ in range(100):
            if master.queued == 0 and master.running_jobs == 0:
                done.set()
                break
            done.wait(0.05)
        assert done.is_set()
        assert client.ping()["workers"] == 1
    assert tried >= EXAMPLES and master.running
    assert rss_bytes() - before < 100 * 2**20
    assert not math.isnan(master.heartbeat)
