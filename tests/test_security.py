"""CURVE: servers that require it let in only the clients whose keys they
allow; keys from files (``pylm keys``) and the environment, or objects."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import ANY
from servers import Doer, Last, Step

from pylm.chained import LoopClient
from pylm.errors import CurveRefused, PylmError, RequestTimeout
from pylm.parallel import Client as ParallelClient
from pylm.parallel import Master
from pylm.registry import Registry
from pylm.security import Curve, Keys, generate_keys
from pylm.standalone import Client
from pylm.standalone import Server as RepServer
from pylm.testing import wait_for


class Counted(RepServer):
    calls = 0

    def echo(self, message: bytes) -> bytes:
        type(self).calls += 1
        return message


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """Secret key files of a server identity, an allowed client and a stranger;
    the public keys of the allowed ones (server and client) in ``allowed/``."""
    made = {}
    for name in ("cluster", "client", "stranger"):
        _, made[name] = generate_keys(name, tmp_path / "keys")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    for name in ("cluster", "client"):
        (allowed / f"{name}.key").write_bytes((tmp_path / "keys" / f"{name}.key").read_bytes())
    made["allowed"] = allowed
    return made


def test_only_allowed_keys_get_in(keys: dict[str, Path], serve: Callable[..., object]) -> None:
    identity = Keys.load(keys["cluster"])
    server = serve(
        Counted(
            "echo", ANY, log_stdout=False, curve=Curve(identity, [Keys.load(keys["client"]).public])
        )
    )
    allowed = Curve(Keys.load(keys["client"]), server_key=identity.public)
    with Client(server.address, "echo", curve=allowed, timeout=5) as client:
        assert client.job("echo", b"in") == b"in"
    Counted.calls = 0
    stranger = Curve(Keys.load(keys["stranger"]), server_key=identity.public)
    for curve in (stranger, None):  # a wrong key, or none: nothing gets through
        with Client(server.address, "echo", curve=curve, timeout=0.5) as client:
            with pytest.raises(RequestTimeout):
                client.job("echo", b"let me in")
    # A client with keys learns why: the server refused its key.
    with Client(server.address, "echo", curve=stranger, timeout=0.5) as client:
        with pytest.raises(CurveRefused, match=f"server at {server.address} refused"):
            client.job("echo", b"let me in")
    # The wrong server key: the handshake fails (the parallel client, for its job path).
    wrong_server = Curve(Keys.load(keys["client"]), server_key=Keys.load(keys["stranger"]).public)
    with ParallelClient(server.address, "echo", curve=wrong_server, timeout=0.5) as jobs:
        (outcome,) = jobs.results("echo", [b"let me in"])
        assert isinstance(outcome.error, CurveRefused), outcome
        assert "handshake" in str(outcome.error)
    assert Counted.calls == 0
    with Client(server.address, "echo", curve=allowed, timeout=5) as client:
        assert client.job("echo", b"still in") == b"still in"  # and the server serves on


def test_keys_from_the_environment_and_the_registry(
    keys: dict[str, Path],
    pylm_registry: Registry,
    serve: Callable[..., object],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYLM_CURVE_KEYS", str(keys["cluster"]))
    monkeypatch.setenv("PYLM_CURVE_ALLOW", str(keys["allowed"]))
    serve(Counted("echo", registry=pylm_registry, log_stdout=False))
    (record,) = pylm_registry.instances("echo")
    assert record.curve == Keys.load(keys["cluster"]).public.decode()
    monkeypatch.setenv("PYLM_CURVE_KEYS", str(keys["client"]))  # the clients' own pair
    with Client(
        "echo", registry=pylm_registry, timeout=5
    ) as client:  # the server key: from the record
        assert client.job("echo", b"by name") == b"by name"
    monkeypatch.delenv("PYLM_CURVE_KEYS")
    with pytest.raises(PylmError, match="requires CURVE"):
        Client("echo", registry=pylm_registry, timeout=5)


def test_a_pipeline_and_a_master_with_curve_by_name(
    keys: dict[str, Path],
    pylm_registry: Registry,
    serve: Callable[..., object],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Servers share one identity and let in that identity (stages call
    # stages, workers call masters) and the client's key.
    monkeypatch.setenv("PYLM_CURVE_KEYS", str(keys["cluster"]))
    monkeypatch.setenv("PYLM_CURVE_ALLOW", str(keys["allowed"]))
    serve(Last("last", registry=pylm_registry, log_stdout=False))
    serve(Step("step", next_call="last.done", registry=pylm_registry, log_stdout=False))
    serve(Master("m", registry=pylm_registry, log_stdout=False))
    serve(Doer("w", "m", registry=pylm_registry, log_stdout=False))
    monkeypatch.setenv("PYLM_CURVE_KEYS", str(keys["client"]))
    with LoopClient("step", registry=pylm_registry, announce=False, timeout=10) as loop:
        assert sorted(loop.job("tag", [b"1", b"2"])) == [b"1>step>done", b"2>step>done"]
        assert loop.get(loop.set(b"cached")) == b"cached"  # the stage's cache, through CURVE
    with ParallelClient("m", registry=pylm_registry, timeout=10) as client:
        assert client.eval("echo", b"parallel") == b"parallel"
    monkeypatch.setenv("PYLM_CURVE_KEYS", str(keys["stranger"]))
    with ParallelClient("m", registry=pylm_registry, timeout=0.5) as client:
        with pytest.raises(CurveRefused, match="refused this client's key"):
            client.eval("echo", b"let me in")
    with LoopClient("step", registry=pylm_registry, announce=False, timeout=0.5) as loop:
        with pytest.raises(CurveRefused, match=r"the last stage .* refused this client's key"):
            list(loop.job("tag", [b"let me in"]))


def test_pylm_keys_makes_a_key_pair(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pylm.cli", "keys", "node1", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    pair = Keys.load(tmp_path / "node1.key_secret")
    assert pair.secret is not None and Keys.load(tmp_path / "node1.key").public == pair.public
    assert (tmp_path / "node1.key_secret").stat().st_mode & 0o077 == 0
    with pytest.raises(ValueError, match="secret key"):
        Curve(Keys.load(tmp_path / "node1.key"))


def test_keys_for_servers_that_do_not_require_curve(
    keys: dict[str, Path],
    pylm_registry: Registry,
    serve: Callable[..., object],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    serve(Counted("plain", registry=pylm_registry, log_stdout=False))  # no CURVE
    monkeypatch.setenv("PYLM_CURVE_KEYS", str(keys["client"]))
    with Client("plain", registry=pylm_registry, timeout=5) as client:  # the record says: plain
        assert client.job("echo", b"plain") == b"plain"
    with pytest.raises(FileExistsError, match="exists"):
        generate_keys("client", tmp_path / "keys")  # never overwrites a pair


def test_a_curve_stage_warns_when_its_next_stage_is_plain(
    keys: dict[str, Path],
    pylm_registry: Registry,
    serve: Callable[..., object],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    serve(Last("last", registry=pylm_registry, log_stdout=False))  # no CURVE
    monkeypatch.setenv("PYLM_CURVE_KEYS", str(keys["cluster"]))
    monkeypatch.setenv("PYLM_CURVE_ALLOW", str(keys["allowed"]))
    with caplog.at_level(logging.WARNING):
        serve(Step("step", next_call="last.done", registry=pylm_registry, log_stdout=False))
        monkeypatch.setenv("PYLM_CURVE_KEYS", str(keys["client"]))
        with LoopClient("step", registry=pylm_registry, announce=False, timeout=10) as loop:
            assert list(loop.job("tag", [b"1"])) == [b"1>step>done"]  # delivered, in plain
    assert "next stage last registered no CURVE key" in caplog.text


def test_a_plain_loop_client_to_a_curve_stage_is_told_so_at_once(
    keys: dict[str, Path],
    serve: Callable[..., object],
    free_tcp_address: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client by address without keys, to a last stage that takes CURVE
    only: not "addresses swapped", nor a timeout, but what is missing."""
    monkeypatch.delenv("PYLM_CURVE_KEYS", raising=False)
    identity = Keys.load(keys["cluster"])
    allowed = [Keys.load(keys["client"]).public]
    last = serve(Last("last", ANY, ANY, ANY, log_stdout=False, curve=Curve(identity, allowed)))
    with LoopClient(
        last.push, free_tcp_address, free_tcp_address, "step", timeout=10, announce=False
    ) as client:
        with pytest.raises(PylmError, match="takes CURVE connections only") as caught:
            list(client.job("tag", [b"1"]))
        assert not isinstance(caught.value, RequestTimeout)
        assert "swapped" not in str(caught.value) and "push_address" not in str(caught.value)


