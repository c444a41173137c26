"""Ctrl-C ends every long-running pylm command within half a second, with
a clean exit: each one runs in a process group of its own, as in a
terminal, and the whole group gets the SIGINT a terminal sends."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pylm.registry import LocalEtcd, Registry
from pylm.testing import wait_for

ROOT = Path(__file__).resolve().parent.parent
STOP_WITHIN = 0.5  # s from Ctrl-C to the command's exit
# pylm etcd waits for etcd, which syncs its data to disk as it stops: disk time, which a
# loaded machine stretches (0.55 s seen) and the CPU-wait correction cannot see.
ETCD_STOP_WITHIN = 2.0

SERVERS = """
import threading

from pylm.chained import LastServer
from pylm.chained import Server as Stage
from pylm.parallel import Worker
from pylm.standalone import Server


class Greeter(Server):
    def hello(self, message):
        return b"hello " + message


class Step(Stage):
    def foo(self, message):
        return message


class Last(LastServer):
    def baz(self, message):
        return message


class Upper(Worker):
    def upper(self, message):
        return message.upper()
"""


def run_delay(schedstat: str) -> float:
    """Seconds a task has spent runnable but waiting for a CPU (the kernel's
    run delay, /proc/.../schedstat); 0 once it is gone."""
    try:
        with open(schedstat) as stat:
            return int(stat.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def group_of(pid: int) -> list[int]:
    """Process ``pid`` and its descendants."""
    parents: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(parents.get(found[-1], []))
    return found


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as name:
            return name.read().strip()
    except OSError:
        return ""


def waited_for_a_cpu(pids: list[int]) -> float:
    """The run delay of processes ``pids``, summed over their threads."""
    total = 0.0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        total += sum(run_delay(f"/proc/{pid}/task/{task}/schedstat") for task in tasks)
    return total


class Command:
    """A pylm command running in a process group of its own, its output
    lines (stdout and stderr) read as they come."""

    def __init__(
        self, args: list[str], cwd: Path, env: dict[str, str], program: str = "pylm"
    ) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", program, *args],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.readers = [
            threading.Thread(target=self._read, args=(stream,), daemon=True)
            for stream in (self.process.stdout, self.process.stderr)
        ]
        for reader in self.readers:
            reader.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.put(line)

    def wait_line(self, text: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no line with {text!r} within {timeout} s: {self.seen}")
            self.seen.append(line)
            if text in line:
                return line

    def ctrl_c(self) -> float:
        """Send the terminal's SIGINT to the group; how long until the command
        exited, less the time its processes (and this test) waited for a CPU:
        on an idle machine, the time itself; on a loaded one, not the load."""
        # What its stop waits on: its processes, this test's (the master a
        # worker leaves, the registry client) and its etcd.
        etcd = [pid for pid in group_of(os.getpid()) if comm(pid) == "etcd"]
        group = list(dict.fromkeys([*group_of(self.process.pid), os.getpid(), *etcd]))
        before = queued = waited_for_a_cpu(group)
        began = time.monotonic()
        os.killpg(self.process.pid, signal.SIGINT)
        while self.process.poll() is None:  # sampled until it exits (then it has no tasks)
            queued = max(queued, waited_for_a_cpu(group))
            if time.monotonic() - began > 10:  # where it hangs: faulthandler's stacks
                os.kill(self.process.pid, signal.SIGABRT)
                self.process.wait(10)
                pytest.fail(f"the command did not end within 10 s of Ctrl-C: {self.output()}")
            time.sleep(0.002)
        took = time.monotonic() - began
        return max(0.0, took - (queued - before))

    def output(self) -> str:
        for reader in self.readers:
            reader.join(5)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return "".join(self.seen)

    def group_gone(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return True
        return False

    def end(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def place(tmp_path: Path, pylm_etcd: LocalEtcd, pylm_cluster: str) -> tuple[Path, dict[str, str]]:
    """A folder with the servers' file, and the environment that finds the
    test's etcd and cluster (and this checkout's pylm)."""
    (tmp_path / "servers.py").write_text(SERVERS)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {
        **os.environ,
        "PYTHONPATH": path,
        "PYLM_REGISTRY": pylm_etcd.url,
        "PYLM_CLUSTER": pylm_cluster,
        "PYTHONFAULTHANDLER": "1",  # SIGABRT shows where a command hangs
    }
    return tmp_path, env


def wait_registered(command: Command, registry: Registry, name: str) -> None:
    wait_for(
        lambda: bool(registry.instances(name)) or command.process.poll() is not None,
        20,
        f"{name} registering",
    )
    assert command.process.poll() is None, command.output()


@pytest.fixture
def master(pylm_registry: Registry) -> Iterator[None]:
    from pylm.parallel import Master

    with Master("m", registry=pylm_registry, log_stdout=False):
        yield


# The command, and when it is ready: once NAME is registered (a server) or
# once it printed a line with TEXT.
COMMANDS = {
    "run a standalone server": (["run", "servers.py:Greeter", "--name", "greeter"], "greeter"),
    "run a chained stage": (["run", "servers.py:Step", "--name", "step"], "step"),
    "run a last stage": (["run", "servers.py:Last", "--name", "last"], "last"),
    "run a master": (["run", "pylm.parallel:Master", "--name", "m2"], "m2"),
    "run a worker": (["run", "servers.py:Upper", "--name", "upper", "--master", "m"], "upper"),
    "etcd": (["etcd", "--port", "0", "--data-dir", "etcd"], "export PYLM_REGISTRY="),
    "sd": (["sd", "--port", "0"], "Ctrl-C or SIGTERM stops it"),
    "top": (["top", "--interval", "60"], "pylm top: cluster"),
    "ls --watch": (["ls", "--watch"], "(no servers registered)"),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_ctrl_c_ends_the_command_at_once(
    command: str,
    place: tuple[Path, dict[str, str]],
    pylm_registry: Registry,
    request: pytest.FixtureRequest,
) -> None:
    args, ready = COMMANDS[command]
    folder, env = place
    if command == "run a chained stage":
        pylm_registry.set_config("step", next="last.baz")
    if command == "run a worker":
        request.getfixturevalue("master")
    running = Command(args, folder, env)
    try:
        if command.startswith("run "):
            wait_registered(running, pylm_registry, ready)
        else:
            running.wait_line(ready)
        took = running.ctrl_c()
        output = running.output()
        assert running.process.returncode == 0, output
        assert "Traceback" not in output, output
        limit = ETCD_STOP_WITHIN if command == "etcd" else STOP_WITHIN
        assert took < limit, f"{command}: {took:.3f} s from Ctrl-C to exit"
        wait_for(running.group_gone, 5, "every process of the command ending")  # etcd's too
        if command.startswith("run "):
            assert pylm_registry.instances(args[3]) == []  # it deregistered
    finally:
        running.end()


def test_ctrl_c_ends_a_call_waiting_for_its_answer(
    place: tuple[Path, dict[str, str]], pylm_registry: Registry
) -> None:
    from pylm.standalone import Server

    entered, release = threading.Event(), threading.Event()

    class Slow(Server):
        def wait(self, message: bytes) -> bytes:
            entered.set()
            release.wait(20)
            return message

    folder, env = place
    with Slow("slow", registry=pylm_registry, log_stdout=False):
        running = Command(["call", "slow", "wait", "x", "--timeout", "30"], folder, env)
        try:
            assert entered.wait(20), running.output()
            took = running.ctrl_c()
            output = running.output()
            assert running.process.returncode == 130, output  # interrupted: no answer
            assert "Traceback" not in output, output
            assert took < STOP_WITHIN, f"{took:.3f} s from Ctrl-C to exit"
        finally:
            release.set()
            running.end()


def test_top_draws_its_first_screen_at_once(
    place: tuple[Path, dict[str, str]], pylm_registry: Registry
) -> None:
    """Who is there, before the first interval (of a minute here) has passed;
    the rates it has not measured yet are dashes."""
    from pylm.standalone import Server

    class Echo(Server):
        def echo(self, message: bytes) -> bytes:
            return message

    folder, env = place
    with Echo("echo", registry=pylm_registry, log_stdout=False):
        began = time.monotonic()
        running = Command(["top", "--interval", "60"], folder, env)
        try:
            header = running.wait_line("pylm top: cluster")
            row = running.wait_line("echo ").split()
            assert time.monotonic() - began < 30  # far from the interval's 60 s
            assert "rates in 60.0 s" in header
            assert row[:3] == ["echo", "standalone", "1"] and row[3:7] == ["-"] * 4
            assert running.ctrl_c() < STOP_WITHIN
        finally:
            running.end()


DEMO = """
import sys
import threading

