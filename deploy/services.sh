#!/usr/bin/env bash
# Idempotent: start the services the test suite needs, each only if it is not
# running already, and wait until each one is ready. Run as root.
#
#   RabbitMQ    127.0.0.1:5672 (guest/guest, which RabbitMQ only accepts on loopback)
#   PostgreSQL  127.0.0.1:5432, database virtfleet_test (user postgres, trust auth)
#               (VIRTFLEET_PG_PORT / VIRTFLEET_PG_CLUSTER / VIRTFLEET_PG_DB override)
#   libvirtd    qemu:///system (plus virtlogd), QEMU/TCG guests; hugetlbfs
#               mounted at /dev/hugepages (2M) and /dev/hugepages1G (1G) first
#
# Everything binds to loopback. libvirt's `default` NAT network is never
# autostarted in the host network namespace (no virbr0, no iptables NAT).
# Prints one line per service: "already running" or "started (N s)".
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

if [[ $EUID -ne 0 ]]; then
    echo "services: must run as root" >&2
    exit 1
fi

PG_DB="${VIRTFLEET_PG_DB:-virtfleet_test}"
PG_PORT="${VIRTFLEET_PG_PORT:-5432}"
PG_CLUSTER="${VIRTFLEET_PG_CLUSTER:-main}"
# RABBITMQ_NODE_PORT / RABBITMQ_NODENAME are RabbitMQ's own variables; they are
# passed through to rabbitmq-server and rabbitmqctl unchanged.
AMQP_PORT="${RABBITMQ_NODE_PORT:-5672}"

now() { echo "${EPOCHREALTIME/,/.}"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
report() { printf '%-10s %s\n' "$1:" "$2"; }
die() {
    echo "services: $*" >&2
    exit 1
}

port_open() { # port_open HOST PORT
    timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
}

wait_port() { # wait_port HOST PORT SECONDS
    local deadline=$((SECONDS + $3))
    until port_open "$1" "$2"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# pid_alive PIDFILE NAME: the pid file names a live process called NAME
pid_alive() {
    local pid
    [[ -r "$1" ]] || return 1
    pid="$(<"$1")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2" ]]
}

# ------------------------------------------------------------------ RabbitMQ
start_rabbitmq() {
    if port_open 127.0.0.1 "$AMQP_PORT"; then
        report rabbitmq "already running"
        return
    fi
    command -v rabbitmq-server >/dev/null || die "rabbitmq-server not installed (run deploy/install.sh)"
    local t0
    t0="$(now)"
    # Loopback only: AMQP listener, Erlang distribution and epmd.
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        ERL_EPMD_ADDRESS=127.0.0.1 \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        rabbitmq-server -detached
    # -detached returns at once; `await_startup` fails fast ("node not running
    # at all") until the node has registered with epmd, so wait for the AMQP
    # port first (it opens near the end of boot, ~6 s cold).
    wait_port 127.0.0.1 "$AMQP_PORT" 90 || die "rabbitmq did not open 127.0.0.1:$AMQP_PORT (see /var/log/rabbitmq)"
    rabbitmqctl await_startup --timeout 60 >/dev/null || die "rabbitmq did not finish booting"
    # The default guest/guest user (loopback-only) is what the tests use.
    if ! rabbitmqctl authenticate_user guest guest >/dev/null 2>&1; then
        rabbitmqctl add_user guest guest >/dev/null 2>&1 || rabbitmqctl change_password guest guest >/dev/null
        rabbitmqctl set_user_tags guest administrator >/dev/null
        rabbitmqctl set_permissions -p / guest '.*' '.*' '.*' >/dev/null
    fi
    report rabbitmq "started ($(since "$t0") s)"
}

# ---------------------------------------------------------------- PostgreSQL
psql_pg() { psql -X -w -q -U postgres -h 127.0.0.1 -p "$PG_PORT" "$@"; }

