"""Small lifecycle helpers shared by the objects that hold sockets, threads or
helper processes."""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["Closing", "Started"]


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
