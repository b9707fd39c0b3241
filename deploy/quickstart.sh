#!/usr/bin/env bash
# virtfleet quickstart: a controller (SQLite) and three simulated hypervisors on this machine.
#
#   deploy/quickstart.sh          install what is missing, start everything, place some VMs
#   deploy/quickstart.sh stop     stop the controller and agents it started
#
# The hosts are libvirt's test driver with node files of three sizes
# (tests/fixtures/nodes/{small,medium,large}.xml), so nothing touches real VMs. State, logs
# and pid files live in .quickstart/ at the repository root. Run as root on Debian/Ubuntu.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
QS="$ROOT/.quickstart"
BIN="$ROOT/.venv/bin"
export VIRTFLEET_AMQP_URL="${VIRTFLEET_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2F}"
# Every process logs in as guest here: the development mode, with no identity check on the bus
# (docs/security.md). A deployment bootstraps one broker user per party instead.
export VIRTFLEET_TRUST_BROKER_LOGINS="${VIRTFLEET_TRUST_BROKER_LOGINS:-false}"
export COLUMNS="${COLUMNS:-120}"
HOSTS=(small medium large)

stop_all() {
    local pidfile pid
    for pidfile in "$QS"/*.pid; do
        [[ -e "$pidfile" ]] || continue
        pid="$(cat "$pidfile")"
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$pidfile"
    done
}

if [[ "${1:-}" == "stop" ]]; then
    stop_all
    echo "quickstart stopped (state kept in $QS)"
    exit 0
fi

echo "==> installing what is missing (deploy/install.sh)"
bash "$ROOT/deploy/install.sh"
echo "==> starting services that are not running (deploy/services.sh)"
bash "$ROOT/deploy/services.sh"

stop_all
rm -rf "$QS"
mkdir -p "$QS" "$QS/keys"
chmod 700 "$QS/keys"
cd "$QS"

# Signed messages (docs/security.md): a fleet master secret for the controller, and each host's
# own key file for the agent (0600; on real hosts the file is copied to each hypervisor).
echo "==> enrolling the hosts' signing keys ($QS/keys)"
"$BIN/virtfleet-controller" keys --master-key-file "$QS/master.key" init
"$BIN/virtfleet-controller" keys --master-key-file "$QS/master.key" enroll "${HOSTS[@]}" --out-dir "$QS/keys"

echo "==> starting the controller (database $QS/virtfleet.db)"
# The quickstart's one broker login (guest) may do everything; a deployment names each
# operator's login and role in [access.roles] of controller.toml (docs/security.md).
VIRTFLEET_DATABASE_URL="sqlite:///$QS/virtfleet.db" VIRTFLEET_MASTER_KEY_FILE="$QS/master.key" \
    VIRTFLEET_ACCESS_ROLES="${VIRTFLEET_ACCESS_ROLES:-guest=admin}" \
    nohup "$BIN/virtfleet-controller" --down-after 15 >"$QS/controller.log" 2>&1 &
echo $! >"$QS/controller.pid"

# One agent process serves the three simulated hosts (--host ID=URI, repeatable): each keeps
# its own queue, journal ($QS/agents/<host>), reports and libvirt connection.
host_args=()
for host in "${HOSTS[@]}"; do
    host_args+=(--host "$host=test://$ROOT/tests/fixtures/nodes/$host.xml")
done
echo "==> starting one agent for hosts ${HOSTS[*]} (libvirt test:///…/<host>.xml)"
nohup "$BIN/virtfleet-agent" "${host_args[@]}" \
    --state-dir "$QS/agents" --key-file "$QS/keys/{host}.key" --heartbeat-interval 2 --report-interval 10 \
    >"$QS/agent.log" 2>&1 &
echo $! >"$QS/agent.pid"

vf() { "$BIN/virtfleet" "$@"; }

echo "==> waiting for the three hosts to report"
for _ in $(seq 60); do
    up="$(vf --output json host list 2>/dev/null | "$BIN/python" -c \
        'import json,sys; print(sum(h["status"] == "up" for h in json.load(sys.stdin)["hosts"]))' 2>/dev/null || echo 0)"
    [[ "$up" == "3" ]] && break
    sleep 1
done
if [[ "${up:-0}" != "3" ]]; then
    echo "the hosts did not come up; logs are in $QS" >&2
    tail -n 20 "$QS"/*.log >&2
    exit 1
fi

vf host list

echo "==> creating VMs (the scheduler picks the host)"
vf vm create web-1 --vcpus 2 --memory 4096 --disk 20
vf vm create web-2 --vcpus 2 --memory 4096 --disk 20
vf vm create db-1 --vcpus 8 --memory 32768 --disk 200
vf vm create cache-1 --vcpus 1 --memory 2048 --disk 10 --host small
echo "==> a dry run shows the ranking without claiming anything"
vf vm create batch-1 --vcpus 4 --memory 8192 --disk 50 --dry-run
echo "==> a VM that fits nowhere is refused with the reason for every host"
vf vm create huge-1 --vcpus 4 --memory 262144 --disk 10 || true

echo "==> where they landed"
vf vm list
vf host list
echo
echo "Try: $BIN/virtfleet host show medium    |    $BIN/virtfleet --output json vm list"
echo "Stop with: deploy/quickstart.sh stop     (logs: $QS/*.log)"
