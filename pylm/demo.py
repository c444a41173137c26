"""``pylm demo``: a registry-backed pipeline end to end, on a local etcd it
starts itself. Three stages start with only a name, in separate processes
(``pylm run``), find each other through etcd, and a LoopClient that knows
only the first stage's name sends jobs through them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from pylm.chained import LastServer, LoopClient, Server
from pylm.errors import PylmError
from pylm.registry import Registry

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


def run_demo(payloads: Iterable[bytes] = (b"a message", b"another one")) -> int:
    """Run the demo; its exit status: 0, or 130 when Ctrl-C (or SIGTERM)
    ended it, after stopping its servers, then its etcd, and removing its
    temporary folder.

    Its etcd (a ``pylm etcd``) and its servers run in process groups of
    their own, so that the terminal's Ctrl-C reaches the demo only, which
    stops them in order: the servers deregister while etcd still runs."""
    signals = (signal.SIGINT, signal.SIGTERM)
    # Handlers can be set in the main thread only; SIGTERM is then Ctrl-C's.
    main = threading.current_thread() is threading.main_thread()
    before = {signum: signal.getsignal(signum) for signum in signals} if main else {}
    if main and before[signal.SIGTERM] is not signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    folder = tempfile.mkdtemp(prefix="pylm-demo-")
    etcd: subprocess.Popen[str] | None = None
    stages: list[subprocess.Popen[bytes]] = []
    interrupted = False
    try:
        etcd = subprocess.Popen(
            [sys.executable, "-m", "pylm.cli", "etcd", "--port", "0", "--data-dir", folder],
            stdout=subprocess.PIPE,
            text=True,
            process_group=0,
        )
        url = _registry_url(etcd)
        print(f"local etcd at {url}", flush=True)
        env = {**os.environ, "PYLM_REGISTRY": url, "PYLM_CLUSTER": "demo"}
        with Registry(url, cluster="demo") as registry:
            registry.set_config("step1", next="step2.bar")
            registry.set_config("step2", next="last.baz")
            for cls, name in (("Last", "last"), ("Step2", "step2"), ("Step1", "step1")):
                command = ["run", f"pylm.demo:{cls}", "--name", name]
                stages.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "pylm.cli", *command], env=env, process_group=0
                    )
                )
            with LoopClient("step1", registry=registry, timeout=30, wait=30) as client:
                for result in client.job("foo", payloads):
                    print("Client got: ", result, flush=True)
            subprocess.run(  # killed, if Ctrl-C interrupts it: it changes nothing
                [sys.executable, "-m", "pylm.cli", "topology"],
                env=env,
                check=True,
                timeout=30,
                process_group=0,
            )
    except KeyboardInterrupt:
        interrupted = True
    finally:
        # Not to be cut short by a second Ctrl-C: what it started must end.
        for signum in before:
            signal.signal(signum, signal.SIG_IGN)
        try:
            _stop(stages)  # first, while etcd runs: they deregister
            _stop([etcd] if etcd is not None else [])
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            for signum, handler in before.items():
                if handler is not None:  # None: set outside Python, not to be set back
                    signal.signal(signum, handler)
    if interrupted:
        print("pylm demo: interrupted; its servers and its etcd are stopped", file=sys.stderr)
        return 130
    return 0


def _registry_url(etcd: subprocess.Popen[str]) -> str:
    """The PYLM_REGISTRY that ``pylm etcd`` prints once its etcd runs."""
    assert etcd.stdout is not None
    for line in etcd.stdout:
        if line.startswith("export PYLM_REGISTRY="):
            return line.strip().partition("=")[2]
    etcd.wait()
    raise PylmError("the demo's etcd did not start (its error is above)")


def _stop(processes: Sequence[subprocess.Popen[Any]]) -> None:
    """Stop ``processes`` as Ctrl-C would (each leads a process group of
    its own), killing the groups of those still running after 15 s."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    for process in processes:
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
