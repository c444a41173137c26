"""One name, one interface: a server whose functions differ from the live
instances' of its name is refused at start, unless it is a new version
rolling out (``rolling=True``); by-name clients then call each function
only on the instances that have it (a real etcd)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pylm import chained
from pylm.base import BaseServer
from pylm.errors import InterfaceMismatch, RegistryError
from pylm.registry import Registry
from pylm.standalone import AsyncClient, Client, Server
from pylm.testing import wait_for

pytestmark = pytest.mark.timeout(60)


class Old(Server):
    def echo(self, message: bytes) -> bytes:
        return b"old " + message


class New(Server):
    def echo(self, message: bytes) -> bytes:
        return b"new " + message

    def extra(self, message: bytes) -> bytes:
        return b"extra " + message


class OldAgain(Server):
    """Another class, the same functions: the same interface."""

    def echo(self, message: bytes) -> bytes:
        return b"again " + message


def refused_start(server: BaseServer) -> InterfaceMismatch:
    """The refusal of ``server``'s start (stopped after it)."""
    with pytest.raises(InterfaceMismatch) as refused:
        server.start(background=True)
    server.stop()
    return refused.value


def test_other_functions_under_a_live_name_are_refused(pylm_registry: Registry) -> None:
    with Old("svc", log_stdout=False, registry=pylm_registry):
        (old,) = pylm_registry.instances("svc")
        refused = refused_start(New("svc", log_stdout=False, registry=pylm_registry))
        message = str(refused)
        assert "server 'svc' has functions [echo, extra]" in message
        assert f"have [echo] (instance {old.instance} on {old.host} pid {old.pid})" in message
        assert "rolling=True" in message and "pylm run --rolling" in message
        assert isinstance(refused, RegistryError)
        assert refused.functions == ["echo", "extra"]
        assert refused.live == {old.instance: ["echo"]}
        assert [r.instance for r in pylm_registry.instances("svc")] == [
            old.instance
        ]  # never listed
        # The same functions, from another class: accepted.
        with OldAgain("svc", log_stdout=False, registry=pylm_registry):
            assert len(pylm_registry.instances("svc")) == 2
    # Nothing live any more: any interface may take the name.
    with New("svc", log_stdout=False, registry=pylm_registry):
        pass


class Stage(chained.LastServer):
    """The same function as Old, but a pipeline's last stage."""

    def echo(self, message: bytes) -> bytes:
        return message


def test_another_kind_of_server_under_a_live_name_is_refused(pylm_registry: Registry) -> None:
    with Old("kinds", log_stdout=False, registry=pylm_registry):
        (old,) = pylm_registry.instances("kinds")
        refused = refused_start(Stage("kinds", log_stdout=False, registry=pylm_registry))
        assert "server 'kinds' is a chained-last server" in str(refused)
        assert "live instances of 'kinds' are standalone" in str(refused)
        assert [r.instance for r in pylm_registry.instances("kinds")] == [old.instance]


def test_a_rolling_version_gets_only_the_calls_it_alone_can_answer(pylm_registry: Registry) -> None:
    with (
        Old("roll", log_stdout=False, registry=pylm_registry),
        Client("roll", registry=pylm_registry, timeout=5) as client,
    ):
        assert client.job("echo", b"x") == b"old x"
        new = New("roll", log_stdout=False, registry=pylm_registry, rolling=True)
        with new:
            # The client follows the registry: once it knows of the new
            # instance, a function only the new version has goes there only.
            # (it rewires at a call: echo, which both versions have)
            wait_for(lambda: client.job("echo", b"w") != b"" and len(client.endpoints) == 2,
                     10, "the client hearing of the new instance")  # fmt: skip
            assert [client.job("extra", b"%d" % i) for i in range(40)] == [
                b"extra %d" % i for i in range(40)
            ]
            # Functions both have go to both.
            assert {client.job("echo", b"x") for _ in range(20)} == {b"old x", b"new x"}
            # A new client, from the listing: the same.
            with Client("roll", registry=pylm_registry, timeout=5) as fresh:
                assert all(fresh.job("extra", b"y") == b"extra y" for _ in range(20))
                assert {fresh.job("echo", b"y") for _ in range(20)} == {b"old y", b"new y"}
            # More instances of the new version need no flag, nor does the
            # old version (one restarting meanwhile).
            with (
                New("roll", log_stdout=False, registry=pylm_registry),
                Old("roll", log_stdout=False, registry=pylm_registry),
            ):
                assert len(pylm_registry.instances("roll")) == 4
        # The new version gone: one interface again, every call to every instance.
        wait_for(lambda: client.job("echo", b"w") != b"" and len(client.endpoints) == 1,
                 10, "the client hearing the new instance left")  # fmt: skip
        assert {client.job("echo", b"z") for _ in range(10)} == {b"old z"}


