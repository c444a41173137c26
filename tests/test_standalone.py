"""The standalone server and its blocking client, over real sockets."""

from __future__ import annotations

import contextlib
import logging
import random
import re
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import pytest
import zmq
from helpers import immediate_dealer, read_answers

import pylm
import pylm.standalone.client
import pylm.standalone.servers
import pylm.testing
from pylm import protocol
from pylm.errors import (
    PayloadTooLarge,
    RemoteError,
    RequestTimeout,
    ServerCrashed,
    UnknownFunction,
    UnknownServer,
)
from pylm.standalone import Client, Server
from pylm.transport import AddressError, close_listener, send_frame

Serve = Callable[[Any], Any]


class MyServer(Server):
    def foo(self, message: bytes) -> bytes:
        self.logger.warning("Got a message")
        return b"you sent me " + message

    def fail(self, message: bytes) -> bytes:
        raise ValueError(f"cannot handle {message!r}")

    def number(self, message: bytes) -> int:
        return 42

    def nothing(self, message: bytes) -> None:
        return None

    def buffer(self, message: bytes) -> bytearray:
        return bytearray(message.upper())

    def _private(self, message: bytes) -> bytes:
        return b"secret"


def quiet(cls: type[Server] = MyServer, name: str = "my_server", **kwargs: Any) -> Any:
    return cls(name, "tcp://127.0.0.1:0", log_stdout=False, **kwargs)


def test_seed_example(serve: Serve) -> None:
    server = serve(MyServer("my_server", "tcp://127.0.0.1:0"))
    client = Client(server.address, "my_server")
    assert client.job("foo", b"a message") == b"you sent me a message"
    client.close()


def test_import_paths() -> None:
    assert pylm.standalone.servers.Server is Server
    assert pylm.standalone.client.Client is Client
    assert set(pylm.standalone.__all__) == {"Server", "Client", "AsyncClient", "idempotent"}


def test_log_line_format(serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    server = serve(MyServer("my_server", "tcp://127.0.0.1:0"))
    with Client(server.address, "my_server") as client:
        client.job("foo", b"x")
    out = capsys.readouterr().out
    pattern = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} - my_server - WARNING - Got a message$"
    assert re.search(pattern, out, re.M), out


def test_stdout_handler_can_be_turned_off(serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    root_handlers = list(logging.getLogger().handlers)
    server = serve(quiet(name="silent_server"))
    with Client(server.address, "silent_server") as client:
        client.job("foo", b"x")
    assert "Got a message" not in capsys.readouterr().out
    assert logging.getLogger().handlers == root_handlers  # root logger untouched
    assert server.logger is logging.getLogger("silent_server")


def test_default_handler_installed_once_per_logger() -> None:
    first = MyServer("twice", "tcp://127.0.0.1:0")
    MyServer("twice", "tcp://127.0.0.1:0")
    assert len(first.logger.handlers) == 1


def test_non_bytes_payload_raises_type_error_before_sending(
    raw_socket: Callable[[int], zmq.Socket],
) -> None:
    listener = raw_socket(zmq.ROUTER)
    port = listener.bind_to_random_port("tcp://127.0.0.1")
    with Client(f"tcp://127.0.0.1:{port}", "my_server") as client:
        with pytest.raises(TypeError, match="payload must be bytes, got int"):
            client.job("foo", 1)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="function name must be a str, got bytes"):
            client.job(b"foo", b"x")  # type: ignore[arg-type]
        # Nothing was sent: the first message the listener gets is a marker
        # sent after them (nobody answers it).
        with pytest.raises(RequestTimeout):
            client.job("foo", b"marker", timeout=0.2)
    _route, *frames = listener.recv_multipart()
    assert protocol.decode(frames).payload == b"marker"


def test_positional_2016_signature_and_messages_limit() -> None:
    server = MyServer("my_server", "tcp://127.0.0.1:0", None, None, None, logging.CRITICAL, 3)
    assert server.messages == 3
    thread = threading.Thread(target=server.start)
    thread.start()
    try:
        assert server.wait_ready(20)
        with Client(server.address, "my_server") as client:
            for _ in range(3):
                client.job("foo", b"x")
        thread.join(20)
        assert not thread.is_alive()  # start() returned after three requests
        assert server.served == 3
    finally:
        server.stop()
        thread.join(20)


