"""Roles, the audit log, rate limits and the VNC password at rest, through the CLI as people run it.

The broker login is the memory broker's ``user`` of the CLI's connection (``fleet.cli(...,
login=...)``): what RabbitMQ authenticates and puts in ``user_id``. The fleet's logins: ``guest``
(admin, the harness), ``olga`` (operator), ``rita`` (reader); ``mallory`` has no role.
Run on SQLite and on PostgreSQL (marker ``db``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from inproc import HARNESS_LOGIN, HostShape, InProcessFleet, inprocess_fleet

from common.messages import api, network
from common.messages.audit import API_AUDIT_LIST
from common.messages.descriptor import Role
from common.messages.vmops import API_VM_EXPORT_SECURE
from common.transport.rpc import request, unwrap
from common.transport.topology import DEFAULT_EXCHANGE, api_queue
from controller.config import AccessConfig

ROLES = {HARNESS_LOGIN: Role.ADMIN, "olga": Role.OPERATOR, "rita": Role.READER}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessFleet]:
    access = AccessConfig(roles=ROLES, rate_per_s=0.0)
    with inprocess_fleet(
        tmp_path_factory.mktemp("access"), {"small": HostShape("small")}, access=access
    ) as f:
        yield f


def ip_forward(fleet: InProcessFleet, host: str) -> str:
    """The host's (simulated) /proc/sys/net/ipv4/ip_forward."""
    path = fleet.fake(host).config.state_dir / "netroot/proc/sys/net/ipv4/ip_forward"
    return path.read_text(encoding="utf-8").strip()


def vm_names(fleet: InProcessFleet) -> set[str]:
    return {v["name"] for v in fleet.cli_ok("vm", "list", "--all")["vms"]}


