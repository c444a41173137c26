#!/usr/bin/env bash
# Installs pylm (and etcd when missing, as root) and runs the examples end to end:
# standalone, chained, and a registry-backed pipeline on a local etcd.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
"$PYTHON" -m pip install -q -e .
echo "== standalone: one server, a blocking and an asyncio client"
"$PYTHON" examples/standalone_single/demo.py
echo "== chained: step1 -> step2 -> last, and a LoopClient"
"$PYTHON" examples/chained_single/demo.py
echo "== parallel: a master, two workers and a client"
"$PYTHON" examples/parallel/demo.py
echo "== registry: the same pipeline, every stage started with only a name, on a local etcd"
if ! command -v etcd >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
fi
"$PYTHON" -m pylm.cli demo