def test_the_last_answers_reach_a_client_that_reads_them_after_the_limit(
    raw_socket: Callable[[int], zmq.Socket],
) -> None:
    """A client set ZMQ_IMMEDIATE, as pylm's are, loses the answers it has
    not read yet when the connection drops: a server that ends at its
    messages limit keeps its socket open until its clients are quiet."""
    server = MyServer("my_server", "tcp://127.0.0.1:0", messages=3, log_stdout=False)
    thread = threading.Thread(target=server.start)
    thread.start()
    try:
        assert server.wait_ready(20)
        dealer = immediate_dealer(raw_socket, server.address)
        for number in range(4):  # the fourth comes after the limit
            dealer.send_multipart(protocol.encode(protocol.REQUEST, number, b"x", b"my_server.foo"))
        pylm.testing.wait_for(lambda: server.served == 3, 20, "three requests served")
        answers = read_answers(dealer, 4)
        assert [answer.payload for answer in answers[:3]] == [b"you sent me x"] * 3
        refused = answers[3]
        assert refused.kind == protocol.ERROR and refused.msg_id == 3
        assert b"reached its messages limit (3) and is closing: not served" in refused.payload
        thread.join(20)
        assert not thread.is_alive()  # and then it ended
    finally:
        server.stop()
        thread.join(20)


def test_deprecated_2016_addresses_warn() -> None:
    with pytest.warns(DeprecationWarning, match="perf_address"):
        MyServer("my_server", "tcp://127.0.0.1:0", None, "tcp://127.0.0.1:1", log_stdout=False)


def test_stop_from_another_thread_ends_blocking_start() -> None:
    server = quiet()
    thread = threading.Thread(target=server.start)
    thread.start()
    try:
        assert server.wait_ready(20)
        assert server.running
        server.stop()
        thread.join(20)
        assert not thread.is_alive()
        assert not server.running
    finally:
        server.stop()
        thread.join(20)


def test_context_manager_and_restart_refused() -> None:
    with quiet() as server:
        with Client(server.address, "my_server") as client:
            assert client.job("foo", b"1") == b"you sent me 1"
    assert not server.running
    with pytest.raises(RuntimeError, match="already started"):
        server.start(background=True)


def serving_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"pylm-server-{name}"]


@pytest.mark.timeout(30)
def test_stop_before_start_and_twice_is_harmless() -> None:
    """stop() before start() returns at once and starts nothing; stopping a
    stopped server again returns, raises nothing and leaves nothing behind:
    no serving thread, its port free; and it still starts only once."""
    early = quiet(name="stopped_early")
    try:
        early.stop(timeout=5)  # nothing to wait for: a TimeoutError would say it waited
        assert not early.running and not serving_threads("stopped_early")
        with pytest.raises(RuntimeError, match="was stopped; create a new one"):
            early.start(background=True)  # it would bind and answer nothing
        assert not early.running and not serving_threads("stopped_early")
    finally:
        early.stop(timeout=5)
    server = quiet(name="stopped_twice")
    try:
        with server:
            with Client(server.address, "stopped_twice") as client:
                assert client.job("foo", b"1") == b"you sent me 1"
        server.stop(timeout=5)
        server.stop(timeout=5)
        assert not server.running and not serving_threads("stopped_twice")
        with zmq.Context.instance().socket(zmq.ROUTER) as probe:
            probe.setsockopt(zmq.LINGER, 0)
            probe.bind(server.address)  # the server released its port
        with pytest.raises(RuntimeError, match="already started; create a new one"):
            server.start(background=True)
        assert not server.running and not serving_threads("stopped_twice")
    finally:
        server.stop(timeout=5)


def test_several_servers_in_one_process(serve: Serve) -> None:
    class Other(Server):
        def foo(self, message: bytes) -> bytes:
            return b"other " + message

    servers = [serve(quiet(name=f"s{i}")) for i in range(4)]
    servers.append(serve(quiet(Other, "s_other")))
    for server in servers:
        with Client(server.address, server.name) as client:
            expected = b"other x" if server.name == "s_other" else b"you sent me x"
            assert client.job("foo", b"x") == expected


def test_only_public_user_methods_are_callable(serve: Serve) -> None:
    server = serve(quiet())
    assert server.functions == ("buffer", "fail", "foo", "nothing", "number")
    with Client(server.address, "my_server") as client:
        for name in (
            "_private",
            "start",
            "stop",
            "logger",
            "__init__",
            "__class__",
            "_call",
            "ping",
        ):
            with pytest.raises(UnknownFunction) as info:
                client.job(name, b"x")
            assert info.value.function == name and info.value.server == "my_server"
        assert client.job("foo", b"still") == b"you sent me still"


