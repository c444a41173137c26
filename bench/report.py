"""The whole benchmark suite in one command, written into docs/benchmarks.md.

Run from the repository root (after ``pip install -e '.[bench]'``; the
registry and scale parts need the ``etcd`` and ``prometheus`` binaries)::

    python -m bench.report                 # every part, about 15 minutes
    python -m bench.report --quick         # a smoke run of every part
    python -m bench.report --only rpc,parallel --out /tmp/report.md

Each part is a benchmark module run as its own process with ``--json``
(``rpc``, ``pipeline``, ``stage``, ``parallel``, ``registry``, ``metrics``, ``scale``,
``profile``: py-spy's view of where the time goes (RPC, pipeline, master); ``gateway``: HTTP
through ``pylm gateway`` with wrk, against its ASGI ceiling and Pyro5's
HTTP gateway; ``concurrency``: 10 ms calls, 64 callers, beside Pyro5's
thread-pool server);
pylm runs side by side with raw pyzmq and the peers in the same run, so the
ratios compare like with like. The report holds, per part, the table the
benchmark printed, then a check of every target against the measured ratios,
then PNG figures (matplotlib; skipped with a note if it is missing):
throughput against payload size, latency percentiles, throughput against
client processes, speedup with workers, and the scale run. Each figure names
the machine it ran on.

The report replaces what lies between the two marker lines in ``--out``
(``<!-- bench.report: begin -->`` and ``<!-- bench.report: end -->``), so
the hand-written analysis around it stays; without markers, the whole file
is the report. The raw JSON of each part goes to ``--keep`` when given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BEGIN = "<!-- bench.report: begin -->"
END = "<!-- bench.report: end -->"
RPC_PAYLOADS = "100,1024,10240,102400,1048576"


@dataclass(frozen=True)
class Part:
    name: str
    args: tuple[str, ...]  # for the full run
    quick: tuple[str, ...]  # for --quick
    json: bool = True  # whether the module writes --json
    timeout: float = 1800.0
    title: str = ""  # the heading of its section in the report


PARTS = (
    Part("rpc", ("--payloads", RPC_PAYLOADS), ("--quick", "--payloads", "100,10240"), title="RPC"),
    Part("pipeline", (), ("--quick",), title="Pipeline"),
    Part("stage", (), ("--quick",), title="One chained stage"),
    Part("parallel", (), ("--quick",), title="Master and workers"),
    Part("registry", (), ("--quick",), title="Registry"),
    Part("metrics", (), ("--quick",), json=False, title="The metrics endpoint"),
    Part("scale", (), ("--quick",), title="300 servers"),
    Part("profile", ("--seconds", "5"), ("--quick",), title="Where the time goes"),
    Part("gateway", (), ("--quick",), title="HTTP through the gateway"),
    Part("concurrency", (), ("--quick",), title="Calls that wait"),
)

Data = dict[str, Any]


@dataclass
class Outcome:
    part: Part
    text: str  # what the benchmark printed (its report)
    data: Data | None  # its --json, if it wrote one
    seconds: float
    failure: str | None


def run_part(part: Part, quick: bool, folder: Path, module: str | None = None) -> Outcome:
    """Run one benchmark module (``part.name``, or ``module``) in a process of its own."""
    json_path = folder / f"{part.name}.json"
    module = module or part.name
    command = [sys.executable, "-m", f"bench.{module}", *(part.quick if quick else part.args)]
    if part.json:
        command += ["--json", str(json_path)]
    began = time.monotonic()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=part.timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return Outcome(part, "", None, time.monotonic() - began, f"over {part.timeout:g} s")
    seconds = time.monotonic() - began
    data = json.loads(json_path.read_text()) if part.json and json_path.exists() else None
    failure = None
    if done.returncode != 0:
        failure = f"exit status {done.returncode}: {done.stderr.strip()[-1500:]}"
    return Outcome(part, done.stdout.strip(), data, seconds, failure)


# ---------------------------------------------------------------- scale steps

STEPS = (60, 150)  # servers, besides the scale part's own run (300)
QUICK_STEPS = (20,)
STEP_ROWS = {  # row of bench.scale -> what the steps table and figure call it
    "register": "launch to all registered (s)",
    "keepalive": "etcd keep-alives (req/s)",
    "instances": "Registry.instances() (ms)",
    "memory": "memory per server (KiB)",
    "scrape": "Prometheus scrape of a process (ms)",
    "idle-cpu": "CPU of the idle servers (cores)",
}


def scale_steps(quick: bool, folder: Path, scale: Data | None) -> list[Data]:
    """bench.scale at a few smaller sizes; with the scale part's own run,
    the measurements against the number of servers."""
    runs = [scale] if scale else []
    for servers in QUICK_STEPS if quick else STEPS:
        args = ("--quick",) if quick else ()
        part = Part(f"scale-{servers}", (*args, "--servers", str(servers)), ())
        outcome = run_part(part, False, folder, "scale")
        if outcome.data is not None and outcome.failure is None:
            runs.append(outcome.data)
        else:
            print(f"  bench.scale --servers {servers} failed: {outcome.failure}", file=sys.stderr)
    steps = []
    for run in sorted(runs, key=lambda data: int(data["servers"])):
        values = {row["key"]: row["value"] for row in run["results"] if not row.get("failed")}
        steps.append({"servers": int(run["servers"]), **{k: values.get(k) for k in STEP_ROWS}})
    return steps


def number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.2f}" if value < 10 else f"{value:,.0f}"


def steps_table(steps: list[Data]) -> str:
    lines = [
        "| servers | " + " | ".join(STEP_ROWS.values()) + " |",
        "|---:|" + "---:|" * len(STEP_ROWS),
    ]
    for step in steps:
        cells = [
            "-"
            if step[key] is None
            else f"{step[key]:,.2f}"
            if step[key] < 10
            else f"{step[key]:,.0f}"
            for key in STEP_ROWS
        ]
        lines.append(f"| {step['servers']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------- targets


def _results(data: Data | None) -> list[Data]:
    return list(data["results"]) if data else []


def _median(data: Data | None, system: str, payload: int, clients: int = 1) -> float | None:
    for result in _results(data):
        if (result["system"], result["payload_bytes"], result["clients"]) == (
            system,
            payload,
            clients,
        ):
            value = result["median_per_s"]
            return float(value) if value is not None else None
    return None


def _over(top: float | None, bottom: float | None) -> float | None:
    return top / bottom if top is not None and bottom else None


Measure = Callable[[dict[str, Data | None]], float | None]


@dataclass(frozen=True)
class Target:
    what: str
    goal: float  # the ratio to reach (at least), or the most lost (overhead)
    measure: Measure
    overhead: bool = False  # goal is a loss not to exceed (1 - ratio)


def _most_clients(data: Data | None) -> int:
    return max((int(r["clients"]) for r in _results(data)), default=1)


def _speedup(data: Data | None) -> float | None:
    for result in _results(data):
        if result.get("job") == "cpu" and result.get("workers") == 2 and "pylm" in result["system"]:
            value = result.get("speedup_over_1_worker")
            return float(value) if value is not None else None
    return None


def _metrics_loss(data: Data | None, on: str, off: str, payload: int, clients: int) -> float | None:
    ratio = _over(_median(data, on, payload, clients), _median(data, off, payload, clients))
    return None if ratio is None else 1 - ratio


def _stage_loss(data: Data | None) -> float | None:
    """bench.stage: one stage's throughput lost to metrics (medians)."""
    if data is None:
        return None
    rates = data["rounds_per_s"]
    ratio = _over(statistics.median(rates["on"]), statistics.median(rates["off"]))
    return None if ratio is None else 1 - ratio


