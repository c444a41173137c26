"""Reading another process's HTTP endpoint (its ``/metrics``, its
``/errors``), bounded in bytes and in time, whatever answers there: a peer
that answers a byte at a time, too much, or not HTTP at all costs the reader
its timeout, never more."""

from __future__ import annotations

import http.client
import time
import urllib.request

__all__ = ["read_url"]

_CHUNK = 64 * 1024


def read_url(url: str, timeout: float, limit: int, deadline: float | None = None) -> bytes:
    """The body at ``url``, read whole before ``deadline`` (monotonic time;
    default ``timeout`` seconds from now), each wait ``timeout`` at most;
    OSError (a TimeoutError when late) if it does not answer in time,
    ValueError if it answers over ``limit`` bytes, or not HTTP."""
    if deadline is None:
        deadline = time.monotonic() + timeout
    parts, size = [], 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            while part := answer.read1(_CHUNK):
                parts.append(part)
                size += len(part)
                if size > limit:
                    raise ValueError(f"{url} answered more than {limit} bytes")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url} did not answer whole within {timeout:g} s")
    except http.client.HTTPException as exc:  # something else than HTTP answers there
        raise ValueError(f"{url} does not answer HTTP: {exc!r:.200}") from None
    return b"".join(parts)