def test_client_started_before_server(ipc_address: str) -> None:
    results: list[bytes] = []
    calling = threading.Event()

    def call() -> None:
        with Client(ipc_address, "my_server", timeout=20) as client:
            calling.set()
            results.append(client.job("foo", b"early"))

    thread = threading.Thread(target=call)
    thread.start()
    assert calling.wait(5)
    with MyServer("my_server", ipc_address, log_stdout=False):
        thread.join(20)
    assert results == [b"you sent me early"]


def test_client_before_server_over_tcp(free_tcp_address: str) -> None:
    client = Client(free_tcp_address, "my_server", timeout=20)
    with MyServer("my_server", free_tcp_address, log_stdout=False):
        assert client.job("foo", b"late") == b"you sent me late"
    client.close()


def test_unknown_function_and_server_name_both(serve: Serve) -> None:
    server = serve(quiet())
    with Client(server.address, "my_server") as client:
        for _ in range(2):  # the first call, then the client's fast path
            with pytest.raises(
                UnknownFunction, match=r"unknown function 'bar' on server 'my_server'"
            ):
                client.job("bar", b"x")
            assert client.job("foo", b"x") == b"you sent me x"
    with Client(server.address, "wrong_name") as client:
        with pytest.raises(
            UnknownServer, match=r"'wrong_name' \(function 'foo'\) reached server 'my_server'"
        ):
            client.job("foo", b"x")
    with Client(server.address, "my_server") as client:
        assert client.job("foo", b"y") == b"you sent me y"


def test_remote_exception_carries_type_message_traceback(serve: Serve) -> None:
    server = serve(quiet())
    with Client(server.address, "my_server") as client:
        with pytest.raises(RemoteError):
            client.job("fail", b"abc")
        with pytest.raises(RemoteError) as info:  # again, on the client's fast path
            client.job("fail", b"abc")
        error = info.value
        assert error.remote_type == "ValueError"
        assert error.remote_message == "cannot handle b'abc'"
        assert "in fail" in error.remote_traceback and "ValueError" in error.remote_traceback
        assert (error.server, error.function) == ("my_server", "fail")
        assert client.job("foo", b"x") == b"you sent me x"


@pytest.mark.parametrize(("function", "type_name"), [("number", "int"), ("nothing", "NoneType")])
def test_non_bytes_return_is_a_clear_error(serve: Serve, function: str, type_name: str) -> None:
    server = serve(quiet())
    with Client(server.address, "my_server") as client:
        for _ in range(2):
            with pytest.raises(
                RemoteError,
                match=f"'{function}' on server 'my_server' returned {type_name}, expected bytes",
            ):
                client.job(function, b"x")
            assert client.job("buffer", b"ok") == b"OK"  # bytes-like results are fine


def test_timeout_leaves_client_usable(serve: Serve) -> None:
    release = threading.Event()

    class Slow(Server):
        def wait(self, message: bytes) -> bytes:
            release.wait(10)
            return b"late " + message

        def fast(self, message: bytes) -> bytes:
            return b"fast " + message

    server = serve(quiet(Slow, "slow"))
    with Client(server.address, "slow", timeout=5) as client:
        with pytest.raises(RequestTimeout, match=r"server 'slow' at .* to 'wait' within 0.2 s"):
            client.job("wait", b"1", timeout=0.2)
        release.set()
        # The stale answer to the first call arrives first and is dropped.
        assert client.job("fast", b"2") == b"fast 2"
        assert client.dropped == 1
        assert client.job("fast", b"3") == b"fast 3"
        assert isinstance(RequestTimeout("x"), TimeoutError)


@pytest.mark.timeout(10)  # a client that never times out fails here, not in 60 s
def test_timeout_without_server(free_tcp_address: str) -> None:
    with Client(free_tcp_address, "nobody", timeout=0.2) as client:
        for _ in range(2):
            with pytest.raises(RequestTimeout, match=r"to 'foo' within 0\.2 s"):
                client.job("foo", b"x")
        with pytest.raises(RequestTimeout):
            client.ping(timeout=0.1)


def test_payload_limits(serve: Serve) -> None:
    server = serve(quiet(max_payload=1000))
    with Client(server.address, "my_server", max_payload=100) as client:
        with pytest.raises(PayloadTooLarge, match="101 bytes is larger than the limit of 100"):
            client.job("foo", b"x" * 101)
    with Client(server.address, "my_server") as client:
        assert client.job("foo", b"x") == b"you sent me x"
        with pytest.raises(
            PayloadTooLarge, match=r"1001 bytes .* limit of server 'my_server', 1000 bytes"
        ) as info:
            client.job("foo", b"x" * 1001)
        assert (info.value.size, info.value.limit) == (1001, 1000)
        assert client.job("foo", b"x" * 1000) == b"you sent me " + b"x" * 1000


