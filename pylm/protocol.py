"""The pylm wire protocol, version 1.

A pylm message is one ZeroMQ frame, the *body*; only a large payload travels
in a second frame. Transport envelopes come before the body and are not part
of pylm: a standalone server binds a ROUTER socket and answers a DEALER that
sends the body as it is (pylm's clients), or a REQ (the body after an empty
delimiter), each in its own envelope (see pylm.transport.read_envelope).
Frames after a complete message are ignored, which leaves room for extensions.

Body: a 25-byte head, then target, route and payload. Integers are
big-endian (``struct`` format ``>2sBBBHHQd``)::

    offset  size  field
    0       2     magic        b"PL"
    2       1     version      1
    3       1     kind         1 REQUEST, 2 REPLY, 3 ERROR, 4 PING, 5 PONG,
                               6 BATCH, 7 END, 8 CACHE
    4       1     flags        bit 0 (0x01) PAYLOAD_FRAME: the payload is the
                               next frame, not the rest of this one.
                               bit 1 (0x02) MORE, on a REPLY: one item of a
                               streamed result; more items, and an END, follow.
                               Other bits are 0 in version 1; receivers ignore them.
    5       2     target size  t, bytes of the target
    7       2     route size   r, bytes of the route
    9       8     message id   uint64 chosen by the sender of a REQUEST or PING
                               and echoed in the REPLY, ERROR or PONG answering it
    17      8     deadline     IEEE-754 float64: seconds since the Unix epoch after
                               which the sender stops waiting; 0.0 means none
    25      t     target       REQUEST and CACHE: UTF-8 ``<server>.<function>``,
                               split at the last dot; empty for the other kinds
    25+t    r     route        where the answer goes when it is not the socket
                               the request came from (pipelines); empty for a
                               standalone server, which ignores it
    25+t+r  rest  payload      the bytes the function receives or returns; for
                               ERROR and PONG a UTF-8 JSON object

Kinds and payloads::

    REQUEST  the argument of the function
    REPLY    the function's result
    ERROR    {"code": ..., "message": ..., ...} (codes below)
    PING     empty
    PONG     {"name", "kind", "functions", "pid", "version"}
    END      the job with this message id has no more results: it closes the
             items flagged MORE, and its payload is their number (8 bytes,
             big-endian; empty means 0)
    CACHE    a request for the server's own cache (not a function call):
             target ``<server>.set``, ``.get`` or ``.delete``, payload as
             in :mod:`pylm.cache`; answered with REPLY or ERROR

Error codes and the exception the caller raises::

    unknown_function  UnknownFunction   also: server, function
    unknown_server    UnknownServer     also: server (asked), function
    remote            RemoteError       also: server, function, type,
                                        remote_message, traceback
    too_large         PayloadTooLarge   also: size, limit
    protocol          ProtocolError     -
    unknown_key       UnknownKey        also: server, key (cache requests)
    expired           RequestTimeout    -   (work read past its deadline: not run)

A receiver that gets a head with another magic or version answers ERROR
``protocol`` when it can read a message id from it, and otherwise drops it.
An unknown error code is raised as :class:`~pylm.errors.PylmError`.

Why this shape: ZeroMQ delivers a one-frame message measurably sooner than
a multi-frame one (a second frame cost about a third of the round-trip rate
in our measurements), and every frame is a separate call from Python on both
sides; so messages are one frame, decoded with one ``struct`` call and
slices, up to :data:`SPLIT_PAYLOAD` bytes of payload (just under 1 MiB: a
100 KiB call measured a third faster joined in one frame than split in two,
the copy costing less than the second frame's path). From 1 MiB the payload
travels in its own frame, never joined into a new buffer, and libzmq takes it
without a copy (:data:`pylm.transport.ZERO_COPY_MIN`). Names travel as text,
so any language can speak the protocol.
"""

from __future__ import annotations

import json
import struct
from typing import Any, NamedTuple

from pylm.errors import (
    PayloadTooLarge,
    ProtocolError,
    PylmError,
    RemoteError,
    RequestTimeout,
    UnknownFunction,
    UnknownKey,
    UnknownServer,
)

