"""What the hosts of test_multihost run, called through netns_agent.py.

Each function runs inside one host's network namespace and keeps what it
starts in ``state``; ``stop_all`` (when the agent's input ends) stops it.
Results are plain JSON values.
"""

from __future__ import annotations

from typing import Any

from servers import Doubler

from pylm.base import BaseServer
from pylm.chained import LastServer, LoopClient
from pylm.chained import Server as Stage
from pylm.errors import PylmError
from pylm.parallel import Client as ParallelClient
from pylm.parallel import Master
from pylm.processes import free_port
from pylm.registry import LocalEtcd, Registry
from pylm.standalone import Client
from pylm.standalone import Server as RepServer
from pylm.telemetry.prometheus import LocalPrometheus
from pylm.telemetry.sd import ServiceDiscovery

TTL = 2.0
state: dict[str, Any] = {"servers": [], "closing": []}


# ------------------------------------------------------------------ etcd


def etcd_member(name: str, address: str) -> dict[str, int]:
    """Prepare a member bound to ``address``; its ports, for the initial cluster."""
    member = LocalEtcd(host=address, name=name, election_ms=500)
    member.client_port = free_port(address)
    member.peer_port = free_port(address)
    member.metrics_port = free_port(address)
    state["etcd"] = member
    state["closing"].append(member.cleanup)
    return {"client": member.client_port, "peer": member.peer_port}


def etcd_start(initial_cluster: str) -> None:
    member: LocalEtcd = state["etcd"]
    member.initial_cluster = initial_cluster
    member.start(wait=False)


def etcd_wait_healthy(timeout: float) -> None:
    state["etcd"].wait_healthy(timeout)


# ------------------------------------------------------------------ servers


class Echo(RepServer):
    def where(self, message: bytes) -> bytes:
        return message + b"@" + self.label

    label = b"?"


class Step(Stage):
    def tag(self, message: bytes) -> bytes:
        return message + b">" + self.label

    label = b"?"


class Last(LastServer):
    def done(self, message: bytes) -> bytes:
        return message + b">last"


def _registry(url: str, cluster: str) -> Registry:
    if "registry" not in state:
        state["registry"] = Registry(url, cluster=cluster, timeout=2)
        state["closing"].append(state["registry"].close)
    registry: Registry = state["registry"]
    return registry


def serve(url: str, cluster: str, label: str, names: list[str]) -> dict[str, dict[str, Any]]:
    """Start the servers ``names`` bound to every interface (0.0.0.0);
    what each registered (its endpoints and metrics URL)."""
    registry = _registry(url, cluster)
    options: dict[str, Any] = {"registry": registry, "ttl": TTL, "host": "0.0.0.0"}
    options["log_stdout"] = False
    started: dict[str, BaseServer] = {}
    for name in names:
        server: BaseServer
        if name == "echo":
            server = Echo("echo", **options)
            server.label = label.encode()
        elif name == "step":
            server = Step("step", next_call="last.done", **options)
            server.label = label.encode()
        elif name == "last":
            server = Last("last", **options)
        elif name == "master":
            server = Master("master", heartbeat=0.5, **options)
        elif name == "worker":
            server = Doubler(f"worker-{label}", "master", heartbeat=0.5, **options)
        else:
            raise ValueError(f"no server role {name!r}")
        server.start(background=True)
        state["servers"].append(server)
        started[name] = server
    records = {}
    for name, server in started.items():
        assert server.registration is not None
        record = server.registration.record
        records[name] = {"endpoints": record.endpoints, "metrics": record.metrics}
    return records


def registered() -> bool:
    """Whether every server of this host is registered right now."""
    return all(s.registration is not None and s.registration.registered for s in state["servers"])


# ------------------------------------------------------------------ clients


def clients(url: str, cluster: str) -> None:
    registry = _registry(url, cluster)
    state["echo"] = Client("echo", registry=registry, timeout=3)
    state["chain"] = LoopClient("step", registry=registry, timeout=3)
    state["parallel"] = ParallelClient("master", registry=registry, timeout=10)
    for client in ("echo", "chain", "parallel"):
        state["closing"].append(state[client].close)


def instances(name: str) -> list[str]:
    """The hosts of the instances of ``name`` the registry lists, one per
    instance (all the endpoints of one instance are on one host)."""
    hosts = []
    for record in state["registry"].instances(name):
        found = {a.split("//")[1].rsplit(":", 1)[0] for a in record.endpoints.values()}
        assert len(found) == 1, record
        hosts.append(found.pop())
    return sorted(hosts)


def call_echo(count: int, strict: bool) -> dict[str, int]:
    """``count`` calls; how many each host answered (and ``"failed"``).
    With ``strict`` a failed call raises."""
    answered: dict[str, int] = {}
    for n in range(count):
        try:
            answer = state["echo"].job("where", b"%d" % n)
        except PylmError:
            if strict:
                raise
            answered["failed"] = answered.get("failed", 0) + 1
            continue
        sent, _, host = answer.partition(b"@")
        assert sent == b"%d" % n, answer
        answered[host.decode()] = answered.get(host.decode(), 0) + 1
    return answered


def call_chain(count: int, strict: bool) -> dict[str, int]:
    """``count`` jobs through step (either host) and last; per step host."""
    answered: dict[str, int] = {}
    payloads = [b"%d" % n for n in range(count)]
    for outcome in state["chain"].results("tag", payloads):
        if outcome.error is not None:
            if strict:
                raise outcome.error
            answered["failed"] = answered.get("failed", 0) + 1
            continue
        sent, _, rest = outcome.value.partition(b">")
        host, _, last = rest.partition(b">")
        assert sent == b"%d" % outcome.index and last == b"last", outcome.value
        answered[host.decode()] = answered.get(host.decode(), 0) + 1
    return answered


def call_parallel(count: int) -> int:
    """``count`` jobs through the master; every one must be right."""
    payloads = [b"%d" % n for n in range(count)]
    results = list(state["parallel"].job("double", payloads))
    assert sorted(results) == sorted(p * 2 for p in payloads)
    return len(results)


# ------------------------------------------------------------------ monitoring


def prometheus(url: str, cluster: str, address: str) -> str:
    """Service discovery and Prometheus on this host; Prometheus' URL."""
    sd = ServiceDiscovery(_registry(url, cluster), host=address, port=0).start()
    state["closing"].append(sd.stop)
    config = f"""
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: pylm
    http_sd_configs:
      - url: {sd.url}
        refresh_interval: 1s
"""
    server = LocalPrometheus(config, host=address).start()
    state["prometheus"] = server
    state["closing"].append(server.stop)
    return server.url


def targets_up() -> dict[str, float]:
    """``up`` of every pylm target Prometheus scrapes now, by address."""
    samples = state["prometheus"].query('up{job="pylm"}')
    return {s["metric"]["instance"]: float(s["value"][1]) for s in samples}


def stop_all() -> None:
    for client in ("echo", "chain", "parallel"):
        state.pop(client, None)
    for server in reversed(state["servers"]):
        server.stop()
    state["servers"].clear()
    for close in reversed(state["closing"]):
        try:
            close()
        except Exception as exc:  # keep stopping the rest
            print(f"stopping: {exc!r}")
    state["closing"].clear()
