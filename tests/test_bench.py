"""The benchmark runs (a smoke run: numbers are for bench/, not for tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_rpc_benchmark_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "rpc.json"
    command = [sys.executable, "-m", "bench.rpc", "--quick", "--only", "pylm,raw"]
    run = subprocess.run(
        [*command, "--clients", "1", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| 100 B, 1 client |" in run.stdout
    results = json.loads(out.read_text())["results"]
    systems = {result["system"] for result in results}
    assert systems == {"raw-req", "pylm", "raw-dealer", "pylm-async"}
    assert all(result["median_per_s"] > 0 for result in results)


@pytest.mark.timeout(120)
def test_pipeline_benchmark_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "pipeline.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.pipeline", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| 100 B |" in run.stdout
    results = json.loads(out.read_text())["results"]
    assert all(result["median_per_s"] > 0 for result in results)
    assert len(results) == 4


@pytest.mark.timeout(170)
def test_registry_benchmark_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "registry.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.registry", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=160,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| measurement | result |" in run.stdout
    assert out.exists()
