"""The blocking client of a standalone server."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import zmq

from pylm import protocol
from pylm.base import DEFAULT_MAX_PAYLOAD
from pylm.calls import DEFAULT_TIMEOUT, Caller, pong_info
from pylm.errors import ProtocolError, PylmError, RequestTimeout
from pylm.lifecycle import Closing
from pylm.transport import close_socket, default_context

if TYPE_CHECKING:
    from pylm.registry import Registry

__all__ = ["Client"]

_REPLY_PREFIX = protocol.REPLY_PREFIX
_HEAD_SIZE = protocol.HEAD_SIZE
_unpack_id = protocol.unpack_id
_pack_id_deadline = protocol.pack_id_deadline
_time = time.time
_perf_counter = time.perf_counter


class Client(Caller, Closing):
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
        server_name: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        context: zmq.Context | None = None,
        registry: Registry | str | None = None,
    ) -> None:
        super().__init__(connection, server_name, timeout, max_payload, registry)
        self._lock = threading.Lock()
        # REQ keeps the routing envelope inside libzmq (fewer calls from
        # Python); RELAXED lets it send again after a timeout and CORRELATE
        # drops the late answers to calls that timed out.
        self._socket: zmq.Socket | None = default_context(context).socket(zmq.REQ)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.REQ_RELAXED, 1)
        self._socket.setsockopt(zmq.REQ_CORRELATE, 1)
        for endpoint in self.endpoints:  # several instances: REQ takes turns among them
            self._socket.connect(endpoint)
        self._default_millis = int(self.timeout * 1000)
        self._set_timeout(self._socket, self._default_millis)

    def job(self, function: str, message: bytes, *, timeout: float | None = None) -> bytes:
        """Call ``function`` with ``message``; return its result."""
        calls = self._calls
        entry = calls.targets.get(function)
        if (
            entry is None
            or timeout is not None
            or type(message) is not bytes
            or len(message) > calls.inline_limit
            or self._socket_timeout != self._default_millis
            or (self._peers is not None and self._peers.changed)
        ):
            return self._job(function, message, timeout)
        # Fast path, the common call: a function called before, a small
        # payload, the default timeout. The same steps as _job, inline.
        began = _perf_counter()
        msg_id = next(calls.ids)
        stamp = _pack_id_deadline(msg_id, _time() + self.timeout)
        body = b"".join((entry[0], stamp, entry[1], message))
        with self._lock:
            socket = self._socket
            if socket is None:
                raise RuntimeError("the client is closed")
            try:
                socket.send(body)
                answer = socket.recv()
                rest = None
                if answer[:9] != _REPLY_PREFIX and len(answer) > 4:
                    if answer[4] & protocol.PAYLOAD_FRAME:
                        rest = socket.recv()
            except zmq.Again:
                calls.timed_out(function)
                raise self._timeout_error(function, self.timeout) from None
        if answer[:9] == _REPLY_PREFIX and answer[9:17] == body[9:17]:  # a REPLY to this call
            numbers = entry[2]
            if numbers is not None:
                numbers.done(_perf_counter() - began, len(message), len(answer) - _HEAD_SIZE)
            return answer[_HEAD_SIZE:]
        received = [answer] if rest is None else [answer, rest]
        return self._result(function, began, len(message), received, msg_id)

    def _job(self, function: str, message: bytes, timeout: float | None) -> bytes:
        began = _perf_counter()
        timeout = self._timeout_of(timeout)
        msg_id, frames = self._calls.request(function, message, timeout)
        try:
            answers = self._exchange(frames, timeout, function)
        except RequestTimeout:
            self._calls.timed_out(function)
            raise
        return self._result(function, began, len(message), answers, msg_id)

    def _result(
        self, function: str, began: float, size: int, answers: list[bytes], msg_id: int
    ) -> bytes:
        """The result the answer carries, or the error it raises; counted."""
        head = answers[0]
        if head[:9] == _REPLY_PREFIX and _unpack_id(head, 9)[0] == msg_id:
            result = head[_HEAD_SIZE:]
        else:
            try:
                result = protocol.result_of(self._check(protocol.decode(answers), msg_id))
            except PylmError:
                self._calls.finished(function, began, size, None)
                raise
        self._calls.finished(function, began, size, len(result))
        return result

    def ping(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Ask the server whether it is alive; returns what it says of itself
        (name, kind, functions, pid, version)."""
        timeout = self._timeout_of(timeout)
        msg_id, frames = self._calls.ping(timeout)
        answer = protocol.decode(self._exchange(frames, timeout, "ping"))
        return pong_info(protocol.result_of(self._check(answer, msg_id)))

    def _exchange(self, frames: list[bytes], timeout: float, what: str) -> list[bytes]:
        with self._lock:
            socket = self._socket
            if socket is None:
                raise RuntimeError("the client is closed")
            peers = self._peers
            if peers is not None and peers.changed:
                self._rewire(socket)
            millis = int(timeout * 1000)
            if millis != self._socket_timeout:
                self._set_timeout(socket, millis)
            try:
                if len(frames) == 1:
                    socket.send(frames[0])
                else:
                    socket.send_multipart(frames, copy=False)
                answer = [socket.recv()]
                # The head says whether the payload has a frame of its own,
                # which spares asking the socket (slow) after every frame.
                if len(answer[0]) > 4 and answer[0][4] & protocol.PAYLOAD_FRAME:
                    answer.append(socket.recv())
            except zmq.Again:
                raise self._timeout_error(what, timeout) from None
        return answer

    @staticmethod
    def _check(message: protocol.Message, msg_id: int) -> protocol.Message:
        if message.msg_id != msg_id:  # REQ_CORRELATE makes this the server's fault
            raise ProtocolError(f"answer to message {message.msg_id} for call {msg_id}")
        return message

    def _set_timeout(self, socket: zmq.Socket, millis: int) -> None:
        socket.setsockopt(zmq.RCVTIMEO, millis)
        socket.setsockopt(zmq.SNDTIMEO, millis)
        self._socket_timeout = millis

    def close(self) -> None:
        with self._lock:
            close_socket(self._socket)
            self._socket = None
        self._stop_following()
