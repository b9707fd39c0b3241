"""Who a delivery is from: the broker login (AMQP ``user_id``) checked against what the message may be.

RabbitMQ refuses a publish whose ``user_id`` property is not the login of the connection, so the
``user_id`` a consumer receives is the identity the broker authenticated (the trust model: nothing
on the bus is trusted for what it says about itself; ``sender`` and the body are the publisher's
words). :func:`broker_identity` builds one :data:`~common.transport.rpc.Admission` check for every
dispatcher, deciding by the kind of operation:

* an API call (:class:`~common.messages.descriptor.ApiCall`) is admitted from any login that is
  neither the controller's nor an agent's (operators; what each may do is the roles' business);
* a report, heartbeat or delta (:class:`~common.messages.descriptor.Report`) only from the agent
  login of the host it is about: ``agent-<host>`` where ``<host>`` is the body's ``host_id`` *and*
  the routing key is ``<kind>.<host>`` (what the reports exchange routes; a message put straight
  into the reports queue through another exchange carries the queue's name instead);
* an agent command (:class:`~common.messages.descriptor.Command`) only from the controller login.

A delivery without ``user_id``, or whose login is not the one the message needs, raises
:class:`~common.errors.Unauthenticated` (dead-lettered, answered); an agent's or the controller's
login calling the API raises :class:`~common.errors.PermissionDenied` (answered): the login is
proven, it is just not a caller of the API.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from common.errors import InvalidRequest, PermissionDenied, Unauthenticated
from common.messages.descriptor import ApiCall, Command, Op, Report
from common.transport.port import Delivery
from common.transport.rpc import Admission
from common.transport.topology import report_routing_key

log = logging.getLogger(__name__)

#: The placeholder of the host id in :attr:`Logins.agent`.
HOST_PLACEHOLDER = "{host}"


@dataclass(frozen=True, slots=True)
class Logins:
    """The broker logins of the fleet's parties (``[security]`` in both configurations).

    ``controller``: the controller's login (every controller process shares it); ``agent``: the
    pattern of an agent's login, with ``{host}`` where the host id goes (``agent-{host}``, as
    deploy/rabbitmq/bootstrap.sh names them).
    """

    controller: str = "controller"
    agent: str = "agent-" + HOST_PLACEHOLDER

    def __post_init__(self) -> None:
        if not self.controller:
            raise InvalidRequest("[security] controller_login must not be empty")
        if self.agent.count(HOST_PLACEHOLDER) != 1:
            raise InvalidRequest(
                f"[security] agent_login must contain {HOST_PLACEHOLDER} exactly once, got {self.agent!r}"
            )
        if self.host_of(self.controller) is not None:
            raise InvalidRequest(
                f"[security] controller_login {self.controller!r} matches agent_login {self.agent!r}"
            )

    def agent_login(self, host_id: str) -> str:
        """The login of the agent of ``host_id``."""
        return self.agent.replace(HOST_PLACEHOLDER, host_id)

    def host_of(self, login: str) -> str | None:
        """The host whose agent ``login`` is, or None when it is no agent's login."""
        prefix, _, suffix = self.agent.partition(HOST_PLACEHOLDER)
        if len(login) <= len(prefix) + len(suffix) or not login.startswith(prefix):
            return None
        if suffix and not login.endswith(suffix):
            return None
        return login[len(prefix) : len(login) - len(suffix)]


def broker_identity(logins: Logins) -> Admission:
    """The admission check of who may send what (see the module docstring)."""

    def check(delivery: Delivery, op: Op[Any, Any]) -> None:
        login = delivery.user_id
        if not login:
            raise Unauthenticated(
                f"{op.kind} carries no user_id: the broker did not vouch for its sender",
                details={"kind": op.kind},
            )
        if isinstance(op, ApiCall):
            _check_caller(logins, login, op)
        elif isinstance(op, Report):
            _check_reporter(logins, login, op, delivery)
        elif isinstance(op, Command) and login != logins.controller:
            raise Unauthenticated(
                f"{op.kind} from login {login!r}: agents obey only the controller ({logins.controller!r})",
                details={"kind": op.kind, "login": login},
            )

    return check


def _check_caller(logins: Logins, login: str, op: Op[Any, Any]) -> None:
    if login == logins.controller or logins.host_of(login) is not None:
        raise PermissionDenied(
            f"{op.kind} from login {login!r}: the controller's and the agents' logins cannot call the API",
            details={"kind": op.kind, "login": login},
        )


def _check_reporter(logins: Logins, login: str, op: Op[Any, Any], delivery: Delivery) -> None:
    host = logins.host_of(login)
    claimed = delivery.envelope.body.get("host_id")
    if host is None or claimed != host or delivery.routing_key != report_routing_key(op.kind, host):
        raise Unauthenticated(
            f"{op.kind} about host {claimed!r} with routing key {delivery.routing_key!r} from login "
            f"{login!r}: a host reports only about itself, as {logins.agent_login(str(claimed))!r}, "
            "through the reports exchange",
            details={"kind": op.kind, "login": login},
        )


def identity_checks(logins: Logins, *, trust_broker_logins: bool) -> list[Admission]:
    """The admission checks a dispatcher gets: :func:`broker_identity`, or none (logged loudly)
    when ``trust_broker_logins`` is off -- the development mode of a broker whose every party
    logs in as one user (guest)."""
    if trust_broker_logins:
        return [broker_identity(logins)]
    log.warning(
        "SECURITY: [security] trust_broker_logins = false: NO identity check on the bus -- any "
        "login may call the API, command any agent and report for any host. Development only."
    )
    return []


__all__ = ["HOST_PLACEHOLDER", "Logins", "broker_identity", "identity_checks"]
