#!/usr/bin/env bash
# The project's test command (what CI runs via .ci/run). Run as root.
#
#   deploy/test.sh [PYTEST ARGS...]
#
# 1. deploy/install.sh            apt packages + .venv (fast when present)
# 2. deploy/services.sh           RabbitMQ, PostgreSQL, libvirtd (started if needed)
# 3. deploy/guest/build-guest.sh  the tiny QEMU test guest ($VIRTFLEET_TEST_GUEST_DIR)
# 4. ruff check, ruff format --check, mypy --strict, import directions (lint-imports)
# 5. pytest -m inprocess          the in-process tier, without a network, >= 80 % of controller/
# 6. pytest -m "not inprocess"    everything else (SQLite for the database tests)
# 7. pytest -m "db and not backend_neutral" tests
#                                 again, against PostgreSQL (virtfleet_test), in-process tier included;
#                                 backend_neutral tests use the database only as storage (pyproject.toml)
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

STEPS=()
CURRENT=""
T_START="${EPOCHREALTIME/,/.}"
LOG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/virtfleet-test.XXXXXX")"

elapsed() { awk -v a="$1" -v b="${EPOCHREALTIME/,/.}" 'BEGIN { printf "%.1f", b - a }'; }

summary() {
    local rc=$?
    echo
    echo "==== deploy/test.sh timing ===="
    local s
    for s in "${STEPS[@]}"; do echo "  $s"; done
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
        --cov-fail-under=80 tests "$@" 2>&1 | tee "$LOG_DIR/inprocess.log"
}
step inprocess inprocess_pytest "$@"
step pytest run_pytest "$LOG_DIR/main.log" -m "not inprocess and not security" tests "$@"
# Attacks on a live fleet with the users deploy/rabbitmq/bootstrap.sh makes (docs/security.md).
step security run_pytest "$LOG_DIR/security.log" -m security tests/security "$@"

# Only what can behave differently on PostgreSQL runs again there: a test marked backend_neutral
# uses the database only as storage (its subject is the bus, the agent or the CLI).
PG_MARKERS="db and not backend_neutral"
pg_pytest() {
    local rc=0
    VIRTFLEET_DATABASE_URL="$PG_URL" run_pytest "$LOG_DIR/pg.log" -m "$PG_MARKERS" tests || rc=$?
    if ((rc == 5)); then
        # "No tests collected": fine only if tests exist and none is marked db yet.
        local collected
        collected="$("$PY" -m pytest --collect-only -q -m "$PG_MARKERS" tests 2>&1 || true)"
        if grep -qE 'no tests collected \([0-9]+ deselected\)' <<<"$collected"; then
            echo "pytest -m db: no test is marked db yet; nothing to run against PostgreSQL"
            return 0
        fi
    fi
    return "$rc"
}
step pytest-pg pg_pytest

total() { # total WORD: summed over the four passes
    echo $(($(count "$1" "$LOG_DIR/inprocess.log") + $(count "$1" "$LOG_DIR/main.log") + $(count "$1" "$LOG_DIR/security.log") + $(count "$1" "$LOG_DIR/pg.log")))
}
passed=$(total passed)
failed=$(total failed)
skipped=$(total skipped)
trap - EXIT
summary
echo "tests: $passed passed, $failed failed, $skipped skipped"
