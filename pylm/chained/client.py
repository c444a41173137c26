"""The client of a pipeline: sends jobs to its first stage, receives the
results from its last stage."""

from __future__ import annotations

import itertools
import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import zmq

from pylm import protocol
from pylm.cache import CacheClient
from pylm.calls import DEFAULT_TIMEOUT, Caller, read_answer
from pylm.chained.wiring import Pipeline, Wiring, find_pipeline
from pylm.discovery import DEFAULT_WAIT, check_wait
from pylm.errors import CurveRefused, ProtocolError, PylmError, RequestTimeout
from pylm.lifecycle import Closing
from pylm.liveness import retire, to_live_peers
from pylm.protocol import (
    BATCH_JOBS,
    BATCH_PREFIX,
    COUNT,
    DEFAULT_MAX_PAYLOAD,
    HEAD_SIZE,
    LEAD,
    REPLY_LEAD,
    REPLY_PREFIX,
    pack_id_deadline,
    read_id,
)
from pylm.security import Curve
from pylm.source import Payloads, check_batch
from pylm.telemetry.counting import BUCKETS, SAMPLE_EVERY, FunctionStats
from pylm.transport import check_address, close_socket, default_context, rest_of, send_frame
from pylm.window import (
    Body,
    Follow,
    Job,
    JobResult,
    Outcome,
    Stop,
    Turn,
    Window,
    WindowedClient,
)

if TYPE_CHECKING:
    from pylm.registry import Registry

__all__ = ["JobResult", "LoopClient"]

DEFAULT_IN_FLIGHT = 1000
_FIRST_BOUND = BUCKETS[0]
_UNTIMED_MASK = SAMPLE_EVERY - 1


_RECOUNT = 0.5  # s between recounts of the jobs in flight per first-stage instance


class _Outs:
    """The sockets jobs go out on, one per first-stage instance, so that each
    message goes to the live instance with the fewest of this client's jobs
    in flight (ties take turns): a slow instance gets fewer jobs instead of
    an equal share. With one instance, its socket, and nothing counted."""

    def __init__(self, make: Callable[[str], zmq.Socket], endpoints: list[str]) -> None:
        self._make = make
        self.sockets: dict[str, zmq.Socket] = {}
        self.load: dict[str, int] = {}  # endpoint -> jobs in flight on it
        self.at: dict[int, str] = {}  # job id -> where it went (several instances only)
        self.several = False  # more than one instance: picked, and counted
        self.only: zmq.Socket | None = None  # the socket, when there is one instance
        self._items: list[tuple[str, zmq.Socket]] = []
        self._turn = 0
        for endpoint in endpoints:
            self.add(endpoint)

    def add(self, endpoint: str) -> None:
        if endpoint not in self.sockets:
            self.sockets[endpoint] = self._make(endpoint)
            self.load[endpoint] = 0
            self._changed()

    def remove(self, endpoint: str) -> zmq.Socket | None:
        """Stop sending to ``endpoint``; its socket, for the caller to close."""
        self.load.pop(endpoint, None)
        socket = self.sockets.pop(endpoint, None)
        self._changed()
        return socket

    def _changed(self) -> None:
        self._items = list(self.sockets.items())
        self.several = len(self._items) > 1
        self.only = self._items[0][1] if len(self._items) == 1 else None

    def order(self) -> list[tuple[str, zmq.Socket]]:
        """The instances to try for the next message, best first."""
        items = self._items
        if not self.several:
            return items
        turn = self._turn = (self._turn + 1) % len(items)
        items = items[turn:] + items[:turn]
        load = self.load
        items.sort(key=lambda item: load.get(item[0], 0))
        return items

    def send(self, message: Body, ids: list[int]) -> bool:
        """Send ``message``, jobs ``ids``, to the live instance with the
        fewest jobs in flight that has room for it; False if none has."""
        for endpoint, socket in self.order():
            try:
                if isinstance(message, bytes):
                    send_frame(socket, message, zmq.NOBLOCK)
                else:
                    socket.send_multipart(message, zmq.NOBLOCK)
            except zmq.Again:
                continue  # not live, or full: the next instance
            if self.several:
                self._sent(endpoint, ids)
            return True
        return False

    def _sent(self, endpoint: str, ids: list[int]) -> None:
        """Jobs ``ids`` went to ``endpoint`` (with several instances)."""
        at, load = self.at, self.load
        for msg_id in ids:
            before = at.get(msg_id)
            if before in load:  # sent again: no longer on that one
                load[before] -= 1
            at[msg_id] = endpoint
        load[endpoint] = load.get(endpoint, 0) + len(ids)

    def done(self, msg_id: int) -> None:
        """Job ``msg_id`` was answered."""
        endpoint = self.at.pop(msg_id, None)
        if endpoint in self.load:
            self.load[endpoint] -= 1

    def recount(self, jobs: Mapping[int, object]) -> None:
        """Forget the jobs no longer out (timed out, or answered in a
        stream's END) and count again."""
        at = self.at
        for msg_id in [msg_id for msg_id in at if msg_id not in jobs]:
            del at[msg_id]
        for endpoint in self.load:
            self.load[endpoint] = 0
        for endpoint in at.values():
            if endpoint in self.load:
                self.load[endpoint] += 1

    def close(self) -> None:
        for socket in self.sockets.values():
            close_socket(socket)
        self.sockets.clear()
        self._changed()


