"""The calls that reach a server's cache (the format is in :mod:`pylm.cache`):
the payloads of ``set``, ``get`` and ``delete``, the CACHE request that
carries them, and the three methods every client offers."""

from __future__ import annotations

import struct
import time
from typing import TYPE_CHECKING

from pylm import protocol

if TYPE_CHECKING:
    from pylm.calls import Calls

__all__ = ["KEY_SIZE", "CacheCalls", "cache_request", "encode_key", "encode_set"]

KEY_SIZE = struct.Struct(">H")  # a set payload starts with the size of its key


def encode_set(value: bytes, key: str | None = None) -> bytes:
    """The payload of a ``set`` call."""
    raw = b"" if key is None else encode_key(key)
    return KEY_SIZE.pack(len(raw)) + raw + value


def encode_key(key: object) -> bytes:
    """The payload of a ``get`` or ``delete`` call: the key, UTF-8."""
    if not isinstance(key, str):
        raise TypeError(f"cache key must be a str, got {type(key).__name__}")
    raw = key.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ValueError(f"cache key of {len(raw)} bytes is longer than 65535")
    return raw


def cache_request(
    calls: Calls, function: str, payload: bytes, timeout: float
) -> tuple[int, list[bytes]]:
    """A new message id and the frames of a CACHE request for ``function``
    (``set``, ``get`` or ``delete``) of the server ``calls`` reach."""
    msg_id = next(calls.ids)
    target = f"{calls.server_name}.{function}".encode()
    deadline = time.time() + timeout
    return msg_id, protocol.encode(protocol.CACHE, msg_id, payload, target, deadline=deadline)


class CacheCalls:
    """``set``, ``get`` and ``delete`` on the cache of the server a client
    reaches. The client supplies the one call they all make,
    :meth:`_cache_call`, and its :class:`~pylm.calls.Calls` (for the largest
    value it may send)."""

    _calls: Calls

    def set(self, value: bytes, key: str | None = None, *, timeout: float | None = None) -> str:
        """Store ``value`` in the server's cache under ``key`` (or a key the
        server makes); return the key. Over the cache's limit:
        :class:`~pylm.errors.PayloadTooLarge`."""
        protocol.check_payload(value, self._calls.max_payload)
        return self._cache_call("set", encode_set(bytes(value), key), timeout).decode("utf-8")

    def get(self, key: str, *, timeout: float | None = None) -> bytes:
        """The value under ``key`` in the server's cache;
        :class:`~pylm.errors.UnknownKey` if there is none."""
        return self._cache_call("get", encode_key(key), timeout)

    def delete(self, key: str, *, timeout: float | None = None) -> None:
        """Remove ``key`` from the server's cache;
        :class:`~pylm.errors.UnknownKey` if it is not there."""
        self._cache_call("delete", encode_key(key), timeout)

    def _cache_call(self, function: str, payload: bytes, timeout: float | None) -> bytes:
        raise NotImplementedError
