"""What the benchmarks share: child processes, measurement windows, rounds,
tables, machine information and the command line's common options.

A benchmark (:mod:`bench.rpc`, :mod:`bench.pipeline`) says which systems it
measures in which cells and how to start one session of a system (its
processes); this module runs the rounds, systems interleaved, and reports
medians with their ratio to raw pyzmq.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import multiprocessing
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext, SpawnProcess
from typing import Any, Protocol, TypeVar

GO_MARGIN = 0.1  # s between the go order and the window start
SLACK = 30.0  # s allowed beyond the expected time for any answer
STOP_GRACE = 2.0  # s a process gets to exit before it is terminated, then killed
PACKAGES = ("pyzmq", "pylm", "zerorpc", "gevent", "Pyro5", "msgpack")

Log = Callable[[str], None]
Number = TypeVar("Number", int, float)


class BenchError(Exception):
    """A server or client process failed, died or did not answer in time."""


class Entrant(Protocol):
    """One side of a comparison, as the harness sees it."""

    @property
    def id(self) -> str: ...  # unique; names the system to a child process

    @property
    def family(self) -> str: ...  # the table column: raw, pylm, ...

    @property
    def label(self) -> str: ...


EntrantT = TypeVar("EntrantT", bound=Entrant)


@dataclass(frozen=True)
class Cell:
    """One measurement point of the matrix."""

    payload: int
    clients: int
    depth: int = 1

    @property
    def size(self) -> str:
        return f"{self.payload // 1024} KiB" if self.payload % 1024 == 0 else f"{self.payload} B"

    @property
    def label(self) -> str:
        text = f"{self.size}, {self.clients} client{'s' if self.clients > 1 else ''}"
        return text + (f", {self.depth} in flight" if self.depth > 1 else "")


@dataclass
class Series:
    """The throughputs of one system in one cell, one per successful round."""

    system: Entrant
    cell: Cell
    rates: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    latencies: list[dict[str, float]] = field(default_factory=list)  # per round, µs
    cpu: list[float] = field(default_factory=list)  # per round: CPU µs per call, all processes

    @property
    def latency(self) -> dict[str, float] | None:
        """Each percentile's median over the rounds (µs), if calls were timed."""
        if not self.latencies:
            return None
        return {
            key: statistics.median(round_[key] for round_ in self.latencies)
            for key in self.latencies[0]
        }

    @property
    def median(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None

    @property
    def cpu_median(self) -> float | None:
        """CPU µs per call of every process of the system (median of the rounds)."""
        return statistics.median(self.cpu) if self.cpu else None


Results = dict[tuple[str, Cell], Series]

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """The latency percentiles of ``samples`` (seconds), in microseconds."""
    ordered = sorted(samples)
    last = len(ordered) - 1
    return {f"p{q:g}": ordered[min(last, round(q / 100 * last))] * 1e6 for q in PERCENTILES}


@dataclass(frozen=True)
class Settings:
    """What to measure and for how long (seconds)."""

    duration: float
    warmup: float
    rounds: int
    clients: tuple[int, ...]
    families: tuple[str, ...]
    payloads: tuple[int, ...] = (100, 10 * 1024)  # bytes, where a benchmark lets one choose


# ---------------------------------------------------------------- child processes


@dataclass
class Child:
    """A started process and the parent's end of its pipe."""

    name: str
    process: SpawnProcess
    conn: Connection


class Children:
    """Starts the child processes and makes sure every one of them ends."""

    def __init__(self, context: SpawnContext) -> None:
        self._context = context
        self._all: list[Child] = []

    def start(self, name: str, target: Callable[..., None], *args: str) -> Child:
        here, there = self._context.Pipe()
        process = self._context.Process(target=target, args=(*args, there), name=name, daemon=True)
        process.start()
        there.close()  # the child holds its own copy; ours would hide its exit
        child = Child(name, process, here)
        self._all.append(child)
        return child

    def stop(self, children: Sequence[Child]) -> None:
        """Ask politely, then terminate, then kill; by process, never by name."""
        for child in children:
            try:
                child.conn.send(("stop",))
            except OSError:
                pass
        deadline = time.monotonic() + STOP_GRACE
        for child in children:
            child.process.join(max(0.0, deadline - time.monotonic()))
        for end in ("terminate", "kill"):
            alive = [child.process for child in children if child.process.is_alive()]
            for process in alive:
                getattr(process, end)()
            for process in alive:
                process.join(STOP_GRACE)
        for child in children:
            child.conn.close()
        self._all = [child for child in self._all if child not in children]

    def stop_all(self) -> None:
        self.stop(list(self._all))

    def cpu_seconds(self) -> float | None:
        """The CPU time (user and system) the running children and their own
        children have used so far; None where /proc does not tell."""
        pids = {child.process.pid for child in self._all if child.process.pid is not None}
        return cpu_seconds(pids)


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pids: set[int]) -> float | None:
    """CPU seconds used by the processes ``pids`` and their descendants
    (their threads included, and the children they waited for), read from
    /proc; None without /proc. Kernel ticks (10 ms, most often) per
    process: a window of a second or more is precise to a percent or two,
    a smoke run's 0.1 s is not."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    parents: dict[int, int] = {}
    used: dict[int, int] = {}
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                text = stat.read()
        except OSError:  # gone meanwhile
            continue
        fields = text[text.rindex(b")") + 2 :].split()  # after the command's name
        parents[int(entry)] = int(fields[1])
        # utime + stime, and cutime + cstime: a child it waited for stays counted
        used[int(entry)] = sum(int(value) for value in fields[11:15])  # in ticks
    counted = {pid for pid in pids if pid in used}
    growing = True
    while growing:  # descendants: a child's own processes (an etcd, a server it ran)
        more = {pid for pid, parent in parents.items() if parent in counted} - counted
        counted |= more
        growing = bool(more)
    return sum(used[pid] for pid in counted) / _TICK


def send(child: Child, message: tuple[Any, ...]) -> None:
    try:
        child.conn.send(message)
    except OSError as exc:
        raise BenchError(f"{child.name} is gone ({exc})") from None


def expect(child: Child, kind: str, timeout: float) -> tuple[Any, ...]:
    """Wait for message ``kind`` from ``child``; return its fields."""
    if not child.conn.poll(timeout):
        raise BenchError(f"{child.name} sent no {kind!r} within {timeout:g} s")
    try:
        message = child.conn.recv()
    except (EOFError, OSError):
        child.process.join(1.0)
        raise BenchError(f"{child.name} died (exit code {child.process.exitcode})") from None
    if message[0] == "error":
        raise BenchError(f"{child.name} failed:\n{message[1]}")
    if message[0] != kind:
        raise BenchError(f"{child.name} sent {message!r}, expected {kind!r}")
    return tuple(message[1:])


def measure(
    clients: Sequence[Child],
    cell: Cell,
    settings: Settings,
    log: Log,
    latencies: list[float] | None = None,
    children: Children | None = None,
) -> tuple[float, float | None]:
    """Warm up ``cell.clients`` clients, run them in one common window;
    return the calls per second they completed together and, given the
    session's ``children``, the CPU µs per call every process of it used in
    that window (time other processes take is not in it; where the session
    keeps every core busy it moves with the rate). Clients that time each
    call add those times (seconds) to ``latencies``."""
    active = clients[: cell.clients]
    for child in active:
        send(child, ("cell", cell.payload, settings.warmup))
    for child in active:
        expect(child, "ready", settings.warmup + SLACK)
    start = time.monotonic() + GO_MARGIN
    end = start + settings.duration
    for child in active:
        send(child, ("go", start, end))
    used: list[float | None] = []
    if children is not None:
        for instant in (start, end):
            time.sleep(max(0.0, instant - time.monotonic()))
            used.append(children.cpu_seconds())
    calls, late = 0, 0.0
    for child in active:
        count, lateness, *samples = expect(child, "done", GO_MARGIN + settings.duration + SLACK)
        calls += int(count)
        late = max(late, float(lateness))
        if latencies is not None and samples:
            latencies.extend(samples[0])
    if late > 0:
        log(f"  warning: a client got its start order {late * 1000:.1f} ms late")
    cpu = None
    if len(used) == 2 and used[0] is not None and used[1] is not None and calls:
        cpu = (used[1] - used[0]) / calls * 1e6
    return calls / settings.duration, cpu


# ------------------------------------------------------------------------- rounds

# Starts the processes of one system for the given cells and yields its clients.
Session = Callable[[Children, EntrantT, list[Cell]], AbstractContextManager[list[Child]]]


def run_rounds(
    plans: Sequence[tuple[EntrantT, list[Cell]]],
    session: Session[EntrantT],
    settings: Settings,
    results: Results,
    log: Log,
    unit: str = "calls/s",
) -> None:
    """Measure every cell ``settings.rounds`` times, systems interleaved:
    each round, each system in turn (the order rotates from round to round)
    gets a fresh session that runs all of its cells."""
    for system, cells in plans:
        for cell in cells:
            results[system.id, cell] = Series(system, cell)
    children = Children(multiprocessing.get_context("spawn"))
    try:
        for round_ in range(settings.rounds):
            shift = round_ % len(plans)
            for system, cells in [*plans[shift:], *plans[:shift]]:
                tag = f"round {round_ + 1}/{settings.rounds} {system.label}"
                measured = 0
                try:
                    with session(children, system, cells) as clients:
                        for cell in cells:
                            samples: list[float] = []
                            rate, cpu = measure(clients, cell, settings, log, samples, children)
                            results[system.id, cell].rates.append(rate)
                            if cpu is not None:
                                results[system.id, cell].cpu.append(cpu)
                            if samples:
                                results[system.id, cell].latencies.append(percentiles(samples))
                            measured += 1
                            spent = "" if cpu is None else f", {cpu:,.1f} µs CPU each"
                            log(f"{tag} | {cell.label}: {rate:,.0f} {unit}{spent}")
                except BenchError as error:
                    log(f"{tag} FAILED: {error}")
                    for cell in cells[measured:]:
                        results[system.id, cell].errors.append(f"round {round_ + 1}: {error}")
    finally:
        children.stop_all()


# ------------------------------------------------------------------------ reports


def pylm_source() -> str:
    """A short digest of pylm's Python files: the client and server processes
    import pylm when they start, so an edit during a run mixes versions."""
    spec = importlib.util.find_spec("pylm")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(pathlib.Path(folder).rglob("*.py")):
            digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def machine(packages: Sequence[str] = PACKAGES) -> dict[str, str]:
    """What the numbers were measured on (peers' versions without importing them)."""
    import zmq

    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpus": str(os.cpu_count()),
        "cpu model": model,
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "libzmq": zmq.zmq_version(),
    }
    for package in packages:
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = "not installed"
    info["pylm source"] = pylm_source()
    return info


