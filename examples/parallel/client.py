"""Sends jobs to the master and prints their results, and which worker ran what.

Run: python examples/parallel/client.py [FOLDER] [--workers N]

Without FOLDER the client finds the master in the registry
(``PYLM_REGISTRY``); with FOLDER it connects to the master's ipc:// endpoint
in that folder. It first waits until N workers (default 1) have joined.
"""

import argparse
import time
from collections import Counter

from pylm import RemoteError
from pylm.parallel import Client


def wait_for_workers(client, count, timeout=10.0):
    deadline = time.monotonic() + timeout
    while (info := client.ping())["workers"] < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {info['workers']} worker(s) joined within {timeout:g} s")
        time.sleep(0.05)
    return info


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Runs jobs on the workers of 'master'.")
    parser.add_argument("folder", nargs="?", help="the master's ipc:// folder (default: by name)")
    parser.add_argument("--workers", type=int, default=1, help="wait for this many workers")
    args = parser.parse_args()
    if args.folder:
        client = Client(f"ipc://{args.folder}/front", "master", timeout=10)
    else:
        client = Client("master", timeout=10, wait=10)  # by name; it may be starting
    with client:
        info = wait_for_workers(client, args.workers)
        print(f"Master {info['name']!r} has {info['workers']} worker(s)")
        # One job, its result.
        print("Client got: ", client.eval("square", b"7"))
        # Many jobs: each goes to an idle worker; results come as they are ready.
        results = list(client.job("square", [b"%d" % number for number in range(10)]))
        for result in sorted(results, key=lambda result: int(result.split()[1])):
            print("Client got: ", result)
        by_worker = Counter(result.split(b":")[0].decode() for result in results)
        print("Jobs by worker:", ", ".join(f"{w} ran {n}" for w, n in sorted(by_worker.items())))
        # A job that fails raises its typed error; the workers go on.
        try:
            client.eval("square", b"seven")
        except RemoteError as error:
            print(f"Client got an error: {error.remote_type}: {error.remote_message}")
