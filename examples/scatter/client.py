"""Sends a text to the line master, as one job, and prints each line's
result as it comes, and which worker measured which line.

Run: python examples/scatter/client.py [FOLDER] [--workers N]

Without FOLDER the client finds the master in the registry
(``PYLM_REGISTRY``); with FOLDER it connects to the master's ipc:// endpoint
in that folder. It first waits until N workers (default 1) have joined.
"""

import argparse
import time
from collections import Counter

from pylm.parallel import Client

TEXT = b"""The master splits the text,
one job per line.
Any idle worker takes a line;
each result goes to the client
as soon as it is ready.
"""


def wait_for_workers(client, count, timeout=10.0):
    deadline = time.monotonic() + timeout
    while (info := client.ping())["workers"] < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {info['workers']} worker(s) joined within {timeout:g} s")
        time.sleep(0.05)
    return info


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Measures a text, a line per worker job.")
    parser.add_argument("folder", nargs="?", help="the master's ipc:// folder (default: by name)")
    parser.add_argument("--workers", type=int, default=1, help="wait for this many workers")
    args = parser.parse_args()
    if args.folder:
        client = Client(f"ipc://{args.folder}/front", "master", timeout=10)
    else:
        client = Client("master", timeout=10, wait=10)  # by name; it may be starting
    with client:
        wait_for_workers(client, args.workers)
        # One job for the client; the master runs one per line on its workers,
        # and, with no gather, passes on each line's result as it comes.
        began = time.monotonic()
        by_worker = Counter()
        for result in client.stream("measure", TEXT):
            by_worker[result.split(b" ", 1)[0].decode()] += 1
            print("Client got: ", result, f"after {time.monotonic() - began:.1f} s", flush=True)
    lines = len(TEXT.splitlines())
    print(f"{sum(by_worker.values())} results for {lines} lines")
    print("Lines by worker:", ", ".join(f"{w} ran {n}" for w, n in sorted(by_worker.items())))
