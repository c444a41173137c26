"""HTTP calls through ``pylm gateway``, against the same ASGI server
answering them itself (the ceiling) and against Pyro5's own HTTP gateway in
front of a Pyro5 echo, with a real load generator (wrk), in one run.

Run from the repository root (needs ``wrk`` on PATH; the Pyro5 side needs
the ``bench`` extra and is left out, with a note, without it)::

    python -m bench.gateway                   # 3 rounds of 5 s each
    python -m bench.gateway --rounds 1 --duration 2 --json out.json
    python -m bench.gateway --quick           # a smoke run: 1 round of 1 s

What runs
    A local etcd and, each in a process of its own and started with its
    name only: a pylm standalone echo server (``echo_server``), a pipeline
    of two stages (``first`` -> ``last``, each passing the job on as it
    came), a master (``pool``) with one worker, and ``pylm gateway``. For
    the ceiling, a Starlette app served by uvicorn that answers
    ``POST /echo_server/echo`` with the body itself (the same ASGI stack as
    the gateway, without pylm). For Pyro5: its name server, a Pyro5 echo
    object (msgpack and json serializers, the daemon's thread pool) and
    ``python -m Pyro5.utils.httpgateway`` as Pyro5 ships it (a WSGI app on
    wsgiref's server), called as ``/pyro/http.echo/echo?message=...``.

    wrk sends a 100 B payload over ``--connections`` connections (64) for
    ``--duration`` seconds to each side in turn, ``--rounds`` times:
    ``POST`` with the payload as the body to pylm and to the ceiling, the
    payload as the query parameter Pyro5's gateway takes.

What is reported
    Requests a second (median of the rounds), the latency's 50th and 99th
    percentiles (wrk's ``--latency``, median of the rounds), the answers
    that were not 2xx and wrk's socket errors; then the gateway's rate over
    the ceiling's and over Pyro5's gateway's. Every process shares the
    machine's cores with wrk.
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
from dataclasses import dataclass
from pathlib import Path

_PAYLOAD = "x" * 100

_SERVERS = """
import sys

from pylm.chained import LastServer, Server as Stage
from pylm.parallel import Master, Worker
from pylm.standalone import Server


class Echo(Server):
    def echo(self, message):
        return message


class First(Stage):
    def echo(self, message):
        return message


class Last(LastServer):
    def echo(self, message):
        return message


class Doer(Worker):
    def echo(self, message):
        return message


made = {
    "echo": lambda: Echo("echo_server", log_stdout=False),
    "last": lambda: Last("last", log_stdout=False),
    "first": lambda: First("first", next_call="last.echo", log_stdout=False),
    "master": lambda: Master("pool", log_stdout=False),
    "worker": lambda: Doer("doer", "pool", log_stdout=False),
}
made[sys.argv[1]]().start()
"""

_PYRO5_ECHO = """
import Pyro5.api


@Pyro5.api.expose
class Echo:
    def echo(self, message):
        return message


daemon = Pyro5.api.Daemon(host="127.0.0.1")
uri = daemon.register(Echo, "http.echo")
Pyro5.api.locate_ns().register("http.echo", uri)
daemon.requestLoop()
"""

_POST = f"""wrk.method = "POST"
wrk.body = "{_PAYLOAD}"
wrk.headers["Content-Type"] = "application/octet-stream"
"""


@dataclass(frozen=True)
class Side:
    """One HTTP server under load: the table's row."""

    name: str
    url: str
    script: str  # wrk's Lua


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


