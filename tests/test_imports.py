"""pylm's modules import one another in one direction.

The graph is read from the source with :mod:`ast`: every ``import`` and
``from ... import`` of a ``pylm`` module, at module level or inside a
function, is an edge. Imports under ``if TYPE_CHECKING:`` are left out: they
never run, and type hints may point anywhere.

The rules:

* **No cycles**: no module imports, through any chain, a module that imports
  it back. ``from pylm.a import b`` counts as an import of ``pylm.a.b`` when
  ``b`` is a module, else of ``pylm.a``; importing ``pylm.a.b`` also runs
  ``pylm/a/__init__.py`` (an edge to ``pylm.a``) unless the importer is
  inside ``pylm.a`` already. A cycle fails the test, named.
* **Layers run one way**, from the bottom up: the protocol (``pylm.protocol``)
  imports nothing of pylm but its errors; the registry (``pylm.registry``)
  and telemetry (``pylm.telemetry``) import no server or client module
  (``pylm.base``, ``pylm.calls``, ``pylm.window``, ``pylm.source``, ``pylm.standalone``,
  ``pylm.chained``, ``pylm.parallel``), nor the command line (``pylm.cli``),
  which sits on top of everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pylm"

# Server and client modules: what the lower layers never import.
SERVERS_AND_CLIENTS = (
    "pylm.base",
    "pylm.calls",
    "pylm.window",
    "pylm.source",
    "pylm.standalone",
    "pylm.chained",
    "pylm.parallel",
)
LOWER_LAYERS = ("pylm.protocol", "pylm.registry", "pylm.telemetry")
PROTOCOL_MAY_IMPORT = {"pylm.errors"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree``, in functions too, but not those
    under ``if TYPE_CHECKING:`` (its ``else:`` branch runs, so it counts)."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The pylm modules that module ``name`` (at ``path``) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            targets.add(submodule if submodule in known else base)
    # Importing pylm.a.b first runs pylm.a's __init__, unless that is running already.
    for target in list(targets):
        parts = target.split(".")
        for end in range(2, len(parts)):
            parent = ".".join(parts[:end])
            if not within(name, {parent}):
                targets.add(parent)
    return {target for target in targets if target in known and target != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``edges`` (its modules, the first repeated at the end), or None."""
    done: set[str] = set()
    for start in sorted(edges):
        if start in done:
            continue
        path: list[str] = []
        on_path: set[str] = set()
        stack: list[tuple[str, list[str]]] = [(start, sorted(edges[start]))]
        path.append(start)
        on_path.add(start)
        while stack:
            node, waiting = stack[-1]
            if not waiting:
                stack.pop()
                path.pop()
                on_path.discard(node)
                done.add(node)
                continue
            target = waiting.pop()
            if target in on_path:
                return [*path[path.index(target) :], target]
            if target not in done:
                stack.append((target, sorted(edges[target])))
                path.append(target)
                on_path.add(target)
    return None


def within(name: str, prefixes: tuple[str, ...] | set[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def test_the_graph_sees_every_kind_of_import() -> None:
    edges = graph()
    assert "pylm.telemetry.counting" in edges["pylm.calls"]  # module level
    assert "pylm.telemetry.top" in edges["pylm.cli"]  # in a function, `from pkg import mod`
    assert "pylm.registry" not in edges["pylm.discovery"]  # under TYPE_CHECKING only
    assert "pylm.standalone" in edges["pylm.cache"]  # runs pylm.standalone.client's package
    assert "pylm.standalone" not in edges["pylm.standalone.servers"]  # running already


def test_find_cycle_names_the_cycle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_in_pylm() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_protocol_imports_only_the_errors() -> None:
    edges = graph()
    wrong = {
        f"{name} imports {target}"
        for name, targets in edges.items()
        if within(name, {"pylm.protocol"})
        for target in targets
        if not within(target, PROTOCOL_MAY_IMPORT | {"pylm.protocol"})
    }
    assert not wrong, sorted(wrong)


def test_lower_layers_import_no_server_client_or_cli_module() -> None:
    edges = graph()
    wrong = {
        f"{name} imports {target}"
        for name, targets in edges.items()
        if within(name, LOWER_LAYERS)
        for target in targets
        if within(target, (*SERVERS_AND_CLIENTS, "pylm.cli"))
    }
    assert not wrong, sorted(wrong)
