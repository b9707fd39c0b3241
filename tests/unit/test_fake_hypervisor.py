"""The shipped FakeHypervisor / FakeImages: libvirt-like strictness, hot-plug, snapshots, storage,
and parity with the real LibvirtHypervisor on libvirt's in-process test driver.

The parity scenarios run the same calls on both and compare what comes back (statuses, paths,
snapshot lists, error types and libvirt codes). They cover what the test driver implements; what
it cannot do (hot-plug, block resize, disk locks, vCPU unplug) is pinned by the fake-only tests.
"""

from __future__ import annotations

import functools
import uuid as uuid_mod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import pytest
from builders import vm_spec

from agent.drivers import host_facts
from agent.drivers import libvirt_driver as lv
from agent.drivers.fake import (
    OWNED_VOLUMES_NS as FAKE_OWNED_NS,
)
from agent.drivers.fake import (
    FakeHypervisor,
    FakeImages,
    FakeStorage,
    libvirt_error,
)
from agent.handlers import AgentHandlers
from agent.ports import GIB, Hypervisor
from common.domain_xml import (
    build_disk_xml,
    build_domain_xml,
    build_interface_xml,
    build_snapshot_xml,
    detach_disk_xml,
    parse_domain_xml,
    parse_snapshot_xml,
)
from common.errors import (
    AlreadyExists,
    Conflict,
    HypervisorError,
    InvalidRequest,
    NotFound,
    StorageError,
    Unsupported,
    VirtfleetError,
)
from common.messages.base import replace
from common.messages.vm import (
    CreateVm,
    DeleteVm,
    DiskBus,
    DiskFormat,
    DiskSpec,
    DomainType,
    GraphicsSpec,
    NicKind,
    NicSpec,
    PowerState,
    ShutdownVm,
    VmAction,
    VmRef,
    VmSpec,
    VmStatus,
)

NODES = Path(__file__).resolve().parents[1] / "fixtures" / "nodes"
SMALL = NODES / "small.xml"
POOL = "/var/lib/virtfleet/images"


spec = functools.partial(vm_spec, max_vcpus=4, max_memory_mib=2048, disks=())


def code(exc: pytest.ExceptionInfo[VirtfleetError]) -> int:
    return int(exc.value.details["code"])


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def hv() -> FakeHypervisor:
    """A QEMU-like host: domain types qemu and kvm, bridge br0, network default."""
    return FakeHypervisor(bridges=("br0",))


def qemu_spec(name: str = "web1", **kw: Any) -> VmSpec:
    return spec(name, domain_type=DomainType.QEMU, **kw)


def defined(hv: FakeHypervisor, s: VmSpec, *, start: bool = False) -> str:
    """Define ``s`` (its new disks become pool volumes first); optionally start it."""
    disks = []
    for d in s.disks:
        if d.path is None:
            path = hv.create_volume(
                hv.default_pool, f"{s.name}-{d.target}.{d.format.value}", d.format, d.size_gib
            )
            d = DiskSpec(target=d.target, size_gib=d.size_gib, format=d.format, path=path, bus=d.bus)  # noqa: PLW2901
        disks.append(d)
    xml = build_domain_xml(replace(s, disks=tuple(disks)))
    uuid = hv.define(xml)
    if start:
        hv.start(uuid)
    return uuid


# ------------------------------------------------------------------------------------------ contract


def test_the_fakes_satisfy_the_ports() -> None:
    fake = FakeHypervisor()
    port: Hypervisor = (
        fake  # mypy: structural check with exact signatures (see agent.drivers.fake._typecheck)
    )
    assert port.default_pool == "default"
    assert isinstance(fake.images(), FakeImages)


def test_libvirt_codes_and_error_translation_match_the_bindings() -> None:
    from agent.drivers import fake  # noqa: PLC0415

    for name in dir(fake):
        if name.startswith(("VIR_ERR_", "VIR_FROM_")):
            assert getattr(fake, name) == getattr(libvirt, name), name
    assert FAKE_OWNED_NS == lv.OWNED_VOLUMES_NS
    for c in (1, 3, 8, 9, 38, 42, 43, 49, 50, 55, 68, 72, 84, 99):
        exc = libvirt.libvirtError("x")
        exc.err = (c, 12, "some text", 2, "", None, None, 0, 0)
        real = lv.translate_error(exc, "doing it")
        mine = libvirt_error("doing it", c, "some text")
        assert (type(mine), mine.message, mine.details) == (type(real), real.message, real.details), c


# ------------------------------------------------------------------------------------------ strictness


def test_lifecycle_refusals_carry_libvirts_codes(hv: FakeHypervisor) -> None:
    uuid = defined(hv, qemu_spec())
    for op in (hv.destroy, hv.reboot):
        with pytest.raises(HypervisorError) as info:
            op(uuid)
        assert code(info) == libvirt.VIR_ERR_OPERATION_INVALID and "not running" in info.value.message
    with pytest.raises(HypervisorError, match="not running") as info:
        hv.suspend(uuid)
    assert code(info) == libvirt.VIR_ERR_INTERNAL_ERROR
    with pytest.raises(HypervisorError, match="not paused"):
        hv.resume(uuid)
    hv.start(uuid)
    with pytest.raises(HypervisorError, match="already running") as info:
        hv.start(uuid)
    assert info.value.message.startswith(f"cannot start VM {uuid}: ")
    with pytest.raises(HypervisorError, match="not paused"):
        hv.resume(uuid)
    hv.suspend(uuid)
    with pytest.raises(HypervisorError, match="not running"):
        hv.suspend(uuid)
    hv.reboot(uuid)  # like the test driver, a reboot runs a paused domain again
    assert hv.status(uuid).state is PowerState.RUNNING
    # every changing call is logged, refused ones too
    refused_first = ["define", "destroy", "reboot", "suspend", "resume", "start", "start"]
    assert hv.calls == [*refused_first, "resume", "suspend", "suspend", "reboot"]


