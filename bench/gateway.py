"""HTTP calls through ``pylm gateway``, against the same ASGI server
answering them itself (the ceiling), with a real load generator (wrk).

Run from the repository root (needs ``wrk`` on PATH)::

    python -m bench.gateway                   # 3 rounds of 5 s each
    python -m bench.gateway --rounds 1 --duration 2 --json out.json
    python -m bench.gateway --quick           # a smoke run: 1 round of 1 s

What runs
    A local etcd; a pylm standalone echo server, started with its name only,
    in a process of its own; ``pylm gateway`` in another; and, for the
    ceiling, a Starlette app served by uvicorn in a third that answers
    ``POST /echo_server/echo`` with the body itself (the same ASGI stack as
    the gateway, without pylm). wrk sends ``POST /echo_server/echo`` with a
    100 B body over ``--connections`` connections (64) for ``--duration``
    seconds, to each in turn, ``--rounds`` times.

What is reported
    Requests a second (median of the rounds) and the latency's 50th and
    99th percentiles (wrk's ``--latency``, median of the rounds), and the
    gateway's rate over the ceiling's. Every process shares the machine's
    cores with wrk.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

_SERVER = """
from pylm.standalone import Server

class Echo(Server):
    def echo(self, message):
        return message

Echo("echo_server", log_stdout=False).start()
"""

_LUA = """wrk.method = "POST"
wrk.body = string.rep("x", 100)
wrk.headers["Content-Type"] = "application/octet-stream"
"""


def ceiling_app() -> object:
    """The ceiling: the gateway's route answered by the ASGI stack alone."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def echo(request: Request) -> Response:
        return Response(await request.body(), media_type="application/octet-stream")

    return Starlette(routes=[Route("/{server}/{function}", echo, methods=["POST"])])


def _free_port() -> int:
    from pylm.processes import free_port

    return free_port()


def _up(url: str, seconds: float = 20.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            request = urllib.request.Request(url, data=b"x", method="POST")
            with urllib.request.urlopen(request, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)  # a process starting: poll
    raise RuntimeError(f"{url} did not answer within {seconds:g} s")


def wrk(url: str, script: Path, connections: int, duration: float) -> dict[str, float]:
    """One wrk run: requests a second, p50 and p99 latency (s), errors."""
    done = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{duration:g}s",
            "--latency",
            "--timeout",
            "5s",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=True,
    )
    text = done.stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    latency = {
        q: _seconds(re.search(rf"\s{q}%\s+([\d.]+\w+)", text).group(1))  # type: ignore[union-attr]
        for q in ("50", "99")
    }
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    return {
        "rate": rate,
        "p50": latency["50"],
        "p99": latency["99"],
        "non_2xx": float(errors.group(1)) if errors else 0.0,
    }


def _seconds(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="s of load per run (5)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--json", metavar="PATH", help="also write the numbers to PATH")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round of 1 s")
    parser.add_argument("--ceiling", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.connections = 1, 1.0, 16
    if args.ceiling is not None:  # the ceiling's own process
        import uvicorn

        uvicorn.run(
            ceiling_app(),
            host="127.0.0.1",
            port=args.ceiling,
            log_level="warning",
            access_log=False,
        )  # type: ignore[arg-type]
        return 0
    if shutil.which("wrk") is None:
        print("bench.gateway needs wrk: sudo apt-get install wrk", file=sys.stderr)
        return 2
    from pylm.processes import end_process
    from pylm.registry import LocalEtcd

    folder = Path(tempfile.mkdtemp(prefix="pylm-bench-gateway-"))
    script = folder / "post.lua"
    script.write_text(_LUA)
    processes: list[subprocess.Popen[bytes]] = []
    results: dict[str, list[dict[str, float]]] = {"ceiling": [], "gateway": []}
    with LocalEtcd() as etcd:
        env = {**os.environ, "PYLM_REGISTRY": etcd.url, "PYLM_CLUSTER": "bench-gateway"}
        try:
            processes.append(subprocess.Popen([sys.executable, "-c", _SERVER], env=env))
            gateway_port, ceiling_port = _free_port(), _free_port()
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "pylm.cli", "gateway", "--port", str(gateway_port)],
                    env=env,
                    stdout=subprocess.DEVNULL,
                )
            )
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "bench.gateway", "--ceiling", str(ceiling_port)], env=env
                )
            )
            urls = {
                "ceiling": f"http://127.0.0.1:{ceiling_port}/echo_server/echo",
                "gateway": f"http://127.0.0.1:{gateway_port}/echo_server/echo",
            }
            for url in urls.values():
                _up(url)
            for round_ in range(args.rounds):
                for side, url in urls.items():
                    numbers = wrk(url, script, args.connections, args.duration)
                    results[side].append(numbers)
                    print(
                        f"round {round_ + 1}/{args.rounds} {side}: {numbers['rate']:,.0f} req/s,"
                        f" p50 {numbers['p50'] * 1e3:.2f} ms, p99 {numbers['p99'] * 1e3:.2f} ms",
                        flush=True,
                    )
        finally:
            for process in reversed(processes):
                end_process(process, 10)  # type: ignore[arg-type]
    summary = {
        side: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for side, runs in results.items()
    }
    ratio = summary["gateway"]["rate"] / summary["ceiling"]["rate"]
    print()
    print("| server | requests/s | p50 | p99 | non-2xx |")
    print("|---|---:|---:|---:|---:|")
    for side, numbers in summary.items():
        print(
            f"| {side} | {numbers['rate']:,.0f} | {numbers['p50'] * 1e3:.2f} ms |"
            f" {numbers['p99'] * 1e3:.2f} ms | {numbers['non_2xx']:.0f} |"
        )
    print(
        f"\ngateway / ceiling: {ratio:.2f} ({args.connections} connections, 100 B bodies,"
        f" median of {args.rounds} round(s) of {args.duration:g} s)"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rounds": results, "median": summary, "ratio": ratio}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
