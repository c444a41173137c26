"""The cluster as a graph, from its registry records: a node per server
name (its kind and how many instances), an edge per next stage, branch and
tee, and from a master (or hub) to each of its workers. Printed for
documents by ``pylm topology --dot`` (Graphviz) and ``--mermaid``; the same
:class:`Graph` serves anything that draws the cluster."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pylm.registry.records import InstanceRecord

__all__ = ["Edge", "Graph", "Node", "graph", "to_dot", "to_mermaid"]


@dataclass(frozen=True)
class Node:
    name: str
    kind: str
    instances: int


@dataclass(frozen=True)
class Edge:
    source: str  # a server's name
    target: str  # the server its results go to
    function: str  # the function called there
    role: str  # "next", "branch", "tee", or "worker" (a master's jobs: function "")


@dataclass(frozen=True)
class Graph:
    nodes: list[Node]
    edges: list[Edge]


def graph(records: Iterable[InstanceRecord]) -> Graph:
    """The servers of ``records`` and the calls between them; a target that
    no record names (not running) is a node of kind ``"?"`` and 0 instances."""
    groups: dict[str, list[InstanceRecord]] = {}
    for record in records:
        groups.setdefault(record.name, []).append(record)
    edges: list[Edge] = []
    for name, group in sorted(groups.items()):
        first = group[0]
        calls = [(first.next, "next")] if first.next else []
        calls += [(call, "branch") for call in first.branches]
        calls += [(call, "tee") for call in first.tee]
        for call, role in calls:
            target, _, function = call.rpartition(".")
            edges.append(Edge(name, target, function, role))
        if first.master is not None:  # its master sends it jobs
            edges.append(Edge(first.master, name, "", "worker"))
    nodes = [Node(name, group[0].kind, len(group)) for name, group in sorted(groups.items())]
    missing = sorted({edge.target for edge in edges} - set(groups))
    return Graph(nodes + [Node(name, "?", 0) for name in missing], edges)


def _label(edge: Edge) -> str:
    """What an edge says: the function a next stage gets, the role else."""
    if edge.role == "worker":
        return "jobs"
    return edge.function if edge.role == "next" else f"{edge.role} {edge.function}"


def _quoted(*lines: str) -> str:
    """A DOT string of ``lines`` (joined by DOT's own line break)."""
    escaped = (line.replace("\\", "\\\\").replace('"', '\\"') for line in lines)
    return '"' + "\\n".join(escaped) + '"'


def to_dot(cluster: Graph) -> str:
    """Graphviz's DOT: ``pylm topology --dot | dot -Tsvg > cluster.svg``."""
    styles = {"next": "solid", "branch": "dashed", "tee": "dotted", "worker": "bold"}
    lines = ["digraph pylm {", "  rankdir=LR;", "  node [shape=box];"]
    for node in cluster.nodes:
        label = _quoted(node.name, f"{node.kind}, {node.instances} instance(s)")
        lines.append(f"  {_quoted(node.name)} [label={label}];")
    for edge in cluster.edges:
        label = _quoted(_label(edge))
        lines.append(
            f"  {_quoted(edge.source)} -> {_quoted(edge.target)}"
            f" [label={label}, style={styles[edge.role]}];"
        )
    lines.append("}")
    return "\n".join(lines)


def to_mermaid(cluster: Graph) -> str:
    """A Mermaid flowchart, for Markdown that renders it."""
    ids = {node.name: f"n{number}" for number, node in enumerate(cluster.nodes)}
    lines = ["flowchart LR"]
    for node in cluster.nodes:
        text = f"{node.name}<br/>{node.kind}, {node.instances} instance(s)".replace('"', "'")
        lines.append(f'  {ids[node.name]}["{text}"]')
    arrows = {"next": "-->", "branch": "-.->", "tee": "-.->", "worker": "==>"}
    for edge in cluster.edges:
        label = _label(edge).replace('"', "'").replace("|", "/")
        lines.append(f"  {ids[edge.source]} {arrows[edge.role]}|{label}| {ids[edge.target]}")
    return "\n".join(lines)
