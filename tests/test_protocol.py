"""The wire protocol as a pure unit: encoding, decoding, rejecting."""

from __future__ import annotations

import pytest

from pylm import protocol
from pylm.errors import (
    PayloadTooLarge,
    ProtocolError,
    PylmError,
    RemoteError,
    UnknownFunction,
    UnknownServer,
)


def test_request_head_round_trip() -> None:
    head = protocol.request_head(2**64 - 1, b"my_server.foo", 1234.5)
    assert len(head) == protocol.HEAD_SIZE + len(b"my_server.foo")
    assert head[:4] == b"PL\x01\x01"
    decoded = protocol.decode_head(head)
    assert decoded == protocol.Head(protocol.REQUEST, 0, 2**64 - 1, 1234.5, b"my_server.foo")


def test_reply_head_is_fixed_size() -> None:
    head = protocol.reply_head(7, protocol.ERROR)
    assert len(head) == protocol.HEAD_SIZE
    assert protocol.decode_head(head).kind == protocol.ERROR
    assert protocol.decode_head(head).msg_id == 7


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (b"", "too short"),
        (b"garbage that is long enough to be a head", "bad magic"),
        (b"PL\x02" + bytes(18), "unsupported protocol version 2"),
        (b"PL\x01\x09" + bytes(17), "unknown message kind 9"),
    ],
)
def test_decode_head_rejects(frame: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        protocol.decode_head(frame)


def test_salvage_msg_id_from_other_version() -> None:
    head = bytearray(protocol.request_head(99, b"s.f"))
    head[2] = 7
    assert protocol.salvage_msg_id(bytes(head)) == 99
    assert protocol.salvage_msg_id(b"nonsense") is None


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


@pytest.mark.parametrize(
    "error",
    [
        UnknownFunction("no f", server="s", function="f"),
        UnknownServer("no s", server="s", function="f"),
        RemoteError(
            "boom",
            remote_type="ValueError",
            remote_message="bad",
            remote_traceback="Traceback...",
            server="s",
            function="f",
        ),
        PayloadTooLarge("big", size=10, limit=5),
        ProtocolError("mangled"),
    ],
)
def test_errors_round_trip(error: PylmError) -> None:
    head, code, detail = protocol.encode_error(5, error)
    assert protocol.decode_head(head).msg_id == 5
    with pytest.raises(type(error)) as info:
        protocol.result_of(protocol.ERROR, [code, detail])
    rebuilt = info.value
    assert type(rebuilt) is type(error)
    for attr in ("server", "function", "size", "limit", "remote_type", "remote_traceback"):
        assert getattr(rebuilt, attr, None) == getattr(error, attr, None)


def test_unknown_error_code_and_bad_detail() -> None:
    with pytest.raises(PylmError, match="error code b'weird'"):
        protocol.result_of(protocol.ERROR, [b"weird", b'{"message": "m"}'])
    with pytest.raises(ProtocolError, match="malformed error detail"):
        protocol.result_of(protocol.ERROR, [b"remote", b"not json"])


def test_result_of_rejects_wrong_shapes() -> None:
    assert protocol.result_of(protocol.REPLY, [b"ok"]) == b"ok"
    with pytest.raises(ProtocolError, match="unexpected answer"):
        protocol.result_of(protocol.REPLY, [b"a", b"b"])
    with pytest.raises(ProtocolError, match="unexpected answer"):
        protocol.result_of(protocol.REQUEST, [b"a"])
