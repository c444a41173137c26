"""Fuzzing every port kind of live servers with structure-aware input (issue 18).

For each port kind (standalone; a stage's pull and db ports; a last stage's
pull, push and db; a sink; a master's front and workers ports; a hub's pull
and workers ports; a worker's sockets facing its master) and each family of
input (tests/fuzz_strategies.py):

- ``fields``: valid messages of every kind, built from the protocol's field
  table (``pylm.protocol.FIELDS``), with one field at a boundary or any
  value, sizes that overrun or underrun, bodies cut inside a field, frames
  missing or extra; and some plain random frames;
- ``payloads``: valid envelopes with hostile contents for that port: worker
  hello/heartbeat JSON, ERROR details, BATCH framing, stream items and END
  counts, cache requests, hostile targets;
- ``envelopes``: valid messages in wrong envelopes;
- ``tcp``: a plain TCP connection that writes bytes that are not ZMTP (or
  half a handshake) and resets or closes.

After every input the server must still run and a fresh well-behaved client
must get a correct answer within a bound; a server broken by an input is
replaced before the next one, so Hypothesis minimises the input that broke
it (its report prints the ``Hostile`` with the exact frames or bytes). After
all inputs: 20 more correct answers, every input that does not follow the
protocol counted in ``pylm_messages_malformed_total``, and the memory of this
process grown by less than a limit.

``PYLM_FUZZ_EXAMPLES`` sets the inputs per test (30 by default, times
``PYLM_SOAK``; scripts/soak.sh raises it); ``PYLM_FUZZ_SHRINK_SECONDS`` bounds
the time Hypothesis spends minimising a failure (20 s by default).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

import hypothesis.internal.conjecture.engine as hypothesis_engine
import pytest
from fuzz_harness import PORTS, Port, rss_bytes
from fuzz_strategies import (
    ROGUE_ID,
    Hostile,
    Msg,
    batches,
    cache_requests,
    envelopes,
    error_messages,
    frames_of,
    hellos,
    messages,
    mutated,
    stream_messages,
    tcp_junk,
    worker_answers,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pylm import protocol
from pylm.testing import SOAK, wait_for

EXAMPLES = int(os.environ.get("PYLM_FUZZ_EXAMPLES") or 30 * SOAK)
SHRINK_SECONDS = float(os.environ.get("PYLM_FUZZ_SHRINK_SECONDS") or 20)
FINAL_CALLS = 20  # correct answers a fresh client needs after the fuzz
MEMORY_LIMIT = 100 * 2**20  # bytes this process may grow by in one test
COUNT_WAIT = 3.0  # s for the malformed counter to catch up at the end
ROUTE = b"\x00fuzz-client"  # a client routing id nobody has


# ------------------------------------------------------------------ what each port gets


def _random_frames() -> st.SearchStrategy[Hostile]:
    return st.lists(st.binary(max_size=120), min_size=1, max_size=3).map(
        lambda frames: Hostile("field: random frames", tuple(frames))
    )


def _targets(server: str, functions: tuple[str, ...] = ("echo",)) -> st.SearchStrategy[bytes]:
    known = [f"{server}.{function}".encode() for function in functions]
    hostile = [
        f"{server}.nope".encode(),
        b"other.echo",
        b"",
        b"nodot",
        b"\xff\xfe.echo",
        f"{server}.".encode(),
        b"." * 300,
        b"x" * 65535,  # the largest target the head can announce
    ]
    return st.sampled_from(known) | st.sampled_from(known + hostile)


def _bases(port: str) -> st.SearchStrategy[Msg]:
    """Valid messages a port of this kind may see (any kind, mostly its own)."""
    if port == "standalone":
        return messages(_targets("echo"), st.sampled_from([b"", ROUTE]))
    if port in ("stage-pull", "last-pull", "sink-pull", "hub-pull"):
        server = {"stage-pull": "step", "last-pull": "last", "sink-pull": "sink"}.get(port, "hub")
        return messages(_targets(server), st.sampled_from([ROUTE, ROUTE, b""]))
    if port in ("stage-db", "last-db"):
        server = "step" if port == "stage-db" else "last"
        return messages(_targets(server, ("get", "set", "delete")))
    if port in ("last-push", "sink-push"):
        pings = st.just(protocol.PING)
        return messages(_targets("last"), kinds=pings) | messages(_targets("last"))
    if port == "master-front":
        return messages(_targets("m"))
    if port in ("master-workers", "hub-workers"):
        hello = Msg(protocol.PING, 0, b'{"name": "rogue", "slots": 1}', route=ROGUE_ID)
        return st.just(hello) | messages(st.just(b""), st.sampled_from([b"", ROGUE_ID]))
    if port == "worker":
        return messages(_targets("m"))
    raise AssertionError(port)


def _payloads(port: str) -> st.SearchStrategy[Hostile]:
    """Valid envelopes with hostile contents, for what the port reads."""
    if port in ("stage-pull", "last-pull", "sink-pull", "hub-pull"):
        server = {"stage-pull": "step", "last-pull": "last", "sink-pull": "sink"}.get(port, "hub")
        jobs = messages(_targets(server), st.just(ROUTE), kinds=st.just(protocol.REQUEST))
        routes = st.sampled_from([ROUTE, b""])
        return st.one_of(
            batches(jobs),
            stream_messages(_targets(server), ROUTE),
            error_messages(routes),
        )
    if port in ("stage-db", "last-db"):
        return cache_requests("step" if port == "stage-db" else "last")
    if port in ("master-workers", "hub-workers"):
        return hellos() | hellos() | worker_answers()
    if port in ("standalone", "master-front", "worker"):
        server = {"standalone": "echo"}.get(port, "m")
        requests = messages(
            _targets(server),
            kinds=st.just(protocol.REQUEST),
            payloads=st.binary(max_size=64) | st.just(b"\x00" * 70_000),
        ).map(lambda m: Hostile(f"request: {m.target[:40]!r}", tuple(frames_of(m))))
        streamed = messages(_targets(server), kinds=st.just(protocol.REQUEST)).map(
            lambda m: Msg(m.kind, m.msg_id, m.payload, m.target, ROUTE, flags=protocol.MORE)
        )
        more = streamed.map(lambda m: Hostile("request: flagged MORE", tuple(frames_of(m))))
        if port != "worker":
            return requests | more
        # A worker's heartbeat socket hears only PONGs: any frames, any JSON.
        pongs = error_messages(st.just(b"")).map(
            lambda h: Hostile(
                "heartbeat: " + h.what,
                tuple(frames_of(Msg(protocol.PONG, 0, protocol.decode(list(h.frames)).payload))),
                to="heartbeat",
            )
        )
        junk = _random_frames().map(lambda h: Hostile("heartbeat: junk", h.frames, to="heartbeat"))
        return requests | more | pongs | junk
    if port in ("last-push", "sink-push"):
        return st.binary(max_size=200).map(
            lambda p: Hostile("hello: PING payload", tuple(frames_of(Msg(protocol.PING, 1, p))))
        )
    raise AssertionError(port)


def strategy(port: str, family: str) -> st.SearchStrategy[Hostile]:
    if family == "fields":
        return mutated(_bases(port)) | _random_frames()
    if family == "payloads":
        return _payloads(port)
    if family == "envelopes":
        return envelopes(_bases(port))
    if family == "tcp":
        return tcp_junk()
    raise AssertionError(family)


CASES = [
    (port, family)
    for port, families in {
        "standalone": ("fields", "payloads", "envelopes", "tcp"),
        "stage-pull": ("fields", "payloads", "envelopes", "tcp"),
        "stage-db": ("fields", "payloads", "envelopes", "tcp"),
        "last-pull": ("fields", "payloads", "tcp"),
        "last-push": ("fields", "payloads", "envelopes", "tcp"),
        "last-db": ("payloads", "envelopes"),
        "sink-pull": ("fields", "payloads"),
        "sink-push": ("payloads", "envelopes"),
        "master-front": ("fields", "payloads", "envelopes", "tcp"),
        "master-workers": ("fields", "payloads", "envelopes", "tcp"),
        "hub-pull": ("fields", "payloads", "tcp"),
        "hub-workers": ("fields", "payloads", "tcp"),
        "worker": ("fields", "payloads", "envelopes"),
    }.items()
    for family in families
]


# ------------------------------------------------------------------ the runs


def _one(port: Port, hostile: Hostile) -> None:
    """Send one input; the servers must run on and answer a fresh client."""
    port.renew_if_broken()
    port.send(hostile)
    try:
        port.check(1)
    except AssertionError as failure:
        port.broken = True
        stopped = port.alive()
        if port.runaway:
            raise AssertionError(
                f"{port.name}: memory ran away (>300 MB) after {hostile!r}"
            ) from None
        if stopped:
            why = {s.name: repr(s._failure) for s in port.servers if not s.running}
            raise AssertionError(f"{port.name}: crashed ({why}) after {hostile!r}") from None
        raise AssertionError(f"{port.name}: {failure} after {hostile!r}") from None
    stopped = port.alive()
    if stopped:
        port.broken = True
        why = {s.name: repr(s._failure) for s in port.servers if not s.running}
        raise AssertionError(f"{port.name}: crashed ({why}) after {hostile!r}")


def _holds(condition: Callable[[], bool], timeout: float, what: str) -> bool:
    """Whether ``condition`` comes to hold within ``timeout`` (wait_for, not failing)."""
    try:
        wait_for(condition, timeout, what)
    except pytest.fail.Exception:
        return False
    return True


def _uncounted(port: Port, must: list[Hostile]) -> list[str]:
    """Which categories of inputs are not counted: one sample of each, alone."""
    seen: dict[str, Hostile] = {}
    for hostile in must:
        seen.setdefault(hostile.category + hostile.what[:30], hostile)
    missing = []
    for hostile in list(seen.values())[:6]:
        before = port.counter()
        port.send(hostile)
        if not _holds(lambda before=before: port.counter() > before, 0.5, "the count"):
            missing.append(repr(hostile))
    return missing


@pytest.fixture
def short_shrinking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bound the time Hypothesis spends minimising a failure: with checks
    that wait CHECK_TIMEOUT for a lost answer, its 300 s default is too long."""
    monkeypatch.setattr(hypothesis_engine, "MAX_SHRINKING_SECONDS", SHRINK_SECONDS)


