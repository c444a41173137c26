"""The blocking client of a standalone server."""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Any

import zmq

from pylm import protocol
from pylm.base import DEFAULT_MAX_PAYLOAD
from pylm.calls import DEFAULT_TIMEOUT, Calls, check_timeout, pong_info, read_answer
from pylm.errors import ProtocolError, RequestTimeout
from pylm.transport import check_address, close_socket, default_context

__all__ = ["Client"]


class Client:
    """Calls functions of one server and waits for each answer::

        client = Client('tcp://127.0.0.1:5555', 'my_server')
        client.job('foo', b'a message')     # -> b'you sent me a message'

    Every call has a timeout (``timeout`` here, or per call) and raises
    :class:`~pylm.errors.RequestTimeout` when it runs out; the client stays
    usable. A client may be created before its server starts: calls wait for
    the server up to their timeout. One client may be shared by threads; its
    calls then take turns.
    """

    def __init__(
        self,
        connection: str,
        server_name: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        context: zmq.Context | None = None,
    ) -> None:
        self.connection = check_address(connection, "connection")
        self.server_name = server_name
        self.timeout = check_timeout(timeout)
        self._calls = Calls(server_name, max_payload)
        self._lock = threading.Lock()
        self._socket: zmq.Socket | None = default_context(context).socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(self.connection)
        self._socket_timeout = -1
        self.dropped = 0  # answers dropped: stale (after a timeout) or malformed

    def job(self, function: str, message: bytes, *, timeout: float | None = None) -> bytes:
        """Call ``function`` with ``message``; return its result."""
        timeout = self.timeout if timeout is None else check_timeout(timeout)
        msg_id, frames = self._calls.request(function, message, timeout)
        kind, rest = self._exchange(msg_id, frames, timeout, function)
        return protocol.result_of(kind, rest)

    def ping(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Ask the server whether it is alive; returns what it says of itself
        (name, kind, functions, pid, version)."""
        timeout = self.timeout if timeout is None else check_timeout(timeout)
        msg_id, frames = self._calls.ping(timeout)
        kind, rest = self._exchange(msg_id, frames, timeout, "ping")
        return pong_info(protocol.result_of(kind, rest))

    def _exchange(
        self, msg_id: int, frames: list[bytes], timeout: float, what: str
    ) -> tuple[int, list[bytes]]:
        with self._lock:
            socket = self._socket
            if socket is None:
                raise RuntimeError("the client is closed")
            self._set_timeout(socket, int(timeout * 1000))
            try:
                socket.send_multipart(frames)
            except zmq.Again:
                raise self._timeout(
                    what, timeout, "could not even send: the queue is full"
                ) from None
            deadline = time.monotonic() + timeout
            while True:
                try:
                    answer = socket.recv_multipart()
                except zmq.Again:
                    raise self._timeout(what, timeout) from None
                try:
                    answer_id, kind, rest = read_answer(answer)
                except ProtocolError:
                    answer_id, kind, rest = -1, 0, []
                if answer_id == msg_id:
                    return kind, rest
                self.dropped += 1  # an answer to a call that timed out, or garbage
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._timeout(what, timeout)
                self._set_timeout(socket, max(1, int(left * 1000)))

    def _set_timeout(self, socket: zmq.Socket, millis: int) -> None:
        if millis != self._socket_timeout:
            socket.setsockopt(zmq.RCVTIMEO, millis)
            socket.setsockopt(zmq.SNDTIMEO, millis)
            self._socket_timeout = millis

    def _timeout(self, what: str, timeout: float, why: str = "") -> RequestTimeout:
        text = (
            f"no answer from server {self.server_name!r} at {self.connection}"
            f" to {what!r} within {timeout:g} s"
        )
        if why:
            text += f" ({why})"
        return RequestTimeout(text)

    def close(self) -> None:
        with self._lock:
            close_socket(self._socket)
            self._socket = None

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client {self.server_name!r} at {self.connection}>"
