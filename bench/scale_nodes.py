"""The processes of :mod:`bench.scale`: server processes that hold a mix of
pylm topologies, and a client process that drives jobs through them.

Every function here runs in a spawned child process and imports pylm only
when it runs. Times are ``time.monotonic()`` instants, which every process
on the machine shares.

A server process (:func:`mixed_main`) holds ``count`` servers, all sharing
one :class:`~pylm.registry.Registry`, laid out by :func:`layout`: in turn a
chained pipeline (:data:`CHAIN` stages, the last a
:class:`~pylm.chained.LastServer`), a master with its workers
(:data:`POOL` servers in all), then :data:`SOLOS` standalone servers, again
and again; a group that does not fit in what is left of the process
shrinks (a pipeline or a pool takes 2 servers at least) or becomes
standalone servers. It speaks :mod:`bench.registry_nodes`' protocol: it
sends ``("ready", info)`` and exits when told ``("stop",)`` or when the
parent is gone, without deregistering (the records expire with their
leases, as after a crash; etcd stops with the run anyway).

The client process (:func:`traffic_main`) makes a client for every target
it is given (a pipeline's first stage, a master, a standalone server), all
on one Registry; one thread per kind of target sends one job at a time,
``rate`` a second (0: as fast as they come back), going round the targets
of its kind, and checks every result. It sends ``("ready", {})`` and then
answers ``("stats",)`` with ``("stats", counts)`` (see :func:`_Tally.counts`)
until told ``("finish",)``: then it stops its threads, answers
``("done", counts)`` and waits to be stopped.

Any failure is answered with ``("error", traceback_text)``.
"""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from bench.registry_nodes import _ignore_sigint, _node, rss_kib
from bench.systems import wait_until

if TYPE_CHECKING:
    from pylm.base import BaseServer
    from pylm.chained import LoopClient
    from pylm.parallel import Client as MasterClient
    from pylm.registry import Registry
    from pylm.standalone import Client

__all__ = [
    "CHAIN",
    "KINDS",
    "POOL",
    "SOLOS",
    "Group",
    "layout",
    "mixed_main",
    "traffic_main",
]

CHAIN = 4  # servers of a pipeline: CHAIN - 1 stages and a last stage
POOL = 4  # servers of a master/worker group: a master and POOL - 1 workers
SOLOS = 4  # standalone servers after each pipeline and pool
KINDS = ("chain", "pool", "solo")  # the kinds of target, in the order of the report
SAMPLES = 20_000  # latencies a traffic thread keeps, at most (the first ones)
ERROR_SAMPLES = 3  # error messages a traffic thread keeps


@dataclass(frozen=True)
class Group:
    """Servers that work together, all in one process: ``entry`` is the
    name a client calls (a pipeline's first stage, a master, a standalone
    server); ``size`` how many servers (instances) the group holds."""

    kind: str  # one of KINDS
    entry: str
    size: int

    def expected(self, payload: bytes) -> bytes:
        """What a job with ``payload`` must come back as: every stage of a
        pipeline appends a dot, a worker reverses it, a standalone server
        echoes it."""
        if self.kind == "chain":
            return payload + b"." * self.size
        if self.kind == "pool":
            return payload[::-1]
        return payload


def layout(prefix: str, count: int) -> list[Group]:
    """The groups of a process of ``count`` servers, named after ``prefix``."""
    groups: list[Group] = []
    left = count
    turn = 0
    while left > 0:
        kind = ("chain", "pool", *["solo"] * SOLOS)[turn % (2 + SOLOS)]
        turn += 1
        wanted = {"chain": CHAIN, "pool": POOL, "solo": 1}[kind]
        size = min(wanted, left)
        if size < 2:
            kind, size = "solo", 1
        index = sum(group.kind == kind for group in groups)
        entry = {"chain": "chain{}-s1", "pool": "pool{}", "solo": "solo{}"}[kind]
        groups.append(Group(kind, f"{prefix}-{entry.format(index)}", size))
        left -= size
    return groups


