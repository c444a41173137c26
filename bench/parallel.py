"""Jobs per second through pylm's parallel pattern (a master and its
workers): CPU-bound jobs against :class:`concurrent.futures.ProcessPoolExecutor`,
small jobs against a raw pyzmq load-balancing broker.

Run from the repository root::

    python -m bench.parallel               # the full run, about three minutes
    python -m bench.parallel --quick       # a smoke run, about half a minute
    python -m bench.parallel --rounds 5 --json results.json

What is measured
    1. *CPU-bound jobs*: each job computes the sum of ``i * i`` for ``i``
       below :data:`SPIN` in pure Python (about 20 ms) and returns its
       payload (100 B). Jobs per second with 1 and with 2 workers, and the
       speedup from 1 to 2, through

       * pylm: a :class:`pylm.parallel.Master`, that many
         :class:`~pylm.parallel.Worker` processes (1 slot each) and a
         :class:`~pylm.parallel.Client` keeping :data:`CPU_IN_FLIGHT` jobs out;
       * a :class:`~concurrent.futures.ProcessPoolExecutor` with as many
         worker processes (spawned), run by a client process that keeps as
         many futures out (``submit``: one job a call, as pylm's client);

       the baseline of this table is the ProcessPoolExecutor.
    2. *Small jobs*: a 100 B echo, with 1 and 2 workers holding 1 and
       :data:`MANY_SLOTS` jobs at once, :data:`ECHO_IN_FLIGHT` jobs out, through

       * pylm: Master, Worker(slots=...) processes, Client;
       * raw pyzmq: a load-balancing broker written here (:func:`raw_broker`):
         clients' DEALERs -> broker's front ROUTER; workers' DEALERs ->
         broker's back ROUTER. A worker says READY once per slot, then
         answers the jobs it gets; the broker gives each job to a worker with
         a free slot (and reads no job while there is none); an answer frees
         the slot. The client is a DEALER keeping as many jobs out.

How
    As in :mod:`bench.rpc` and :mod:`bench.pipeline`, whose machinery this
    reuses: every master, broker, worker and client runs in a spawned
    process of its own; each round, each system (a kind and a number of
    workers and slots) in turn, the order rotating from round to round, gets
    fresh processes; its client checks that a result is its payload, runs
    jobs for ``--warmup`` seconds, then from the start of a common window of
    ``--duration`` seconds sends jobs until its end and counts the results
    that arrive within it. The tables give the median over ``--rounds``
    rounds, its ratio to the baseline of the row and, per system, its
    speedup from 1 to 2 workers (ratio of the medians). ``--json`` keeps
    every round, and adds to each result its job, workers, slots and
    speedup over 1 worker.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from bench.chains import PipelineDriver
from bench.harness import (
    SLACK,
    Cell,
    Child,
    Children,
    Log,
    Report,
    Results,
    Settings,
    Timing,
    add_output_options,
    add_timing_options,
    execute,
    expect,
    run_rounds,
    spread,
    stderr_log,
    table,
    timing,
)
from bench.processes import drive, serve
from bench.systems import HOST, DealerDriver, Driver, bind_random

if TYPE_CHECKING:
    from pylm.parallel import Client

SPIN = 350_000  # the CPU-bound job: sum of i * i for i below this, about 20 ms
PAYLOAD = 100  # bytes, the payload of every job
CPU_IN_FLIGHT = 8  # CPU-bound jobs a client keeps out: enough to keep 2 workers busy
ECHO_IN_FLIGHT = 100  # small jobs a client keeps out
MANY_SLOTS = 4  # the slots of a worker in the second small-jobs setting
TARGET = 1.8  # the speedup from 1 to 2 workers expected of CPU-bound jobs
MASTER = "bench"  # the pylm master's name
JOB_TIMEOUT = 30.0  # s: pylm's per-job deadline; a job this late is a failure anyway
WORKERS_LIMIT = 30.0  # s the master gets to see all its workers
FAMILIES = ("raw", "pylm")  # raw: the baseline of each table
FULL = Timing(duration=3.0, warmup=1.0, rounds=3)
QUICK = Timing(duration=0.1, warmup=0.05, rounds=1)

Ready = Callable[[Any], None]


# --------------------------------------------------------------------------- jobs


def sum_of_squares(count: int) -> int:
    total = 0
    for number in range(count):
        total += number * number
    return total


def cpu(payload: bytes) -> bytes:
    """The CPU-bound job: a fixed amount of pure-Python work, then the
    payload back (clients check that a result is their payload)."""
    sum_of_squares(SPIN)
    return payload


def echo(payload: bytes) -> bytes:
    return payload


JOBS: dict[str, Callable[[bytes], bytes]] = {"cpu": cpu, "echo": echo}


def job_seconds(times: int = 5) -> float:
    """How long one CPU-bound job takes in this process (median of ``times``)."""
    samples = []
    for _ in range(times):
        began = time.perf_counter()
        cpu(b"")
        samples.append(time.perf_counter() - began)
    return statistics.median(samples)


# ------------------------------------------------------------------------ systems


@dataclass(frozen=True)
class Kind:
    """How to run one kind of system: its hub (master or broker) process,
    its worker processes and its client, each None when it has none."""

    name: str
    family: str  # the table column; raw: the baseline of the row
    label: str
    hub: Callable[[Ready], None] | None  # binds, reports (front, back), serves
    worker: Callable[[Setup, str, Ready], None] | None  # connects to back, reports, serves
    connect: Callable[[Setup, str], Driver]  # the client's driver, given the front address


@dataclass(frozen=True)
class ParallelCell(Cell):
    """A cell of this benchmark: also the job and how many workers, with how
    many slots, run it (each system has one cell, so one row each)."""

    job: str = "echo"
    workers: int = 1
    slots: int = 1

    @property
    def label(self) -> str:
        text = f"{self.workers} worker{'s' if self.workers > 1 else ''}"
        return text + (
            f", {self.slots} slot{'s' if self.slots > 1 else ''}" if self.job == "echo" else ""
        )


@dataclass(frozen=True)
class Setup:
    """One side of a comparison: a kind of system, running a job with so
    many workers (and slots)."""

    kind: Kind
    job: str  # cpu or echo: a key of JOBS
    workers: int
    slots: int = 1

    @property
    def id(self) -> str:
        return setup_id(self.kind.name, self.job, self.workers, self.slots)

    @property
    def family(self) -> str:
        return self.kind.family

    @property
    def label(self) -> str:
        slots = f" x {self.slots} slots" if self.slots > 1 else ""
        return f"{self.kind.label}, {self.workers} worker(s){slots}, {self.job} jobs"

    @property
    def cell(self) -> ParallelCell:
        depth = CPU_IN_FLIGHT if self.job == "cpu" else ECHO_IN_FLIGHT
        return ParallelCell(PAYLOAD, 1, depth, self.job, self.workers, self.slots)


def setup_id(kind: str, job: str, workers: int, slots: int) -> str:
    return f"{kind}-{job}-{workers}w" + (f"-{slots}s" if job == "echo" else "")


def wait_forever() -> None:
    threading.Event().wait()  # serve until the process is ended


# --------------------------------------------------------------------------- pylm


def pylm_master(ready: Ready) -> None:
    from pylm.parallel import Master

    master = Master(MASTER, f"tcp://{HOST}:0", f"tcp://{HOST}:0", log_stdout=False)
    master.start(background=True)
    ready((master.front, master.back))
    wait_forever()


def pylm_worker(setup: Setup, back: str, ready: Ready) -> None:
    from pylm.parallel import Worker

    class Jobs(Worker):
        def cpu(self, message: bytes) -> bytes:
            return cpu(message)

        def echo(self, message: bytes) -> bytes:
            return message

    worker = Jobs(f"worker-{os.getpid()}", MASTER, back, slots=setup.slots, log_stdout=False)
    worker.start(background=True)
    ready(worker.name)
    wait_forever()


class MasterDriver(PipelineDriver):
    """pylm's parallel :class:`~pylm.parallel.Client`, as many jobs out as
    the cell says, once the master sees every worker."""

    def __init__(self, setup: Setup, front: str) -> None:
        from pylm.parallel import Client

        self._function = setup.job
        self._client: Client = Client(
            front, MASTER, timeout=JOB_TIMEOUT, max_in_flight=setup.cell.depth
        )
        deadline = time.monotonic() + WORKERS_LIMIT
        while (seen := self._client.ping()["workers"]) < setup.workers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the master sees {seen} of {setup.workers} workers")
            time.sleep(0.02)

    def jobs(self, payloads: Iterable[bytes]) -> Iterator[bytes]:
        return self._client.job(self._function, payloads)

    def close(self) -> None:
        self._client.close()


# --------------------------------------------------------------------- raw pyzmq

READY = b"READY"  # a worker's message: one more slot free


def raw_broker(ready: Ready) -> None:
    """The load-balancing broker: a job goes to a worker with a free slot;
    with none free, the broker reads no job (clients' jobs wait in their
    sockets)."""
    import zmq

    front, front_address = bind_random(zmq.ROUTER)
    back, back_address = bind_random(zmq.ROUTER)
    ready((front_address, back_address))
    free: deque[bytes] = deque()  # a worker's routing id per free slot
    everything = zmq.Poller()
    everything.register(back, zmq.POLLIN)
    everything.register(front, zmq.POLLIN)
    workers_only = zmq.Poller()
    workers_only.register(back, zmq.POLLIN)
    while True:
        events = dict((everything if free else workers_only).poll())
        if back in events:
            worker, *answer = back.recv_multipart()  # [READY] or [client, result]
            free.append(worker)
            if len(answer) == 2:
                front.send_multipart(answer)
        if free and front in events:
            client, payload = front.recv_multipart()
            back.send_multipart([free.popleft(), client, payload])


def raw_worker(setup: Setup, back: str, ready: Ready) -> None:
    import zmq

    socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    socket.connect(back)
    for _ in range(setup.slots):
        socket.send(READY)
    ready(back)
    function = JOBS[setup.job]
    recv, send = socket.recv_multipart, socket.send_multipart
    while True:
        client, payload = recv()
        send([client, function(payload)])


def raw_client(setup: Setup, front: str) -> Driver:
    return DealerDriver(front, setup.cell.depth)


# ------------------------------------------------------------ ProcessPoolExecutor


def pool_worker_start(client: int) -> None:
    """In each pool worker: Ctrl-C is for the parent, and the worker ends
    with the client process that started it, even a killed one."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == client:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


