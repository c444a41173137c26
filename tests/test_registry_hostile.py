"""Hostile records written into etcd next to live servers (a real etcd, from
pylm.testing's fixtures): nothing that reads the registry stops, every tool
skips and counts them; and the wiring outlives its key's loss."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from helpers import pylm_command
from prerequisites import needs_etcd

from pylm.chained import LoopClient
from pylm.demo import Last, Step1, Step2
from pylm.errors import RegistryError
from pylm.parallel import Client as ParallelClient
from pylm.parallel import Master, Worker
from pylm.registry import InstanceRecord, LocalEtcd, Registry
from pylm.registry.malformed import malformed_records
from pylm.standalone import Client, Server
from pylm.telemetry.sd import ServiceDiscovery
from pylm.testing import wait_for


class Upper(Worker):
    def upper(self, message: bytes) -> bytes:
        return message.upper()


class Greeter(Server):
    def hello(self, message: bytes) -> bytes:
        return b"hello " + message


def put(registry: Registry, key: str, value: bytes) -> None:
    """Write ``value`` under the cluster's ``key``, as anyone with write access can."""
    full = f"{registry.config.prefix}{key}".encode()
    registry._call(registry._etcd(lambda client: client.put(full, value)))


def delete(registry: Registry, key: str) -> None:
    full = f"{registry.config.prefix}{key}".encode()
    registry._call(registry._etcd(lambda client: client.delete(full)))


def hostile(record: InstanceRecord, instance: str, **changes: Any) -> bytes:
    """A copy of a live ``record`` as JSON under a new id, with ``changes``
    (a value of ``...`` deletes that field)."""
    data = {**asdict(record), "instance": instance, **changes}
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


def keepers(registry: Registry) -> str:
    """The coroutines running on the registry client's loop, by name."""

    async def names() -> str:
        return " ".join(repr(task.get_coro()) for task in asyncio.all_tasks())

    return registry._call(names())


def skipped() -> int:
    return sum(malformed_records().counts().values())


