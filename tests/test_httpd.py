"""The process's HTTP endpoint under slow and hostile clients (real sockets):
one thread, a read timeout, caps on the request head and on connections."""

from __future__ import annotations

import logging
import re
import selectors
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prerequisites import needs_wrk
from servers import Echo

from pylm.telemetry.exporter import Exporter
from pylm.telemetry.httpd import HttpService, QuietHandler
from pylm.testing import wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def echo() -> Iterator[Echo]:
    """A server of this process, so /healthz has one to report (ready: 200)."""
    with Echo("httpd_echo", "tcp://127.0.0.1:0", log_stdout=False) as server:
        yield server


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    """Raw client sockets, closed after the test."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def connect(port: int, opened: list[socket.socket]) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    opened.append(sock)
    return sock


def get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def closed_within(socks: list[socket.socket], timeout: float) -> list[socket.socket]:
    """Wait up to ``timeout`` s for the server to close each of ``socks``
    (EOF or reset, whatever was sent before is read and dropped); the ones
    still open then."""
    deadline = time.monotonic() + timeout
    waiting = set(socks)
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        while waiting and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    waiting.discard(sock)
                    selector.unregister(sock)
    return [sock for sock in socks if sock in waiting]


def test_scrapers_are_answered_while_300_slow_clients_hold_connections(
    echo: Echo, clients: list[socket.socket]
) -> None:
    threads = threading.active_count()
    with Exporter("127.0.0.1", 0, timeout=30) as endpoint:
        base = f"http://127.0.0.1:{endpoint.port}"
        silent = [connect(endpoint.port, clients) for _ in range(100)]
        trickling = [connect(endpoint.port, clients) for _ in range(100)]
        for sock in trickling:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        huge = [connect(endpoint.port, clients) for _ in range(100)]
        for sock in huge:  # a head over the cap, never ended: 431, then closed
            try:
                sock.sendall(b"GET /metrics HTTP/1.1\r\n" + b"X-Big: " + b"a" * 20_000)
            except OSError:
                pass  # refused and closed while still sending: as good
        stop = threading.Event()

        def trickle() -> None:  # one byte per connection every 50 ms
            while not stop.wait(0.05):
                for sock in trickling:
                    try:
                        sock.send(b"a")
                    except OSError:
                        pass  # closed as the oldest over the cap

        pacer = threading.Thread(target=trickle)
        pacer.start()
        try:
            for path in ("/healthz", "/metrics", "/healthz", "/metrics"):
                began = time.monotonic()
                status, body = get(base + path)
                assert status == 200, body
                assert time.monotonic() - began < 2.0
            assert b"pylm_calls_total" in get(base + "/metrics")[1]
            # One thread serves them all (plus this test's pacer).
            assert threading.active_count() <= threads + 2
            assert closed_within(huge, 5) == []
            service = endpoint._service
            assert service is not None
            assert service.dropped["too_large"] == 100
            # The slow ones stay open, at most the cap (256) at a time: the
            # oldest gave way as the others came.
            assert service.connections <= 256
            still_open = closed_within(silent + trickling, 0.2)
            assert len(still_open) + service.dropped["overflow"] == 200
            # 300 slow connections and this test's 5 requests, over a cap of 256.
            assert len(still_open) >= 200 - (300 + 5 - 256)
        finally:
            stop.set()
            pacer.join(5)
    assert threading.active_count() <= threads


def test_slow_connections_are_closed_after_the_read_timeout(
    clients: list[socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    service = HttpService("127.0.0.1", 0, QuietHandler, "test-httpd", timeout=0.5)
    service.start()
    try:
        began = time.monotonic()
        silent = [connect(service.port, clients) for _ in range(20)]
        trickling = [connect(service.port, clients) for _ in range(20)]
        with caplog.at_level(logging.WARNING, logger="pylm.httpd"):
            stop = threading.Event()
            while not stop.wait(0.1) and time.monotonic() - began < 1.5:
                for sock in trickling:  # a byte at a time, past the timeout
                    try:
                        sock.send(b"G")
                    except OSError:
                        pass  # closed already
            assert closed_within(silent + trickling, 10) == []
        took = time.monotonic() - began
        assert took >= 0.5  # not before the timeout...
        assert service.dropped["timeout"] == 40
        assert service.connections == 0
    finally:
        service.stop()
    # ... and logged once (a second's worth), not once per connection.
    lines = [r for r in caplog.records if "no request within 0.5 s" in r.getMessage()]
    assert 1 <= len(lines) <= 1 + int(took)


def test_heads_over_the_limits_get_431(clients: list[socket.socket]) -> None:
    service = HttpService("127.0.0.1", 0, QuietHandler, "test-httpd", max_head=1024, max_headers=8)
    service.start()
    try:
        big = connect(service.port, clients)
        big.sendall(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
        many = connect(service.port, clients)
        many.sendall(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 9 + b"\r\n")
        for sock in (big, many):
            answer = sock.makefile("rb").read()
            assert answer.startswith(b"HTTP/1.0 431 "), answer[:100]
        assert service.dropped["too_large"] == 2
    finally:
        service.stop()


def test_over_the_cap_the_connection_waiting_longest_is_closed(
    clients: list[socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    with Exporter("127.0.0.1", 0, max_connections=10) as endpoint:
        with caplog.at_level(logging.WARNING, logger="pylm.httpd"):
            waiting = [connect(endpoint.port, clients) for _ in range(30)]
            # The last 10 are open; a scraper still gets through, the oldest
            # of those giving way.
            status, _ = get(f"http://127.0.0.1:{endpoint.port}/healthz")
            assert status in (200, 503)  # 503 if no other test's server runs here
            assert closed_within(waiting[:21], 5) == []
            assert closed_within(waiting[21:], 0.2) == waiting[21:]
        service = endpoint._service
        assert service is not None and service.dropped["overflow"] == 21
    overflow = [r for r in caplog.records if "over 10 connections" in r.getMessage()]
    assert 1 <= len(overflow) <= 2  # at most one a second


def test_only_get_is_served_and_bodies_are_not_read(clients: list[socket.socket]) -> None:
    with Exporter("127.0.0.1", 0) as endpoint:
        sock = connect(endpoint.port, clients)
        sock.sendall(b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
        assert sock.makefile("rb").read().startswith(b"HTTP/1.0 501 ")
        status, body = get(f"http://127.0.0.1:{endpoint.port}/nothing")
        assert status == 404 and b"/metrics" in body
        # OpenMetrics for a scraper that asks for it
        request = urllib.request.Request(
            f"http://127.0.0.1:{endpoint.port}/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        )
        with urllib.request.urlopen(request, timeout=2) as answer:
            assert answer.headers["Content-Type"].startswith("application/openmetrics-text")
            assert answer.read().endswith(b"# EOF\n")


def _most_in_flight() -> int:
    """The most bytes the server's send buffer may hold: TCP autotunes it
    up to tcp_wmem's maximum (4 MiB on Linux by default, so a 4 MB answer
    could be all sent before the client hung up: no hang-up to notice)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as wmem:
            return int(wmem.read().split()[2])
    except (OSError, ValueError, IndexError):
        return 16 * 2**20


