"""Shared fixtures: real servers on OS-chosen ports, stopped after each test."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
import zmq

from pylm.base import BaseServer

pytest_plugins = ["pytester"]  # for the tests of the pylm pytest plugin itself

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
    """A TCP endpoint the OS just reported free, for servers started late."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


@pytest.fixture
def raw_socket() -> Iterator[Callable[[int], zmq.Socket]]:
    """Plain zmq sockets for speaking (or mangling) the protocol by hand."""
    sockets: list[zmq.Socket] = []

    def make(kind: int) -> zmq.Socket:
        sock = zmq.Context.instance().socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 5000)
        sockets.append(sock)
        return sock

    yield make
    for sock in sockets:
        sock.close(linger=0)
