"""The master of the parallel pattern: takes clients' jobs and hands each one
to an idle worker, and sends the results back to the client of each job.

Sockets (both bound by the master)::

    clients --DEALER--> [front ROUTER]  Master  [workers ROUTER] <--DEALER-- workers

A client sends REQUESTs; the master gives every job a number of its own
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
import struct
import sys
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import zmq

from pylm import protocol
from pylm.base import DEFAULT_MAX_PAYLOAD, BaseServer
from pylm.errors import ProtocolError
from pylm.transport import bind, check_address, close_socket

if TYPE_CHECKING:
    from pylm.registry import Registry

__all__ = ["Gathering", "Master"]

DEFAULT_HEARTBEAT = 1.0  # s between a worker's heartbeats
DEFAULT_MISSES = 3  # heartbeats missed before a worker is declared dead
DEFAULT_MAX_QUEUED = 10_000  # jobs waiting for a worker, at most
_FRAME_SLACK = 64 * 1024
_HEAD_SIZE = protocol.HEAD_SIZE
_FAST = protocol.MAGIC + bytes([protocol.VERSION, protocol.REQUEST, 0])
_REPLY_PREFIX = protocol.REPLY_PREFIX
_ID = struct.Struct(">Q")
_pack_id = _ID.pack
_unpack_id = _ID.unpack_from
SEQ = struct.Struct(">Q")  # the number of a streamed item, in the route of worker results


class Gathering:
    """What :meth:`Master.gather` may want to know of the result it is
    given, as ``self.gathering``: the client's ``job`` (a number unique in
    this master) and whether the result is the ``last`` of that job."""

    __slots__ = ("job", "last")

    def __init__(self) -> None:
        self.job = 0
        self.last = False


class _Job:
    """A job on the master's books, given to a worker or waiting for one."""

    __slots__ = ("body", "client", "deadline", "msg_id", "next_seq", "parent", "worker")

    def __init__(self, client: bytes, msg_id: bytes, body: list[bytes], parent: _Parent | None):
        self.client = client  # routing id of the client's socket
        self.msg_id = msg_id  # the client's message id, 8 bytes as sent
        self.body = body  # the frames to send a worker, with the job number in
        self.parent = parent  # the client's job, when this one came from scatter()
        self.worker: _Worker | None = None
        self.next_seq = 0  # the number of the next streamed item to pass on


class _Parent:
    """A client's job that scatter() split into parts."""

    __slots__ = ("client", "failed", "msg_id", "number", "open")

    def __init__(self, client: bytes, msg_id: bytes, number: int) -> None:
        self.client = client
        self.msg_id = msg_id
        self.number = number
        self.open = 0  # parts without their final result yet
        self.failed = False


class _Worker:
    """A worker as the master sees it."""

    __slots__ = ("address", "free", "generation", "jobs", "leaving", "name", "seen", "slots")

    def __init__(self, address: bytes, name: str, slots: int, generation: int) -> None:
        self.address = address  # routing id of the worker's job socket
        self.name = name
        self.slots = slots
        self.free = 0  # slots the master may fill
        self.jobs: set[int] = set()  # job numbers given to it, not finished
        self.seen = time.monotonic()
        self.leaving = False
        self.generation = generation


