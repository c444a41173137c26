"""Server names: one rule, checked wherever a name comes in (a server's
constructor, a client's, the command line, topology files, registry records).

A name is 1 to 128 ASCII letters, digits, ``_``, ``-`` and ``.``, starting
with a letter, a digit or ``_``: it is part of etcd keys
(``instances/<name>/<id>``), of every request's target (``<name>.<function>``,
split at the last dot) and of metric labels, so a ``/`` would make one name
the prefix of another's keys, and blanks or control characters would make
logs and the command line ambiguous.
"""

from __future__ import annotations

import re

from pylm.errors import InvalidName

__all__ = ["MAX_NAME", "NAME_RULE", "InvalidName", "check_name"]

MAX_NAME = 128
NAME_RULE = (
    f"1 to {MAX_NAME} ASCII letters, digits, '_', '-' and '.', starting with a letter,"
    " a digit or '_'"
)
_NAME = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.-]{{0,{MAX_NAME - 1}}}\Z")


def check_name(name: object, what: str = "server name") -> str:
    """``name`` if it is a valid server name, else :class:`InvalidName`
    saying what it is and what a name must be."""
    if not isinstance(name, str):
        raise InvalidName(f"{what} must be a str, got {type(name).__name__}")
    if not _NAME.match(name):
        raise InvalidName(f"{what} {name[:140]!r} is not a valid name: use {NAME_RULE}")
    return name
