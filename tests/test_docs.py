"""Every code block of README.md and docs/*.md runs as pasted.

For each document, its blocks run in order, each in a fresh process, in a
temporary folder that stands for the repository root (``examples``,
``monitoring`` and ``registry`` in it are links to the repository's own), with
the running interpreter as ``python`` and ``python3``, and the checkout's
``pylm`` command, first on PATH:

- ``python`` blocks are saved to a file and run with ``python3 FILE``;
- ``bash`` blocks (also ``sh``, ``shell``) run with ``set -e -o pipefail``;
  the shell variables a bash block sets are kept for the bash blocks after
  it, and what it exports for every block after it, as in the terminal a
  reader pastes them into;
- ``json`` blocks are parsed; blocks of any other language (none, ``promql``,
  ``toml``, ...) show output or data and are not run.

A block is marked by an HTML comment on the line right before its fence.
GitHub shows nothing of it, so the text around the block tells the reader
what the comment tells the test ("in a second terminal", "save it as
``server.py``"). The comment holds ``key: value`` items separated by ``;``
(a ``;`` followed by no known key belongs to the reason of ``fragment`` or
``skip``):

- ``fragment`` (or ``fragment: why``): not run. A piece of a larger program,
  alternatives to pick from, or a command too long for a test (the whole
  test suite).
- ``skip: why``: runs as pasted, but not in this test, for the reason given
  (it installs software, or takes minutes: another test or script runs it).
- ``file: NAME``: the block is saved as NAME in the folder, for later blocks
  to import or run; without ``run`` it is only saved, with ``run`` it is
  saved and run as ``python3 NAME``.
- ``run: background``: started and left running, as a server in a terminal
  of its own (``run: foreground``, the default, waits for it to end). It
  must still be running when the document ends (a server that crashed fails
  the test); then its whole process group is stopped.
  Every other block must end, with status 0, within ``timeout`` seconds
  (default 30); processes it left in the background (``cmd &``) are stopped
  at the end of the document too.
- ``ready: CONDITION, ...``: after starting the block, wait (up to 20 s) until
  each ``port N`` is listening, ``name N`` has an instance in the registry,
  and ``output TEXT`` is in the block's output.
- ``expect: TEXT``: the block's output (stdout and stderr) must contain TEXT.
- ``setup: etcd``: a block that starts a local etcd and sets
  ``PYLM_REGISTRY`` (``pylm etcd &``) is not run; the test runs an etcd of its
  own on free ports instead and gives every block of the document
  ``PYLM_REGISTRY`` and a ``PYLM_CLUSTER`` of the document's own.
  ``needs: etcd`` does the same for a document without such a block.
- ``needs: prometheus``: when the ``prometheus`` binary is missing the block is
  not run, and the document's test is reported as skipped (after running all
  its other blocks), naming the command that installs it.

Ports: blocks name fixed ports (``tcp://127.0.0.1:5555``) to be readable. The
test replaces every port written ``127.0.0.1:N``, ``localhost:N``,
``--port N`` or ``ready: port N`` (N not 0) by a free port the OS gives, the
same one for the same N throughout a document; 2379, etcd's usual port,
becomes the port of the test's etcd.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pylm.processes import free_port
from pylm.registry import Registry
from pylm.testing import missing

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("docs/*.md"))]
LINKED = ("examples", "monitoring", "registry")  # repository folders blocks may name
RUN = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
KEYS = {"fragment", "skip", "file", "run", "ready", "expect", "setup", "needs", "timeout"}
READY_WITHIN = 20.0
FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
DIRECTIVE = re.compile(r"^\s*<!--(.*)-->\s*$")
PORT = re.compile(r"(?<=127\.0\.0\.1:)(\d+)|(?<=localhost:)(\d+)|(?<=--port[ =])(\d+)")


@dataclass
class Block:
    document: str
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    marks: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.document}:{self.line}"


def parse_marks(text: str, where: str) -> dict[str, str]:
    """``key: value; key: value``; a ``;`` not followed by a known key is
    part of the value before it (a reason may hold one)."""
    marks: dict[str, str] = {}
    key = None
    for part in text.split(";"):
        name = part.partition(":")[0].strip()
        if name in KEYS:
            key = name
            marks[key] = part.partition(":")[2].strip()
        elif key is not None and key in ("fragment", "skip"):
            marks[key] += ";" + part.rstrip()
        elif part.strip():
            raise ValueError(f"{where}: unknown mark {name!r} (known: {', '.join(sorted(KEYS))})")
    return marks


def blocks(document: str) -> list[Block]:
    """The fenced blocks of ``document``, with the marks of the comment before each."""
    lines = (ROOT / document).read_text().splitlines()
    found = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, language = opening.group(1), opening.group(2).lower()
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        body = [
            line[len(indent) :] if line.startswith(indent) else line
            for line in lines[index + 1 : end]
        ]
        where = f"{document}:{index + 1}"
        comment = DIRECTIVE.match(lines[index - 1]) if index > 0 else None
        marks = parse_marks(comment.group(1), where) if comment else {}
        found.append(Block(document, index + 1, language, "\n".join(body) + "\n", marks))
        index = end + 1
    return found


def listening(port: int) -> bool:
    """Whether a TCP socket listens on ``port`` (read from /proc: no connection is made)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


