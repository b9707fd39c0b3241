"""The CLI's ``--idempotency-key``: which calls carry it, and as what (controller.cli.client)."""

from __future__ import annotations

from typing import Any, cast

import pytest

from common.errors import InvalidRequest
from common.messages import api
from common.messages.placement import API_GROUP_CREATE, API_GROUP_DELETE, ServerGroupCreate, ServerGroupRef
from common.transport.port import Transport
from controller.cli.client import ApiClient


class _Recording:
    """A transport that records each request's key and answers an empty success."""

    def __init__(self) -> None:
        self.keys: list[str | None] = []

    def consumer_count(self, _queue: str) -> int:
        return 1

    def call(self, _exchange: str, _key: str, env: Any, _timeout: float, **_kw: Any) -> Any:
        self.keys.append(env.idempotency_key)
        reply = env.reply_ok({"name": "g", "policy": "affinity", "max_per_host": 1, "members": {}}, "c")
        if env.kind == api.API_VM_LIST.kind:
            reply = env.reply_ok({"vms": []}, "c")
        elif env.kind == API_GROUP_DELETE.kind:
            reply = env.reply_ok({"message": ""}, "c")
        return reply


def test_each_state_changing_call_gets_its_own_key_and_queries_none() -> None:
    transport = _Recording()
    client = ApiClient(cast(Transport, transport), idempotency_key="k")
    client.call(api.API_VM_LIST, api.VmListRequest())
    client.call(API_GROUP_CREATE, ServerGroupCreate(name="g", policy="affinity"))
    client.call(API_GROUP_DELETE, ServerGroupRef(name="g"))
    assert transport.keys == [None, "k", "k/2"]


def test_a_key_over_the_bound_sends_nothing() -> None:
    transport = _Recording()
    client = ApiClient(cast(Transport, transport), idempotency_key="k" * 129)
    with pytest.raises(InvalidRequest, match="1-128 characters"):
        client.call(API_GROUP_CREATE, ServerGroupCreate(name="g", policy="affinity"))
    assert transport.keys == []
