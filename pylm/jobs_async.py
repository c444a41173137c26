"""The asyncio face of the streaming clients (:class:`~pylm.chained.AsyncLoopClient`,
the parallel :class:`~pylm.parallel.AsyncClient`): ``job()`` and
``results()`` as async iterators, many runs at once in one event loop.

Each run of jobs goes through a blocking client of its own, taken from a
pool (made when none is idle, at most ``runs`` at once, kept for the next
run): the same sockets, protocol, window and books as the blocking client,
waited on by the event loop (:func:`pylm.window.wait_async`) instead of a
poll that blocks. What may wait on a peer (finding the servers in the
registry, greeting a pipeline's last stage) runs in a thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import aclosing
from types import TracebackType
from typing import Generic, Protocol, Self, TypeVar

from pylm.window import JobResult, Outcome, check_messages

__all__ = ["DEFAULT_RUNS", "AsyncJobs", "Pooled"]

DEFAULT_RUNS = 64  # runs of jobs going at once in one asyncio client, by default


class Pooled(Protocol):
    """What the pool holds: a blocking windowed client
    (:class:`~pylm.window.WindowedClient`) that closes."""

    def _run_async(
        self, function: str, payloads: Iterator[bytes], timeout: float, threads: Executor
    ) -> AsyncGenerator[Outcome, None]: ...

    def _timeout_of(self, timeout: float | None) -> float: ...

    def close(self) -> None: ...


C = TypeVar("C", bound=Pooled)


class AsyncJobs(Generic[C]):
    """``job()`` and ``results()`` of an asyncio client whose runs go
    through blocking clients that ``make()`` makes (see the module's doc).
    ``runs``: runs going at once at most (a positive int); a run beyond waits
    for one to end. Use it with ``async with``, or call :meth:`close`."""

    def __init__(self, make: Callable[[], C], runs: int = DEFAULT_RUNS) -> None:
        if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
            raise ValueError(f"runs must be a positive int, got {runs!r}")
        self.runs = runs
        self._make = make
        self._idle: list[C] = []  # clients between runs
        self._busy: set[C] = set()  # clients running jobs
        self._room: asyncio.Semaphore | None = None  # made in the event loop that uses it
        # call()s made in this turn of the event loop, by function and timeout
        self._calls: dict[
            tuple[str, float | None], list[tuple[bytes, asyncio.Future[list[bytes]]]]
        ] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # runs of calls going
        # What may wait on a peer (making a client, readying a run, greeting
        # a last stage that joins) runs here, a thread for each run at most,
        # not on the event loop's default executor, which other work shares.
        self._threads = ThreadPoolExecutor(runs, thread_name_prefix="pylm-runs")
        self._closed = False

    async def open(self) -> Self:
        """Make the first client now (``async with`` does): a server that
        cannot be found, or a wrong address, is said here."""
        if not self._idle and not self._busy:
            self._give(await self._take())
        return self

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the clients between runs now, those running jobs as their
        runs end."""
        self._closed = True
        idle, self._idle = self._idle, []
        for client in idle:
            client.close()
        if not self._busy:
            self._threads.shutdown(wait=False)

    async def job(
        self,
        function: str,
        payloads: Iterable[bytes],
        *,
        timeout: float | None = None,
        messages: int | None = None,
    ) -> AsyncIterator[bytes]:
        """Send a job per payload and yield every result as it arrives, in
        any order (a streaming job's items in their order), as the blocking
        client's ``job()`` does: a failed job raises its typed error and
        ends the iteration; ``messages`` ends it after that many results.
        The payloads are taken on the event loop: give a list, or an
        iterable that does not wait."""
        limit = check_messages(messages)
        if not limit:
            return
        async with aclosing(self._outcomes(function, payloads, timeout)) as outcomes:
            async for _, value, error, _ in outcomes:
                if error is not None:
                    raise error
                if value is not None:
                    yield value
                    limit -= 1
                    if not limit:
                        return

    async def results(
        self, function: str, payloads: Iterable[bytes], *, timeout: float | None = None
    ) -> AsyncIterator[JobResult]:
        """Like :meth:`job`, but a :class:`~pylm.window.JobResult` per result
        or failure, timeouts included, never raising for one job."""
        async with aclosing(self._outcomes(function, payloads, timeout)) as outcomes:
            async for index, value, error, _ in outcomes:
                if value is not None or error is not None:
                    yield JobResult(index, value, error)

    async def call(
        self, function: str, payload: bytes, *, timeout: float | None = None
    ) -> list[bytes]:
        """Run one job of ``function`` and return its results: one, or a
        streaming job's items (those once the run it went in ends). Raises
        the job's typed error. Calls made at once (in the same turn of the
        event loop, of the same function and timeout) go out together, in
        one run: many callers cost about what one ``job()`` of many
        payloads costs."""
        loop = asyncio.get_running_loop()
        key = (function, timeout)
        calls = self._calls.get(key)
        if calls is None:
            calls = self._calls[key] = []
            loop.call_soon(self._go, key)
        answer: asyncio.Future[list[bytes]] = loop.create_future()
        calls.append((payload, answer))
        return await answer

    def _go(self, key: tuple[str, float | None]) -> None:
        """Send the calls made since the last turn of the event loop, in a
        run; a run whose callers have all gone (or all have their answers)
        ends at once, giving its client back."""
        calls = self._calls.pop(key)
        task = asyncio.ensure_future(self._run_calls(key[0], key[1], calls))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        left = len(calls)

        def answered(_: asyncio.Future[list[bytes]]) -> None:
            nonlocal left
            left -= 1
            if not left and not task.done():
                task.cancel()

        for _, answer in calls:
            answer.add_done_callback(answered)

    async def _run_calls(
        self,
        function: str,
        timeout: float | None,
        calls: list[tuple[bytes, asyncio.Future[list[bytes]]]],
    ) -> None:
        """A run of the jobs of ``calls``, each answered as its outcome
        comes (a streaming job's items once the run ends)."""
        items: list[list[bytes]] = [[] for _ in calls]
        payloads = [payload for payload, _ in calls]
        failure: BaseException | None = None
        try:
            async with aclosing(self._outcomes(function, payloads, timeout)) as outcomes:
                async for index, value, error, over in outcomes:
                    answer = calls[index][1]
                    if answer.done():  # its caller went away, or it failed already
                        continue
                    if error is not None:
                        answer.set_exception(error)
                        continue
                    if value is not None:
                        items[index].append(value)
                    if over:  # its result, or the END of a master's stream
                        answer.set_result(items[index])
        except Exception as exc:  # the run's own failure (no instance, closed): every call's
            failure = exc
        except BaseException:  # cancelled
            for _, answer in calls:
                answer.cancel()
            raise
        for index, (_, answer) in enumerate(calls):
            if not answer.done():
                if failure is not None:
                    answer.set_exception(failure)
                else:
                    answer.set_result(items[index])

    async def _outcomes(
        self, function: str, payloads: Iterable[bytes], timeout: float | None
    ) -> AsyncGenerator[Outcome, None]:
        """A run of jobs on a client of the pool, given back when it ends."""
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._room is None:
            self._room = asyncio.Semaphore(self.runs)
        async with self._room:
            client = await self._take()
            try:
                run = client._run_async(
                    function, iter(payloads), client._timeout_of(timeout), self._threads
                )
                async with aclosing(run) as outcomes:
                    async for outcome in outcomes:
                        yield outcome
            finally:
                self._give(client)

    async def _take(self) -> C:
        """An idle client, or a new one (made in a thread: it may look the
        servers up in the registry)."""
        if self._idle:
            client = self._idle.pop()
        else:
            making = asyncio.get_running_loop().run_in_executor(self._threads, self._make)
            try:
                client = await asyncio.shield(making)
            except asyncio.CancelledError:  # the client made still joins the pool

                def made(future: asyncio.Future[C]) -> None:
                    if not future.cancelled() and future.exception() is None:
                        self._give(future.result())

                making.add_done_callback(made)
                raise
        self._busy.add(client)
        return client

    def _give(self, client: C) -> None:
        self._busy.discard(client)
        if not self._closed:
            self._idle.append(client)
            return
        client.close()
        if not self._busy:  # the last run after close() ended
            self._threads.shutdown(wait=False)
