#!/usr/bin/env bash
# Idempotent installer for a fresh Debian 12 machine (run as root).
#
# - apt packages: installed only if missing; `apt-get update` only runs when
#   something is missing. PostgreSQL is installed only when nothing listens on
#   127.0.0.1:5432 already (some machines provide their own server).
# - Python: creates .venv at the repo root and runs `pip install -e '.[dev]'`
#   when pyproject.toml is newer than the stamp file .venv/.virtfleet-deps-stamp.
#
# Fast path (everything present): a few dpkg-query calls, well under a second.
# Note: the postinst message "invoke-rc.d: policy-rc.d denied execution of
# start." is normal on machines without systemd; deploy/services.sh starts the
# daemons by hand.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

log() { printf 'install: %s\n' "$*"; }

if [[ $EUID -ne 0 ]]; then
    echo "install: must run as root" >&2
    exit 1
fi

is_installed() {
    local status
    status="$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)"
    [[ "$status" == "install ok installed" ]]
}

port_open() { # port_open HOST PORT
    timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
}

PACKAGES=(
    rabbitmq-server
    libvirt-dev pkg-config
    libvirt-daemon-system libvirt-clients
    qemu-system-x86 qemu-utils
    dnsmasq-base
    iproute2 iputils-ping
)
# The guest build needs these (usually preinstalled on Debian anyway).
PACKAGES+=(gzip xz-utils)
# libvirt-python is an sdist: it needs a C compiler.
command -v gcc >/dev/null 2>&1 || PACKAGES+=(gcc)
if ! port_open 127.0.0.1 5432; then
    PACKAGES+=(postgresql)
fi
# services.sh needs psql to create the test database.
command -v psql >/dev/null 2>&1 || PACKAGES+=(postgresql-client)
# A bare Debian python3 lacks ensurepip/venv.
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    PACKAGES+=(python3-venv)
fi

missing=()
for p in "${PACKAGES[@]}"; do
    is_installed "$p" || missing+=("$p")
done

if ((${#missing[@]})); then
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
else
    log "apt packages: all present"
fi

# ---------------------------------------------------------------- python venv
VENV="$ROOT/.venv"
STAMP="$VENV/.virtfleet-deps-stamp"
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv $VENV"
    python3 -m venv "$VENV"
fi

if [[ ! -f "$ROOT/pyproject.toml" ]]; then
    : # nothing to install yet
elif [[ ! -f "$STAMP" || "$ROOT/pyproject.toml" -nt "$STAMP" ]]; then
    log "pip install -e '.[dev]'"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "${ROOT}[dev]"
    touch "$STAMP"
else
    log "python deps: up to date"
fi
