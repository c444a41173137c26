"""The in-flight window of the streaming clients (:class:`~pylm.chained.LoopClient`
and the parallel :class:`~pylm.parallel.Client`): which jobs are out, until
when each may wait for an answer, room to send more, the count of a
streaming job's items, and the loop that sends, waits for answers and ends
the jobs past their deadline with :class:`~pylm.errors.RequestTimeout`.

A client (a :class:`WindowedClient`) gives the loop what differs between
clients: how jobs are encoded and sent (``send``) and how answers are read
(``wait``). Every job
out has a :class:`Job` record in :attr:`Window.jobs` until its outcome; a
job's fate (answered, expired) is decided here, so a client's books, such
as re-sending a job whose instance died, belong in this class too.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, ClassVar

from pylm.errors import PylmError

__all__ = [
    "SEND_SLICE",
    "Job",
    "JobResult",
    "Outcome",
    "Stop",
    "Stream",
    "Window",
    "WindowedClient",
    "check_messages",
    "job_results",
    "values",
]

# s a client sends for before it reads what came back: a slow payload
# source must not keep results unread and deadlines unchecked.
SEND_SLICE = 0.05


class Stop(IntEnum):
    """What ended a client's turn to send (the value of its ``send``)."""

    SLICED = 0  # its time slice: more may go at once, after reading answers
    FULL = 1  # no room in the window
    BLOCKED = 2  # the socket is full: wait for it (the client polls for room)
    DONE = 3  # no more payloads


# One outcome: (job index, value, error, whether the job is over). A
# streaming job's items are not over; an END that ends one has no value.
Outcome = tuple[int, bytes | None, PylmError | None, bool]


class Job:
    """One job out: its payload's position in the client's iterable, when
    it times out (``time.monotonic()``), and when it was sent."""

    __slots__ = ("deadline", "index", "sent")

    def __init__(self, index: int, deadline: float, sent: float) -> None:
        self.index = index
        self.deadline = deadline
        self.sent = sent


class Stream(Job):
    """A job that gives several results (a Hub's) once its first item or
    END came: the items in so far and how many its END announced."""

    __slots__ = ("announced", "items")

    def __init__(self, job: Job) -> None:
        super().__init__(job.index, job.deadline, job.sent)
        self.items = 0
        self.announced: int | None = None


class Window:
    """At most ``size`` jobs out at once, each ending with an answer or,
    after ``timeout`` seconds without one, with the error
    ``timed_out(index, together)`` gives (``together``: the jobs that
    timed out at once). One per run of a client's jobs."""

    __slots__ = ("_sent", "_timed_out", "jobs", "size", "timeout")

    def __init__(
        self, size: int, timeout: float, timed_out: Callable[[int, int], PylmError]
    ) -> None:
        # message id -> job, the oldest deadline first
        self.jobs: OrderedDict[int, Job] = OrderedDict()
        self.size = size
        self.timeout = timeout
        self._timed_out = timed_out
        self._sent = 0  # jobs sent so far: the next one's index

    def add(self, ids: Iterable[int], now: float) -> None:
        """Jobs just sent at ``now``, as messages ``ids``, in payload order."""
        jobs, index, deadline = self.jobs, self._sent, now + self.timeout
        for msg_id in ids:
            jobs[msg_id] = Job(index, deadline, now)
            index += 1
        self._sent = index

    def flowing(self, msg_id: int, job: Job) -> None:
        """An item of streaming job ``msg_id`` came: a stream lives while it flows."""
        job.deadline = time.monotonic() + self.timeout
        self.jobs.move_to_end(msg_id)

    def tally(self, msg_id: int, job: Job, count: int | None) -> None:
        """Count an item of job ``msg_id`` (``count`` None), or its END
        announcing ``count`` items; the job is over once both are in, in
        whatever order they came (stage instances may reorder them)."""
        stream = job if isinstance(job, Stream) else Stream(job)
        if count is None:
            stream.items += 1
        else:
            stream.announced = count
        if stream.announced is not None and stream.items >= stream.announced:
            del self.jobs[msg_id]
            return
        self.jobs[msg_id] = stream
        self.flowing(msg_id, stream)

    def expire(self, now: float) -> list[Outcome]:
        """Take the jobs whose deadline has passed out, each with its error."""
        jobs = self.jobs
        expired = [(msg_id, job.index) for msg_id, job in jobs.items() if job.deadline <= now]
        for msg_id, _ in expired:
            del jobs[msg_id]
        together = len(expired)
        return [(index, None, self._timed_out(index, together), True) for _, index in expired]

    def run(
        self,
        send: Callable[[int, float], Stop],
        wait: Callable[[int], Iterable[Outcome]],
        finished: Callable[[], None],
    ) -> Generator[Outcome, None, None]:
        """The outcomes of the jobs a client sends, as they come, until
        ``send`` has no more and every job out has its outcome.

        ``send(room, until)`` sends up to ``room`` jobs, recording them with
        :meth:`add`, until the clock (``time.monotonic()``) passes ``until``;
        it says what stopped it (a :class:`Stop`). ``wait(ms)`` waits up to ``ms``
        milliseconds for answers (and, after BLOCKED, for room on the
        socket) and gives the outcomes of those that came. ``finished()``
        is called when the run ends, however it ends."""
        jobs, size, clock = self.jobs, self.size, time.monotonic
        try:
            while True:
                stop = send(size - len(jobs), clock() + SEND_SLICE)
                if stop is Stop.DONE and not jobs:
                    return
                now = clock()
                if jobs:
                    oldest = next(iter(jobs.values())).deadline
                    if oldest <= now:
                        yield from self.expire(now)
                        continue
                else:
                    oldest = now + self.timeout
                yield from wait(0 if stop is Stop.SLICED else max(1, int((oldest - now) * 1000)))
        finally:
            finished()