__all__ = [
    "BATCH",
    "BATCH_BYTES",
    "BATCH_HEAD",
    "BATCH_JOBS",
    "BATCH_PREFIX",
    "CACHE",
    "CLOCK_SLACK",
    "COUNT",
    "DEADLINE_BYTES",
    "DEFAULT_MAX_PAYLOAD",
    "END",
    "ERROR",
    "FIELDS",
    "FRAME_SLACK",
    "HEAD_SIZE",
    "ID_BYTES",
    "KIND_NAMES",
    "LEAD",
    "MAGIC",
    "MAX_BATCH_MESSAGES",
    "MAX_ERROR_DETAIL",
    "MORE",
    "NO_DEADLINE",
    "ONE_FRAME_REQUEST",
    "PAYLOAD_FRAME",
    "PING",
    "PONG",
    "REPLY",
    "REPLY_LEAD",
    "REPLY_PREFIX",
    "REQUEST",
    "SPLIT_PAYLOAD",
    "VERSION",
    "Batch",
    "Message",
    "check_payload",
    "decode",
    "decode_error",
    "encode",
    "encode_error",
    "error_detail",
    "expiry_stamp",
    "forward",
    "has_payload_frame",
    "one_frame_request",
    "pack_batch",
    "pack_id_deadline",
    "pack_sizes",
    "past_deadline",
    "read_id",
    "read_id_deadline",
    "read_sizes",
    "reply_head",
    "reply_payload",
    "reply_to",
    "request_prefix",
    "result_of",
    "salvage_msg_id",
    "split_target",
    "unpack_batch",
    "unpack_head",
    "unpack_id",
    "with_id",
]

MAGIC = b"PL"
VERSION = 1

REQUEST = 1
REPLY = 2
ERROR = 3
PING = 4
PONG = 5
BATCH = 6
END = 7
CACHE = 8

KIND_NAMES = {
    REQUEST: "REQUEST",
    REPLY: "REPLY",
    ERROR: "ERROR",
    PING: "PING",
    PONG: "PONG",
    BATCH: "BATCH",
    END: "END",
    CACHE: "CACHE",
}

PAYLOAD_FRAME = 0x01
MORE = 0x02
SPLIT_PAYLOAD = (1 << 20) - 1  # senders put larger payloads in a frame of their own
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024
"""The largest payload servers take and clients send, unless told otherwise."""
FRAME_SLACK = 64 * 1024
"""Room in a frame beyond the payload, for its head, target and route: a
server's sockets take frames up to its ``max_payload`` plus this (libzmq's
``MAXMSGSIZE`` drops a peer that sends a larger one before pylm reads it)."""

_HEAD = struct.Struct(">2sBBBHHQd")
HEAD_SIZE = _HEAD.size  # 25
unpack_head = _HEAD.unpack_from  # for hot loops that check the fields themselves
_PREFIX = MAGIC + bytes([VERSION])
_MAX_ID = 2**64 - 1
_MAX_FIELD = 2**16 - 1


class _Field(NamedTuple):
    """One field of the head: what :data:`FIELDS` lists."""

    name: str
    offset: int
    size: int
    code: str  # its ``struct`` format code (big-endian, as in the head's format)
    meaning: str


FIELDS: tuple[_Field, ...] = (
    _Field("magic", 0, 2, "2s", 'b"PL"'),
    _Field("version", 2, 1, "B", "protocol version, 1"),
    _Field("kind", 3, 1, "B", "1 REQUEST .. 8 CACHE (KIND_NAMES)"),
    _Field("flags", 4, 1, "B", "0x01 PAYLOAD_FRAME, 0x02 MORE; other bits 0"),
    _Field("target_size", 5, 2, "H", "t, bytes of the target"),
    _Field("route_size", 7, 2, "H", "r, bytes of the route"),
    _Field("msg_id", 9, 8, "Q", "uint64 message id, echoed in the answer"),
    _Field("deadline", 17, 8, "d", "float64 Unix time the sender stops waiting; 0.0 none"),
)
"""The head, field by field, machine-readable (the table in the module's
docstring): name, offset, size in bytes, ``struct`` code, meaning. Target
(``target_size`` bytes), route (``route_size``) and payload follow it."""


class Message(NamedTuple):
    """A decoded message."""

    kind: int
    msg_id: int
    payload: bytes
    target: bytes = b""
    route: bytes = b""
    deadline: float = 0.0
    flags: int = 0


