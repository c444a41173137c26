"""The cache every pylm server keeps, and the calls that reach it.

A server's cache is a dict of bytes values under text keys. The server's own
functions use it directly as ``self.cache``; other processes reach it with
requests for three functions of the server's name:

    set     payload: 2-byte big-endian key size, the key (UTF-8; empty: the
            server makes one), then the value. Answers the key.
    get     payload: the key. Answers the value, or ERROR ``unknown_key``.
    delete  payload: the key. Answers an empty payload, or ERROR ``unknown_key``.

A standalone server and a master take them on their own address as messages
of kind CACHE (:data:`pylm.protocol.CACHE`), which no function call shares,
so a server's functions may be named ``set`` or ``get``; their clients have
``set``, ``get`` and ``delete``. A chained stage takes them on its
``db_address`` (a ROUTER socket, REQ envelopes too) as REQUESTs, or CACHEs.
"""

from __future__ import annotations

import zmq

from pylm.cache_calls import CacheCalls, cache_request, encode_key, encode_set
from pylm.cache_store import DEFAULT_CACHE_LIMIT, ENTRY_BYTES, Cache
from pylm.calls import DEFAULT_TIMEOUT
from pylm.lifecycle import Closing
from pylm.security import Curve
from pylm.standalone.client import Client

__all__ = [
    "DEFAULT_CACHE_LIMIT",
    "ENTRY_BYTES",
    "Cache",
    "CacheCalls",
    "CacheClient",
    "cache_request",
    "encode_key",
    "encode_set",
]


class CacheClient(CacheCalls, Closing):
    """Reaches the cache of server ``server_name`` at ``db_address`` (a
    chained stage's cache port)."""

    def __init__(
        self,
        db_address: str,
        server_name: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        context: zmq.Context | None = None,
        curve: Curve | None = None,
    ) -> None:
        self._client = Client(
            db_address, server_name, timeout=timeout, context=context, curve=curve
        )
        self._calls = self._client._calls

    def _cache_call(self, function: str, payload: bytes, timeout: float | None) -> bytes:
        # A stage's cache port takes REQUESTs for set/get/delete.
        return self._client.job(function, payload, timeout=timeout)

    def close(self) -> None:
        self._client.close()
