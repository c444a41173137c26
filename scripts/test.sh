#!/usr/bin/env bash
# Installs pylm with its test dependencies and runs the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k standalone).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
"$PYTHON" -m pip install -q -e '.[test]'
# The registry tests run a real etcd, the monitoring tests a real Prometheus:
# Debian's etcd-server and prometheus packages, installed when missing.
missing=""
command -v etcd >/dev/null 2>&1 || missing="$missing etcd-server"
command -v prometheus >/dev/null 2>&1 || missing="$missing prometheus"
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        # shellcheck disable=SC2086 # one word per package
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    else
        echo "warning: not root: install$missing for the registry and monitoring tests" >&2
    fi
fi
exec "$PYTHON" -m pytest "$@"
