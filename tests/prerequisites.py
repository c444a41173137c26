"""Marks for tests that need a program pylm cannot install without root.

A test whose prerequisite is missing skips, its reason naming the command
that would install it; under ``CI=true`` it fails instead, so that a CI run
never passes by skipping what it should check. The rule is
:func:`pylm.testing.missing` (the ``pylm_etcd`` fixture follows it too);
the marks here apply it to a whole test, and tests that find out later
(the multi-host tests: :func:`netns.available`) call it themselves.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from typing import Any, TypeVar

from pylm.registry.local import ETCD_HINT, find_etcd
from pylm.telemetry.prometheus import PROMETHEUS_HINT, find_prometheus
from pylm.testing import missing

__all__ = [
    "missing",
    "needs_chromium",
    "needs_etcd",
    "needs_prometheus",
    "needs_wrk",
    "prometheus_problem",
    "requires",
]

T = TypeVar("T", bound=Callable[..., Any])


def requires(problem: str | None) -> Callable[[T], T]:
    """A decorator: the test runs when ``problem`` is None; else it skips
    with ``problem`` as its reason, or, under ``CI=true``, fails with it."""

    def mark(test: T) -> T:
        if problem is None:
            return test

        @functools.wraps(test)  # the same fixtures, so the same setup
        def unmet(*args: Any, **kwargs: Any) -> None:
            missing(problem)

        return unmet  # type: ignore[return-value]

    return mark


def prometheus_problem() -> str | None:
    """None when prometheus and promtool are on PATH, else what installs them."""
    if find_prometheus() is None or find_prometheus("promtool") is None:
        return f"needs prometheus and promtool on PATH: {PROMETHEUS_HINT}"
    return None


needs_prometheus = requires(prometheus_problem())
needs_etcd = requires(None if find_etcd() is not None else f"no etcd binary: {ETCD_HINT}")
needs_wrk = requires(None if shutil.which("wrk") else "needs wrk: sudo apt-get install wrk")
needs_chromium = requires(
    None if shutil.which("chromium") else "needs chromium: sudo apt-get install chromium"
)