CLIENT_RCVBUF = 64 * 1024  # set on the hanging-up client: fixed, not autotuned
BIG = 2 * _most_in_flight() + 4 * CLIENT_RCVBUF  # never all in the buffers at once


class Broken(QuietHandler):
    def do_GET(self) -> None:  # http.server's naming
        if self.path == "/bug":
            raise ValueError("a bug")
        self.answer(200, "text/plain", b"x" * BIG)  # more than both sockets' buffers


def test_failures_are_a_500_and_a_warning_and_hang_ups_a_debug_line(
    clients: list[socket.socket],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = HttpService("127.0.0.1", 0, Broken, "test-httpd")
    service.start()
    try:
        with caplog.at_level(logging.DEBUG, logger="pylm.httpd"):
            status, _ = get(f"http://127.0.0.1:{service.port}/bug")
            assert status == 500
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            clients.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)  # before connect
            sock.settimeout(5)
            sock.connect(("127.0.0.1", service.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            sock.sendall(b"GET /big HTTP/1.0\r\n\r\n")
            sock.recv(1000)  # the answer started; then a reset mid-answer
            sock.close()
            wait_for(lambda: service.dropped["error"] == 2, 5, "the hang-up noticed")
            assert get(f"http://127.0.0.1:{service.port}/")[0] == 200  # serving on
    finally:
        service.stop()
    assert capsys.readouterr().err == ""  # the standard library would print tracebacks
    failed = [r for r in caplog.records if "answering" in r.getMessage()]
    assert failed and failed[0].levelno == logging.WARNING and failed[0].exc_info is not None
    hung_up = [r for r in caplog.records if "hung up" in r.getMessage()]
    assert hung_up and all(r.levelno == logging.DEBUG for r in hung_up)


@needs_wrk
def test_wrk_with_64_connections_gets_only_answers(echo: Echo) -> None:
    with Exporter("127.0.0.1", 0) as endpoint:
        done = subprocess.run(
            ["wrk", "-t2", "-c64", "-d2s", "--timeout", "2s", f"{endpoint.url}"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Socket errors" not in done.stdout, done.stdout
    assert "Non-2xx" not in done.stdout, done.stdout
    requests = re.search(r"(\d+) requests in", done.stdout)
    assert requests is not None and int(requests.group(1)) > 0, done.stdout
