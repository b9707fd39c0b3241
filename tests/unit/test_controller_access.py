"""Roles, the token bucket, the rate limiter and the audit front (controller/access.py, controller/audit.py)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

from common.codec import to_wire
from common.errors import NotFound, PermissionDenied, RateLimited
from common.messages import api, network, placement, tuning, vm, vmops
from common.messages.audit import API_AUDIT_LIST
from common.messages.catalogue import CATALOGUE
from common.messages.descriptor import ApiCall, Role, Side
from common.messages.envelope import Envelope
from common.transport.port import Delivery
from common.transport.rpc import Dispatcher, HandlerTable
from controller.access import RANKED, Rate, RateLimiter, RoleCheck, TokenBucket, allows, changes_state
from controller.audit import AuditedApi, audit_target
from controller.db.audit import AuditEntry

NOW = 1_700_000_000.0


def delivery(kind: str, body: dict[str, Any], login: str | None, msg_id: str = "req-1") -> Delivery:
    env = Envelope(kind=kind, body=body, sender="cli:x", id=msg_id, sent_at=NOW, expires_at=NOW + 30)
    return Delivery(envelope=env, routing_key="virtfleet.api", redelivered=False, reply_to="r", user_id=login)


# ------------------------------------------------------------------ roles


def test_roles_rank_reader_operator_admin() -> None:
    assert RANKED == (Role.READER, Role.OPERATOR, Role.ADMIN)
    assert allows(Role.ADMIN, Role.OPERATOR) and allows(Role.OPERATOR, Role.OPERATOR)
    assert allows(Role.READER, Role.READER)
    assert not allows(Role.READER, Role.OPERATOR) and not allows(Role.OPERATOR, Role.ADMIN)
    assert not allows(None, Role.READER)
    # Commands and reports are never callable through the API, whatever a login holds.
    assert not allows(Role.ADMIN, Role.CONTROLLER) and not allows(Role.CONTROLLER, Role.READER)


def test_role_check_names_login_role_and_the_role_needed() -> None:
    check = RoleCheck({"rita": Role.READER, "olga": Role.OPERATOR, "adam": Role.ADMIN})
    check(delivery(api.API_VM_SHOW.kind, {"name": "w"}, "rita"), api.API_VM_SHOW)
    check(delivery(api.API_VM_CREATE.kind, {}, "olga"), api.API_VM_CREATE)
    check(delivery(network.API_NET_DEFINE.kind, {}, "adam"), network.API_NET_DEFINE)
    with pytest.raises(PermissionDenied) as info:
        check(delivery(api.API_VM_DELETE.kind, {}, "rita"), api.API_VM_DELETE)
    assert info.value.message == "login 'rita' has role reader; api.vm.delete needs role operator"
    assert info.value.details == {"login": "rita", "role": "reader", "needed": "operator"}
    with pytest.raises(
        PermissionDenied, match=r"login 'olga' has role operator; api\.net\.define needs role admin"
    ):
        check(delivery(network.API_NET_DEFINE.kind, {}, "olga"), network.API_NET_DEFINE)


@pytest.mark.parametrize("login", ["mallory", None])
def test_a_login_without_a_role_may_call_nothing(login: str | None) -> None:
    check = RoleCheck({"rita": Role.READER})
    with pytest.raises(PermissionDenied, match=r"has no role; api\.ping needs role reader"):
        check(delivery(api.API_PING.kind, {}, login), api.API_PING)


def _api_calls(module: ModuleType) -> list[ApiCall[Any, Any]]:
    return [op for op in vars(module).values() if isinstance(op, ApiCall)]


def test_the_catalogue_gives_each_api_call_a_sensible_role() -> None:
    # Host networks and tuning change hosts: admin's, but for the reads.
    for module in (network, tuning):
        for op in _api_calls(module):
            assert op.role in (Role.READER, Role.ADMIN), op.kind
    # A VM's lifecycle (vm start, destroy, reboot...): operator's.
    for op in _api_calls(vm):
        assert op.role is Role.OPERATOR, op.kind
    # Host settings, host files, secrets and the audit log: admin's.
    admin = (
        placement.API_HOST_SET,
        placement.API_HOST_STATE,
        placement.API_HOSTGROUP_SET,
        vmops.API_IMAGE_CREATE,
        vmops.API_IMAGE_CONVERT,
        vmops.API_VM_EXPORT_SECURE,
        API_AUDIT_LIST,
    )
    assert [op.role for op in admin] == [Role.ADMIN] * len(admin)
    operator = (api.API_VM_CREATE, api.API_VM_DELETE, vmops.API_VM_SETMEM, vmops.API_VM_DISK_ATTACH)
    assert [op.role for op in operator] == [Role.OPERATOR] * len(operator)
    reader = (api.API_VM_LIST, api.API_HOST_LIST, vmops.API_VM_EXPORT, placement.API_HOST_CAPACITY)
    assert [op.role for op in reader] == [Role.READER] * len(reader)
    assert all(op.role in RANKED for op in CATALOGUE.values() if isinstance(op, ApiCall))


# ------------------------------------------------------------------ token bucket


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket.full(rate=2.0, burst=3, now=100.0)
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0) == pytest.approx(0.5)  # one token comes back in 1/rate seconds
    assert bucket.take(100.25) == pytest.approx(0.25)  # half a token refilled: a quarter second to go
    assert bucket.take(100.5) == 0.0
    assert bucket.take(110.0) == 0.0  # refilled, but never beyond the burst
    assert bucket.tokens == pytest.approx(2.0)


def test_token_bucket_ignores_a_clock_that_steps_back() -> None:
    bucket = TokenBucket.full(rate=1.0, burst=1, now=100.0)
    assert bucket.take(100.0) == 0.0
    assert bucket.take(50.0) == pytest.approx(1.0)
    assert bucket.take(51.0) == 0.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_per_login_and_lane() -> None:
    clock = FakeClock()
    limiter = RateLimiter(Rate(per_s=1.0, burst=2), Rate(per_s=0.0, burst=1), clock)
    create = api.API_VM_CREATE
    for _ in range(2):
        limiter(delivery(create.kind, {}, "olga"), create)
    with pytest.raises(RateLimited) as info:
        limiter(delivery(create.kind, {}, "olga"), create)
    assert info.value.retryable and info.value.details["retry_after_s"] == 1.0
    assert "login 'olga'" in info.value.message
    limiter(delivery(create.kind, {}, "otto"), create)  # another login has its own bucket
    for _ in range(100):  # reads: no limit configured
        limiter(delivery(api.API_VM_LIST.kind, {}, "olga"), api.API_VM_LIST)
    clock.now = 1.0
    limiter(delivery(create.kind, {}, "olga"), create)


def test_unlimited_rate_never_refuses() -> None:
    limiter = RateLimiter(Rate(0.0, 1), Rate(0.0, 1), FakeClock())
    for _ in range(1000):
        limiter(delivery(api.API_VM_CREATE.kind, {}, "olga"), api.API_VM_CREATE)


def test_state_changing_means_above_reader() -> None:
    assert changes_state(api.API_VM_CREATE) and changes_state(API_AUDIT_LIST)
    assert not changes_state(api.API_VM_LIST)


# ------------------------------------------------------------------ audit target and front


@pytest.mark.parametrize(
    ("body", "target"),
    [
        ({"name": "web-1"}, "web-1"),
        ({"name": "web-1", "host": "h1", "vcpus": 2}, "web-1@h1"),
        ({"name": "br0", "host": "h2", "nics": ["eth0"]}, "br0@h2"),
        ({"host": "h3", "pid": 1}, "h3"),
        ({"spec": {"name": "isolated", "bridge": "virbr9"}, "host": "h1"}, "isolated@h1"),
        ({"vm": {"uuid": "u", "name": "db-1"}}, "db-1"),
        ({}, None),
        ({"name": "", "host": None}, None),
        ({"name": "x" * 300}, "x" * 255),
    ],
)
def test_audit_target_from_well_known_fields(body: dict[str, Any], target: str | None) -> None:
    assert audit_target(body) == target


def _front(
    handler: Any, roles: dict[str, Role], limit: RateLimiter | None = None
) -> tuple[AuditedApi, list[AuditEntry]]:
    table = HandlerTable(Side.CONTROLLER)
    table.register(api.API_VM_DELETE, handler)
    table.register(api.API_VM_SHOW, handler)
    entries: list[AuditEntry] = []
    dispatcher = Dispatcher("controller", table, admit=[RoleCheck(roles)], clock=lambda: NOW)
    return AuditedApi(dispatcher, entries.append, limit=limit, clock=lambda: NOW + 1), entries


def test_audited_api_records_changes_and_refusals_not_reads() -> None:
    def handler(body: Any) -> Any:
        if isinstance(body, api.VmDeleteRequest) and body.name == "ghost":
            raise NotFound("VM ghost does not exist")
        return vm.VmActionDone(vm=None, message="ok") if isinstance(body, api.VmDeleteRequest) else None

    front, entries = _front(handler, {"olga": Role.OPERATOR, "rita": Role.READER})
    delete = api.API_VM_DELETE.kind
    assert front(delivery(delete, to_wire(api.VmDeleteRequest("web-1")), "olga", "r1")).reply is not None
    front(delivery(delete, to_wire(api.VmDeleteRequest("ghost")), "olga", "r2"))
    refused = front(delivery(delete, to_wire(api.VmDeleteRequest("web-1")), "rita", "r3"))
    front(delivery(api.API_VM_SHOW.kind, {"name": "web-1"}, "rita", "r4"))  # a read: not recorded
    front(delivery(api.API_VM_SHOW.kind, {"name": "web-1"}, "mallory", "r5"))  # a refused read: recorded
    assert refused.reply is not None and refused.reply.body["error"]["type"] == "PermissionDenied"
    got = [(e.login, e.kind, e.target, e.result, e.request_id, e.at) for e in entries]
    assert got == [
        ("olga", delete, "web-1", "ok", "r1", NOW + 1),
        ("olga", delete, "ghost", "NotFound", "r2", NOW + 1),
        ("rita", delete, "web-1", "PermissionDenied", "r3", NOW + 1),
        ("mallory", api.API_VM_SHOW.kind, "web-1", "PermissionDenied", "r5", NOW + 1),
    ]
    assert entries[1].message == "VM ghost does not exist"
    assert entries[2].message == "login 'rita' has role reader; api.vm.delete needs role operator"


def test_audited_api_answers_a_rate_limited_call_without_running_it() -> None:
    calls: list[Any] = []

    def handler(body: Any) -> vm.VmActionDone:
        calls.append(body)
        return vm.VmActionDone(vm=None, message="ok")

    limiter = RateLimiter(Rate(1.0, 1), Rate(0.0, 1), FakeClock())
    front, entries = _front(handler, {"olga": Role.ADMIN}, limiter)
    body = to_wire(api.VmDeleteRequest("web-1"))
    front(delivery(api.API_VM_DELETE.kind, body, "olga", "r1"))
    outcome = front(delivery(api.API_VM_DELETE.kind, body, "olga", "r2"))
    assert len(calls) == 1
    assert outcome.reply is not None and not outcome.dead_letter
    error = outcome.reply.body["error"]
    assert error["type"] == "RateLimited" and error["retryable"] and error["details"]["retry_after_s"] == 1.0
    assert [(e.request_id, e.result) for e in entries] == [("r1", "ok"), ("r2", "RateLimited")]
