"""The in-flight window of the streaming clients (:class:`~pylm.chained.LoopClient`
and the parallel :class:`~pylm.parallel.Client`): which jobs are out, until
when each may wait for an answer, room to send more, the count of a
streaming job's items, the loop that sends, waits for answers and ends
the jobs past their deadline with :class:`~pylm.errors.RequestTimeout`; and
the client's books, which send a job that seems lost again and deliver its
first answer only.

A client (a :class:`WindowedClient`) gives the loop what differs between
clients: how jobs are encoded and sent (``send``) and how answers are read
(``wait``). Every job out has a :class:`Job` record in :attr:`Window.jobs`
until its outcome; a job's fate (answered, sent again, expired) is decided
here.

A job seems lost once it has waited :data:`RETRY_FLOOR` seconds (or
:data:`RETRY_FACTOR` times the longest recent answer time, if longer; its
*grace*) since it was last sent, while a job sent after its first sending
has been answered: the path works, and this job fell out of it (its
instance died, or froze). A pipeline that is merely full answers nothing
sent later either, and gets no copies. It is then sent again, with the same
id and deadline, if the client's :class:`RetryBudget` has a token; the
first answer is the job's result, later copies are dropped and counted
(:attr:`Books.duplicates`). A job of a stream that has begun (its first
item came) is never sent again. Execution is at least once: a first copy
may still run somewhere; the client delivers one result per job.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections import OrderedDict
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Sequence,
)
from concurrent.futures import Executor
from contextlib import aclosing
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, ClassVar, NamedTuple, TypeVar

import zmq

from pylm.errors import PylmError

__all__ = [
    "RETRY_FACTOR",
    "RETRY_FLOOR",
    "SEND_SLICE",
    "Body",
    "Books",
    "Follow",
    "Job",
    "JobResult",
    "Outcome",
    "RetryBudget",
    "Stop",
    "Stream",
    "Turn",
    "Window",
    "WindowedClient",
    "check_messages",
    "in_thread",
    "job_results",
    "values",
    "wait_async",
]

T = TypeVar("T")

# s a client sends for before it reads what came back: a slow payload
# source must not keep results unread and deadlines unchecked.
SEND_SLICE = 0.05

# A job seems lost after RETRY_FLOOR s, or RETRY_FACTOR times the longest
# recent answer time if longer (see the module's doc).
RETRY_FLOOR = 0.5
RETRY_FACTOR = 4.0


class Stop(IntEnum):
    """What ended a client's turn to send (the value of its ``send``)."""

    SLICED = 0  # its time slice: more may go at once, after reading answers
    FULL = 1  # no room in the window
    BLOCKED = 2  # the socket is full: wait for it (the client polls for room)
    DONE = 3  # no more payloads


# One outcome: (job index, value, error, whether the job is over). A
# streaming job's items are not over; an END that ends one has no value.
Outcome = tuple[int, bytes | None, PylmError | None, bool]

# What a client keeps of a job to send it again: its payload, or the frames
# of its request (the window does not look inside).
Body = bytes | list[bytes]


class Job:
    """One job out: its payload's position in the client's iterable, when
    it times out (``time.monotonic()``: its first sending plus the timeout),
    when it was last sent, and what its client needs to send it again (None
    once it cannot be: its stream has begun). How many times it
    was sent is in the client's :class:`Books`. Four fields: one is made
    per job, on the client's hot path."""

    __slots__ = ("body", "deadline", "index", "sent")

    def __init__(self, index: int, deadline: float, sent: float, body: Body | None) -> None:
        self.index = index
        self.deadline = deadline
        self.sent = sent
        self.body = body


class Stream(Job):
    """A job that gives several results (a Hub's) once its first item or
    END came: the items in so far and how many its END announced."""

    __slots__ = ("announced", "items")

    def __init__(self, job: Job) -> None:
        super().__init__(job.index, job.deadline, job.sent, None)
        self.items = 0
        self.announced: int | None = None


class RetryBudget:
    """How many jobs a client may send again: a token per job sent again;
    ``ratio`` of a token earned per job answered and ``per_second`` tokens
    a second, at most ``burst`` kept (gRPC's retry throttling, in spirit),
    so that a sick cluster is not flooded with copies."""

    __slots__ = ("_at", "burst", "per_second", "ratio", "tokens")

    def __init__(self, burst: float, ratio: float = 0.1, per_second: float = 5.0) -> None:
        self.burst = burst
        self.ratio = ratio
        self.per_second = per_second
        self.tokens = burst
        self._at = time.monotonic()

    def earn(self, answered: int) -> None:
        """``answered`` jobs got their answer."""
        self.tokens = min(self.burst, self.tokens + answered * self.ratio)

    def spend(self, now: float) -> bool:
        """Take a token, if there is one once the time's share is in."""
        tokens = min(self.burst, self.tokens + (now - self._at) * self.per_second)
        self._at = now
        if tokens < 1:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1
        return True


