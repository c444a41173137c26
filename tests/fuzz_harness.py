"""Harnesses for fuzzing one port kind of a live pylm server (tests/test_fuzz.py).

A :class:`Port` starts the server(s) it needs in this process on OS-chosen
ports, sends :class:`~fuzz_strategies.Hostile` inputs to one port (in the
envelope that port expects, a wrong one, or as raw TCP), and checks that a
fresh well-behaved client still gets correct answers. A server found crashed
or frozen is replaced by a fresh one before the next input, so that every
input is tried against a healthy server and Hypothesis can minimise the one
that breaks it. A watchdog stops a server whose input makes this process's
memory run away (it raises :class:`MemoryBomb` in the serving thread), so a
claim of 10^18 slots fails the test instead of the machine.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import socket as sockets
import struct
import threading
import time
from collections.abc import Callable

import zmq
from fuzz_strategies import ROGUE_ID, Hostile
from helpers import ANY
from prometheus_client import REGISTRY
from servers import Doer, Echo

from pylm import protocol
from pylm.base import BaseServer
from pylm.cache import CacheClient
from pylm.chained import LastServer, LoopClient, Server, Sink
from pylm.errors import PylmError
from pylm.parallel import Client as ParallelClient
from pylm.parallel import Hub, Master
from pylm.standalone import Client

CHECK_TIMEOUT = float(os.environ.get("PYLM_FUZZ_CHECK_TIMEOUT") or 1.5)  # s per check call
HEARTBEAT = 0.1  # s: a rogue "worker" that never answers loses its jobs fast
RUNAWAY = 300 * 2**20  # bytes of growth at which the watchdog stops the servers


class Step(Server):
    def echo(self, message: bytes) -> bytes:
        return message


class Last(LastServer):
    def echo(self, message: bytes) -> bytes:
        return message


class Drain(Sink):
    def echo(self, message: bytes) -> bytes:
        return message


class MemoryBomb(Exception):
    """Raised by the watchdog in a serving thread whose memory ran away."""


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def malformed_total(name: str) -> float:
    """``pylm_messages_malformed_total`` of server ``name``, summed over any
    labels besides ``server`` (a ``reason`` label, say), read as Prometheus does."""
    total = 0.0
    for family in REGISTRY.collect():
        if family.name == "pylm_messages_malformed":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("server") == name:
                    total += sample.value
    return total


def tcp_port(address: str) -> int:
    return int(address.rpartition(":")[2])


def send_tcp(address: str, data: bytes, reset: bool) -> None:
    """Connect to ``address`` with a plain socket, write ``data``, then reset or close."""
    with sockets.create_connection(("127.0.0.1", tcp_port(address)), timeout=2) as conn:
        try:
            conn.sendall(data)
            conn.settimeout(0.02)
            conn.recv(4096)  # whatever the server said (its greeting), if anything
        except OSError:
            pass
        if reset:
            conn.setsockopt(sockets.SOL_SOCKET, sockets.SO_LINGER, struct.pack("ii", 1, 0))


_payloads = itertools.count()


def fresh_payload() -> bytes:
    return b"still here %d" % next(_payloads)


class Port:
    """One port kind under fuzz. Subclasses say what to start, where the
    port is, how to send to it and how a well-behaved client checks it."""

    name = "port"
    counted_by = ""  # the server whose malformed counter covers this port
    envelope_first: tuple[bytes, ...] = ()  # frames the port's proper envelope puts first
    socket_type = zmq.DEALER

    def __init__(self) -> None:
        self.servers: list[BaseServer] = []
        self.crashes: list[str] = []  # what stopping broken servers raised
        self.restarts = 0
        self._sender: zmq.Socket | None = None
        self._extra: list[zmq.Socket] = []
        self._watch_stop = threading.Event()
        self._watch_base = rss_bytes()
        self.runaway = False
        self._watchdog = threading.Thread(target=self._watch, name="fuzz-watchdog", daemon=True)
        self.broken = False
        self.start()
        self._watchdog.start()

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self.servers = self._start()
        self._sender = self._socket(self.socket_type, self.address)

    def _start(self) -> list[BaseServer]:
        raise NotImplementedError

    def _serve(self, server: BaseServer) -> BaseServer:
        server.start(background=True)
        self.servers.append(server)
        return server

    @property
    def address(self) -> str:
        raise NotImplementedError

    def _socket(self, kind: int, address: str, identity: bytes | None = None) -> zmq.Socket:
        socket = zmq.Context.instance().socket(kind)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDTIMEO, 2000)
        if identity is not None:
            socket.setsockopt(zmq.ROUTING_ID, identity)
        socket.connect(address)
        self._extra.append(socket)
        return socket

    def stop_servers(self) -> None:
        """Stop every server; record (do not raise) what a crashed one raised."""
        for socket in self._extra:
            socket.close(linger=0)
        self._extra.clear()
        self._sender = None
        for server in reversed(self.servers):
            try:
                server.stop()
            except Exception as exc:  # ServerCrashed, TimeoutError: the finding
                self.crashes.append(f"{server.name}: {exc!r}")
        self.servers = []

    def close(self) -> None:
        self._watch_stop.set()
        self._watchdog.join(5)
        self.stop_servers()

    def renew_if_broken(self) -> None:
        """Before an input: a fresh set of servers if the last input broke them."""
        if self.broken or self.runaway:
            self.stop_servers()
            self.restarts += 1
            self.runaway = False
            self._watch_base = rss_bytes()
            self.start()
            self.broken = False

    def _watch(self) -> None:
        while not self._watch_stop.wait(0.02):
            if self.runaway or rss_bytes() - self._watch_base < RUNAWAY:
                continue
            self.runaway = True
            for server in list(self.servers):
                thread = server._thread
                if thread is not None and thread.ident is not None and thread.is_alive():
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(
                        ctypes.c_ulong(thread.ident), ctypes.py_object(MemoryBomb)
                    )

    # -------------------------------------------------------------- inputs

    def send(self, hostile: Hostile) -> None:
        if hostile.tcp is not None:
            send_tcp(self.address, hostile.tcp, hostile.reset)
            return
        assert self._sender is not None
        frames = list(hostile.frames)
        if hostile.envelope == "ok":
            frames = [*self.envelope_first, *frames]
        elif hostile.envelope == "extra-empty":
            frames = [b"", *self.envelope_first, *frames]
        try:
            self._sender.send_multipart(frames)
        except zmq.Again:
            pass  # the port takes nothing now: the check will tell whether that is a freeze
        self._discard(self._sender)

    @staticmethod
    def _discard(socket: zmq.Socket) -> None:
        while socket.poll(0):
            socket.recv_multipart()

    # -------------------------------------------------------------- checks

    def alive(self) -> list[str]:
        """The servers that stopped serving."""
        return [server.name for server in self.servers if not server.running]

    def check(self, calls: int) -> None:
        """``calls`` calls of a fresh well-behaved client, each answered
        correctly within CHECK_TIMEOUT; raise AssertionError otherwise."""
        raise NotImplementedError

    def counter(self) -> float:
        return malformed_total(self.counted_by)


def _expect(answer: bytes, payload: bytes, where: str) -> None:
    assert answer == payload, f"{where}: wrong answer {answer[:80]!r} for {payload!r}"


def _call(where: str, call: Callable[[], None]) -> None:
    try:
        call()
    except PylmError as exc:  # RequestTimeout above all: a lost answer, or a frozen server
        raise AssertionError(f"{where}: a well-behaved call failed: {exc!r}") from None


# ------------------------------------------------------------------ standalone


class StandalonePort(Port):
    name = "standalone"
    counted_by = "echo"
    envelope_first = (b"",)  # a REQ's empty delimiter

    def _start(self) -> list[BaseServer]:
        self.servers = []
        self.server = self._serve(Echo("echo", ANY, log_stdout=False))
        return self.servers

    @property
    def address(self) -> str:
        return str(self.server.address)

    def check(self, calls: int) -> None:
        with Client(self.address, "echo", timeout=CHECK_TIMEOUT) as client:
            for payload in [fresh_payload() for _ in range(calls)]:
                _call("standalone", lambda p=payload: _expect(client.job("echo", p), p, "echo"))


# ------------------------------------------------------------------ pipelines


class _PipelinePort(Port):
    """step -> last (or step -> sink, or hub -> last with a worker)."""

    first = "step"

    def _start(self) -> list[BaseServer]:
        self.servers = []
        self.last = self._serve(self._last())
        self.head = self._serve(
            Step("step", ANY, self.last.address, f"{self.last.name}.echo", ANY, log_stdout=False)
        )
        return self.servers

    def _last(self) -> LastServer:
        return Last("last", ANY, ANY, ANY, log_stdout=False)

    def check(self, calls: int) -> None:
        payloads = [fresh_payload() for _ in range(calls)]
        with LoopClient(
            self.last.push,
            self.head.address,
            self.head.db,
            self.first,
            announce=False,
            timeout=CHECK_TIMEOUT,
        ) as client:
            got: list[bytes] = []
            _call("pipeline", lambda: got.extend(client.job("echo", payloads)))
            assert sorted(got) == sorted(payloads), f"pipeline: answers {got} for {payloads}"


class StagePullPort(_PipelinePort):
    name = "stage-pull"
    counted_by = "step"
    socket_type = zmq.PUSH

    @property
    def address(self) -> str:
        return str(self.head.address)


class StageDbPort(_PipelinePort):
    name = "stage-db"
    counted_by = "step"
    envelope_first = (b"",)

    @property
    def address(self) -> str:
        return str(self.head.db)

    def check(self, calls: int) -> None:
        super().check(calls)  # a stuck cache socket stops the stage's jobs too
        with CacheClient(self.address, self.counted_by, timeout=CHECK_TIMEOUT) as cache:
            payload = fresh_payload()
            _call("cache", lambda: _expect(cache.get(cache.set(payload)), payload, "cache"))


class LastPullPort(_PipelinePort):
    name = "last-pull"
    counted_by = "last"
    socket_type = zmq.PUSH

    @property
    def address(self) -> str:
        return str(self.last.address)


class LastPushPort(_PipelinePort):
    """The last stage's results socket, where clients say hello (PING)."""

    name = "last-push"
    counted_by = "last"

    @property
    def address(self) -> str:
        return str(self.last.push)


