"""The :class:`LastServer`: the stage that answers the client of every
job, through a ROUTER socket its clients connect to and greet; its output,
:class:`ToClients`, never waits for a client that does not read (a backlog)
and keeps results a while for a client not connected yet (parked)."""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING

import zmq

from pylm import protocol
from pylm.base import Options2016, ServerOptions
from pylm.chained.output import LimitedLog, Output
from pylm.chained.stage import DEFAULT_HWM, IDLE_MS, Stage
from pylm.errors import ProtocolError, PylmError
from pylm.protocol import FRAME_SLACK, SPLIT_PAYLOAD, reply_to
from pylm.transport import Backlog, check_address, recv_message, send_frame

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from pylm.telemetry.counting import ServerStats

__all__ = ["MAX_BACKLOG", "PARK_LIMIT", "PARK_SECONDS", "LastServer", "ToClients"]

# A last stage keeps results for a client not connected yet (one that found
# the stage in the registry after its jobs got there) this long, this many.
PARK_SECONDS = 10.0
PARK_LIMIT = 10_000
MAX_BACKLOG = 100_000  # results a last stage keeps for clients not reading, in all
_ROUTER_RETRY_MS = 10  # how soon a last stage tries again to send to a full client
_FIRST = zmq.SNDMORE | zmq.NOBLOCK


class LastServer(Stage):
    """The last stage of a pipeline: runs the function a job names and sends
    the result back to the client that sent the job, through a ROUTER socket
    bound at ``push_address`` to which clients connect."""

    _pylm_framework = True
    kind = "chained-last"
    _output: ToClients

    def __init__(
        self,
        name: str,
        pull_address: str | None = None,
        push_address: str | None = None,
        db_address: str | None = None,
        log_address: str | None = None,
        perf_address: str | None = None,
        ping_address: str | None = None,
        log_level: int = logging.INFO,
        messages: int = sys.maxsize,
        *,
        hwm: int = DEFAULT_HWM,
        **options: Unpack[ServerOptions],
    ) -> None:
        old = Options2016(log_address, perf_address, ping_address, log_level, messages)
        super().__init__(name, pull_address, db_address, old, hwm=hwm, **options)
        self.push_address = push_address and check_address(push_address, "push_address")
        self.push: str | None = None  # where clients connect for results
        self._router: zmq.Socket | None = None
        self._output = ToClients(
            name=name, logger=self.logger, stats=self.stats, log_limited=self._log_limited
        )
        self._idle_timeout = IDLE_MS

    def _open_output(self) -> None:
        router = self._secure(self.context.socket(zmq.ROUTER))
        self._router = router
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.SNDHWM, self.hwm)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unknown client: an error, not silence
        router.setsockopt(zmq.MAXMSGSIZE, FRAME_SLACK)  # clients only say hello
        self._output.attach(router)
        self.push = self._listen(router, self.push_address or self._any_port())
        self._poller.register(router, zmq.POLLIN)
        self._idle_timeout = self._poll_timeout

    def _endpoints(self) -> dict[str, str]:
        assert self.push is not None
        return {**super()._endpoints(), "push": self.push}

    def _name_only(self) -> bool:
        return super()._name_only() or self.push_address is None

    def _outputs(self) -> list[zmq.Socket | None]:
        self._router = None
        return self._output.close()

    def _serve_other(self, socket: zmq.Socket) -> None:
        if socket is self._router:
            self._greet()
        else:
            super()._serve_other(socket)

    def _greet(self) -> None:
        """Answer a client's hello (a PING on the results socket): once it has
        the answer, the client knows its results have a way back."""
        assert self._router is not None
        try:
            frames = recv_message(self._router)
        except zmq.Again:  # taken already (while waiting for room to send)
            return
        try:
            message = protocol.decode(frames[1:])
        except ProtocolError as error:
            self._drop("head", str(error), frames)
            return
        if message.kind == protocol.PING:
            # Through the backlog, as results go: a client that does not
            # read makes the stage wait for nobody.
            pong = protocol.encode(protocol.PONG, message.msg_id, self._pong())
            self._output.put(frames[0], pong)
            self._output.release(frames[0])
        else:
            self._drop("kind", "clients only send PING on the results socket", frames)

    def _tick(self) -> None:
        output = self._output
        output.tick()
        # Results wait for a client: wake up soon to send them.
        self._poll_timeout = _ROUTER_RETRY_MS if output.waiting else self._idle_timeout


