"""Where the registry is: ``PYLM_REGISTRY`` and ``PYLM_CLUSTER``.

``PYLM_REGISTRY=etcd://[user:password@]host:port[,host:port...]`` names one
or more etcd endpoints (tried in turn); ``PYLM_CLUSTER`` (default
``default``) namespaces the keys, so clusters can share one etcd.

TLS: the scheme ``etcds://`` speaks TLS (server checked against the system's
trusted CAs), and the query parameters ``cacert`` (CA bundle to trust),
``cert`` and ``key`` (a client certificate, for etcd's
``--client-cert-auth``) name PEM files; any of them turns TLS on, as in
``etcds://10.0.0.1:2379?cacert=/etc/pylm/ca.pem&cert=/etc/pylm/me.pem&key=/etc/pylm/me-key.pem``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote

from pylm.errors import RegistryError

__all__ = ["DEFAULT_CLUSTER", "RegistryConfig"]

DEFAULT_CLUSTER = "default"
_CLUSTER = re.compile(r"^[A-Za-z0-9_.-]+$")
_TLS_FILES = ("cacert", "cert", "key")
_HINT = "start a local one with `pylm etcd`, or set PYLM_REGISTRY=etcd://host:2379"


@dataclass(frozen=True)
class RegistryConfig:
    """The etcd endpoints to reach, credentials, and the cluster namespace."""

    endpoints: tuple[tuple[str, int], ...]
    cluster: str = DEFAULT_CLUSTER
    username: str | None = None
    password: str | None = None
    tls: bool = False
    cacert: str | None = None
    cert: str | None = None
    key: str | None = None

    @classmethod
    def parse(cls, url: str, cluster: str | None = None) -> RegistryConfig:
        """Read a ``PYLM_REGISTRY`` value; raise :class:`RegistryError` naming
        what is wrong with it."""
        if not isinstance(url, str) or not url.startswith(("etcd://", "etcds://")):
            raise RegistryError(
                f"registry address {url!r} must look like etcd://host:2379 (etcds:// for TLS)"
            )
        scheme, _, rest = url.partition("://")
        rest, _, query = rest.partition("?")
        rest = rest.rstrip("/")
        files: dict[str, str] = {}
        for field, value in parse_qsl(query, keep_blank_values=True):
            if field not in _TLS_FILES:
                raise RegistryError(
                    f"unknown parameter {field!r} in registry address {url!r}:"
                    f" use {', '.join(_TLS_FILES)}"
                )
            if not value:
                raise RegistryError(f"parameter {field!r} in {url!r} needs a file path")
            files[field] = value
        if ("cert" in files) != ("key" in files):
            raise RegistryError(
                f"registry address {url!r}: a client certificate needs both cert= and key="
            )
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
        return cls(
            tuple(endpoints),
            cluster,
            username or None,
            password or None,
            tls=scheme == "etcds" or bool(files),
            **files,
        )

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
        files = [(field, getattr(self, field)) for field in _TLS_FILES]
        query = "&".join(f"{field}={quote(path)}" for field, path in files if path)
        scheme = "etcds" if self.tls else "etcd"
        return f"{scheme}://{user}{hosts}" + (f"?{query}" if query else "")

    def tls_files(self) -> dict[str, bytes]:
        """The PEM contents of the TLS files configured, by field name;
        raises :class:`RegistryError` naming a file that cannot be read."""
        contents = {}
        for field in _TLS_FILES:
            path = getattr(self, field)
            if path:
                try:
                    contents[field] = Path(path).read_bytes()
                except OSError as exc:
                    raise RegistryError(
                        f"cannot read the registry's {field} file {path!r}: {exc.strerror}"
                    ) from None
        return contents

    @property
    def prefix(self) -> str:
        """Every key of this cluster starts with it."""
        return f"/pylm/{self.cluster}/"
