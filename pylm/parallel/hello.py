"""A worker's hello, heartbeat, leaving notice and goodbye: a PING whose
route names the worker's job socket and whose payload is a JSON object,
built by the worker (:func:`hello`) and read by a master or a hub
(:func:`parse_hello`)."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from pylm import protocol
from pylm.errors import ProtocolError

__all__ = ["MAX_HELLO", "MAX_NAME", "MAX_SLOTS", "Hello", "hello", "parse_hello"]

MAX_SLOTS = 1024  # slots a worker may claim
MAX_HELLO = 4096  # bytes of a worker's PING payload
MAX_NAME = 256  # characters of a worker's name


class Hello(NamedTuple):
    """What a worker's PING says (its JSON payload), parsed: see :func:`parse_hello`."""

    name: str
    slots: int
    free: int
    leaving: bool
    bye: bool


def hello(
    route: bytes, name: str, slots: int, free: int, *, leaving: bool = False, bye: bool = False
) -> list[bytes]:
    """The frames of a worker's PING: ``route`` its job socket's identity,
    ``free`` of its ``slots`` free; ``leaving`` (it takes no more jobs) or
    ``bye`` (it is gone) when it says so."""
    info: dict[str, object] = {"name": name, "slots": slots, "free": free}
    if leaving:
        info["leaving"] = True
    if bye:
        info["bye"] = True
    return protocol.encode(protocol.PING, 0, json.dumps(info).encode(), route=route)


def parse_hello(payload: bytes, route: bytes) -> Hello:
    """The fields of a worker's hello, heartbeat, leaving notice or goodbye:
    a JSON object of at most :data:`MAX_HELLO` bytes with ``name`` (text of
    :data:`MAX_NAME` characters at most), ``slots`` (an int from 1 to
    :data:`MAX_SLOTS`, default 1), ``free`` (an int from 0 to ``slots``,
    default ``slots``), ``leaving`` and ``bye`` (booleans, default false);
    other fields are ignored. ``route``, the worker's job socket, must be
    1 to 255 bytes. :class:`ProtocolError` naming the field and value otherwise."""
    if not 0 < len(route) <= 255:
        raise ProtocolError(
            f"a worker's PING must name its job socket (1-255 bytes), got {len(route)}"
        )
    if len(payload) > MAX_HELLO:
        raise ProtocolError(f"a worker's PING of {len(payload)} bytes, more than {MAX_HELLO}")
    try:
        info: Any = json.loads(payload or b"{}")
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise ProtocolError(
            f"a worker's PING is not JSON ({exc}): {bytes(payload[:80])!r}"
        ) from None
    if not isinstance(info, dict):
        raise ProtocolError(f"a worker's PING is not a JSON object: {bytes(payload[:80])!r}")
    name = info.get("name", "")
    if not isinstance(name, str) or len(name) > MAX_NAME:
        raise ProtocolError(
            f"a worker's name must be text of {MAX_NAME} characters at most, got {name!r:.80}"
        )
    slots = _count(info, "slots", 1, 1, MAX_SLOTS)
    free = _count(info, "free", slots, 0, slots)
    flags = [info.get(field, False) for field in ("leaving", "bye")]
    for field, value in zip(("leaving", "bye"), flags, strict=True):
        if not isinstance(value, bool):
            raise ProtocolError(f"a worker's {field!r} must be true or false, got {value!r:.80}")
    return Hello(name, slots, free, flags[0], flags[1])


def _count(info: dict[str, Any], field: str, default: int, low: int, high: int) -> int:
    value = info.get(field, default)
    if type(value) is not int or not low <= value <= high:  # bool is no count
        raise ProtocolError(
            f"a worker's {field!r} must be an int from {low} to {high}, got {value!r:.80}"
        )
    return value
