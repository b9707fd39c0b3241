"""Calling an operation or registering a handler with the wrong body or result type is a mypy error.

The descriptors are generic in body and result (``Command[VmAction, VmResult]``); this test runs
``mypy --strict`` on a small module of right and wrong uses and checks that exactly the wrong lines
are reported.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from mypy import api as mypy_api

REPO = Path(__file__).resolve().parents[2]

SNIPPET = """
from common.messages import api, vm
from common.messages.descriptor import Side
from common.transport.memory import MemoryBroker
from common.transport.rpc import HandlerTable
from controller.agent_api import AgentClient
from controller.cli.client import ApiClient

agents = AgentClient(MemoryBroker().transport("t"), "controller")
client = ApiClient(MemoryBroker().transport("c"))
ref = vm.VmRef("u", "n")

def start(body: vm.VmAction) -> vm.VmResult:
    return vm.VmResult()

def delete(body: vm.DeleteVm) -> vm.VmResult:
    return vm.VmResult()

def start_wrong_result(body: vm.VmAction) -> vm.VmStatus:
    raise NotImplementedError

table = HandlerTable(Side.AGENT)
table.register(vm.VM_START, start)
result: vm.VmResult = agents.call("h", vm.VM_START, vm.VmAction(ref))
view: vm.VmView = client.call(api.API_VM_SHOW, vm.VmRefRequest("web"))
hosts: api.HostList = client.call(api.API_HOST_LIST, api.Empty())

table.register(vm.VM_START, delete)  # WRONG: handler takes another body
table.register(vm.VM_START, start_wrong_result)  # WRONG: handler returns another result
agents.call("h", vm.VM_START, vm.DeleteVm(ref))  # WRONG: body of another operation
status: vm.VmStatus = agents.call("h", vm.VM_START, vm.VmAction(ref))  # WRONG: result type
client.call(api.API_HOST_LIST, vm.VmRefRequest("web"))  # WRONG: body of another call
agents.call("h", api.API_HOST_LIST, api.Empty())  # WRONG: an API call is not an agent command
"""


def test_wrong_bodies_and_results_are_mypy_errors(tmp_path: Path) -> None:
    module = tmp_path / "typed_uses.py"
    module.write_text(textwrap.dedent(SNIPPET))
    out, err, _status = mypy_api.run(
        [
            "--strict",
            "--no-error-summary",
            "--cache-dir",
            str(tmp_path / "mypy-cache"),
            "--config-file",
            str(REPO / "pyproject.toml"),
            str(module),
        ]
    )
    assert not err, err
    lines = module.read_text().splitlines()
    wrong = {n for n, line in enumerate(lines, 1) if "# WRONG" in line}
    reported = {
        int(m.group(1)) for m in re.finditer(rf"^{re.escape(str(module))}:(\d+): error:", out, re.MULTILINE)
    }
    assert reported == wrong, out
