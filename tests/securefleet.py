"""A fleet on the real RabbitMQ as a deployment runs it: deploy/rabbitmq/bootstrap.sh makes a private
vhost, a controller user, one ``agent-<host>`` user per host and an operator, all named uniquely per
run (RabbitMQ users are global to the broker), with the identity checks on. Everything is deleted on
the way out. The tests of tests/security attack it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pika
from vfsupport import BROKER_HOST, BROKER_PORT, REPO, Fleet, fresh_database, node_uri

BOOTSTRAP = REPO / "deploy" / "rabbitmq" / "bootstrap.sh"


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
    )
    return done.stdout


@dataclass(frozen=True)
class BrokerUser:
    login: str
    password: str


@dataclass
class SecureBroker:
    """The vhost and users bootstrap.sh made; ``rogue`` adds an over-privileged user for the tests of
    what the consumers check when the broker lets a message through."""

    vhost: str
    controller: BrokerUser
    operator: BrokerUser
    agents: dict[str, BrokerUser] = field(default_factory=dict)
    extra_users: list[str] = field(default_factory=list)

    def url(self, user: BrokerUser) -> str:
        return (
            f"amqp://{quote(user.login, safe='')}:{quote(user.password, safe='')}@{BROKER_HOST}:{BROKER_PORT}/"
            f"{quote(self.vhost, safe='')}"
        )

    def bootstrap(self, *args: str, password: str) -> None:
        subprocess.run(
            ["bash", str(BOOTSTRAP), "--vhost", self.vhost, *args],
            check=True,
            capture_output=True,
            timeout=120,
            # The password on the environment, never on argv (bootstrap.sh reads it from there).
            env={
                **os.environ,
                "VIRTFLEET_BROKER_PASSWORD": password,
                "VIRTFLEET_CONTROLLER_LOGIN": self.controller.login,
            },
        )

    def rogue(self, login: str) -> BrokerUser:
        """A user named ``login`` with every permission in the vhost: a broker misconfigured so
        that only the consumers' identity checks stand between it and the fleet."""
        user = BrokerUser(login, secrets.token_hex(12))
        subprocess.run(
            ["rabbitmqctl", "-q", "add_user", login],
            input=user.password + "\n",
            text=True,
            check=True,
            timeout=60,
        )
        self.extra_users.append(login)
        rabbitmqctl("set_permissions", "-p", self.vhost, login, ".*", ".*", ".*")
        return user

    def queue(self, name: str) -> tuple[int, int]:
        """(messages, message bytes) of queue ``name``, as rabbitmqctl says."""
        for line in rabbitmqctl(
            "list_queues", "-p", self.vhost, "name", "messages", "message_bytes"
        ).splitlines():
            parts = line.split("\t")
            if parts[0] == name:
                return int(parts[1]), int(parts[2])
        raise AssertionError(f"no queue {name} in {self.vhost}")

    def channel(self, user: BrokerUser) -> Any:
        """A raw pika channel as ``user`` (an attacker uses a client of their own, not virtfleet's)."""
        conn = pika.BlockingConnection(pika.URLParameters(self.url(user)))
        ch = conn.channel()
        ch.confirm_delivery()
        return ch


@contextlib.contextmanager
def bootstrapped_broker(hosts: list[str]) -> Iterator[SecureBroker]:
    tag = uuid.uuid4().hex[:8]
    broker = SecureBroker(
        f"vfsec-{tag}",
        BrokerUser(f"vfsec-controller-{tag}", secrets.token_hex(12)),
        BrokerUser(f"vfsec-operator-{tag}", secrets.token_hex(12)),
    )
    try:
        broker.bootstrap("controller", password=broker.controller.password)
        broker.bootstrap("operator", broker.operator.login, password=broker.operator.password)
        for host in hosts:
            user = BrokerUser(f"agent-{host}", secrets.token_hex(12))
            broker.bootstrap("agent", host, password=user.password)
            broker.agents[host] = user
        yield broker
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            rabbitmqctl("delete_vhost", broker.vhost)
        users = [broker.controller.login, broker.operator.login, *(u.login for u in broker.agents.values())]
        for login in [*users, *broker.extra_users]:
            with contextlib.suppress(subprocess.CalledProcessError):
                rabbitmqctl("delete_user", login)


@contextlib.contextmanager
def secure_fleet(tmp: Path, agents: Mapping[str, str]) -> Iterator[tuple[Fleet, SecureBroker]]:
    """A controller and one agent per host (host id -> node file of tests/fixtures/nodes), each
    logging in as its bootstrapped user, the identity checks on; the CLI logs in as the operator."""
    with (
        bootstrapped_broker(list(agents)) as broker,
        fresh_database(tmp) as db,
        Fleet(tmp, broker.url(broker.operator), db) as fleet,
    ):
        checked = {"VIRTFLEET_TRUST_BROKER_LOGINS": "true"}
        controller_toml = tmp / "controller.toml"
        controller_toml.write_text(f'[security]\ncontroller_login = "{broker.controller.login}"\n')
        fleet.start_controller(
            "controller",
            "--config",
            str(controller_toml),
            env={
                **checked,
                "VIRTFLEET_AMQP_URL": broker.url(broker.controller),
                # the operator's login is the fleet's admin (access is closed to every other login)
                "VIRTFLEET_ACCESS_ROLES": f"{broker.operator.login}=admin",
            },
        )
        agent_toml = tmp / "agent.toml"
        agent_toml.write_text(f'[agent]\ncontroller_login = "{broker.controller.login}"\n')
        for host, node in agents.items():
            fleet.start_agent(
                host,
                node_uri(node),
                "--config",
                str(agent_toml),
                env={**checked, "VIRTFLEET_AMQP_URL": broker.url(broker.agents[host])},
            )
        fleet.wait_hosts(set(agents))
        yield fleet, broker