def test_define_refusals(hv: FakeHypervisor) -> None:
    s = qemu_spec()
    uuid = hv.define(build_domain_xml(s))
    assert hv.define(build_domain_xml(s)) == uuid  # a redefinition is fine
    with pytest.raises(HypervisorError, match="already exists with uuid") as info:
        hv.define(build_domain_xml(qemu_spec()))
    assert code(info) == libvirt.VIR_ERR_OPERATION_FAILED
    renamed = replace(s, name="other")
    with pytest.raises(HypervisorError, match="is already defined with uuid"):
        hv.define(build_domain_xml(renamed))
    with pytest.raises(HypervisorError, match="missing domain type"):
        hv.define("<domain><name>x</name></domain>")
    with pytest.raises(HypervisorError) as info:
        hv.define("<domain")
    assert code(info) == libvirt.VIR_ERR_XML_DETAIL
    with pytest.raises(HypervisorError, match="domaintype=test"):
        hv.define(build_domain_xml(spec("t")))  # a QEMU host has no domain type test
    no_kvm = FakeHypervisor(hw_virt=False)
    with pytest.raises(HypervisorError, match="domaintype=kvm"):
        no_kvm.define(build_domain_xml(spec("k", domain_type=DomainType.KVM)))
    made_up = hv.define(
        "<domain type='qemu'><name>nouuid</name><memory unit='MiB'>64</memory>"
        "<devices><interface type='bridge'><source bridge='br0'/></interface></devices></domain>"
    )
    nic = parse_domain_xml(hv.domain_xml(made_up, live=False)).nics[0]
    assert uuid_mod.UUID(made_up) and nic.mac is not None  # libvirt makes up the uuid and the MAC


UUID_METHODS: dict[str, Callable[[FakeHypervisor, str], object]] = {
    "status": lambda h, u: h.status(u),
    "power": lambda h, u: h.power(u),
    "start": lambda h, u: h.start(u),
    "shutdown": lambda h, u: h.shutdown(u, 1, False),
    "destroy": lambda h, u: h.destroy(u),
    "reboot": lambda h, u: h.reboot(u),
    "suspend": lambda h, u: h.suspend(u),
    "resume": lambda h, u: h.resume(u),
    "set_autostart": lambda h, u: h.set_autostart(u, True),
    "set_owned_volumes": lambda h, u: h.set_owned_volumes(u, ()),
    "owned_volumes": lambda h, u: h.owned_volumes(u),
    "domain_xml": lambda h, u: h.domain_xml(u, live=True),
    "mark_managed": lambda h, u: h.mark_managed(u),
    "set_vcpus": lambda h, u: h.set_vcpus(u, 1, live=False, config=True),
    "set_memory": lambda h, u: h.set_memory(u, 64, live=False, config=True),
    "memory_stats": lambda h, u: h.memory_stats(u),
    "create_snapshot": lambda h, u: h.create_snapshot(u, build_snapshot_xml("s")),
    "list_snapshots": lambda h, u: h.list_snapshots(u),
    "revert_snapshot": lambda h, u: h.revert_snapshot(u, "s"),
    "delete_snapshot": lambda h, u: h.delete_snapshot(u, "s"),
    "attach_device": lambda h, u: h.attach_device(u, "<disk/>", live=False, config=True),
    "detach_device": lambda h, u: h.detach_device(u, "<disk/>", live=False, config=True),
    "block_size": lambda h, u: h.block_size(u, "vda"),
    "block_resize": lambda h, u: h.block_resize(u, "vda", GIB),
}


@pytest.mark.parametrize("method", sorted(UUID_METHODS))
def test_an_unknown_uuid_is_not_found(hv: FakeHypervisor, method: str) -> None:
    ghost = str(uuid_mod.uuid4())
    with pytest.raises(NotFound) as info:
        UUID_METHODS[method](hv, ghost)
    assert code(info) == libvirt.VIR_ERR_NO_DOMAIN and info.value.message.endswith("Domain not found")


def test_unknown_pool_and_snapshot_are_not_found(hv: FakeHypervisor) -> None:
    for op in (
        lambda: hv.volume_path("nope", "v"),
        lambda: hv.create_volume("nope", "v", DiskFormat.QCOW2, 1),
        lambda: hv.delete_volume("nope", "v"),
        lambda: hv.pool_path("nope"),
        lambda: hv.refresh_pool("nope"),
    ):
        with pytest.raises(NotFound, match="storage pool nope: Storage pool not found") as info:
            op()
        assert code(info) == libvirt.VIR_ERR_NO_STORAGE_POOL
    uuid = defined(hv, qemu_spec())
    with pytest.raises(NotFound, match="no domain snapshot with matching name 'x'") as info:
        hv.revert_snapshot(uuid, "x")
    assert code(info) == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT


