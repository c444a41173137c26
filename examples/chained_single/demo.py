"""Runs the chained example end to end: starts the three stages, runs the
client against them, stops the stages. Used by scripts/demo.sh."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    folder = tempfile.mkdtemp(prefix="pylm-chain-")
    stages = [
        subprocess.Popen([sys.executable, os.path.join(HERE, script), folder])
        for script in ("last.py", "step2.py", "step1.py")
    ]
    try:
        subprocess.run(
            [sys.executable, os.path.join(HERE, "client.py"), folder], check=True, timeout=60
        )
    finally:
        for stage in stages:
            stage.send_signal(signal.SIGINT)  # the stages stop cleanly on Ctrl-C
        for stage in stages:
            try:
                stage.wait(10)
            except subprocess.TimeoutExpired:
                stage.kill()
                stage.wait()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
