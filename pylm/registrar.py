"""A server's registration: the registry it uses (given, or opened from
``PYLM_REGISTRY`` and then its own to close), the
:class:`~pylm.registry.InstanceRecord` it registers once bound, the check
that its functions match the live instances of its name, the address a
wildcard bind is advertised at, and deregistering when it stops.

Lifecycle: :meth:`Registrar.register` in the serving thread once the server
is bound, :meth:`Registrar.close` when it stops (first, so that clients stop
picking the instance before its sockets close).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pylm.errors import InterfaceMismatch, RegistryError
from pylm.security import Curve
from pylm.telemetry.counting import ServerStats
from pylm.transport import is_wildcard, public_host

if TYPE_CHECKING:
    from pylm.registry import InstanceRecord, Registration, Registry

__all__ = ["Registrar"]


class Registrar:
    """Registers the server ``name`` of ``kind`` with ``functions``.
    ``registry``: a :class:`~pylm.registry.Registry`, an ``etcd://``
    address, or None (``PYLM_REGISTRY``); ``ttl``: the lease (None: the
    registry's default); ``rolling``: a new version rolling out, whose
    functions may differ from the live instances'. ``stats`` (when the
    server counts) learns its instance and registration, for ``/healthz``
    and the registry's metrics. ``idempotent``: the functions marked so,
    which the record names."""

    def __init__(
        self,
        name: str,
        kind: str,
        functions: tuple[str, ...],
        logger: logging.Logger,
        *,
        idempotent: tuple[str, ...] = (),
        registry: Registry | str | None,
        ttl: float | None,
        rolling: bool,
        curve: Curve | None,
        stats: ServerStats | None,
    ) -> None:
        self.name = name
        self.kind = kind
        self.functions = functions
        self.idempotent = idempotent
        self.logger = logger
        self.option = registry
        self.ttl = ttl
        self.rolling = rolling
        self.curve = curve
        self.stats = stats
        self.registry: Registry | None = None  # set while registered
        self.registration: Registration | None = None
        self._owns_registry = False
        self._public_host: str | None = None  # what a wildcard bind is advertised as

    def register(
        self,
        endpoints: dict[str, str],
        required: bool,
        *,
        metrics: str | None,
        next: str | None = None,
        branches: list[str] | None = None,
        tee: list[str] | None = None,
        master: str | None = None,
    ) -> None:
        """Register this instance, listening on ``endpoints`` (role ->
        bound address) with its ``/metrics`` at ``metrics``. A server
        started with only a name needs the registry (``required``) and fails
        at once without it; one with explicit addresses registers only when
        given a ``registry``.

        One name, one interface: unless :attr:`rolling`, a server whose
        functions no live instance of its name has is refused
        (:class:`InterfaceMismatch`). Checked before registering, and again
        after, against the instances registered meanwhile: of two such
        servers starting at the same moment, the later to register always
        sees the earlier and is refused (both are, if each sees the other)."""
        from pylm import __version__
        from pylm.registry import DEFAULT_TTL, InstanceRecord
        from pylm.registry.records import MalformedRecord

        if self.option is None and not required:
            return
        try:
            registry = self.client()
            self.check_interface(registry.instances(self.name), None)
            record = InstanceRecord(
                self.name,
                self.kind,
                {role: self.advertised(address) for role, address in endpoints.items()},
                next=next,
                branches=branches or [],
                tee=tee or [],
                functions=list(self.functions),
                idempotent=list(self.idempotent),
                metrics=metrics,
                curve=None if self.curve is None else self.curve.public_key,
                version=__version__,
                master=master,
            )
            self.registration = registry.register(record, self.ttl or DEFAULT_TTL)
            try:
                self.check_interface(registry.instances(self.name), record.instance)
            except InterfaceMismatch:
                registration, self.registration = self.registration, None
                try:
                    registration.close()
                except RegistryError:
                    pass  # it expires with its lease
                raise
            if self.stats is not None:
                self.stats.instance = record.instance
                self.stats.registration = self.registration
                self.stats.registry = registry
        except InterfaceMismatch:
            raise
        except MalformedRecord as exc:  # a record every reader would skip
            message = f"server {self.name!r} cannot register: its record's {exc}"
            raise RegistryError(message) from exc
        except RegistryError as exc:
            raise type(exc)(  # the same kind of error: unavailable, access denied...
                f"server {self.name!r} cannot register: {exc}"
                + (
                    " (it was started with only a name, so it needs the registry)"
                    if required
                    else ""
                )
            ) from exc
        self.logger.debug("%s registered as %s", self.name, self.registration.key)

    def describe(self) -> str:
        """Where the server is registered, for its start line."""
        registry = self.registry
        if self.registration is not None and registry is not None:
            return f"cluster {registry.config.cluster!r} at {registry.config.url}"
        return "not registered"

    def check_interface(self, records: list[InstanceRecord], own: str | None) -> None:
        """Raise :class:`InterfaceMismatch` unless :attr:`rolling`, or some
        instance in ``records`` (other than ``own``) has this server's
        functions, or there is none. Matching one is enough: more instances
        of a version already rolling out need no flag, nor do instances of
        the old version restarting meanwhile."""
        others = [record for record in records if record.instance != own]
        mine = sorted(set(self.functions))
        if self.rolling or not others:
            return
        live = {record.instance: list(record.functions) for record in others}
        kinds = sorted({record.kind for record in others} - {self.kind})
        if kinds:
            raise InterfaceMismatch(
                f"server {self.name!r} is a {self.kind} server, but the live instances of"
                f" {self.name!r} are {' and '.join(kinds)}: their clients and senders speak to"
                " that kind only. Give it another name, or, if it replaces them on purpose,"
                " start it with rolling=True (pylm run --rolling)",
                functions=mine,
                live=live,
            )
        versions: dict[tuple[str, ...], list[InstanceRecord]] = {}
        for record in others:
            versions.setdefault(tuple(sorted(set(record.functions))), []).append(record)
        if tuple(mine) in versions:
            return

        def where(group: list[InstanceRecord]) -> str:
            shown = [f"{r.instance} on {r.host} pid {r.pid}" for r in group[:3]]
            more = f" and {len(group) - 3} more" if len(group) > 3 else ""
            return ", ".join(shown) + more

        shown = "; ".join(
            f"[{', '.join(functions)}] (instance {where(group)})"
            for functions, group in sorted(versions.items())
        )
        raise InterfaceMismatch(
            f"server {self.name!r} has functions [{', '.join(mine)}], but the live instances"
            f" of {self.name!r} have {shown}: by-name clients would share their calls among"
            " programs that cannot answer all of them. Give it another name, or, if it is a"
            " new version rolling out, start it with rolling=True (pylm run --rolling)",
            functions=mine,
            live=live,
        )

    def client(self) -> Registry:
        """The registry this server uses: the one it was given, or one it
        opens (from ``PYLM_REGISTRY``) and closes when it stops."""
        from pylm.registry import Registry

        if self.registry is None:
            option = self.option
            if isinstance(option, Registry):
                self.registry = option
            else:
                self.registry = Registry(option)
                self._owns_registry = True
        return self.registry

    def advertised(self, address: str) -> str:
        """The address others reach a bound ``address`` (``tcp://...``, or
        the ``http://...`` URL of the metrics) at: a wildcard host is
        replaced by this host's name."""
        scheme, _, rest = address.partition("://")
        host, colon, _ = rest.partition("/")[0].rpartition(":")
        if colon and is_wildcard(host):
            if self._public_host is None:
                self._public_host = public_host(self.endpoints())
            return f"{scheme}://{self._public_host}:{rest[len(host) + 1 :]}"
        return address

    def endpoints(self) -> tuple[tuple[str, int], ...]:
        """The etcd endpoints this server registers at, none if it has no registry."""
        from pylm.registry import Registry, RegistryConfig

        option = self.registry if self.registry is not None else self.option
        try:
            if isinstance(option, Registry):
                return option.config.endpoints
            if option is None:
                return RegistryConfig.from_env().endpoints
            return RegistryConfig.parse(option).endpoints
        except (RegistryError, ValueError):
            return ()

    def close(self) -> None:
        """Deregister, and close the registry if this server opened it."""
        registration, self.registration = self.registration, None
        registry, self.registry = self.registry, None
        try:
            if registration is not None:
                registration.close()
        except RegistryError as exc:
            self.logger.warning(
                "%s: record not removed (it expires with its lease): %s", self.name, exc
            )
        finally:
            if registry is not None and self._owns_registry:
                registry.close()
                self._owns_registry = False
