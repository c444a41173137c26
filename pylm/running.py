"""Calls run off a server's serving thread, and brought back to it.

A server whose calls overlap (``concurrency=N``, ``async def`` functions)
keeps its sockets in its serving thread and runs its functions elsewhere: a
blocking function on a pool of the server's threads, an ``async def`` one as
a task of an event loop the server owns (a thread of its own). A call that
ends is put in a queue, and a byte is written on a pipe the serving thread
polls beside its sockets (:attr:`Runner.fd`); the serving thread takes the
ended calls (:meth:`Runner.ended`), counts them and answers them: the
counters keep one writer, the sockets one thread.

Every thread here is a daemon: a function that never returns holds neither
the server's stop nor the process's exit. A blocking call still waiting for
a thread when its deadline passes is not run: it ends as :class:`Expired`.
"""

from __future__ import annotations

import asyncio
import collections
import os
import queue
import select
import selectors
import sys
import threading
import time
from typing import TYPE_CHECKING, Generic, NamedTuple, TypeVar

from pylm.exposed import Function, Ran, run, run_async

if TYPE_CHECKING:
    from pylm.exposed import Exposed
    from pylm.protocol import Message
    from pylm.telemetry.counting import FunctionStats

__all__ = ["ASYNC_CONCURRENCY", "Calls", "Ended", "Expired", "Runner", "limit_of"]

ASYNC_CONCURRENCY = 64  # calls of async def functions in progress at once, by default

T = TypeVar("T")
_CLOCK_SLACK = 1.0  # s past its deadline that a call is still run (hosts' clocks differ)
_FD_SETSIZE = 1024  # select() takes descriptors below this
# While a burst of calls is read, async def calls that wait (the last one took
# _WAITS s or more) are handed to the event loop _HOP_CALLS at a time, so that
# the first ones need not wait for the burst's end to start; quick ones go at
# its end, in one hop (a hop more each few calls cost them a fifth of their
# rate: the two threads then take turns at the interpreter's lock).
_HOP_CALLS = 8
_WAITS = 0.001


if sys.platform == "linux":

    class _TimelySelector(selectors.EpollSelector):
        """epoll whose waits end on time: epoll_wait counts whole milliseconds
        and rounds a wait up (an ``asyncio.sleep(0.01)`` ended 0.5 ms late on
        average, 5 % of the call), where select() counts microseconds. A wait
        with a timeout is made by select() on the epoll's own descriptor
        (readable when any of its descriptors is), then epoll is read at once;
        a descriptor select() cannot take waits as epoll would."""

        def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
            epoll = self.fileno()
            if timeout is not None and timeout > 0 and 0 <= epoll < _FD_SETSIZE:
                select.select([epoll], [], [], timeout)
                timeout = 0
            return super().select(timeout)


