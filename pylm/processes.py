"""Helper processes this machine runs for development and tests (a local
etcd, a local Prometheus): a free port to give them, and their end."""

from __future__ import annotations

import socket
import subprocess

__all__ = ["end_process", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS reports free on ``host`` (etcd cannot take port 0)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def end_process(process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """Terminate ``process`` (if running), killing it after ``timeout`` seconds."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
