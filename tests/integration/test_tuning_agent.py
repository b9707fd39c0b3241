"""The agent's tuning module on libvirt's test driver and a simulated host's kernel tree:
pinning (read back from libvirt), process checks and taskset, hugepage pools, IO schedulers and
the virt-host profile, all through the handler table the dispatcher uses."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from builders import host_report, qemu_process
from vfsupport import NODES

from agent.config import AgentConfig
from agent.tuning.module import TuningModule
from common.domain_xml import build_domain_xml
from common.errors import Conflict, InvalidRequest, NotFound, Unsupported
from common.messages.descriptor import Side
from common.messages.tuning import (
    TUNING_AFFINITY,
    TUNING_HUGEPAGES,
    TUNING_IO_SCHEDULER,
    TUNING_PIN,
    TUNING_PROCESS,
    TUNING_PROFILE,
    TUNING_TASKSET,
    ApplyProfile,
    GetAffinity,
    HugepageTarget,
    PinVm,
    ProcessQuery,
    SetHugepages,
    SetIoScheduler,
    SetTaskset,
)
from common.messages.vm import CpuTune, DomainType, VcpuPin, VmRef, VmSpec
from common.transport.rpc import HandlerTable

NODE = NODES / "tuning-numa.xml"  # 8 CPUs in 2 NUMA cells


@pytest.fixture
def conn() -> Iterator[Any]:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    c = libvirt.open(f"test://{NODE}")
    yield c
    c.close()


@pytest.fixture
def module(conn: Any, tmp_path: Path) -> TuningModule:
    cfg = AgentConfig(
        host_id="tuned",
        libvirt_uri=f"test://{NODE}",
        state_dir=tmp_path,
        dedicated_cpus="2-7",
        shared_cpus="0-1",
    )
    return TuningModule.for_host(cfg, conn)


def _table(module: TuningModule) -> HandlerTable:
    """The module's handlers, registered as the agent registers them (``table.handler(OP)``)."""
    reports: list[int] = []

    def request_report() -> int:
        reports.append(1)
        return len(reports)

    table = HandlerTable(Side.AGENT)
    module.register(table, request_report)
    return table


def _define(conn: Any, *, managed: bool = True, pins: tuple[int, ...] = (2, 3)) -> VmRef:
    spec = VmSpec(
        uuid=str(uuid.uuid4()),
        name=f"vm-{uuid.uuid4().hex[:6]}",
        vcpus=len(pins),
        memory_mib=256,
        domain_type=DomainType.TEST,
        cputune=CpuTune(tuple(VcpuPin(i, str(c)) for i, c in enumerate(pins)), emulator_cpuset="0-1"),
    )
    xml = build_domain_xml(spec)
    if not managed:
        xml = xml.replace("<metadata>", "<!--").replace("</metadata>", "-->")
    dom = conn.defineXML(xml)
    dom.create()
    return VmRef(spec.uuid, spec.name)


def test_report_facts_of_a_simulated_host(module: TuningModule) -> None:
    facts = module.enrich_report(host_report("tuned")).tuning
    assert facts is not None and facts.simulated
    assert (facts.sockets, facts.cores_per_socket, facts.threads_per_core) == (2, 2, 2)
    assert [(c.id, c.cpus) for c in facts.cells] == [(0, "0-3"), (1, "4-7")]
    assert (facts.online_cpus, facts.dedicated_cpus, facts.shared_cpus, facts.reserved_cpus) == (
        "0-7",
        "2-7",
        "0-1",
        "",
    )
    assert [p.size_kib for p in facts.hugepages] == [2048, 1048576]
    assert facts.thp_enabled == "madvise"
    assert [d.name for d in facts.block_devices] == ["vda"]


def test_bad_cpu_sets_stop_the_agent(conn: Any, tmp_path: Path) -> None:
    for dedicated, why in (
        ("6-9", r"CPU\(s\) 8-9 are not online"),
        ("0-7", "no CPU is left for shared VMs"),
    ):
        cfg = AgentConfig(
            host_id="x", libvirt_uri=f"test://{NODE}", state_dir=tmp_path, dedicated_cpus=dedicated
        )
        with pytest.raises(InvalidRequest, match=why):
            TuningModule.for_host(cfg, conn)


def test_the_test_drivers_cpu_map_limit_is_refused_at_start(tmp_path: Path) -> None:
    big = libvirt.open(f"test://{NODES / 'medium.xml'}")  # 16 CPUs, but the driver's map has 8
    try:
        cfg = AgentConfig(
            host_id="x",
            libvirt_uri=f"test://{NODES / 'medium.xml'}",
            state_dir=tmp_path,
            dedicated_cpus="6-9",
        )
        with pytest.raises(InvalidRequest) as err:
            TuningModule.for_host(cfg, big)
        assert "beyond libvirt's CPU map" in err.value.message
    finally:
        big.close()


def test_pin_and_affinity(module: TuningModule, conn: Any) -> None:
    table = _table(module)
    ref = _define(conn)
    before = table.handler(TUNING_AFFINITY)(GetAffinity(ref))
    assert [(p.vcpu, p.cpuset) for p in before.vcpu_pins] == [(0, "2"), (1, "3")]
    assert before.emulator_cpuset == "0-1"
    assert before.state == "running" and not before.observed  # no QEMU process on a simulated host
    after = table.handler(TUNING_PIN)(PinVm(ref, vcpu_pins=(VcpuPin(0, "4-5"),), emulator_cpuset="1"))
    assert [(p.vcpu, p.cpuset) for p in after.vcpu_pins] == [(0, "4-5"), (1, "3")]
    assert after.emulator_cpuset == "1"


