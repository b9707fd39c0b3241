#!/usr/bin/env bash
# The project's test command (what CI runs via .ci/run). Run as root.
#
#   deploy/test.sh [PYTEST ARGS...]
#
# 1. deploy/install.sh            apt packages + .venv (fast when present)
# 2. deploy/services.sh           RabbitMQ, PostgreSQL, libvirtd (started if needed)
# 3. deploy/guest/build-guest.sh  the tiny QEMU test guest ($VIRTFLEET_TEST_GUEST_DIR)
# 4. ruff check, ruff format --check, mypy --strict, import directions (lint-imports)
# 5. two lanes at once (each pytest is one Python process: one of the two cores; every test that
#    uses the broker has a vhost and users of its own, every database test a database of its own):
#    a. pytest -m inprocess          the in-process tier, without a network, >= 80 % of controller/;
#       then the rest of tests/unit and tests/fuzz (pure: no broker, libvirtd or network);
#       then pytest -m "db and inprocess and not backend_neutral" against PostgreSQL (virtfleet_test);
#       then pytest -m security tests/security (live fleets on the broker and libvirt's test driver)
#    b. pytest -m "not inprocess and not security"  everything else (SQLite for the database tests);
#       then pytest -m "db and not inprocess and not backend_neutral" against PostgreSQL (after the
#       SQLite pass, not beside it: the same tests, the same qemu:///system domain names).
#    backend_neutral tests use the database only as storage (pyproject.toml): SQLite only.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

# libvirt runs QEMU as libvirt-qemu: the guest files must sit where it can
# read them, which rules out root's 0700 $HOME.
export VIRTFLEET_REQUIRE_QEMU=1
export VIRTFLEET_TEST_GUEST_DIR="${VIRTFLEET_TEST_GUEST_DIR:-/var/cache/virtfleet/guest}"
PG_URL="postgresql+psycopg://postgres@127.0.0.1:5432/virtfleet_test"
PY="$ROOT/.venv/bin/python"
LINT_PATHS=(controller agent common tests bench)
# Bytecode (and pytest's rewritten test modules) kept in __pycache__ (git ignores it) between the
# passes and the runs: without it each pytest pass compiles every module again, and so does each
# daemon and CLI a test starts (PYTHONDONTWRITEBYTECODE is set on some machines). Next to the
# sources, where the netlab guest (tests/realnet) finds what its fixture compiled for it.
unset PYTHONDONTWRITEBYTECODE PYTHONPYCACHEPREFIX

STEPS=()
CURRENT=""
#: the timing lines of the background lane's steps (a file: the lane is a subshell)
LANE_STEPS=""
T_START="${EPOCHREALTIME/,/.}"
LOG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/virtfleet-test.XXXXXX")"

elapsed() { awk -v a="$1" -v b="${EPOCHREALTIME/,/.}" 'BEGIN { printf "%.1f", b - a }'; }

summary() { # summary [RC]: the timing table (RC: the status the script ends with; default $?)
    local rc=${1:-$?}
    echo
    echo "==== deploy/test.sh timing ===="
    local s
    for s in "${STEPS[@]}"; do echo "  $s"; done
    if [[ -n "$LANE_STEPS" && -s "$LANE_STEPS" ]]; then
        sed 's/^/  /' "$LANE_STEPS"
    fi
    if [[ -n "$CURRENT" ]]; then
        echo "  $CURRENT: FAILED (rc=$rc)"
    fi
    echo "  total: $(elapsed "$T_START") s"
    rm -rf "$LOG_DIR"
}
trap summary EXIT

step() { # step NAME CMD...: run, time, record
    local name="$1" t0
    shift
    CURRENT="$name"
    echo "==== $name: $*"
    t0="${EPOCHREALTIME/,/.}"
    "$@"
    STEPS+=("$(printf '%-14s %6s s' "$name" "$(elapsed "$t0")")")
    CURRENT=""
}

lane_step() { # lane_step NAME CMD...: step, for the background lane (timings to $LANE_STEPS)
    local name="$1" t0 rc=0
    shift
    echo "==== $name: $*"
    t0="${EPOCHREALTIME/,/.}"
    "$@" || rc=$?
    if ((rc == 0)); then
        printf '%-14s %6s s  (in parallel)\n' "$name" "$(elapsed "$t0")" >>"$LANE_STEPS"
    else
        printf '%-14s FAILED (rc=%s) after %s s  (in parallel)\n' "$name" "$rc" "$(elapsed "$t0")" >>"$LANE_STEPS"
    fi
    return "$rc"
}

# pytest's closing line, e.g. "==== 12 passed, 1 skipped in 3.2s ====" (or, with -q,
# "12 passed, 1 skipped in 3.2s") -> the count of WORD
count() { # count WORD LOGFILE
    local line
    line="$(grep -E '^(=+ )?[0-9]+ [a-z]+.* in [0-9.]+s( \([0-9:]+\))?( =+)?$' "$2" 2>/dev/null | tail -n1 || true)"
    { grep -oE "[0-9]+ $1" <<<"$line" || true; } | awk '{ n += $1 } END { print n + 0 }'
}

step install bash deploy/install.sh
step services bash deploy/services.sh
step guest bash deploy/guest/build-guest.sh "$VIRTFLEET_TEST_GUEST_DIR"

