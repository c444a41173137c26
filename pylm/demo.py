"""``pylm demo``: a registry-backed pipeline end to end, on a local etcd it
starts itself. Three stages start with only a name, in separate processes
(``pylm run``), find each other through etcd, and a LoopClient that knows
only the first stage's name sends jobs through them. With pylm's ``gateway``
extra installed, ``pylm gateway`` runs in front of them: the demo sends a job
over HTTP too and prints the web console's URL; with ``keep``, it sends a job
every 0.1 s until Ctrl-C, for the console to show."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
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


def run_demo(payloads: Iterable[bytes] = (b"a message", b"another one"), keep: bool = False) -> int:
    """Run the demo; its exit status: 0, or 130 when Ctrl-C (or SIGTERM)
    ended it, after stopping its gateway and servers, then its etcd, and
    removing its temporary folder. With ``keep``, it runs on, a job every
    0.1 s, until Ctrl-C (then its status is 0).

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
    stages: list[subprocess.Popen[Any]] = []
    interrupted = kept = False
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
            console = _start_gateway(env, stages)
            with LoopClient("step1", registry=registry, timeout=30, wait=30) as client:
                for result in client.job("foo", payloads):
                    print("Client got: ", result, flush=True)
                if console is not None:
                    _call_over_http(console)
                subprocess.run(  # killed, if Ctrl-C interrupts it: it changes nothing
                    [sys.executable, "-m", "pylm.cli", "topology"],
                    env=env,
                    check=True,
                    timeout=30,
                    process_group=0,
                )
                if keep:
                    kept = True
                    _keep_sending(client, console)
                elif console is not None:
                    print(
                        f"The web console was at {console}/ while the demo ran;"
                        " pylm demo --keep runs it until Ctrl-C",
                        flush=True,
                    )
    except KeyboardInterrupt:
        interrupted = not kept
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


def _start_gateway(env: dict[str, str], started: list[subprocess.Popen[Any]]) -> str | None:
    """Start ``pylm gateway`` on a free port (added to ``started``); its URL
    once it answers, or None (said why) without the gateway extra."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print(
            "(no web console: it needs pylm's gateway extra, pip install '.[gateway]' in a"
            " clone of pylm)",
            flush=True,
        )
        return None
    gateway = subprocess.Popen(
        [sys.executable, "-m", "pylm.cli", "gateway", "--port", "0", "--name", "demo-gateway"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        process_group=0,
    )
    started.insert(0, gateway)  # stopped with the stages, before etcd
    assert gateway.stdout is not None
    url = gateway.stdout.readline().strip().rpartition(" ")[2]
    if not url.startswith("http://"):
        raise PylmError("the demo's gateway did not start (its error is above)")
    deadline = time.monotonic() + 30
    while True:  # bound when it printed its URL; it answers once uvicorn listens
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5):
                break
        except OSError:
            if time.monotonic() > deadline or gateway.poll() is not None:
                raise PylmError(f"the demo's gateway at {url} did not answer") from None
            time.sleep(0.05)
    print(f"pylm gateway at {url}: the web console is {url}/", flush=True)
    return url


def _call_over_http(url: str) -> None:
    """One job through the pipeline over HTTP, as curl would send it (again
    while the gateway's listing of the registry does not have step1 yet)."""
    request = urllib.request.Request(
        f"{url}/step1/foo",
        data=b"an HTTP request",
        headers={"Content-Type": "application/octet-stream"},
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                print(f"HTTP POST {url}/step1/foo got: ", answer.read(), flush=True)
                return
        except urllib.error.HTTPError as exc:
            if exc.code != 404 or time.monotonic() > deadline:
                raise PylmError(f"the demo's HTTP call failed: {exc.code} {exc.read()!r}") from exc
            time.sleep(0.05)
        except urllib.error.URLError as exc:
            raise PylmError(f"the demo's HTTP call to {url} failed: {exc.reason}") from exc


def _keep_sending(client: LoopClient, console: str | None) -> None:
    """A job every 0.1 s through the pipeline, until Ctrl-C."""
    where = f": watch it at {console}/" if console is not None else ""
    print(f"Sending a job every 0.1 s until Ctrl-C{where}", flush=True)
    pause = threading.Event()  # never set: its wait is the pace
    while True:
        for _ in client.job("foo", [b"a job"]):
            pass
        pause.wait(0.1)


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
