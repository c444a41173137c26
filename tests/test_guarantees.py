"""docs/guarantees.md stays true to the suite: every row names at least one
test, every test it names exists, every link leads to a section that
exists, and the mutation check's markers are in place. Fast: the test files
are parsed with `ast`, nothing runs."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "guarantees.md"
NODE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")
LINK = re.compile(r"\]\(([^)#\s]+\.md)(?:#([^)\s]+))?\)")
BEGIN, END = "<!-- mutants:begin -->", "<!-- mutants:end -->"


def rows() -> list[tuple[int, str, str]]:
    """(line number, promise, tests) of every row of every table before the
    mutation check."""
    found = []
    lines = PAGE.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if line.startswith("## Mutation check"):
            break
        if not line.startswith("| ") or line.startswith(("| promise |", "|---")):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        assert len(cells) == 2, f"docs/guarantees.md:{number}: not 2 columns: {line}"
        found.append((number, cells[0], cells[1]))
    return found


@cache
def defined_tests(path: str) -> frozenset[str]:
    """The test functions a file defines at its top level."""
    tree = ast.parse((ROOT / path).read_text(), path)
    return frozenset(
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    )


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """The anchors of a Markdown page's headings (outside code blocks)."""
    found = set()
    fenced = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return frozenset(found)


def test_the_page_has_a_row_per_promise() -> None:
    assert len(rows()) >= 50


def test_every_row_names_a_test_that_exists() -> None:
    problems = []
    for number, promise, tests in rows():
        named = NODE.findall(tests)
        if not named:
            problems.append(f"line {number}: no test named for: {promise}")
            continue
        left = NODE.sub("", tests).replace("<br>", "").strip()
        if left:
            problems.append(f"line {number}: not a test id: {left!r}")
        for path, function in named:
            if not (ROOT / path).is_file():
                problems.append(f"line {number}: no file {path}")
            elif function not in defined_tests(path):
                problems.append(f"line {number}: {path} has no {function}")
    assert not problems, "docs/guarantees.md:\n" + "\n".join(problems)


def test_every_promise_links_to_a_section_that_makes_it() -> None:
    problems = []
    for number, promise, _tests in rows():
        links = LINK.findall(promise)
        if not links:
            problems.append(f"line {number}: no link to the page that makes it: {promise}")
        for target, anchor in links:
            page = (PAGE.parent / target).resolve()
            if not page.is_file():
                problems.append(f"line {number}: no page {target}")
            elif anchor and anchor not in anchors(page):
                problems.append(f"line {number}: {target} has no section #{anchor}")
    assert not problems, "docs/guarantees.md:\n" + "\n".join(problems)


def test_the_mutation_check_section_holds_the_markers() -> None:
    text = PAGE.read_text()
    section = text.index("\n## Mutation check\n")
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert section < text.index(BEGIN) < text.index(END)
    assert "scripts/mutants.sh" in text[section:]


def test_the_checks_catch_what_they_are_for() -> None:
    """The parsing above finds names and sections, and misses what is not."""
    assert NODE.findall("`tests/test_x.py::test_y`<br>`tests/a/test_z.py::test_w`") == [
        ("tests/test_x.py", "test_y"),
        ("tests/a/test_z.py", "test_w"),
    ]
    assert "test_the_page_has_a_row_per_promise" in defined_tests("tests/test_guarantees.py")
    assert "rows" not in defined_tests("tests/test_guarantees.py")
    assert slug(" The endpoint: `/metrics` and `/healthz`") == "the-endpoint-metrics-and-healthz"
    assert slug(" Branches: handle_stream") == "branches-handle_stream"
    assert LINK.findall("([ops](operations.md#a-b)) ([x](x.md))") == [
        ("operations.md", "a-b"),
        ("x.md", ""),
    ]
