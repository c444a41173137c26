"""The pipelines under test: three stages and a client, each in a process.

Every stage does the same work in both systems: it hands the payload on
unchanged (so a client can check that a result is the payload it sent).

* raw pyzmq: the client PUSHes jobs to stage 1's PULL socket (bound by the
  stage); each stage receives, then PUSHes to the next stage's PULL; stage 3
  PUSHes to a PULL socket that the client binds. Stages are started last
  first, so the client binds before any stage exists.
* pylm: ``Step1`` (a :class:`pylm.chained.Server`, function ``foo``) sends
  on to ``step2.bar``, which sends on to ``last.baz`` on a
  :class:`pylm.chained.LastServer`; a :class:`pylm.chained.LoopClient` sends
  the jobs to step 1 and gets the results from the last stage.

Both clients keep up to :data:`IN_FLIGHT` jobs out (:data:`LARGE_IN_FLIGHT` of
1 MiB payloads) and take their payloads
from the same kind of generator, which stops at the end of the measurement
window; results that arrive after the window's end are not counted.

The child processes speak :mod:`bench.processes`' protocol. A stage process
sends ``("ready", StageAddresses)``. A client process first binds what it
must, sends ``("bound", address)`` (``""`` if it binds nothing), waits for
``("connect", first_stage, last_stage)``, then obeys ``cell``/``go``/``stop``
like an RPC client.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from bench.processes import drive, serve
from bench.systems import HOST, Driver, bind_random, wait_until

if TYPE_CHECKING:
    import zmq

    from pylm.chained import AsyncLoopClient, LoopClient

__all__ = [
    "CHAINS",
    "IN_FLIGHT",
    "LARGE_IN_FLIGHT",
    "STAGES",
    "Chain",
    "StageAddresses",
    "client_main",
    "in_flight",
    "stage_main",
]

STAGES = 3
IN_FLIGHT = 1000  # jobs a client keeps out at most, in both systems
LARGE = 1024 * 1024  # bytes from which a payload is large: fewer jobs out
LARGE_IN_FLIGHT = 16  # large jobs a client keeps out at most (16 MiB in flight)


def in_flight(size: int) -> int:
    """How many jobs of ``size`` bytes a client keeps out at most."""
    return IN_FLIGHT if size < LARGE else LARGE_IN_FLIGHT


JOB_TIMEOUT = 30.0  # s: pylm's per-job deadline; a job this late is a failure anyway
PYLM_NAMES = {1: ("step1", "foo"), 2: ("step2", "bar"), 3: ("last", "baz")}  # server, function


@dataclass(frozen=True)
class StageAddresses:
    """Where a stage listens; the cache and results addresses are pylm's."""

    input: str  # where the stage takes its jobs
    db: str = ""  # the stage's cache (pylm)
    results: str = ""  # where clients get results from the last stage (pylm)


Ready = Callable[[StageAddresses], None]
# Connects a client to the first and the last stage and returns its driver.
Connect = Callable[[StageAddresses, StageAddresses], Driver]


def until(payload: bytes, end: float) -> Iterator[bytes]:
    """``payload`` again and again until the monotonic clock passes ``end``."""
    clock = time.monotonic
    while clock() < end:
        yield payload


class PipelineDriver:
    """A client that sends jobs and receives their results concurrently;
    subclasses say how, in :meth:`jobs`."""

    depth = IN_FLIGHT  # jobs out at most, set for each run's payload size

    def jobs(self, payloads: Iterable[bytes]) -> Iterator[bytes]:
        """Send a job per payload, never more than :attr:`depth` out at
        once; yield the results as they arrive, until every job is back."""
        raise NotImplementedError

    def probe(self, payload: bytes) -> object:
        (result,) = self.jobs([payload])
        return result

    def run(self, payload: bytes, start: float, end: float) -> int:
        clock = time.monotonic
        done = 0
        self.depth = in_flight(len(payload))
        wait_until(start)
        for _ in self.jobs(until(payload, end)):
            if clock() <= end:  # arrived after the window: not counted
                done += 1
        return done

    def close(self) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------- raw pyzmq


