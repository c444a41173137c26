"""The cache every pylm server keeps (the format of the calls that reach it
is in :mod:`pylm.cache`)."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator, MutableMapping

from pylm import protocol
from pylm.cache_calls import KEY_SIZE
from pylm.errors import (
    PayloadTooLarge,
    ProtocolError,
    PylmError,
    UnknownFunction,
    UnknownKey,
    UnknownServer,
)

__all__ = ["DEFAULT_CACHE_LIMIT", "ENTRY_BYTES", "Cache"]

DEFAULT_CACHE_LIMIT = 256 * 1024 * 1024
"""Bytes a server's cache takes from other processes, at most (see Cache.size)."""
ENTRY_BYTES = 160
"""What Python spends on a cache entry besides its key's and value's bytes
(the str and bytes objects, the dict's slot), counted against the limit:
300,000 empty values under short keys take about 24 MB."""


class Cache(MutableMapping[str, bytes]):
    """A server's cache: a mapping of text keys to bytes that also answers
    cache requests.

    ``limit``: the bytes of keys and values that ``set`` requests from other
    processes may make it hold; past it they get ``PayloadTooLarge`` and the
    cache stays as it is. The server's own functions are not limited."""

    def __init__(self, server: str, limit: int = DEFAULT_CACHE_LIMIT) -> None:
        self.server = server
        self.limit = limit
        self._prefix = server.encode("utf-8") + b"."
        self._items: dict[str, bytes] = {}
        self._bytes = 0  # of keys and values held, kept as they change
        self._lock = threading.Lock()  # functions run in a server's threads may write too

    def __getitem__(self, key: str) -> bytes:
        return self._items[key]

    def __setitem__(self, key: str, value: bytes) -> None:
        with self._lock:
            old = self._items.get(key)
            self._items[key] = value
            self._bytes += len(value) + (len(key) + ENTRY_BYTES if old is None else -len(old))

    def __delitem__(self, key: str) -> None:
        with self._lock:
            value = self._items.pop(key)
            self._bytes -= len(key) + len(value) + ENTRY_BYTES

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"<Cache of {self.server!r}: {len(self)} keys, {self._bytes} bytes>"

    def answer(self, message: protocol.Message) -> list[bytes]:
        """The answer to one decoded cache request (a CACHE, or a REQUEST or
        PING on a stage's ``db_address``); raises :class:`ProtocolError` for
        a request that does not follow the protocol (another kind, a target
        not ``server.function``, a key that is not UTF-8, a ``set`` without
        its key size), which the server counts before it answers it."""
        if message.kind == protocol.PING:
            info = json.dumps({"name": self.server, "kind": "cache"}).encode("utf-8")
            return protocol.encode(protocol.PONG, message.msg_id, info)
        if message.kind != protocol.REQUEST and message.kind != protocol.CACHE:
            raise ProtocolError(f"the cache of {self.server!r} takes CACHE, REQUEST and PING")
        try:
            result = self._run(message.target, message.payload)
        except ProtocolError:
            raise
        except PylmError as error:
            return protocol.encode_error(message.msg_id, error)
        return protocol.encode(protocol.REPLY, message.msg_id, result)

    def size(self) -> int:
        """Bytes the keys and values take, with what Python spends on each
        entry besides them (ENTRY_BYTES)."""
        return self._bytes

    def _run(self, target: bytes, payload: bytes) -> bytes:
        server, function = protocol.split_target(target)
        if server != self.server:
            raise UnknownServer(
                f"cache request for server {server!r} reached the cache of {self.server!r}",
                server=server,
                function=function,
            )
        if function == "set":
            start = KEY_SIZE.size
            if len(payload) < start:
                raise ProtocolError("cache set without a key size")
            (size,) = KEY_SIZE.unpack_from(payload)
            end = start + size
            if end > len(payload):
                raise ProtocolError(
                    f"cache set claims a key of {size} bytes in a payload of {len(payload)}"
                )
            key = self._key(payload[start:end]) if size else uuid.uuid4().hex
            value = payload[end:]
            old = self.get(key)
            held = self.size() - (0 if old is None else len(key) + len(old) + ENTRY_BYTES)
            if held + len(key) + len(value) + ENTRY_BYTES > self.limit:
                raise PayloadTooLarge(
                    f"the cache of server {self.server!r} holds {held} bytes: {len(value)}"
                    f" more for key {key[:80]!r} would pass its limit of {self.limit}",
                    size=len(value),
                    limit=max(0, self.limit - held),
                )
            self[key] = value
            return key.encode("utf-8")
        if function in ("get", "delete"):
            key = self._key(payload)
            if key not in self:
                raise UnknownKey(
                    f"no key {key!r} in the cache of server {self.server!r}",
                    server=self.server,
                    key=key,
                )
            if function == "get":
                return self[key]
            del self[key]
            return b""
        raise UnknownFunction(
            f"unknown cache function {function!r} on server {self.server!r};"
            " it has set, get, delete",
            server=self.server,
            function=function,
        )

    def _key(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"cache key is not UTF-8: {raw[:80]!r}") from None
