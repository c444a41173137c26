"""The systems under test: for each one, an echo server and a client driver.

Everything here runs inside a child process, one system per process. Each
function imports its own library when it is called, so a process loads only
the library it measures; above all, gevent (which zerorpc pulls in) never
enters the parent process or a pyzmq/pylm process.

A *server* function binds an echo service on 127.0.0.1 with a port the OS
picks, reports its address through ``ready`` and serves until its process is
ended. A *connect* function returns a :class:`Driver` that calls that service.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import zmq

__all__ = ["HOST", "PIPELINE_DEPTH", "SYSTEMS", "Driver", "System", "bind_random", "wait_until"]

HOST = "127.0.0.1"
SERVER_NAME = "bench"
PIPELINE_DEPTH = 32  # calls in flight in the pipelined case

Ready = Callable[[str], None]


class Driver(Protocol):
    """The client side of one system, in one client process."""

    def probe(self, payload: bytes) -> object:
        """Make one call and return its result as the library hands it over."""

    def run(self, payload: bytes, start: float, end: float) -> int:
        """Call the echo function from ``start`` to ``end`` (``time.monotonic``
        instants); return how many calls completed in between. Nothing is left
        in flight on return."""

    def close(self) -> None:
        """Release the connection."""


def wait_until(instant: float) -> None:
    """Sleep until ``time.monotonic()`` reaches ``instant``."""
    delay = instant - time.monotonic()
    if delay > 0:
        time.sleep(delay)


class BlockingDriver:
    """One call at a time: call, wait for the answer, call again."""

    def __init__(self, call: Callable[[bytes], object], close: Callable[[], object]) -> None:
        self._call = call
        self._close = close
        self.latencies: list[float] = []  # seconds, of each call the last run counted

    def probe(self, payload: bytes) -> object:
        return self._call(payload)

    def run(self, payload: bytes, start: float, end: float) -> int:
        call, clock = self._call, time.monotonic
        latencies: list[float] = []
        keep = latencies.append
        wait_until(start)
        before = clock()
        while True:
            call(payload)
            after = clock()
            if after > end:  # finished after the window: not counted
                self.latencies = latencies
                return len(latencies)
            keep(after - before)
            before = after

    def close(self) -> None:
        self._close()


class DealerDriver:
    """Raw pyzmq DEALER keeping ``depth`` messages in flight: one new message
    leaves each time an answer arrives."""

    def __init__(self, address: str, depth: int) -> None:
        import zmq

        self._depth = depth
        self._socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(address)

    def probe(self, payload: bytes) -> object:
        self._socket.send(payload)
        return self._socket.recv()

    def run(self, payload: bytes, start: float, end: float) -> int:
        send, recv, clock = self._socket.send, self._socket.recv, time.monotonic
        done = 0
        wait_until(start)
        for _ in range(self._depth):
            send(payload)
        in_flight = self._depth
        while in_flight:
            recv()
            if clock() > end:
                in_flight -= 1
            else:
                done += 1
                send(payload)
        return done

    def close(self) -> None:
        self._socket.close(linger=0)


class AsyncPylmDriver:
    """pylm ``AsyncClient`` with ``depth`` coroutines, each looping on calls."""

    def __init__(self, address: str, depth: int) -> None:
        from pylm.standalone import AsyncClient

        self._depth = depth
        self._loop = asyncio.new_event_loop()
        self._client = AsyncClient(address, SERVER_NAME)

    def probe(self, payload: bytes) -> object:
        return self._loop.run_until_complete(self._client.job("echo", payload))

    def run(self, payload: bytes, start: float, end: float) -> int:
        return self._loop.run_until_complete(self._measure(payload, start, end))

    async def _measure(self, payload: bytes, start: float, end: float) -> int:
        job, clock = self._client.job, time.monotonic

        async def caller() -> int:
            done = 0
            while True:
                await job("echo", payload)
                if clock() > end:
                    return done
                done += 1

        wait_until(start)  # blocking is fine: nothing is in flight yet
        counts = await asyncio.gather(*(caller() for _ in range(self._depth)))
        return sum(counts)

    def close(self) -> None:
        self._loop.run_until_complete(self._client.close())
        self._loop.close()


# --------------------------------------------------------------------- raw pyzmq


def bind_random(socket_type: int) -> tuple[zmq.Socket[bytes], str]:
    import zmq

    socket: zmq.Socket[bytes] = zmq.Context.instance().socket(socket_type)
    port = socket.bind_to_random_port(f"tcp://{HOST}")
    return socket, f"tcp://{HOST}:{port}"


def serve_raw_rep(ready: Ready) -> None:
    import zmq

    socket, address = bind_random(zmq.REP)
    ready(address)
    recv, send = socket.recv, socket.send
    while True:
        send(recv())


def serve_raw_router(ready: Ready) -> None:
    import zmq

    socket, address = bind_random(zmq.ROUTER)
    ready(address)
    recv, send = socket.recv_multipart, socket.send_multipart
    while True:
        send(recv())  # [routing id, payload] goes back as it came


def connect_raw_req(address: str) -> Driver:
    import zmq

    socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(address)
    send, recv = socket.send, socket.recv

    def call(payload: bytes) -> bytes:
        send(payload)
        return recv()

    return BlockingDriver(call, socket.close)


def connect_raw_dealer(address: str) -> Driver:
    return DealerDriver(address, PIPELINE_DEPTH)


# --------------------------------------------------------------------------- pylm


def serve_pylm(ready: Ready) -> None:
    import threading

    from pylm.standalone import Server

    class Echo(Server):
        def echo(self, message: bytes) -> bytes:
            return message

    server = Echo(SERVER_NAME, f"tcp://{HOST}:0", log_stdout=False)
    server.start(background=True)
    assert server.address is not None
    ready(server.address)
    threading.Event().wait()  # serve until the process is ended


def connect_pylm(address: str) -> Driver:
    from pylm.standalone import Client

    client = Client(address, SERVER_NAME)
    return BlockingDriver(partial(client.job, "echo"), client.close)


def serve_pylm_quiet(ready: Ready) -> None:
    """pylm's server with metrics off (``PYLM_METRICS=0``): what counting costs."""
    os.environ["PYLM_METRICS"] = "0"
    serve_pylm(ready)