def _ratio(data: Data | None, name: str) -> float | None:
    """A ratio a benchmark computed itself (its JSON's ``ratios``)."""
    value = (data or {}).get("ratios", {}).get(name)
    return float(value) if value is not None else None


def _rpc(
    top: str, bottom: str, payload: int = 100
) -> Callable[[dict[str, Data | None]], float | None]:
    """The ratio of two systems' sync RPC medians, 1 client."""
    return lambda d: _over(_median(d["rpc"], top, payload), _median(d["rpc"], bottom, payload))


def _chain(payload: int) -> Measure:
    """pylm's 3-stage chain (defaults) over raw PUSH/PULL, ``payload`` bytes."""
    return lambda d: next(
        (
            float(r["ratio_to_raw"])
            for r in _results(d["pipeline"])
            if r["payload_bytes"] == payload
            and r["ratio_to_raw"] is not None
            and r["system"] == "pylm-chain"
        ),
        None,
    )


def _broker(workers: int, slots: int) -> Measure:
    """pylm's master over the raw load-balancing broker, small jobs."""

    def measure(d: dict[str, Data | None]) -> float | None:
        rates = {
            r.get("family", str(r["system"]).split("-", 1)[0]): r["median_per_s"]
            for r in _results(d["parallel"])
            if r.get("job") == "echo" and r.get("workers") == workers and r.get("slots") == slots
        }
        return _over(rates.get("pylm"), rates.get("raw"))

    return measure


