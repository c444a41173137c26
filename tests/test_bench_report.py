"""bench.report: the whole suite into one markdown section (a smoke run)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import BEGIN, END

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(150)
def test_report_replaces_its_section_and_keeps_the_rest(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text(f"# Benchmarks\n\nBefore.\n\n{BEGIN}\nold numbers\n{END}\n\nAfter.\n")
    run = subprocess.run(
        [sys.executable, "-m", "bench.report", "--quick", "--only", "rpc,metrics",
         "--out", str(out), "--keep", str(tmp_path / "json")],
        cwd=ROOT, capture_output=True, text=True, timeout=140,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nBefore.\n\n" + BEGIN) and text.endswith(
        END + "\n\nAfter.\n"
    )
    assert "old numbers" not in text
    assert "| sync RPC, 100 B, 1 client: pylm / raw REQ-REP | ≥ 0.85x |" in text
    assert "| 100 B, 1 client |" in text  # the rpc part's own table
    assert "series" in text  # the metrics part's printout
    assert (tmp_path / "json" / "rpc.json").exists()
    if importlib.util.find_spec("matplotlib") is None:
        assert "Figures skipped: matplotlib is not installed" in text
    else:
        for name in ("rpc-payload.png", "rpc-latency.png", "rpc-clients.png"):
            assert (tmp_path / "figures" / name).stat().st_size > 1000
            assert f"](figures/{name})" in text
