"""The schema of registry records and stage configs (pylm.registry.records):
a table of bad records, each refused naming its field, and Hypothesis
records built from the schema: valid ones round-trip, mutated ones are
refused with MalformedRecord and never another exception."""

from __future__ import annotations

import json
import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pylm.errors import RegistryError
from pylm.registry.records import (
    ENDPOINT_SCHEMES,
    MAX_CALLS,
    MAX_ENDPOINTS,
    MAX_RECORD_BYTES,
    REASONS,
    InstanceRecord,
    MalformedRecord,
    StageConfig,
    parse_key,
)
from pylm.testing import SOAK

KEY = "/pylm/test/instances/step1/abc123"
CURVE_KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # a Z85 public key


def valid() -> dict[str, Any]:
    return {
        "name": "step1",
        "kind": "chained",
        "endpoints": {"pull": "tcp://127.0.0.1:5555", "db": "ipc:///tmp/pylm/db"},
        "instance": "abc123",
        "host": "node-1.example.org",
        "pid": 4242,
        "next": "step2.bar",
        "branches": ["other.f"],
        "tee": [],
        "functions": ["foo", "_private_ok"],
        "idempotent": ["foo"],
        "metrics": "http://10.0.0.1:9100/metrics",
        "curve": CURVE_KEY,
        "version": "1.0.0",
        "started": 1_700_000_000.5,
        "master": None,
    }


def parse(data: dict[str, Any], key: str = KEY) -> InstanceRecord:
    return InstanceRecord.from_json(json.dumps(data).encode(), key)


def test_a_valid_record_parses_to_its_fields() -> None:
    record = parse(valid())
    assert record.endpoints["db"] == "ipc:///tmp/pylm/db" and record.pid == 4242
    assert InstanceRecord.from_json(record.to_json(), KEY) == record
    assert parse({**valid(), "future_field": [1, 2]}) == record  # a newer pylm's field: ignored


MISSING = object()

BAD = [
    # field, value, reason
    ("name", MISSING, "missing"),
    ("name", 7, "type"),
    ("name", "b", "key"),  # under instances/step1/...: names itself b
    ("name", " step1", "value"),
    ("instance", "other", "key"),
    ("instance", "a/b", "value"),
    ("instance", 12, "type"),
    ("kind", "Chained!", "value"),
    ("kind", MISSING, "missing"),
    ("endpoints", ["tcp://h:1"], "type"),
    ("endpoints", {"pull": 5555}, "type"),
    ("endpoints", {"pull": None}, "type"),
    ("endpoints", {"pull": "inproc://pylm-control-x"}, "endpoint"),
    ("endpoints", {"pull": "ws://h:1"}, "endpoint"),
    ("endpoints", {"pull": "tcp://h"}, "endpoint"),
    ("endpoints", {"pull": "tcp://h:0"}, "endpoint"),
    ("endpoints", {"pull": "tcp://h:65536"}, "endpoint"),
    ("endpoints", {"pull": "tcp://-h:1"}, "endpoint"),
    ("endpoints", {"pull": "tcp://*:1"}, "endpoint"),
    ("endpoints", {"pull": "tcp://h:1/x"}, "endpoint"),
    ("endpoints", {"pull": "tcp://[::1:5"}, "endpoint"),
    ("endpoints", {"pull": "ipc://"}, "endpoint"),
    ("endpoints", {"pull": "ipc://" + "x" * 101}, "endpoint"),
    ("endpoints", {"pull": "tcp://h:1\x00"}, "value"),
    ("endpoints", {"PULL": "tcp://h:1"}, "value"),
    ("endpoints", {f"r{i}": "tcp://h:1" for i in range(MAX_ENDPOINTS + 1)}, "value"),
    ("host", MISSING, "missing"),
    ("host", "", "value"),
    ("host", "a b", "value"),
    ("host", "h" * 256, "value"),
    ("pid", MISSING, "missing"),
    ("pid", True, "type"),
    ("pid", 0, "value"),
    ("pid", -5, "value"),
    ("pid", 2**40, "value"),
    ("pid", 1.5, "type"),
    ("pid", "4242", "type"),
    ("started", MISSING, "missing"),
    ("started", "yesterday", "type"),
    ("started", False, "type"),
    ("started", -1, "value"),
    ("started", 1e300, "value"),
    ("next", MISSING, "missing"),
    ("next", "nodot", "value"),
    ("next", "step2.", "value"),
    ("next", ".bar", "value"),
    ("next", "step2.not-an-identifier", "value"),
    ("next", ["step2.bar"], "type"),
    ("branches", "step2.bar", "type"),
    ("branches", [None], "type"),
    ("branches", ["a.b"] * (MAX_CALLS + 1), "value"),
    ("tee", ["x"], "value"),
    ("functions", MISSING, "missing"),
    ("functions", [1], "type"),
    ("functions", ["a.b"], "value"),
    ("functions", {"foo": 1}, "type"),
    ("metrics", 9100, "type"),
    ("metrics", "ftp://h:1/metrics", "endpoint"),
    ("metrics", "http:///metrics", "endpoint"),
    ("metrics", "http://user:pw@h:1/metrics", "endpoint"),
    ("metrics", "http://h:99999/metrics", "endpoint"),
    ("metrics", "http://h:1/me trics", "endpoint"),
    ("curve", "short", "value"),
    ("curve", CURVE_KEY[:-1] + " ", "value"),
    ("curve", 1, "type"),
    ("version", MISSING, "missing"),
    ("version", 1.0, "type"),
    ("version", "v" * 65, "value"),
]


