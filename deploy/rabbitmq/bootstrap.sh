#!/usr/bin/env bash
# Create (idempotently) the RabbitMQ vhost and users for virtfleet.
#
#   bootstrap.sh controller PASSWORD     vhost `virtfleet` + user `controller`
#   bootstrap.sh agent HOST PASSWORD     vhost `virtfleet` + user `agent-HOST`
#
# Run as root (or rabbitmq) on a broker node. Re-running updates the password
# and resets the permissions to what is below. Passwords are passed to
# rabbitmqctl on stdin, so they never show up in `ps`.
#
# Names (common/transport/topology.py):
#   exchanges  virtfleet.commands (direct, key = host id)
#              virtfleet.reports  (topic,  key = "<kind>.<host id>", e.g. host.report.HOST)
#              virtfleet.dlx      (fanout, dead letters) -> queue virtfleet.dead
#   queues     virtfleet.agent.<host>, virtfleet.api, virtfleet.controller.reports
#
# RabbitMQ permission model (AMQP 0-9-1), one regex each for configure/write/read,
# matched against exchange and queue names (anchor with ^...$!):
#   exchange.declare/delete       configure on the exchange
#   queue.declare/delete          configure on the queue
#     ... with x-dead-letter-exchange: also read on the queue, write on the DLX
#   queue.bind                    write on the queue, read on the exchange
#   basic.publish                 write on the exchange (the default exchange is "amq.default")
#   basic.consume / basic.get     read on the queue
# Topic permissions additionally restrict routing keys on topic exchanges.
#
# Controller user: everything in the vhost (configure/write/read '.*'). The
#   controller declares the shared topology (exchanges, DLX, virtfleet.dead,
#   API and reports queues).
#
# Agent user `agent-HOST` (HOST escaped for the regex, shown as HOST):
#   configure  ^virtfleet\.agent\.HOST$
#              only its own queue: it may (re)declare it, nothing else.
#   write      ^(virtfleet\.agent\.HOST|virtfleet\.reports|virtfleet\.dlx|amq\.default)$
#              virtfleet.agent.HOST  bind its queue (queue.bind needs write on the queue)
#              virtfleet.reports     publish reports
#              virtfleet.dlx         declare its queue with x-dead-letter-exchange=virtfleet.dlx
#              amq.default           publish RPC replies to the caller's reply_to queue
#   read       ^(virtfleet\.agent\.HOST|virtfleet\.commands)$
#              consume its own queue; bind it to virtfleet.commands
#   topic permissions on virtfleet.reports:
#              write ^.+\.HOST$ (may only publish reports keyed with its own host id)
#              read  ^$         (may not bind anything to the reports exchange)
# Consequences: an agent cannot read or delete another agent's queue, the API or
# reports queues, cannot publish commands (no write on virtfleet.commands), and
# cannot declare the shared exchanges: they must exist (the controller declares
# them) and the agent must not re-declare them non-passively.
# Known limit: write on amq.default (needed for replies) lets an agent publish
# to any queue by name through the default exchange; RabbitMQ checks only the
# exchange on publish. The controller must not trust commands/replies blindly.
set -euo pipefail

VHOST="virtfleet"
CONTROLLER_USER="controller"

usage() {
    echo "usage: $0 controller PASSWORD" >&2
    echo "       $0 agent HOST PASSWORD" >&2
    exit 2
}

ctl() { rabbitmqctl --quiet "$@"; }

ensure_vhost() {
    if ! ctl list_vhosts --silent name | grep -qxF "$VHOST"; then
        ctl add_vhost "$VHOST" >/dev/null
        echo "created vhost $VHOST"
    fi
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

# Escape regex metacharacters (host ids are [A-Za-z0-9._-], so only '.').
re_escape() { printf '%s' "$1" | sed 's/[].[^$\\*+?(){}|]/\\&/g'; }

case "${1:-}" in
controller)
    [[ $# -eq 2 && -n "$2" ]] || usage
    ensure_vhost
    ensure_user "$CONTROLLER_USER" "$2"
    ctl set_permissions -p "$VHOST" "$CONTROLLER_USER" '.*' '.*' '.*' >/dev/null
    echo "permissions of $CONTROLLER_USER on $VHOST: configure/write/read .*"
    ;;
agent)
    [[ $# -eq 3 && -n "$3" ]] || usage
    host="$2"
    [[ "$host" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || {
        echo "invalid host id: $host" >&2
        exit 2
    }
    user="agent-$host"
    h="$(re_escape "$host")"
    configure="^virtfleet\\.agent\\.${h}\$"
    write="^(virtfleet\\.agent\\.${h}|virtfleet\\.reports|virtfleet\\.dlx|amq\\.default)\$"
    read="^(virtfleet\\.agent\\.${h}|virtfleet\\.commands)\$"
    ensure_vhost
    ensure_user "$user" "$3"
    ctl set_permissions -p "$VHOST" "$user" "$configure" "$write" "$read" >/dev/null
    ctl set_topic_permissions -p "$VHOST" "$user" virtfleet.reports "^.+\\.${h}\$" '^$' >/dev/null
    echo "permissions of $user on $VHOST: configure $configure"
    echo "  write $write"
    echo "  read  $read"
    echo "  topic virtfleet.reports: write ^.+\\.${h}\$ read ^\$"
    ;;
*)
    usage
    ;;
esac