@pytest.mark.timeout(int(120 + 4 * SHRINK_SECONDS + 2 * EXAMPLES))  # shrinking waits on timeouts
@pytest.mark.parametrize(("port_name", "family"), CASES, ids=[f"{p}-{f}" for p, f in CASES])
@pytest.mark.usefixtures("short_shrinking")
def test_fuzz_port(port_name: str, family: str) -> None:
    port = PORTS[port_name]()
    sent: list[Hostile] = []
    generation = [port.restarts]
    try:
        memory_before = rss_bytes()
        counted_before = [port.counter()]

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(strategy(port_name, family))
        def run(hostile: Hostile) -> None:
            port.renew_if_broken()  # before reading the counter: fresh servers, fresh counters
            before = port.counter()
            _one(port, hostile)
            # Each input that must be counted is, on its own: in the total
            # at the end, inputs that may be counted could hide one that was not.
            if hostile.malformed is True and not _holds(
                lambda: port.counter() > before, COUNT_WAIT, "the count"
            ):
                raise AssertionError(
                    f"{port_name}: not counted in pylm_messages_malformed_total: {hostile!r}"
                )
            if port.restarts != generation[0]:  # fresh servers: fresh counters
                generation[0] = port.restarts
                sent.clear()
                counted_before[0] = 0.0
            sent.append(hostile)

        run()
        stopped = port.alive()
        assert not stopped, f"{port_name}: {stopped} stopped during the fuzz"
        port.check(FINAL_CALLS)
        must = [hostile for hostile in sent if hostile.malformed is True]
        expected = counted_before[0] + len(must)
        _holds(lambda: port.counter() >= expected, COUNT_WAIT, "the malformed count")
        counted = port.counter() - counted_before[0]
        if counted < len(must):
            missing = _uncounted(port, must)
            raise AssertionError(
                f"{port_name}: {len(must)} malformed inputs sent, {counted:g} counted in"
                f" pylm_messages_malformed_total; not counted, alone: {missing}"
            )
        grown = rss_bytes() - memory_before
        assert grown < MEMORY_LIMIT, f"{port_name}: this process grew by {grown >> 20} MB"
    finally:
        earlier = list(port.crashes)
        port.close()
    final = port.crashes[len(earlier) :]
    assert not final, f"{port_name}: stop() raised {final}"


