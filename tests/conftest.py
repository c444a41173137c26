"""Shared fixtures: real servers on OS-chosen ports, stopped after each test."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
import zmq

from pylm.base import BaseServer
from pylm.processes import free_port
from pylm.registry import LocalEtcd

pytest_plugins = ["pytester"]  # for the tests of the pylm pytest plugin itself

LEFTOVER_WAIT = 10.0  # how long a test's threads and processes get to end after it
# multiprocessing's helpers, started once for the whole session at first use
SHARED_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")
# Processes of session-scoped fixtures: a test may be the first to ask for one
# (request.getfixturevalue), after the leftover check took its snapshot.
SHARED_PIDS: set[int] = set()

# The tests press Ctrl-C on the commands they start, as a terminal would. A
# shell that starts the test run in the background (``cmd &``, nohup) starts
# it with SIGINT ignored, which its children would inherit, and an ignored
# SIGINT is what a command run that way is meant to have: no Ctrl-C. Taking
# the default back here gives every child the terminal's default instead.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def pylm_etcd(pylm_etcd: LocalEtcd) -> LocalEtcd:
    """pylm.testing's session etcd, known to the leftover check as shared."""
    if pylm_etcd.pid is not None:
        SHARED_PIDS.add(pylm_etcd.pid)
    return pylm_etcd


def _descendants() -> dict[tuple[int, str], str]:
    """This process's living descendants, by (pid, start time) so that a
    reused pid is a new process, each with its command line."""
    parents: dict[int, list[tuple[int, str, str]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as cmd:
                command = cmd.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # ended meanwhile
        state, ppid, started = fields[0], int(fields[1]), fields[19]
        shared = int(entry) in SHARED_PIDS or any(helper in command for helper in SHARED_HELPERS)
        if state not in "ZX" and not shared:
            # (a zombie has ended: its Popen reaps it)
            parents.setdefault(ppid, []).append((int(entry), started, command))
    found: dict[tuple[int, str], str] = {}
    todo = [os.getpid()]
    while todo:
        for pid, started, command in parents.get(todo.pop(), []):
            found[(pid, started)] = command
            todo.append(pid)
    return found


def _watched_threads() -> set[threading.Thread]:
    """Threads that must not outlive their test: pylm's own (daemons, named
    pylm-*) and every non-daemon thread."""
    return {
        t
        for t in threading.enumerate()
        if t.is_alive() and (not t.daemon or t.name.startswith("pylm"))
    }


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """After each test, wait up to LEFTOVER_WAIT s for the threads and child
    processes it started to end; error the test, naming them, if any is left
    (and kill such processes, so that they harm no later test). What existed
    before the test (session and module fixtures' etcd, servers) is not
    counted: higher-scoped fixtures are set up before this one."""
    threads_before = _watched_threads()
    processes_before = set(_descendants())
    yield
    deadline = time.monotonic() + LEFTOVER_WAIT
    while True:
        threads = _watched_threads() - threads_before
        processes = {k: v for k, v in _descendants().items() if k not in processes_before}
        if (not threads and not processes) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for pid, _ in processes:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if threads or processes:
        named = [f"thread {t.name!r}" for t in sorted(threads, key=lambda t: t.name)]
        named += [f"process {pid}: {command}" for (pid, _), command in sorted(processes.items())]
        pytest.fail(f"left behind after {LEFTOVER_WAIT} s: " + "; ".join(named), pytrace=False)


S = TypeVar("S", bound=BaseServer)


@pytest.fixture
def serve() -> Iterator[Callable[[S], S]]:
    """Start a server in the background; it is stopped when the test ends."""
    started: list[BaseServer] = []

    def start(server: S) -> S:
        server.start(background=True)
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture
def ipc_address() -> Iterator[str]:
    """An ipc:// endpoint in a fresh directory (short: socket paths are limited)."""
    folder = tempfile.mkdtemp(prefix="pylm-")
    yield f"ipc://{folder}/s"
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def free_tcp_address() -> str:
    """A TCP endpoint free now, for servers started late (see pylm.processes.free_port)."""
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture
def raw_socket() -> Iterator[Callable[[int], zmq.Socket]]:
    """Plain zmq sockets for speaking (or mangling) the protocol by hand."""
    sockets: list[zmq.Socket] = []

    def make(kind: int) -> zmq.Socket:
        sock = zmq.Context.instance().socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 30_000)  # a bound for a failure only
        sockets.append(sock)
        return sock

    yield make
    for sock in sockets:
        sock.close(linger=0)
