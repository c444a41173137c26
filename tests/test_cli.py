"""The pylm console script against a real etcd."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pylm.registry import LocalEtcd, Registry

SERVER_MODULE = """
from pylm.standalone import Server

class Greeter(Server):
    def hello(self, message):
        return b"hello " + message
"""


def pylm(
    etcd: LocalEtcd, cluster: str, *args: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pylm.cli", "--registry", etcd.url, "--cluster", cluster, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_topology_set_apply_and_show(
    pylm_etcd: LocalEtcd, pylm_cluster: str, tmp_path: Path
) -> None:
    done = pylm(pylm_etcd, pylm_cluster, "topology", "set", "step1", "--next", "step2.bar")
    assert done.returncode == 0 and done.stdout.strip() == "step1 -> step2.bar"
    wiring = tmp_path / "pipeline.toml"
    wiring.write_text('[stages.step2]\nnext = "last.baz"\n[stages.step1]\nnext = "step2.qux"\n')
    done = pylm(pylm_etcd, pylm_cluster, "topology", "apply", str(wiring))
    assert done.returncode == 0, done.stderr
    with Registry(pylm_etcd.url, cluster=pylm_cluster) as registry:
        assert registry.get_config("step1") == {"next": "step2.qux"}
        assert registry.get_config("step2") == {"next": "last.baz"}
    bad = pylm(pylm_etcd, pylm_cluster, "topology", "set", "x", "--next", "nodot")
    assert bad.returncode == 2 and "must be SERVER.FUNCTION" in bad.stderr


def test_run_ls_call(pylm_etcd: LocalEtcd, pylm_cluster: str, tmp_path: Path) -> None:
    module = tmp_path / "greeter.py"
    module.write_text(SERVER_MODULE)
    server = subprocess.Popen(
        [sys.executable, "-m", "pylm.cli", "--registry", pylm_etcd.url, "--cluster", pylm_cluster,
         "run", f"{module}:Greeter", "--name", "greeter"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        called = pylm(pylm_etcd, pylm_cluster, "call", "greeter", "hello", "world")
        assert called.returncode == 0, called.stderr
        assert called.stdout.strip() == "hello world"
        shown = pylm(pylm_etcd, pylm_cluster, "ls", "--json")
        data = json.loads(shown.stdout)
        (instance,) = data["servers"]["greeter"]["instances"]
        assert data["servers"]["greeter"]["kind"] == "standalone"
        assert instance["pid"] == server.pid and instance["functions"] == ["hello"]
        text = pylm(pylm_etcd, pylm_cluster, "topology").stdout
        assert "greeter [standalone]  1 instance(s)" in text and "rep   tcp://127.0.0.1:" in text
        assert "s left" in text
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(15) == 0, server.stderr.read() if server.stderr else ""
    empty = pylm(pylm_etcd, pylm_cluster, "ls")
    assert "(no servers registered)" in empty.stdout


def test_errors_are_one_clear_line(pylm_etcd: LocalEtcd, pylm_cluster: str) -> None:
    missing = pylm(pylm_etcd, pylm_cluster, "call", "ghost", "f", "x", "--timeout", "0.3")
    assert missing.returncode == 2
    assert missing.stderr.startswith("pylm: no instance of server 'ghost' is registered")
    env = {k: v for k, v in os.environ.items() if k != "PYLM_REGISTRY"}
    unset = subprocess.run(
        [sys.executable, "-m", "pylm.cli", "ls"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert unset.returncode == 2 and "pylm etcd" in unset.stderr
    bad = pylm(pylm_etcd, pylm_cluster, "--registry-timeout", "0", "ls")
    assert bad.returncode == 2 and "--registry-timeout must be positive, got 0" in bad.stderr
    assert pylm(pylm_etcd, pylm_cluster, "--registry-timeout", "20", "ls").returncode == 0


@pytest.mark.parametrize("target", ["nocolon", "missing.module:Thing"])
def test_run_with_a_bad_target(pylm_etcd: LocalEtcd, pylm_cluster: str, target: str) -> None:
    done = pylm(pylm_etcd, pylm_cluster, "run", target, "--name", "x")
    assert done.returncode != 0


@pytest.mark.parametrize("filename", ["pipeline.toml", "pipeline.yaml"])
def test_shipped_topology_files_apply(
    pylm_etcd: LocalEtcd, pylm_cluster: str, filename: str
) -> None:
    shipped = Path(__file__).resolve().parent.parent / "registry" / filename
    done = pylm(pylm_etcd, pylm_cluster, "topology", "apply", str(shipped))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["step1 -> step2.bar", "step2 -> last.baz"]


def test_topology_files_with_mistakes_are_named(tmp_path: Path) -> None:
    from pylm.cli import read_topology
    from pylm.errors import PylmError

    cases = {
        "bad.toml": ("[stages.a\nnext=1", "is not valid TOML"),
        "bad.yaml": ("stages: [a, : b", "is not valid YAML"),
        "empty.yaml": ("", "has no stages"),
        "typed.yml": ("stages:\n  step1:\n    next: 3\n", "stage 'step1' .* next must be"),
    }
    for filename, (text, words) in cases.items():
        path = tmp_path / filename
        path.write_text(text)
        with pytest.raises(PylmError, match=words):
            read_topology(path)
    with pytest.raises(PylmError, match="cannot read topology file"):
        read_topology(tmp_path / "missing.toml")


def test_pylm_demo_runs_a_registry_backed_pipeline() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pylm.cli", "demo"], capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "Client got:  b'ACK: got it too, after you sent me a message'" in lines
    assert "Client got:  b'ACK: got it too, after you sent me another one'" in lines
    assert any(line.startswith("step1 [chained] -> step2.bar  1 instance(s)") for line in lines)
    assert "Traceback" not in done.stderr


def test_topology_watch_prints_changes(pylm_etcd: LocalEtcd, pylm_cluster: str) -> None:
    import queue
    import threading

    from pylm.registry import InstanceRecord

    watcher = subprocess.Popen(
        [sys.executable, "-m", "pylm.cli", "--registry", pylm_etcd.url, "--cluster", pylm_cluster,
         "topology", "--watch"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    assert watcher.stdout is not None
    reader = threading.Thread(target=lambda: [lines.put(line) for line in watcher.stdout])  # type: ignore[union-attr]
    reader.start()

    def wait_line(text: str) -> None:
        while text not in lines.get(timeout=20):
            pass

    try:
        wait_line("(no servers registered)")
        with Registry(pylm_etcd.url, cluster=pylm_cluster) as registry:
            registry.register(InstanceRecord("newcomer", "standalone", {"rep": "tcp://h:1"}))
            wait_line("newcomer [standalone]  1 instance(s)")
        wait_line("(no servers registered)")  # gone again once it closed
    finally:
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(15) == 0
        reader.join(5)


def test_call_a_master_and_show_branches_and_tees(
    pylm_etcd: LocalEtcd, pylm_cluster: str, pylm_registry: Registry
) -> None:
    from pylm.chained import LastServer, Server
    from pylm.parallel import Master, Worker

    class Counter(Worker):
        def count(self, message: bytes) -> Iterator[bytes]:
            for number in range(int(message)):
                yield b"%d" % number

    class Step(Server):
        def f(self, message: bytes) -> bytes:
            return message

    class Last(LastServer):
        def g(self, message: bytes) -> bytes:
            return message

    servers = [
        Master("m", registry=pylm_registry, log_stdout=False),
        Counter("w", "m", registry=pylm_registry, log_stdout=False),
        Last("last", registry=pylm_registry, log_stdout=False),
        Step("step", next_call="last.g", tee="last.g", registry=pylm_registry, log_stdout=False),
    ]
    for server in servers:
        server.start(background=True)
    try:
        called = pylm(pylm_etcd, pylm_cluster, "call", "m", "count", "3")
        assert called.returncode == 0, called.stderr
        assert called.stdout.splitlines() == ["0", "1", "2"]
        text = pylm(pylm_etcd, pylm_cluster, "topology").stdout
        assert "step [chained] -> last.g  (tee last.g)  1 instance(s)" in text
        assert "m [master]  1 instance(s)" in text and "w [worker]  1 instance(s)" in text
    finally:
        for server in reversed(servers):
            server.stop()


WORKER_MODULE = """
from pylm.parallel import Worker