class LastDbPort(StageDbPort):
    name = "last-db"
    counted_by = "last"

    @property
    def address(self) -> str:
        return str(self.last.db)


class SinkPullPort(_PipelinePort):
    name = "sink-pull"
    counted_by = "sink"
    socket_type = zmq.PUSH

    def _last(self) -> LastServer:
        return Drain("sink", ANY, ANY, ANY, log_stdout=False)

    @property
    def address(self) -> str:
        return str(self.last.address)


class SinkPushPort(SinkPullPort):
    name = "sink-push"
    socket_type = zmq.DEALER

    @property
    def address(self) -> str:
        return str(self.last.push)


# ------------------------------------------------------------------ master and hub


class MasterFrontPort(Port):
    name = "master-front"
    counted_by = "m"

    def _start(self) -> list[BaseServer]:
        self.servers = []
        self.master = self._serve(
            Master("m", ANY, ANY, heartbeat=HEARTBEAT, misses=3, log_stdout=False)
        )
        self._serve(Doer("w", "m", self.master.back, heartbeat=HEARTBEAT, log_stdout=False))
        return self.servers

    @property
    def address(self) -> str:
        return str(self.master.front)

    def check(self, calls: int) -> None:
        with ParallelClient(self.master.front, "m", timeout=CHECK_TIMEOUT) as client:
            for payload in [fresh_payload() for _ in range(calls)]:
                _call("master", lambda p=payload: _expect(client.eval("echo", p), p, "m"))