class ToClients(Output):
    """The output of a last stage: each result goes back to the client its
    job's route names, through the stage's ROUTER socket, without waiting: a
    client whose queue is full (it is not reading) gets its results later
    from a backlog, while the other clients are served; a client not
    connected (yet) gets them when it greets the stage, within PARK_SECONDS.

    What it needs of its stage comes in as arguments: the stage's ``name``
    and ``logger``, its counters (``stats``, None when not counting: a
    result dropped counts as undeliverable) and its rate-limited log line
    (``log_limited``, for drops that may come in a flood)."""

    def __init__(
        self,
        *,
        name: str,
        logger: logging.Logger,
        stats: ServerStats | None,
        log_limited: LimitedLog,
    ) -> None:
        self.name = name
        self.logger = logger
        self.stats = stats
        self._log_limited = log_limited
        self._router: zmq.Socket | None = None
        # Results for clients not connected (yet): a client that found this
        # instance in the registry after its jobs got here greets it soon.
        self._parked: dict[bytes, list[tuple[float, list[bytes]]]] = {}
        self._parked_count = 0
        # Results for clients that are not reading, sent when they have room
        # (one that left meanwhile: as for one not here yet).
        self._backlog = Backlog(MAX_BACKLOG, self._park)

    def attach(self, router: zmq.Socket) -> None:
        """Send through ``router``, the socket the clients connect to."""
        self._router = router
        self._backlog.socket = router

    @property
    def waiting(self) -> bool:
        """Whether results wait for a client that had no room."""
        return bool(self._backlog)

    def close(self) -> list[zmq.Socket | None]:
        router, self._router = self._router, None
        if self._parked_count:
            self.logger.warning(
                "%s: %d results dropped on stop: their clients were not connected"
                " (not yet, or no longer)",
                self.name,
                self._parked_count,
            )
            self._parked.clear()
            self._parked_count = 0
        return [router]

    def send_fast(self, body: bytes, start: int, end: int, result: bytes) -> None:
        router = self._router
        assert router is not None
        if len(result) > SPLIT_PAYLOAD:
            self.send(protocol.decode([body]), result)
            return
        route = body[start:end]
        reply = reply_to(body, result)  # fast_message, inlined
        if self._backlog.holds(route):
            self.put(route, [reply])  # after what waits for that client
            return
        try:
            send_frame(router, route, _FIRST)  # the whole message goes, or none of it
        except zmq.ZMQError:  # full, or an unknown client: the careful way
            self.put(route, [reply])
            return
        send_frame(router, reply)

    def fast_message(self, body: bytes, start: int, end: int, result: bytes) -> bytes:
        return reply_to(body, result)

    def error_route(self, route: bytes) -> bytes:
        return b""  # the client needs no route

    def send_batch(self, results: list[tuple[bytes, bytes]]) -> None:
        by_client: dict[bytes, list[bytes]] = {}
        for route, message in results:
            by_client.setdefault(route, []).append(message)
        for route, messages in by_client.items():
            batch = messages[0] if len(messages) == 1 else protocol.pack_batch(messages)
            self.put(route, [batch])

    def send(self, message: protocol.Message, result: bytes) -> None:
        if not message.route:
            return  # a job nobody waits for (a tee's copy): its result stays here
        flags = message.flags & protocol.MORE
        reply = protocol.encode(protocol.REPLY, message.msg_id, result, flags=flags)
        self.put(message.route, reply)

    def send_error(self, message: protocol.Message, error: PylmError) -> None:
        self.put(message.route, protocol.encode_error(message.msg_id, error))

    def forward(self, message: protocol.Message, frames: list[bytes]) -> None:
        self.put(message.route, protocol.encode(message.kind, message.msg_id, message.payload))

    def put(self, route: bytes, frames: list[bytes]) -> None:
        """Send to a client without waiting (see the class). Past MAX_BACKLOG
        results waiting in all, or a quarter of that for one client, the
        result is dropped (counted and logged): a stage never waits for a
        client."""
        if not self._backlog.offer(route, frames):
            if self.stats is not None:  # results: those of a BATCH count one by one
                batch = frames[0][protocol.LEAD] == protocol.BATCH_PREFIX
                self.stats.undeliverable += len(protocol.unpack_batch(frames[0])) if batch else 1
            self._log_limited(
                "backlog-full",
                logging.WARNING,
                "%s: a result for client %s dropped: it takes none, and %d results wait for"
                " it (%d for all clients)",
                self.name,
                route.hex(),
                len(self._backlog.waiting(route)),
                self._backlog.size,
            )

    def tick(self) -> None:
        if self._backlog:
            self._backlog.flush()
        if self._parked_count:  # expired ones go with their warning, traffic or not
            self._expire_parked(time.monotonic())

    def release(self, route: bytes) -> None:
        """The client ``route`` is connected: send it what waited for it."""
        assert self._router is not None
        self._expire_parked(time.monotonic())  # what expired is not sent late
        waiting = self._parked.pop(route, [])
        self._parked_count -= len(waiting)
        for _, frames in waiting:
            self.put(route, frames)  # parked again if it left meanwhile

    def _park(self, route: bytes, frames: list[bytes]) -> None:
        """Keep a result for a client not connected yet, for a while."""
        now = time.monotonic()
        self._expire_parked(now)
        if self._parked_count >= PARK_LIMIT:
            self.logger.warning(
                "%s: result for client %s dropped: it is not connected (and %d results"
                " already wait for clients)",
                self.name,
                route.hex(),
                self._parked_count,
            )
            return
        self._parked.setdefault(route, []).append((now + PARK_SECONDS, frames))
        self._parked_count += 1

    def _expire_parked(self, now: float) -> None:
        for route in [route for route, parked in self._parked.items() if parked[0][0] < now]:
            waiting = self._parked[route]
            kept = [entry for entry in waiting if entry[0] >= now]
            dropped = len(waiting) - len(kept)
            self._parked_count -= dropped
            if kept:
                self._parked[route] = kept
            else:
                del self._parked[route]
            self.logger.warning(
                "%s: %d results for client %s dropped: it did not connect within %g s",
                self.name,
                dropped,
                route.hex(),
                PARK_SECONDS,
            )