def test_by_address_with_curve_but_no_server_key_is_refused_at_start(
    keys: dict[str, Path], serve: Callable[..., object]
) -> None:
    # With keys but no key for the server it connects to by address, a stage
    # or a worker would go out in plain text: start() raises instead.
    last = serve(Last("last", ANY, ANY, ANY, log_stdout=False))
    own = Curve(Keys.load(keys["cluster"]))
    step = Step("step", ANY, last.address, "last.done", ANY, log_stdout=False, curve=own)
    with pytest.raises(ValueError, match=f"no public key for next stage 'last' at {last.address}"):
        step.start(background=True)
    master = serve(Master("m", ANY, ANY, log_stdout=False))
    worker = Doer("w", "m", master.back, log_stdout=False, curve=own)
    with pytest.raises(ValueError, match=f"no public key for master 'm' at {master.back}"):
        worker.start(background=True)


def test_a_stage_without_keys_says_so_when_its_next_stage_requires_curve(
    keys: dict[str, Path],
    pylm_registry: Registry,
    serve: Callable[..., object],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR):
        serve(Step("step", next_call="last.done", registry=pylm_registry, log_stdout=False))
        monkeypatch.setenv("PYLM_CURVE_KEYS", str(keys["cluster"]))
        serve(Last("last", registry=pylm_registry, log_stdout=False))
        wait_for(
            lambda: "next stage last requires CURVE and this stage has no keys" in caplog.text,
            10,
            "the stage's error about its missing keys",
        )


