"""The blocking client of a standalone server."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import zmq

from pylm import protocol
from pylm.cache_calls import CacheCalls, cache_request
from pylm.calls import CALL_RETRY_BURST, DEFAULT_TIMEOUT, Caller, pong_info
from pylm.discovery import DEFAULT_WAIT
from pylm.errors import ProtocolError, PylmError, RequestTimeout
from pylm.lifecycle import Closing
from pylm.liveness import to_live_peers
from pylm.protocol import (
    DEFAULT_MAX_PAYLOAD,
    HEAD_SIZE,
    REPLY_LEAD,
    REPLY_PREFIX,
    has_payload_frame,
    pack_id_deadline,
    read_id,
    reply_payload,
)
from pylm.security import Curve
from pylm.transport import close_socket, copied, default_context, send_frame
from pylm.window import Books, RetryBudget

if TYPE_CHECKING:
    from pylm.registry import Registry

__all__ = ["Client"]

_SNDMORE = zmq.SNDMORE
_NOBLOCK = zmq.NOBLOCK
_time = time.time
_perf_counter = time.perf_counter


class Client(CacheCalls, Caller, Closing):
    """Calls functions of one server and waits for each answer::

        client = Client('tcp://127.0.0.1:5555', 'my_server')
        client.job('foo', b'a message')     # -> b'you sent me a message'
        key = client.set(b'some data')      # the server's cache: set, get, delete

    Every call has a timeout (``timeout`` here, or per call) and raises
    :class:`~pylm.errors.RequestTimeout` when it runs out; the client stays
    usable. A client may be created before its server starts: calls wait for
    the server up to their timeout. A client given only the server's name
    (``Client('my_server')``) finds its instances in the registry, waiting up
    to ``wait`` seconds for one, else raises :class:`~pylm.errors.NoInstance`.
    One client may be shared by threads; its calls then take turns.

    Calls go to live instances only (:mod:`pylm.liveness`). A call whose
    instance dies while it is out is sent again to another if it may run
    twice: ``retry`` None (the default) for the functions the server marks
    :func:`~pylm.standalone.idempotent` (known from the registry), True for
    every call, False for none. It is sent again at once when a connection
    drops, or after it waited ``RETRY_FLOOR`` (or 4 times the longest
    recent answer time, if longer), as the retry budget allows; its first
    answer is the result, later copies are dropped. A call not sent again
    that gets no answer after a connection dropped raises
    :class:`~pylm.errors.InstanceLost`: it may have run.
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
        curve: Curve | None = None,
        wait: float = DEFAULT_WAIT,
        retry: bool | None = None,
    ) -> None:
        if retry not in (None, True, False):
            raise TypeError(f"retry must be None, True or False, got {retry!r}")
        super().__init__(connection, server_name, timeout, max_payload, registry, curve, wait)
        self.retry = retry
        self._keep_books(Books(RetryBudget(CALL_RETRY_BURST)))
        self._lock = threading.Lock()
        # A DEALER, sending each message as it is (the server's ROUTER
        # answers in the envelope a request came in). No request/reply state
        # machine to wedge after a timeout, and answers are matched to calls
        # by their message id, late ones dropped (cheaper than a REQ with
        # REQ_CORRELATE, whose request ids cost a frame each way).
        self._context = default_context(context)
        self._default_millis = int(self.timeout * 1000)
        self._socket_timeout = self._default_millis
        self._socket: zmq.Socket | None = self._connected_socket()
        self.dropped = 0  # late answers to calls that had timed out, and garbage

    def _connected_socket(self) -> zmq.Socket:
        """A socket connected to :attr:`endpoints`. Several instances:
        DEALER takes turns among the live ones (pylm.liveness)."""
        socket: zmq.Socket = self._secure(to_live_peers(self._context.socket(zmq.DEALER)))
        socket.setsockopt(zmq.LINGER, 0)
        self._connections.watch(socket, drops=True)
        for endpoint in self.endpoints:
            socket.connect(endpoint)
        self._set_timeout(socket, self._socket_timeout)
        return socket

    def job(self, function: str, message: bytes, *, timeout: float | None = None) -> bytes:
        """Call ``function`` with ``message``; return its result."""
        calls = self._calls
        entry = calls.targets.get(function)
        peers = self._peers
        if (
            entry is None
            or timeout is not None
            or type(message) is not bytes
            or len(message) > calls.inline_limit
            or self._socket_timeout != self._default_millis
            or (peers is not None and (peers.changed or peers.partial or peers.idempotent))
            or self.retry
        ):
            return self._job(function, message, timeout)
        # Fast path, the common call: a function called before, a small
        # payload, the default timeout. The same steps as _job, inline: every
        # line here costs a few per cent of the round-trip rate.
        began = _perf_counter()
        msg_id = next(calls.ids)
        stamp = pack_id_deadline(msg_id, _time() + self.timeout)
        body = b"".join((entry[0], stamp, entry[1], message))
        lock = self._lock
        lock.acquire()
        try:
            socket = self._socket
            if socket is None:
                raise RuntimeError("the client is closed")
            answers: list[bytes] | None = None
            try:
                send_frame(socket, body, _NOBLOCK)
            except zmq.Again:
                pass  # no live instance now: the careful way (below), which waits
            else:
                try:
                    answer = socket.recv()
                    result = reply_payload(answer, stamp)
                    if result is not None:
                        numbers = entry[2]
                        if numbers is not None:
                            took = _perf_counter() - began
                            numbers.done(took, len(message), len(result))
                        return result
                    if not answer:  # a delimiter first: the answer of a REP
                        answer = socket.recv()
                    received = self._rest_of(socket, answer)
                except zmq.Again:
                    calls.timed_out(function)
                    raise self._lost_or_timeout(function, self.timeout, None) from None
                if received and _answers(received, msg_id):
                    answers = received
                else:  # a late answer to an earlier call, or garbage: the careful way
                    if received:
                        self._late_or_foreign(received[0], function)
                    late = self._receive(socket, msg_id, began + self.timeout, function, None)
                    if late is None:
                        calls.timed_out(function)
                        raise self._lost_or_timeout(function, self.timeout, None)
                    answers = late
        finally:
            lock.release()
        if answers is None:
            return self._job(function, message, None)
        return self._result(function, began, len(message), answers, msg_id)

    def _job(self, function: str, message: bytes, timeout: float | None) -> bytes:
        began = _perf_counter()
        timeout = self._timeout_of(timeout)
        msg_id, frames = self._calls.request(function, message, timeout)
        try:
            answers = self._exchange(frames, msg_id, timeout, function)
        except RequestTimeout:
            self._calls.timed_out(function)
            raise
        return self._result(function, began, len(message), answers, msg_id)

    def _result(
        self, function: str, began: float, size: int, answers: list[bytes], msg_id: int
    ) -> bytes:
        """The result the answer carries, or the error it raises; counted."""
        head = answers[0]
        if head[REPLY_LEAD] == REPLY_PREFIX:
            result = head[HEAD_SIZE:]
        else:
            try:
                result = protocol.result_of(protocol.decode(answers))
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
        answer = protocol.decode(self._exchange(frames, msg_id, timeout, "ping"))
        return pong_info(protocol.result_of(answer))

    # ------------------------------------------------------------------ cache

    def _cache_call(self, function: str, payload: bytes, timeout: float | None) -> bytes:
        seconds = self._timeout_of(timeout)
        msg_id, frames = cache_request(self._calls, function, payload, seconds)
        answers = self._exchange(frames, msg_id, seconds, function, cache=True)
        return protocol.result_of(protocol.decode(answers))

    @property
    def drops(self) -> int:
        """Connections to an instance that dropped so far: an instance
        killed, or silent for ``PYLM_HEARTBEAT`` seconds (:mod:`pylm.liveness`)."""
        with self._lock:
            return self._connections.drops_now()

    def _exchange(
        self, frames: list[bytes], msg_id: int, timeout: float, what: str, cache: bool = False
    ) -> list[bytes]:
        """Send a request (``cache``: to the server's cache); the frames of
        the answer to it. A call of a function :meth:`_retried` is sent
        again while it seems lost."""
        with self._lock:
            socket = self._socket
            if socket is None:
                raise RuntimeError("the client is closed")
            peers = self._peers
            if peers is not None and peers.changed and self._rewire(socket, renew=True):
                # Instances left: a new socket (no call is in flight between calls).
                self._connections.forget(socket)
                close_socket(socket)
                self._socket = socket = self._connected_socket()
            millis = int(timeout * 1000)
            if millis != self._socket_timeout:
                self._set_timeout(socket, millis)
            if cache:
                socket = self._cache_socket(socket)
            else:
                socket = self._socket_for(what, socket)  # a version rolling out: who has it
            began = _perf_counter()
            deadline = began + timeout
            drops = self._connections.drops_now()
            try:
                socket.send_multipart(frames, copy=copied(frames))
            except zmq.Again:
                raise self._timeout_error(what, timeout) from None
            retried = not cache and self._retried(what)
            sent, attempts = began, 1
            while True:
                until = deadline
                if retried:
                    until = min(deadline, sent + self.books.grace())
                answer = self._receive(socket, msg_id, until, what, drops if retried else None)
                now = _perf_counter()
                if answer is not None:
                    if retried:
                        self.books.took(now - sent)
                    return answer
                if now >= deadline:
                    raise self._lost_or_timeout(what, timeout, drops, attempts)
                # It seems lost: its connection dropped, or its grace is over.
                drops = self._connections.drops
                if self.books.send_again(msg_id, lambda: _send_now(socket, frames)):
                    attempts += 1
                sent = now

    def _receive(
        self, socket: zmq.Socket, msg_id: int, until: float, what: str, drops: int | None
    ) -> list[bytes] | None:
        """Receive until the answer to ``msg_id`` comes (its frames), dropping
        late answers to earlier calls; None at ``until`` (perf_counter time),
        or, when ``drops`` is given, once more connections than that dropped."""
        while True:
            left = until - _perf_counter()
            if left <= 0:
                return None
            # In slices: Ctrl-C caught by another thread (the registry's) does
            # not wake this one; between slices Python runs its handler.
            if not socket.poll(max(1, min(int(left * 1000), 50))):
                if drops is not None and self._connections.drops_now() > drops:
                    return None
                continue
            frames = socket.recv_multipart()
            body = frames[1:] if frames[0] == b"" else frames
            if body and _answers(body, msg_id):
                return body
            self._late_or_foreign(body[0] if body else b"", what)

    def _late_or_foreign(self, head: bytes, what: str) -> None:
        """An answer that is not to this call: a pylm one is a late answer to
        an earlier call, dropped and counted; anything else raises, since a
        REP answers each request once (this was the answer, and no pylm one)."""
        if not head.startswith(protocol.MAGIC) or len(head) < HEAD_SIZE:
            raise ProtocolError(
                f"server {self.server_name!r} at {self.connection} answered {what!r} with"
                f" something that is not pylm: {head[:40]!r}"
            )
        self.dropped += 1
        self.books.unknown(read_id(head)[0])

    @staticmethod
    def _rest_of(socket: zmq.Socket, head: bytes) -> list[bytes]:
        """An answer's frames after its head ``head``: the head says whether a
        payload frame follows (asking the socket would cost more)."""
        if has_payload_frame(head):
            return [head, socket.recv()]
        return [head]

    def _set_timeout(self, socket: zmq.Socket, millis: int) -> None:
        socket.setsockopt(zmq.RCVTIMEO, millis)
        socket.setsockopt(zmq.SNDTIMEO, millis)
        self._socket_timeout = millis

    def close(self) -> None:
        with self._lock:
            close_socket(self._socket)
            self._socket = None
        self._stop_following()


def _answers(frames: list[bytes], msg_id: int) -> bool:
    """Whether ``frames`` are a well-formed answer to message ``msg_id``."""
    head = frames[0]
    return len(head) >= HEAD_SIZE and head.startswith(protocol.MAGIC) and read_id(head)[0] == msg_id


def _send_now(socket: zmq.Socket, frames: list[bytes]) -> zmq.Socket | None:
    """Send ``frames`` if a live instance has room now: ``socket``, or None."""
    try:
        socket.send_multipart(frames, zmq.NOBLOCK, copy=copied(frames))
    except zmq.Again:
        return None
    return socket
