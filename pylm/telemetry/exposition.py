"""How Prometheus reads what pylm counts.

One collector, registered in prometheus-client's default registry once the
first server or client of the process counts, turns every live stats object
(:mod:`pylm.telemetry.counting`) into metric families when Prometheus
scrapes, adding up objects that share labels (two instances of one server in
a process, several clients of one server). Every ``pylm_`` family a process
serves is named here. Metric names follow Prometheus' conventions: the
``pylm_`` prefix, base units, ``_total`` counters; labels are bounded
(server, function, outcome, to) and never carry message ids.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import REGISTRY
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from pylm.telemetry.counting import (
    BUCKETS,
    MALFORMED_REASONS,
    UNKNOWN_FUNCTION,
    ClientStats,
    FunctionStats,
    ServerStats,
)

__all__ = [
    "live_servers",
    "publish",
    "publish_client",
    "read_record_counts_from",
    "registry_record_families",
    "withdraw",
]


def publish(stats: ServerStats) -> None:
    """Export ``stats`` (a server starts)."""
    _COLLECTOR.add_server(stats)


def withdraw(stats: ServerStats) -> None:
    """Stop exporting ``stats`` (a server stopped)."""
    _COLLECTOR.remove_server(stats)


def publish_client(stats: ClientStats) -> ClientStats:
    """Export ``stats`` while the client that writes it lives; returns it."""
    _COLLECTOR.add_client(stats)
    return stats


def live_servers() -> list[ServerStats]:
    """The stats of the servers running in this process."""
    return _COLLECTOR.servers()


class _Collector:
    """Turns the live stats objects of this process into metric families."""

    def __init__(self) -> None:
        self._servers: weakref.WeakSet[ServerStats] = weakref.WeakSet()
        self._clients: weakref.WeakSet[ClientStats] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._registered = False
        # The registry's skipped records, by reason: pylm.registry.malformed
        # counts them and says so once imported (nothing counted before).
        self.record_counts: Callable[[], Mapping[str, int]] = dict

    def add_server(self, stats: ServerStats) -> None:
        with self._lock:
            self._register()
            self._servers.add(stats)

    def remove_server(self, stats: ServerStats) -> None:
        with self._lock:
            self._servers.discard(stats)

    def add_client(self, stats: ClientStats) -> None:
        with self._lock:
            self._register()
            self._clients.add(stats)

    def _register(self) -> None:
        if not self._registered:
            REGISTRY.register(self)
            self._registered = True

    def servers(self) -> list[ServerStats]:
        with self._lock:
            return list(self._servers)

    def describe(self) -> list[Metric]:
        return []  # names known only at collection; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            servers, clients = list(self._servers), list(self._clients)
        yield from _server_families(servers)
        yield from _client_families(clients)
        yield from registry_record_families(self.record_counts())


def _histogram(
    family: HistogramMetricFamily, labels: list[str], totals: list[int], seconds: float
) -> None:
    cumulative, buckets = 0, []
    for bound, count in zip((*BUCKETS, float("inf")), totals, strict=True):
        cumulative += count
        buckets.append((_bound(bound), cumulative))
    family.add_metric(labels, buckets, seconds)


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


def _server_families(servers: list[ServerStats]) -> Iterator[Metric]:
    info = GaugeMetricFamily(
        "pylm_server_info",
        "A running pylm server instance (value 1) and what it is",
        labels=["server", "kind", "version", "instance_id"],
    )
    started = GaugeMetricFamily(
        "pylm_server_start_time_seconds",
        "When the server's first instance in this process started, Unix time",
        labels=["server"],
    )
    ready = GaugeMetricFamily(
        "pylm_server_ready",
        "Instances of the server in this process that are serving",
        labels=["server"],
    )
    received = CounterMetricFamily(
        "pylm_messages_received", "Messages read from the server's input", labels=["server"]
    )
    malformed = CounterMetricFamily(
        "pylm_messages_malformed",
        "Messages dropped or refused for not following the protocol, by reason",
        labels=["server", "reason"],
    )
    sent = CounterMetricFamily(
        "pylm_messages_sent",
        "Messages sent on: to the next stage or to clients",
        labels=["server", "to"],
    )
    in_flight = GaugeMetricFamily(
        "pylm_in_flight_messages", "Messages read and not yet answered or passed on",
        labels=["server"],
    )  # fmt: skip
    calls = CounterMetricFamily(
        "pylm_calls", "Function calls run by the server, by outcome",
        labels=["server", "function", "outcome"],
    )  # fmt: skip
    duration = HistogramMetricFamily(
        "pylm_call_duration_seconds",
        "Time the server's function took",
        labels=["server", "function"],
    )
    bytes_in = CounterMetricFamily(
        "pylm_received_bytes", "Payload bytes received by functions", labels=["server"]
    )
    bytes_out = CounterMetricFamily(
        "pylm_sent_bytes", "Payload bytes functions returned", labels=["server"]
    )
    registered = GaugeMetricFamily(
        "pylm_registry_registered",
        "Instances of the server in this process whose record etcd holds, as far as they know",
        labels=["server"],
    )
    keepalive_failures = CounterMetricFamily(
        "pylm_registry_keepalive_failures",
        "Lease keep-alive rounds that could not reach etcd",
        labels=["server"],
    )
    reachable = GaugeMetricFamily(
        "pylm_registry_reachable",
        "Whether etcd answered the server's last registry request (1) or not (0)",
        labels=["server"],
    )
    watch_restarts = CounterMetricFamily(
        "pylm_registry_watch_restarts",
        "Times the server's registry watches had to start again (etcd unreachable)",
        labels=["server"],
    )
    workers = GaugeMetricFamily(
        "pylm_workers", "Workers connected to the master or hub", labels=["server"]
    )
    queued = GaugeMetricFamily(
        "pylm_jobs_queued", "Jobs waiting for a free worker", labels=["server"]
    )
    running = GaugeMetricFamily(
        "pylm_jobs_running", "Jobs given to a worker and not answered yet", labels=["server"]
    )
    redispatched = CounterMetricFamily(
        "pylm_jobs_redispatched",
        "Jobs given to another worker because theirs was lost (no heartbeat, or left)",
        labels=["server"],
    )
    dropped = CounterMetricFamily(
        "pylm_results_dropped",
        "Worker answers not passed on: a duplicate of an answered job, or no receiver",
        labels=["server", "reason"],
    )
    by_name: dict[str, list[ServerStats]] = {}
    for stats in servers:
        by_name.setdefault(stats.name, []).append(stats)
        info.add_metric([stats.name, stats.kind, stats.version, stats.instance], 1)
    for name, group in sorted(by_name.items()):
        started.add_metric([name], min(stats.started for stats in group))
        ready.add_metric([name], sum(stats.ready for stats in group))
        received.add_metric([name], sum(stats.received for stats in group))
        for reason in MALFORMED_REASONS:
            count = sum(stats.malformed_by[reason] for stats in group)
            malformed.add_metric([name, reason], count)
        malformed.add_metric([name, "handshake"], sum(s.handshakes_failed for s in group))
        for to in sorted({stats.sends_to for stats in group}):
            sent.add_metric([name, to], sum(s.sent for s in group if s.sends_to == to))
        in_flight.add_metric([name], sum(stats.in_flight for stats in group))
        functions: dict[str, FunctionStats] = {}
        for stats in group:
            for function, numbers in list(stats.functions.items()):
                functions.setdefault(function, FunctionStats()).add(numbers)
        for function, totals in sorted(functions.items()):
            if function == UNKNOWN_FUNCTION and not (totals.ok or totals.errors):
                continue  # no call to an unknown function: no series for it
            calls.add_metric([name, function, "ok"], totals.ok)
            calls.add_metric([name, function, "error"], totals.errors)
            _histogram(duration, [name, function], totals.buckets, totals.seconds)
        total_in = sum(totals.bytes_in for totals in functions.values())
        total_out = sum(totals.bytes_out for totals in functions.values())
        bytes_in.add_metric([name], total_in)
        bytes_out.add_metric([name], total_out)
        registrations = [stats.registration for stats in group if stats.registration is not None]
        registered.add_metric([name], sum(bool(r.registered) for r in registrations))
        keepalive_failures.add_metric([name], sum(r.failures for r in registrations))
        registries = [stats.registry for stats in group if stats.registry is not None]
        if registries:
            reachable.add_metric([name], min(int(r.reachable) for r in registries))
            watch_restarts.add_metric([name], sum(r.watch_restarts for r in registries))
        books = [stats.dispatcher for stats in group if stats.dispatcher is not None]
        if books:
            workers.add_metric([name], sum(b.workers for b in books))
            queued.add_metric([name], sum(b.queued for b in books))
            running.add_metric([name], sum(b.running_jobs for b in books))
            redispatched.add_metric([name], sum(b.redispatched for b in books))
            dropped.add_metric([name, "duplicate"], sum(b.duplicates for b in books))
        undeliverable = sum(b.undeliverable for b in books)
        undeliverable += sum(stats.undeliverable for stats in group)
        dropped.add_metric([name, "undeliverable"], undeliverable)
    yield from (info, started, ready, received, malformed, sent, in_flight, calls, duration)
    yield from (bytes_in, bytes_out, registered, keepalive_failures, reachable, watch_restarts)
    yield from (workers, queued, running, redispatched, dropped)


def _client_families(clients: list[ClientStats]) -> Iterator[Metric]:
    requests = CounterMetricFamily(
        "pylm_client_requests",
        "Calls made by clients in this process, by server, function and outcome",
        labels=["server", "function", "outcome"],
    )
    duration = HistogramMetricFamily(
        "pylm_client_request_duration_seconds",
        "Time from sending a call to its answer, seen by the client",
        labels=["server", "function"],
    )
    timeouts = CounterMetricFamily(
        "pylm_client_timeouts",
        "Calls that got no answer within their timeout",
        labels=["server", "function"],
    )
    merged: dict[tuple[str, str], FunctionStats] = {}
    timed_out: dict[tuple[str, str], int] = {}
    for stats in clients:
        for function, numbers in list(stats.functions.items()):
            merged.setdefault((stats.server, function), FunctionStats()).add(numbers)
        for function, count in list(stats.timeouts.items()):
            timed_out[stats.server, function] = timed_out.get((stats.server, function), 0) + count
    for (server, function), totals in sorted(merged.items()):
        requests.add_metric([server, function, "ok"], totals.ok)
        requests.add_metric([server, function, "error"], totals.errors)
        _histogram(duration, [server, function], totals.buckets, totals.seconds)
    for (server, function), count in sorted(timed_out.items()):
        timeouts.add_metric([server, function], count)
    yield from (requests, duration, timeouts)


_COLLECTOR = _Collector()


def read_record_counts_from(counts: Callable[[], Mapping[str, int]]) -> None:
    """Where the process's collector reads the registry's skipped records."""
    _COLLECTOR.record_counts = counts


def registry_record_families(counts: Mapping[str, int]) -> Iterator[Metric]:
    """``pylm_registry_records_malformed_total{reason}`` (also served by ``pylm sd``)."""
    family = CounterMetricFamily(
        "pylm_registry_records_malformed",
        "Registry records (instances, config) read and skipped because they do not follow"
        " the schema, by reason",
        labels=["reason"],
    )
    for reason, count in sorted(counts.items()):
        family.add_metric([reason], count)
    yield family