_RESENT_KEPT = 1 << 16  # ids of jobs sent again remembered, to name their copies


class Books:
    """What a client keeps across its runs of jobs: its retry budget (None:
    jobs are never sent again), the ids of the jobs it sent again (bounded:
    an answer to one that is no longer out is a duplicate), and the counts."""

    __slots__ = ("budget", "duplicates", "refused", "resent", "retried", "slow")

    def __init__(self, budget: RetryBudget | None) -> None:
        self.budget = budget
        self.slow = 0.0  # the longest recent answer time, s, decaying
        self.resent: OrderedDict[int, int] = OrderedDict()  # id -> times sent again
        self.retried = 0  # jobs sent again
        self.refused = 0  # times the budget had no token for a job that seemed lost
        self.duplicates = 0  # later copies of answers, dropped

    def unknown(self, msg_id: int) -> bool:
        """An answer to no job out: True (and counted) if it is a copy of a
        job sent again."""
        if msg_id in self.resent:
            self.duplicates += 1
            return True
        return False

    def took(self, seconds: float, pull: float = 1 / 64) -> None:
        """An answer took ``seconds``: the longest recent answer time rises
        to it at once, and falls towards it by ``pull`` of the gap."""
        slow = self.slow
        self.slow = seconds if seconds > slow else slow + (seconds - slow) * pull

    def grace(self) -> float:
        """How long a call or job waits for its answer before it seems lost."""
        return max(RETRY_FLOOR, RETRY_FACTOR * self.slow)

    def send_again(self, msg_id: int, send: Callable[[], T | None]) -> T | None:
        """A call that seems lost: ``send`` it again if the budget has a
        token (counted as refused otherwise). ``send`` returns where it went,
        or None if no instance had room (it waits another grace); so does this."""
        assert self.budget is not None
        if not self.budget.spend(time.monotonic()):
            self.refused += 1
            return None
        went = send()
        if went is not None:
            self.retried += 1
            self.note_resent(msg_id)
        return went

    def note_resent(self, msg_id: int) -> None:
        resent = self.resent
        resent[msg_id] = resent.get(msg_id, 0) + 1
        if len(resent) > _RESENT_KEPT:
            resent.popitem(last=False)

    def attempts(self, msg_id: int) -> int:
        """How many times job or call ``msg_id`` was sent."""
        return 1 + self.resent.get(msg_id, 0)