def test_ping(serve: Serve) -> None:
    server = serve(quiet())
    with Client(server.address, "my_server") as client:
        info = client.ping()
    assert info["name"] == "my_server"
    assert info["kind"] == "standalone"
    assert info["functions"] == list(server.functions)
    assert info["version"] == pylm.__version__


def test_garbage_is_answered_and_server_keeps_serving(
    serve: Serve, raw_socket: Callable[[int], zmq.Socket]
) -> None:
    server = serve(quiet())
    vandal = raw_socket(zmq.DEALER)
    vandal.connect(server.address)
    request = protocol.encode(protocol.REQUEST, 1, b"x", b"my_server.foo")[0]
    overrun = bytearray(protocol.encode(protocol.REQUEST, 5, b"x", b"my_server.foo")[0])
    overrun[5:7] = (999).to_bytes(2, "big")
    # Without the empty delimiter a message cannot be answered as a REQ
    # expects: it is dropped and counted (below).
    vandal.send_multipart([b"no delimiter", b"dropped"])
    garbage: list[list[bytes]] = [
        [b""],
        [b"random bytes \x00\xff"],
        [b"x" * 5000, b"y"],
        [request, b"a trailing frame is ignored"],
        [protocol.reply_head(2) + b"a reply is not a request"],
        protocol.encode(protocol.REQUEST, 3, b"x", b"no-dot-target"),
        protocol.encode(protocol.REQUEST, 4, b"x", b"\xff\xfe.foo"),
        [bytes(overrun)],
        [protocol.reply_head(6, protocol.REQUEST, protocol.PAYLOAD_FRAME)],  # payload missing
    ]
    for frames in garbage:
        vandal.send_multipart([b"", *frames])
    with Client(server.address, "my_server") as client:
        assert client.job("foo", b"fine") == b"you sent me fine"
    # Every message gets an answer; those without a readable id answer id 0.
    answers = []
    for _ in garbage:
        _delimiter, *frames = vandal.recv_multipart()
        message = protocol.decode(frames)
        answers.append((message.msg_id, protocol.KIND_NAMES[message.kind]))
        if message.kind == protocol.ERROR:
            with pytest.raises(pylm.ProtocolError):
                protocol.result_of(message)
    assert answers == [
        (0, "ERROR"),
        (0, "ERROR"),
        (0, "ERROR"),
        (1, "REPLY"),
        *((msg_id, "ERROR") for msg_id in range(2, 7)),
    ]
    # Nothing more comes (no answer to the message without a delimiter): a
    # marker sent last is answered next, first in, first out.
    vandal.send_multipart([b"", *protocol.encode(protocol.REQUEST, 7, b"marker", b"my_server.foo")])
    _delimiter, *frames = vandal.recv_multipart()
    marker = protocol.decode(frames)
    assert (marker.msg_id, marker.payload) == (7, b"you sent me marker")
    assert server.stats.malformed_by["envelope"] == 1
    assert server.stats.malformed_by["head"] == len(garbage) - 4  # no head, bad head
    assert server.stats.malformed_by["kind"] == 1  # the REPLY


