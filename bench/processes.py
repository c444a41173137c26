"""Entry points of the child processes, and the messages they exchange with
the parent over a :func:`multiprocessing.Pipe`.

Server process: binds, sends ``("ready", address)``, serves. It exits as soon
as the parent says ``("stop",)`` or goes away (its end of the pipe closes).

Client process: connects, then obeys the parent:

* ``("cell", payload_size, warmup)``: check one call echoes the payload, call
  for ``warmup`` seconds, answer ``("ready",)``;
* ``("go", start, end)``: call from ``start`` to ``end`` (``time.monotonic``
  instants, the same clock in every process on one machine), answer
  ``("done", calls, late, latencies)`` where ``latencies`` are the seconds
  each counted call took (empty if the driver does not time its calls) and
  ``late`` is how long after ``start`` the
  order arrived (negative: in time);
* ``("stop",)`` or the parent gone: close and exit.

Any failure is answered with ``("error", traceback_text)``.

:func:`serve` and :func:`drive` are those two processes' bodies for any
server and client; :mod:`bench.chains` uses them for pipeline stages.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from bench.systems import SYSTEMS, Driver

__all__ = ["client_main", "drive", "exit_on_stop", "serve", "server_main"]


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group; the parent alone handles it
    # and ends its children.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def exit_on_stop(conn: Connection) -> None:
    """Exit the process at the parent's first word, or when it goes (run in a thread)."""
    try:
        conn.recv()
    except (EOFError, OSError):
        pass
    os._exit(0)


def serve(server: Callable[[Callable[[Any], None]], None], conn: Connection) -> None:
    """Run ``server``, which reports where it listens through the function it
    is given (sent as ``("ready", where)``), until told to stop."""
    _ignore_sigint()
    threading.Thread(target=exit_on_stop, args=(conn,), daemon=True).start()
    try:
        server(lambda where: conn.send(("ready", where)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def server_main(system_id: str, conn: Connection) -> None:
    """Serve ``system_id``'s echo service until told to stop."""
    serve(SYSTEMS[system_id].serve, conn)


def _check_echo(system_id: str, payload: bytes, reply: object) -> None:
    if type(reply) is not bytes:
        raise TypeError(
            f"{system_id} answered a bytes payload with {type(reply).__name__}: {reply!r:.200}"
        )
    if reply != payload:
        raise ValueError(f"{system_id} echoed {len(reply)} bytes that differ from the payload")


def _obey(system_id: str, driver: Driver, conn: Connection) -> None:
    payload = b""
    while True:
        try:
            command = conn.recv()
        except EOFError:
            return
        match command:
            case ("cell", int(size), float(warmup)):
                payload = os.urandom(size)
                _check_echo(system_id, payload, driver.probe(payload))
                now = time.monotonic()
                driver.run(payload, now, now + warmup)
                conn.send(("ready",))
            case ("go", float(start), float(end)):
                late = time.monotonic() - start
                calls = driver.run(payload, start, end)
                conn.send(("done", calls, late, getattr(driver, "latencies", [])))
            case ("stop",):
                return
            case _:
                raise ValueError(f"unknown command {command!r}")


def drive(system_id: str, connect: Callable[[], Driver | None], conn: Connection) -> None:
    """Get a driver from ``connect`` (None: the parent said stop meanwhile)
    and call ``system_id``'s service with it as the parent says."""
    _ignore_sigint()
    try:
        driver = connect()
        if driver is None:
            return
        try:
            _obey(system_id, driver, conn)
        finally:
            driver.close()
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass  # the parent is gone


def client_main(system_id: str, address: str, conn: Connection) -> None:
    """Call ``system_id``'s echo service at ``address`` as the parent says."""
    drive(system_id, lambda: SYSTEMS[system_id].connect(address), conn)
