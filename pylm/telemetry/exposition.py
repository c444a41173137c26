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
from typing import Any

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


_Kind = type[CounterMetricFamily] | type[GaugeMetricFamily] | type[HistogramMetricFamily]
# A family: its type, its help and its labels after "server", the first of all.
_Spec = tuple[_Kind, str, *tuple[str, ...]]

# fmt: off
_SERVER_FAMILIES: dict[str, _Spec] = {
    "pylm_server_info": (GaugeMetricFamily,
        "A running pylm server instance (value 1) and what it is",
        "kind", "version", "instance_id"),
    "pylm_server_start_time_seconds": (GaugeMetricFamily,
        "When the server's first instance in this process started, Unix time"),
    "pylm_server_ready": (GaugeMetricFamily,
        "Instances of the server in this process that are serving"),
    "pylm_messages_received": (CounterMetricFamily, "Messages read from the server's input"),
    "pylm_messages_malformed": (CounterMetricFamily,
        "Messages dropped or refused for not following the protocol, by reason", "reason"),
    "pylm_messages_expired": (CounterMetricFamily,
        "Work read past its deadline (with CLOCK_SLACK), dropped instead of run"),
    "pylm_peers_live": (GaugeMetricFamily,
        "Instances of the next stages (branches, tees) a stage has a live connection to"),
    "pylm_peer_drops": (CounterMetricFamily,
        "Connections to next-stage instances that dropped: an instance died, or was silent"
        " for the heartbeat timeout"),
    "pylm_peer_unreachable": (GaugeMetricFamily,
        "A next-stage instance (its address) the stage cannot reach now: its connection"
        " dropped or failed, whatever the registry says (1 while so)", "peer"),
    "pylm_messages_sent": (CounterMetricFamily,
        "Messages sent on: to the next stage or to clients", "to"),
    "pylm_in_flight_messages": (GaugeMetricFamily,
        "Messages read and not yet answered or passed on"),
    "pylm_calls": (CounterMetricFamily,
        "Function calls run by the server, by outcome", "function", "outcome"),
    "pylm_call_duration_seconds": (HistogramMetricFamily,
        "Time the server's function took", "function"),
    "pylm_received_bytes": (CounterMetricFamily, "Payload bytes received by functions"),
    "pylm_sent_bytes": (CounterMetricFamily, "Payload bytes functions returned"),
    "pylm_registry_registered": (GaugeMetricFamily,
        "Instances of the server in this process whose record etcd holds, as far as they know"),
    "pylm_registry_keepalive_failures": (CounterMetricFamily,
        "Lease keep-alive rounds that could not reach etcd"),
    "pylm_registry_reachable": (GaugeMetricFamily,
        "Whether etcd answered the server's last registry request (1) or not (0)"),
    "pylm_registry_watch_restarts": (CounterMetricFamily,
        "Times the server's registry watches had to start again (etcd unreachable)"),
    "pylm_workers": (GaugeMetricFamily, "Workers connected to the master or hub"),
    "pylm_jobs_queued": (GaugeMetricFamily, "Jobs waiting for a free worker"),
    "pylm_jobs_running": (GaugeMetricFamily, "Jobs given to a worker and not answered yet"),
    "pylm_jobs_redispatched": (CounterMetricFamily,
        "Jobs given to another worker because theirs was lost (no heartbeat, or left)"),
    "pylm_results_dropped": (CounterMetricFamily,
        "Worker answers not passed on: a duplicate of an answered job, or no receiver",
        "reason"),
}

_CLIENT_FAMILIES: dict[str, _Spec] = {
    "pylm_client_requests": (CounterMetricFamily,
        "Calls made by clients in this process, by server, function and outcome",
        "function", "outcome"),
    "pylm_client_request_duration_seconds": (HistogramMetricFamily,
        "Time from sending a call to its answer, seen by the client", "function"),
    "pylm_client_timeouts": (CounterMetricFamily,
        "Calls that got no answer within their timeout", "function"),
    "pylm_client_retries": (CounterMetricFamily,
        "Calls and jobs that seemed lost (their instance died or froze), by outcome: sent"
        " again, or refused by the retry budget", "outcome"),
    "pylm_client_duplicates_dropped": (CounterMetricFamily,
        "Later copies of answers to calls and jobs sent again, dropped by the client"),
    "pylm_client_peers_live": (GaugeMetricFamily,
        "Instances of the server the clients have a live connection to"),
    "pylm_client_peer_drops": (CounterMetricFamily,
        "Connections of the clients to instances that dropped: an instance died, or was"
        " silent for the heartbeat timeout"),
    "pylm_client_peer_unreachable": (GaugeMetricFamily,
        "An instance (its address) the clients cannot reach now: its connection dropped or"
        " failed, whatever the registry says (1 while so)", "peer"),
}
# fmt: on


def _families(specs: dict[str, _Spec]) -> dict[str, Any]:
    """A new, empty family for each of ``specs``, by name, in their order."""
    return {
        name: kind(name, documentation, labels=["server", *labels])
        for name, (kind, documentation, *labels) in specs.items()
    }


