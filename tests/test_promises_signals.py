"""What ``pylm run`` promises on SIGTERM (what systemd, Docker and Kubernetes
send), observed from outside: the server it runs leaves as ``stop()`` leaves,
deregistering first and serving what clients still send, so that a
scale-down fails no call of clients calling without a pause."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pylm.registry import LocalEtcd, Registry
from pylm.standalone import Client, Server
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
    clients: list[Client] = []
    done, stopped = threading.Event(), threading.Event()
    answers: list[list[bytes]] = [[] for _ in range(4)]
    after_stop = [0] * len(answers)
    failures: list[BaseException] = []

    def call(index: int) -> None:
        try:
            while not done.is_set():
                was_stopped = stopped.is_set()
                answers[index].append(clients[index].job("who", b""))
                if was_stopped:
                    after_stop[index] += 1
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(answers))]
    leaving = subprocess.Popen(
        [sys.executable, "-m", "pylm.cli", "--registry", pylm_etcd.url, "--cluster", pylm_cluster,
         "run", f"{module}:Marked", "--name", "marked", "--ttl", "30"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        staying.start(background=True)
        wait_for(lambda: len(pylm_registry.instances("marked")) == 2, 30, "both instances")
        for _ in answers:
            clients.append(Client("marked", registry=pylm_registry, timeout=5, wait=10))
        for thread in threads:
            thread.start()
        wait_for(
            lambda: bool(failures) or all({b"run", b"here"} <= set(a) for a in answers),
            30,
            "every client reaching both instances",
        )
        leaving.send_signal(signal.SIGTERM)
        assert leaving.wait(30) == 0, leaving.stderr.read() if leaving.stderr else ""
        stopped.set()
        wait_for(
            lambda: bool(failures) or min(after_stop) >= 50,
            30,
            "50 calls per client after the exit",
        )
        # It deregistered on its way out: its record did not wait for its 30 s lease.
        assert [record.pid for record in pylm_registry.instances("marked")] == [os.getpid()]
    finally:
        done.set()
        for thread in threads:
            if thread.is_alive():
                thread.join(30)
        for client in clients:
            client.close()
        leaving.kill()
        leaving.wait(10)
        staying.stop()
    assert failures == []
