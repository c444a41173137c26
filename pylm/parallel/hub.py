"""The hub: a stage of a pipeline that hands its jobs to workers.

A hub takes jobs on a PULL socket like any chained stage (the stages before
it name it as their next call, ``'hub.function'``), hands each job to an
idle :class:`~pylm.parallel.Worker` started with the hub's name as its
master, and sends every result on to its next stage, with the job's route,
id and deadline, so the pipeline's last stage answers the client as usual.
It books jobs, beats, re-dispatches and drops duplicates exactly as a
:class:`~pylm.parallel.Master` does (:mod:`pylm.parallel.dispatch`).

A job with one result goes on as one REQUEST. A job with several (a
``scatter``, a streaming worker function) goes on as REQUESTs flagged MORE,
one per result, and an END carrying their count; the stages after pass both
on, and the client counts a job's results against its END. A hub after
another one treats each incoming item as a job of its own and sends its own
END once the earlier END and all its items are through.
"""

from __future__ import annotations

import collections
import logging
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import zmq

from pylm import protocol
from pylm.base import ServerOptions
from pylm.chained.servers import DEFAULT_HWM, Server
from pylm.errors import ProtocolError
from pylm.parallel.dispatch import (
    DEFAULT_HEARTBEAT,
    DEFAULT_MAX_QUEUED,
    DEFAULT_MISSES,
    Dispatcher,
    Dispatching,
)
from pylm.protocol import (
    BATCH_BYTES,
    BATCH_JOBS,
    BATCH_PREFIX,
    FRAME_SLACK,
    HEAD_SIZE,
    LEAD,
    ONE_FRAME_REQUEST,
    read_id_deadline,
    read_sizes,
)
from pylm.transport import check_address, rest_of

if TYPE_CHECKING:
    from typing_extensions import Unpack


__all__ = ["Hub"]

_BATCH = 256
_LEAVE_MAX = 10.0  # s a leaving hub waits at most for its workers' answers


