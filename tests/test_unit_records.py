"""The record schema (pylm.registry.records) at its edges: each limit on
either side, defaults, keys, and every refusal word for word, naming the
field, the reason it is counted under and the offending value as an operator
reads it in the log. tests/test_registry_schema.py has the table of bad
records and the Hypothesis round trips; these were written against the
mutants mutmut left alive (scripts/mutmut.sh)."""

# ruff: noqa: E501  (the messages are compared whole)

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import pytest
from test_registry_schema import CURVE_KEY, KEY, valid

from pylm.errors import InvalidName
from pylm.registry.records import (
    InstanceRecord,
    MalformedRecord,
    StageConfig,
    check_call,
    config_key,
    instance_key,
    instances_prefix,
    parse_key,
)

pytestmark = pytest.mark.timeout(30)


def parse(data: dict[str, Any], key: str | bytes = KEY) -> InstanceRecord:
    return InstanceRecord.from_json(json.dumps(data).encode(), key)


def refusal(data: dict[str, Any], key: str | bytes = KEY) -> tuple[str, str, object, str]:
    with pytest.raises(MalformedRecord) as refused:
        parse(data, key)
    error = refused.value
    return error.reason, error.field, error.value, str(error)


def with_field(field: str, value: object) -> dict[str, Any]:
    return {**valid(), field: value}