class PushPullDriver(PipelineDriver):
    """Raw pyzmq: one PUSH socket out to stage 1, one PULL socket back from
    stage 3; once the window is full, a job leaves each time a result arrives."""

    def __init__(self, jobs: zmq.Socket[bytes], results: zmq.Socket[bytes]) -> None:
        self._jobs = jobs
        self._results = results

    def jobs(self, payloads: Iterable[bytes]) -> Iterator[bytes]:
        send, recv = self._jobs.send, self._results.recv
        out = 0
        for payload in payloads:
            if out == self.depth:
                yield recv()
                out -= 1
            send(payload)
            out += 1
        for _ in range(out):
            yield recv()

    def close(self) -> None:
        self._jobs.close(linger=0)
        self._results.close(linger=0)


def raw_stage(stage: int, downstream: str, ready: Ready) -> None:
    import zmq

    jobs, address = bind_random(zmq.PULL)
    out: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUSH)
    out.connect(downstream)
    ready(StageAddresses(address))
    recv, send = jobs.recv, out.send
    while True:
        send(recv())


def raw_client() -> tuple[str, Connect]:
    import zmq

    results, address = bind_random(zmq.PULL)

    def connect(first: StageAddresses, last: StageAddresses) -> Driver:
        jobs: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUSH)
        jobs.setsockopt(zmq.LINGER, 0)
        jobs.connect(first.input)
        return PushPullDriver(jobs, results)

    return address, connect


# --------------------------------------------------------------------------- pylm


class LoopDriver(PipelineDriver):
    """pylm's :class:`~pylm.chained.LoopClient`, ``max_in_flight=IN_FLIGHT``,
    its ``batch`` left as the code being measured has it by default."""

    batch: int | None = None

    def __init__(self, first: StageAddresses, last: StageAddresses) -> None:
        from pylm.chained import LoopClient

        name, self._function = PYLM_NAMES[1]
        self._client: LoopClient = LoopClient(
            last.results,
            first.input,
            first.db,
            name,
            announce=False,
            max_in_flight=IN_FLIGHT,
            **({} if self.batch is None else {"batch": self.batch}),
            timeout=JOB_TIMEOUT,
        )

    def jobs(self, payloads: Iterable[bytes]) -> Iterator[bytes]:
        self._client.max_in_flight = self.depth
        return self._client.job(self._function, payloads)

    def close(self) -> None:
        self._client.close()


def pylm_stage(stage: int, downstream: str, ready: Ready) -> None:
    import threading

    from pylm.chained import LastServer, Server

    class Step1(Server):
        def foo(self, message: bytes) -> bytes:
            return message

    class Step2(Server):
        def bar(self, message: bytes) -> bytes:
            return message

    class Last(LastServer):
        def baz(self, message: bytes) -> bytes:
            return message

    anywhere = f"tcp://{HOST}:0"
    name, _ = PYLM_NAMES[stage]
    server: Server | LastServer
    if stage == STAGES:
        server = Last(name, anywhere, anywhere, anywhere, log_stdout=False)
    else:
        following = ".".join(PYLM_NAMES[stage + 1])
        step = Step1 if stage == 1 else Step2
        server = step(name, anywhere, downstream, following, anywhere, log_stdout=False)
    server.start(background=True)
    assert server.address is not None and server.db is not None
    results = server.push if isinstance(server, LastServer) else None
    ready(StageAddresses(server.address, server.db, results or ""))
    threading.Event().wait()  # serve until the process is ended


def pylm_client() -> tuple[str, Connect]:
    return "", LoopDriver  # the client binds nothing: it connects to the last stage


class UnbatchedDriver(LoopDriver):
    """The same with ``batch=1``: one job per message (no batching), what a
    LoopClient did by default before batching was."""

    batch = 1


def pylm_unbatched_client() -> tuple[str, Connect]:
    return "", UnbatchedDriver


class Batch64Driver(LoopDriver):
    """The same with ``batch=64`` asked for: the same on every pylm that has
    batches, whatever its default (an A/B of older code)."""

    batch = 64


def pylm_batch64_client() -> tuple[str, Connect]:
    return "", Batch64Driver


