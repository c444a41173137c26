"""What a newcomer sees: every server says in one line when it starts
serving (where, which cluster, its metrics) and when it stops; a client
asked for a name with no instance fails fast and says how to look."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import pylm_command
from servers import Doubler, Echo

from pylm import NoInstance
from pylm.base import BaseServer
from pylm.chained import LastServer, LoopClient
from pylm.chained import Server as Stage
from pylm.errors import RegistryError
from pylm.parallel import Client as ParallelClient
from pylm.parallel import Master
from pylm.registry import LocalEtcd, Registry
from pylm.standalone import AsyncClient, Client
from pylm.testing import wait_for

ROOT = Path(__file__).resolve().parent.parent


class Upper(Stage):
    def up(self, message: bytes) -> bytes:
        return message.upper()


class Done(LastServer):
    def done(self, message: bytes) -> bytes:
        return message + b"!"


def lines(caplog: pytest.LogCaptureFixture, name: str, words: str) -> list[str]:
    """The messages logged by the server ``name`` that contain ``words``."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == name and words in record.getMessage()
    ]


def check_start_line(
    caplog: pytest.LogCaptureFixture,
    server: BaseServer,
    etcd: LocalEtcd,
    cluster: str,
    *addresses: str,
) -> str:
    """The one INFO line ``server`` logged when it started: its name, kind,
    ``addresses``, cluster and metrics URL in it."""
    (line,) = lines(caplog, server.name, "serving:")
    (record,) = [r for r in caplog.records if r.getMessage() == line]
    assert record.levelno == logging.INFO
    assert line.startswith(f"{server.name} ({server.kind}) serving: ")
    for address in addresses:
        assert address in line, (address, line)
    assert f"cluster {cluster!r} at {etcd.url}" in line
    assert server.metrics_url is not None and server.metrics_url.endswith("/metrics")
    assert line.endswith(f"; metrics {server.metrics_url}")
    return line


# ------------------------------------------------------------------ start and stop lines