def test_vcpu_and_memory_rules(hv: FakeHypervisor) -> None:
    uuid = defined(hv, qemu_spec())  # 2 of 4 vCPUs, 1024 of 2048 MiB
    with pytest.raises(HypervisorError, match="not running"):
        hv.set_vcpus(uuid, 3, live=True, config=False)
    with pytest.raises(HypervisorError, match=r"exceeds maximum \(5 > 4\)") as info:
        hv.set_vcpus(uuid, 5, live=False, config=True)
    assert code(info) == libvirt.VIR_ERR_INVALID_ARG
    with pytest.raises(HypervisorError, match="must not be zero"):
        hv.set_vcpus(uuid, 0, live=False, config=True)
    with pytest.raises(HypervisorError, match="higher than max memory"):
        hv.set_memory(uuid, 4096, live=False, config=True)
    with pytest.raises(HypervisorError, match="not running"):
        hv.set_memory(uuid, 512, live=True, config=False)
    with pytest.raises(HypervisorError, match="not running"):
        hv.memory_stats(uuid)
    hv.set_vcpus(uuid, 1, live=False, config=True)  # lowering the definition is fine
    hv.start(uuid)
    hv.set_vcpus(uuid, 3, live=True, config=True)  # hot-add
    live = parse_domain_xml(hv.domain_xml(uuid, live=True))
    assert (live.vcpus, live.hotplugged_vcpus) == (3, 2)  # QEMU's <vcpus hotpluggable='yes'> in the live XML
    assert parse_domain_xml(hv.domain_xml(uuid, live=False)).vcpus == 3
    with pytest.raises(HypervisorError, match="vcpu unplug request timed out") as info:
        hv.set_vcpus(uuid, 2, live=True, config=False)  # QEMU's unplug needs the guest
    assert code(info) == libvirt.VIR_ERR_OPERATION_TIMEOUT
    hv.set_memory(uuid, 512, live=True, config=False)
    assert hv.status(uuid).memory_mib == 512 and hv.memory_stats(uuid)["actual"] == 512 * 1024
    assert parse_domain_xml(hv.domain_xml(uuid, live=False)).memory_mib == 1024


def test_transient_domains_have_no_definition_to_change(hv: FakeHypervisor) -> None:
    uuid = defined(hv, qemu_spec(), start=True)
    hv.undefine(uuid)
    assert hv.status(uuid).persistent is False
    for op in (
        lambda: hv.set_owned_volumes(uuid, ("/x",)),
        lambda: hv.owned_volumes(uuid),
        lambda: hv.mark_managed(uuid),
        lambda: hv.set_vcpus(uuid, 1, live=False, config=True),
        lambda: hv.attach_device(
            uuid,
            build_disk_xml(DiskSpec(target="vdb", source="existing", path="/x")),
            live=False,
            config=True,
        ),
    ):
        with pytest.raises(HypervisorError, match="transient domains do not have any persistent config"):
            op()
    hv.destroy(uuid)
    assert hv.find(uuid) is None
    hv.undefine(uuid)  # gone: fine, like LibvirtHypervisor


def test_start_checks_images_locks_and_networks(hv: FakeHypervisor) -> None:
    path = f"{POOL}/shared.qcow2"
    missing = qemu_spec("a", disks=(DiskSpec(target="vda", source="existing", path=path),))
    uuid = hv.define(build_domain_xml(missing))
    with pytest.raises(HypervisorError, match="Cannot access storage file") as info:
        hv.start(uuid)
    assert code(info) == libvirt.VIR_ERR_SYSTEM_ERROR
    hv.create_volume("default", "shared.qcow2", DiskFormat.QCOW2, 1)
    hv.start(uuid)
    other = hv.define(build_domain_xml(qemu_spec("b", disks=missing.disks)))
    with pytest.raises(HypervisorError, match='Failed to get "write" lock'):
        hv.start(other)
    for nic, error, match in (
        (NicSpec(kind=NicKind.NETWORK, source="nope"), NotFound, "no network with matching name 'nope'"),
        (NicSpec(kind=NicKind.BRIDGE, source="br9"), HypervisorError, "Cannot get interface MTU on 'br9'"),
    ):
        u = hv.define(build_domain_xml(qemu_spec(f"n-{nic.source}", nics=(nic,))))
        with pytest.raises(error, match=match):
            hv.start(u)


def test_shutdown_acpi_and_hooks(hv: FakeHypervisor) -> None:
    uuid = defined(hv, qemu_spec(), start=True)
    hv.ignore_acpi = True
    with pytest.raises(Conflict, match="did not shut down within 3 s") as info:
        hv.shutdown(uuid, 3, False)
    assert info.value.retryable is True
    hv.shutdown(uuid, 3, True)  # force: powered off after the timeout
    assert hv.status(uuid).state is PowerState.SHUTOFF
    hv.shutdown(uuid, 3, False)  # already off: nothing to do
    hv.fail_next("start", HypervisorError("injected"))
    with pytest.raises(HypervisorError, match="injected"):
        hv.start(uuid)
    hv.start(uuid)
    assert hv.count("start") == 3 and hv.count("shutdown") == 3  # the failed call counts too
    with pytest.raises(InvalidRequest):
        hv.fail_next("no_such_method", HypervisorError("x"))


def test_metadata_marker_and_owned_volumes_keep_their_prefixes(hv: FakeHypervisor) -> None:
    s = qemu_spec()
    foreign = build_domain_xml(s).replace("<metadata>", "<!--").replace("</metadata>", "-->")
    uuid = hv.define(foreign)
    assert hv.status(uuid).managed is False and hv.owned_volumes(uuid) == ()
    hv.mark_managed(uuid)
    hv.set_owned_volumes(uuid, ("/a", "/b"))
    xml = hv.domain_xml(uuid, live=False)
    assert "<vf:instance xmlns:vf=" in xml and "<vfa:volumes xmlns:vfa=" in xml
    assert hv.status(uuid).managed is True and hv.owned_volumes(uuid) == ("/a", "/b")
    assert lv.parse_owned_volumes(xml[xml.index("<vfa:volumes") : xml.index("</vfa:volumes>") + 14]) == (
        "/a",
        "/b",
    )


