#!/usr/bin/env bash
# The mutation check of docs/guarantees.md: applies each mutant of
# scripts/mutants/*.toml alone to a copy of the tree and runs the tests named
# for it, which must fail (see scripts/mutants.py). Installs pylm and its test
# dependencies first, as scripts/test.sh does (same Python rules).
# Usage: scripts/mutants.sh [--only ID ...] [--write-docs] [--no-baseline]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/env.sh
. scripts/env.sh
use_python
pip_install "pylm and its test dependencies" '.[test]'
say "running the mutants: python scripts/mutants.py $*"
exec "$PY" scripts/mutants.py "$@"
