"""A small HTTP server in a thread, for ``/metrics``, ``/healthz`` and ``/sd``."""

from __future__ import annotations

import logging
import selectors
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pylm.errors import PylmError

__all__ = ["HttpService", "QuietHandler"]

log = logging.getLogger("pylm.httpd")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A scraper that hung up (its timeout ran out) is routine: a debug
        line; anything else a warning on the ``pylm.httpd`` logger (the
        standard library would print a traceback to stderr)."""
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError):
            log.debug("%s:%s hung up: %r", *client_address[:2], error)
        else:
            log.warning("answering %s failed", client_address, exc_info=True)


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that answers in one call and logs nothing
    (Prometheus asks every few seconds)."""

    server_version = "pylm"

    def answer(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class HttpService:
    """Serves ``handler`` on ``host:port`` (0: a free port) from a thread it
    owns, between :meth:`start` and :meth:`stop`. The thread sleeps until a
    request or :meth:`stop` comes (no polling: nothing wakes a busy server
    process between scrapes)."""

    def __init__(self, host: str, port: int, handler: type[BaseHTTPRequestHandler], name: str):
        self.host = host
        self.port = port
        self.handler = handler
        self.name = name
        self._http: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None

    def start(self) -> None:
        try:
            http = _Server((self.host, self.port), self.handler)
        except OSError as exc:
            raise PylmError(
                f"{self.name} cannot listen on {self.host}:{self.port}: {exc.strerror}"
            ) from None
        self._http = http
        self.port = int(http.server_address[1])
        self._wake = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        http, wake = self._http, self._wake
        assert http is not None and wake is not None
        with selectors.DefaultSelector() as selector:
            selector.register(http, selectors.EVENT_READ)
            selector.register(wake[0], selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is wake[0]:
                        return
                    http.handle_request()  # readable: accepts at once; a thread answers

    def stop(self) -> None:
        http, self._http = self._http, None
        wake, self._wake = self._wake, None
        if wake is not None:
            wake[1].send(b"x")
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(5)
        if http is not None:
            http.server_close()
        if wake is not None:
            wake[0].close()
            wake[1].close()
