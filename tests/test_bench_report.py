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


def test_profile_summary_groups_samples_by_innermost_frame(tmp_path: Path) -> None:
    from bench.profile import summarise

    serving = tmp_path / "pylm" / "serving.py"
    serving.parent.mkdir()
    serving.write_text("def serve(recv):\n    body = recv()\n")
    raw = "\n".join(
        [
            f"<module> (x.py:1);serve ({serving}:2) 80",
            "<module> (x.py:1);Socket.send (zmq/sugar/socket.py:713) 10",
            "<module> (x.py:1);BaseServer._call (pylm/base.py:1) 6",
            "<module> (x.py:1);FunctionStats.done (pylm/telemetry/counting.py:1) 4",
            "garbage line",
        ]
    )
    summary = summarise(raw, top=2)
    assert summary["samples"] == 100
    # `body = recv()`: a socket call without a frame of its own
    assert summary["groups"] == {"socket calls": 0.9, "pylm": 0.06, "metrics": 0.04}
    (frame, code, share), _ = summary["top"]
    assert frame.startswith("serve (") and code == "body = recv()" and share == 0.8
