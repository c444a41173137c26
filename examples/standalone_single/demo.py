"""Runs the standalone example end to end: starts server.py, runs client.py
and async_client.py against it, stops the server. Used by scripts/demo.sh."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    folder = tempfile.mkdtemp(prefix="pylm-demo-")
    # An ipc endpoint in a fresh folder: never collides with a port in use.
    address = f"ipc://{folder}/my_server"
    server = subprocess.Popen([sys.executable, os.path.join(HERE, "server.py"), address])
    try:
        for script in ("client.py", "async_client.py"):
            subprocess.run(
                [sys.executable, os.path.join(HERE, script), address], check=True, timeout=60
            )
    finally:
        server.send_signal(signal.SIGINT)  # the server stops cleanly on Ctrl-C
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
