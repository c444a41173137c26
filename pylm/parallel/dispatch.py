"""Handing jobs to workers and taking their results: what a
:class:`~pylm.parallel.Master` and a :class:`~pylm.parallel.Hub` share.

The books: every job waiting for a worker or held by one is in ``_jobs``
under a number of the dispatcher's own (the message id workers see) until
its final answer is in. Workers say hello with their *slots*; ``_free`` has
one entry per free slot, oldest first, and a job goes only to a free slot,
so a slow worker holds no more jobs than its slots. A worker silent for
``heartbeat * misses`` seconds is declared dead and its jobs go back to the
front of the queue. The first final answer of a job closes it; any later one
is a duplicate and dropped, and so is a streamed item whose number is not
the next one expected.

Jobs come in two shapes. A *single* job (no scatter, an input that is not a
stream item) has one answer, passed on as it is, or, for a streaming
function, its items (flagged MORE) and an END carrying their count. A job of
a *parent* (an input that ``scatter`` split, or the items of an input stream
from an earlier stage) has parts; their results go through ``gather`` and on
as items flagged MORE, and once every part is answered (and, for an input
stream, its END has come with every item it announced) an END carrying the
number of items closes the parent.

A :class:`Dispatcher` is an object its owner (a Master or a Hub) builds
with what it needs of it: how answers leave (``send``, ``send_fast``), the
owner's counting, log and error shaping, and the user's hooks. The owner
holds the sockets; :class:`Dispatching` is what both owners show of their
dispatcher to their users (the hooks ``scatter`` and ``gather``, the books
read-only).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

import zmq

from pylm import protocol
from pylm.errors import ProtocolError, PylmError, RemoteError
from pylm.logs import LogLimited
from pylm.parallel.hello import MAX_SLOTS, parse_hello
from pylm.protocol import (
    BATCH_BYTES,
    BATCH_JOBS,
    BATCH_PREFIX,
    COUNT,
    HEAD_SIZE,
    LEAD,
    REPLY_LEAD,
    REPLY_PREFIX,
    read_id,
    with_id,
)
from pylm.transport import copied, recv_message

if TYPE_CHECKING:
    from pylm.telemetry.counting import ServerStats

__all__ = [
    "DEFAULT_HEARTBEAT",
    "DEFAULT_MAX_QUEUED",
    "DEFAULT_MISSES",
    "MAX_SLOTS",  # declared in pylm.parallel.hello; still importable from here, as before
    "MAX_STREAMS",
    "MAX_WORKERS",
    "STREAM_IDLE",
    "Dispatcher",
    "Dispatching",
    "Gathering",
    "Send",
    "SendFast",
]

DEFAULT_HEARTBEAT = 1.0  # s between a worker's heartbeats
DEFAULT_MISSES = 3  # heartbeats missed before a worker is declared dead
DEFAULT_MAX_QUEUED = 10_000  # jobs waiting for a worker, at most
STREAM_IDLE = 600.0  # s an input stream may go without news before it is dropped
MAX_STREAMS = 10_000  # input streams (items from an earlier stage) open at once
MAX_WORKERS = 10_000  # workers a master or hub takes at once

_BATCH = 256  # messages read in a row before looking at the other socket
_WORKER_LINES = 20  # lines a second at most about workers joining, and leaving


def _as_bytes(value: object, hook: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{hook} gave {type(value).__name__}, expected bytes")


class Gathering:
    """What :meth:`Dispatching.gather` may want to know of the result it is
    given, as ``self.gathering``: the ``job`` it belongs to (a number unique
    in this server) and whether it is the ``last`` result of that job."""

    __slots__ = ("job", "last")

    def __init__(self) -> None:
        self.job = 0
        self.last = False


class _Parent:
    """An input whose parts are jobs: scattered, or a stream's items."""

    __slots__ = (
        "deadline", "expected", "failed", "held", "inputs", "msg_id", "number", "open",
        "origin", "outputs", "touched",
    )  # fmt: skip

    def __init__(self, origin: bytes, msg_id: int, deadline: float, number: int) -> None:
        self.origin = origin  # where answers go: a client's routing id, or a route
        self.msg_id = msg_id
        self.deadline = deadline
        self.number = number
        self.open = 0  # parts without their final answer yet
        self.inputs = 0  # inputs split into parts so far
        self.expected: int | None = None  # inputs in all; known at once, or from an END
        self.outputs = 0  # items sent on
        self.failed = False
        self.held: bytes | None = None  # the latest result, kept back for gather()
        self.touched = 0.0  # when an input stream last gave something

    @property
    def done(self) -> bool:
        return self.open == 0 and self.expected is not None and self.inputs >= self.expected


