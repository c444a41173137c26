"""A small HTTP server in a thread, for ``/metrics``, ``/healthz`` and ``/sd``."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pylm.errors import PylmError

__all__ = ["HttpService", "QuietHandler"]


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
    owns, between :meth:`start` and :meth:`stop`."""

    def __init__(self, host: str, port: int, handler: type[BaseHTTPRequestHandler], name: str):
        self.host = host
        self.port = port
        self.handler = handler
        self.name = name
        self._http: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._http is not None

    def start(self) -> None:
        try:
            http = ThreadingHTTPServer((self.host, self.port), self.handler)
        except OSError as exc:
            raise PylmError(
                f"{self.name} cannot listen on {self.host}:{self.port}: {exc.strerror}"
            ) from None
        http.daemon_threads = True
        self._http = http
        self.port = int(http.server_address[1])
        self._thread = threading.Thread(
            target=http.serve_forever, name=self.name, kwargs={"poll_interval": 0.2}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            http.shutdown()
            http.server_close()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(5)