class MasterWorkersPort(MasterFrontPort):
    """The master's workers port, from a rogue worker whose routing id the
    hellos name (``ROGUE_ID``). It never answers the jobs it gets: the
    master takes them back after ``heartbeat * misses``, within the check."""

    name = "master-workers"

    def start(self) -> None:
        self.servers = self._start()
        self._sender = self._socket(zmq.DEALER, self.address, ROGUE_ID)

    @property
    def address(self) -> str:
        return str(self.master.back)


class HubPullPort(_PipelinePort):
    name = "hub-pull"
    counted_by = "hub"
    first = "hub"
    socket_type = zmq.PUSH

    def _start(self) -> list[BaseServer]:
        self.servers = []
        self.last = self._serve(self._last())
        self.head = self.hub = self._serve(
            Hub(
                "hub",
                ANY,
                self.last.address,
                "last.echo",
                ANY,
                workers_address=ANY,
                heartbeat=HEARTBEAT,
                misses=3,
                log_stdout=False,
            )
        )
        self._serve(Doer("w", "hub", self.hub.back, heartbeat=HEARTBEAT, log_stdout=False))
        return self.servers

    @property
    def address(self) -> str:
        return str(self.hub.address)


class HubWorkersPort(HubPullPort):
    name = "hub-workers"
    socket_type = zmq.DEALER

    def start(self) -> None:
        self.servers = self._start()
        self._sender = self._socket(zmq.DEALER, self.address, ROGUE_ID)

    @property
    def address(self) -> str:
        return str(self.hub.back)


