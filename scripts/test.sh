#!/usr/bin/env bash
# Installs pylm with its test dependencies and runs the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k standalone).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
"$PYTHON" -m pip install -q -e '.[test]'
# The registry tests run a real etcd: Debian's etcd-server, installed when missing.
if ! command -v etcd >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
    else
        echo "warning: no etcd on PATH and not root: install etcd-server for the registry tests" >&2
    fi
fi
exec "$PYTHON" -m pytest "$@"
