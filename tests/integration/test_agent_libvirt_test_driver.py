"""The real LibvirtHypervisor (and the handlers on top) on libvirt's test driver with the small node file."""

from __future__ import annotations

import functools
import threading
import time
import uuid as uuid_mod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from builders import vm_spec

from agent.drivers import host_facts
from agent.drivers.libvirt_driver import LibvirtHypervisor, open_connection
from agent.handlers import AgentHandlers
from agent.host_storage import HostStorage
from agent.reporter import build_report
from agent.storage_pools import StoragePool
from common.domain_xml import DomainXmlError, build_domain_xml, parse_domain_xml
from common.errors import AlreadyExists, HypervisorError, NotFound
from common.messages.base import replace
from common.messages.vm import (
    CreateVm,
    DeleteVm,
    DiskFormat,
    DiskSpec,
    PowerState,
    ShutdownVm,
    VmAction,
    VmRef,
    VmSpec,
    VmStatus,
)

NODE = Path(__file__).resolve().parents[1] / "fixtures" / "nodes" / "small.xml"
URI = f"test://{NODE}"
GIB = 1024**3


@pytest.fixture
def conn() -> Iterator[Any]:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    c = open_connection(URI)
    yield c
    c.close()


@pytest.fixture
def hv(conn: Any) -> LibvirtHypervisor:
    hv = LibvirtHypervisor(
        conn, "default", pool_capacity_bytes=host_facts.read_node_file_pool_capacity(URI, "default")
    )
    hv.ensure_pool(Path("/nonexistent/not-used-on-test"))
    return hv


@pytest.fixture
def handlers(hv: LibvirtHypervisor, tmp_path: Path) -> AgentHandlers:
    # the test driver's default pool, and this test's directory for images made by hand
    return AgentHandlers(hv, lambda: 0, storage=HostStorage.for_host(hv, [StoragePool("tmp", str(tmp_path))]))


#: as in tests/unit/test_fake_hypervisor.py, whose parity test runs the fake against this driver
spec = functools.partial(vm_spec, max_vcpus=4, max_memory_mib=2048)


def ref(s: VmSpec) -> VmRef:
    return VmRef(s.uuid, s.name)


def test_node_facts(hv: LibvirtHypervisor) -> None:
    facts = hv.node_facts()
    assert facts.hypervisor_type == "TEST"
    assert facts.cpu.cpus == 8 and facts.cpu.cores == 4 and facts.cpu.threads == 2 and facts.cpu.mhz == 2600
    assert facts.memory_mib == 16384
    assert facts.free_memory_mib == 0  # the test driver does not know; the report computes it
    assert facts.networks == ("default",)
    assert facts.bridges == ("br0",)  # declared in the node file
    assert hv.bridge_exists("br0") and not hv.bridge_exists("br9")
    assert facts.hw_virt is True  # simulated hosts model KVM-capable hardware by default
    assert facts.storage is not None
    assert (facts.storage.name, facts.storage.path) == ("default", "/var/lib/virtfleet/images")
    assert facts.storage.capacity_gib == 200  # from the node file, not the driver's 100 GiB


def test_create_status_lifecycle_delete(hv: LibvirtHypervisor, handlers: AgentHandlers) -> None:
    s = spec()
    created = handlers.create(CreateVm(spec=s))

    assert created.status is not None
    st = created.status
    assert (st.uuid, st.name, st.state) == (s.uuid, "web1", PowerState.RUNNING)
    assert (st.vcpus, st.max_vcpus, st.memory_mib, st.max_memory_mib) == (2, 4, 1024, 2048)
    assert st.managed is True and st.persistent is True
    path = hv.volume_path("default", "web1-vda.qcow2")
    assert path == "/var/lib/virtfleet/images/web1-vda.qcow2"
    assert created.disks[0].path == path
    assert hv.owned_volumes(s.uuid) == (path,)
    storage = hv.node_facts().storage
    # volumes are sparse: nothing is allocated until the guest writes
    assert storage is not None and (storage.allocation_gib, storage.available_gib) == (0, 200)

    for action, state in (
        (handlers.suspend, PowerState.PAUSED),
        (handlers.resume, PowerState.RUNNING),
        (handlers.reboot, PowerState.RUNNING),
    ):
        status = action(VmAction(ref(s))).status
        assert status is not None and status.state is state, action
    down = handlers.shutdown(ShutdownVm(ref(s), timeout_s=10))
    assert down.status is not None and down.status.state is PowerState.SHUTOFF
    up = handlers.start(VmAction(ref(s)))
    assert up.status is not None and up.status.state is PowerState.RUNNING
    off = handlers.destroy(VmAction(ref(s)))
    assert off.status is not None and off.status.state is PowerState.SHUTOFF
    again_off = handlers.destroy(VmAction(ref(s)))  # already off: fine
    assert again_off.status is not None and again_off.status.state is PowerState.SHUTOFF

    again = handlers.create(CreateVm(spec=s, start=False))
    assert again.message == "already defined"

    deleted = handlers.delete(DeleteVm(ref(s), delete_disks=True))
    assert deleted.status is None
    assert hv.find(s.uuid) is None
    assert hv.volume_path("default", "web1-vda.qcow2") is None
    assert handlers.delete(DeleteVm(ref(s), delete_disks=True)).status is None