def test_a_function_that_keeps_failing_logs_a_line_a_second(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """Each failure comes back to its caller and is counted; the log gets
    one line a second of them, which says how many it held back."""
    server = serve(quiet())
    with (
        caplog.at_level(logging.ERROR, logger="my_server"),
        Client(server.address, "my_server") as client,
    ):
        for _ in range(300):
            with pytest.raises(RemoteError):
                client.job("fail", b"x")
    lines = [r.getMessage() for r in caplog.records if "raised ValueError" in r.getMessage()]
    assert 1 <= len(lines) <= 3, lines  # 300 calls take well under 2 s
    assert server.stats.functions["fail"].errors == 300


def test_raw_tcp_junk_costs_no_other_caller_its_answer(serve: Serve) -> None:
    """Connections that send bytes that are not ZMTP and then reset: every
    caller after each of them gets its answer (libzmq's REP socket lost
    about 6 of 15 here; the server reads its envelopes on a ROUTER)."""
    server = serve(quiet())
    host, port = server.address.removeprefix("tcp://").rsplit(":", 1)
    junk = random.Random(18)
    for round in range(15):
        with socket.create_connection((host, int(port)), timeout=5) as vandal:
            vandal.sendall(junk.randbytes(2000))
            vandal.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with Client(server.address, "my_server", timeout=2) as client:
            assert client.job("foo", b"%d" % round) == b"you sent me %d" % round
    assert server.running
    # libzmq drops a connection whose greeting is not ZMTP's (random bytes
    # may happen to look like ZMTP 1.0, whose messages are then dropped and
    # counted as messages); the server counts each failed handshake.
    failed = server.stats.handshakes_failed
    greeting = b"\xff" + bytes(8) + b"\x7f\x03\x00" + b"JUNK".ljust(20, b"\x00")
    for _ in range(5):
        with socket.create_connection((host, int(port)), timeout=5) as vandal:
            vandal.sendall(greeting + bytes(31) + junk.randbytes(200))
            with contextlib.suppress(ConnectionResetError):
                while vandal.recv(4096):  # until the server hangs up
                    pass
    pylm.testing.wait_for(
        lambda: server.stats.handshakes_failed == failed + 5, 10, "5 failed handshakes counted"
    )


def test_a_peer_that_does_not_read_costs_the_server_nothing(
    serve: Serve, raw_socket: Callable[[int], zmq.Socket]
) -> None:
    """A peer that sends requests and never reads its answers: the server
    drops what cannot reach it and serves the others."""
    server = serve(quiet())
    hog = raw_socket(zmq.DEALER)
    hog.setsockopt(zmq.RCVHWM, 1)
    hog.setsockopt(zmq.SNDHWM, 0)
    hog.connect(server.address)
    request = protocol.encode(protocol.REQUEST, 1, b"x" * 20_000, b"my_server.foo")[0]
    for _ in range(2000):
        hog.send_multipart([b"", request])
    with Client(server.address, "my_server", timeout=10) as client:
        assert client.job("foo", b"fine") == b"you sent me fine"
        pylm.testing.wait_for(lambda: server.stats.sent >= 2001, 30, "the hog's requests served")
        assert client.job("foo", b"still") == b"you sent me still"


def test_other_protocol_version_gets_protocol_error(
    serve: Serve, raw_socket: Callable[[int], zmq.Socket]
) -> None:
    server = serve(quiet())
    sock = raw_socket(zmq.REQ)
    sock.connect(server.address)
    body = bytearray(protocol.encode(protocol.REQUEST, 77, b"x", b"my_server.foo")[0])
    body[2] = 9
    sock.send(bytes(body))
    message = protocol.decode(sock.recv_multipart())
    assert message.msg_id == 77
    with pytest.raises(pylm.ProtocolError, match="unsupported protocol version 9"):
        protocol.result_of(message)


def test_plain_req_socket_can_call(serve: Serve, raw_socket: Callable[[int], zmq.Socket]) -> None:
    server = serve(quiet())
    req = raw_socket(zmq.REQ)
    req.connect(server.address)
    req.send_multipart(protocol.encode(protocol.REQUEST, 5, b"req", b"my_server.foo"))
    message = protocol.decode(req.recv_multipart())
    assert (message.msg_id, message.payload) == (5, b"you sent me req")


def test_large_payloads_travel_in_their_own_frame(serve: Serve) -> None:
    server = serve(quiet())
    big = bytes(range(256)) * 4096  # 1 MiB
    with Client(server.address, "my_server") as client:
        assert client.job("foo", big) == b"you sent me " + big


def test_frame_over_hard_limit_drops_sender_not_server(
    serve: Serve, raw_socket: Callable[[int], zmq.Socket]
) -> None:
    server = serve(quiet(max_payload=1000))
    hog = raw_socket(zmq.DEALER)
    hog.connect(server.address)
    hog.send_multipart(protocol.encode(protocol.REQUEST, 1, b"x" * 200_000, b"my_server.foo"))
    # No answer: ZeroMQ dropped the oversized frame's connection. The hog
    # connects again; the first answer it gets is the one to its next request.
    hog.send_multipart(protocol.encode(protocol.REQUEST, 2, b"small", b"my_server.foo"))
    answer = protocol.decode(hog.recv_multipart())
    assert (answer.msg_id, answer.payload) == (2, b"you sent me small")
    with Client(server.address, "my_server") as client:
        assert client.job("foo", b"x") == b"you sent me x"


def test_bind_conflict_raises_in_caller(serve: Serve) -> None:
    first = serve(quiet())
    second = MyServer("my_server", first.address, log_stdout=False)
    with pytest.raises(AddressError, match="cannot bind"):
        second.start(background=True)
    second.stop()


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="server name"):
        MyServer("", "tcp://127.0.0.1:0")
    with pytest.raises(AddressError, match="'localhost:5555' is not a ZeroMQ endpoint"):
        MyServer("s", "localhost:5555")
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        Client("tcp://127.0.0.1:1", "s", timeout=0)