def test_console_password_and_ports(hv: FakeHypervisor) -> None:
    s = qemu_spec(graphics=GraphicsSpec(password="secret"))
    uuid = hv.define(build_domain_xml(s))
    graphics = parse_domain_xml(hv.domain_xml(uuid, live=True)).graphics
    assert graphics is not None and graphics.port is None, "a defined domain has graphics, no port yet"
    hv.start(uuid)
    plain = parse_domain_xml(hv.domain_xml(uuid, live=True)).graphics
    secure = parse_domain_xml(hv.domain_xml(uuid, live=True, secure=True)).graphics
    assert plain is not None and secure is not None
    assert plain.port == 5900 and not plain.password_set and secure.password == "secret"


# ------------------------------------------------------------------------------------------ hot-plug


def test_disk_hot_plug_updates_live_and_persistent_xml(hv: FakeHypervisor) -> None:
    uuid = defined(hv, qemu_spec(disks=(DiskSpec(target="vda", size_gib=2),)), start=True)
    path = hv.create_volume("default", "data.qcow2", DiskFormat.QCOW2, 5)
    disk = DiskSpec(target="vdb", source="existing", path=path)
    hv.attach_device(uuid, build_disk_xml(disk), live=True, config=True)
    for live in (True, False):
        assert [d.target for d in parse_domain_xml(hv.domain_xml(uuid, live=live)).disks] == ["vda", "vdb"]
    assert hv.block_size(uuid, "vdb") == 5 * GIB
    with pytest.raises(HypervisorError, match="target vdb already exists") as info:
        hv.attach_device(uuid, build_disk_xml(disk), live=True, config=False)
    assert code(info) == libvirt.VIR_ERR_OPERATION_INVALID
    with pytest.raises(Unsupported, match="disk bus 'sata' cannot be hotplugged"):
        hv.attach_device(
            uuid, build_disk_xml(DiskSpec(target="sdb", source="existing", path=path, bus=DiskBus.SATA)),
            live=True, config=False,
        )  # fmt: skip
    with pytest.raises(HypervisorError, match="Cannot access storage file"):
        hv.attach_device(
            uuid,
            build_disk_xml(DiskSpec(target="vdc", source="existing", path="/nope.qcow2")),
            live=True,
            config=False,
        )
    hv.block_resize(uuid, "vdb", 8 * GIB)
    assert hv.images().info(path).virtual_size_bytes == 8 * GIB
    parsed = parse_domain_xml(hv.domain_xml(uuid, live=True)).disks[1]
    hv.detach_device(uuid, detach_disk_xml(parsed), live=True, config=True)
    assert [d.target for d in parse_domain_xml(hv.domain_xml(uuid, live=True)).disks] == ["vda"]
    with pytest.raises(HypervisorError, match="disk vdb not found") as info:
        hv.detach_device(uuid, detach_disk_xml(parsed), live=False, config=True)
    assert code(info) == libvirt.VIR_ERR_DEVICE_MISSING


def test_live_detach_can_wait_for_the_guest(hv: FakeHypervisor) -> None:
    uuid = defined(
        hv, qemu_spec(nics=(NicSpec(kind=NicKind.BRIDGE, source="br0", mac="52:54:00:00:00:09"),)), start=True
    )
    hv.guest_acks_unplug = False
    nic_xml = "<interface type='bridge'><mac address='52:54:00:00:00:09'/></interface>"
    hv.detach_device(uuid, nic_xml, live=True, config=True)
    assert len(parse_domain_xml(hv.domain_xml(uuid, live=True)).nics) == 1  # still there: QEMU waits
    assert parse_domain_xml(hv.domain_xml(uuid, live=False)).nics == ()
    hv.release_devices(uuid)
    assert parse_domain_xml(hv.domain_xml(uuid, live=True)).nics == ()


def test_nic_hot_plug_gets_a_mac_and_a_tap_and_checks_its_source(hv: FakeHypervisor) -> None:
    uuid = defined(hv, qemu_spec(), start=True)
    hv.attach_device(
        uuid, "<interface type='network'><source network='default'/></interface>", live=True, config=True
    )
    (nic,) = parse_domain_xml(hv.domain_xml(uuid, live=True)).nics
    assert nic.mac is not None and nic.mac.startswith("52:54:00:") and nic.target == "vnet0"
    assert parse_domain_xml(hv.domain_xml(uuid, live=False)).nics[0].target is None
    with pytest.raises(NotFound, match="no network with matching name 'lan'"):
        hv.attach_device(
            uuid, build_interface_xml(NicSpec(kind=NicKind.NETWORK, source="lan")), live=True, config=False
        )
    hv.attach_device(
        uuid, build_interface_xml(NicSpec(kind=NicKind.NETWORK, source="lan")), live=False, config=True
    )
    with pytest.raises(HypervisorError, match=r"MAC address \S+ is already in use"):
        hv.attach_device(
            uuid,
            build_interface_xml(NicSpec(kind=NicKind.BRIDGE, source="br0", mac=nic.mac)),
            live=True,
            config=False,
        )
    stopped = defined(hv, qemu_spec("off"))
    with pytest.raises(HypervisorError, match="not running"):
        hv.attach_device(
            stopped, build_interface_xml(NicSpec(kind=NicKind.BRIDGE, source="br0")), live=True, config=False
        )
    no_acpi = hv.define(build_domain_xml(qemu_spec("noacpi")).replace("<acpi />", ""))
    hv.start(no_acpi)
    with pytest.raises(HypervisorError, match="does not support hotplugging"):
        hv.attach_device(
            no_acpi, build_interface_xml(NicSpec(kind=NicKind.BRIDGE, source="br0")), live=True, config=False
        )


