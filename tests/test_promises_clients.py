"""What a standalone Client promises after a timeout, on its fast path: a
late answer to the call that timed out is dropped (and counted), never taken
for the next call's. The fast path serves a function called before, with
the default timeout; tests/test_standalone.py covers the first call of a
function, which goes the careful way."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from helpers import ANY

from pylm.errors import RequestTimeout
from pylm.standalone import Client, Server


@pytest.mark.timeout(30)
def test_a_late_answer_never_answers_the_next_call(serve: Callable[[Any], Any]) -> None:
    release = threading.Event()

    class Late(Server):
        def wait(self, message: bytes) -> bytes:
            if message != b"at once":
                release.wait(20)
            return b"late " + message

        def fast(self, message: bytes) -> bytes:
            return b"fast " + message

    server = serve(Late("late", ANY, log_stdout=False))
    try:
        with Client(server.address, "late", timeout=2) as client:
            # Both functions called once: the calls below take the fast path.
            assert client.job("wait", b"at once") == b"late at once"
            assert client.job("fast", b"1") == b"fast 1"
            with pytest.raises(RequestTimeout):
                client.job("wait", b"2")
            release.set()
            assert client.job("fast", b"3") == b"fast 3"
            assert client.job("fast", b"4") == b"fast 4"
            assert client.dropped == 1
    finally:
        release.set()
