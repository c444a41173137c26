"""Standalone servers started with only a name, and clients that find them
through the registry (a real etcd, from pylm.testing's fixtures)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from prerequisites import needs_etcd

import pylm
from pylm.errors import RegistryError
from pylm.processes import free_port
from pylm.registry import LocalEtcd, Registry
from pylm.standalone import AsyncClient, Client, Server

Serve = Callable[[Any], Any]


class Echo(Server):
    def echo(self, message: bytes) -> bytes:
        return b"echo " + message


def test_name_only_server_and_client_through_the_environment(
    serve: Serve, pylm_etcd: LocalEtcd, pylm_cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYLM_REGISTRY", pylm_etcd.url)
    monkeypatch.setenv("PYLM_CLUSTER", pylm_cluster)
    server = serve(Echo("echo_server", log_stdout=False))
    with Client("echo_server") as client:
        assert client.job("echo", b"x") == b"echo x"
        assert client.endpoints == [server.address]


def test_record_contents_and_clean_removal(pylm_registry: Registry) -> None:
    server = Echo("echo_server", log_stdout=False, registry=pylm_registry)
    with server:
        (record,) = pylm_registry.instances("echo_server")
        assert record.kind == "standalone"
        assert record.endpoints == {"rep": server.address}
        assert record.functions == ["echo"]
        assert record.pid == os.getpid() and record.version == pylm.__version__
        assert server.address.startswith("tcp://127.0.0.1:")
    assert pylm_registry.instances("echo_server") == []


def test_client_waits_for_a_server_not_started_yet(pylm_registry: Registry) -> None:
    results: list[bytes] = []
    resolving = threading.Event()

    def call() -> None:
        resolving.set()
        with Client("late_server", registry=pylm_registry, timeout=20, wait=20) as client:
            results.append(client.job("echo", b"early"))

    thread = threading.Thread(target=call)
    thread.start()
    assert resolving.wait(5)
    with Echo("late_server", log_stdout=False, registry=pylm_registry):
        thread.join(20)
    assert results == [b"echo early"]


def test_clients_spread_over_every_instance(pylm_registry: Registry) -> None:
    servers = [Echo("svc", log_stdout=False, registry=pylm_registry) for _ in range(2)]
    with servers[0], servers[1], Client("svc", registry=pylm_registry) as client:
        assert sorted(client.endpoints) == sorted(s.address for s in servers)
        for _ in range(40):
            assert client.job("echo", b"x") == b"echo x"
    assert all(server.served > 0 for server in servers)  # counted once stopped


def test_async_client_by_name(serve: Serve, pylm_registry: Registry) -> None:
    import asyncio

    serve(Echo("async_svc", log_stdout=False, registry=pylm_registry))

    async def main() -> list[bytes]:
        async with AsyncClient("async_svc", registry=pylm_registry) as client:
            return await asyncio.gather(*(client.job("echo", b"%d" % i) for i in range(20)))

    assert asyncio.run(main()) == [b"echo %d" % i for i in range(20)]


def test_explicit_address_registers_only_when_given_a_registry(
    serve: Serve, pylm_registry: Registry
) -> None:
    serve(Echo("plain", "tcp://127.0.0.1:0", log_stdout=False))
    assert pylm_registry.instances("plain") == []
    listed = serve(Echo("listed", "tcp://127.0.0.1:0", log_stdout=False, registry=pylm_registry))
    assert pylm_registry.instances("listed")[0].endpoints == {"rep": listed.address}


def test_name_only_without_registry_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYLM_REGISTRY", raising=False)
    server = Echo("lonely", log_stdout=False)
    with pytest.raises(RegistryError, match=r"server 'lonely' cannot register.*pylm etcd"):
        server.start(background=True)
    server.stop()
    with pytest.raises(RegistryError, match="no registry configured"):
        Client("lonely")


def test_name_only_with_registry_down_fails_fast() -> None:
    address = f"etcd://127.0.0.1:{free_port()}"
    server = Echo("lonely", log_stdout=False, registry=address)
    with pytest.raises(RegistryError, match=f"cannot register.*{address[7:]}"):
        server.start(background=True)
    server.stop()


def test_no_instance_registered_is_a_clear_error(pylm_registry: Registry) -> None:
    with pytest.raises(RegistryError, match=r"no instance of server 'ghost' is registered"):
        Client("ghost", registry=pylm_registry, timeout=0.3)
    with pytest.raises(RegistryError, match=r"no instance of server 'ghost' is registered"):
        AsyncClient("ghost", registry=pylm_registry, timeout=0.3)
    with pytest.raises(ValueError, match="give the server_name too"):
        Client("tcp://127.0.0.1:5555")


@needs_etcd
def test_serving_goes_on_while_etcd_is_down() -> None:
    with LocalEtcd() as etcd, Registry(etcd.url, cluster="outage", timeout=2) as registry:
        server = Echo("steady", log_stdout=False, registry=registry, ttl=1)
        with server, Client("steady", registry=registry) as client:
            etcd.stop()
            for _ in range(20):  # the established topology keeps working
                assert client.job("echo", b"x") == b"echo x"
            registration = server.registration
            assert registration is not None
            deadline = time.monotonic() + 10
            while registration.failures == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert registration.failures > 0  # it noticed ...
            etcd.start()
            while not registration.registered and time.monotonic() < deadline + 10:
                time.sleep(0.05)
            assert registration.registered  # ... and registered again by itself
            assert [r.instance for r in registry.instances("steady")] == [
                registration.record.instance
            ]
            assert client.job("echo", b"y") == b"echo y"


class Named(Server):
    """Says which instance answered."""

    def who(self, message: bytes) -> bytes:
        assert self.address is not None
        return self.address.encode()


def test_client_follows_instances_joining_and_leaving(pylm_registry: Registry) -> None:
    first = Named("named", log_stdout=False, registry=pylm_registry)
    second = Named("named", log_stdout=False, registry=pylm_registry)
    with first, Client("named", registry=pylm_registry, timeout=5) as client:
        assert client.job("who", b"") == first.address.encode()
        second.start(background=True)
        try:
            answered: set[bytes] = set()
            deadline = time.monotonic() + 10
            while second.address.encode() not in answered:  # the joining instance gets calls
                assert time.monotonic() < deadline, "the client never called the new instance"
                answered.add(client.job("who", b""))
            assert sorted(client.endpoints) == sorted([first.address, second.address])
        finally:
            second.stop()
        # The instance left: every call goes to the one still there, none fails.
        assert {client.job("who", b"") for _ in range(50)} == {first.address.encode()}
        deadline = time.monotonic() + 10
        while client.endpoints != [first.address]:
            assert time.monotonic() < deadline, "the client never dropped the old instance"
            client.job("who", b"")
    assert pylm_registry.instances("named") == []


def test_async_client_follows_a_joining_instance(pylm_registry: Registry) -> None:
    import asyncio

    first = Named("anamed", log_stdout=False, registry=pylm_registry)
    second = Named("anamed", log_stdout=False, registry=pylm_registry)

    async def main() -> set[bytes]:
        async with AsyncClient("anamed", registry=pylm_registry, timeout=5) as client:
            answered = {await client.job("who", b"")}
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: second.start(background=True)
            )
            deadline = time.monotonic() + 10
            while len(answered) < 2 and time.monotonic() < deadline:
                answered.update(await asyncio.gather(*(client.job("who", b"") for _ in range(4))))
            return answered

    with first:
        try:
            answered = asyncio.run(main())
        finally:
            second.stop()
    assert answered == {first.address.encode(), second.address.encode()}