class Window:
    """At most ``size`` jobs out at once, each ending with an answer or,
    after ``timeout`` seconds without one, with the error
    ``timed_out(index, together, attempts)`` gives (``together``: the jobs
    that timed out at once). Jobs that seem lost are sent again as the
    ``books`` allow. One per run of a client's jobs."""

    __slots__ = (
        "_answered",
        "_count",
        "_earliest",
        "_retry_check",
        "_sent",
        "_timed_out",
        "_took",
        "again",
        "books",
        "jobs",
        "size",
        "timeout",
    )

    def __init__(
        self,
        size: int,
        timeout: float,
        timed_out: Callable[[int, int, int], PylmError],
        books: Books | None = None,
    ) -> None:
        # message id -> job, in the order they were last sent (a job sent
        # again is moved to the end), but that a flowing stream is too
        self.jobs: OrderedDict[int, Job] = OrderedDict()
        self.size = size
        self.timeout = timeout
        self._timed_out = timed_out
        self.books = books if books is not None else Books(None)
        self._sent = 0  # jobs sent so far: the next one's index
        # Jobs to send again: the client's send sends them before new ones,
        # then calls resent().
        self.again: list[tuple[int, Job]] = []
        self._answered = -math.inf  # the latest sending time of a job answered
        self._earliest = math.inf  # the earliest deadline of a job moved to the end
        # Answers since the books were last settled: how many, the longest time one took.
        self._count = 0
        self._took = 0.0
        # When run() looks for jobs that seem lost next (a lower bound: the
        # oldest job only gets younger as answers come).
        self._retry_check = -math.inf

    def add(self, ids: Sequence[int], bodies: Sequence[Body], now: float) -> None:
        """Jobs just taken at ``now``, as messages ``ids``, in payload order,
        with what their client needs to send each again (``bodies``, as many)."""
        jobs, index, deadline = self.jobs, self._sent, now + self.timeout
        for position, msg_id in enumerate(ids):  # zip() would cost 0.2 us a message
            jobs[msg_id] = Job(index + position, deadline, now, bodies[position])
        self._sent = index + len(ids)

    def add_one(self, msg_id: int, body: Body, now: float) -> None:
        """:meth:`add` for a message of one job, the common case, faster."""
        index = self._sent
        self.jobs[msg_id] = Job(index, now + self.timeout, now, body)
        self._sent = index + 1

    def answered(self, job: Job, now: float, count: int) -> None:
        """``count`` jobs were answered by ``now``, ``job`` the last of them:
        the path works for the jobs sent before it, and answers take this
        long. Called once per answers read together: kept cheap, the books
        are settled when they are read (:meth:`grace`)."""
        sent = job.sent
        if sent > self._answered:
            self._answered = sent
        if now - sent > self._took:
            self._took = now - sent
        self._count += count

    def grace(self) -> float:
        """How long a job waits for its answer before it seems lost (the
        answers since last asked are counted in first)."""
        books = self.books
        if self._count:
            books.took(self._took, 1 / 4)
            if books.budget is not None:
                books.budget.earn(self._count)
            self._count, self._took = 0, 0.0
        return books.grace()

    def retry_at(self) -> float:
        """When the oldest job will seem lost (inf: not before an answer)."""
        if self.books.budget is None or not self.jobs:
            return math.inf
        job = next(iter(self.jobs.values()))
        if job.deadline - self.timeout < self._answered:  # sent first before that one
            return job.sent + self.grace()
        return math.inf

    def overdue(self, now: float) -> None:
        """Take the jobs that seem lost into :attr:`again`, as many as the
        budget allows; the others wait another grace (counted as refused)."""
        budget = self.books.budget
        if budget is None:
            return
        grace, jobs = self.grace(), self.jobs
        answered = self._answered + self.timeout  # deadlines of jobs sent first before that
        due: list[tuple[int, Job]] = []
        for msg_id, job in jobs.items():
            if now - job.sent <= grace or job.deadline >= answered:
                break
            if job.body is not None:  # else a stream that has begun: it waits
                due.append((msg_id, job))
        for msg_id, job in due:
            jobs.move_to_end(msg_id)
            job.sent = now  # not due again before another grace
            if job.deadline < self._earliest:
                self._earliest = job.deadline
            if budget.spend(now):
                self.again.append((msg_id, job))
            else:
                self.books.refused += 1

    def resent(self, ids: Iterable[int], now: float) -> None:
        """Jobs of :attr:`again` just sent again at ``now``."""
        jobs, books = self.jobs, self.books
        for msg_id in ids:
            job = jobs.get(msg_id)
            if job is not None:
                job.sent = now
                books.retried += 1
                books.note_resent(msg_id)

    def flowing(self, msg_id: int, job: Job) -> None:
        """An item of streaming job ``msg_id`` came: a stream lives while it
        flows, and is not sent again."""
        job.deadline = time.monotonic() + self.timeout
        job.body = None
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
        jobs, resent = self.jobs, self.books.resent
        expired = [(msg_id, job) for msg_id, job in jobs.items() if job.deadline <= now]
        for msg_id, _ in expired:
            del jobs[msg_id]
        self._earliest = min(
            (job.deadline for msg_id, job in jobs.items() if job.body is None or msg_id in resent),
            default=math.inf,
        )
        if self.again:
            self.again = [(msg_id, job) for msg_id, job in self.again if msg_id in jobs]
        together, timed_out, attempts = len(expired), self._timed_out, self.books.attempts
        return [
            (job.index, None, timed_out(job.index, together, attempts(msg_id)), True)
            for msg_id, job in expired
        ]

    def run(
        self,
        send: Callable[[int, float], Stop],
        wait: Callable[[int], Iterable[Outcome]],
        finished: Callable[[], None],
        follow: Follow | None = None,
    ) -> Generator[Outcome, None, None]:
        """The outcomes of the jobs a client sends, as they come, until
        ``send`` has no more and every job out has its outcome.

        ``send(room, until)`` sends up to ``room`` jobs, recording them with
        :meth:`add`, until the clock (``time.monotonic()``) passes ``until``;
        it says what stopped it (a :class:`Stop`). ``wait(ms)`` waits up to ``ms``
        milliseconds for answers (and, after BLOCKED, for room on the
        socket) and gives the outcomes of those that came. ``finished()``
        is called when the run ends, however it ends. ``follow`` is applied
        before a turn when it is needed."""
        try:
            while True:
                if follow is not None and follow.needed():
                    follow.apply()
                turn = self._turn(send, follow)
                if turn is None:
                    return
                if isinstance(turn, list):
                    yield from turn
                else:
                    yield from wait(turn)
        finally:
            finished()

    async def run_async(
        self,
        send: Callable[[int, float], Stop],
        wait: Callable[[int], Awaitable[Iterable[Outcome]]],
        finished: Callable[[], None],
        follow: Follow | None = None,
        threads: Executor | None = None,
    ) -> AsyncGenerator[Outcome, None]:
        """:meth:`run` for an asyncio client: ``wait(ms)`` is awaited, and
        ``follow`` applied in a thread of ``threads`` (see :func:`in_thread`)."""
        try:
            while True:
                if follow is not None and follow.needed():
                    await in_thread(follow.apply, threads)
                turn = self._turn(send, follow)
                if turn is None:
                    return
                if isinstance(turn, list):
                    for outcome in turn:
                        yield outcome
                else:
                    for outcome in await wait(turn):
                        yield outcome
        finally:
            finished()

    def _turn(
        self, send: Callable[[int, float], Stop], follow: Follow | None
    ) -> list[Outcome] | int | None:
        """One turn of a run: send what there is room for, then say what
        comes next: None, the run is over; the outcomes of jobs that timed
        out (then another turn); or how many ms to wait for answers (0:
        another turn at once, ``follow`` first when it is needed)."""
        jobs, clock = self.jobs, time.monotonic
        while True:
            stop = send(self.size - len(jobs), clock() + SEND_SLICE)
            if stop is Stop.DONE and not jobs:
                return None
            now = clock()
            if not jobs:
                return 0 if stop is Stop.SLICED else max(1, int(self.timeout * 1000))
            wake = next(iter(jobs.values())).deadline
            if self._earliest < wake:
                wake = self._earliest
            if wake <= now:
                return self.expire(now)
            if now >= self._retry_check:
                retry = self.retry_at()
                if retry <= now:
                    self.overdue(now)
                    if self.again:
                        if follow is not None and follow.needed():
                            return 0  # the registry changed: followed before they go
                        continue  # sent again before anything new
                    retry = self.retry_at()  # those refused wait another grace
                if retry == math.inf and self.books.budget is not None:
                    retry = now + RETRY_FLOOR  # no answer to go by yet: look again
                self._retry_check = retry
            if self._retry_check < wake:
                wake = self._retry_check
            return 0 if stop is Stop.SLICED else max(1, int((wake - now) * 1000))


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
Polled = Callable[[], list[tuple[zmq.Socket, int]]]