class PoolDriver(PipelineDriver):
    """A :class:`~concurrent.futures.ProcessPoolExecutor` of spawned worker
    processes, as many futures out as the cell says (``submit``, one job a
    call)."""

    def __init__(self, setup: Setup) -> None:
        # The harness starts its children as daemons, so that they end with
        # it, and a daemon may not start processes: this one's pool workers
        # end with it (pool_worker_start).
        multiprocessing.current_process().daemon = False
        self._function = JOBS[setup.job]
        self._depth = setup.cell.depth
        self._pool = ProcessPoolExecutor(
            setup.workers,
            multiprocessing.get_context("spawn"),
            initializer=pool_worker_start,
            initargs=(os.getpid(),),
        )
        # The pool starts a process a job while none is idle: start them all.
        wait([self._pool.submit(os.getpid) for _ in range(setup.workers)])

    def jobs(self, payloads: Iterable[bytes]) -> Iterator[bytes]:
        out: set[Future[bytes]] = set()
        for payload in payloads:
            if len(out) == self._depth:
                done, out = wait(out, return_when=FIRST_COMPLETED)
                yield from (future.result() for future in done)
            out.add(self._pool.submit(self._function, payload))
        while out:
            done, out = wait(out, return_when=FIRST_COMPLETED)
            yield from (future.result() for future in done)

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


