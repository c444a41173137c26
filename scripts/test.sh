#!/usr/bin/env bash
# Installs pylm with its test dependencies and runs the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k standalone).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
"$PYTHON" -m pip install -q -e '.[test]'
exec "$PYTHON" -m pytest "$@"