# fmt: off
REFUSED = [
    # field, value, reason, field named, the whole message
    ("name", "a b", 'value', 'name', "field 'name' must be 1 to 128 ASCII letters, digits, '_', '-' and '.', starting with a letter, a digit or '_', got 'a b'"),
    ("name", "n" * 129, 'value', 'name', "field 'name' must be 1 to 128 characters, got 'nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn... (131 characters)"),
    ("name", "", 'value', 'name', "field 'name' must be 1 to 128 characters, got ''"),
    ("instance", "i" * 65, 'value', 'instance', "field 'instance' must be 1 to 64 of A-Z a-z 0-9 _ . -, got 'iiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiii'"),
    ("instance", "", 'value', 'instance', "field 'instance' must be 1 to 64 of A-Z a-z 0-9 _ . -, got ''"),
    ("kind", "k" * 33, 'value', 'kind', "field 'kind' must be 1 to 32 characters, got 'kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk'"),
    ("kind", "1k", 'value', 'kind', "field 'kind' must be a lower-case word such as 'chained', got '1k'"),
    ("kind", "", 'value', 'kind', "field 'kind' must be 1 to 32 characters, got ''"),
    ("endpoints", {f"r{i}": "tcp://h:1" for i in range(17)}, 'value', 'endpoints', "field 'endpoints' must have at most 16 entries, got {'r0': 'tcp://h:1', 'r1': 'tcp://h:1', 'r2': 'tcp://h:1', 'r3': 'tcp://h:1', 'r4... (330 characters)"),
    ("endpoints", {"1r": "tcp://h:1"}, 'value', 'endpoints', "field 'endpoints' roles must be lower-case words, got '1r'"),
    ("endpoints", {"pull": "tcp://h:65536"}, 'endpoint', 'endpoints.pull', "field 'endpoints.pull' must be tcp://HOST:PORT, port 1-65535, got 'tcp://h:65536'"),
    ("endpoints", {"pull": "ws://h:1"}, 'endpoint', 'endpoints.pull', "field 'endpoints.pull' must be a tcp or ipc:// address, got 'ws://h:1'"),
    ("endpoints", {"pull": "ipc://" + "é" * 51}, 'endpoint', 'endpoints.pull', "field 'endpoints.pull' must be ipc://PATH of 1 to 100 bytes, got 'ipc://ééééééééééééééééééééééééééééééééééééééééééééééééééé'"),
    ("endpoints", {"pull": "tcp://" + "h" * 510}, 'value', 'endpoints.pull', "field 'endpoints.pull' must be 1 to 512 characters, got 'tcp://hhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhh... (518 characters)"),
    ("endpoints", {"pull": "tcp://[::g]:1"}, 'endpoint', 'endpoints.pull', "field 'endpoints.pull' must be tcp://HOST:PORT, port 1-65535, got 'tcp://[::g]:1'"),
    ("endpoints", {"pull": "tcp://[1.2.3.4]:1"}, 'endpoint', 'endpoints.pull', "field 'endpoints.pull' must be tcp://HOST:PORT, port 1-65535, got 'tcp://[1.2.3.4]:1'"),
    ("endpoints", {"pull": "tcp://a" + ".a" * 126 + "a:1"}, 'endpoint', 'endpoints.pull', "field 'endpoints.pull' must be tcp://HOST:PORT, port 1-65535, got 'tcp://a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a... (264 characters)"),
    ("endpoints", {"pull": "tcp://" + "a" * 64 + ":1"}, 'endpoint', 'endpoints.pull', "field 'endpoints.pull' must be tcp://HOST:PORT, port 1-65535, got 'tcp://aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa:1'"),
    ("endpoints", {"pull": "tcp://a-:1"}, 'endpoint', 'endpoints.pull', "field 'endpoints.pull' must be tcp://HOST:PORT, port 1-65535, got 'tcp://a-:1'"),
    ("endpoints", {"pull": "tcp://h:123456"}, 'endpoint', 'endpoints.pull', "field 'endpoints.pull' must be tcp://HOST:PORT, port 1-65535, got 'tcp://h:123456'"),
    ("endpoints", {"pull": "tcp://::1:5"}, 'endpoint', 'endpoints.pull', "field 'endpoints.pull' must be tcp://HOST:PORT, port 1-65535, got 'tcp://::1:5'"),
    ("endpoints", {"pull": "tcp://h:"}, 'endpoint', 'endpoints.pull', "field 'endpoints.pull' must be tcp://HOST:PORT, port 1-65535, got 'tcp://h:'"),
    ("host", "a\tb", 'value', 'host', "field 'host' must not hold control characters, got 'a\\tb'"),
    ("host", "h\x7f", 'value', 'host', "field 'host' must not hold control characters, got 'h\\x7f'"),
    ("pid", 2**31, 'value', 'pid', "field 'pid' must be a process id, 1 to 2**31-1, got 2147483648"),
    ("pid", None, 'type', 'pid', "field 'pid' must be an integer, got None"),
    ("started", 2.0**33, 'value', 'started', "field 'started' must be a time in seconds since 1970, got 8589934592.0"),
    ("started", float("nan"), 'value', 'started', "field 'started' must be a time in seconds since 1970, got nan"),
    ("started", float("inf"), 'value', 'started', "field 'started' must be a time in seconds since 1970, got inf"),
    ("started", None, 'type', 'started', "field 'started' must be a number, got None"),
    ("next", "s." + "f" * 129, 'value', 'next', "field 'next' must be 1 to 128 characters, got 'fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff... (131 characters)"),
    ("next", "bad name.f", 'value', 'next', "field 'next' must be 1 to 128 ASCII letters, digits, '_', '-' and '.', starting with a letter, a digit or '_', got 'bad name'"),
    ("next", "s.1f", 'value', 'next', "field 'next' must be a Python identifier, got '1f'"),
    ("next", "n" * 129 + ".f", 'value', 'next', "field 'next' must be 1 to 128 characters, got 'nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn... (131 characters)"),
    ("next", "s" * 128 + "." + "f" * 129, 'value', 'next', "field 'next' must be 1 to 257 characters, got 'sssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssss... (260 characters)"),
    ("branches", ["a.b"] * 65, 'value', 'branches', "field 'branches' must have at most 64 items, got ['a.b', 'a.b', 'a.b', 'a.b', 'a.b', 'a.b', 'a.b', 'a.b', 'a.b', 'a.b', 'a.b', 'a... (455 characters)"),
    ("branches", ["x"], 'value', 'branches', "field 'branches' must be of the form 'server.function', got 'x'"),
    ("tee", "a.b", 'type', 'tee', "field 'tee' must be a list, got 'a.b'"),
    ("tee", [5], 'type', 'tee', "field 'tee' must be a string, got 5"),
    ("functions", ["f"] * 1025, 'value', 'functions', "field 'functions' must have at most 1024 items, got ['f', 'f', 'f', 'f', 'f', 'f', 'f', 'f', 'f', 'f', 'f', 'f', 'f', 'f', 'f', 'f',... (5125 characters)"),
    ("functions", ["1f"], 'value', 'functions', "field 'functions' must be a Python identifier, got '1f'"),
    ("functions", ["f" * 129], 'value', 'functions', "field 'functions' must be 1 to 128 characters, got 'fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff... (131 characters)"),
    ("metrics", "http://h:1/a b", 'endpoint', 'metrics', "field 'metrics' must not hold blanks, got 'http://h:1/a b'"),
    ("metrics", "http://[::1/metrics", 'endpoint', 'metrics', "field 'metrics' must be an http(s)://HOST[:PORT]/... URL, got 'http://[::1/metrics'"),
    ("metrics", "http://h:/m", 'endpoint', 'metrics', "field 'metrics' must be an http(s)://HOST[:PORT]/... URL, got 'http://h:/m'"),
    ("metrics", "https://u@h/m", 'endpoint', 'metrics', "field 'metrics' must be an http(s)://HOST[:PORT]/... URL, got 'https://u@h/m'"),
    ("metrics", "http://h:0/m", 'endpoint', 'metrics', "field 'metrics' must be an http(s)://HOST[:PORT]/... URL, got 'http://h:0/m'"),
    ("metrics", "", 'value', 'metrics', "field 'metrics' must be 1 to 512 characters, got ''"),
    ("curve", CURVE_KEY + "x", 'value', 'curve', "field 'curve' must be 1 to 40 characters, got 'rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7x'"),
    ("curve", CURVE_KEY[:-1] + "~", 'value', 'curve', "field 'curve' must be a 40-character Z85 CURVE key, got 'rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf~'"),
    ("curve", "", 'value', 'curve', "field 'curve' must be 1 to 40 characters, got ''"),
    ("version", "v" * 65, 'value', 'version', "field 'version' must be 1 to 64 characters, got 'vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv'"),
    ("version", "v\x00", 'value', 'version', "field 'version' must not hold control characters, got 'v\\x00'"),
]
# fmt: on


