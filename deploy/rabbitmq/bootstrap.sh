#!/usr/bin/env bash
# Create (idempotently) the RabbitMQ vhost and the least-privilege users of virtfleet.
#
#   bootstrap.sh [--vhost VHOST] [--password-file FILE] controller
#   bootstrap.sh [--vhost VHOST] [--password-file FILE] agent HOST
#   bootstrap.sh [--vhost VHOST] [--password-file FILE] operator NAME
#
# VHOST: --vhost, else $VIRTFLEET_VHOST, else `virtfleet` (tests use a private one).
# The password, never on a command line (ps shows every process's argv): the first line of
# --password-file FILE, else $VIRTFLEET_BROKER_PASSWORD, else one line read from stdin. It goes to
# rabbitmqctl on stdin too. (A trailing PASSWORD argument, the old form, still works, with a
# warning.) Users: `controller` (or $VIRTFLEET_CONTROLLER_LOGIN), `agent-HOST`, `NAME`.
#
# Run as root (or rabbitmq) on a broker node. Re-running updates the password and resets the
# permissions and limits to what is below. docs/security.md explains who trusts whom.
#
# Names (common/transport/topology.py):
#   exchanges  virtfleet.requests (direct, key = API queue name)     client -> controller
#              virtfleet.commands (direct, key = host id)             controller -> agent
#              virtfleet.reports  (topic,  key = "<kind>.<host id>")  agent -> controller
#              virtfleet.replies  (topic,  key = the caller's reply queue name)
#              virtfleet.dlx      (fanout, dead letters) -> queue virtfleet.dead
#   queues     virtfleet.api, virtfleet.api.read, virtfleet.controller.reports|heartbeats,
#              virtfleet.agent.<host>, virtfleet.reply.<login>.<hex> (a caller's, exclusive)
#
# RabbitMQ permission model (AMQP 0-9-1), one regex each for configure/write/read, matched
# against exchange and queue names (anchored here with ^...$):
#   exchange.declare/delete       configure on the exchange (a passive declare needs nothing)
#   queue.declare/delete          configure on the queue (a passive declare needs nothing)
#     ... with x-dead-letter-exchange: also read on the queue, write on the DLX
#   queue.bind                    write on the queue, read on the exchange
#                                 (+ topic permission "read" on the binding key, topic exchanges)
#   basic.publish                 write on the exchange (the default exchange is "amq.default")
#                                 (+ topic permission "write" on the routing key, topic exchanges)
#   basic.consume / basic.get     read on the queue
#
# controller: configure/write/read ^virtfleet\..*$ : it declares the shared topology, publishes
#   commands and replies, consumes the API and reports queues. No amq.default: nobody needs it.
# agent-HOST (HOST escaped for the regex, shown as H):
#   configure  ^virtfleet\.agent\.H$          only its own queue (the shared exchanges and
#                                              virtfleet.dead are checked passively)
#   write      ^(virtfleet\.agent\.H|virtfleet\.reports|virtfleet\.replies|virtfleet\.dlx)$
#              bind its queue; publish reports; publish replies; x-dead-letter-exchange
#   read       ^(virtfleet\.agent\.H|virtfleet\.commands)$   consume its queue, bind it
#   topic virtfleet.reports  write ^host\.[a-z_]+\.H$   only reports keyed with its own host id
#                            read  ^$
#   topic virtfleet.replies  write ^virtfleet\.reply\.CONTROLLER\.[0-9a-f]+$   it answers the
#                            controller only; read ^$
#   Consequences: no write on virtfleet.requests (cannot call the API), on virtfleet.commands
#   (cannot command a host) or amq.default (cannot put anything straight into a queue); the
#   controller still checks every report's login against its host (identity checks).
# operator NAME:
#   configure  ^virtfleet\.reply\.NAME\.[0-9a-f]+$   its own reply queues
#   write      ^(virtfleet\.requests|virtfleet\.reply\.NAME\.[0-9a-f]+)$   call the API, bind
#   read       ^(virtfleet\.replies|virtfleet\.reply\.NAME\.[0-9a-f]+)$    bind, consume replies
#   topic virtfleet.replies  read ^virtfleet\.reply\.NAME\.[0-9a-f]+$ (no one else's replies)
#                            write ^$
#   What each operator may do through the API is the controller's roles.
# Limits (rabbitmqctl set_user_limits): agents and operators get at most
#   $AGENT_MAX_CONNECTIONS / $OPERATOR_MAX_CONNECTIONS connections and
#   $AGENT_MAX_CHANNELS / $OPERATOR_MAX_CHANNELS channels (defaults below).
# Policy virtfleet-dead-letters on virtfleet.dead: max-length-bytes 64 MiB, overflow reject-publish.
# The broker's max_message_size (rabbitmq.conf) should be virtfleet's max_message_bytes:
#   max_message_size = 8388608
# This script checks it and warns; it cannot set it (a node setting, applied at restart).
set -euo pipefail

