"""The name rule (pylm.names) as a pure unit: every boundary of the rule,
and the error naming what was refused and what a name must be."""

from __future__ import annotations

import pytest

from pylm.errors import InvalidName
from pylm.names import MAX_NAME, NAME_RULE, check_name

pytestmark = pytest.mark.timeout(30)


def test_the_rule_in_words() -> None:
    assert MAX_NAME == 128
    assert NAME_RULE == (
        "1 to 128 ASCII letters, digits, '_', '-' and '.', starting with a letter, a digit or '_'"
    )


@pytest.mark.parametrize(
    "name", ["a", "Z", "0", "9", "_", "a.b", "a-b", "a_b", "a..", "_-.", "x" * 128, "A" + "9" * 127]
)
def test_valid_names_are_returned_as_they_are(name: str) -> None:
    assert check_name(name) is name


@pytest.mark.parametrize(
    "name",
    ["", ".a", "-a", "x" * 129, "a/b", "a b", "a\n", "a\nb", "ü", "a*", "a:b", "a\x00"],
)
def test_invalid_names_are_refused_naming_the_name_and_the_rule(name: str) -> None:
    with pytest.raises(InvalidName) as refused:
        check_name(name)
    assert str(refused.value) == (
        f"server name {name[:140]!r} is not a valid name: use {NAME_RULE}"
    )
    assert isinstance(refused.value, ValueError)


def test_the_error_says_what_the_name_was_for_and_cuts_it_at_140() -> None:
    with pytest.raises(InvalidName) as refused:
        check_name("y" * 300, "stage name")
    assert str(refused.value) == f"stage name {'y' * 140!r} is not a valid name: use {NAME_RULE}"


@pytest.mark.parametrize(("value", "type_name"), [(5, "int"), (None, "NoneType"), (b"a", "bytes")])
def test_a_name_that_is_not_a_str(value: object, type_name: str) -> None:
    with pytest.raises(InvalidName) as refused:
        check_name(value, "client name")
    assert str(refused.value) == f"client name must be a str, got {type_name}"
    with pytest.raises(InvalidName, match=r"^server name must be a str"):
        check_name(value)