# ------------------------------------------------------------------------------------------ snapshots


def snaps(hv: FakeHypervisor, uuid: str) -> list[tuple[str, str, bool, str | None, bool]]:
    out = []
    for xml, current in hv.list_snapshots(uuid):
        s = parse_snapshot_xml(xml)
        out.append((s.name, s.state, s.memory, s.parent, current))
    return sorted(out)


def test_snapshots_current_parent_memory_and_revert(hv: FakeHypervisor) -> None:
    uuid = defined(hv, qemu_spec(disks=(DiskSpec(target="vda", size_gib=1),)))
    path = hv.volume_path("default", "web1-vda.qcow2")
    assert path is not None
    hv.create_snapshot(uuid, build_snapshot_xml("off", "before boot"))
    hv.start(uuid)
    hv.set_memory(uuid, 512, live=True, config=False)
    hv.create_snapshot(uuid, build_snapshot_xml("on"))
    with pytest.raises(HypervisorError, match="domain moment on already exists"):
        hv.create_snapshot(uuid, build_snapshot_xml("on"))
    assert snaps(hv, uuid) == [("off", "shutoff", False, None, False), ("on", "running", True, "off", True)]
    assert hv.images().info(path).snapshots == 2  # internal qcow2 snapshots
    hv.revert_snapshot(uuid, "off")
    assert hv.status(uuid).state is PowerState.SHUTOFF and snaps(hv, uuid)[0][4] is True
    hv.revert_snapshot(uuid, "on")
    status = hv.status(uuid)
    assert (status.state, status.memory_mib) == (PowerState.RUNNING, 512)
    hv.delete_snapshot(uuid, "on")  # the current one: its parent becomes current
    assert snaps(hv, uuid) == [("off", "shutoff", False, None, True)]
    assert hv.images().info(path).snapshots == 1
    hv.destroy(uuid)
    hv.undefine(uuid)  # the snapshot metadata goes, the qcow2's internal snapshot stays
    assert hv.images().info(path).snapshots == 1


def test_snapshot_refusals_follow_qemu(hv: FakeHypervisor) -> None:
    raw = defined(hv, qemu_spec("raw", disks=(DiskSpec(target="vda", size_gib=1, format=DiskFormat.RAW),)))
    with pytest.raises(Unsupported, match="internal snapshot for disk vda unsupported for storage type raw"):
        hv.create_snapshot(raw, build_snapshot_xml("s"))
    uuid = defined(hv, qemu_spec(), start=True)
    hv.set_vcpus(uuid, 3, live=True, config=False)
    hv.create_snapshot(uuid, build_snapshot_xml("hot"))
    with pytest.raises(HypervisorError, match="Error -22 while loading VM state"):
        hv.revert_snapshot(uuid, "hot")
    assert hv.status(uuid).state is PowerState.SHUTOFF  # as QEMU left it


# ------------------------------------------------------------------------------------------ storage


def test_volumes_pools_and_capacity(hv: FakeHypervisor) -> None:
    path = hv.create_volume("default", "a.qcow2", DiskFormat.QCOW2, 300)  # sparse: more than the pool is fine
    assert path == f"{POOL}/a.qcow2"
    assert hv.create_volume("default", "a.qcow2", DiskFormat.RAW, 1) == path  # reused whatever its size
    assert hv.is_pool_volume(path) and hv.path_exists(path) and hv.pool_path("default") == POOL
    storage = hv.node_facts().storage
    assert storage is not None and (storage.capacity_gib, storage.allocation_gib, storage.available_gib) == (
        200,
        0,
        200,
    )
    images = hv.images()
    images.create(f"{POOL}/made.raw", DiskFormat.RAW, 2)
    assert hv.volume_path("default", "made.raw") is None  # libvirt sees it after a refresh
    hv.refresh_pool("default")
    assert hv.volume_path("default", "made.raw") == f"{POOL}/made.raw"
    f = hv.storage.get(f"{POOL}/made.raw")
    assert f is not None
    f.actual_size = 50 * GIB  # the guest wrote
    storage = hv.node_facts().storage
    assert storage is not None and (storage.allocation_gib, storage.available_gib) == (50, 150)
    with pytest.raises(HypervisorError, match="File exists"):
        hv.add_file(f"{POOL}/stray.qcow2")
        hv.create_volume("default", "stray.qcow2", DiskFormat.QCOW2, 1)
    with pytest.raises(HypervisorError, match="cannot contain '/'"):
        hv.create_volume("default", "../x", DiskFormat.QCOW2, 1)
    assert hv.delete_volume_path(path) is True and hv.delete_volume_path(path) is False
    assert (
        hv.delete_volume("default", "made.raw") is True and hv.delete_volume("default", "made.raw") is False
    )
    assert not hv.path_exists(path)
    assert hv.network_exists("default") and not hv.network_exists("x")
    assert hv.bridge_exists("br0") and not hv.bridge_exists("br9")


