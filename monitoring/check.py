"""Check the monitoring files: rules, config, dashboards and every PromQL expression in them.

    python3 monitoring/check.py                      # a throw-away Prometheus checks the syntax
    python3 monitoring/check.py --prometheus URL     # ... or a running one, which also tells
                                                     # which panels have no data

Needs ``promtool`` and ``prometheus`` on PATH (Debian: apt-get install prometheus) and PyYAML.
Grafana's placeholders are replaced before querying: ``$cluster``, ``$server`` and
``$function`` by ``.*``, ``$__rate_interval`` by ``1m``. Exit status 0 when all is well.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RULES = HERE / "prometheus" / "rules.yml"
CONFIG = HERE / "prometheus" / "prometheus.yml"
RULE_TESTS = HERE / "prometheus" / "rules_test.yml"
DASHBOARDS = sorted((HERE / "grafana" / "dashboards").glob("*.json"))
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SUBSTITUTES = {"cluster": ".*", "server": ".*", "function": ".*", "__rate_interval": "1m"}
PLACEHOLDER = re.compile(r"\$(\w+)|\$\{(\w+)\}")


def substitute(expr: str) -> str:
    return PLACEHOLDER.sub(lambda m: SUBSTITUTES[m.group(1) or m.group(2)], expr)


def placeholder_problems(expr: str) -> list[str]:
    problems = []
    for match in PLACEHOLDER.finditer(expr):
        name = match.group(1) or match.group(2)
        if name not in SUBSTITUTES:
            problems.append(f"placeholder ${name} is not one of {sorted(SUBSTITUTES)}")
        elif name != "__rate_interval" and not expr[: match.start()].endswith('=~"'):
            problems.append(f"${name} must follow =~ (a multi-value variable is a regex)")
    return problems


def dashboard_expressions(path: Path, problems: list[str]) -> Iterator[tuple[str, str, bool]]:
    """(where, expression, first target) of every target and query variable; problems found
    in the structure are appended to ``problems``."""
    board = json.loads(path.read_text())
    name = path.name
    if "__inputs" in board:
        problems.append(f"{name}: has __inputs")
    variables = {v["name"]: v for v in board.get("templating", {}).get("list", [])}
    source = variables.get("datasource")
    if source is None or source.get("type") != "datasource" or source.get("query") != "prometheus":
        problems.append(f"{name}: no datasource variable of type datasource, query prometheus")
    for variable in variables.values():
        if variable.get("type") != "query":
            continue
        if variable.get("datasource") != DATASOURCE:
            problems.append(f"{name}: variable {variable['name']} does not use ${{datasource}}")
        query = variable["query"]
        query = query["query"] if isinstance(query, dict) else query
        found = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query.strip())
        if found is None:
            problems.append(f"{name}: variable {variable['name']}: not label_values(...): {query}")
            continue
        selector, label = found.groups()
        yield f"{name} variable {variable['name']}", f"count by ({label}) ({selector})", False
    ids = set()
    panels = list(board["panels"])
    for panel in list(panels):
        panels.extend(panel.get("panels", []))  # a collapsed row keeps its panels
    for panel in panels:
        where = f"{name} panel {panel.get('id')} {panel.get('title')!r}"
        if panel.get("id") in ids:
            problems.append(f"{where}: id used twice")
        ids.add(panel.get("id"))
        if panel.get("type") == "row":  # a section header: no query
            continue
        if panel.get("datasource") != DATASOURCE:
            problems.append(f"{where}: panel data source is not ${{datasource}}")
        targets = panel.get("targets") or []
        if not targets or targets[0].get("refId") != "A":
            problems.append(f"{where}: the first target is not refId A")
        for index, target in enumerate(targets):
            if target.get("datasource") != DATASOURCE:
                problems.append(
                    f"{where} {target.get('refId')}: data source is not ${{datasource}}"
                )
            yield f"{where} {target.get('refId')}", target["expr"], index == 0


def rule_expressions() -> Iterator[tuple[str, str, bool]]:
    import yaml

    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            yield f"rules.yml {rule.get('alert') or rule.get('record')}", rule["expr"], False


def run(command: list[str]) -> bool:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    print(f"{' '.join(command)}: {'ok' if done.returncode == 0 else 'FAILED'}")
    if done.returncode != 0:
        print(done.stdout + done.stderr)
    return done.returncode == 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def query(url: str, expr: str) -> dict[str, Any]:
    address = f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(address, timeout=10) as answer:
            body: dict[str, Any] = json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read() or b"{}")
    return body


def check_expressions(url: str, expressions: list[tuple[str, str, bool]], live: bool) -> int:
    failures = 0
    for where, expr, first in expressions:
        body = query(url, substitute(expr))
        if body.get("status") != "success":
            failures += 1
            print(f"INVALID {where}: {body.get('error')}\n    {expr}")
        elif live and first and not body["data"]["result"]:
            print(f"no data {where}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--prometheus", help="a running Prometheus to query, e.g. http://h:9090")
    args = parser.parse_args()
    ok = all(
        [
            run(["promtool", "check", "config", str(CONFIG)]),
            run(["promtool", "check", "rules", str(RULES)]),
            run(["promtool", "test", "rules", str(RULE_TESTS)]),
        ]
    )
    problems: list[str] = []
    expressions = list(rule_expressions())
    for path in DASHBOARDS:
        expressions.extend(dashboard_expressions(path, problems))
    for where, expr, _ in expressions:
        problems.extend(f"{where}: {problem}" for problem in placeholder_problems(expr))
    for problem in problems:
        print(problem)
    if args.prometheus:
        failures = check_expressions(args.prometheus.rstrip("/"), expressions, live=True)
    else:
        failures = check_with_local_prometheus(expressions)
    print(f"{len(expressions)} expressions, {failures} invalid")
    return 0 if ok and not problems and not failures else 1


def check_with_local_prometheus(expressions: list[tuple[str, str, bool]]) -> int:
    binary = shutil.which("prometheus")
    if binary is None:
        print("no prometheus on PATH")
        return len(expressions)
    with tempfile.TemporaryDirectory(prefix="pylm-check-") as folder:
        config = Path(folder) / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 15s\n")
        url = f"http://127.0.0.1:{free_port()}"
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={Path(folder) / 'data'}",
                f"--web.listen-address={url.removeprefix('http://')}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while not _listening(url):
                if process.poll() is not None or time.monotonic() > deadline:
                    print("the throw-away prometheus did not start")
                    return len(expressions)
                time.sleep(0.2)
            return check_expressions(url, expressions, live=False)
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _listening(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
