"""The same benchmark with an older pylm and with the checkout's, alternated.

Run from the repository root::

    python -m bench.ab OLD_REV -- bench.rpc --only pylm,raw
    python -m bench.ab HEAD~3 --rounds 5 -- bench.pipeline
    python -m bench.ab main -- bench.stage --rounds 3

``OLD_REV``'s ``pylm/`` is exported (``git archive``) to a temporary folder.
Each round then runs the benchmark module twice, once with that folder and
once with the checkout first on ``PYTHONPATH`` (which goes first alternates
from round to round), and reads the numbers it writes with ``--json``. The
benchmark's own code (``bench/``) is the checkout's on both sides, so only
pylm differs; every run's ``pylm source`` digest is checked against the side
it was meant to measure.

The report gives, for each configuration the benchmark measures, the median
rate of each side over the rounds and the ratio new/old; for benchmarks that
compare with raw pyzmq, also each side's median ratio to raw, which is what
is comparable across runs of a shared machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIDES = ("old", "new")


@dataclass
class Numbers:
    """One configuration's results on one side, one entry per round."""

    rates: list[float] = field(default_factory=list)
    to_raw: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # CPU µs per job, every process


Table = dict[str, dict[str, Numbers]]  # configuration -> side -> numbers


def digest(folder: pathlib.Path) -> str:
    """What :func:`bench.harness.pylm_source` reports for a ``pylm`` folder."""
    summed = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        summed.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return summed.hexdigest()[:12]


def export(rev: str, into: pathlib.Path) -> pathlib.Path:
    """``rev``'s ``pylm/`` under ``into``; the folder to put on PYTHONPATH."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", rev, "pylm"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    tar_path = into / "pylm.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(into, filter="data")
    tar_path.unlink()
    return into


class Measured(NamedTuple):
    """One configuration's numbers in one run of a benchmark."""

    rate: float
    to_raw: float | None  # the rate's ratio to raw pyzmq's in the same run
    cpu: float | None  # CPU µs per job (the stage's serving thread for bench.stage)


def configurations(result: dict[str, Any]) -> dict[str, Measured]:
    """Configuration -> its numbers, from a benchmark's JSON: the
    harness's (``bench.rpc``, ``bench.pipeline``), ``bench.stage``'s or
    ``bench.concurrency``'s."""
    found: dict[str, Measured] = {}
    if "median" in result:  # bench.concurrency: server -> its median rate
        for name, numbers in result["median"].items():
            found[name] = Measured(numbers["rate"], None, None)
    elif "results" in result:
        for row in result["results"]:
            if row["median_per_s"] is None:
                continue
            name = f"{row['label']}, {row['payload_bytes']} B, {row['clients']} client(s)"
            found[name] = Measured(
                row["median_per_s"], row["ratio_to_raw"], row.get("cpu_us_per_call")
            )
    else:
        for mode, rates in result["rounds_per_s"].items():
            cpu = result.get("cpu_us", {}).get(mode)
            found[f"stage, metrics {mode}"] = Measured(
                statistics.median(rates), None, statistics.median(cpu) if cpu else None
            )
    return found


def run_side(
    module: str, args: Sequence[str], first: pathlib.Path, expected: str, out: pathlib.Path
) -> dict[str, Measured]:
    """Run the benchmark once with ``first`` ahead of the checkout on the path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(first), str(ROOT)]))
    # -P: no working folder on sys.path, which would put the checkout's pylm first.
    command = [sys.executable, "-P", "-m", module, *args, "--json", str(out)]
    finished = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    if not out.exists():
        raise SystemExit(f"bench.ab: {module} wrote no results (exit code {finished.returncode})")
    result = json.loads(out.read_text(encoding="utf-8"))
    out.unlink()
    measured = result["machine"]["pylm source"]
    if measured != expected:
        raise SystemExit(f"bench.ab: ran pylm {measured}, expected {expected}: check PYTHONPATH")
    return configurations(result)


def ratio(new: float | None, old: float | None) -> str:
    return f"{new / old:.3f}" if new is not None and old else "-"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def number(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


def report(table: Table, rev: str, rounds: int) -> str:
    lines = [
        f"old: {rev}'s pylm; new: the checkout's. Median of {rounds} round(s), sides alternated.",
        "",
        "| configuration | old /s | new /s | new/old | old to raw | new to raw | new/old to raw |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, sides in table.items():
        old, new = median(sides["old"].rates), median(sides["new"].rates)
        old_raw, new_raw = median(sides["old"].to_raw), median(sides["new"].to_raw)
        lines.append(
            f"| {name} | {number(old, ',.0f')} | {number(new, ',.0f')} | {ratio(new, old)}"
            f" | {number(old_raw, '.3f')} | {number(new_raw, '.3f')} | {ratio(new_raw, old_raw)} |"
        )
    spent = {name: sides for name, sides in table.items() if sides["old"].cpu or sides["new"].cpu}
    if spent:
        lines += [
            "",
            "CPU per job: every process of the configuration (bench.stage: the stage's"
            " serving thread); what other processes of the machine take is not counted; where"
            " the configuration keeps every core busy it moves with the rate. old/new above 1:"
            " the new code spends less.",
            "",
            "| configuration | old µs CPU/job | new µs CPU/job | old/new |",
            "|---|---:|---:|---:|",
        ]
        for name, sides in spent.items():
            old_cpu, new_cpu = median(sides["old"].cpu), median(sides["new"].cpu)
            lines.append(
                f"| {name} | {number(old_cpu, ',.2f')} | {number(new_cpu, ',.2f')}"
                f" | {ratio(old_cpu, new_cpu)} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        argv.append("--")
    split = argv.index("--")
    parser = argparse.ArgumentParser(
        prog="python -m bench.ab",
        usage="python -m bench.ab OLD_REV [--rounds N] -- bench.MODULE [its options]",
        description="A/B: a benchmark with OLD_REV's pylm and with the checkout's, alternated.",
    )
    parser.add_argument("rev", metavar="OLD_REV", help="a git revision, e.g. main or HEAD~2")
    parser.add_argument("--rounds", type=int, default=3, help="A/B rounds (3)")
    args = parser.parse_args(argv[:split])
    bench = argv[split + 1 :]
    if not bench or "--json" in bench:
        parser.error("after --, a benchmark module and its options (bench.ab adds --json)")
    module, options = bench[0], bench[1:]
    table: Table = {}
    with tempfile.TemporaryDirectory(prefix="pylm-ab-") as temp:
        old_tree = export(args.rev, pathlib.Path(temp))
        trees = {"old": old_tree, "new": ROOT}
        digests = {side: digest(trees[side] / "pylm") for side in SIDES}
        if digests["old"] == digests["new"]:
            print(f"bench.ab: {args.rev}'s pylm is the checkout's ({digests['new']})")
        out = pathlib.Path(temp) / "result.json"
        for index in range(args.rounds):
            for side in SIDES if index % 2 == 0 else SIDES[::-1]:
                print(f"round {index + 1}/{args.rounds}: {side} ({digests[side]})", file=sys.stderr)
                for name, measured in run_side(
                    module, options, trees[side], digests[side], out
                ).items():
                    numbers = table.setdefault(name, {s: Numbers() for s in SIDES})[side]
                    numbers.rates.append(measured.rate)
                    if measured.to_raw is not None:
                        numbers.to_raw.append(measured.to_raw)
                    if measured.cpu is not None:
                        numbers.cpu.append(measured.cpu)
    print(report(table, args.rev, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
