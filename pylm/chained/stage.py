"""The stage loop every chained server runs: read jobs from the PULL
input, run the function each names, hand the result to the stage's output
(:mod:`pylm.chained.output`: the next stage for a
:class:`~pylm.chained.server.Server`, the clients for a
:class:`~pylm.chained.last.LastServer`), and serve the cache between batches.

A job enters the first stage's PULL socket as a REQUEST whose *route* is the
routing id of the client that sent it. Each stage runs the named function
and sends the result on, keeping message id, route and deadline; the last
stage answers the client the route names. An error anywhere (unknown
function, user exception, non-bytes result) travels on down the chain as an
ERROR with the same route, so it reaches the client that sent the job while
the pipeline keeps flowing.

Every stage also serves its cache (``set/get/delete``, see
:mod:`pylm.cache`) on ``db_address``. Sockets have high-water marks: a slow
stage makes the stages before it wait, and in the end the client, instead
of letting queues grow.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from time import monotonic as _monotonic
from time import time as _time
from typing import TYPE_CHECKING

import zmq

from pylm import protocol
from pylm.base import BaseServer, Options2016, ServerOptions
from pylm.cache_store import Cache
from pylm.chained.concurrent import ConcurrentStage
from pylm.chained.output import Output
from pylm.errors import ProtocolError, PylmError
from pylm.lifecycle import DRAIN_MAX, Drain
from pylm.protocol import (
    BATCH_BYTES,
    BATCH_JOBS,
    BATCH_PREFIX,
    DEADLINE_BYTES,
    FRAME_SLACK,
    HEAD_SIZE,
    LEAD,
    NO_DEADLINE,
    ONE_FRAME_REQUEST,
    expiry_stamp,
    past_deadline,
    read_id,
    read_sizes,
)
from pylm.running import Calls
from pylm.telemetry.counting import SAMPLE_EVERY, Sampling
from pylm.transport import check_address, close_listener, read_envelope, recv_message, rest_of

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["DEFAULT_HWM", "Stage", "addresses"]

DEFAULT_HWM = 1000  # messages a socket queues before its sender waits
IDLE_MS = 1000  # how long an idle stage waits for input at most, then looks again
REWIRE_MS = 200  # how often a stage following the registry looks for changes
BATCH = 256  # messages read in a row before the loop looks at its other sockets
COALESCE_WAIT = 0.001  # s a result waits at most for the jobs read after it
_UNTIMED_MASK = SAMPLE_EVERY - 1  # a BATCH's jobs: index & mask, a call not timed


def addresses(value: str | Sequence[str], what: str) -> list[str]:
    """One address or several, checked; at least one."""
    items = [value] if isinstance(value, str) else list(value)
    if not items:
        raise ValueError(f"{what} needs at least one address")
    return [check_address(item, what) for item in items]


class Stage(BaseServer):
    """What every stage shares: a PULL input, a cache, one serving loop that
    hands every result to the stage's output."""

    _pylm_framework = True
    serves_concurrently = True
    _output: Output  # where results go: set by the kind of stage

    def __init__(
        self,
        name: str,
        pull_address: str | None,
        db_address: str | None,
        options2016: Options2016,
        *,
        hwm: int,
        **options: Unpack[ServerOptions],
    ) -> None:
        super().__init__(name, options2016=options2016, **options)
        self.pull_address = pull_address and check_address(pull_address, "pull_address")
        self.db_address = db_address and check_address(db_address, "db_address")
        self.hwm = hwm
        self.cache = Cache(name)
        self.address: str | None = None  # where the PULL socket listens
        self.db: str | None = None  # where the cache listens
        self._pull: zmq.Socket | None = None
        self._db_socket: zmq.Socket | None = None
        # stop()'s message read (on the cache socket): the loop ends after
        # the round that read it, which goes on whole (a full next stage
        # waited for meanwhile holds results that must still go on).
        self._stop_heard = False
        self._poller = zmq.Poller()
        # ms a wait for input lasts at most (stop() wakes it anyway); shorter
        # when the registry may rewire the stage, or results wait to be sent.
        self._poll_timeout: int = IDLE_MS
        self._sampling = Sampling()  # which calls are timed (pylm.telemetry.counting)
        # Jobs that may overlap (concurrency, async def): served by
        # pylm.chained.concurrent, run off the serving thread.
        self._calls: Calls[protocol.Message] | None = None
        if self._exposed.coroutines or (self.concurrency or 1) > 1:
            self._calls = Calls(name, self._exposed, self.concurrency)

    # ------------------------------------------------------------------ sockets

    def _open(self) -> None:
        pull = self._secure(self.context.socket(zmq.PULL))
        self._pull = pull
        pull.setsockopt(zmq.LINGER, 0)
        pull.setsockopt(zmq.RCVHWM, self.hwm)
        pull.setsockopt(zmq.MAXMSGSIZE, self.max_payload + FRAME_SLACK)
        self.address = self._listen(pull, self.pull_address or self._any_port())
        # A ROUTER, its envelopes read here (see pylm.standalone.servers):
        # junk from one peer costs only its own message.
        db = self._secure(self.context.socket(zmq.ROUTER))
        self._db_socket = db
        db.setsockopt(zmq.LINGER, 0)
        db.setsockopt(zmq.MAXMSGSIZE, self.max_payload + FRAME_SLACK)
        db.bind(self._control_address)  # stop() wakes the loop through it
        self.db = self._listen(db, self.db_address or self._any_port())
        self._open_output()
        self._poller.register(pull, zmq.POLLIN)
        self._poller.register(db, zmq.POLLIN)
        output = self._output
        self._register(
            self._endpoints(),
            required=self._name_only(),
            next=output.next_call(),
            branches=output.branch_calls(),
            tee=output.tee_calls(),
        )

    def _any_port(self) -> str:
        return f"tcp://{self.host}:0"

    def _endpoints(self) -> dict[str, str]:
        assert self.address is not None and self.db is not None
        return {"pull": self.address, "db": self.db}

    def _name_only(self) -> bool:
        return self.pull_address is None or self.db_address is None

    def _deregister(self) -> None:
        self._stop_following()  # before the registry it runs on may close
        super()._deregister()

    def _stop_following(self) -> None:
        self._output.stop_following()

    def _close(self) -> None:
        self._stop_following()
        for socket in (self._pull, self._db_socket, *self._outputs()):
            close_listener(socket)  # a last stage's output listens too
        self._pull = self._db_socket = None

    def _open_output(self) -> None:
        raise NotImplementedError

    def _outputs(self) -> list[zmq.Socket | None]:
        return self._output.close()

    # ------------------------------------------------------------------ the loop

    def _serve(self) -> None:
        if self._calls is not None:
            ConcurrentStage(self, self._calls).serve()
            return
        pull, poll = self._pull, self._poller.poll
        rewire = self._output.rewire  # in this thread, which owns the sockets
        assert pull is not None
        debug = self.logger.isEnabledFor(logging.DEBUG)
        while self.served < self.messages and not self._stop_heard:
            if debug:
                self.logger.debug("%s Waiting for a message", self.name)
            ready = poll(self._poll_timeout)
            # Rewired before serving: what is read after the registry
            # reported a change goes by the new wiring, however long the
            # poll waited (an instance leaving drains only _DRAIN_QUIET).
            rewire()
            for socket, _ in ready:
                if socket is pull:
                    self._drain(pull, debug)
                else:
                    self._serve_other(socket)
            self._tick()
        if self._stop_heard and self.registration is not None:
            self._drain_before_leaving(pull, debug)

    def _drain_before_leaving(self, pull: zmq.Socket, debug: bool) -> None:
        """A registered stage leaves cleanly: it deregisters, so that the
        stages before it stop sending to it, and serves what still arrives
        until its input has been quiet for a moment."""
        self._deregister()
        # Within the stop's deadline (set as stop was heard, _serve_db),
        # which a full next stage waited for gives up at too.
        deadline = self._output.deadline
        drain = Drain(most=DRAIN_MAX if deadline is None else max(0.0, deadline - _monotonic()))
        while (wait := drain.wait_ms()) is not None:
            if pull.poll(wait, zmq.POLLIN):
                self._drain(pull, debug)
                drain.heard()
            self._output.rewire()

    def _tick(self) -> None:
        """Called after every round of the loop (subclasses' timers)."""

    def _drain(self, pull: zmq.Socket, debug: bool) -> None:
        received, passed = self._drain_batch(pull, debug)
        if self.stats is not None:  # counted in locals, added once a batch
            self.stats.received += received
            self.stats.sent += passed

    def _drain_batch(self, pull: zmq.Socket, debug: bool) -> tuple[int, int]:
        """Serve the messages waiting, up to a batch; how many were read and
        how many of them the fast path passed on."""
        recv, call = pull.recv, self._call
        output = self._output
        send_fast = output.send_fast
        # The results of the jobs read in a row go on together, as one BATCH
        # (up to BATCH_JOBS of them, BATCH_BYTES of payloads, none held past
        # COALESCE_WAIT): only what was waiting already, so a job alone goes
        # alone, at once.
        coalesce = output.plain
        fast_message, send_batch = output.fast_message, output.send_batch
        together: list[tuple[bytes, bytes]] = []
        filled, held_since, clock = 0, 0.0, _monotonic
        received = passed = 0
        counting, sampling = self.stats is not None, self._sampling
        untimed = sampling.untimed
        # Work past its deadline is dropped, not run: the clock is read as
        # the batch starts and with each timed call (every call of a server
        # that is not busy, one in SAMPLE_EVERY of a busy one).
        expiry = expiry_stamp(_time())
        heard = self._stop_heard  # (a drain)
        for _ in range(min(BATCH, self.messages - self.served)):
            if self._stop_heard and not heard:  # stop, heard meanwhile: drain, or close
                break
            try:
                # One recv per message: the head tells whether a payload
                # frame follows (asking the socket costs more than the rest).
                body = recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            received += 1
            if debug:
                self.logger.debug("%s Got a message", self.name)
            lead = body[LEAD]
            if lead == BATCH_PREFIX:
                if together:
                    send_batch(together)
                    together, filled = [], 0
                carried, sent_on = self._serve_batch(body)
                received += carried - 1
                passed += sent_on
                continue
            if lead == ONE_FRAME_REQUEST and len(body) >= HEAD_SIZE:
                # Fast path: a one-frame REQUEST with a route.
                target_size, route_size = read_sizes(body)
                start = HEAD_SIZE + target_size
                end = start + route_size
                if route_size and end <= len(body):
                    deadline = body[DEADLINE_BYTES]
                    if deadline < expiry and deadline != NO_DEADLINE:
                        self._expired(body)
                        continue
                    self.served += 1
                    if debug:
                        self._looking_for(body[HEAD_SIZE:start])
                    if untimed:
                        untimed -= 1
                        timed = False
                    else:
                        timed = counting
                        untimed = sampling.untimed_next()
                        expiry = expiry_stamp(_time())
                    try:
                        result = call(body[HEAD_SIZE:start], body[end:], timed)
                    except PylmError as error:
                        if together:  # the results before it go first
                            send_batch(together)
                            together, filled = [], 0
                        output.send_error(protocol.decode([body]), error)
                    else:
                        size = len(result)
                        if coalesce and size <= BATCH_BYTES:
                            if together and filled + size > BATCH_BYTES:
                                send_batch(together)  # full: this one starts the next
                                together, filled = [], 0
                            if not together:
                                held_since = clock()
                            together.append(
                                (body[start:end], fast_message(body, start, end, result))
                            )
                            filled += size
                            if len(together) == BATCH_JOBS or clock() - held_since > COALESCE_WAIT:
                                send_batch(together)
                                together, filled = [], 0
                        else:
                            if together:  # the results before it go first
                                send_batch(together)
                                together, filled = [], 0
                            send_fast(body, start, end, result)
                    passed += 1
                    continue
            if together:  # before anything else goes on (a stream's END after its items)
                send_batch(together)
                together, filled = [], 0
            self._handle([body, *rest_of(pull)])
        if together:
            send_batch(together)
        sampling.untimed = untimed
        return received, passed

    def _serve_batch(self, body: bytes) -> tuple[int, int]:
        """Serve the jobs of a BATCH and send their results on together, as
        BATCHes again; (jobs carried, results the fast path passed on)."""
        try:
            jobs = protocol.unpack_batch(body)
        except ProtocolError as error:
            self._drop("batch", f"{error} (no route back: dropped)", [body])
            return 1, 0
        output = self._output
        if not output.plain:  # branches or tees: the general path, job by job
            for job in jobs:
                self._handle([job])
            return len(jobs), 0
        # Results go on in the jobs' order: together, up to BATCH_BYTES of
        # payloads a BATCH; one larger goes alone, after those before it.
        results: list[tuple[bytes, bytes]] = []  # (route, message), to send together
        filled = passed = alone = 0

        def flush() -> None:
            nonlocal results, filled, passed
            passed += len(results)
            output.send_batch(results)
            results, filled = [], 0

        def add(route: bytes, message: bytes, size: int) -> None:
            nonlocal filled
            if results and filled + size > BATCH_BYTES:
                flush()  # full: this one starts the next
            results.append((route, message))
            filled += size

        call = self._call
        expiry = expiry_stamp(_time())
        for index, job in enumerate(jobs):
            if job[LEAD] == ONE_FRAME_REQUEST and len(job) >= HEAD_SIZE:
                target_size, route_size = read_sizes(job)
                start = HEAD_SIZE + target_size
                end = start + route_size
                if route_size and end <= len(job):
                    if not index & _UNTIMED_MASK:
                        expiry = expiry_stamp(_time())
                    deadline = job[DEADLINE_BYTES]
                    if deadline < expiry and deadline != NO_DEADLINE:
                        self._expired(job)
                        continue
                    self.served += 1
                    try:
                        result = call(job[HEAD_SIZE:start], job[end:], not index & _UNTIMED_MASK)
                    except PylmError as error:
                        failure = protocol.encode_error(
                            read_id(job)[0], error, output.error_route(job[start:end])
                        )
                        if len(failure) == 1 and len(failure[0]) <= BATCH_BYTES:
                            add(job[start:end], failure[0], len(failure[0]))
                        else:  # too large for a batch: on its own
                            flush()
                            output.send_error(protocol.decode([job]), error)
                            alone += 1
                        continue
                    if len(result) > BATCH_BYTES:  # too large for a batch: on its own
                        flush()
                        output.send_fast(job, start, end, result)
                        alone += 1
                        continue
                    add(job[start:end], output.fast_message(job, start, end, result), len(result))
                    continue
            flush()  # what came before goes first
            self._handle([job])  # anything else: one by one, as ever
        flush()
        return len(jobs), passed + alone

    def _serve_other(self, socket: zmq.Socket) -> None:
        """Serve a socket other than the input: here the cache (and stop)."""
        if socket is self._db_socket:
            self._serve_db()

    def _serve_db(self) -> None:
        """Answer the cache requests waiting, up to a batch (and see stop()'s call)."""
        db = self._db_socket
        assert db is not None
        for _ in range(BATCH):
            try:
                frames = recv_message(db)
            except zmq.Again:
                return
            parts = read_envelope(frames)
            if parts is None:
                self._drop("envelope", "a cache request in no envelope known", frames)
                continue
            envelope, message = parts
            if len(message) == 1 and self._is_control(message[0]):
                self._stop_heard = True
                if self._output.deadline is None:
                    # A full next stage waited for: not forever. A stage
                    # found by name drains, and a concurrent one sends on
                    # the results of its jobs in progress: 5 s at most;
                    # another stops at once.
                    waits = self.registration is not None or self._calls is not None
                    self._output.deadline = _monotonic() + (DRAIN_MAX if waits else 0.0)
                return
            try:
                request = protocol.decode(message)
            except ProtocolError as error:
                self._drop("head", f"{error} (a cache request)", message)
                answer = protocol.encode_error(protocol.salvage_msg_id(message) or 0, error)
            else:
                try:
                    answer = self.cache.answer(request)
                except ProtocolError as error:
                    reason = "payload" if request.kind == protocol.REQUEST else "kind"
                    self._drop(reason, f"{error} (a cache request)", message)
                    answer = protocol.encode_error(request.msg_id, error)
            # A ROUTER drops what a peer that is gone or not reading cannot take.
            db.send_multipart([*envelope, *answer], zmq.NOBLOCK)

    def _handle(self, frames: list[bytes]) -> None:
        try:
            message = protocol.decode(frames)
        except ProtocolError as error:
            self._drop("head", f"{error} (no route back: dropped)", frames)
            return
        if message.kind == protocol.END and len(message.payload) not in (0, 8):
            problem = ProtocolError(
                f"an END's count is 8 bytes (or none), got {len(message.payload)}"
            )
            self._drop("payload", str(problem), frames)
            if message.route:
                self._output.send_error(message, problem)  # its client hears why the stream ends
        elif message.kind in (protocol.ERROR, protocol.END):
            if message.route:
                self._output.forward(message, frames)  # an earlier stage failed, or a stream ended
            elif message.kind == protocol.ERROR:
                self._unrouted_error(protocol.decode_error(message.payload))
        elif message.kind != protocol.REQUEST:
            if not message.route:
                self._drop("route", "a message without a route cannot be answered", frames)
                return
            problem = ProtocolError(
                f"stage {self.name!r} takes REQUEST, ERROR and END, not"
                f" {protocol.KIND_NAMES[message.kind]}"
            )
            self._output.send_error(message, problem)
        elif past_deadline(frames[0], expiry_stamp(_time())):
            self._expired(frames[0])
            return
        else:
            # A REQUEST; one without a route (a tee's copy) runs and goes on
            # unanswered; one flagged MORE (a stream's item) stays flagged.
            self.served += 1
            if self.logger.isEnabledFor(logging.DEBUG):
                self._looking_for(message.target)
            try:
                result = self._call(message.target, message.payload)
            except PylmError as error:
                if message.route:
                    self._output.send_error(message, error)
                else:
                    self._unrouted_error(error)
            else:
                self._output.send(message, result)
        if self.stats is not None:
            self.stats.sent += 1

    def _unrouted_error(self, error: PylmError) -> None:
        """A job without a route (a tee's copy) failed: nobody to tell but the log."""
        self._log_limited(
            "unrouted", logging.WARNING, "%s: a job without a route failed: %s", self.name, error
        )

    def _looking_for(self, target: bytes) -> None:
        function = target.rpartition(b".")[2].decode("utf-8", "replace")
        self.logger.debug("Looking for %s", function)

    def _wait_for_room(self, socket: zmq.Socket) -> None:
        """Wait a while for ``socket`` (a full next stage) to take messages,
        serving the cache (and watching for stop) meanwhile."""
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLOUT)
        poller.register(self._db_socket, zmq.POLLIN)
        if self._db_socket in dict(poller.poll(REWIRE_MS)):
            self._serve_db()
