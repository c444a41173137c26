"""The output of a last stage, :class:`ToClients`: it answers the client of
every job through the stage's ROUTER socket, never waits for a client that
does not read (a backlog) and keeps results a while for a client not
connected yet (parked)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import zmq

from pylm import protocol
from pylm.chained.output import Output
from pylm.errors import PylmError
from pylm.logs import LogLimited
from pylm.protocol import SPLIT_PAYLOAD, reply_to
from pylm.transport import Backlog, send_frame

if TYPE_CHECKING:
    from pylm.telemetry.counting import ServerStats

__all__ = ["MAX_BACKLOG", "PARK_LIMIT", "PARK_SECONDS", "ToClients"]

# A last stage keeps results for a client not connected yet (one that found
# the stage in the registry after its jobs got there) this long, this many.
PARK_SECONDS = 10.0
PARK_LIMIT = 10_000
MAX_BACKLOG = 100_000  # results a last stage keeps for clients not reading, in all
_FIRST = zmq.SNDMORE | zmq.NOBLOCK


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
        log_limited: LogLimited,
    ) -> None:
        self.name = name
        self.logger = logger
        self.stats = stats
        self._log_limited = log_limited
        self._router: zmq.Socket | None = None
        # Results for clients not connected (yet): a client that found this
        # instance in the registry after its jobs got here greets it soon.
        self._parked: dict[
            bytes, list[tuple[float, list[bytes], int]]
        ] = {}  # expiry, message, results
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
            if len(messages) == 1:
                self.put(route, messages)
            else:
                self.put(route, [protocol.pack_batch(messages)], len(messages))

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

    def put(self, route: bytes, frames: list[bytes], results: int = 1) -> None:
        """Send to a client without waiting (see the class). Past MAX_BACKLOG
        results waiting in all, or a quarter of that for one client, the
        result is dropped (counted and logged): a stage never waits for a
        client."""
        if not self._backlog.offer(route, frames, results):
            if self.stats is not None:  # results: those of a BATCH count one by one
                self.stats.undeliverable += results
            self._log_limited(
                "backlog-full",
                logging.WARNING,
                "%s: %d result(s) for client %s dropped: it takes none, and %d results wait"
                " for it (%d for all clients)",
                self.name,
                results,
                route.hex(),
                self._backlog.waiting(route),
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
        for _, frames, results in waiting:
            self.put(route, frames, results)  # parked again if it left meanwhile

    def _park(self, route: bytes, frames: list[bytes], results: int) -> None:
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
        self._parked.setdefault(route, []).append((now + PARK_SECONDS, frames, results))
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
