"""Small lifecycle helpers shared by the objects that hold sockets, threads or
helper processes, and the drain of a server leaving the registry."""

from __future__ import annotations

import time
from types import TracebackType
from typing import Self

__all__ = ["DRAIN_MAX", "DRAIN_QUIET", "Closing", "Drain", "Started"]

# A server found by name that is stopped leaves the registry first, then
# serves what its senders still send until its input has been quiet for
# DRAIN_QUIET s (they apply the registry's change before their next send),
# DRAIN_MAX s at most (docs/operations.md).
DRAIN_QUIET = 0.2
DRAIN_MAX = 5.0  # s a leaving server serves at most


class Closing:
    """Adds ``with obj:`` to an object with a ``close()`` method."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Started(Closing):
    """Adds ``with obj:`` to an object that ``start()`` sets going and
    ``close()`` ends (a helper process, a cluster of them): ``with`` starts
    it, gives it, and closes it however the block ends."""

    def start(self) -> Self:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()


class Drain:
    """The drain of a server leaving the registry: it lasts until the input
    has been quiet for ``quiet`` s, or ``most`` s in all."""

    def __init__(self, quiet: float = DRAIN_QUIET, most: float = DRAIN_MAX) -> None:
        self.quiet = quiet
        self.quiet_since = time.monotonic()
        self.give_up = self.quiet_since + most

    def wait_ms(self) -> int | None:
        """How long to wait for input now, in ms (at most 50, so that the
        caller's other duties come round); None once the drain is over."""
        now = time.monotonic()
        left = self.quiet - (now - self.quiet_since)
        if left <= 0 or now >= self.give_up:
            return None
        return max(1, min(50, round(left * 1000)))

    def heard(self) -> None:
        """Input came: the quiet starts again."""
        self.quiet_since = time.monotonic()