@pytest.mark.parametrize("port_name", ["stage-pull", "last-pull", "sink-pull", "hub-pull"])
def test_an_end_whose_count_is_not_8_bytes_is_counted_with_or_without_a_route(
    port_name: str,
) -> None:
    """Found by test_fuzz_port[hub-pull-payloads]: a hub dropped an END
    with a 7-byte count and no route (a tee's copy) without counting it,
    where the chained stages count it. Each such END counts once, routed
    or not, and the servers answer on."""
    port = PORTS[port_name]()
    try:
        before = port.counter()
        sent = 0
        for route in (ROUTE, b""):
            for payload in (b"\x00" * 7, b"\x00" * 9):
                msg = Msg(protocol.END, 2, payload, route=route)
                port.send(Hostile(f"stream: END {payload!r}", tuple(frames_of(msg))))
                sent += 1
                wait_for(
                    lambda n=sent: port.counter() >= before + n,
                    5,
                    f"{port_name}: END of {len(payload)} bytes, route {route!r}, counted",
                )
        port.check(1)
        assert port.counter() == before + sent
    finally:
        port.close()


def test_the_field_table_is_the_head() -> None:
    """FIELDS, which the strategies are built from, describes the head the
    protocol packs: same codes in order, contiguous offsets, 25 bytes."""
    codes = ">" + "".join(field.code for field in protocol.FIELDS)
    assert struct.calcsize(codes) == protocol.HEAD_SIZE
    offset = 0
    for field in protocol.FIELDS:
        assert field.offset == offset and struct.calcsize(">" + field.code) == field.size
        offset += field.size
    head = protocol.encode(protocol.REQUEST, 7, b"p", b"a.b", b"r", 1.5)[0]
    values = struct.unpack_from(codes, head)
    named = {field.name: value for field, value in zip(protocol.FIELDS, values, strict=True)}
    assert named == {
        "magic": b"PL", "version": 1, "kind": protocol.REQUEST, "flags": 0,
        "target_size": 3, "route_size": 1, "msg_id": 7, "deadline": 1.5,
    }  # fmt: skip