@pytest.mark.parametrize(("field", "value", "reason"), BAD, ids=[f"{f}-{r}" for f, _, r in BAD])
def test_bad_records_are_refused_naming_the_field(field: str, value: object, reason: str) -> None:
    data = valid()
    if value is MISSING:
        del data[field]
    else:
        data[field] = value
    with pytest.raises(MalformedRecord) as refused:
        parse(data)
    error = refused.value
    assert isinstance(error, ValueError) and isinstance(error, RegistryError)
    assert error.reason == reason and error.reason in REASONS
    assert error.field.partition(".")[0] == field
    assert f"{field}" in str(error)
    if value is not MISSING:  # the offending value (or the item of it at fault), truncated
        assert repr(error.value)[:40] in str(error) and len(str(error)) < 250


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{garbage", "json"),
        (b"[1, 2]", "json"),
        (b"\xff\xfe", "json"),
        (b"[" * 100_000, "size"),
        (b'{"name": "' + b"x" * MAX_RECORD_BYTES + b'"}', "size"),
        (b"[" * 5000 + b"]" * 5000, "json"),  # deep nesting: no RecursionError escapes
        (b'{"name": NaN}', "type"),
    ],
)
def test_records_that_are_not_json_objects(raw: bytes, reason: str) -> None:
    with pytest.raises(MalformedRecord) as refused:
        InstanceRecord.from_json(raw, KEY)
    assert refused.value.reason == reason
    assert len(str(refused.value)) < 400


@pytest.mark.parametrize(
    "key",
    ["/pylm/test/instances/step1", "/pylm/test/other/step1/abc123", "/elsewhere/x", "instances/"],
)
def test_keys_that_are_not_instance_keys(key: str) -> None:
    with pytest.raises(MalformedRecord) as refused:
        parse(valid(), key)
    assert refused.value.reason == "key"


def test_keys_relative_or_full() -> None:
    assert parse_key("instances/a.b/c/1") == ("instances", "a.b/c", "1")
    assert parse_key(b"/pylm/prod/config/step1") == ("config", "step1", "")
    assert parse(valid(), "instances/step1/abc123").name == "step1"


def test_stage_config_schema() -> None:
    key = "/pylm/test/config/step1"
    config = StageConfig.from_json(b'{"next": "step2.bar", "later": 1}', key)
    assert config == StageConfig("step1", "step2.bar") and config.to_dict() == {"next": "step2.bar"}
    assert StageConfig.from_json(config.to_json(), key) == config
    for raw, field, reason in [
        (b"{}", "next", "missing"),
        (b'{"next": 5}', "next", "type"),
        (b'{"next": "nodot"}', "next", "value"),
        (b'"step2.bar"', "", "json"),
        (b"not json", "", "json"),
    ]:
        with pytest.raises(MalformedRecord) as refused:
            StageConfig.from_json(raw, key)
        assert (refused.value.field, refused.value.reason) == (field, reason)
    with pytest.raises(MalformedRecord, match="key"):
        StageConfig.from_json(b'{"next": "a.b"}', KEY)
    with pytest.raises(MalformedRecord):
        StageConfig("step1", "nodot")


# ---------------------------------------------------------------------- Hypothesis