step ruff-check "$ROOT/.venv/bin/ruff" check "${LINT_PATHS[@]}"
step ruff-format "$ROOT/.venv/bin/ruff" format --check "${LINT_PATHS[@]}"
step mypy "$ROOT/.venv/bin/mypy" --strict controller agent common tests
step import-lint "$ROOT/.venv/bin/lint-imports" --no-cache

run_pytest() { # run_pytest LOGFILE ARGS...: tee the output, keep pytest's rc
    local log="$1"
    shift
    "$PY" -m pytest "$@" 2>&1 | tee "$log"
}

# The in-process tier first (controller + agents over the shipped fakes + memory transport + SQLite
# + the CLI): it must need no broker, so it runs in a network namespace without even a loopback
# interface, and it must cover at least 80 % of controller/.
inprocess_pytest() {
    local isolate=()
    if [[ $EUID -eq 0 ]] && command -v unshare >/dev/null 2>&1; then
        isolate=(unshare --net)
    fi
    "${isolate[@]}" "$PY" -m pytest -m inprocess --cov=controller --cov-report=term \
        --cov-fail-under=80 --basetemp "$LOG_DIR/tmp-inprocess" tests "$@" >"$LOG_DIR/inprocess.log" 2>&1
}

# Only what can behave differently on PostgreSQL runs again there: a test marked backend_neutral
# uses the database only as storage (its subject is the bus, the agent or the CLI).
PG_MARKERS="db and not backend_neutral"
pg_pytest() { # pg_pytest LOGFILE MARKERS ARGS...: the db tests of MARKERS against PostgreSQL
    local log="$1" markers="$2" rc=0
    shift 2
    VIRTFLEET_DATABASE_URL="$PG_URL" "$PY" -m pytest -m "$PG_MARKERS and ($markers)" "$@" tests \
        >"$log" 2>&1 || rc=$?
    if ((rc == 5)); then
        # No test ran: fine only if tests exist and none of them is selected yet (pytest's closing
        # line says only how many it deselected).
        if grep -qE '^(=+ )?[0-9]+ deselected in [0-9.]+s' "$log"; then
            echo "pytest -m \"$PG_MARKERS and ($markers)\": no test selected; nothing to run against PostgreSQL"
            return 0
        fi
    fi
    return "$rc"
}

# Lane a, in the background; its output is shown when it ends. Nothing before the security tier needs
# the broker, libvirt or a network (the in-process fleet, the pure tests); the security tier's fleets
# use the broker with vhosts and users of their own and libvirt's test driver (in each agent process).
PURE=(tests/unit tests/fuzz)
lane_in_process() {
    lane_step inprocess inprocess_pytest "$@"
    lane_step pytest-pure run_pytest "$LOG_DIR/pure.log" -m "not inprocess and not security" \
        --basetemp "$LOG_DIR/tmp-pure" "${PURE[@]}" "$@" >/dev/null
    lane_step pytest-pg-inp pg_pytest "$LOG_DIR/pg-inprocess.log" inprocess --basetemp "$LOG_DIR/tmp-pg-inprocess"
    # Attacks on a live fleet with the users deploy/rabbitmq/bootstrap.sh makes (docs/security.md).
    lane_step security run_pytest "$LOG_DIR/security.log" -m security tests/security "$@" >/dev/null
}
LANE_STEPS="$LOG_DIR/lane.steps"
: >"$LANE_STEPS"
lane_in_process "$@" >"$LOG_DIR/lane.out" 2>&1 &
LANE_PID=$!

show_lane() { # the background lane's output, as if it had run in the foreground
    echo "==== in-process lane (ran in parallel with the steps above)"
    cat "$LOG_DIR/lane.out" "$LOG_DIR/inprocess.log"
    local f
    for f in pure pg-inprocess security; do
        if [[ -f "$LOG_DIR/$f.log" ]]; then cat "$LOG_DIR/$f.log"; fi
    done
    return 0
}
lane_rc=0
lane_wait() { wait "$LANE_PID" || lane_rc=$?; }
lane_exit() { # if lane b fails, still wait for lane a and show it before the summary
    local rc=$1
    lane_wait
    show_lane
    summary "$rc"
}
trap 'lane_exit $?' EXIT

step pytest run_pytest "$LOG_DIR/main.log" -m "not inprocess and not security" \
    "${PURE[@]/#/--ignore=}" tests "$@"

pg_processes() { # and tee: this one runs in the foreground
    local rc=0
    pg_pytest "$LOG_DIR/pg.log" "not inprocess" || rc=$?
    cat "$LOG_DIR/pg.log"
    return "$rc"
}
step pytest-pg pg_processes

CURRENT="in-process lane"
lane_wait
trap summary EXIT
show_lane
if ((lane_rc != 0)); then
    exit "$lane_rc"
fi
CURRENT=""

total() { # total WORD: summed over the six passes
    local n=0 f
    for f in inprocess pure main security pg-inprocess pg; do
        n=$((n + $(count "$1" "$LOG_DIR/$f.log")))
    done
    echo "$n"
}
passed=$(total passed)
failed=$(total failed)
skipped=$(total skipped)
trap - EXIT
summary
echo "tests: $passed passed, $failed failed, $skipped skipped"
