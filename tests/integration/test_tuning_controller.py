"""The controller's tuning use cases and dedicated-CPU claims against a real database (SQLite,
or PostgreSQL under deploy/test.sh), with agents faked at the AgentCalls boundary."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import builders
import pytest

from common.errors import Conflict, InvalidRequest, NotFound, NoValidHost
from common.messages import api
from common.messages import tuning as tuning_msgs
from common.messages.descriptor import Command
from common.messages.host import CpuTopology, HostReport, StoragePoolInfo
from common.messages.tuning import (
    GetAffinity,
    HostHugepagesRequest,
    HostTasksetRequest,
    HostTuningReport,
    HugepagePool,
    HugepagesResult,
    NumaCell,
    PinVm,
    ProcessInfo,
    ProcessQuery,
    SetHugepages,
    SetTaskset,
    TasksetResult,
    ThreadAffinity,
    VmAffinity,
    VmPinRequest,
)
from common.messages.vm import VM_CREATE, VM_DELETE, CreateVm, PowerState, VcpuPin, VmResult, VmSpec, VmStatus
from controller.config import ControllerConfig
from controller.db import repository as repo
from controller.db.engine import make_engine, migrate
from controller.service import ControllerService
from controller.tuning import TuningService

pytestmark = pytest.mark.db

B = TypeVar("B")
T = TypeVar("T")
NOW = 1_800_000_000.0


class FakeAgents:
    """Agents at the AgentCalls boundary: records what was sent, answers like a host would."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.specs: dict[str, VmSpec] = {}
        self.calls: list[tuple[str, str, object]] = []
        self.processes: dict[int, ProcessInfo] = {}

    def call(self, host_id: str, op: Command[B, T], body: B) -> T:
        with self.lock:
            self.calls.append((host_id, op.kind, body))
        result: object
        if op is VM_CREATE:
            assert isinstance(body, CreateVm)
            with self.lock:
                self.specs[body.spec.name] = body.spec
            spec = body.spec
            result = VmResult(
                VmStatus(
                    spec.uuid,
                    spec.name,
                    PowerState.RUNNING,
                    spec.vcpus,
                    spec.vcpus,
                    spec.memory_mib,
                    spec.memory_mib,
                )
            )
        elif op is VM_DELETE:
            result = VmResult(None, "deleted")
        elif op is tuning_msgs.TUNING_PIN:
            assert isinstance(body, PinVm)
            result = VmAffinity(body.vm.uuid, body.vm.name, "running", vcpu_pins=body.vcpu_pins)
        elif op is tuning_msgs.TUNING_AFFINITY:
            assert isinstance(body, GetAffinity)
            result = VmAffinity(body.vm.uuid, body.vm.name, "running")
        elif op is tuning_msgs.TUNING_PROCESS:
            assert isinstance(body, ProcessQuery)
            result = self.processes.get(body.pid, ProcessInfo(body.pid, qemu=False))
        elif op is tuning_msgs.TUNING_TASKSET:
            assert isinstance(body, SetTaskset)
            thread = ThreadAffinity(body.pid, "qemu-system-x86", body.cpuset)
            result = TasksetResult(body.pid, body.vm_uuid, before=(), after=(thread,))
        elif op is tuning_msgs.TUNING_HUGEPAGES:
            assert isinstance(body, SetHugepages)
            result = HugepagesResult(
                body.size_kib,
                body.count,
                0,
                HugepagePool(body.size_kib, body.count, body.count, mounted=True),
            )
        else:
            raise AssertionError(f"unexpected agent call {op.kind}")
        assert isinstance(result, op.result)
        return result


def tuning_facts(dedicated: str, shared: str, pages: int = 0) -> HostTuningReport:
    return HostTuningReport(
        sockets=1,
        cores_per_socket=4,
        threads_per_core=2,
        cells=(NumaCell(0, "0-3", 8192), NumaCell(1, "4-7", 8192)),
        online_cpus="0-7",
        dedicated_cpus=dedicated,
        shared_cpus=shared,
        hugepages=(HugepagePool(2048, pages, pages, mounted=True),),
        default_hugepage_kib=2048,
        simulated=True,
    )


def host_report(host_id: str, tuning: HostTuningReport) -> HostReport:
    return builders.host_report(
        host_id,
        cpu=CpuTopology(cpus=8, cores=4, threads=2, numa_cells=2),
        memory_mib=65536,
        memory_free_mib=65536,
        storage=StoragePoolInfo("default", "/x", 1000, 0, 1000),
        started_at=NOW - 100,
        reported_at=NOW,
        tuning=tuning,
    )