def encode(
    kind: int,
    msg_id: int,
    payload: bytes = b"",
    target: bytes = b"",
    route: bytes = b"",
    deadline: float = 0.0,
    flags: int = 0,
) -> list[bytes]:
    """The frames of a message: one, or two when the payload is large.
    ``flags``: MORE, or 0 (PAYLOAD_FRAME is set here when needed)."""
    if len(target) > _MAX_FIELD or len(route) > _MAX_FIELD:
        raise ProtocolError(
            f"target of {len(target)} and route of {len(route)} bytes:"
            f" each must be at most {_MAX_FIELD}"
        )
    size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
    if size > SPLIT_PAYLOAD:
        head = _HEAD.pack(
            MAGIC,
            VERSION,
            kind,
            flags | PAYLOAD_FRAME,
            len(target),
            len(route),
            msg_id & _MAX_ID,
            deadline,
        )
        return [head + target + route, payload]
    head = _HEAD.pack(
        MAGIC, VERSION, kind, flags & ~PAYLOAD_FRAME, len(target), len(route), msg_id & _MAX_ID,
        deadline,
    )  # fmt: skip
    return [head + target + route + payload]


# ------------------------------------------------------------------ hot paths
# Pieces for the loops that read and build the most common messages, a
# one-frame REQUEST or REPLY, without going through encode() and decode().
# Constants, slices and bound ``struct`` methods cost nothing over literal
# offsets; callers bind them to locals. A message read with them is one whose
# LEAD matched and whose length was checked against HEAD_SIZE.
_ID_DEADLINE = struct.Struct(">Qd")
pack_id_deadline = _ID_DEADLINE.pack
unpack_id = struct.Struct(">Q").unpack_from  # the message id is at offset 9
_pack_id = struct.Struct(">Q").pack
_SIZES = struct.Struct(">HH")  # target and route sizes, at offset 5
pack_sizes = _SIZES.pack
read_sizes = struct.Struct(">5xHH").unpack_from
"""``(target size, route size)`` of a head."""
read_id = struct.Struct(">9xQ").unpack_from
"""``(message id,)`` of a head."""
read_id_deadline = struct.Struct(">9xQd").unpack_from
"""``(message id, deadline)`` of a head."""

LEAD = slice(0, 5)
"""Magic, version, kind and flags: ``body[LEAD]`` is ONE_FRAME_REQUEST or
BATCH_PREFIX for the messages hot loops take themselves."""
REPLY_LEAD = slice(0, 9)
"""The head up to the id: ``body[REPLY_LEAD]`` is REPLY_PREFIX for a one-frame
REPLY without target or route, whose payload starts at HEAD_SIZE."""
ID_BYTES = slice(9, 17)
"""The message id, as bytes."""
DEADLINE_BYTES = slice(17, 25)
"""The deadline, as bytes: for deadlines of 0.0 (none) and later, the order
of these bytes is the order of the times, so ``NO_DEADLINE <
body[DEADLINE_BYTES] < expiry_stamp(now)`` tells a passed deadline without
reading the float."""
NO_DEADLINE = bytes(8)
"""``body[DEADLINE_BYTES]`` of a message without a deadline (0.0)."""
CLOCK_SLACK = 1.0
"""Seconds a deadline is given past its time before a receiver drops the
work: the clocks of the sender's and the receiver's hosts may differ by
this much (NTP keeps them within milliseconds)."""
_ID_DEADLINE_BYTES = slice(9, 25)
_STAMP_ID = slice(0, 8)  # the id in pack_id_deadline()'s bytes
_DEADLINE = struct.Struct(">d")


def expiry_stamp(now: float) -> bytes:
    """What a deadline is compared with at Unix time ``now``: work whose
    ``body[DEADLINE_BYTES]`` is above NO_DEADLINE and below it is past its
    deadline by more than CLOCK_SLACK."""
    return _DEADLINE.pack(now - CLOCK_SLACK)


def past_deadline(body: bytes, stamp: bytes) -> bool:
    """Whether the message whose head starts ``body`` is past its deadline
    (``stamp``: :func:`expiry_stamp` of now); False for a body too short to
    hold one (it is malformed, and dropped as such)."""
    deadline = body[DEADLINE_BYTES]
    return NO_DEADLINE < deadline < stamp and len(deadline) == 8


ONE_FRAME_REQUEST = MAGIC + bytes([VERSION, REQUEST, 0])
"""``body[LEAD]`` of a REQUEST whose payload is in its one frame."""

COUNT = struct.Struct(">Q")
"""An END's payload, the number of items its job gave; also the number of an
item in the route of a worker's REPLY flagged MORE."""


