"""Where the time of pylm's work goes: py-spy profiles of every process of a
scenario, the one that saturates first among them.

Run from the repository root (``pip install py-spy``; root or ptrace rights)::

    python -m bench.profile                          # every scenario, 10 s per process
    python -m bench.profile --scenario chain --seconds 3 --json profile.json

The scenarios, each in processes of its own over TCP on 127.0.0.1, pylm's
metrics on and every option at its default, as a user runs them:

* ``rpc``: a standalone server (one function echoing its payload) and a
  blocking client calling it in a loop, 100 B payloads;
* ``rpc-100k``: the same with 100 KiB payloads (where copies cost);
* ``rpc-async``: the same server and an ``AsyncClient`` keeping 32 calls
  in flight (32 coroutines each calling in a loop), 100 B payloads;
* ``chain``: a 3-stage pipeline (two ``Server`` stages and a ``LastServer``,
  each handing the payload on) fed by a ``LoopClient``, 100 B jobs;
* ``master``: a master, two workers of one slot each, and a parallel
  ``Client`` keeping jobs out, 100 B echo jobs.

``py-spy record`` samples each process at 500 Hz in turn (without pausing
it; only threads that are running, not waiting) for ``--seconds``. The
summary groups the samples of each process by where the innermost frame is:

* **pylm**: pylm's own Python code (framing, dispatch, bookkeeping);
* **socket calls**: pyzmq's send/recv/poll, including the time the calling
  thread spends in libzmq under them (libzmq's own I/O thread is not seen);
* **metrics**: pylm's counting and its exposition (``pylm/telemetry/counting.py``,
  ``exposition.py``), prometheus-client;
* **other**: the standard library, the benchmark's own loop.

and lists the innermost functions with the most samples. py-spy without
``--native`` charges C time to the Python line that called into it. Each
process's busy share (samples over the samples a fully busy thread gives)
tells which one saturates.
"""

from __future__ import annotations

import argparse
import json
import linecache
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RATE = 500  # samples per second
SMALL, LARGE = 100, 100 * 1024
IN_FLIGHT = 32  # the AsyncClient's calls at once, as in bench.rpc's pipelined row
SCENARIOS = {
    "rpc": f"standalone server and blocking client, {SMALL} B payloads",
    "rpc-100k": f"standalone server and blocking client, {LARGE // 1024} KiB payloads",
    "rpc-async": f"standalone server and AsyncClient, {IN_FLIGHT} calls in flight, {SMALL} B",
    "chain": f"3-stage pipeline fed by a LoopClient, {SMALL} B jobs",
    "master": f"master, 2 workers x 1 slot, parallel Client, {SMALL} B jobs",
}
ANY = "tcp://127.0.0.1:0"


def forever() -> None:
    threading.Event().wait()  # serve until the process is ended


def rpc_server() -> None:
    from pylm.standalone import Server

    class Echo(Server):
        def echo(self, message: bytes) -> bytes:
            return message

    server = Echo("profiled", ANY, log_stdout=False)
    server.start(background=True)
    print(server.address, flush=True)
    forever()


def rpc_client(address: str, size: str) -> None:
    from pylm.standalone import Client

    payload = b"x" * int(size)
    with Client(address, "profiled", timeout=10) as client:
        print("ready", flush=True)
        while True:
            client.job("echo", payload)


def async_client(address: str) -> None:
    import asyncio

    from pylm.standalone import AsyncClient

    payload = b"x" * SMALL

    async def main() -> None:
        async with AsyncClient(address, "profiled", timeout=10) as client:
            await client.job("echo", payload)
            print("ready", flush=True)

            async def caller() -> None:
                while True:
                    await client.job("echo", payload)

            await asyncio.gather(*(caller() for _ in range(IN_FLIGHT)))

    asyncio.run(main())