TARGETS = (
    Target(
        "sync RPC, 100 B, 1 client: pylm / raw REQ-REP",
        0.85,
        _rpc("pylm", "raw-req"),
    ),
    Target(
        "sync RPC, 100 B, most clients: pylm / raw REQ-REP",
        0.8,
        lambda d: _over(
            _median(d["rpc"], "pylm", 100, _most_clients(d["rpc"])),
            _median(d["rpc"], "raw-req", 100, _most_clients(d["rpc"])),
        ),
    ),
    Target(
        "sync RPC, 100 KiB, 1 client: pylm / raw REQ-REP",
        0.95,
        _rpc("pylm", "raw-req", 100 * 1024),
    ),
    Target(
        "sync RPC, 1 MiB, 1 client: pylm / raw REQ-REP",
        0.95,
        _rpc("pylm", "raw-req", 1024 * 1024),
    ),
    Target(
        "pipelined RPC, 32 in flight: pylm AsyncClient / raw DEALER-ROUTER",
        0.75,
        _rpc("pylm-async", "raw-dealer"),
    ),
    Target("3-stage chain, 100 B: pylm / raw 3-hop PUSH-PULL", 0.6, _chain(100)),
    Target("3-stage chain, 10 KiB: pylm / raw 3-hop PUSH-PULL", 0.9, _chain(10 * 1024)),
    Target("3-stage chain, 1 MiB: pylm / raw 3-hop PUSH-PULL", 0.95, _chain(1024 * 1024)),
    Target(
        "3-stage chain, 100 B, 1000 in flight: AsyncLoopClient / LoopClient",
        0.9,
        lambda d: _over(
            _median(d["pipeline"], "pylm-async-chain", 100),
            _median(d["pipeline"], "pylm-chain", 100),
        ),
    ),
    Target("small jobs, 2 workers x 1 slot: pylm master / raw broker", 0.9, _broker(2, 1)),
    Target(
        "10 KiB payloads, sync RPC, 1 client: pylm / raw (MB/s)",
        0.7,
        _rpc("pylm", "raw-req", 10240),
    ),
    Target(
        "pylm / zerorpc, 100 B, 1 client",
        3.0,
        _rpc("pylm", "zerorpc"),
    ),
    Target(
        "pylm / Pyro5, 100 B, 1 client",
        1.0,
        _rpc("pylm", "pyro5"),
    ),
    Target(
        "pylm / Pyro5, 100 B, most clients",
        2.0,
        lambda d: _over(
            _median(d["rpc"], "pylm", 100, _most_clients(d["rpc"])),
            _median(d["rpc"], "pyro5", 100, _most_clients(d["rpc"])),
        ),
    ),
    Target(
        "metrics cost, sync RPC 100 B, 1 client (loss, on vs off)",
        0.05,
        lambda d: _metrics_loss(d["rpc"], "pylm", "pylm-quiet", 100, 1),
        overhead=True,
    ),
    Target(
        "metrics cost, 3-stage chain 100 B (loss, on vs off)",
        0.05,
        lambda d: _metrics_loss(d["pipeline"], "pylm-chain", "pylm-quiet-chain", 100, 1),
        overhead=True,
    ),
    Target(
        "metrics cost, one chained stage 100 B, alone on a CPU (loss, on vs off)",
        0.05,
        lambda d: _stage_loss(d["stage"]),
        overhead=True,
    ),
    Target("CPU-bound jobs: 2 workers / 1 worker", 1.8, lambda d: _speedup(d["parallel"])),
    Target(
        "HTTP, 64 connections: pylm gateway / the same ASGI server echoing",
        0.5,
        lambda d: _ratio(d["gateway"], "ceiling"),
    ),
    Target(
        "10 ms async calls, 64 callers, concurrency 32: pylm / the ideal 3,200 calls/s",
        0.9,
        lambda d: _ratio(d["concurrency"], "ideal"),
    ),
    Target(
        "10 ms calls, 64 callers, 64 in progress: pylm async / Pyro5's thread pool",
        1.0,
        lambda d: _ratio(d["concurrency"], "pyro5"),
    ),
    Target(
        "HTTP, 64 connections: pylm gateway / Pyro5's HTTP gateway",
        3.0,
        lambda d: _ratio(d["gateway"], "pyro5"),
    ),
)