@pytest.mark.parametrize(
    ("field", "value", "reason", "named", "message"),
    REFUSED,
    ids=[f"{row[0]}-{i}" for i, row in enumerate(REFUSED)],
)
def test_a_refusal_names_field_reason_and_value(
    field: str, value: object, reason: str, named: str, message: str
) -> None:
    got_reason, got_field, _, got_message = refusal(with_field(field, value))
    assert (got_reason, got_field, got_message) == (reason, named, message)


ACCEPTED = [
    ("name", "n" * 128),
    ("instance", "i" * 64),
    ("kind", "k" * 32),
    ("endpoints", {f"r{i}": "tcp://h:1" for i in range(16)}),
    ("endpoints", {"pull": "tcp://h:65535", "push": "tcp://[::1]:1", "db": "tcp://10.0.0.1:5"}),
    ("endpoints", {"pull": "ipc://" + "é" * 50}),
    ("endpoints", {"pull": "tcp://a" + ".a" * 126 + ":1"}),
    ("endpoints", {"pull": "tcp://" + "a" * 63 + ":1"}),
    (
        "endpoints",
        {"pull": "tcp://" + ("h" * 63 + ".") * 3 + "h" * 61 + ":1", "b": "ipc://" + "p" * 100},
    ),
    ("endpoints", {}),
    ("endpoints", {"pull": "ipc://x", "push": "ipc:///tmp/x://y"}),
    ("host", "h" * 255),
    ("pid", 1),
    ("pid", 2**31 - 1),
    ("started", 0),
    ("started", 2.0**33 - 1),
    ("next", None),
    ("next", "n" * 128 + "." + "f" * 128),
    ("branches", ["a.b"] * 64),
    ("tee", ["a.b", "c.d"]),
    ("functions", ["f"] * 1024),
    ("functions", ["f" * 128]),
    ("metrics", None),
    ("metrics", "https://[::1]/metrics"),
    ("metrics", "http://h/metrics"),
    ("metrics", "http://h:65535/metrics"),
    ("curve", None),
    ("version", ""),
    ("version", "v" * 64),
]


