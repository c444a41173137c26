"""What metrics cost where they are read: ``/metrics`` render time with the
series of many servers in one process.

    python -m bench.metrics              # 300 servers, 3 functions each
    python -m bench.metrics --servers 1000 --quick

(What counting costs on the hot path is measured by ``python -m bench.rpc``,
which runs pylm with metrics on and off side by side.)
"""

from __future__ import annotations

import argparse
import statistics
import time
import urllib.request

from prometheus_client import REGISTRY, generate_latest

from pylm.telemetry.counting import BUCKETS, ServerStats
from pylm.telemetry.exporter import Exporter
from pylm.telemetry.exposition import publish, withdraw


def populate(servers: int, functions: int) -> list[ServerStats]:
    """``servers`` servers' stats, each with calls in every bucket."""
    made = []
    for index in range(servers):
        names = tuple(f"function{n}" for n in range(functions))
        stats = ServerStats(f"server{index:04d}", "chained", names, "bench", "next")
        for numbers in stats.functions.values():
            for bound in BUCKETS:
                numbers.done(bound / 2, 100, 100)
        stats.received = stats.sent = 1000
        stats.ready = True
        publish(stats)
        made.append(stats)
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, default=300)
    parser.add_argument("--functions", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else args.rounds
    made = populate(args.servers, args.functions)
    try:
        body = generate_latest(REGISTRY)
        series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
        renders = []
        for _ in range(rounds):
            began = time.perf_counter()
            generate_latest(REGISTRY)
            renders.append(time.perf_counter() - began)
        with Exporter() as exporter:
            scrapes = []
            for _ in range(rounds):
                began = time.perf_counter()
                with urllib.request.urlopen(exporter.url, timeout=30) as answer:
                    answer.read()
                scrapes.append(time.perf_counter() - began)
    finally:
        for stats in made:
            withdraw(stats)
    print(
        f"{args.servers} servers x {args.functions} functions: {series:,} series,"
        f" {len(body) / 1024:,.0f} KiB of text"
    )
    print(f"render (generate_latest): median {statistics.median(renders) * 1000:.1f} ms")
    print(f"scrape over HTTP:         median {statistics.median(scrapes) * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
