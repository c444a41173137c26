"""Runs the scatter example end to end: the line master, two workers and the
client, each in a process of its own, then stops them.

    python examples/scatter/demo.py
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = ("w1", "w2")


def script(name, *args):
    return [sys.executable, os.path.join(HERE, name), *args]


def main():
    # ipc endpoints in a fresh folder: never collide with a port in use.
    folder = tempfile.mkdtemp(prefix="pylm-scatter-only-")
    servers = [subprocess.Popen(script("master.py", folder))]
    servers += [subprocess.Popen(script("worker.py", name, folder)) for name in WORKERS]
    try:
        command = script("client.py", folder, "--workers", str(len(WORKERS)))
        subprocess.run(command, check=True, timeout=60)
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