def _start_group(group: Group, registry: Registry, ttl: float) -> list[BaseServer]:
    """Start the servers of ``group``, each with only a name; the ones a
    group member looks for at start (the next stage, the master) first."""
    from pylm.chained import LastServer
    from pylm.chained import Server as Stage
    from pylm.parallel import Master, Worker
    from pylm.standalone import Server as Standalone

    class Step(Stage):
        def step(self, message: bytes) -> bytes:
            return message + b"."

    class Last(LastServer):
        def step(self, message: bytes) -> bytes:
            return message + b"."

    class Reverser(Worker):
        def work(self, message: bytes) -> bytes:
            return message[::-1]

    class Echo(Standalone):
        def echo(self, message: bytes) -> bytes:
            return message

    options: dict[str, Any] = {"registry": registry, "ttl": ttl, "log_stdout": False}
    servers: list[BaseServer] = []
    base = group.entry.removesuffix("-s1")
    if group.kind == "chain":
        names = [f"{base}-s{stage}" for stage in range(1, group.size)] + [f"{base}-last"]
        servers.append(Last(names[-1], **options))
        for stage in range(group.size - 2, -1, -1):
            next_call = f"{names[stage + 1]}.step"
            servers.append(Step(names[stage], next_call=next_call, **options))
    elif group.kind == "pool":
        servers.append(Master(group.entry, **options))
        servers += [
            Reverser(f"{group.entry}-worker", group.entry, **options) for _ in range(group.size - 1)
        ]
    else:
        servers.append(Echo(group.entry, **options))
    for server in servers:
        server.start(background=True)
    return servers


def mixed_main(url: str, cluster: str, prefix: str, count: str, ttl: str, conn: Connection) -> None:
    """``count`` servers laid out by :func:`layout`, sharing one registry
    client, their leases of ``ttl`` seconds."""

    def build() -> tuple[list[BaseServer], dict[str, Any]]:
        up = time.monotonic()
        from pylm.registry import Registry

        registry = Registry(url, cluster=cluster)
        registry.instances(prefix)  # connected, as the servers will need it
        bare = rss_kib()
        servers: list[BaseServer] = []
        first = 0.0
        groups = layout(prefix, int(count))
        for group in groups:
            servers += _start_group(group, registry, float(ttl))
            first = first or time.monotonic()
        info = {
            "up": up,
            "first": first,
            "registered": time.monotonic(),
            "rss_bare_kib": bare,
            "groups": [[group.kind, group.entry, group.size] for group in groups],
        }
        return servers, info

    _node(build, conn, graceful=False)


# ------------------------------------------------------------------ the traffic