def targets_table(data: dict[str, Data | None]) -> str:
    lines = ["| target | goal | measured | met |", "|---|---:|---:|:---:|"]
    for target in TARGETS:
        try:
            value = target.measure(data)
        except (KeyError, TypeError, ValueError):
            value = None
        if value is None:
            lines.append(f"| {target.what} | | not measured | |")
            continue
        if target.overhead:
            goal, shown, met = f"≤ {target.goal:.0%}", f"{value:.1%}", value <= target.goal
        else:
            goal, shown, met = f"≥ {target.goal:g}x", f"{value:.2f}x", value >= target.goal
        lines.append(f"| {target.what} | {goal} | {shown} | {'yes' if met else '**no**'} |")
    return "\n".join(lines)


# --------------------------------------------------------------------- figures


def machine_line(data: dict[str, Data | None]) -> str:
    for found in data.values():
        if found and "machine" in found:
            info = found["machine"]
            keys = ("cpus", "cpu model", "os", "python", "libzmq", "pyzmq")
            picked = [f"{k}: {info[k]}" for k in keys if k in info]
            return "; ".join(picked or [f"{k}: {v}" for k, v in list(info.items())[:5]])
    return "machine unknown"


def series(
    rows: list[Data], x: str, y: str, group: Callable[[Data], str] = lambda row: row["system"]
) -> dict[str, list[tuple[float, float]]]:
    """The (x, y) points of each group of ``rows`` (a system, by default),
    sorted by x; rows without a ``y`` are left out."""
    found: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row.get(y):
            found.setdefault(group(row), []).append((row[x], row[y]))
    return {name: sorted(points) for name, points in sorted(found.items())}


def family_of(row: Data) -> str:
    """``pylm`` of a parallel system id like ``pylm-cpu-2w``."""
    return str(row["system"]).rsplit("-", 2)[0]


def label(axes: Any, x: str, y: str, title: str, *, legend: bool = True) -> None:
    axes.set_xlabel(x)
    axes.set_ylabel(y)
    axes.set_title(title)
    if legend:
        axes.legend(fontsize=8)
    axes.grid(alpha=0.3)