class AsyncLoopDriver(PipelineDriver):
    """pylm's :class:`~pylm.chained.AsyncLoopClient`, one run at a time on an
    event loop of its own, with the same jobs in flight as the LoopClient's
    (a client for each in-flight bound, made as a run first needs it)."""

    def __init__(self, first: StageAddresses, last: StageAddresses) -> None:
        import asyncio

        self._first, self._last = first, last
        self._function = PYLM_NAMES[1][1]
        self._loop = asyncio.new_event_loop()
        self._clients: dict[int, AsyncLoopClient] = {}

    def _client(self) -> AsyncLoopClient:
        from pylm.chained import AsyncLoopClient

        client = self._clients.get(self.depth)
        if client is None:
            first, last = self._first, self._last
            name = PYLM_NAMES[1][0]
            client = AsyncLoopClient(
                last.results, first.input, first.db, name, max_in_flight=self.depth,
                timeout=JOB_TIMEOUT,
            )  # fmt: skip
            self._loop.run_until_complete(client.open())
            self._clients[self.depth] = client
        return client

    def jobs(self, payloads: Iterable[bytes]) -> Iterator[bytes]:
        client = self._client()

        async def collect() -> list[bytes]:
            return [result async for result in client.job(self._function, payloads)]

        return iter(self._loop.run_until_complete(collect()))

    def run(self, payload: bytes, start: float, end: float) -> int:
        clock = time.monotonic
        self.depth = in_flight(len(payload))
        client = self._client()

        async def count() -> int:
            done = 0
            async for _ in client.job(self._function, until(payload, end)):
                if clock() <= end:  # arrived after the window: not counted
                    done += 1
            return done

        wait_until(start)
        return self._loop.run_until_complete(count())

    def close(self) -> None:
        for client in self._clients.values():
            self._loop.run_until_complete(client.close())
        self._loop.close()


def pylm_async_client() -> tuple[str, Connect]:
    return "", AsyncLoopDriver


def pylm_quiet_stage(stage: int, downstream: str, ready: Ready) -> None:
    """A pylm stage with metrics off (``PYLM_METRICS=0``): what counting costs."""
    os.environ["PYLM_METRICS"] = "0"
    pylm_stage(stage, downstream, ready)


def pylm_quiet_client() -> tuple[str, Connect]:
    os.environ["PYLM_METRICS"] = "0"
    return pylm_client()


# -------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Chain:
    """One side of the comparison: how to run a stage and the client."""

    id: str
    family: str  # the table column: raw or pylm
    label: str
    stage: Callable[[int, str, Ready], None]  # stage number (from 1), its downstream, ready
    client: Callable[[], tuple[str, Connect]]  # binds; returns its address ("" if none)


CHAINS: dict[str, Chain] = {
    chain.id: chain
    for chain in (
        Chain("raw-chain", "raw", "raw pyzmq PUSH/PULL chain", raw_stage, raw_client),
        Chain("pylm-chain", "pylm", "pylm chained servers, LoopClient", pylm_stage, pylm_client),
        Chain(
            "pylm-unbatched-chain",
            "pylm-unbatched",
            "pylm, LoopClient(batch=1)",
            pylm_stage,
            pylm_unbatched_client,
        ),
        Chain(
            "pylm-async-chain",
            "pylm-async",
            "pylm, AsyncLoopClient",
            pylm_stage,
            pylm_async_client,
        ),
        Chain(
            "pylm-batch64-chain",
            "pylm-batch64",
            "pylm, LoopClient(batch=64)",
            pylm_stage,
            pylm_batch64_client,
        ),
        Chain(
            "pylm-quiet-chain",
            "pylm-quiet",
            "pylm, metrics off",
            pylm_quiet_stage,
            pylm_quiet_client,
        ),
    )
}


# ----------------------------------------------------------------- child processes


def stage_main(chain_id: str, stage: str, downstream: str, conn: Connection) -> None:
    """Run stage ``stage`` (1 is the first) of ``chain_id``, sending its
    results to ``downstream``, until told to stop."""
    serve(partial(CHAINS[chain_id].stage, int(stage), downstream), conn)


def client_main(chain_id: str, conn: Connection) -> None:
    """Bind, report, connect to the stages the parent names, then run jobs
    as the parent says."""

    def connect() -> Driver | None:
        address, connect_to = CHAINS[chain_id].client()
        conn.send(("bound", address))
        match conn.recv():
            case ("connect", StageAddresses() as first, StageAddresses() as last):
                return connect_to(first, last)
            case ("stop",):
                return None
            case command:
                raise ValueError(f"unknown command {command!r}")

    drive(chain_id, connect, conn)
