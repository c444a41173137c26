"""The asyncio client of a standalone server: many calls in flight at once."""

from __future__ import annotations

import asyncio
import math
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

import zmq

from pylm import protocol
from pylm.cache_calls import cache_request, encode_key, encode_set
from pylm.calls import CALL_RETRY_BURST, DEFAULT_TIMEOUT, Caller, pong_info, read_answer
from pylm.discovery import DEFAULT_WAIT
from pylm.errors import PylmError, RequestTimeout
from pylm.liveness import to_live_peers
from pylm.protocol import (
    DEFAULT_MAX_PAYLOAD,
    HEAD_SIZE,
    REPLY_LEAD,
    REPLY_PREFIX,
    has_payload_frame,
    read_id,
)
from pylm.security import Curve
from pylm.transport import close_socket, copied, default_context
from pylm.window import Books, RetryBudget

if TYPE_CHECKING:
    from pylm.registry import Registry

__all__ = ["AsyncClient"]

_SEND_FIRST = zmq.NOBLOCK | zmq.SNDMORE
_RETIRED = 8  # idle side sockets of earlier instance lists still read, at most


class AsyncClient(Caller):
    """Calls functions of one server from asyncio code::

        async with AsyncClient('tcp://127.0.0.1:5555', 'my_server') as client:
            results = await asyncio.gather(*(client.job('foo', m) for m in messages))
            key = await client.set(b'some data')  # the server's cache: set, get, delete

    Any number of calls may be in flight; each answer is matched to its call
    by message id, whatever order the answers come in. Every call has a
    timeout and raises :class:`~pylm.errors.RequestTimeout` when it runs out.
    A client belongs to the event loop of its first call, which must support
    ``add_reader`` (every loop on Unix; on Windows, the selector loop).
    ``retry``: which calls are sent again when their instance dies, as for
    the blocking :class:`~pylm.standalone.Client`.

    With several instances, each call goes to the live instance with the
    fewest of this client's calls in flight (ties take turns), over a socket
    of its own: a slow instance gets fewer calls instead of an equal share.
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
        # Before Caller's: finding the server by name may fail, and then it
        # closes what it opened, side sockets included.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._read_sides: set[zmq.Socket] = set()  # sockets to some instances, read too
        self._retired: list[zmq.Socket] = []  # ... to instances listed before: read on
        self._load: dict[zmq.Socket, int] = {}  # an instance's socket -> calls in flight on it
        super().__init__(connection, server_name, timeout, max_payload, registry, curve, wait)
        self.retry = retry
        self._keep_books(Books(RetryBudget(CALL_RETRY_BURST)))
        self._context = default_context(context)
        # A plain socket, driven by the event loop watching its file
        # descriptor: no trip through the loop for each message sent or read.
        self._socket: zmq.Socket | None = None
        self._pending: dict[int, asyncio.Future[protocol.Message]] = {}
        # Each call's deadline: (loop time due, function, timeout, drops when
        # sent). One timer for them all, at the earliest (a timer a call
        # cost a heap entry and its cancelling each).
        self._deadlines: dict[int, tuple[float, str, float, int]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_at = math.inf
        self._room: asyncio.Future[None] | None = None  # resolved when sends fit again
        self._look_scheduled = False
        self._turn = 0  # which instance goes first among the least loaded
        self._closed = False
        self.dropped = 0  # answers dropped: stale (after a timeout) or malformed

    async def job(self, function: str, message: bytes, *, timeout: float | None = None) -> bytes:
        """Call ``function`` with ``message``; return its result."""
        began = time.perf_counter()
        timeout = self._timeout_of(timeout)
        msg_id, frames = self._calls.request(function, message, timeout)
        try:
            answer = await self._exchange(msg_id, frames, timeout, function)
        except RequestTimeout:
            self._calls.timed_out(function)
            raise
        try:
            result = protocol.result_of(answer)
        except PylmError:
            self._calls.finished(function, began, len(message), None)
            raise
        self._calls.finished(function, began, len(message), len(result))
        return result

    async def ping(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Ask the server whether it is alive; returns what it says of itself."""
        timeout = self._timeout_of(timeout)
        msg_id, frames = self._calls.ping(timeout)
        answer = await self._exchange(msg_id, frames, timeout, "ping")
        return pong_info(protocol.result_of(answer))

    async def set(
        self, value: bytes, key: str | None = None, *, timeout: float | None = None
    ) -> str:
        """Store ``value`` in the server's cache under ``key`` (or a key the
        server makes); return the key."""
        protocol.check_payload(value, self._calls.max_payload)
        result = await self._cache_call("set", encode_set(bytes(value), key), timeout)
        return result.decode("utf-8")

    async def get(self, key: str, *, timeout: float | None = None) -> bytes:
        """The value under ``key`` in the server's cache;
        :class:`~pylm.errors.UnknownKey` if there is none."""
        return await self._cache_call("get", encode_key(key), timeout)

    async def delete(self, key: str, *, timeout: float | None = None) -> None:
        """Remove ``key`` from the server's cache;
        :class:`~pylm.errors.UnknownKey` if it is not there."""
        await self._cache_call("delete", encode_key(key), timeout)

    async def _cache_call(self, function: str, payload: bytes, timeout: float | None) -> bytes:
        seconds = self._timeout_of(timeout)
        msg_id, frames = cache_request(self._calls, function, payload, seconds)
        answer = await self._exchange(msg_id, frames, seconds, function, cache=True)
        return protocol.result_of(answer)

    async def _exchange(
        self, msg_id: int, frames: list[bytes], timeout: float, what: str, cache: bool = False
    ) -> protocol.Message:
        main = self._open()
        peers = self._peers
        if peers is not None and peers.changed:
            if self._rewire(main, renew=True):
                self._retire(main)
                main = self._open()
            self._to_each_instance(main)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[protocol.Message] = loop.create_future()
        self._pending[msg_id] = future
        # A call that gets no answer says whether a connection dropped since it was sent.
        due = loop.time() + timeout
        self._deadlines[msg_id] = (due, what, timeout, self._connections.drops)
        if due < self._sweep_at:
            self._sweep_from(loop, due)
        load = self._load
        sent_on: list[zmq.Socket] = []  # where it went: a call in flight on each
        try:
            while (socket := self._send_now(main, what, cache, frames)) is None:
                # No room (no live instance, or their queues are full): wait
                # for some, within the call's time.
                waiters: set[asyncio.Future[Any]] = {future, self._writable()}
                await asyncio.wait(waiters, timeout=0.05, return_when=asyncio.FIRST_COMPLETED)
                if future.done():  # expired (or closed) while waiting
                    return future.result()
            sent_on.append(socket)
            load[socket] = load.get(socket, 0) + 1
            if cache or not self._retried(what):
                return await future
            return await self._until_answered(future, main, what, frames, msg_id, sent_on)
        finally:
            del self._deadlines[msg_id]
            self._pending.pop(msg_id, None)
            for socket in sent_on:
                if socket in load:  # not closed meanwhile (_forget_side)
                    load[socket] -= 1

    def _send_now(
        self, main: zmq.Socket, what: str, cache: bool, frames: list[bytes]
    ) -> zmq.Socket | None:
        """Send a call's ``frames`` to an instance that has room for it now
        (:meth:`_choices`, in order); the socket it went out on, or None."""
        last = len(frames) == 1
        for socket in self._choices(main, what, cache):
            try:
                # The message as it is, no envelope (the server's ROUTER
                # answers a DEALER alike). ZeroMQ takes or refuses a message
                # whole at its first frame, so only the first send can raise
                # Again (IMMEDIATE: also when the instance is not live).
                socket.send(frames[0], zmq.NOBLOCK if last else _SEND_FIRST)
            except zmq.Again:
                continue
            if not last:
                socket.send_multipart(frames[1:], copy=copied(frames))
            # A send can consume the socket's "readable" edge: look soon,
            # once for all the calls sent in this turn of the loop.
            if socket is not self._socket:
                asyncio.get_running_loop().call_soon(self._on_events, socket)
            elif not self._look_scheduled:
                self._look_scheduled = True
                asyncio.get_running_loop().call_soon(self._on_events)
            return socket
        return None

    def _choices(self, main: zmq.Socket, what: str, cache: bool) -> list[zmq.Socket]:
        """Where a call of ``what`` may go, best first: ``main`` when it
        reaches one instance; the one instance whose cache this client uses;
        otherwise a socket to each instance that has ``what``, the fewest
        calls in flight first (ties take turns)."""
        if cache:  # every instance keeps a cache of its own: one of them
            return [self._read_side(self._cache_socket(main))]
        endpoints = self.endpoints
        if len(endpoints) < 2:
            return [main]
        peers = self._peers
        if peers is not None and peers.partial:  # a version rolling out: who has it
            endpoints = list(peers.serving(what) or endpoints)
        turn = self._turn = (self._turn + 1) % len(endpoints)
        sockets = [
            self._read_side(self._side_socket((endpoint,), main))
            for endpoint in endpoints[turn:] + endpoints[:turn]
        ]
        load = self._load
        sockets.sort(key=lambda socket: load.get(socket, 0))
        return sockets

    async def _until_answered(
        self,
        future: asyncio.Future[protocol.Message],
        main: zmq.Socket,
        what: str,
        frames: list[bytes],
        msg_id: int,
        sent_on: list[zmq.Socket],
    ) -> protocol.Message:
        """The answer to a call that may run twice: sent again (to the
        instance with the fewest calls in flight, as it goes then) when a
        connection drops or its grace passes without an answer, as the retry
        budget allows; its first answer wins (later ones are dropped)."""
        books, connections, load = self.books, self._connections, self._load
        sent = time.perf_counter()
        drops = connections.drops_now()
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.05)
            now = time.perf_counter()
            if done:
                books.took(now - sent)
                return future.result()
            grace = books.grace()
            if connections.drops_now() <= drops and now - sent < grace:
                continue
            drops, sent = connections.drops, now  # it seems lost
            socket = books.send_again(msg_id, lambda: self._send_now(main, what, False, frames))
            if socket is not None:
                sent_on.append(socket)
                load[socket] = load.get(socket, 0) + 1

    def _sweep_from(self, loop: asyncio.AbstractEventLoop | None, due: float) -> None:
        """The deadline timer, set for ``due`` (none for ``inf``, or without a loop)."""
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep, self._sweep_at = None, due
        if loop is not None and due < math.inf:
            self._sweep = loop.call_at(due, self._expire_due)

    def _expire_due(self) -> None:
        """Fail the calls whose time is up, and set the timer for the
        earliest of the others."""
        self._sweep = None
        loop = asyncio.get_running_loop()
        now, earliest = loop.time(), math.inf
        for msg_id, (due, what, timeout, drops) in list(self._deadlines.items()):
            if due > now:
                earliest = min(earliest, due)
                continue
            future = self._pending.pop(msg_id, None)
            if future is not None and not future.done():
                future.set_exception(self._lost_or_timeout(what, timeout, drops))
        self._sweep_from(loop, earliest)

    def _open(self) -> zmq.Socket:
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._socket is None:
            # Several instances: DEALER takes turns among the live ones
            # (pylm.liveness); a call sent when none is live waits for room.
            socket = self._secure(to_live_peers(self._context.socket(zmq.DEALER)))
            socket.setsockopt(zmq.LINGER, 0)
            # No limit on answers queued here: a REP server drops an answer
            # its client's queue has no room for, and every call in flight
            # gets exactly one answer, so the calls bound the queue anyway.
            socket.setsockopt(zmq.RCVHWM, 0)
            self._connections.watch(socket, drops=True)
            for endpoint in self.endpoints:
                socket.connect(endpoint)
            self._socket = socket
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(socket.fileno(), self._on_events)
            self._to_each_instance(socket)
        return self._socket

    def _to_each_instance(self, main: zmq.Socket) -> None:
        """With several instances, a socket to each, made now rather than at
        a call: a connection takes a moment to become live, and the calls
        sent meanwhile would all go to the instances already reached."""
        if len(self.endpoints) > 1:
            for endpoint in self.endpoints:
                self._read_side(self._side_socket((endpoint,), main))

    def _retire(self, socket: zmq.Socket) -> None:
        """Instances left: the main socket takes no more calls (a new one is
        made), and is read on for the calls in flight on it."""
        assert self._loop is not None
        self._loop.remove_reader(socket.fileno())
        self._socket = None
        self._retired.append(self._read_side(socket))
        self._trim_retired()

    def _writable(self) -> asyncio.Future[None]:
        if self._room is None or self._room.done():
            self._room = asyncio.get_running_loop().create_future()
        return self._room

    def _read_side(self, side: zmq.Socket) -> zmq.Socket:
        """``side``, read as the main socket is."""
        if side is not self._socket and side not in self._read_sides:
            assert self._loop is not None
            self._read_sides.add(side)
            self._loop.add_reader(side.fileno(), self._on_events, side)
        return side

    def _close_side(self) -> None:
        """The instances changed: the side sockets take no more calls, but
        the calls in flight on them still wait for their answers, so they
        are read on (the latest _RETIRED of them) until the client closes."""
        self._retired.extend(self._side.values())
        self._side.clear()
        self._trim_retired()

    def _trim_retired(self) -> None:
        """Close the oldest retired sockets beyond _RETIRED that have no call
        in flight (one that has is read on until its calls end)."""
        load = self._load
        idle = [side for side in self._retired if not load.get(side)]
        for side in idle[: max(0, len(self._retired) - _RETIRED)]:
            self._retired.remove(side)
            self._forget_side(side)

    def _forget_side(self, side: zmq.Socket) -> None:
        """Stop reading ``side`` and close it (in the loop's thread)."""
        if side in self._read_sides:
            self._read_sides.discard(side)
            if self._loop is not None:
                self._loop.remove_reader(side.fileno())
        self._load.pop(side, None)
        self._connections.forget(side)
        side.close(linger=0)

    def _on_events(self, side: zmq.Socket | None = None) -> None:
        """Read every answer waiting (on the main socket, or on ``side``, a
        socket to some instances only), and wake senders when there is room.

        ZeroMQ's file descriptor signals edges, not levels: after it fires,
        the socket must be read until it has nothing more before it fires
        again.
        """
        if side is None:
            self._look_scheduled = False
            socket = self._socket
        else:
            socket = side if side in self._read_sides else None
        if socket is None:
            return
        recv, pending = socket.recv, self._pending
        try:
            while True:
                try:
                    first = recv(zmq.NOBLOCK)
                except zmq.Again:
                    # Asking for EVENTS can consume the edge of an answer that
                    # arrived just now: read on while it says there is one.
                    events = cast(int, socket.getsockopt(zmq.EVENTS))
                    room = self._room
                    if room is not None and not room.done() and events & zmq.POLLOUT:
                        room.set_result(None)
                    if events & zmq.POLLIN:
                        continue
                    break
                body = first if first else recv()  # a server's REP would add a delimiter
                message: protocol.Message | None
                if body[REPLY_LEAD] == REPLY_PREFIX and len(body) >= HEAD_SIZE:  # a one-frame REPLY
                    message = protocol.Message(protocol.REPLY, read_id(body)[0], body[HEAD_SIZE:])
                elif has_payload_frame(body):
                    message = read_answer([body, recv()])
                else:
                    message = read_answer([body])
                future = None if message is None else pending.pop(message.msg_id, None)
                if future is not None and message is not None and not future.done():
                    future.set_result(message)
                else:
                    self.dropped += 1  # an answer to a call that timed out, or garbage
                    if message is not None:
                        self.books.unknown(message.msg_id)  # a copy of a call sent again?
        except zmq.ZMQError as exc:
            self._fail_pending(RuntimeError(f"client of {self.server_name!r} failed: {exc!r}"))

    def _fail_pending(self, error: Exception) -> None:
        futures = list(self._pending.values())
        self._pending.clear()
        for future in futures:
            if not future.done():
                future.set_exception(error)

    async def close(self) -> None:
        """Fail the calls still in flight and close the socket."""
        self._closed = True
        self._sweep_from(None, math.inf)
        socket, self._socket = self._socket, None
        if socket is not None and self._loop is not None:
            self._loop.remove_reader(socket.fileno())
        self._fail_pending(RuntimeError(f"client of {self.server_name!r} closed"))
        close_socket(socket)
        for side in [*self._side.values(), *self._retired]:
            self._forget_side(side)
        self._side.clear()
        self._retired.clear()
        if self._peers is not None:  # closing the registry client waits for its thread
            await asyncio.get_running_loop().run_in_executor(None, self._stop_following)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