# -------------------------------------------------------------------------- table

PYLM = Kind("pylm", "pylm", "pylm Master/Worker", pylm_master, pylm_worker, MasterDriver)
RAW = Kind("raw", "raw", "raw pyzmq LB broker", raw_broker, raw_worker, raw_client)
# The ProcessPoolExecutor is the baseline (family raw) of the CPU-bound table.
POOL = Kind("pool", "raw", "ProcessPoolExecutor", None, None, lambda setup, _: PoolDriver(setup))

SYSTEMS: dict[str, Setup] = {
    setup.id: setup
    for setup in [
        *(Setup(kind, "cpu", workers) for workers in (1, 2) for kind in (POOL, PYLM)),
        *(
            Setup(kind, "echo", workers, slots)
            for slots in (1, MANY_SLOTS)
            for workers in (1, 2)
            for kind in (RAW, PYLM)
        ),
    ]
}


def speedups(medians: Mapping[str, float | None]) -> dict[str, float]:
    """For each system with more than one worker whose median and that of
    the same system with one worker are known: their ratio."""
    found = {}
    for setup in SYSTEMS.values():
        one = medians.get(setup_id(setup.kind.name, setup.job, 1, setup.slots))
        many = medians.get(setup.id)
        if setup.workers > 1 and one and many is not None:
            found[setup.id] = many / one
    return found