def test_fake_images_are_qemu_img() -> None:
    storage = FakeStorage()
    storage.add_dir("/img")
    in_use: set[str] = set()
    images = FakeImages(storage, in_use.__contains__)
    made = images.create("/img/a.qcow2", DiskFormat.QCOW2, 2)
    assert (made.format, made.virtual_size_bytes, made.cluster_size) == ("qcow2", 2 * GIB, 65536)
    with pytest.raises(AlreadyExists, match="never overwrites"):
        images.create("/img/a.qcow2", DiskFormat.QCOW2, 2)  # not even the very same image
    with pytest.raises(AlreadyExists, match="never overwrites"):
        images.create("/img/a.qcow2", DiskFormat.RAW, 2)
    with pytest.raises(NotFound, match="directory does not exist"):
        images.create("/nodir/a.qcow2", DiskFormat.QCOW2, 1)
    with pytest.raises(NotFound):
        images.info("/img/none")
    copy = images.convert("/img/a.qcow2", "qcow2", "/img/b.raw", DiskFormat.RAW)
    assert (copy.format, copy.virtual_size_bytes) == ("raw", 2 * GIB)
    with pytest.raises(AlreadyExists):
        images.convert("/img/a.qcow2", "qcow2", "/img/b.raw", DiskFormat.RAW)
    with pytest.raises(InvalidRequest, match="shrinking"):
        images.resize("/img/a.qcow2", "qcow2", 1)
    assert images.resize("/img/a.qcow2", "qcow2", 4).virtual_size_bytes == 4 * GIB
    in_use.add("/img/a.qcow2")
    with pytest.raises(StorageError, match="is a running VM using it"):
        images.resize("/img/a.qcow2", "qcow2", 5)
    assert images.info("/img/a.qcow2").virtual_size_bytes == 4 * GIB  # reading is fine (-U)


# ------------------------------------------------------------------------------------------ parity


@pytest.fixture
def libvirt_hv() -> Iterator[lv.LibvirtHypervisor]:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    uri = f"test://{SMALL}"
    conn = lv.open_connection(uri)
    hv = lv.LibvirtHypervisor(
        conn, "default", pool_capacity_bytes=host_facts.read_node_file_pool_capacity(uri, "default")
    )
    hv.ensure_pool(Path("/nonexistent"))
    yield hv
    conn.close()


def test_node_file_hosts_report_what_the_test_driver_reports(libvirt_hv: lv.LibvirtHypervisor) -> None:
    real = libvirt_hv.node_facts()
    fake = FakeHypervisor.from_node_xml(SMALL).node_facts()
    for name in (
        "hypervisor_type",
        "cpu",
        "memory_mib",
        "free_memory_mib",
        "storage",
        "networks",
        "bridges",
        "hw_virt",
    ):
        assert getattr(fake, name) == getattr(real, name), name


@pytest.mark.parametrize("node", ["large", "medium", "tuning-numa"])
def test_other_node_files(node: str) -> None:
    uri = f"test://{NODES / f'{node}.xml'}"
    conn = lv.open_connection(uri)
    try:
        real = lv.LibvirtHypervisor(
            conn, "default", pool_capacity_bytes=host_facts.read_node_file_pool_capacity(uri, "default")
        )
        fake = FakeHypervisor.from_node_xml(NODES / f"{node}.xml")
        assert (fake.node_facts().cpu, fake.node_facts().storage) == (
            real.node_facts().cpu,
            real.node_facts().storage,
        )
        assert [s.name for s in fake.list_statuses()] == [s.name for s in real.list_statuses()]
    finally:
        conn.close()


@dataclass
class Recorder:
    """Runs calls on one hypervisor and writes down what came back, comparable across drivers."""

    hv: Hypervisor
    log: list[tuple[str, object]] = field(default_factory=list)

    def __call__(self, label: str, fn: Callable[[], object]) -> object:
        try:
            result = fn()
        except VirtfleetError as exc:
            self.log.append((label, (type(exc).__name__, exc.details.get("code"))))
            return None
        self.log.append((label, summary(result)))
        return result


def summary(value: object) -> object:
    if isinstance(value, VmStatus):
        return (value.name, value.state, value.vcpus, value.max_vcpus, value.memory_mib, value.max_memory_mib,
                value.autostart, value.persistent, value.managed)  # fmt: skip
    if isinstance(value, tuple) and value and isinstance(value[0], VmStatus):
        return tuple(summary(v) for v in value)
    return value


Scenario = Callable[[Recorder, str], None]