class Follow(NamedTuple):
    """What a client does between the turns of a run when the registry
    changed the servers it sends to or reads from: ``needed()`` says so at
    once; ``apply()`` follows, and may wait on a peer (a new last stage
    greeted), so an asyncio run does it in a thread."""

    needed: Callable[[], bool]
    apply: Callable[[], None]


class Turn(NamedTuple):
    """What a client readies for a run of jobs (see :meth:`Window.run`):
    its ``send``, its ``wait``, the sockets ``wait`` polls now, each with
    the events it polls for (an asyncio client awaits their ``zmq.FD``,
    then calls ``wait(0)``), and what it follows between turns, if
    anything."""

    send: Send
    wait: Wait
    polled: Polled
    follow: Follow | None = None


async def in_thread(work: Callable[[], T], threads: Executor | None = None) -> T:
    """``work()`` in a thread of ``threads`` (None: the event loop's
    default executor), awaited. Cancelled, it still waits for the thread to
    end (so that the client ``work`` uses is given to no other run
    meanwhile), then raises :class:`asyncio.CancelledError`."""
    doing = asyncio.get_running_loop().run_in_executor(threads, work)
    try:
        return await asyncio.shield(doing)
    except asyncio.CancelledError:
        while not doing.done():
            try:
                await asyncio.wait([doing])
            except asyncio.CancelledError:
                continue
        raise


