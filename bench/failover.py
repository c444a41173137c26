"""Jobs lost, and time lost, when an instance of a pipeline stage dies.

Run from the repository root::

    python -m bench.failover                  # 100,000 jobs, SIGKILL, about a minute
    python -m bench.failover --quick          # 2,000 jobs, a smoke run
    python -m bench.failover --signal STOP    # freeze the instance instead (SIGSTOP)
    python -m bench.failover --json out.json

What is measured
    A name-only pipeline ``first -> middle -> last`` with two instances of
    ``middle``, every stage in a process of its own, a local etcd, and a
    :class:`~pylm.chained.LoopClient` with the default options streaming
    ``--jobs`` jobs of 100 B as fast as the pipeline takes them. Two runs on
    the same processes:

    1. undisturbed: every job, timed;
    2. disturbed: once a fifth of the results are in, one of the two
       ``middle`` instances gets ``--signal`` (KILL, or STOP: it stays
       frozen until the run ends).

    For each run: the results that came back right, the jobs that ended in
    an error (and its type: a job lost in a dead instance ends in
    ``RequestTimeout``), results delivered twice, the run's seconds, and the
    longest gap between two consecutive results (how long the client saw
    nothing come back). ``extra s`` is the disturbed run's seconds minus the
    undisturbed run's.

The servers run with their defaults (a 10 s registry lease); the client
with its default timeout (10 s per job).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pylm.registry import Registry

__all__ = ["Run", "main"]

PAYLOAD = 100
STAGES = ("first", "middle", "middle", "last")


@dataclass
class Run:
    """One run's outcome, as the table and the JSON report it."""

    name: str
    jobs: int
    right: int
    failed: int
    errors: dict[str, int]
    duplicated: int
    wrong: int
    seconds: float
    longest_gap: float
    resent: int  # jobs the client sent again
    refused: int  # jobs that seemed lost when the retry budget had no token
    copies: int  # later copies of results, dropped by the client


def serve(name: str, next_call: str | None) -> None:
    """A stage process: ``python -m bench.failover --serve NAME [NEXT_CALL]``,
    with the registry in ``PYLM_REGISTRY`` and ``PYLM_CLUSTER``."""
    from pylm.chained import LastServer, Server

    if next_call is None:

        class Last(LastServer):
            def done(self, payload: bytes) -> bytes:
                return payload

        Last(name, log_stdout=False).start()
        return

    class Stage(Server):
        def step(self, payload: bytes) -> bytes:
            return payload

    Stage(name, next_call=next_call, log_stdout=False).start()


def _payloads(jobs: int) -> Iterator[bytes]:
    for n in range(jobs):
        yield b"%09d" % n + b"." * (PAYLOAD - 9)


def run(name: str, jobs: int, doomed: subprocess.Popen[bytes] | None, sig: int) -> Run:
    """Stream ``jobs`` jobs into ``first``; send ``sig`` to ``doomed`` once a
    fifth of the results are in."""
    from pylm.chained import LoopClient

    counts: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    right = wrong = seen = 0
    gap = 0.0
    start = last = time.monotonic()
    with LoopClient("first", announce=False) as client:
        for outcome in client.results("step", _payloads(jobs)):
            now = time.monotonic()
            gap, last = max(gap, now - last), now
            counts[outcome.index] += 1
            seen += 1
            if outcome.error is not None:
                errors[type(outcome.error).__name__] += 1
            elif outcome.value == b"%09d" % outcome.index + b"." * (PAYLOAD - 9):
                right += 1
            else:
                wrong += 1
            if doomed is not None and seen == jobs // 5:
                doomed.send_signal(sig)
        # Counted by the client's books (none in a pylm older than them: 0).
        books = getattr(client, "books", None)
    return Run(
        name=name,
        jobs=jobs,
        right=right,
        failed=sum(errors.values()),
        errors=dict(errors),
        duplicated=sum(n - 1 for n in counts.values() if n > 1),
        wrong=wrong,
        seconds=round(last - start, 3),
        longest_gap=round(gap, 3),
        resent=0 if books is None else books.retried,
        refused=0 if books is None else books.refused,
        copies=0 if books is None else books.duplicates,
    )


def table(runs: Sequence[Run]) -> str:
    lines = [
        "| run | jobs | right | failed | twice | wrong | s | extra s | longest gap s"
        " | sent again | copies dropped |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = runs[0].seconds
    for r in runs:
        kinds = ", ".join(f"{kind} {n}" for kind, n in r.errors.items())
        failed = f"{r.failed} ({kinds})" if kinds else f"{r.failed}"
        lines.append(
            f"| {r.name} | {r.jobs:,} | {r.right:,} | {failed} | {r.duplicated} | {r.wrong} |"
            f" {r.seconds:.2f} | {r.seconds - base:+.2f} | {r.longest_gap:.2f} |"
            f" {r.resent:,} | {r.copies:,} |"
        )
    return "\n".join(lines)


def _wait_for(registry: Registry, counts: dict[str, int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        have = {name: len(registry.instances(name)) for name in counts}
        if all(have[name] >= n for name, n in counts.items()):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"stages not registered after {timeout} s: {have}")
        time.sleep(0.05)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.failover", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--jobs", type=int, default=100_000, help="jobs per run (100,000)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2,000 jobs")
    parser.add_argument("--signal", choices=("KILL", "STOP"), default="KILL")
    parser.add_argument("--json", type=Path, help="also write the runs to this file")
    parser.add_argument("--serve", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve[0], args.serve[1] if len(args.serve) > 1 else None)
        return 0
    jobs = 2_000 if args.quick else args.jobs
    sig = signal.SIGKILL if args.signal == "KILL" else signal.SIGSTOP

    from pylm.processes import end_process
    from pylm.registry import LocalEtcd, Registry

    cluster = f"failover-{uuid.uuid4().hex[:8]}"
    children: list[subprocess.Popen[bytes]] = []
    with LocalEtcd() as etcd:
        env = {**os.environ, "PYLM_REGISTRY": etcd.url, "PYLM_CLUSTER": cluster}
        os.environ.update(PYLM_REGISTRY=etcd.url, PYLM_CLUSTER=cluster)
        nexts = {"first": "middle.step", "middle": "last.done", "last": None}
        try:
            for name in STAGES:
                command = [sys.executable, "-m", "bench.failover", "--serve", name]
                after = nexts[name]
                command += [after] if after is not None else []
                children.append(subprocess.Popen(command, env=env))
            with Registry(etcd.url) as registry:
                _wait_for(registry, {"first": 1, "middle": 2, "last": 1}, 30)
            runs = [run("undisturbed", jobs, None, sig)]
            runs.append(run(f"one middle instance SIG{args.signal}", jobs, children[2], sig))
        finally:
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGCONT)  # a stopped child ends only once continued
                end_process(child, 15)
    print(table(runs))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