@pytest.mark.parametrize(
    ("field", "value"), ACCEPTED, ids=[f"{row[0]}-{i}" for i, row in enumerate(ACCEPTED)]
)
def test_values_at_the_limits_are_accepted_as_they_are(field: str, value: object) -> None:
    keys = {"name": f"instances/{value}/abc123", "instance": f"instances/step1/{value}"}
    record = parse(with_field(field, value), keys.get(field, KEY))
    assert getattr(record, field) == value
    if field == "started":
        assert type(record.started) is float


def test_a_record_of_a_server_older_than_idempotent_parses_with_none() -> None:
    data = valid()
    del data["idempotent"]
    assert parse(data).idempotent == []
    assert refusal(with_field("idempotent", "foo")) == (
        "type",
        "idempotent",
        "foo",
        "field 'idempotent' must be a list, got 'foo'",
    )
    assert refusal(with_field("idempotent", ["1f"]))[:2] == ("value", "idempotent")


def test_a_workers_record_names_its_master_or_none_if_older() -> None:
    assert parse(with_field("master", "pool")).master == "pool"
    data = valid()
    del data["master"]
    assert parse(data).master is None
    assert refusal(with_field("master", "a/b"))[:2] == ("value", "master")
    assert refusal(with_field("master", 7))[:2] == ("type", "master")


def test_a_parsed_record_has_every_field_of_its_json() -> None:
    record = parse(valid())
    assert record == InstanceRecord(
        name="step1",
        kind="chained",
        endpoints={"pull": "tcp://127.0.0.1:5555", "db": "ipc:///tmp/pylm/db"},
        instance="abc123",
        host="node-1.example.org",
        pid=4242,
        next="step2.bar",
        branches=["other.f"],
        tee=[],
        functions=["foo", "_private_ok"],
        idempotent=["foo"],
        metrics="http://10.0.0.1:9100/metrics",
        curve=CURVE_KEY,
        version="1.0.0",
        started=1_700_000_000.5,
        master=None,
    )
    assert json.loads(record.to_json()) == valid()
    assert list(json.loads(record.to_json())) == sorted(valid())
    assert InstanceRecord.from_json(bytearray(json.dumps(valid()).encode()), KEY) == record


def test_a_new_record_describes_this_process() -> None:
    before = time.time()
    record = InstanceRecord("a", "standalone", {"rep": "tcp://h:1"})
    after = time.time()
    assert len(record.instance) == 12 and int(record.instance, 16) >= 0
    assert InstanceRecord("a", "standalone", {}).instance != record.instance
    assert (record.host, record.pid) == (socket.gethostname(), os.getpid())
    assert before <= record.started <= after
    assert (record.next, record.branches, record.tee, record.functions) == (None, [], [], [])
    assert (record.metrics, record.curve, record.version) == (None, None, "")
    assert parse(json.loads(record.to_json()), f"instances/a/{record.instance}") == record


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("name", "field 'name' is missing, got None"),
        ("next", "field 'next' is missing, got None"),
        ("curve", "field 'curve' is missing, got None"),
    ],
)
def test_a_missing_field_is_named(field: str, message: str) -> None:
    data = valid()
    del data[field]
    assert refusal(data) == ("missing", field, None, message)