start_postgres() {
    local t0 state="already running"
    t0="$(now)"
    if ! port_open 127.0.0.1 "$PG_PORT"; then
        command -v pg_ctlcluster >/dev/null || die "postgresql not installed (run deploy/install.sh)"
        local ver
        ver="$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n1)"
        [[ -n "$ver" ]] || die "no cluster under /etc/postgresql"
        pg_ctlcluster --skip-systemctl-redirect "$ver" "$PG_CLUSTER" start
        wait_port 127.0.0.1 "$PG_PORT" 30 || die "postgresql did not open 127.0.0.1:$PG_PORT"
        state="started"
    fi
    # Tests connect as postgres@127.0.0.1 without a password. A stock Debian
    # install uses scram there: add trust for loopback (this machine only).
    if ! psql_pg -d postgres -tAc 'SELECT 1' >/dev/null 2>&1; then
        local hba
        hba="$(runuser -u postgres -- psql -X -p "$PG_PORT" -tAc 'SHOW hba_file' 2>/dev/null || true)"
        [[ -n "$hba" && -w "$hba" ]] || die "cannot log in as postgres@127.0.0.1 and cannot find pg_hba.conf"
        sed -i '1i host all postgres 127.0.0.1/32 trust  # added by virtfleet deploy/services.sh\nhost all postgres ::1/128 trust  # added by virtfleet deploy/services.sh' "$hba"
        runuser -u postgres -- psql -X -q -p "$PG_PORT" -tAc 'SELECT pg_reload_conf()' >/dev/null
        sleep 0.5
        psql_pg -d postgres -tAc 'SELECT 1' >/dev/null || die "still cannot log in as postgres@127.0.0.1"
    fi
    if [[ "$(psql_pg -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" != 1 ]]; then
        psql_pg -d postgres -c "CREATE DATABASE \"$PG_DB\"" >/dev/null
        state="$state, created database $PG_DB"
    fi
    if [[ "$state" == started* ]]; then
        state="${state/started/started ($(since "$t0") s)}"
    fi
    report postgres "$state"
}

# ----------------------------------------------------------------- hugetlbfs
# libvirtd looks for hugetlbfs mounts once, when it starts: a guest with
# <memoryBacking><hugepages/> then fails with "hugetlbfs filesystem is not
# mounted or disabled by administrator config", even if the mount appeared
# later (checked on libvirt 9.0). So mount one hugetlbfs per page size the
# kernel offers *before* libvirtd starts, and restart a libvirtd that was
# already running when a mount had to be made (running guests survive that).
HUGETLBFS_NEW=0
mount_hugetlbfs() {
    local entry dir size kib
    for entry in /dev/hugepages:2M:2048 /dev/hugepages1G:1G:1048576; do
        IFS=: read -r dir size kib <<<"$entry"
        [[ -d /sys/kernel/mm/hugepages/hugepages-${kib}kB ]] || continue
        if ! findmnt -n -t hugetlbfs "$dir" >/dev/null 2>&1; then
            mkdir -p "$dir"
            mount -t hugetlbfs -o "pagesize=$size" hugetlbfs "$dir"
            HUGETLBFS_NEW=1
        fi
    done
}

# ------------------------------------------------------------------- libvirt
stop_libvirtd() {
    local pid
    pid="$(</run/libvirtd.pid)"
    kill -TERM "$pid"
    local deadline=$((SECONDS + 30))
    while [[ -d "/proc/$pid" ]]; do
        ((SECONDS < deadline)) || die "libvirtd ($pid) did not stop within 30 s"
        sleep 0.2
    done
}

start_libvirt() {
    [[ -x /usr/sbin/libvirtd ]] || die "libvirtd not installed (run deploy/install.sh)"
    # No udev here: /dev/kvm is root:root 0600. libvirt then re-probes QEMU on
    # every defineXML (30-40 s each). Give it what udev would.
    if [[ -c /dev/kvm ]] && getent group kvm >/dev/null; then
        chgrp kvm /dev/kvm
        chmod 660 /dev/kvm
    fi
    # Never let libvirtd bring up virbr0 + NAT + dnsmasq in the host namespace.
    rm -f /etc/libvirt/qemu/networks/autostart/default.xml

    local t0 started=0
    t0="$(now)"
    if ! pid_alive /run/virtlogd.pid virtlogd; then
        /usr/sbin/virtlogd -d
        started=1
    fi
    mount_hugetlbfs
    if ((HUGETLBFS_NEW)) && pid_alive /run/libvirtd.pid libvirtd; then
        stop_libvirtd # it cannot see the new hugetlbfs mount until it restarts
    fi
    if ! pid_alive /run/libvirtd.pid libvirtd; then
        /usr/sbin/libvirtd -d
        started=1
    fi
    local deadline=$((SECONDS + 90))
    until virsh -c qemu:///system version >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "libvirtd does not answer on qemu:///system (see /var/log/libvirt)"
        sleep 0.3
    done
    if ip link show virbr0 >/dev/null 2>&1; then
        echo "services: WARNING: virbr0 exists in the host network namespace" >&2
    fi
    if ((started)); then
        report libvirtd "started ($(since "$t0") s)"
    else
        report libvirtd "already running"
    fi
}

start_rabbitmq
start_postgres
start_libvirt
