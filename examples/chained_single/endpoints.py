"""The addresses of the chained example: TCP ports 5555-5561 by default, or
ipc:// endpoints in the folder given as first argument (the demo uses that
so that it never collides with a port in use)."""

import sys

PORTS = {
    "step1_pull": 5555,
    "step1_db": 5556,
    "step2_pull": 5557,
    "step2_db": 5558,
    "last_pull": 5559,
    "last_db": 5560,
    "last_push": 5561,
}


def endpoint(name):
    if len(sys.argv) > 1:
        return f"ipc://{sys.argv[1]}/{name}"
    return f"tcp://127.0.0.1:{PORTS[name]}"
