"""Opening an etcd client: aetcd's, plain or over TLS.

aetcd 1.0 opens only insecure gRPC channels; :class:`SecureClient` is an
aetcd client whose channel is a TLS one (server checked against a CA, and
optionally a client certificate), with the same username/password
authentication on top.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aetcd
import grpc
from aetcd import rpc, watcher

from pylm.registry.config import RegistryConfig

__all__ = ["SecureClient", "closed_under_us", "open_client"]


def closed_under_us() -> bool:
    """Whether a ``CancelledError`` just caught comes from grpc (a call whose
    channel another task closed), not from cancelling the current task."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


class SecureClient(aetcd.Client):  # type: ignore[misc]
    """An aetcd client speaking TLS to etcd."""

    def __init__(self, credentials: grpc.ChannelCredentials, **options: Any) -> None:
        super().__init__(**options)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        try:
            await self._open()
        except grpc.aio.AioRpcError as exc:
            aetcd.exceptions._handle_exception(exc)  # raises the matching ClientError

    async def _open(self) -> None:
        self.channel = grpc.aio.secure_channel(
            f"{self._host}:{self._port}", self._credentials, options=list(self._options.items())
        )
        if self._username is not None:
            answer = await rpc.AuthStub(self.channel).Authenticate(
                rpc.AuthenticateRequest(name=self._username, password=self._password),
                timeout=self._timeout,
            )
            self.metadata = (("token", answer.token),)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()


# gRPC channel options. Channels to one address share a process-wide pool of
# connections by default, and with it the reconnect backoff, which grows to
# two minutes while etcd is down: a channel opened after etcd came back could
# wait that long. A channel of its own, retrying within a second, sees etcd
# back at once. gRPC also takes its "minimum reconnect backoff" as the time a
# connection attempt may take (to etcd's first HTTP/2 SETTINGS frame): at
# 100 ms, a loaded machine failed requests to a live etcd. A refused
# connection fails at once whatever it is.
CHANNEL_OPTIONS = {
    "grpc.use_local_subchannel_pool": 1,
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 5000,
    "grpc.max_reconnect_backoff_ms": 1000,
}


def open_client(config: RegistryConfig, host: str, port: int, timeout: float) -> aetcd.Client:
    """An (unconnected) aetcd client for one of ``config``'s endpoints."""
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "username": config.username,
        "password": config.password,
        "timeout": int(max(1, timeout)),
        "options": dict(CHANNEL_OPTIONS),
    }
    if config.username is not None and config.password is None:
        options["password"] = ""
    if not config.tls:
        return aetcd.Client(**options)
    files = config.tls_files()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=files.get("cacert"),
        private_key=files.get("key"),
        certificate_chain=files.get("cert"),
    )
    return SecureClient(credentials, **options)
