"""What pylm counts, and how Prometheus reads it.

Servers and clients count in plain Python numbers (:class:`FunctionStats`,
:class:`ServerStats`, :class:`ClientStats`), each object written by the one
thread that owns it: no lock, no label lookup, a few additions per message.
One collector, registered once per process in prometheus-client's default
registry, turns every live object into metric families when Prometheus
scrapes, adding up objects that share labels (two instances of one server in
a process, several clients of one server). Metric names follow Prometheus'
conventions: the ``pylm_`` prefix, base units, ``_total`` counters; labels
are bounded (server, function, outcome, to) and never carry message ids.

Counting is on unless ``PYLM_METRICS`` is ``0``/``off``/``false`` (or a
server is created with ``metrics=False``); then nothing is counted and no
endpoint is served.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
import weakref
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import REGISTRY
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

if TYPE_CHECKING:
    from pylm.registry import Registration, Registry

__all__ = [
    "BUCKETS",
    "BUSY",
    "MALFORMED_REASONS",
    "SAMPLE_EVERY",
    "UNKNOWN_FUNCTION",
    "ClientStats",
    "FunctionStats",
    "MalformedRecords",
    "Sampling",
    "ServerStats",
    "live_servers",
    "malformed_records",
    "metrics_enabled",
    "publish",
    "registry_record_families",
    "withdraw",
]

# Upper bounds of the duration histograms, in seconds: 50 µs to 10 s.
BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_FIRST = BUCKETS[0]
# Busy servers time one call in SAMPLE_EVERY (see Sampling) and count the
# others as ``untimed``, without reading the clock, which is most of what
# counting costs; a LoopClient times the first result of each run it drains
# and every SAMPLE_EVERY-th after it (a power of two).
SAMPLE_EVERY = 64
BUSY = 0.001  # s: calls closer together than this are a busy server's
UNKNOWN_FUNCTION = "(unknown)"  # the label of calls to functions a server does not have
_OFF = ("0", "off", "false", "no")


def metrics_enabled(option: bool | None = None) -> bool:
    """Whether to count: ``option`` if given, else ``PYLM_METRICS`` (on by default)."""
    if option is not None:
        return option
    return os.environ.get("PYLM_METRICS", "1").strip().lower() not in _OFF


class FunctionStats:
    """Calls of one function: outcomes, durations, bytes. Written by one
    thread; the hot paths may update the fields inline (see :meth:`done`).

    ``buckets[i]`` counts the timed calls that took at most ``BUCKETS[i]``
    seconds and more than the bound before (the last one: more than every
    bound); ``untimed`` counts the calls whose duration was not read (a busy
    server times a sample of its calls: see :class:`Sampling`). The calls that succeeded are
    all calls less ``errors``.
    """

    __slots__ = ("buckets", "bytes_in", "bytes_out", "errors", "seconds", "untimed")

    def __init__(self) -> None:
        self.errors = 0
        self.seconds = 0.0
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.untimed = 0
        self.bytes_in = 0
        self.bytes_out = 0

    @property
    def calls(self) -> int:
        return sum(list(self.buckets)) + self.untimed

    @property
    def ok(self) -> int:
        return self.calls - self.errors

    def done(self, seconds: float, size_in: int, size_out: int) -> None:
        self.seconds += seconds
        self.buckets[0 if seconds <= _FIRST else bisect_left(BUCKETS, seconds)] += 1
        self.bytes_in += size_in
        self.bytes_out += size_out

    def add(self, other: FunctionStats) -> None:
        """Add ``other``'s counts (of another object with the same labels) to these."""
        errors, buckets = other.errors, list(other.buckets)  # one consistent reading
        self.errors += errors
        self.untimed += other.untimed
        self.seconds += other.seconds
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        for index, count in enumerate(buckets):
            self.buckets[index] += count

    def failed(self, seconds: float | None, size_in: int) -> None:
        """One more failed call; ``seconds`` None if it was not timed."""
        self.errors += 1
        if seconds is None:
            self.untimed += 1
        else:
            self.seconds += seconds
            self.buckets[bisect_left(BUCKETS, seconds)] += 1
        self.bytes_in += size_in


class Sampling:
    """Which calls a server times. Its loop times a call, then asks
    :meth:`untimed_next` how many calls to count without the clock before it
    times one again: none while calls come at least ``BUSY`` apart (every
    call is timed), ``SAMPLE_EVERY - 1`` while they come closer together.
    Counts stay exact either way; only the duration histogram is a sample."""

    __slots__ = ("_last", "_span", "untimed")

    def __init__(self) -> None:
        self._last = -1.0  # when the last timed call came (time.perf_counter)
        self._span = 1  # calls since the timed call before it
        # Calls still to count without the clock: the loop keeps it in a local
        # while it runs and stores it here when it pauses.
        self.untimed = 0

    def untimed_next(self) -> int:
        now = time.perf_counter()
        self._span = SAMPLE_EVERY if now - self._last < BUSY * self._span else 1
        self._last = now
        return self._span - 1


