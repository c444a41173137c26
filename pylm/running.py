"""Calls run off a server's serving thread, and brought back to it.

A server whose calls overlap (``concurrency=N``, ``async def`` functions)
keeps its sockets in its serving thread and runs its functions elsewhere: a
blocking function on a pool of the server's threads, an ``async def`` one as
a task of an event loop the server owns (a thread of its own). A call that
ends is put in a queue, and a byte is written on a pipe the serving thread
polls beside its sockets (:attr:`Runner.fd`); the serving thread takes the
ended calls (:meth:`Runner.ended`), counts them and answers them: the
counters keep one writer, the sockets one thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import threading
from typing import Generic, TypeVar

from pylm.exposed import Function, Ran, run, run_async

__all__ = ["Runner"]

T = TypeVar("T")


class Runner(Generic[T]):
    """Runs calls for the serving thread of server ``name``: blocking ones
    on ``threads`` threads, ``async def`` ones on an event loop (made if
    ``coroutines``); each call is known by a token of the caller's, given
    back with how it ran. From :meth:`open`-ing until :meth:`close`."""

    def __init__(self, name: str, threads: int, coroutines: bool) -> None:
        self.name, self.threads, self.coroutines = name, threads, coroutines
        self._ended: queue.SimpleQueue[tuple[T, Ran]] = queue.SimpleQueue()
        self._woken = threading.Event()  # set: a byte is on the pipe, not yet read
        self._to_loop: list[tuple[T, Function, bytes]] = []  # started since the last flush
        self._tasks: set[asyncio.Task[None]] = set()  # the event loop's calls in progress
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._looping: threading.Thread | None = None
        self.fd, self._wake_w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._wake_w, False)

    def open(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, f"pylm-{self.name}")
        if self.coroutines:
            self._loop = asyncio.new_event_loop()
            self._looping = threading.Thread(
                target=self._loop.run_forever, name=f"pylm-{self.name}-loop"
            )
            self._looping.start()

    def start(self, token: T, function: Function, payload: bytes, is_async: bool) -> None:
        """Run ``function(payload)``: on the pool now, or on the event loop
        at the next :meth:`flush` (one hop there for a burst of calls)."""
        if is_async:
            self._to_loop.append((token, function, payload))
        else:
            assert self._pool is not None
            self._pool.submit(self._run, token, function, payload)

    def flush(self) -> None:
        """Start the ``async def`` calls given since the last flush."""
        if self._to_loop:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._begin, self._to_loop)
            self._to_loop = []

    def ended(self) -> list[tuple[T, Ran]]:
        """The calls that ended since the last look (after :attr:`fd` was
        readable), with how each ran."""
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass
        # After the pipe is read, before the queue is: a call that ends from
        # now on writes a byte again, one that ended before is in the queue.
        self._woken.clear()
        ended = []
        while True:
            try:
                ended.append(self._ended.get_nowait())
            except queue.Empty:
                return ended

    def close(self) -> None:
        """Stop the pool and the event loop (calls still running are left)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        loop, looping = self._loop, self._looping
        if loop is not None and looping is not None:
            loop.call_soon_threadsafe(loop.stop)
            looping.join(5)
            if not looping.is_alive():
                loop.close()
        os.close(self.fd)
        os.close(self._wake_w)

    def _begin(self, calls: list[tuple[T, Function, bytes]]) -> None:
        """On the event loop: start ``calls``, a task each (kept until done)."""
        assert self._loop is not None
        for token, function, payload in calls:
            task = self._loop.create_task(self._run_async(token, function, payload))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _run(self, token: T, function: Function, payload: bytes) -> None:
        self._ended.put((token, run(function, payload)))
        self._wake()

    async def _run_async(self, token: T, function: Function, payload: bytes) -> None:
        self._ended.put((token, await run_async(function, payload)))
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