def request_prefix(target: bytes, route: bytes = b"") -> bytes:
    """The bytes before the id of a one-frame REQUEST for ``target``: a
    request body is ``prefix + pack_id_deadline(id, deadline) + target +
    route + payload``."""
    return ONE_FRAME_REQUEST + _SIZES.pack(len(target), len(route))


REPLY_PREFIX = _HEAD.pack(MAGIC, VERSION, REPLY, 0, 0, 0, 0, 0.0)[:9]
"""The first 9 bytes of a one-frame REPLY; its payload starts at HEAD_SIZE."""


def reply_to(request: bytes, result: bytes) -> bytes:
    """A one-frame REPLY carrying ``result`` (of at most SPLIT_PAYLOAD
    bytes) that answers the one-frame REQUEST ``request``: its id bytes are
    the request's, as they came."""
    return b"".join((REPLY_PREFIX, request[ID_BYTES], NO_DEADLINE, result))


def one_frame_request(
    msg_id: int, deadline: float, target: bytes, route: bytes, payload: bytes
) -> bytes:
    """What ``encode(REQUEST, msg_id, payload, target, route, deadline)[0]``
    is for a payload of at most SPLIT_PAYLOAD bytes, built faster."""
    return b"".join(
        (
            ONE_FRAME_REQUEST,
            _SIZES.pack(len(target), len(route)),
            _ID_DEADLINE.pack(msg_id, deadline),
            target,
            route,
            payload,
        )
    )


def forward(request: bytes, target: bytes, route: bytes, payload: bytes) -> bytes:
    """A one-frame REQUEST for ``target`` with ``route`` and ``payload``
    (of at most SPLIT_PAYLOAD bytes) that keeps the id and deadline bytes of
    the one-frame REQUEST ``request``: a stage passing a job on."""
    return b"".join(
        (
            ONE_FRAME_REQUEST,
            _SIZES.pack(len(target), len(route)),
            request[_ID_DEADLINE_BYTES],
            target,
            route,
            payload,
        )
    )


def with_id(body: bytes, msg_id: int) -> bytes:
    """``body``, a message's first frame, with message id ``msg_id``."""
    return b"".join((body[:9], _pack_id(msg_id & _MAX_ID), body[17:]))


def reply_payload(answer: bytes, stamp: bytes) -> bytes | None:
    """The payload of ``answer`` when it is a one-frame REPLY to the request
    whose id and deadline are ``stamp`` (pack_id_deadline()'s bytes); else None."""
    if answer[REPLY_LEAD] == REPLY_PREFIX and answer[ID_BYTES] == stamp[_STAMP_ID]:
        return answer[HEAD_SIZE:]
    return None


def has_payload_frame(head: bytes) -> bool:
    """Whether the message whose first frame is ``head`` says a payload frame
    follows (False for a frame too short to say)."""
    return len(head) > 4 and bool(head[4] & PAYLOAD_FRAME)


BATCH_HEAD = _HEAD.pack(MAGIC, VERSION, BATCH, 0, 0, 0, 0, 0.0)
"""The head of a BATCH: several one-frame messages in one, each preceded by
its length (4 bytes, big-endian), as its payload."""
BATCH_PREFIX = BATCH_HEAD[LEAD]  # how a hot loop tells a BATCH: magic, version, kind, flags
_LENGTH = struct.Struct(">I")
_pack_length = _LENGTH.pack


def pack_batch(messages: list[bytes]) -> bytes:
    """One BATCH carrying ``messages`` (each a one-frame message)."""
    parts = [BATCH_HEAD]
    for message in messages:
        parts.append(_pack_length(len(message)))
        parts.append(message)
    return b"".join(parts)


MAX_BATCH_MESSAGES = 4096
"""Messages a receiver takes in one BATCH (senders put 1024 at most): a 32 MiB
batch of empty messages would otherwise cost a list of millions."""
BATCH_JOBS = 64
"""Jobs (or results) a sender puts in one BATCH by default: those ready at
once, up to this many and :data:`BATCH_BYTES` of payloads."""
BATCH_BYTES = 8192
"""Bytes of payloads in one BATCH by default: larger jobs gain nothing by
batching (their copies cost more than the messages saved) and go alone."""


