"""Sends jobs through step -> hub (on its workers) -> last, and prints the
results and which worker ran each job.

Run: python examples/hub/client.py [FOLDER]

Without FOLDER the client knows only the first stage's name, ``step``, and
finds the rest of the pipeline in the registry (``PYLM_REGISTRY``); with
FOLDER it uses the ipc:// endpoints in that folder. Jobs that reach the hub
before any worker has joined wait in the hub's queue.
"""

import sys
from collections import Counter

from pylm import RemoteError
from pylm.chained import LoopClient


def run(client):
    """Ten jobs and a failing one; the lines the example's test checks."""
    results = list(client.job("number", [b" %d " % number for number in range(10)]))
    for result in sorted(results, key=lambda result: int(result.split()[3])):
        print("Client got: ", result, flush=True)
    by_worker = Counter(result.split()[2].rstrip(b":").decode() for result in results)
    print(
        "Jobs by worker:",
        ", ".join(f"{w} ran {n}" for w, n in sorted(by_worker.items())),
        flush=True,
    )
    # A job that fails on a worker: its error comes back through the last stage.
    try:
        list(client.job("number", [b"seven"]))
    except RemoteError as error:
        print(f"Client got an error: {error.remote_type}: {error.remote_message}", flush=True)


def make_client(folder=None):
    if folder is None:
        return LoopClient("step", timeout=10, wait=10)  # the rest from the registry
    return LoopClient(
        f"ipc://{folder}/last_push",  # the last stage's push address
        f"ipc://{folder}/step",  # the first stage's pull address
        f"ipc://{folder}/step_db",  # the first stage's cache
        "step",
        timeout=10,
    )


if __name__ == "__main__":
    with make_client(sys.argv[1] if len(sys.argv) > 1 else None) as client:
        run(client)
