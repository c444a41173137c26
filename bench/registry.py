"""pylm's etcd registry: start-up by name, rewiring, and scale.

Run from the repository root (needs the ``etcd`` binary on PATH)::

    python -m bench.registry               # the full run, about a minute
    python -m bench.registry --quick       # a smoke run, under 20 s
    python -m bench.registry --servers 500 --json results.json

What is measured (each part on a fresh local etcd that the run starts and stops)
    1. *start*: how long a server started with only a name takes to serve its
       first job. The parent launches a process that starts a standalone
       :class:`pylm.standalone.Server` with only a name (the registry comes
       from ``PYLM_REGISTRY``/``PYLM_CLUSTER``, as for a user), and times
       from the launch to the first answer of ``Client(name, registry=...)
       .job(...)``, a client that waits for the server to register. The same
       for a 3-stage chained pipeline (step1 -> step2 -> last, one process
       each, launched together), to the first result of
       ``LoopClient('step1', registry=...)``. Median of ``--reps``
       repetitions, each in a cluster of its own. A pipeline whose first
       result has not come after 10 s counts as stuck: the row says how many
       were, and the run exits with status 1.
    2. *rewire*: a client streams jobs (``--rate`` a second, at most
       :data:`~bench.registry_nodes.IN_FLIGHT` in flight) through a
       name-only pipeline step1 -> step2 -> last. Each step2 instance tags its
       results with a marker and the time it ran the job. *Join*: a new step2
       instance starts; the time from its ``start()`` returning to the first
       result through it, at the client (and to the job running in it).
       *Leave*: the older step2 instance is stopped (``stop()``: it
       deregisters, then serves what still comes until its input is quiet);
       the time from the ``stop()`` call to the last result through it, after
       which all traffic is on the survivor. ``--reps`` joins and leaves in
       turn while the stream runs; every job must come back (a job without
       its result within 5 s counts as lost).
    3. *scale*: ``--servers`` standalone servers, each with only a name,
       ``--per-process`` in each process, all of a process sharing one
       :class:`~pylm.registry.Registry` and started with
       ``start(background=True)``, their leases of ``--ttl`` seconds. Measured:
       the launch to all of them listed by ``Registry.instances()``; the
       keep-alive load on etcd over ``--window`` seconds, from etcd's
       ``/metrics`` (gRPC LeaseKeepAlive messages received; expected:
       processes / (ttl / 3) a second, since the servers of a process share
       one lease, refreshed every third of its TTL), with etcd's and the server processes' CPU
       time over the same window; the time of ``Registry.instances()`` and of
       the command ``pylm ls --json`` (a whole process, so also on an empty
       cluster for comparison) with every record; the resident memory of the
       server processes per server; and, after one server process is killed
       with SIGKILL, the time until ``instances()`` no longer lists its
       servers (bounded by the lease TTL, hence the short default of 3 s).

How
    Every server and client runs in a spawned process of its own (see
    :mod:`bench.registry_nodes`) and reports its own instants on the
    machine's monotonic clock, which all processes share; the parent
    compares them with its own. Every process and every etcd the run starts
    is stopped when the run ends, fails or is interrupted (Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

from bench.chains import IN_FLIGHT as PIPELINE_IN_FLIGHT
from bench.harness import (
    SLACK,
    BenchError,
    Child,
    Children,
    Log,
    expect,
    machine,
    positive,
    pylm_source,
    send,
    stderr_log,
)
from bench.registry_nodes import (
    IN_FLIGHT,
    JOB_TIMEOUT,
    Tally,
    Through,
    echo_main,
    fleet_main,
    rss_kib,
    stage_main,
    stream_main,
)

if TYPE_CHECKING:
    from pylm.registry import LocalEtcd, Registry

PACKAGES = ("pyzmq", "pylm", "aetcd", "grpcio")
PARTS = ("start", "rewire", "scale")
POLL = 0.02  # s between two looks at the stream client's tally
COUNT_POLL = 0.05  # s between two Registry.instances() when waiting for a count
REGISTER_LIMIT = 120.0  # s the fleet gets to register
FIRST_RESULT_LIMIT = 10.0  # s after which a freshly started pipeline counts as stuck


@dataclass(frozen=True)
class Options:
    """What to measure, and how much of it."""

    parts: tuple[str, ...]
    reps: int  # repetitions of the start and rewire measurements
    rate: float  # jobs a second the stream client sends
    servers: int
    per_process: int
    ttl: float  # s, the fleet's leases
    window: float  # s over which the keep-alive load is measured
    settle: float  # s the fleet runs before the window, so that keep-alives spread out
    calls: int  # Registry.instances() calls timed
    ls_runs: int  # pylm ls --json runs timed

    @property
    def fleet(self) -> list[int]:
        """How many servers each fleet process holds."""
        full, rest = divmod(self.servers, self.per_process)
        return [self.per_process] * full + ([rest] if rest else [])


FULL = Options(PARTS, 5, 1000.0, 300, 30, 3.0, 10.0, 3.0, 20, 3)
QUICK = Options(PARTS, 1, 1000.0, 30, 10, 3.0, 2.0, 0.0, 5, 1)


@dataclass
class Row:
    """One line of the table, and the numbers behind it for --json."""

    key: str
    label: str
    text: str = "-"  # the result as the table shows it
    detail: str = ""
    value: float | None = None  # the result, in ``unit``
    unit: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    failed: bool = False


# ------------------------------------------------------------------------ helpers


def ms(seconds: float) -> str:
    value = seconds * 1000
    return f"{value:,.1f} ms" if abs(value) < 10 else f"{value:,.0f} ms"


def spread(samples: Sequence[float]) -> str:
    """``median (min-max)``, in ms; the median alone for one sample."""
    if len(samples) == 1:
        return ms(samples[0])
    return f"{ms(statistics.median(samples))} ({ms(min(samples))} to {ms(max(samples))})"


def medians(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def timing_row(key: str, label: str, runs: list[dict[str, float]], total: str, detail: str) -> Row:
    """A row whose result is the median of ``runs[*][total]`` (seconds)."""
    samples = [run[total] for run in runs]
    middle = statistics.median(samples)
    detail = (
        f"median of {len(samples)}"
        + (f" (min {ms(min(samples))}, max {ms(max(samples))})" if len(samples) > 1 else "")
        + f"; {detail}"
    )
    return Row(key, label, ms(middle), detail, middle * 1000, "ms", {"runs": runs})


def spawn(children: Children, name: str, target: Callable[..., None], *args: str) -> Child:
    """``children.start``, the child born with SIGINT ignored (an ignored
    signal stays ignored across exec): a Ctrl-C meant for the parent must not
    interrupt a child that is still importing, before it ignores SIGINT itself."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return children.start(name, target, *args)
    finally:
        signal.signal(signal.SIGINT, previous)


