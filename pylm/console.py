"""The web console of a cluster, served by the gateway at ``/``: a live
graph of the registered servers (a node per server with its kind,
instances, calls/s, errors/s, p99 and the instances its peers cannot reach;
an edge per next stage, branch and tee), and a server's details on a click:
its instances and their last errors.

The page (``console.html``, no outside assets) reads ``/console/cluster.json``
once, then follows ``/console/events``: server-sent events, one view a
second and at once when the registry changes. A view is made from the
registry's listing and from each instance's own ``/metrics`` (as ``pylm
top`` reads them), rates over the time since the view before. A server's
recent errors (``/console/errors/<server>``) come from its instances'
processes (``/errors`` beside their ``/metrics``), asked when a page shows
that server.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pylm.registry import InstanceRecord, Registry
from pylm.registry.graph import graph
from pylm.telemetry import top
from pylm.telemetry.recent import RECENT, fetch_errors

__all__ = ["FRESH", "PAGE", "Views"]

PAGE = Path(__file__).with_name("console.html")
FRESH = 0.5  # s a view serves every page that asks (a view reads every instance's metrics)


class Views:
    """Views of the cluster for the console, each with the rates since the
    one before it (``records``: the registry's latest listing)."""

    def __init__(self, registry: Registry, records: Callable[[], list[InstanceRecord]]) -> None:
        self.registry = registry
        self._records = records
        self._before: dict[str, top.Snapshot] = {}
        self._at = 0.0
        self._lock = threading.Lock()  # views are made in the gateway's executor threads
        self._last: tuple[float, dict[str, Any]] | None = None

    def view(self) -> dict[str, Any]:
        """The cluster now (blocking: reads every instance's metrics); one
        view serves every page that asks within :data:`FRESH` seconds."""
        with self._lock:
            if self._last is not None and time.monotonic() - self._last[0] < FRESH:
                return self._last[1]
            view = self._make()
            self._last = (time.monotonic(), view)
            return view

    def _make(self) -> dict[str, Any]:
        records = self._records()
        texts, answered = top.fetch(
            (record.metrics for record in records if record.metrics), timeout=1.0
        )
        now, after = time.monotonic(), top.snapshot(texts)
        seconds = now - self._at if self._at and now - self._at >= 0.2 else 0.0
        rows = {
            row.server: row
            for row in top.rows(
                records, self._before, after, seconds, answered, top.unreachable(texts)
            )
        }
        self._before, self._at = after, now
        try:
            leases = self.registry.leases_left()
        except Exception:  # etcd out of reach: the view goes on without leases
            leases = {}
        cluster = graph(records)
        by_name: dict[str, list[InstanceRecord]] = {}
        for record in records:
            by_name.setdefault(record.name, []).append(record)
        nodes = []
        for node in cluster.nodes:
            row = rows.get(node.name)
            group = by_name.get(node.name, [])
            nodes.append(
                {
                    **dataclasses.asdict(node),
                    "calls_per_second": None if row is None else row.calls_per_second,
                    "errors_per_second": None if row is None else row.errors_per_second,
                    "p99": None if row is None else row.p99,
                    "unreachable": 0 if row is None else row.unreachable,
                    "functions": sorted({f for record in group for f in record.functions}),
                    "members": [
                        {
                            "instance": record.instance,
                            "host": record.host,
                            "pid": record.pid,
                            "endpoints": record.endpoints,
                            "metrics": record.metrics,
                            "lease_left": leases.get(record.instance),
                        }
                        for record in group
                    ],
                }
            )
        return {
            "cluster": self.registry.config.cluster,
            "nodes": nodes,
            "edges": [dataclasses.asdict(edge) for edge in cluster.edges],
        }

    def errors(self, server: str) -> dict[str, Any]:
        """The last errors of ``server``'s instances, newest first, and the
        instances whose process did not tell (blocking: asks each, 1 s at most)."""
        group = [record for record in self._records() if record.name == server]
        notes: list[dict[str, Any]] = []
        unanswered = []
        with concurrent.futures.ThreadPoolExecutor(max(1, min(8, len(group)))) as pool:
            asked = {
                record.instance: pool.submit(
                    fetch_errors, record.metrics, server, record.instance, 1.0
                )
                for record in group
                if record.metrics
            }
            for instance, future in asked.items():
                try:
                    found = future.result()
                except (OSError, ValueError):
                    unanswered.append(instance)
                    continue
                notes += [{"instance": instance, **dataclasses.asdict(n)} for n in found]
        unanswered += [record.instance for record in group if not record.metrics]
        notes.sort(key=lambda note: note["at"], reverse=True)
        return {"server": server, "errors": notes[:RECENT], "unanswered": sorted(unanswered)}

    def event(self) -> str:
        """:meth:`view` as one server-sent event."""
        return f"data: {json.dumps(self.view(), separators=(',', ':'))}\n\n"
