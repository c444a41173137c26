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
from pylm.telemetry.counting import malformed_records

_Record = TypeVar("_Record")

__all__ = ["parse_config_row", "parse_instance_row", "skip"]

log = logging.getLogger("pylm.registry")

_SEEN_LIMIT = 4096  # bad key versions remembered, so a re-read is not counted again

_lock = threading.Lock()
_seen: OrderedDict[tuple[bytes, int], None] = OrderedDict()
_limiters = {reason: RateLimiter(1.0) for reason in REASONS}
malformed_records().declare(REASONS)


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
    malformed_records().count(error.reason)
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
