"""Loggers of servers: named after the server, printed in the 2016 format.

The library never touches the root logger. A server's logger is
``logging.getLogger(server_name)``; by default it gets one stdout handler
with :data:`LOG_FORMAT` (``log_stdout=False`` leaves it alone, for
applications that configure logging themselves). That handler stands aside
for a record that a handler of the application already prints on the
terminal (``logging.basicConfig()``, say): each line shows once.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Protocol

import zmq

__all__ = [
    "LOG_FORMAT",
    "LimitedLog",
    "LogLimited",
    "PushLogHandler",
    "RateLimiter",
    "server_logger",
]

LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"

_install_lock = threading.Lock()


class _StdoutHandler(logging.StreamHandler):
    """The default handler of ``logger``; its own class so it is installed
    once per logger."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(sys.stdout)
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self.logger = logger

    def emit(self, record: logging.LogRecord) -> None:
        if _shown_elsewhere(record, self):
            return
        # Follow sys.stdout when it is replaced after the server started
        # (pytest's capture, a user redirecting output).
        self.stream = sys.stdout
        super().emit(record)


def _shown_elsewhere(record: logging.LogRecord, handler: _StdoutHandler) -> bool:
    """Whether another handler on the record's way up the logger tree
    writes it to stdout or stderr: an application's own logging set-up, or
    the default handler of a server below this one's (``svc.v2`` under
    ``svc``), which printed it first. Reads the tree without logging's lock:
    emit() holds this handler's lock, and logging.config takes them in the
    other order (the logger dict is read, never changed, here)."""
    terminal = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    origin = logging.Logger.manager.loggerDict.get(record.name)
    logger: logging.Logger | None = origin if isinstance(origin, logging.Logger) else handler.logger
    below = logger is not handler.logger  # still under this handler's logger
    while logger is not None:
        if logger is handler.logger:
            below = False
        for other in logger.handlers:
            if (
                other is not handler
                and isinstance(other, logging.StreamHandler)
                and (below or not isinstance(other, _StdoutHandler))
                and any(other.stream is stream for stream in terminal)
                and record.levelno >= other.level
            ):
                return True
        logger = logger.parent if logger.propagate else None
    return False


class PushLogHandler(logging.Handler):
    """Sends each formatted record as one frame on a PUSH socket (the 2016
    ``log_address``), for a collector that PULLs log lines from many servers."""

    def __init__(self, address: str, context: zmq.Context) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self._socket = context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.LINGER, 1000)
        self._socket.setsockopt(zmq.SNDHWM, 10_000)
        self._socket.connect(address)
        self.address = address

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # Handler.handle holds self.lock around emit, which keeps this
            # socket to one thread at a time.
            self._socket.send(self.format(record).encode("utf-8", "replace"), zmq.NOBLOCK)
        except zmq.Again:
            pass  # collector gone or slow: drop the line rather than block the server
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.acquire()
        try:
            self._socket.close()
        finally:
            self.release()
        super().close()


def server_logger(name: str, level: int, stdout: bool) -> logging.Logger:
    """The logger of the server ``name``, with the default handler if asked."""
    logger = logging.getLogger(name)
    logger.setLevel(level)
    if stdout:
        with _install_lock:
            if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
                logger.addHandler(_StdoutHandler(logger))
    return logger


class RateLimiter:
    """Lets ``burst`` events through per ``interval`` seconds and counts the
    ones it held back, so a flood of garbage cannot flood the log."""

    def __init__(self, interval: float = 1.0, burst: int = 1) -> None:
        self.interval = interval
        self.burst = burst
        self._next = 0.0  # when the current window ends
        self._left = 0  # events the current window still lets through
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.interval
            self._left = self.burst
        if self._left > 0:
            self._left -= 1
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        count, self.suppressed = self.suppressed, 0
        return count


class LogLimited(Protocol):
    """The callable form of :meth:`LimitedLog.log` (a server's
    ``_log_limited``), which the parts a server hands it to take."""

    def __call__(
        self, cause: str, level: int, message: str, *args: object, burst: int = 1
    ) -> None: ...


class LimitedLog:
    """A server's log lines about what peers and functions do wrong: at most
    ``burst`` a second per cause, so that a flood of either cannot flood the
    log. A line tells how many were held back since the previous one.

    Causes are a fixed set plus one per function (``raised-<function>``):
    past ``max_causes`` the limiters start over rather than grow."""

    def __init__(self, logger: logging.Logger, max_causes: int) -> None:
        self.logger = logger
        self.max_causes = max_causes
        self._limiters: dict[str, RateLimiter] = {}

    def log(self, cause: str, level: int, message: str, *args: object, burst: int = 1) -> None:
        limiter = self._limiters.get(cause)
        if limiter is None:
            if len(self._limiters) >= self.max_causes:
                self._limiters.clear()
            limiter = self._limiters[cause] = RateLimiter(burst=burst)
        if limiter.allow():
            held = limiter.take_suppressed()
            extra = f" ({held} more like it since the last report)" if held else ""
            self.logger.log(level, message + "%s", *args, extra)
