"""A server's recent errors: the last :data:`RECENT` calls whose function
raised, kept by each server instance (:class:`RecentErrors`, written where
the error is shaped for the caller), served as JSON at ``/errors`` on the
process's metrics endpoint (:func:`errors_document`), and read back, parsed
into typed and bounded values, by the web console (:func:`fetch_errors`).

``/errors`` answers ``{"servers": [{"name", "instance", "errors": [{"at",
"function", "type", "message"}]}]}``, one entry per server in the process,
its errors oldest first; ``at`` is Unix time, ``message`` at most
:data:`MAX_MESSAGE` characters.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from pylm.telemetry.reading import read_url

__all__ = [
    "MAX_MESSAGE",
    "RECENT",
    "ErrorNote",
    "RecentErrors",
    "errors_document",
    "errors_url",
    "fetch_errors",
    "read_errors",
]

RECENT = 20  # errors kept per server instance
MAX_MESSAGE = 500  # characters of an error's message kept
_MAX_NAME = 200  # characters of a function's or an exception type's name kept
_MAX_BODY = 1024 * 1024  # bytes of an /errors answer read at most


@dataclass(frozen=True, slots=True)
class ErrorNote:
    """One call whose function raised: when (Unix time), which function, the
    exception's type and message."""

    at: float
    function: str
    type: str
    message: str


class RecentErrors:
    """The last :data:`RECENT` errors of one server instance. Noted by the
    serving thread (errors only: not on the path of a call that succeeds),
    read by the metrics endpoint's thread."""

    def __init__(self) -> None:
        self._notes: deque[ErrorNote] = deque(maxlen=RECENT)
        self._lock = threading.Lock()

    def note(self, function: str, type_: str, message: str) -> None:
        note = ErrorNote(
            time.time(), _text(function, _MAX_NAME), _text(type_, _MAX_NAME), _text(message)
        )
        with self._lock:
            self._notes.append(note)

    def notes(self) -> list[ErrorNote]:
        """The errors kept, oldest first."""
        with self._lock:
            return list(self._notes)


def errors_document(servers: Iterable[tuple[str, str, RecentErrors]]) -> bytes:
    """The ``/errors`` answer for the ``(name, instance, errors)`` of a process's servers."""
    return json.dumps(
        {
            "servers": [
                {"name": name, "instance": instance, "errors": [asdict(n) for n in errors.notes()]}
                for name, instance, errors in servers
            ]
        }
    ).encode()


def errors_url(metrics_url: str) -> str | None:
    """Where the process whose metrics are at ``metrics_url`` serves its
    errors (None: not a pylm metrics URL)."""
    head, slash, tail = metrics_url.rpartition("/")
    if not slash or tail != "metrics" or not head.startswith(("http://", "https://")):
        return None
    return f"{head}/errors"


def read_errors(body: bytes, name: str, instance: str) -> list[ErrorNote]:
    """The errors of server ``name``'s ``instance`` in an ``/errors``
    answer, typed and bounded; ValueError naming what does not parse."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"/errors is not JSON: {type(exc).__name__}: {exc}"[:300]) from None
    servers = document.get("servers") if isinstance(document, dict) else None
    if not isinstance(servers, list):
        raise ValueError("/errors has no list of servers")
    notes = []
    for server in servers:
        if not isinstance(server, dict):
            raise ValueError(f"/errors: a server is {type(server).__name__}, not an object")
        if server.get("name") != name or server.get("instance") != instance:
            continue
        errors = server.get("errors")
        if not isinstance(errors, list):
            raise ValueError(f"/errors: server {name!r} has no list of errors")
        notes += [_note(error) for error in errors[-RECENT:]]
    return notes


def _note(error: Any) -> ErrorNote:
    if not isinstance(error, dict):
        raise ValueError(f"/errors: an error is {type(error).__name__}, not an object")
    at = error.get("at")
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at):
        raise ValueError(f"/errors: an error's time is {at!r:.80}, not a finite number")
    texts = {}
    for key, limit in (("function", _MAX_NAME), ("type", _MAX_NAME), ("message", MAX_MESSAGE)):
        value = error.get(key)
        if not isinstance(value, str):
            raise ValueError(f"/errors: an error's {key} is {value!r:.80}, not a string")
        texts[key] = _text(value, limit)
    return ErrorNote(float(at), texts["function"], texts["type"], texts["message"])


def _text(value: str, limit: int = MAX_MESSAGE) -> str:
    """At most ``limit`` characters of ``value``, any that UTF-8 cannot
    carry (lone surrogates) replaced: what is kept can be sent as JSON."""
    return value[:limit].encode("utf-8", "replace").decode("utf-8")


def fetch_errors(metrics_url: str, name: str, instance: str, timeout: float) -> list[ErrorNote]:
    """The recent errors of server ``name``'s ``instance``, from the
    process whose metrics are at ``metrics_url``, read within about
    ``timeout`` seconds; OSError if it does not answer in time, ValueError
    if what answers is not a pylm ``/errors`` answer."""
    url = errors_url(metrics_url)
    if url is None:
        raise ValueError(f"{metrics_url!r:.200} is not a metrics URL of pylm")
    return read_errors(read_url(url, timeout, _MAX_BODY), name, instance)
