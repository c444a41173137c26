"""The asyncio client of a pipeline: :class:`AsyncLoopClient`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pylm.chained.client import LoopClient
from pylm.jobs_async import DEFAULT_RUNS, AsyncJobs

__all__ = ["AsyncLoopClient"]


class AsyncLoopClient(AsyncJobs[LoopClient]):
    """Sends jobs to a pipeline from an event loop, and yields their results
    as they come::

        async with AsyncLoopClient('step1') as client:     # from the registry
            async for result in client.job('foo', [b'a message', b'another']):
                print(result)

    The arguments are :class:`~pylm.chained.LoopClient`'s (``timeout``,
    ``max_in_flight``, ``batch``, ``retry``, ``registry``, ``curve``...; the
    four addresses and names of the 2016 signature, or the first stage's
    name alone), and ``runs``: how many ``job()``/``results()`` runs may go
    at once in this client (64 by default; one beyond waits for a run to
    end). Each run goes through a :class:`~pylm.chained.LoopClient` of its
    own, kept for the next run, so everything that client promises holds
    (results to the client that sent the job, retries, timeouts, streams)."""

    def __init__(
        self,
        push_address: str | Sequence[str],
        pull_address: str | None = None,
        db_address: str | None = None,
        server_name: str | None = None,
        *,
        runs: int = DEFAULT_RUNS,
        **options: Any,
    ) -> None:
        options.setdefault("announce", False)

        def make() -> LoopClient:
            return LoopClient(push_address, pull_address, db_address, server_name, **options)

        super().__init__(make, runs)
