"""``pylm demo``: a registry-backed pipeline end to end, on a local etcd it
starts itself. Three stages start with only a name, in separate processes
(``pylm run``), find each other through etcd, and a LoopClient that knows
only the first stage's name sends jobs through them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence

from pylm.chained import LastServer, LoopClient, Server
from pylm.registry import LocalEtcd, Registry

__all__ = ["Last", "Step1", "Step2", "run_demo"]


class Step1(Server):
    def foo(self, message: bytes) -> bytes:
        return b"you sent me " + message


class Step2(Server):
    def bar(self, message: bytes) -> bytes:
        return b"got it too, after " + message


class Last(LastServer):
    def baz(self, message: bytes) -> bytes:
        return b"ACK: " + message


def run_demo(payloads: Sequence[bytes] = (b"a message", b"another one")) -> int:
    with LocalEtcd() as etcd, Registry(etcd.url, cluster="demo") as registry:
        print(f"local etcd at {etcd.url}")
        registry.set_config("step1", next="step2.bar")
        registry.set_config("step2", next="last.baz")
        env = {**os.environ, "PYLM_REGISTRY": etcd.url, "PYLM_CLUSTER": "demo"}
        stages = [
            subprocess.Popen(
                [sys.executable, "-m", "pylm.cli", "run", f"pylm.demo:{cls}", "--name", name],
                env=env,
            )
            for cls, name in (("Last", "last"), ("Step2", "step2"), ("Step1", "step1"))
        ]
        try:
            with LoopClient("step1", registry=registry, timeout=30, wait=30) as client:
                for result in client.job("foo", list(payloads)):
                    print("Client got: ", result)
            subprocess.run(
                [sys.executable, "-m", "pylm.cli", "topology"], env=env, check=True, timeout=30
            )
        finally:
            for stage in stages:
                stage.send_signal(signal.SIGINT)
            for stage in stages:
                try:
                    stage.wait(15)
                except subprocess.TimeoutExpired:
                    stage.kill()
                    stage.wait()
    return 0
