"""Serving a stage's jobs concurrently (``concurrency=N``, or ``async def``
functions): at most N jobs in progress at once.

The serving thread keeps the stage's sockets, as in the one-at-a-time loop
(:mod:`pylm.chained.stage`): it reads jobs while fewer than N are in
progress (beyond that, jobs wait in ZeroMQ's queues and the stages before
wait: backpressure, not memory), serves the cache, follows the registry, and
hands every result to the stage's output. A job runs elsewhere
(:class:`pylm.running.Calls`) and comes back to the serving thread to be
counted and sent on. Results go on in the order their jobs end: a client
matches each result to its job, and ends a stream once its END and every
item it announces are in, whatever their order.

On stop, a stage found by name leaves the registry and reads what its senders
still send until its input is quiet, as the one-at-a-time loop does; then,
or at the ``messages`` limit, it reads no more and waits for the jobs in
progress, at most :data:`~pylm.lifecycle.DRAIN_MAX` seconds, before it ends.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

import zmq

from pylm import protocol
from pylm.errors import ProtocolError, PylmError
from pylm.lifecycle import DRAIN_MAX, DRAIN_QUIET
from pylm.protocol import BATCH_PREFIX, LEAD, expiry_stamp, past_deadline
from pylm.running import Calls, Ended
from pylm.transport import rest_of

if TYPE_CHECKING:
    from pylm.chained.stage import Stage

__all__ = ["ConcurrentStage"]


class ConcurrentStage:
    """The serving loop of ``stage`` when its jobs may overlap; :meth:`serve`
    runs in the serving thread until stop or the messages limit."""

    def __init__(self, stage: Stage, calls: Calls[protocol.Message]) -> None:
        self.stage = stage
        self.calls = calls
        # Jobs read but not started (a BATCH carries more than the room),
        # and jobs ended but not sent on (a stop came in between): each is
        # taken off before it is served, so that a stop met while serving
        # one leaves the others for the next round.
        self.waiting: deque[list[bytes]] = deque()
        self.done: deque[tuple[protocol.Message, Ended]] = deque()
        self.reading = True  # until stop, a quiet drain or the messages limit
        self.draining = False  # stopping, registered: serving what senders still send
        self.give_up = 0.0  # monotonic time after which a stop waits no more

    def serve(self) -> None:
        stage = self.stage
        poller = stage._poller
        calls = self.calls
        try:
            calls.open()
            poller.register(calls.fd, zmq.POLLIN)
            self._serve(poller)
        finally:
            calls.close()

    def _serve(self, poller: zmq.Poller) -> None:
        stage, calls = self.stage, self.calls
        pull = stage._pull
        assert pull is not None
        quiet_since = time.monotonic()
        while self.reading or calls.in_progress or self.waiting or self.done:
            now = time.monotonic()
            if not self.reading and now >= self.give_up:
                stage.logger.warning(
                    "%s: stopped with %d job(s) still in progress, not sent on",
                    stage.name,
                    calls.in_progress + len(self.waiting) + len(self.done),
                )
                return
            listen = self.reading and calls.room and not self.waiting
            poller.modify(pull, zmq.POLLIN if listen else 0)
            events = dict(poller.poll(self._wait_ms(now)))
            now = time.monotonic()
            if not listen or pull in events:
                quiet_since = now  # quiet means: listening, and nothing came
            stage._output.rewire()
            if calls.fd in events:
                self.done.extend(calls.ended())
            self._send_done()
            self._start_waiting()
            if listen and pull in events and not stage._stop_heard:
                self._read(pull)
            calls.flush()  # the async def jobs just started, to the event loop
            for socket in events:
                if socket is not pull and socket != calls.fd:
                    stage._serve_other(socket)  # the cache, clients' hellos, stop
            stage._tick()
            if stage._stop_heard:
                self._stop(now)
            if self.draining and self.reading:
                if now - quiet_since > DRAIN_QUIET or now > self.give_up:
                    self.reading = False  # quiet: the senders have moved on
            if self.reading and stage.served >= stage.messages:
                self.reading, self.give_up = False, now + DRAIN_MAX

    def _wait_ms(self, now: float) -> int:
        if self.done or (self.waiting and self.calls.room):
            return 0
        wait = self.stage._poll_timeout
        if self.draining:
            wait = min(wait, round(DRAIN_QUIET * 500))
        if not self.reading:  # waiting for the jobs in progress: no later than give_up
            wait = min(wait, max(1, round((self.give_up - now) * 1000)))
        return wait

    def _stop(self, now: float) -> None:
        """stop() was called: a stage found by name leaves the registry and
        serves what its senders still send (until quiet); another reads no
        more. Either way, the jobs in progress are waited for (and a full
        next stage too) until give_up."""
        if self.give_up:
            return  # stopping already
        stage = self.stage
        self.give_up = now + DRAIN_MAX
        stage._output.deadline = self.give_up
        if stage.registration is None:
            self.reading = False
        else:
            stage._deregister()
            self.draining = True

    def _read(self, pull: zmq.Socket) -> None:
        """Read jobs and start them, until one waits for room."""
        stage = self.stage
        stats = stage.stats
        while not self.waiting and stage.served < stage.messages:
            try:
                body = pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if stats is not None:
                stats.received += 1
            if body[LEAD] == BATCH_PREFIX:
                try:
                    jobs = protocol.unpack_batch(body)
                except ProtocolError as error:
                    stage._drop("batch", f"{error} (no route back: dropped)", [body])
                    continue
                if stats is not None:
                    stats.received += len(jobs) - 1
                self.waiting.extend([job] for job in jobs)
            else:
                self.waiting.append([body, *rest_of(pull)])
            self._start_waiting()

    def _start_waiting(self) -> None:
        """Start the jobs read, while there is room (a BATCH's jobs all,
        past the messages limit too, as the one-at-a-time loop does)."""
        calls = self.calls
        while self.waiting and calls.room:
            self._start(self.waiting.popleft())

    def _start(self, frames: list[bytes]) -> None:
        """Start the job ``frames`` carry; anything else (an earlier stage's
        ERROR, a stream's END, junk) is served as the one-at-a-time loop
        serves it."""
        stage = self.stage
        try:
            message = protocol.decode(frames)
        except ProtocolError:
            stage._handle(frames)  # dropped, counted
            return
        if message.kind != protocol.REQUEST:
            stage._handle(frames)
            return
        if past_deadline(frames[0], expiry_stamp(time.time())):
            stage._expired(frames[0])
            return
        stage.served += 1
        try:
            self.calls.start(message, message)
        except PylmError as error:
            self._failed(message, error)

    def _send_done(self) -> None:
        """Count the jobs that ended and send their results on."""
        stage, calls, done = self.stage, self.calls, self.done
        output, stats = stage._output, stage.stats
        while done:
            message, call = done.popleft()
            if call.expired:  # waited for a thread past its deadline: not run
                if stats is not None:
                    stats.expired += 1
                continue
            try:
                result = calls.result(call)
            except PylmError as error:
                self._failed(message, error)
            else:
                output.send(message, result)
            if stats is not None:
                stats.sent += 1

    def _failed(self, message: protocol.Message, error: PylmError) -> None:
        """A job failed: its client hears why (one without a route, a tee's
        copy, has only the log)."""
        if message.route:
            self.stage._output.send_error(message, error)
        else:
            self.stage._unrouted_error(error)