# ------------------------------------------------------------------ worker


class WorkerPort(Port):
    """A worker's sockets as they face the network: its job socket and its
    heartbeat socket, both connected to a master; here a fake master (a
    ROUTER the test binds) sends the hostile input and the checks' jobs."""

    name = "worker"
    counted_by = "w"

    def start(self) -> None:
        self.servers = []
        router = zmq.Context.instance().socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.SNDTIMEO, 2000)
        router.bind("tcp://127.0.0.1:*")
        self._extra.append(router)
        self.router = router
        self.fake = router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.worker = self._serve(Doer("w", "m", self.fake, heartbeat=HEARTBEAT, log_stdout=False))
        self.beat_id: bytes | None = None
        self._ids = itertools.count(1)
        deadline = time.monotonic() + 5
        hello = False
        while (not hello or self.beat_id is None) and time.monotonic() < deadline:
            if router.poll(100):
                self._note(router.recv_multipart())
                hello = hello or self._hello_seen
        assert hello, "the worker never said hello"

    _hello_seen = False

    def _note(self, frames: list[bytes]) -> list[bytes]:
        sender = frames[0]
        if sender == self.worker.identity:
            if len(frames) > 1 and frames[1][3:4] == bytes([protocol.PING]):
                self._hello_seen = True
        else:
            self.beat_id = sender
        return frames

    @property
    def address(self) -> str:
        return self.fake

    def send(self, hostile: Hostile) -> None:
        assert hostile.tcp is None, "a worker binds no port"
        to = self.worker.identity if hostile.to == "job" or self.beat_id is None else self.beat_id
        frames = list(hostile.frames)
        if hostile.envelope == "extra-empty":
            frames = [b"", *frames]
        try:
            self.router.send_multipart([to, *frames])
        except zmq.ZMQError:
            pass
        while self.router.poll(0):
            self._note(self.router.recv_multipart())

    def check(self, calls: int) -> None:
        for _ in range(calls):
            payload = fresh_payload()
            number = next(self._ids) + 2**40
            job = protocol.encode(protocol.REQUEST, number, payload, b"m.echo")
            try:
                self.router.send_multipart([self.worker.identity, *job])
            except zmq.ZMQError as exc:
                raise AssertionError(f"worker: its job socket is gone: {exc!r}") from None
            deadline = time.monotonic() + CHECK_TIMEOUT
            while True:
                left = deadline - time.monotonic()
                assert left > 0, f"worker: no answer to job {number} within {CHECK_TIMEOUT} s"
                if not self.router.poll(int(left * 1000) + 1):
                    continue
                frames = self._note(self.router.recv_multipart())
                if frames[0] != self.worker.identity:
                    continue
                try:
                    message = protocol.decode(frames[1:])
                except PylmError:
                    continue
                if message.msg_id == number and message.kind != protocol.PING:
                    assert message.kind == protocol.REPLY, f"worker: {message!r}"
                    _expect(bytes(message.payload), payload, "worker")
                    break


PORTS: dict[str, type[Port]] = {
    cls.name: cls
    for cls in (
        StandalonePort,
        StagePullPort,
        StageDbPort,
        LastPullPort,
        LastPushPort,
        LastDbPort,
        SinkPullPort,
        SinkPushPort,
        MasterFrontPort,
        MasterWorkersPort,
        HubPullPort,
        HubWorkersPort,
        WorkerPort,
    )
}