class _Tally:
    """What one traffic thread saw; read by the listening thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ok = 0
        self.errors = 0
        self.samples: list[str] = []
        self.latencies: list[float] = []

    def done(self, took: float) -> None:
        with self.lock:
            self.ok += 1
            if len(self.latencies) < SAMPLES:
                self.latencies.append(took)

    def failed(self, text: str) -> None:
        with self.lock:
            self.errors += 1
            if len(self.samples) < ERROR_SAMPLES:
                self.samples.append(text[:300])

    def counts(self, latencies: bool) -> dict[str, Any]:
        """``ok`` and ``errors`` so far, the first error messages, and
        (with ``latencies``) the latencies of the first jobs, in seconds."""
        with self.lock:
            found: dict[str, Any] = {
                "ok": self.ok,
                "errors": self.errors,
                "error_samples": list(self.samples),
            }
            if latencies:
                found["latencies_s"] = list(self.latencies)
            return found


Call = Callable[[bytes], bytes]


def _through_pipeline(client: LoopClient, payload: bytes) -> bytes:
    return next(iter(client.job("step", [payload])))


def _through_master(client: MasterClient, payload: bytes) -> bytes:
    return client.eval("work", payload)


def _to_server(client: Client, payload: bytes) -> bytes:
    return client.job("echo", payload)


def _callers(groups: list[Group], registry: Registry, timeout: float) -> list[Call]:
    """A function per group that runs one job through it; the clients stay
    open until the process ends."""
    from pylm.chained import LoopClient
    from pylm.parallel import Client as MasterClient
    from pylm.standalone import Client

    calls: list[Call] = []
    for group in groups:
        if group.kind == "chain":
            pipeline = LoopClient(group.entry, registry=registry, announce=False, timeout=timeout)
            calls.append(partial(_through_pipeline, pipeline))
        elif group.kind == "pool":
            master = MasterClient(group.entry, registry=registry, timeout=timeout)
            calls.append(partial(_through_master, master))
        else:
            server = Client(group.entry, registry=registry, timeout=timeout)
            calls.append(partial(_to_server, server))
    return calls


def _drive(
    groups: list[Group], calls: list[Call], rate: float, tally: _Tally, finish: threading.Event
) -> None:
    """Send one job at a time, ``rate`` a second (0: unpaced), round the groups."""
    interval = 1.0 / rate if rate else 0.0
    clock = time.monotonic
    due = clock()
    index = 0
    while not finish.is_set():
        if interval:
            wait_until(due)
            due = max(due + interval, clock() - interval)  # no burst after a stall
        group, call = groups[index % len(groups)], calls[index % len(calls)]
        payload = b"job-%d" % index
        index += 1
        began = clock()
        try:
            answer = call(payload)
        except Exception as error:  # a failed job is counted, not fatal
            tally.failed(f"{group.entry}: {type(error).__name__}: {error}")
            continue
        if answer == group.expected(payload):
            tally.done(clock() - began)
        else:
            tally.failed(f"{group.entry}: answered {answer[:60]!r} to {payload!r}")


def traffic_main(
    url: str, cluster: str, targets: str, rate: str, timeout: str, conn: Connection
) -> None:
    """Drive jobs through ``targets`` (JSON: ``[[kind, entry, size], ...]``),
    one thread per kind, ``rate`` jobs a second each, each job allowed
    ``timeout`` seconds."""
    _ignore_sigint()
    sending = threading.Lock()

    def say(message: tuple[Any, ...]) -> None:
        with sending:
            conn.send(message)

    try:
        from pylm.registry import Registry

        groups = [Group(kind, entry, int(size)) for kind, entry, size in json.loads(targets)]
        registry = Registry(url, cluster=cluster)
        finish = threading.Event()
        tallies: dict[str, _Tally] = {}
        threads = []
        for kind in KINDS:
            chosen = [group for group in groups if group.kind == kind]
            if not chosen:
                continue
            calls = _callers(chosen, registry, float(timeout))
            tallies[kind] = _Tally()
            threads.append(
                threading.Thread(
                    target=_drive,
                    args=(chosen, calls, float(rate), tallies[kind], finish),
                    name=f"traffic-{kind}",
                    daemon=True,
                )
            )

        def counts(latencies: bool = False) -> dict[str, Any]:
            found = {kind: tally.counts(latencies) for kind, tally in tallies.items()}
            return {"at": time.monotonic(), "kinds": found}

        say(("ready", {"clients": len(groups), "rss_kib": rss_kib()}))
        for thread in threads:
            thread.start()
        while True:
            try:
                command = conn.recv()
            except (EOFError, OSError):
                break
            if command == ("stats",):
                say(("stats", counts()))
            elif command == ("finish",):
                finish.set()
                for thread in threads:
                    thread.join(float(timeout) + 5)
                say(("done", counts(latencies=True)))
            else:  # ("stop",), or anything else: the parent is done with us
                break
    except BaseException:
        try:
            say(("error", traceback.format_exc()))
        except OSError:
            pass  # the parent is gone
    os._exit(0)  # the clients' threads must not keep the process