def _bucket(seconds: float) -> int:
    return bisect_left(BUCKETS, seconds)


class LoopClient(Caller, WindowedClient, Closing):
    """Sends jobs to the first stage of a pipeline and receives their results
    from the last stage::

        client = LoopClient('tcp://127.0.0.1:5561',   # push_address: the last stage's
                            'tcp://127.0.0.1:5555',   # pull_address: the first stage's
                            'tcp://127.0.0.1:5556',   # db_address: the first stage's
                            'step1')                  # the first stage's name
        for result in client.job('foo', [b'a message', b'another']):
            print(result)
        client = LoopClient('step1')                  # or from the registry

    Each address has the name of the stage's argument it must equal, as in
    the 2016 pylm: ``push_address`` is where the last stage pushes results
    (the client receives them there), ``pull_address`` where the first stage
    pulls jobs (the client sends them there). Given swapped, the client says
    so on its first job instead of waiting out its timeout.

    Results come back to the client that sent the jobs, whatever other
    clients use the pipeline. At most ``max_in_flight`` jobs are out at once;
    beyond that, and whenever the pipeline is full (``hwm``: messages the
    sending socket queues), sending waits for results.
    ``batch``: the small jobs ready at once travel together in one message (a
    BATCH), up to that many (64 by default) and 8 KiB of payloads, and so do
    their results, stage after stage; for many small jobs this multiplies
    the throughput. A job alone goes alone. A message being filled goes
    once 2 ms have passed since it began, and once the iterable is seen to
    wait between items (a queue, a socket), each job of the run goes on its
    own.
    With several first-stage instances, one job per message (each to the
    least loaded). ``batch=1``: one job per message, always.
    ``retry``: a job that seems lost (an instance on its path died or froze)
    is sent again and its first result delivered, later copies dropped
    (:mod:`pylm.window` says when; execution is then at least once).
    A LoopClient is for one thread at a time.
    """

    _kind = "LoopClient"

    def __init__(
        self,
        push_address: str | Sequence[str],
        pull_address: str | None = None,
        db_address: str | None = None,
        server_name: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_in_flight: int = DEFAULT_IN_FLIGHT,
        batch: int = BATCH_JOBS,
        hwm: int = 1000,
        retry: bool = True,
        announce: bool = True,
        context: zmq.Context | None = None,
        registry: Registry | str | None = None,
        curve: Curve | None = None,
        wait: float = DEFAULT_WAIT,
    ) -> None:
        pipeline: Pipeline | None = None
        curve = curve if curve is not None else Curve.from_env()
        if pull_address is None and db_address is None and server_name is None:
            # Only the first stage's name: the rest comes from the registry,
            # followed from then on (stages' instances joining or leaving).
            if not isinstance(push_address, str) or "://" in push_address:
                raise ValueError(
                    "give LoopClient the first stage's name alone, or all four of"
                    " push_address, pull_address, db_address and server_name"
                )
            server_name = push_address
            pipeline = find_pipeline(server_name, registry, check_wait(wait), curve)
            push_address = pipeline.lasts.endpoints
            pull_address = pipeline.firsts.endpoints[0]
            db_address = pipeline.db
        if pull_address is None or db_address is None or server_name is None:
            raise ValueError("pull_address, db_address and server_name go together")
        super().__init__(pull_address, server_name, timeout, max_payload, curve=curve, wait=wait)
        # CURVE keys of the first and the last stage: by name, from their records
        # (None: that stage takes plain connections); by address, from the settings.
        self._by_name = pipeline is not None
        if pipeline is not None:
            self.server_key, last_key = pipeline.first_key, pipeline.last_key
            if (pipeline.first_key, pipeline.last_key) == (None, None):
                self.curve = None  # the pipeline takes plain connections: so does this client
            self._peers, self._registry = pipeline.firsts, pipeline.registry
            self.endpoints = pipeline.firsts.endpoints
            self.connection = ",".join(pipeline.firsts.endpoints)
        else:
            last_key = self.server_key
        pushes = [push_address] if isinstance(push_address, str) else list(push_address)
        addresses = [check_address(address, "push_address") for address in pushes]
        if not addresses:
            raise ValueError("push_address needs at least one address")
        self._init_window(max_in_flight, retry)
        self._keep_books(self.books)
        self.batch = check_batch(batch)
        self.db_address = check_address(db_address, "db_address")
        # The route: the results sockets' routing id, which every job carries
        # so that the last stage knows where its result goes.
        self.route = b"pylm-" + os.urandom(12)
        context = default_context(context)
        self._context = context
        self._ids = itertools.count(1)
        self._wiring = Wiring(
            addresses,
            context=context,
            route=self.route,
            lasts=None if pipeline is None else pipeline.lasts,
            # Addresses given (not from the registry) may be wrong; CURVE's own
            # handshake failures are watched already (Caller._no_answer).
            watch=not self._by_name and self.curve is None,
            secure=lambda socket: self._secure_stage(socket, last_key),
            forget=self._connections.forget,
            no_answer=self._no_answer,
            ids=self._ids,
        )
        self._hwm = hwm
        self._outs: _Outs | None = _Outs(self._jobs_socket, self.endpoints)
        self._cache: CacheClient | None = None
        self.dropped = 0  # results that belong to no job in flight (late, or garbage)
        if announce:
            print("Client with the following connections:")
            for address in self.push_addresses:
                print(f" *Listening to input from {address}")
            print(f" *Sending jobs to {self.connection}")

    @property
    def push_addresses(self) -> list[str]:
        """The last stage's addresses this client receives results from."""
        return self._wiring.addresses

    def _jobs_socket(self, endpoint: str) -> zmq.Socket:
        """A socket jobs go out on, to the first-stage instance at
        ``endpoint``; it takes jobs only while that instance is live
        (pylm.liveness); what was queued for one that died is sent again by
        the window's books."""
        jobs = self._secure(to_live_peers(self._context.socket(zmq.PUSH)))
        jobs.setsockopt(zmq.LINGER, 0)
        jobs.setsockopt(zmq.SNDHWM, self._hwm)
        if self._wiring.watches:  # a socket has one monitor: the wiring's, until greeted
            self._wiring.watch_jobs(jobs, endpoint)
        else:
            self._connections.watch(jobs, drops=True)  # its live peers, for the metrics
        jobs.connect(endpoint)
        return jobs

    def _follow(self, poller: zmq.Poller | None, timeout: float) -> None:
        """Apply what the registry says of the first and last stages now:
        jobs go to the first stage's instances, results come from every last
        stage instance (a new one is greeted before going on)."""
        peers, outs = self._peers, self._outs
        if peers is not None and peers.changed and outs is not None:
            joined, left = peers.take()
            for endpoint in left:
                self._connections.discard(endpoint)
                socket = outs.remove(endpoint)
                if socket is not None:  # what it queued still goes there (liveness.retire)
                    retire(socket, self._connections)
            for endpoint in joined:
                outs.add(endpoint)
            self.endpoints = peers.endpoints
            self.connection = ",".join(self.endpoints)
        self.dropped += self._wiring.follow(poller, timeout)

    # ------------------------------------------------------------------ jobs

    def _open(
        self, function: str, payloads: Iterator[bytes], timeout: float, window: Window
    ) -> Turn:
        outs = self._outs
        if outs is None:
            raise RuntimeError("the client is closed")
        self._follow(None, timeout)
        self.dropped += self._wiring.greet(timeout)
        _, target, numbers = self._calls._target(function)
        # Every job's body is prefix + id and deadline + tail + payload.
        prefix = protocol.request_prefix(target, self.route)
        tail = target + self.route
        inline_limit = min(self._calls.max_payload, protocol.SPLIT_PAYLOAD)
        add, add_one, resent, batch = window.add, window.add_one, window.resent, self.batch
        source = Payloads(payloads, batch, inline_limit)
        wiring = self._wiring
        results = wiring.sockets  # changed in place as the last stage's instances change
        poller = zmq.Poller()
        for socket in results:
            poller.register(socket, zmq.POLLIN)
        # A message the pipeline had no room for yet: its jobs' ids, the
        # message, and whether they are jobs sent again. Its jobs are on the
        # window's books from the moment they are taken (their deadlines run).
        waiting: tuple[list[int], Body, bool] | None = None
        ids, clock, wall = self._ids, time.monotonic, time.time
        now = clock()  # when the last message was taken or sent again
        outs.recount(window.jobs)  # what earlier runs left out (timed out) is forgotten
        recount_at = now + _RECOUNT

        def send(room: int, until: float) -> Stop:
            """Jobs sent again first, then new ones while there is room: up
            to ``batch`` small jobs per message."""
            nonlocal waiting, now, recount_at
            if outs.several and clock() >= recount_at:  # jobs that timed out: forgotten
                outs.recount(window.jobs)
                recount_at = clock() + _RECOUNT
            if waiting is not None and waiting[0][0] not in window.jobs:
                waiting = None  # it timed out before the pipeline had room for it
            while True:
                if waiting is None:
                    if window.again:
                        waiting = again_message()
                    elif room <= 0:
                        return Stop.FULL
                    elif source.exhausted:
                        return Stop.DONE
                    else:
                        # One job a message with several instances, each to the
                        # least loaded: a slow one gets fewer, and the jobs of one
                        # that dies are sent again once the others answer jobs
                        # sent after.
                        taken, alone = source.take(1 if outs.several else room)
                        if alone is not None:  # a large payload (or not bytes): on its own
                            payload = protocol.check_payload(alone, self._calls.max_payload)
                            msg_id = next(ids)
                            body = large(msg_id, payload, wall() + timeout)
                            now = clock()
                            add_one(msg_id, payload, now)
                            room -= 1
                            waiting = ([msg_id], body, False)
                        elif not taken:
                            return Stop.DONE
                        else:
                            deadline = wall() + timeout
                            group: list[int] = []
                            bodies: list[bytes] = []
                            for job in taken:
                                msg_id = next(ids)
                                group.append(msg_id)
                                stamp = pack_id_deadline(msg_id, deadline)
                                bodies.append(b"".join((prefix, stamp, tail, job)))
                            now = clock()
                            if len(bodies) == 1:
                                add_one(group[0], taken[0], now)
                                room -= 1
                                waiting = (group, bodies[0], False)
                            else:
                                add(group, taken, now)
                                room -= len(group)
                                waiting = (group, protocol.pack_batch(bodies), False)
                outgoing = waiting[1]
                only = outs.only
                if only is not None:  # one instance: no choice to make
                    try:
                        if isinstance(outgoing, bytes):
                            send_frame(only, outgoing, zmq.NOBLOCK)
                        else:
                            only.send_multipart(outgoing, zmq.NOBLOCK)
                    except zmq.Again:
                        return Stop.BLOCKED
                elif not outs.send(outgoing, waiting[0]):
                    return Stop.BLOCKED
                if waiting[2]:
                    now = clock()
                    resent(waiting[0], now)
                waiting = None
                if now >= until:
                    return Stop.SLICED

        def large(msg_id: int, payload: bytes, deadline: float) -> Body:
            """The message of a job whose payload does not go inline."""
            frames = protocol.encode(
                protocol.REQUEST, msg_id, payload, target, self.route, deadline
            )
            return frames[0] if len(frames) == 1 else frames

        def again_message() -> tuple[list[int], Body, bool]:
            """The next message of jobs to send again (``window.again``), with
            their ids and deadlines: up to ``batch`` small jobs and
            BATCH_BYTES of payloads in one (as the first time), a large one
            alone."""
            again = window.again
            to_wall = wall() - clock()  # a deadline on the window's clock, on the wire's
            group: list[int] = []
            bodies: list[bytes] = []
            filled = 0
            for msg_id, job in again:
                payload = job.body
                assert isinstance(payload, bytes)  # sent again only while it has its payload
                deadline = job.deadline + to_wall
                if len(payload) > inline_limit:
                    if group:
                        break
                    del again[0]
                    return [msg_id], large(msg_id, payload, deadline), True
                if group and filled + len(payload) > protocol.BATCH_BYTES:
                    break  # the message is full: this one goes in the next
                stamp = pack_id_deadline(msg_id, deadline)
                bodies.append(b"".join((prefix, stamp, tail, payload)))
                group.append(msg_id)
                filled += len(payload)
                if len(group) == batch:
                    break
            del again[: len(group)]
            return group, bodies[0] if len(group) == 1 else protocol.pack_batch(bodies), True

        def polled() -> list[tuple[zmq.Socket, int]]:
            """The sockets wait() polls now: results, and room to send a waiting message."""
            read: list[tuple[zmq.Socket, int]] = [(socket, zmq.POLLIN) for socket in results]
            if waiting is None:
                return read
            return read + [(socket, zmq.POLLOUT) for socket in outs.sockets.values()]

        def wait(ms: int) -> list[Outcome]:
            sockets = list(outs.sockets.values()) if waiting is not None else []
            for jobs in sockets:
                poller.register(jobs, zmq.POLLOUT)
            ready = dict(poller.poll(ms))
            for jobs in sockets:
                poller.unregister(jobs)
            outcomes: list[Outcome] = []
            for socket in results:
                if socket in ready:
                    outcomes += self._collect(socket, window, numbers)
            return outcomes

        def changed() -> bool:
            return wiring.changed or (self._peers is not None and self._peers.changed)

        return Turn(send, wait, polled, Follow(changed, lambda: self._follow(poller, timeout)))

    def _opens_at_once(self) -> bool:
        """Every last stage known is greeted already (a new one is greeted
        before jobs go out: that waits for its answer)."""
        peers = self._peers
        return self._wiring.greeted and not self._wiring.changed and not (peers and peers.changed)

    def _collect(
        self, socket: zmq.Socket, window: Window, numbers: FunctionStats | None
    ) -> list[Outcome]:
        """Every result waiting on ``socket``; counted in ``numbers``. A
        result for no job out is dropped (a copy of a job sent again, or
        one that timed out, or garbage) and counted."""
        outcomes: list[Outcome] = []
        recv, jobs, books = socket.recv, window.jobs, window.books
        pop = jobs.pop
        outs = self._outs
        at = outs.at if outs is not None else {}  # empty with one first-stage instance
        last: Job | None = None  # the last job answered
        # One clock reading for the results drained together (they were all
        # there by then): a job took now - its sending time.
        now = time.monotonic()
        bodies: list[bytes] = []  # the rest of a BATCH of results being read
        while True:
            in_batch = bool(bodies)
            if in_batch:
                body = bodies.pop()
            else:
                try:
                    body = recv(zmq.NOBLOCK)
                except zmq.Again:
                    if last is not None:
                        window.answered(last, now, len(outcomes))
                    return outcomes
                if body[LEAD] == BATCH_PREFIX:
                    try:
                        bodies = protocol.unpack_batch(body)[::-1]  # popped from the end: in order
                    except ProtocolError:
                        self.dropped += 1
                    continue
            if body[REPLY_LEAD] == REPLY_PREFIX and len(body) >= HEAD_SIZE:  # a one-frame REPLY
                msg_id = read_id(body)[0]
                entry = pop(msg_id, None)
                if entry is None:
                    self.dropped += 1
                    books.unknown(msg_id)
                else:
                    last = entry
                    outcomes.append((entry.index, body[HEAD_SIZE:], None, True))
                    if at:
                        outs.done(msg_id)  # type: ignore[union-attr]
                    if numbers is None:
                        continue
                    # numbers.done(...), inline, timing a sample (pylm.metrics.SAMPLE_EVERY)
                    if len(outcomes) & _UNTIMED_MASK == 1:
                        took = now - entry.sent
                        numbers.seconds += took
                        numbers.buckets[0 if took <= _FIRST_BOUND else _bucket(took)] += 1
                    else:
                        numbers.untimed += 1
                    numbers.bytes_out += len(body) - HEAD_SIZE
                continue
            frames = [body] if in_batch else [body, *rest_of(socket)]
            message = read_answer(frames)
            entry = None if message is None else jobs.get(message.msg_id)
            if entry is None or message is None:
                self.dropped += 1
                if message is not None:
                    books.unknown(message.msg_id)
                continue
            if message.kind == protocol.REPLY and message.flags & protocol.MORE:
                # An item of a job that gives several results (a Hub's).
                outcomes.append((entry.index, message.payload, None, False))
                window.tally(message.msg_id, entry, None)
                continue
            if message.kind == protocol.END:
                payload = message.payload
                count = COUNT.unpack(payload)[0] if len(payload) == COUNT.size else 0
                window.tally(message.msg_id, entry, count)
                continue
            pop(message.msg_id)
            if at:
                outs.done(message.msg_id)  # type: ignore[union-attr]
            last = entry
            took = now - entry.sent
            try:
                result = protocol.result_of(message)
            except PylmError as error:
                outcomes.append((entry.index, None, error, True))
                if numbers is not None:
                    numbers.failed(took, 0)
            else:
                outcomes.append((entry.index, result, None, True))
                if numbers is not None:
                    numbers.done(took, 0, len(result))

    def _secure(self, socket: zmq.Socket, server_key: bytes | None = None) -> zmq.Socket:
        return self._secure_stage(socket, server_key or self.server_key)  # the first stage

    def _secure_stage(self, socket: zmq.Socket, key: bytes | None) -> zmq.Socket:
        """CURVE to the stage whose key is ``key``; plain to a stage found
        by name that registered none."""
        if self._by_name and key is None:
            return socket
        return super()._secure(socket, key)

    def _no_answer(self, text: str, separator: str = ": ") -> RequestTimeout:
        error = super()._no_answer(text, separator)
        if isinstance(error, CurveRefused) or self._by_name:
            return error
        return RequestTimeout(
            f"{text}{separator}is every stage running? Check the addresses too: the last"
            " stage's push_address is this client's push_address, the first stage's"
            " pull_address this client's pull_address, and each stage's next_address the"
            " next stage's pull_address"
        )

    # ------------------------------------------------------------------ cache

    def _cache_client(self) -> CacheClient:
        if self._cache is None:
            self._cache = CacheClient(
                self.db_address,
                self.server_name,
                timeout=self.timeout,
                context=self._context,
                curve=self.curve and Curve(self.curve.keys, server_key=self.server_key),
            )
        return self._cache

    def set(self, value: bytes, key: str | None = None) -> str:
        """Store ``value`` in the first stage's cache; return its key."""
        return self._cache_client().set(value, key)

    def get(self, key: str) -> bytes:
        """The value under ``key`` in the first stage's cache."""
        return self._cache_client().get(key)

    def delete(self, key: str) -> None:
        """Remove ``key`` from the first stage's cache."""
        self._cache_client().delete(key)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._wiring.close()
        self._stop_following()
        if self._outs is not None:
            self._outs.close()
            self._outs = None
        if self._cache is not None:
            self._cache.close()
            self._cache = None
