"""The worker of the parallel pattern: runs the jobs a :class:`Master` gives it.

A worker binds nothing. It connects a DEALER socket (its *job socket*) to
every instance of its master, says hello (a PING whose JSON payload gives
its name and ``slots``), and from then on receives REQUESTs and sends one
answer per job: a REPLY, an ERROR, or, for a generator function, a REPLY
flagged MORE per item (numbered in the route field, 8 bytes) and an END.

A thread of its own sends a heartbeat every ``heartbeat`` seconds on a
second socket, so the master can tell a worker busy with a long job from a
dead one. A master that does not know the heartbeat's worker (it restarted)
says so, and the worker says hello again from its job socket.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING

import zmq

from pylm import protocol
from pylm.base import BaseServer, Options2016, ServerOptions
from pylm.calls import curve_key
from pylm.discovery import Peers, check_wait
from pylm.errors import (
    InvalidName,
    ProtocolError,
    PylmError,
    RegistryError,
    RequestTimeout,
    UnknownFunction,
)
from pylm.lifecycle import DRAIN_MAX, Drain
from pylm.names import check_name
from pylm.parallel.dispatch import DEFAULT_HEARTBEAT, DEFAULT_MISSES
from pylm.parallel.hello import MAX_SLOTS, hello
from pylm.protocol import (
    BATCH_BYTES,
    BATCH_PREFIX,
    COUNT,
    FRAME_SLACK,
    HEAD_SIZE,
    LEAD,
    ONE_FRAME_REQUEST,
    SPLIT_PAYLOAD,
    expiry_stamp,
    past_deadline,
    read_id,
    read_sizes,
)
from pylm.running import Calls, limit_of
from pylm.transport import check_address, close_socket, copied, rest_of, send_frame

if TYPE_CHECKING:
    from typing_extensions import Unpack


__all__ = ["Worker"]

_BYE_LINGER = 1000  # ms a closing job socket has to send its goodbye
COALESCE_WAIT = 0.001  # s a result of a BATCH's job waits at most for the next ones
MASTER_WAIT = 10.0  # s a worker found by name waits for its master's record, by default
# s a worker still serves (and beats to) a master instance gone from the
# registry: a hub that is stopped deregisters first, then serves its input
# for up to 5 s and waits up to 10 s for its workers' answers.
_LEFT_GRACE = 16.0


class _Stream(Exception):
    """A function returned an iterator: its items are the results."""

    def __init__(self, items: Iterator[object]) -> None:
        super().__init__("stream")
        self.items = items


class _Stopping(Exception):
    pass


# A job in progress elsewhere: the master's socket to answer on, and its id.
_Job = tuple[zmq.Socket, int]


class Worker(BaseServer):
    """Runs the jobs of the master ``master``. Subclass it and add methods
    that take bytes and return bytes, or yield bytes (a streaming job)::

        class MyWorker(Worker):
            def foo(self, message):
                return message.upper()

        MyWorker('worker1', 'master').start()        # the master from the registry
        MyWorker('worker1', 'master', 'tcp://127.0.0.1:5556').start()

    ``slots``: jobs the master may give this worker at once. With 1, the
    default, a worker gets a job only when it is idle; more slots hide the
    round trip to the master for very small jobs, at the price of a slow
    worker holding that many. Workers may join and leave at any time; a
    worker that stops finishes the jobs it has, and the master gives a dead
    worker's jobs to the others.
    """

    _pylm_framework = True
    kind = "worker"
    serves_concurrently = True

    def __init__(
        self,
        name: str,
        master: str,
        workers_address: str | None = None,
        log_address: str | None = None,
        log_level: int = logging.INFO,
        messages: int = sys.maxsize,
        *,
        slots: int | None = None,
        heartbeat: float = DEFAULT_HEARTBEAT,
        wait: float = MASTER_WAIT,
        **options: Unpack[ServerOptions],
    ) -> None:
        old = Options2016(log_address, log_level=log_level, messages=messages)
        super().__init__(name, options2016=old, **options)
        if not isinstance(master, str) or not master or "://" in master:
            raise ValueError(f"master must be the master's name, got {master!r}")
        # Slots: one per job in progress at once, by default.
        if self.concurrency is not None and self.concurrency > MAX_SLOTS:
            raise ValueError(
                f"a worker's concurrency is at most {MAX_SLOTS} (its slots), got {self.concurrency}"
            )
        limit = limit_of(self.concurrency, bool(self._exposed.coroutines))
        slots = min(limit, MAX_SLOTS) if slots is None else slots
        if not isinstance(slots, int) or not 1 <= slots <= MAX_SLOTS:
            raise ValueError(f"slots must be an int from 1 to {MAX_SLOTS}, got {slots!r}")
        if self.concurrency is not None and slots < self.concurrency:
            raise ValueError(
                f"slots ({slots}) must be at least concurrency ({self.concurrency}): the master"
                " gives a worker as many jobs at once as it has slots"
            )

        if not isinstance(heartbeat, (int, float)) or not heartbeat > 0:
            raise ValueError(f"heartbeat must be a positive number of seconds, got {heartbeat!r}")
        self.master = master
        self.wait = check_wait(wait)  # s start() waits for the master to be registered
        self.workers_address = workers_address and check_address(workers_address, "workers_address")
        self.slots = slots
        self.heartbeat = float(heartbeat)
        # Jobs name the master's functions: "<master>.<function>".
        prefix = master.encode("utf-8") + b"."
        self._table = {
            prefix + function.encode("utf-8"): entry
            for function, entry in zip(self.functions, self._table.values(), strict=True)
        }
        self.identity = b"pylm-w-" + os.urandom(8)  # the job sockets' routing id
        self._master_key = None if self.curve is None else self.curve.server_key
        # How long an answer may wait for room to go to a master (a master
        # that is gone makes the socket queue SNDHWM answers, then block):
        # as long as a master waits for a silent worker. Then the answer is
        # given up, and the worker serves on (and can stop).
        self._send_millis = max(100, int(self.heartbeat * DEFAULT_MISSES * 1000))
        self.masters: list[str] = []  # the master instances connected
        self._sockets: dict[str, zmq.Socket] = {}
        self._control: zmq.Socket | None = None
        self._poller = zmq.Poller()
        self._peers: Peers | None = None
        self._left: dict[str, float] = {}  # master instances gone from the registry: when to drop
        self._busy = False
        self._gone = False  # said goodbye
        # Jobs that may overlap (concurrency, async def): run off the serving
        # thread, at most one per slot in progress, answered by the serving thread.
        self._calls: Calls[_Job] | None = None
        if self._exposed.coroutines or min(slots, limit) > 1:
            self._calls = Calls(name, self._exposed, self.concurrency, most=slots)
        self._rehello = threading.Event()
        self._beating = threading.Event()  # set: the heartbeat thread should stop
        self._beater: threading.Thread | None = None

    # ------------------------------------------------------------------ sockets

    def _open(self) -> None:
        if self.workers_address is not None and self.curve is not None:  # never plain in silence
            self.curve.require_server_key(f"master {self.master!r} at {self.workers_address}")
        control = self._secure(self.context.socket(zmq.ROUTER))
        control.setsockopt(zmq.LINGER, 0)
        control.bind(self._control_address)
        self._control = control
        self._poller.register(control, zmq.POLLIN)
        if self.workers_address is not None:
            masters = [self.workers_address]
        else:
            masters = self._find_masters()
        self._register({}, required=self.workers_address is None, master=self._master_named())
        for address in masters:
            self._connect(address)
        self._beater = threading.Thread(
            target=self._beat, name=f"pylm-heartbeat-{self.name}", daemon=True
        )
        self._beater.start()

    def _connects_to(self) -> list[str]:
        return [f"master {self.master} at {', '.join(self.masters)}"]

    def _find_masters(self) -> list[str]:
        registry = self._registry_client()
        # A master that is not there within a second: say what this waits for.
        waiting = threading.Timer(
            1.0,
            self.logger.info,
            (
                "%s: waiting for master %r in cluster %r (pylm ls lists what is registered)",
                self.name,
                self.master,
                registry.config.cluster,
            ),
        )
        waiting.daemon = True
        waiting.start()
        try:
            records = registry.wait_for_instances(self.master, self.wait)
        finally:
            waiting.cancel()
        self._master_key = curve_key(self.master, records, self.curve) or self._master_key
        if not any("workers" in record.endpoints for record in records):
            raise RegistryError(f"{self.master!r} is not a master: it has no workers endpoint")
        self._peers = Peers(registry, self.master, "workers", records)
        return self._peers.endpoints

    def _connect(self, address: str) -> None:
        socket = self._to_master(self.context.socket(zmq.DEALER))
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.ROUTING_ID, self.identity)
        socket.setsockopt(zmq.MAXMSGSIZE, self.max_payload + FRAME_SLACK)
        socket.setsockopt(zmq.SNDTIMEO, self._send_millis)
        socket.connect(address)
        self._sockets[address] = socket
        self.masters = list(self._sockets)
        self._poller.register(socket, zmq.POLLIN)
        self._say(socket)

    def _to_master(self, socket: zmq.Socket) -> zmq.Socket:
        """Make ``socket`` (about to connect to a master) a CURVE client, when CURVE is on."""
        if self.curve is not None and (self._master_key or self.curve.server_key):
            self.curve.connect(socket, self._master_key)  # else the master takes plain ones
        return socket

    def _disconnect(self, address: str, linger: int = 0) -> None:
        socket = self._sockets.pop(address)
        self.masters = list(self._sockets)
        self._poller.unregister(socket)
        socket.close(linger=linger)

    def _say(self, socket: zmq.Socket, *, leaving: bool = False, bye: bool = False) -> None:
        """Send the master a PING about this worker (hello, leaving, bye)."""
        free = 0 if leaving else self.slots - self._jobs_in_progress
        ping = hello(self.identity, self.name, self.slots, free, leaving=leaving, bye=bye)
        try:
            socket.send_multipart(ping, zmq.NOBLOCK)
        except zmq.Again:  # the master reads nothing: its heartbeat checks will tell it
            said = "goodbye" if bye else "leaving notice" if leaving else "hello"
            self.logger.warning("%s: a master is not reading; %s not sent", self.name, said)

    def _master_named(self) -> str | None:
        """The master's name for this worker's record (what shows it under
        its master), if it is a server name a record may hold."""
        try:
            return check_name(self.master)
        except InvalidName as exc:
            self.logger.warning("%s: its record names no master: %s", self.name, exc)
            return None

    def _deregister(self) -> None:
        peers, self._peers = self._peers, None
        if peers is not None:
            peers.close()
        super()._deregister()

    def _close(self) -> None:
        self._beating.set()
        if self._beater is not None:
            self._beater.join(5.0)
        for address in list(self._sockets):
            if not self._gone:  # stopped otherwise than by stop(): say goodbye now
                self._say(self._sockets[address], bye=True)
            self._disconnect(address, _BYE_LINGER)  # the goodbye goes out first
        close_socket(self._control)
        self._control = None

    # ------------------------------------------------------------------ heartbeat

    def _beat(self) -> None:
        """The heartbeat thread: a PING to every master each ``heartbeat``
        seconds, on sockets of its own."""
        sockets: dict[str, zmq.Socket] = {}
        poller = zmq.Poller()
        try:
            while True:
                for address in self.masters:
                    if address not in sockets:
                        socket = self._to_master(self.context.socket(zmq.DEALER))
                        socket.setsockopt(zmq.LINGER, 0)
                        socket.connect(address)
                        sockets[address] = socket
                        poller.register(socket, zmq.POLLIN)
                for address in [a for a in sockets if a not in self.masters]:
                    poller.unregister(sockets[address])
                    close_socket(sockets.pop(address))
                free = self.slots - max(self._jobs_in_progress, 1 if self._busy else 0)
                beat = hello(self.identity, self.name, self.slots, free)
                for socket in sockets.values():
                    try:
                        socket.send_multipart(beat, zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass  # the master is not there now: the next beat may reach it
                began = time.monotonic()
                while (left := self.heartbeat - (time.monotonic() - began)) > 0:
                    if self._beating.is_set():
                        return
                    for socket, _ in poller.poll(int(min(left, 0.1) * 1000) + 1):
                        answer = socket.recv_multipart()
                        if answer and answer[-1].startswith(protocol.MAGIC):
                            self._rehello.set()  # the master does not know this worker
                if self._beating.is_set():
                    return
        finally:
            for socket in sockets.values():
                close_socket(socket)

    # ------------------------------------------------------------------ the loop

    def _serve(self) -> None:
        timeout = max(1, int(self.heartbeat * 1000))
        calls = self._calls
        if calls is not None:
            calls.open()
            self._poller.register(calls.fd, zmq.POLLIN)
        try:
            while self.served < self.messages:
                self._open_for_jobs()
                for socket, _ in self._poller.poll(timeout):
                    if socket is self._control:
                        raise _Stopping
                    if calls is not None and socket == calls.fd:
                        self._answer_ended()
                    else:
                        self._drain(socket)
                self._follow()
            self._finish(time.monotonic() + DRAIN_MAX)
        except _Stopping:
            self._leave()
        finally:
            if calls is not None:
                self._poller.unregister(calls.fd)
                calls.close()

    def _open_for_jobs(self) -> None:
        """Read the masters' sockets while there is room for a job (jobs that
        overlap: at most one per slot in progress)."""
        if self._calls is not None:
            events = zmq.POLLIN if self._calls.room else 0
            for socket in self._sockets.values():
                self._poller.modify(socket, events)

    def _finish(self, until: float) -> None:
        """Answer the jobs still in progress, waiting until ``until``
        (monotonic time) at most."""
        calls = self._calls
        if calls is None or not calls.in_progress:
            return
        ended = zmq.Poller()  # the ended jobs only: masters may still be sending
        ended.register(calls.fd, zmq.POLLIN)
        while calls.in_progress and (left := until - time.monotonic()) > 0:
            if ended.poll(int(left * 1000) + 1):
                self._answer_ended()
        if calls.in_progress:
            self.logger.warning(
                "%s: stopped with %d job(s) still in progress, not answered (the master"
                " gives them to other workers)",
                self.name,
                calls.in_progress,
            )

    def _follow(self) -> None:
        """Connect to master instances that joined; say hello again if a
        master forgot this worker."""
        if self._peers is not None and self._peers.changed:
            joined, left = self._peers.take()
            for address in left:  # answered a while yet: a hub that stops waits for them
                if address in self._sockets:
                    self._left[address] = time.monotonic() + _LEFT_GRACE
            for address in joined:
                self._left.pop(address, None)
                if address not in self._sockets:
                    self._connect(address)
        if self._left:
            now = time.monotonic()
            for address, when in list(self._left.items()):
                if now >= when:
                    del self._left[address]
                    if address in self._sockets:
                        self._disconnect(address)
        if self._rehello.is_set():
            self._rehello.clear()
            for socket in self._sockets.values():
                self._say(socket)

    def _leave(self) -> None:
        """Leave cleanly: no new jobs, finish those here, then goodbye."""
        self._deregister()
        for socket in self._sockets.values():
            self._say(socket, leaving=True)
        drain = Drain()  # the master stops sending on the leaving notice
        until = time.monotonic() + DRAIN_MAX  # the drain and the jobs in progress, in all
        calls = self._calls
        while (wait := drain.wait_ms()) is not None:
            self._open_for_jobs()
            for socket, _ in self._poller.poll(wait):
                if calls is not None and socket == calls.fd:
                    self._answer_ended()
                elif socket is not self._control:
                    self._drain(socket)
                    drain.heard()
                else:
                    self._control.recv_multipart()
        self._finish(until)
        for socket in self._sockets.values():
            self._say(socket, bye=True)
        self._gone = True

    def _drain(self, socket: zmq.Socket) -> None:
        """Run the jobs waiting on ``socket`` (a master's), those of a BATCH
        one by one. The results of a BATCH's jobs go back together, as one
        BATCH (up to BATCH_JOBS of them and BATCH_BYTES of payloads); once
        the first held has waited COALESCE_WAIT, they go before the next
        job runs (so a result waits at most that, or the one job that ran
        meanwhile); other results go alone, at once."""
        if self._calls is not None:
            self._start_jobs(socket, self._calls)
            return
        recv, send, call = socket.recv, partial(send_frame, socket), self._call
        reply_to = protocol.reply_to
        carried: list[bytes] = []  # the rest of a BATCH being served
        together = protocol.Batch()  # the results of a BATCH's jobs, held
        held_since, clock = 0.0, time.monotonic
        reads = 0
        while True:
            if carried:
                body = carried.pop()
                in_batch = True
                if together and clock() - held_since > COALESCE_WAIT:
                    self._send_together(socket, together.take())
            else:
                if together:
                    self._send_together(socket, together.take())
                if reads == 64:
                    return
                try:
                    body = recv(zmq.NOBLOCK)
                except zmq.Again:
                    return
                reads += 1
                if self.stats is not None:
                    self.stats.received += 1
                if body[LEAD] == BATCH_PREFIX:
                    extra = rest_of(socket)  # a BATCH is one frame
                    try:
                        if extra:
                            raise ProtocolError(f"BATCH with {len(extra)} more frame(s)")
                        carried = protocol.unpack_batch(body)[::-1]  # popped: in order
                        if not carried:
                            raise ProtocolError("empty BATCH")
                    except ProtocolError as error:
                        self._drop("head", str(error), [body, *extra])
                        continue
                    if self.stats is not None:
                        self.stats.received += len(carried) - 1  # jobs, one by one
                    continue
                in_batch = False
            self._busy = True
            try:
                if body[LEAD] == ONE_FRAME_REQUEST and len(body) >= HEAD_SIZE:
                    target_size, route_size = read_sizes(body)
                    start = HEAD_SIZE + target_size
                    if start + route_size <= len(body):
                        if past_deadline(body, expiry_stamp(time.time())):
                            self._expire(socket, body)
                            continue
                        self.served += 1
                        try:
                            result = call(body[HEAD_SIZE:start], body[start + route_size :])
                        except PylmError as error:
                            self._answer(socket, protocol.encode_error(self._id(body), error))
                            continue
                        except _Stream as stream:
                            if together:  # a stream takes its time: what is held goes first
                                self._send_together(socket, together.take())
                            self._stream(socket, self._id(body), body[HEAD_SIZE:start], stream)
                            continue
                        if in_batch and len(result) <= BATCH_BYTES:
                            if not together.fits(len(result)):
                                self._send_together(socket, together.take())
                            if not together:
                                held_since = clock()
                            if together.add(reply_to(body, result), len(result)):
                                self._send_together(socket, together.take())
                        elif len(result) <= SPLIT_PAYLOAD:
                            try:
                                send(reply_to(body, result))
                            except zmq.Again:
                                self._undelivered(socket, self._id(body))
                                continue
                            if self.stats is not None:
                                self.stats.sent += 1
                        else:
                            self._answer(
                                socket, protocol.encode(protocol.REPLY, self._id(body), result)
                            )
                        continue
                self._other(socket, [body] if in_batch else [body, *rest_of(socket)])
            finally:
                self._busy = False

    def _send_together(self, socket: zmq.Socket, results: list[bytes]) -> None:
        """Send the results held (one-frame REPLYs): one BATCH, or one alone."""
        message = results[0] if len(results) == 1 else protocol.pack_batch(results)
        try:
            send_frame(socket, message)
        except zmq.Again:
            for body in results:
                self._undelivered(socket, self._id(body))
            return
        if self.stats is not None:
            self.stats.sent += len(results)

    @property
    def _jobs_in_progress(self) -> int:
        """Jobs running off the serving thread (read by the heartbeat thread)."""
        return 0 if self._calls is None else self._calls.in_progress

    def _start_jobs(self, socket: zmq.Socket, calls: Calls[_Job]) -> None:
        """Read jobs from a master while there is room, and start them (those
        of a BATCH one by one: the master sends no more than free slots)."""
        while calls.room:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if self.stats is not None:
                self.stats.received += 1
            if len(frames) == 1 and frames[0][LEAD] == BATCH_PREFIX:
                try:
                    bodies = protocol.unpack_batch(frames[0])
                    if not bodies:
                        raise ProtocolError("empty BATCH")
                except ProtocolError as error:
                    self._drop("head", str(error), frames)
                    continue
                if self.stats is not None:
                    self.stats.received += len(bodies) - 1  # jobs, one by one
                for body in bodies:
                    self._start_job(socket, calls, [body])
                continue
            self._start_job(socket, calls, frames)
        calls.flush()  # the async def jobs just read, to the event loop

    def _start_job(self, socket: zmq.Socket, calls: Calls[_Job], frames: list[bytes]) -> None:
        message = self._admitted(socket, frames)
        if message is None:
            return
        try:
            calls.start((socket, message.msg_id), message)
        except PylmError as error:
            self._answer(socket, protocol.encode_error(message.msg_id, error))

    def _answer_ended(self) -> None:
        """Count and answer the jobs that ended (a stream's items are sent
        from here, as its generator gives them); the small results of the
        jobs that ended together go to their master together, as one BATCH
        (up to BATCH_JOBS of them and BATCH_BYTES of payloads)."""
        assert self._calls is not None
        together: dict[zmq.Socket, protocol.Batch] = {}  # a master's socket -> its results
        for (socket, msg_id), job in self._calls.ended():
            if socket.closed:  # its master left meanwhile: nobody to answer
                continue
            if job.expired:  # waited for a thread past its deadline: not run
                if self.stats is not None:
                    self.stats.expired += 1
                late = RequestTimeout(f"job past its deadline on worker {self.name!r}: not run")
                self._answer(socket, protocol.encode_error(msg_id, late), counted=False)
                continue
            try:
                result = self._calls.result(job)
            except PylmError as error:
                self._answer(socket, protocol.encode_error(msg_id, error))
            except _Stream as stream:
                self._stream(socket, msg_id, job.target, stream)
            else:
                frames = protocol.encode(protocol.REPLY, msg_id, result)
                if len(frames) > 1 or len(result) > BATCH_BYTES:
                    self._answer(socket, frames)
                    continue
                batch = together.setdefault(socket, protocol.Batch())
                if not batch.fits(len(result)):
                    self._send_together(socket, batch.take())
                if batch.add(frames[0], len(result)):
                    self._send_together(socket, batch.take())
        for socket, batch in together.items():
            if batch:
                self._send_together(socket, batch.take())

    @staticmethod
    def _id(body: bytes) -> int:
        return int(read_id(body)[0])

    def _admitted(self, socket: zmq.Socket, frames: list[bytes]) -> protocol.Message | None:
        """The REQUEST ``frames`` carry, to run now (counted as served); None
        when it was dealt with here: a malformed message dropped and counted
        (answered when its id can be read, so that the master frees the
        slot), another kind dropped, a job past its deadline expired."""
        try:
            message = protocol.decode(frames)
        except ProtocolError as error:
            self._drop("head", str(error), frames)
            msg_id = protocol.salvage_msg_id(frames)
            if msg_id is not None:
                self._answer(socket, protocol.encode_error(msg_id, error))
            return None
        if message.kind != protocol.REQUEST:
            self._drop(
                "kind", f"a worker takes REQUEST, not {protocol.KIND_NAMES[message.kind]}", frames
            )
            return None
        if past_deadline(frames[0], expiry_stamp(time.time())):
            self._expire(socket, frames[0])
            return None
        self.served += 1
        return message

    def _other(self, socket: zmq.Socket, frames: list[bytes]) -> None:
        """A job off the fast path: run it and answer."""
        message = self._admitted(socket, frames)
        if message is None:
            return
        try:
            result = self._call(message.target, message.payload)
        except PylmError as error:
            self._answer(socket, protocol.encode_error(message.msg_id, error))
        except _Stream as stream:
            self._stream(socket, message.msg_id, message.target, stream)
        else:
            self._answer(socket, protocol.encode(protocol.REPLY, message.msg_id, result))

    def _stream(self, socket: zmq.Socket, msg_id: int, target: bytes, stream: _Stream) -> None:
        """Send the items of a streaming job, numbered, then END (or the
        ERROR that stopped it)."""
        began = time.perf_counter()
        items = sizes = 0
        try:
            for item in stream.items:
                if type(item) is not bytes:
                    item = self._item_bytes(target, item)
                if not self._answer(
                    socket,
                    protocol.encode(
                        protocol.REPLY, msg_id, item, route=COUNT.pack(items), flags=protocol.MORE
                    ),
                ):
                    close = getattr(stream.items, "close", None)
                    if close is not None:  # a generator: its finally blocks run now
                        close()
                    self._count(target, began, sizes, failed=True)
                    return  # the rest of the stream would go nowhere either
                items += 1
                sizes += len(item)
        except PylmError as error:
            self._count(target, began, sizes, failed=True)
            self._answer(socket, protocol.encode_error(msg_id, error))
            return
        except Exception as exc:
            self._count(target, began, sizes, failed=True)
            self._answer(socket, protocol.encode_error(msg_id, self._remote_error(target, exc)))
            return
        self._count(target, began, sizes, failed=False)
        self._answer(socket, [protocol.reply_head(msg_id, protocol.END)])

    def _item_bytes(self, target: bytes, item: object) -> bytes:
        if isinstance(item, (bytearray, memoryview)):
            return bytes(item)
        _, function = protocol.split_target(target)
        raise self._remote_error(
            target, TypeError(f"{function!r} yielded {type(item).__name__}, expected bytes")
        )

    def _count(self, target: bytes, began: float, size: int, *, failed: bool) -> None:
        entry = self._table.get(target)
        stats = None if entry is None else entry[1]
        if stats is not None:
            if failed:
                stats.failed(time.perf_counter() - began, 0)
            else:
                stats.done(time.perf_counter() - began, 0, size)

    def _result_bytes(self, target: bytes, result: object) -> bytes:
        if isinstance(result, Iterator):
            raise _Stream(result)
        return super()._result_bytes(target, result)

    def _dispatch_error(self, target: bytes) -> PylmError:
        server, function = protocol.split_target(target)
        if server == self.master:
            return UnknownFunction(
                f"unknown function {function!r} on worker {self.name!r} of master"
                f" {self.master!r}; it has {', '.join(self.functions) or 'no functions'}",
                server=self.master,
                function=function,
            )
        return super()._dispatch_error(target)

    def _expire(self, socket: zmq.Socket, head: bytes) -> None:
        """A job read past its deadline (``head``: its head) is not run; its
        master hears so, to free the slot (its client stopped waiting)."""
        self._expired(head)
        msg_id, deadline = protocol.read_id_deadline(head)
        late = RequestTimeout(
            f"job past its deadline by {time.time() - deadline:.3f} s when worker"
            f" {self.name!r} read it: not run"
        )
        self._answer(socket, protocol.encode_error(msg_id, late), counted=False)

    def _answer(self, socket: zmq.Socket, frames: list[bytes], counted: bool = True) -> bool:
        """Send an answer to the master on ``socket``; False if it could
        not go (see :meth:`_undelivered`). ``counted``: as a message sent
        (an answer to work that ran)."""
        try:
            socket.send_multipart(frames, copy=copied(frames))
        except zmq.Again:
            self._undelivered(socket, protocol.salvage_msg_id(frames))
            return False
        if counted and self.stats is not None:
            self.stats.sent += 1
        return True

    def _undelivered(self, socket: zmq.Socket, msg_id: int | None) -> None:
        """An answer found no room within the send timeout: the master it
        goes to has stopped reading (it is gone, or stuck). The answer is
        given up, so that the worker serves on and can stop; the job's
        client gets its timeout."""
        master = next((address for address, s in self._sockets.items() if s is socket), "?")
        self.logger.warning(
            "%s: master at %s took no answer for %.1f s; the answer to job %s is given up",
            self.name,
            master,
            self._send_millis / 1000,
            msg_id,
        )