class Master(BaseServer):
    """Distributes jobs to workers. Start it with only a name (workers and
    clients find it in the registry) or with explicit addresses::

        Master('master').start()
        Master('master', 'tcp://127.0.0.1:5555', 'tcp://127.0.0.1:5556').start()

    ``front_address``: where clients connect; ``workers_address``: where
    workers connect. Subclasses may define the hooks :meth:`scatter` (one job
    into several) and :meth:`gather` (results into outputs).
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
        log_stdout: bool = True,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        context: zmq.Context | None = None,
        registry: Registry | str | None = None,
        host: str | None = None,
        ttl: float | None = None,
        metrics: bool | None = None,
    ) -> None:
        super().__init__(
            name,
            log_level=log_level,
            log_stdout=log_stdout,
            log_address=log_address,
            max_payload=max_payload,
            context=context,
            messages=messages,
            registry=registry,
            host=host,
            ttl=ttl,
            metrics=metrics,
        )
        if not isinstance(heartbeat, (int, float)) or not heartbeat > 0:
            raise ValueError(f"heartbeat must be a positive number of seconds, got {heartbeat!r}")
        if not isinstance(misses, int) or misses < 1:
            raise ValueError(f"misses must be a positive int, got {misses!r}")
        if not isinstance(max_queued, int) or max_queued < 1:
            raise ValueError(f"max_queued must be a positive int, got {max_queued!r}")
        self.front_address = front_address and check_address(front_address, "front_address")
        self.workers_address = workers_address and check_address(workers_address, "workers_address")
        self.heartbeat = float(heartbeat)
        self.worker_timeout = self.heartbeat * misses
        self.max_queued = max_queued
        self.front: str | None = None  # where clients connect, once bound
        self.back: str | None = None  # where workers connect, once bound
        self.gathering = Gathering()
        self._front: zmq.Socket | None = None
        self._back: zmq.Socket | None = None
        self._workers: dict[bytes, _Worker] = {}
        self._free: deque[tuple[_Worker, int]] = deque()  # one entry per free slot
        self._queue: deque[int] = deque()  # job numbers waiting for a worker
        self._jobs: dict[int, _Job] = {}
        self._numbers = 0
        self._generations = 0
        self._splits = type(self).scatter is not Master.scatter
        self._gathers = type(self).gather is not Master.gather
        # Counted while running (also exported as metrics).
        self.redispatched = 0  # jobs given to another worker after theirs was declared dead
        self.duplicates = 0  # results dropped because their job was closed already
        self.undeliverable = 0  # results whose client had gone

    # ------------------------------------------------------------------ hooks

    def scatter(self, message: bytes) -> Iterable[bytes]:
        """One client job into the payloads of the jobs workers run; by
        default the job as it is. Each payload is one job."""
        return (message,)

    def gather(self, message: bytes) -> Iterable[bytes]:
        """A worker's result into zero or more results for the client; by
        default the result as it is. ``self.gathering`` tells the job the
        result belongs to and whether it is its last."""
        return (message,)

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
        """Jobs given to a worker and not finished."""
        return len(self._jobs) - len(self._queue)

    # ------------------------------------------------------------------ sockets

    def _open(self) -> None:
        front = self.context.socket(zmq.ROUTER)
        back = self.context.socket(zmq.ROUTER)
        self._front, self._back = front, back
        for socket in (front, back):
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
            socket.setsockopt(zmq.MAXMSGSIZE, self.max_payload + _FRAME_SLACK)
        front.bind(self._control_address)  # stop() wakes the loop through it
        self.front = bind(front, self.front_address or f"tcp://{self.host}:0")
        self.back = bind(back, self.workers_address or f"tcp://{self.host}:0")
        self._register(
            {"front": self.front, "workers": self.back},
            required=self.front_address is None or self.workers_address is None,
        )

    def _close(self) -> None:
        close_socket(self._front)
        close_socket(self._back)
        self._front = self._back = None

    # ------------------------------------------------------------------ the loop

    def _serve(self) -> None:
        front, back = self._front, self._back
        assert front is not None and back is not None
        reading = zmq.Poller()  # both sockets
        reading.register(front, zmq.POLLIN)
        reading.register(back, zmq.POLLIN)
        full = zmq.Poller()  # the queue is full: only the workers
        full.register(back, zmq.POLLIN)
        timeout = max(1, int(self.heartbeat * 250))  # ms: a quarter of a heartbeat
        next_check = time.monotonic() + self.heartbeat
        while self.served < self.messages:
            poller = full if len(self._queue) >= self.max_queued else reading
            events = dict(poller.poll(timeout))
            if back in events:
                self._drain_workers(back)
            if front in events and self._drain_clients(front):
                return
            self._dispatch()
            now = time.monotonic()
            if now >= next_check:
                self._check_workers(now)
                next_check = now + self.heartbeat / 4

    def _drain_clients(self, front: zmq.Socket) -> bool:
        """Read what clients sent, up to a batch; True when stop() asked."""
        for _ in range(256):
            if len(self._queue) >= self.max_queued:
                return False
            try:
                frames = front.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return False
            if self.stats is not None:
                self.stats.received += 1
            if len(frames) < 2:
                continue
            client, body = frames[0], frames[1]
            if not body and self._is_control(frames[-1]):  # stop()'s [b"", token]
                return True
            if body[:5] == _FAST and len(frames) == 2 and len(body) >= _HEAD_SIZE:
                if not self._splits:
                    self._take(client, body[9:17], [body[:9], body[17:]], None)
                    continue
            self._client_message(client, frames[1:])
        return False

    def _client_message(self, client: bytes, frames: list[bytes]) -> None:
        try:
            message = protocol.decode(frames)
        except ProtocolError as problem:
            self._drop(f"{problem} (from client {client!r})", frames)
            salvaged = protocol.salvage_msg_id(frames)
            if salvaged is not None:
                self._to_client(client, protocol.encode_error(salvaged, problem))
            return
        msg_id = _pack_id(message.msg_id)
        if message.kind == protocol.PING:
            self._to_client(client, protocol.encode(protocol.PONG, message.msg_id, self._pong()))
            return
        if message.kind != protocol.REQUEST:
            refused = ProtocolError(
                f"master {self.name!r} takes REQUEST and PING, not"
                f" {protocol.KIND_NAMES[message.kind]}"
            )
            self._drop(str(refused), frames)
            self._to_client(client, protocol.encode_error(message.msg_id, refused))
            return
        if len(message.payload) > self.max_payload:
            too_large = self._too_large(message.target, message.payload)
            self._to_client(client, protocol.encode_error(message.msg_id, too_large))
            return
        if not self._splits:
            body = protocol.encode(
                protocol.REQUEST, 0, message.payload, message.target, b"", message.deadline
            )
            self._take(client, msg_id, [body[0][:9], body[0][17:], *body[1:]], None)
            return
        try:
            parts = [bytes(part) for part in self.scatter(message.payload)]
        except Exception as exc:  # the user's hook failed: the client hears of it
            failure = self._remote_error(message.target + b"/scatter", exc)
            self._to_client(client, protocol.encode_error(message.msg_id, failure))
            return
        self._numbers += 1
        parent = _Parent(client, msg_id, self._numbers)
        if not parts:
            self._to_client(client, [protocol.reply_head(message.msg_id, protocol.END)])
            self.served += 1
            return
        for part in parts:
            body = protocol.encode(protocol.REQUEST, 0, part, message.target, b"", message.deadline)
            parent.open += 1
            self._take(client, msg_id, [body[0][:9], body[0][17:], *body[1:]], parent)

    def _take(
        self, client: bytes, msg_id: bytes, pieces: list[bytes], parent: _Parent | None
    ) -> None:
        """Book a job: ``pieces`` are a request's head before the id, the
        rest of its first frame, and any payload frame."""
        self._numbers += 1
        number = self._numbers
        body = [pieces[0] + _pack_id(number) + pieces[1], *pieces[2:]]
        self._jobs[number] = _Job(client, msg_id, body, parent)
        self._queue.append(number)

    def _dispatch(self) -> None:
        """Give waiting jobs to workers with a free slot, oldest job first."""
        queue, free, jobs, back = self._queue, self._free, self._jobs, self._back
        assert back is not None
        while queue and free:
            worker, generation = free.popleft()
            if worker.generation != generation or worker.free <= 0:
                continue  # a slot of a worker gone (or gone and back)
            number = queue.popleft()
            job = jobs.get(number)
            if job is None or (job.parent is not None and job.parent.failed):
                jobs.pop(number, None)
                free.appendleft((worker, generation))
                continue
            try:
                back.send_multipart([worker.address, *job.body], copy=len(job.body[-1]) < 65536)
            except zmq.ZMQError:  # the worker's socket is gone: so is the worker
                queue.appendleft(number)
                self._lost(worker, "its socket is gone")
                continue
            worker.free -= 1
            worker.jobs.add(number)
            job.worker = worker

    # ------------------------------------------------------------------ workers

    def _drain_workers(self, back: zmq.Socket) -> None:
        for _ in range(256):
            try:
                frames = back.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            sender, body = frames[0], frames[1]
            if body[:9] == _REPLY_PREFIX and len(frames) == 2 and len(body) >= _HEAD_SIZE:
                # Fast path: a one-frame, final REPLY.
                number = _unpack_id(body, 9)[0]
                job = self._jobs.pop(number, None)
                self._release(sender, number)
                if job is None:
                    self.duplicates += 1
                elif job.parent is None:
                    self._finish(job, [b"".join((body[:9], job.msg_id, body[17:]))])
                else:
                    self._gather_part(job, body[_HEAD_SIZE + body[7] * 256 + body[8] :], True)
                continue
            self._worker_message(sender, frames[1:])

    def _worker_message(self, sender: bytes, frames: list[bytes]) -> None:
        try:
            message = protocol.decode(frames)
        except ProtocolError as error:
            self._drop(f"{error} (from worker {sender!r})", frames)
            return
        kind = message.kind
        if kind == protocol.PING:
            self._hello(sender, message)
            return
        number = message.msg_id
        job = self._jobs.get(number)
        if kind == protocol.REPLY and message.flags & protocol.MORE:
            seq = SEQ.unpack(message.route)[0] if len(message.route) == SEQ.size else 0
            if job is None or seq != job.next_seq:
                self.duplicates += 1
                return
            job.next_seq += 1
            if job.parent is None:
                self._to_client(
                    job.client,
                    protocol.encode(
                        protocol.REPLY, _unpack_id(job.msg_id)[0], message.payload,
                        flags=protocol.MORE,
                    ),
                )  # fmt: skip
            else:
                self._gather_part(job, message.payload, False)
            return
        if kind not in (protocol.REPLY, protocol.ERROR, protocol.END):
            self._drop(f"a worker sent {protocol.KIND_NAMES[kind]}", frames)
            return
        self._jobs.pop(number, None)
        self._release(sender, number)
        if job is None:
            self.duplicates += 1
            return
        client_id = _unpack_id(job.msg_id)[0]
        if job.parent is None:
            if kind == protocol.REPLY:
                answer = protocol.encode(protocol.REPLY, client_id, message.payload)
            elif kind == protocol.END:
                answer = [protocol.reply_head(client_id, protocol.END)]
            else:
                answer = protocol.encode(protocol.ERROR, client_id, message.payload)
            self._finish(job, answer)
        elif kind == protocol.REPLY:
            self._gather_part(job, message.payload, True)
        elif kind == protocol.END:
            self._part_closed(job)
        else:
            parent = job.parent
            if not parent.failed:
                parent.failed = True  # its other parts are dropped as they come
                self._to_client(
                    job.client, protocol.encode(protocol.ERROR, client_id, message.payload)
                )
                self.served += 1

    def _finish(self, job: _Job, answer: list[bytes]) -> None:
        self.served += 1
        self._to_client(job.client, answer)

    def _gather_part(self, job: _Job, result: bytes, final: bool) -> None:
        """A result of a part of a scattered job: through gather() to the client."""
        parent = job.parent
        assert parent is not None
        if parent.failed:
            return
        client_id = _unpack_id(parent.msg_id)[0]
        self.gathering.job = parent.number
        self.gathering.last = final and parent.open == 1
        try:
            outputs = [bytes(output) for output in self.gather(result)]
        except Exception as exc:
            parent.failed = True
            error = self._remote_error(f"{self.name}.gather".encode(), exc)
            self._to_client(parent.client, protocol.encode_error(client_id, error))
            self.served += 1
            return
        for output in outputs:
            self._to_client(
                parent.client,
                protocol.encode(protocol.REPLY, client_id, output, flags=protocol.MORE),
            )
        if final:
            self._part_closed(job)

    def _part_closed(self, job: _Job) -> None:
        parent = job.parent
        assert parent is not None
        parent.open -= 1
        if parent.open == 0 and not parent.failed:
            client_id = _unpack_id(parent.msg_id)[0]
            self._to_client(parent.client, [protocol.reply_head(client_id, protocol.END)])
            self.served += 1

    def _release(self, sender: bytes, number: int) -> None:
        """The worker ``sender`` finished job ``number``: its slot is free."""
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
        job socket, the payload is JSON."""
        try:
            info: Any = json.loads(message.payload or b"{}")
            slots = int(info.get("slots", 1))
            free = int(info.get("free", slots))
        except (ValueError, TypeError, AttributeError) as exc:
            self._drop(f"a worker's PING with bad JSON: {exc}", [message.payload])
            return
        address = message.route
        worker = self._workers.get(address)
        if sender != address:  # a heartbeat
            if worker is None:  # of a worker this master does not know: ask for a hello
                assert self._back is not None
                try:
                    self._back.send_multipart(
                        [sender, *protocol.encode(protocol.PONG, 0, b'{"known": false}')]
                    )
                except zmq.ZMQError:
                    pass
                return
        elif info.get("bye"):
            if worker is not None:
                self._lost(worker, "it left")
            return
        elif worker is None:
            self._generations += 1
            worker = _Worker(address, str(info.get("name", "")), max(1, slots), self._generations)
            self._workers[address] = worker
            self.logger.info("%s: worker %s joined (%d slots)", self.name, worker.name, slots)
        worker.seen = time.monotonic()
        if info.get("leaving"):
            worker.leaving = True
            worker.free = 0
            return
        if worker.leaving:
            return
        if not worker.jobs and worker.free < free <= worker.slots:
            # Slots the master does not know of (a hello, or a master
            # that lost track): free as the worker says.
            for _ in range(free - worker.free):
                self._free.append((worker, worker.generation))
            worker.free = free

    def _check_workers(self, now: float) -> None:
        for worker in list(self._workers.values()):
            if now - worker.seen > self.worker_timeout:
                self._lost(worker, f"no heartbeat for {now - worker.seen:.1f} s")

    def _lost(self, worker: _Worker, why: str) -> None:
        """Forget ``worker``; its unfinished jobs go to the front of the queue."""
        self._workers.pop(worker.address, None)
        worker.generation = -1  # its slots in the free list are void
        worker.free = 0
        pending = sorted(worker.jobs)
        worker.jobs.clear()
        for number in reversed(pending):
            job = self._jobs.get(number)
            if job is not None:
                job.worker = None
                self._queue.appendleft(number)
        self.redispatched += len(pending)
        level = logging.WARNING if pending else logging.INFO
        self.logger.log(
            level,
            "%s: worker %s left (%s); %d job(s) go to other workers",
            self.name,
            worker.name,
            why,
            len(pending),
        )

    # ------------------------------------------------------------------ clients

    def _to_client(self, client: bytes, frames: list[bytes]) -> None:
        assert self._front is not None
        try:
            self._front.send_multipart([client, *frames], copy=len(frames[-1]) < 65536)
        except zmq.ZMQError:  # the client is gone (or its queue is full)
            self.undeliverable += 1
            return
        if self.stats is not None:
            self.stats.sent += 1

    def _pong(self) -> bytes:
        info = json.loads(super()._pong())
        info.update(workers=len(self._workers), queued=len(self._queue))
        return json.dumps(info).encode("utf-8")
