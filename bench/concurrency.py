"""Calls that wait 10 ms, 64 callers at once: a pylm standalone server with
``concurrency=32`` (an ``async def`` function awaiting, and a blocking one
sleeping on the server's pool) beside Pyro5's thread-pool server, in one run.

Run from the repository root (Pyro5 comes with the ``bench`` extra; it is
left out, with a note, without it)::

    python -m bench.concurrency                 # 3 rounds of 5 s each
    python -m bench.concurrency --quick         # 1 round of 1 s
    python -m bench.concurrency --json out.json

What runs
    Each server in a process of its own; the callers in this process: 64
    threads, each with a blocking client of its own (a pylm ``Client``, a
    Pyro5 ``Proxy``), calling without a pause for ``--duration`` seconds.
    The function waits ``--wait`` ms (10) and answers its 100 B payload.
    pylm also runs with ``concurrency=64``, beside Pyro5's thread-pool
    server with its default pool (80 threads): Pyro5 gives each connection a
    thread of its pool (a pool of 32 refuses the 33rd caller), so with 64
    callers it keeps 64 calls in progress, and pylm is compared with it at
    the same 64.

What is reported
    Calls a second (median of the rounds), the latency's 50th and 99th
    percentiles, and each rate over its ideal: ``in progress / wait``
    (3,200 calls/s for 32 in progress and 10 ms; 6,400 for 64), the most a
    server that keeps that many calls in progress can do.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CALLERS = 64
CONCURRENCY = 32
PAYLOAD = b"x" * 100

_PYLM = """
import asyncio, sys, time
from pylm.standalone import Server

WAIT = float(sys.argv[2]) / 1000


class Waits(Server):
    async def awaits(self, message):
        await asyncio.sleep(WAIT)
        return message

    def sleeps(self, message):
        time.sleep(WAIT)
        return message


server = Waits("waits", "tcp://127.0.0.1:0", log_stdout=False, metrics=False,
               concurrency=int(sys.argv[1]))
server.start(background=True)
print(server.address, flush=True)
sys.stdin.read()
server.stop()
"""

_PYRO5 = """
import sys, time
import Pyro5.api

Pyro5.config.SERIALIZER = "msgpack"
if sys.argv[1] != "default":
    Pyro5.config.THREADPOOL_SIZE = int(sys.argv[1])
WAIT = float(sys.argv[2]) / 1000


@Pyro5.api.expose
class Waits:
    def sleeps(self, message):
        time.sleep(WAIT)
        return message