def test_a_standalone_server_says_where_it_serves_and_when_it_stops(
    pylm_etcd: LocalEtcd,
    pylm_cluster: str,
    pylm_registry: Registry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = Echo("first_hour_echo", log_stdout=False, registry=pylm_registry, metrics=True)
    with server:
        assert server.address is not None
        check_start_line(caplog, server, pylm_etcd, pylm_cluster, f"rep {server.address}")
        with Client("first_hour_echo", registry=pylm_registry) as client:
            assert client.job("echo", b"x") == b"x"
        assert lines(caplog, server.name, "stopped") == []
    assert lines(caplog, server.name, "stopped") == [
        "first_hour_echo (standalone) stopped after serving 1 message(s)"
    ]


def test_a_server_without_registry_nor_metrics_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = Echo("first_hour_plain", "tcp://127.0.0.1:0", log_stdout=False, metrics=False)
    with server:
        assert lines(caplog, server.name, "serving:") == [
            f"first_hour_plain (standalone) serving: rep {server.address}; not registered;"
            " metrics off"
        ]


def test_chained_stages_name_their_addresses_and_next_stage(
    pylm_etcd: LocalEtcd,
    pylm_cluster: str,
    pylm_registry: Registry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    last = Done("first_hour_last", registry=pylm_registry, log_stdout=False, metrics=True)
    stage = Upper(
        "first_hour_stage",
        next_call="first_hour_last.done",
        registry=pylm_registry,
        log_stdout=False,
        metrics=True,
    )
    with last, stage:
        assert last.address and last.db and last.push and stage.address and stage.db
        check_start_line(
            caplog,
            last,
            pylm_etcd,
            pylm_cluster,
            f"pull {last.address}",
            f"db {last.db}",
            f"push {last.push}",
        )
        check_start_line(
            caplog,
            stage,
            pylm_etcd,
            pylm_cluster,
            f"pull {stage.address}",
            f"db {stage.db}",
            f"next first_hour_last.done at {last.address}",
        )
        with LoopClient("first_hour_stage", registry=pylm_registry, announce=False) as client:
            assert list(client.job("up", [b"a"])) == [b"A!"]
    for server in (stage, last):
        (stopped,) = lines(caplog, server.name, "stopped")
        assert stopped.startswith(f"{server.name} ({server.kind}) stopped after serving ")


def test_master_and_worker_name_their_addresses(
    pylm_etcd: LocalEtcd,
    pylm_cluster: str,
    pylm_registry: Registry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    master = Master("first_hour_master", registry=pylm_registry, log_stdout=False, metrics=True)
    worker = Doubler(
        "first_hour_worker",
        "first_hour_master",
        registry=pylm_registry,
        log_stdout=False,
        metrics=True,
    )
    with master, worker:
        assert master.front and master.back
        check_start_line(
            caplog,
            master,
            pylm_etcd,
            pylm_cluster,
            f"front {master.front}",
            f"workers {master.back}",
        )
        check_start_line(
            caplog, worker, pylm_etcd, pylm_cluster, f"master first_hour_master at {master.back}"
        )
        with ParallelClient("first_hour_master", registry=pylm_registry) as client:
            assert client.eval("double", b"ab") == b"abab"
    for server in (worker, master):
        (stopped,) = lines(caplog, server.name, "stopped")
        assert stopped.startswith(f"{server.name} ({server.kind}) stopped after serving ")


SCRIPT = """
import logging, sys
from pylm.standalone import Server

if sys.argv[1] == "basicConfig":
    logging.basicConfig(level=logging.INFO)

class Echo(Server):
    def echo(self, message):
        return message

server = Echo("scripted", "tcp://127.0.0.1:0", log_stdout=sys.argv[1] != "quiet", metrics=False)
server.start(background=True)
server.stop()
"""


@pytest.mark.parametrize(
    ("setup", "out", "err"),
    [
        ("nothing", 1, 0),  # the server's own stdout handler prints it
        ("basicConfig", 0, 1),  # the application's handler prints it; not twice
        ("quiet", 0, 0),  # log_stdout=False: the application's to configure
    ],
)
def test_what_a_plain_script_shows(tmp_path: Path, setup: str, out: int, err: int) -> None:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(script), setup], capture_output=True, text=True, env=env, timeout=30
    )
    assert done.returncode == 0, done.stderr
    for stream, count in ((done.stdout, out), (done.stderr, err)):
        assert stream.count("scripted (standalone) serving: rep tcp://127.0.0.1:") == count, stream
        assert stream.count("scripted (standalone) stopped after serving 0") == count, stream


def test_a_server_named_under_another_shows_its_lines_once(tmp_path: Path) -> None:
    """``svc.v2``'s logger is a child of ``svc``'s: each server's own
    handler prints, and only the one of the server that logged."""
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            from pylm.standalone import Server

            class Echo(Server):
                def echo(self, message):
                    return message

            for name in ("svc", "svc.v2"):
                server = Echo(name, "tcp://127.0.0.1:0", metrics=False)
                server.start(background=True)
                server.stop()
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=30
    )
    assert done.returncode == 0, done.stderr
    for name in ("svc", "svc.v2"):
        assert done.stdout.count(f" - {name} - INFO - {name} (standalone) serving: ") == 1, (
            done.stdout
        )
        assert done.stdout.count(f" - {name} - INFO - {name} (standalone) stopped ") == 1