class _Job:
    """A job on the books, given to a worker or waiting for one."""

    __slots__ = ("body", "deadline", "msg_id", "next_seq", "origin", "parent")

    def __init__(
        self,
        origin: bytes,
        msg_id: int,
        deadline: float,
        body: list[bytes],
        parent: _Parent | None,
    ) -> None:
        self.origin = origin
        self.msg_id = msg_id
        self.deadline = deadline
        self.body = body  # the frames a worker gets, with the job's number as id
        self.parent = parent
        self.next_seq = 0  # the number of the next streamed item to pass on


class _Worker:
    """A worker as the dispatcher sees it."""

    __slots__ = ("address", "free", "generation", "jobs", "leaving", "name", "seen", "slots")

    def __init__(self, address: bytes, name: str, slots: int, generation: int) -> None:
        self.address = address  # routing id of the worker's job socket
        self.name = name
        self.slots = slots
        self.free = 0  # slots the dispatcher may fill
        self.jobs: set[int] = set()  # numbers of the jobs it holds
        self.seen = time.monotonic()
        self.leaving = False
        self.generation = generation


class SendFast(Protocol):
    """Sends on the one-frame final REPLY ``body`` a worker gave a single
    job (its head carries the job's number: the owner puts ``msg_id`` back)."""

    def __call__(self, origin: bytes, msg_id: int, deadline: float, body: bytes) -> None: ...


class Send(Protocol):
    """Sends on an answer (REPLY, ERROR or END, by ``kind``) of the input
    ``msg_id`` that came from ``origin``."""

    def __call__(
        self, origin: bytes, msg_id: int, deadline: float, kind: int, payload: bytes, flags: int
    ) -> None: ...


Hook = Callable[[bytes], Iterable[bytes]]  # scatter or gather


def _identity(message: bytes) -> Iterable[bytes]:
    return (message,)


def _never(body: bytes) -> bool:
    return False


