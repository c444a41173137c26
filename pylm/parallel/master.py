"""The master of the parallel pattern: takes clients' jobs and hands each one
to an idle worker, and sends the results back to the client of each job.

Sockets (both bound by the master)::

    clients --DEALER--> [front ROUTER]  Master  [workers ROUTER] <--DEALER-- workers

A client sends REQUESTs (and CACHE requests, for the master's own cache,
:mod:`pylm.cache`); the master gives every job a number of its own
(the message id towards workers) and keeps ``job number -> (client, the
client's message id)``. Workers say how many jobs they take at once (their
*slots*) when they say hello; the master sends a job only to a worker with a
free slot, so a slow worker holds no more than its slots while the others
take the rest. A result frees the slot it used.

Delivery: every job stays on the master's books until its result is in.
Workers send a heartbeat (PING) every ``heartbeat`` seconds from a thread of
their own, so a busy worker keeps beating; a worker silent for
``heartbeat * misses`` seconds (killed, host gone, network cut) is declared
dead, and its jobs go back to the front of the queue, to the next idle
worker. The first result of a job is sent to the client and the job is
closed; a later result for it (the "dead" worker was only slow) is dropped
and counted. Streamed items are numbered by the worker, so items a second
worker repeats are dropped too. Hence: **each job's result reaches its
client exactly once, as long as the master lives** (its books are in
memory) and the worker functions are deterministic for streams.

Backpressure: the master queues at most ``max_queued`` jobs waiting for a
worker; with the queue full it stops reading its clients' socket, so
clients wait (their sockets fill up) instead of the master's memory growing.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import deque
from typing import TYPE_CHECKING

import zmq

from pylm import protocol
from pylm.base import BaseServer, Options2016, ServerOptions
from pylm.cache_store import Cache
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
    BATCH_PREFIX,
    FRAME_SLACK,
    HEAD_SIZE,
    LEAD,
    ONE_FRAME_REQUEST,
    read_id_deadline,
    read_sizes,
    with_id,
)
from pylm.transport import Backlog, check_address, close_listener, recv_message

if TYPE_CHECKING:
    from typing_extensions import Unpack


__all__ = ["Master"]

_BATCH = 256
MAX_BACKLOG = 100_000  # answers kept for clients that are not reading, in all


class Master(Dispatching, BaseServer):
    """Distributes jobs to workers. Start it with only a name (workers and
    clients find it in the registry) or with explicit addresses::

        Master('master').start()
        Master('master', 'tcp://127.0.0.1:5555', 'tcp://127.0.0.1:5556').start()

    ``front_address``: where clients connect; ``workers_address``: where
    workers connect. Subclasses may define the hooks ``scatter`` (one job
    into several) and ``gather`` (results into outputs), see
    :class:`~pylm.parallel.dispatch.Dispatching`. ``heartbeat``: seconds
    between a worker's heartbeats, ``misses``: heartbeats missed before a
    worker is declared dead; ``max_queued``: jobs waiting for a worker at
    most (then the master reads no more from clients). ``self.cache`` is the
    master's cache (:class:`~pylm.cache.Cache`), which clients reach with
    ``set``, ``get`` and ``delete`` on the front address.
    """

    _pylm_framework = True
    kind = "master"

    def __init__(
        self,
        name: str,
        front_address: str | None = None,
        workers_address: str | None = None,
        log_address: str | None = None,
        log_level: int = logging.INFO,
        messages: int = sys.maxsize,
        *,
        heartbeat: float = DEFAULT_HEARTBEAT,
        misses: int = DEFAULT_MISSES,
        max_queued: int = DEFAULT_MAX_QUEUED,
        **options: Unpack[ServerOptions],
    ) -> None:
        old = Options2016(log_address, log_level=log_level, messages=messages)
        BaseServer.__init__(self, name, options2016=old, **options)
        scatter, gather = self._hooks()
        self.dispatcher = Dispatcher(
            name,
            send=self._send,
            send_fast=self._send_fast,
            finished=self._finished,
            drop=self._drop,
            log=self._log_limited,
            remote_error=self._remote_error,
            is_control=self._is_control,
            stats=self.stats,
            heartbeat=heartbeat,
            misses=misses,
            max_queued=max_queued,
            scatter=scatter,
            gather=gather,
        )
        self.front_address = front_address and check_address(front_address, "front_address")
        self.workers_address = workers_address and check_address(workers_address, "workers_address")
        self.cache = Cache(name)
        self.front: str | None = None  # where clients connect, once bound
        self.back: str | None = None  # where workers connect, once bound
        self._front: zmq.Socket | None = None
        # Answers for clients that are not reading, sent as they read.
        self._backlog = Backlog(MAX_BACKLOG, self._gone)
        self._together: dict[bytes, protocol.Batch] = {}  # client -> its answers this round
        # Jobs of a BATCH read while the queue filled up: taken as it frees.
        self._held_jobs: deque[tuple[bytes, bytes]] = deque()

    # ------------------------------------------------------------------ sockets

    def _open(self) -> None:
        front = self._secure(self.context.socket(zmq.ROUTER))
        back = self._secure(self.context.socket(zmq.ROUTER))
        self._front, self.dispatcher.socket = front, back
        self._backlog.socket = front
        for socket in (front, back):
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
            socket.setsockopt(zmq.MAXMSGSIZE, self.max_payload + FRAME_SLACK)
        back.bind(self._control_address)  # stop() wakes the loop through it (always read)
        self.front = self._listen(front, self.front_address or f"tcp://{self.host}:0")
        self.back = self._listen(back, self.workers_address or f"tcp://{self.host}:0")
        self._register(
            {"front": self.front, "workers": self.back},
            required=self.front_address is None or self.workers_address is None,
        )

    def _close(self) -> None:
        try:
            if self.served >= self.messages:
                self._let_last_answers_out(self._front, self.dispatcher.socket, self._held)
        finally:
            close_listener(self._front)
            close_listener(self.dispatcher.socket)
            self._front = self.dispatcher.socket = None

    def _held(self) -> int:
        """Send what the backlog holds for clients not reading; how many answers it still holds."""
        self._backlog.flush()
        return self._backlog.size

    # ------------------------------------------------------------------ the loop

    def _serve(self) -> None:
        dispatcher = self.dispatcher
        front, back = self._front, dispatcher.socket
        assert front is not None and back is not None
        reading = zmq.Poller()  # both sockets
        reading.register(front, zmq.POLLIN)
        reading.register(back, zmq.POLLIN)
        full = zmq.Poller()  # the queue is full: only the workers
        full.register(back, zmq.POLLIN)
        timeout = max(1, int(dispatcher.heartbeat * 250))  # ms: a quarter of a heartbeat
        next_check = time.monotonic() + dispatcher.heartbeat / 4
        held = self._held_jobs
        while self.served < self.messages:
            wait = 10 if self._backlog else timeout  # a backlog: try again soon
            events = dict((full if dispatcher.full or held else reading).poll(wait))
            if back in events:
                stop = dispatcher.drain()
                dispatcher.dispatch()  # the slots just freed first
                if held:
                    self._take_held()
                    dispatcher.dispatch()
                if self._together:
                    self._send_together()
                if stop:
                    return
            if front in events:
                self._drain_clients(front)
                dispatcher.dispatch()
                if self._together:
                    self._send_together()
            if self._backlog:
                self._backlog.flush()
                self._count_sent()
            if time.monotonic() >= next_check:
                dispatcher.check_workers()
                dispatcher.dispatch()
                if self._together:
                    self._send_together()
                next_check = time.monotonic() + dispatcher.heartbeat / 4

    def _drain_clients(self, front: zmq.Socket) -> None:
        """Read what clients sent, up to a batch or a full queue; the jobs of
        a BATCH one by one."""
        dispatcher = self.dispatcher
        stats = self.stats
        for _ in range(_BATCH):
            if dispatcher.full or self._held_jobs:
                return
            try:
                frames = recv_message(front)
            except zmq.Again:
                return
            if stats is not None:
                stats.received += 1
            if len(frames) < 2:
                continue
            client, body = frames[0], frames[1]
            if body[LEAD] == BATCH_PREFIX and len(frames) == 2:
                try:
                    carried = protocol.unpack_batch(body)
                    if not carried:
                        raise ProtocolError("empty BATCH")
                except ProtocolError as problem:
                    self._drop("head", f"{problem} (from client {client!r})", frames[1:])
                    continue
                if stats is not None:
                    stats.received += len(carried) - 1  # jobs, as for one-job messages
                self._held_jobs.extend((client, message) for message in carried)
                self._take_held()
                continue
            self._take(client, frames[1:])

    def _take_held(self) -> None:
        """Take the jobs of BATCHes read, while the queue has room (the front
        socket is not read meanwhile), so that the queue keeps its bound."""
        held, dispatcher = self._held_jobs, self.dispatcher
        while held and not dispatcher.full:
            client, message = held.popleft()
            self._take(client, [message])

    def _take(self, client: bytes, frames: list[bytes]) -> None:
        """A client's message: a job booked by the dispatcher, or answered here."""
        body = frames[0]
        if (
            self.dispatcher.direct
            and body[LEAD] == ONE_FRAME_REQUEST
            and len(frames) == 1
            and len(body) >= HEAD_SIZE
            and HEAD_SIZE + sum(read_sizes(body)) <= len(body)
        ):  # a one-frame REQUEST whose target and route fit in it
            msg_id, deadline = read_id_deadline(body)
            self.dispatcher.take_fast(client, msg_id, deadline, frames)
            return
        self._client_message(client, frames)

    def _client_message(self, client: bytes, frames: list[bytes]) -> None:
        try:
            message = protocol.decode(frames)
        except ProtocolError as problem:
            self._drop("head", f"{problem} (from client {client!r})", frames)
            salvaged = protocol.salvage_msg_id(frames)
            if salvaged is not None:
                self._to_client(client, protocol.encode_error(salvaged, problem))
            return
        if message.kind == protocol.PING:
            self._to_client(client, protocol.encode(protocol.PONG, message.msg_id, self._pong()))
            return
        if message.kind == protocol.CACHE:
            try:
                answer = self.cache.answer(message)
            except ProtocolError as problem:
                self._drop("payload", f"{problem} (a cache request from client {client!r})", frames)
                answer = protocol.encode_error(message.msg_id, problem)
            self._to_client(client, answer)
            return
        if message.kind != protocol.REQUEST or message.flags & protocol.MORE:
            refused = ProtocolError(
                f"master {self.name!r} takes REQUEST, CACHE and PING, not"
                f" {protocol.KIND_NAMES[message.kind]}"
                + (" flagged MORE" if message.flags & protocol.MORE else "")
            )
            self._drop("kind", str(refused), frames)
            self._to_client(client, protocol.encode_error(message.msg_id, refused))
            return
        if len(message.payload) > self.max_payload:
            too_large = self._too_large(message.target, message.payload)
            self._to_client(client, protocol.encode_error(message.msg_id, too_large))
            return
        self.dispatcher.take(client, message)

    # ------------------------------------------------------------------ answers

    def _send_fast(self, origin: bytes, msg_id: int, deadline: float, body: bytes) -> None:
        self._to_client(origin, [with_id(body, msg_id)])

    def _send_together(self, client: bytes | None = None) -> None:
        """Send the answers held for ``client`` (every client's if None),
        one BATCH a client (an answer alone goes alone)."""
        clients = list(self._together) if client is None else [client]
        for each in clients:
            bodies = self._together.pop(each).take()
            if len(bodies) == 1:
                self._offer(each, bodies)
            else:
                self._offer(each, [protocol.pack_batch(bodies)], len(bodies))
        self._count_sent()

    def _send(
        self, origin: bytes, msg_id: int, deadline: float, kind: int, payload: bytes, flags: int
    ) -> None:
        self._to_client(origin, protocol.encode(kind, msg_id, payload, flags=flags))

    def _to_client(self, client: bytes, frames: list[bytes]) -> None:
        """An answer for ``client``: a small one-frame answer goes with the
        client's others of this round of the loop (up to BATCH_JOBS of them
        and BATCH_BYTES of payloads), the rest after them, at once."""
        together = self._together.get(client)
        size = len(frames[0]) - HEAD_SIZE
        if len(frames) == 1 and size <= BATCH_BYTES:
            if together is not None and not together.fits(size):
                self._send_together(client)  # full: this one starts the next
                together = None
            if together is None:
                together = self._together[client] = protocol.Batch()
            if together.add(frames[0], size):
                self._send_together(client)
            return
        if together is not None:
            self._send_together(client)
        self._offer(client, frames)
        self._count_sent()

    def _offer(self, client: bytes, frames: list[bytes], answers: int = 1) -> None:
        """Send without waiting: a client whose queue is full (it stopped
        reading a long stream) gets its answers later, in order, from a
        backlog, while the master serves everyone else."""
        if not self._backlog.offer(client, frames, answers):
            self._undeliverable(client, answers, "the backlog of slow clients is full")

    def _finished(self) -> None:
        self.served += 1

    def _count_sent(self) -> None:
        if self.stats is not None:  # answers, those of a BATCH one by one
            self.stats.sent = self._backlog.sent

    def _gone(self, client: bytes, frames: list[bytes], answers: int) -> None:
        self._undeliverable(client, answers, "the client is gone")

    def _undeliverable(self, client: bytes, answers: int, why: str) -> None:
        self.dispatcher.undeliverable += answers
        self._log_limited(
            "undeliverable",
            logging.WARNING,
            "%s: %d answer(s) for client %s dropped: %s",
            self.name,
            answers,
            client.hex(),
            why,
        )

    def _pong(self) -> bytes:
        info = json.loads(super()._pong())
        info.update(workers=self.dispatcher.workers, queued=self.dispatcher.queued)
        return json.dumps(info).encode("utf-8")
