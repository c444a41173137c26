"""Where the registry is: ``PYLM_REGISTRY`` and ``PYLM_CLUSTER``.

``PYLM_REGISTRY=etcd://[user:password@]host:port[,host:port...]`` names one
or more etcd endpoints (tried in turn); ``PYLM_CLUSTER`` (default
``default``) namespaces the keys, so clusters can share one etcd.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import unquote

from pylm.errors import RegistryError

__all__ = ["DEFAULT_CLUSTER", "RegistryConfig"]

DEFAULT_CLUSTER = "default"
_CLUSTER = re.compile(r"^[A-Za-z0-9_.-]+$")
_HINT = "start a local one with `pylm etcd`, or set PYLM_REGISTRY=etcd://host:2379"


@dataclass(frozen=True)
class RegistryConfig:
    """The etcd endpoints to reach, credentials, and the cluster namespace."""

    endpoints: tuple[tuple[str, int], ...]
    cluster: str = DEFAULT_CLUSTER
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str, cluster: str | None = None) -> RegistryConfig:
        """Read a ``PYLM_REGISTRY`` value; raise :class:`RegistryError` naming
        what is wrong with it."""
        if not isinstance(url, str) or not url.startswith("etcd://"):
            raise RegistryError(f"registry address {url!r} must look like etcd://host:2379")
        rest = url[len("etcd://") :].rstrip("/")
        username = password = None
        if "@" in rest:
            credentials, rest = rest.rsplit("@", 1)
            username, _, password = credentials.partition(":")
            username, password = unquote(username), unquote(password)
        endpoints = []
        for part in rest.split(","):
            host, colon, port = part.strip().rpartition(":")
            if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise RegistryError(
                    f"registry endpoint {part!r} in {url!r} must be host:port, e.g. 127.0.0.1:2379"
                )
            endpoints.append((host.strip("[]"), int(port)))
        cluster = DEFAULT_CLUSTER if cluster is None else cluster
        if not _CLUSTER.match(cluster):
            raise RegistryError(f"cluster name {cluster!r} may use letters, digits, _ . - only")
        return cls(tuple(endpoints), cluster, username or None, password or None)

    @classmethod
    def from_env(cls, cluster: str | None = None) -> RegistryConfig:
        """From ``PYLM_REGISTRY`` and ``PYLM_CLUSTER``; a clear error when unset."""
        url = os.environ.get("PYLM_REGISTRY")
        if not url:
            raise RegistryError(f"no registry configured: {_HINT}")
        return cls.parse(url, cluster if cluster is not None else os.environ.get("PYLM_CLUSTER"))

    @property
    def url(self) -> str:
        hosts = ",".join(f"{host}:{port}" for host, port in self.endpoints)
        user = f"{self.username}:***@" if self.username else ""
        return f"etcd://{user}{hosts}"

    @property
    def prefix(self) -> str:
        """Every key of this cluster starts with it."""
        return f"/pylm/{self.cluster}/"