from pylm.demo import run_demo


def payloads():
    yield b"one"
    print("first job sent", flush=True)
    threading.Event().wait()  # until Ctrl-C


sys.exit(run_demo(payloads()))
"""


def test_ctrl_c_on_the_demo_stops_its_servers_then_its_etcd(tmp_path: Path) -> None:
    (tmp_path / "slow_demo.py").write_text(DEMO)
    temp = tmp_path / "tmp"
    temp.mkdir()
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "TMPDIR": str(temp)}
    running = Command([], tmp_path, env, program="slow_demo")
    try:
        running.wait_line("first job sent", timeout=60)
        running.ctrl_c()
        output = running.output()
        assert running.process.returncode == 130, output
        assert "Traceback" not in output, output
        # The servers deregistered while etcd still ran; the only warning
        # there may be is true: the interrupted job's result had no reader.
        warnings = [line for line in output.splitlines() if "WARNING" in line]
        assert all("results dropped on stop" in line for line in warnings), output
        assert output.count("interrupted") == 1, output
        # Every process it started ended (they all have its TMPDIR), and its folder is gone.
        wait_for(lambda: not _with_env(f"TMPDIR={temp}"), 10, "the demo's processes ending")
        assert list(temp.iterdir()) == []
    finally:
        running.end()


def _with_env(entry: str) -> list[int]:
    """The processes whose environment has ``entry``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:  # not a process, gone, or not ours
            continue
        if entry.encode() in environ:
            found.append(int(proc.name))
    return found


