"""A small HTTP server in one thread, for ``/metrics``, ``/healthz`` and ``/sd``.

Asynchronous I/O in a single thread (a ``selectors`` loop), not a thread
per connection: what a connection costs is a buffer of at most
``max_head`` bytes and a socket, so slow or hostile clients can neither
take threads nor hold the one thread (it never waits on a peer). The
answers themselves are small and made in microseconds to milliseconds
(rendering ``/metrics``), so running the handler in the loop costs the
other connections nothing they would notice.

Limits, per :class:`HttpService`:

- the request line and headers must arrive within ``timeout`` seconds of
  the connection (a client trickling them byte by byte is closed then), and
  the answer must be taken within ``timeout`` seconds as well;
- at most ``max_head`` bytes of them (431 beyond) in at most
  ``max_headers`` lines (431 too); a request body is not read (only GET is
  served) and the connection closes after each answer;
- at most ``max_connections`` open connections: over it, the connection
  that has waited longest for its request is closed at once. (Closing the
  newest instead would let a client holding ``max_connections`` slow
  connections lock every scraper out; this way a scraper, which sends its
  request as soon as it connects, is answered before it is the oldest.)

Every connection dropped is counted in ``pylm_http_dropped_total{endpoint,
reason}`` and logged on the ``pylm.httpd`` logger at most once a second per
reason.
"""

from __future__ import annotations

import errno
import io
import logging
import selectors
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

from prometheus_client import Counter

from pylm.errors import PylmError
from pylm.logs import RateLimiter

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_HEAD",
    "DEFAULT_MAX_HEADERS",
    "DEFAULT_TIMEOUT",
    "DROP_REASONS",
    "HttpService",
    "QuietHandler",
]

log = logging.getLogger("pylm.httpd")

DEFAULT_TIMEOUT = 5.0
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_MAX_HEAD = 16 * 1024
DEFAULT_MAX_HEADERS = 64
BACKLOG = max(128, socket.SOMAXCONN)

# Why a connection was closed without a normal answer.
DROP_REASONS = ("timeout", "overflow", "too_large", "error")

_DROPPED = Counter(
    "pylm_http_dropped",
    "Connections to the process's HTTP endpoint closed without a normal answer: request head"
    " not in time (timeout), over the connection cap (overflow), head too large (too_large),"
    " the handler failed or the client hung up (error)",
    ["endpoint", "reason"],
)

