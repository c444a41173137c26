"""The registry client against a real etcd (started by pylm.testing's fixtures)."""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import signal
import socket
import threading
import time
import urllib.request

import aetcd
import pytest
from prerequisites import needs_etcd

from pylm.errors import RegistryError, RegistryUnavailable
from pylm.processes import free_port
from pylm.registry import InstanceRecord, LocalEtcd, Registry, RegistryConfig
from pylm.registry.malformed import malformed_records
from pylm.testing import wait_for
from pylm.transport import public_host


def record(name: str = "step1", **fields: object) -> InstanceRecord:
    return InstanceRecord(name, "chained", {"pull": "tcp://127.0.0.1:5555"}, **fields)  # type: ignore[arg-type]


def test_config_parsing_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    config = RegistryConfig.parse("etcd://me:s%40cret@10.0.0.1:2379,[::1]:2380", "prod")
    assert config.endpoints == (("10.0.0.1", 2379), ("::1", 2380))
    assert (config.username, config.password, config.cluster) == ("me", "s@cret", "prod")
    assert config.prefix == "/pylm/prod/" and "s@cret" not in config.url
    for bad, words in [
        ("http://h:1", "must look like etcd://"),
        ("etcd://nohost", "must be host:port"),
        ("etcd://h:0", "must be host:port"),
    ]:
        with pytest.raises(RegistryError, match=words):
            RegistryConfig.parse(bad)
    with pytest.raises(RegistryError, match="cluster name 'a/b'"):
        RegistryConfig.parse("etcd://h:1", "a/b")
    monkeypatch.delenv("PYLM_REGISTRY", raising=False)
    with pytest.raises(
        RegistryError, match="no registry configured: start a local one with `pylm etcd`"
    ):
        Registry()
    monkeypatch.setenv("PYLM_REGISTRY", "etcd://127.0.0.1:2379")
    monkeypatch.setenv("PYLM_CLUSTER", "blue")
    assert RegistryConfig.from_env().cluster == "blue"


def test_record_json_round_trip_and_garbage() -> None:
    original = record(next="step2.bar", functions=["foo"])
    key = f"/pylm/c/instances/step1/{original.instance}"
    assert InstanceRecord.from_json(original.to_json(), key) == original
    for garbage in (b"not json", b"[1, 2]", b'{"name": "x"}', b'{"nope": 1}'):
        with pytest.raises(ValueError):
            InstanceRecord.from_json(garbage, key)


def test_register_query_remove(pylm_registry: Registry) -> None:
    registration = pylm_registry.register(record(next="step2.bar", functions=["foo"]), ttl=5)
    (found,) = pylm_registry.instances("step1")
    assert found == registration.record and found.next == "step2.bar"
    assert pylm_registry.instances("other") == []
    assert registration.key == f"{pylm_registry.config.prefix}instances/step1/{found.instance}"
    registration.close()
    assert pylm_registry.instances() == []


def test_records_outlive_their_ttl_while_kept_alive(pylm_registry: Registry) -> None:
    registration = pylm_registry.register(record(), ttl=1)
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:  # well past the TTL: the keep-alive holds it
        assert len(pylm_registry.instances("step1")) == 1
        time.sleep(0.25)
    assert registration.failures == 0


def test_clusters_are_isolated(pylm_etcd: LocalEtcd, pylm_registry: Registry) -> None:
    pylm_registry.register(record())
    with Registry(pylm_etcd.url, cluster=pylm_registry.config.cluster + "-other") as other:
        assert other.instances() == []
        other.register(record("step9"))
        assert [r.name for r in pylm_registry.instances()] == ["step1"]


def test_wiring_config(pylm_registry: Registry) -> None:
    assert pylm_registry.get_config("step1") is None
    pylm_registry.set_config("step1", next="step2.bar")
    assert pylm_registry.get_config("step1") == {"next": "step2.bar"}


