"""A local etcd server for development and tests: the ``etcd`` binary from
PATH (Debian's ``etcd-server`` package), on free loopback ports, with its
data in a folder of its own."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from pylm.errors import RegistryError

__all__ = ["LocalEtcd", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS reports free on ``host`` (etcd cannot take port 0)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class LocalEtcd:
    """Starts a single-member etcd and stops it; a context manager.

    ``url`` is the ``PYLM_REGISTRY`` value that reaches it, such as
    ``etcd://127.0.0.1:40123``. The data folder is removed on stop unless it
    was given (``data_dir``).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        data_dir: str | Path | None = None,
        binary: str = "etcd",
        election_ms: int = 100,
    ) -> None:
        self.host = host
        self.binary = binary
        self.election_ms = election_ms
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.client_port = 0
        self.peer_port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None

    @property
    def url(self) -> str:
        return f"etcd://{self.host}:{self.client_port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 20.0) -> LocalEtcd:
        path = shutil.which(self.binary)
        if path is None:
            raise RegistryError(
                f"no {self.binary!r} binary on PATH: install etcd (Debian: apt-get install"
                " etcd-server) or point PYLM_REGISTRY at a running etcd"
            )
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="pylm-etcd-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.client_port:
            self.client_port, self.peer_port = free_port(self.host), free_port(self.host)
        client = f"http://{self.host}:{self.client_port}"
        peer = f"http://{self.host}:{self.peer_port}"
        self._log = self.data_dir / "etcd.log"
        command = [
            path,
            "--name", "pylm",
            "--data-dir", str(self.data_dir / "data"),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"pylm={peer}",
            "--heartbeat-interval", str(max(10, self.election_ms // 5)),
            "--election-timeout", str(self.election_ms),
        ]  # fmt: skip
        with open(self._log, "ab") as log:
            self._process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self._wait_healthy(client, timeout)
        return self

    def _wait_healthy(self, client: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._process is not None and self._process.poll() is not None:
                raise RegistryError(f"etcd exited with {self._process.returncode}: {self._tail()}")
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=1) as answer:
                    if b'"true"' in answer.read():
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RegistryError(f"etcd not healthy within {timeout:g} s: {self._tail()}")
            time.sleep(0.05)  # polling a process we do not own an event for

    def _tail(self) -> str:
        if self._log is None or not self._log.exists():
            return "(no log)"
        return self._log.read_text(errors="replace")[-2000:]

    def stop(self, timeout: float = 10.0) -> None:
        """Stop etcd (the data stays until :meth:`cleanup`, for a restart)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalEtcd:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()
