"""The standalone request/reply server: one ROUTER socket, one serving loop.

Clients (:class:`pylm.standalone.client.Client` and its asyncio sibling:
DEALER sockets; or any ZeroMQ REQ socket, speaking :mod:`pylm.protocol`)
send REQUEST messages; the server runs the named function and answers every
message in the envelope it came in, with a REPLY or an ERROR. Requests are served one at a
time, fairly queued from all clients. Messages in no envelope it knows are
dropped and counted; nothing a peer sends makes the server wait for it.
CACHE requests (``Client.set/get/delete``) reach the server's cache
(:mod:`pylm.cache`) on the same socket, off the fast path.
"""

from __future__ import annotations

import logging
import sys
import time
from functools import partial
from typing import TYPE_CHECKING

import zmq

from pylm import protocol
from pylm.base import BaseServer, Options2016, ServerOptions
from pylm.cache_store import Cache
from pylm.errors import ProtocolError, PylmError
from pylm.lifecycle import DRAIN_MAX, DRAIN_QUIET
from pylm.protocol import (
    DEADLINE_BYTES,
    FRAME_SLACK,
    HEAD_SIZE,
    LEAD,
    NO_DEADLINE,
    ONE_FRAME_REQUEST,
    SPLIT_PAYLOAD,
    expiry_stamp,
    past_deadline,
    read_id,
    read_sizes,
)
from pylm.telemetry.counting import Sampling
from pylm.transport import (
    check_address,
    close_listener,
    copied,
    read_envelope,
    rest_of,
    send_frame,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from pylm.standalone.concurrent import ConcurrentLoop


__all__ = ["Server"]

# Frames other than the payload are small; this slack bounds them.
_IDLE_MS = 1000  # ms a wait for the next message lasts at most (then it waits again)
_LAST_ANSWER_MS = 1000  # ms the last answers may take to go out (messages limit)
_SNDMORE = zmq.SNDMORE
# pyzmq's compiled recv; ``_recv(socket, 0, False)`` gives a Frame, whose
# ``more`` says whether frames follow.
_recv = getattr(zmq.backend, "Socket", zmq.Socket).recv


class Server(BaseServer):
    """A request/reply server. Subclass it and add methods that take and
    return bytes::

        class MyServer(Server):
            def foo(self, message):
                return b'you sent me ' + message

        MyServer('my_server', 'tcp://127.0.0.1:5555').start()
        MyServer('my_server').start()   # only a name: a free port, registered in etcd

    ``rep_address`` may use port 0 (``tcp://127.0.0.1:0``) to let the OS pick
    a free port; :attr:`address` then tells which one. ``messages``: serve that
    many requests, then return from :meth:`start`.

    ``perf_address`` and ``ping_address`` are accepted for compatibility with
    the 2016 pylm and ignored with a warning: a server answers pings on its
    own address (``Client.ping``).

    ``self.cache`` is the server's cache (:class:`~pylm.cache.Cache`), a dict
    of bytes its functions may use, which clients reach with ``set``, ``get``
    and ``delete``.
    """

    _pylm_framework = True
    kind = "standalone"
    serves_concurrently = True

    def __init__(
        self,
        name: str,
        rep_address: str | None = None,
        log_address: str | None = None,
        perf_address: str | None = None,
        ping_address: str | None = None,
        log_level: int = logging.INFO,
        messages: int = sys.maxsize,
        **options: Unpack[ServerOptions],
    ) -> None:
        old = Options2016(log_address, perf_address, ping_address, log_level, messages)
        super().__init__(name, options2016=old, **options)
        self.rep_address = (
            None if rep_address is None else check_address(rep_address, "rep_address")
        )
        self.cache = Cache(name)
        self.address: str | None = None
        self._socket: zmq.Socket | None = None
        self._concurrent: ConcurrentLoop | None = None  # the loop, when calls overlap

    def _open(self) -> None:
        # A ROUTER, not a REP: the envelope is read here, so a peer that
        # sends junk (no delimiter, a broken connection mid-message) costs
        # only its own message, where libzmq's REP could lose the answers of
        # the callers after it. Answers to a peer that is gone or not
        # reading are dropped by libzmq, never waited for.
        socket = self._secure(self.context.socket(zmq.ROUTER))
        self._socket = socket
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, self.max_payload + FRAME_SLACK)
        socket.bind(self._control_address)
        self.address = self._listen(socket, self.rep_address or f"tcp://{self.host}:0")
        self.logger.debug("%s listening on %s", self.name, self.address)
        self._register({"rep": self.address}, required=self.rep_address is None)

    def _close(self) -> None:
        ended = self.served >= self.messages
        # Calls a concurrent loop answered as it stopped: their answers are
        # let out too.
        loop = self._concurrent
        late = loop is not None and time.monotonic() - loop.last_answer < DRAIN_QUIET
        try:
            if ended or late:
                self._let_last_answers_out(self._socket, self._socket, stopped=late)
        finally:
            close_listener(self._socket, linger=_LAST_ANSWER_MS if ended else 0)
            self._socket = None

    def _serve(self) -> None:
        if self._exposed.coroutines or (self.concurrency or 1) > 1:
            from pylm.standalone.concurrent import ConcurrentLoop

            self._concurrent = ConcurrentLoop(self)
            self._concurrent.serve()
            return
        socket = self._socket
        assert socket is not None
        recv, send, call = partial(_recv, socket), partial(send_frame, socket), self._call
        reply_to = protocol.reply_to
        limit = self.messages
        served = self.served
        stats = self.stats
        sampling, untimed = Sampling(), 0  # which calls are timed (pylm.telemetry.counting)
        # Calls past their deadline are dropped, not run: the clock is read
        # when the loop waited, and with each timed call (every call of a
        # server that is not busy, one in SAMPLE_EVERY of a busy one).
        expiry = expiry_stamp(time.time())
        draining = False  # stopping: deregistered, serving what clients still send
        give_up = 0.0
        # Waiting for the next message is bounded (RCVTIMEO), though stop()
        # wakes the loop with a message anyway; a receive that waits costs
        # less than a NOBLOCK one that fails, then a poll.
        socket.setsockopt(zmq.RCVTIMEO, _IDLE_MS)
        try:
            while served < limit:
                try:
                    peer = recv()
                except zmq.Again:
                    if draining:
                        return  # quiet for DRAIN_QUIET: the clients have moved on
                    expiry = expiry_stamp(time.time())
                    continue
                if draining and time.monotonic() > give_up:
                    return
                if stats is not None:
                    stats.received += 1
                # A ROUTER message has the peer's id and at least one frame
                # more: the body from a DEALER (pylm's clients), the empty
                # delimiter then the body from a REQ. Read as frames, not
                # bytes: a frame tells whether more follow, which asking the
                # socket would cost more than the rest.
                frame = recv(0, False)
                if len(frame):
                    delimiter = False
                elif frame.more:
                    delimiter = True
                    frame = recv(0, False)
                else:
                    self._drop("envelope", "an empty message", [peer, b""])
                    continue
                body = frame.bytes
                if not frame.more and body[LEAD] == ONE_FRAME_REQUEST and len(body) >= HEAD_SIZE:
                    target_size, route_size = read_sizes(body)
                    start = HEAD_SIZE + target_size
                    if start + route_size <= len(body):
                        # Fast path: a one-frame REQUEST. The reply reuses the
                        # request's id bytes as they are.
                        deadline = body[DEADLINE_BYTES]
                        if deadline < expiry and deadline != NO_DEADLINE:
                            self._expired(body)
                            continue
                        served += 1
                        if untimed:
                            untimed -= 1
                            timed = False
                        else:
                            timed = stats is not None
                            untimed = sampling.untimed_next()
                            expiry = expiry_stamp(time.time())
                        try:
                            result = call(body[HEAD_SIZE:start], body[start + route_size :], timed)
                        except PylmError as error:
                            msg_id = read_id(body)[0]
                            envelope = [peer, b""] if delimiter else [peer]
                            self._answer(envelope, protocol.encode_error(msg_id, error))
                            continue
                        if len(result) <= SPLIT_PAYLOAD:
                            send(peer, _SNDMORE)
                            if delimiter:
                                send(b"", _SNDMORE)
                            send(reply_to(body, result))
                            if stats is not None:
                                stats.sent += 1
                            continue
                        msg_id = read_id(body)[0]
                        envelope = [peer, b""] if delimiter else [peer]
                        self._answer(envelope, protocol.encode(protocol.REPLY, msg_id, result))
                        continue
                frames = [peer, b"", body] if delimiter else [peer, body]
                if frame.more:
                    frames += rest_of(socket)
                if len(frames) == 3 and not frames[1] and self._is_control(frames[2]):
                    if stats is not None:
                        stats.received -= 1  # stop's wake-up call is no message
                    if draining or self.registration is None:
                        return
                    # Found by name: clients may still pick this instance until
                    # they see it leave the registry. Leave it first, then
                    # serve until they stop sending.
                    self._deregister()
                    draining, give_up = True, time.monotonic() + DRAIN_MAX
                    socket.setsockopt(zmq.RCVTIMEO, round(DRAIN_QUIET * 1000))
                    continue
                served += self._handle_other(frames)
        finally:
            self.served = served

    def _answer(self, envelope: list[bytes], frames: list[bytes], counted: bool = True) -> None:
        """Send an answer after its envelope, without waiting (a peer that is
        gone or not reading loses it). ``counted``: whether it answers a
        message that was not malformed."""
        assert self._socket is not None
        self._socket.send_multipart([*envelope, *frames], zmq.NOBLOCK, copy=copied(frames))
        if counted and self.stats is not None:
            self.stats.sent += 1

    def _handle_other(self, frames: list[bytes]) -> int:
        """Everything off the fast path (``frames``: as the ROUTER read them);
        returns how many requests it served."""
        parts = read_envelope(frames)
        if parts is None:
            self._drop(
                "envelope", "neither a pylm head nor an empty delimiter after the id", frames
            )
            return 0
        envelope, frames = parts
        try:
            message = protocol.decode(frames)
        except ProtocolError as error:
            self._drop("head", str(error), frames)
            # A REQ waits for an answer to whatever it sent: id 0 when none can be read.
            msg_id = protocol.salvage_msg_id(frames) or 0
            self._answer(envelope, protocol.encode_error(msg_id, error), counted=False)
            return 0
        if message.kind == protocol.PING:
            self._answer(envelope, protocol.encode(protocol.PONG, message.msg_id, self._pong()))
            return 0
        if message.kind == protocol.CACHE:
            try:
                answer = self.cache.answer(message)
            except ProtocolError as error:
                self._drop("payload", f"{error} (a cache request)", frames)
                self._answer(envelope, protocol.encode_error(message.msg_id, error), counted=False)
                return 0
            self._answer(envelope, answer)
            return 0
        if message.kind != protocol.REQUEST:
            problem = ProtocolError(
                f"server {self.name!r} accepts REQUEST, CACHE and PING, not"
                f" {protocol.KIND_NAMES[message.kind]}"
            )
            self._drop("kind", str(problem), frames)
            self._answer(envelope, protocol.encode_error(message.msg_id, problem), counted=False)
            return 0
        if past_deadline(frames[0], expiry_stamp(time.time())):
            self._expired(frames[0])
            return 0
        try:
            answer = protocol.encode(
                protocol.REPLY, message.msg_id, self._call(message.target, message.payload)
            )
        except PylmError as failure:
            answer = protocol.encode_error(message.msg_id, failure)
        self._answer(envelope, answer)
        return 1