def surface(children: Sequence[Child]) -> None:
    """Raise why a child died, if one did: with the traceback it sent, if
    any. (Only dead children are read: a live one's messages are still to
    come.)"""
    for child in children:
        if not child.process.is_alive():
            if child.conn.poll(0):
                expect(child, "ready", 0)  # raises BenchError with the child's error
            raise BenchError(f"{child.name} died (exit code {child.process.exitcode})")


def wait_count(
    registry: Registry, done: Callable[[int], bool], timeout: float, watch: Sequence[Child]
) -> int:
    """Poll ``registry.instances()`` until ``done(count)``; the count."""
    deadline = time.monotonic() + timeout
    while True:
        count = len(registry.instances())
        if done(count):
            return count
        if time.monotonic() > deadline:
            raise BenchError(f"instances() still listed {count} after {timeout:g} s")
        surface(watch)
        time.sleep(COUNT_POLL)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


Samples = dict[tuple[str, str], float]


def scrape(port: int) -> Samples:
    """etcd's Prometheus metrics: (name, labels) -> value."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    samples: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name, _, labels = series.partition("{")
        samples[name, labels.rstrip("}")] = float(value)
    return samples


def metric(samples: Samples, name: str, *labels: str) -> float:
    """The sum of the series of ``name`` whose labels contain all of ``labels``."""
    return sum(
        value
        for (series, text), value in samples.items()
        if series == name and all(label in text for label in labels)
    )


@contextmanager
def fresh_etcd(children: Children) -> Iterator[LocalEtcd]:
    """A fresh local etcd. The processes started meanwhile stop before it
    does, so that their servers leave while it still answers."""
    from pylm.registry import LocalEtcd

    with LocalEtcd() as etcd:
        try:
            yield etcd
        finally:
            children.stop_all()


def etcd_version() -> str:
    try:
        out = subprocess.run(
            ["etcd", "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except OSError:
        return "not found"
    return out.splitlines()[0].rpartition(" ")[2] if out else "unknown"


# ---------------------------------------------------------------- 1. start-up


def start_standalone(children: Children, registry: Registry) -> dict[str, float]:
    """Launch a name-only echo server; time the first answer of a client
    that knows only the name."""
    from pylm.standalone import Client

    url, cluster = registry.config.url, registry.config.cluster
    launched = time.monotonic()
    child = spawn(children, "echo server", echo_main, url, cluster, "echo")
    try:
        try:
            with Client("echo", registry=registry, timeout=SLACK, wait=SLACK) as client:
                found = time.monotonic()
                answer = client.job("echo", b"hello")
                served = time.monotonic()
        except Exception:
            surface([child])
            raise
        if answer != b"hello":
            raise BenchError(f"the echo server answered {answer!r}")
        (info,) = expect(child, "ready", SLACK)
    finally:
        children.stop([child])
    return {
        "process_up": info["up"] - launched,
        "pylm_imported": info["imported"] - launched,
        "registered": info["registered"] - launched,
        "found": found - launched,
        "first_job": served - launched,
    }


def start_pipeline(children: Children, registry: Registry) -> dict[str, float] | None:
    """Launch the three name-only stages together; time the first result of
    a LoopClient that knows only the first stage's name. None if that result
    never came (within :data:`FIRST_RESULT_LIMIT`): the pipeline is stuck."""
    from pylm.chained import LoopClient
    from pylm.errors import RequestTimeout

    url, cluster = registry.config.url, registry.config.cluster
    launched = time.monotonic()
    stages = [
        spawn(children, f"stage {name}", stage_main, url, cluster, name, "a")
        for name in ("step1", "step2", "last")
    ]
    try:
        try:
            with LoopClient(
                "step1", registry=registry, announce=False, timeout=SLACK, wait=SLACK
            ) as client:
                found = time.monotonic()
                results = list(client.job("foo", [b"0"], timeout=FIRST_RESULT_LIMIT))
                served = time.monotonic()
        except RequestTimeout:
            surface(stages)
            return None
        except Exception:
            surface(stages)
            raise
        if len(results) != 1 or not results[0].startswith(b"0|a@"):
            raise BenchError(f"the pipeline answered {results!r}")
        infos = [expect(stage, "ready", SLACK)[0] for stage in stages]
    finally:
        children.stop(stages)
    return {
        "process_up": max(info["up"] for info in infos) - launched,
        "pylm_imported": max(info["imported"] for info in infos) - launched,
        "registered": max(info["registered"] for info in infos) - launched,
        "found": found - launched,
        "first_job": served - launched,
    }


def measure_start(options: Options, children: Children, rows: list[Row], log: Log) -> None:
    from pylm.registry import Registry

    standalone: list[dict[str, float]] = []
    pipeline: list[dict[str, float]] = []
    stuck: list[int] = []  # repetitions whose pipeline never delivered
    with fresh_etcd(children) as etcd:
        for rep in range(options.reps):
            with Registry(etcd.url, cluster=f"start-{rep}") as registry:
                standalone.append(start_standalone(children, registry))
                log(f"start {rep + 1}/{options.reps}: standalone {ms(standalone[-1]['first_job'])}")
                run = start_pipeline(children, registry)
                if run is None:
                    stuck.append(rep + 1)
                    log(f"start {rep + 1}/{options.reps}: pipeline STUCK, no first result")
                else:
                    pipeline.append(run)
                    log(f"start {rep + 1}/{options.reps}: pipeline {ms(run['first_job'])}")
    cases = (
        ("start-standalone", "standalone server: launch → first job", standalone),
        ("start-pipeline", "3-stage pipeline: launch → first result", pipeline),
    )
    for key, label, runs in cases:
        if not runs:  # every pipeline stuck
            rows.append(Row(key, f"name-only {label}", "STUCK", failed=True))
            continue
        phases = medians(runs)
        alone = key == "start-standalone"
        rows.append(
            timing_row(
                key,
                f"name-only {label}",
                runs,
                "first_job",
                f"medians from the launch: {'process' if alone else 'all 3 processes'} running"
                f" {ms(phases['process_up'])}, pylm imported {ms(phases['pylm_imported'])},"
                f" {'server' if alone else 'all 3 stages'} registered (start() returned)"
                f" {ms(phases['registered'])}, {'Client' if alone else 'LoopClient'} found"
                f" {'it' if alone else 'them'} {ms(phases['found'])}",
            )
        )
    if stuck:
        row = rows[-1]
        row.failed = True
        if pipeline:
            row.text += f" (STUCK {len(stuck)} of {options.reps})"
        note = (
            f"STUCK: in {len(stuck)} of {options.reps} start-ups (repetition"
            f" {', '.join(map(str, stuck))}) the first result never came (waited"
            f" {FIRST_RESULT_LIMIT:g} s)" + (", the median is of the others" if pipeline else "")
        )
        row.detail = f"{row.detail}; {note}" if row.detail else note
        row.data["stuck_repetitions"] = stuck


# ---------------------------------------------------------------- 2. rewiring


def stats(stream: Child) -> Tally:
    send(stream, ("stats",))
    (tally,) = expect(stream, "stats", SLACK)
    return dict(tally)


def wait_tally(stream: Child, done: Callable[[Tally], bool], what: str, timeout: float) -> Tally:
    """Ask the stream client for its tally until ``done(tally)``."""
    deadline = time.monotonic() + timeout
    while True:
        tally = stats(stream)
        if done(tally):
            return tally
        if time.monotonic() > deadline:
            raise BenchError(f"{what} within {timeout:g} s; the client saw {tally}")
        time.sleep(POLL)


def through(tally: Tally, marker: str) -> Through:
    found = tally.get(marker)
    if not isinstance(found, Through):
        raise BenchError(f"no result went through {marker}")
    return found


def seen(marker: str, after: float = 0.0) -> Callable[[Tally], bool]:
    """Whether a tally has a result through ``marker`` that arrived after ``after``."""

    def check(tally: Tally) -> bool:
        found = tally.get(marker)
        return isinstance(found, Through) and found.last_seen > after

    return check


Stage = Callable[[str, str], tuple[Child, dict[str, float]]]  # (name, marker) -> process, info


def start_stream(children: Children, url: str, cluster: str, rate: float, depth: int) -> Child:
    name = f"stream client, {rate:g} jobs/s" if rate else "stream client, full speed"
    child = spawn(children, name, stream_main, url, cluster, f"{rate:g}", str(depth))
    expect(child, "ready", SLACK)
    return child


def finish(stream: Child) -> Tally:
    send(stream, ("finish",))
    (tally,) = expect(stream, "done", JOB_TIMEOUT + SLACK)
    return dict(tally)


def rewire(
    children: Children, stage: Stage, stream: Child, old: Child, old_marker: str, marker: str
) -> tuple[Child, dict[str, float], dict[str, float]]:
    """Start step2 instance ``marker``, then stop ``old_marker`` (in process
    ``old``) while ``stream`` runs; the new instance's process, and what the
    join and the leave took."""
    new, info = stage("step2", marker)
    started = info["registered"]
    tally = wait_tally(stream, seen(marker), f"no result through {marker}", SLACK)
    first = through(tally, marker)
    join = {"seen": first.first_seen - started, "ran": first.first_run - started}
    send(old, ("leave",))
    (left,) = expect(old, "left", SLACK)
    # Once results through the survivor arrive from after the leaver closed
    # (having served nothing for a while), nothing more can come through it.
    tally = wait_tally(
        stream,
        seen(marker, after=left["end"] + 0.1),
        f"no result through {marker} after {old_marker} left",
        SLACK,
    )
    gone = through(tally, old_marker)
    leave = {
        "seen": gone.last_seen - left["begin"],
        "ran": gone.last_run - left["begin"],
        "stop": left["end"] - left["begin"],
    }
    children.stop([old])
    return new, join, leave


def lost_row(key: str, label: str, tally: Tally, detail: str) -> Row:
    lost, wrong, sent = int(tally["lost"]), int(tally["wrong"]), int(tally["sent"])
    bad = lost + wrong > 0
    errors = tally["errors"]
    return Row(
        key,
        label,
        f"{lost} of {sent:,}" + (" (expected 0)" if bad else ""),
        f"{detail}; no result within {JOB_TIMEOUT:g} s counts as lost; wrong results: {wrong}"
        + (f"; first errors: {'; '.join(errors)}" if errors else ""),
        float(lost),
        "jobs",
        {"sent": sent, "lost": lost, "wrong": wrong, "errors": errors},
        failed=bad,
    )


def measure_rewire(options: Options, children: Children, rows: list[Row], log: Log) -> None:
    reps = options.reps
    with fresh_etcd(children) as etcd:
        url, cluster = etcd.url, "rewire"

        def stage(name: str, marker: str) -> tuple[Child, dict[str, float]]:
            child = spawn(children, f"{name} {marker}", stage_main, url, cluster, name, marker)
            (info,) = expect(child, "ready", SLACK)
            return child, info

        stage("last", "-")
        old, _ = stage("step2", "s2-0")
        stage("step1", "-")

        # Paced: the times of joins and leaves.
        stream = start_stream(children, url, cluster, options.rate, IN_FLIGHT)
        wait_tally(stream, seen("s2-0"), "no result through step2", SLACK)
        joins: list[dict[str, float]] = []
        leaves: list[dict[str, float]] = []
        for rep in range(reps):
            old, join, leave = rewire(children, stage, stream, old, f"s2-{rep}", f"s2-{rep + 1}")
            joins.append(join)
            leaves.append(leave)
            log(
                f"rewire {rep + 1}/{reps}: join {ms(join['seen'])}, leave {ms(leave['seen'])}"
                f" (stop() {ms(leave['stop'])})"
            )
        paced = finish(stream)
        children.stop([stream])

        # At full speed, queues full: is any job lost?
        stream = start_stream(children, url, cluster, 0, PIPELINE_IN_FLIGHT)
        wait_tally(stream, seen(f"s2-{reps}"), "no result through step2", SLACK)
        began = time.monotonic()
        old, busy_join, busy_leave = rewire(
            children, stage, stream, old, f"s2-{reps}", f"s2-{reps + 1}"
        )
        loaded = finish(stream)
        speed = loaded["sent"] / (time.monotonic() - began)
        log(f"rewire at full speed: join {ms(busy_join['seen'])}, leave {ms(busy_leave['seen'])}")
    join, leave = medians(joins), medians(leaves)
    flow = f"stream of {options.rate:g} jobs/s, ≤{IN_FLIGHT} in flight"
    rows.append(
        timing_row(
            "rewire-join",
            "join: new step2's start() returned → first result through it",
            joins,
            "seen",
            f"it ran its first job after {ms(join['ran'])}, whose result reached the client"
            f" {ms(join['seen'] - join['ran'])} later (medians); {flow}",
        )
    )
    rows.append(
        timing_row(
            "rewire-leave",
            "leave: step2's stop() called → last result through it (then all on the survivor)",
            leaves,
            "seen",
            f"it ran its last job after {ms(leave['ran'])}; stop() returned after"
            f" {ms(leave['stop'])} (it serves until its input is quiet) (medians)",
        )
    )
    rows.append(
        lost_row(
            "rewire-lost",
            f"jobs lost over {reps} join(s) and {reps} leave(s), {options.rate:g} jobs/s",
            paced,
            flow,
        )
    )
    rows.append(
        lost_row(
            "rewire-lost-loaded",
            f"jobs lost over 1 join and 1 leave at full speed, {PIPELINE_IN_FLIGHT} in flight",
            loaded,
            f"about {speed:,.0f} jobs/s; join {ms(busy_join['seen'])} (ran"
            f" {ms(busy_join['ran'])}), leave {ms(busy_leave['seen'])} (ran"
            f" {ms(busy_leave['ran'])}), stop() {ms(busy_leave['stop'])}",
        )
    )


# ---------------------------------------------------------------- 3. scale


def timed(call: Callable[[], object], times: int) -> list[float]:
    samples = []
    for _ in range(times):
        began = time.monotonic()
        call()
        samples.append(time.monotonic() - began)
    return samples


def pylm_ls(url: str, cluster: str) -> int:
    """Run ``pylm ls --json``; how many instances it lists."""
    command = [sys.executable, "-m", "pylm.cli", "--registry", url, "--cluster", cluster]
    run = subprocess.run(
        [*command, "ls", "--json"], capture_output=True, text=True, timeout=SLACK, check=False
    )
    if run.returncode != 0:
        raise BenchError(f"pylm ls --json failed ({run.returncode}): {run.stderr[-2000:]}")
    servers = json.loads(run.stdout)["servers"]
    return sum(len(server["instances"]) for server in servers.values())


def measure_scale(options: Options, children: Children, rows: list[Row], log: Log) -> None:
    from pylm.registry import Registry

    sizes = options.fleet
    total, ttl = options.servers, options.ttl
    shape = f"{len(sizes)} processes x {sizes[0]}" + (
        f" (last {sizes[-1]})" if sizes[-1] != sizes[0] else ""
    )
    with fresh_etcd(children) as etcd, Registry(etcd.url, cluster="fleet") as registry:
        url = etcd.url
        launched = time.monotonic()
        fleet = [
            spawn(
                children,
                f"fleet {index}",
                fleet_main,
                url,
                "fleet",
                f"svc{index:02d}",
                str(size),
                f"{ttl:g}",
            )
            for index, size in enumerate(sizes)
        ]
        wait_count(registry, lambda count: count >= total, REGISTER_LIMIT, fleet)
        listed = time.monotonic() - launched
        infos = [expect(child, "ready", SLACK)[0] for child in fleet]
        ready = sorted(info["registered"] - launched for info in infos)
        first = min(info["first"] for info in infos) - launched
        log(f"scale: {total} servers listed after {listed:.2f} s")
        rows.append(
            Row(
                "scale-register",
                f"{total} name-only servers ({shape}): launch → all listed by instances()",
                f"{listed:.2f} s",
                f"the first server was registered after {first:.2f} s (Python and pylm"
                f" starting), the last server of each process after {ready[len(ready) // 2]:.2f}"
                f" s (median process) and {ready[-1]:.2f} s (slowest)",
                listed,
                "s",
                {"first_registered_s": first, "process_done_s": ready},
            )
        )
        pids = [child.process.pid for child in fleet if child.process.pid is not None]
        rss = [rss_kib(pid) for pid in pids]

        # The keep-alive load, once every registration refreshes on its own rhythm.
        time.sleep(options.settle)
        before, cpu_before = scrape(etcd.client_port), [cpu_seconds(pid) for pid in pids]
        began = time.monotonic()
        time.sleep(options.window)
        after, cpu_after = scrape(etcd.client_port), [cpu_seconds(pid) for pid in pids]
        window = time.monotonic() - began

        def rate(name: str, *labels: str) -> float:
            return (metric(after, name, *labels) - metric(before, name, *labels)) / window

        keep_alives = rate("grpc_server_msg_received_total", 'grpc_method="LeaseKeepAlive"')
        renewed = rate("etcd_debugging_lease_renewed_total")
        requests = rate("grpc_server_started_total")
        etcd_cpu = rate("process_cpu_seconds_total")
        fleet_cpu = (sum(cpu_after) - sum(cpu_before)) / window
        expected = len(fleet) / (ttl / 3)  # the servers of a process share one lease
        rows.append(
            Row(
                "scale-keepalive",
                f"etcd keep-alive load, {total} servers in {len(fleet)} leases of {ttl:g} s",
                f"{keep_alives:,.0f} req/s",
                f"expected {len(fleet)} / ({ttl:g} s / 3) = {expected:,.0f}/s; measured over"
                f" {window:.1f} s from etcd's /metrics (gRPC LeaseKeepAlive messages; leases"
                f" renewed {renewed:,.0f}/s; all gRPC calls {requests:,.0f}/s); CPU meanwhile:"
                f" etcd {etcd_cpu:.0%} of a core, the server processes {fleet_cpu:.0%}"
                + (
                    f" ({fleet_cpu / keep_alives * 1000:.1f} ms of CPU per keep-alive)"
                    if keep_alives
                    else ""
                ),
                keep_alives,
                "req/s",
                {
                    "expected_per_s": expected,
                    "leases_renewed_per_s": renewed,
                    "grpc_calls_per_s": requests,
                    "etcd_cpu_cores": etcd_cpu,
                    "servers_cpu_cores": fleet_cpu,
                    "window_s": window,
                },
            )
        )

        counts: list[int] = []
        calls = timed(lambda: counts.append(len(registry.instances())), options.calls)
        if set(counts) != {total}:
            raise BenchError(f"instances() listed {sorted(set(counts))}, expected {total}")
        rows.append(
            Row(
                "scale-instances",
                f"Registry.instances() with {total} records",
                spread(calls),
                f"median (min to max) of {len(calls)} calls from a connected client",
                statistics.median(calls) * 1000,
                "ms",
                {"samples_s": calls},
            )
        )

        listings: list[int] = []
        ls = timed(lambda: listings.append(pylm_ls(url, "fleet")), options.ls_runs)
        empty = timed(lambda: pylm_ls(url, "empty"), options.ls_runs)
        if set(listings) != {total}:
            raise BenchError(f"pylm ls listed {sorted(set(listings))}, expected {total}")
        rows.append(
            Row(
                "scale-ls",
                f"`pylm ls --json` with {total} records",
                spread(ls),
                f"the whole command, Python's start-up included; on an empty cluster"
                f" {spread(empty)}; {len(ls)} run(s) each",
                statistics.median(ls) * 1000,
                "ms",
                {"samples_s": ls, "empty_cluster_s": empty},
            )
        )

        bare = sum(int(info["rss_bare_kib"]) for info in infos)
        etcd_rss = metric(after, "process_resident_memory_bytes") / 2**20
        rows.append(
            Row(
                "scale-memory",
                "memory per server",
                f"{sum(rss) / total:,.0f} KiB",
                f"resident memory of the {len(rss)} server processes / {total}; above what"
                f" each process held with pylm imported and its Registry open:"
                f" {(sum(rss) - bare) / total:,.0f} KiB; etcd's RSS {etcd_rss:,.0f} MiB",
                sum(rss) / total,
                "KiB",
                {"rss_kib": rss, "bare_rss_kib": bare, "etcd_rss_mib": etcd_rss},
            )
        )

        victim, remaining = fleet[0], total - sizes[0]
        victim.process.kill()
        killed = time.monotonic()
        count = wait_count(registry, lambda count: count <= remaining, 3 * ttl + SLACK, fleet[1:])
        noticed = time.monotonic() - killed
        log(f"scale: {sizes[0]} killed servers gone after {noticed:.2f} s")
        rows.append(
            Row(
                "scale-expiry",
                f"{sizes[0]} servers SIGKILLed (1 process) → instances() lists {remaining}",
                f"{noticed:.2f} s",
                f"lease TTL {ttl:g} s, refreshed every {ttl / 3:g} s, so expected between"
                f" {ttl * 2 / 3:g} and {ttl:g} s plus etcd's expiry check; polled every"
                f" {COUNT_POLL * 1000:g} ms"
                + (f"; UNEXPECTED: {count} listed" if count != remaining else ""),
                noticed,
                "s",
                {"listed_after": count},
                failed=count != remaining,
            )
        )


# ------------------------------------------------------------------------ report

MEASURES: dict[str, Callable[[Options, Children, list[Row], Log], None]] = {
    "start": measure_start,
    "rewire": measure_rewire,
    "scale": measure_scale,
}


def table(rows: Sequence[Row]) -> str:
    lines = ["| measurement | result | how, and more |", "|---|---:|---|"]
    lines += [f"| {row.label} | {row.text} | {row.detail} |" for row in rows]
    return "\n".join(lines)


def settings_line(options: Options) -> str:
    said = [f"Parts: {', '.join(options.parts)}; {options.reps} repetition(s)"]
    if "rewire" in options.parts:
        said.append(f"paced stream {options.rate:g} jobs/s")
    if "scale" in options.parts:
        said.append(
            f"{options.servers} servers, {options.per_process} a process, leases of"
            f" {options.ttl:g} s (short, so that expiry is quick to see), keep-alives"
            f" measured over {options.window:g} s"
        )
    return "; ".join(said) + "."


def report(options: Options, rows: Sequence[Row], info: dict[str, str], elapsed: float) -> str:
    pairs = "; ".join(f"{key}: {value}" for key, value in info.items())
    return "\n".join(
        [
            f"Machine: {pairs}",
            "",
            settings_line(options),
            "",
            table(rows),
            "",
            f"Total run time: {elapsed:.1f} s",
        ]
    )


# ---------------------------------------------------------------------------- CLI


def parts_list(text: str) -> tuple[str, ...]:
    names = {name.strip().lower() for name in text.split(",") if name.strip()}
    if not names or names - set(PARTS):
        raise argparse.ArgumentTypeError(f"choose among {', '.join(PARTS)}")
    return tuple(part for part in PARTS if part in names)


def parse_args(argv: Sequence[str] | None) -> tuple[Options, str | None]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.registry",
        description="pylm's etcd registry: start-up by name, rewiring, and scale.",
    )
    parser.add_argument("--only", type=parts_list, help=f"some of {','.join(PARTS)} (all of them)")
    parser.add_argument(
        "--reps", type=positive(int), help=f"start-ups, joins and leaves measured ({FULL.reps})"
    )
    parser.add_argument(
        "--rate", type=positive(float), help=f"jobs/s streamed while rewiring ({FULL.rate:g})"
    )
    parser.add_argument(
        "--servers", type=positive(int), help=f"servers of the scale part ({FULL.servers})"
    )
    parser.add_argument(
        "--per-process", type=positive(int), help=f"servers per process ({FULL.per_process})"
    )
    parser.add_argument(
        "--ttl", type=positive(float), help=f"lease TTL of those servers, s ({FULL.ttl:g})"
    )
    parser.add_argument(
        "--window", type=positive(float), help=f"s of keep-alives measured ({FULL.window:g})"
    )
    parser.add_argument("--json", metavar="PATH", help="also write every number to PATH")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK.reps} repetition, {QUICK.servers} servers, {QUICK.window:g} s"
        " window",
    )
    args = parser.parse_args(argv)
    chosen = QUICK if args.quick else FULL
    if args.ttl is not None and args.ttl < 1:
        parser.error("--ttl must be at least 1 s (etcd leases count whole seconds)")
    options = Options(
        parts=args.only or chosen.parts,
        reps=args.reps or chosen.reps,
        rate=args.rate or chosen.rate,
        servers=args.servers or chosen.servers,
        per_process=min(args.per_process or chosen.per_process, args.servers or chosen.servers),
        ttl=args.ttl or chosen.ttl,
        window=args.window or chosen.window,
        settle=chosen.settle,
        calls=chosen.calls,
        ls_runs=chosen.ls_runs,
    )
    return options, args.json


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the run the way Ctrl-C does: cleaned up


def main(argv: Sequence[str] | None = None) -> int:
    options, json_path = parse_args(argv)
    log = stderr_log
    info = machine(PACKAGES)
    info["etcd"] = etcd_version()
    rows: list[Row] = []
    interrupted = False
    previous = signal.signal(signal.SIGTERM, _interrupt)
    children = Children(multiprocessing.get_context("spawn"))
    began = time.monotonic()
    try:
        for part in options.parts:
            try:
                MEASURES[part](options, children, rows, log)
            except Exception as error:  # the other parts still run
                log(f"{part} FAILED:\n{traceback.format_exc()}")
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
                rows.append(
                    Row(
                        f"{part}-failed",
                        f"{part}: failed",
                        "failed",
                        f"{type(error).__name__}: {first_line[:300]}",
                        failed=True,
                    )
                )
            finally:
                children.stop_all()
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: every process and etcd stopped; partial results follow")
    finally:
        children.stop_all()
        signal.signal(signal.SIGTERM, previous)
    elapsed = time.monotonic() - began
    if pylm_source() != info["pylm source"]:
        info["pylm source"] += f" CHANGED DURING THE RUN (now {pylm_source()}): mixed versions"
        log(f"warning: pylm's source {info['pylm source']}")
    print(report(options, rows, info, elapsed), flush=True)
    if json_path is not None:
        data = {
            "machine": info,
            "settings": asdict(options),
            "elapsed_s": elapsed,
            "interrupted": interrupted,
            "results": [asdict(row) for row in rows],
        }
        with open(json_path, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=2)
            out.write("\n")
    if interrupted:
        return 130
    return 1 if any(row.failed for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