def s_lifecycle(r: Recorder, uuid: str) -> None:
    hv = r.hv
    r("define", lambda: hv.define(build_domain_xml(spec(uuid=uuid))) == uuid)
    r("status", lambda: hv.status(uuid))
    r("power", lambda: hv.power(uuid))
    r("destroy off", lambda: hv.destroy(uuid))
    r("suspend off", lambda: hv.suspend(uuid))
    r("resume off", lambda: hv.resume(uuid))
    r("reboot off", lambda: hv.reboot(uuid))
    r("reset off", lambda: hv.reset(uuid))
    r("shutdown off", lambda: hv.shutdown(uuid, 1, False))
    r("start", lambda: hv.start(uuid))
    r("start again", lambda: hv.start(uuid))
    r("resume running", lambda: hv.resume(uuid))
    r("suspend", lambda: hv.suspend(uuid))
    r("status", lambda: hv.status(uuid))
    r("power paused", lambda: hv.power(uuid))
    r("suspend again", lambda: hv.suspend(uuid))
    r("reset paused", lambda: hv.reset(uuid))
    r("status after reset", lambda: hv.status(uuid))
    r("resume", lambda: hv.resume(uuid))
    r("reboot", lambda: hv.reboot(uuid))
    r("reset", lambda: hv.reset(uuid))
    r("shutdown", lambda: hv.shutdown(uuid, 5, False))
    r("status", lambda: hv.status(uuid))
    r("start", lambda: hv.start(uuid))
    r("suspend", lambda: hv.suspend(uuid))
    r("destroy paused", lambda: hv.destroy(uuid))
    r("autostart", lambda: hv.set_autostart(uuid, True))
    r("status", lambda: hv.status(uuid))
    r("power autostart", lambda: hv.power(uuid))
    r("list", hv.list_statuses)
    r("undefine", lambda: hv.undefine(uuid))
    r("find", lambda: hv.find(uuid))
    r("undefine again", lambda: hv.undefine(uuid))


def s_names(r: Recorder, uuid: str) -> None:
    hv = r.hv
    s = spec(uuid=uuid)
    r("define", lambda: hv.define(build_domain_xml(s)) == uuid)
    r("same name, other uuid", lambda: hv.define(build_domain_xml(spec())))
    r("same uuid, other name", lambda: hv.define(build_domain_xml(spec("other", uuid=uuid))))
    r("malformed", lambda: hv.define("<domain"))
    r("no type", lambda: hv.define("<domain><name>x</name></domain>"))
    r("uuid for name", lambda: hv.uuid_for_name("web1") == uuid)
    r("uuid for ghost", lambda: hv.uuid_for_name("ghost"))
    r("unknown start", lambda: hv.start(str(uuid_mod.uuid4())))
    r("unknown xml", lambda: hv.domain_xml(str(uuid_mod.uuid4()), live=True))


def s_transient(r: Recorder, uuid: str) -> None:
    hv = r.hv
    r("define", lambda: hv.define(build_domain_xml(spec(uuid=uuid))) == uuid)
    r("owned none", lambda: hv.owned_volumes(uuid))
    r("set owned", lambda: hv.set_owned_volumes(uuid, ("/a", "/b")))
    r("owned", lambda: hv.owned_volumes(uuid))
    r("start", lambda: hv.start(uuid))
    r("undefine running", lambda: hv.undefine(uuid))
    r("status", lambda: hv.status(uuid))
    r("set owned", lambda: hv.set_owned_volumes(uuid, ()))
    r("owned", lambda: hv.owned_volumes(uuid))
    r("mark", lambda: hv.mark_managed(uuid))
    r("vcpus config", lambda: hv.set_vcpus(uuid, 1, live=False, config=True))
    r("memory config", lambda: hv.set_memory(uuid, 512, live=False, config=True))
    r("shutdown", lambda: hv.shutdown(uuid, 1, False))
    r("find", lambda: hv.find(uuid))


def s_resources(r: Recorder, uuid: str) -> None:
    hv = r.hv
    r("define", lambda: hv.define(build_domain_xml(spec(uuid=uuid))) == uuid)
    r("vcpus live off", lambda: hv.set_vcpus(uuid, 3, live=True, config=False))
    r("vcpus config 3", lambda: hv.set_vcpus(uuid, 3, live=False, config=True))
    r("vcpus config 5", lambda: hv.set_vcpus(uuid, 5, live=False, config=True))
    r("vcpus 0", lambda: hv.set_vcpus(uuid, 0, live=False, config=True))
    r("memory live off", lambda: hv.set_memory(uuid, 512, live=True, config=False))
    r("memory config", lambda: hv.set_memory(uuid, 512, live=False, config=True))
    r("memory over max", lambda: hv.set_memory(uuid, 4096, live=False, config=True))
    r("memory 0", lambda: hv.set_memory(uuid, 0, live=False, config=True))
    r("memstat off", lambda: hv.memory_stats(uuid))
    r("status", lambda: hv.status(uuid))
    r("start", lambda: hv.start(uuid))
    r("vcpus live 4", lambda: hv.set_vcpus(uuid, 4, live=True, config=False))
    r("vcpus live 5", lambda: hv.set_vcpus(uuid, 5, live=True, config=False))
    r("memory live", lambda: hv.set_memory(uuid, 256, live=True, config=False))
    r("memory live over max", lambda: hv.set_memory(uuid, 4096, live=True, config=False))
    r("status", lambda: hv.status(uuid))
    r("memstat actual", lambda: hv.memory_stats(uuid)["actual"])
    r("live vcpus", lambda: parse_domain_xml(hv.domain_xml(uuid, live=True)).vcpus)
    r("config vcpus", lambda: parse_domain_xml(hv.domain_xml(uuid, live=False)).vcpus)
    r("config memory", lambda: parse_domain_xml(hv.domain_xml(uuid, live=False)).memory_mib)
    r("xmls", lambda: [(u == uuid, n, len(x)) for u, n, x in hv.domain_xmls()])