class Hub(Dispatching, Server):
    """A pipeline stage whose jobs run on workers::

        Hub('hub', next_call='last.collect').start()         # names only, registry
        Worker('w1', 'hub').start()                          # as many as you like
        Step1('step1', next_call='hub.work').start()          # feeds the hub

    The arguments are a chained :class:`~pylm.chained.Server`'s (including
    ``tee`` and branches with ``handle_stream``), plus ``workers_address``
    (where workers connect; default a free port) and the master's
    ``heartbeat``, ``misses`` and ``max_queued``. ``scatter`` and
    ``gather`` work as in a :class:`~pylm.parallel.Master`.
    """

    _pylm_framework = True
    kind = "hub"
    serves_concurrently = False  # its workers run its jobs

    def __init__(
        self,
        name: str,
        pull_address: str | None = None,
        next_address: str | Sequence[str] | dict[str, str | Sequence[str]] | None = None,
        next_call: str | Sequence[str] | None = None,
        db_address: str | None = None,
        log_address: str | None = None,
        log_level: int = logging.INFO,
        messages: int = sys.maxsize,
        *,
        workers_address: str | None = None,
        heartbeat: float = DEFAULT_HEARTBEAT,
        misses: int = DEFAULT_MISSES,
        max_queued: int = DEFAULT_MAX_QUEUED,
        tee: str | Sequence[str] | dict[str, str | Sequence[str]] | None = None,
        hwm: int = DEFAULT_HWM,
        **options: Unpack[ServerOptions],
    ) -> None:
        Server.__init__(
            self,
            name,
            pull_address,
            next_address,
            next_call,
            db_address,
            log_address,
            None,
            None,
            log_level,
            messages,
            tee=tee,
            hwm=hwm,
            **options,
        )
        scatter, gather = self._hooks()
        self.dispatcher = Dispatcher(
            name,
            send=self._send,
            send_fast=self._send_fast,
            finished=self._finished,
            drop=self._drop,
            log=self._log_limited,
            remote_error=self._remote_error,
            stats=self.stats,
            heartbeat=heartbeat,
            misses=misses,
            max_queued=max_queued,
            scatter=scatter,
            gather=gather,
        )
        self.workers_address = workers_address and check_address(workers_address, "workers_address")
        self.back: str | None = None  # where workers connect, once bound
        self._reading = True  # whether the input is polled (not while the queue is full)
        # Jobs of a BATCH read while the queue filled up: taken as it frees
        # (the input is not read meanwhile), so the queue keeps its bound.
        self._held: collections.deque[bytes] = collections.deque()
        # Workers' results read in one drain, sent on together (route, id, deadline, result).
        self._together: list[tuple[bytes, int, float, bytes]] = []
        self._filled = 0  # bytes of their results
        self._next_check = 0.0

    # ------------------------------------------------------------------ sockets

    def _open_output(self) -> None:
        back = self._secure(self.context.socket(zmq.ROUTER))
        self.dispatcher.socket = back
        back.setsockopt(zmq.LINGER, 0)
        back.setsockopt(zmq.ROUTER_MANDATORY, 1)
        back.setsockopt(zmq.MAXMSGSIZE, self.max_payload + FRAME_SLACK)
        self.back = self._listen(back, self.workers_address or self._any_port())
        self._poller.register(back, zmq.POLLIN)
        super()._open_output()
        # Wake up a few times a heartbeat, to notice dead workers.
        quarter = max(1, int(self.heartbeat * 250))
        self._poll_timeout = min(quarter, self._poll_timeout or quarter)

    def _endpoints(self) -> dict[str, str]:
        assert self.back is not None
        return {**super()._endpoints(), "workers": self.back}

    def _name_only(self) -> bool:
        return super()._name_only() or self.workers_address is None

    def _outputs(self) -> list[zmq.Socket | None]:
        back, self.dispatcher.socket = self.dispatcher.socket, None
        return [*super()._outputs(), back]

    # ------------------------------------------------------------------ the loop

    def _serve_other(self, socket: zmq.Socket) -> None:
        if socket is self.dispatcher.socket:
            self.dispatcher.drain()
            self._send_together()
        else:
            super()._serve_other(socket)

    def _tick(self) -> None:
        dispatcher = self.dispatcher
        dispatcher.dispatch()
        now = time.monotonic()
        if now >= self._next_check:
            dispatcher.check_workers()
            self._next_check = now + dispatcher.heartbeat / 4
        if self._held and not dispatcher.full:
            self._take_held()
        pull = self._pull
        if pull is not None and self._reading == (
            dispatcher.full or bool(self._held)
        ):  # backpressure
            if self._reading:
                self._poller.unregister(pull)
            else:
                self._poller.register(pull, zmq.POLLIN)
            self._reading = not self._reading

    def _drain(self, pull: zmq.Socket, debug: bool) -> None:
        """Book the jobs waiting on the input, up to a batch or a full queue."""
        dispatcher = self.dispatcher
        received = 0
        self._take_held()
        for _ in range(_BATCH):
            if dispatcher.full or self._held:
                break
            try:
                body = pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            received += 1
            lead = body[LEAD]
            if lead == ONE_FRAME_REQUEST and len(body) >= HEAD_SIZE and dispatcher.direct:
                target_size, route_size = read_sizes(body)
                start = HEAD_SIZE + target_size
                if start + route_size <= len(body):
                    msg_id, deadline = read_id_deadline(body)
                    route = body[start : start + route_size]
                    dispatcher.take_fast(route, msg_id, deadline, [body])
                    continue
            frames = [body, *rest_of(pull)]
            if lead == BATCH_PREFIX:
                self._take_batch(body)
            else:
                self._take_message(frames)
        if self.stats is not None:
            self.stats.received += received
        dispatcher.dispatch()

    def _take_batch(self, body: bytes) -> None:
        try:
            jobs = protocol.unpack_batch(body)
        except ProtocolError as error:
            self._drop("batch", f"{error} (no route back: dropped)", [body])
            return
        self._held.extend(jobs)
        self._take_held()

    def _take_held(self) -> None:
        """Take the jobs of BATCHes read, while the queue has room."""
        held, dispatcher = self._held, self.dispatcher
        while held and not dispatcher.full:
            self._take_message([held.popleft()])

    def _take_message(self, frames: list[bytes]) -> None:
        try:
            message = protocol.decode(frames)
        except ProtocolError as error:
            self._drop("head", f"{error} (no route back: dropped)", frames)
            return
        if message.kind == protocol.REQUEST:
            if len(message.payload) > self.max_payload:
                too_large = self._too_large(message.target, message.payload)
                self._send_error(message.route, message.msg_id, protocol.error_detail(too_large))
            else:
                self.dispatcher.take(message.route, message)
        elif message.kind == protocol.END:
            self.dispatcher.take_end(message.route, message)
        elif message.kind == protocol.ERROR:
            self.dispatcher.stream_failed(message.route, message.msg_id)
            self._send_error(message.route, message.msg_id, message.payload)
        else:
            kind = protocol.KIND_NAMES[message.kind]
            self._drop("kind", f"a hub takes REQUEST, ERROR and END, not {kind}", frames)

    def _drain_before_leaving(self, pull: zmq.Socket, debug: bool) -> None:
        """Leave cleanly: deregister, take what still comes, and wait for
        the workers' answers to the jobs on the books."""
        super()._drain_before_leaving(pull, debug)
        give_up = time.monotonic() + _LEAVE_MAX
        books = self.dispatcher
        back = books.socket
        while (
            (books.open_jobs or self._held)
            and books.workers
            and time.monotonic() < give_up
            and back is not None
        ):
            if back.poll(50, zmq.POLLIN):
                books.drain()
                self._send_together()
            self._tick()  # takes held jobs as the queue frees
        left = books.open_jobs + len(self._held)
        if left:
            self.logger.warning("%s: leaving with %d job(s) unanswered", self.name, left)

    # ------------------------------------------------------------------ answers

    def _send_fast(self, origin: bytes, msg_id: int, deadline: float, body: bytes) -> None:
        """A worker's one-frame result: with the others of the same drain of
        the workers' socket, sent on together at its end (up to BATCH_JOBS
        of them and BATCH_BYTES of payloads; a larger one alone)."""
        result = body[HEAD_SIZE:]
        if self.stats is not None:
            self.stats.sent += 1
        if len(result) > BATCH_BYTES:
            self._output.send_result(origin, msg_id, deadline, result)
            return
        if self._filled + len(result) > BATCH_BYTES:
            self._send_together()  # full: this one starts the next
        self._together.append((origin, msg_id, deadline, result))
        self._filled += len(result)
        if len(self._together) == BATCH_JOBS:
            self._send_together()

    def _send_together(self) -> None:
        """Send on the workers' results held (see :meth:`_send_fast`)."""
        if self._together:
            together, self._together, self._filled = self._together, [], 0
            self._output.send_results(together)

    def _send(
        self, origin: bytes, msg_id: int, deadline: float, kind: int, payload: bytes, flags: int
    ) -> None:
        if kind == protocol.REPLY:
            message = protocol.Message(
                protocol.REQUEST, msg_id, payload, b"", origin, deadline, flags
            )
            self._output.send(message, payload)
        elif kind == protocol.ERROR:
            self._send_error(origin, msg_id, payload)
        elif origin:  # END: towards the client, on the path its items took
            end = protocol.encode(protocol.END, msg_id, payload, route=origin, deadline=deadline)
            self._output.after_stream(origin, msg_id, end)
        if self.stats is not None:
            self.stats.sent += 1

    def _finished(self) -> None:
        self.served += 1

    def _send_error(self, origin: bytes, msg_id: int, payload: bytes) -> None:
        if not origin:
            self._unrouted_error(protocol.decode_error(payload))
            return
        error = protocol.encode(protocol.ERROR, msg_id, payload, route=origin)
        self._output.after_stream(origin, msg_id, error)