@dataclass(frozen=True)
class JobResult:
    """The outcome of one job of a client's ``results()``: ``index`` is the
    payload's position in the iterable; exactly one of ``value`` and
    ``error`` is set."""

    index: int
    value: bytes | None
    error: PylmError | None


def check_messages(messages: object) -> int:
    """The results a streaming call ends after (``job(..., messages=N)``, the
    2016 option): a non-negative int, or None for no limit."""
    if messages is None:
        return sys.maxsize
    if isinstance(messages, bool) or not isinstance(messages, int) or messages < 0:
        raise ValueError(f"messages must be a non-negative int or None, got {messages!r}")
    return messages


def values(
    start: Callable[[], Generator[Outcome, None, None]], messages: int | None
) -> Iterator[bytes]:
    """A client's ``job()``: the values of the outcomes of ``start()``, the
    first ``messages`` of them (None: all); a failed job raises its error.
    Jobs still out when it ends stay unanswered: their answers are dropped
    when they come."""
    limit = check_messages(messages)
    if not limit:
        return
    outcomes = start()
    try:
        for _, value, error, _ in outcomes:
            if error is not None:
                raise error
            if value is not None:
                yield value
                limit -= 1
                if not limit:
                    return
    finally:
        outcomes.close()


def job_results(start: Callable[[], Generator[Outcome, None, None]]) -> Iterator[JobResult]:
    """A client's ``results()``: a :class:`JobResult` per result, stream
    item or failure among the outcomes of ``start()``."""
    for index, value, error, _ in start():
        if value is not None or error is not None:
            yield JobResult(index, value, error)


Send = Callable[[int, float], Stop]
Wait = Callable[[int], Iterable[Outcome]]


class WindowedClient:
    """``job()`` and ``results()`` of a client whose jobs go out through a
    :class:`Window`, one run at a time. The client readies a run in
    :meth:`_open`, which returns its ``send`` and ``wait`` (see
    :meth:`Window.run`); the rest of a run is the same for every client."""

    max_in_flight: int
    _running: bool
    _kind: ClassVar[str]  # the client's class, as its errors name it

    if TYPE_CHECKING:  # given by pylm.calls.Caller, a base of every client

        def _timeout_of(self, timeout: float | None) -> float: ...

        def _job_timeout(
            self, function: str, timeout: float
        ) -> Callable[[int, int], PylmError]: ...

    def _init_window(self, max_in_flight: int) -> None:
        """At most ``max_in_flight`` jobs out at once (a positive int); no run started."""
        if not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ValueError(f"max_in_flight must be a positive int, got {max_in_flight!r}")
        self.max_in_flight = max_in_flight
        self._running = False

    def job(
        self,
        function: str,
        payloads: Iterable[bytes],
        *,
        timeout: float | None = None,
        messages: int | None = None,
    ) -> Iterator[bytes]:
        """Send a job per payload and yield every result as it arrives, in
        any order (a streaming job's items in their order). A failed job
        raises its typed error and ends the iteration; a job without a
        result within ``timeout`` of being sent raises
        :class:`~pylm.errors.RequestTimeout`. ``messages``: end after that
        many results (the 2016 meaning), though jobs are still out; their
        results are dropped when they come."""
        return values(
            lambda: self._run(function, iter(payloads), self._timeout_of(timeout)), messages
        )

    def results(
        self, function: str, payloads: Iterable[bytes], *, timeout: float | None = None
    ) -> Iterator[JobResult]:
        """Like :meth:`job`, but a :class:`JobResult` per result or failure,
        timeouts included, never raising for one job; ``index`` is the
        payload's position."""
        return job_results(lambda: self._run(function, iter(payloads), self._timeout_of(timeout)))

    def _run(
        self, function: str, payloads: Iterator[bytes], timeout: float
    ) -> Generator[Outcome, None, None]:
        if self._running:
            raise RuntimeError(f"this {self._kind} is already running jobs; use one per thread")
        self._running = True
        try:  # until the window's run begins, which ends with self._finished
            window = Window(self.max_in_flight, timeout, self._job_timeout(function, timeout))
            send, wait = self._open(function, payloads, timeout, window)
        except BaseException:
            self._running = False
            raise
        return window.run(send, wait, self._finished)

    def _open(
        self, function: str, payloads: Iterator[bytes], timeout: float, window: Window
    ) -> tuple[Send, Wait]:
        """Ready a run of jobs of ``function``: its ``send`` and ``wait``."""
        raise NotImplementedError

    def _finished(self) -> None:
        self._running = False
