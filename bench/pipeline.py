"""Jobs per second through a 3-stage pipeline: pylm against raw pyzmq.

Run from the repository root::

    python -m bench.pipeline               # the full run, under two minutes
    python -m bench.pipeline --quick       # a smoke run of a few seconds
    python -m bench.pipeline --rounds 5 --json results.json

What is measured
    End-to-end throughput of a pipeline of three stages, each in its own
    process, fed and drained by one client process, over TCP on 127.0.0.1:

    * raw pyzmq: a PUSH/PULL chain, client -> stage 1 -> stage 2 -> stage 3
      -> client; each stage receives a message and sends it on;
    * pylm: two :class:`pylm.chained.Server` stages and a
      :class:`~pylm.chained.LastServer`, fed by a
      :class:`~pylm.chained.LoopClient`;

    for payloads of 100 B and 10 KiB. Each stage's work is the same in both:
    it hands the payload on unchanged. Both clients keep up to 1000 jobs in
    flight. See :mod:`bench.chains` for the details of either side.

How
    As in :mod:`bench.rpc` (whose machinery this reuses): every process is
    spawned; stages bind port 0 / a random port and report their addresses
    over a pipe, the last stage first since each stage needs the next one's
    address. Each round, each system in turn (the order rotates from round
    to round) gets fresh processes, which run every payload size:

    1. the client checks that one job comes back as its payload, in bytes,
       then runs jobs for ``--warmup`` seconds (and gets all of them back);
    2. the parent picks a window [start, end] of ``--duration`` seconds on the
       machine's monotonic clock, starting a moment later;
    3. from ``start``, the client sends jobs from a generator that stops
       yielding at ``end``, receives results, and counts those that arrive by
       ``end``; throughput = count / duration.

    The table reports the median over ``--rounds`` rounds and its ratio to
    raw pyzmq. Counting only results in the window slightly favours the
    faster system: the pipeline starts empty, so the first results arrive
    one pipeline latency after ``start`` (1000 jobs / throughput, a few
    tens of ms at most, against several seconds of window).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from bench.chains import (
    CHAINS,
    IN_FLIGHT,
    LARGE_IN_FLIGHT,
    STAGES,
    Chain,
    StageAddresses,
    client_main,
    in_flight,
    stage_main,
)
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
    send,
    stderr_log,
    timing,
)

PAYLOADS = (100, 10 * 1024, 1024 * 1024)
FAMILIES = ("raw", "pylm", "pylm-unbatched", "pylm-async", "pylm-quiet")  # run by default
CHOICES = (*FAMILIES, "pylm-batch64")  # --only may also ask for these
FULL = Timing(duration=5.0, warmup=1.0, rounds=3)
QUICK = Timing(duration=0.1, warmup=0.05, rounds=1)
REPORT = Report(
    what=f"Jobs per second through {STAGES} stages, {IN_FLIGHT} in flight"
    f" ({LARGE_IN_FLIGHT} of 1 MiB)",
    notes="raw pyzmq: PUSH/PULL chain, the client PUSHes to stage 1 and PULLs the results"
    " from stage 3 on a socket it binds. pylm: chained Server, Server, LastServer and a"
    f" LoopClient(max_in_flight={IN_FLIGHT}, {LARGE_IN_FLIGHT} for 1 MiB jobs, as raw)."
    " Every stage passes the payload on unchanged;"
    " every stage and the client in its own process; the client first checks that a result"
    " is its payload, as bytes, and counts only results that arrive within the window."
    ' "batch=1": one job per message (no batching); "batch=64": LoopClient(batch=64).'
    ' "AsyncLoopClient": the same jobs in flight from an event loop.'
    ' "metrics off": pylm with PYLM_METRICS=0 in stages and client.',
    titles={
        "raw": "raw pyzmq",
        "pylm": "pylm",
        "pylm-unbatched": "pylm, batch=1",
        "pylm-async": "pylm, AsyncLoopClient",
        "pylm-quiet": "pylm, metrics off",
        "pylm-batch64": "pylm, batch=64",
    },
    packages=("pyzmq", "pylm"),
    row_label=lambda cell: cell.size,
)


@contextmanager
def session(children: Children, chain: Chain, cells: list[Cell]) -> Iterator[list[Child]]:
    """Fresh processes for ``chain``: the client, then the stages from the
    last to the first, each connected to the one after it."""
    started: list[Child] = []
    try:
        client = children.start(f"{chain.id} client", client_main, chain.id)
        started.append(client)
        (downstream,) = expect(client, "bound", SLACK)
        stages: list[StageAddresses] = []
        for stage in range(STAGES, 0, -1):
            name = f"{chain.id} stage {stage}"
            child = children.start(name, stage_main, chain.id, str(stage), downstream)
            started.append(child)
            (addresses,) = expect(child, "ready", SLACK)
            stages.insert(0, addresses)
            downstream = addresses.input
        send(client, ("connect", stages[0], stages[-1]))
        yield [client]
    finally:
        children.stop(started)


def run(settings: Settings, results: Results, log: Log) -> None:
    """Measure every payload ``settings.rounds`` times, systems interleaved."""
    cells = [Cell(payload, 1, in_flight(payload)) for payload in PAYLOADS]
    plans = [(chain, cells) for chain in CHAINS.values() if chain.family in settings.families]
    run_rounds(plans, session, settings, results, log, unit="jobs/s")


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, str | None]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pipeline",
        description=f"Jobs per second through a {STAGES}-stage pipeline: pylm and raw pyzmq.",
    )
    add_timing_options(parser, FULL)
    parser.add_argument(
        "--only",
        type=names_list(CHOICES),
        default=FAMILIES,
        help=f"e.g. raw,pylm (among {','.join(CHOICES)}; default: all but the last)",
    )
    add_output_options(parser, QUICK)
    args = parser.parse_args(argv)
    chosen = timing(args, FULL, QUICK)
    settings = Settings(chosen.duration, chosen.warmup, chosen.rounds, (1,), args.only)
    return settings, args.json


def main(argv: Sequence[str] | None = None) -> int:
    settings, json_path = parse_args(argv)
    return execute(settings, json_path, run, REPORT, stderr_log)


if __name__ == "__main__":
    sys.exit(main())