VHOST="${VIRTFLEET_VHOST:-virtfleet}"
CONTROLLER_USER="${VIRTFLEET_CONTROLLER_LOGIN:-controller}"
AGENT_MAX_CONNECTIONS="${AGENT_MAX_CONNECTIONS:-8}"
AGENT_MAX_CHANNELS="${AGENT_MAX_CHANNELS:-64}"
OPERATOR_MAX_CONNECTIONS="${OPERATOR_MAX_CONNECTIONS:-16}"
OPERATOR_MAX_CHANNELS="${OPERATOR_MAX_CHANNELS:-64}"
MAX_MESSAGE_BYTES=8388608
DEAD_LETTER_MAX_BYTES=67108864
PASSWORD_FILE=""

usage() {
    sed -n '3,6p' "$0" | sed 's/^# *//' >&2
    exit 2
}

ctl() { rabbitmqctl --quiet "$@"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
    --vhost) [[ $# -ge 2 && -n "$2" ]] || usage; VHOST="$2"; shift 2 ;;
    --password-file) [[ $# -ge 2 && -n "$2" ]] || usage; PASSWORD_FILE="$2"; shift 2 ;;
    -h | --help) usage ;;
    *) break ;;
    esac
done

# password [ARGV PASSWORD]: from the file, the environment, stdin (or the old argv form).
password() {
    local value=""
    if [[ -n "$PASSWORD_FILE" ]]; then
        IFS= read -r value <"$PASSWORD_FILE" || true
    elif [[ -n "${VIRTFLEET_BROKER_PASSWORD:-}" ]]; then
        value="$VIRTFLEET_BROKER_PASSWORD"
    elif [[ $# -ge 1 ]]; then
        echo "warning: a password on the command line is visible in ps; use --password-file," \
            "VIRTFLEET_BROKER_PASSWORD or stdin" >&2
        value="$1"
    else
        IFS= read -r value || true
    fi
    [[ -n "$value" ]] || { echo "no password given (--password-file, VIRTFLEET_BROKER_PASSWORD or stdin)" >&2; exit 2; }
    printf '%s' "$value"
}

ensure_vhost() {
    if ! ctl list_vhosts --silent name | grep -qxF "$VHOST"; then
        ctl add_vhost "$VHOST" >/dev/null
        echo "created vhost $VHOST"
    fi
}

# The dead-letter queue's byte cap (common/transport/topology.py DEAD_LETTER_POLICY): a policy, not a
# queue argument, so that every release declares virtfleet.dead alike (a changed argument would be
# refused with 406 during an upgrade); it applies to an existing queue at once, classic or quorum
# (every shared queue is a quorum queue: max-length-bytes and overflow reject-publish apply to both).
# In a cluster, vhosts, users, permissions and policies are cluster-wide: run this once, on any node.
ensure_policies() {
    ctl set_policy -p "$VHOST" --apply-to queues --priority 10 virtfleet-dead-letters '^virtfleet\.dead$' \
        "{\"max-length-bytes\": $DEAD_LETTER_MAX_BYTES, \"overflow\": \"reject-publish\"}" >/dev/null
}

ensure_user() { # ensure_user NAME PASSWORD
    if ctl list_users --silent | cut -f1 | grep -qxF "$1"; then
        printf '%s\n' "$2" | ctl change_password "$1" >/dev/null
        echo "updated password of $1"
    else
        printf '%s\n' "$2" | ctl add_user "$1" >/dev/null
        echo "created user $1"
    fi
}

limit_user() { # limit_user NAME MAX_CONNECTIONS MAX_CHANNELS
    ctl set_user_limits "$1" "{\"max-connections\": $2, \"max-channels\": $3}" >/dev/null
    echo "  limits: max-connections $2, max-channels $3"
}

check_max_message_size() {
    local size
    size="$(ctl eval 'application:get_env(rabbit, max_message_size).' 2>/dev/null | tr -dc '0-9')" || true
    if [[ -z "$size" || "$size" -gt "$MAX_MESSAGE_BYTES" ]]; then
        echo "warning: the broker's max_message_size is ${size:-unknown}; set max_message_size =" \
            "$MAX_MESSAGE_BYTES in rabbitmq.conf and restart the node (docs/security.md, Limits)" >&2
    fi
}

# Escape regex metacharacters (host ids and logins are [A-Za-z0-9._-], so only '.' matters).
re_escape() { printf '%s' "$1" | sed 's/[].[^$\\*+?(){}|]/\\&/g'; }

valid_name() { # valid_name WHAT VALUE
    [[ "$2" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || { echo "invalid $1: $2" >&2; exit 2; }
}

set_permissions() { # set_permissions USER CONFIGURE WRITE READ
    ctl set_permissions -p "$VHOST" "$1" "$2" "$3" "$4" >/dev/null
    echo "permissions of $1 on $VHOST:"
    echo "  configure $2"
    echo "  write     $3"
    echo "  read      $4"
}

set_topic() { # set_topic USER EXCHANGE WRITE READ
    ctl set_topic_permissions -p "$VHOST" "$1" "$2" "$3" "$4" >/dev/null
    echo "  topic $2: write $3 read $4"
}

valid_name vhost "$VHOST"
c="$(re_escape "$CONTROLLER_USER")"
case "${1:-}" in
controller)
    [[ $# -le 2 ]] || usage
    pass="$(password "${@:2}")"
    ensure_vhost
    ensure_policies
    ensure_user "$CONTROLLER_USER" "$pass"
    everything='^virtfleet\..*$'
    set_permissions "$CONTROLLER_USER" "$everything" "$everything" "$everything"
    check_max_message_size
    ;;
agent)
    [[ $# -ge 2 && $# -le 3 ]] || usage
    host="$2"
    valid_name "host id" "$host"
    pass="$(password "${@:3}")"
    user="agent-$host"
    h="$(re_escape "$host")"
    ensure_vhost
    ensure_policies
    ensure_user "$user" "$pass"
    set_permissions "$user" \
        "^virtfleet\\.agent\\.${h}\$" \
        "^(virtfleet\\.agent\\.${h}|virtfleet\\.reports|virtfleet\\.replies|virtfleet\\.dlx)\$" \
        "^(virtfleet\\.agent\\.${h}|virtfleet\\.commands)\$"
    set_topic "$user" virtfleet.reports "^host\\.[a-z_]+\\.${h}\$" '^$'
    set_topic "$user" virtfleet.replies "^virtfleet\\.reply\\.${c}\\.[0-9a-f]+\$" '^$'
    limit_user "$user" "$AGENT_MAX_CONNECTIONS" "$AGENT_MAX_CHANNELS"
    ;;
operator)
    [[ $# -ge 2 && $# -le 3 ]] || usage
    user="$2"
    valid_name "operator name" "$user"
    if [[ "$user" == "$CONTROLLER_USER" || "$user" == agent-* || "$user" == guest ]]; then
        echo "an operator cannot be named $user (the controller's, an agent's or the default login)" >&2
        exit 2
    fi
    pass="$(password "${@:3}")"
    o="$(re_escape "$user")"
    replies="virtfleet\\.reply\\.${o}\\.[0-9a-f]+"
    ensure_vhost
    ensure_policies
    ensure_user "$user" "$pass"
    set_permissions "$user" "^${replies}\$" "^(virtfleet\\.requests|${replies})\$" "^(virtfleet\\.replies|${replies})\$"
    set_topic "$user" virtfleet.replies '^$' "^${replies}\$"
    limit_user "$user" "$OPERATOR_MAX_CONNECTIONS" "$OPERATOR_MAX_CHANNELS"
    ;;
*)
    usage
    ;;
esac