def audit(fleet: InProcessFleet, *args: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = fleet.cli_ok("audit", "list", "--limit", "1000", *args)["entries"]
    return entries


def refused(fleet: InProcessFleet, login: str, *args: str) -> dict[str, Any]:
    """Run a CLI command as ``login`` that must be refused for its role: exit 6, the JSON error."""
    result = fleet.cli(*args, login=login)
    assert result.code == 6, (result.code, result.stdout, result.stderr)
    error: dict[str, Any] = result.json["error"]
    assert error["type"] == "PermissionDenied"
    return error


def test_a_reader_can_read_but_not_create_or_delete(fleet: InProcessFleet) -> None:
    fleet.cli_ok("vm", "create", "kept", "--host", "small", "--vcpus", "1", "--memory", "256")
    before = vm_names(fleet)
    assert fleet.cli("vm", "list", login="rita").code == 0
    error = refused(fleet, "rita", "vm", "create", "sneaky", "--vcpus", "1", "--memory", "256")
    assert error["message"] == f"login 'rita' has role reader; {api.API_VM_CREATE.kind} needs role operator"
    assert error["details"] == {"login": "rita", "role": "reader", "needed": "operator"}
    refused(fleet, "rita", "vm", "delete", "kept")
    refused(fleet, "mallory", "vm", "list")  # no role: not even reads
    assert vm_names(fleet) == before


def test_an_operator_cannot_change_a_host_network_an_admin_can(fleet: InProcessFleet) -> None:
    error = refused(fleet, "olga", "net", "ip-forward", "small", "--enable", "--no-persist")
    assert error["message"] == (
        f"login 'olga' has role operator; {network.API_NET_IP_FORWARD.kind} needs role admin"
    )
    assert ip_forward(fleet, "small") == "0"
    assert fleet.cli("net", "ip-forward", "small", "--enable", "--no-persist").code == 0
    assert ip_forward(fleet, "small") == "1"
    # The operator does VM work.
    done = fleet.cli(
        "vm", "create", "olgas", "--host", "small", "--vcpus", "1", "--memory", "256", login="olga"
    )
    assert done.code == 0, done.stdout


def test_changes_and_refusals_are_audited_reads_are_not(fleet: InProcessFleet) -> None:
    transport = fleet.broker.transport("script", user="olga")
    try:
        env = request(api.API_VM_DELETE, api.VmDeleteRequest("ghost"), "script")
        reply = transport.call(DEFAULT_EXCHANGE, api_queue(api.API_VM_DELETE.role).name, env, 30)
        with pytest.raises(Exception, match="ghost"):
            unwrap(reply, api.API_VM_DELETE)
    finally:
        transport.close()
    fleet.cli_ok("vm", "show", "kept")
    refused(fleet, "rita", "vm", "delete", "kept")

    entries = audit(fleet)
    mine = [e for e in entries if e["request_id"] == env.id]
    assert [(e["login"], e["kind"], e["target"], e["result"]) for e in mine] == [
        ("olga", api.API_VM_DELETE.kind, "ghost", "NotFound")
    ]
    assert "ghost" in mine[0]["message"]
    assert all(e["at"] >= env.sent_at - 1 for e in mine)
    rows = {(e["login"], e["kind"], e["target"], e["result"]) for e in entries}
    assert (HARNESS_LOGIN, api.API_VM_CREATE.kind, "kept@small", "ok") in rows
    assert ("rita", api.API_VM_CREATE.kind, "sneaky", "PermissionDenied") in rows
    assert ("rita", api.API_VM_DELETE.kind, "kept", "PermissionDenied") in rows
    assert ("mallory", api.API_VM_LIST.kind, None, "PermissionDenied") in rows
    assert ("olga", network.API_NET_IP_FORWARD.kind, "small", "PermissionDenied") in rows
    assert (HARNESS_LOGIN, network.API_NET_IP_FORWARD.kind, "small", "ok") in rows
    assert ("olga", api.API_VM_CREATE.kind, "olgas@small", "ok") in rows
    # Successful reads are not recorded (the read lane's vm list and vm show above).
    read_kinds = {api.API_VM_LIST.kind, api.API_VM_SHOW.kind}
    assert not [e for e in entries if e["kind"] in read_kinds and e["result"] == "ok"]
    assert len({e["request_id"] for e in entries}) == len(entries)  # one entry per call

    # Filters.
    assert {e["login"] for e in audit(fleet, "--user", "rita")} == {"rita"}
    assert {e["kind"] for e in audit(fleet, "--kind", api.API_VM_DELETE.kind)} == {api.API_VM_DELETE.kind}
    assert len(audit(fleet, "--limit", "2")) == 2
    assert audit(fleet, "--since", "2099-01-01T00:00") == []
    assert {e["request_id"] for e in audit(fleet, "--since", "1h")} >= {env.id}
    table = fleet.cli("audit", "list", "--user", "rita", output="table")
    assert table.code == 0 and "PermissionDenied" in table.stdout and "rita" in table.stdout


def test_only_admins_read_the_audit_log(fleet: InProcessFleet) -> None:
    error = refused(fleet, "olga", "audit", "list")
    assert f"{API_AUDIT_LIST.kind} needs role admin" in error["message"]
    bad = fleet.cli("audit", "list", "--since", "yesterday")
    assert bad.code == 2 and bad.json["error"]["type"] == "InvalidRequest"


def test_no_vnc_password_in_the_database_and_secure_export_for_admins(fleet: InProcessFleet) -> None:
    fleet.cli_ok(
        "vm", "create", "vnc1", "--host", "small", "--vcpus", "1", "--memory", "256",
        "--graphics", "vnc,password=sEcr3t,listen=0.0.0.0",
    )  # fmt: skip
    engine = sa.create_engine(fleet.database_url)
    try:
        with engine.connect() as conn:
            spec = conn.execute(sa.text("SELECT spec FROM vms WHERE name = 'vnc1'")).scalar_one()
    finally:
        engine.dispose()
    assert "sEcr3t" not in spec
    assert '"listen": "0.0.0.0"' in spec  # the rest of the graphics is kept
    # The password lives in the domain's definition on the host: only admins may export it.
    error = refused(fleet, "olga", "vm", "export", "vnc1", "--secure")
    assert f"{API_VM_EXPORT_SECURE.kind} needs role admin" in error["message"]
    assert "sEcr3t" not in fleet.cli("vm", "export", "vnc1", login="rita", output="table").stdout
    secure = fleet.cli("vm", "export", "vnc1", "--secure", output="table")
    assert secure.code == 0 and "sEcr3t" in secure.stdout


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessFleet]:
    """A controller whose state-changing calls are limited to a burst of 2, then one per 1000 s
    (``adam``, an admin, reads the audit log with a bucket of his own)."""
    access = AccessConfig(roles={**ROLES, "adam": Role.ADMIN}, rate_per_s=0.001, burst=2)
    with inprocess_fleet(
        tmp_path_factory.mktemp("limited"), {"small": HostShape("small")}, access=access
    ) as f:
        yield f


def test_a_burst_over_the_limit_is_refused_and_changes_nothing(limited: InProcessFleet) -> None:
    for name in ("r1", "r2"):
        limited.cli_ok("vm", "create", name, "--host", "small", "--vcpus", "1", "--memory", "256")
    result = limited.cli("vm", "create", "r3", "--host", "small", "--vcpus", "1", "--memory", "256")
    assert result.code == 7, (result.stdout, result.stderr)
    error = result.json["error"]
    assert error["type"] == "RateLimited" and error["retryable"] is True
    assert 0 < error["details"]["retry_after_s"] <= 1000
    assert {v["name"] for v in limited.cli_ok("vm", "list", "--all")["vms"]} == {
        "r1",
        "r2",
    }  # reads: no limit
    # Another login has its own bucket.
    other = limited.cli(
        "vm", "create", "o1", "--host", "small", "--vcpus", "1", "--memory", "256", login="olga"
    )
    assert other.code == 0, other.stdout
    audit_log = limited.cli("audit", "list", login="adam")  # guest has no tokens left
    assert audit_log.code == 0, audit_log.stdout
    entries = [e for e in audit_log.json["entries"] if e["result"] == "RateLimited"]
    assert [(e["login"], e["kind"], e["target"]) for e in entries] == [
        (HARNESS_LOGIN, api.API_VM_CREATE.kind, "r3@small")
    ]
