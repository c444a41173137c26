"""Serving a standalone server's calls concurrently (``concurrency=N``, or
``async def`` functions): at most N calls in progress at once.

The serving thread keeps the server's socket, as in the one-at-a-time loop:
it reads requests while fewer than N calls are in progress (beyond that,
requests wait in ZeroMQ's queues: backpressure, not memory), and sends every
answer. A call runs elsewhere (:class:`pylm.running.Runner`: an ``async def``
function on the server's event loop, a blocking one on its pool), and comes
back to the serving thread to be counted and answered. On stop, or at the
``messages`` limit, the loop reads no more and waits for the calls in
progress, at most :data:`~pylm.lifecycle.DRAIN_MAX` seconds, before it ends.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import zmq

from pylm import protocol
from pylm.errors import ProtocolError, PylmError
from pylm.lifecycle import DRAIN_MAX, DRAIN_QUIET
from pylm.protocol import expiry_stamp, past_deadline
from pylm.running import Calls
from pylm.transport import read_envelope

if TYPE_CHECKING:
    from pylm.standalone.servers import Server

__all__ = ["ConcurrentLoop"]

_IDLE_MS = 1000  # ms a wait lasts at most (then it waits again)

# A call in progress: the envelope to answer in, and its id.
_Call = tuple[list[bytes], int]


class ConcurrentLoop:
    """The serving loop of ``server`` when its calls may overlap; :meth:`serve`
    runs in the serving thread until stop or the messages limit."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.calls: Calls[_Call] = Calls(server.name, server._exposed, server.concurrency)
        self.last_answer = 0.0  # when calls were last answered (monotonic)

    def serve(self) -> None:
        try:
            self.calls.open()
            self._serve()
        finally:
            self.calls.close()

    def _serve(self) -> None:
        server = self.server
        socket = server._socket
        assert socket is not None
        stats = server.stats
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        calls = self.calls
        poller.register(calls.fd, zmq.POLLIN)
        self.reading = True  # until stop, a quiet drain or the messages limit
        self.draining = False  # stopping, registered: serving what clients still send
        self.stopped = False  # stop() seen (its flag, or its message on the socket)
        self.give_up = quiet_since = 0.0
        while self.reading or calls.in_progress:
            room = self.reading and calls.room
            poller.modify(socket, zmq.POLLIN if room else 0)
            wait = round(DRAIN_QUIET * 500) if self.draining else _IDLE_MS
            if not self.reading:  # waiting for the calls in progress: no later than give_up
                wait = min(wait, max(1, round((self.give_up - time.monotonic()) * 1000)))
            events = dict(poller.poll(wait))
            now = time.monotonic()
            if calls.fd in events:
                self._answer_ended()
            if not room or socket in events:
                quiet_since = now  # quiet means: listening, and nothing came
            if room and socket in events:
                while calls.room and server.served < server.messages:
                    try:
                        frames = socket.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if stats is not None:
                        stats.received += 1
                    if len(frames) == 3 and not frames[1] and server._is_control(frames[2]):
                        if stats is not None:
                            stats.received -= 1  # stop's wake-up call is no message
                        if not self.stopped:
                            self._stop(now)
                        if not self.reading:
                            break
                        continue
                    self._start(frames)
                calls.flush()  # the async def calls just read, to the event loop
            if server._stopping and not self.stopped:  # stop(), while no room to read its call
                self._stop(now)
            if (
                self.reading
                and self.draining
                and (now - quiet_since > DRAIN_QUIET or now > self.give_up)
            ):
                self.reading = False  # quiet: the clients have moved on
            if self.reading and server.served >= server.messages:
                self.reading, self.give_up = False, now + DRAIN_MAX
            if not self.reading and calls.in_progress and now >= self.give_up:
                server.logger.warning(
                    "%s: stopped with %d call(s) still in progress, not answered",
                    server.name,
                    calls.in_progress,
                )
                return

    def _stop(self, now: float) -> None:
        """stop() was called: a server found by name leaves the registry and
        serves what its clients still send (until quiet); another reads no
        more. Either way, the calls in progress are waited for until
        give_up."""
        self.stopped = True
        self.give_up = now + DRAIN_MAX
        if self.server.registration is None:
            self.reading = False
        else:
            self.server._deregister()
            self.draining = True

    def _start(self, frames: list[bytes]) -> None:
        """Start the call ``frames`` ask for, or answer or drop them here, as
        the one-at-a-time loop does, if they ask for no call."""
        server = self.server
        parts = read_envelope(frames)
        if parts is None:
            server._handle_other(frames)  # drops it, counted
            return
        envelope, body = parts
        try:
            message = protocol.decode(body)
        except ProtocolError:
            server._handle_other(frames)  # drops it, counted, and answers the error
            return
        if message.kind != protocol.REQUEST:
            server._handle_other(frames)
            return
        if past_deadline(body[0], expiry_stamp(time.time())):
            server._expired(body[0])
            return
        server.served += 1
        try:
            self.calls.start((envelope, message.msg_id), message)
        except PylmError as error:
            server._answer(envelope, protocol.encode_error(message.msg_id, error))

    def _answer_ended(self) -> None:
        """Count and answer the calls that ended."""
        server = self.server
        self.last_answer = time.monotonic()
        for (envelope, msg_id), call in self.calls.ended():
            if call.expired:  # waited for a thread past its deadline: not run
                if server.stats is not None:
                    server.stats.expired += 1
                continue
            try:
                result = self.calls.result(call)
            except PylmError as error:
                server._answer(envelope, protocol.encode_error(msg_id, error))
                continue
            server._answer(envelope, protocol.encode(protocol.REPLY, msg_id, result))