daemon = Pyro5.api.Daemon(host="127.0.0.1", port=0)
print(daemon.register(Waits(), "waits"), flush=True)
daemon.requestLoop()
"""


@dataclass(frozen=True)
class Side:
    name: str
    source: str
    args: tuple[str, ...]
    function: str
    connect: Callable[[str, str], tuple[Callable[[bytes], Any], Callable[[], None]]]


def _pylm_client(address: str, function: str) -> tuple[Callable[[bytes], Any], Callable[[], None]]:
    from pylm.standalone import Client

    client = Client(address, "waits", timeout=30)
    return (lambda payload: client.job(function, payload)), client.close


def _pyro5_client(uri: str, function: str) -> tuple[Callable[[bytes], Any], Callable[[], None]]:
    import Pyro5.api  # type: ignore[import-untyped]

    Pyro5.config.SERIALIZER = "msgpack"
    proxy = Pyro5.api.Proxy(uri)
    proxy._pyroBind()
    return getattr(proxy, function), proxy._pyroRelease


def load(
    call_of: Callable[[], tuple[Callable[[bytes], Any], Callable[[], None]]], seconds: float
) -> dict[str, float]:
    """CALLERS threads calling without a pause for ``seconds``: the rate
    and the latency percentiles."""
    latencies: list[list[float]] = [[] for _ in range(CALLERS)]
    connected, start = threading.Barrier(CALLERS + 1), threading.Barrier(CALLERS + 1)
    end = 0.0

    def caller(index: int) -> None:
        call, close = call_of()  # in its own thread: a Pyro5 proxy belongs to one
        mine = latencies[index]
        connected.wait()
        start.wait()
        try:
            while (began := time.perf_counter()) < end:
                call(PAYLOAD)
                mine.append(time.perf_counter() - began)
        finally:
            close()

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(CALLERS)]
    for thread in threads:
        thread.start()
    connected.wait()  # every caller connected
    end = time.perf_counter() + seconds
    began = time.perf_counter()
    start.wait()
    for thread in threads:
        thread.join()
    took = time.perf_counter() - began
    every = sorted(x for mine in latencies for x in mine)
    return {
        "rate": len(every) / took,
        "p50": every[len(every) // 2],
        "p99": every[min(len(every) - 1, int(len(every) * 0.99))],
    }


def _has_pyro5() -> bool:
    try:
        import Pyro5.api  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.concurrency", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="s of load per run (5)")
    parser.add_argument("--wait", type=float, default=10.0, help="ms each call waits (10)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers to PATH")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round of 1 s")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration = 1, 1.0
    wait = f"{args.wait:g}"
    sides = [
        Side("pylm, async def, concurrency 32", _PYLM, (str(CONCURRENCY), wait), "awaits",
             _pylm_client),
        Side("pylm, blocking, concurrency 32", _PYLM, (str(CONCURRENCY), wait), "sleeps",
             _pylm_client),
        Side("pylm, async def, concurrency 64", _PYLM, (str(CALLERS), wait), "awaits",
             _pylm_client),
    ]  # fmt: skip
    if _has_pyro5():
        sides.append(
            Side("Pyro5 thread pool (80)", _PYRO5, ("default", wait), "sleeps", _pyro5_client)
        )
    results: dict[str, list[dict[str, float]]] = {side.name: [] for side in sides}
    env = {**os.environ, "PYLM_REGISTRY": ""}
    safe_path = ["-P"] if sys.flags.safe_path else []  # bench.ab: pylm from PYTHONPATH
    for round_ in range(args.rounds):
        for side in sides:
            server = subprocess.Popen(
                [sys.executable, *safe_path, "-c", side.source, *side.args],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            )  # fmt: skip
            try:
                assert server.stdout is not None
                address = server.stdout.readline().strip()
                numbers = load(lambda s=side, a=address: s.connect(a, s.function), args.duration)
            finally:
                if server.stdin is not None:
                    server.stdin.close()
                try:
                    server.wait(10)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
            results[side.name].append(numbers)
            print(
                f"round {round_ + 1}/{args.rounds} {side.name}: {numbers['rate']:,.0f} calls/s,"
                f" p50 {numbers['p50'] * 1e3:.1f} ms, p99 {numbers['p99'] * 1e3:.1f} ms",
                flush=True,
            )
    ideal = CONCURRENCY / (args.wait / 1000)
    summary = {
        name: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for name, runs in results.items()
    }
    print()
    print("| server | calls/s | p50 | p99 | / its ideal |")
    print("|---|---:|---:|---:|---:|")
    for name, numbers in summary.items():
        in_progress = CONCURRENCY if name.endswith(f"concurrency {CONCURRENCY}") else CALLERS
        its_ideal = in_progress / (args.wait / 1000)  # Pyro5: a thread for each of the callers
        print(
            f"| {name} | {numbers['rate']:,.0f} | {numbers['p50'] * 1e3:.1f} ms |"
            f" {numbers['p99'] * 1e3:.1f} ms | {numbers['rate'] / its_ideal:.2f} |"
        )
    ratios = {"ideal": summary["pylm, async def, concurrency 32"]["rate"] / ideal}
    pyro5 = summary.get("Pyro5 thread pool (80)")
    if pyro5:  # both with the 64 callers' calls in progress at once
        ratios["pyro5"] = summary["pylm, async def, concurrency 64"]["rate"] / pyro5["rate"]
    print(
        f"\nideal: {ideal:,.0f} calls/s ({CONCURRENCY} in progress, {args.wait:g} ms each);"
        f" {CALLERS} callers, median of {args.rounds} round(s) of {args.duration:g} s;"
        f" pylm async / ideal: {ratios['ideal']:.2f}"
        + (f"; pylm async (64) / Pyro5: {ratios['pyro5']:.2f}" if "pyro5" in ratios else "")
    )
    if args.json:
        from bench.harness import machine

        numbers_out = {"rounds": results, "median": summary, "ratios": ratios}
        machine_info = machine(("pylm", "pyzmq", "Pyro5"))
        Path(args.json).write_text(json.dumps({**numbers_out, "machine": machine_info}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