_READ_SIZE = 4096


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that answers in one call and logs nothing
    (Prometheus asks every few seconds). :class:`HttpService` runs it on a
    request already read whole: ``do_GET`` reads ``self.path`` and
    ``self.headers`` and calls :meth:`answer` once."""

    server_version = "pylm"

    def answer(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Connection:
    __slots__ = ("address", "deadline", "inbox", "outbox", "socket")

    def __init__(self, sock: socket.socket, address: Any, deadline: float) -> None:
        self.socket = sock
        self.address = address
        self.deadline = deadline
        self.inbox = bytearray()
        self.outbox: memoryview | None = None  # set: the answer, being sent


class HttpService:
    """Serves ``handler`` on ``host:port`` (0: a free port) from one thread
    it owns, between :meth:`start` and :meth:`stop`. The thread sleeps until
    a connection, a deadline or :meth:`stop` comes (no polling: nothing
    wakes a busy server process between scrapes). See the module for the
    limits; :attr:`dropped` counts the connections dropped, by reason."""

    def __init__(
        self,
        host: str,
        port: int,
        handler: type[BaseHTTPRequestHandler],
        name: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_head: int = DEFAULT_MAX_HEAD,
        max_headers: int = DEFAULT_MAX_HEADERS,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        for option, value in (
            ("max_connections", max_connections),
            ("max_head", max_head),
            ("max_headers", max_headers),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{option} must be a positive int, got {value!r}")
        self.host = host
        self.port = port
        self.handler = handler
        self.name = name
        self.timeout = float(timeout)
        self.max_connections = max_connections
        self.max_head = max_head
        self.max_headers = max_headers
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        # Connections by socket, in order of deadline: reading ones get
        # theirs when accepted, writing ones when their answer is ready, each
        # "now + timeout", so insertion order is deadline order.
        self._reading: dict[socket.socket, _Connection] = {}
        self._writing: dict[socket.socket, _Connection] = {}
        self._limiters = {reason: RateLimiter() for reason in DROP_REASONS}

    @property
    def connections(self) -> int:
        """Connections open now (read from another thread: a snapshot)."""
        return len(self._reading) + len(self._writing)

    def start(self) -> None:
        try:
            info = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0]
            listener = socket.socket(info[0], socket.SOCK_STREAM)
        except OSError as exc:
            raise PylmError(
                f"{self.name} cannot listen on {self.host}:{self.port}: {exc}"
            ) from None
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(info[4])
            listener.listen(BACKLOG)
        except OSError as exc:
            listener.close()
            raise PylmError(
                f"{self.name} cannot listen on {self.host}:{self.port}: {exc.strerror}"
            ) from None
        listener.setblocking(False)
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._wake = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None:
            wake[1].send(b"x")
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(5)
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        for connection in [*self._reading.values(), *self._writing.values()]:
            connection.socket.close()
        self._reading.clear()
        self._writing.clear()
        if wake is not None:
            wake[0].close()
            wake[1].close()

    # ------------------------------------------------------------------ the loop

    def _serve(self) -> None:
        listener, wake = self._listener, self._wake
        assert listener is not None and wake is not None
        with selectors.DefaultSelector() as selector:
            self._selector = selector
            selector.register(listener, selectors.EVENT_READ)
            selector.register(wake[0], selectors.EVENT_READ)
            while True:
                for key, _ in selector.select(self._wait()):
                    if key.fileobj is wake[0]:
                        return
                    if key.fileobj is listener:
                        self._accept(listener)
                        continue
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock in self._reading:
                        self._read(self._reading[sock])
                    elif sock in self._writing:
                        self._write(self._writing[sock])
                self._expire(time.monotonic())

    def _wait(self) -> float | None:
        """Seconds until the first deadline; None: no connection, sleep."""
        first = [
            next(iter(group.values())).deadline for group in (self._reading, self._writing) if group
        ]
        return max(0.0, min(first) - time.monotonic()) if first else None

    def _expire(self, now: float) -> None:
        for group in (self._reading, self._writing):
            while group:
                connection = next(iter(group.values()))
                if connection.deadline > now:
                    break
                what = "no request" if group is self._reading else "answer not taken"
                self._drop(connection, "timeout", f"{what} within {self.timeout:g} s")

    def _accept(self, listener: socket.socket) -> None:
        # A few at a time: the listener stays readable while more wait, and
        # the connections already open get their turn in between.
        for _ in range(64):
            try:
                sock, address = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: free one, the longest waiting.
                    oldest = self._oldest()
                    if oldest is None:
                        return
                    self._drop(oldest, "overflow", f"out of file descriptors ({exc.strerror})")
                    continue
                log.debug("%s: accept failed: %r", self.name, exc)
                return
            if self.connections >= self.max_connections:
                oldest = self._oldest()
                if oldest is not None:
                    self._drop(oldest, "overflow", f"over {self.max_connections} connections")
            sock.setblocking(False)
            connection = _Connection(sock, address, time.monotonic() + self.timeout)
            self._reading[sock] = connection
            self._selector.register(sock, selectors.EVENT_READ)

    def _oldest(self) -> _Connection | None:
        for group in (self._reading, self._writing):
            if group:
                return next(iter(group.values()))
        return None

    def _read(self, connection: _Connection) -> None:
        try:
            data = connection.socket.recv(_READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._drop(connection, "error", f"read failed ({exc!r})")
            return
        if not data:
            self._close(connection)  # hung up before asking: nothing to answer
            return
        inbox = connection.inbox
        inbox += data
        end = _end_of_head(inbox)
        if end < 0:
            if len(inbox) > self.max_head:
                self._refuse(connection, f"head over {self.max_head} bytes")
            return
        head = bytes(inbox[:end])
        if len(head) > self.max_head:
            self._refuse(connection, f"head of {len(head)} bytes, over {self.max_head}")
        elif head.count(b"\n") - 2 > self.max_headers:  # less the request line and the end
            self._refuse(connection, f"over {self.max_headers} header lines")
        else:
            self._send(connection, self._answer(connection, head))

    def _answer(self, connection: _Connection, head: bytes) -> bytes:
        """Run the handler on ``head`` (the request line and headers)."""
        handler = self.handler.__new__(self.handler)
        out = io.BytesIO()
        handler.request = connection.socket
        handler.client_address = connection.address
        handler.server = self  # type: ignore[assignment]  # what handlers may look at
        handler.rfile = io.BytesIO(head)
        handler.wfile = out
        handler.close_connection = True
        try:
            handler.handle_one_request()
        except Exception:
            self._count("error")
            if self._limiters["error"].allow():
                held = self._limiters["error"].take_suppressed()
                log.warning(
                    "%s: answering %s failed%s", self.name, _peer(connection.address),
                    f" ({held} more since the last report)" if held else "", exc_info=True,
                )  # fmt: skip
            body = b"internal error\n"
            return (
                b"HTTP/1.0 500 Internal Server Error\r\nContent-Type: text/plain\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        return out.getvalue()

    def _refuse(self, connection: _Connection, why: str) -> None:
        """Answer 431 to a request head over the limits, then close."""
        self._count("too_large")
        self._report("too_large", connection, why)
        body = f"request head too large: {why}\n".encode()
        self._send(
            connection,
            b"HTTP/1.0 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
        )

    def _send(self, connection: _Connection, answer: bytes) -> None:
        """Send ``answer``, the rest later if the socket has no room now."""
        del self._reading[connection.socket]
        connection.inbox = bytearray()
        connection.outbox = memoryview(answer)
        connection.deadline = time.monotonic() + self.timeout
        self._writing[connection.socket] = connection
        self._selector.modify(connection.socket, selectors.EVENT_WRITE)
        self._write(connection)

    def _write(self, connection: _Connection) -> None:
        outbox = connection.outbox
        assert outbox is not None
        try:
            sent = connection.socket.send(outbox)
        except BlockingIOError:
            return
        except OSError as exc:  # a scraper that hung up (its timeout ran out) is routine
            self._count("error")
            log.debug("%s: %s hung up: %r", self.name, _peer(connection.address), exc)
            self._close(connection)
            return
        connection.outbox = outbox[sent:]
        if not connection.outbox:
            self._finish(connection)

    def _finish(self, connection: _Connection) -> None:
        """All sent: close, gently (unread input would make the close a reset
        that can destroy the answer still in flight)."""
        sock = connection.socket
        try:
            sock.shutdown(socket.SHUT_WR)
            for _ in range(16):  # a request body or more requests: bounded
                if not sock.recv(_READ_SIZE):
                    break
        except OSError:
            pass
        self._close(connection)

    def _drop(self, connection: _Connection, reason: str, why: str) -> None:
        self._count(reason)
        self._report(reason, connection, why)
        self._close(connection)

    def _count(self, reason: str) -> None:
        self.dropped[reason] += 1
        _DROPPED.labels(self.name, reason).inc()

    def _report(self, reason: str, connection: _Connection, why: str) -> None:
        limiter = self._limiters[reason]
        if limiter.allow():
            held = limiter.take_suppressed()
            log.warning(
                "%s: closed the connection of %s: %s%s", self.name, _peer(connection.address),
                why, f" ({held} more since the last report)" if held else "",
            )  # fmt: skip

    def _close(self, connection: _Connection) -> None:
        sock = connection.socket
        self._reading.pop(sock, None)
        self._writing.pop(sock, None)
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()


def _end_of_head(data: bytearray) -> int:
    """Where the request head in ``data`` ends (after its blank line), -1
    if it has not ended yet. Bare LF line ends are accepted, as by
    http.server."""
    end = data.find(b"\r\n\r\n")
    if end >= 0:
        return end + 4
    end = data.find(b"\n\n")
    return end + 2 if end >= 0 else -1


def _peer(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)