# ----------------------------------------------------------------- child processes


def hub_main(system_id: str, conn: Connection) -> None:
    """Run ``system_id``'s master or broker until told to stop."""
    hub = SYSTEMS[system_id].kind.hub
    assert hub is not None
    serve(hub, conn)


def worker_main(system_id: str, back: str, conn: Connection) -> None:
    """Run a worker of ``system_id`` for the hub at ``back`` until told to stop."""
    setup = SYSTEMS[system_id]
    assert setup.kind.worker is not None
    serve(partial(setup.kind.worker, setup, back), conn)


def client_main(system_id: str, front: str, conn: Connection) -> None:
    """Send ``system_id``'s jobs to ``front`` (if any) as the parent says."""
    setup = SYSTEMS[system_id]
    drive(system_id, partial(setup.kind.connect, setup, front), conn)


@contextmanager
def session(children: Children, setup: Setup, cells: list[Cell]) -> Iterator[list[Child]]:
    """Fresh processes for ``setup``: its hub, its workers, its client."""
    started: list[Child] = []
    try:
        front = back = ""
        if setup.kind.hub is not None:
            hub = children.start(f"{setup.id} hub", hub_main, setup.id)
            started.append(hub)
            ((front, back),) = expect(hub, "ready", SLACK)
        if setup.kind.worker is not None:
            workers = [
                children.start(f"{setup.id} worker {index}", worker_main, setup.id, back)
                for index in range(setup.workers)
            ]
            started += workers
            for worker in workers:
                expect(worker, "ready", SLACK)
        client = children.start(f"{setup.id} client", client_main, setup.id, front)
        started.append(client)
        yield [client]
    finally:
        children.stop(started)


def run(settings: Settings, results: Results, log: Log) -> None:
    """Measure every system ``settings.rounds`` times, systems interleaved."""
    plans: list[tuple[Setup, list[Cell]]] = [(setup, [setup.cell]) for setup in SYSTEMS.values()]
    run_rounds(plans, session, settings, results, log, unit="jobs/s")


# ------------------------------------------------------------------------ reports


