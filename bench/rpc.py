"""Synchronous RPC round trips per second: pylm against raw pyzmq and peers.

Run from the repository root::

    python -m bench.rpc                    # the full run, a few minutes
    python -m bench.rpc --quick            # a smoke run of a few seconds
    python -m bench.rpc --only pylm,raw --json results.json

What is measured
    A remote function that returns the bytes payload it is given, called
    over TCP on 127.0.0.1, by

    * raw pyzmq: a REP socket echoing in a loop, called from a REQ socket;
      the baseline every other system is divided by;
    * pylm: a :class:`pylm.standalone.Server`, called with ``Client.job``;
    * zerorpc (gevent), its ``Server`` and ``Client``;
    * Pyro5 with its msgpack serializer (the fastest one that carries bytes
      as bytes: serpent turns them into base64 dicts, json refuses them),
      a ``Daemon`` serving an ``@expose`` class, called through a ``Proxy``;

    for payloads of 100 B and 10 KiB, from 1 client process and from 8
    concurrent ones. A pipelined row compares pylm's ``AsyncClient`` with 32
    calls in flight (32 coroutines, each calling in a loop) against a raw
    DEALER client keeping 32 messages in flight on a ROUTER echo server
    (100 B, 1 client process).

How
    Every server and every client runs in a process of its own (spawned, so
    nothing is inherited; zerorpc's gevent never enters another process).
    Servers bind port 0 / a random port on 127.0.0.1 and send their address
    back over a pipe. For each round, each system in turn (the order rotates
    from round to round) gets a fresh server and fresh client processes,
    which then run every cell of the matrix for that system:

    1. each client checks that one call echoes the payload as bytes, then
       calls for ``--warmup`` seconds;
    2. once all are warm, the parent picks a common window [start, end] of
       ``--duration`` seconds on the machine's monotonic clock, which every
       process shares, starting a moment later;
    3. each client calls from ``start`` until ``end`` and counts the calls
       that completed inside the window; throughput = sum of the counts /
       duration.

    The table reports, per cell, the median over ``--rounds`` rounds and its
    ratio to raw pyzmq in the same row. ``--json`` also keeps every round.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext, SpawnProcess
from typing import Any, TypeVar

from bench.processes import client_main, server_main
from bench.systems import PIPELINE_DEPTH, SYSTEMS, System

PAYLOADS = (100, 10 * 1024)
CLIENTS = (1, 8)
QUICK_CLIENTS = (1, 2)
PIPELINE_PAYLOAD = 100
FAMILIES = {  # --only name -> (column title, modules it needs)
    "raw": ("raw pyzmq", ("zmq",)),
    "pylm": ("pylm", ("zmq",)),
    "zerorpc": ("zerorpc", ("zerorpc", "gevent", "msgpack")),
    "pyro5": ("Pyro5 (msgpack)", ("Pyro5", "msgpack")),
}
SYNC_SYSTEMS = ("raw-req", "pylm", "zerorpc", "pyro5")
PIPELINED_SYSTEMS = ("raw-dealer", "pylm-async")
GO_MARGIN = 0.1  # s between the go order and the window start
SLACK = 30.0  # s allowed beyond the expected time for any answer
STOP_GRACE = 2.0  # s a process gets to exit before it is terminated, then killed

Log = Callable[[str], None]
Number = TypeVar("Number", int, float)


class BenchError(Exception):
    """A server or client process failed, died or did not answer in time."""


@dataclass(frozen=True)
class Cell:
    """One measurement point of the matrix."""

    payload: int
    clients: int
    depth: int = 1

    @property
    def label(self) -> str:
        size = f"{self.payload // 1024} KiB" if self.payload % 1024 == 0 else f"{self.payload} B"
        text = f"{size}, {self.clients} client{'s' if self.clients > 1 else ''}"
        return text + (f", {self.depth} in flight" if self.depth > 1 else "")


@dataclass
class Series:
    """The throughputs of one system in one cell, one per successful round."""

    system: System
    cell: Cell
    rates: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None


@dataclass(frozen=True)
class Settings:
    """What to measure and for how long (seconds)."""

    duration: float
    warmup: float
    rounds: int
    clients: tuple[int, ...]
    families: tuple[str, ...]


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


@contextmanager
def session(children: Children, system: System, clients: int) -> Iterator[list[Child]]:
    """A fresh server for ``system`` and ``clients`` client processes."""
    started: list[Child] = []
    try:
        server = children.start(f"{system.id} server", server_main, system.id)
        started.append(server)
        (address,) = expect(server, "ready", SLACK)
        for index in range(clients):
            started.append(
                children.start(f"{system.id} client {index}", client_main, system.id, address)
            )
        yield started[1:]
    finally:
        children.stop(started)


def measure(clients: Sequence[Child], cell: Cell, settings: Settings, log: Log) -> float:
    """Warm up ``cell.clients`` clients, run them in one common window;
    return the calls per second they completed together."""
    active = clients[: cell.clients]
    for child in active:
        send(child, ("cell", cell.payload, settings.warmup))
    for child in active:
        expect(child, "ready", settings.warmup + SLACK)
    start = time.monotonic() + GO_MARGIN
    end = start + settings.duration
    for child in active:
        send(child, ("go", start, end))
    calls, late = 0, 0.0
    for child in active:
        count, lateness = expect(child, "done", GO_MARGIN + settings.duration + SLACK)
        calls += int(count)
        late = max(late, float(lateness))
    if late > 0:
        log(f"  warning: a client got its start order {late * 1000:.1f} ms late")
    return calls / settings.duration


# ------------------------------------------------------------------------- the run


def plan(settings: Settings) -> list[tuple[System, list[Cell]]]:
    """Each selected system with the cells it is measured in."""
    sync = [Cell(payload, clients) for payload in PAYLOADS for clients in settings.clients]
    pipelined = [Cell(PIPELINE_PAYLOAD, 1, PIPELINE_DEPTH)]
    chosen = [(SYSTEMS[name], sync) for name in SYNC_SYSTEMS]
    chosen += [(SYSTEMS[name], pipelined) for name in PIPELINED_SYSTEMS]
    return [(system, cells) for system, cells in chosen if system.family in settings.families]


def run(settings: Settings, results: dict[tuple[str, Cell], Series], log: Log) -> None:
    """Measure every cell ``settings.rounds`` times, systems interleaved."""
    plans = plan(settings)
    for system, cells in plans:
        for cell in cells:
            results[system.id, cell] = Series(system, cell)
    children = Children(multiprocessing.get_context("spawn"))
    try:
        for round_ in range(settings.rounds):
            shift = round_ % len(plans)
            for system, cells in plans[shift:] + plans[:shift]:
                run_system(children, system, cells, settings, results, round_, log)
    finally:
        children.stop_all()


def run_system(
    children: Children,
    system: System,
    cells: list[Cell],
    settings: Settings,
    results: dict[tuple[str, Cell], Series],
    round_: int,
    log: Log,
) -> None:
    tag = f"round {round_ + 1}/{settings.rounds} {system.label}"
    measured = 0
    try:
        with session(children, system, max(cell.clients for cell in cells)) as clients:
            for cell in cells:
                rate = measure(clients, cell, settings, log)
                results[system.id, cell].rates.append(rate)
                measured += 1
                log(f"{tag} | {cell.label}: {rate:,.0f} calls/s")
    except BenchError as error:
        log(f"{tag} FAILED: {error}")
        for cell in cells[measured:]:
            results[system.id, cell].errors.append(f"round {round_ + 1}: {error}")


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


def machine() -> dict[str, str]:
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
    for package in ("pyzmq", "pylm", "zerorpc", "gevent", "Pyro5", "msgpack"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = "not installed"
    info["pylm source"] = pylm_source()
    return info


def ratio_to_raw(series: Series, results: dict[tuple[str, Cell], Series]) -> float | None:
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


def table(results: dict[tuple[str, Cell], Series], families: Sequence[str]) -> str:
    """The markdown table: a row per cell, a column per system family."""
    rows: dict[Cell, dict[str, Series]] = {}
    for series in results.values():
        rows.setdefault(series.cell, {})[series.system.family] = series
    lines = [
        "| case | " + " | ".join(FAMILIES[family][0] for family in families) + " |",
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
        lines.append(f"| {cell.label} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def report(
    results: dict[tuple[str, Cell], Series],
    settings: Settings,
    info: dict[str, str],
    elapsed: float,
) -> str:
    pairs = "; ".join(f"{key}: {value}" for key, value in info.items())
    return "\n".join(
        [
            f"Machine: {pairs}",
            "",
            f"Round trips per second, median of {settings.rounds} round(s) of"
            f" {settings.duration:g} s (after {settings.warmup:g} s of warm-up);"
            " in brackets: ratio to raw pyzmq in the same row.",
            "",
            table(results, settings.families),
            "",
            "raw pyzmq: REQ client / REP server; in the pipelined row, DEALER client / ROUTER"
            " echo server. pylm: Client; in the pipelined row, AsyncClient. zerorpc and Pyro5:"
            " one blocking client per process. Every server and client in its own process;"
            " every client first checks that a reply is its payload, as bytes.",
            *spread(results),
            f"Total run time: {elapsed:.1f} s",
        ]
    )


def spread(results: dict[tuple[str, Cell], Series]) -> list[str]:
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


def to_json(
    results: dict[tuple[str, Cell], Series],
    settings: Settings,
    info: dict[str, str],
    elapsed: float,
) -> dict[str, Any]:
    return {
        "machine": info,
        "settings": {
            "duration_s": settings.duration,
            "warmup_s": settings.warmup,
            "rounds": settings.rounds,
            "clients": list(settings.clients),
            "systems": list(settings.families),
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
                "errors": series.errors,
            }
            for series in results.values()
        ],
    }


# ---------------------------------------------------------------------------- CLI


def positive(kind: Callable[[str], Number]) -> Callable[[str], Number]:
    """An argparse type: ``kind`` of the text, which must be above zero."""

    def parse(text: str) -> Number:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def families_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip().lower() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in FAMILIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose among {', '.join(FAMILIES)}")
    return tuple(name for name in FAMILIES if name in names)  # the table's order


def clients_list(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,8, got {text!r}") from None
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError("client counts must be at least 1")
    return counts


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, str | None]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rpc",
        description="RPC round trips per second: pylm, raw pyzmq, zerorpc, Pyro5.",
    )
    parser.add_argument("--duration", type=positive(float), help="seconds measured per cell (1.5)")
    parser.add_argument("--warmup", type=positive(float), help="seconds of warm-up per cell (0.5)")
    parser.add_argument("--rounds", type=positive(int), help="rounds; the median is reported (3)")
    parser.add_argument(
        "--clients", type=clients_list, help="client process counts (1,8; --quick: 1,2)"
    )
    parser.add_argument("--only", type=families_list, default=tuple(FAMILIES), help="e.g. pylm,raw")
    parser.add_argument("--json", metavar="PATH", help="also write every number to PATH")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 0.2 s cells, 0.1 s warm-up, 1 round"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    settings = Settings(
        duration=args.duration or (0.2 if quick else 1.5),
        warmup=args.warmup or (0.1 if quick else 0.5),
        rounds=args.rounds or (1 if quick else 3),
        clients=args.clients or (QUICK_CLIENTS if quick else CLIENTS),
        families=args.only,
    )
    return settings, args.json


def installed(families: Sequence[str], log: Log) -> tuple[str, ...]:
    """The families whose modules can be imported (checked without importing)."""
    kept = []
    for family in families:
        missing = [m for m in FAMILIES[family][1] if importlib.util.find_spec(m) is None]
        if missing:
            log(f"skipping {family}: {', '.join(missing)} not installed (pip install -e .[bench])")
        else:
            kept.append(family)
    return tuple(kept)


def main(argv: Sequence[str] | None = None) -> int:
    settings, json_path = parse_args(argv)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    families = installed(settings.families, log)
    if not families:
        log("nothing to measure")
        return 1
    settings = dataclasses.replace(settings, families=families)
    info = machine()
    results: dict[tuple[str, Cell], Series] = {}
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
    print(report(results, settings, info, elapsed), flush=True)
    if json_path is not None:
        with open(json_path, "w", encoding="utf-8") as out:
            json.dump(to_json(results, settings, info, elapsed), out, indent=2)
            out.write("\n")
    if interrupted:
        return 130
    return 1 if any(series.errors for series in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
