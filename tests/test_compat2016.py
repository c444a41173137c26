"""What users of the 2016 pylm find as they knew it: LoopClient's keyword
names, ``job(..., messages=N)`` on the streaming clients, and a cache with
``set``/``get``/``delete`` on every server kind. Real servers, real sockets
(and a real etcd for the by-name test)."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq
from helpers import ANY

from pylm import protocol
from pylm.cache import encode_set
from pylm.chained import LastServer, LoopClient
from pylm.chained import Server as Stage
from pylm.demo import Last, Step1
from pylm.errors import (
    PayloadTooLarge,
    ProtocolError,
    PylmError,
    RequestTimeout,
    UnknownKey,
)
from pylm.parallel import Client as ParallelClient
from pylm.parallel import Hub, Master, Worker
from pylm.registry import Registry
from pylm.security import generate_keys
from pylm.standalone import AsyncClient, Client, Server
from pylm.testing import wait_for

Serve = Callable[[Any], Any]
BEAT = 0.2


class Pipeline:
    """step1 -> last, on OS-chosen ports."""

    def __init__(self, serve: Serve) -> None:
        self.last = serve(Last("last", ANY, ANY, ANY, log_stdout=False))
        self.step1 = serve(
            Step1("step1", ANY, self.last.address, "last.baz", ANY, log_stdout=False)
        )


@pytest.fixture
def pipeline(serve: Serve) -> Pipeline:
    return Pipeline(serve)


class Cached(Server):
    def prefixed(self, message: bytes) -> bytes:
        return self.cache.get("prefix", b"") + message

    def get(self, message: bytes) -> bytes:  # a function named like a cache call
        return b"function get: " + message


class Squarer(Worker):
    def square(self, message: bytes) -> bytes:
        return str(int(message) ** 2).encode()


@pytest.fixture
def master(serve: Serve) -> Master:
    master = serve(Master("m", ANY, ANY, heartbeat=BEAT, log_stdout=False))
    serve(Squarer("w", "m", master.back, heartbeat=BEAT, log_stdout=False))
    return master


# ------------------------------------------------------ positional options


# Each server's positional parameters, in the 2016 order (docs/migrating.md).
OPTIONS_2016 = ["log_address", "perf_address", "ping_address", "log_level", "messages"]
PARALLEL_2016 = ["log_address", "log_level", "messages"]
POSITIONAL_2016 = [
    (Server, ["name", "rep_address", *OPTIONS_2016]),
    (Stage, ["name", "pull_address", "next_address", "next_call", "db_address", *OPTIONS_2016]),
    (LastServer, ["name", "pull_address", "push_address", "db_address", *OPTIONS_2016]),
    (Master, ["name", "front_address", "workers_address", *PARALLEL_2016]),
    (Worker, ["name", "master", "workers_address", *PARALLEL_2016]),
    (Hub, ["name", "pull_address", "next_address", "next_call", "db_address", *PARALLEL_2016]),
]
OPTION_DEFAULTS = {
    "log_address": None,
    "perf_address": None,
    "ping_address": None,
    "log_level": logging.INFO,
    "messages": sys.maxsize,
}


@pytest.mark.parametrize(("server", "names"), POSITIONAL_2016, ids=lambda x: getattr(x, "kind", ""))
def test_every_server_keeps_the_2016_positional_options_in_place(
    server: type, names: list[str]
) -> None:
    parameters = inspect.signature(server).parameters.values()
    positional = [p for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in positional] == names
    for parameter in positional:
        if parameter.name in OPTION_DEFAULTS:
            assert parameter.default == OPTION_DEFAULTS[parameter.name], parameter.name


def test_the_2016_perf_and_ping_addresses_warn_on_every_server_that_takes_them() -> None:
    nowhere = "tcp://127.0.0.1:9"
    made = {
        "standalone": lambda *old: Server("s", ANY, None, *old, log_stdout=False),
        "chained": lambda *old: Stage("s", ANY, nowhere, "n.f", ANY, None, *old, log_stdout=False),
        "last": lambda *old: LastServer("s", ANY, ANY, ANY, None, *old, log_stdout=False),
    }
    for kind, make in made.items():
        with pytest.warns(DeprecationWarning, match="perf_address='tcp://x:1' is ignored"):
            make("tcp://x:1")
        with pytest.warns(DeprecationWarning, match="ping_address='tcp://x:2' is ignored"):
            make(None, "tcp://x:2")
        with pytest.raises(ValueError, match="messages must be a non-negative int, got -1"):
            make(None, None, logging.INFO, -1)
        assert make(None, None, logging.DEBUG, 3).messages == 3, kind


def test_the_parallel_servers_take_log_level_and_messages_in_place() -> None:
    made = [
        lambda *old: Master("m", ANY, ANY, None, *old, log_stdout=False),
        lambda *old: Worker("w", "m", ANY, None, *old, log_stdout=False),
        lambda *old: Hub("h", ANY, "tcp://127.0.0.1:9", "n.f", ANY, None, *old, log_stdout=False),
    ]
    for make in made:
        with pytest.raises(ValueError, match="messages must be a non-negative int, got -1"):
            make(logging.INFO, -1)
        server = make(logging.DEBUG, 3)
        assert (server.messages, server.logger.level) == (3, logging.DEBUG)


# ------------------------------------------------------------------ LoopClient


def test_loop_client_keywords_name_the_stages_arguments_as_in_2016(pipeline: Pipeline) -> None:
    """push_address: the last stage's push_address; pull_address: the first
    stage's pull_address (the 2016 documented example, keywords and all)."""
    with LoopClient(
        push_address=pipeline.last.push,
        pull_address=pipeline.step1.address,
        db_address=pipeline.step1.db,
        server_name="step1",
        announce=False,
    ) as client:
        assert client.push_addresses == [pipeline.last.push]
        assert list(client.job("foo", [b"a message"], messages=1)) == [
            b"ACK: you sent me a message"
        ]
    positional = LoopClient(
        pipeline.last.push, pipeline.step1.address, pipeline.step1.db, "step1", announce=False
    )
    with positional as client:  # the 2016 positional order, unchanged
        assert list(client.job("foo", [b"x"])) == [b"ACK: you sent me x"]


