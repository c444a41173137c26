"""A stage's outputs built on their own, with no stage: what they need of one
comes in through their constructors (pylm.chained.output). Real sockets, in
one process."""

from __future__ import annotations

import ast
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from pylm import protocol
from pylm.chained.outlet import Outlet, ToNextStage
from pylm.chained.to_clients import MAX_BACKLOG, ToClients
from pylm.errors import PylmError, RemoteError
from pylm.telemetry.counting import ServerStats

logger = logging.getLogger("pylm.test.outputs")
CHAINED = Path(__file__).resolve().parent.parent / "pylm" / "chained"
STAGES = {"pylm.base", "pylm.chained.stage", "pylm.chained.server", "pylm.chained.last"}


def test_the_outputs_and_outlets_import_no_stage_not_even_for_types() -> None:
    for module in ("output.py", "outlet.py", "to_clients.py"):
        tree = ast.parse((CHAINED / module).read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        }
        assert not imported & STAGES, f"pylm/chained/{module} imports {imported & STAGES}"


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def pull(context: zmq.Context) -> tuple[zmq.Socket, str]:
    socket = context.socket(zmq.PULL)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, 5000)
    address = f"inproc://{uuid.uuid4().hex}"
    socket.bind(address)
    return socket, address


def job(payload: bytes, route: bytes) -> protocol.Message:
    return protocol.Message(protocol.REQUEST, 7, payload, b"me.f", route, 0.0)


def test_to_next_stage_sends_each_result_to_the_branch_chosen_and_fails_a_bad_choice(
    context: zmq.Context,
) -> None:
    (even, at_even), (odd, at_odd) = pull(context), pull(context)
    failed: list[bytes] = []
    unrouted: list[PylmError] = []

    def choose(result: bytes) -> tuple[str, bytes]:
        if result == b"bad":
            raise ValueError("no branch")
        return ("even.f" if int(result) % 2 == 0 else "odd"), result + b"!"

    def remote_error(target: bytes, exc: Exception) -> PylmError:
        failed.append(target)
        return RemoteError(str(exc))

    output = ToNextStage(
        [Outlet("even.f", [at_even]), Outlet("odd.g", [at_odd])],
        [],
        name="router",
        logger=logger,
        curve=None,
        wait_for_room=lambda socket: None,
        choose=choose,
        remote_error=remote_error,
        unrouted=unrouted.append,
    )
    assert not output.open(context, 10, lambda: pytest.fail("no registry: addresses given"))
    output.send(job(b"2", b"client"), b"2")
    output.send(job(b"3", b"client"), b"3")
    got_even = protocol.decode(even.recv_multipart())
    got_odd = protocol.decode(odd.recv_multipart())
    assert (got_even.target, got_even.payload, got_even.route) == (b"even.f", b"2!", b"client")
    assert (got_odd.target, got_odd.payload) == (b"odd.g", b"3!")

    output.send(job(b"bad", b"client"), b"bad")  # the job's client hears, down the first line
    error = protocol.decode(even.recv_multipart())
    assert (error.kind, error.route) == (protocol.ERROR, b"client")
    assert failed == [b"router.handle_stream"]
    output.send(job(b"bad", b""), b"bad")  # a tee's copy: nobody to tell but the stage
    assert len(unrouted) == 1
    for socket in output.close():
        if socket is not None:
            socket.close(linger=0)


def test_to_clients_counts_and_logs_what_it_drops_through_what_it_is_given(
    context: zmq.Context, caplog: pytest.LogCaptureFixture
) -> None:
    stats = ServerStats("last", "chained-last", ("f",), "test", "clients")
    limited: list[str] = []
    output = ToClients(
        name="last",
        logger=logger,
        stats=stats,
        log_limited=lambda cause, level, message, *args: limited.append(cause),
    )
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.SNDHWM, 1)
    address = f"inproc://{uuid.uuid4().hex}"
    router.bind(address)
    output.attach(router)
    output.send(job(b"x", b"nobody"), b"result")  # a client not connected: parked
    assert not output.waiting and stats.undeliverable == 0

    idle = context.socket(zmq.DEALER)  # a client that reads nothing
    idle.setsockopt(zmq.LINGER, 0)
    idle.setsockopt(zmq.RCVHWM, 1)
    idle.setsockopt(zmq.ROUTING_ID, b"idle")
    idle.connect(address)
    idle.send(b"hello")
    assert router.recv_multipart()[0] == b"idle"
    for _ in range(MAX_BACKLOG // 4 + 10):
        output.send(job(b"x", b"idle"), b"result")
    assert output.waiting
    assert 0 < stats.undeliverable <= 10
    assert limited == ["backlog-full"] * stats.undeliverable

    with caplog.at_level(logging.WARNING, logger.name):
        assert output.close() == [router]
    assert "last: 1 results dropped on stop" in caplog.text
    idle.close(linger=0)
    router.close(linger=0)
