"""What the hosts of test_multihost run, called through netns_agent.py.

Each function runs inside one host's network namespace and keeps what it
starts in ``state``; ``stop_all`` (when the agent's input ends) stops it.
Results are plain JSON values.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
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
from pylm.standalone import Client, idempotent
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

    @idempotent
    def where_again(self, message: bytes) -> bytes:
        """As ``where``, declared safe to run twice: sent again when lost."""
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


def serve(
    url: str, cluster: str, label: str, names: list[str], ttl: float = TTL
) -> dict[str, dict[str, Any]]:
    """Start the servers ``names`` bound to every interface (0.0.0.0), with
    leases of ``ttl`` s; what each registered (its endpoints and metrics URL)."""
    registry = _registry(url, cluster)
    options: dict[str, Any] = {"registry": registry, "ttl": ttl, "host": "0.0.0.0"}
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


def clients(url: str, cluster: str, kinds: list[str] | None = None) -> None:
    """The clients ``kinds`` (all of echo, chain and parallel by default)."""
    registry = _registry(url, cluster)
    makers = {
        "echo": lambda: Client("echo", registry=registry, timeout=3),
        "chain": lambda: LoopClient("step", registry=registry, timeout=3),
        "parallel": lambda: ParallelClient("master", registry=registry, timeout=10),
    }
    for kind in kinds or list(makers):
        state[kind] = makers[kind]()
        state["closing"].append(state[kind].close)


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


class _Loop:
    """Calls made in a loop on a thread of the agent until stopped: for each,
    when it started (Unix time, the clock every namespace shares), how
    long it took and which host answered; the first failure ends it."""

    def __init__(self, call: Callable[[int], list[str]]) -> None:
        self.calls: list[tuple[float, float, str]] = []
        self.failure: str | None = None
        self._call = call
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loop")
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            began = time.time()
            try:
                hosts = self._call(n)
            except Exception as exc:
                self.failure = f"call {n}: {exc!r}"
                return
            took = time.time() - began
            self.calls.extend((began, took, host) for host in hosts)
            n += 1

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        return {"calls": self.calls, "failure": self.failure}


def _echo_again(n: int) -> list[str]:
    answer = state["echo"].job("where_again", b"%d" % n)
    sent, _, host = answer.partition(b"@")
    assert sent == b"%d" % n, answer
    return [host.decode()]


def _chain_batch(n: int) -> list[str]:
    """Ten jobs through the pipeline; the step host of each."""
    payloads = [b"%d.%d" % (n, i) for i in range(10)]
    hosts = []
    for outcome in state["chain"].results("tag", payloads):
        if outcome.error is not None:
            raise outcome.error
        sent, _, rest = outcome.value.partition(b">")
        host, _, last = rest.partition(b">")
        assert sent == payloads[outcome.index] and last == b"last", outcome.value
        hosts.append(host.decode())
    return hosts


def start_loops() -> None:
    """Idempotent echo calls and pipeline jobs, each in a loop of its own."""
    state["loops"] = {"echo": _Loop(_echo_again), "chain": _Loop(_chain_batch)}


def loop_first(since: float) -> dict[str, dict[str, float]]:
    """For each loop, when the first call started after ``since`` that each host answered."""
    firsts: dict[str, dict[str, float]] = {}
    for name, loop in state["loops"].items():
        first = firsts.setdefault(name, {})
        for began, _, host in list(loop.calls):
            if began >= since and began < first.get(host, float("inf")):
                first[host] = began
    return firsts


def stop_loops() -> dict[str, dict[str, Any]]:
    loops = state.pop("loops")
    return {name: loop.stop() for name, loop in loops.items()}


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
    if "loops" in state:
        stop_loops()
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
