"""``pylm top``: the cluster at a glance, read from the servers' own
``/metrics`` (no Prometheus needed).

Every few seconds it lists the registered instances, reads the metrics
endpoint of each process once, and shows per server: instances, next stage,
calls per second, errors per second, latency quantiles over the interval
(from the histogram buckets' increase) and messages in flight, and how many
of its instances their peers cannot reach (:func:`unreachable`: a sender
whose connection to an instance dropped or failed says so in its metrics,
while the instance's lease may still run). Its first view comes at once,
before the first interval, without the rates.
"""

from __future__ import annotations

import concurrent.futures
import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from pylm.registry import InstanceRecord
from pylm.telemetry.reading import read_url

__all__ = [
    "FETCHING",
    "MAX_TEXT",
    "Row",
    "Snapshot",
    "fetch",
    "quantile",
    "render",
    "rows",
    "snapshot",
    "unreachable",
    "unreachable_instances",
]

# The families in which senders name the peers they cannot reach.
_UNREACHABLE = ("pylm_peer_unreachable", "pylm_client_peer_unreachable")
FETCHING = 16  # /metrics read at once
MAX_TEXT = 16 * 1024 * 1024  # bytes of one /metrics text read at most


@dataclass
class Snapshot:
    """Counters of one server name, added up over the endpoints read."""

    calls: float = 0.0
    errors: float = 0.0
    in_flight: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative count


@dataclass
class Row:
    server: str
    kind: str
    instances: int
    next: str
    calls_per_second: float | None  # None: not measured yet (the first view)
    errors_per_second: float | None
    p50: float | None
    p99: float | None
    in_flight: float
    reachable: int  # endpoints read / endpoints listed
    unreachable: int = 0  # instances some peer reports it cannot reach


def snapshot(texts: Iterable[str]) -> dict[str, Snapshot]:
    """Parse /metrics texts into a snapshot per server name."""
    found: dict[str, Snapshot] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                server = sample.labels.get("server")
                if server is None:
                    continue
                entry = found.setdefault(server, Snapshot())
                if sample.name == "pylm_calls_total":
                    entry.calls += sample.value
                    if sample.labels.get("outcome") == "error":
                        entry.errors += sample.value
                elif sample.name == "pylm_in_flight_messages":
                    entry.in_flight += sample.value
                elif sample.name == "pylm_call_duration_seconds_bucket":
                    bound = float(sample.labels["le"])
                    entry.buckets[bound] = entry.buckets.get(bound, 0.0) + sample.value
    return found


def unreachable(texts: Iterable[str]) -> Counter[str]:
    """The peer addresses that senders report they cannot reach, in
    /metrics texts: how many processes report each."""
    found: Counter[str] = Counter()
    for text in texts:
        reported: set[str] = set()
        for family in text_string_to_metric_families(text):
            if family.name in _UNREACHABLE:
                reported.update(s.labels["peer"] for s in family.samples if "peer" in s.labels)
        found.update(reported)
    return found


def unreachable_instances(
    records: Iterable[InstanceRecord], reports: Mapping[str, int]
) -> dict[str, int]:
    """The instances (by instance id) that ``reports`` (of
    :func:`unreachable`) name one of the addresses of: how many processes
    report it."""
    found: dict[str, int] = {}
    for record in records:
        count = max((reports.get(address, 0) for address in record.endpoints.values()), default=0)
        if count:
            found[record.instance] = count
    return found