def s_snapshots(r: Recorder, uuid: str) -> None:
    hv = r.hv
    path = hv.create_volume("default", "snap.qcow2", DiskFormat.QCOW2, 1)
    s = spec(uuid=uuid, disks=(DiskSpec(target="vda", source="existing", path=path),))
    r("define", lambda: hv.define(build_domain_xml(s)) == uuid)

    def listing() -> list[tuple[str, str, bool, str | None, bool]]:
        return sorted(
            (x.name, x.state, x.memory, x.parent, c)
            for x, c in ((parse_snapshot_xml(xml), current) for xml, current in hv.list_snapshots(uuid))
        )

    r("list empty", listing)
    r("snap off", lambda: hv.create_snapshot(uuid, build_snapshot_xml("off", "described")))
    r("start", lambda: hv.start(uuid))
    r("snap on", lambda: hv.create_snapshot(uuid, build_snapshot_xml("on")))
    r("snap on again", lambda: hv.create_snapshot(uuid, build_snapshot_xml("on")))
    r("snap malformed", lambda: hv.create_snapshot(uuid, "<domainsnapshot>"))
    r("suspend", lambda: hv.suspend(uuid))
    r("snap paused", lambda: hv.create_snapshot(uuid, build_snapshot_xml("paused")))
    r("list", listing)
    r("revert off", lambda: hv.revert_snapshot(uuid, "off"))
    r("status", lambda: hv.status(uuid))
    r("revert on", lambda: hv.revert_snapshot(uuid, "on"))
    r("status", lambda: hv.status(uuid))
    r("revert paused", lambda: hv.revert_snapshot(uuid, "paused"))
    r("status", lambda: hv.status(uuid))
    r("list", listing)
    r("delete current", lambda: hv.delete_snapshot(uuid, "paused"))
    r("delete parent", lambda: hv.delete_snapshot(uuid, "off"))
    r("list", listing)
    r("revert ghost", lambda: hv.revert_snapshot(uuid, "ghost"))
    r("delete ghost", lambda: hv.delete_snapshot(uuid, "ghost"))
    r("destroy", lambda: hv.destroy(uuid))
    r("undefine with snapshots", lambda: hv.undefine(uuid))
    r("find", lambda: hv.find(uuid))


def s_storage(r: Recorder, _uuid: str) -> None:
    hv = r.hv
    r("pool path", lambda: hv.pool_path("default"))
    r("create", lambda: hv.create_volume("default", "v.qcow2", DiskFormat.QCOW2, 1))
    r("create again", lambda: hv.create_volume("default", "v.qcow2", DiskFormat.RAW, 5))
    r("path", lambda: hv.volume_path("default", "v.qcow2"))
    r("missing", lambda: hv.volume_path("default", "w.qcow2"))
    r("exists", lambda: hv.path_exists(f"{POOL}/v.qcow2"))
    r("is volume", lambda: hv.is_pool_volume(f"{POOL}/v.qcow2"))
    r("storage", lambda: hv.node_facts().storage)
    r("refresh", lambda: hv.refresh_pool("default"))
    r("delete", lambda: hv.delete_volume("default", "v.qcow2"))
    r("delete again", lambda: hv.delete_volume("default", "v.qcow2"))
    r("create raw", lambda: hv.create_volume("default", "r.raw", DiskFormat.RAW, 2))
    r("delete by path", lambda: hv.delete_volume_path(f"{POOL}/r.raw"))
    r("delete by path again", lambda: hv.delete_volume_path(f"{POOL}/r.raw"))
    r("not a volume", lambda: hv.is_pool_volume("/srv/none.qcow2"))
    for label, op in (
        ("no pool path", lambda: hv.volume_path("nope", "v")),
        ("no pool create", lambda: hv.create_volume("nope", "v", DiskFormat.QCOW2, 1)),
        ("no pool delete", lambda: hv.delete_volume("nope", "v")),
        ("no pool dir", lambda: hv.pool_path("nope")),
        ("no pool refresh", lambda: hv.refresh_pool("nope")),
    ):
        r(label, op)
    r("network", lambda: (hv.network_exists("default"), hv.network_exists("nope")))
    r("bridge", lambda: (hv.bridge_exists("br0"), hv.bridge_exists("br9")))


def s_handlers(r: Recorder, uuid: str) -> None:
    handlers = AgentHandlers(r.hv, lambda: 0)
    s = spec(
        uuid=uuid,
        disks=(DiskSpec(target="vda", size_gib=3), DiskSpec(target="vdb", size_gib=1, format=DiskFormat.RAW)),
    )
    ref = VmRef(uuid, s.name)
    r("create", lambda: handlers.create(CreateVm(spec=s)).status)
    r("create again", lambda: handlers.create(CreateVm(spec=s)).message)
    r("suspend", lambda: handlers.suspend(VmAction(ref)).status)
    r("shutdown", lambda: handlers.shutdown(ShutdownVm(ref, timeout_s=5)).status)
    r("owned", lambda: r.hv.owned_volumes(uuid))
    r("delete", lambda: handlers.delete(DeleteVm(ref, delete_disks=True)).message)
    r(
        "volumes left",
        lambda: (r.hv.volume_path("default", "web1-vda.qcow2"), r.hv.volume_path("default", "web1-vdb.raw")),
    )


SCENARIOS: dict[str, Scenario] = {
    "lifecycle": s_lifecycle,
    "names": s_names,
    "transient": s_transient,
    "vcpus-memory": s_resources,
    "snapshots": s_snapshots,
    "storage": s_storage,
    "handlers": s_handlers,
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_parity_with_the_libvirt_test_driver(name: str, libvirt_hv: lv.LibvirtHypervisor) -> None:
    uuid = str(uuid_mod.uuid4())
    real, fake = Recorder(libvirt_hv), Recorder(FakeHypervisor.from_node_xml(SMALL))
    SCENARIOS[name](real, uuid)
    SCENARIOS[name](fake, uuid)
    assert fake.log == real.log