def text_of(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return str(answer.read().decode())


def malformed_samples(text: str) -> dict[str, float]:
    found = {}
    for line in text.splitlines():
        if line.startswith("pylm_registry_records_malformed_total{"):
            labels, _, value = line.rpartition(" ")
            found[labels.split('reason="')[1].split('"')[0]] = float(value)
    return found


@pytest.fixture
def pipeline(pylm_registry: Registry) -> Iterator[list[Any]]:
    """step1 (wired from config/step1) -> step2 -> last, and a master with a worker."""
    pylm_registry.set_config("step1", "step2.bar")
    servers: list[Any] = [
        Last("last", registry=pylm_registry, log_stdout=False),
        Step2("step2", next_call="last.baz", registry=pylm_registry, log_stdout=False),
        Step1("step1", registry=pylm_registry, log_stdout=False),
        Master("m", registry=pylm_registry, log_stdout=False),
        Upper("w", "m", registry=pylm_registry, log_stdout=False),
    ]
    try:
        for server in servers:
            server.start(background=True)
        yield servers
    finally:
        for server in reversed(servers):
            server.stop()


def work(registry: Registry) -> None:
    """A job through the pipeline and one through the master, with clients found by name."""
    with LoopClient("step1", registry=registry, announce=False, timeout=10) as loop:
        assert list(loop.job("foo", [b"x"])) == [b"ACK: got it too, after you sent me x"]
    with ParallelClient("m", registry=registry, timeout=10) as master:
        assert master.eval("upper", b"abc") == b"ABC"


def test_running_stages_and_workers_keep_serving_next_to_hostile_records(
    pylm_registry: Registry, pipeline: list[Any]
) -> None:
    work(pylm_registry)
    step2 = pylm_registry.instances("step2")[0]
    master = pylm_registry.instances("m")[0]
    last = pylm_registry.instances("last")[0]
    before = skipped()
    bad = {
        # read by step1, which follows step2: it used to die in connect()
        "instances/step2/evil1": hostile(step2, "evil1", endpoints={"pull": 5555, "db": None}),
        "instances/step2/evil2": hostile(step2, "evil2", endpoints={"pull": "inproc://x"}),
        "instances/step2/evil3": hostile(step2, "evil3", pid=..., host=...),
        # read by the worker, which follows its master: every worker used to die
        "instances/m/evil4": hostile(master, "evil4", endpoints={"workers": 7}),
        "instances/m/evil5": hostile(master, "evil5", name="b"),
        # read by step2 and the loop client
        "instances/last/evil6": hostile(last, "evil6", started="yesterday"),
        "instances/last/evil7": b"{not json",
    }
    for key, value in bad.items():
        put(pylm_registry, key, value)
    # Each bad record is counted once in this process, however many followers read it.
    wait_for(lambda: skipped() - before == len(bad), 10, "every hostile record counted")
    assert [r.instance for r in pylm_registry.instances("step2")] == [step2.instance]
    assert skipped() - before == len(bad)  # a listing again: not counted twice
    for server in pipeline:
        assert server.running, f"{server.name} stopped"
    work(pylm_registry)
    assert pipeline[2].next_instances == {step2.endpoints["pull"]}
    metrics = pipeline[0].metrics_url  # what a server exports
    assert metrics is not None
    counted = malformed_samples(text_of(metrics))
    assert set(counted) >= {"json", "missing", "type", "endpoint", "key"}
    assert sum(counted.values()) >= len(bad)


def test_tools_and_clients_skip_hostile_records(
    pylm_etcd: LocalEtcd, pylm_cluster: str, pylm_registry: Registry
) -> None:
    with Greeter("greeter", registry=pylm_registry, log_stdout=False) as server:
        (record,) = pylm_registry.instances("greeter")
        changed: dict[str, dict[str, Any]] = {
            "e1": {"started": "yesterday"},
            "e2": {"endpoints": {"rep": "ws://h:1"}},
            "e3": {"pid": ..., "host": ...},
            "e4": {"name": "other"},
            "e5": {"endpoints": {"rep": ["tcp://h:1"]}},
        }
        for instance, changes in changed.items():
            put(
                pylm_registry, f"instances/greeter/{instance}", hostile(record, instance, **changes)
            )
        put(pylm_registry, "instances/greeter", b"{}")  # not an instances/NAME/ID key
        put(pylm_registry, "config/greeter", b'{"next": 5}')

        def pylm(*args: str) -> subprocess.CompletedProcess[str]:
            done = subprocess.run(
                pylm_command(pylm_etcd, pylm_cluster, *args),
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert "Traceback" not in done.stderr + done.stdout
            return done

        assert "greeter [standalone]  1 instance(s)" in pylm("ls").stdout
        assert "greeter [standalone]  1 instance(s)" in pylm("topology").stdout
        listed = json.loads(pylm("ls", "--json").stdout)["servers"]
        assert [i["instance"] for i in listed["greeter"]["instances"]] == [record.instance]
        assert pylm("call", "greeter", "hello", "world").stdout.strip() == "hello world"
        assert "skipping malformed registry record" in pylm("ls").stderr
        assert "[stages]" in pylm("topology", "export").stdout  # the bad config: skipped
        with Client("greeter", registry=pylm_registry, timeout=10) as client:
            assert client.endpoints == [record.endpoints["rep"]]
            assert client.job("hello", b"you") == b"hello you"
        assert server.running


def test_service_discovery_keeps_its_targets_and_counts_bad_records(
    pylm_registry: Registry, tmp_path: Path
) -> None:
    with (
        Greeter("greeter", registry=pylm_registry, log_stdout=False) as server,
        ServiceDiscovery(pylm_registry, port=0, file=tmp_path / "targets.json") as sd,
    ):
        assert server.metrics_url is not None
        address = server.metrics_url.split("/")[2]
        wait_for(lambda: [g["targets"] for g in sd.targets] == [[address]], 10, "the target")
        (record,) = pylm_registry.instances("greeter")
        put(pylm_registry, "instances/greeter/bad1", hostile(record, "bad1", metrics=9100))
        put(pylm_registry, "instances/greeter/bad2", hostile(record, "bad2", metrics="ftp://h/x"))
        # A good record after the bad ones: the list is not frozen.
        other = hostile(record, "ok1", name="other", metrics="http://127.0.0.9:9999/metrics")
        put(pylm_registry, "instances/other/ok1", other)
        wait_for(
            lambda: (
                sorted(g["targets"][0] for g in sd.targets) == sorted([address, "127.0.0.9:9999"])
            ),
            10,
            "the new target next to the first",
        )
        assert json.loads((tmp_path / "targets.json").read_text()) == sd.targets
        own = text_of(f"http://{sd.host}:{sd.port}/metrics")
        assert f'pylm_registry_up{{cluster="{pylm_registry.config.cluster}"}} 1.0' in own
        counted = malformed_samples(own)
        assert counted["type"] >= 1 and counted["endpoint"] >= 1
        assert set(counted) >= {"size", "json", "missing", "value", "key"}  # at 0 from the start


def test_a_stage_puts_its_deleted_wiring_back(pylm_registry: Registry) -> None:
    pylm_registry.set_config("step1", "step2.bar")
    with Step1("step1", registry=pylm_registry, log_stdout=False):
        delete(pylm_registry, "config/step1")
        wait_for(lambda: pylm_registry.get_config("step1") == {"next": "step2.bar"}, 10, "put back")
        pylm_registry.set_config("step1", "other.f")  # an operator's change is adopted ...
        delete(pylm_registry, "config/step1")
        wait_for(lambda: pylm_registry.get_config("step1") == {"next": "other.f"}, 10, "put back")
        typed = malformed_records().counts()["type"]
        put(pylm_registry, "config/step1", b'{"next": 1}')  # ... a malformed one left alone
        wait_for(lambda: malformed_records().counts()["type"] > typed, 10, "the stage reads it")
        with pytest.raises(ValueError, match="field 'next' must be a string"):
            pylm_registry.get_config("step1")
        assert "keep_config" in keepers(pylm_registry)
    wait_for(lambda: "keep_config" not in keepers(pylm_registry), 10, "the stopped stage lets go")


@needs_etcd
def test_wiring_outlives_an_etcd_data_loss() -> None:
    """A fresh etcd on the same address: servers register again, and a stage
    wired from the registry puts its wiring back, so that a stage started
    afterwards finds its next stage."""
    with LocalEtcd() as etcd, Registry(etcd.url, cluster="loss", timeout=2) as registry:
        registry.set_config("step1", "step2.bar")
        registry.set_config("step2", "last.baz")
        with Step1("step1", registry=registry, log_stdout=False):
            etcd.stop()
            assert etcd.data_dir is not None
            shutil.rmtree(etcd.data_dir / "data")
            lost = time.monotonic()
            etcd.start()
            with Registry(etcd.url, cluster="loss", timeout=2) as fresh:

                def restored() -> bool:
                    try:
                        return fresh.get_config("step1") is not None and bool(
                            fresh.instances("step1")
                        )
                    except RegistryError:  # etcd still starting
                        return False

                wait_for(restored, 30, "the stage's wiring and record back")
                took = time.monotonic() - lost
                assert fresh.get_config("step1") == {"next": "step2.bar"}
                assert fresh.get_config("step2") is None  # no running stage kept that one
                assert took < 15, f"wiring back {took:.2f} s after etcd came back empty"
                second = Step1("step1", registry=fresh, log_stdout=False)
                with second:
                    assert second.next_call == "step2.bar"


def test_topology_export_then_apply_restores_the_wiring(
    pylm_etcd: LocalEtcd, pylm_cluster: str, pylm_registry: Registry, tmp_path: Path
) -> None:
    wiring = {"step1": "step2.bar", "a.b": "c.d", "_we-ird.2": "last.baz"}
    for name, next_call in wiring.items():
        pylm_registry.set_config(name, next_call)

    def pylm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            pylm_command(pylm_etcd, pylm_cluster, "topology", *args),
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    exported = pylm("export")
    assert exported.returncode == 0, exported.stderr
    backup = tmp_path / "wiring.toml"
    backup.write_text(exported.stdout)
    prefix = f"{pylm_registry.config.prefix}config/".encode()
    pylm_registry._call(pylm_registry._etcd(lambda client: client.delete_prefix(prefix)))
    assert pylm_registry.configs() == {}
    applied = pylm("apply", str(backup))
    assert applied.returncode == 0, applied.stderr
    assert {name: c.next for name, c in pylm_registry.configs().items()} == wiring
    pylm_registry._call(pylm_registry._etcd(lambda client: client.delete_prefix(prefix)))
    empty = tmp_path / "empty.toml"
    empty.write_text(pylm("export").stdout)
    assert pylm("apply", str(empty)).returncode == 0 and pylm_registry.configs() == {}
