"""Serving a standalone server's calls concurrently (``concurrency=N``, or
``async def`` functions): at most N calls in progress at once.

The serving thread keeps the server's socket, as in the one-at-a-time loop:
it reads requests while fewer than N calls are in progress (beyond that,
requests wait in ZeroMQ's queues: backpressure, not memory), and sends every
answer. A call runs elsewhere: an ``async def`` function on an event loop the
server owns (a thread of its own), a blocking function on a pool of the
server's threads. Each call that ends is put in a queue and a byte is written
on a pipe the serving thread polls beside the socket; the serving thread then
counts it (the counters keep one writer) and answers it. On stop, or at the
``messages`` limit, the loop reads no more and waits for the calls in
progress, at most :data:`~pylm.lifecycle.DRAIN_MAX` seconds, before it ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import threading
import time
from typing import TYPE_CHECKING

import zmq

from pylm import protocol
from pylm.base import ASYNC_CONCURRENCY
from pylm.errors import ProtocolError, PylmError
from pylm.exposed import Function, Ran, run, run_async
from pylm.lifecycle import DRAIN_MAX, DRAIN_QUIET
from pylm.protocol import expiry_stamp, past_deadline
from pylm.transport import read_envelope

if TYPE_CHECKING:
    from pylm.standalone.servers import Server
    from pylm.telemetry.counting import FunctionStats

__all__ = ["ConcurrentLoop"]

_IDLE_MS = 1000  # ms a wait lasts at most (then it waits again)

# A call in progress: the envelope to answer in, its id, target, payload size
# and counters.
_Call = tuple[list[bytes], int, bytes, int, "FunctionStats | None"]


class ConcurrentLoop:
    """The serving loop of ``server`` when its calls may overlap; :meth:`serve`
    runs in the serving thread until stop or the messages limit."""

    def __init__(self, server: Server) -> None:
        self.server = server
        exposed = server._exposed
        self.limit = server.concurrency or ASYNC_CONCURRENCY
        self.threads = server.concurrency or 1  # blocking functions: one at a time by default
        self.coroutines = exposed.coroutines
        self._ended: queue.SimpleQueue[tuple[_Call, Ran]] = queue.SimpleQueue()
        self._woken = threading.Event()  # set: a byte is on the pipe, not yet read
        self._to_loop: list[tuple[_Call, Function, bytes]] = []  # started by the last read
        self._tasks: set[asyncio.Task[None]] = set()  # the event loop's calls in progress
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def serve(self) -> None:
        server = self.server
        name = server.name
        pool = concurrent.futures.ThreadPoolExecutor(self.threads, f"pylm-{name}")
        loop: asyncio.AbstractEventLoop | None = None
        looping: threading.Thread | None = None
        if self.coroutines:
            loop = asyncio.new_event_loop()
            looping = threading.Thread(target=loop.run_forever, name=f"pylm-{name}-loop")
            looping.start()
        try:
            self._serve(pool, loop)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            if loop is not None and looping is not None:
                loop.call_soon_threadsafe(loop.stop)
                looping.join(5)
                if not looping.is_alive():
                    loop.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _serve(
        self, pool: concurrent.futures.ThreadPoolExecutor, loop: asyncio.AbstractEventLoop | None
    ) -> None:
        server = self.server
        socket = server._socket
        assert socket is not None
        stats = server.stats
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        in_progress = 0
        reading = True  # until stop, a quiet drain or the messages limit
        draining = False  # stopping, registered: serving what clients still send
        quiet_since = give_up = 0.0
        while reading or in_progress:
            room = reading and in_progress < self.limit
            poller.modify(socket, zmq.POLLIN if room else 0)
            events = dict(poller.poll(round(DRAIN_QUIET * 500) if draining else _IDLE_MS))
            now = time.monotonic()
            if self._wake_r in events:
                in_progress -= self._answer_ended()
            if not room or socket in events:
                quiet_since = now  # quiet means: listening, and nothing came
            if room and socket in events:
                while in_progress < self.limit and server.served < server.messages:
                    try:
                        frames = socket.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if stats is not None:
                        stats.received += 1
                    if len(frames) == 3 and not frames[1] and server._is_control(frames[2]):
                        if stats is not None:
                            stats.received -= 1  # stop's wake-up call is no message
                        if draining or server.registration is None:
                            reading, give_up = False, now + DRAIN_MAX
                            break
                        server._deregister()  # found by name: leave, then serve what comes
                        draining, give_up = True, now + DRAIN_MAX
                        continue
                    in_progress += self._start(frames, pool, loop)
                if self._to_loop:  # one hop to the event loop for all the calls just read
                    assert loop is not None
                    loop.call_soon_threadsafe(self._begin, loop, self._to_loop)
                    self._to_loop = []
            if reading and draining and (now - quiet_since > DRAIN_QUIET or now > give_up):
                reading = False  # quiet: the clients have moved on
            if reading and server.served >= server.messages:
                reading, give_up = False, now + DRAIN_MAX
            if not reading and in_progress and now > give_up:
                server.logger.warning(
                    "%s: stopped with %d call(s) still in progress, not answered",
                    server.name,
                    in_progress,
                )
                return

    def _start(
        self,
        frames: list[bytes],
        pool: concurrent.futures.ThreadPoolExecutor,
        loop: asyncio.AbstractEventLoop | None,
    ) -> int:
        """Start the call ``frames`` ask for (1), or answer or drop them
        here, as the one-at-a-time loop does, if they ask for no call (0)."""
        server = self.server
        parts = read_envelope(frames)
        if parts is None:
            server._handle_other(frames)  # drops it, counted
            return 0
        envelope, body = parts
        try:
            message = protocol.decode(body)
        except ProtocolError:
            server._handle_other(frames)  # drops it, counted, and answers the error
            return 0
        if message.kind != protocol.REQUEST:
            server._handle_other(frames)
            return 0
        if past_deadline(body[0], expiry_stamp(time.time())):
            server._expired(body[0])
            return 0
        server.served += 1
        try:
            function, stats = server._exposed.lookup(message.target, message.payload)
        except PylmError as error:
            server._answer(envelope, protocol.encode_error(message.msg_id, error))
            return 0
        call: _Call = (envelope, message.msg_id, message.target, len(message.payload), stats)
        if message.target in self.coroutines:
            self._to_loop.append((call, function, message.payload))
        else:
            pool.submit(self._run, call, function, message.payload)
        return 1

    def _run(self, call: _Call, function: Function, payload: bytes) -> None:
        self._ended.put((call, run(function, payload)))
        self._wake()

    def _begin(
        self, loop: asyncio.AbstractEventLoop, calls: list[tuple[_Call, Function, bytes]]
    ) -> None:
        """On the event loop: start ``calls``, a task each (kept until done)."""
        for call, function, payload in calls:
            task = loop.create_task(self._run_async(call, function, payload))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_async(self, call: _Call, function: Function, payload: bytes) -> None:
        self._ended.put((call, await run_async(function, payload)))
        self._wake()

    def _wake(self) -> None:
        """Have the serving thread look at the calls that ended (one byte on
        the pipe until it does)."""
        if self._woken.is_set():
            return
        self._woken.set()
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # the pipe is full: the serving thread is awake already
            pass

    def _answer_ended(self) -> int:
        """Count and answer the calls that ended; how many."""
        server = self.server
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        # After the pipe is read, before the queue is: a call that ends from
        # now on writes a byte again, one that ended before is in the queue.
        self._woken.clear()
        ended = 0
        while True:
            try:
                (envelope, msg_id, target, size, stats), ran = self._ended.get_nowait()
            except queue.Empty:
                return ended
            ended += 1
            try:
                result = server._exposed.settle(target, size, stats, ran)
            except PylmError as error:
                server._answer(envelope, protocol.encode_error(msg_id, error))
                continue
            server._answer(envelope, protocol.encode(protocol.REPLY, msg_id, result))