@dataclass(frozen=True)
class ParallelReport(Report):
    """Two tables, CPU-bound and small jobs, each with a speedup row per
    setting with more than one worker."""

    job_ms: float = 0.0  # one CPU-bound job in one process, as measured before the run

    def part(self, results: Results, job: str, titles: Mapping[str, str]) -> str:
        """The table of ``job``'s systems, then a row of speedups from 1 worker
        per setting with more."""
        mine = {key: series for key, series in results.items() if SYSTEMS[key[0]].job == job}
        found = speedups({series.system.id: series.median for series in mine.values()})
        placed = {(series.system.family, series.cell): series.system.id for series in mine.values()}
        lines = [table(mine, FAMILIES, titles, self.row_label)]
        for setup in SYSTEMS.values():
            cell = setup.cell
            if setup.job != job or setup.workers == 1 or setup.family != FAMILIES[0]:
                continue  # one row per setting: that of its baseline system
            ratios = [found.get(placed.get((family, cell), "")) for family in FAMILIES]
            texts = ["-" if ratio is None else f"{ratio:.2f}x" for ratio in ratios]
            label = f"speedup 1 -> {cell.label}"
            lines.append(f"| {label} | " + " | ".join(texts) + " |")
        return "\n".join(lines)

    def verdict(self, results: Results) -> str:
        found = speedups({series.system.id: series.median for series in results.values()})
        pylm, pool = (found.get(setup_id(kind.name, "cpu", 2, 1)) for kind in (PYLM, POOL))
        if pylm is None or pool is None:
            return "CPU-bound speedup from 1 to 2 workers: not measured (a system failed)."
        met = "met" if pylm >= TARGET else "NOT met"
        return (
            f"CPU-bound speedup from 1 to 2 workers: pylm {pylm:.2f}x, ProcessPoolExecutor"
            f" {pool:.2f}x; target {TARGET:g}x: {met}."
        )

    def text(
        self, results: Results, settings: Settings, info: dict[str, str], elapsed: float
    ) -> str:
        pairs = "; ".join(f"{key}: {value}" for key, value in info.items())
        return "\n".join(
            [
                f"Machine: {pairs}",
                "",
                f"{self.what}, median of {settings.rounds} round(s) of {settings.duration:g} s"
                f" (after {settings.warmup:g} s of warm-up).",
                "",
                f"CPU-bound jobs (sum of i*i for i < {SPIN:,}: {self.job_ms:.1f} ms in one"
                f" process here), {CPU_IN_FLIGHT} in flight; in brackets: ratio to"
                " ProcessPoolExecutor in the same row.",
                "",
                self.part(results, "cpu", {**self.titles, "raw": POOL.label}),
                "",
                self.verdict(results),
                "",
                f"Small jobs ({PAYLOAD} B echo), {ECHO_IN_FLIGHT} in flight; in brackets:"
                " ratio to raw pyzmq in the same row.",
                "",
                self.part(results, "echo", self.titles),
                "",
                self.notes,
                *spread(results),
                f"Total run time: {elapsed:.1f} s",
            ]
        )


NOTES = (
    "Every master, broker, worker and client in its own (spawned) process; ProcessPoolExecutor's"
    " workers are spawned by its client process. pylm: Master, Worker(slots=n) and"
    " Client(max_in_flight=jobs in flight). raw pyzmq: a load-balancing broker (ROUTER for"
    " clients, ROUTER for workers, a worker says READY once per slot) and a DEALER client."
    " ProcessPoolExecutor: submit(), as many futures out. Each client first checks that a"
    " result is its payload, as bytes, and counts only results that arrive within the window."
)


def annotate(path: str, job_ms: float) -> None:
    """Add to the JSON at ``path`` what each result's system is and its
    speedup over 1 worker, and the measured cost of a CPU-bound job."""
    with open(path, encoding="utf-8") as file:
        data = json.load(file)
    found = speedups({result["system"]: result["median_per_s"] for result in data["results"]})
    for result in data["results"]:
        setup = SYSTEMS[result["system"]]
        result.update(job=setup.job, workers=setup.workers, slots=setup.slots)
        result["speedup_over_1_worker"] = found.get(setup.id)
    data["cpu_job"] = {"sum_of_squares_below": SPIN, "ms_in_one_process": job_ms}
    with open(path, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=2)
        file.write("\n")


# ---------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, str | None]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.parallel",
        description="Jobs per second through pylm's master and workers: CPU-bound jobs"
        " against ProcessPoolExecutor, small jobs against a raw pyzmq broker.",
    )
    add_timing_options(parser, FULL)
    add_output_options(parser, QUICK)
    args = parser.parse_args(argv)
    chosen = timing(args, FULL, QUICK)
    settings = Settings(chosen.duration, chosen.warmup, chosen.rounds, (1,), FAMILIES)
    return settings, args.json


def main(argv: Sequence[str] | None = None) -> int:
    settings, json_path = parse_args(argv)
    job_ms = job_seconds() * 1000
    report = ParallelReport(
        what="Jobs per second",
        notes=NOTES,
        titles={"raw": RAW.label, "pylm": PYLM.label},
        packages=("pyzmq", "pylm"),
        job_ms=job_ms,
    )
    code = execute(settings, json_path, run, report, stderr_log)
    if json_path is not None:
        annotate(json_path, job_ms)
    return code


if __name__ == "__main__":
    sys.exit(main())
