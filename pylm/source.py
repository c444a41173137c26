"""A run's payloads, taken a message at a time: the small ones the iterable
gives at once travel together (a BATCH), and no job waits for the next ones.

The streaming clients (:class:`~pylm.chained.LoopClient`, the parallel
:class:`~pylm.parallel.Client`) take their payloads through a
:class:`Payloads`: each message takes up to a cap of small payloads, up to
:data:`~pylm.protocol.BATCH_BYTES` of them, as long as the iterable hands
them over without waiting. A message being filled goes once
:data:`SLOW_SOURCE` has passed since it began; if one payload took that long
and the thread blocked meanwhile (the iterable waits between items: a queue,
a socket), every later message of the run takes one job, so that each job
leaves before the next is asked for.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from pylm.protocol import BATCH_BYTES

try:
    import resource

    _RUSAGE_THREAD: int | None = getattr(resource, "RUSAGE_THREAD", None)
except ImportError:  # not a POSIX system
    _RUSAGE_THREAD = None

__all__ = ["MAX_BATCH", "SLOW_SOURCE", "Payloads", "check_batch"]

SLOW_SOURCE = 0.002  # s: no job waits longer for the iterable to give the next ones
MAX_BATCH = 1024  # jobs per message at most


def check_batch(batch: object) -> int:
    """A client's ``batch`` option: an int from 1 to :data:`MAX_BATCH`, or ``ValueError``."""
    if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"batch must be an int from 1 to {MAX_BATCH}, got {batch!r}")
    return batch


def _blocked() -> int:
    """How many times this thread has waited (voluntary context switches:
    a slow payload that came with none was the machine's, not the
    iterable's); 0 where the system does not tell."""
    if _RUSAGE_THREAD is None:
        return 0
    return resource.getrusage(_RUSAGE_THREAD).ru_nvcsw


class Payloads:
    """The payloads of one run, from ``payloads``: :meth:`take` gives those
    of the next message. A payload is *small* if it is ``bytes`` of at most
    ``inline_limit`` bytes (it goes inline, in one frame); anything else
    (a large payload, or a value the caller's checks will refuse) goes in a
    message of its own. ``cap``: small payloads per message at most."""

    __slots__ = ("_carried", "_inline", "_payloads", "cap", "exhausted")

    def __init__(self, payloads: Iterator[object], cap: int, inline_limit: int) -> None:
        self._payloads = payloads
        self._inline = inline_limit
        self.cap = cap  # 1 once the iterable is seen to wait
        self.exhausted = False
        self._carried: object = None  # a payload taken, for the next message

    def take(self, room: int) -> tuple[list[bytes], object]:
        """The payloads of the next message: up to ``min(cap, room)`` small
        ones given at once (and None), or ``[]`` and one that is not small,
        to go alone; ``([], None)`` once the iterable is exhausted. ``room``
        is at least 1."""
        payloads, inline = self._payloads, self._inline
        left = self.cap if self.cap < room else room
        taken: list[bytes] = []
        filled = 0  # bytes of the payloads taken
        clock = time.monotonic
        blocked = _blocked() if left > 1 else 0
        began = clock() if left > 1 else 0.0
        while left:
            payload: object
            if self._carried is not None:
                payload, self._carried = self._carried, None
            elif left > 1 or taken:
                pulled = clock()
                payload = next(payloads, None)
                got = clock()
                if got - began > SLOW_SOURCE:
                    left = 1  # no job waits longer for more: this one goes
                    if got - pulled > SLOW_SOURCE and (
                        _RUSAGE_THREAD is None or _blocked() != blocked
                    ):
                        self.cap = 1  # the iterable waits between items
            else:
                payload = next(payloads, None)
            if payload is None:
                self.exhausted = True
                break
            if type(payload) is bytes and len(payload) <= inline:
                if taken and filled + len(payload) > BATCH_BYTES:
                    self._carried = payload  # the message is full: next
                    break
                taken.append(payload)
                filled += len(payload)
                left -= 1
            elif taken:
                self._carried = payload  # one that is not small goes on its own, next
                break
            else:
                return taken, payload
        return taken, None