def test_pylm_run_prints_the_start_and_stop_lines(
    pylm_etcd: LocalEtcd, pylm_cluster: str, pylm_registry: Registry, tmp_path: Path
) -> None:
    (tmp_path / "echoapp.py").write_text(
        "from pylm.standalone import Server\n\n\nclass Echo(Server):\n"
        "    def echo(self, message):\n        return message\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYLM_METRICS": "1"}
    process = subprocess.Popen(
        pylm_command(
            pylm_etcd, pylm_cluster, "run", f"{tmp_path / 'echoapp.py'}:Echo", "--name", "ran"
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_for(lambda: bool(pylm_registry.instances("ran")), 20, "the server registered")
        (record,) = pylm_registry.instances("ran")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            out, err = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()  # nothing left behind
                process.wait(10)
    assert process.returncode == 0, err
    started = [line for line in out.splitlines() if " - ran - INFO - " in line]
    assert len(started) == 2, out
    assert started[0].endswith(
        f"ran (standalone) serving: rep {record.endpoints['rep']};"
        f" cluster {pylm_cluster!r} at {pylm_etcd.url}; metrics {record.metrics}"
    )
    assert started[1].endswith("ran (standalone) stopped after serving 0 message(s)")


# ------------------------------------------------------------------ a name with no instance

MAKERS: dict[str, Callable[..., object]] = {
    "Client": Client,
    "AsyncClient": AsyncClient,
    "LoopClient": lambda name, **options: LoopClient(name, announce=False, **options),
    "parallel Client": ParallelClient,
}


@pytest.mark.parametrize("kind", list(MAKERS))
def test_a_name_without_instance_fails_fast_with_a_hint(
    pylm_etcd: LocalEtcd, pylm_cluster: str, pylm_registry: Registry, kind: str
) -> None:
    began = time.monotonic()
    with pytest.raises(NoInstance) as raised:
        MAKERS[kind]("ghost", registry=pylm_registry)  # timeout: 10 s by default
    took = time.monotonic() - began
    assert 1.0 <= took < 10, took  # waited 1 s for an instance, not a call's timeout (10 s)
    error = raised.value
    assert isinstance(error, RegistryError) and isinstance(error, LookupError)
    assert (error.server, error.cluster, error.registry) == ("ghost", pylm_cluster, pylm_etcd.url)
    assert error.waited == 1.0
    assert str(error) == (
        f"no instance of server 'ghost' is registered in cluster {pylm_cluster!r} at"
        f" {pylm_etcd.url} (waited 1 s); `pylm --registry {pylm_etcd.url} --cluster"
        f" {pylm_cluster} ls` lists the servers registered there"
    )


def test_the_wait_is_an_option(pylm_registry: Registry) -> None:
    began = time.monotonic()
    with pytest.raises(NoInstance, match=r"\(waited 0 s\)"):
        Client("ghost", registry=pylm_registry, wait=0)
    assert time.monotonic() - began < 1.0
    for wrong in (-1, "1", True, float("nan")):
        with pytest.raises(ValueError, match="wait must be a non-negative number"):
            Client("ghost", registry=pylm_registry, wait=wrong)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="wait must be a non-negative number"):
        LoopClient("ghost", registry=pylm_registry, wait=-1)


def test_a_pipeline_that_registers_within_the_wait_is_found(pylm_registry: Registry) -> None:
    """The client starts first: it waits for the first stage, then for the
    last one, each up to ``wait``."""
    results: list[bytes] = []
    failures: list[BaseException] = []
    looking = threading.Event()

    def call() -> None:
        looking.set()
        try:
            with LoopClient(
                "late_stage", registry=pylm_registry, announce=False, wait=30
            ) as client:
                results.extend(client.job("up", [b"late"]))
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    stage = Upper(
        "late_stage", next_call="late_last.done", registry=pylm_registry, log_stdout=False
    )
    last = Done("late_last", registry=pylm_registry, log_stdout=False)
    try:
        assert looking.wait(10)
        stage.start(background=True)
        wait_for(lambda: bool(pylm_registry.instances("late_stage")), 10, "the stage registered")
        last.start(background=True)
        thread.join(30)
        assert not thread.is_alive()
    finally:
        stage.stop()
        last.stop()
    assert failures == [] and results == [b"LATE!"]


def test_pylm_call_of_a_missing_name_fails_fast_with_the_hint(
    pylm_etcd: LocalEtcd, pylm_cluster: str
) -> None:
    began = time.monotonic()
    done = subprocess.run(
        pylm_command(pylm_etcd, pylm_cluster, "call", "ghost", "f", "x"),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=30,
    )
    assert time.monotonic() - began < 10  # not the call's --timeout (10 s): its 1 s wait
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (
        f"pylm: no instance of server 'ghost' is registered in cluster {pylm_cluster!r} at"
        f" {pylm_etcd.url} (waited 1 s); `pylm --registry {pylm_etcd.url} --cluster"
        f" {pylm_cluster} ls` lists the servers registered there\n"
    )


def test_ctrl_c_stops_a_blocking_start_without_a_traceback(tmp_path: Path) -> None:
    """The README's quick start: ``python server.py``, then Ctrl-C. The server
    says it stopped, start() returns, the script ends with status 0."""
    script = tmp_path / "server.py"
    script.write_text(
        textwrap.dedent(
            """
            from pylm.standalone import Server

            class Echo(Server):
                def echo(self, message):
                    return message

            Echo("foreground", "tcp://127.0.0.1:0", metrics=False).start()
            print("start() returned", flush=True)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()  # the serving line: it is ready
        assert "foreground (standalone) serving: " in first, first
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "Traceback" not in err, err
    assert "foreground (standalone) stopped after serving 0" in out
    assert out.rstrip().endswith("start() returned")