def test_delete_keeps_existing_images(hv: LibvirtHypervisor, handlers: AgentHandlers, tmp_path: Path) -> None:
    image = tmp_path / "base.raw"
    image.write_bytes(b"\0" * 512)
    golden = hv.create_volume("default", "golden.qcow2", DiskFormat.QCOW2, 2)
    s = spec(
        disks=(
            DiskSpec(target="vda", size_gib=1, format=DiskFormat.RAW),
            DiskSpec(target="vdb", source="existing", path=str(image), format=DiskFormat.RAW),
            DiskSpec(target="vdc", source="existing", path=golden),
        )
    )
    handlers.create(CreateVm(spec=s))
    handlers.delete(DeleteVm(ref(s), delete_disks=True))
    assert hv.volume_path("default", "web1-vda.raw") is None
    assert hv.volume_path("default", "golden.qcow2") == golden
    assert image.exists()


def test_list_statuses_sees_a_domain_defined_behind_our_back(
    hv: LibvirtHypervisor, handlers: AgentHandlers
) -> None:
    ours = spec("ours")
    handlers.create(CreateVm(spec=ours))
    foreign_uuid = str(uuid_mod.uuid4())
    hv.conn.defineXML(  # like `virsh define` on the same hypervisor
        f"<domain type='test'><name>handmade</name><uuid>{foreign_uuid}</uuid>"
        "<memory unit='MiB'>256</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>"
    )

    statuses = {s.name: s for s in hv.list_statuses()}

    assert set(statuses) == {"ours", "handmade"}
    assert statuses["ours"].managed is True
    assert statuses["handmade"].managed is False
    assert statuses["handmade"].state is PowerState.SHUTOFF
    assert statuses["handmade"].memory_mib == 256

    report = build_report(
        host_id="h",
        libvirt_uri=URI,
        agent_version="x",
        facts=hv.node_facts(),
        vms=hv.list_statuses(),
        seq=1,
        started_at=0,
        reported_at=0,
    )
    assert report.memory_free_mib == 16384 - 1024  # only the running VM counts


def test_name_clash_is_refused_before_libvirt(hv: LibvirtHypervisor, handlers: AgentHandlers) -> None:
    handlers.create(CreateVm(spec=spec("dup")))
    with pytest.raises(AlreadyExists):
        handlers.create(CreateVm(spec=spec("dup", disks=())))


def test_start_of_an_unknown_uuid_is_not_found(hv: LibvirtHypervisor) -> None:
    with pytest.raises(NotFound) as info:
        hv.start(str(uuid_mod.uuid4()))
    assert info.value.details["code"] == libvirt.VIR_ERR_NO_DOMAIN


def test_libvirt_errors_keep_their_code(hv: LibvirtHypervisor) -> None:
    s = spec(disks=())
    hv.define(build_domain_xml(s))
    with pytest.raises(HypervisorError) as info:
        hv.destroy(s.uuid)  # not running
    assert info.value.details["code"] == libvirt.VIR_ERR_OPERATION_INVALID
    assert "not running" in info.value.message

    with pytest.raises(HypervisorError) as clash:
        hv.define(build_domain_xml(spec(s.name, disks=())))  # same name, another uuid
    assert clash.value.details["code"] == libvirt.VIR_ERR_OPERATION_FAILED


def test_volumes_are_idempotent(hv: LibvirtHypervisor) -> None:
    first = hv.create_volume("default", "v.qcow2", DiskFormat.QCOW2, 1)
    assert hv.create_volume("default", "v.qcow2", DiskFormat.QCOW2, 1) == first
    assert hv.path_exists(first)
    assert hv.delete_volume("default", "v.qcow2") is True
    assert hv.delete_volume("default", "v.qcow2") is False
    assert not hv.path_exists(first)
    with pytest.raises(NotFound):
        hv.volume_path("nopool", "v.qcow2")


def test_autostart_and_undefine(hv: LibvirtHypervisor) -> None:
    s = spec(disks=())
    hv.define(build_domain_xml(s))
    hv.set_autostart(s.uuid, True)
    assert hv.status(s.uuid).autostart is True
    hv.undefine(s.uuid)
    assert hv.find(s.uuid) is None
    hv.undefine(s.uuid)  # gone already: fine


def test_open_errors_are_translated() -> None:
    with pytest.raises(HypervisorError) as info:
        open_connection("test:///nonexistent/node.xml")
    assert isinstance(info.value.details["code"], int)