def test_swapped_addresses_fail_at_once_saying_which_is_which(pipeline: Pipeline) -> None:
    with LoopClient(
        pipeline.step1.address,  # the first stage's pull_address, as push_address
        pipeline.last.push,  # the last stage's push_address, as pull_address
        pipeline.step1.db,
        "step1",
        timeout=10,
        announce=False,
    ) as client:
        began = time.monotonic()
        with pytest.raises(PylmError) as caught:
            list(client.job("foo", [b"x"]))
        assert time.monotonic() - began < 10  # not the 10 s timeout
        assert not isinstance(caught.value, RequestTimeout)
        assert "handshake" in str(caught.value)
        assert "push_address" in str(caught.value) and "pull_address" in str(caught.value)
        with pytest.raises(PylmError, match="handshake"):  # again, at once
            list(client.job("foo", [b"x"]))


def test_only_the_pull_address_wrong_fails_at_once(pipeline: Pipeline) -> None:
    """Results from the right place, jobs sent to a last stage's ROUTER."""
    with LoopClient(
        pipeline.last.push, pipeline.last.push, pipeline.step1.db, "step1", announce=False
    ) as client:
        with pytest.raises(PylmError, match="not a first stage's pull socket"):
            list(client.job("foo", [b"x"], timeout=10))


def test_the_wrong_pull_address_is_named_when_the_monitor_reports_late(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The monitors' events come from libzmq's I/O thread, after the
    greeting of the last stage may have ended: the client waits for its
    jobs connection's first attempt to be reported, then names the wrong
    address (the jobs would otherwise wait out the timeout)."""
    from pylm.chained import wiring

    note = wiring._Watch._note

    def late(watch: Any, event: Any) -> None:
        time.sleep(0.2)  # a loaded machine: the monitor thread runs late
        note(watch, event)

    monkeypatch.setattr(wiring._Watch, "_note", late)
    with LoopClient(
        pipeline.last.push, pipeline.last.push, pipeline.step1.db, "step1", announce=False
    ) as client:
        with pytest.raises(PylmError, match="not a first stage's pull socket"):
            list(client.job("foo", [b"x"], timeout=10))


def test_a_cache_address_as_push_address_is_named(pipeline: Pipeline) -> None:
    with LoopClient(
        pipeline.step1.db, pipeline.step1.address, pipeline.step1.db, "step1", announce=False
    ) as client:
        with pytest.raises(PylmError, match=r"cache \(its db_address\).*not a last stage"):
            list(client.job("foo", [b"x"], timeout=10))


def test_a_peer_that_drops_connections_is_not_taken_for_swapped_addresses(
    serve: Serve, free_tcp_address: str
) -> None:
    """A port that accepts and closes connections for a while (a proxy whose
    backend is not up yet, a stage stopping) is retried by ZeroMQ: the
    client reaches the last stage once it listens there, instead of calling
    its addresses swapped for good."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the stage binds it next
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.05)
    results = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    accepted = 0
    done = threading.Event()

    def accept_and_close() -> None:
        nonlocal accepted
        while not done.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            connection.close()
            accepted += 1

    dropper = threading.Thread(target=accept_and_close, daemon=True)
    dropper.start()
    try:
        step1 = serve(Step1("step1", ANY, free_tcp_address, "last.baz", ANY, log_stdout=False))
        with LoopClient(results, step1.address, step1.db, "step1", announce=False) as client:
            wait_for(lambda: accepted >= 2, 10, "two connections dropped")
            done.set()
            dropper.join(5)
            listener.close()
            serve(Last("last", free_tcp_address, results, ANY, log_stdout=False))
            assert list(client.job("foo", [b"x"], timeout=10)) == [b"ACK: you sent me x"]
    finally:
        done.set()
        dropper.join(5)
        listener.close()


