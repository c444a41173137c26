"""The processes of :mod:`bench.registry`: servers that start with only a
name, fleets of them sharing one registry client, and a client that streams
jobs through a pipeline and tallies where each result went through.

Every function here runs in a spawned child process and imports pylm only
when it runs, so the time to import pylm is the child's own. Times are
``time.monotonic()`` instants, which every process on the machine shares.

A server process (:func:`echo_main`, :func:`stage_main`, :func:`fleet_main`)
starts its server(s), sends ``("ready", info)`` and then obeys the parent:

* ``("leave",)``: stop the server(s), the way a server leaves (it
  deregisters, then closes), answer ``("left", info)``;
* ``("stop",)`` or the parent gone: stop the server(s) (a fleet skips that:
  its records expire with their leases) and exit.

The stream process (:func:`stream_main`) finds the pipeline from the name
``step1``, sends ``("ready", {})`` and streams jobs at a steady rate until
told ``("finish",)``; then it waits for the last results and answers
``("done", tally)``. Meanwhile it answers ``("stats",)`` with
``("stats", tally)``. A :data:`Tally` maps each instance marker to what the
client saw of the results that went through that instance (see
:class:`Through`), plus ``"sent"``, ``"lost"`` and ``"wrong"`` counts.

Any failure is answered with ``("error", traceback_text)``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from bench.systems import wait_until

if TYPE_CHECKING:
    from pylm.base import BaseServer
    from pylm.chained import JobResult

__all__ = [
    "IN_FLIGHT",
    "JOB_TIMEOUT",
    "Tally",
    "Through",
    "echo_main",
    "fleet_main",
    "rss_kib",
    "stage_main",
    "stream_main",
]

IN_FLIGHT = 4  # jobs a paced stream client keeps out at most: it sees results within a few jobs
JOB_TIMEOUT = 5.0  # s: a job without a result by then counts as lost
STOP_LIMIT = 8.0  # s a server process spends stopping its servers before it exits anyway
STAGES = {"step1": ("foo", "step2.bar"), "step2": ("bar", "last.baz"), "last": ("baz", None)}

Build = Callable[[], tuple[list["BaseServer"], dict[str, Any]]]


def rss_kib(pid: int | None = None) -> int:
    """The resident set size of process ``pid`` (this one if None), in KiB."""
    with open(f"/proc/{pid or 'self'}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise OSError(f"no VmRSS for process {pid}")


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group; the parent alone handles it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _use_registry(url: str, cluster: str) -> None:
    """Point the servers started with only a name at the registry, as a
    user does: through the environment."""
    os.environ["PYLM_REGISTRY"] = url
    os.environ["PYLM_CLUSTER"] = cluster


def _stop_all(servers: list[BaseServer]) -> None:
    """Stop the servers, all at once (a chained stage drains for a moment
    before it closes), within :data:`STOP_LIMIT` seconds."""
    threads = [threading.Thread(target=server.stop, daemon=True) for server in servers]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + STOP_LIMIT
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


def _node(build: Build, conn: Connection, graceful: bool = True) -> None:
    """Start the servers ``build`` makes, report, obey the parent."""
    _ignore_sigint()
    servers: list[BaseServer] = []
    try:
        servers, info = build()
        conn.send(("ready", info))
        while True:
            try:
                command = conn.recv()
            except (EOFError, OSError):
                break
            if command == ("leave",):
                begin = time.monotonic()
                _stop_all(servers)
                conn.send(("left", {"begin": begin, "end": time.monotonic()}))
            elif command == ("stop",):
                break
            else:
                raise ValueError(f"unknown command {command!r}")
        if graceful:
            _stop_all(servers)
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass  # the parent is gone
    os._exit(0)  # a server that would not stop must not keep the process


def echo_main(url: str, cluster: str, name: str, conn: Connection) -> None:
    """A standalone echo server started with only ``name``."""

    def build() -> tuple[list[BaseServer], dict[str, Any]]:
        up = time.monotonic()
        _use_registry(url, cluster)
        from pylm.standalone import Server

        imported = time.monotonic()

        class Echo(Server):
            def echo(self, message: bytes) -> bytes:
                return message

        server = Echo(name, log_stdout=False)
        server.start(background=True)
        return [server], {"up": up, "imported": imported, "registered": time.monotonic()}

    _node(build, conn)


def stage_main(url: str, cluster: str, name: str, marker: str, conn: Connection) -> None:
    """Stage ``name`` (step1, step2 or last) of the pipeline step1 -> step2
    -> last, started with only its name (and its next call). A step2 stage
    appends ``|marker@t`` to each result, ``t`` being when it ran the job."""

    def build() -> tuple[list[BaseServer], dict[str, Any]]:
        up = time.monotonic()
        _use_registry(url, cluster)
        from pylm.chained import LastServer, Server

        imported = time.monotonic()
        function, next_call = STAGES[name]
        tag = f"|{marker}@".encode()
        clock = time.monotonic

        def run(self: object, message: bytes) -> bytes:
            return message

        def run_tagged(self: object, message: bytes) -> bytes:
            return b"%b%b%.6f" % (message, tag, clock())

        body = run_tagged if name == "step2" else run
        server: BaseServer
        if next_call is None:
            server = type("Last", (LastServer,), {function: body})(name, log_stdout=False)
        else:
            stage = type("Stage", (Server,), {function: body})
            server = stage(name, next_call=next_call, log_stdout=False)
        server.start(background=True)
        return [server], {"up": up, "imported": imported, "registered": time.monotonic()}

    _node(build, conn)


def fleet_main(url: str, cluster: str, prefix: str, count: str, ttl: str, conn: Connection) -> None:
    """``count`` standalone echo servers named ``prefix-NNN``, each with only
    a name, sharing one registry client, their leases of ``ttl`` seconds."""

    def build() -> tuple[list[BaseServer], dict[str, Any]]:
        up = time.monotonic()
        from pylm.registry import Registry
        from pylm.standalone import Server

        class Echo(Server):
            def echo(self, message: bytes) -> bytes:
                return message

        registry = Registry(url, cluster=cluster)
        registry.instances(prefix)  # connected, as the servers will need it
        bare = rss_kib()
        servers: list[BaseServer] = []
        first = 0.0
        for index in range(int(count)):
            server = Echo(
                f"{prefix}-{index:03d}", registry=registry, log_stdout=False, ttl=float(ttl)
            )
            server.start(background=True)
            servers.append(server)
            first = first or time.monotonic()
        info = {"up": up, "first": first, "registered": time.monotonic(), "rss_bare_kib": bare}
        return servers, info

    _node(build, conn, graceful=False)


# ------------------------------------------------------------------ the stream


@dataclass(frozen=True)
class Through:
    """The results that went through one instance, as the client saw them:
    how many, when the first and the last arrived, and when the instance ran
    the first and the last of those jobs."""

    count: int
    first_seen: float
    last_seen: float
    first_run: float
    last_run: float


Tally = dict[str, Any]  # marker -> Through; "sent", "lost", "wrong" -> int


class _Counter:
    """What the stream client saw, shared by its two threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._through: dict[str, Through] = {}
        self.sent = self.lost = self.wrong = 0
        self.errors: list[str] = []

    def add(self, outcome: JobResult, seen: float) -> None:
        with self._lock:
            if outcome.error is not None:
                self.lost += 1
                if len(self.errors) < 3:
                    self.errors.append(f"job {outcome.index}: {outcome.error!r}")
                return
            value = outcome.value or b""
            payload, _, rest = value.partition(b"|")
            marker, _, stamp = rest.partition(b"@")
            if payload != b"%d" % outcome.index or not marker or not stamp:
                self.wrong += 1
                return
            ran = float(stamp)
            key = marker.decode()
            old = self._through.get(key)
            if old is None:
                self._through[key] = Through(1, seen, seen, ran, ran)
            else:
                self._through[key] = replace(
                    old,
                    count=old.count + 1,
                    last_seen=seen,
                    first_run=min(old.first_run, ran),
                    last_run=max(old.last_run, ran),
                )

    def tally(self) -> Tally:
        with self._lock:
            extra = {"sent": self.sent, "lost": self.lost, "wrong": self.wrong}
            return {**self._through, **extra, "errors": list(self.errors)}


