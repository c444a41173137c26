"""Following a server's instances in the registry, for clients.

A client started with only a server's name connects to the instances
registered now, then keeps following the registry: instances that join are
connected, instances that leave are disconnected. ZeroMQ sockets belong to
one thread, so the registry's thread only notes the new address list; the
socket's owner applies it (:meth:`Peers.apply`) at a moment of its choosing,
typically before its next call (one attribute check per call).

While a new version rolls out, the instances of one name may differ in
functions (``rolling=True``): :meth:`Peers.serving` then names the
instances that have a function only some of them have, and the client
sends its calls there only (:meth:`pylm.calls.Caller._socket_for`).

A client looks its server up once, when it is made: it waits up to
``wait`` seconds (:data:`DEFAULT_WAIT`, 1 s) for a first instance, so that a
client started just before its server finds it, and a name with no instance
fails fast (:class:`~pylm.errors.NoInstance`) instead of after a call's
timeout. Pass a longer ``wait`` to a client launched together with its
servers.

An empty listing later on (every instance gone, or records expired during an
etcd outage) leaves the connections as they are: the instances may well be
alive and registering again, and a call then fails by its timeout as it
would have.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import TYPE_CHECKING

import zmq

if TYPE_CHECKING:
    from pylm.registry import InstanceRecord, Registry

__all__ = ["DEFAULT_WAIT", "Peers", "check_wait"]

log = logging.getLogger("pylm.discovery")

DEFAULT_WAIT = 1.0
"""Seconds a client made with only a server's name waits for a first instance."""


def check_wait(wait: object) -> float:
    """A wait in seconds: a non-negative int or float (0: look once)."""
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not wait >= 0:
        raise ValueError(f"wait must be a non-negative number of seconds, got {wait!r}")
    return float(wait)


class Peers:
    """The ``role`` endpoints (``"rep"``, ``"pull"``, ``"push"``) of the
    instances of server ``name``, starting from ``records``; with ``follow``
    kept current from ``registry``."""

    def __init__(
        self,
        registry: Registry,
        name: str,
        role: str,
        records: list[InstanceRecord],
        *,
        follow: bool = True,
    ) -> None:
        self.name = name
        self.role = role
        self.endpoints = self._endpoints_of(records)
        # The functions of each endpoint's instance, and whether they differ.
        self.functions = self._functions_of(records)
        self.partial = _partial(self.functions)
        # The functions every instance marks idempotent: a call of one may be sent again.
        self.idempotent = _idempotent(records)
        self._latest_idempotent = self.idempotent
        self._latest = self.endpoints
        self._latest_functions = self.functions
        self._news: list[str] | None = None
        self._news_functions = self.functions
        self._lock = threading.Lock()
        self._following: concurrent.futures.Future[None] | None = None
        if follow:
            self._following = registry.follow(name, self._on_instances)

    @property
    def changed(self) -> bool:
        """Whether the registry lists other instances than those connected."""
        return self._news is not None

    def _endpoints_of(self, records: list[InstanceRecord]) -> list[str]:
        return [record.endpoints[self.role] for record in records if self.role in record.endpoints]

    def _functions_of(self, records: list[InstanceRecord]) -> dict[str, frozenset[str]]:
        return {
            record.endpoints[self.role]: frozenset(record.functions)
            for record in records
            if self.role in record.endpoints
        }

    def serving(self, function: str) -> tuple[str, ...] | None:
        """The endpoints of the instances that have ``function``, when only
        some of them have it; None when all have it, or none (any instance
        then answers, if only with ``UnknownFunction``)."""
        having = tuple(e for e in self.endpoints if function in self.functions.get(e, ()))
        return having if having and len(having) < len(self.endpoints) else None

    def _on_instances(self, records: list[InstanceRecord]) -> None:
        """From the registry's thread: note the new address list."""
        endpoints = self._endpoints_of(records)
        functions = self._functions_of(records)
        idempotent = _idempotent(records)
        with self._lock:
            if endpoints and (
                endpoints != self._latest
                or functions != self._latest_functions
                or idempotent != self._latest_idempotent
            ):
                self._latest = endpoints
                self._latest_functions = functions
                self._latest_idempotent = idempotent
                self._news = endpoints
                self._news_functions = functions

    def leaving(self, endpoints: list[str]) -> bool:
        """Whether the registry's latest list lacks some of ``endpoints``
        (instances left since they were applied)."""
        with self._lock:
            news = self._news
        return news is not None and any(endpoint not in news for endpoint in endpoints)

    def take(self) -> tuple[list[str], list[str]]:
        """The endpoints that joined and those that left since the last
        call; :attr:`endpoints` becomes the registry's list."""
        with self._lock:
            news, self._news = self._news, None
            functions = self._news_functions
            idempotent = self._latest_idempotent
        if news is None:
            return [], []
        self.functions = functions
        self.idempotent = idempotent
        self.partial = _partial(functions)
        joined = [endpoint for endpoint in news if endpoint not in self.endpoints]
        left = [endpoint for endpoint in self.endpoints if endpoint not in news]
        self.endpoints = news
        if joined or left:
            log.info("%s instances: +%s -%s", self.name, joined, left)
        return joined, left

    def apply(self, socket: zmq.Socket) -> tuple[list[str], list[str]]:
        """Connect ``socket`` to the instances that joined and disconnect it
        from those that left; returns (joined, left)."""
        joined, left = self.take()
        for endpoint in left:
            try:
                socket.disconnect(endpoint)
            except zmq.ZMQError as exc:  # never connected (it failed): nothing to undo
                log.debug("disconnecting %s from %s: %s", self.name, endpoint, exc)
        for endpoint in joined:
            try:
                socket.connect(endpoint)
            except zmq.ZMQError as exc:  # parsed records make this rare: never fatal
                log.warning("cannot connect to %s instance %s: %s", self.name, endpoint, exc)
        return joined, left

    def close(self) -> None:
        """Stop following (the registry client itself is the caller's)."""
        following, self._following = self._following, None
        if following is not None:
            following.cancel()


def _idempotent(records: list[InstanceRecord]) -> frozenset[str]:
    """The functions every one of ``records`` marks idempotent."""
    if not records:
        return frozenset()
    return frozenset.intersection(*(frozenset(record.idempotent) for record in records))


def _partial(functions: dict[str, frozenset[str]]) -> bool:
    """Whether the instances differ in functions (a version rolling out)."""
    return len(set(functions.values())) > 1
