"""Structure-aware Hypothesis strategies for fuzzing pylm's boundaries.

Everything about the head comes from the protocol's own field table,
:data:`pylm.protocol.FIELDS` (name, offset, size, ``struct`` code): valid
messages of every kind are built from it, then one field at a time is set to
a boundary (0, the maximum, sizes that overrun or underrun what follows,
NaN and infinite deadlines), the body is cut inside a field, or the frames
around it change. Payload strategies give valid envelopes hostile contents:
worker hello/heartbeat JSON (every field the master and hub read, with every
JSON type and range), ERROR details, BATCH framing, stream items and END
counts, cache requests. Envelope strategies wrap valid messages wrongly, and
raw TCP junk is bytes that are not ZMTP (or half of it).

Each example is a :class:`Hostile`: what to send, and whether the server
must count it as malformed (``True``), must not (``False``), or may do either
(``None``: a well-formed message the port may refuse or take).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field, replace
from typing import Any

from hypothesis import strategies as st

from pylm import protocol
from pylm.errors import ProtocolError

__all__ = [
    "ROGUE_ID",
    "Hostile",
    "Msg",
    "batches",
    "cache_requests",
    "decodes",
    "envelopes",
    "error_details",
    "field_values",
    "frames_of",
    "hellos",
    "json_values",
    "messages",
    "mutated",
    "pack_head",
    "stream_messages",
    "tcp_junk",
    "worker_answers",
]

FIELDS = protocol.FIELDS
HEAD_FORMAT = ">" + "".join(f.code for f in FIELDS)
HEAD_SIZE = sum(f.size for f in FIELDS)
BY_NAME = {f.name: f for f in FIELDS}
SIZE_FIELDS = ("target_size", "route_size")
ROGUE_ID = b"pylm-fuzz-rogue"  # the routing id of the fuzzer's sockets that pose as workers
_LENGTH = struct.Struct(">I")
_SEQ = struct.Struct(">Q")


# ---------------------------------------------------------------- what is sent


@dataclass(frozen=True)
class Hostile:
    """One generated input for a port."""

    what: str  # a short description, for reports
    frames: tuple[bytes, ...] = ()
    envelope: str = "ok"  # ok | bare | extra-empty | trailing | empties | many
    tcp: bytes | None = None  # raw TCP bytes instead of frames
    reset: bool = True  # tcp: end with a reset (else a close)
    malformed: bool | None = None  # must the server count it as malformed?
    to: str = "job"  # a worker: its job socket or its heartbeat socket
    tags: tuple[str, ...] = field(default=(), compare=False)

    def __repr__(self) -> str:
        if self.tcp is not None:
            end = "reset" if self.reset else "close"
            return f"Hostile({self.what!r}, tcp={self.tcp[:300]!r} ({len(self.tcp)} B), {end})"
        shown = [f[:300] + (b"..." if len(f) > 300 else b"") for f in self.frames]
        sizes = [len(f) for f in self.frames]
        extra = "" if self.to == "job" else f", to={self.to}"
        return (
            f"Hostile({self.what!r}, frames={shown!r} (sizes {sizes}),"
            f" envelope={self.envelope!r}, malformed={self.malformed}{extra})"
        )

    @property
    def category(self) -> str:
        """What kind of input this is, coarsely (to name what was not counted)."""
        return self.what.split(":")[0]


def decodes(frames: list[bytes] | tuple[bytes, ...]) -> bool:
    """Whether ``frames`` decode as a message (the protocol's own reading)."""
    try:
        protocol.decode(list(frames))
    except ProtocolError:
        return False
    return True


# ---------------------------------------------------------------- the head, from FIELDS


def pack_head(values: dict[str, Any]) -> bytes:
    """A head packed field by field from the table (offsets and codes)."""
    out = bytearray(HEAD_SIZE)
    for f in FIELDS:
        struct.pack_into(">" + f.code, out, f.offset, values[f.name])
    return bytes(out)


def field_values(name: str) -> st.SearchStrategy[Any]:
    """Boundary and arbitrary values of a head field, from its struct code:
    0 and the maximum (max+1 does not fit the field: no such value exists on
    the wire), their neighbours, any value; NaN, infinities, extremes and
    subnormals for a float."""
    f = BY_NAME[name]
    if f.code in ("B", "H", "Q"):
        top = 2 ** (8 * f.size) - 1
        edges = st.sampled_from([0, 1, top - 1, top, top // 2 + 1])
        values = edges | st.integers(0, top)
        if name == "kind":
            values = values | st.sampled_from([*protocol.KIND_NAMES, 0, 8])
        if name == "version":
            values = values | st.sampled_from([0, protocol.VERSION + 1])
        if name == "flags":
            values = values | st.sampled_from([protocol.PAYLOAD_FRAME, protocol.MORE, 0x03, 0x04])
        return values
    if f.code == "d":
        specials = [0.0, -0.0, math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, 1.0, 4e9]
        return st.sampled_from(specials) | st.floats(allow_nan=True, allow_infinity=True)
    size = f.size
    return st.sampled_from(
        [protocol.MAGIC, protocol.MAGIC[::-1], b"\x00" * size, b"\xff" * size]
    ) | st.binary(min_size=size, max_size=size)


@dataclass(frozen=True)
class Msg:
    """A valid message before it is framed."""

    kind: int
    msg_id: int = 1
    payload: bytes = b""
    target: bytes = b""
    route: bytes = b""
    deadline: float = 0.0
    flags: int = 0
    split: bool = False  # the payload in a frame of its own (PAYLOAD_FRAME)

    def values(self) -> dict[str, Any]:
        return {
            "magic": protocol.MAGIC,
            "version": protocol.VERSION,
            "kind": self.kind,
            "flags": self.flags | (protocol.PAYLOAD_FRAME if self.split else 0),
            "target_size": len(self.target),
            "route_size": len(self.route),
            "msg_id": self.msg_id,
            "deadline": self.deadline,
        }


def frames_of(msg: Msg, values: dict[str, Any] | None = None) -> list[bytes]:
    """The frames of ``msg`` with its head fields (``values`` override them)."""
    head = pack_head(values if values is not None else msg.values())
    body = head + msg.target + msg.route
    if msg.split:
        return [body, msg.payload]
    return [body + msg.payload]


def messages(
    targets: st.SearchStrategy[bytes],
    routes: st.SearchStrategy[bytes] | None = None,
    kinds: st.SearchStrategy[int] | None = None,
    payloads: st.SearchStrategy[bytes] | None = None,
) -> st.SearchStrategy[Msg]:
    """Valid messages of every kind (or of ``kinds``), shaped as the
    protocol says: targets on REQUESTs, JSON on ERROR and PONG, counts on END."""
    kinds = kinds if kinds is not None else st.sampled_from(sorted(protocol.KIND_NAMES))
    plain = payloads if payloads is not None else st.binary(max_size=64)
    routes = routes if routes is not None else st.just(b"")

    @st.composite
    def build(draw: st.DrawFn) -> Msg:
        kind = draw(kinds)
        payload: bytes
        if kind == protocol.ERROR:
            payload = draw(error_details()).frames[0]
        elif kind == protocol.PONG:
            payload = b'{"name": "x", "kind": "standalone", "functions": []}'
        elif kind == protocol.END:
            payload = draw(st.sampled_from([b"", _SEQ.pack(0), _SEQ.pack(1)]))
        elif kind == protocol.BATCH:
            inner = Msg(protocol.REQUEST, 7, b"x", draw(targets), draw(routes))
            payload = protocol.pack_batch([frames_of(inner)[0]])[HEAD_SIZE:]
        elif kind == protocol.PING:
            payload = b""
        else:
            payload = draw(plain)
        target = draw(targets) if kind == protocol.REQUEST else b""
        flags = draw(st.sampled_from([0, 0, protocol.MORE])) if kind == protocol.REPLY else 0
        return Msg(
            kind,
            msg_id=draw(st.integers(0, 2**64 - 1) | st.just(1)),
            payload=payload,
            target=target,
            route=draw(routes),
            deadline=draw(st.sampled_from([0.0, 4e9])),
            flags=flags,
            split=draw(st.booleans()) if kind != protocol.BATCH else False,
        )

    return build()


@st.composite
def mutated(draw: st.DrawFn, bases: st.SearchStrategy[Msg]) -> Hostile:
    """A valid message with exactly one thing wrong or extreme: one head
    field (from FIELDS) at a boundary or any value, a size that overruns or
    underruns what follows, the body cut inside a field, or its frames
    changed (payload frame missing, flag without the frame, frames after)."""
    msg = draw(bases)
    values = msg.values()
    how = draw(st.sampled_from(["field", "field", "field", "size", "cut", "frames"]))
    if how == "field":
        name = draw(st.sampled_from([f.name for f in FIELDS]))
        values[name] = draw(field_values(name))
        frames = frames_of(msg, values)
        what = f"{protocol.KIND_NAMES[msg.kind]} with {name}={values[name]!r}"
    elif how == "size":
        name = draw(st.sampled_from(SIZE_FIELDS))
        rest = len(frames_of(msg)[0]) - HEAD_SIZE
        delta = draw(st.sampled_from([-1, 1, 2, rest + 1]) | st.integers(-3, 3))
        top = 2 ** (8 * BY_NAME[name].size) - 1
        values[name] = min(top, max(0, values[name] + delta))
        frames = frames_of(msg, values)
        what = f"{protocol.KIND_NAMES[msg.kind]} with {name} {delta:+d}"
    elif how == "cut":
        body = frames_of(msg)[0]
        cuts = [f.offset for f in FIELDS] + [f.offset + 1 for f in FIELDS] + [HEAD_SIZE - 1]
        at = draw(st.sampled_from(cuts) | st.integers(0, len(body)))
        frames = [body[:at], *frames_of(msg)[1:]]
        what = f"{protocol.KIND_NAMES[msg.kind]} cut at byte {at}"
    else:
        change = draw(st.sampled_from(["no-payload-frame", "flag-only", "more-frames"]))
        base = frames_of(msg)
        if change == "no-payload-frame":
            split = replace(msg, split=True)
            frames = frames_of(split)[:1]
        elif change == "flag-only":
            values["flags"] |= protocol.PAYLOAD_FRAME
            frames = frames_of(replace(msg, split=False), values)
        else:
            extra = draw(st.lists(st.binary(max_size=30), min_size=1, max_size=4))
            frames = [*base, *extra]
        what = f"{protocol.KIND_NAMES[msg.kind]} {change}"
    return Hostile(
        f"field: {what}",
        tuple(frames),
        malformed=True if not decodes(frames) else None,
    )


# ---------------------------------------------------------------- JSON payloads


_BIG_INTS = [-(2**63), -1, 0, 1, 2, 2**31, 10**6, 10**7, 2**63, 2**64, 10**100]
_FLOATS = [0.5, 1.0, -1.0, math.nan, math.inf, -math.inf, 1e300, 1e-300]


def json_values(top: int = 10**7) -> st.SearchStrategy[Any]:
    """Any JSON value, biased to boundaries: huge and negative integers (up
    to ``top`` in magnitude among the arbitrary ones; the listed extremes
    beyond), NaN and infinities, strings that look like numbers, booleans,
    null, nested lists and objects."""
    scalars = (
        st.none()
        | st.booleans()
        | st.sampled_from([i for i in _BIG_INTS if abs(i) <= top])
        | st.integers(-top, top)
        | st.sampled_from(_FLOATS)
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.sampled_from(["1", "-1", "1e9", "NaN", "", "x" * 200])
        | st.text(max_size=20)
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=6,
    )


_JUNK_JSON = [
    b"",
    b"not json",
    b"[]",
    b"null",
    b'"text"',
    b"1",
    b"\xff\xfe\x00",
    b'{"slots": ',
    b"[" * 100_000 + b"]" * 100_000,  # deeper than json's recursion limit
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b'{"slots": 1e999}',
    b'{"slots": -1e999}',
    b'{"slots": NaN}',
    b'{"slots": 1' + b"0" * 5000 + b"}",  # an integer of 5000 digits
]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _hello_verdict(info: object) -> bool | None:
    """Whether a worker's hello or heartbeat must be refused (and counted),
    need not be, or may go either way (big but sane numbers)."""
    if not isinstance(info, dict):
        return True
    if "name" in info and not isinstance(info["name"], str):
        return True
    slots = info.get("slots", 1)
    if not _is_int(slots) or slots < 1:
        return True
    free = info.get("free", slots)
    if not _is_int(free) or free < 0:
        return True
    for flag in ("leaving", "bye"):
        if flag in info and not isinstance(info[flag], bool):
            return True
    if slots > 1024 or free > slots:
        return None  # capped, or refused: either is fine, memory must stay bounded
    return False


@st.composite
def hellos(draw: st.DrawFn, top: int = 10**7) -> Hostile:
    """A worker's PING (hello from its job socket, heartbeat from another,
    leaving notice, goodbye) with hostile JSON: every field the master or
    hub reads (name, slots, free, leaving, bye) of any type and range, or
    not JSON at all. The route names the rogue socket itself (a hello) or
    another (a heartbeat), or nothing."""
    route = draw(st.sampled_from([ROGUE_ID, ROGUE_ID, b"some-other-worker", b""]))
    if draw(st.integers(0, 9)) == 0:
        payload = draw(st.sampled_from(_JUNK_JSON))
        verdict: bool | None = True if payload else None  # empty: a plain PING, {}
        what = f"hello: junk {payload[:20]!r}"
    else:
        info: dict[str, Any] = {}
        valid = {"name": "rogue", "slots": 1, "free": 1}
        for key in ("name", "slots", "free", "leaving", "bye"):
            choice = draw(st.sampled_from(["valid", "hostile", "absent"]))
            if choice == "valid" and key in valid:
                info[key] = valid[key]
            elif choice == "hostile" and key in ("slots", "free") and draw(st.booleans()):
                info[key] = draw(st.sampled_from(_BIG_INTS + _FLOATS + ["1", True, None, [1]]))
            elif choice == "hostile":
                info[key] = draw(json_values(top))
        verdict = _hello_verdict(info)
        payload = json.dumps(info).encode()  # NaN and Infinity as Python writes them
        what = f"hello: {payload[:120]!r}"
    msg = Msg(protocol.PING, 0, payload, route=route, split=draw(st.booleans()))
    return Hostile(what, tuple(frames_of(msg)), malformed=verdict)


_CODES = ["unknown_function", "unknown_server", "remote", "too_large", "protocol", "unknown_key"]
_DETAIL_FIELDS = [
    "code", "message", "server", "function", "size", "limit", "key", "type",
    "remote_message", "traceback",
]  # fmt: skip


@st.composite
def error_details(draw: st.DrawFn) -> Hostile:
    """The JSON of an ERROR: each field of any type and range (codes known
    or not), or junk that is not a JSON object."""
    if draw(st.integers(0, 7)) == 0:
        payload = draw(st.sampled_from(_JUNK_JSON))
        return Hostile(f"error detail: junk {payload[:20]!r}", (payload,))
    detail: dict[str, Any] = {"code": draw(st.sampled_from(_CODES) | st.text(max_size=10))}
    for key in _DETAIL_FIELDS[1:]:
        if draw(st.booleans()):
            detail[key] = draw(json_values())
    payload = json.dumps(detail).encode()
    return Hostile(f"error detail: {payload[:120]!r}", (payload,))


@st.composite
def error_messages(draw: st.DrawFn, routes: st.SearchStrategy[bytes]) -> Hostile:
    """An ERROR with a hostile detail, routed or not (a tee's copy)."""
    detail = draw(error_details())
    msg = Msg(protocol.ERROR, draw(st.integers(0, 2**64 - 1)), detail.frames[0], route=draw(routes))
    return Hostile(detail.what.replace("error detail", "error"), tuple(frames_of(msg)))


# ---------------------------------------------------------------- framing


@st.composite
def batches(draw: st.DrawFn, jobs: st.SearchStrategy[Msg]) -> Hostile:
    """A BATCH whose framing is hostile: lengths that overrun the batch,
    zero lengths, a length cut short, many tiny messages, a batch inside."""
    parts: list[bytes] = []
    broken = False
    inner_bad = False
    for _ in range(draw(st.integers(0, 4))):
        shape = draw(st.sampled_from(["ok", "ok", "zero", "overrun", "nested", "junk"]))
        if shape == "ok":
            body = frames_of(draw(jobs))[0]
            parts.append(_LENGTH.pack(len(body)) + body)
        elif shape == "zero":
            parts.append(_LENGTH.pack(0))
            inner_bad = True
        elif shape == "junk":
            junk = draw(st.binary(max_size=40))
            parts.append(_LENGTH.pack(len(junk)) + junk)
            inner_bad = inner_bad or not decodes([junk])
        elif shape == "nested":
            inner = protocol.pack_batch([frames_of(draw(jobs))[0]])
            parts.append(_LENGTH.pack(len(inner)) + inner)
            inner_bad = True  # a BATCH does not carry a BATCH
        else:
            body = frames_of(draw(jobs))[0]
            claim = draw(st.sampled_from([len(body) + 1, 2**32 - 1]) | st.integers(len(body) + 1))
            parts.append(_LENGTH.pack(min(claim, 2**32 - 1)) + body)
            broken = True
    tiny = draw(st.sampled_from([0, 0, 0, 1000, 20_000]))
    if tiny:
        parts.append(_LENGTH.pack(0) * tiny)
        inner_bad = True
    tail = draw(st.sampled_from([b"", b"", b"\x00", b"\x00\x00\x00"]))
    broken = broken or bool(tail)
    body = protocol.BATCH_HEAD + b"".join(parts) + tail
    try:
        protocol.unpack_batch(body)
    except ProtocolError:
        broken = True
    verdict = True if (broken or inner_bad) else None
    return Hostile(
        f"batch: {len(parts)} part(s), {tiny} tiny, tail {tail!r}", (body,), malformed=verdict
    )


@st.composite
def stream_messages(draw: st.DrawFn, targets: st.SearchStrategy[bytes], route: bytes) -> Hostile:
    """Stream items (REQUEST flagged MORE) and END counts into a stage or
    hub: any ids, counts of 0 to 2^64-1, count payloads of the wrong size."""
    msg_id = draw(st.integers(0, 3) | st.integers(0, 2**64 - 1))
    if draw(st.booleans()):
        msg = Msg(protocol.REQUEST, msg_id, b"item", draw(targets), route, flags=protocol.MORE)
        return Hostile("stream: item", tuple(frames_of(msg)))
    count = draw(st.sampled_from([0, 1, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1))
    payload = draw(
        st.sampled_from([_SEQ.pack(count), b"", _SEQ.pack(count)[:7], _SEQ.pack(count) + b"\x00"])
    )
    msg = Msg(protocol.END, msg_id, payload, route=draw(st.sampled_from([route, b""])))
    verdict = True if len(payload) not in (0, 8) else None
    return Hostile(f"stream: END {payload!r}", tuple(frames_of(msg)), malformed=verdict)


@st.composite
def worker_answers(draw: st.DrawFn) -> Hostile:
    """What a rogue worker answers a master or hub: REPLY items (MORE) with
    SEQ routes of any value and length, END, ERROR, for job numbers nobody
    gave it."""
    number = draw(st.integers(0, 2**64 - 1))
    kind = draw(st.sampled_from(["item", "reply", "end", "error"]))
    if kind == "item":
        route = draw(st.sampled_from([b"", b"\x00", _SEQ.pack(0), _SEQ.pack(2**64 - 1)]))
        msg = Msg(protocol.REPLY, number, b"r", route=route, flags=protocol.MORE)
    elif kind == "reply":
        msg = Msg(protocol.REPLY, number, draw(st.binary(max_size=20)))
    elif kind == "end":
        msg = Msg(protocol.END, number, draw(st.sampled_from([b"", _SEQ.pack(2**64 - 1), b"\x01"])))
    else:
        msg = Msg(protocol.ERROR, number, draw(error_details()).frames[0])
    return Hostile(f"worker answer: {kind}", tuple(frames_of(msg)))


# ---------------------------------------------------------------- cache requests


@st.composite
def cache_requests(draw: st.DrawFn, server: str) -> Hostile:
    """Requests to a stage's cache (pylm/cache.py): set with key sizes that
    overrun or underrun, keys that are not UTF-8, get and delete of any
    key, unknown functions and servers. Values stay small: the cache
    stores what it is given, by design."""
    name = server.encode()
    function = draw(st.sampled_from([b"set", b"set", b"get", b"delete", b"drop", b""]))
    prefix = draw(st.sampled_from([name, name, b"other", b"\xff"]))
    key = draw(
        st.sampled_from([b"k", b"", b"\xff\xfe", "é".encode(), b"k" * 300]) | st.binary(max_size=8)
    )
    value = draw(st.binary(max_size=32))
    verdict: bool | None = None
    if function == b"set":
        claim = draw(st.sampled_from([len(key), len(key), 0, len(key) + 1, 65535]))
        payload = draw(st.sampled_from([struct.pack(">H", claim) + key + value, b"", b"\x00"]))
        if len(payload) < 2 or claim > len(payload) - 2:
            verdict = True
        elif claim and not _utf8(payload[2 : 2 + claim]):
            verdict = True
    else:
        payload = key
        if function in (b"get", b"delete") and not _utf8(key):
            verdict = True
    target = prefix + b"." + function if function else prefix
    msg = Msg(protocol.REQUEST, draw(st.integers(0, 2**64 - 1)), payload, target)
    if prefix != name or function not in (b"set", b"get", b"delete"):
        verdict = None if function else True  # unknown: answered as such; no dot: malformed
    return Hostile(f"cache: {target!r} {payload[:40]!r}", tuple(frames_of(msg)), malformed=verdict)


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ---------------------------------------------------------------- envelopes and TCP


@st.composite
def envelopes(draw: st.DrawFn, bases: st.SearchStrategy[Msg]) -> Hostile:
    """A valid message in a wrong envelope: without the empty delimiter a
    REQ would add (for REP-style ports), with an extra empty frame first,
    with frames after it, as nothing but empty frames, or in many frames."""
    msg = draw(bases)
    frames = frames_of(msg)
    envelope = draw(st.sampled_from(["bare", "extra-empty", "trailing", "empties", "many"]))
    if envelope == "empties":
        frames = [b""] * draw(st.integers(1, 4))
    elif envelope == "trailing":
        frames = [*frames, *draw(st.lists(st.binary(max_size=16), min_size=1, max_size=3))]
    elif envelope == "many":
        frames = [*frames, *([b"x"] * draw(st.sampled_from([50, 500])))]
    return Hostile(f"envelope: {envelope}", tuple(frames), envelope=envelope)


_SIGNATURE = b"\xff" + b"\x00" * 8 + b"\x7f"


def _greeting(major: int = 3, mechanism: bytes = b"NULL", as_server: int = 0) -> bytes:
    return (
        _SIGNATURE
        + bytes([major, 0])
        + mechanism.ljust(20, b"\x00")
        + bytes([as_server])
        + bytes(31)
    )


def _command(name: bytes, body: bytes) -> bytes:
    data = bytes([len(name)]) + name + body
    return (
        b"\x04" + bytes([len(data)]) + data
        if len(data) < 256
        else b"\x06" + struct.pack(">Q", len(data)) + data
    )


def _prop(name: bytes, value: bytes) -> bytes:
    return bytes([len(name)]) + name + struct.pack(">I", len(value)) + value


_DEALER = _greeting() + _command(b"READY", _prop(b"Socket-Type", b"DEALER"))
_TCP_SHAPES = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    _SIGNATURE[:1],
    _SIGNATURE,
    _SIGNATURE + b"\x03",
    _greeting()[:40],
    _greeting(),
    _greeting(major=2),
    _greeting(major=255),
    _greeting(mechanism=b"CURVE"),
    _greeting(mechanism=b"BOGUS"),
    _greeting() + _command(b"READY", _prop(b"Socket-Type", b"DEALER"))[:5],
    _greeting() + _command(b"READY", _prop(b"Socket-Type", b"NOPE")),
    _greeting() + _command(b"READY", b"\x0bSocket-Type\xff\xff\xff\xff"),
    _greeting() + _command(b"ERROR", b"\x03bad"),
    # A DEALER's handshake, then frames that claim 2^63 bytes or lie about MORE.
    _DEALER + b"\x02\x7f" + b"\xff" * 7,
    _DEALER + b"\x01\x00\x00\x05hello",
    _greeting()
    + _command(b"READY", _prop(b"Socket-Type", b"PUSH"))
    + b"\x00\x19PL\x01"
    + bytes(22),
    _greeting()
    + _command(b"READY", _prop(b"Socket-Type", b"REQ"))
    + b"\x01\x00\x00\xff"
    + bytes(255),
]


@st.composite
def tcp_junk(draw: st.DrawFn) -> Hostile:
    """Bytes on a plain TCP connection that are not a ZMTP peer: random
    bytes, half a greeting, a greeting of another version or mechanism, a
    handshake with a broken READY, frames that claim huge sizes; then a
    reset or a close."""
    if draw(st.booleans()):
        data = draw(st.binary(min_size=1, max_size=200))
        what = "tcp: random bytes"
    else:
        shape = draw(st.sampled_from(_TCP_SHAPES))
        cut = draw(st.sampled_from([len(shape), len(shape)]) | st.integers(1, len(shape)))
        data = shape[:cut] + draw(st.binary(max_size=16))
        what = f"tcp: zmtp-ish {shape[:12]!r}"
    # Counted when libzmq reports a failed handshake; a connection cut
    # before its greeting is complete fails none (pylm.handshakes), and
    # random bytes may read as ZMTP 1.0 messages. tests/test_standalone.py
    # checks the counting on whole greetings.
    return Hostile(what, tcp=data, reset=draw(st.booleans()), malformed=None)
