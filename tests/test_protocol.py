"""The wire protocol as a pure unit: encoding, decoding, rejecting."""

from __future__ import annotations

import pytest

from pylm import errors, protocol
from pylm.errors import PayloadTooLarge, ProtocolError, PylmError


def test_request_round_trip_in_one_frame() -> None:
    frames = protocol.encode(
        protocol.REQUEST, 2**64 - 1, b"payload", b"my_server.foo", b"route", 1234.5
    )
    assert len(frames) == 1
    body = frames[0]
    assert len(body) == protocol.HEAD_SIZE + len(b"my_server.foo") + len(b"route") + len(b"payload")
    assert body[:5] == b"PL\x01\x01\x00"
    assert protocol.decode(frames) == protocol.Message(
        protocol.REQUEST, 2**64 - 1, b"payload", b"my_server.foo", b"route", 1234.5, 0
    )


def test_documented_bytes() -> None:
    """The example in docs/protocol.md, byte by byte."""
    (body,) = protocol.encode(protocol.REQUEST, 1, b"a message", b"my_server.foo")
    assert body.hex(" ") == (
        "50 4c 01 01 00 00 0d 00 00 00 00 00 00 00 00 00 01 00 00 00 00 00 00 00 00 "
        + b"my_server.foo".hex(" ")
        + " "
        + b"a message".hex(" ")
    )


def test_large_payload_gets_its_own_frame() -> None:
    payload = b"x" * (protocol.SPLIT_PAYLOAD + 1)
    frames = protocol.encode(protocol.REPLY, 3, payload)
    assert len(frames) == 2 and frames[1] is payload
    message = protocol.decode(frames)
    assert message.payload is payload and message.flags == protocol.PAYLOAD_FRAME
    assert protocol.reply_head(3, flags=protocol.PAYLOAD_FRAME) == frames[0]