def test_a_job_timeout_of_a_client_by_address_says_what_to_check(
    pipeline: Pipeline, free_tcp_address: str
) -> None:
    with LoopClient(
        pipeline.last.push, free_tcp_address, pipeline.step1.db, "step1", announce=False
    ) as client:
        with pytest.raises(RequestTimeout, match="first stage's pull_address this client's"):
            list(client.job("foo", [b"x"], timeout=0.5))


def test_loop_client_messages_ends_after_that_many_results(pipeline: Pipeline) -> None:
    with LoopClient(
        pipeline.last.push, pipeline.step1.address, pipeline.step1.db, "step1", announce=False
    ) as client:
        endless = itertools.repeat(b"m")
        assert list(client.job("foo", endless, messages=5)) == [b"ACK: you sent me m"] * 5
        assert list(client.job("foo", [b"a", b"b"], messages=0)) == []
        # More than the jobs give: ends with the jobs.
        assert sorted(client.job("foo", [b"a", b"b"], messages=10)) == [
            b"ACK: you sent me a",
            b"ACK: you sent me b",
        ]
        with pytest.raises(ValueError, match="messages"):
            list(client.job("foo", [b"a"], messages=-1))


# ------------------------------------------------------------------ parallel


def test_parallel_client_messages_ends_after_that_many_results(master: Master) -> None:
    assert master.front is not None
    with ParallelClient(master.front, "m", timeout=10) as client:
        numbers = (b"%d" % n for n in itertools.count())
        assert len(list(client.job("square", numbers, messages=7))) == 7
        assert client.eval("square", b"3") == b"9"  # usable again at once


def test_master_cache_from_its_client(master: Master) -> None:
    assert master.front is not None
    with ParallelClient(master.front, "m", timeout=10) as client:
        key = client.set(b"some data")
        assert client.get(key) == b"some data"
        assert master.cache[key] == b"some data"
        assert client.set(b"v", "mine") == "mine"
        # Cache calls have a socket of their own: they work while jobs are out.
        results = client.job("square", [b"2", b"3"])
        assert next(results) in (b"4", b"9")
        assert client.get("mine") == b"v"
        assert next(results) in (b"4", b"9")
        client.delete(key)
        with pytest.raises(UnknownKey):
            client.get(key)
        with pytest.raises(UnknownKey):
            client.delete(key)