def test_the_gateway_calls_a_curve_cluster_with_its_own_keys(
    keys: dict[str, Path],
    pylm_registry: Registry,
    serve: Callable[..., object],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pylm gateway in front of servers that require CURVE: with a key pair
    on their allow-list (PYLM_CURVE_KEYS), it calls a standalone server, a
    pipeline and a master, their keys taken from their records; with a key
    they refuse, the call is a 502 problem saying so."""
    pytest.importorskip("uvicorn", reason="the gateway extra")
    import json
    import threading
    import urllib.error
    import urllib.request

    from pylm.gateway import Gateway, HTTPServer

    monkeypatch.setenv("PYLM_CURVE_KEYS", str(keys["cluster"]))
    monkeypatch.setenv("PYLM_CURVE_ALLOW", str(keys["allowed"]))
    serve(Counted("echo", registry=pylm_registry, log_stdout=False))
    serve(Last("last", registry=pylm_registry, log_stdout=False))
    serve(Step("step", next_call="last.done", registry=pylm_registry, log_stdout=False))
    serve(Master("m", registry=pylm_registry, log_stdout=False))
    serve(Doer("w", "m", registry=pylm_registry, log_stdout=False))

    def post(url: str, body: bytes) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=20) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except urllib.error.URLError:
            return 0, b""  # not listening yet

    def refused(url: str) -> bool:
        status, body = post(url, b"let me in")
        return status == 502 and json.loads(body)["title"] == "CURVE refused"

    for key in (keys["client"], keys["stranger"]):
        monkeypatch.setenv("PYLM_CURVE_KEYS", str(key))
        server = HTTPServer(Gateway(pylm_registry, timeout=3), port=0)
        serving = threading.Thread(target=server.run)
        serving.start()
        url = server.url
        try:
            ready = f"{url}/healthz"
            wait_for(lambda: post(ready, b"")[0] == 405, 20, "the gateway serving")  # noqa: B023
            paths = ("/echo/echo", "/step/tag", "/m/echo")
            if key == keys["client"]:
                wait_for(lambda: post(f"{url}/step/tag", b"b")[0] == 200, 20, "served")  # noqa: B023
                answers = [
                    post(f"{url}{path}", body)
                    for path, body in zip(paths, (b"a", b"b", b"c"), strict=True)
                ]
                assert answers == [(200, b"a"), (200, b"b>step>done"), (200, b"c")]
            else:  # refused once a handshake has been refused before the call's timeout
                with ThreadPoolExecutor(len(paths)) as each:  # at once: 3 s each
                    waits = [
                        each.submit(wait_for, lambda p=f"{url}{path}": refused(p), 30, path)
                        for path in paths
                    ]
                    for done in waits:
                        done.result()
        finally:
            server.stop()
            serving.join(20)