class Batch:
    """One-frame messages held by a sender to go as one BATCH: up to
    :data:`BATCH_JOBS` of them and :data:`BATCH_BYTES` of payloads."""

    __slots__ = ("bodies", "filled")

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.filled = 0  # bytes of their payloads

    def __bool__(self) -> bool:
        return bool(self.bodies)

    def fits(self, size: int) -> bool:
        """Whether a message of ``size`` payload bytes may join (an empty batch takes any)."""
        return not self.bodies or self.filled + size <= BATCH_BYTES

    def add(self, body: bytes, size: int) -> bool:
        """Hold ``body`` (``size`` bytes of payload); True once the batch is full."""
        self.bodies.append(body)
        self.filled += size
        return len(self.bodies) == BATCH_JOBS

    def take(self) -> list[bytes]:
        """The messages held, in order; the batch is empty again."""
        bodies, self.bodies, self.filled = self.bodies, [], 0
        return bodies


def unpack_batch(body: bytes) -> list[bytes]:
    """The messages a BATCH carries; :class:`ProtocolError` if they overrun it
    or are more than :data:`MAX_BATCH_MESSAGES`."""
    if len(body) < HEAD_SIZE:
        raise ProtocolError(f"BATCH of {len(body)} bytes, shorter than a head")
    if body[5:9] != b"\0\0\0\0":
        target_size, route_size = _SIZES.unpack_from(body, 5)
        raise ProtocolError(
            f"BATCH with a target ({target_size} bytes) or a route ({route_size}): it has neither"
        )
    messages: list[bytes] = []
    offset, size = HEAD_SIZE, len(body)
    unpack_length = _LENGTH.unpack_from
    while offset < size:
        if len(messages) == MAX_BATCH_MESSAGES:
            raise ProtocolError(f"BATCH of more than {MAX_BATCH_MESSAGES} messages")
        if offset + 4 > size:
            raise ProtocolError(f"BATCH cut inside a length, at byte {offset} of {size}")
        (length,) = unpack_length(body, offset)
        offset += 4
        if offset + length > size:
            raise ProtocolError(
                f"BATCH message of {length} bytes at byte {offset} overruns the {size}-byte batch"
            )
        messages.append(body[offset : offset + length])
        offset += length
    return messages


def reply_head(msg_id: int, kind: int = REPLY, flags: int = 0) -> bytes:
    """The head of an answer without target or route; the payload follows
    it in the same frame (or in the next one, with ``PAYLOAD_FRAME``)."""
    return _HEAD.pack(MAGIC, VERSION, kind, flags, 0, 0, msg_id, 0.0)


def decode(frames: list[bytes]) -> Message:
    """Decode the frames of a message (envelope removed); raise
    :class:`ProtocolError` naming what is wrong."""
    if not frames:
        raise ProtocolError("no frames")
    body = frames[0]
    if len(body) < HEAD_SIZE:
        raise ProtocolError(
            f"message too short: {len(body)} bytes, a head needs {HEAD_SIZE}"
            f" (starts with {bytes(body[:8])!r})"
        )
    if body[:3] != _PREFIX:
        if body[:2] == MAGIC:
            raise ProtocolError(
                f"unsupported protocol version {body[2]}, this side speaks {VERSION}"
            )
        raise ProtocolError(f"bad magic {bytes(body[:2])!r}, expected {MAGIC!r}")
    _, _, kind, flags, target_size, route_size, msg_id, deadline = _HEAD.unpack_from(body)
    if kind not in KIND_NAMES:
        raise ProtocolError(f"unknown message kind {kind}")
    end = HEAD_SIZE + target_size + route_size
    if end > len(body):
        raise ProtocolError(
            f"target ({target_size} bytes) and route ({route_size} bytes) overrun"
            f" the {len(body)}-byte message"
        )
    expected = 2 if flags & PAYLOAD_FRAME else 1
    if len(frames) < expected:
        raise ProtocolError(f"{KIND_NAMES[kind]} without its payload frame")
    if expected == 2:
        if end != len(body):
            raise ProtocolError("bytes after the route although the payload has its own frame")
        payload = frames[1]
    else:
        payload = body[end:]
    target = body[HEAD_SIZE : HEAD_SIZE + target_size]
    route = body[HEAD_SIZE + target_size : end]
    return Message(kind, msg_id, payload, target, route, deadline, flags)


def salvage_msg_id(frames: list[bytes]) -> int | None:
    """The message id of a message that failed to decode, when one can be read."""
    if frames and len(frames[0]) >= HEAD_SIZE and frames[0][:2] == MAGIC:
        return int(_HEAD.unpack_from(frames[0])[6])
    return None


def split_target(target: bytes) -> tuple[str, str]:
    """Split ``b"server.function"`` at the last dot into text."""
    try:
        text = target.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"target is not UTF-8: {target[:80]!r}") from None
    server, dot, function = text.rpartition(".")
    if not dot or not function:
        raise ProtocolError(f"target {text[:200]!r} is not of the form 'server.function'")
    return server, function


