"""The parts a server is made of, without a serving loop: the exposed
functions and their errors (pylm.exposed), the registrar without a registry
(pylm.registrar), the metrics exposure with metrics off (pylm.telemetry.exporter),
the control token (pylm.control) and the rate-limited log (pylm.logs)."""

from __future__ import annotations

import logging

import pytest
import zmq

from pylm.control import Control
from pylm.errors import PayloadTooLarge, RemoteError, UnknownFunction, UnknownServer
from pylm.exposed import Exposed, exposed_functions
from pylm.logs import LimitedLog
from pylm.registrar import Registrar
from pylm.telemetry.counting import UNKNOWN_FUNCTION, ServerStats
from pylm.telemetry.exporter import Exposure


class Functions:
    def echo(self, payload: bytes) -> bytes:
        return payload

    def view(self, payload: bytes) -> memoryview:
        return memoryview(payload)

    def text(self, payload: bytes) -> str:
        return payload.decode()

    def fail(self, payload: bytes) -> bytes:
        raise ValueError("no")


def exposed(max_payload: int = 10) -> Exposed:
    functions = tuple(exposed_functions(Functions))
    stats = ServerStats("srv", "standalone", functions, "0", "client")
    log = LimitedLog(logging.getLogger("test-parts"), 10)
    return Exposed(Functions(), "srv", "standalone", functions, stats, max_payload, log)


def test_calls_reach_the_function_and_are_counted() -> None:
    part = exposed()
    assert part.call(b"srv.echo", b"abc") == b"abc"
    assert part.call(b"srv.view", b"abc", timed=False) == b"abc"
    assert part.stats is not None
    assert sum(part.stats.functions["echo"].buckets) == 1
    assert part.stats.functions["view"].untimed == 1


def test_each_failure_has_its_own_error(caplog: pytest.LogCaptureFixture) -> None:
    part = exposed()
    with pytest.raises(UnknownServer, match="reached server 'srv'"):
        part.call(b"other.echo", b"")
    with pytest.raises(UnknownFunction, match="it has echo, fail, text, view"):
        part.call(b"srv.nope", b"")
    with pytest.raises(PayloadTooLarge, match=r"11 bytes .* 10 bytes"):
        part.call(b"srv.echo", b"x" * 11)
    with pytest.raises(RemoteError, match="returned str, expected bytes"):
        part.call(b"srv.text", b"x")
    with caplog.at_level(logging.ERROR, "test-parts"):
        with pytest.raises(RemoteError, match="raised ValueError: no") as raised:
            part.call(b"srv.fail", b"x")
    assert "raise ValueError" in raised.value.remote_traceback
    assert "exposed.py" not in raised.value.remote_traceback  # the user's frames only
    assert "function 'fail' raised ValueError: no" in caplog.text
    assert part.stats is not None
    assert part.stats.functions[UNKNOWN_FUNCTION].errors == 2


def test_a_server_kind_may_shape_results_and_unknown_targets() -> None:
    functions = tuple(exposed_functions(Functions))
    log = LimitedLog(logging.getLogger("test-parts"), 10)
    part = Exposed(
        Functions(), "srv", "worker", functions, None, 10, log,
        result_bytes=lambda target, result: str(result).encode(),
        unknown=lambda target: UnknownFunction(f"not here: {target!r}"),
    )  # fmt: skip
    assert part.call(b"srv.text", b"ok") == b"ok"
    with pytest.raises(UnknownFunction, match="not here"):
        part.call(b"srv.nope", b"")


def test_the_limited_log_holds_back_and_tells_how_many(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    monkeypatch.setattr("pylm.logs.time.monotonic", lambda: now[0])
    log = LimitedLog(logging.getLogger("test-parts"), 2)
    with caplog.at_level(logging.WARNING, "test-parts"):
        for _ in range(3):
            log.log("a", logging.WARNING, "cause %s", "a")
        log.log("b", logging.WARNING, "cause %s", "b")
        now[0] += 1.0
        log.log("a", logging.WARNING, "cause %s", "a")
        log.log("c", logging.WARNING, "cause %s", "c")  # a third cause: the limiters start over
        log.log("a", logging.WARNING, "cause %s", "a")
    assert [r.getMessage() for r in caplog.records] == [
        "cause a",
        "cause b",
        "cause a (2 more like it since the last report)",
        "cause c",
        "cause a",
    ]


def test_the_registrar_without_a_registry_registers_nothing() -> None:
    registrar = Registrar(
        "srv", "standalone", ("echo",), logging.getLogger("test-parts"),
        registry=None, ttl=None, rolling=False, curve=None, stats=None,
    )  # fmt: skip
    registrar.register({"front": "tcp://127.0.0.1:5555"}, required=False, metrics=None)
    assert registrar.registration is None
    assert registrar.describe() == "not registered"
    assert registrar.advertised("tcp://127.0.0.1:5555") == "tcp://127.0.0.1:5555"
    advertised = registrar.advertised("http://0.0.0.0:9100/metrics")
    assert advertised.startswith("http://") and advertised.endswith(":9100/metrics")
    assert "0.0.0.0" not in advertised
    registrar.close()  # nothing to deregister


def test_the_exposure_with_metrics_off_does_nothing() -> None:
    exposure = Exposure(None, "127.0.0.1")
    assert exposure.open(lambda url: url) is None
    exposure.ready = True
    assert not exposure.ready
    exposure.close()


def test_the_control_token_is_its_own_and_waking_no_loop_is_harmless() -> None:
    context = zmq.Context()
    try:
        one, two = Control(context, None), Control(context, None)
        assert one.address != two.address
        assert one.is_control(one.token) and not one.is_control(two.token)
        one.wake()  # nothing bound there: the message is dropped, nothing raised
    finally:
        context.term()