def connect_pylm_quiet(address: str) -> Driver:
    os.environ["PYLM_METRICS"] = "0"
    return connect_pylm(address)


def connect_pylm_async(address: str) -> Driver:
    return AsyncPylmDriver(address, PIPELINE_DEPTH)


# ------------------------------------------------------------------------ zerorpc


def serve_zerorpc(ready: Ready) -> None:
    import zerorpc  # type: ignore[import-untyped]
    import zmq

    class Echo:
        def echo(self, message: bytes) -> bytes:
            return message

    server = zerorpc.Server(Echo())
    server.bind(f"tcp://{HOST}:*")
    # zerorpc does not say which port it got; its socket does.
    ready(server._events._socket.getsockopt_string(zmq.LAST_ENDPOINT))
    server.run()


def connect_zerorpc(address: str) -> Driver:
    import zerorpc

    client = zerorpc.Client()
    client.connect(address)
    return BlockingDriver(partial(client, "echo"), client.close)


# -------------------------------------------------------------------------- Pyro5


def _pyro5_msgpack() -> Any:
    import Pyro5  # type: ignore[import-untyped]
    import Pyro5.api  # type: ignore[import-untyped]

    Pyro5.config.SERIALIZER = "msgpack"
    return Pyro5.api


def serve_pyro5(ready: Ready) -> None:
    api = _pyro5_msgpack()

    @api.expose
    class Echo:
        def echo(self, message: bytes) -> bytes:
            return message

    daemon = api.Daemon(host=HOST, port=0)
    ready(str(daemon.register(Echo(), SERVER_NAME)))
    daemon.requestLoop()


def connect_pyro5(address: str) -> Driver:
    proxy = _pyro5_msgpack().Proxy(address)
    proxy._pyroBind()
    return BlockingDriver(proxy.echo, proxy._pyroRelease)


# -------------------------------------------------------------------------- table


@dataclass(frozen=True)
class System:
    """One side of a comparison: a server and the client that calls it."""

    id: str  # unique; names the system to a child process
    family: str  # raw, pylm, zerorpc or pyro5: the table column and --only name
    label: str
    serve: Callable[[Ready], None]
    connect: Callable[[str], Driver]
    depth: int = 1  # calls in flight per client process


SYSTEMS: dict[str, System] = {
    system.id: system
    for system in (
        System("raw-req", "raw", "raw pyzmq REQ/REP", serve_raw_rep, connect_raw_req),
        System("pylm", "pylm", "pylm Client", serve_pylm, connect_pylm),
        System(
            "pylm-quiet",
            "pylm-quiet",
            "pylm Client, metrics off",
            serve_pylm_quiet,
            connect_pylm_quiet,
        ),
        System("zerorpc", "zerorpc", "zerorpc", serve_zerorpc, connect_zerorpc),
        System("pyro5", "pyro5", "Pyro5 (msgpack)", serve_pyro5, connect_pyro5),
        System(
            "raw-dealer",
            "raw",
            f"raw pyzmq DEALER/ROUTER, {PIPELINE_DEPTH} in flight",
            serve_raw_router,
            connect_raw_dealer,
            PIPELINE_DEPTH,
        ),
        System(
            "pylm-async",
            "pylm",
            f"pylm AsyncClient, {PIPELINE_DEPTH} in flight",
            serve_pylm,
            connect_pylm_async,
            PIPELINE_DEPTH,
        ),
    )
}
