"""A real Prometheus watching a real pipeline: it finds the servers through
``pylm sd``, scrapes them, and every shipped dashboard query and alert rule
evaluates against what it scraped. The shipped configuration passes promtool.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prerequisites import needs_prometheus

from pylm.chained import LoopClient
from pylm.registry import LocalEtcd, Registry
from pylm.telemetry.prometheus import LocalPrometheus
from pylm.telemetry.sd import ServiceDiscovery

pytestmark = [
    pytest.mark.timeout(150),
]

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
RULES = MONITORING / "prometheus" / "rules.yml"
DASHBOARDS = sorted((MONITORING / "grafana" / "dashboards").glob("*.json"))
JOBS = 200
TTL = "3"


def substitute(expr: str) -> str:
    """A dashboard expression with Grafana's variables as a test gives them."""
    expr = expr.replace("$__rate_interval", "1m").replace("${__rate_interval}", "1m")
    return re.sub(r"\$\{?(cluster|server|function)(:[a-z]+)?\}?", ".*", expr)


def panel_targets() -> list[tuple[str, str, int, str]]:
    """(dashboard, panel title, target index, expression) of every panel query."""
    found = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        panels = list(dashboard["panels"])
        for panel in list(panels):
            panels.extend(panel.get("panels", []))  # rows keep their panels
        for panel in panels:
            for index, target in enumerate(panel.get("targets", [])):
                if target.get("expr"):
                    found.append((path.name, panel.get("title", "?"), index, target["expr"]))
    return found


def rule_expressions() -> list[tuple[str, str]]:
    import yaml

    rules = yaml.safe_load(RULES.read_text())
    return [
        (rule.get("alert") or rule.get("record"), rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]


@needs_prometheus
def test_shipped_prometheus_configuration_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None
    folder = MONITORING / "prometheus"
    for command in (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "rules.yml"],
        ["test", "rules", "rules_test.yml"],  # each alert fires on the series it should
    ):
        done = subprocess.run(
            [promtool, *command], cwd=folder, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_dashboards_are_provisionable() -> None:
    assert [path.name for path in DASHBOARDS] == ["pylm-overview.json", "pylm-server.json"]
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert "__inputs" not in dashboard
        variables = {item["name"]: item for item in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        for _, _, _, expr in panel_targets():
            assert "${DS_" not in expr


class Cluster:
    """Stage processes started with only a name, on the test's etcd."""

    def __init__(self, etcd: LocalEtcd, cluster: str) -> None:
        self.env = {**os.environ, "PYLM_REGISTRY": etcd.url, "PYLM_CLUSTER": cluster}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, cls: str) -> None:
        command = ["run", f"pylm.demo:{cls}", "--name", name, "--ttl", TTL]
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "pylm.cli", *command],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
            process.wait(10)


@pytest.fixture
def pipeline(pylm_etcd: LocalEtcd, pylm_registry: Registry, pylm_cluster: str) -> Iterator[Cluster]:
    pylm_registry.set_config("step1", next="step2.bar")
    pylm_registry.set_config("step2", next="last.baz")
    processes = Cluster(pylm_etcd, pylm_cluster)
    try:
        for name, cls in (("last", "Last"), ("step2", "Step2"), ("step1", "Step1")):
            processes.start(name, cls)
        yield processes
    finally:
        processes.stop()


def value_of(samples: list[dict[str, Any]]) -> float:
    return sum(float(sample["value"][1]) for sample in samples)


@needs_prometheus
def test_prometheus_discovers_scrapes_and_alerts(
    pipeline: Cluster, pylm_registry: Registry, pylm_cluster: str
) -> None:
    with ServiceDiscovery(pylm_registry, port=0) as sd:
        config = f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["{RULES}"]
scrape_configs:
  - job_name: pylm
    http_sd_configs:
      - url: {sd.url}
        refresh_interval: 1s
  - job_name: pylm-sd
    static_configs:
      - targets: ["{sd.host}:{sd.port}"]
"""
        with LocalPrometheus(config) as prometheus:
            # A first scrape before the work, so that rates have a start.
            prometheus.wait_for(f'pylm_calls_total{{cluster="{pylm_cluster}", server="last"}}', 30)
            with LoopClient("step1", registry=pylm_registry, announce=False, timeout=30) as client:
                results = list(client.job("foo", [b"%d" % i for i in range(JOBS)]))
            assert len(results) == JOBS

            # Discovered and scraped: the counts are exact, the labels are there.
            done = f'sum(pylm_calls_total{{cluster="{pylm_cluster}", server="last", outcome="ok"}})'
            deadline = time.monotonic() + 30
            while value_of(prometheus.query(done)) != JOBS:
                assert time.monotonic() < deadline, f"{done} = {prometheus.query(done)}"
                time.sleep(0.2)  # Prometheus scrapes on its own clock
            sent = prometheus.query(f'pylm_messages_sent_total{{cluster="{pylm_cluster}"}}')
            assert {(s["metric"]["server"], s["metric"]["to"]) for s in sent} == {
                ("step1", "next"),
                ("step2", "next"),
                ("last", "client"),
            }
            info = prometheus.query(f'pylm_server_info{{cluster="{pylm_cluster}"}}')
            assert {s["metric"]["server"] for s in info} == {"step1", "step2", "last"}
            assert {s["metric"]["kind"] for s in info} == {"chained", "chained-last"}
            prometheus.wait_for(
                f'pylm_registry_instances{{cluster="{pylm_cluster}", server="last"}} == 1', 15
            )
            # Rates need two scrapes after the work: wait for them once, for every panel.
            prometheus.wait_for(f'rate(pylm_calls_total{{cluster="{pylm_cluster}"}}[1m]) > 0', 15)

            # Every panel query evaluates; every panel's main query has data.
            assert len(panel_targets()) > 30 and len(rule_expressions()) >= 7
            empty = []
            for dashboard, title, index, expr in panel_targets():
                result = prometheus.query(substitute(expr))  # raises if Prometheus refuses it
                if index == 0 and not result:
                    empty.append(f"{dashboard}: {title}: {expr}")
            assert not empty, "panels without data:\n" + "\n".join(empty)

            # Every alert rule evaluates (as an expression, and in Prometheus' rule manager).
            for _, expr in rule_expressions():
                prometheus.query(expr)
            deadline = time.monotonic() + 15
            while True:
                groups = prometheus.api("rules")["groups"]
                rules = [rule for group in groups for rule in group["rules"]]
                if rules and all(rule.get("lastEvaluation", "").startswith("2") for rule in rules):
                    break
                assert time.monotonic() < deadline, "rules were never evaluated"
                time.sleep(0.2)
            assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []

            # A killed instance: instance-down is true for it while discovery still lists
            # it, then it leaves discovery when its lease expires.
            pipeline.processes["last"].send_signal(signal.SIGKILL)
            down = 'up{job="pylm", pylm_servers="last"} == 0'
            prometheus.wait_for(down, 10, "the instance-down expression for the killed stage")
            instance_down = dict(rule_expressions())["PylmInstanceDown"]
            assert any(
                s["metric"].get("pylm_servers") == "last" for s in prometheus.query(instance_down)
            )
            deadline = time.monotonic() + float(TTL) + 10
            while any("last" in group["labels"]["pylm_servers"] for group in sd.targets):
                assert time.monotonic() < deadline, "the killed stage never left discovery"
                time.sleep(0.2)
