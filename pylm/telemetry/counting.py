"""What pylm counts.

Servers and clients count in plain Python numbers (:class:`FunctionStats`,
:class:`ServerStats`, :class:`ClientStats`), each object written by the one
thread that owns it: no lock, no label lookup, a few additions per message.
How Prometheus reads them is :mod:`pylm.telemetry.exposition`'s concern.

Counting is on unless ``PYLM_METRICS`` is ``0``/``off``/``false`` (or a
server is created with ``metrics=False``); then nothing is counted and no
endpoint is served.
"""

from __future__ import annotations

import os
import time
import uuid
from bisect import bisect_left
from typing import TYPE_CHECKING, Protocol

from pylm.telemetry.recent import RecentErrors

if TYPE_CHECKING:
    from pylm.registry import Registration, Registry

__all__ = [
    "BUCKETS",
    "BUSY",
    "MALFORMED_REASONS",
    "SAMPLE_EVERY",
    "UNKNOWN_FUNCTION",
    "ClientStats",
    "DispatcherState",
    "FunctionStats",
    "RetryCounts",
    "Sampling",
    "ServerStats",
    "metrics_enabled",
]

# Upper bounds of the duration histograms, in seconds: 50 µs to 10 s.
BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_FIRST = BUCKETS[0]
# Busy servers time one call in SAMPLE_EVERY (see Sampling) and count the
# others as ``untimed``, without reading the clock, which is most of what
# counting costs; a LoopClient times the first result of each run it drains
# and every SAMPLE_EVERY-th after it (a power of two).
SAMPLE_EVERY = 64
BUSY = 0.001  # s: calls closer together than this are a busy server's
UNKNOWN_FUNCTION = "(unknown)"  # the label of calls to functions a server does not have
_OFF = ("0", "off", "false", "no")


def metrics_enabled(option: bool | None = None) -> bool:
    """Whether to count: ``option`` if given, else ``PYLM_METRICS`` (on by default)."""
    if option is not None:
        return option
    return os.environ.get("PYLM_METRICS", "1").strip().lower() not in _OFF


class FunctionStats:
    """Calls of one function: outcomes, durations, bytes. Written by one
    thread; the hot paths may update the fields inline (see :meth:`done`).

    ``buckets[i]`` counts the timed calls that took at most ``BUCKETS[i]``
    seconds and more than the bound before (the last one: more than every
    bound); ``untimed`` counts the calls whose duration was not read (a busy
    server times a sample of its calls: see :class:`Sampling`). The calls that succeeded are
    all calls less ``errors``.
    """

    __slots__ = ("buckets", "bytes_in", "bytes_out", "errors", "seconds", "untimed")

    def __init__(self) -> None:
        self.errors = 0
        self.seconds = 0.0
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.untimed = 0
        self.bytes_in = 0
        self.bytes_out = 0

    @property
    def calls(self) -> int:
        return sum(list(self.buckets)) + self.untimed

    @property
    def ok(self) -> int:
        return self.calls - self.errors

    def done(self, seconds: float, size_in: int, size_out: int) -> None:
        self.seconds += seconds
        self.buckets[0 if seconds <= _FIRST else bisect_left(BUCKETS, seconds)] += 1
        self.bytes_in += size_in
        self.bytes_out += size_out

    def add(self, other: FunctionStats) -> None:
        """Add ``other``'s counts (of another object with the same labels) to these."""
        errors, buckets = other.errors, list(other.buckets)  # one consistent reading
        self.errors += errors
        self.untimed += other.untimed
        self.seconds += other.seconds
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        for index, count in enumerate(buckets):
            self.buckets[index] += count

    def failed(self, seconds: float | None, size_in: int) -> None:
        """One more failed call; ``seconds`` None if it was not timed."""
        self.errors += 1
        if seconds is None:
            self.untimed += 1
        else:
            self.seconds += seconds
            self.buckets[bisect_left(BUCKETS, seconds)] += 1
        self.bytes_in += size_in


class Sampling:
    """Which calls a server times. Its loop times a call, then asks
    :meth:`untimed_next` how many calls to count without the clock before it
    times one again: none while calls come at least ``BUSY`` apart (every
    call is timed), ``SAMPLE_EVERY - 1`` while they come closer together.
    Counts stay exact either way; only the duration histogram is a sample."""

    __slots__ = ("_last", "_span", "untimed")

    def __init__(self) -> None:
        self._last = -1.0  # when the last timed call came (time.perf_counter)
        self._span = 1  # calls since the timed call before it
        # Calls still to count without the clock: the loop keeps it in a local
        # while it runs and stores it here when it pauses.
        self.untimed = 0

    def untimed_next(self) -> int:
        now = time.perf_counter()
        self._span = SAMPLE_EVERY if now - self._last < BUSY * self._span else 1
        self._last = now
        return self._span - 1