def test_reply_head_plus_payload_is_a_reply() -> None:
    message = protocol.decode([protocol.reply_head(7) + b"result"])
    assert (message.kind, message.msg_id, message.payload) == (protocol.REPLY, 7, b"result")


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        ([], "no frames"),
        ([b""], "too short"),
        ([b"garbage that is long enough to be a head"], "bad magic"),
        ([b"PL\x02" + bytes(30)], "unsupported protocol version 2"),
        ([b"PL\x01\x09" + bytes(30)], "unknown message kind 9"),
        ([protocol.reply_head(1, flags=protocol.PAYLOAD_FRAME)], "REPLY without its payload frame"),
    ],
)
def test_decode_rejects(frames: list[bytes], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        protocol.decode(frames)


def test_trailing_frames_are_ignored() -> None:
    """Room for extensions: frames after a complete message are not an error."""
    message = protocol.decode([protocol.reply_head(1) + b"x", b"extension"])
    assert message.payload == b"x"


def test_decode_rejects_overrunning_sizes() -> None:
    body = bytearray(protocol.encode(protocol.REQUEST, 1, b"", b"s.f")[0])
    body[5:7] = (500).to_bytes(2, "big")
    with pytest.raises(ProtocolError, match="overrun"):
        protocol.decode([bytes(body)])


def test_salvage_msg_id_from_other_version() -> None:
    body = bytearray(protocol.encode(protocol.REQUEST, 99, b"x", b"s.f")[0])
    body[2] = 7
    assert protocol.salvage_msg_id([bytes(body)]) == 99
    assert protocol.salvage_msg_id([b"nonsense"]) is None
    assert protocol.salvage_msg_id([]) is None


def test_split_target() -> None:
    assert protocol.split_target(b"a.b.c.foo") == ("a.b.c", "foo")
    for bad in (b"nodot", b"server.", b"\xff\xfe.f"):
        with pytest.raises(ProtocolError):
            protocol.split_target(bad)


def test_check_payload_types_and_limit() -> None:
    protocol.check_payload(b"x", 1)
    protocol.check_payload(bytearray(b"x"), 1)
    protocol.check_payload(memoryview(b"x"), 1)
    with pytest.raises(TypeError, match="got int"):
        protocol.check_payload(1, 10)
    with pytest.raises(TypeError, match=r"got str \(encode"):
        protocol.check_payload("text", 10)
    with pytest.raises(PayloadTooLarge, match="11 bytes is larger than the limit of 10") as info:
        protocol.check_payload(b"x" * 11, 10)
    assert (info.value.size, info.value.limit) == (11, 10)


# One error of each kind the wire carries (tests/test_unit_protocol.py uses them too).
WIRE_ERRORS = [
    errors.UnknownFunction("no f", server="s", function="f"),
    errors.UnknownServer("no s", server="s", function="f"),
    errors.RemoteError(
        "boom",
        remote_type="ValueError",
        remote_message="bad value",
        remote_traceback="Traceback...",
        server="s",
        function="f",
    ),
    PayloadTooLarge("big", size=10, limit=5),
    ProtocolError("mangled"),
    errors.UnknownKey("no key 'k'", server="s", key="k"),
]


@pytest.mark.parametrize("error", WIRE_ERRORS)
def test_errors_round_trip(error: PylmError) -> None:
    message = protocol.decode(protocol.encode_error(5, error))
    assert (message.kind, message.msg_id) == (protocol.ERROR, 5)
    with pytest.raises(type(error)) as info:
        protocol.result_of(message)
    rebuilt = info.value
    assert type(rebuilt) is type(error)
    assert str(rebuilt).startswith(PylmError.__str__(error))
    for attr in ("server", "function", "size", "limit", "remote_type", "remote_traceback"):
        assert getattr(rebuilt, attr, None) == getattr(error, attr, None)


def test_unknown_error_code_and_bad_detail() -> None:
    weird = protocol.Message(protocol.ERROR, 1, b'{"code": "weird", "message": "m"}')
    with pytest.raises(PylmError, match="error code 'weird'"):
        protocol.result_of(weird)
    with pytest.raises(ProtocolError, match="malformed error detail"):
        protocol.result_of(protocol.Message(protocol.ERROR, 1, b"not json"))


def test_result_of_rejects_requests() -> None:
    assert protocol.result_of(protocol.Message(protocol.REPLY, 1, b"ok")) == b"ok"
    with pytest.raises(ProtocolError, match="unexpected answer of kind REQUEST"):
        protocol.result_of(protocol.Message(protocol.REQUEST, 1, b"a"))


def test_target_and_route_limits() -> None:
    with pytest.raises(ProtocolError, match="at most 65535"):
        protocol.encode(protocol.REQUEST, 1, b"", b"x" * 70000)


def test_a_batch_of_too_many_messages_is_refused_not_unpacked() -> None:
    """A 32 MiB BATCH of empty messages would be millions of list entries."""
    limit = protocol.MAX_BATCH_MESSAGES
    assert len(protocol.unpack_batch(protocol.pack_batch([b"x"] * limit))) == limit
    with pytest.raises(ProtocolError, match=f"more than {limit} messages"):
        protocol.unpack_batch(protocol.BATCH_HEAD + bytes(4) * (limit + 1))


def test_error_details_that_do_not_parse_are_protocol_errors() -> None:
    """An ERROR from a peer is data: whatever it holds, decoding it gives an
    error to raise, never an exception in the receiver."""
    for payload in (
        b'{"code": "too_large", "limit": null}',
        b'{"code": "too_large", "size": "x"}',
        b'{"code": "too_large", "size": 1e999}',
        b'{"code": "too_large", "size": true}',
        b'{"code": "too_large", "size": -1}',
        b"[" * 100_000,
        b"{" + b" " * (protocol.MAX_ERROR_DETAIL + 1) + b"}",
        b"\xff\xfe",
    ):
        assert isinstance(protocol.decode_error(payload), ProtocolError), payload[:40]
    error = protocol.decode_error(b'{"code": "too_large", "size": 3, "limit": 2}')
    assert isinstance(error, PayloadTooLarge) and (error.size, error.limit) == (3, 2)