def test_the_record_must_name_its_key() -> None:
    assert refusal(with_field("name", "other"), "instances/step1/abc123") == (
        "key", "name", "other", "field 'name' must be 'step1', the name in its key, got 'other'"
    )  # fmt: skip
    assert refusal(with_field("instance", "other")) == (
        "key", "instance", "other", "field 'instance' must be 'abc123', the id in its key, got 'other'"
    )  # fmt: skip
    assert refusal(with_field("instance", 5)) == (
        "type", "instance", 5, "field 'instance' must be a string, got 5"
    )  # fmt: skip
    assert refusal(valid(), "config/step1") == (
        "key", "", "config/step1", "record is not an instances/NAME/ID key, got 'config/step1'"
    )  # fmt: skip
    assert refusal(with_field("endpoints", "tcp://h:1")) == (
        "type", "endpoints", "tcp://h:1", "field 'endpoints' must be an object role -> address, got 'tcp://h:1'"
    )  # fmt: skip
    assert refusal(with_field("pid", "1")) == (
        "type",
        "pid",
        "1",
        "field 'pid' must be an integer, got '1'",
    )
    assert refusal(with_field("started", True)) == (
        "type", "started", True, "field 'started' must be a number, got True"
    )  # fmt: skip
    assert refusal(with_field("host", "a b")) == (
        "value", "host", "a b", "field 'host' must not hold blanks, got 'a b'"
    )  # fmt: skip
    assert refusal(with_field("curve", 5)) == (
        "type",
        "curve",
        5,
        "field 'curve' must be a string, got 5",
    )
    assert refusal(with_field("functions", "f")) == (
        "type", "functions", "f", "field 'functions' must be a list, got 'f'"
    )  # fmt: skip


@pytest.mark.parametrize(
    ("key", "parsed"),
    [
        ("/pylm/c/instances/a/1", ("instances", "a", "1")),
        (b"/pylm/c/instances/a/1", ("instances", "a", "1")),
        (b"/pylm/c/instances/a/\xff", ("instances", "a", "\ufffd")),
        ("/pylm/c/config/a", ("config", "a", "")),
        ("/pylm/c/config/a/b", ("config", "a/b", "")),
        ("/pylm/c/instances/a/b/1", ("instances", "a/b", "1")),
        ("instances/a/1", ("instances", "a", "1")),
        ("config/x", ("config", "x", "")),
    ],
)
def test_keys_full_or_relative(key: str | bytes, parsed: tuple[str, str, str]) -> None:
    assert parse_key(key) == parsed


@pytest.mark.parametrize(
    "key",
    ["/pylm/c", "/pylm/c/", "/pylm/c/instances", "/other/c/instances/a/1", "/pylm/c/config/",
     "/pylm/c/instances/a/", "/pylm/c/instances//1", "/pylm/c/instances/a", "config/", "config",
     "instances/a", "instances//1", "instances/a/", "", "/", "x/instances/a/1"],
)  # fmt: skip
def test_other_keys_are_refused(key: str) -> None:
    with pytest.raises(MalformedRecord) as refused:
        parse_key(key)
    assert (refused.value.reason, refused.value.field, refused.value.value) == ("key", "", key)
    assert str(refused.value) == (
        f"record is under a key that is not instances/NAME/ID or config/NAME, got {key!r}"
    )


def test_key_builders() -> None:
    assert instances_prefix("/pylm/c/") == "/pylm/c/instances/"
    assert instances_prefix("/pylm/c/", "a") == "/pylm/c/instances/a/"
    assert instance_key("/pylm/c/", "a", "1") == "/pylm/c/instances/a/1"
    assert config_key("/pylm/c/", "a") == "/pylm/c/config/a"
    with pytest.raises(InvalidName):
        instances_prefix("/pylm/c/", "a/b")