async def wait_async(turn: Turn, ms: int) -> Iterable[Outcome]:
    """``turn.wait(ms)`` without blocking the event loop: what came already,
    or else what comes once a socket of ``turn.polled()`` signals, or ``ms``
    pass (the signal may be for no answer: the run takes another turn).

    A ZeroMQ socket's FD signals a change of its events only after they
    were read, and ``turn.wait(0)`` reads them but returns nothing when a
    socket is only ready to send: the events are read once more with the
    readers set, so that readiness seen then is not waited for."""
    outcomes = turn.wait(0)
    if ms <= 0 or outcomes:
        await asyncio.sleep(0)  # the loop's other tasks run between turns
        return outcomes
    loop = asyncio.get_running_loop()
    woken = loop.create_future()

    def wake() -> None:
        if not woken.done():
            woken.set_result(None)

    polled = turn.polled()
    fds = [socket.fileno() for socket, _ in polled]
    for fd in fds:
        loop.add_reader(fd, wake)
    if any(int(socket.getsockopt(zmq.EVENTS)) & events for socket, events in polled):
        wake()
    timer = loop.call_later(ms / 1000, wake)
    try:
        await woken
    finally:
        timer.cancel()
        for fd in fds:
            loop.remove_reader(fd)
    return turn.wait(0)


class WindowedClient:
    """``job()`` and ``results()`` of a client whose jobs go out through a
    :class:`Window`, one run at a time. The client readies a run in
    :meth:`_open`, which returns its :class:`Turn`; the rest of a run is the
    same for every client, blocking (:meth:`_run`) or asyncio
    (:meth:`_run_async`)."""

    max_in_flight: int
    books: Books  # the retry budget and counts, across runs
    _running: bool
    _kind: ClassVar[str]  # the client's class, as its errors name it

    if TYPE_CHECKING:  # given by pylm.calls.Caller, a base of every client

        def _timeout_of(self, timeout: float | None) -> float: ...

        def _job_timeout(
            self, function: str, timeout: float
        ) -> Callable[[int, int, int], PylmError]: ...

    def _init_window(self, max_in_flight: int, retry: bool) -> None:
        """At most ``max_in_flight`` jobs out at once (a positive int); jobs
        that seem lost sent again if ``retry``: the budget keeps three
        windows' worth of tokens (a window lost, and lost again while the
        instance that froze is still in its senders' rotation); no run
        started."""
        if (
            isinstance(max_in_flight, bool)
            or not isinstance(max_in_flight, int)
            or max_in_flight < 1
        ):
            raise ValueError(f"max_in_flight must be a positive int, got {max_in_flight!r}")
        if not isinstance(retry, bool):
            raise TypeError(f"retry must be True or False, got {retry!r}")
        self.max_in_flight = max_in_flight
        self.books = Books(RetryBudget(max(10, 3 * max_in_flight)) if retry else None)
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
        window, turn = self._begin(function, payloads, timeout, self._open)
        return window.run(turn.send, turn.wait, self._finished, turn.follow)

    async def _run_async(
        self,
        function: str,
        payloads: Iterator[bytes],
        timeout: float,
        threads: Executor | None = None,
    ) -> AsyncGenerator[Outcome, None]:
        """:meth:`_run` on an event loop: readied in a thread of ``threads``
        when readying may wait on a peer (:meth:`_opens_at_once`), then run
        without blocking the loop (the payloads are taken from ``payloads``
        on it; what may wait on a peer meanwhile runs in ``threads`` too)."""
        if self._opens_at_once():
            window, turn = self._begin(function, payloads, timeout, self._open)
        else:
            opened: list[tuple[Window, Turn]] = []

            def begin() -> tuple[Window, Turn]:
                opened.append(self._begin(function, payloads, timeout, self._open))
                return opened[0]

            try:
                window, turn = await in_thread(begin, threads)
            except asyncio.CancelledError:
                if opened:  # readied, never run: the run is finished at once
                    self._finished()
                raise
        run = window.run_async(
            turn.send, lambda ms: wait_async(turn, ms), self._finished, turn.follow, threads
        )
        async with aclosing(run):  # closed with this one: the run is finished at once
            async for outcome in run:
                yield outcome

    def _begin(
        self,
        function: str,
        payloads: Iterator[bytes],
        timeout: float,
        open_: Callable[[str, Iterator[bytes], float, Window], Turn],
    ) -> tuple[Window, Turn]:
        if self._running:
            raise RuntimeError(f"this {self._kind} is already running jobs; use one per thread")
        self._running = True
        try:  # until the window's run begins, which ends with self._finished
            window = Window(
                self.max_in_flight, timeout, self._job_timeout(function, timeout), self.books
            )
            return window, open_(function, payloads, timeout, window)
        except BaseException:
            self._running = False
            raise

    def _open(
        self, function: str, payloads: Iterator[bytes], timeout: float, window: Window
    ) -> Turn:
        """Ready a run of jobs of ``function``: its :class:`Turn`."""
        raise NotImplementedError

    def _opens_at_once(self) -> bool:
        """Whether :meth:`_open` returns at once now (it waits on no peer)."""
        return False

    def _finished(self) -> None:
        self._running = False