MALFORMED_REASONS = ("envelope", "head", "kind", "route", "batch", "hello", "payload", "limit")
"""Why a server dropped or refused a message (``pylm_messages_malformed_total``'s
``reason``): ``envelope``, the routing frames around it are wrong (no empty
delimiter, too many frames); ``head``, not a pylm head (too short, another magic
or version, an unknown kind, sizes that overrun it, a payload frame missing);
``kind``, a kind this port does not take; ``route``, a message in a pipeline
without a route back; ``batch``, a BATCH whose lengths overrun it; ``hello``, a
worker's hello or heartbeat with fields of the wrong type or out of range;
``payload``, a message whose payload does not parse (a stream's count);
``limit``, a message that would pass a bound of the server (input streams open).
The family has one reason more, ``handshake``: connections that ended before
their ZMTP handshake (not ZeroMQ, reset mid-greeting, a TCP probe; see
:mod:`pylm.handshakes`)."""


class ServerStats:
    """The counters of one server instance; exported while the server runs
    (between :func:`pylm.telemetry.exposition.publish` and
    :func:`~pylm.telemetry.exposition.withdraw`)."""

    def __init__(
        self, name: str, kind: str, functions: tuple[str, ...], version: str, sends_to: str
    ) -> None:
        self.name = name
        self.kind = kind
        self.sends_to = sends_to  # "client" or "next": the label of what it sends
        self.version = version
        self.instance = uuid.uuid4().hex[:12]  # replaced by the registry's id once registered
        self.started = time.time()
        self.functions = {function: FunctionStats() for function in functions}
        self.functions[UNKNOWN_FUNCTION] = FunctionStats()
        self.received = 0  # messages read from the input, whatever they were
        self.malformed = 0  # ... of which did not follow the protocol
        self.malformed_by = dict.fromkeys(MALFORMED_REASONS, 0)  # ... by reason
        # Connections that ended before their handshake: counted apart (by
        # pylm.handshakes' thread), never read as messages.
        self.handshakes_failed = 0
        self.undeliverable = 0  # results dropped: their receiver took none (a last stage)
        self.expired = 0  # work read past its deadline, dropped instead of run
        self.recent_errors = RecentErrors()  # the last calls whose function raised (/errors)
        self.peers: PeerLinks | None = None  # a stage's connections to its next stages
        self.sent = 0  # answers to clients, or messages on to the next stage (sends_to)
        self.ready = False
        self.registration: Registration | None = None
        self.registry: Registry | None = None
        self.dispatcher: DispatcherState | None = None  # a master's or hub's worker books

    @property
    def in_flight(self) -> int:
        """Messages read and not yet answered or passed on."""
        return max(0, self.received - self.malformed - self.expired - self.sent)


class DispatcherState(Protocol):
    """What a master or hub tells of its workers and jobs (read at scrape time)."""

    @property
    def workers(self) -> int: ...
    @property
    def queued(self) -> int: ...
    @property
    def running_jobs(self) -> int: ...

    redispatched: int
    duplicates: int
    undeliverable: int


class RetryCounts(Protocol):
    """What a client's books count (:class:`pylm.window.Books`)."""

    retried: int
    refused: int
    duplicates: int


class PeerLinks(Protocol):
    """What a sender's socket monitors say of its peers
    (:class:`pylm.liveness.Connections`)."""

    @property
    def live_peers(self) -> int: ...
    @property
    def drops(self) -> int: ...
    @property
    def unreachable(self) -> list[str]: ...


class ClientStats:
    """The calls of one client to one server, by function; exported while it
    lives once given to :func:`pylm.telemetry.exposition.publish_client`.
    ``retries``: the client's books, once it keeps some."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.functions: dict[str, FunctionStats] = {}
        self.timeouts: dict[str, int] = {}
        self.retries: RetryCounts | None = None
        self.peers: PeerLinks | None = None  # its connections to the server's instances

    def function(self, name: str) -> FunctionStats:
        stats = self.functions.get(name)
        if stats is None:
            if len(self.functions) >= 256:  # names come from the caller: stay bounded
                name = UNKNOWN_FUNCTION
            stats = self.functions.setdefault(name, FunctionStats())
        return stats

    def timed_out(self, function: str) -> None:
        self.timeouts[function] = self.timeouts.get(function, 0) + 1
