"""The client of the parallel pattern: sends jobs to a :class:`Master` and
receives their results, the items of streaming jobs as they come."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import zmq

from pylm import protocol
from pylm.cache_calls import CacheCalls, cache_request
from pylm.calls import DEFAULT_TIMEOUT, Caller, answers_in, pong_info, read_answer
from pylm.discovery import DEFAULT_WAIT
from pylm.errors import ProtocolError, PylmError
from pylm.lifecycle import Closing
from pylm.liveness import to_live_peers
from pylm.protocol import (
    BATCH_JOBS,
    BATCH_PREFIX,
    DEFAULT_MAX_PAYLOAD,
    HEAD_SIZE,
    LEAD,
    REPLY_LEAD,
    REPLY_PREFIX,
    check_payload,
    read_id,
)
from pylm.security import Curve
from pylm.source import Payloads, check_batch
from pylm.transport import close_socket, copied, default_context
from pylm.window import Job, JobResult, Outcome, Stop, Turn, Window, WindowedClient

if TYPE_CHECKING:
    from pylm.registry import Registry

__all__ = ["Client", "JobResult", "one_result"]

DEFAULT_IN_FLIGHT = 1000


def one_result(values: list[bytes], function: str, server: str) -> bytes:
    """The result of a job run with ``eval()``: one, or a
    :class:`~pylm.errors.PylmError` saying how many came."""
    if len(values) != 1:
        raise PylmError(
            f"{function!r} on {server!r} gave {len(values)} results, not one:"
            " use stream() or job() for streaming functions"
        )
    return values[0]


class Client(CacheCalls, Caller, WindowedClient, Closing):
    """Sends jobs to a master, which gives them to its workers::

        client = Client('master')                          # from the registry
        client = Client('tcp://127.0.0.1:5555', 'master')  # the master's front_address
        client.eval('foo', b'a message')                   # one job, its result
        for result in client.job('foo', [b'one', b'two']):  # many jobs, results as they come
            print(result)
        for item in client.stream('count', b'3'):          # a generator function's items
            print(item)
        key = client.set(b'some data')                     # the master's cache: set, get, delete

    At most ``max_in_flight`` jobs are out at once. A job that yields no
    result (nor stream item) within ``timeout`` raises
    :class:`~pylm.errors.RequestTimeout`. ``retry``: a job that seems lost
    is sent again and its first result delivered (:mod:`pylm.window` says
    when); off by default, since the master's own books re-dispatch the jobs
    of a worker that dies, and a client cannot tell a master that died from
    a worker that is slow (it would run such jobs twice). Turn it on to
    survive the death of a master instance. A Client is for one thread at a
    time.

    ``batch``: the small jobs ready at once travel to the master together in
    one message (a BATCH), up to that many (64 by default) and 8 KiB of
    payloads; a job alone goes alone, and once the iterable is seen to wait
    between items (a queue, a socket), each job goes on its own (as a
    :class:`~pylm.chained.LoopClient`'s). ``batch=1``: one job per message.
    """

    endpoint_role = "front"
    _kind = "Client"

    def __init__(
        self,
        front_address: str,
        server_name: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_in_flight: int = DEFAULT_IN_FLIGHT,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        batch: int = BATCH_JOBS,
        retry: bool = False,
        context: zmq.Context | None = None,
        registry: Registry | str | None = None,
        curve: Curve | None = None,
        wait: float = DEFAULT_WAIT,
    ) -> None:
        super().__init__(front_address, server_name, timeout, max_payload, registry, curve, wait)
        self._init_window(max_in_flight, retry)
        self._keep_books(self.books)
        self.batch = check_batch(batch)
        self._socket: zmq.Socket | None = self._secure(
            to_live_peers(default_context(context).socket(zmq.DEALER))
        )
        self._socket.setsockopt(zmq.LINGER, 0)
        # No receive limit: the jobs in flight bound what comes, and a full
        # queue would make the master hold answers back.
        self._socket.setsockopt(zmq.RCVHWM, 0)
        self._connections.watch(self._socket, drops=True)  # its live peers, for the metrics
        for endpoint in self.endpoints:
            self._socket.connect(endpoint)
        self.dropped = 0  # answers that belong to no job in flight (late ones)

    # ------------------------------------------------------------------ calls

    def eval(self, function: str, payload: bytes, *, timeout: float | None = None) -> bytes:
        """Run one job and return its result; a streaming function that
        yields other than one item raises :class:`~pylm.errors.PylmError`
        (use :meth:`stream` for those)."""
        return one_result(
            list(self.stream(function, payload, timeout=timeout)), function, self.server_name
        )

    def stream(
        self, function: str, payload: bytes, *, timeout: float | None = None
    ) -> Iterator[bytes]:
        """Run one job and yield its results: one, or a generator function's items."""
        return self.job(function, (payload,), timeout=timeout)

    def ping(self, timeout: float | None = None) -> dict[str, Any]:
        """Ask the master how it is: name, workers connected, jobs queued."""
        if self._running:
            raise RuntimeError(
                "this Client is running jobs: ping from another Client (or after the jobs)"
            )
        seconds = self._timeout_of(timeout)
        socket = self._open_socket()
        msg_id, frames = self._calls.ping(seconds)
        if not socket.poll(int(seconds * 1000), zmq.POLLOUT):  # no live master
            raise self._timeout_error("ping", seconds)
        socket.send_multipart(frames, zmq.NOBLOCK)
        return pong_info(self._answer(socket, msg_id, seconds, "ping"))

    # ------------------------------------------------------------------ cache

    def _cache_call(self, function: str, payload: bytes, timeout: float | None) -> bytes:
        """One call to the cache of one master instance (each keeps its own;
        the same one while it is listed), on a socket of its own, secured as
        the jobs' one: cache calls never read the results of jobs, and work
        while jobs are out."""
        if self._socket is None:
            raise RuntimeError("the client is closed")
        if not self._running and self._peers is not None and self._peers.changed:
            self._rewire(self._socket)
        if self._cache_endpoint not in self.endpoints:
            self._cache_endpoint = min(self.endpoints)
        socket = self._side_socket((self._cache_endpoint,), self._socket)
        seconds = self._timeout_of(timeout)
        msg_id, frames = cache_request(self._calls, function, payload, seconds)
        try:
            # A side socket just made routes once its connection is up.
            if not socket.poll(int(seconds * 1000), zmq.POLLOUT):
                raise zmq.Again
            socket.send_multipart(frames, zmq.NOBLOCK, copy=copied(frames))
        except zmq.Again:
            raise self._timeout_error(function, seconds) from None
        return self._answer(socket, msg_id, seconds, function)

    def _answer(self, socket: zmq.Socket, msg_id: int, seconds: float, what: str) -> bytes:
        """The result of request ``msg_id`` on ``socket`` (a ping or a cache
        call); answers to others (that timed out) are dropped and counted."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if not socket.poll(max(1, int(left * 1000))):
                break
            frames = socket.recv_multipart()
            answers = answers_in(frames)  # a master sends the answers of a round together
            for message in answers:
                if message.msg_id == msg_id:
                    self.dropped += len(answers) - 1  # the others: late answers
                    return protocol.result_of(message)
            self.dropped += max(1, len(answers))
        raise self._timeout_error(what, seconds)

    # ------------------------------------------------------------------ the loop

    def _open_socket(self) -> zmq.Socket:
        if self._socket is None:
            raise RuntimeError("the client is closed")
        if self._peers is not None and self._peers.changed:
            self._rewire(self._socket)
        return self._socket

    def _open(
        self, function: str, payloads: Iterator[bytes], timeout: float, window: Window
    ) -> Turn:
        socket = self._open_socket()
        request, add, add_one, resent = (
            self._calls.request,
            window.add,
            window.add_one,
            window.resent,
        )
        source = Payloads(payloads, self.batch, self._calls.inline_limit)
        max_payload = self._calls.max_payload
        clock = time.monotonic
        # A message the socket had no room for (its jobs on the window's
        # books from the moment they are taken: their deadlines run), its
        # jobs' ids, and whether it is a job sent again.
        held: list[bytes] | None = None
        held_ids: list[int] = []
        held_again = False

        def take(room: int) -> tuple[list[bytes], list[int]] | None:
            """The next message of new jobs and their ids, on the books; None
            once the payloads are exhausted."""
            taken, alone = source.take(room)
            if alone is not None or len(taken) == 1:
                payload = taken[0] if alone is None else check_payload(alone, max_payload)
                msg_id, frames = request(function, payload, timeout)
                add_one(msg_id, frames[0] if len(frames) == 1 else frames, clock())
                return frames, [msg_id]
            if not taken:
                return None
            ids, bodies = [], []
            for payload in taken:  # small: one frame each
                msg_id, (body,) = request(function, payload, timeout)
                ids.append(msg_id)
                bodies.append(body)
            add(ids, bodies, clock())
            return [protocol.pack_batch(bodies)], ids

        def send(room: int, until: float) -> Stop:
            """Jobs sent again first, then new ones while there is room: up
            to ``batch`` small ones per message."""
            nonlocal held, held_ids, held_again
            if held is not None and held_ids[0] not in window.jobs:
                held = None  # it timed out before the master had room for it
            while True:
                if held is None:
                    if window.again:
                        msg_id, job = window.again.pop(0)
                        body = job.body
                        assert body is not None  # sent again only while it has it
                        held = [body] if isinstance(body, bytes) else body
                        held_ids, held_again = [msg_id], True
                    elif room <= 0:
                        return Stop.FULL
                    elif source.exhausted:
                        return Stop.DONE
                    else:
                        message = take(room)
                        if message is None:
                            return Stop.DONE
                        held, held_ids = message
                        held_again = False
                        room -= len(held_ids)
                try:
                    socket.send_multipart(held, zmq.NOBLOCK)
                except zmq.Again:
                    return Stop.BLOCKED
                now = clock()
                if held_again:
                    resent(held_ids, now)
                held = None
                if now >= until:
                    return Stop.SLICED

        def polled() -> list[tuple[zmq.Socket, int]]:
            """The socket wait() polls: answers, and room to send a held request."""
            return [(socket, zmq.POLLIN | (zmq.POLLOUT if held is not None else 0))]

        def wait(ms: int) -> list[Outcome]:
            ((_, interest),) = polled()
            events = socket.poll(ms, interest)
            return self._collect(socket, window, function) if events & zmq.POLLIN else []

        return Turn(send, wait, polled)

    def _opens_at_once(self) -> bool:
        return True  # its socket follows the master's instances without waiting

    def _collect(self, socket: zmq.Socket, window: Window, function: str) -> list[Outcome]:
        """The outcomes of the answers waiting on ``socket`` (1,024 messages
        at most: deadlines are checked between drains); a BATCH's answers
        one by one, in order."""
        outcomes: list[Outcome] = []
        jobs, took, books = window.jobs, self._calls.took, window.books
        now = time.monotonic()  # one clock reading for the answers drained together
        last: Job | None = None  # the last job answered
        bodies: list[bytes] = []  # the rest of a BATCH of answers being read
        reads = 0
        while True:
            if bodies:
                body = bodies.pop()
                frames = [body]
            else:
                if reads == 1024:
                    break
                try:
                    frames = socket.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                reads += 1
                body = frames[0]
                if body[LEAD] == BATCH_PREFIX and len(frames) == 1:
                    try:
                        bodies = protocol.unpack_batch(body)[::-1]  # popped from the end: in order
                    except ProtocolError:
                        self.dropped += 1
                    continue
            if body[REPLY_LEAD] == REPLY_PREFIX and len(body) >= HEAD_SIZE and len(frames) == 1:
                # fast path: a final REPLY in one frame
                msg_id = read_id(body)[0]
                job = jobs.pop(msg_id, None)
                if job is None:
                    self.dropped += 1
                    books.unknown(msg_id)
                    continue
                last = job
                value = body[HEAD_SIZE:]  # no target nor route: REPLY_PREFIX says so
                outcomes.append((job.index, value, None, True))
                took(function, now - job.sent, 0, len(value))
                continue
            message = read_answer(frames)
            job = None if message is None else jobs.get(message.msg_id)
            if message is None or job is None:
                self.dropped += 1
                if message is not None:
                    books.unknown(message.msg_id)
                continue
            if message.kind == protocol.REPLY and message.flags & protocol.MORE:
                window.flowing(message.msg_id, job)
                outcomes.append((job.index, message.payload, None, False))
                continue
            del jobs[message.msg_id]
            last = job
            if message.kind == protocol.END:
                outcomes.append((job.index, None, None, True))
                took(function, now - job.sent, 0, 0)
                continue
            try:
                value = protocol.result_of(message)
            except PylmError as error:
                outcomes.append((job.index, None, error, True))
                took(function, now - job.sent, 0, None)
            else:
                outcomes.append((job.index, value, None, True))
                took(function, now - job.sent, 0, len(value))
        if last is not None:
            window.answered(last, now, len(outcomes))
        return outcomes

    def close(self) -> None:
        self._stop_following()
        close_socket(self._socket)
        self._socket = None