def test_master_cache_in_plain_with_keys_in_the_environment(
    pylm_registry: Registry,
    serve: Serve,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client by name with PYLM_CURVE_KEYS set talks in plain to a master
    that registered no key: its cache calls too."""
    _, secret = generate_keys("client", tmp_path)
    serve(Master("plain_m", registry=pylm_registry, log_stdout=False))
    monkeypatch.setenv("PYLM_CURVE_KEYS", str(secret))
    with ParallelClient("plain_m", registry=pylm_registry, timeout=10) as client:
        assert client.curve is None
        key = client.set(b"v")
        assert client.get(key) == b"v"


def test_master_counts_and_answers_a_malformed_cache_request(
    master: Master, raw_socket: Callable[[int], zmq.Socket]
) -> None:
    assert master.front is not None and master.stats is not None
    socket = raw_socket(zmq.DEALER)
    socket.connect(master.front)
    socket.send_multipart(protocol.encode(protocol.CACHE, 5, b"\x01", b"m.set"))  # half a size
    answer = protocol.decode(socket.recv_multipart())
    assert answer.msg_id == 5
    with pytest.raises(ProtocolError, match="key size"):
        protocol.result_of(answer)
    assert master.stats.malformed_by["payload"] == 1


# ------------------------------------------------------------------ standalone


def test_standalone_cache_from_the_client(serve: Serve) -> None:
    server = serve(Cached("cached", ANY, log_stdout=False))
    with Client(server.address, "cached", timeout=10) as client:
        assert client.set(b"pre-", "prefix") == "prefix"
        assert client.job("prefixed", b"x") == b"pre-x"  # the server's functions see it
        assert client.job("get", b"y") == b"function get: y"  # a function, not the cache
        assert client.get("prefix") == b"pre-"
        key = client.set(b"\x00" * 100_000)  # a value in a frame of its own
        assert len(key) == 32 and client.get(key) == b"\x00" * 100_000
        client.delete(key)
        with pytest.raises(UnknownKey) as caught:
            client.get(key)
        assert caught.value.key == key
        with pytest.raises(TypeError):
            client.set("text")  # type: ignore[arg-type]
        functions = server.stats.functions
        assert functions["prefixed"].calls == functions["get"].calls == 1  # cache calls: none


def test_standalone_cache_limit(serve: Serve) -> None:
    server = serve(Cached("cached", ANY, log_stdout=False))
    server.cache.limit = 1000
    with Client(server.address, "cached", timeout=10) as client:
        client.set(b"a" * 500, "a")
        with pytest.raises(PayloadTooLarge):
            client.set(b"b" * 500, "b")  # 500 + 160 overhead each: over 1000
        assert "b" not in server.cache and client.get("a") == b"a" * 500


def test_standalone_counts_and_answers_malformed_cache_requests(
    serve: Serve, raw_socket: Callable[[int], zmq.Socket]
) -> None:
    server = serve(Cached("cached", ANY, log_stdout=False))
    socket = raw_socket(zmq.REQ)  # any REQ socket speaks to a standalone server
    socket.connect(server.address)
    hostile = [
        (b"cached.set", b"\x00"),  # no whole key size
        (b"cached.set", b"\x00\x09key"),  # a key size over the payload
        (b"cached.get", b"\xff\xfe"),  # a key that is not UTF-8
        (b"nodot", b"k"),  # not server.function
    ]
    for msg_id, (target, payload) in enumerate(hostile, 1):
        socket.send_multipart(protocol.encode(protocol.CACHE, msg_id, payload, target))
        answer = protocol.decode(socket.recv_multipart())
        assert answer.msg_id == msg_id
        with pytest.raises(ProtocolError):
            protocol.result_of(answer)
    assert server.stats.malformed_by["payload"] == len(hostile)
    socket.send_multipart(protocol.encode(protocol.CACHE, 9, encode_set(b"v", "k"), b"cached.set"))
    assert protocol.result_of(protocol.decode(socket.recv_multipart())) == b"k"
    assert server.cache["k"] == b"v"


def test_async_client_cache(serve: Serve) -> None:
    server = serve(Cached("cached", ANY, log_stdout=False))

    async def main() -> None:
        async with AsyncClient(server.address, "cached", timeout=10) as client:
            keys = await asyncio.gather(*(client.set(b"%d" % n) for n in range(20)))
            values = await asyncio.gather(*(client.get(key) for key in keys))
            assert values == [b"%d" % n for n in range(20)]
            await client.delete(keys[0])
            with pytest.raises(UnknownKey):
                await client.get(keys[0])
            assert await client.job("get", b"z") == b"function get: z"

    asyncio.run(main())


def test_cache_calls_by_name_go_to_one_instance(pylm_registry: Registry, serve: Serve) -> None:
    """Every instance keeps its own cache: a client by name sends its cache
    calls to one of them, so what it set it gets back."""
    servers = [serve(Cached("svc", log_stdout=False, registry=pylm_registry)) for _ in range(2)]
    with Client("svc", registry=pylm_registry, timeout=10) as client:
        assert len(client.endpoints) == 2
        keys = [client.set(b"%d" % n) for n in range(10)]
        assert [client.get(key) for key in keys] == [b"%d" % n for n in range(10)]
        assert sorted(len(server.cache) for server in servers) == [0, 10]

    async def main() -> None:
        async with AsyncClient("svc", registry=pylm_registry, timeout=10) as client:
            key = await client.set(b"async")
            assert [await client.get(key) for _ in range(5)] == [b"async"] * 5

    asyncio.run(main())


def test_cache_calls_stay_with_the_instance_they_used_when_another_joins(
    pylm_registry: Registry, serve: Serve
) -> None:
    """What a client set in its server's only instance, it gets back from
    there once a second instance is listed too, whichever sorts first."""
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    low, high = sorted(f"tcp://127.0.0.1:{port}" for port in ports)
    first = serve(Cached("svc", high, log_stdout=False, registry=pylm_registry))
    with Client("svc", registry=pylm_registry, timeout=10) as client:
        key = client.set(b"kept")
        serve(Cached("svc", low, log_stdout=False, registry=pylm_registry))

        def both_listed() -> bool:
            client.ping()  # a call applies what the registry lists now
            return len(client.endpoints) == 2

        wait_for(both_listed, 10, "the second instance listed")
        assert client.get(key) == b"kept"
        assert list(first.cache) == [key]
