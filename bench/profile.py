"""Where the time of a pylm call goes: py-spy profiles of a server and a client.

Run from the repository root (``pip install py-spy``; root or ptrace rights)::

    python -m bench.profile                 # 10 s per side
    python -m bench.profile --seconds 3 --json profile.json

A standalone server (one function echoing its payload) and a blocking client
calling it in a loop with 100 B payloads run in two processes over TCP on
127.0.0.1; pylm's metrics are on, as by default. ``py-spy record`` samples
both at 500 Hz (without pausing them; only threads that are running, not
waiting) for ``--seconds``. The summary
groups the samples of each process by where the innermost frame is:

* **pylm**: pylm's own Python code (framing, dispatch, bookkeeping);
* **socket calls**: pyzmq's send/recv/poll, including the time the calling
  thread spends in libzmq under them (libzmq's own I/O thread is not seen);
* **metrics**: pylm's counting and its exposition (``pylm/telemetry/counting.py``,
  ``exposition.py``), prometheus-client;
* **other**: the standard library, the benchmark's own loop.

and lists the innermost functions with the most samples. py-spy without
``--native`` charges C time to the Python line that called into it.
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
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RATE = 500  # samples per second
PAYLOAD = 100


def serve() -> None:
    """The server process: print the bound address, serve until killed."""
    from pylm.standalone import Server

    class Echo(Server):
        def echo(self, message: bytes) -> bytes:
            return message

    server = Echo("profiled", "tcp://127.0.0.1:0", log_stdout=False)
    server.start(background=True)
    print(server.address, flush=True)
    while True:
        time.sleep(3600)


def call(address: str) -> None:
    """The client process: call the echo function until killed."""
    from pylm.standalone import Client

    payload = b"x" * PAYLOAD
    with Client(address, "profiled", timeout=10) as client:
        print("ready", flush=True)
        while True:
            client.job("echo", payload)


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


def record(pid: int, seconds: float, out: Path) -> str:
    command = [
        "py-spy", "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
        "--rate", str(RATE), "--format", "raw", "--output", str(out), "--nonblocking",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed: {done.stderr.strip()[-800:]}")
    return out.read_text()


def table(name: str, summary: dict[str, Any]) -> str:
    lines = [
        f"**{name}** ({summary['samples']:,} samples): "
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
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds sampled (10)")
    parser.add_argument("--top", type=int, default=12, help="functions listed per process")
    parser.add_argument("--quick", action="store_true", help="2 s")
    parser.add_argument("--json", metavar="PATH", help="also write the summaries to PATH")
    parser.add_argument("--role", choices=("server", "client"), help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "server":
        serve()
    if args.role == "client":
        call(args.address)
    if shutil.which("py-spy") is None:
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 1
    seconds = 2.0 if args.quick else args.seconds
    me = [sys.executable, "-m", "bench.profile", "--role"]
    processes: list[subprocess.Popen[str]] = []
    folder = Path(tempfile.mkdtemp(prefix="pylm-profile-"))
    try:
        server = subprocess.Popen([*me, "server"], stdout=subprocess.PIPE, text=True)
        processes.append(server)
        assert server.stdout is not None
        address = server.stdout.readline().strip()
        client = subprocess.Popen(
            [*me, "client", "--address", address], stdout=subprocess.PIPE, text=True
        )
        processes.append(client)
        assert client.stdout is not None
        if client.stdout.readline().strip() != "ready":
            raise RuntimeError("the client did not start")
        time.sleep(0.5)  # warm-up: the first calls connect and fill caches
        summaries: dict[str, Any] = {}
        for name, process in (("server", server), ("client", client)):
            raw = record(process.pid, seconds, folder / f"{name}.txt")
            summaries[name] = summarise(raw, args.top)
    finally:
        for process in processes:
            process.kill()
            process.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
    print(
        f"py-spy, {seconds:g} s at {RATE} Hz per process, busy Python threads only;"
        f" pylm standalone server and blocking client, {PAYLOAD} B payloads, metrics on"
        f" (pid {os.getpid()})."
    )
    for name, summary in summaries.items():
        print()
        print(table(name, summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": seconds, **summaries}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
