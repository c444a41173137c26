"""Runs the gather example end to end: the watching master, a worker and the
client, each in a process of its own, then stops them.

    python examples/gather/demo.py
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def script(name, *args):
    return [sys.executable, os.path.join(HERE, name), *args]


def main():
    # ipc endpoints in a fresh folder: never collide with a port in use.
    folder = tempfile.mkdtemp(prefix="pylm-gather-")
    servers = [
        subprocess.Popen(script("master.py", folder)),
        subprocess.Popen(script("worker.py", "worker1", folder)),
    ]
    try:
        subprocess.run(script("client.py", folder), check=True, timeout=60)
    finally:
        for server in servers:
            server.send_signal(signal.SIGINT)  # the servers stop on Ctrl-C
        for server in servers:
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
