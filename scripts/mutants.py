"""Mutation check of the promises: each mutant removes or breaks one mechanism
behind a guarantee of docs/guarantees.md, and the tests named for it must fail.

The mutants are listed in scripts/mutants/*.toml, one table each:

    [[mutant]]
    id = "area-what-is-broken"     # unique
    promise = "the guarantee, in the docs' words"
    file = "pylm/..."              # path in the repository
    old = '''text that occurs exactly once in file'''
    new = '''its replacement'''
    tests = ["tests/test_x.py::test_y"]

The checkout is never touched: the tracked (and new, unignored) files are
copied to a temporary folder, the named tests are run there once unmutated
(they must pass), then each mutant is applied alone and its tests run with
`-x`. A mutant is caught when pytest reports a failed test (exit code 1);
it survives when they pass; tests that give no verdict within 300 s (past
their own pytest timeouts) hung; anything else (a collection error, a
mutant whose `old` text is gone or not unique) is an error of the list. The exit
code is 0 only when every mutant was caught.

Usage: python scripts/mutants.py [--only ID ...] [--write-docs] [--no-baseline]
(scripts/mutants.sh installs what it needs first).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LISTS = ROOT / "scripts" / "mutants"
DOCS = ROOT / "docs" / "guarantees.md"
BEGIN, END = "<!-- mutants:begin -->", "<!-- mutants:end -->"
MUTANT_TIMEOUT = 300.0  # seconds for one mutant's tests; a hang past it is no verdict
FIELDS = {"id", "promise", "file", "old", "new", "tests"}


@dataclass(frozen=True)
class Mutant:
    id: str
    promise: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class Outcome:
    mutant: Mutant
    verdict: str  # "caught", "survived", "hung" or "error"
    detail: str  # the test that failed, or what went wrong
    seconds: float


def load(folder: Path) -> list[Mutant]:
    """Every mutant of every list, checked for its fields and a unique id."""
    mutants: list[Mutant] = []
    seen: dict[str, str] = {}
    for path in sorted(folder.glob("*.toml")):
        with path.open("rb") as f:
            tables = tomllib.load(f).get("mutant", [])
        for number, table in enumerate(tables, 1):
            where = f"{path.name} mutant {number}"
            if set(table) != FIELDS:
                raise SystemExit(f"{where}: fields {sorted(table)}, want {sorted(FIELDS)}")
            tests = table["tests"]
            if not (isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests)):
                raise SystemExit(f"{where}: tests must be a non-empty list of node ids")
            if table["id"] in seen:
                raise SystemExit(f"{where}: id {table['id']!r} already used in {seen[table['id']]}")
            seen[table["id"]] = path.name
            mutants.append(
                Mutant(
                    id=str(table["id"]),
                    promise=str(table["promise"]),
                    file=str(table["file"]),
                    old=str(table["old"]),
                    new=str(table["new"]),
                    tests=tuple(tests),
                    source=path.name,
                )
            )
    return mutants


def copy_tree(target: Path) -> None:
    """The checkout's tracked and new (unignored) files, as they are on disk."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        name = raw.decode()
        source = ROOT / name
        if not source.is_file():  # deleted in the working tree
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target / name)


def pytest(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[int | None, str]:
    """Run the tests in the copy; (exit code or None on timeout, output)."""
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rf", *tests]
    try:
        done = subprocess.run(
            command, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout or ""
        return None, out if isinstance(out, str) else out.decode(errors="replace")
    return done.returncode, done.stdout + done.stderr


def first_failure(output: str) -> str:
    found = re.search(r"^FAILED (\S+)", output, re.MULTILINE)
    return found.group(1) if found else "(a test failed)"


def run_one(tree: Path, mutant: Mutant) -> Outcome:
    started = time.monotonic()
    path = tree / mutant.file
    if not path.is_file():
        return Outcome(mutant, "error", f"no file {mutant.file}", 0.0)
    original = path.read_text()
    count = original.count(mutant.old)
    if count != 1:
        return Outcome(mutant, "error", f"old text found {count} times in {mutant.file}", 0.0)
    path.write_text(original.replace(mutant.old, mutant.new))
    try:
        code, output = pytest(tree, mutant.tests, MUTANT_TIMEOUT)
    finally:
        path.write_text(original)
    seconds = time.monotonic() - started
    if code is None:  # pytest's own timeouts fail a test long before: this is a hang
        return Outcome(mutant, "hung", f"no verdict within {MUTANT_TIMEOUT:.0f} s", seconds)
    if code == 1:
        return Outcome(mutant, "caught", first_failure(output), seconds)
    if code == 0:
        return Outcome(mutant, "survived", "every test passed", seconds)
    tail = " | ".join(output.strip().splitlines()[-3:])
    return Outcome(mutant, "error", f"pytest exit code {code}: {tail}", seconds)


def table(outcomes: list[Outcome], total_seconds: float) -> str:
    caught = sum(o.verdict == "caught" for o in outcomes)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    day = datetime.date.today().isoformat()
    minutes, seconds = divmod(round(total_seconds), 60)
    lines = [
        f"Latest run: {day}, commit {commit}: **{caught} of {len(outcomes)} mutants caught** "
        f"in {minutes} min {seconds} s.",
        "",
        "| mutant | what it breaks | file | caught by |",
        "|---|---|---|---|",
    ]
    for o in outcomes:
        verdict = f"`{o.detail}`" if o.verdict == "caught" else f"**{o.verdict}**: {o.detail}"
        lines.append(f"| `{o.mutant.id}` | {o.mutant.promise} | `{o.mutant.file}` | {verdict} |")
    return "\n".join(lines)


def write_docs(text: str) -> None:
    page = DOCS.read_text()
    if BEGIN not in page or END not in page:
        raise SystemExit(f"{DOCS}: no {BEGIN} ... {END} markers")
    head, rest = page.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOCS.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="ID", help="run these mutants only")
    parser.add_argument("--write-docs", action="store_true", help=f"write the table into {DOCS}")
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the run of the tests unmutated"
    )
    args = parser.parse_args()
    mutants = load(LISTS)
    if args.only:
        unknown = set(args.only) - {m.id for m in mutants}
        if unknown:
            parser.error(f"no mutant {', '.join(sorted(unknown))}")
        mutants = [m for m in mutants if m.id in args.only]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pylm-mutants-") as folder:
        tree = Path(folder)
        copy_tree(tree)
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
            print(f"baseline: {len(tests)} tests unmutated", flush=True)
            code, output = pytest(tree, tests, MUTANT_TIMEOUT * 4)
            if code != 0:
                print(output[-3000:])
                print("the tests fail unmutated: fix them first", file=sys.stderr)
                return 2
        outcomes = []
        for number, mutant in enumerate(mutants, 1):
            outcome = run_one(tree, mutant)
            outcomes.append(outcome)
            print(
                f"[{number}/{len(mutants)}] {mutant.id}: {outcome.verdict} "
                f"({outcome.detail}, {outcome.seconds:.0f} s)",
                flush=True,
            )
    text = table(outcomes, time.monotonic() - started)
    print()
    print(text)
    if args.write_docs and not args.only:
        write_docs(text)
    return 0 if all(o.verdict == "caught" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
