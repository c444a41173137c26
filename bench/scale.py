"""Hundreds of pylm servers on one machine: registry, discovery, metrics, traffic.

Run from the repository root (needs the ``etcd`` and ``prometheus`` binaries
on PATH)::

    python -m bench.scale                  # the full run: 300 servers, about a minute
    python -m bench.scale --quick          # a smoke run: 30 servers, under 40 s
    python -m bench.scale --servers 500 --per-process 50 --json results.json

What runs
    One local etcd, then ``--servers`` pylm servers started with only a name,
    ``--per-process`` in each spawned process, all of a process sharing one
    :class:`~pylm.registry.Registry`, leases of ``--ttl`` seconds. Each process
    holds a mix (:func:`bench.scale_nodes.layout`): chained pipelines of
    :data:`~bench.scale_nodes.CHAIN` stages (the last a ``LastServer``),
    masters with their workers (:data:`~bench.scale_nodes.POOL` servers per
    group) and standalone servers, each group within one process. The
    processes are laid out so that the last ones hold exactly ``--kill``
    servers: those are the victims of the kill at the end. A real Prometheus
    scrapes every process's ``/metrics`` through pylm's service discovery
    (:class:`~pylm.telemetry.sd.ServiceDiscovery`, http_sd), and scrapes the discovery's
    own metrics. A client process drives jobs through every pipeline, master
    and standalone server of the other processes, one thread per kind, one
    job at a time, ``--rate`` jobs a second each, from the start of the
    traffic to the end of the run, the kill included.

What is measured
    * launch → every server listed by ``Registry.instances()``, then →
      Prometheus scraping every process and seeing every server
      (``pylm_server_info``);
    * the CPU the servers use with no traffic (``--idle`` seconds);
    * the keep-alive load on etcd over ``--window`` seconds, from etcd's
      ``/metrics`` (gRPC LeaseKeepAlive messages received; expected:
      processes / (ttl / 3) a second, as the servers of a process share one
      lease), with the CPU every part of the run
      used meanwhile (etcd, the server processes, the client, Prometheus,
      and this process, which runs the service discovery);
    * ``Registry.instances()`` with every record, and the commands ``pylm ls
      --json`` and ``pylm topology`` (whole processes, given the registry
      through PYLM_REGISTRY and PYLM_CLUSTER; ``ls`` also on an empty cluster,
      for Python's start-up);
    * Prometheus' scrape duration per target (``scrape_duration_seconds``,
      median and max over the run since every target was up), the samples per
      scrape, and how many targets are up;
    * resident memory per server (the server processes' RSS / their servers,
      from /proc);
    * the victims' processes SIGKILLed together: the time until
      ``Registry.instances()`` no longer lists their servers, until the
      service discovery's targets drop their processes, and until
      Prometheus' active targets do;
    * the traffic: jobs a second and errors per kind of target (each result
      checked), latency, and the errors while the victims died.

Every process and every server the run starts is stopped when it ends,
fails or is interrupted (Ctrl-C, SIGTERM); the JSON output lists them and
whether any was left running.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from bench.harness import (
    SLACK,
    BenchError,
    Child,
    Children,
    Log,
    expect,
    machine,
    positive,
    pylm_source,
    send,
    stderr_log,
)
from bench.registry import (
    COUNT_POLL,
    REGISTER_LIMIT,
    Row,
    Samples,
    _interrupt,
    cpu_seconds,
    etcd_version,
    fresh_etcd,
    metric,
    ms,
    scrape,
    spawn,
    spread,
    surface,
    table,
    timed,
    wait_count,
)
from bench.registry_nodes import rss_kib
from bench.scale_nodes import CHAIN, KINDS, POOL, Group, mixed_main, traffic_main

if TYPE_CHECKING:
    from pylm.registry import InstanceRecord, LocalEtcd, Registry
    from pylm.telemetry.prometheus import LocalPrometheus
    from pylm.telemetry.sd import ServiceDiscovery

PACKAGES = ("pyzmq", "pylm", "aetcd", "grpcio", "prometheus-client")
CLUSTER = "scale"
JOB_TIMEOUT = 10.0  # s a traffic job gets before it counts as an error
PROMETHEUS_LIMIT = 60.0  # s Prometheus gets to scrape every server once they are registered
PROMETHEUS_POLL = 0.2  # s between two queries while waiting for Prometheus
SD_REFRESH = 1  # s, Prometheus' http_sd refresh interval
DISCOVERY = (
    f"through pylm sd (http_sd, refreshed every {SD_REFRESH} s; Prometheus hands what it"
    " discovers to its scrapers at most every 5 s)"
)
CPU = "process_cpu_seconds_total"  # etcd's and Prometheus' CPU time, in their /metrics


@dataclass(frozen=True)
class Options:
    """What to run and measure."""

    servers: int
    per_process: int
    kill: int  # servers SIGKILLed at the end, whole processes
    ttl: float  # s, every server's lease
    rate: float  # jobs a second per kind of target (0: unpaced)
    idle: float  # s over which the CPU of the servers without traffic is measured
    window: float  # s over which the keep-alive load is measured
    settle: float  # s the fleet runs before the window, so that keep-alives spread out
    scrape_interval: int  # s, Prometheus'
    calls: int  # Registry.instances() calls timed
    runs: int  # runs of each pylm command timed

    @property
    def fleet(self) -> list[int]:
        """How many servers each process holds: the survivors' processes,
        then the victims', which hold ``kill`` servers in all."""
        return split(self.servers - self.kill, self.per_process) + split(
            self.kill, self.per_process
        )

    @property
    def victims(self) -> int:
        """How many of the last processes of :attr:`fleet` are killed."""
        return len(split(self.kill, self.per_process))


