"""Roles, rate limits and the audit log from a real controller process, over RabbitMQ with real
broker logins (the broker validates the AMQP user_id), with the CLI as an operator runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
from vfsupport import broker_login, node_uri, private_fleet

from common.messages import api
from common.messages.audit import API_AUDIT_LIST

# SQLite only (deploy/test.sh): roles and rate limits are the controller's; the audit store itself
# runs on both backends in tests/inprocess/test_audit_log.py.
pytestmark = [pytest.mark.broker, pytest.mark.db, pytest.mark.backend_neutral]


def test_exit_6_and_7_and_audit_list(tmp_path: Path) -> None:
    with private_fleet(tmp_path) as fleet, broker_login(fleet.amqp_url, "vfreader") as (reader, reader_url):
        config = tmp_path / "controller.toml"
        config.write_text("[access]\nburst = 2\n")  # guest: two calls above reader, then one per 1000 s
        fleet.start_controller(
            "controller",
            "--config",
            str(config),
            env={
                "VIRTFLEET_ACCESS_ROLES": f"guest=admin,{reader}=reader",
                "VIRTFLEET_ACCESS_RATE_PER_S": "0.001",
            },
        )
        fleet.start_agent("sim", node_uri("small"))
        fleet.wait_hosts({"sim"})

        assert fleet.cli("vm", "list", amqp_url=reader_url).code == 0
        denied = fleet.cli("vm", "create", "e2e-r", "--memory", "64", amqp_url=reader_url)
        assert denied.code == 6, denied.stdout
        assert denied.json["error"]["message"] == (
            f"login '{reader}' has role reader; {api.API_VM_CREATE.kind} needs role operator"
        )
        table = fleet.cli("audit", "list", output="table", amqp_url=reader_url)
        assert table.code == 6 and f"{API_AUDIT_LIST.kind} needs role admin" in table.stderr

        fleet.cli_ok("vm", "create", "e2e-a", "--memory", "64")  # guest's first token
        entries = fleet.cli_ok("audit", "list")["entries"]  # its second
        rows = [(e["login"], e["kind"], e["target"], e["result"]) for e in entries]
        assert ("guest", api.API_VM_CREATE.kind, "e2e-a", "ok") in rows
        assert (reader, api.API_VM_CREATE.kind, "e2e-r", "PermissionDenied") in rows
        assert (reader, API_AUDIT_LIST.kind, None, "PermissionDenied") in rows
        assert not [r for r in rows if r[1] == api.API_VM_LIST.kind]  # reads that succeed: not recorded

        limited = fleet.cli("vm", "create", "e2e-b", "--memory", "64")
        assert limited.code == 7, limited.stdout
        error = limited.json["error"]
        assert error["type"] == "RateLimited" and error["details"]["retry_after_s"] > 0
        names = {v["name"] for v in fleet.cli_ok("vm", "list", "--all")["vms"]}
        assert names == {"e2e-a"}
        log = (tmp_path / "controller.log").read_text()
        assert f"login=guest kind={api.API_VM_CREATE.kind} target=e2e-b result=RateLimited" in log
