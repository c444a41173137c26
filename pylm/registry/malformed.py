"""Reading records from etcd rows: parsed through the schema, or skipped,
counted and logged.

A record that does not follow the schema (:mod:`pylm.registry.records`) is
left out of every listing. Each version of such a key (its key and etcd's
``mod_revision``) is counted once per process in
``pylm_registry_records_malformed_total{reason}`` however often it is read
again (a follower re-lists, ``pylm top`` polls), and logged at most about
once a second per reason, with the number of lines held back since.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

from pylm.logs import RateLimiter
from pylm.registry.records import REASONS, InstanceRecord, MalformedRecord, StageConfig
from pylm.telemetry.exposition import read_record_counts_from

_Record = TypeVar("_Record")

__all__ = [
    "MalformedRecords",
    "malformed_records",
    "parse_config_row",
    "parse_instance_row",
    "skip",
]

log = logging.getLogger("pylm.registry")

_SEEN_LIMIT = 4096  # bad key versions remembered, so a re-read is not counted again

_lock = threading.Lock()
_seen: OrderedDict[tuple[bytes, int], None] = OrderedDict()
_limiters = {reason: RateLimiter(1.0) for reason in REASONS}


class MalformedRecords:
    """Counts of registry records skipped, by reason (a small fixed set:
    :data:`pylm.registry.records.REASONS`). Process-wide, like the registry
    clients that count them."""

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
_MALFORMED_RECORDS.declare(REASONS)
read_record_counts_from(_MALFORMED_RECORDS.counts)


def malformed_records() -> MalformedRecords:
    """This process's counts of registry records skipped."""
    return _MALFORMED_RECORDS


def skip(row: Any, error: MalformedRecord) -> None:
    """Count (once per key version) and log (rate-limited) a record skipped."""
    key: bytes = bytes(row.key)
    seen = (key, int(getattr(row, "mod_revision", 0)))
    with _lock:
        if seen in _seen:
            return
        _seen[seen] = None
        if len(_seen) > _SEEN_LIMIT:
            _seen.popitem(last=False)
        limiter = _limiters[error.reason]
        allowed = limiter.allow()
        held = limiter.take_suppressed() if allowed else 0
    _MALFORMED_RECORDS.count(error.reason)
    if allowed:
        more = f" ({held} more skipped for this reason since the last such line)" if held else ""
        log.warning(
            "skipping malformed registry record %s: %s%s",
            key[:300].decode("utf-8", "replace"),
            error,
            more,
        )


def parse_instance_row(row: Any) -> InstanceRecord | None:
    """The instance record an etcd key-value holds; None (counted, logged) if malformed."""
    return _parse_row(InstanceRecord.from_json, row)


def parse_config_row(row: Any) -> StageConfig | None:
    """The stage config an etcd key-value holds; None (counted, logged) if malformed."""
    return _parse_row(StageConfig.from_json, row)


def _parse_row(parse: Callable[[bytes, bytes], _Record], row: Any) -> _Record | None:
    try:
        return parse(row.value, row.key)
    except MalformedRecord as exc:
        skip(row, exc)
        return None