def ratio_to_raw(series: Series, results: Results) -> float | None:
    """``series``'s median over raw pyzmq's in the same cell, when both exist."""
    raw = next(
        (
            other
            for other in results.values()
            if other.cell == series.cell and other.system.family == "raw"
        ),
        None,
    )
    if raw is None or raw.median is None or series.median is None:
        return None
    return series.median / raw.median


def table(
    results: Results,
    families: Sequence[str],
    titles: Mapping[str, str],
    row_label: Callable[[Cell], str] = lambda cell: cell.label,
) -> str:
    """The markdown table: a row per cell, a column per system family."""
    rows: dict[Cell, dict[str, Series]] = {}
    for series in results.values():
        rows.setdefault(series.cell, {})[series.system.family] = series
    lines = [
        "| case | " + " | ".join(titles[family] for family in families) + " |",
        "|---|" + "---:|" * len(families),
    ]
    for cell, row in rows.items():
        texts = []
        for family in families:
            found = row.get(family)
            ratio = ratio_to_raw(found, results) if found is not None else None
            if found is None:
                texts.append("-")
            elif found.median is None:
                texts.append("failed" if found.errors else "not run")
            elif family == "raw" or ratio is None:
                texts.append(f"{found.median:,.0f}")
            else:
                texts.append(f"{found.median:,.0f} ({ratio:.2f}x)")
        lines.append(f"| {row_label(cell)} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def spread(results: Results) -> list[str]:
    """A line on how far apart the rounds of the least steady cell are."""
    ratios = [
        (max(series.rates) / min(series.rates), series)
        for series in results.values()
        if len(series.rates) > 1 and min(series.rates) > 0
    ]
    if not ratios:
        return []
    ratio, series = max(ratios, key=lambda pair: pair[0])
    return [
        f"Rounds of one cell differ by up to {ratio:.2f}x (max/min: {series.system.label},"
        f" {series.cell.label}); --json keeps every round."
    ]


@dataclass(frozen=True)
class Report:
    """What a benchmark prints around the shared table."""

    what: str  # what the numbers are, e.g. "Round trips per second"
    notes: str  # how each system was measured, after the table
    titles: Mapping[str, str]  # family -> column title
    packages: Sequence[str] = PACKAGES  # whose versions the machine line gives
    row_label: Callable[[Cell], str] = lambda cell: cell.label

    def text(
        self, results: Results, settings: Settings, info: dict[str, str], elapsed: float
    ) -> str:
        pairs = "; ".join(f"{key}: {value}" for key, value in info.items())
        return "\n".join(
            [
                f"Machine: {pairs}",
                "",
                f"{self.what}, median of {settings.rounds} round(s) of"
                f" {settings.duration:g} s (after {settings.warmup:g} s of warm-up);"
                " in brackets: ratio to raw pyzmq in the same row.",
                "",
                table(results, settings.families, self.titles, self.row_label),
                "",
                self.notes,
                *spread(results),
                f"Total run time: {elapsed:.1f} s",
            ]
        )


def to_json(
    results: Results, settings: Settings, info: dict[str, str], elapsed: float
) -> dict[str, Any]:
    return {
        "machine": info,
        "settings": {
            "duration_s": settings.duration,
            "warmup_s": settings.warmup,
            "rounds": settings.rounds,
            "clients": list(settings.clients),
            "systems": list(settings.families),
            "payloads": list(settings.payloads),
        },
        "elapsed_s": elapsed,
        "results": [
            {
                "system": series.system.id,
                "label": series.system.label,
                "payload_bytes": series.cell.payload,
                "clients": series.cell.clients,
                "in_flight_per_client": series.cell.depth,
                "rounds_per_s": series.rates,
                "median_per_s": series.median,
                "ratio_to_raw": ratio_to_raw(series, results),
                "latency_us": series.latency,
                "latency_us_per_round": series.latencies,
                "cpu_us_per_call": series.cpu_median,
                "cpu_us_per_call_per_round": series.cpu,
                "errors": series.errors,
            }
            for series in results.values()
        ],
    }


# ---------------------------------------------------------------------------- CLI


@dataclass(frozen=True)
class Timing:
    """Seconds per cell, seconds of warm-up per cell, rounds."""

    duration: float
    warmup: float
    rounds: int


def positive(kind: Callable[[str], Number]) -> Callable[[str], Number]:
    """An argparse type: ``kind`` of the text, which must be above zero."""

    def parse(text: str) -> Number:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def names_list(known: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type for a comma-separated choice among ``known`` (such
    as --only's), in ``known``'s order, without repeats."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(name.strip().lower() for name in text.split(",") if name.strip())
        unknown = [name for name in names if name not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose among {', '.join(known)}")
        return tuple(name for name in known if name in names)  # the table's order

    return parse


def add_timing_options(parser: argparse.ArgumentParser, full: Timing) -> None:
    """--duration, --warmup and --rounds, whose defaults are ``full``'s."""
    parser.add_argument(
        "--duration", type=positive(float), help=f"seconds measured per cell ({full.duration:g})"
    )
    parser.add_argument(
        "--warmup", type=positive(float), help=f"seconds of warm-up per cell ({full.warmup:g})"
    )
    parser.add_argument(
        "--rounds", type=positive(int), help=f"rounds; the median is reported ({full.rounds})"
    )


def add_output_options(parser: argparse.ArgumentParser, quick: Timing) -> None:
    """--json, and --quick, which runs with ``quick``'s timing."""
    parser.add_argument("--json", metavar="PATH", help="also write every number to PATH")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {quick.duration:g} s cells, {quick.warmup:g} s warm-up,"
        f" {quick.rounds} round{'s' if quick.rounds > 1 else ''}",
    )


def timing(args: argparse.Namespace, full: Timing, quick: Timing) -> Timing:
    """The timing the options ask for: ``quick``'s or ``full``'s, then
    --duration, --warmup and --rounds when given."""
    chosen = quick if args.quick else full
    return Timing(
        duration=args.duration or chosen.duration,
        warmup=args.warmup or chosen.warmup,
        rounds=args.rounds or chosen.rounds,
    )


def execute(
    settings: Settings,
    json_path: str | None,
    run: Callable[[Settings, Results, Log], None],
    report: Report,
    log: Log,
) -> int:
    """Run the benchmark, print its report and write its JSON; the exit code."""
    info = machine(report.packages)
    results: Results = {}
    began = time.monotonic()
    interrupted = False
    try:
        run(settings, results, log)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: every process stopped; partial results follow")
    elapsed = time.monotonic() - began
    if pylm_source() != info["pylm source"]:
        info["pylm source"] += f" CHANGED DURING THE RUN (now {pylm_source()}): mixed versions"
        log(f"warning: pylm's source {info['pylm source']}")
    print(report.text(results, settings, info, elapsed), flush=True)
    if json_path is not None:
        with open(json_path, "w", encoding="utf-8") as out:
            json.dump(to_json(results, settings, info, elapsed), out, indent=2)
            out.write("\n")
    if interrupted:
        return 130
    return 1 if any(series.errors for series in results.values()) else 0


def stderr_log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
