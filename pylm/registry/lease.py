"""One etcd lease shared by the registrations of a Registry with one TTL.

Every server of a process that registers through one
:class:`~pylm.registry.Registry` with the same TTL puts its record under the
same lease, kept alive by one task: one keep-alive every ``ttl / 3`` seconds
per process, not one per server (300 servers, 25 to a process, make 12
keep-alives per period instead of 300). The records of a process that dies
expire together, as they would one by one. When the lease is lost (etcd
unreachable for longer than the TTL, or restarted without it), the task
grants a new one and puts every record under it again.

Everything here runs on the registry's event loop; an :class:`asyncio.Lock`
keeps a keep-alive round, a record joining and one leaving from
interleaving. The registry gives :class:`Leases` the one way it reaches etcd
(an :data:`Etcd` callable) and its records as :class:`Member` objects; this
module knows nothing else of it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from pylm.errors import RegistryError
from pylm.registry.etcd import closed_under_us

if TYPE_CHECKING:
    import aetcd

    from pylm.registry.records import InstanceRecord

__all__ = ["RETRY", "Etcd", "Leases", "Member", "SharedLease"]

log = logging.getLogger("pylm.registry")

RETRY = 0.5  # seconds between attempts to register again while etcd is unreachable

Etcd = Callable[[Callable[["aetcd.Client"], Awaitable[Any]]], Awaitable[Any]]
"""Runs ``operation(client)`` on an etcd endpoint that answers; raises
:class:`RegistryError` when none does (:meth:`pylm.registry.Registry._etcd`)."""


class Member(Protocol):
    """A record kept under a lease (:class:`pylm.registry.Registration`)."""

    key: str
    record: InstanceRecord
    registered: bool  # whether etcd holds the record, as far as we know: set here
    failures: int  # keep-alive rounds that could not reach etcd: counted here


class Leases:
    """The shared leases of one registry, one per TTL."""

    def __init__(self, etcd: Etcd) -> None:
        self._etcd = etcd
        self._by_ttl: dict[float, SharedLease] = {}

    async def join(self, member: Member, ttl: float) -> SharedLease:
        """Put ``member``'s record under the lease of ``ttl`` seconds (see
        :meth:`SharedLease.join`); the lease, for ``member`` to leave."""
        lease = self._by_ttl.get(ttl)
        if lease is None:
            lease = self._by_ttl[ttl] = SharedLease(self._etcd, ttl, self._by_ttl)
        await lease.join(member)
        return lease


class SharedLease:
    """The lease of ``ttl`` seconds the records in ``members`` share; it
    leaves ``leases`` when its last member does."""

    def __init__(self, etcd: Etcd, ttl: float, leases: dict[float, SharedLease]) -> None:
        self._etcd = etcd
        self._leases = leases
        self.ttl = ttl
        self.members: list[Member] = []
        self.lease: Any = None  # aetcd's Lease, while granted
        self.alive = False  # whether etcd holds the lease, as far as we know
        self.stale: list[Member] = []  # members whose changed record etcd may not have
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def join(self, registration: Member) -> None:
        """Put ``registration``'s record under the lease (granted first if
        need be); raises :class:`RegistryError` if etcd cannot be reached."""
        async with self._lock:
            if not self.alive:
                await self._grant()
            await self._put(registration)
            self.members.append(registration)
            if self._task is None:
                self._task = asyncio.get_running_loop().create_task(self._keep_alive())

    async def leave(self, registration: Member) -> None:
        """Remove ``registration``'s record; the last to leave revokes the lease."""
        async with self._lock:
            if registration in self.members:
                self.members.remove(registration)
            if registration in self.stale:
                self.stale.remove(registration)
            registration.registered = False
            last = not self.members
            if last:
                self._leases.pop(self.ttl, None)
                task, self._task = self._task, None
                if task is not None:
                    task.cancel()
            key = registration.key.encode()
            lease = None  # to revoke: the last one out takes the lease with it
            if last:
                lease, self.alive = (self.lease if self.alive else None), False

            async def remove(client: aetcd.Client) -> None:
                await client.delete(key)
                if lease is not None:
                    try:
                        await client.revoke_lease(lease.id)
                    except Exception as exc:  # expired already: nothing to revoke
                        log.debug("lease %x not revoked: %r", lease.id, exc)

            await self._etcd(remove)

    async def rewrite(self, registration: Member) -> None:
        """Write ``registration``'s record again (it changed), if the lease
        lives; otherwise the next round registers it as it is now. If etcd
        cannot take it now, raises :class:`RegistryError`, and every
        keep-alive round writes it again until etcd has it."""
        async with self._lock:
            if self.alive and registration in self.members:
                try:
                    await self._put(registration)
                except RegistryError as exc:
                    if registration not in self.stale:
                        self.stale.append(registration)
                    log.warning(
                        "%s changed, but etcd did not take it (%s): written again at the next"
                        " keep-alive",
                        registration.key,
                        exc,
                    )
                    raise
                if registration in self.stale:
                    self.stale.remove(registration)

    async def _grant(self) -> None:
        ttl = round(self.ttl)
        self.lease = await self._etcd(lambda client: client.lease(ttl))
        self.alive = True

    async def _put(self, registration: Member) -> None:
        key, value, lease = registration.key.encode(), registration.record.to_json(), self.lease
        await self._etcd(lambda client: client.put(key, value, lease=lease))
        registration.registered = True

    async def _keep_alive(self) -> None:
        clock = asyncio.get_running_loop().time
        due = clock()
        while True:
            # Every ttl/3 from the last round's start, not from its end (a slow
            # round must not stretch the period); once lost, try again often:
            # back within RETRY of etcd's return.
            period = self.ttl / 3 if self.alive else min(self.ttl / 3, RETRY)
            due = max(due + period, clock())
            await asyncio.sleep(due - clock())
            async with self._lock:
                await self._round()

    async def _round(self) -> None:
        try:
            if self.alive:
                # With the client _etcd gives (the endpoint that answers now), not
                # the one the lease was made with (Lease.refresh): that one may be
                # a member that is down, or a client closed since.
                lease_id = self.lease.id
                response = await self._etcd(lambda client: client.refresh_lease(lease_id))
                if response.TTL <= 0:
                    self._lost()  # expired meanwhile: a new lease, the records again
                while self.alive and self.stale:  # changed records etcd did not take
                    member = self.stale[0]
                    try:
                        await self._put(member)
                    except RegistryError as exc:  # the lease lives: the next round tries again
                        log.debug("%s not written again yet: %s", member.key, exc)
                        break
                    self.stale.remove(member)
                    log.info("%s written again as it is now", member.key)
            if not self.alive:
                await self._grant()
                for member in self.members:
                    await self._put(member)
                    log.info("%s registered again", member.key)
        except RegistryError as exc:  # unreachable or refusing: keep trying, never give up
            self._lost(exc)
        except (Exception, asyncio.CancelledError) as exc:  # nothing else ends it either
            if isinstance(exc, asyncio.CancelledError) and not closed_under_us():
                raise  # stopped: the only way out
            log.warning("keep-alive of %d record(s) failed: %r", len(self.members), exc)
            self._lost(exc)

    def _lost(self, error: BaseException | None = None) -> None:
        """The lease is gone (``error``: etcd could not be reached, or failed)."""
        self.alive = False
        self.stale.clear()  # all of them are put again, as they are now
        for member in self.members:
            if error is not None:
                member.failures += 1
                if member.registered and isinstance(error, RegistryError):
                    log.warning("registry unavailable, %s may expire: %s", member.key, error)
            member.registered = False
