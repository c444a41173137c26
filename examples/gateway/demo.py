"""Runs the gateway example end to end: a local etcd, the server 'words'
and pylm gateway, each in a process of its own; the HTTP client; then stops
them. Needs etcd (on PATH, or pylm's etcd extra) and the gateway extra.

    python examples/gateway/demo.py
"""

import os
import signal
import subprocess
import sys
import time
import urllib.request

from pylm.registry import LocalEtcd

HERE = os.path.dirname(os.path.abspath(__file__))


def serving(url, process, seconds=30):
    """Wait until the gateway at ``url`` knows the server 'words'."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/openapi.json", timeout=5) as answer:
                if b"/words/upper" in answer.read():
                    return
        except OSError:
            pass  # not listening yet
        time.sleep(0.1)
    raise SystemExit(f"the gateway at {url} did not list 'words' within {seconds} s")


def main():
    with LocalEtcd() as etcd:
        env = {**os.environ, "PYLM_REGISTRY": etcd.url, "PYLM_CLUSTER": "gateway-demo"}
        server = subprocess.Popen([sys.executable, os.path.join(HERE, "service.py")], env=env)
        gateway = subprocess.Popen(
            [sys.executable, "-m", "pylm.cli", "gateway", "--port", "0"],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            url = gateway.stdout.readline().split()[-1]  # "pylm gateway of cluster ...: URL"
            print(f"pylm gateway at {url} (its console: {url}/)", flush=True)
            serving(url, gateway)
            client = [sys.executable, os.path.join(HERE, "client.py"), url]
            subprocess.run(client, check=True, timeout=60)
        finally:
            for process in (gateway, server):
                process.send_signal(signal.SIGINT)  # both stop on Ctrl-C
            for process in (gateway, server):
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            gateway.stdout.close()


if __name__ == "__main__":
    main()
