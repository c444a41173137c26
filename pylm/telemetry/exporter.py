"""The process's HTTP endpoint: ``/metrics`` for Prometheus, ``/healthz``
for whoever asks whether the servers here are alive and ready.

One endpoint per process, shared by every server in it: the first server
that starts opens it (on its host, or ``PYLM_METRICS_HOST``; port
``PYLM_METRICS_PORT`` or a free one), every server registers its URL, and
the last one to stop closes it. It is served by :class:`pylm.telemetry.httpd.HttpService`:
one thread whatever the number of clients, with a read timeout, a cap on
the request's size and on the connections open (see :mod:`pylm.telemetry.httpd`).
A server holds it through its :class:`Exposure`, which also publishes the
server's counters while it runs.

``/metrics`` serves prometheus-client's default registry (pylm's metrics,
the process and platform collectors, and any metric of the user's own), in
the OpenMetrics format when the scraper asks for it. ``/healthz`` answers
200 with a JSON list of the servers here when all of them are serving,
503 when one is not (starting, stopping or crashed). ``/errors``: each
server's last calls whose function raised (:mod:`pylm.telemetry.recent`).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable

from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder

from pylm.errors import PylmError
from pylm.telemetry.counting import ServerStats
from pylm.telemetry.exposition import live_servers, publish, withdraw
from pylm.telemetry.httpd import DEFAULT_MAX_CONNECTIONS, DEFAULT_TIMEOUT, HttpService, QuietHandler
from pylm.telemetry.recent import errors_document

__all__ = ["Exporter", "Exposure", "exporter"]


class _Handler(QuietHandler):
    def do_GET(self) -> None:  # http.server's naming
        path = self.path.partition("?")[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self.answer(200, content_type, encoder(REGISTRY))
        elif path in ("/healthz", "/health"):
            servers = [
                {"name": stats.name, "kind": stats.kind, "instance": stats.instance,
                 "ready": stats.ready}
                for stats in live_servers()
            ]  # fmt: skip
            healthy = bool(servers) and all(server["ready"] for server in servers)
            body = json.dumps({"status": "ok" if healthy else "unavailable", "servers": servers})
            self.answer(200 if healthy else 503, "application/json", body.encode())
        elif path == "/errors":
            kept = [(s.name, s.instance, s.recent_errors) for s in live_servers()]
            self.answer(200, "application/json", errors_document(kept))
        else:
            self.answer(404, "text/plain", b"pylm serves /metrics, /healthz and /errors\n")


class Exporter:
    """``/metrics`` and ``/healthz`` on ``host:port``, shared by users
    counted with :meth:`acquire` and :meth:`release`. ``timeout`` and
    ``max_connections``: the limits of :class:`~pylm.telemetry.httpd.HttpService`."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.max_connections = max_connections
        self._service: HttpService | None = None
        self._users = 0
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        """Where Prometheus scrapes, e.g. ``http://127.0.0.1:40123/metrics``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> Exporter:
        service = HttpService(
            self.host, self.port, _Handler, "pylm-metrics",
            timeout=self.timeout, max_connections=self.max_connections,
        )  # fmt: skip
        service.start()
        self._service, self.port = service, service.port
        return self

    def stop(self) -> None:
        service, self._service = self._service, None
        if service is not None:
            service.stop()

    def acquire(self) -> str:
        """Count one more user (a server), starting on the first; returns the URL."""
        with self._lock:
            if self._service is None:
                self.start()
            self._users += 1
            return self.url

    def release(self) -> None:
        """One user fewer; the last one stops the endpoint."""
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users == 0:
                self.stop()
                self.port = _configured_port()

    def __enter__(self) -> Exporter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _configured_port() -> int:
    value = os.environ.get("PYLM_METRICS_PORT", "0")
    if not value.isdigit() or int(value) > 65535:
        raise PylmError(f"PYLM_METRICS_PORT must be a port number (0: any), got {value!r}")
    return int(value)


_EXPORTERS: dict[str, Exporter] = {}
_EXPORTERS_LOCK = threading.Lock()


def exporter(host: str) -> Exporter:
    """The endpoint of this process on ``host`` (servers on one host share
    it), or on ``PYLM_METRICS_HOST`` when set: e.g. 127.0.0.1 to keep the
    metrics on the machine while the servers listen on a public interface."""
    host = os.environ.get("PYLM_METRICS_HOST") or host
    with _EXPORTERS_LOCK:
        found = _EXPORTERS.get(host)
        if found is None:
            found = _EXPORTERS[host] = Exporter(host, _configured_port())
        return found


class Exposure:
    """One server's metrics: its :class:`ServerStats` published to
    Prometheus and the process's endpoint held while it runs. ``stats``
    None (metrics off): every step does nothing.

    :meth:`open` publishes and acquires the endpoint; :attr:`ready` says on
    ``/healthz`` whether the server serves; :meth:`close` withdraws and
    releases, whatever :meth:`open` got done."""

    def __init__(self, stats: ServerStats | None, host: str) -> None:
        self.stats = stats
        self.host = host
        self._endpoint: Exporter | None = None

    def open(self, advertise: Callable[[str], str]) -> str | None:
        """Publish and acquire; returns the URL of ``/metrics`` as others
        reach it (``advertise`` turns a wildcard host into this host's name)."""
        if self.stats is None:
            return None
        publish(self.stats)
        endpoint = exporter(self.host)
        url = endpoint.acquire()
        self._endpoint = endpoint
        return advertise(url)

    @property
    def ready(self) -> bool:
        return self.stats is not None and self.stats.ready

    @ready.setter
    def ready(self, value: bool) -> None:
        if self.stats is not None:
            self.stats.ready = value

    def close(self) -> None:
        if self.stats is not None:
            withdraw(self.stats)
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            endpoint.release()
