"""The in-flight windows of the clients that stream jobs, observed from
outside: the payloads they pull from the caller's iterator against the jobs
the servers have finished.

A client may pull payload ``n`` only once fewer than ``max_in_flight`` of the
``n - 1`` jobs it sent are unanswered, and it cannot have an answer the
server has not finished: so at every pull, ``n <= max_in_flight +
finished``. The server's first call waits for the client to break that bound
(or up to 2 s, which a client that keeps it always uses up): without a window
the client pulls every payload at once and breaks it; with one, the wait only
costs time, never the verdict.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import ANY

from pylm.chained import LastServer, LoopClient, Server
from pylm.parallel import Client, Master, Worker

WINDOW = 5
TOTAL = 200


class Window:
    """The payloads pulled, the jobs finished, and the pulls that broke
    ``n <= WINDOW + finished``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pulled = 0
        self.finished = 0
        self.broken: list[tuple[int, int]] = []
        self.overrun = threading.Event()

    def payloads(self) -> Iterator[bytes]:
        for number in range(TOTAL):
            with self.lock:
                self.pulled += 1
                if self.pulled > WINDOW + self.finished:
                    self.broken.append((self.pulled, self.finished))
                    self.overrun.set()
            yield b"%d" % number

    def work(self, message: bytes) -> bytes:
        if message == b"0":  # give a client without a window its chance to show it
            self.overrun.wait(2)
        with self.lock:
            self.finished += 1
        return message


WINDOWS: list[Window] = []


class Ends(LastServer):
    def work(self, message: bytes) -> bytes:
        return WINDOWS[-1].work(message)


class Starts(Server):
    def work(self, message: bytes) -> bytes:
        return message


class Works(Worker):
    def work(self, message: bytes) -> bytes:
        return WINDOWS[-1].work(message)


@pytest.mark.timeout(60)
def test_a_loop_client_keeps_at_most_max_in_flight_jobs_out(
    serve: Callable[[Any], Any],
) -> None:
    window = Window()
    WINDOWS.append(window)
    last = serve(Ends("ends", ANY, ANY, ANY, log_stdout=False))
    first = serve(Starts("starts", ANY, last.address, "ends.work", ANY, log_stdout=False))
    with LoopClient(
        last.push, first.address, first.db, "starts", announce=False, max_in_flight=WINDOW
    ) as client:
        results = sorted(client.job("work", window.payloads()), key=int)
    assert results == [b"%d" % n for n in range(TOTAL)]
    assert window.broken == [], f"(payload pulled, jobs finished) past the window: {window.broken}"


@pytest.mark.timeout(60)
def test_a_parallel_client_keeps_at_most_max_in_flight_jobs_out(
    serve: Callable[[Any], Any],
) -> None:
    window = Window()
    WINDOWS.append(window)
    master = serve(Master("windowed", ANY, ANY, log_stdout=False))
    serve(Works("windowed-worker", "windowed", master.back, log_stdout=False))
    with Client(master.front, "windowed", timeout=30, max_in_flight=WINDOW) as client:
        results = sorted(client.job("work", window.payloads()), key=int)
    assert results == [b"%d" % n for n in range(TOTAL)]
    assert window.broken == [], f"(payload pulled, jobs finished) past the window: {window.broken}"
