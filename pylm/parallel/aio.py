"""The asyncio client of a master: :class:`AsyncClient`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pylm.jobs_async import DEFAULT_RUNS, AsyncJobs
from pylm.parallel.client import Client, one_result

__all__ = ["AsyncClient"]


class AsyncClient(AsyncJobs[Client]):
    """Sends jobs to a master from an event loop::

        async with AsyncClient('master') as client:        # from the registry
            print(await client.eval('foo', b'a message'))   # one job, its result
            async for result in client.job('foo', [b'one', b'two']):
                print(result)
            async for item in client.stream('count', b'3'):  # a generator function's items
                print(item)

    The arguments are :class:`~pylm.parallel.Client`'s (``front_address`` or
    the master's name, ``timeout``, ``max_in_flight``, ``retry``,
    ``registry``, ``curve``...), and ``runs``: how many runs (``eval``,
    ``stream``, ``job``, ``results``) may go at once in this client (64 by
    default; one beyond waits for a run to end). Each run goes through a
    :class:`~pylm.parallel.Client` of its own, kept for the next run."""

    def __init__(
        self,
        front_address: str,
        server_name: str | None = None,
        *,
        runs: int = DEFAULT_RUNS,
        **options: Any,
    ) -> None:
        self.front_address, self.server_name = front_address, server_name

        def make() -> Client:
            return Client(front_address, server_name, **options)

        super().__init__(make, runs)

    async def eval(self, function: str, payload: bytes, *, timeout: float | None = None) -> bytes:
        """Run one job and return its result (as :meth:`Client.eval`)."""
        values = [value async for value in self.job(function, (payload,), timeout=timeout)]
        return one_result(values, function, self.server_name or self.front_address)

    def stream(
        self, function: str, payload: bytes, *, timeout: float | None = None
    ) -> AsyncIterator[bytes]:
        """Run one job and yield its results: one, or a generator function's items."""
        return self.job(function, (payload,), timeout=timeout)