def _server_families(servers: list[ServerStats]) -> Iterator[Metric]:
    family = _families(_SERVER_FAMILIES)
    by_name: dict[str, list[ServerStats]] = {}
    for stats in servers:
        by_name.setdefault(stats.name, []).append(stats)
        family["pylm_server_info"].add_metric(
            [stats.name, stats.kind, stats.version, stats.instance], 1
        )
    for name, group in sorted(by_name.items()):
        family["pylm_server_start_time_seconds"].add_metric(
            [name], min(stats.started for stats in group)
        )
        family["pylm_server_ready"].add_metric([name], sum(stats.ready for stats in group))
        family["pylm_messages_received"].add_metric([name], sum(s.received for s in group))
        malformed = family["pylm_messages_malformed"]
        for reason in MALFORMED_REASONS:
            count = sum(stats.malformed_by[reason] for stats in group)
            malformed.add_metric([name, reason], count)
        malformed.add_metric([name, "handshake"], sum(s.handshakes_failed for s in group))
        family["pylm_messages_expired"].add_metric([name], sum(s.expired for s in group))
        links = [stats.peers for stats in group if stats.peers is not None]
        if links:
            family["pylm_peers_live"].add_metric([name], sum(p.live_peers for p in links))
            family["pylm_peer_drops"].add_metric([name], sum(p.drops for p in links))
            for peer in sorted({peer for p in links for peer in p.unreachable}):
                family["pylm_peer_unreachable"].add_metric([name, peer], 1)
        sent = family["pylm_messages_sent"]
        for to in sorted({stats.sends_to for stats in group}):
            sent.add_metric([name, to], sum(s.sent for s in group if s.sends_to == to))
        family["pylm_in_flight_messages"].add_metric([name], sum(s.in_flight for s in group))
        functions: dict[str, FunctionStats] = {}
        for stats in group:
            for function, numbers in list(stats.functions.items()):
                functions.setdefault(function, FunctionStats()).add(numbers)
        calls, duration = family["pylm_calls"], family["pylm_call_duration_seconds"]
        for function, totals in sorted(functions.items()):
            if function == UNKNOWN_FUNCTION and not (totals.ok or totals.errors):
                continue  # no call to an unknown function: no series for it
            calls.add_metric([name, function, "ok"], totals.ok)
            calls.add_metric([name, function, "error"], totals.errors)
            _histogram(duration, [name, function], totals.buckets, totals.seconds)
        total_in = sum(totals.bytes_in for totals in functions.values())
        total_out = sum(totals.bytes_out for totals in functions.values())
        family["pylm_received_bytes"].add_metric([name], total_in)
        family["pylm_sent_bytes"].add_metric([name], total_out)
        registered = family["pylm_registry_registered"]
        keepalive_failures = family["pylm_registry_keepalive_failures"]
        registrations = [stats.registration for stats in group if stats.registration is not None]
        registered.add_metric([name], sum(bool(r.registered) for r in registrations))
        keepalive_failures.add_metric([name], sum(r.failures for r in registrations))
        registries = [stats.registry for stats in group if stats.registry is not None]
        if registries:
            reachable = family["pylm_registry_reachable"]
            reachable.add_metric([name], min(int(r.reachable) for r in registries))
            family["pylm_registry_watch_restarts"].add_metric(
                [name], sum(r.watch_restarts for r in registries)
            )
        dropped = family["pylm_results_dropped"]
        books = [stats.dispatcher for stats in group if stats.dispatcher is not None]
        if books:
            family["pylm_workers"].add_metric([name], sum(b.workers for b in books))
            family["pylm_jobs_queued"].add_metric([name], sum(b.queued for b in books))
            family["pylm_jobs_running"].add_metric([name], sum(b.running_jobs for b in books))
            family["pylm_jobs_redispatched"].add_metric([name], sum(b.redispatched for b in books))
            dropped.add_metric([name, "duplicate"], sum(b.duplicates for b in books))
        undeliverable = sum(b.undeliverable for b in books)
        undeliverable += sum(stats.undeliverable for stats in group)
        dropped.add_metric([name, "undeliverable"], undeliverable)
    yield from family.values()


def _client_families(clients: list[ClientStats]) -> Iterator[Metric]:
    family = _families(_CLIENT_FAMILIES)
    merged: dict[tuple[str, str], FunctionStats] = {}
    timed_out: dict[tuple[str, str], int] = {}
    for stats in clients:
        for function, numbers in list(stats.functions.items()):
            merged.setdefault((stats.server, function), FunctionStats()).add(numbers)
        for function, count in list(stats.timeouts.items()):
            timed_out[stats.server, function] = timed_out.get((stats.server, function), 0) + count
    requests = family["pylm_client_requests"]
    for (server, function), totals in sorted(merged.items()):
        requests.add_metric([server, function, "ok"], totals.ok)
        requests.add_metric([server, function, "error"], totals.errors)
        _histogram(
            family["pylm_client_request_duration_seconds"],
            [server, function],
            totals.buckets,
            totals.seconds,
        )
    for (server, function), count in sorted(timed_out.items()):
        family["pylm_client_timeouts"].add_metric([server, function], count)
    retries: dict[str, list[int]] = {}
    for stats in clients:
        books = stats.retries
        if books is not None:
            sums = retries.setdefault(stats.server, [0, 0, 0])
            sums[0] += books.retried
            sums[1] += books.refused
            sums[2] += books.duplicates
    for server, (retried, refused, duplicates) in sorted(retries.items()):
        family["pylm_client_retries"].add_metric([server, "sent"], retried)
        family["pylm_client_retries"].add_metric([server, "refused"], refused)
        family["pylm_client_duplicates_dropped"].add_metric([server], duplicates)
    links: dict[str, list[int]] = {}
    unreachable: set[tuple[str, str]] = set()
    for stats in clients:
        if stats.peers is not None:
            sums = links.setdefault(stats.server, [0, 0])
            sums[0] += stats.peers.live_peers
            sums[1] += stats.peers.drops
            unreachable.update((stats.server, peer) for peer in stats.peers.unreachable)
    for server, (live, drops) in sorted(links.items()):
        family["pylm_client_peers_live"].add_metric([server], live)
        family["pylm_client_peer_drops"].add_metric([server], drops)
    for server, peer in sorted(unreachable):
        family["pylm_client_peer_unreachable"].add_metric([server, peer], 1)
    yield from family.values()


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
