"""The mutant lists of scripts/mutants/ stay applicable as the code moves:
each mutant's text occurs exactly once in its file, its replacement differs
and still parses, and every test it names exists. (scripts/mutants.sh runs
them; this only keeps the lists from going stale.)"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mutants_runner", ROOT / "scripts" / "mutants.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test")
    }


@pytest.mark.timeout(30)
def test_every_mutant_applies_and_names_tests_that_exist() -> None:
    module = runner()
    mutants = module.load(ROOT / "scripts" / "mutants")
    assert len(mutants) >= 25
    functions: dict[str, set[str]] = {}
    for mutant in mutants:
        source = (ROOT / mutant.file).read_text()
        assert source.count(mutant.old) == 1, f"{mutant.id}: its text is not once in {mutant.file}"
        assert mutant.new != mutant.old, mutant.id
        ast.parse(source.replace(mutant.old, mutant.new), mutant.file)  # still Python
        for node in mutant.tests:
            file, _, name = node.partition("::")
            assert (ROOT / file).is_file(), f"{mutant.id}: no test file {file}"
            if file not in functions:
                functions[file] = defined_tests(ROOT / file)
            assert name.split("[")[0] in functions[file], f"{mutant.id}: no test {node}"
