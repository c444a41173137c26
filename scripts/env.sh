# shellcheck shell=bash
# Sourced by scripts/test.sh and scripts/demo.sh (not run on its own), from
# the repository's root. Picks the Python that pylm is installed into and
# run with, and installs it there:
#
#   PYTHON, when set: that interpreter (CI passes its venv's python so);
#   else the active venv (VIRTUAL_ENV);
#   else the project's own venv .venv/, made when missing: a stock Debian
#   or Ubuntu Python is externally managed (PEP 668), and `sudo` drops an
#   activated venv, so pip never installs into the system's Python here.
#
# As root with apt-get, what is missing for that is installed (python3,
# python3-venv); otherwise a one-line error names the command. Every step
# says what it does on one line.

export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

say() { printf '%s\n' "$*"; }
fail() { printf 'error: %s\n' "$*" >&2; exit 1; }
can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }
# have PROGRAM: it is on PATH and runs (command -v alone also names a file that cannot run).
have() { local path; path=$(command -v "$1" 2>/dev/null) && [ -x "$path" ]; }

APT_UPDATED=""
# apt_install WHY PACKAGE...: install Debian packages (as root).
apt_install() {
    local why=$1
    shift
    if [ -z "$APT_UPDATED" ]; then
        say "updating apt's package lists (apt-get update)"
        apt-get update -qq
        APT_UPDATED=1
    fi
    say "installing $* with apt-get ($why)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# new_enough PYTHON: it runs and is 3.11 or newer.
new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

# make_venv: create .venv with the system's python3 unless a working one is there.
make_venv() {
    if [ -x .venv/bin/python ] && .venv/bin/python -c '' 2>/dev/null; then
        # A venv that runs is kept (it may be the user's own, say uv's, which has no pip);
        # one whose Python is gone (an upgrade removed it) is made anew below.
        new_enough .venv/bin/python || fail "the venv .venv has" \
            "$(.venv/bin/python --version 2>&1); pylm needs Python 3.11 or newer:" \
            "remove .venv (rm -rf .venv) for a new one, or set PYTHON"
        .venv/bin/python -m pip --version >/dev/null 2>&1 && return
        say "installing pip into .venv (python -m ensurepip)"
        .venv/bin/python -m ensurepip --upgrade >/dev/null \
            || fail ".venv has no pip and ensurepip could not install it: remove .venv" \
                "(rm -rf .venv) for a new one, or install pip into it"
        return
    fi
    if ! have python3; then
        can_apt || fail "no python3: install it with: sudo apt-get install python3 python3-venv"
        apt_install "to run pylm" python3 python3-venv
    fi
    new_enough python3 \
        || fail "pylm needs Python 3.11 or newer; python3 is $(python3 --version 2>&1)" \
            "(set PYTHON to a newer one)"
    rm -rf .venv
    say "creating the project venv .venv with $(python3 --version 2>&1) ($(command -v python3))"
    local output
    if ! output=$(python3 -m venv .venv 2>&1); then
        rm -rf .venv
        case "$output" in
            *ensurepip*) ;;  # Debian and Ubuntu ship venv's pip apart, in python3-venv
            *) printf '%s\n' "$output" >&2; fail "python3 -m venv .venv failed" ;;
        esac
        can_apt || fail "python3 cannot make a venv: install it with: sudo apt-get install" \
            "python3-venv (or activate a venv of your own, or set PYTHON)"
        apt_install "for python3 -m venv" python3-venv
        python3 -m venv .venv || { rm -rf .venv; fail "python3 -m venv .venv failed"; }
    fi
}

# use_python: set PY to the interpreter to use (making .venv when needed) and,
# when it is a venv's, put the venv's commands (pylm, etcd) first on PATH, as
# activating it does.
use_python() {
    if [ -n "${PYTHON:-}" ]; then
        PY=$PYTHON
        say "using PYTHON=$PYTHON"
    elif [ -n "${VIRTUAL_ENV:-}" ]; then
        PY=$VIRTUAL_ENV/bin/python
        say "using the active venv $VIRTUAL_ENV"
    else
        make_venv
        PY=$PWD/.venv/bin/python
        say "using the project venv .venv"
    fi
    "$PY" -c '' 2>/dev/null || fail "cannot run $PY"
    new_enough "$PY" || fail "pylm needs Python 3.11 or newer; $PY is $("$PY" --version 2>&1)" \
        "(activate a venv of a newer Python, or set PYTHON to one)"
    local scripts
    scripts=$("$PY" -c 'import sys, sysconfig
if sys.prefix != sys.base_prefix:
    print(sysconfig.get_path("scripts"))') || fail "cannot run $PY"
    if [ -n "$scripts" ]; then
        PATH="$scripts:$PATH"
        export PATH
    fi
}

# pip_install WHAT SPEC: pip install -e SPEC into PY; pip's own output is cut
# to the line naming what it installed (its errors and warnings all show).
pip_install() {
    say "installing $1: pip install -e '$2' (a minute the first time)"
    "$PY" -m pip install --progress-bar off -e "$2" | sed -n '/^Successfully installed/p'
}