_NAME_CHARS = st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="/")
names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,39}", fullmatch=True)  # pylm.names
identifiers = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,20}\Z")
calls = st.builds(lambda server, function: f"{server}.{function}", names, identifiers)
labels = st.from_regex(r"\A[A-Za-z0-9]([A-Za-z0-9_-]{0,10}[A-Za-z0-9])?\Z")
hosts = st.one_of(
    st.lists(labels, min_size=1, max_size=4).map(".".join),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda ip: f"[{ip}]"),
)
ports = st.integers(1, 65535)
tcp = st.builds(lambda host, port: f"tcp://{host}:{port}", hosts, ports)
ipc = st.text(string.ascii_letters + string.digits + "/._-", min_size=1, max_size=90).map(
    lambda path: f"ipc://{path}"
)
roles = st.from_regex(r"\A[a-z][a-z0-9_-]{0,10}\Z")
z85 = string.digits + string.ascii_letters + ".-:+=^!/*?&<>()[]{}@%$#"
assert set(ENDPOINT_SCHEMES) == {"tcp", "ipc"}  # the strategies below cover these

records = st.builds(
    InstanceRecord,
    name=names,
    kind=st.from_regex(r"\A[a-z][a-z0-9_-]{0,15}\Z"),
    endpoints=st.dictionaries(roles, st.one_of(tcp, ipc), max_size=MAX_ENDPOINTS),
    instance=st.from_regex(r"\A[A-Za-z0-9_.-]{1,20}\Z"),
    host=hosts,
    pid=st.integers(1, 2**31 - 1),
    next=st.none() | calls,
    branches=st.lists(calls, max_size=4),
    tee=st.lists(calls, max_size=4),
    functions=st.lists(identifiers, max_size=8),
    metrics=st.none() | st.builds(lambda h, p: f"http://{h}:{p}/metrics", hosts, ports),
    curve=st.none() | st.text(z85, min_size=40, max_size=40),
    version=st.text(_NAME_CHARS, max_size=20),
    started=st.floats(0, 2e9, allow_nan=False),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)


def key_of(record: InstanceRecord) -> str:
    return f"/pylm/fuzz/instances/{record.name}/{record.instance}"


@settings(max_examples=int(100 * SOAK), deadline=None)
@given(records)
def test_valid_records_round_trip(record: InstanceRecord) -> None:
    assert InstanceRecord.from_json(record.to_json(), key_of(record)) == record


# What each field can never be: a value of one of these JSON types.
_WRONG_TYPES = {
    "name": st.integers() | st.lists(st.text()),
    "kind": st.integers() | st.none(),
    "endpoints": st.lists(st.text()) | st.text() | st.integers(),
    "instance": st.integers() | st.none(),
    "host": st.floats() | st.none(),
    "pid": st.text() | st.booleans() | st.floats() | st.none(),
    "next": st.integers() | st.lists(calls, min_size=1),
    "branches": st.text() | st.integers() | st.none(),
    "tee": st.dictionaries(st.text(), st.text()) | st.booleans(),
    "functions": st.text() | st.none(),
    "metrics": st.integers() | st.lists(st.text()),
    "curve": st.integers() | st.booleans(),
    "version": st.integers() | st.none(),
    "started": st.text() | st.booleans() | st.none(),
}


@settings(max_examples=int(150 * SOAK), deadline=None)
@given(records, st.data())
def test_mutated_records_are_refused_with_the_typed_error(
    record: InstanceRecord, data: st.DataObject
) -> None:
    fields = json.loads(record.to_json())
    field = data.draw(st.sampled_from(sorted(_WRONG_TYPES)))
    how = data.draw(st.sampled_from(["delete", "wrong type", "any value"]))
    if how == "delete":
        del fields[field]
    elif how == "wrong type":
        fields[field] = data.draw(_WRONG_TYPES[field])
    else:
        fields[field] = data.draw(json_values)
    raw = json.dumps(fields).encode()
    try:
        parsed = InstanceRecord.from_json(raw, key_of(record))
    except MalformedRecord as exc:
        assert exc.reason in REASONS
        assert exc.field == "" or exc.field.partition(".")[0] == field
        return
    assert how == "any value", f"{how} of {field} was accepted: {raw[:200]!r}"
    assert getattr(parsed, field) == fields[field]  # a value that happens to fit


@settings(max_examples=int(200 * SOAK), deadline=None)
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_give_a_record_or_the_typed_error(raw: bytes) -> None:
    for parser, key in ((InstanceRecord.from_json, KEY), (StageConfig.from_json, "config/x")):
        try:
            parser(raw, key)
        except MalformedRecord as exc:
            assert exc.reason in REASONS