def _event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: the one :func:`asyncio.new_event_loop` makes
    (uvloop's, for one, once its policy is set), but where that is
    asyncio's default loop on Linux, one whose waits are not rounded up to
    the millisecond."""
    loop = asyncio.new_event_loop()
    if sys.platform == "linux" and type(loop) is asyncio.SelectorEventLoop:
        loop.close()
        return asyncio.SelectorEventLoop(_TimelySelector())
    return loop


class Expired(Exception):
    """A call that waited for a thread past its deadline: not run."""


class Runner(Generic[T]):
    """Runs calls for the serving thread of server ``name``: blocking ones
    on ``threads`` threads, ``async def`` ones on an event loop (made if
    ``coroutines``); each call is known by a token of the caller's, given
    back with how it ran. From :meth:`open` until :meth:`close`."""

    def __init__(self, name: str, threads: int, coroutines: bool) -> None:
        self.name, self.threads, self.coroutines = name, threads, coroutines
        self._ended: queue.SimpleQueue[tuple[T, Ran]] = queue.SimpleQueue()
        self._jobs: queue.SimpleQueue[tuple[T, Function, bytes, float] | None] = queue.SimpleQueue()
        self._woken = threading.Event()  # set: a byte is on the pipe, not yet read
        self._lock = threading.Lock()  # the pipe's write end against close()
        self._closed = False
        # async def calls given, not yet taken by the event loop; _handed: a
        # hop to the loop is on its way, which takes them all.
        self._to_loop: collections.deque[tuple[T, Function, bytes]] = collections.deque()
        self._handed = False
        self._waits = False  # the last async def call took _WAITS s or more
        self._tasks: set[asyncio.Task[None]] = set()  # the event loop's calls in progress
        self._loop: asyncio.AbstractEventLoop | None = None
        self._looping: threading.Thread | None = None
        self.fd = self._wake_w = -1

    def open(self) -> None:
        self.fd, self._wake_w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._wake_w, False)
        for number in range(self.threads):
            name = f"pylm-{self.name}-{number}"
            threading.Thread(target=self._work, name=name, daemon=True).start()
        if self.coroutines:
            self._loop = _event_loop()
            self._looping = threading.Thread(
                target=self._loop.run_forever, name=f"pylm-{self.name}-loop", daemon=True
            )
            self._looping.start()

    def start(
        self, token: T, function: Function, payload: bytes, is_async: bool, deadline: float
    ) -> None:
        """Run ``function(payload)``: on the pool (not if it waited for a
        thread past ``deadline``, Unix time, 0 for none), or on the event
        loop, handed to it with the calls given after it by the next
        :meth:`flush` (also once :data:`_HOP_CALLS` are waiting, if calls
        wait), or taken by a hop on its way there already."""
        if not is_async:
            self._jobs.put((token, function, payload, deadline))
            return
        self._to_loop.append((token, function, payload))
        if self._waits and len(self._to_loop) >= _HOP_CALLS:
            self.flush()

    def flush(self) -> None:
        """Hand the ``async def`` calls given so far to the event loop,
        unless a hop there is on its way (which takes them)."""
        if self._to_loop and not self._handed:
            assert self._loop is not None
            self._handed = True
            self._loop.call_soon_threadsafe(self._begin)

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
        """Stop the pool and the event loop; the calls still running end
        unanswered (their tasks are cancelled; a thread finishes its call)."""
        with self._lock:
            if self._closed or self.fd < 0:
                self._closed = True
                return
            self._closed = True
        for _ in range(self.threads):
            self._jobs.put(None)
        loop, looping = self._loop, self._looping
        if loop is not None and looping is not None:
            loop.call_soon_threadsafe(self._cancel_all)
            looping.join(5)
            if not looping.is_alive():
                loop.close()
        os.close(self.fd)
        os.close(self._wake_w)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            token, function, payload, deadline = job
            if deadline and time.time() > deadline + _CLOCK_SLACK:
                ran: Ran = (None, Expired(), 0.0)
            else:
                ran = run(function, payload)
            self._end(token, ran)

    def _begin(self) -> None:
        """On the event loop: start the calls given, a task each (kept until
        done)."""
        assert self._loop is not None
        # Cleared before the calls are taken: a call given from now on is
        # taken here, or hands itself over again.
        self._handed = False
        calls, take = self._to_loop, self._to_loop.popleft
        while calls:
            token, function, payload = take()
            task = self._loop.create_task(self._run_async(token, function, payload))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _cancel_all(self) -> None:
        """On the event loop, closing: cancel the calls, then stop."""
        assert self._loop is not None
        for task in self._tasks:
            task.cancel()
        self._loop.call_later(0.1, self._loop.stop)  # their cleanup runs meanwhile

    async def _run_async(self, token: T, function: Function, payload: bytes) -> None:
        ran = await run_async(function, payload)
        self._waits = ran[2] >= _WAITS
        self._end(token, ran)

    def _end(self, token: T, ran: Ran) -> None:
        """A call ended: queued, and the serving thread woken (one byte on
        the pipe until it reads it)."""
        self._ended.put((token, ran))
        if self._woken.is_set():
            return
        with self._lock:
            if self._closed:
                return  # the serving loop has ended: nobody to answer
            self._woken.set()
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:  # the pipe is full: the serving thread is awake already
                pass


class Ended(NamedTuple):
    """A call that ended off the serving thread: what :meth:`Calls.result`
    needs to count it and shape its result."""

    target: bytes
    size: int  # of its payload
    stats: FunctionStats | None
    ran: Ran

    @property
    def expired(self) -> bool:
        """It waited for a thread past its deadline: not run."""
        return isinstance(self.ran[1], Expired)


def limit_of(concurrency: int | None, coroutines: bool) -> int:
    """The most calls in progress at once of a server with ``concurrency``
    (None: by default, one blocking call at a time, or
    :data:`ASYNC_CONCURRENCY` when it has ``async def`` functions)."""
    return concurrency or (ASYNC_CONCURRENCY if coroutines else 1)


class Calls(Generic[T]):
    """The calls in progress of a server whose calls overlap, for its
    serving thread: :meth:`start` looks a call up and has a :class:`Runner`
    run it, at most :attr:`limit` at once (``concurrency``; by default one
    blocking call, or :data:`ASYNC_CONCURRENCY` when the server has
    ``async def`` functions); :meth:`ended` gives them back once they ran,
    and :meth:`result` counts each and gives its result. Each call is known
    by a token of the server's (where to answer it). ``most``: fewer at
    once, if smaller (a worker's slots)."""

    def __init__(
        self, name: str, exposed: Exposed, concurrency: int | None, most: int | None = None
    ) -> None:
        coroutines = exposed.coroutines
        self.exposed = exposed
        self.limit = limit_of(concurrency, bool(coroutines))
        if most is not None:
            self.limit = min(self.limit, most)
        self.in_progress = 0
        self.runner: Runner[tuple[T, Ended]] = Runner(name, concurrency or 1, bool(coroutines))

    @property
    def fd(self) -> int:
        """Readable when calls have ended (poll it beside the sockets)."""
        return self.runner.fd

    @property
    def room(self) -> bool:
        """Fewer calls than the limit are in progress."""
        return self.in_progress < self.limit

    def open(self) -> None:
        self.runner.open()

    def close(self) -> None:
        self.runner.close()

    def start(self, token: T, message: Message) -> None:
        """Run the call the REQUEST ``message`` asks for; raises (and counts)
        the :class:`~pylm.errors.PylmError` of an unknown function or a
        payload over the limit. An ``async def`` call may wait for
        :meth:`flush` to start."""
        target, payload = message.target, message.payload
        function, stats = self.exposed.lookup(target, payload)
        ended = Ended(target, len(payload), stats, (None, None, 0.0))
        coroutine = target in self.exposed.coroutines
        self.runner.start((token, ended), function, payload, coroutine, message.deadline)
        self.in_progress += 1

    def flush(self) -> None:
        """Have the ``async def`` calls given and not started yet started
        (call it once a burst of calls is read)."""
        self.runner.flush()

    def ended(self) -> list[tuple[T, Ended]]:
        """The calls that ended since the last look (after :attr:`fd` was
        readable): no longer in progress."""
        ended = [(token, call._replace(ran=ran)) for (token, call), ran in self.runner.ended()]
        self.in_progress -= len(ended)
        return ended

    def result(self, call: Ended) -> bytes:
        """The result of ``call``, counted; or raises the
        :class:`~pylm.errors.PylmError` to answer it with (as a call run in
        the serving thread would)."""
        return self.exposed.settle(call.target, call.size, call.stats, call.ran)