def check_payload(payload: object, limit: int) -> bytes:
    """Raise ``TypeError`` unless ``payload`` is bytes-like, and
    :class:`PayloadTooLarge` when it is larger than ``limit``; the payload
    as ``bytes`` (itself if it is)."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        hint = " (encode text first, e.g. payload.encode())" if isinstance(payload, str) else ""
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}{hint}")
    size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
    if size > limit:
        raise PayloadTooLarge(
            f"payload of {size} bytes is larger than the limit of {limit} bytes",
            size=size,
            limit=limit,
        )
    return payload if type(payload) is bytes else bytes(payload)


_CODES: dict[type[PylmError], str] = {
    UnknownFunction: "unknown_function",
    UnknownServer: "unknown_server",
    RemoteError: "remote",
    PayloadTooLarge: "too_large",
    ProtocolError: "protocol",
    UnknownKey: "unknown_key",
    RequestTimeout: "expired",
}


def encode_error(msg_id: int, error: PylmError, route: bytes = b"") -> list[bytes]:
    """The frames of an ERROR message carrying ``error`` back to the caller
    (through ``route``, in a pipeline)."""
    return encode(ERROR, msg_id, error_detail(error), route=route)


def error_detail(error: PylmError) -> bytes:
    """The payload of an ERROR message carrying ``error``."""
    detail: dict[str, Any] = {
        "code": _CODES.get(type(error), "error"),
        "message": PylmError.__str__(error),
    }
    for attr in ("server", "function", "size", "limit", "key"):
        if hasattr(error, attr):
            detail[attr] = getattr(error, attr)
    if isinstance(error, RemoteError):
        detail["type"] = error.remote_type
        detail["remote_message"] = error.remote_message
        detail["traceback"] = error.remote_traceback
    return json.dumps(detail).encode("utf-8")


MAX_ERROR_DETAIL = 1024 * 1024
"""Bytes of an ERROR's payload a receiver reads; a larger one is a ProtocolError."""


def decode_error(payload: bytes) -> PylmError:
    """Rebuild the exception an ERROR message carries; a :class:`ProtocolError`
    saying what is wrong when its payload is not an error detail (not a JSON
    object, sizes that are not non-negative ints, over MAX_ERROR_DETAIL)."""
    if len(payload) > MAX_ERROR_DETAIL:
        return ProtocolError(
            f"error detail of {len(payload)} bytes, more than {MAX_ERROR_DETAIL}:"
            f" {bytes(payload[:200])!r}"
        )
    try:
        detail = json.loads(payload)
        if not isinstance(detail, dict):
            raise ValueError("not a JSON object")
        for field in ("size", "limit"):
            value = detail.get(field, 0)
            if type(value) is not int or value < 0:  # bool is no size
                raise ValueError(f"{field} {value!r:.40} is not a non-negative int")
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting too deep
        return ProtocolError(f"malformed error detail {bytes(payload[:200])!r}: {exc!s:.200}")
    code = str(detail.get("code", ""))
    message = str(detail.get("message", ""))
    server = str(detail.get("server", ""))
    function = str(detail.get("function", ""))
    if code == "unknown_function":
        return UnknownFunction(message, server=server, function=function)
    if code == "unknown_server":
        return UnknownServer(message, server=server, function=function)
    if code == "remote":
        return RemoteError(
            message,
            remote_type=str(detail.get("type", "")),
            remote_message=str(detail.get("remote_message", "")),
            remote_traceback=str(detail.get("traceback", "")),
            server=server,
            function=function,
        )
    if code == "too_large":
        return PayloadTooLarge(message, size=detail.get("size", 0), limit=detail.get("limit", 0))
    if code == "protocol":
        return ProtocolError(message)
    if code == "unknown_key":
        return UnknownKey(message, server=server, key=str(detail.get("key", "")))
    if code == "expired":
        return RequestTimeout(message)
    return PylmError(f"{message} (error code {code[:40]!r})")


def result_of(message: Message) -> bytes:
    """The payload of an answer, or raise the error it carries."""
    if message.kind == REPLY or message.kind == PONG:
        return message.payload
    if message.kind == ERROR:
        raise decode_error(message.payload)
    raise ProtocolError(f"unexpected answer of kind {KIND_NAMES[message.kind]}")
