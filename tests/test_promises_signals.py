"""What ``pylm run`` promises on SIGTERM (what systemd, Docker and Kubernetes
send), observed from outside: the server it runs leaves as ``stop()`` leaves,
deregistering first and serving what clients still send, so that a
scale-down fails no call of clients calling without a pause."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import calls_through_a_scale_down, pylm_command

from pylm.registry import LocalEtcd, Registry
from pylm.standalone import Server
from pylm.testing import wait_for

SERVER_MODULE = """\
from pylm.standalone import Server


class Marked(Server):
    def who(self, message):
        return b"run"
"""


class Marked(Server):
    def who(self, message: bytes) -> bytes:
        return b"here"


@pytest.mark.timeout(120)
def test_sigterm_under_pylm_run_fails_no_call(
    pylm_etcd: LocalEtcd, pylm_cluster: str, pylm_registry: Registry, tmp_path: Path
) -> None:
    module = tmp_path / "marked_server.py"
    module.write_text(SERVER_MODULE)
    staying = Marked("marked", registry=pylm_registry, log_stdout=False)
    leaving = subprocess.Popen(
        pylm_command(
            pylm_etcd, pylm_cluster, "run", f"{module}:Marked", "--name", "marked", "--ttl", "30"
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def sigterm() -> None:
        leaving.send_signal(signal.SIGTERM)
        assert leaving.wait(30) == 0, leaving.stderr.read() if leaving.stderr else ""

    try:
        staying.start(background=True)
        wait_for(lambda: len(pylm_registry.instances("marked")) == 2, 30, "both instances")
        failures = calls_through_a_scale_down(pylm_registry, "marked", {b"run", b"here"}, sigterm)
        # It deregistered on its way out: its record did not wait for its 30 s lease.
        assert [record.pid for record in pylm_registry.instances("marked")] == [os.getpid()]
    finally:
        leaving.kill()
        leaving.wait(10)
        staying.stop()
    assert failures == []