def stage(number: str, downstream: str = "") -> None:
    """Stage ``number`` of the chain (3: the last); prints where it listens."""
    from pylm.chained import LastServer, Server

    class Step(Server):
        def step(self, message: bytes) -> bytes:
            return message

    class Last(LastServer):
        def step(self, message: bytes) -> bytes:
            return message

    if number == "3":
        last = Last("step3", ANY, ANY, ANY, log_stdout=False)
        last.start(background=True)
        print(last.address, last.push, flush=True)
    else:
        following = f"step{int(number) + 1}.step"
        server = Step(f"step{number}", ANY, downstream, following, ANY, log_stdout=False)
        server.start(background=True)
        print(server.address, server.db, flush=True)
    forever()


def chain_client(first: str, db: str, results: str) -> None:
    import itertools

    from pylm.chained import LoopClient

    with LoopClient(results, first, db, "step1", announce=False, timeout=30) as client:
        print("ready", flush=True)
        for _ in client.job("step", itertools.repeat(b"x" * SMALL)):
            pass


def master() -> None:
    from pylm.parallel import Master

    server = Master("profiled", ANY, ANY, log_stdout=False)
    server.start(background=True)
    print(server.front, server.back, flush=True)
    forever()


def worker(back: str) -> None:
    from pylm.parallel import Worker

    class Echo(Worker):
        def echo(self, message: bytes) -> bytes:
            return message

    Echo(f"worker-{os.getpid()}", "profiled", back, slots=1, log_stdout=False).start(
        background=True
    )
    print("ready", flush=True)
    forever()


def master_client(front: str) -> None:
    import itertools

    from pylm.parallel import Client

    with Client(front, "profiled", timeout=30) as client:
        while client.ping()["workers"] < 2:
            time.sleep(0.02)
        print("ready", flush=True)
        for _ in client.job("echo", itertools.repeat(b"x" * SMALL)):
            pass


ROLES = {
    "rpc-server": rpc_server,
    "rpc-client": rpc_client,
    "async-client": async_client,
    "stage": stage,
    "chain-client": chain_client,
    "master": master,
    "worker": worker,
    "master-client": master_client,
}


class Processes:
    """The processes of a scenario, each started with its role and asked
    for its first line (where it listens, or ``ready``); all killed at the end."""

    def __init__(self) -> None:
        self.started: list[tuple[str, subprocess.Popen[str]]] = []

    def start(self, name: str, role: str, *args: str) -> list[str]:
        command = [sys.executable, "-m", "bench.profile", "--role", role, *args]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        self.started.append((name, process))
        assert process.stdout is not None
        line = process.stdout.readline().split()
        if not line:
            raise RuntimeError(f"{name} ({role}) did not start")
        return line

    def kill(self) -> None:
        for _, process in self.started:
            process.kill()
            process.wait(10)


def launch(scenario: str, processes: Processes) -> None:
    """Start the processes of ``scenario``, the served ones first."""
    if scenario in ("rpc", "rpc-100k"):
        (address,) = processes.start("server", "rpc-server")
        size = str(SMALL if scenario == "rpc" else LARGE)
        processes.start("client", "rpc-client", address, size)
    elif scenario == "rpc-async":
        (address,) = processes.start("server", "rpc-server")
        processes.start("client", "async-client", address)
    elif scenario == "chain":
        last, results = processes.start("stage 3 (LastServer)", "stage", "3")
        second, _ = processes.start("stage 2", "stage", "2", last)
        first, db = processes.start("stage 1", "stage", "1", second)
        processes.start("client", "chain-client", first, db, results)
    else:
        front, back = processes.start("master", "master")
        processes.start("worker 1", "worker", back)
        processes.start("worker 2", "worker", back)
        processes.start("client", "master-client", front)


def profile(scenario: str, seconds: float, top: int, folder: Path) -> dict[str, Any]:
    """The summaries of the processes of ``scenario``, by name."""
    processes = Processes()
    try:
        launch(scenario, processes)
        time.sleep(0.5)  # warm-up: the first calls connect and fill caches
        summaries: dict[str, Any] = {}
        for number, (name, process) in enumerate(processes.started):
            raw = record(process.pid, seconds, folder / f"{scenario}-{number}.txt")
            summaries[name] = summarise(raw, top)
            summaries[name]["busy"] = summaries[name]["samples"] / (sampled(seconds) * RATE)
        return summaries
    finally:
        processes.kill()


