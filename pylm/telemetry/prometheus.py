"""A local Prometheus for tests and development: the ``prometheus`` binary
from PATH (Debian's ``prometheus`` package), on a free loopback port, with
its data in a temporary folder, and a small client of its HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Self

from pylm.errors import PylmError
from pylm.lifecycle import Started
from pylm.processes import end_process, free_port

__all__ = ["PROMETHEUS_HINT", "LocalPrometheus", "PrometheusError", "find_prometheus"]

PROMETHEUS_HINT = "sudo apt-get install prometheus"
"""How to get the binaries :func:`find_prometheus` finds (no package index
ships Prometheus), for error messages."""


class PrometheusError(PylmError):
    """Prometheus is missing, did not start, or refused a query."""


def find_prometheus(binary: str = "prometheus") -> str | None:
    """``binary`` (``prometheus``, or ``promtool``, which comes with it) on
    PATH, as :class:`LocalPrometheus` runs it; None when it is not there."""
    return shutil.which(binary)


class LocalPrometheus(Started):
    """Runs ``prometheus`` with ``config`` (the text of a prometheus.yml;
    relative ``rule_files`` resolve against ``config_dir``, default a
    temporary folder) and stops it; a context manager."""

    def __init__(
        self,
        config: str,
        *,
        host: str = "127.0.0.1",
        config_dir: str | Path | None = None,
        binary: str = "prometheus",
    ) -> None:
        self.config = config
        self.host = host
        self.binary = binary
        self.port = 0
        self._folder: Path | None = None
        self._config_dir = Path(config_dir) if config_dir is not None else None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> Self:
        path = find_prometheus(self.binary)
        if path is None:
            raise PrometheusError(f"no {self.binary!r} binary on PATH: {PROMETHEUS_HINT}")
        self._folder = Path(tempfile.mkdtemp(prefix="pylm-prometheus-"))
        config_dir = self._config_dir or self._folder
        config_file = config_dir / f"prometheus-{self._folder.name}.yml"
        config_file.write_text(self.config)
        self._config_file = config_file
        self.port = free_port(self.host)
        self._log = self._folder / "prometheus.log"
        with open(self._log, "ab") as log:
            self._process = subprocess.Popen(
                [
                    path,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={self._folder / 'data'}",
                    f"--web.listen-address={self.host}:{self.port}",
                    "--web.enable-lifecycle",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self._process.poll() is not None:
                raise PrometheusError(f"prometheus exited: {self._tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise PrometheusError(f"prometheus not ready within {timeout:g} s: {self._tail()}")
            time.sleep(0.1)  # polling a process we do not own an event for
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as answer:
                return bool(answer.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def _tail(self) -> str:
        return self._log.read_text(errors="replace")[-3000:] if self._log.exists() else ""

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>``; the ``data`` of a successful answer."""
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as answer:
                body = json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result (vector samples: ``metric`` and ``value``)."""
        data = self.api("query", query=expr)
        result = data["result"]
        return result if isinstance(result, list) else [result]

    def wait_for(self, expr: str, timeout: float, what: str | None = None) -> list[dict[str, Any]]:
        """Query ``expr`` until it returns something; raise after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.query(expr)
            if found:
                return found
            if time.monotonic() > deadline:
                raise PrometheusError(f"{what or expr!r}: no data within {timeout:g} s")
            time.sleep(0.2)  # Prometheus scrapes on its own clock

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Prometheus and remove its folder (leaving ``with`` does this)."""
        process, self._process = self._process, None
        end_process(process, timeout)
        if self._folder is not None:
            if self._config_dir is not None:
                self._config_file.unlink(missing_ok=True)
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    close = stop
