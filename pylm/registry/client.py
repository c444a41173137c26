"""The registry client: etcd (through aetcd) on an asyncio loop in a thread
the client owns, behind a blocking API that servers and tools call.

A registration lives under a lease, refreshed every third of its TTL. When
etcd cannot be reached the client keeps trying, without end, and puts the
record back (under a new lease if the old one expired) as soon as it can.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import shlex
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import aetcd

from pylm.errors import NoInstance, RegistryAccessDenied, RegistryError, RegistryUnavailable
from pylm.lifecycle import Closing
from pylm.logs import RateLimiter
from pylm.registry.config import RegistryConfig
from pylm.registry.etcd import closed_under_us, open_client
from pylm.registry.lease import Leases, SharedLease
from pylm.registry.malformed import parse_config_row, parse_instance_row, skip
from pylm.registry.records import (
    InstanceRecord,
    MalformedRecord,
    StageConfig,
    config_key,
    instance_key,
    instances_prefix,
)

__all__ = ["DEFAULT_TTL", "Registration", "Registry"]

DEFAULT_TTL = 10.0
log = logging.getLogger("pylm.registry")
T = TypeVar("T")


# What etcd answers a request it will not take from this user (aetcd turns
# most of them into InvalidArgumentError, some into a bare ClientError).
_REFUSALS = (
    "user name is empty",
    "authentication failed",
    "permission denied",
    "invalid auth token",
    "user name not found",
)


def _refused(exc: Exception) -> bool:
    if isinstance(exc, aetcd.exceptions.UnauthenticatedError):
        return True
    text = str(exc)
    return any(refusal in text for refusal in _REFUSALS)


class Registry(Closing):
    """A connection to the registry of one cluster::

    with Registry() as registry:                 # PYLM_REGISTRY, PYLM_CLUSTER
        registration = registry.register(record, ttl=10)
        registry.instances('step2')
        registration.close()
    """

    def __init__(
        self, config: RegistryConfig | str | None = None, *, cluster: str | None = None,
        timeout: float = 5.0,
    ) -> None:  # fmt: skip
        if config is None:
            config = RegistryConfig.from_env(cluster)
        elif isinstance(config, str):
            config = RegistryConfig.parse(config, cluster or os.environ.get("PYLM_CLUSTER"))
        self.config = config
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="pylm-registry", daemon=True
        )
        self._thread.start()
        self._client: aetcd.Client | None = None
        self._endpoint = 0
        self._registrations: list[Registration] = []
        self._leases = Leases(self._etcd)  # on the loop's thread only
        self._closed = False
        self.reachable = True  # whether etcd answered the last request (for metrics)
        self.watch_restarts = 0  # followings that had to start again

    # ------------------------------------------------------------------ plumbing

    def _call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self._closed:
            coroutine.close()
            raise RegistryError("the registry client is closed")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(self.timeout if timeout is None else timeout)
        except TimeoutError:
            future.cancel()
            raise RegistryUnavailable(
                f"etcd at {self.config.url} did not answer within {self.timeout:g} s"
            ) from None

    async def _etcd(self, operation: Any) -> Any:
        """Run ``operation(client)``, trying each endpoint in turn once."""
        errors = []
        attempts = len(self.config.endpoints)
        reauthenticated = reopened = False
        while attempts > 0:
            attempts -= 1
            client = self._client
            fresh = client is None
            try:
                if client is None:
                    host, port = self.config.endpoints[self._endpoint]
                    client = open_client(self.config, host, port, self.timeout)
                    await asyncio.wait_for(client.connect(), self.timeout + 1)
                    self._client = client
                # Bounded even if a call of the client library forgets its timeout.
                answer = await asyncio.wait_for(operation(client), self.timeout + 1)
                self.reachable = True
                return answer
            except (TimeoutError, OSError) as exc:  # no answer: as unreachable
                await self._drop_client(client)
                host, port = self.config.endpoints[self._endpoint]
                errors.append(f"{host}:{port}: no answer within {self.timeout + 1:g} s ({exc!r})")
                self._endpoint = (self._endpoint + 1) % len(self.config.endpoints)
            except asyncio.CancelledError:
                if not closed_under_us():
                    raise
                # Another task closed the shared connection while this call ran:
                # worth one more try, on a new connection.
                errors.append(f"{self.config.url}: connection closed during the call")
                if not reopened:
                    reopened = True
                    attempts += 1
            except aetcd.exceptions.ClientError as exc:
                await self._drop_client(client)
                if _refused(exc):
                    if not fresh and not reauthenticated:
                        # etcd's auth tokens expire (5 min by default): log in again, once
                        reauthenticated = True
                        attempts += 1
                        continue
                    raise self._denied(exc) from None
                host, port = self.config.endpoints[self._endpoint]
                errors.append(f"{host}:{port}: {type(exc).__name__}: {exc}")
                self._endpoint = (self._endpoint + 1) % len(self.config.endpoints)
        self.reachable = False
        raise RegistryUnavailable(
            f"etcd at {self.config.url} cannot be reached ({'; '.join(errors)}); start a local"
            " one with `pylm etcd`, or set PYLM_REGISTRY"
        )

    def _denied(self, exc: Exception) -> RegistryAccessDenied:
        who = (
            f"user {self.config.username!r}"
            if self.config.username
            else "a client without user:password"
        )
        return RegistryAccessDenied(
            f"etcd at {self.config.url} refused {who}: {exc}; give the registry address as"
            " etcd://user:password@host:port, or a client certificate (cert=, key=) etcd accepts"
        )

    async def _shutdown(self) -> None:
        """End keep-alives and followings still running, then disconnect."""
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._drop_client(self._client)

    async def _drop_client(self, client: aetcd.Client | None) -> None:
        """Close ``client`` after it failed, unless another task replaced it
        already (closing the replacement would cancel its calls in flight)."""
        if client is None or client is not self._client:
            return
        self._client = None
        closing: aetcd.Client = client
        try:
            await closing.close()
        except Exception as exc:
            log.debug("closing the etcd client: %r", exc)

    # ------------------------------------------------------------------ queries

    def instances(self, name: str | None = None) -> list[InstanceRecord]:
        """The registered instances of server ``name`` (of every server if
        None). Records that do not follow the schema are skipped, counted
        and logged (:mod:`pylm.registry.malformed`)."""
        prefix = instances_prefix(self.config.prefix, name).encode()
        rows = self._call(self._etcd(lambda client: client.get_prefix(prefix)))
        records = [record for row in rows if (record := parse_instance_row(row)) is not None]
        return sorted(records, key=lambda record: (record.name, record.started))

    def leases_left(self, name: str | None = None) -> dict[str, float]:
        """Seconds left on the lease of each instance of ``name`` (of every
        server if None), by instance id."""
        prefix = instances_prefix(self.config.prefix, name).encode()

        async def query(client: aetcd.Client) -> dict[str, float]:
            leased = [row for row in await client.get_prefix(prefix) if row.lease]
            leases = sorted({row.lease for row in leased})  # records of a process share one
            infos = await asyncio.gather(  # all at once: one round trip, not one per lease
                *(client.get_lease_info(lease, keys=False) for lease in leases)
            )
            left = {lease: float(info.TTL) for lease, info in zip(leases, infos, strict=True)}
            return {
                row.key.decode(errors="replace").rpartition("/")[2]: left[row.lease]
                for row in leased
            }

        return self._call(self._etcd(query))

    def wait_for_instances(self, name: str, timeout: float) -> list[InstanceRecord]:
        """The instances of ``name``, waiting up to ``timeout`` seconds for
        the first to register (start order does not matter); raises
        :class:`~pylm.errors.NoInstance` when there is none by then."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.instances(name)
            if found or time.monotonic() >= deadline:
                break
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        if not found:
            cluster, url = self.config.cluster, self.config.url
            raise NoInstance(
                f"no instance of server {name!r} is registered in cluster {cluster!r}"
                f" at {url} (waited {timeout:g} s); `pylm --registry {shlex.quote(url)}"
                f" --cluster {cluster} ls` lists the servers registered there",
                server=name,
                cluster=cluster,
                registry=url,
                waited=timeout,
            )
        return found

    def follow(
        self,
        name: str | None,
        callback: Callable[[list[InstanceRecord]], None],
        retry: float = 0.5,
    ) -> concurrent.futures.Future[None]:
        """Call ``callback(instances of name)`` (of every server if None) now
        and after every change,
        from the registry's thread, until the returned future is cancelled.
        While etcd is unreachable the last known instances stand; following
        resumes by itself when it returns."""
        prefix = instances_prefix(self.config.prefix, name).encode()

        async def listing() -> tuple[dict[bytes, InstanceRecord], int]:
            rows = await self._etcd(lambda client: client.get_prefix(prefix))
            records = {
                row.key: record for row in rows if (record := parse_instance_row(row)) is not None
            }
            return records, int(rows.header.revision)

        watching: list[aetcd.Client] = []  # the connection of the current watch
        failing = RateLimiter(1.0)  # a callback failing on every listing: one line a second

        async def watch_from(client: aetcd.Client, start: int) -> Any:
            watching[:] = [client]
            return await client.watch_prefix(prefix, start_revision=start)

        async def run() -> None:
            while True:
                watching.clear()
                try:
                    records, revision = await listing()
                    callback(_in_key_order(records))
                    # Watch from just after the listing: a change between the
                    # two is reported, never lost. Each event then updates the
                    # listing in memory (one record parsed, no etcd read): a
                    # follower of hundreds of instances costs etcd nothing
                    # more per change.
                    watch = await self._etcd(
                        lambda client, start=revision + 1: watch_from(client, start)
                    )
                    async for event in watch:
                        if _apply(records, event):
                            callback(_in_key_order(records))
                except (RegistryError, aetcd.exceptions.ClientError, asyncio.CancelledError) as exc:
                    if isinstance(exc, asyncio.CancelledError) and not closed_under_us():
                        raise
                    self.watch_restarts += 1
                    self.reachable = False
                    log.debug("following %s paused: %r", name, exc)
                    if watching:  # the watch broke: its connection is suspect
                        await self._drop_client(watching[0])
                except Exception:  # a failing callback must not end the following
                    if failing.allow():
                        log.exception("following %s: callback failed", name)
                await asyncio.sleep(retry)

        return asyncio.run_coroutine_threadsafe(run(), self._loop)

    def configs(self) -> dict[str, StageConfig]:
        """The wiring stored for every server that has one, by name (entries
        that do not follow the schema are skipped, counted and logged)."""
        prefix = config_key(self.config.prefix, "").encode()
        rows = self._call(self._etcd(lambda client: client.get_prefix(prefix)))
        configs = (parse_config_row(row) for row in rows)
        return {config.name: config for config in configs if config is not None}

    def set_config(self, name: str, next: str) -> None:
        """Store the wiring of stage ``name``: its next call, ``next='step2.bar'``
        (:class:`~pylm.registry.records.MalformedRecord` if it is not one)."""
        config = StageConfig(name, next)
        key, value = config_key(self.config.prefix, name).encode(), config.to_json()
        self._call(self._etcd(lambda client: client.put(key, value)))

    def stage_config(self, name: str) -> StageConfig | None:
        """The wiring of stage ``name``, None if it has none;
        :class:`~pylm.registry.records.MalformedRecord` (counted and logged
        too) if what is stored does not follow the schema."""
        key = config_key(self.config.prefix, name).encode()
        row = self._call(self._etcd(lambda client: client.get(key)))
        if row is None:
            return None
        try:
            return StageConfig.from_json(row.value, row.key)
        except MalformedRecord as exc:
            skip(row, exc)
            raise

    def get_config(self, name: str) -> dict[str, Any] | None:
        """:meth:`stage_config` as a dict of the stored fields (``{"next": ...}``)."""
        config = self.stage_config(name)
        return None if config is None else config.to_dict()

    def keep_config(
        self,
        config: StageConfig,
        recheck: float = 10.0,
        retry: float = 0.5,
        on_change: Callable[[StageConfig], None] | None = None,
    ) -> concurrent.futures.Future[None]:
        """Keep stage ``config.name``'s wiring in etcd, from the registry's
        thread, until the returned future is cancelled: when the key is
        missing (deleted, or etcd lost its data and came back empty) put
        back the last valid wiring seen there. A running stage that read its
        next call from the registry does this, so that the wiring outlives
        an etcd data loss. Changes written meanwhile (``pylm topology set``)
        are adopted, and given to ``on_change`` (from the registry's thread)
        when they change the wiring; a malformed value is counted and left alone. The key is
        watched (a delete is seen at once), and read again every
        ``recheck`` seconds and whenever the watch breaks."""
        key = config_key(self.config.prefix, config.name).encode()
        latest = [config]
        watching: list[aetcd.Client] = []
        failing = RateLimiter(1.0)

        async def put_back(client: aetcd.Client) -> bool:
            txn = client.transactions  # only if still absent: never over an operator's write
            done, _ = await client.transaction(
                compare=[txn.version(key) == 0],
                success=[txn.put(key, latest[0].to_json())],
                failure=[],
            )
            return bool(done)

        async def check() -> int:
            """Read the key, put it back if missing; the revision read at."""
            rows = await self._etcd(lambda client: client.get_prefix(key))
            row = next((row for row in rows if row.key == key), None)
            if row is None:
                await restore()
            else:
                adopt(row)
            return int(rows.header.revision)

        async def restore() -> None:
            if await self._etcd(put_back):
                log.warning(
                    "wiring of %s was missing from the registry: put back next=%s",
                    config.name,
                    latest[0].next,
                )

        def adopt(row: Any) -> None:
            found = parse_config_row(row)
            if found is not None:
                changed = found != latest[0]
                latest[0] = found
                if changed and on_change is not None:
                    try:
                        on_change(found)
                    except Exception:  # the stage's, not ours: keep following
                        log.exception("wiring of %s: the change callback failed", config.name)

        async def watch_from(client: aetcd.Client, start: int) -> Any:
            watching[:] = [client]
            return await client.watch(key, start_revision=start)

        async def run() -> None:
            while True:
                watching.clear()
                try:
                    revision = await check()
                    watch = await self._etcd(
                        lambda client, start=revision + 1: watch_from(client, start)
                    )
                    try:
                        async with asyncio.timeout(recheck):
                            async for event in watch:
                                if event.kind == aetcd.rtypes.EventKind.PUT:
                                    adopt(event.kv)
                                else:
                                    await restore()
                    except TimeoutError:
                        pass  # time to read the key again
                    finally:
                        await _cancel_quietly(watch)
                    continue
                except (RegistryError, aetcd.exceptions.ClientError, asyncio.CancelledError) as exc:
                    if isinstance(exc, asyncio.CancelledError) and not closed_under_us():
                        raise
                    log.debug("keeping the wiring of %s paused: %r", config.name, exc)
                    if watching:
                        await self._drop_client(watching[0])
                except Exception:  # nothing else ends it either: a stage keeps its wiring
                    if failing.allow():
                        log.exception("keeping the wiring of %s failed", config.name)
                await asyncio.sleep(retry)

        return asyncio.run_coroutine_threadsafe(run(), self._loop)

    # ------------------------------------------------------------------ registration

    def register(self, record: InstanceRecord, ttl: float = DEFAULT_TTL) -> Registration:
        """Register ``record`` under a lease of ``ttl`` seconds, kept alive
        until :meth:`Registration.close`. Raises :class:`RegistryUnavailable`
        if etcd cannot be reached now; once registered, outages are survived."""
        registration = Registration(self, record, ttl)
        # What every reader would skip is refused here, clearly, instead.
        InstanceRecord.from_json(record.to_json(), registration.key)

        async def join() -> None:
            registration._lease = await self._leases.join(registration, ttl)

        self._call(join())
        self._registrations.append(registration)
        return registration

    def close(self) -> None:
        """Remove every registration this client made, then disconnect."""
        if self._closed:
            return
        for registration in list(self._registrations):
            try:
                registration.close()
            except RegistryError as exc:
                log.warning("could not remove %s: %s", registration.key, exc)
        self._call(self._shutdown())
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self.timeout)
        self._loop.close()


