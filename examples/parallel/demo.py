"""Runs the parallel example end to end: the master, two workers and the
client, each in a process of its own, then stops them.

    python examples/parallel/demo.py             # ipc:// endpoints in a temporary folder
    python examples/parallel/demo.py --registry  # names only, on a local etcd it starts

With ``--registry`` the servers start with only their names and find each
other through a local etcd (the ``etcd`` binary must be on PATH), and the
demo ends by listing what they registered (``pylm ls``).
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = ("worker1", "worker2")


def script(name, *args):
    return [sys.executable, os.path.join(HERE, name), *args]


def run(where, env=None):
    """Start the servers, run the client, stop the servers. ``where`` is the
    scripts' FOLDER argument (``[folder]``), or ``[]``: by name."""
    servers = [subprocess.Popen(script("master.py", *where), env=env)]
    servers += [subprocess.Popen(script("worker.py", name, *where), env=env) for name in WORKERS]
    try:
        command = script("client.py", *where, "--workers", str(len(WORKERS)))
        subprocess.run(command, env=env, check=True, timeout=60)
        if not where:
            ls = [sys.executable, "-m", "pylm.cli", "ls"]
            subprocess.run(ls, env=env, check=True, timeout=30)
    finally:
        for server in servers:
            server.send_signal(signal.SIGINT)  # the servers stop on Ctrl-C
        for server in servers:
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def main():
    parser = argparse.ArgumentParser(description="The parallel example, end to end.")
    parser.add_argument(
        "--registry", action="store_true", help="names only, on a local etcd started here"
    )
    if parser.parse_args().registry:
        from pylm.registry import LocalEtcd

        with LocalEtcd() as etcd:
            print(f"local etcd at {etcd.url}", flush=True)
            run([], {**os.environ, "PYLM_REGISTRY": etcd.url, "PYLM_CLUSTER": "parallel-demo"})
    else:
        # ipc endpoints in a fresh folder: never collide with a port in use.
        folder = tempfile.mkdtemp(prefix="pylm-parallel-")
        try:
            run([folder])
        finally:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
