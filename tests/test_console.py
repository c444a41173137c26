"""The web console (pylm.console), served by the gateway at ``/``: a real
headless Chromium loads it against a live pipeline and a real etcd, and
the graph's nodes, edges and rates are read from the page it built."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser import FLAGS, Browser
from prerequisites import needs_chromium
from servers import Echo, Last, Step

from pylm.chained import LoopClient
from pylm.gateway import Gateway, HTTPServer
from pylm.registry import Registry
from pylm.standalone import Server
from pylm.testing import wait_for

pytestmark = pytest.mark.timeout(120)

# Headless, no background traffic (the browser driver's flags), and a page
# given 5 s of its own time to load before its DOM is read.
CHROMIUM_FLAGS = (*FLAGS, "--virtual-time-budget=5000")


@pytest.fixture
def console(pylm_registry: Registry) -> Iterator[str]:
    """first -> second -> last with jobs flowing, and the gateway: its URL."""
    stages = [
        Last("last", registry=pylm_registry, log_stdout=False),
        Step("second", next_call="last.done", registry=pylm_registry, log_stdout=False),
        Step("first", next_call="second.tag", registry=pylm_registry, log_stdout=False),
    ]
    server = HTTPServer(Gateway(pylm_registry), port=0)
    serving = threading.Thread(target=server.run)
    flowing = threading.Event()
    stop = threading.Event()

    def traffic() -> None:
        with LoopClient("first", registry=pylm_registry, announce=False) as client:
            while not stop.is_set():
                assert len(list(client.job("tag", [b"x"] * 20))) == 20
                flowing.set()

    feeder = threading.Thread(target=traffic)
    try:
        for stage in stages:
            stage.start(background=True)
        serving.start()
        wait_for(lambda: len(pylm_registry.instances()) == 4, 20, "3 stages and the gateway")
        feeder.start()
        assert flowing.wait(20)
        yield server.url
    finally:
        stop.set()
        if feeder.is_alive():
            feeder.join(20)
        server.stop()
        serving.join(20)
        for stage in reversed(stages):
            stage.stop()


def chromium(tmp_path: Path, *arguments: str) -> str:
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    done = subprocess.run(
        [
            shutil.which("chromium") or "chromium",
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            *arguments,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def calls_of(dom: str, node: str) -> str:
    found = re.search(rf'data-node="{node}" data-calls="([^"]*)"', dom)
    assert found is not None, f"no node {node} in the page"
    return found.group(1)


@needs_chromium
def test_the_console_draws_the_cluster_and_its_rates(console: str, tmp_path: Path) -> None:
    """The page draws a node per server and an edge per next stage; loaded
    again while jobs flow, the first stage's calls/s is a positive number;
    a screenshot is taken."""
    dom = chromium(tmp_path, "--dump-dom", f"{console}/?live=0")
    nodes = re.findall(r'data-node="([^"]+)"', dom)
    assert sorted(nodes) == ["first", "gateway", "last", "second"]
    assert sorted(re.findall(r'data-edge="([^"]+)"', dom)) == [
        "first&gt;second",
        "second&gt;last",
    ]
    wait_for(
        lambda: (
            float(calls_of(chromium(tmp_path, "--dump-dom", f"{console}/?live=0"), "first") or 0)
            > 0
        ),
        60,
        "a rate for the first stage",
    )
    picture = tmp_path / "console.png"
    chromium(tmp_path, "--window-size=1100,520", f"--screenshot={picture}", f"{console}/?live=0")
    assert picture.read_bytes().startswith(b"\x89PNG")


@needs_chromium
def test_the_open_page_follows_the_cluster_live(
    console: str, pylm_registry: Registry, tmp_path: Path
) -> None:
    """Opened once in a real browser (driven over the DevTools protocol:
    the page never ends loading), the page follows the event stream: the
    first stage's calls/s takes new values as jobs flow, and a server that
    registers afterwards appears as a node, with no reload."""
    with Browser(tmp_path / "live-profile") as browser:
        browser.open(f"{console}/")

        def nodes() -> list[str]:
            found = browser.evaluate(
                "[...document.querySelectorAll('[data-node]')].map(n => n.dataset.node)"
            )
            return sorted(found or [])

        wait_for(lambda: nodes() == ["first", "gateway", "last", "second"], 20, "the graph")
        browser.evaluate("window.loadedOnce = true")  # gone if the page reloaded
        rates: set[str] = set()

        def new_rate() -> bool:
            value = browser.evaluate(
                "document.querySelector('[data-node=\"first\"]').dataset.calls"
            )
            if value:
                rates.add(value)
            return len(rates) >= 3

        wait_for(new_rate, 30, "three views of the first stage's rate")
        assert all(float(rate) > 0 for rate in rates), rates
        with Echo("newcomer", registry=pylm_registry, log_stdout=False):
            wait_for(lambda: "newcomer" in nodes(), 20, "the newcomer drawn")
        assert browser.evaluate("window.loadedOnce") is True
        assert browser.evaluate("document.getElementById('status').textContent").startswith("live")


def test_the_console_streams_a_view_a_second(console: str) -> None:
    """/console/events: server-sent events, each a whole view of the
    cluster (nodes with their rates, edges); the second comes within about
    a second of the first."""
    with urllib.request.urlopen(f"{console}/console/events", timeout=10) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        views = []
        for line in stream:
            if line.startswith(b"data: "):
                views.append(json.loads(line[6:]))
                if len(views) == 2:
                    break
    names = {node["name"]: node for node in views[1]["nodes"]}
    assert set(names) == {"first", "second", "last", "gateway"}
    assert names["first"]["calls_per_second"] > 0
    assert {(e["source"], e["target"]) for e in views[1]["edges"]} == {
        ("first", "second"),
        ("second", "last"),
    }


class Flaky(Server):
    """Fails on what is not a number."""

    def parse(self, message: bytes) -> bytes:
        return b"%d" % int(message)


@needs_chromium
def test_a_servers_recent_errors_show_in_its_details(
    pylm_registry: Registry, tmp_path: Path
) -> None:
    """/console/errors/<server>: its instances' last errors, newest first;
    the page opened on that server (?server=) lists them."""
    with Flaky("flaky", registry=pylm_registry, log_stdout=False):
        server = HTTPServer(Gateway(pylm_registry), port=0)
        serving = threading.Thread(target=server.run)
        serving.start()
        try:
            wait_for(lambda: _answers(f"{server.url}/healthz"), 20, "the gateway serving")
            wait_for(lambda: _post(f"{server.url}/flaky/parse", b"7") == 200, 20, "flaky found")
            assert _post(f"{server.url}/flaky/parse", b"seven") == 502
            assert _post(f"{server.url}/flaky/parse", b"eight") == 502
            with urllib.request.urlopen(f"{server.url}/console/errors/flaky", timeout=10) as answer:
                found = json.load(answer)
            assert found["server"] == "flaky" and found["unanswered"] == []
            assert [(e["function"], e["type"]) for e in found["errors"]] == [
                ("parse", "ValueError")
            ] * 2
            assert "b'eight'" in found["errors"][0]["message"]  # newest first
            assert _status(f"{server.url}/console/errors/nobody") == 404
            assert _status(f"{server.url}/console/errors/bad%20name") == 400
            dom = chromium(tmp_path, "--dump-dom", f"{server.url}/?live=0&server=flaky")
            assert "Recent errors" in dom
            assert "ValueError" in dom and "b'seven'" in dom
        finally:
            server.stop()
            serving.join(20)


@needs_chromium
def test_with_tokens_the_console_takes_one_once_and_keeps_it_in_a_cookie(
    pylm_registry: Registry, tmp_path: Path
) -> None:
    """A gateway with tokens serves its console and its data only with one:
    a bearer token, or the cookie that /?token=TOKEN sets (HttpOnly,
    SameSite=Lax) before it sends the browser on without the token in the
    address; a real browser then draws the page, its data read with the cookie."""
    with Flaky("flaky", registry=pylm_registry, log_stdout=False):
        server = HTTPServer(Gateway(pylm_registry, tokens=frozenset({"sesame"})), port=0)
        serving = threading.Thread(target=server.run)
        serving.start()
        url = server.url
        try:
            wait_for(lambda: _answers(f"{url}/healthz"), 20, "the gateway serving")
            for path in ("/", "/console/cluster.json", "/console/events", "/console/errors/flaky"):
                assert _status(f"{url}{path}") == 401, path
                assert _status(f"{url}{path}", {"Cookie": "pylm_token=open"}) == 403, path
            assert _status(f"{url}/?token=open") == 403
            bearer = {"Authorization": "Bearer sesame"}
            assert _status(f"{url}/console/cluster.json", bearer) == 200
            connection = http.client.HTTPConnection(server.host, server.port, timeout=10)
            connection.request("GET", "/?token=sesame&live=0&server=flaky")
            moved = connection.getresponse()
            connection.close()
            assert moved.status == 303
            assert moved.getheader("Location") == "./?live=0&server=flaky"
            cookie = moved.getheader("Set-Cookie") or ""
            assert cookie.startswith("pylm_token=sesame;"), cookie
            assert "HttpOnly" in cookie and "samesite=lax" in cookie.lower(), cookie
            kept = {"Cookie": "pylm_token=sesame"}
            assert _status(f"{url}/console/cluster.json", kept) == 200
            assert _status(f"{url}/console/errors/flaky", kept) == 200
            dom = chromium(tmp_path, "--dump-dom", f"{url}/?token=sesame&live=0&server=flaky")
            assert 'data-node="flaky"' in dom and "Recent errors" in dom
        finally:
            server.stop()
            serving.join(20)


def _post(url: str, body: bytes) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        request = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(request, timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_gateway_stops_with_a_console_open(pylm_registry: Registry) -> None:
    """A page following the event stream does not hold the gateway's stop
    up: run() returns within the graceful shutdown's 2 s."""
    server = HTTPServer(Gateway(pylm_registry), port=0)
    serving = threading.Thread(target=server.run)
    serving.start()
    try:
        wait_for(lambda: _answers(f"{server.url}/healthz"), 20, "the gateway serving")
        with urllib.request.urlopen(f"{server.url}/console/events", timeout=10) as stream:
            assert stream.readline().startswith(b"data: ")
            stopped_at = time.monotonic()
            server.stop()
            serving.join(10)
            assert not serving.is_alive()
            assert time.monotonic() - stopped_at < 5
    finally:
        server.stop()
        serving.join(10)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except OSError:
        return False