class Registration:
    """A record kept registered by its :class:`Registry`, under the lease it
    shares with the other records of that registry with the same TTL
    (:mod:`pylm.registry.lease`)."""

    def __init__(self, registry: Registry, record: InstanceRecord, ttl: float) -> None:
        if ttl < 1:
            raise ValueError(
                f"ttl must be at least 1 s (etcd leases count whole seconds), got {ttl!r}"
            )
        self.registry = registry
        self.record = record
        self.ttl = ttl
        self.key = instance_key(registry.config.prefix, record.name, record.instance)
        self.registered = False  # whether etcd holds the record right now, as far as we know
        self.failures = 0  # keep-alive rounds that could not reach etcd
        self._lease: SharedLease | None = None

    def update(self, record: InstanceRecord) -> concurrent.futures.Future[None]:
        """Keep ``record`` (the same instance, its wiring changed) registered
        instead, written at once under the same lease; does not wait (the
        future tells when etcd has it)."""
        if record.instance != self.record.instance:
            raise ValueError(f"{record.instance!r} is another instance than {self.key!r}")
        self.record = record
        lease = self._lease

        async def rewrite() -> None:
            if lease is not None:
                await lease.rewrite(self)

        return asyncio.run_coroutine_threadsafe(rewrite(), self.registry._loop)

    def close(self) -> None:
        """Stop keeping the record alive and remove it; raises
        :class:`RegistryUnavailable` if etcd cannot be reached (the record
        then disappears when its lease expires)."""
        if self in self.registry._registrations:
            self.registry._registrations.remove(self)
        lease, self._lease = self._lease, None
        self.registered = False
        if lease is not None:
            self.registry._call(lease.leave(self))


def _apply(records: dict[bytes, InstanceRecord], event: Any) -> bool:
    """Apply one watch event to ``records`` (by key); whether they changed.
    A key overwritten with a malformed record loses its old record."""
    key = event.kv.key
    record = parse_instance_row(event.kv) if event.kind == aetcd.rtypes.EventKind.PUT else None
    if record is None:
        return records.pop(key, None) is not None
    if records.get(key) == record:
        return False  # rewritten as it was
    records[key] = record
    return True


def _in_key_order(records: dict[bytes, InstanceRecord]) -> list[InstanceRecord]:
    return [records[key] for key in sorted(records)]


async def _cancel_quietly(watch: Any) -> None:
    """End a watch; one whose connection broke has nothing left to end."""
    try:
        await watch.cancel()
    except Exception as exc:
        log.debug("cancelling a watch: %r", exc)
