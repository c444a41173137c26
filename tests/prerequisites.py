"""Skip marks for tests that need a program pylm cannot install without
root: each reason names the command that would install it."""

from __future__ import annotations

import pytest

from pylm.prometheus import PROMETHEUS_HINT, find_prometheus
from pylm.registry.local import ETCD_HINT, find_etcd

needs_prometheus = pytest.mark.skipif(
    find_prometheus() is None or find_prometheus("promtool") is None,
    reason=f"needs prometheus and promtool on PATH: {PROMETHEUS_HINT}",
)

needs_etcd = pytest.mark.skipif(find_etcd() is None, reason=f"no etcd binary: {ETCD_HINT}")