MALFORMED_REASONS = ("envelope", "head", "kind", "route", "batch", "hello", "payload", "limit")
"""Why a server dropped or refused a message (``pylm_messages_malformed_total``'s
``reason``): ``envelope``, the routing frames around it are wrong (no empty
delimiter, too many frames); ``head``, not a pylm head (too short, another magic
or version, an unknown kind, sizes that overrun it, a payload frame missing);
``kind``, a kind this port does not take; ``route``, a message in a pipeline
without a route back; ``batch``, a BATCH whose lengths overrun it; ``hello``, a
worker's hello or heartbeat with fields of the wrong type or out of range;
``payload``, a message whose payload does not parse (a stream's count);
``limit``, a message that would pass a bound of the server (input streams open).
The family has one reason more, ``handshake``: connections that ended before
their ZMTP handshake (not ZeroMQ, reset mid-greeting, a TCP probe; see
:mod:`pylm.handshakes`)."""


class ServerStats:
    """The counters of one server instance; exported while the server runs
    (between :func:`publish` and :func:`withdraw`)."""

    def __init__(
        self, name: str, kind: str, functions: tuple[str, ...], version: str, sends_to: str
    ) -> None:
        self.name = name
        self.kind = kind
        self.sends_to = sends_to  # "client" or "next": the label of what it sends
        self.version = version
        self.instance = uuid.uuid4().hex[:12]  # replaced by the registry's id once registered
        self.started = time.time()
        self.functions = {function: FunctionStats() for function in functions}
        self.functions[UNKNOWN_FUNCTION] = FunctionStats()
        self.received = 0  # messages read from the input, whatever they were
        self.malformed = 0  # ... of which did not follow the protocol
        self.malformed_by = dict.fromkeys(MALFORMED_REASONS, 0)  # ... by reason
        # Connections that ended before their handshake: counted apart (by
        # pylm.handshakes' thread), never read as messages.
        self.handshakes_failed = 0
        self.undeliverable = 0  # results dropped: their receiver took none (a last stage)
        self.sent = 0  # answers to clients, or messages on to the next stage (sends_to)
        self.ready = False
        self.registration: Registration | None = None
        self.registry: Registry | None = None
        self.dispatcher: DispatcherState | None = None  # a master's or hub's worker books

    @property
    def in_flight(self) -> int:
        """Messages read and not yet answered or passed on."""
        return max(0, self.received - self.malformed - self.sent)


class DispatcherState(Protocol):
    """What a master or hub tells of its workers and jobs (read at scrape time)."""

    @property
    def workers(self) -> int: ...
    @property
    def queued(self) -> int: ...
    @property
    def running_jobs(self) -> int: ...

    redispatched: int
    duplicates: int
    undeliverable: int


class ClientStats:
    """The calls of one client to one server, by function."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.functions: dict[str, FunctionStats] = {}
        self.timeouts: dict[str, int] = {}
        _COLLECTOR.add_client(self)

    def function(self, name: str) -> FunctionStats:
        stats = self.functions.get(name)
        if stats is None:
            if len(self.functions) >= 256:  # names come from the caller: stay bounded
                name = UNKNOWN_FUNCTION
            stats = self.functions.setdefault(name, FunctionStats())
        return stats

    def timed_out(self, function: str) -> None:
        self.timeouts[function] = self.timeouts.get(function, 0) + 1


def publish(stats: ServerStats) -> None:
    """Export ``stats`` (a server starts)."""
    _COLLECTOR.add_server(stats)


def withdraw(stats: ServerStats) -> None:
    """Stop exporting ``stats`` (a server stopped)."""
    _COLLECTOR.remove_server(stats)


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
        yield from registry_record_families()


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


# ---------------------------------------------------------------- registry records
# Records read from the registry and skipped because they do not follow the
# schema (pylm.registry.records), by reason. Process-wide, like the registry
# clients that count them; each bad record version is counted once per
# process however often it is read again.


class MalformedRecords:
    """Counts of registry records skipped, by reason (a small fixed set:
    ``pylm.registry.records.REASONS``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def declare(self, reasons: tuple[str, ...]) -> None:
        """Export these reasons from the start, at 0 (rate() needs a start)."""
        with self._lock:
            for reason in reasons:
                self._counts.setdefault(reason, 0)

    def count(self, reason: str) -> None:
        with self._lock:
            self._counts[reason] = self._counts.get(reason, 0) + 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


_MALFORMED_RECORDS = MalformedRecords()


def malformed_records() -> MalformedRecords:
    """This process's counts of registry records skipped."""
    return _MALFORMED_RECORDS


def registry_record_families() -> Iterator[Metric]:
    """``pylm_registry_records_malformed_total{reason}`` (also served by ``pylm sd``)."""
    family = CounterMetricFamily(
        "pylm_registry_records_malformed",
        "Registry records (instances, config) read and skipped because they do not follow"
        " the schema, by reason",
        labels=["reason"],
    )
    for reason, count in sorted(_MALFORMED_RECORDS.counts().items()):
        family.add_metric([reason], count)
    yield family
