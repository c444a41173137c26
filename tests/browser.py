"""A real headless Chromium driven through the DevTools protocol over a pipe
(``--remote-debugging-pipe``: JSON messages ended by a NUL byte on file
descriptors 3 and 4 of the browser), for pages that live on: a page that
follows an event stream never ends loading, so ``--dump-dom`` cannot read it.
No library needed beyond the standard one."""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

__all__ = ["FLAGS", "Browser"]

# Headless, and no background traffic: this machine's network is closed.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def _above_nine(fd: int) -> int:
    """``fd`` moved to a number above 9 (the old number closed)."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class Browser:
    """Chromium with one page, from :meth:`open` until :meth:`close`."""

    def __init__(self, profile: Path) -> None:
        to_browser, self._commands = os.pipe()  # the browser reads its fd 3, we write
        self._answers, from_browser = os.pipe()  # the browser writes its fd 4, we read
        # The browser's ends above fd 9, so that moving them to 3 and 4 never
        # closes one with the other (a fresh process's pipes may be 3 to 6).
        to_browser, from_browser = (_above_nine(fd) for fd in (to_browser, from_browser))
        # A shell puts the pipes on the browser's fds 3 and 4 (no preexec_fn:
        # this process has threads).
        place = (
            f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser} {to_browser}<&- {from_browser}>&-'
        )
        self.process = subprocess.Popen(
            [
                "bash",
                "-c",
                place,
                shutil.which("chromium") or "chromium",
                *FLAGS,
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            pass_fds=(to_browser, from_browser),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._next = 0
        self._buffer = b""
        self._session: str | None = None

    def call(self, method: str, timeout: float = 20, **params: Any) -> dict[str, Any]:
        """One DevTools command (to the page once one is open); its result."""
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params}
        if self._session is not None and not method.startswith("Target."):
            message["sessionId"] = self._session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._read(deadline)
            if answer.get("id") == self._next:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return dict(answer["result"])

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._answers], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._answers, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed its pipe")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return dict(json.loads(message))

    def open(self, url: str) -> None:
        """Open ``url`` in a new page, which later calls go to."""
        target = self.call("Target.createTarget", url=url)["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError, ValueError):
            pass  # it is killed below
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for fd in (self._commands, self._answers):
            os.close(fd)
        try:  # its helpers (zygote, renderers) are in its session: none stays
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