def test_the_async_client_routes_a_rolling_version_alike(pylm_registry: Registry) -> None:
    async def calls(client: AsyncClient) -> tuple[list[bytes], set[bytes]]:
        extras = await asyncio.gather(*(client.job("extra", b"%d" % i) for i in range(40)))
        echoes = await asyncio.gather(*(client.job("echo", b"x") for _ in range(40)))
        return extras, set(echoes)

    async def main() -> tuple[list[bytes], set[bytes]]:
        async with AsyncClient("aroll", registry=pylm_registry, timeout=5) as client:
            return await calls(client)

    with (
        Old("aroll", log_stdout=False, registry=pylm_registry),
        New("aroll", log_stdout=False, registry=pylm_registry, rolling=True),
    ):
        wait_for(lambda: len(pylm_registry.instances("aroll")) == 2, 10, "both versions listed")
        extras, echoes = asyncio.run(main())
    assert extras == [b"extra %d" % i for i in range(40)]
    assert echoes == {b"old x", b"new x"}


class Up(chained.Server):
    def foo(self, message: bytes) -> bytes:
        return message


class DownOld(chained.LastServer):
    def bar(self, message: bytes) -> bytes:
        return b"old " + message


class DownNew(chained.LastServer):
    def bar2(self, message: bytes) -> bytes:
        return b"new " + message


def test_a_stage_sends_its_call_only_to_the_versions_that_have_it(pylm_registry: Registry) -> None:
    """The next stage rolls out a version without the function this stage
    calls: its jobs go to the instances that have it, none fails."""
    with (
        DownOld("down", log_stdout=False, registry=pylm_registry),
        DownNew("down", log_stdout=False, registry=pylm_registry, rolling=True),
        Up("up", next_call="down.bar", log_stdout=False, registry=pylm_registry) as up,
    ):
        wait_for(lambda: len(up.next_instances) == 1, 10, "the stage following the next one")
        with chained.LoopClient("up", registry=pylm_registry, announce=False, timeout=10) as client:
            results = list(client.job("foo", [b"%d" % i for i in range(40)]))
    assert sorted(results) == sorted(b"old %d" % i for i in range(40))


def test_two_interfaces_starting_together_never_both_serve(pylm_registry: Registry) -> None:
    for round in range(5):
        name = f"race{round}"
        servers = [
            Old(name, log_stdout=False, registry=pylm_registry),
            New(name, log_stdout=False, registry=pylm_registry),
        ]
        refused: list[BaseException] = []
        go = threading.Barrier(2)

        def start(server: Server, go: threading.Barrier, refused: list[BaseException]) -> None:
            go.wait()
            try:
                server.start(background=True)
            except InterfaceMismatch as exc:
                refused.append(exc)

        threads = [threading.Thread(target=start, args=(server, go, refused)) for server in servers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        try:
            assert refused, "two interfaces serve under one name"
            assert sum(server.running for server in servers) == 2 - len(refused)
            functions = {tuple(r.functions) for r in pylm_registry.instances(name)}
            assert len(functions) <= 1
        finally:
            for server in servers:
                server.stop()


SERVER_MODULE = """
from pylm.standalone import Server

class Old(Server):
    def hello(self, message):
        return b"hello " + message

class New(Old):
    def bye(self, message):
        return b"bye " + message
"""


def pylm_cli(registry: Registry, *args: str) -> list[str]:
    config = registry.config
    return [sys.executable, "-m", "pylm.cli", "--registry", config.url,
            "--cluster", config.cluster, *args]  # fmt: skip


def test_pylm_run_rolling_and_ls_shows_both_versions(
    pylm_registry: Registry, tmp_path: Path
) -> None:
    module = tmp_path / "versions.py"
    module.write_text(SERVER_MODULE)
    run = ["run", "--name", "greeter"]
    old = subprocess.Popen(
        pylm_cli(pylm_registry, *run, f"{module}:Old"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    new = None
    try:
        wait_for(lambda: pylm_registry.instances("greeter") != [], 20, "the old version registered")
        refused = subprocess.run(
            pylm_cli(pylm_registry, *run, f"{module}:New"),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert refused.returncode != 0
        assert "has functions [bye, hello], but the live instances" in refused.stderr
        assert "have [hello]" in refused.stderr and "Traceback" not in refused.stderr
        new = subprocess.Popen(
            pylm_cli(pylm_registry, *run, f"{module}:New", "--rolling"),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        wait_for(
            lambda: len(pylm_registry.instances("greeter")) == 2, 20, "the new version registered"
        )
        shown = subprocess.run(
            pylm_cli(pylm_registry, "ls"), capture_output=True, text=True, timeout=30
        )
        assert "greeter [standalone]  2 instance(s)" in shown.stdout
        assert "2 versions" in shown.stdout
        assert "functions bye, hello  on " in shown.stdout
        assert "functions hello  on " in shown.stdout
        data = json.loads(
            subprocess.run(
                pylm_cli(pylm_registry, "ls", "--json"), capture_output=True, text=True, timeout=30
            ).stdout
        )
        versions = data["servers"]["greeter"]["versions"]
        assert sorted(v["functions"] for v in versions) == [["bye", "hello"], ["hello"]]
        called = subprocess.run(
            pylm_cli(pylm_registry, "call", "greeter", "bye", "now"),
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert called.returncode == 0 and called.stdout.strip() == "bye now", called.stderr
    finally:
        codes = []
        for process in (new, old):
            if process is not None:
                process.send_signal(signal.SIGINT)
                try:
                    codes.append(process.wait(30))
                except subprocess.TimeoutExpired:
                    process.kill()  # nothing left behind
                    codes.append(process.wait(10))
                if process.stderr is not None:
                    process.stderr.close()
        assert set(codes) == {0}, codes