def stream_main(url: str, cluster: str, rate: str, depth: str, conn: Connection) -> None:
    """Stream jobs through the pipeline from ``step1``, ``rate`` a second (0:
    as fast as it goes), at most ``depth`` in flight, until told to finish;
    tally the results."""
    _ignore_sigint()
    sending = threading.Lock()

    def say(message: tuple[Any, ...]) -> None:
        with sending:
            conn.send(message)

    try:
        from pylm.chained import LoopClient
        from pylm.registry import Registry

        registry = Registry(url, cluster=cluster)
        client = LoopClient(
            "step1",
            registry=registry,
            announce=False,
            max_in_flight=int(depth),
            timeout=JOB_TIMEOUT,
        )
        counter = _Counter()
        finish = threading.Event()

        def listen() -> None:
            while True:
                try:
                    command = conn.recv()
                except (EOFError, OSError):
                    os._exit(0)
                if command == ("stats",):
                    say(("stats", counter.tally()))
                elif command == ("finish",):
                    finish.set()
                else:  # ("stop",), or anything else: the parent is done with us
                    os._exit(0)

        def payloads() -> Iterator[bytes]:
            interval = 1.0 / float(rate) if float(rate) else 0.0
            due = time.monotonic()
            index = 0
            while not finish.is_set():
                if interval:
                    wait_until(due)
                    due = max(due + interval, time.monotonic() - interval)
                counter.sent += 1
                yield b"%d" % index
                index += 1

        threading.Thread(target=listen, daemon=True).start()
        say(("ready", {}))
        clock = time.monotonic
        for outcome in client.results("foo", payloads()):
            counter.add(outcome, clock())
        say(("done", counter.tally()))
        client.close()
        registry.close()
        threading.Event().wait()  # until the parent says stop
    except BaseException:
        try:
            say(("error", traceback.format_exc()))
        except OSError:
            pass
