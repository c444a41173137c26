"""The asyncio client of a standalone server: many calls in flight at once."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

import zmq
import zmq.asyncio

from pylm import protocol
from pylm.base import DEFAULT_MAX_PAYLOAD
from pylm.calls import DEFAULT_TIMEOUT, Calls, check_timeout, pong_info, read_answer
from pylm.errors import ProtocolError, RequestTimeout
from pylm.transport import check_address, close_socket, default_context

__all__ = ["AsyncClient"]


class AsyncClient:
    """Calls functions of one server from asyncio code::

        async with AsyncClient('tcp://127.0.0.1:5555', 'my_server') as client:
            results = await asyncio.gather(*(client.job('foo', m) for m in messages))

    Any number of calls may be in flight; each answer is matched to its call
    by message id, whatever order the answers come in. Every call has a
    timeout and raises :class:`~pylm.errors.RequestTimeout` when it runs out.
    A client belongs to the event loop of its first call.
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
        self._context = default_context(context)
        self._socket: zmq.Socket | None = None  # used for non-blocking sends/receives
        self._async: zmq.asyncio.Socket | None = None  # the same socket, for awaiting
        self._pending: dict[int, asyncio.Future[tuple[int, list[bytes]]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        self.dropped = 0  # answers dropped: stale (after a timeout) or malformed

    async def job(self, function: str, message: bytes, *, timeout: float | None = None) -> bytes:
        """Call ``function`` with ``message``; return its result."""
        timeout = self.timeout if timeout is None else check_timeout(timeout)
        msg_id, frames = self._calls.request(function, message, timeout)
        kind, rest = await self._exchange(msg_id, frames, timeout, function)
        return protocol.result_of(kind, rest)

    async def ping(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Ask the server whether it is alive; returns what it says of itself."""
        timeout = self.timeout if timeout is None else check_timeout(timeout)
        msg_id, frames = self._calls.ping(timeout)
        kind, rest = await self._exchange(msg_id, frames, timeout, "ping")
        return pong_info(protocol.result_of(kind, rest))

    async def _exchange(
        self, msg_id: int, frames: list[bytes], timeout: float, what: str
    ) -> tuple[int, list[bytes]]:
        socket = self._open()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, list[bytes]]] = loop.create_future()
        self._pending[msg_id] = future
        timer = loop.call_later(timeout, self._expire, msg_id, what, timeout)
        try:
            try:
                socket.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:  # queue full: wait for room, within the call's time
                assert self._async is not None
                await self._async.send_multipart(frames)
            return await future
        finally:
            timer.cancel()
            self._pending.pop(msg_id, None)

    def _expire(self, msg_id: int, what: str, timeout: float) -> None:
        future = self._pending.pop(msg_id, None)
        if future is not None and not future.done():
            future.set_exception(
                RequestTimeout(
                    f"no answer from server {self.server_name!r} at {self.connection}"
                    f" to {what!r} within {timeout:g} s"
                )
            )

    def _open(self) -> zmq.Socket:
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._socket is None:
            async_socket = zmq.asyncio.Context.shadow(self._context.underlying).socket(zmq.DEALER)
            async_socket.setsockopt(zmq.LINGER, 0)
            async_socket.connect(self.connection)
            self._async = async_socket
            # A plain view of the same socket: draining and sending without
            # awaiting saves a trip through the event loop per message.
            self._socket = zmq.Socket.shadow(async_socket.underlying)
            self._reader = asyncio.get_running_loop().create_task(self._read())
        return self._socket

    async def _read(self) -> None:
        assert self._async is not None and self._socket is not None
        receive, drain = self._async.recv_multipart, self._socket.recv_multipart
        pending = self._pending
        try:
            while True:
                frames = await receive()
                while True:
                    try:
                        answer_id, kind, rest = read_answer(frames)
                    except ProtocolError:
                        answer_id, kind, rest = -1, 0, []
                    future = pending.pop(answer_id, None)
                    if future is None or future.done():
                        self.dropped += 1
                    else:
                        future.set_result((kind, rest))
                    try:
                        frames = drain(zmq.NOBLOCK)
                    except zmq.Again:
                        break
        except zmq.ZMQError as exc:
            self._fail_pending(RuntimeError(f"client of {self.server_name!r} closed: {exc!r}"))

    def _fail_pending(self, error: Exception) -> None:
        futures = list(self._pending.values())
        self._pending.clear()  # in place: the reader holds this dict
        for future in futures:
            if not future.done():
                future.set_exception(error)

    async def close(self) -> None:
        """Stop reading, fail the calls still in flight, close the socket."""
        self._closed = True
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            try:
                await reader
            except asyncio.CancelledError:
                pass
        self._fail_pending(RuntimeError(f"client of {self.server_name!r} closed"))
        close_socket(self._async)
        self._async = None
        self._socket = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncClient {self.server_name!r} at {self.connection}>"
