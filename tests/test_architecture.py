"""The wire format has one owner: only pylm/protocol.py knows where a head's
fields sit (docs/protocol.md, "One module knows the offsets").

Every other module of pylm/ reads and builds heads with protocol's named
pieces (LEAD, ONE_FRAME_REQUEST, read_sizes, read_id, reply_to, forward, ...).
This test reads their syntax trees and fails, naming file:line, on:

* a slice of a header offset written as a number (``body[9:17]``, ``body[:5]``);
* a header byte read by index from a message (``body[5] * 256 + body[6]``);
* a ``struct`` format or call of its own (the head's integers are protocol's);
* a redefined protocol constant: a name of the old copies (``_FAST``, ``_SIZES``,
  ``_NO_DEADLINE``, ``_HEAD_SIZE``, ...), a prefix glued from ``MAGIC``, an
  alias ``X = protocol.Y`` (import the name instead), ``bytes(8)``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PYLM = Path(__file__).resolve().parent.parent / "pylm"
OWNER = PYLM / "protocol.py"

# Formats that are not the head's: the cache's set payload, a key size first
# (its own documented layout, in the cache's modules pylm/cache*.py).
OWN_FORMATS = {"cache": {">H"}}

OFFSETS = {2, 5, 7, 9, 17, 25}  # ends of magic, lead, target size, reply lead, id, head
FIELD_BYTES = {2, 3, 4, 5, 6, 7, 8}  # version .. route size, read one byte at a time
MESSAGE_NAMES = {"body", "head", "answer", "job", "message", "frame", "first", "request"}
OLD_COPIES = {
    "_FAST",
    "_FAST_REQUEST",
    "_SIZES",
    "_NO_DEADLINE",
    "_HEAD_SIZE",
    "_REPLY_PREFIX",
    "_BATCH_PREFIX",
    "_ID_DEADLINE",
    "_COUNT",
    "SEQ",
}


def modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PYLM.rglob("*.py")):
        name = path.relative_to(PYLM).as_posix()
        if path == OWNER:
            continue
        yield name, ast.parse(path.read_text(encoding="utf-8"), str(path))


def number(node: ast.AST | None) -> int | None:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    return None


def named(node: ast.AST) -> str:
    """The last name of ``node`` (``self.body`` -> ``body``), or ''."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript):  # frames[1][:2]
        return named(node.value) or "frame"
    return ""


def problems(name: str, tree: ast.Module) -> Iterator[str]:
    for node in ast.walk(tree):
        where = f"pylm/{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Subscript):
            index = node.slice
            if isinstance(index, ast.Slice):
                bounds = {number(index.lower), number(index.upper)} & OFFSETS
                if bounds:
                    yield f"{where}: slices a head at byte {min(bounds)}: use protocol's pieces"
            elif number(index) in FIELD_BYTES and named(node.value) in MESSAGE_NAMES:
                yield f"{where}: reads head byte {number(index)}: use protocol's pieces"
        elif isinstance(node, ast.Call):
            function = node.func
            if (
                isinstance(function, ast.Attribute)
                and isinstance(function.value, ast.Name)
                and function.value.id == "struct"
            ):
                formats = {
                    arg.value
                    for arg in node.args[:1]
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
                }
                owned = set().union(
                    *(kept for prefix, kept in OWN_FORMATS.items() if name.startswith(prefix))
                )
                if not formats or not formats <= owned:
                    yield f"{where}: struct.{function.attr} of its own: protocol owns the formats"
            if (
                isinstance(function, ast.Name)
                and function.id == "bytes"
                and len(node.args) == 1
                and number(node.args[0]) is not None
            ):
                yield f"{where}: bytes({number(node.args[0])}), a field of zeros: use protocol's"
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and target.id in OLD_COPIES:
                    yield f"{where}: {target.id} redefines a protocol constant"
            value = node.value
            if (
                isinstance(value, ast.Attribute)
                and isinstance(value.value, ast.Name)
                and value.value.id == "protocol"
                and value.attr.isupper()
            ):
                yield f"{where}: an alias of protocol.{value.attr}: import it instead"
            if value is not None and any(
                isinstance(part, ast.BinOp) and "MAGIC" in ast.unparse(part)
                for part in ast.walk(value)
            ):
                yield f"{where}: a prefix glued from MAGIC: use protocol's constants"


def test_only_the_protocol_module_knows_header_offsets() -> None:
    found = [problem for name, tree in modules() for problem in problems(name, tree)]
    assert not found, "\n".join(found)


def test_the_check_sees_each_kind_of_leak() -> None:
    leaky = ast.parse(
        "import struct\n"
        "from pylm import protocol\n"
        "_FAST = protocol.MAGIC + bytes([1, 1, 0])\n"
        "_SIZES = struct.Struct('>HH')\n"
        "_HEAD = protocol.HEAD_SIZE\n"
        "NONE = bytes(8)\n"
        "def serve(body, frames):\n"
        "    reply = body[9:17]\n"
        "    fast = body[:5] == b''\n"
        "    size = body[5] * 256 + body[6]\n"
        "    pylm = frames[1][:2]\n"
    )
    found = list(problems("leaky.py", leaky))
    lines = sorted({int(problem.split(":")[1]) for problem in found})
    assert lines == [3, 4, 5, 6, 8, 9, 10, 11], "\n".join(found)
    harmless = ast.parse(
        "def show(payload, group, frames, key):\n"
        "    return payload[:200], group[:3], frames[1:], key[:300], frames[0], frames[:1]\n"
    )
    assert not list(problems("harmless.py", harmless))
