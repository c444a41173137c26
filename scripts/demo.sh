#!/usr/bin/env bash
# Installs pylm and runs the examples end to end: standalone, then chained.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
"$PYTHON" -m pip install -q -e .
echo "== standalone: one server, a blocking and an asyncio client"
"$PYTHON" examples/standalone_single/demo.py
echo "== chained: step1 -> step2 -> last, and a LoopClient"
"$PYTHON" examples/chained_single/demo.py