def test_crash_of_serving_thread_is_reported_by_stop(serve: Serve) -> None:
    class Fatal(BaseException):
        pass

    class Doomed(Server):
        def die(self, message: bytes) -> bytes:
            raise Fatal("the end")

    server = quiet(Doomed, "doomed")
    server.start(background=True)
    with Client(server.address, "doomed", timeout=0.5) as client:
        with pytest.raises(RequestTimeout):
            client.job("die", b"x")
    with pytest.raises(ServerCrashed, match="server 'doomed' crashed") as info:
        server.stop()
    assert isinstance(info.value.__cause__, Fatal)


def test_log_address_pushes_log_lines(
    serve: Serve, raw_socket: Callable[[int], zmq.Socket]
) -> None:
    collector = raw_socket(zmq.PULL)
    port = collector.bind_to_random_port("tcp://127.0.0.1")
    server = serve(
        MyServer("my_server", "tcp://127.0.0.1:0", f"tcp://127.0.0.1:{port}", log_stdout=False)
    )
    with Client(server.address, "my_server") as client:
        client.job("foo", b"x")
    started, line = collector.recv().decode(), collector.recv().decode()
    assert f" - my_server - INFO - my_server (standalone) serving: rep {server.address};" in started
    assert line.endswith(" - my_server - WARNING - Got a message")


def test_a_server_that_does_not_speak_pylm_is_a_protocol_error(
    raw_socket: Callable[[int], zmq.Socket],
) -> None:
    foreign = raw_socket(zmq.ROUTER)
    port = foreign.bind_to_random_port("tcp://127.0.0.1")

    def answer_junk() -> None:
        for junk in (b"HTTP/1.1 400 Bad Request", b"ok"):
            peer, *_ = foreign.recv_multipart()
            foreign.send_multipart([peer, junk])

    thread = threading.Thread(target=answer_junk)
    thread.start()
    with Client(f"tcp://127.0.0.1:{port}", "my_server", timeout=5) as client:
        with pytest.raises(pylm.ProtocolError, match=r"not pylm: b'HTTP/1.1 400"):
            client.job("foo", b"x")  # the first call takes the careful way
        with pytest.raises(pylm.ProtocolError, match=r"answered 'foo' with .* not pylm: b'ok'"):
            client.job("foo", b"x")  # the fast path
    thread.join(5)


def test_send_frame_sends_like_socket_send(raw_socket: Callable[[int], zmq.Socket]) -> None:
    # The hot paths' send (pyzmq's compiled send, without its Python wrapper)
    # keeps Socket.send's meaning: frames, SNDMORE, and zmq.Again for NOBLOCK.
    pull = raw_socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = raw_socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    send_frame(push, b"one", zmq.SNDMORE)
    send_frame(push, b"two")
    assert pull.poll(5000)
    assert pull.recv_multipart() == [b"one", b"two"]
    lonely = raw_socket(zmq.PUSH)  # no peer: nowhere to queue the frame
    with pytest.raises(zmq.Again):
        send_frame(lonely, b"x", zmq.NOBLOCK)


def test_close_listener_frees_the_address_at_once() -> None:
    """libzmq closes a listener in its I/O thread after close() returns:
    with close_socket a bind of the same port at once fails now and then
    (about 1 time in 4 here); close_listener waits for it."""
    context = zmq.Context.instance()
    for _ in range(100):
        listening = context.socket(zmq.ROUTER)
        port = listening.bind_to_random_port("tcp://127.0.0.1")
        close_listener(listening)
        assert listening.closed
        with context.socket(zmq.ROUTER) as again:
            again.bind(f"tcp://127.0.0.1:{port}")  # raises EADDRINUSE if still listening


def test_a_stopped_server_frees_its_address() -> None:
    first = quiet()
    first.start(background=True)
    address = first.address
    assert address is not None
    first.stop()
    with MyServer("my_server", address, log_stdout=False), Client(address, "my_server") as client:
        assert client.job("foo", b"x") == b"you sent me x"