@pytest.fixture
def service(database_url: str) -> Iterator[tuple[ControllerService, FakeAgents]]:
    engine = make_engine(database_url)
    migrate(engine)
    agents = FakeAgents()
    svc = ControllerService(engine, ControllerConfig(down_after_s=1e9), agents, clock=lambda: NOW)
    yield svc, agents
    svc.close()
    engine.dispose()


def create(svc: ControllerService, name: str, vcpus: int = 1, **extra: Any) -> api.VmCreated:
    return svc.create_vm(api.VmCreate(name=name, vcpus=vcpus, memory_mib=512, disk_gib=1, **extra))


def pcpus_by_host(svc: ControllerService) -> dict[str, list[tuple[int, ...]]]:
    with svc.tx() as s:
        vms = repo.list_vms(s)
    out: dict[str, list[tuple[int, ...]]] = {}
    for vm in vms:
        if vm.host_id is not None:
            out.setdefault(vm.host_id, []).append(vm.pcpus)
    return out


def test_concurrent_dedicated_creates_never_share_a_pcpu(
    service: tuple[ControllerService, FakeAgents],
) -> None:
    svc, agents = service
    svc.record_report(host_report("a", tuning_facts("2-4", "0-1,5-7")))  # 3 pCPUs
    svc.record_report(host_report("b", tuning_facts("5-7", "0-4")))  # 3 pCPUs
    names = [f"pin-{i:02d}" for i in range(12)]

    def attempt(name: str) -> str:
        try:
            create(svc, name, cpu_policy="dedicated")
        except NoValidHost:
            return "refused"
        return "created"

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(attempt, names))
    assert outcomes.count("created") == 6 and outcomes.count("refused") == 6
    held = pcpus_by_host(svc)
    for host_id, dedicated in (("a", {2, 3, 4}), ("b", {5, 6, 7})):
        cpus = [c for pcpus in held[host_id] for c in pcpus]
        assert sorted(cpus) == sorted(dedicated), f"{host_id}: {held[host_id]}"  # each once, all used
    # what each agent was told matches the claim, emulator threads on the host's shared set
    with svc.tx() as s:
        rows = {v.name: v for v in repo.list_vms(s)}
    for name, spec in agents.specs.items():
        assert spec.cputune is not None
        assert [int(p.cpuset) for p in spec.cputune.vcpu_pins] == list(rows[name].pcpus)
        assert spec.cputune.emulator_cpuset == ("0-1,5-7" if rows[name].host_id == "a" else "0-4")
        assert rows[name].cpu_policy == "dedicated"
    with svc.tx() as s:
        used = {h.id: h.used for h in repo.list_hosts(s)}
    assert used["a"]["PCPU"] == 3 and "VCPU" not in used["a"]


def test_refusal_explains_each_host_and_delete_frees_the_cpus(
    service: tuple[ControllerService, FakeAgents],
) -> None:
    svc, _agents = service
    svc.record_report(host_report("a", tuning_facts("4-7", "0-3")))
    svc.record_report(host_report("b", tuning_facts("", "0-7")))
    first = create(svc, "big", vcpus=3, cpu_policy="dedicated")
    assert first.vm is not None and first.vm.host == "a"
    assert pcpus_by_host(svc)["a"] == [(4, 5, 6)]  # NUMA-local: all in cell 1
    with pytest.raises(NoValidHost) as err:
        create(svc, "bigger", vcpus=2, cpu_policy="dedicated")
    text = err.value.message
    assert "a: dedicated cpu short by 1 pCPU at ratio 1.0" in text
    assert "b: no dedicated cpu inventory (requested 2 pCPU)" in text
    svc.delete_vm(api.VmDeleteRequest("big"))
    again = create(svc, "bigger", vcpus=2, cpu_policy="dedicated")
    assert again.vm is not None and again.vm.host == "a"


def test_shared_vms_float_over_the_shared_set(service: tuple[ControllerService, FakeAgents]) -> None:
    svc, agents = service
    svc.record_report(host_report("a", tuning_facts("4-7", "0-3")))
    create(svc, "floater", vcpus=2)
    spec = agents.specs["floater"]
    assert spec.cpuset == "0-3" and spec.cputune is None
    with svc.tx() as s:
        assert repo.get_host(s, "a").used["VCPU"] == 2