@pytest.mark.timeout(180)
def test_the_kept_demo_shows_its_traffic_in_the_console_until_ctrl_c(tmp_path: Path) -> None:
    """pylm demo --keep: its gateway's console sees step1's calls/s rise
    while it sends, and Ctrl-C ends it all (status 0: the way to end it)."""
    pytest.importorskip("uvicorn", reason="the console needs the gateway extra")
    import json
    import urllib.request

    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    running = Command(["demo", "--keep"], tmp_path, env, program="pylm.cli")
    try:
        line = running.wait_line("until Ctrl-C: watch it at", timeout=60)
        console = line.strip().rpartition(" ")[2]
        assert console.startswith("http://127.0.0.1:") and console.endswith("/")

        def step1_rate() -> float:
            with urllib.request.urlopen(f"{console}console/cluster.json", timeout=10) as answer:
                view = json.load(answer)
            node = next(node for node in view["nodes"] if node["name"] == "step1")
            return node["calls_per_second"] or 0.0

        wait_for(lambda: step1_rate() > 0, 30, "step1's rate in the console")
        running.ctrl_c()
        output = running.output()
        assert running.process.returncode == 0, output
        assert "Traceback" not in output and "interrupted" not in output, output
        wait_for(lambda: not _with_env(f"TMPDIR={temp}"), 10, "the demo's processes ending")
    finally:
        running.end()
        for pid in _with_env(f"TMPDIR={temp}"):  # its etcd, stages and gateway, if it failed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
