#!/usr/bin/env bash
# The fault, outage, multi-host and fuzz tests in soak mode: each run
# PYLM_SOAK times longer (default 10: 100,000 jobs per SIGKILL run, etcd
# stopped 10 minutes, 10 partitions); the fuzz suite (tests/test_fuzz.py)
# gets PYLM_FUZZ_EXAMPLES inputs per port and family, by default 200 times
# the factor (2,000), and up to 60 s to minimise each failure; the registry
# record schema's generated records (tests/test_registry_schema.py) FACTOR
# times as many.
# Usage: scripts/soak.sh [FACTOR] [pytest arguments]. It runs them through
# scripts/test.sh, which installs what they need (and picks the Python).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYLM_SOAK="${1:-10}"
shift || true
export PYLM_FUZZ_EXAMPLES="${PYLM_FUZZ_EXAMPLES:-$(awk -v f="$PYLM_SOAK" 'BEGIN { print int(f * 200) }')}"
export PYLM_FUZZ_SHRINK_SECONDS="${PYLM_FUZZ_SHRINK_SECONDS:-60}"
exec bash scripts/test.sh tests/test_faults.py tests/test_outage.py \
    tests/test_multihost.py tests/test_fuzz.py tests/test_registry_schema.py "$@"