def test_hugepage_vms_claim_pages(service: tuple[ControllerService, FakeAgents]) -> None:
    svc, agents = service
    svc.record_report(host_report("a", tuning_facts("", "0-7", pages=300)))
    create(svc, "hp", hugepage_size="2M")  # 512 MiB = 256 pages
    assert agents.specs["hp"].hugepage_size_kib == 2048
    with svc.tx() as s:
        assert repo.get_vm(s, "hp").hugepage_size_kib == 2048
    with pytest.raises(NoValidHost) as err:
        create(svc, "hp2", hugepage_size="2M")
    assert "2M hugepages short by 212 pages" in err.value.message
    tuning = TuningService(svc)
    with pytest.raises(Conflict) as shrink:
        tuning.hugepages(HostHugepagesRequest("a", "2M", 100))
    assert "claim 256" in shrink.value.message
    done = tuning.hugepages(HostHugepagesRequest("a", "2M", 600))
    assert done.result.pool.total == 600
    view = tuning.show("a")
    assert view.hugepages_claimed == {"2M": 256}


def test_pin_within_the_allowance(service: tuple[ControllerService, FakeAgents]) -> None:
    svc, agents = service
    svc.record_report(host_report("a", tuning_facts("4-7", "0-3")))
    create(svc, "ded", vcpus=2, cpu_policy="dedicated")
    create(svc, "shr", vcpus=1)
    tuning = TuningService(svc)
    held = pcpus_by_host(svc)["a"]
    mine = next(p for p in held if p)
    view = tuning.pin(VmPinRequest("ded", cpus=f"{mine[1]}", vcpu=0))
    assert view.allowance == f"{mine[0]}-{mine[1]}" and view.cpu_policy == "dedicated"
    with svc.tx() as s:
        vm = repo.get_vm(s, "ded")
    assert vm.task is None and vm.last_error is None
    assert vm.spec is not None and vm.spec.cputune is not None
    assert vm.spec.cputune.vcpu_pins[0] == VcpuPin(0, str(mine[1]))
    # another VM's pCPU, the shared set, a vCPU the VM lacks: refused before any agent call
    for body, fragment in (
        (VmPinRequest("ded", cpus="0", vcpu=1), "outside its allowance"),
        (VmPinRequest("ded", cpus="6-7", vcpu=0), "outside its allowance"),
        (VmPinRequest("ded", cpus="4", vcpu=5), "has vCPUs 0-1"),
        (VmPinRequest("shr", cpus="5", vcpu=0), "the host's shared CPUs"),
        (VmPinRequest("ded", cpus="4", emulator=True), "the host's shared CPUs"),
    ):
        calls = len(agents.calls)
        with pytest.raises(InvalidRequest) as err:
            tuning.pin(body)
        assert fragment in err.value.message
        assert len(agents.calls) == calls
    with svc.tx() as s:
        assert repo.get_vm(s, "ded").last_error is not None and repo.get_vm(s, "ded").task is None
    assert tuning.pin(VmPinRequest("shr", cpus="1-2", vcpu=0)).allowance == "0-3"
    assert tuning.pin(VmPinRequest("ded", cpus="0", emulator=True)).vm == "ded"
    with pytest.raises(NotFound):
        tuning.pin(VmPinRequest("nope", cpus="0", vcpu=0))


def test_taskset_only_for_managed_qemu_processes(service: tuple[ControllerService, FakeAgents]) -> None:
    svc, agents = service
    svc.record_report(host_report("a", tuning_facts("4-7", "0-3")))
    create(svc, "ded", vcpus=1, cpu_policy="dedicated")
    with svc.tx() as s:
        vm = repo.get_vm(s, "ded")
    tuning = TuningService(svc)
    agents.processes[100] = ProcessInfo(100, qemu=True, vm_uuid=vm.uuid, vm_name="ded", managed=True)
    agents.processes[200] = ProcessInfo(200, qemu=True, vm_uuid=str(uuid.uuid4()), vm_name="hand-made")
    with pytest.raises(Conflict) as not_qemu:
        tuning.taskset(HostTasksetRequest("a", 300, "0"))
    assert "not a QEMU process" in not_qemu.value.message
    with pytest.raises(Conflict) as foreign:
        tuning.taskset(HostTasksetRequest("a", 200, "0"))
    assert "does not manage" in foreign.value.message
    with pytest.raises(InvalidRequest):
        tuning.taskset(HostTasksetRequest("a", 100, "5-7"))  # other dedicated CPUs
    done = tuning.taskset(HostTasksetRequest("a", 100, f"0-3,{vm.pcpus[0]}"))
    assert done.vm == "ded" and done.result.vm_uuid == vm.uuid
    assert [k for _h, k, _b in agents.calls[-2:]] == [
        tuning_msgs.TUNING_PROCESS.kind,
        tuning_msgs.TUNING_TASKSET.kind,
    ]
