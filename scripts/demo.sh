#!/usr/bin/env bash
# Installs pylm and runs the standalone example end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
"$PYTHON" -m pip install -q -e .
"$PYTHON" examples/standalone_single/demo.py
