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
        self, function: str, payloads: Iterator[bytes], timeout: float
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
                run = client._run_async(function, iter(payloads), client._timeout_of(timeout))
                async with aclosing(run) as outcomes:
                    async for outcome in outcomes:
                        yield outcome
            finally:
                self._give(client)

    async def _take(self) -> C:
        """An idle client, or a new one (made in a thread: it may look the
        servers up in the registry)."""
        client = self._idle.pop() if self._idle else await asyncio.to_thread(self._make)
        self._busy.add(client)
        return client

    def _give(self, client: C) -> None:
        self._busy.discard(client)
        if self._closed:
            client.close()
        else:
            self._idle.append(client)