def figures(
    data: dict[str, Data | None], steps: list[Data], folder: Path
) -> tuple[list[tuple[str, str]], str]:
    """Draw what the data allows; the (file, caption) pairs, and a note."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "Figures skipped: matplotlib is not installed (pip install -e '.[bench]')."
    folder.mkdir(parents=True, exist_ok=True)
    machine = machine_line(data)
    drawn: list[tuple[str, str]] = []

    def save(figure: Any, name: str, caption: str) -> None:
        figure.text(0.01, 0.005, machine, fontsize=6, color="gray")
        figure.tight_layout(rect=(0, 0.03, 1, 1))
        figure.savefig(folder / name, dpi=100)
        plt.close(figure)
        drawn.append((name, caption))

    rpc = _results(data.get("rpc"))
    sync = [r for r in rpc if r["clients"] == 1 and r["in_flight_per_client"] == 1]
    if sync:
        figure, (calls, bandwidth) = plt.subplots(1, 2, figsize=(10, 4))
        for system, points in series(sync, "payload_bytes", "median_per_s").items():
            sizes = [p for p, _ in points]
            calls.plot(sizes, [v for _, v in points], marker="o", label=system)
            bandwidth.plot(sizes, [p * v / 1e6 for p, v in points], marker="o", label=system)
        label(
            calls, "payload (bytes)", "round trips/s", "Sync RPC, 1 client: throughput vs payload"
        )
        label(bandwidth, "payload (bytes)", "MB/s each way", "... as bandwidth", legend=False)
        for axes in (calls, bandwidth):
            axes.set_xscale("log")
        save(figure, "rpc-payload.png", "Sync RPC throughput against payload size (1 client)")

    timed = [r for r in sync if r.get("latency_us") and r["payload_bytes"] == 100]
    if timed:
        figure, axes = plt.subplots(figsize=(8, 4))
        keys = list(timed[0]["latency_us"])
        width = 0.8 / len(timed)
        for index, result in enumerate(sorted(timed, key=lambda r: r["system"])):
            xs = [k + index * width for k in range(len(keys))]
            axes.bar(xs, [result["latency_us"][k] for k in keys], width, label=result["system"])
        axes.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))], keys)
        axes.set_yscale("log")
        axes.set_ylabel("µs per call")
        axes.set_title("Sync RPC latency percentiles, 100 B, 1 client")
        axes.legend(fontsize=8)
        axes.grid(alpha=0.3, axis="y")
        save(figure, "rpc-latency.png", "Latency percentiles of a synchronous call (100 B)")

    many = [r for r in rpc if r["payload_bytes"] == 100 and r["in_flight_per_client"] == 1]
    if len({r["clients"] for r in many}) > 1:
        figure, axes = plt.subplots(figsize=(7, 4))
        for system, points in series(many, "clients", "median_per_s").items():
            axes.plot([c for c, _ in points], [v for _, v in points], marker="o", label=system)
        label(
            axes,
            "client processes",
            "round trips/s, all clients",
            "Sync RPC, 100 B: throughput vs clients",
        )
        save(figure, "rpc-clients.png", "Sync RPC throughput against client processes (100 B)")

    cpu = [  # 1 worker: the baseline, a speedup of 1
        {**r, "speedup": r.get("speedup_over_1_worker") or 1.0}
        for r in _results(data.get("parallel"))
        if r.get("job") == "cpu"
    ]
    if cpu:
        figure, axes = plt.subplots(figsize=(7, 4))
        for family, points in series(cpu, "workers", "speedup", family_of).items():
            axes.plot([w for w, _ in points], [v for _, v in points], marker="o", label=family)
        top = max(r["workers"] for r in cpu)
        axes.plot([1, top], [1, top], linestyle=":", color="gray", label="ideal")
        label(axes, "workers", "speedup over 1 worker", "CPU-bound jobs: scaling with workers")
        save(figure, "parallel-workers.png", "Speedup of CPU-bound jobs with workers")

    if len(steps) > 1:
        figure, panels = plt.subplots(2, 2, figsize=(10, 7))
        counts = [step["servers"] for step in steps]
        for axes, key in zip(
            panels.flat, ("register", "keepalive", "instances", "memory"), strict=True
        ):
            points = [(c, step[key]) for c, step in zip(counts, steps, strict=True) if step[key]]
            axes.plot([c for c, _ in points], [v for _, v in points], marker="o")
            axes.set_xlabel("servers")
            axes.set_title(STEP_ROWS[key], fontsize=10)
            axes.set_ylim(bottom=0)
            axes.grid(alpha=0.3)
        save(figure, "scale-instances.png", "Registry and memory against the number of servers")
    return drawn, ""


# ---------------------------------------------------------------------- report


def render(
    outcomes: Sequence[Outcome],
    steps: list[Data],
    drawn: list[tuple[str, str]],
    note: str,
    figures_ref: str,
) -> str:
    data = {o.part.name: o.data for o in outcomes}
    date = time.strftime("%Y-%m-%d")
    lines = [
        BEGIN,
        f"## Latest results ({date})",
        "",
        f"Measured on {date} by `python -m bench.report`, which rewrites this section (from",
        "here to the figures) on every run: do not edit it by hand.",
        "",
        f"Machine: {machine_line(data)}.",
        "",
        "### Targets",
        "",
        "The project's goal for each ratio, and what this run measured:",
        "",
        targets_table(data),
        "",
    ]
    for outcome in outcomes:
        title = outcome.part.title or outcome.part.name
        lines += [f"### {title} (bench.{outcome.part.name}, {outcome.seconds:.0f} s)", ""]
        if outcome.failure:
            lines += [f"**Failed**: {outcome.failure}", ""]
        if outcome.text:
            lines += [outcome.text, ""]
        if outcome.part.name == "scale" and len(steps) > 1:
            lines += ["Against the number of servers (one run of bench.scale each):", ""]
            lines += [steps_table(steps), ""]
    if drawn or note:
        lines += ["### Figures", ""]
        lines += [f"![{caption}]({figures_ref}/{name})" for name, caption in drawn]
        if note:
            lines.append(note)
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def write(out: Path, section: str) -> None:
    """Put ``section`` between the markers of ``out`` (or make it the file)."""
    text = out.read_text() if out.exists() else ""
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + section + tail
    else:
        text = section + "\n"
    out.write_text(text)


def parts_list(text: str) -> tuple[Part, ...]:
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = names - {part.name for part in PARTS}
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose among {', '.join(p.name for p in PARTS)}")
    return tuple(part for part in PARTS if part.name in names)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of every part")
    parser.add_argument("--only", type=parts_list, default=PARTS, help="e.g. rpc,parallel")
    parser.add_argument("--out", default="docs/benchmarks.md", help="the markdown file")
    parser.add_argument(
        "--figures", default=None, help="folder of the PNGs (default: figures/ beside --out)"
    )
    parser.add_argument("--keep", default=None, help="a folder to keep each part's JSON in")
    args = parser.parse_args(argv)
    out = Path(args.out)
    figures_dir = Path(args.figures) if args.figures else out.parent / "figures"
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="pylm-report-"))
    folder.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for part in args.only:
        print(f"running bench.{part.name}...", file=sys.stderr, flush=True)
        outcome = run_part(part, args.quick, folder)
        print(
            f"  {outcome.seconds:.0f} s"
            + (f", FAILED: {outcome.failure}" if outcome.failure else ""),
            file=sys.stderr,
            flush=True,
        )
        outcomes.append(outcome)
    data = {o.part.name: o.data for o in outcomes}
    steps = []
    if any(part.name == "scale" for part in args.only):
        print("running bench.scale at other sizes...", file=sys.stderr, flush=True)
        steps = scale_steps(args.quick, folder, data.get("scale"))
    drawn, note = figures(data, steps, figures_dir)
    reference = os.path.relpath(figures_dir, out.parent)
    write(out, render(outcomes, steps, drawn, note, reference))
    print(f"wrote {out} and {len(drawn)} figure(s) in {figures_dir}", file=sys.stderr)
    return 1 if any(o.failure for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