class Session:
    """One document's run: its folder, environment, ports and processes."""

    def __init__(self, folder: Path, etcd_url: str | None, cluster: str | None) -> None:
        self.folder = folder
        self.ports: dict[int, int] = {}
        self.background: list[tuple[Block, subprocess.Popen[bytes], Path]] = []
        self.groups: list[subprocess.Popen[bytes]] = []
        self.registry: Registry | None = None
        bin_dir = folder / ".bin"
        bin_dir.mkdir()
        # Scripts, not symlinks: a venv's python is a venv's only when run by its own path.
        for name, command in (("python", ""), ("python3", ""), ("pylm", " -m pylm")):
            shim = bin_dir / name  # pylm: what the installed console script runs
            shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)}{command} "$@"\n')
            shim.chmod(0o755)
        path = os.pathsep.join([str(bin_dir), os.environ["PATH"]])
        # the checkout's pylm, as if installed (and not another installed copy)
        self.env = {**os.environ, "PATH": path, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        if etcd_url is not None:
            port = int(etcd_url.rsplit(":", 1)[1])
            self.ports[2379] = port
            self.env.update(PYLM_REGISTRY=etcd_url, PYLM_CLUSTER=str(cluster))
        for name in LINKED:
            (folder / name).symlink_to(ROOT / name)
        self.count = 0

    def port(self, written: int) -> int:
        """The free port that stands for port ``written`` of the document."""
        if written == 0:
            return 0
        if written not in self.ports:
            self.ports[written] = free_port()
        return self.ports[written]

    def substitute(self, text: str) -> str:
        return PORT.sub(lambda match: str(self.port(int(match.group(0)))), text)

    def save(self, block: Block) -> None:
        (self.folder / block.marks["file"]).write_text(self.substitute(block.code))

    def start(self, block: Block) -> tuple[subprocess.Popen[bytes], Path]:
        self.count += 1
        code = self.substitute(block.code)
        output = self.folder / f".out-{self.count}"
        if RUN[block.language] == "python":
            script = self.folder / (block.marks.get("file") or f".block-{self.count}.py")
            script.write_text(code)
            command = [sys.executable, script.name]
        else:  # the shell's variables from the bash block before, as in one terminal
            envfile = shlex.quote(str(self.folder / f".env-{self.count}"))
            shell = shlex.quote(str(self.folder / ".shell"))
            prelude = (
                f"[ -f {shell} ] && source {shell} 2>/dev/null\n"
                f"_docs_keep() {{ declare -p | grep -Ev '^declare -[a-zA-Z]*r' > {shell};"
                f" env -0 > {envfile}; }}\n"
                "trap _docs_keep EXIT\nset -e -o pipefail\n"
            )
            command = ["bash", "-c", prelude + code]
        with output.open("wb") as sink:  # a file, not a pipe: `cmd &` children keep it open
            process = subprocess.Popen(
                command, cwd=self.folder, env=self.env, stdout=sink, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        self.groups.append(process)
        return process, output

    def keep_exports(self) -> None:
        """Take the environment the last bash block left, as a terminal would."""
        envfile = self.folder / f".env-{self.count}"
        if envfile.exists():
            pairs = (item.partition("=") for item in envfile.read_text().split("\0") if item)
            kept = {key: value for key, _, value in pairs if not key.startswith("BASH_")}
            for key in ("PWD", "OLDPWD", "SHLVL", "_"):
                kept.pop(key, None)
            self.env = {**self.env, **kept}

    def wait_ready(self, block: Block, process: subprocess.Popen[bytes], output: Path) -> None:
        conditions = [c.strip() for c in block.marks["ready"].split(",")]
        deadline = time.monotonic() + READY_WITHIN
        for condition in conditions:
            kind, _, value = condition.partition(" ")
            while not self.holds(kind, value.strip(), output):
                if process.poll() not in (None, 0):
                    self.fail(block, output, f"ended with status {process.returncode}")
                if time.monotonic() > deadline:
                    self.fail(block, output, f"not ready within {READY_WITHIN:g} s: {condition}")
                time.sleep(0.05)

    def holds(self, kind: str, value: str, output: Path) -> bool:
        if kind == "port":
            return listening(self.port(int(value)))
        if kind == "output":
            return value in output.read_text(errors="replace")
        if kind == "name":
            assert self.registry is not None, "`ready: name` needs etcd: `needs: etcd`"
            return bool(self.registry.instances(value))
        raise ValueError(f"unknown ready condition {kind!r}")

    def fail(self, block: Block, output: Path, why: str) -> None:
        text = output.read_text(errors="replace")[-4000:]
        pytest.fail(f"{block.where} ({block.language}) {why}\n{block.code}--- output:\n{text}")

    def run(self, block: Block) -> None:
        began = time.monotonic()
        try:
            self._run(block)
        finally:  # shown with a failure, or with pytest -s
            print(f"{block.where}: {time.monotonic() - began:.2f} s")

    def _run(self, block: Block) -> None:
        process, output = self.start(block)
        if block.marks.get("run") == "background":
            self.background.append((block, process, output))
        else:
            timeout = float(block.marks.get("timeout") or 30)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.fail(block, output, f"did not end within {timeout:g} s")
            if process.returncode != 0:
                self.fail(block, output, f"ended with status {process.returncode}")
            self.keep_exports()
        if "ready" in block.marks:
            self.wait_ready(block, process, output)
        if "expect" in block.marks:
            text = output.read_text(errors="replace")
            if block.marks["expect"] not in text:
                self.fail(block, output, f"printed no {block.marks['expect']!r}")

    def check_background(self) -> None:
        """A background block still runs (a bash one may have ended, well,
        after starting its commands with ``&``)."""
        for block, process, output in self.background:
            status = process.poll()
            if status is not None and (status != 0 or RUN[block.language] == "python"):
                self.fail(block, output, f"ended early, with status {status}")

    def close(self) -> None:
        for process in reversed(self.groups):
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 10
        for process in self.groups:
            while time.monotonic() < deadline:
                try:
                    os.killpg(process.pid, 0)
                except ProcessLookupError:
                    break
                process.poll()  # reap the leader, so that the group can empty
                time.sleep(0.05)
            else:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.poll()


def needs_etcd(found: list[Block]) -> bool:
    return any(b.marks.get("setup") == "etcd" or b.marks.get("needs") == "etcd" for b in found)


def test_marks_are_well_formed() -> None:
    """Every mark of every document means something to the test (a typo
    would silently change what runs), and only blocks that run carry marks."""
    for document in DOCUMENTS:
        for block in blocks(document):  # unknown keys raise here
            marks, where = block.marks, block.where
            assert marks.get("run", "background") in ("background", "foreground"), where
            assert marks.get("needs", "etcd") in ("etcd", "prometheus"), where
            assert marks.get("setup", "etcd") == "etcd", where
            assert not ("expect" in marks and marks.get("run") == "background"), (
                f"{where}: a background block has no output to expect yet: `ready: output ...`"
            )
            for condition in filter(None, marks.get("ready", "").split(",")):
                kind, _, value = condition.strip().partition(" ")
                assert kind in ("port", "name", "output") and value, f"{where}: {condition!r}"
            if block.language not in RUN and block.language != "json":
                assert not marks, f"{where}: marks on a block that is not run"


@pytest.fixture
def session(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Session, list[Block]]]:
    document = request.param
    found = blocks(document)
    etcd_url = cluster = None
    registry = None
    if needs_etcd(found):
        registry = request.getfixturevalue("pylm_registry")
        etcd_url = request.getfixturevalue("pylm_etcd").url
        cluster = request.getfixturevalue("pylm_cluster")
    runner = Session(tmp_path, etcd_url, cluster)
    runner.registry = registry
    try:
        yield runner, found
    finally:
        runner.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("session", DOCUMENTS, indirect=True, ids=DOCUMENTS)
def test_document_blocks_run_as_pasted(session: tuple[Session, list[Block]]) -> None:
    runner, found = session
    skipped = []
    for block in found:
        if block.language == "json" and "fragment" not in block.marks:
            try:
                json.loads(block.code)
            except ValueError as error:
                pytest.fail(f"{block.where}: not JSON: {error}")
            continue
        if block.language not in RUN or {"fragment", "skip", "setup"} & block.marks.keys():
            continue
        if block.marks.get("needs") == "prometheus" and not _have_prometheus():
            skipped.append(block.where)
            continue
        if "file" in block.marks and "run" not in block.marks:
            runner.save(block)
            continue
        runner.run(block)
    runner.check_background()
    if skipped:
        from pylm.telemetry.prometheus import PROMETHEUS_HINT

        missing(f"blocks {', '.join(skipped)} need prometheus ({PROMETHEUS_HINT})")


def _have_prometheus() -> bool:
    from pylm.telemetry.prometheus import find_prometheus

    return find_prometheus() is not None
