#!/usr/bin/env bash
# The mutation score of pylm's pure units: the wire codec (pylm/protocol.py),
# the registry record schema (pylm/registry/records.py) and the name rule
# (pylm/names.py), mutated by mutmut and checked by their fast unit tests only
# (no etcd, no server): see [tool.mutmut] in pyproject.toml for both lists.
#
#   scripts/mutmut.sh            # prints killed/total per module and in total
#
# From a fresh machine: makes its own venv (PYLM_MUTMUT_VENV, default
# $TMPDIR/pylm-mutmut-venv) with pylm's test and mutation extras, copies the
# tree (tracked and new, not ignored, files) to a temporary folder and runs
# mutmut there, so that nothing (mutmut's mutants/ folder) lands in the
# checkout. Exits 1 when the total is under PYLM_MUTMUT_MIN percent (90).
# Not part of the test command: 1515 mutants, 8 minutes on 2 cores from a
# fresh venv (19 while other tests ran). Hypothesis tests run PYLM_SOAK=0.25 of their examples here (the
# tables kill what they kill).
# A timeout counts as killed (the tests noticed: the mutant never finished).
# PYLM_MUTMUT_KEEP=1 keeps the folder, to look at a mutant with mutmut show.
#
# Mutants left alive that cannot change behaviour (equivalent), counted as not
# killed all the same (mutmut numbers them; these are what they change):
#   protocol.encode: default flags 1 (the PAYLOAD_FRAME bit, always set or
#     cleared by encode itself); "UTF-8" for "utf-8" (one codec, twice in protocol, once in
#     each to_json); decode_error: default size/limit 1 for 0 (both valid, and
#     the default is only validated, never used).
#   records: check_name(name, None) in _server_name (InvalidName's text is
#     replaced by MalformedRecord's); check_call without its field for "next"
#     (its default is "next"); parse_key's "XXXX" for "" as the rest of a key
#     outside /pylm/ (refused either way: no section is "XXXX"); sort_keys of a
#     StageConfig (one key); "XX@XX" for "@" in _metrics_url and "or" for
#     "and" in _host's brackets (what they would let through no caller passes
#     to them: _host_port and urlsplit refuse it first).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv=${PYLM_MUTMUT_VENV:-${TMPDIR:-/tmp}/pylm-mutmut-venv}
minimum=${PYLM_MUTMUT_MIN:-90}
children=${PYLM_MUTMUT_CHILDREN:-$(nproc)}

if [ ! -x "$venv/bin/mutmut" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
fi
"$venv/bin/pip" install -q -e "$root[test,mutation]"

work=$(mktemp -d "${TMPDIR:-/tmp}/pylm-mutmut.XXXXXX")
if [ -n "${PYLM_MUTMUT_KEEP:-}" ]; then
    echo "mutmut runs in $work (kept: mutmut show NAME there shows a mutant)"
else
    trap 'rm -rf "$work"' EXIT
fi
(cd "$root" && git ls-files -z --cached --others --exclude-standard) \
    | (cd "$root" && tar -c --null --ignore-failed-read -T - 2>/dev/null) | tar -x -C "$work"

cd "$work"
export PYLM_SOAK=${PYLM_SOAK:-0.25}
"$venv/bin/mutmut" run --max-children "$children" >"$work/run.log" 2>&1 || {
    tail -c 4000 "$work/run.log" | tr '\r' '\n' | tail -40
    echo "mutmut run failed" >&2
    exit 2
}

"$venv/bin/python" - "$minimum" <<'EOF'
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

from mutmut.stats import status_by_exit_code

minimum = float(sys.argv[1])
by_module: dict[str, Counter[str]] = defaultdict(Counter)
survivors: list[str] = []
for meta in sorted(Path("mutants").rglob("*.py.meta")):
    module = str(meta.relative_to("mutants"))[: -len(".meta")]
    for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
        status = status_by_exit_code[code]
        status = "killed" if status == "timeout" else status
        by_module[module][status] += 1
        if status != "killed":
            survivors.append(f"{status}: {name}")
total: Counter[str] = Counter()
print(f"{'module':<28} {'killed':>7} {'total':>6} {'score':>7}  other")
for module, counts in sorted(by_module.items()):
    total.update(counts)
    n = sum(counts.values())
    other = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "killed")
    print(f"{module:<28} {counts['killed']:>7} {n:>6} {100 * counts['killed'] / n:>6.1f}%  {other}")
n = sum(total.values())
score = 100 * total["killed"] / n if n else 0.0
print(f"{'total':<28} {total['killed']:>7} {n:>6} {score:>6.1f}%")
if survivors:
    print("\nnot killed (PYLM_MUTMUT_KEEP=1 keeps the folder, where mutmut show NAME shows one):")
    print("\n".join(f"  {line}" for line in survivors))
if score < minimum:
    print(f"\nmutation score {score:.1f}% is under {minimum:g}%", file=sys.stderr)
    sys.exit(1)
EOF