def test_missing_pool_on_a_simulated_host(conn: Any) -> None:
    with pytest.raises(NotFound, match="node file"):
        LibvirtHypervisor(conn, "nosuchpool").ensure_pool(Path("/unused"))
    assert host_facts.is_test_uri(URI)


def test_lifecycle_events_reach_the_watcher_for_changes_made_outside_the_agent(
    hv: LibvirtHypervisor, handlers: AgentHandlers, conn: Any
) -> None:
    """What feeds the agent's deltas: libvirt's lifecycle events, here from the test driver."""
    seen: list[str] = []
    arrived = threading.Condition()

    def changed(uuid: str) -> None:
        with arrived:
            seen.append(uuid)
            arrived.notify_all()

    def wait_for(count: int) -> None:
        with arrived:
            assert arrived.wait_for(lambda: len(seen) >= count, timeout=10), f"{count} events, got {seen}"

    unwatch = hv.watch_lifecycle(changed)
    assert unwatch is not None
    s = spec(name="events")
    try:
        handlers.create(CreateVm(spec=s, start=True))
        wait_for(2)  # defined, started
        conn.lookupByUUIDString(s.uuid).destroy()  # virsh destroy, behind the agent's back
        wait_for(3)
        assert set(seen) == {s.uuid}
    finally:
        unwatch()
    handlers.delete(DeleteVm(vm=ref(s), delete_disks=True))
    time.sleep(0.2)  # an event would arrive within a millisecond on this driver
    assert len(seen) == 3, "no events after unwatch"


def test_status_parses_a_definition_only_when_it_changed(
    hv: LibvirtHypervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """status() keeps the facts of a domain's last parsed XML: the reporter's status right after a
    command's own costs no second parse. A changed definition is parsed again, and gives what
    a status without that memory gives."""
    parses: list[str] = []

    def timeless(status: VmStatus | None) -> VmStatus | None:  # the test driver's CPU time is a clock
        return None if status is None else replace(status, cpu_time_ns=0)

    def counting(xml: str) -> Any:
        parses.append(xml)
        return parse_domain_xml(xml)

    monkeypatch.setattr("agent.drivers.libvirt_driver.parse_domain_xml", counting)
    s = spec(disks=())
    hv.define(build_domain_xml(s))
    first = timeless(hv.status(s.uuid))
    assert timeless(hv.status(s.uuid)) == first and timeless(hv.find(s.uuid)) == first
    assert len(parses) == 1
    hv.set_vcpus(s.uuid, 3, live=False, config=True)
    hv.mark_managed(s.uuid)
    changed = hv.status(s.uuid)
    assert len(parses) == 2
    assert (changed.vcpus, changed.managed) == (3, True)
    hv.start(s.uuid)
    running = hv.status(s.uuid)
    assert len(parses) == 3 and running.state is PowerState.RUNNING
    fresh = LibvirtHypervisor(hv.conn, "default", simulated=True)  # nothing remembered
    assert timeless(fresh.status(s.uuid)) == timeless(running)


def test_status_of_an_unparsable_definition_is_unmanaged_every_time(
    hv: LibvirtHypervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(_xml: str) -> Any:
        raise DomainXmlError("unusable")

    monkeypatch.setattr("agent.drivers.libvirt_driver.parse_domain_xml", refuse)
    s = spec(vcpus=2, disks=())
    hv.define(build_domain_xml(s))
    hv.mark_managed(s.uuid)
    for _ in range(2):
        status = hv.status(s.uuid)
        assert (status.managed, status.max_vcpus) == (False, 2)


def test_power_is_the_state_and_autostart_of_status(hv: LibvirtHypervisor) -> None:
    s = spec(disks=())
    hv.define(build_domain_xml(s))
    seen = []
    for step in ("defined", "autostart", "started"):
        if step == "autostart":
            hv.set_autostart(s.uuid, True)
        elif step == "started":
            hv.start(s.uuid)
        status = hv.status(s.uuid)
        assert hv.power(s.uuid) == (status.state, status.autostart)
        seen.append(hv.power(s.uuid))
    assert seen == [(PowerState.SHUTOFF, False), (PowerState.SHUTOFF, True), (PowerState.RUNNING, True)]
    with pytest.raises(NotFound):
        hv.power(str(uuid_mod.uuid4()))


def test_undefined_domains_are_not_remembered(hv: LibvirtHypervisor, conn: Any) -> None:
    ours, theirs = spec("ours", disks=()), spec("theirs", disks=())
    for s in (ours, theirs):
        hv.define(build_domain_xml(s))
        hv.status(s.uuid)
    hv.undefine(ours.uuid)
    conn.lookupByUUIDString(theirs.uuid).undefine()  # behind the agent's back
    assert hv.find(ours.uuid) is None
    hv.list_statuses()
    assert hv._parsed == {}
