"""The wire codec (pylm.protocol) at its edges: sizes on either side of each
limit, defaults, the hot-path pieces against encode(), and every error
message word for word, with the offending value as a peer would see it.
tests/test_protocol.py has the round trips; these were written against the
mutants mutmut left alive (scripts/mutmut.sh)."""

from __future__ import annotations

import json
from array import array
from typing import Any

import pytest
from test_protocol import WIRE_ERRORS

from pylm import protocol
from pylm.errors import (
    PayloadTooLarge,
    ProtocolError,
    PylmError,
    RemoteError,
    UnknownFunction,
    UnknownKey,
    UnknownServer,
)

pytestmark = pytest.mark.timeout(30)

_ATTRS = ("server", "function", "size", "limit", "key", "remote_type", "remote_message",
          "remote_traceback")  # fmt: skip


def described(error: BaseException) -> tuple[Any, ...]:
    """What a caller can see of an error: its type, text and fields."""
    return (type(error), str(error), *(getattr(error, attr, "-") for attr in _ATTRS))


def refused(frames: list[bytes]) -> str:
    with pytest.raises(ProtocolError) as error:
        protocol.decode(frames)
    return str(error.value)


# ---------------------------------------------------------------------- encode


def test_defaults_are_an_empty_payload_no_flags_no_target_no_route_no_deadline() -> None:
    (body,) = protocol.encode(protocol.PING, 3)
    assert body == protocol.reply_head(3, protocol.PING)
    assert protocol.decode([body]) == protocol.Message(protocol.PING, 3, b"", b"", b"", 0.0, 0)


def test_more_is_kept_and_payload_frame_is_set_only_when_needed() -> None:
    both = protocol.MORE | protocol.PAYLOAD_FRAME
    (small,) = protocol.encode(protocol.REPLY, 1, b"x", flags=both)
    assert protocol.decode([small]).flags == protocol.MORE
    (small,) = protocol.encode(protocol.REPLY, 1, b"x", flags=protocol.MORE)
    assert protocol.decode([small]).flags == protocol.MORE
    large = protocol.encode(protocol.REPLY, 1, b"x" * (protocol.SPLIT_PAYLOAD + 1), flags=0)
    assert protocol.decode(large).flags == protocol.PAYLOAD_FRAME
    large = protocol.encode(protocol.REPLY, 1, b"x" * (protocol.SPLIT_PAYLOAD + 1), flags=both)
    assert protocol.decode(large).flags == both


def test_a_payload_of_split_payload_bytes_stays_in_the_body() -> None:
    payload = b"y" * protocol.SPLIT_PAYLOAD
    (body,) = protocol.encode(protocol.REPLY, 1, payload)
    assert protocol.decode([body]).payload == payload and protocol.decode([body]).flags == 0
    assert len(protocol.encode(protocol.REPLY, 1, payload + b"y")) == 2


