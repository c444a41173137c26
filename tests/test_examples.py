"""The examples and the console script run as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prerequisites import needs_etcd

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
    first = lines.index("Client with the following connections:")  # after the stages' lines
    assert lines[first + 1].startswith(" *Listening to input from ipc://")
    assert lines[first + 2].startswith(" *Sending jobs to ipc://")
    assert "Client got:  b'ACK: got it too, after you sent me a message'" in lines


def test_console_script_version() -> None:
    for command in (["pylm", "--version"], [sys.executable, "-m", "pylm.cli", "--version"]):
        run = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == f"pylm {pylm.__version__}"


@needs_etcd
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


def test_parallel_example_end_to_end() -> None:
    lines = demo_lines("parallel")
    assert "Master 'master' has 2 worker(s)" in lines
    for name in ("worker1", "worker2"):
        joined = f" - master - INFO - master: worker {name} joined (1 slots)"
        assert any(line.endswith(joined) for line in lines)
    results = [line for line in lines if line.startswith("Client got:  b'worker")]
    assert len(results) == 11  # eval, then ten jobs, each result once
    assert results[0].endswith(": 7 squared is 49'")
    assert [line.split(": ", 2)[2] for line in results[1:]] == [
        f"{n} squared is {n * n}'" for n in range(10)
    ]
    (by_worker,) = [line for line in lines if line.startswith("Jobs by worker: ")]
    ran = dict(part.split(" ran ") for part in by_worker[len("Jobs by worker: ") :].split(", "))
    assert set(ran) == {"worker1", "worker2"}  # both ran jobs
    assert sum(int(count) for count in ran.values()) == 10
    error = "Client got an error: ValueError: invalid literal for int() with base 10: b'seven'"
    assert error in lines


@needs_etcd
def test_parallel_example_by_name_on_a_local_etcd() -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "parallel" / "demo.py"), "--registry"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("local etcd at etcd://127.0.0.1:")
    assert "Master 'master' has 2 worker(s)" in lines
    assert sum(line.startswith("Client got:  b'worker") for line in lines) == 11
    assert any(line.startswith("Jobs by worker: worker1 ran ") for line in lines)
    # What the servers registered, as `pylm ls` shows it.
    assert "master [master]  1 instance(s)" in lines
    assert "worker1 [worker]  1 instance(s)" in lines
    assert "worker2 [worker]  1 instance(s)" in lines
    assert any(line.startswith("    front tcp://127.0.0.1:") for line in lines)
    assert any(line.startswith("    workers tcp://127.0.0.1:") for line in lines)


def test_stream_example_end_to_end() -> None:
    lines = demo_lines("stream")
    items = [line.split(" after ")[0] for line in lines if line.startswith("Client got:  ")]
    assert items == [f"Client got:  b'{item}'" for item in ("5", "4", "3", "2", "1", "liftoff")]
    assert "The stream ended after 6 items" in lines


def test_scatter_gather_example_end_to_end() -> None:
    lines = demo_lines("scatter_gather")
    assert "Counted 20 words in 4 lines; more than once:" in lines
    start = lines.index("Counted 20 words in 4 lines; more than once:")
    assert lines[start + 1 : start + 3] == ["  the: 6", "  master: 2"]


@needs_etcd
def test_gateway_example_end_to_end() -> None:
    """examples/gateway: a server by name, pylm gateway, an HTTP client of
    the standard library only."""
    import pytest

    pytest.importorskip("uvicorn", reason="the gateway extra")
    lines = demo_lines("gateway")
    assert "upper: 200 HELLO FROM HTTP" in lines
    assert "count: 200 ['1', '2', '3']" in lines
    assert "nothing: 404 Unknown function" in lines
    assert "openapi: /words/count, /words/upper" in lines
