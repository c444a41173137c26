"""Helper processes this machine runs for development and tests (a local
etcd, a local Prometheus): a free port to give them, and their end."""

from __future__ import annotations

import random
import socket
import subprocess

__all__ = ["end_process", "free_port"]

_HANDED_OUT: set[int] = set()  # the ports free_port gave in this process


def _ephemeral_low() -> int:
    """The first port of the OS's ephemeral range (Linux: 32768 by default)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            return int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, for a process that binds it later
    (etcd cannot take port 0); never the same one twice in a process. It is
    below the OS's ephemeral range when there is room there: a port from
    ``bind(0)`` comes from that range, where any outgoing connection may
    take it as its source port before the process binds it."""
    low = _ephemeral_low()
    for _ in range(1000):
        port = random.randrange(max(1024, low - 10000), low) if low > 2048 else 0
        if port in _HANDED_OUT:
            continue
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            port = int(probe.getsockname()[1])
        _HANDED_OUT.add(port)
        return port
    raise OSError(f"no free TCP port found on {host}")


def end_process(process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """Terminate ``process`` (if running), killing it after ``timeout`` seconds."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