class Upper(Worker):
    def upper(self, message):
        return message.upper()
"""


def test_run_a_worker_and_stop_it_with_sigterm(
    pylm_etcd: LocalEtcd, pylm_cluster: str, pylm_registry: Registry, tmp_path: Path
) -> None:
    from pylm.parallel import Client as ParallelClient
    from pylm.parallel import Master

    module = tmp_path / "upper.py"
    module.write_text(WORKER_MODULE)
    master = Master("m", registry=pylm_registry, log_stdout=False)
    master.start(background=True)
    worker = subprocess.Popen(
        [sys.executable, "-m", "pylm.cli", "--registry", pylm_etcd.url, "--cluster", pylm_cluster,
         "run", f"{module}:Upper", "--name", "upper", "--master", "m", "--ttl", "30"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        with ParallelClient("m", registry=pylm_registry, timeout=20) as client:
            assert client.eval("upper", b"shout") == b"SHOUT"
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0, worker.stderr.read() if worker.stderr else ""
        # It deregistered on its way out: its record did not wait for the 30 s lease.
        assert pylm_registry.instances("upper") == []
        missing = pylm(pylm_etcd, pylm_cluster, "run", f"{module}:Upper", "--name", "x")
        assert missing.returncode == 2 and "--master" in missing.stderr
    finally:
        worker.kill()
        worker.wait(10)
        master.stop()


def test_pylm_alone_is_a_usage_error_and_python_m_pylm_works() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pylm"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert done.stderr.startswith("usage: pylm") and done.stdout == ""


def test_output_into_a_closed_pipe_ends_quietly() -> None:
    """As with `pylm --help | head -0`: the reader is gone before pylm writes."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pylm", "--help"],
            stdout=write, stderr=subprocess.PIPE, text=True, timeout=30,
        )  # fmt: skip
    finally:
        os.close(write)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_global_options_may_come_after_the_command(pylm_etcd: LocalEtcd, pylm_cluster: str) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pylm", *args], capture_output=True, text=True, timeout=30
        )

    where = ["--registry", pylm_etcd.url, "--cluster", pylm_cluster]
    done = run("topology", "set", "step1", "--next", "step2.bar", *where)
    assert done.returncode == 0 and done.stdout.strip() == "step1 -> step2.bar", done.stderr
    after = run("ls", "--json", *where)
    before = run(*where, "ls", "--json")
    assert after.returncode == 0 and after.stdout == before.stdout, after.stderr
    # After the command, an option overrides the same one before it.
    elsewhere = run("--cluster", "nowhere", "--registry", pylm_etcd.url, "topology", "export",
                    "--cluster", pylm_cluster)  # fmt: skip
    assert elsewhere.returncode == 0 and "step2.bar" in elsewhere.stdout, elsewhere.stderr