def test_a_memoryview_is_measured_in_bytes_not_items() -> None:
    items = array("I", range(protocol.SPLIT_PAYLOAD // 4 + 1))  # SPLIT_PAYLOAD + 1 bytes
    view = memoryview(items)
    frames = protocol.encode(protocol.REPLY, 1, view)
    assert len(frames) == 2 and frames[1] is view
    protocol.check_payload(memoryview(array("I", [1, 2, 3])), 12)
    with pytest.raises(PayloadTooLarge) as error:
        protocol.check_payload(memoryview(array("I", [1, 2, 3])), 11)
    assert (error.value.size, error.value.limit) == (12, 11)


def test_target_and_route_of_65535_bytes_are_the_limit() -> None:
    most = b"t" * 65535
    for target, route in ((most, b""), (b"", most)):
        message = protocol.decode(protocol.encode(protocol.REQUEST, 1, b"p", target, route))
        assert (message.target, message.route, message.payload) == (target, route, b"p")
    for target, route, text in (
        (most + b"t", b"", "target of 65536 and route of 0 bytes: each must be at most 65535"),
        (b"", most + b"r", "target of 0 and route of 65536 bytes: each must be at most 65535"),
    ):
        with pytest.raises(ProtocolError) as error:
            protocol.encode(protocol.REQUEST, 1, b"", target, route)
        assert str(error.value) == text


def test_the_hot_path_pieces_build_what_encode_builds() -> None:
    for target in (b"s.f", b"a.b.c.function", b"x" * 300):
        body = (
            protocol.request_prefix(target)
            + protocol.pack_id_deadline(2**64 - 2, 1234.5)
            + target
            + b"payload"
        )
        assert [body] == protocol.encode(protocol.REQUEST, 2**64 - 2, b"payload", target, b"",
                                         1234.5)  # fmt: skip
        assert protocol.unpack_id(body, 9) == (2**64 - 2,)
    assert protocol.REPLY_PREFIX + bytes(16) + b"r" == protocol.encode(protocol.REPLY, 0, b"r")[0]
    assert protocol.BATCH_PREFIX == b"PL\x01\x06\x00"


def test_the_hot_path_readers_read_what_encode_wrote() -> None:
    body = protocol.encode(protocol.REQUEST, 2**64 - 3, b"pay", b"s.f", b"route", 99.5)[0]
    assert body[protocol.LEAD] == protocol.ONE_FRAME_REQUEST == b"PL\x01\x01\x00"
    assert protocol.read_sizes(body) == (3, 5)
    assert protocol.read_id(body) == (2**64 - 3,)
    assert protocol.read_id_deadline(body) == (2**64 - 3, 99.5)
    assert body[protocol.ID_BYTES] == (2**64 - 3).to_bytes(8, "big")
    assert protocol.request_prefix(b"s.f", b"route") == body[:9]
    assert protocol.pack_sizes(3, 5) == body[5:9]
    assert protocol.encode(protocol.REPLY, 1)[0][protocol.REPLY_LEAD] == protocol.REPLY_PREFIX
    assert protocol.DEFAULT_MAX_PAYLOAD == 32 * 1024 * 1024  # docs/protocol.md: 32 MiB


def test_the_hot_path_builders_build_what_encode_builds() -> None:
    request = protocol.encode(protocol.REQUEST, 77, b"in", b"s.f", b"back", 12.25)[0]
    reply = protocol.encode(protocol.REPLY, 77, b"out")
    assert [protocol.reply_to(request, b"out")] == reply
    forwarded = protocol.encode(protocol.REQUEST, 77, b"out", b"next.g", b"back", 12.25)
    assert [protocol.forward(request, b"next.g", b"back", b"out")] == forwarded
    renumbered = protocol.encode(protocol.REQUEST, 2**64 - 1, b"in", b"s.f", b"back", 12.25)
    assert [protocol.with_id(request, 2**64 - 1)] == renumbered
    assert protocol.with_id(request, 2**64 + 5) == protocol.with_id(request, 5)
    built = protocol.one_frame_request(2**64 - 1, 3.5, b"s.f", b"back", b"in")
    assert [built] == protocol.encode(protocol.REQUEST, 2**64 - 1, b"in", b"s.f", b"back", 3.5)


def test_reply_payload_takes_only_a_one_frame_reply_to_its_own_id() -> None:
    stamp = protocol.pack_id_deadline(8, 5.0)
    assert protocol.reply_payload(protocol.encode(protocol.REPLY, 8, b"r")[0], stamp) == b"r"
    assert protocol.reply_payload(protocol.encode(protocol.REPLY, 8)[0], stamp) == b""
    for other in (
        protocol.encode(protocol.REPLY, 9, b"r")[0],  # another call's
        protocol.encode(protocol.ERROR, 8, b"{}")[0],
        protocol.encode(protocol.REPLY, 8, b"r", flags=protocol.MORE)[0],
        protocol.REPLY_PREFIX + stamp[:7],  # cut inside the id
        b"",
    ):
        assert protocol.reply_payload(other, stamp) is None


def test_has_payload_frame_reads_the_flags() -> None:
    split = protocol.encode(protocol.REPLY, 1, bytes(protocol.SPLIT_PAYLOAD + 1))
    assert protocol.has_payload_frame(split[0])
    assert not protocol.has_payload_frame(protocol.encode(protocol.REPLY, 1, b"r")[0])
    assert not protocol.has_payload_frame(split[0][:4])
    assert protocol.has_payload_frame(split[0][:5])


# ---------------------------------------------------------------------- batches


def test_batches_round_trip_messages_of_every_size() -> None:
    messages = [b"", b"a", protocol.reply_head(5) + b"result", b"z" * 70_000, b""]
    assert protocol.unpack_batch(protocol.pack_batch(messages)) == messages
    assert protocol.unpack_batch(protocol.BATCH_HEAD) == []
    assert protocol.unpack_batch(protocol.BATCH_HEAD + bytes(4)) == [b""]


def batch_refused(body: bytes) -> str:
    with pytest.raises(ProtocolError) as error:
        protocol.unpack_batch(body)
    return str(error.value)


def test_bad_batches_are_refused_saying_where() -> None:
    head = protocol.BATCH_HEAD
    assert batch_refused(head[:-1]) == "BATCH of 24 bytes, shorter than a head"
    with_sizes = head[:5] + b"\x00\x03\x00\x02" + head[9:]
    assert batch_refused(with_sizes + b"s.fr.") == (
        "BATCH with a target (3 bytes) or a route (2): it has neither"
    )
    assert batch_refused(head + b"\x00\x00\x00") == "BATCH cut inside a length, at byte 25 of 28"
    assert batch_refused(head + bytes(4) + b"\x00") == (
        "BATCH cut inside a length, at byte 29 of 30"
    )
    assert batch_refused(head + b"\x00\x00\x00\x05abc") == (
        "BATCH message of 5 bytes at byte 29 overruns the 32-byte batch"
    )
    assert batch_refused(head + b"\x00\x00\x00\x05abcde\x00\x00\x00\x01") == (
        "BATCH message of 1 bytes at byte 38 overruns the 38-byte batch"
    )


# ---------------------------------------------------------------------- decode


def test_decode_errors_word_for_word() -> None:
    assert refused([]) == "no frames"
    assert refused([b"0123456789abcdefghij"]) == (
        "message too short: 20 bytes, a head needs 25 (starts with b'01234567')"
    )
    assert refused([b"garbage that is long enough to be a head"]) == (
        "bad magic b'ga', expected b'PL'"
    )
    assert refused([b"PL\x09" + bytes(30)]) == (
        "unsupported protocol version 9, this side speaks 1"
    )
    head = protocol.reply_head(1, flags=protocol.PAYLOAD_FRAME)
    assert refused([head + b"extra", b"payload"]) == (
        "bytes after the route although the payload has its own frame"
    )
    assert refused([head]) == "REPLY without its payload frame"
    body = bytearray(protocol.encode(protocol.REQUEST, 1, b"", b"s.f", b"r")[0])
    body[5:7] = (3).to_bytes(2, "big")
    body[7:9] = (2).to_bytes(2, "big")
    assert refused([bytes(body)]) == (
        "target (3 bytes) and route (2 bytes) overrun the 29-byte message"
    )


def test_a_head_alone_decodes_and_its_id_is_salvaged() -> None:
    head = protocol.reply_head(42)
    assert protocol.decode([head]) == protocol.Message(protocol.REPLY, 42, b"")
    other_version = head[:2] + b"\x02" + head[3:]
    assert protocol.salvage_msg_id([other_version]) == 42
    assert protocol.salvage_msg_id([other_version[:-1]]) is None
    assert protocol.salvage_msg_id([b"XY" + other_version[2:]]) is None


def test_split_target_errors_show_the_target_cut() -> None:
    with pytest.raises(ProtocolError) as error:
        protocol.split_target(b"\xff" * 100)
    cut = b"\xff" * 80
    assert str(error.value) == f"target is not UTF-8: {cut!r}"
    with pytest.raises(ProtocolError) as error:
        protocol.split_target(b"n" * 300)
    assert str(error.value) == f"target {'n' * 200!r} is not of the form 'server.function'"
    assert protocol.split_target("sérvér.fünction".encode()) == ("sérvér", "fünction")
    assert protocol.split_target(b".f") == ("", "f")


def test_check_payload_gives_the_hint_for_text_only() -> None:
    for value, text in (
        (1, "payload must be bytes, got int"),
        (None, "payload must be bytes, got NoneType"),
        ("x", "payload must be bytes, got str (encode text first, e.g. payload.encode())"),
    ):
        with pytest.raises(TypeError) as error:
            protocol.check_payload(value, 10)
        assert str(error.value) == text
    with pytest.raises(PayloadTooLarge) as too_large:
        protocol.check_payload(b"x" * 11, 10)
    assert str(too_large.value) == "payload of 11 bytes is larger than the limit of 10 bytes"
    protocol.check_payload(b"x" * 10, 10)


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("error", WIRE_ERRORS)
def test_every_error_round_trips_through_a_route(error: PylmError) -> None:
    message = protocol.decode(protocol.encode_error(5, error, route=b"back"))
    assert (message.kind, message.msg_id, message.route) == (protocol.ERROR, 5, b"back")
    assert described(protocol.decode_error(message.payload)) == described(error)
    assert protocol.decode(protocol.encode_error(5, error)).route == b""


def test_an_error_without_a_code_of_its_own_is_a_pylm_error() -> None:
    class Odd(PylmError):
        pass

    detail = json.loads(protocol.error_detail(Odd("strange")))
    assert detail == {"code": "error", "message": "strange"}
    rebuilt = protocol.decode_error(protocol.error_detail(Odd("strange")))
    assert described(rebuilt) == described(PylmError("strange (error code 'error')"))
    remote = json.loads(protocol.error_detail(RemoteError("m", remote_message="rm")))
    assert remote["remote_message"] == "rm" and remote["code"] == "remote"
    ascii_only = b'{"code": "protocol", "message": "\\u00e9"}'
    assert protocol.error_detail(ProtocolError("é")) == ascii_only


@pytest.mark.parametrize(
    ("detail", "expected"),
    [
        ({}, PylmError(" (error code '')")),
        ({"code": "protocol"}, ProtocolError("")),
        ({"code": "unknown_function"}, UnknownFunction("")),
        ({"code": "unknown_server", "message": "m"}, UnknownServer("m")),
        ({"code": "remote", "message": "m"}, RemoteError("m")),
        ({"code": "too_large", "message": "m"}, PayloadTooLarge("m")),
        ({"code": "unknown_key", "message": "m"}, UnknownKey("m")),
        (
            {"code": "unknown_key", "message": "m", "server": 7, "key": 8},
            UnknownKey("m", server="7", key="8"),
        ),
        ({"code": "c" * 60, "message": "m"}, PylmError(f"m (error code {'c' * 40!r})")),
    ],
)
def test_missing_fields_of_a_detail_are_empty(detail: dict[str, Any], expected: PylmError) -> None:
    assert described(protocol.decode_error(json.dumps(detail).encode())) == described(expected)


def test_an_error_detail_of_the_size_limit_is_read_and_one_byte_more_is_not() -> None:
    detail = b'{"code": "unknown_function", "message": "m", "function": "f"}'
    at_limit = detail + b" " * (protocol.MAX_ERROR_DETAIL - len(detail))
    assert described(protocol.decode_error(at_limit)) == described(
        UnknownFunction("m", function="f")
    )
    over = at_limit + b" "
    assert str(protocol.decode_error(over)) == (
        f"error detail of {len(over)} bytes, more than {protocol.MAX_ERROR_DETAIL}: {over[:200]!r}"
    )


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"[1]", "not a JSON object"),
        (b'{"size": -1}', "size -1 is not a non-negative int"),
        (b'{"limit": "10"}', "limit '10' is not a non-negative int"),
        (b'{"size": true}', "size True is not a non-negative int"),
        (b'{"size": 1.5}', "size 1.5 is not a non-negative int"),
    ],
)
def test_malformed_details_say_why(payload: bytes, why: str) -> None:
    error = protocol.decode_error(payload)
    expected = ProtocolError(f"malformed error detail {payload!r}: {why}")
    assert described(error) == described(expected)


def test_a_malformed_detail_is_shown_cut_at_200_bytes() -> None:
    payload = b"n" * 300
    text = str(protocol.decode_error(payload))
    assert text.startswith(f"malformed error detail {b'n' * 200!r}: Expecting value")
