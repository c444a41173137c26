"""The pylm wire protocol, version 1.

Every pylm message is a ZeroMQ multipart message. Transport envelopes come
first and are not part of pylm: the routing id a ROUTER socket prepends, and
the empty delimiter frame a REQ socket adds. The first pylm frame is the
*head*; the frames after it depend on the head's kind.

Head frame: 21 fixed bytes, then a variable target. Integers are big-endian::

    offset  size  field
    0       2     magic       b"PL"
    2       1     version     1
    3       1     kind        1 REQUEST, 2 REPLY, 3 ERROR, 4 PING, 5 PONG
    4       1     flags       0 in version 1; receivers ignore bits they do not know
    5       8     message id  uint64 chosen by the sender of a REQUEST or PING and
                              echoed in the REPLY, ERROR or PONG that answers it
    13      8     deadline    IEEE-754 float64: seconds since the Unix epoch after
                              which the sender stops waiting; 0.0 means none
    21      n     target      REQUEST: UTF-8 ``<server>.<function>``, split at the
                              last dot; empty for every other kind

Messages, as the frames after any envelope::

    REQUEST  [head, payload, *route]  payload: the argument, raw bytes. Route
                                      frames are reserved for the routing of
                                      later patterns (chained, parallel); a
                                      standalone server ignores them.
    REPLY    [head, payload]          payload: the function's result, raw bytes
    ERROR    [head, code, detail]     code: ASCII error code (table below);
                                      detail: UTF-8 JSON object with at least
                                      "message"
    PING     [head]
    PONG     [head, info]             info: UTF-8 JSON object describing the
                                      server ("name", "kind", "functions",
                                      "pid", "version")

Error codes and the exception the caller raises::

    unknown_function  UnknownFunction   detail: server, function
    unknown_server    UnknownServer     detail: server (asked), function
    remote            RemoteError       detail: server, function, type, traceback
    too_large         PayloadTooLarge   detail: size, limit
    protocol          ProtocolError     detail: message only

A receiver that gets a head with another magic or version answers ERROR
``protocol`` when it can read a message id from it, and otherwise drops it.
An unknown error code is raised as :class:`~pylm.errors.PylmError`.

Why this shape: the payload is always a frame of its own, so it is never
copied to build or read a message, and everything else fits in the one head
frame, because every frame costs a separate call from Python on both sides.
Names of servers and functions travel as text so that any language can speak
the protocol; nothing on the hot path is serialized beyond one ``struct``.
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
    UnknownFunction,
    UnknownServer,
)

__all__ = [
    "ERROR",
    "HEAD_SIZE",
    "MAGIC",
    "PING",
    "PONG",
    "REPLY",
    "REQUEST",
    "VERSION",
    "Head",
    "check_payload",
    "decode_error",
    "decode_head",
    "encode_error",
    "reply_head",
    "request_head",
    "result_of",
    "salvage_msg_id",
    "split_target",
]

MAGIC = b"PL"
VERSION = 1

REQUEST = 1
REPLY = 2
ERROR = 3
PING = 4
PONG = 5

KIND_NAMES = {REQUEST: "REQUEST", REPLY: "REPLY", ERROR: "ERROR", PING: "PING", PONG: "PONG"}

_HEAD = struct.Struct(">2sBBBQd")
HEAD_SIZE = _HEAD.size  # 21
_PREFIX = MAGIC + bytes([VERSION])
_MAX_ID = 2**64 - 1


class Head(NamedTuple):
    """A decoded head frame."""

    kind: int
    flags: int
    msg_id: int
    deadline: float
    target: bytes


def request_head(msg_id: int, target: bytes, deadline: float = 0.0, kind: int = REQUEST) -> bytes:
    """Build the head of a REQUEST (or PING, with an empty target)."""
    return _HEAD.pack(MAGIC, VERSION, kind, 0, msg_id & _MAX_ID, deadline) + target


def reply_head(msg_id: int, kind: int = REPLY) -> bytes:
    """Build the head of a REPLY, ERROR or PONG answering ``msg_id``."""
    return _HEAD.pack(MAGIC, VERSION, kind, 0, msg_id, 0.0)


def decode_head(frame: bytes) -> Head:
    """Decode a head frame; raise :class:`ProtocolError` naming what is wrong."""
    if len(frame) < HEAD_SIZE:
        raise ProtocolError(
            f"head frame too short: {len(frame)} bytes, expected at least {HEAD_SIZE}"
            f" (starts with {bytes(frame[:8])!r})"
        )
    if frame[:3] != _PREFIX:
        if frame[:2] == MAGIC:
            raise ProtocolError(
                f"unsupported protocol version {frame[2]}, this side speaks {VERSION}"
            )
        raise ProtocolError(f"bad magic {bytes(frame[:2])!r}, expected {MAGIC!r}")
    _, _, kind, flags, msg_id, deadline = _HEAD.unpack_from(frame)
    if kind not in KIND_NAMES:
        raise ProtocolError(f"unknown message kind {kind}")
    return Head(kind, flags, msg_id, deadline, bytes(frame[HEAD_SIZE:]))


def salvage_msg_id(frame: bytes) -> int | None:
    """The message id of a head that failed to decode, when one can be read."""
    if len(frame) >= HEAD_SIZE and frame[:2] == MAGIC:
        return int(_HEAD.unpack_from(frame)[4])
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


def check_payload(payload: object, limit: int) -> None:
    """Raise ``TypeError`` unless ``payload`` is bytes-like, and
    :class:`PayloadTooLarge` when it is larger than ``limit``."""
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


_CODES: dict[type[PylmError], bytes] = {
    UnknownFunction: b"unknown_function",
    UnknownServer: b"unknown_server",
    RemoteError: b"remote",
    PayloadTooLarge: b"too_large",
    ProtocolError: b"protocol",
}


def encode_error(msg_id: int, error: PylmError) -> list[bytes]:
    """The frames of an ERROR message carrying ``error`` back to the caller."""
    code = _CODES.get(type(error), b"error")
    detail: dict[str, Any] = {"message": PylmError.__str__(error)}
    for attr in ("server", "function", "size", "limit"):
        if hasattr(error, attr):
            detail[attr] = getattr(error, attr)
    if isinstance(error, RemoteError):
        detail["type"] = error.remote_type
        detail["remote_message"] = error.remote_message
        detail["traceback"] = error.remote_traceback
    return [reply_head(msg_id, ERROR), code, json.dumps(detail).encode("utf-8")]


def decode_error(code: bytes, detail_frame: bytes) -> PylmError:
    """Rebuild the exception an ERROR message carries."""
    try:
        detail = json.loads(detail_frame)
        if not isinstance(detail, dict):
            raise ValueError("detail is not a JSON object")
    except ValueError as exc:
        return ProtocolError(f"malformed error detail {bytes(detail_frame[:200])!r}: {exc}")
    message = str(detail.get("message", ""))
    server = str(detail.get("server", ""))
    function = str(detail.get("function", ""))
    if code == b"unknown_function":
        return UnknownFunction(message, server=server, function=function)
    if code == b"unknown_server":
        return UnknownServer(message, server=server, function=function)
    if code == b"remote":
        return RemoteError(
            message,
            remote_type=str(detail.get("type", "")),
            remote_message=str(detail.get("remote_message", "")),
            remote_traceback=str(detail.get("traceback", "")),
            server=server,
            function=function,
        )
    if code == b"too_large":
        return PayloadTooLarge(
            message, size=int(detail.get("size", 0)), limit=int(detail.get("limit", 0))
        )
    if code == b"protocol":
        return ProtocolError(message)
    return PylmError(f"{message} (error code {bytes(code[:40])!r})")


def result_of(kind: int, frames: list[bytes]) -> bytes:
    """The payload of an answer, or raise the error it carries.

    ``frames`` are the frames after the head.
    """
    if (kind == REPLY or kind == PONG) and len(frames) == 1:
        return frames[0]
    if kind == ERROR and len(frames) == 2:
        raise decode_error(frames[0], frames[1])
    raise ProtocolError(
        f"unexpected answer: kind {KIND_NAMES.get(kind, kind)} with {len(frames)} frame(s)"
    )