def split(total: int, size: int) -> list[int]:
    full, rest = divmod(total, size)
    return [size] * full + ([rest] if rest else [])


FULL = Options(300, 25, 30, 3.0, 100.0, 5.0, 10.0, 3.0, 2, 20, 3)
QUICK = Options(30, 10, 5, 3.0, 100.0, 1.0, 2.0, 0.0, 1, 5, 1)


@dataclass(frozen=True)
class Services:
    """What the run starts in this process, for the whole run."""

    etcd: LocalEtcd
    registry: Registry
    sd: ServiceDiscovery
    prometheus: LocalPrometheus


def prometheus_config(sd: ServiceDiscovery, interval: int) -> str:
    return f"""
global:
  scrape_interval: {interval}s
  evaluation_interval: {interval}s
scrape_configs:
  - job_name: pylm
    http_sd_configs:
      - url: {sd.url}
        refresh_interval: {SD_REFRESH}s
  - job_name: pylm-sd
    static_configs:
      - targets: ["{sd.host}:{sd.port}"]
"""


def value_of(prometheus: LocalPrometheus, expr: str) -> float:
    """The sum of what an instant query returns; 0 for nothing."""
    return sum(float(sample["value"][1]) for sample in prometheus.query(expr))


def prometheus_version() -> str:
    try:
        out = subprocess.run(
            ["prometheus", "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except OSError:
        return "not found"
    words = (out.stdout or out.stderr).split()
    return words[2] if len(words) > 2 else "unknown"


def pylm_command(url: str, cluster: str, *args: str) -> tuple[float, str]:
    """Run ``pylm ARGS`` as a user does, the registry in the environment;
    how long it took, and its output."""
    env = {**os.environ, "PYLM_REGISTRY": url, "PYLM_CLUSTER": cluster}
    command = [sys.executable, "-m", "pylm.cli", *args]
    began = time.monotonic()
    try:
        run = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=SLACK, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"`pylm {' '.join(args)}` took more than {SLACK:g} s") from None
    took = time.monotonic() - began
    if run.returncode != 0:
        raise BenchError(f"`pylm {' '.join(args)}` failed ({run.returncode}): {run.stderr[-2000:]}")
    return took, run.stdout


def listed_by_ls(output: str) -> int:
    """The instances ``pylm ls --json`` lists."""
    servers = json.loads(output)["servers"]
    return sum(len(server["instances"]) for server in servers.values())


def listed_by_topology(output: str) -> int:
    """The instances ``pylm topology`` lists (a ``N instance(s)`` per server)."""
    return sum(int(count) for count in re.findall(r"(\d+) instance\(s\)$", output, re.MULTILINE))


# ------------------------------------------------------------------ processes


def descendants() -> dict[int, str]:
    """This process's descendants (but Python's own resource tracker, which
    ends with this process): pid -> command line."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                    parents[int(entry)] = int(stat.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
    found: dict[int, str] = {}
    level = {os.getpid()}
    while level:
        level = {pid for pid, parent in parents.items() if parent in level}
        for pid in level:
            command = command_line(pid)
            if command is not None and "resource_tracker" not in command:
                found[pid] = command
    return found


def command_line(pid: int) -> str | None:
    """The command line of ``pid`` if it runs (a zombie does not); else None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            if stat.read().rpartition(")")[2].split()[0] == "Z":
                return None
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (OSError, IndexError):
        return None


def still_running(started: dict[int, str]) -> list[int]:
    """Those of ``started`` (pid -> command line) that still run."""
    return sorted(pid for pid, command in started.items() if command_line(pid) == command)


# ------------------------------------------------------------------------ the run


@dataclass(frozen=True)
class Usage:
    """What etcd counted over a window, and the CPU each part of the run used."""

    window: float  # s
    etcd_before: Samples
    etcd_after: Samples
    cores: dict[str, float]  # part -> CPU seconds a second

    def rate(self, name: str, *labels: str) -> float:
        """How fast etcd's counter ``name`` (the series with ``labels``) grew."""
        grown = metric(self.etcd_after, name, *labels) - metric(self.etcd_before, name, *labels)
        return grown / self.window

    def text(self, *leave_out: str) -> str:
        return "; ".join(
            f"{part} {used:.2f}" for part, used in self.cores.items() if part not in leave_out
        )


@dataclass
class Traffic:
    """The traffic client and its snapshots."""

    child: Child
    groups: list[Group]
    first: dict[str, Any] = field(default_factory=dict)  # counts when it started


def kind_counts(groups: Sequence[Group]) -> dict[str, int]:
    """How many servers of each role the groups hold."""
    return {
        "chain stages": sum(group.size for group in groups if group.kind == "chain"),
        "masters": sum(group.kind == "pool" for group in groups),
        "workers": sum(group.size - 1 for group in groups if group.kind == "pool"),
        "standalone": sum(group.kind == "solo" for group in groups),
    }


class Scale:
    """One run: the phases in order, each adding rows."""

    def __init__(self, options: Options, log: Log) -> None:
        self.options = options
        self.log = log
        self.rows: list[Row] = []
        self.children = Children(multiprocessing.get_context("spawn"))
        self.started: dict[int, str] = {}  # every process the run started: pid -> command
        self.registered = 0  # instances listed once all had registered
        self.fleet: list[Child] = []
        self.groups: list[list[Group]] = []  # per fleet process
        self.bare_kib = 0  # the fleet's RSS with pylm imported and the registries open
        self.roles: dict[int, str] = {}  # pid -> what it is, of the processes this run spawned
        self.launched = 0.0
        self.all_up = 0.0  # when Prometheus first scraped every server
        self.traffic: Traffic | None = None

    def note_processes(self) -> None:
        self.started.update(descendants())

    def run(self) -> None:
        from pylm.registry import Registry
        from pylm.telemetry.prometheus import LocalPrometheus
        from pylm.telemetry.sd import ServiceDiscovery

        with ExitStack() as stack:
            etcd = stack.enter_context(fresh_etcd(self.children))  # children stop before it
            registry = stack.enter_context(Registry(etcd.url, cluster=CLUSTER))
            sd = stack.enter_context(ServiceDiscovery(registry, port=0))
            config = prometheus_config(sd, self.options.scrape_interval)
            prometheus = stack.enter_context(LocalPrometheus(config))
            services = Services(etcd, registry, sd, prometheus)
            self.note_processes()
            self.log(f"etcd at {etcd.url}, pylm sd at {sd.url}, Prometheus at {prometheus.url}")
            for phase in (
                self.launch,
                self.wait_scraped,
                self.measure_idle,
                self.start_traffic,
                self.measure_keepalive,
                self.measure_queries,
                self.measure_scrapes,
                self.measure_memory,
                self.measure_kill,
                self.finish_traffic,
            ):
                phase(services)

    # ---------------------------------------------------------------- start-up

    def launch(self, services: Services) -> None:
        """Start the server processes together; time them into the registry."""
        sizes, total = self.options.fleet, self.options.servers
        url, ttl = services.etcd.url, f"{self.options.ttl:g}"
        self.launched = time.monotonic()
        self.fleet = [
            spawn(
                self.children,
                f"servers {index}",
                mixed_main,
                url,
                CLUSTER,
                f"n{index:02d}",
                str(size),
                ttl,
            )
            for index, size in enumerate(sizes)
        ]
        self.roles.update((pid, f"servers n{index:02d}") for index, pid in enumerate(self.pids()))
        self.note_processes()
        self.registered = wait_count(
            services.registry, lambda count: count >= total, REGISTER_LIMIT, self.fleet
        )
        listed = time.monotonic() - self.launched
        infos = [expect(child, "ready", SLACK)[0] for child in self.fleet]
        self.bare_kib = sum(int(info["rss_bare_kib"]) for info in infos)
        self.groups = [[Group(*group) for group in info["groups"]] for info in infos]
        done = sorted(info["registered"] - self.launched for info in infos)
        first = min(info["first"] for info in infos) - self.launched
        self.log(f"{total} servers listed after {listed:.2f} s")
        mix = kind_counts([group for groups in self.groups for group in groups])
        shape = f"{len(sizes)} processes of {sizes[0]}" + (
            f" (smallest {min(sizes)})" if min(sizes) != sizes[0] else ""
        )
        self.rows.append(
            Row(
                "register",
                f"{total} servers ({shape}): launch → all listed by instances()",
                f"{listed:.2f} s",
                ", ".join(f"{count} {role}" for role, count in mix.items())
                + f"; the first servers registered after {first:.2f} s (Python and pylm"
                f" starting), the last of each process after {done[len(done) // 2]:.2f} s"
                f" (median process) and {done[-1]:.2f} s (slowest)"
                + (f"; UNEXPECTED: {self.registered} listed" if self.registered != total else ""),
                listed,
                "s",
                {"mix": mix, "first_registered_s": first, "process_done_s": done},
                failed=self.registered != total,
            )
        )

    def wait_scraped(self, services: Services) -> None:
        """Wait for Prometheus to scrape every process and see every server."""
        prometheus, total, targets = services.prometheus, self.options.servers, len(self.fleet)
        deadline = time.monotonic() + PROMETHEUS_LIMIT
        while True:
            up = value_of(prometheus, 'count(up{job="pylm"} == 1)')
            seen = value_of(prometheus, 'count(pylm_server_info{job="pylm"})')
            if up >= targets and seen >= total:
                break
            if time.monotonic() > deadline:
                raise BenchError(
                    f"after {PROMETHEUS_LIMIT:g} s Prometheus scraped {up:.0f} of {targets}"
                    f" targets and saw {seen:.0f} of {total} servers (pylm sd lists"
                    f" {len(services.sd.targets)} targets)"
                )
            surface(self.fleet)
            time.sleep(PROMETHEUS_POLL)
        self.all_up = time.monotonic()
        took = self.all_up - self.launched
        self.log(f"Prometheus scrapes every server after {took:.2f} s")
        self.rows.append(
            Row(
                "scraped",
                f"launch → Prometheus scrapes all {targets} processes and sees all {total} servers",
                f"{took:.2f} s",
                f"{DISCOVERY}, scrape interval {self.options.scrape_interval} s; every server"
                " counted by its pylm_server_info series",
                took,
                "s",
            )
        )

    def start_traffic(self, services: Services) -> None:
        """Start the client on every group of the processes that survive."""
        survivors = self.groups[: len(self.groups) - self.options.victims]
        groups = [group for groups in survivors for group in groups]
        targets = json.dumps([[group.kind, group.entry, group.size] for group in groups])
        rate = f"{self.options.rate:g}"
        child = spawn(
            self.children,
            "traffic",
            traffic_main,
            services.etcd.url,
            CLUSTER,
            targets,
            rate,
            f"{JOB_TIMEOUT:g}",
        )
        self.roles[child.process.pid or 0] = "client"
        self.note_processes()
        expect(child, "ready", 2 * SLACK)
        self.traffic = Traffic(child, groups)
        self.traffic.first = self.traffic_counts()
        self.log(f"traffic on {len(groups)} targets")

    def traffic_counts(self) -> dict[str, Any]:
        assert self.traffic is not None
        send(self.traffic.child, ("stats",))
        (counts,) = expect(self.traffic.child, "stats", SLACK)
        return dict(counts)

    def pids(self) -> list[int]:
        """The server processes' ids."""
        return [pid for child in self.fleet if (pid := child.process.pid) is not None]

    # ---------------------------------------------------------------- steady state

    def usage(self, services: Services, seconds: float) -> Usage:
        """Sleep ``seconds``; what etcd counted and who used the CPU meanwhile."""
        processes = {"servers": self.pids()}
        if self.traffic is not None and self.traffic.child.process.pid is not None:
            processes["client"] = [self.traffic.child.process.pid]
        processes["this process (pylm sd)"] = [os.getpid()]

        def cpu() -> dict[str, float]:
            return {name: sum(map(cpu_seconds, pids)) for name, pids in processes.items()}

        etcd, prometheus = services.etcd.metrics_port, services.prometheus.port
        etcd_before, prometheus_before, cpu_before = scrape(etcd), scrape(prometheus), cpu()
        began = time.monotonic()
        time.sleep(seconds)
        etcd_after, prometheus_after, cpu_after = scrape(etcd), scrape(prometheus), cpu()
        window = time.monotonic() - began
        cores = {
            "etcd": (metric(etcd_after, CPU) - metric(etcd_before, CPU)) / window,
            "Prometheus": (metric(prometheus_after, CPU) - metric(prometheus_before, CPU)) / window,
            **{name: (cpu_after[name] - cpu_before[name]) / window for name in processes},
        }
        return Usage(window, etcd_before, etcd_after, cores)

    def measure_idle(self, services: Services) -> None:
        """The CPU the cluster uses with no traffic: keep-alives, heartbeats,
        scrapes, the following of the registry."""
        total = self.options.servers
        used = self.usage(services, self.options.idle)
        servers = used.cores["servers"]
        self.rows.append(
            Row(
                "idle-cpu",
                f"CPU used by the {total} servers with no traffic",
                f"{servers:.2f} cores",
                f"{servers / total * 1000:.1f} ms of CPU a second per server, over"
                f" {used.window:.1f} s (keep-alives, workers' heartbeats, the serving loops'"
                f" timers, scrapes); meanwhile {used.text('servers')}",
                servers,
                "cores",
                {"cores": used.cores, "window_s": used.window},
            )
        )

    def measure_keepalive(self, services: Services) -> None:
        """etcd's keep-alive load over the window, and who used the CPU."""
        total, ttl = self.options.servers, self.options.ttl
        time.sleep(self.options.settle)
        used = self.usage(services, self.options.window)
        keep_alives = used.rate("grpc_server_msg_received_total", 'grpc_method="LeaseKeepAlive"')
        calls = used.rate("grpc_server_started_total")
        leases = len(self.fleet)  # one per process: its servers share their Registry's lease
        expected = leases / (ttl / 3)
        self.log(f"keep-alives: {keep_alives:,.0f}/s (expected {expected:,.0f}/s)")
        self.rows.append(
            Row(
                "keepalive",
                f"etcd keep-alive load, {total} servers in {leases} leases of {ttl:g} s",
                f"{keep_alives:,.0f} req/s",
                f"expected {leases} / ({ttl:g} s / 3) = {expected:,.0f}/s (the servers of a"
                f" process share one lease: {total / (ttl / 3):,.0f}/s if each had its own); over"
                f" {used.window:.1f} s from etcd's /metrics (gRPC LeaseKeepAlive messages"
                f" received; all gRPC calls {calls:,.0f}/s), with the traffic running",
                keep_alives,
                "req/s",
                {"expected_per_s": expected, "grpc_calls_per_s": calls, "window_s": used.window},
            )
        )
        busy = sum(used.cores.values())
        self.rows.append(
            Row(
                "cpu",
                "CPU used meanwhile (cores)",
                f"{busy:.2f} of {os.cpu_count()}",
                used.text(),
                busy,
                "cores",
                {"cores": used.cores},
            )
        )

    def measure_queries(self, services: Services) -> None:
        """Registry.instances(), `pylm ls --json` and `pylm topology`."""
        registry, url, total = services.registry, services.etcd.url, self.options.servers
        counts: list[int] = []
        calls = timed(lambda: counts.append(len(registry.instances())), self.options.calls)
        self.rows.append(
            Row(
                "instances",
                f"Registry.instances() with {total} records",
                spread(calls),
                f"median (min to max) of {len(calls)} calls from a connected client",
                statistics.median(calls) * 1000,
                "ms",
                {"samples_s": calls, "listed": counts},
                failed=set(counts) != {total},
            )
        )
        commands: list[tuple[str, list[str], Callable[[str], int]]] = [
            ("ls", ["ls", "--json"], listed_by_ls),
            ("topology", ["topology"], listed_by_topology),
        ]
        for key, args, listed in commands:
            label = f"`pylm {' '.join(args)}` with {total} records"
            samples, found = [], []
            try:
                for _ in range(self.options.runs):
                    took, output = pylm_command(url, CLUSTER, *args)
                    samples.append(took)
                    found.append(listed(output))
                empty = [pylm_command(url, "empty", *args)[0] for _ in range(self.options.runs)]
            except BenchError as error:  # the other measurements still run
                self.log(f"pylm {' '.join(args)} FAILED: {error}")
                self.rows.append(Row(key, label, "failed", str(error)[:300], failed=True))
                continue
            self.log(f"pylm {' '.join(args)}: {spread(samples)}")
            self.rows.append(
                Row(
                    key,
                    label,
                    spread(samples),
                    f"the whole command, Python's start-up included (on an empty cluster:"
                    f" {spread(empty)}); {len(samples)} run(s); it listed {sorted(set(found))}"
                    " instances",
                    statistics.median(samples) * 1000,
                    "ms",
                    {"samples_s": samples, "empty_cluster_s": empty, "listed": found},
                    failed=set(found) != {total},
                )
            )

    def measure_scrapes(self, services: Services) -> None:
        """Prometheus' scrapes of the processes since all of them were up."""
        prometheus, total, targets = services.prometheus, self.options.servers, len(self.fleet)
        span = max(math.ceil(time.monotonic() - self.all_up), 2 * self.options.scrape_interval)
        durations = f'scrape_duration_seconds{{job="pylm"}}[{span}s]'
        median = value_of(prometheus, f"quantile(0.5, quantile_over_time(0.5, {durations}))")
        longest = value_of(prometheus, f"max(max_over_time({durations}))")
        samples = value_of(prometheus, 'sum(scrape_samples_scraped{job="pylm"})')
        up = value_of(prometheus, 'count(up{job="pylm"} == 1)')
        listed = value_of(prometheus, 'count(up{job="pylm"})')
        seen = value_of(prometheus, 'count(pylm_server_info{job="pylm"})')
        sd_count = value_of(prometheus, 'sum(pylm_registry_instances{job="pylm-sd"})')
        self.rows.append(
            Row(
                "scrape",
                f"Prometheus scrape of a process ({targets} targets, {total} servers)",
                f"{ms(median)} (max {ms(longest)})",
                f"scrape_duration_seconds, median of the targets' medians and max over the"
                f" {span} s since all were up, every {self.options.scrape_interval} s;"
                f" {samples:,.0f} samples per round ({samples / max(listed, 1):,.0f} a target)",
                median * 1000,
                "ms",
                {"max_ms": longest * 1000, "samples_per_round": samples, "span_s": span},
            )
        )
        self.rows.append(
            Row(
                "targets",
                "Prometheus targets up / processes",
                f"{up:.0f} / {targets}",
                f"{listed:.0f} targets discovered; {seen:.0f} servers seen (pylm_server_info);"
                f" pylm sd's own metrics count {sd_count:.0f} instances",
                up,
                "targets",
                {"discovered": listed, "servers_seen": seen, "sd_instances": sd_count},
                failed=(up, listed, seen, sd_count) != (targets, targets, total, total),
            )
        )

    def measure_memory(self, services: Services) -> None:
        assert self.traffic is not None and self.traffic.child.process.pid is not None
        total = self.options.servers
        rss = [rss_kib(pid) for pid in self.pids()]
        etcd_mib = metric(scrape(services.etcd.metrics_port), "process_resident_memory_bytes")
        prometheus_mib = metric(scrape(services.prometheus.port), "process_resident_memory_bytes")
        client = rss_kib(self.traffic.child.process.pid)
        self.rows.append(
            Row(
                "memory",
                "memory per server",
                f"{sum(rss) / total:,.0f} KiB",
                f"resident memory of the {len(rss)} server processes / {total} servers (median"
                f" process {statistics.median(rss) / 1024:,.0f} MiB); above what they held with"
                f" pylm imported and their Registry open: {(sum(rss) - self.bare_kib) / total:,.0f}"
                f" KiB a server; the client process"
                f" {client / 1024:,.0f} MiB, etcd {etcd_mib / 2**20:,.0f} MiB, Prometheus"
                f" {prometheus_mib / 2**20:,.0f} MiB",
                sum(rss) / total,
                "KiB",
                {
                    "rss_kib": rss,
                    "bare_rss_kib": self.bare_kib,
                    "client_kib": client,
                    "etcd_mib": etcd_mib / 2**20,
                    "prometheus_mib": prometheus_mib / 2**20,
                },
            )
        )

    # ---------------------------------------------------------------- the kill

    def measure_kill(self, services: Services) -> None:
        """SIGKILL the victims' processes; time each view of the cluster
        until it no longer has them."""
        registry, sd, prometheus = services.registry, services.sd, services.prometheus
        count, ttl = self.options.kill, self.options.ttl
        victims = self.fleet[len(self.fleet) - self.options.victims :]
        survivors = self.fleet[: len(self.fleet) - self.options.victims]
        pids = {child.process.pid for child in victims}
        labels = {str(pid) for pid in pids}

        def theirs(records: list[InstanceRecord]) -> int:
            return sum(record.pid in pids for record in records)

        if theirs(registry.instances()) != count:
            raise BenchError(f"the victims' processes do not hold {count} registered servers")
        before = self.traffic_counts()
        for child in victims:
            child.process.kill()
        killed = time.monotonic()
        self.log(f"killed {len(victims)} processes holding {count} servers")
        seen: dict[str, float] = {}

        def note(what: str, done: bool) -> None:
            if done and what not in seen:
                seen[what] = time.monotonic() - killed

        deadline = killed + 3 * ttl + SLACK
        while True:
            note("registry", theirs(registry.instances()) == 0)
            note("sd", not any(group["labels"]["pylm_pid"] in labels for group in sd.targets))
            active = prometheus.api("targets", state="active")["activeTargets"]
            mine = [target for target in active if target["labels"].get("pylm_pid") in labels]
            note("prometheus down", any(target["health"] == "down" for target in mine))
            note("prometheus", not mine)
            if {"registry", "sd", "prometheus"} <= set(seen):
                break
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{time.monotonic() - killed:.0f} s after the kill, still not gone from:"
                    f" {sorted({'registry', 'sd', 'prometheus'} - set(seen))}"
                )
            surface(survivors)
            time.sleep(COUNT_POLL)
        after = self.traffic_counts()
        remaining = len(registry.instances())
        self.log(f"killed servers gone from instances() after {seen['registry']:.2f} s")
        expected = f"lease TTL {ttl:g} s, refreshed every {ttl / 3:g} s: between {ttl * 2 / 3:g}"
        down = seen.get("prometheus down")
        views = [
            (
                "kill-registry",
                "instances() no longer lists them",
                f"{expected} and {ttl:g} s plus etcd's expiry check; {remaining} listed then",
                remaining != self.options.servers - count,
            ),
            (
                "kill-sd",
                "pylm sd's targets drop their processes",
                "the service discovery follows the registry (an etcd watch)",
                False,
            ),
            (
                "kill-prometheus",
                "Prometheus' active targets drop them",
                f"{DISCOVERY}; "
                + (
                    f"a scrape had found them down after {down:.2f} s"
                    if down is not None
                    else "no scrape found them down before"
                ),
                False,
            ),
        ]
        for key, label, detail, failed in views:
            self.rows.append(
                Row(
                    key,
                    f"{count} servers SIGKILLed ({len(victims)} process"
                    f"{'es' if len(victims) > 1 else ''}) → {label}",
                    f"{seen[key.removeprefix('kill-')]:.2f} s",
                    detail + f"; polled every {COUNT_POLL * 1000:g} ms",
                    seen[key.removeprefix("kill-")],
                    "s",
                    failed=failed,
                )
            )
        errors = sum(after["kinds"][k]["errors"] - before["kinds"][k]["errors"] for k in KINDS)
        jobs = sum(after["kinds"][k]["ok"] - before["kinds"][k]["ok"] for k in KINDS)
        self.rows.append(
            Row(
                "kill-traffic",
                "traffic errors meanwhile (on the survivors)",
                f"{errors}",
                f"{jobs:,} jobs done in the {after['at'] - before['at']:.1f} s from the kill to"
                " the last view dropping the victims",
                errors,
                "errors",
                {"jobs": jobs},
                failed=errors > 0,
            )
        )

    def finish_traffic(self, services: Services) -> None:
        assert self.traffic is not None
        send(self.traffic.child, ("finish",))
        (last,) = expect(self.traffic.child, "done", JOB_TIMEOUT + SLACK)
        first = self.traffic.first
        elapsed = last["at"] - first["at"]
        groups = self.traffic.groups
        titles = {
            "chain": f"{{}} pipelines of up to {CHAIN} stages",
            "pool": f"{{}} masters with up to {POOL - 1} workers",
            "solo": "{} standalone servers",
        }
        for kind in KINDS:
            if kind not in last["kinds"]:
                continue
            now, then = last["kinds"][kind], first["kinds"][kind]
            jobs, errors = now["ok"] - then["ok"], now["errors"] - then["errors"]
            latencies = sorted(now["latencies_s"])
            middle = latencies[len(latencies) // 2] if latencies else math.nan
            tail = latencies[int(len(latencies) * 0.99)] if latencies else math.nan
            paced = f"paced at {self.options.rate:g}/s" if self.options.rate else "unpaced"
            title = titles[kind].format(sum(group.kind == kind for group in groups))
            self.rows.append(
                Row(
                    f"traffic-{kind}",
                    f"traffic through {title}",
                    f"{jobs / elapsed:,.0f} jobs/s, {errors} errors",
                    f"{jobs:,} jobs over {elapsed:.1f} s, one at a time, round the targets,"
                    f" {paced}, every result checked; latency median {ms(middle)}, 99th"
                    f" percentile {ms(tail)}"
                    + (f"; errors: {' | '.join(now['error_samples'])}" if errors else ""),
                    jobs / elapsed,
                    "jobs/s",
                    {
                        "jobs": jobs,
                        "errors": errors,
                        "seconds": elapsed,
                        "latency_median_s": middle,
                        "latency_p99_s": tail,
                        "error_samples": now["error_samples"],
                    },
                    failed=errors > 0 or jobs == 0,
                )
            )


# ------------------------------------------------------------------------ report


def settings_line(options: Options) -> str:
    return (
        f"{options.servers} servers, {options.per_process} a process, leases of"
        f" {options.ttl:g} s (short, so that expiry is quick to see); keep-alives measured over"
        f" {options.window:g} s; traffic {options.rate:g} jobs/s per kind of target"
        f" (0: unpaced); Prometheus scrapes every {options.scrape_interval} s; {options.kill}"
        " servers killed at the end."
    )


def report(options: Options, rows: Sequence[Row], info: dict[str, str], elapsed: float) -> str:
    pairs = "; ".join(f"{key}: {value}" for key, value in info.items())
    return "\n".join(
        [
            f"Machine: {pairs}",
            "",
            settings_line(options),
            "",
            table(rows),
            "",
            f"Total run time: {elapsed:.1f} s",
        ]
    )


# ---------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> tuple[Options, str | None]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale",
        description="Hundreds of pylm servers on one machine: registry, discovery, metrics,"
        " traffic.",
    )
    parser.add_argument("--servers", type=positive(int), help=f"servers ({FULL.servers})")
    parser.add_argument(
        "--per-process", type=positive(int), help=f"servers per process ({FULL.per_process})"
    )
    parser.add_argument(
        "--kill", type=positive(int), help=f"servers killed at the end, by process ({FULL.kill})"
    )
    parser.add_argument("--ttl", type=positive(float), help=f"lease TTL, s ({FULL.ttl:g})")
    parser.add_argument(
        "--rate",
        type=float,
        help=f"traffic jobs/s per kind of target, 0: unpaced ({FULL.rate:g})",
    )
    parser.add_argument(
        "--idle", type=positive(float), help=f"s of CPU measured without traffic ({FULL.idle:g})"
    )
    parser.add_argument(
        "--window", type=positive(float), help=f"s of keep-alives measured ({FULL.window:g})"
    )
    parser.add_argument("--json", metavar="PATH", help="also write every number to PATH")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK.servers} servers, {QUICK.kill} killed, {QUICK.window:g} s window",
    )
    args = parser.parse_args(argv)
    chosen = QUICK if args.quick else FULL
    if args.ttl is not None and args.ttl < 1:
        parser.error("--ttl must be at least 1 s (etcd leases count whole seconds)")
    if args.rate is not None and args.rate < 0:
        parser.error("--rate must be 0 (unpaced) or more")
    servers = args.servers or chosen.servers
    options = replace(
        chosen,
        servers=servers,
        per_process=min(args.per_process or chosen.per_process, servers),
        kill=args.kill or (chosen.kill if chosen.kill < servers else max(1, servers // 10)),
        ttl=args.ttl or chosen.ttl,
        rate=chosen.rate if args.rate is None else args.rate,
        idle=args.idle or chosen.idle,
        window=args.window or chosen.window,
    )
    if options.kill >= servers:
        parser.error(f"--kill must leave servers running: {options.kill} of {servers}")
    return options, args.json


@dataclass
class Outcome:
    rows: list[Row]
    started: dict[int, str]  # pid -> command line
    roles: dict[int, str]  # pid -> what it is, for the processes spawned
    registered: int
    interrupted: bool = False


def execute(options: Options, log: Log) -> Outcome:
    """Run, whatever happens: the rows measured, and the processes started."""
    scale = Scale(options, log)
    interrupted = False
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        try:
            scale.run()
        except Exception as error:  # reported as a row; the rows so far stand
            log(f"FAILED:\n{traceback.format_exc()}")
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            scale.rows.append(
                Row(
                    "failed",
                    "the run failed",
                    "failed",
                    f"{type(error).__name__}: {first_line[:300]}",
                    failed=True,
                )
            )
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: every process stopped; partial results follow")
    finally:
        scale.children.stop_all()
        signal.signal(signal.SIGTERM, previous)
    return Outcome(scale.rows, scale.started, scale.roles, scale.registered, interrupted)


def results_json(
    options: Options, outcome: Outcome, left: list[int], info: dict[str, str], elapsed: float
) -> dict[str, Any]:
    return {
        "machine": info,
        "settings": asdict(options),
        "elapsed_s": elapsed,
        "interrupted": outcome.interrupted,
        "servers": options.servers,
        "registered": outcome.registered,
        "processes": {
            "started": [
                {
                    "pid": pid,
                    "role": outcome.roles.get(pid) or os.path.basename(line.split(" ")[0]),
                    "command": line,
                }
                for pid, line in outcome.started.items()
            ],
            "left_running": left,
        },
        "results": [asdict(row) for row in outcome.rows],
    }


def main(argv: Sequence[str] | None = None) -> int:
    options, json_path = parse_args(argv)
    log = stderr_log
    info = machine(PACKAGES)
    info["etcd"] = etcd_version()
    info["prometheus"] = prometheus_version()
    began = time.monotonic()
    outcome = execute(options, log)
    elapsed = time.monotonic() - began
    left = still_running(outcome.started)
    if left:
        log(f"LEFT RUNNING: {left}")
        outcome.rows.append(
            Row("left", "processes left running", str(len(left)), str(left), failed=True)
        )
    if pylm_source() != info["pylm source"]:
        info["pylm source"] += f" CHANGED DURING THE RUN (now {pylm_source()}): mixed versions"
        log(f"warning: pylm's source {info['pylm source']}")
    print(report(options, outcome.rows, info, elapsed), flush=True)
    if json_path is not None:
        with open(json_path, "w", encoding="utf-8") as out:
            json.dump(results_json(options, outcome, left, info, elapsed), out, indent=2)
            out.write("\n")
    if outcome.interrupted:
        return 130
    return 1 if any(row.failed for row in outcome.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
