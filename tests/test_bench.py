"""The benchmark runs (a smoke run: numbers are for bench/, not for tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from prerequisites import needs_prometheus, needs_wrk

ROOT = Path(__file__).resolve().parent.parent


def smoke_run(module: str, out: Path, *options: str, timeout: float = 110) -> str:
    """Run ``python -m bench.<module> --quick`` writing ``out``; its stdout."""
    run = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", "--quick", *options, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


@pytest.mark.timeout(120)
def test_rpc_benchmark_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "rpc.json"
    stdout = smoke_run("rpc", out, "--only", "pylm,pylm-quiet,raw", "--clients", "1")
    assert "| 100 B, 1 client |" in stdout
    results = json.loads(out.read_text())["results"]
    systems = {result["system"] for result in results}
    assert systems == {"raw-req", "pylm", "pylm-quiet", "raw-dealer", "pylm-async"}
    assert all(result["median_per_s"] > 0 for result in results)


@pytest.mark.timeout(120)
def test_pipeline_benchmark_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "pipeline.json"
    assert "| 100 B |" in smoke_run("pipeline", out)
    results = json.loads(out.read_text())["results"]
    assert all(result["median_per_s"] > 0 for result in results)
    assert all((result["cpu_us_per_call"] or 0) > 0 for result in results)  # all counted
    assert len(results) == 15  # raw, pylm, pylm batch=1, AsyncLoopClient, metrics off; 3 payloads


@pytest.mark.timeout(120)
def test_ab_runs_a_benchmark_with_both_sides() -> None:
    """bench.ab runs bench.stage on the old and the new code (bench.stage's
    smoke run too: its table for both sides)."""
    run = subprocess.run(
        [sys.executable, "-m", "bench.ab", "HEAD", "--rounds", "1", "--", "bench.stage", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "round 1/1: old (" in run.stderr and "round 1/1: new (" in run.stderr
    for mode in ("on", "off"):
        assert f"| stage, metrics {mode} |" in run.stdout
    assert "| configuration | old µs CPU/job | new µs CPU/job | old/new |" in run.stdout


@pytest.mark.timeout(170)
def test_registry_benchmark_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "registry.json"
    assert "| measurement | result |" in smoke_run("registry", out, timeout=160)
    assert out.exists()


@pytest.mark.timeout(60)
def test_metrics_benchmark_smoke_run() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench.metrics", "--quick", "--servers", "20"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("20 servers x 3 functions: ")
    assert "scrape over HTTP:" in run.stdout


@pytest.mark.timeout(120)
def test_parallel_benchmark_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "parallel.json"
    stdout = smoke_run("parallel", out)
    assert "| speedup 1 -> 2 workers |" in stdout
    assert "CPU-bound speedup from 1 to 2 workers: pylm " in stdout
    assert "| 2 workers, 4 slots |" in stdout
    results = json.loads(out.read_text())["results"]
    cells = {
        (result["system"], result["job"], result["workers"], result["slots"]) for result in results
    }
    assert cells == {
        *((f"{kind}-cpu-{n}w", "cpu", n, 1) for kind in ("pylm", "pool") for n in (1, 2)),
        *(
            (f"{kind}-echo-{n}w-{slots}s", "echo", n, slots)
            for kind in ("pylm", "raw")
            for n in (1, 2)
            for slots in (1, 4)
        ),
    }
    assert all(result["median_per_s"] > 0 for result in results)
    assert all(result["speedup_over_1_worker"] > 0 for result in results if result["workers"] == 2)


@needs_prometheus
@pytest.mark.timeout(100)
def test_scale_benchmark_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    assert "| measurement | result |" in smoke_run("scale", out, timeout=90)
    data = json.loads(out.read_text())
    assert data["registered"] == data["servers"] == 30
    rows = {row["key"]: row for row in data["results"]}
    measured = {
        "register", "scraped", "idle-cpu", "keepalive", "cpu", "instances", "ls", "topology",
        "scrape", "targets", "memory", "kill-registry", "kill-sd", "kill-prometheus",
        "kill-traffic", "traffic-chain", "traffic-pool", "traffic-solo",
    }  # fmt: skip
    assert measured <= set(rows), sorted(measured - set(rows))
    assert not [key for key, row in rows.items() if row["failed"]]
    assert all(rows[key]["value"] > 0 for key in measured - {"kill-traffic"})
    assert rows["kill-traffic"]["value"] == 0  # no job failed while servers died
    started = data["processes"]["started"]
    roles = {process["role"] for process in started}
    assert {"etcd", "prometheus", "client"} <= roles and len(started) >= 6
    assert data["processes"]["left_running"] == []
    for process in started:  # nor after the run ended
        try:
            command = Path(f"/proc/{process['pid']}/cmdline").read_bytes()
        except OSError:
            continue
        assert command.replace(b"\0", b" ").decode().strip() != process["command"], process


@pytest.mark.timeout(120)
def test_failover_benchmark_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "failover.json"
    stdout = smoke_run("failover", out)
    assert "| undisturbed | 2,000 | 2,000 | 0 |" in stdout
    undisturbed, disturbed = json.loads(out.read_text())
    assert undisturbed["right"] == undisturbed["jobs"] == 2_000
    # every job once, right: none lost to the killed instance, never twice, never another's
    assert disturbed["right"] == disturbed["jobs"] and disturbed["failed"] == 0
    assert disturbed["duplicated"] == disturbed["wrong"] == 0


@needs_wrk
@pytest.mark.timeout(120)
def test_gateway_benchmark_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "gateway.json"
    stdout = smoke_run("gateway", out)
    assert "gateway / ceiling:" in stdout
    numbers = json.loads(out.read_text())
    for side in ("ceiling", "gateway"):
        assert numbers["median"][side]["rate"] > 0
        assert numbers["median"][side]["non_2xx"] == 0  # every call answered with its result
