"""The examples and the console script run as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pylm

ROOT = Path(__file__).resolve().parent.parent


def demo_lines(example: str) -> list[str]:
    """The output lines of ``examples/<example>/demo.py``, which must succeed."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / example / "demo.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()


def test_standalone_example_end_to_end() -> None:
    lines = demo_lines("standalone_single")
    assert "Client got:  b'you sent me a message'" in lines
    assert sum(line.startswith("Client got:  b'you sent me message ") for line in lines) == 10
    assert any(line.endswith(" - my_server - WARNING - Got a message") for line in lines)


def test_chained_example_end_to_end() -> None:
    lines = demo_lines("chained_single")
    assert lines[0] == "Client with the following connections:"
    assert lines[1].startswith(" *Listening to input from ipc://")
    assert lines[2].startswith(" *Sending jobs to ipc://")
    assert "Client got:  b'ACK: got it too, after you sent me a message'" in lines


def test_console_script_version() -> None:
    for command in (["pylm", "--version"], [sys.executable, "-m", "pylm.cli", "--version"]):
        run = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == f"pylm {pylm.__version__}"


def test_pylm_etcd_runs_a_local_registry(tmp_path: Path) -> None:
    import signal

    from pylm.registry import InstanceRecord, Registry

    process = subprocess.Popen(
        ["pylm", "etcd", "--port", "0", "--data-dir", str(tmp_path / "etcd")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("etcd is running; data in ")
        line = process.stdout.readline().strip()
        assert line.startswith("export PYLM_REGISTRY=etcd://127.0.0.1:")
        with Registry(line.split("=", 1)[1], cluster="cli") as registry:
            registry.register(InstanceRecord("probe", "standalone", {"rep": "tcp://h:1"}))
            assert [r.name for r in registry.instances()] == ["probe"]
    finally:
        process.send_signal(signal.SIGINT)
        try:
            assert process.wait(15) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
