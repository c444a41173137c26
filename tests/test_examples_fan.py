"""The fan-out and fan-in examples (hub, sink, tee) run end to end as documented."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from prerequisites import needs_etcd

ROOT = Path(__file__).resolve().parent.parent


def demo_lines(example: str, *args: str) -> list[str]:
    """The output lines of ``examples/<example>/demo.py``, which must succeed."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / example / "demo.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()


def check_hub_results(lines: list[str]) -> dict[str, int]:
    """The ten squares, each once and through the last stage; jobs by worker."""
    results = [line for line in lines if line.startswith("Client got:  b'last got ")]
    pattern = re.compile(r"Client got:  b'last got (w1|w2): (\d) squared is (\d+)'")
    matches = [pattern.fullmatch(line) for line in results]
    assert all(matches), results
    numbers = [(int(m[2]), int(m[3])) for m in matches if m]
    assert numbers == [(n, n * n) for n in range(10)]
    (by_worker,) = [line for line in lines if line.startswith("Jobs by worker: ")]
    ran = dict(part.split(" ran ") for part in by_worker[len("Jobs by worker: ") :].split(", "))
    assert sum(int(count) for count in ran.values()) == 10
    for m in matches:
        assert m and int(ran[m[1]]) > 0
    error = "Client got an error: ValueError: invalid literal for int() with base 10: b'seven'"
    assert error in lines
    return {worker: int(count) for worker, count in ran.items()}


def test_hub_example_end_to_end() -> None:
    lines = demo_lines("hub")
    for name in ("w1", "w2"):
        assert any(
            line.endswith(f" - hub - INFO - hub: worker {name} joined (1 slots)") for line in lines
        )
    assert "Hub 'hub' has 2 worker(s)" in lines
    assert "Client with the following connections:" in lines
    ran = check_hub_results(lines)
    assert set(ran) == {"w1", "w2"}  # both workers were there before the jobs: both ran some
    # The failing job ran on a worker, which logged it.
    assert any(
        re.search(r" - w[12] - ERROR - function 'square' raised ValueError", line) for line in lines
    )


@needs_etcd
def test_hub_example_by_name_on_a_local_etcd() -> None:
    lines = demo_lines("hub", "--registry")
    assert lines[0].startswith("local etcd at etcd://127.0.0.1:")
    check_hub_results(lines)
    # What the scripts registered, as `pylm ls` shows it.
    assert "hub [hub] -> last.report  1 instance(s)" in lines
    assert "step [chained] -> hub.square  1 instance(s)" in lines
    assert "last [chained-last]  1 instance(s)" in lines
    assert "w1 [worker]  1 instance(s)" in lines
    assert "w2 [worker]  1 instance(s)" in lines
    assert any(line.startswith("    workers tcp://127.0.0.1:") for line in lines)


def test_sink_example_end_to_end() -> None:
    lines = demo_lines("sink")
    results = [line for line in lines if line.startswith("Client got:  b'sink: ")]
    expected = [
        f"Client got:  b'sink: {n} is even: {n} / 2 = {n // 2}'"
        if n % 2 == 0
        else f"Client got:  b'sink: {n} is odd: 3 * {n} + 1 = {3 * n + 1}'"
        for n in range(1, 9)
    ]
    assert results == expected
    # handle_stream's error went down the first branch to the sink, and on to the client.
    assert any(
        line.endswith(
            " - router - ERROR - function 'handle_stream' raised ValueError:"
            " invalid literal for int() with base 10: b'seven'"
        )
        for line in lines
    )
    assert (
        "Client got an error: ValueError: invalid literal for int() with base 10: b'seven'" in lines
    )
    # The second pipeline's client got its own results, and only those.
    assert [line for line in lines if line.startswith("Other client got: ")] == [
        "Other client got:  b'sink: FAN-IN'",
        "Other client got:  b'sink: HELLO'",
    ]
    assert "The sink answered 10 jobs" in lines


def test_tee_example_end_to_end() -> None:
    lines = demo_lines("tee")
    # The main line answers the client, every job, the truffles too.
    assert [line for line in lines if line.startswith("Client got: ")] == [
        "Client got:  b'receipt for 3 apples: 1.50'",
        "Client got:  b'receipt for 2 pears: 1.50'",
        "Client got:  b'receipt for 1 truffles: 120.00'",
        "Client got:  b'receipt for 10 apples: 5.00'",
        "Client got:  b'receipt for 4 pears: 3.00'",
    ]
    # The side branch failed on the truffles' copy: logged there, not sent to the client.
    warning = (
        " - audit - WARNING - audit: a job without a route failed: function 'check' on server"
        " 'audit' raised ValueError: 1 truffles: 120.00 is over the audit limit"
    )
    assert any(line.endswith(warning) for line in lines)
    assert not any("Client got an error" in line for line in lines)
    # The copies of the others reached the audit log's Sink, which kept them.
    start = lines.index("The audit log kept 4 copies:")
    assert lines[start + 1 : start + 5] == [
        "  audited 10 apples: 5.00",
        "  audited 2 pears: 1.50",
        "  audited 3 apples: 1.50",
        "  audited 4 pears: 3.00",
    ]


def test_scatter_example_end_to_end() -> None:
    from collections import Counter

    lines = demo_lines("scatter")
    for name in ("w1", "w2"):
        joined = f" - master - INFO - master: worker {name} joined (1 slots)"
        assert any(line.endswith(joined) for line in lines)
    # No gather: each line's result reached the client as it came, once, in any order.
    got = [line.split(" after ")[0] for line in lines if line.startswith("Client got:  ")]
    pattern = re.compile(r"""Client got:  b'(w1|w2) measured line (\d): (.*)'""")
    matches = [pattern.fullmatch(line) for line in got]
    assert all(matches), got
    parts = sorted((int(m[2]), m[3]) for m in matches if m)
    assert parts == [
        (1, '5 words, longest "master"'),
        (2, '4 words, longest "line"'),
        (3, '6 words, longest "worker"'),
        (4, '6 words, longest "result"'),
        (5, '6 words, longest "ready"'),
    ]
    assert "5 results for 5 lines" in lines
    (by_worker,) = [line for line in lines if line.startswith("Lines by worker: ")]
    ran = dict(part.split(" ran ") for part in by_worker[len("Lines by worker: ") :].split(", "))
    # Both workers were there before the job: both ran lines, as the results say.
    assert {w: int(n) for w, n in ran.items()} == Counter(m[1] for m in matches if m)
    assert set(ran) == {"w1", "w2"}


def test_gather_example_end_to_end() -> None:
    lines = demo_lines("gather")
    joined = " - master - INFO - master: worker worker1 joined (1 slots)"
    assert any(line.endswith(joined) for line in lines)
    got = [line.split(" after ")[0] for line in lines if line.startswith("Client got:  ")]
    assert got == [
        # eval(): the fridge's one output, its summary.
        "Client got:  b'fridge: 6 readings, mean 4.2, max 5.0'",
        # stream(): the boiler's alerts, as it went over 90 twice, then its summary.
        "Client got:  b'alert: boiler reading 4 is 93.0, over 90'",
        "Client got:  b'alert: boiler reading 9 is 92.0, over 90'",
        "Client got:  b'boiler: 10 readings, mean 86.0, max 97.0'",
    ]
    said = [line for line in lines if " - INFO - " not in line]  # not the servers' log lines
    assert said[-1] == "The boiler's stream ended after 3 items"
