"""pylm.telemetry.recent: a server's last errors, kept bounded, and an
/errors answer parsed into typed, bounded values whatever it holds."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pylm.telemetry.recent import (
    MAX_MESSAGE,
    RECENT,
    ErrorNote,
    RecentErrors,
    errors_document,
    errors_url,
    read_errors,
)

pytestmark = pytest.mark.timeout(60)


def test_the_last_errors_are_kept_bounded_and_read_back() -> None:
    kept = RecentErrors()
    for number in range(RECENT + 5):
        kept.note("f", "ValueError", f"error {number} " + "x" * 2 * MAX_MESSAGE)
    notes = kept.notes()
    assert len(notes) == RECENT
    assert notes[0].message.startswith("error 5 ") and notes[-1].message.startswith("error 24 ")
    assert all(len(note.message) == MAX_MESSAGE for note in notes)
    body = errors_document([("s", "i1", kept), ("t", "i2", RecentErrors())])
    assert read_errors(body, "s", "i1") == notes
    assert read_errors(body, "t", "i2") == [] and read_errors(body, "s", "i2") == []


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"\xff not json", "not JSON"),
        (b"[]", "no list of servers"),
        (b'{"servers": 3}', "no list of servers"),
        (b'{"servers": [7]}', "a server is int"),
        (b'{"servers": [{"name": "s", "instance": "i", "errors": {}}]}', "no list of errors"),
        (b'{"servers": [{"name": "s", "instance": "i", "errors": ["x"]}]}', "an error is str"),
        (
            b'{"servers": [{"name": "s", "instance": "i", "errors": [{"at": true}]}]}',
            "time is True",
        ),
        (
            b'{"servers": [{"name": "s", "instance": "i", "errors": [{"at": 1, "function": 2}]}]}',
            "function is 2",
        ),
    ],
)
def test_a_bad_errors_answer_is_a_value_error_naming_it(body: bytes, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        read_errors(body, "s", "i")


TEXT = st.text(st.characters(categories=["L", "N", "P", "Cs"]), max_size=20)  # Cs: surrogates
JSON = st.recursive(
    st.none() | st.booleans() | st.floats() | TEXT,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
ANSWERS = st.binary(max_size=300) | JSON.map(
    lambda errors: json.dumps({"servers": [{"name": "s", "instance": "i", "errors": errors}]})
).map(str.encode)


@given(ANSWERS)
def test_any_errors_answer_parses_or_is_a_value_error(body: bytes) -> None:
    try:
        notes = read_errors(body, "s", "i")
    except ValueError:
        return
    assert len(notes) <= RECENT
    for note in notes:
        assert isinstance(note, ErrorNote) and len(note.message) <= MAX_MESSAGE
        assert math.isfinite(note.at)
        # What the console sends on, as Starlette's JSONResponse does.
        json.dumps([note.function, note.type, note.message], ensure_ascii=False).encode()


def test_what_json_allows_but_an_answer_cannot_carry_is_refused_or_cleaned() -> None:
    """NaN and infinite times are refused, nesting too deep for the parser
    is a ValueError, and a message with a lone surrogate is kept as UTF-8
    can carry it, noted or read."""

    def answer(**error: object) -> bytes:
        errors = [{"at": 1.0, "function": "f", "type": "T", "message": "m", **error}]
        return json.dumps({"servers": [{"name": "s", "instance": "i", "errors": errors}]}).encode()

    for at in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="not a finite number"):
            read_errors(answer(at=at), "s", "i")
    with pytest.raises(ValueError, match="not JSON"):
        read_errors(b"[" * 100_000, "s", "i")
    lone = b"caf\xe9".decode("utf-8", "surrogateescape")
    (note,) = read_errors(answer(message=lone), "s", "i")
    assert note.message == "caf?"
    kept = RecentErrors()
    kept.note("f", "T", lone)
    assert kept.notes()[0].message == "caf?"


def test_errors_url_is_beside_a_metrics_url() -> None:
    assert errors_url("http://127.0.0.1:9/metrics") == "http://127.0.0.1:9/errors"
    assert errors_url("https://h:9/metrics") == "https://h:9/errors"
    for bad in ("file:///etc/metrics", "http://h:9/other", "metrics", ""):
        assert errors_url(bad) is None
