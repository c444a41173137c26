"""The cluster as a graph (pylm.registry.graph): from records, and printed
by ``pylm topology --dot`` and ``--mermaid`` for a running pipeline."""

from __future__ import annotations

import subprocess

from helpers import pylm_command
from servers import Last, Step

from pylm.registry import InstanceRecord, LocalEtcd, Registry
from pylm.registry.graph import Edge, Node, graph, to_dot, to_mermaid
from pylm.testing import wait_for


def record(name: str, kind: str, **wiring: object) -> InstanceRecord:
    return InstanceRecord(name, kind, {"pull": "tcp://127.0.0.1:1"}, **wiring)  # type: ignore[arg-type]


def test_nodes_and_edges_from_records() -> None:
    """Two instances of a stage make one node; next, branch and tee calls
    make edges; a target nobody runs is a node of kind '?'."""
    cluster = graph(
        [
            record("a", "chained", next="b.f", branches=["c.g"], tee=["audit.copy"]),
            record("b", "chained-last"),
            record("b", "chained-last"),
            record("c", "chained-last"),
        ]
    )
    assert cluster.nodes == [
        Node("a", "chained", 1),
        Node("b", "chained-last", 2),
        Node("c", "chained-last", 1),
        Node("audit", "?", 0),
    ]
    assert cluster.edges == [
        Edge("a", "b", "f", "next"),
        Edge("a", "c", "g", "branch"),
        Edge("a", "audit", "copy", "tee"),
    ]
    dot = to_dot(cluster)
    assert '"a" -> "b" [label="f", style=solid];' in dot
    assert '"a" -> "audit" [label="tee copy", style=dotted];' in dot
    mermaid = to_mermaid(cluster)
    assert mermaid.startswith("flowchart LR")
    assert "n0 -->|f| n1" in mermaid and "n0 -.->|branch g| n2" in mermaid


def test_a_master_has_an_edge_to_each_of_its_workers() -> None:
    """A worker's record names its master: an edge of role 'worker' from
    the master, drawn bold in DOT, '==>' in Mermaid, labelled 'jobs'."""
    cluster = graph(
        [
            record("pool", "master"),
            record("doer", "worker", master="pool"),
            record("doer", "worker", master="pool"),
            record("other", "worker", master="pool"),
        ]
    )
    assert cluster.edges == [
        Edge("pool", "doer", "", "worker"),
        Edge("pool", "other", "", "worker"),
    ]
    assert '"pool" -> "doer" [label="jobs", style=bold];' in to_dot(cluster)
    assert "n2 ==>|jobs| n0" in to_mermaid(cluster)


def test_pylm_topology_prints_the_running_pipeline(
    pylm_etcd: LocalEtcd, pylm_cluster: str, pylm_registry: Registry
) -> None:
    stages = [
        Last("last", registry=pylm_registry, log_stdout=False),
        Step("first", next_call="last.done", registry=pylm_registry, log_stdout=False),
    ]
    try:
        for stage in stages:
            stage.start(background=True)
        wait_for(lambda: len(pylm_registry.instances()) == 2, 20, "both stages listed")
        dot, mermaid = (
            subprocess.run(
                pylm_command(pylm_etcd, pylm_cluster, "topology", flag),
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
            for flag in ("--dot", "--mermaid")
        )
        assert dot.startswith("digraph pylm {")
        assert '"first" -> "last" [label="done", style=solid];' in dot
        assert '"last" [label="last\\nchained-last, 1 instance(s)"];' in dot
        assert "n0 -->|done| n1" in mermaid
    finally:
        for stage in reversed(stages):
            stage.stop()
