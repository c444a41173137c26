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
interleaving.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from pylm.errors import RegistryError

if TYPE_CHECKING:
    import aetcd

    from pylm.registry.client import Registration, Registry

__all__ = ["RETRY", "SharedLease", "closed_under_us"]

log = logging.getLogger("pylm.registry")

RETRY = 0.5  # seconds between attempts to register again while etcd is unreachable


def closed_under_us() -> bool:
    """Whether a ``CancelledError`` just caught comes from grpc (a call whose
    channel another task closed), not from cancelling the current task."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


class SharedLease:
    """The lease of ``ttl`` seconds the registrations in ``members`` share."""

    def __init__(self, registry: Registry, ttl: float) -> None:
        self.registry = registry
        self.ttl = ttl
        self.members: list[Registration] = []
        self.lease: Any = None  # aetcd's Lease, while granted
        self.alive = False  # whether etcd holds the lease, as far as we know
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def join(self, registration: Registration) -> None:
        """Put ``registration``'s record under the lease (granted first if
        need be); raises :class:`RegistryError` if etcd cannot be reached."""
        async with self._lock:
            if not self.alive:
                await self._grant()
            await self._put(registration)
            self.members.append(registration)
            if self._task is None:
                self._task = asyncio.get_running_loop().create_task(self._keep_alive())

    async def leave(self, registration: Registration) -> None:
        """Remove ``registration``'s record; the last to leave revokes the lease."""
        async with self._lock:
            if registration in self.members:
                self.members.remove(registration)
            registration.registered = False
            last = not self.members
            if last:
                self.registry._leases.pop(self.ttl, None)
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

            await self.registry._etcd(remove)

    async def _grant(self) -> None:
        ttl = round(self.ttl)
        self.lease = await self.registry._etcd(lambda client: client.lease(ttl))
        self.alive = True

    async def _put(self, registration: Registration) -> None:
        key, value, lease = registration.key.encode(), registration.record.to_json(), self.lease
        await self.registry._etcd(lambda client: client.put(key, value, lease=lease))
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
                response = await self.registry._etcd(lambda client: client.refresh_lease(lease_id))
                if response.TTL <= 0:
                    self._lost()  # expired meanwhile: a new lease, the records again
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
        for member in self.members:
            if error is not None:
                member.failures += 1
                if member.registered and isinstance(error, RegistryError):
                    log.warning("registry unavailable, %s may expire: %s", member.key, error)
            member.registered = False
