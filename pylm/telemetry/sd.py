"""Prometheus service discovery from the registry (``pylm sd``).

The registry knows every running server and the URL of its process's
``/metrics``; :class:`ServiceDiscovery` follows it and serves the list as
Prometheus `http_sd`_ JSON, or writes it as `file_sd`_ JSON. One target per
metrics endpoint (servers in one process share it, so listing each server
would scrape the process twice), with these target labels:

- ``cluster``: the pylm cluster (namespace) the servers belong to;
- ``pylm_servers``, ``pylm_kinds``: the names and kinds of the servers in
  that process, comma-separated;
- ``pylm_host``, ``pylm_pid``: where that process runs.

(Per-server labels such as ``server`` come with the metrics themselves; a
target label of the same name would rename them.)

It also serves its own ``/metrics``: ``pylm_registry_instances{cluster,
server, kind}``, the instances registered per server, including 0 for a
server that has a wiring but no instance, ``pylm_registry_up{cluster}``,
whether etcd answered, and ``pylm_registry_records_malformed_total{reason}``,
the records it skipped because they do not follow the schema (it serves the
others' targets on).

.. _http_sd: https://prometheus.io/docs/prometheus/latest/http_sd/
.. _file_sd: https://prometheus.io/docs/guides/file-sd/
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from pylm.errors import RegistryError
from pylm.registry.malformed import malformed_records
from pylm.telemetry.exposition import registry_record_families
from pylm.telemetry.httpd import HttpService, QuietHandler

if TYPE_CHECKING:
    import concurrent.futures

    from pylm.registry import InstanceRecord, Registry

__all__ = ["ServiceDiscovery", "scrape_targets"]

log = logging.getLogger("pylm.sd")


def scrape_targets(records: list[InstanceRecord], cluster: str) -> list[dict[str, Any]]:
    """The target groups of http_sd/file_sd for ``records``: one per
    metrics endpoint, sorted; records without a metrics URL are left out."""
    by_endpoint: dict[str, list[InstanceRecord]] = {}
    for record in records:
        if record.metrics:
            address = urlsplit(record.metrics).netloc
            if address:
                by_endpoint.setdefault(address, []).append(record)
    groups = []
    for address, group in sorted(by_endpoint.items()):
        groups.append(
            {
                "targets": [address],
                "labels": {
                    "cluster": cluster,
                    "pylm_servers": ",".join(sorted({r.name for r in group})),
                    "pylm_kinds": ",".join(sorted({r.kind for r in group})),
                    "pylm_host": group[0].host,
                    "pylm_pid": str(group[0].pid),
                },
            }
        )
    return groups


class ServiceDiscovery:
    """Follows the registry and serves the scrape targets at ``/sd`` (and
    its own metrics at ``/metrics``) on ``host:port``, and/or rewrites
    ``file`` on every change. ``start()``/``stop()`` or a with-block; the
    HTTP server and the following belong to it."""

    def __init__(
        self,
        registry: Registry,
        *,
        host: str = "127.0.0.1",
        port: int | None = 9464,
        file: str | Path | None = None,
    ) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.file = Path(file) if file is not None else None
        self._records: list[InstanceRecord] = []
        self._targets: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._version = 0
        self._service: HttpService | None = None
        self._following: concurrent.futures.Future[None] | None = None
        self._metrics = CollectorRegistry(auto_describe=False)
        self._metrics.register(self)

    @property
    def url(self) -> str:
        """The http_sd URL to give Prometheus."""
        return f"http://{self.host}:{self.port}/sd"

    @property
    def targets(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._targets)

    def wait_for_change(self, version: int, timeout: float) -> int:
        """Wait until the targets changed after ``version``; the new version."""
        with self._changed:
            self._changed.wait_for(lambda: self._version > version, timeout)
            return self._version

    def start(self) -> ServiceDiscovery:
        if self.port is not None:
            self._service = HttpService(self.host, self.port, _handler(self), "pylm-sd")
            self._service.start()
            self.port = self._service.port
        self._following = self.registry.follow(None, self._update)
        return self

    def stop(self) -> None:
        following, self._following = self._following, None
        if following is not None:
            following.cancel()
        service, self._service = self._service, None
        if service is not None:
            service.stop()

    def __enter__(self) -> ServiceDiscovery:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _update(self, records: list[InstanceRecord]) -> None:
        """From the registry's thread: the instances changed."""
        targets = scrape_targets(records, self.registry.config.cluster)
        if self.file is not None:  # first: whoever sees the new version finds the file too
            self._write(targets)
        with self._changed:
            self._records = records
            self._targets = targets
            self._version += 1
            self._changed.notify_all()

    def _write(self, targets: list[dict[str, Any]]) -> None:
        assert self.file is not None
        partial = self.file.with_name(f".{self.file.name}.{os.getpid()}.tmp")
        try:
            partial.write_text(json.dumps(targets, indent=2) + "\n")
            partial.replace(self.file)  # Prometheus never reads a half-written file
        except OSError as exc:
            log.error("cannot write %s: %s", self.file, exc)

    # prometheus-client collector: the registry as metrics
    def collect(self) -> Iterator[Metric]:
        cluster = self.registry.config.cluster
        instances = GaugeMetricFamily(
            "pylm_registry_instances",
            "Registered instances per server; 0 for a server wired in the registry but not running",
            labels=["cluster", "server", "kind"],
        )
        up = GaugeMetricFamily(
            "pylm_registry_up", "Whether pylm sd could read etcd (1) or not (0)", labels=["cluster"]
        )
        with self._lock:
            records = list(self._records)
        counts: dict[tuple[str, str], int] = {}
        for record in records:
            counts[record.name, record.kind] = counts.get((record.name, record.kind), 0) + 1
        reachable = self.registry.reachable
        try:
            wired = self.registry.configs()
        except RegistryError:
            wired, reachable = {}, False
        named = {name for name, _ in counts}
        for name in wired:
            if name not in named:
                counts[name, "chained"] = 0  # only stages are wired
        for (name, kind), count in sorted(counts.items()):
            instances.add_metric([cluster, name, kind], count)
        up.add_metric([cluster], int(reachable))
        yield instances
        yield up
        yield from registry_record_families(
            malformed_records().counts()
        )  # what this process skipped

    def _render_metrics(self, accept: str) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        return encoder(self._metrics), content_type


def _handler(discovery: ServiceDiscovery) -> type[QuietHandler]:
    class Handler(QuietHandler):
        def do_GET(self) -> None:  # http.server's naming
            path = self.path.partition("?")[0]
            if path == "/sd":
                self.answer(200, "application/json", json.dumps(discovery.targets).encode())
            elif path == "/metrics":
                body, content_type = discovery._render_metrics(self.headers.get("Accept", ""))
                self.answer(200, content_type, body)
            else:
                self.answer(404, "text/plain", b"pylm sd serves /sd and /metrics\n")

    return Handler