def quantile(q: float, increase: dict[float, float]) -> float | None:
    """The ``q`` quantile of cumulative bucket increases, interpolated within
    a bucket as Prometheus' histogram_quantile does; None without data."""
    bounds = sorted(increase)
    if not bounds or increase[bounds[-1]] <= 0:
        return None
    rank = q * increase[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = increase[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower


def rows(
    records: list[InstanceRecord],
    before: dict[str, Snapshot],
    after: dict[str, Snapshot],
    seconds: float,
    endpoints_read: dict[str, bool],
    reports: Mapping[str, int] | None = None,
) -> list[Row]:
    """One row per registered server name, with rates between two snapshots
    ``seconds`` apart (none when ``seconds`` is 0: a first view), and the
    instances that ``reports`` (of :func:`unreachable`) say peers cannot reach."""
    lost = unreachable_instances(records, reports or {})
    by_name: dict[str, list[InstanceRecord]] = {}
    for record in records:
        by_name.setdefault(record.name, []).append(record)
    table = []
    for name, group in sorted(by_name.items()):
        old, new = before.get(name, Snapshot()), after.get(name, Snapshot())
        increase = {
            bound: max(0.0, count - old.buckets.get(bound, 0.0))
            for bound, count in new.buckets.items()
        }
        urls = {record.metrics for record in group if record.metrics}
        table.append(
            Row(
                server=name,
                kind=group[0].kind,
                instances=len(group),
                next=next((record.next for record in group if record.next), None) or "",
                calls_per_second=max(0.0, new.calls - old.calls) / seconds if seconds else None,
                errors_per_second=max(0.0, new.errors - old.errors) / seconds if seconds else None,
                p50=quantile(0.5, increase) if seconds else None,
                p99=quantile(0.99, increase) if seconds else None,
                in_flight=new.in_flight,
                reachable=sum(endpoints_read.get(url, False) for url in urls),
                unreachable=sum(record.instance in lost for record in group),
            )
        )
    return table


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f}µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f}ms"
    return f"{seconds:.2f}s"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render(table: list[Row], cluster: str, seconds: float, *, measured: bool = True) -> str:
    """The rows as a text table, their rates measured over ``seconds``
    (not ``measured``: a first view, the rates to come after ``seconds``)."""
    header = (
        f"{'SERVER':<20} {'KIND':<13} {'INST':>4} {'NEXT':<16} {'CALLS/S':>9} {'ERR/S':>7}"
        f" {'P50':>8} {'P99':>8} {'IN-FLIGHT':>9}"
    )
    rates = f"rates over {seconds:.1f} s" if measured else f"rates in {seconds:.1f} s"
    lines = [f"pylm top: cluster {cluster!r}, {rates}", "", header]
    for row in table:
        unread = "" if row.reachable else "  (metrics unreachable)"
        if row.unreachable:
            unread += f"  ({row.unreachable} unreachable from peers)"
        lines.append(
            f"{row.server:<20} {row.kind:<13} {row.instances:>4} {row.next:<16}"
            f" {_rate(row.calls_per_second):>9} {_rate(row.errors_per_second):>7}"
            f" {_duration(row.p50):>8} {_duration(row.p99):>8} {row.in_flight:>9.0f}{unread}"
        )
    if not table:
        lines.append("(no server registered)")
    return "\n".join(lines)


def fetch(urls: Iterable[str], timeout: float = 2.0) -> tuple[list[str], dict[str, bool]]:
    """The /metrics texts of ``urls``, and which ones answered, within
    about ``timeout`` seconds in all: asked at once (:data:`FETCHING` at a
    time), so that instances that do not answer cost the timeout once, not
    once each. No answer whole in time, over :data:`MAX_TEXT` bytes, or not
    HTTP: no answer (a thread still reading it is left to end by itself)."""
    unique = sorted(set(urls))
    if not unique:
        return [], {}
    deadline = time.monotonic() + timeout
    pool = concurrent.futures.ThreadPoolExecutor(min(FETCHING, len(unique)), "pylm-fetch")
    try:
        asked = {url: pool.submit(_read, url, timeout, deadline) for url in unique}
        concurrent.futures.wait(asked.values(), timeout=timeout + 0.5)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    texts, answered = [], {}
    for url, future in asked.items():
        text = future.result() if future.done() and not future.cancelled() else None
        answered[url] = text is not None
        if text is not None:
            texts.append(text)
    return texts, answered


def _read(url: str, timeout: float, deadline: float) -> str | None:
    """The text at ``url`` if it comes whole before ``deadline``; None if not."""
    try:
        return read_url(url, timeout, MAX_TEXT, deadline).decode("utf-8", "replace")
    except (OSError, ValueError):
        return None  # no answer, not in time, too long, or not HTTP