class Dispatcher:
    """The books of the jobs a Master or a Hub hands to workers (see the
    module). Its owner opens the workers' socket (a ROUTER) and sets
    :attr:`socket`, feeds jobs in with :meth:`take_fast`, :meth:`take` and
    :meth:`take_end`, has it read the socket with :meth:`drain`, and calls
    :meth:`dispatch` and :meth:`check_workers` from its loop. Answers leave
    through the owner's ``send`` and ``send_fast``; ``finished`` is called
    once per input whose last answer is out (the owner counts it served).
    ``drop``, ``log`` and ``remote_error`` are the owner's counting of
    malformed messages, rate-limited log and error shaping; ``is_control``
    tells its wake-up token on the workers' socket. ``scatter`` and
    ``gather`` are the owner's hooks, None when not overridden.
    """

    def __init__(
        self,
        name: str,
        *,
        send: Send,
        send_fast: SendFast,
        finished: Callable[[], None],
        drop: Callable[[str, str, list[bytes]], None],
        log: LogLimited,
        remote_error: Callable[[bytes, Exception], RemoteError],
        is_control: Callable[[bytes], bool] = _never,
        scatter: Hook | None = None,
        gather: Hook | None = None,
        stats: ServerStats | None = None,
        heartbeat: float = DEFAULT_HEARTBEAT,
        misses: int = DEFAULT_MISSES,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> None:
        if isinstance(heartbeat, bool) or not isinstance(heartbeat, (int, float)):
            raise ValueError(f"heartbeat must be a positive number of seconds, got {heartbeat!r}")
        if not heartbeat > 0:
            raise ValueError(f"heartbeat must be a positive number of seconds, got {heartbeat!r}")
        if not isinstance(misses, int) or misses < 1:
            raise ValueError(f"misses must be a positive int, got {misses!r}")
        if not isinstance(max_queued, int) or max_queued < 1:
            raise ValueError(f"max_queued must be a positive int, got {max_queued!r}")
        self.name = name
        self._send = send
        self._send_fast = send_fast
        self._finished = finished
        self._drop = drop
        self._log_limited = log
        self._remote_error = remote_error
        self._is_control = is_control
        self._scatter = scatter or _identity
        self._gather_hook = gather or _identity
        self.heartbeat = float(heartbeat)
        self.worker_timeout = self.heartbeat * misses
        self.max_queued = max_queued
        self.gathering = Gathering()
        self.socket: zmq.Socket | None = None  # the workers' ROUTER, while open
        self._workers: dict[bytes, _Worker] = {}
        self._free: deque[tuple[_Worker, int]] = deque()  # one entry per free slot
        self._stale = 0  # entries of _free that are void (their worker left or is full)
        self._queue: deque[int] = deque()  # numbers of the jobs waiting for a worker
        self._jobs: dict[int, _Job] = {}
        self._streams: dict[tuple[bytes, int], _Parent] = {}  # input streams under way
        self._generations = 0
        self._splits = scatter is not None
        self._gathers = gather is not None
        self.direct = not (self._splits or self._gathers)  # single jobs, no hooks
        # Job numbers start anywhere: a restarted master on the same address
        # does not take an answer to its predecessor's job for one of its own.
        self._numbers = int.from_bytes(os.urandom(7), "big")
        self.redispatched = 0  # jobs given to another worker after theirs was lost
        self.duplicates = 0  # answers dropped because their job was answered already
        self.undeliverable = 0  # answers whose receiver had gone (counted by the owner)
        if stats is not None:
            stats.dispatcher = self  # exported with the server's metrics

    # ------------------------------------------------------------------ state

    @property
    def workers(self) -> int:
        """Workers connected now."""
        return len(self._workers)

    @property
    def queued(self) -> int:
        """Jobs waiting for a worker."""
        return len(self._queue)

    @property
    def running_jobs(self) -> int:
        """Jobs a worker holds."""
        return len(self._jobs) - len(self._queue)

    @property
    def full(self) -> bool:
        """Whether the queue holds ``max_queued`` jobs: take no more input."""
        return len(self._queue) >= self.max_queued

    @property
    def open_jobs(self) -> int:
        """Jobs on the books: waiting for a worker or held by one."""
        return len(self._jobs)

    @property
    def open_streams(self) -> int:
        """Input streams under way (their END or items still to come)."""
        return len(self._streams)

    # ------------------------------------------------------------------ jobs in

    def take_fast(self, origin: bytes, msg_id: int, deadline: float, frames: list[bytes]) -> None:
        """Book a single job: ``frames`` are its REQUEST, whose message id
        the job's number replaces (the worker answers that number)."""
        self._numbers += 1
        number = self._numbers
        body = [with_id(frames[0], number), *frames[1:]]
        self._jobs[number] = _Job(origin, msg_id, deadline, body, None)
        self._queue.append(number)

    def take(self, origin: bytes, message: protocol.Message) -> None:
        """Book a REQUEST: a single job, or the parts of a parent. An item
        of a stream without a route (a tee's copy) is a job of its own:
        nobody counts its stream."""
        stream_item = bool(message.flags & protocol.MORE) and bool(origin)
        if self.direct and not stream_item:
            body = protocol.encode(
                protocol.REQUEST, 0, message.payload, message.target, b"", message.deadline
            )
            self.take_fast(origin, message.msg_id, message.deadline, body)
            return
        if stream_item:
            found = self._stream(origin, message.msg_id, message.deadline)
            if found is None:
                return
            parent = found
        else:
            self._numbers += 1
            parent = _Parent(origin, message.msg_id, message.deadline, self._numbers)
            parent.expected = 1
        parent.inputs += 1
        if parent.failed:
            self._close_if_done(parent)
            return
        try:
            parts = [_as_bytes(part, "scatter") for part in self._scatter(message.payload)]
        except Exception as exc:  # the user's hook failed: the client hears of it
            self._fail_parent(parent, self._remote_error(message.target + b"/scatter", exc))
            self._close_if_done(parent)
            return
        for part in parts:
            self._numbers += 1
            number = self._numbers
            frames = protocol.encode(
                protocol.REQUEST, number, part, message.target, b"", message.deadline
            )
            self._jobs[number] = _Job(origin, message.msg_id, message.deadline, frames, parent)
            self._queue.append(number)
            parent.open += 1
        self._close_if_done(parent)

    def take_end(self, origin: bytes, message: protocol.Message) -> None:
        """An input stream's END: it announced that many items. A count of
        the wrong size is counted as malformed with or without a route (as
        a chained stage does); only a routed stream fails and is told."""
        if len(message.payload) not in (0, COUNT.size):
            problem = ProtocolError(
                f"an END's count is 8 bytes (or none), got {len(message.payload)}:"
                f" stream {message.msg_id} fails"
            )
            self._drop("payload", str(problem), [message.payload])
            if not origin:
                return  # a tee's copy: no stream here, nobody to tell
            self.stream_failed(origin, message.msg_id)
            payload = protocol.error_detail(problem)
            self._send(origin, message.msg_id, message.deadline, protocol.ERROR, payload, 0)
            return
        if not origin:
            return  # a tee's copy: nobody waits for its end
        count = COUNT.unpack(message.payload)[0] if message.payload else 0
        parent = self._stream(origin, message.msg_id, message.deadline)
        if parent is not None:
            parent.expected = count
            self._close_if_done(parent)

    def _stream(self, origin: bytes, msg_id: int, deadline: float) -> _Parent | None:
        """The input stream ``msg_id`` from ``origin``; None when it is new
        and MAX_STREAMS are open (its client then gets an ERROR)."""
        key = (origin, msg_id)
        parent = self._streams.get(key)
        if parent is None:
            if len(self._streams) >= MAX_STREAMS:
                problem = ProtocolError(
                    f"{self.name!r} has {MAX_STREAMS} input streams open, the most it takes:"
                    " stream refused"
                )
                self._drop("limit", str(problem), [])
                self._send(
                    origin, msg_id, deadline, protocol.ERROR, protocol.error_detail(problem), 0
                )
                return None
            self._numbers += 1
            parent = self._streams[key] = _Parent(origin, msg_id, deadline, self._numbers)
        parent.touched = time.monotonic()
        return parent

    def stream_failed(self, origin: bytes, msg_id: int) -> None:
        """An ERROR for an input stream: it ends there (later items are dropped)."""
        parent = self._streams.pop((origin, msg_id), None)
        if parent is not None:
            parent.failed = True

    def _expire_streams(self, now: float) -> None:
        """Forget input streams idle for STREAM_IDLE seconds (their END or
        items never came: the client has given up long since)."""
        for key, parent in list(self._streams.items()):
            if now - parent.touched > STREAM_IDLE:
                del self._streams[key]
                parent.failed = True
                self._log_limited(
                    "stream-idle",
                    logging.WARNING,
                    "%s: a stream idle for %g s dropped (%d of %s items in)",
                    self.name,
                    STREAM_IDLE,
                    parent.inputs,
                    parent.expected,
                )

    def dispatch(self) -> None:
        """Give waiting jobs to workers with a free slot, oldest job first.
        The one-frame jobs that go to one worker in a row travel together,
        in one BATCH (up to BATCH_JOBS of them and BATCH_BYTES)."""
        queue, free, jobs = self._queue, self._free, self._jobs
        group: list[int] = []  # jobs for ``to``, not sent yet
        to: _Worker | None = None
        filled = 0  # bytes of the group's jobs
        while queue and free:
            worker, generation = free.popleft()
            if worker.generation != generation or worker.free <= 0:
                self._stale = max(0, self._stale - 1)
                continue  # a slot of a worker gone (or gone and back, or full)
            number = queue[0]
            job = jobs.get(number)
            if job is None or (job.parent is not None and job.parent.failed):
                queue.popleft()
                if job is not None:
                    del jobs[number]
                    self._part_closed(job.parent)
                free.appendleft((worker, generation))
                continue
            body = job.body
            size = len(body[0])
            joins = (
                len(body) == 1
                and worker is to
                and len(group) < BATCH_JOBS
                and filled + size <= BATCH_BYTES
            )
            if group and not joins and to is not None:
                # The group goes first; its send may find its worker gone or
                # full, which changes what this slot is worth: look again.
                free.appendleft((worker, generation))
                self._give(to, group)
                group, to, filled = [], None, 0
                continue
            queue.popleft()
            worker.free -= 1
            worker.jobs.add(number)
            if len(body) > 1:
                self._give(worker, [number])  # a job with a payload frame: alone
            elif joins:
                group.append(number)
                filled += size
            else:
                group, to, filled = [number], worker, size
        if group and to is not None:
            self._give(to, group)

    def _give(self, worker: _Worker, numbers: list[int]) -> None:
        """Send ``worker`` the jobs ``numbers`` (one message; a BATCH for
        several), which have its slots; a worker that takes no more now
        gets them back on the queue, and no more until it answers a job."""
        back, jobs = self.socket, self._jobs
        assert back is not None
        if len(numbers) == 1:
            body = jobs[numbers[0]].body
        else:
            body = [protocol.pack_batch([jobs[number].body[0] for number in numbers])]
        try:
            back.send_multipart([worker.address, *body], zmq.NOBLOCK, copy=copied(body))
            return
        except zmq.Again:  # the worker takes no more now (not reading): never wait for it
            gone = False
        except zmq.ZMQError:  # the worker's socket is gone: so is the worker
            gone = True
        worker.jobs.difference_update(numbers)
        for number in reversed(numbers):
            self._queue.appendleft(number)
        if gone:
            self._lost(worker, "its socket is gone")
        else:
            self._stale += worker.free  # its other entries in the free list are void
            worker.free = 0  # until it answers a job

    # ------------------------------------------------------------------ answers

    def drain(self) -> bool:
        """Read the workers' answers, up to a batch (the answers of a BATCH
        one by one); True if stop() asked (a master's stop() wakes it
        through this socket)."""
        back = self.socket
        assert back is not None
        carried: list[bytes] = []  # the rest of a BATCH of answers being read
        sender = b""  # the worker whose BATCH it is
        reads = 0
        while True:
            if carried:
                body = carried.pop()
                frames = [sender, body]
            else:
                if reads == _BATCH:
                    return False
                try:
                    frames = recv_message(back)
                except zmq.Again:
                    return False
                reads += 1
                if len(frames) < 2:
                    continue
                sender, body = frames[0], frames[1]
                if not body and self._is_control(frames[-1]):  # stop()'s [b"", token]
                    return True
                if body[LEAD] == BATCH_PREFIX and len(frames) == 2:
                    try:
                        carried = protocol.unpack_batch(body)[::-1]  # popped: in order
                    except ProtocolError as error:
                        self._drop("head", f"{error} (from worker {sender!r})", frames[1:])
                    continue
            if body[REPLY_LEAD] == REPLY_PREFIX and len(frames) == 2 and len(body) >= HEAD_SIZE:
                # Fast path: a one-frame, final REPLY.
                number = read_id(body)[0]
                job = self._jobs.pop(number, None)
                self._free_slot(sender, number)
                if job is None:
                    self.duplicates += 1
                elif job.parent is None and job.next_seq == 0:
                    self._finished()
                    self._send_fast(job.origin, job.msg_id, job.deadline, body)
                else:
                    self._result(job, body[HEAD_SIZE:], final=True)
                continue
            self._worker_message(sender, frames[1:])

    def _worker_message(self, sender: bytes, frames: list[bytes]) -> None:
        try:
            message = protocol.decode(frames)
        except ProtocolError as error:
            self._drop("head", f"{error} (from worker {sender!r})", frames)
            return
        kind = message.kind
        if kind == protocol.PING:
            self._hello(sender, message)
            return
        number = message.msg_id
        if kind == protocol.REPLY and message.flags & protocol.MORE:
            job = self._jobs.get(number)
            seq = COUNT.unpack(message.route)[0] if len(message.route) == COUNT.size else 0
            if job is None or seq != job.next_seq:
                self.duplicates += 1
                return
            job.next_seq += 1
            self._result(job, message.payload, final=False)
            return
        if kind not in (protocol.REPLY, protocol.ERROR, protocol.END):
            self._drop("kind", f"a worker sent {protocol.KIND_NAMES[kind]}", frames)
            return
        job = self._jobs.pop(number, None)
        self._free_slot(sender, number)
        if job is None:
            self.duplicates += 1
        elif kind == protocol.REPLY:
            if job.parent is None and job.next_seq == 0:
                self._finished()
                self._send(job.origin, job.msg_id, job.deadline, kind, message.payload, 0)
            else:
                self._result(job, message.payload, final=True)
        elif kind == protocol.END:
            if job.parent is None:
                self._finished()
                count = COUNT.pack(job.next_seq)
                self._send(job.origin, job.msg_id, job.deadline, protocol.END, count, 0)
            else:
                self._part_closed(job.parent)
        elif job.parent is None:
            self._finished()
            self._send(job.origin, job.msg_id, job.deadline, protocol.ERROR, message.payload, 0)
        else:
            self._fail_parent(job.parent, message.payload)
            self._part_closed(job.parent)

    def _result(self, job: _Job, result: bytes, *, final: bool) -> None:
        """A result (``final``) or a streamed item of a job that answers in
        items: on, flagged MORE, through gather() for a parent's part."""
        parent = job.parent
        if parent is None:  # a single job whose function streams
            self._send(job.origin, job.msg_id, job.deadline, protocol.REPLY, result, protocol.MORE)
            return
        if self._gathers:
            # The parent's latest result waits for the next one (or for the
            # parent's end), so that gather() is told which one is the last.
            held, parent.held = parent.held, result
            if held is not None and not parent.failed:
                self._gather(parent, held, last=False)
        elif not parent.failed:
            self._send_item(parent, result)
        if final:
            self._part_closed(parent)

    def _gather(self, parent: _Parent, result: bytes, *, last: bool) -> None:
        self.gathering.job = parent.number
        self.gathering.last = last
        try:
            outputs = [_as_bytes(output, "gather") for output in self._gather_hook(result)]
        except Exception as exc:
            self._fail_parent(parent, self._remote_error(f"{self.name}.gather".encode(), exc))
            return
        for output in outputs:
            self._send_item(parent, output)

    def _send_item(self, parent: _Parent, output: bytes) -> None:
        parent.outputs += 1
        self._send(
            parent.origin, parent.msg_id, parent.deadline, protocol.REPLY, output, protocol.MORE
        )

    def _part_closed(self, parent: _Parent | None) -> None:
        if parent is not None:
            parent.open -= 1
            self._close_if_done(parent)

    def _close_if_done(self, parent: _Parent) -> None:
        if not parent.done:
            return
        self._streams.pop((parent.origin, parent.msg_id), None)
        self._finished()
        held, parent.held = parent.held, None
        if held is not None and not parent.failed:
            self._gather(parent, held, last=True)
        if not parent.failed:
            count = COUNT.pack(parent.outputs)
            self._send(parent.origin, parent.msg_id, parent.deadline, protocol.END, count, 0)

    def _fail_parent(self, parent: _Parent, error: PylmError | bytes) -> None:
        """The first failure of a parent's part goes on; the parent's other
        parts are dropped as they come."""
        if parent.failed:
            return
        parent.failed = True
        payload = error if isinstance(error, bytes) else protocol.error_detail(error)
        self._send(parent.origin, parent.msg_id, parent.deadline, protocol.ERROR, payload, 0)

    # ------------------------------------------------------------------ workers

    def _free_slot(self, sender: bytes, number: int) -> None:
        """The worker ``sender`` answered job ``number``: its slot is free."""
        worker = self._workers.get(sender)
        if worker is not None and number in worker.jobs:
            worker.jobs.discard(number)
            worker.seen = time.monotonic()
            if not worker.leaving:
                worker.free += 1
                self._free.append((worker, worker.generation))

    def _hello(self, sender: bytes, message: protocol.Message) -> None:
        """A worker's hello, leaving notice or goodbye (a PING from its job
        socket), or its heartbeat (from another socket): the route names the
        job socket, the payload is JSON (see :func:`parse_hello`)."""
        try:
            hello = parse_hello(message.payload, message.route)
        except ProtocolError as exc:
            self._drop("hello", f"{exc} (from worker {sender!r})", [message.payload])
            return
        info, slots, free = hello, hello.slots, hello.free
        address = message.route
        worker = self._workers.get(address)
        if sender != address:  # a heartbeat
            if worker is None:  # of a worker not known here: ask for a hello
                assert self.socket is not None
                pong = protocol.encode(protocol.PONG, 0, b'{"known": false}')
                try:  # never waiting for a peer that does not read
                    self.socket.send_multipart([sender, *pong], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # full or gone: its next heartbeat asks again
                return
        elif info.bye:
            if worker is not None:
                self._lost(worker, "it left")
            return
        elif worker is None:
            if len(self._workers) >= MAX_WORKERS:
                self._log_limited(
                    "workers-full",
                    logging.WARNING,
                    "%s: worker %s refused: %d workers are connected, the most a master takes",
                    self.name,
                    info.name,
                    MAX_WORKERS,
                )
                return
            self._generations += 1
            worker = _Worker(address, info.name, slots, self._generations)
            self._workers[address] = worker
            self._log_limited(
                "joined",
                logging.INFO,
                "%s: worker %s joined (%d slots)",
                self.name,
                info.name,
                slots,
                burst=_WORKER_LINES,
            )
        worker.seen = time.monotonic()
        if info.leaving:
            worker.leaving = True
            self._stale += worker.free  # its entries in the free list are void
            worker.free = 0
            return
        if worker.leaving:
            return
        if not worker.jobs and worker.free < free <= worker.slots:
            # Slots not known here (a hello, or after losing track): as the worker says.
            for _ in range(free - worker.free):
                self._free.append((worker, worker.generation))
            worker.free = free

    def _compact(self) -> None:
        """Drop the void entries of the free list once they are half of it:
        workers that come and go (or stop reading) must not grow it, and
        each entry is looked at about once."""
        if self._stale > max(1024, len(self._free) // 2):
            live, kept = [], dict.fromkeys(self._workers.values(), 0)
            for worker, generation in self._free:
                if worker.generation == generation and kept.get(worker, worker.free) < worker.free:
                    kept[worker] += 1
                    live.append((worker, generation))
            self._free.clear()  # in place: _dispatch may hold the deque
            self._free.extend(live)
            self._stale = 0

    def check_workers(self) -> None:
        now = time.monotonic()
        if self._streams:
            self._expire_streams(now)
        for worker in list(self._workers.values()):
            if now - worker.seen > self.worker_timeout:
                self._lost(worker, f"no heartbeat for {now - worker.seen:.1f} s")

    def _lost(self, worker: _Worker, why: str) -> None:
        """Forget ``worker``; its unanswered jobs go to the front of the queue."""
        self._workers.pop(worker.address, None)
        worker.generation = -1  # its entries in the free list are void
        self._stale += worker.free
        worker.free = 0
        self._compact()
        pending = sorted(worker.jobs)
        worker.jobs.clear()
        for number in reversed(pending):
            if number in self._jobs:
                self._queue.appendleft(number)
        self.redispatched += len(pending)
        self._log_limited(
            "lost" if pending else "left",
            logging.WARNING if pending else logging.INFO,
            "%s: worker %s left (%s); %d job(s) go to other workers",
            self.name,
            worker.name,
            why,
            len(pending),
            burst=_WORKER_LINES,
        )


class Dispatching:
    """What a :class:`~pylm.parallel.Master` and a :class:`~pylm.parallel.Hub`
    show of the :class:`Dispatcher` they own (``self.dispatcher``): the
    hooks their users override, and the books, read-only."""

    _pylm_framework = True

    dispatcher: Dispatcher

    def scatter(self, message: bytes) -> Iterable[bytes]:
        """One input into the payloads of the jobs workers run; by default
        the input as it is."""
        return (message,)

    def gather(self, message: bytes) -> Iterable[bytes]:
        """A worker's result into zero or more results to send on; by
        default the result as it is. ``self.gathering`` tells the job the
        result belongs to and whether it is its last."""
        return (message,)

    def _hooks(self) -> tuple[Hook | None, Hook | None]:
        """``scatter`` and ``gather`` for a :class:`Dispatcher`: None unless
        overridden, so that jobs without hooks take the fast path."""
        kind = type(self)
        return (
            self.scatter if kind.scatter is not Dispatching.scatter else None,
            self.gather if kind.gather is not Dispatching.gather else None,
        )

    @property
    def gathering(self) -> Gathering:
        """The job and lastness of the result :meth:`gather` is given."""
        return self.dispatcher.gathering

    @property
    def heartbeat(self) -> float:
        """Seconds between a worker's heartbeats."""
        return self.dispatcher.heartbeat

    @property
    def worker_timeout(self) -> float:
        """Seconds of silence before a worker is declared dead."""
        return self.dispatcher.worker_timeout

    @property
    def max_queued(self) -> int:
        """Jobs waiting for a worker, at most."""
        return self.dispatcher.max_queued

    @property
    def workers(self) -> int:
        """Workers connected now."""
        return self.dispatcher.workers

    @property
    def queued(self) -> int:
        """Jobs waiting for a worker."""
        return self.dispatcher.queued

    @property
    def running_jobs(self) -> int:
        """Jobs a worker holds."""
        return self.dispatcher.running_jobs

    @property
    def full(self) -> bool:
        """Whether the queue holds ``max_queued`` jobs: no more input is read."""
        return self.dispatcher.full

    @property
    def redispatched(self) -> int:
        """Jobs given to another worker after theirs was lost."""
        return self.dispatcher.redispatched

    @property
    def duplicates(self) -> int:
        """Answers dropped because their job was answered already."""
        return self.dispatcher.duplicates

    @property
    def undeliverable(self) -> int:
        """Answers dropped because their receiver had gone."""
        return self.dispatcher.undeliverable