def test_malformed_records_are_skipped(
    pylm_etcd: LocalEtcd, pylm_registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    pylm_registry.register(record())

    async def put_garbage() -> None:
        async with aetcd.Client(host="127.0.0.1", port=pylm_etcd.client_port) as client:
            await client.put(f"{pylm_registry.config.prefix}instances/bad/1".encode(), b"{garbage")

    asyncio.run(put_garbage())
    assert [r.name for r in pylm_registry.instances()] == ["step1"]
    assert "skipping malformed registry record" in caplog.text


def test_following_applies_each_change_without_reading_etcd_again(
    pylm_etcd: LocalEtcd, pylm_registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    """After its first listing a follower keeps the instances up to date from
    the watch events alone: every change reported, in key order, and no
    further read of etcd (etcd's own range counter stays where it was)."""
    prefix = pylm_registry.config.prefix
    listings: list[list[InstanceRecord]] = []
    changed = threading.Condition()

    def seen(records: list[InstanceRecord]) -> None:
        with changed:
            listings.append(records)
            changed.notify_all()

    def wait_for_listing(names: list[str]) -> None:
        with changed:
            assert changed.wait_for(
                lambda: bool(listings) and [r.name for r in listings[-1]] == names, 10
            ), f"last listing {[r.name for r in listings[-1]] if listings else None}, not {names}"

    def ranges() -> float:
        with urllib.request.urlopen(f"{pylm_etcd.metrics_url}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        (line,) = [line for line in text.splitlines() if line.startswith("etcd_mvcc_range_total ")]
        return float(line.split()[1])

    async def change(puts: dict[str, bytes], deletes: tuple[str, ...] = ()) -> None:
        async with aetcd.Client(host="127.0.0.1", port=pylm_etcd.client_port) as client:
            for key, value in puts.items():
                await client.put(f"{prefix}instances/{key}".encode(), value)
            for key in deletes:
                await client.delete(f"{prefix}instances/{key}".encode())

    a1, a2, b1, c1 = (
        record(name, instance=instance).to_json()
        for name, instance in (("a", "1"), ("a", "2"), ("b", "1"), ("c", "1"))
    )
    asyncio.run(change({"b/1": b1, "a/1": a1}))
    following = pylm_registry.follow(None, seen)
    try:
        wait_for_listing(["a", "b"])
        before, calls = ranges(), len(listings)
        asyncio.run(change({"c/1": c1, "a/2": a2}))
        wait_for_listing(["a", "a", "b", "c"])
        asyncio.run(change({"a/1": a1}))  # rewritten as it was: no news
        skipped = malformed_records().counts()["json"]
        asyncio.run(change({"b/1": b"{garbage"}, deletes=("a/2",)))  # b/1 is no record now
        wait_for_listing(["a", "c"])
        assert malformed_records().counts()["json"] == skipped + 1  # (logged at a rate limit)
        assert len(listings) - calls == 4  # one per change that changed something
        assert ranges() == before
    finally:
        following.cancel()


def _register_and_hang(url: str, cluster: str, ready: multiprocessing.synchronize.Event) -> None:
    registry = Registry(url, cluster=cluster)
    registry.register(record("doomed"), ttl=1)
    ready.set()
    time.sleep(60)  # until killed


def test_killed_server_disappears_when_its_lease_expires(
    pylm_etcd: LocalEtcd, pylm_registry: Registry
) -> None:
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    child = context.Process(
        target=_register_and_hang, args=(pylm_etcd.url, pylm_registry.config.cluster, ready)
    )
    child.start()
    try:
        assert ready.wait(20)
        assert [r.name for r in pylm_registry.instances()] == ["doomed"]
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
    finally:
        if child.is_alive():
            child.kill()  # the test failed before its kill: nothing left behind
        child.join(10)
    wait_for(lambda: pylm_registry.instances() == [], 15, "the killed server's record expiring")


def test_unreachable_registry_is_a_clear_error() -> None:
    port = free_port()
    with Registry(f"etcd://127.0.0.1:{port}", timeout=2) as registry:
        with pytest.raises(RegistryUnavailable, match=f"127.0.0.1:{port}"):
            registry.instances()
        with pytest.raises(RegistryUnavailable, match="pylm etcd"):
            registry.register(record())


@needs_etcd
def test_registration_survives_an_etcd_outage(tmp_path: object) -> None:
    with LocalEtcd() as etcd, Registry(etcd.url, cluster="outage", timeout=2) as registry:
        registration = registry.register(record(), ttl=1)
        etcd.stop()
        wait_for(lambda: registration.failures > 0, 10, "the keep-alive noticing the outage")
        etcd.start()
        wait_for(lambda: registration.registered, 10, "registering again")
        assert [r.instance for r in registry.instances()] == [registration.record.instance]


def test_wildcard_binds_advertise_the_address_facing_the_registry() -> None:
    # A registry on this host says nothing about the network: the host name.
    assert public_host([("127.0.0.1", 2379)]) == socket.gethostname()
    assert public_host([]) == socket.gethostname()
    assert public_host([("no-such-host.invalid", 2379)]) == socket.gethostname()
    # (tests/test_multihost.py checks the routed address across namespaces)


def test_records_of_one_registry_and_ttl_share_one_lease(pylm_registry: Registry) -> None:
    first, second = (pylm_registry.register(record(f"s{n}"), ttl=2) for n in range(2))
    other = pylm_registry.register(record("s2"), ttl=3)  # another TTL: a lease of its own

    prefix = f"{pylm_registry.config.prefix}instances/".encode()
    rows = pylm_registry._call(pylm_registry._etcd(lambda client: client.get_prefix(prefix)))
    found = {row.key.decode().split("/")[-2]: row.lease for row in rows}
    assert found["s0"] == found["s1"] != found["s2"]
    first.close()  # the others' lease lives on
    assert {r.name for r in pylm_registry.instances()} == {"s1", "s2"}
    threading.Event().wait(3)  # an observation window past the TTL: still kept alive
    assert {r.name for r in pylm_registry.instances()} == {"s1", "s2"}
    assert second.registered and second.failures == 0 and other.registered
    second.close()
    other.close()
    assert pylm_registry.instances() == []
    # etcd's own view: both leases were revoked with their last records (a
    # lease left to expire would still have its TTL, up to 3 s).
    for lease in {found["s0"], found["s2"]}:
        info = pylm_registry._call(
            pylm_registry._etcd(lambda client, lease=lease: client.get_lease_info(lease))
        )
        assert info.TTL == -1, f"lease {lease} still lives ({info.TTL} s)"


@needs_etcd
def test_a_changed_record_etcd_did_not_take_is_written_again(tmp_path: object) -> None:
    """Registration.update while etcd is down fails (typed), and once etcd
    is back the next keep-alive round writes the changed record, under the
    same lease (etcd keeps it across a restart). The TTL of 15 s puts the
    first round 5 s after registering, after the restart."""
    with LocalEtcd() as etcd, Registry(etcd.url, cluster="stale", timeout=1.0) as registry:
        record = InstanceRecord("stage", "chained", {"pull": "tcp://h:1"}, next="old.call")
        registration = registry.register(record, ttl=15)
        lease = registration._lease
        assert lease is not None
        granted = lease.lease.id
        etcd.stop()
        changed = registration.update(dataclasses.replace(record, next="new.call"))
        with pytest.raises(RegistryError):
            changed.result(10)
        assert lease.stale == [registration]
        etcd.start()
        assert [r.next for r in registry.instances("stage")] == ["old.call"]
        wait_for(lambda: lease.stale == [], 20, "the keep-alive round writing it again")
        assert [r.next for r in registry.instances("stage")] == ["new.call"]
        assert lease.alive and lease.lease.id == granted and registration.failures == 0
        registration.close()