def test_an_offending_value_is_shown_cut_at_80_characters() -> None:
    exact = "x" * 78  # its repr is 80 characters
    error = MalformedRecord("value", "f", exact, "is wrong")
    assert str(error) == f"field 'f' is wrong, got {exact!r}"
    longer = exact + "x"
    error = MalformedRecord("value", "f", longer, "is wrong")
    assert str(error) == f"field 'f' is wrong, got {longer!r:.80}... (81 characters)"
    error = MalformedRecord("json", "", b"raw", "must be JSON")
    assert (error.reason, error.field, error.value) == ("json", "", b"raw")
    assert str(error) == "record must be JSON, got b'raw'"


def test_the_bytes_of_a_record() -> None:
    with pytest.raises(MalformedRecord) as refused:
        InstanceRecord.from_json("{}", KEY)  # type: ignore[arg-type]
    assert (refused.value.reason, refused.value.field, str(refused.value)) == (
        "type", "", "record must be the bytes of a instance record, got '{}'"
    )  # fmt: skip
    raw = json.dumps(valid()).encode()
    at_limit = raw[:-1] + b" " * (64 * 1024 - len(raw)) + b"}"
    assert InstanceRecord.from_json(at_limit, KEY) == parse(valid())
    with pytest.raises(MalformedRecord) as refused:
        InstanceRecord.from_json(at_limit + b" ", KEY)
    assert (refused.value.reason, refused.value.field) == ("size", "")
    assert str(refused.value).startswith("record must be at most 65536 bytes, got b'{")
    with pytest.raises(MalformedRecord) as refused:
        InstanceRecord.from_json(b"[]", KEY)
    assert str(refused.value) == "record must be a JSON object (instance record), got b'[]'"
    with pytest.raises(MalformedRecord) as refused:
        InstanceRecord.from_json(b"{", KEY)
    assert (refused.value.reason, refused.value.field, refused.value.value) == ("json", "", b"{")
    assert str(refused.value) == (
        "record must be JSON (Expecting property name enclosed in double quotes:"
        " line 1 column 2 (char 1)), got b'{'"
    )


def test_next_calls() -> None:
    assert check_call("a.b.c") == "a.b.c"
    for call, message in [
        ("nodot", "field 'next' must be of the form 'server.function', got 'nodot'"),
        (".f", "field 'next' must be of the form 'server.function', got '.f'"),
        ("s.", "field 'next' must be of the form 'server.function', got 's.'"),
        (5, "field 'next' must be a string, got 5"),
    ]:
        with pytest.raises(MalformedRecord) as refused:
            check_call(call)
        assert (refused.value.field, str(refused.value)) == ("next", message)
    with pytest.raises(MalformedRecord, match=r"^field 'tee' must be"):
        check_call("x", "tee")


def test_stage_configs() -> None:
    config = StageConfig.from_json(b'{"next": "b.f"}', b"/pylm/c/config/a")
    assert (config.name, config.next, config.to_json()) == ("a", "b.f", b'{"next": "b.f"}')
    with pytest.raises(MalformedRecord) as refused:
        StageConfig.from_json(b'{"next": "b.f"}', "instances/a/1")
    assert (refused.value.reason, refused.value.field, str(refused.value)) == (
        "key", "", "record is not a config/NAME key, got 'instances/a/1'"
    )  # fmt: skip
    with pytest.raises(MalformedRecord) as refused:
        StageConfig.from_json(b"[]", "config/a")
    assert str(refused.value) == "record must be a JSON object (stage config), got b'[]'"
    with pytest.raises(MalformedRecord) as refused:
        StageConfig.from_json(b'{"next": "b.f"}', "config/a b")
    assert (refused.value.reason, refused.value.field) == ("value", "name")
    with pytest.raises(MalformedRecord) as refused:
        StageConfig("a b", "b.f")
    assert refused.value.field == "name"
    with pytest.raises(MalformedRecord) as refused:
        StageConfig("a", "b")
    assert refused.value.field == "next"