def location(frame: str) -> tuple[str, int]:
    """The file and line of a py-spy frame ``function (file:line)``."""
    where = frame.rpartition(" (")[2].rstrip(")") if " (" in frame else ""
    path, _, line = where.rpartition(":")
    return path, int(line) if line.isdigit() else 0


def code_at(path: str, line: int) -> str:
    """The source text at ``path:line`` (py-spy gives paths relative to
    sys.path), or '' when it cannot be found."""
    for folder in ["", *sys.path]:
        text = linecache.getline(os.path.join(folder, path), line).strip()
        if text:
            return text
    return ""


SOCKET_CALL = re.compile(r"\b(recv|send|poll)\w*\(")


def classify(frames: list[str]) -> str:
    """The group of a stack (outermost first) by its innermost frame; a
    line of pylm that calls a socket method (Cython, no frame of its own)
    counts as a socket call."""
    path, line = location(frames[-1]) if frames else ("", 0)
    where = "/" + path
    if (
        "/pylm/telemetry/counting.py" in where
        or "/pylm/telemetry/exposition.py" in where
        or "/prometheus_client/" in where
    ):
        return "metrics"
    if "/zmq/" in where or SOCKET_CALL.search(code_at(path, line)):
        return "socket calls"
    if "/pylm/" in where:
        return "pylm"
    return "other"


def summarise(raw: str, top: int) -> dict[str, Any]:
    """Group py-spy's raw (collapsed) stacks: shares per group, and the
    innermost lines with the most samples."""
    groups: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        groups[classify(frames)] += count
        leaves[frames[-1]] += count
        total += count
    if not total:
        return {"samples": 0, "groups": {}, "top": []}
    return {
        "samples": total,
        "groups": {name: count / total for name, count in groups.most_common()},
        "top": [
            (frame, code_at(*location(frame)), count / total)
            for frame, count in leaves.most_common(top)
        ],
    }


def sampled(seconds: float) -> int:
    """The whole seconds py-spy samples for (it takes no fraction)."""
    return max(1, round(seconds))


def record(pid: int, seconds: float, out: Path) -> str:
    command = [
        "py-spy", "record", "--pid", str(pid), "--duration", str(sampled(seconds)),
        "--rate", str(RATE), "--format", "raw", "--output", str(out), "--nonblocking",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed: {done.stderr.strip()[-800:]}")
    return out.read_text()


def table(name: str, summary: dict[str, Any]) -> str:
    lines = [
        f"**{name}** ({summary['samples']:,} samples, busy {summary.get('busy', 0):.2f} of a"
        " thread's time): "
        + ", ".join(f"{group} {share:.0%}" for group, share in summary["groups"].items()),
        "",
        "| innermost frame | its line | share |",
        "|---|---|---:|",
    ]
    lines += [f"| `{leaf}` | `{code}` | {share:.1%} |" for leaf, code, share in summary["top"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=tuple(SCENARIOS),
        help="a scenario to profile (repeatable; all by default)",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds sampled (10)")
    parser.add_argument("--top", type=int, default=12, help="functions listed per process")
    parser.add_argument("--quick", action="store_true", help="2 s per process")
    parser.add_argument("--json", metavar="PATH", help="also write the summaries to PATH")
    parser.add_argument("--role", choices=tuple(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        ROLES[args.role](*args.args)
        return 0
    if shutil.which("py-spy") is None:
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 1
    seconds = 2.0 if args.quick else args.seconds
    scenarios = args.scenario or list(SCENARIOS)
    folder = Path(tempfile.mkdtemp(prefix="pylm-profile-"))
    try:
        results = {name: profile(name, seconds, args.top, folder) for name in scenarios}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(
        f"py-spy, {seconds:g} s at {RATE} Hz per process, busy Python threads only;"
        f" pylm's defaults, metrics on (pid {os.getpid()}). Busy: the samples over those"
        " of a thread that never waits (above 1: several threads busy at once)."
    )
    for name, summaries in results.items():
        print()
        print(f"#### {SCENARIOS[name]} ({name})")
        for process, summary in summaries.items():
            print()
            print(table(process, summary))
    if args.json:
        document = {"seconds": seconds, "scenarios": results}
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
