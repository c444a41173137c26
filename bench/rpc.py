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
import importlib.util
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

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
    names_list,
    run_rounds,
    stderr_log,
    timing,
)
from bench.processes import client_main, server_main
from bench.systems import PIPELINE_DEPTH, SYSTEMS, System

PAYLOADS = (100, 10 * 1024)
CLIENTS = (1, 8)
QUICK_CLIENTS = (1, 2)
PIPELINE_PAYLOAD = 100
FAMILIES = {  # --only name -> (column title, modules it needs)
    "raw": ("raw pyzmq", ("zmq",)),
    "pylm": ("pylm", ("zmq",)),
    "pylm-quiet": ("pylm, metrics off", ("zmq",)),
    "zerorpc": ("zerorpc", ("zerorpc", "gevent", "msgpack")),
    "pyro5": ("Pyro5 (msgpack)", ("Pyro5", "msgpack")),
}
SYNC_SYSTEMS = ("raw-req", "pylm", "pylm-quiet", "zerorpc", "pyro5")
PIPELINED_SYSTEMS = ("raw-dealer", "pylm-async")
FULL = Timing(duration=1.5, warmup=0.5, rounds=3)
QUICK = Timing(duration=0.1, warmup=0.05, rounds=1)
REPORT = Report(
    what="Round trips per second",
    notes="raw pyzmq: REQ client / REP server; in the pipelined row, DEALER client / ROUTER"
    ' echo server. pylm: Client; in the pipelined row, AsyncClient; "metrics off": the'
    " same with PYLM_METRICS=0 in server and clients. zerorpc and Pyro5:"
    " one blocking client per process. Every server and client in its own process;"
    " every client first checks that a reply is its payload, as bytes.",
    titles={family: title for family, (title, _) in FAMILIES.items()},
)


@contextmanager
def session(children: Children, system: System, cells: list[Cell]) -> Iterator[list[Child]]:
    """A fresh server for ``system`` and as many client processes as
    ``cells`` need."""
    started: list[Child] = []
    try:
        server = children.start(f"{system.id} server", server_main, system.id)
        started.append(server)
        (address,) = expect(server, "ready", SLACK)
        for index in range(max(cell.clients for cell in cells)):
            started.append(
                children.start(f"{system.id} client {index}", client_main, system.id, address)
            )
        yield started[1:]
    finally:
        children.stop(started)


def plan(settings: Settings) -> list[tuple[System, list[Cell]]]:
    """Each selected system with the cells it is measured in."""
    sync = [Cell(payload, clients) for payload in settings.payloads for clients in settings.clients]
    pipelined = [Cell(PIPELINE_PAYLOAD, 1, PIPELINE_DEPTH)]
    chosen = [(SYSTEMS[name], sync) for name in SYNC_SYSTEMS]
    chosen += [(SYSTEMS[name], pipelined) for name in PIPELINED_SYSTEMS]
    return [(system, cells) for system, cells in chosen if system.family in settings.families]


def run(settings: Settings, results: Results, log: Log) -> None:
    """Measure every cell ``settings.rounds`` times, systems interleaved."""
    run_rounds(plan(settings), session, settings, results, log)


# ---------------------------------------------------------------------------- CLI


def positive_list(example: str, too_small: str) -> Callable[[str], tuple[int, ...]]:
    """An argparse type for a comma-separated list of positive numbers,
    sorted and without repeats; ``example`` and ``too_small`` word its errors."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            numbers = tuple(sorted({int(part) for part in text.split(",")}))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {example}, got {text!r}") from None
        if not numbers or numbers[0] < 1:
            raise argparse.ArgumentTypeError(too_small)
        return numbers

    return parse


clients_list = positive_list("numbers like 1,8", "client counts must be at least 1")
sizes_list = positive_list("sizes like 100,10240", "payload sizes must be at least 1 byte")


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, str | None]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rpc",
        description="RPC round trips per second: pylm, raw pyzmq, zerorpc, Pyro5.",
    )
    add_timing_options(parser, FULL)
    parser.add_argument(
        "--clients", type=clients_list, help="client process counts (1,8; --quick: 1,2)"
    )
    parser.add_argument(
        "--only", type=names_list(tuple(FAMILIES)), default=tuple(FAMILIES), help="e.g. pylm,raw"
    )
    parser.add_argument(
        "--payloads",
        type=sizes_list,
        default=PAYLOADS,
        help="payload sizes in bytes of the synchronous rows (100,10240)",
    )
    add_output_options(parser, QUICK)
    args = parser.parse_args(argv)
    chosen = timing(args, FULL, QUICK)
    settings = Settings(
        duration=chosen.duration,
        warmup=chosen.warmup,
        rounds=chosen.rounds,
        clients=args.clients or (QUICK_CLIENTS if args.quick else CLIENTS),
        families=args.only,
        payloads=args.payloads,
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
    families = installed(settings.families, stderr_log)
    if not families:
        stderr_log("nothing to measure")
        return 1
    settings = dataclasses.replace(settings, families=families)
    return execute(settings, json_path, run, REPORT, stderr_log)


if __name__ == "__main__":
    sys.exit(main())