def _up(url: str, seconds: float = 30.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            request = urllib.request.Request(url, data=_PAYLOAD.encode(), method="POST")
            with urllib.request.urlopen(request, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)  # a process starting: poll
    raise RuntimeError(f"{url} did not answer within {seconds:g} s")


def wrk(side: Side, folder: Path, connections: int, duration: float) -> dict[str, float]:
    """One wrk run: requests a second, p50 and p99 latency (s), errors."""
    script = folder / f"{side.name}.lua"
    script.write_text(side.script)
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
            side.url,
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
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    return {
        "rate": rate,
        "p50": latency["50"],
        "p99": latency["99"],
        "non_2xx": float(non_2xx.group(1)) if non_2xx else 0.0,
        "socket_errors": float(sum(map(int, sockets.groups()))) if sockets else 0.0,
    }


def _seconds(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def _has_pyro5() -> bool:
    try:
        import Pyro5.utils.httpgateway  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return False
    return True


class Cluster:
    """Every server the sides call, each a process of its own; stops them all."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder = folder
        self.env = env
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, *command: str, env: dict[str, str] | None = None) -> None:
        """Start ``python command``; what it prints is dropped (wsgiref, the
        server of Pyro5's gateway, logs every request on stderr)."""
        self.processes.append(
            subprocess.Popen(
                [sys.executable, *command],
                env=env or self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL if env else None,
            )
        )

    def pylm(self) -> list[Side]:
        """The pylm servers, the gateway in front of them and the ceiling."""
        servers = self.folder / "servers.py"
        servers.write_text(_SERVERS)
        for role in ("echo", "last", "first", "master", "worker"):
            self.start(str(servers), role)
        gateway, ceiling = _free_port(), _free_port()
        self.start("-m", "pylm.cli", "gateway", "--port", str(gateway))
        self.start("-m", "bench.gateway", "--ceiling", str(ceiling))
        at = f"http://127.0.0.1:{gateway}"
        return [
            Side("ceiling", f"http://127.0.0.1:{ceiling}/echo_server/echo", _POST),
            Side("gateway", f"{at}/echo_server/echo", _POST),
            Side("gateway, pipeline", f"{at}/first/echo", _POST),
            Side("gateway, master", f"{at}/pool/echo", _POST),
        ]

    def pyro5(self) -> Side:
        """Pyro5's name server, a Pyro5 echo and Pyro5's HTTP gateway."""
        names, port = _free_port(), _free_port()
        env = {**self.env, "PYRO_NS_HOST": "127.0.0.1", "PYRO_NS_PORT": str(names)}
        self.start("-m", "Pyro5.nameserver", "-n", "127.0.0.1", "-p", str(names), "-x", env=env)
        echo = self.folder / "pyro5_echo.py"
        echo.write_text(_PYRO5_ECHO)
        _wait_for_name_server(names)
        self.start(str(echo), env=env)
        self.start("-m", "Pyro5.utils.httpgateway", "-H", "127.0.0.1", "-p", str(port), env=env)
        url = f"http://127.0.0.1:{port}/pyro/http.echo/echo?message={_PAYLOAD}"
        return Side("Pyro5 HTTP gateway", url, 'wrk.method = "GET"\n')

    def stop(self) -> None:
        from pylm.processes import end_process

        for process in reversed(self.processes):
            end_process(process, 10)  # type: ignore[arg-type]


def _wait_for_name_server(port: int, seconds: float = 20.0) -> None:
    import socket

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)  # the name server starting: poll
    raise RuntimeError(f"Pyro5's name server did not listen within {seconds:g} s")


def report(summary: dict[str, dict[str, float]], args: argparse.Namespace) -> dict[str, float]:
    """Print the table and the ratios; return the ratios."""
    print()
    print("| server | requests/s | p50 | p99 | non-2xx | socket errors |")
    print("|---|---:|---:|---:|---:|---:|")
    for side, numbers in summary.items():
        print(
            f"| {side} | {numbers['rate']:,.0f} | {numbers['p50'] * 1e3:.2f} ms |"
            f" {numbers['p99'] * 1e3:.2f} ms | {numbers['non_2xx']:.0f} |"
            f" {numbers['socket_errors']:.0f} |"
        )
    ratios: dict[str, float] = {}
    for key, other in (("ceiling", "ceiling"), ("pyro5", "Pyro5 HTTP gateway")):
        if other not in summary:
            print("Pyro5's HTTP gateway not run: pip install -e '.[bench]' to compare with it")
            continue
        failed = [side for side in ("gateway", other) if summary[side]["non_2xx"] > 0]
        if failed or summary[other]["rate"] <= 0:
            print(f"gateway / {other}: not computed, answers not 2xx from {', '.join(failed)}")
            continue
        ratios[key] = summary["gateway"]["rate"] / summary[other]["rate"]
        print(f"gateway / {other}: {ratios[key]:.2f}")
    print(
        f"({args.connections} connections, 100 B payloads, median of {args.rounds} round(s)"
        f" of {args.duration:g} s)"
    )
    return ratios


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
    from pylm.registry import LocalEtcd

    folder = Path(tempfile.mkdtemp(prefix="pylm-bench-gateway-"))
    results: dict[str, list[dict[str, float]]] = {}
    with LocalEtcd() as etcd:
        env = {**os.environ, "PYLM_REGISTRY": etcd.url, "PYLM_CLUSTER": "bench-gateway"}
        cluster = Cluster(folder, env)
        try:
            sides = cluster.pylm()
            if _has_pyro5():
                sides.append(cluster.pyro5())
            for side in sides:
                _up(side.url)
            for round_ in range(args.rounds):
                for side in sides:
                    numbers = wrk(side, folder, args.connections, args.duration)
                    results.setdefault(side.name, []).append(numbers)
                    print(
                        f"round {round_ + 1}/{args.rounds} {side.name}:"
                        f" {numbers['rate']:,.0f} req/s, p50 {numbers['p50'] * 1e3:.2f} ms,"
                        f" p99 {numbers['p99'] * 1e3:.2f} ms",
                        flush=True,
                    )
        finally:
            cluster.stop()
    summary = {
        side: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for side, runs in results.items()
    }
    ratios = report(summary, args)
    if args.json:
        from bench.harness import machine

        packages = ("pylm", "starlette", "uvicorn", "Pyro5")
        numbers = {"rounds": results, "median": summary, "ratios": ratios}
        Path(args.json).write_text(json.dumps({**numbers, "machine": machine(packages)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