def test_pins_outside_the_host_sets_are_refused(module: TuningModule, conn: Any) -> None:
    module.sets = module.sets.__class__(
        module.sets.online, frozenset({2, 3, 4, 5}), frozenset({0, 1}), frozenset({6, 7})
    )
    table = _table(module)
    ref = _define(conn)
    with pytest.raises(InvalidRequest) as err:
        table.handler(TUNING_PIN)(PinVm(ref, vcpu_pins=(VcpuPin(0, "6"),)))
    assert "reserved for the host" in err.value.message
    with pytest.raises(InvalidRequest):
        table.handler(TUNING_PIN)(PinVm(ref, vcpu_pins=(VcpuPin(5, "2"),)))  # no vCPU 5
    with pytest.raises(InvalidRequest):
        table.handler(TUNING_PIN)(PinVm(ref))  # nothing to pin
    with pytest.raises(NotFound):
        table.handler(TUNING_PIN)(PinVm(VmRef(str(uuid.uuid4()), "ghost"), vcpu_pins=(VcpuPin(0, "2"),)))


def test_unmanaged_domains_are_not_touched(module: TuningModule, conn: Any) -> None:
    ref = _define(conn, managed=False)
    with pytest.raises(Conflict):
        _table(module).handler(TUNING_PIN)(PinVm(ref, vcpu_pins=(VcpuPin(0, "2"),)))


def test_process_and_taskset(module: TuningModule, conn: Any) -> None:
    table = _table(module)
    ref = _define(conn)
    qemu_process(module.kernel.root, 3000, ref.uuid, accel="TCG")  # claims the uuid: not believed
    assert table.handler(TUNING_PROCESS)(ProcessQuery(3000)).qemu is False
    with pytest.raises(Conflict):
        table.handler(TUNING_TASKSET)(SetTaskset(3000, ref.uuid, "0-1"))
    qemu_process(module.kernel.root, 4000, ref.uuid, accel="TCG", libvirt_name=ref.name)
    info = table.handler(TUNING_PROCESS)(ProcessQuery(4000))
    assert (info.qemu, info.vm_uuid, info.vm_name, info.managed) == (True, ref.uuid, ref.name, True)
    assert [t.vcpu for t in info.threads] == [None, 0]
    done = table.handler(TUNING_TASKSET)(SetTaskset(4000, ref.uuid, "0-1"))
    assert [t.cpus for t in done.before] == ["0-7", "0-7"]
    assert [t.cpus for t in done.after] == ["0-1", "0-1"]
    # the PID must be that VM's QEMU; reserved/unknown CPUs and other processes are refused
    with pytest.raises(Conflict):
        table.handler(TUNING_TASKSET)(SetTaskset(4000, str(uuid.uuid4()), "0"))
    with pytest.raises(NotFound):
        table.handler(TUNING_PROCESS)(ProcessQuery(4999))
    other = module.kernel.root / "proc" / "5000"
    other.mkdir()
    (other / "cmdline").write_bytes(b"/usr/sbin/sshd\0-D\0")
    assert table.handler(TUNING_PROCESS)(ProcessQuery(5000)).qemu is False
    with pytest.raises(Conflict):
        table.handler(TUNING_TASKSET)(SetTaskset(5000, ref.uuid, "0"))


def test_hugepages_io_and_profile(module: TuningModule) -> None:
    table = _table(module)
    done = table.handler(TUNING_HUGEPAGES)(SetHugepages(2048, 128))
    assert (done.before, done.pool.total, done.pool.free) == (0, 128, 128)
    assert done.message == "2M pool 0 -> 128 pages"
    with pytest.raises(Unsupported):
        table.handler(TUNING_HUGEPAGES)(SetHugepages(16384, 1))
    io = table.handler(TUNING_IO_SCHEDULER)(SetIoScheduler("vda", "kyber"))
    assert (io.before, io.after) == ("mq-deadline", "kyber")
    with pytest.raises(InvalidRequest):
        table.handler(TUNING_IO_SCHEDULER)(SetIoScheduler("vda", "cfq"))
    module.kernel.set_thp("enabled", "always")

    dry = table.handler(TUNING_PROFILE)(ApplyProfile("virt-host", (HugepageTarget(2048, 256),), dry_run=True))
    assert dry.dry_run and {c.setting for c in dry.changes if c.changed} == {
        "thp.enabled",
        "io.vda.scheduler",
        "hugepages.2M",
    }
    assert module.kernel.thp("enabled").selected == "always"  # a dry run changes nothing

    first = table.handler(TUNING_PROFILE)(ApplyProfile("virt-host", (HugepageTarget(2048, 256),)))
    changed = {c.setting: (c.before, c.after) for c in first.changes if c.changed}
    assert changed == {
        "thp.enabled": ("always", "madvise"),
        "io.vda.scheduler": ("kyber", "none"),
        "hugepages.2M": ("128", "256"),
    }
    second = table.handler(TUNING_PROFILE)(ApplyProfile("virt-host", (HugepageTarget(2048, 256),)))
    assert [c for c in second.changes if c.changed] == []
    facts = module.facts()
    assert (facts.thp_enabled, facts.block_devices[0].scheduler, facts.hugepages[0].total) == (
        "madvise",
        "none",
        256,
    )
