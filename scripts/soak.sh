#!/usr/bin/env bash
# The fault, outage, multi-host and fuzz tests in soak mode: each run
# PYLM_SOAK times longer (default 10: 100,000 jobs per SIGKILL run, etcd
# stopped 10 minutes, 2,000 fuzz inputs per target, 10 partitions).
# Usage: scripts/soak.sh [FACTOR] [pytest arguments]; install first with
# scripts/test.sh (it installs pylm, etcd and Prometheus).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYLM_SOAK="${1:-10}"
shift || true
exec "${PYTHON:-python3}" -m pytest tests/test_faults.py tests/test_outage.py \
    tests/test_multihost.py tests/test_fuzz.py "$@"
