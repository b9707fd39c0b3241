"""One simulated host in-process (agent.fakehost): the real handlers, tuning and network modules
over the fakes of agent.drivers.fake, agent.tuning.fake and agent.network.fake."""

from __future__ import annotations

import functools
import uuid as uuid_mod
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from builders import vm_spec

from agent.fakehost import FakeHost, build_fake_host
from agent.network.fake import FakeLinkDriver
from agent.network.model import AddAddress, AddRoute, DelAddress, DeleteLink, SetLinkUp, SetMaster
from agent.reporter import build_report
from common.errors import Conflict, InvalidRequest, NetworkConfigError, NotFound
from common.messages import network as network_msgs
from common.messages import tuning as tuning_msgs
from common.messages import vm as vm_msgs
from common.messages import vmops as vmops_msgs
from common.messages.catalogue import CATALOGUE
from common.messages.descriptor import Route
from common.messages.network import (
    BondCreate,
    BridgeCreate,
    ChangeOptions,
    DefineNetwork,
    InterfaceRemove,
    NetworkSpec,
    RouteInfo,
)
from common.messages.tuning import GetAffinity, PinVm, SetHugepages
from common.messages.vm import (
    CreateVm,
    DiskFormat,
    DiskSpec,
    DomainType,
    NicKind,
    NicSpec,
    PowerState,
    VcpuPin,
    VmRef,
)
from common.messages.vmops import ImageCreate, ImageLocation, NicAttach
from common.transport.memory import MemoryBroker
from common.transport.port import Delivery
from common.transport.rpc import request, unwrap

FAST = ChangeOptions(deadline_s=1.0)
NODES = Path(__file__).resolve().parents[1] / "fixtures" / "nodes"


@pytest.fixture
def host(tmp_path: Path) -> Iterator[FakeHost]:
    h = build_fake_host(tmp_path / "state", dedicated_cpus="2-7", shared_cpus="0-1")
    yield h
    h.close()


vm = functools.partial(
    vm_spec, memory_mib=512, domain_type=DomainType.KVM, disks=(DiskSpec(target="vda", size_gib=4),)
)


def test_the_table_is_what_the_agent_serves(host: FakeHost) -> None:
    table = host.table(lambda: 0)
    assert {op.kind for op in table.ops()} == {k for k, op in CATALOGUE.items() if op.route is Route.COMMAND}


def test_everything_lives_under_the_state_dir(host: FakeHost, tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert host.config.state_dir == state
    assert host.tuning.kernel.root == state / "simulated-host"
    assert host.network.settings.root == state / "netroot"
    assert host.tuning.simulated is True
    host.tuning.hugepages(SetHugepages(size_kib=2048, count=16))
    assert (
        state / "simulated-host/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
    ).read_text().strip() == "16"


def test_vm_create_and_pin_through_the_tuning_module(host: FakeHost) -> None:
    table = host.table(lambda: 0)
    s = vm()
    created = table.handler(vm_msgs.VM_CREATE)(CreateVm(spec=s))
    assert created.status is not None and created.status.state is PowerState.RUNNING
    ref = VmRef(s.uuid, s.name)
    pinned = table.handler(tuning_msgs.TUNING_PIN)(
        PinVm(ref, vcpu_pins=(VcpuPin(0, "2"), VcpuPin(1, "3")), emulator_cpuset="0-1")
    )
    assert [p.cpuset for p in pinned.vcpu_pins] == ["2", "3"] and pinned.emulator_cpuset == "0-1"
    for live in (True, False):  # live and in the definition, as libvirt's --live --config
        tune = host.hypervisor.domain_xml(s.uuid, live=live)
        assert '<vcpupin vcpu="0" cpuset="2" />' in tune and '<emulatorpin cpuset="0-1" />' in tune
    with pytest.raises(InvalidRequest, match="not dedicated or shared"):
        host.tuning.pin(PinVm(ref, vcpu_pins=(VcpuPin(0, "9"),)))
    with pytest.raises(InvalidRequest, match="vCPUs 0-1, not vCPU 3"):
        host.tuning.pin(PinVm(ref, vcpu_pins=(VcpuPin(3, "4"),)))
    foreign = host.hypervisor.define(
        f"<domain type='kvm'><name>hand</name><uuid>{uuid_mod.uuid4()}</uuid><memory unit='MiB'>64</memory></domain>"
    )
    with pytest.raises(Conflict, match="not created by virtfleet"):
        host.tuning.pin(PinVm(VmRef(foreign, "hand"), vcpu_pins=(VcpuPin(0, "4"),)))
    with pytest.raises(NotFound):
        host.tuning.affinity(GetAffinity(VmRef(str(uuid_mod.uuid4()), "ghost")))
    assert host.tuning.affinity(GetAffinity(ref)).state == "running"


def test_a_network_defined_on_the_host_is_usable_by_its_vms(host: FakeHost) -> None:
    table = host.table(lambda: 0)
    s = vm()
    table.handler(vm_msgs.VM_CREATE)(CreateVm(spec=s))
    ref = VmRef(s.uuid, s.name)
    nic = NicSpec(kind=NicKind.NETWORK, source="lab", mac="52:54:00:aa:00:01")
    with pytest.raises(NotFound, match="no libvirt network lab"):
        table.handler(vmops_msgs.VM_NIC_ATTACH)(NicAttach(ref, nic))
    spec = NetworkSpec("lab", mode="isolated", address="10.9.0.1/24")
    result = table.handler(network_msgs.NET_DEFINE)(DefineNetwork(spec))
    assert result.network is not None and result.network.active and result.network.bridge == "virbr1"
    assert table.handler(network_msgs.NET_DEFINE)(DefineNetwork(spec)).message.startswith("already defined")
    listed = table.handler(vmops_msgs.VM_NIC_ATTACH)(NicAttach(ref, nic))
    assert [(n.type, n.source, n.interface) for n in listed.nics] == [("network", "lab", "vnet0")]
    assert "lab" in host.hypervisor.node_facts().networks


def test_bridge_create_moves_the_host_address_and_vms_can_use_it(host: FakeHost) -> None:
    table = host.table(lambda: 0)
    result = table.handler(network_msgs.NET_BRIDGE_CREATE)(
        BridgeCreate("br1", ("eth0",), options=FAST, change_id="c1")
    )
    assert result.state == "applied" and result.persistence == "networkd"
    facts = host.links.facts()
    br1, eth0 = facts.interface("br1"), facts.interface("eth0")
    assert br1 is not None and eth0 is not None
    assert br1.addresses == ("192.0.2.10/24",) and eth0.addresses == () and eth0.master == "br1"
    assert RouteInfo("default", "br1", "192.0.2.1", proto="boot") in facts.routes
    assert (host.config.state_dir / "netroot/etc/systemd/network/10-virtfleet-br1.netdev").exists()
    assert host.hypervisor.bridge_exists("br1")  # the hypervisor sees the host's bridges
    again = table.handler(network_msgs.NET_BRIDGE_CREATE)(
        BridgeCreate("br1", ("eth0",), options=FAST, change_id="c2")
    )
    assert again.state == "unchanged"


def test_a_change_that_cuts_the_host_off_is_rolled_back(host: FakeHost) -> None:
    before = host.links.facts()
    # Moving the address without the routes' new home: the default route goes with eth0's address.
    result = host.network.bridge_create(BridgeCreate("br1", ("eth0",), move_ip=False, options=FAST))
    assert result.state == "rolled-back" and result.restored, result
    after = host.links.facts()
    assert after.interfaces == before.interfaces and after.routes == before.routes
    host.probe.fail_next()
    assert host.network.bridge_create(BridgeCreate("br1", ("eth0",), options=FAST)).state == "rolled-back"
    assert host.links.facts().interface("br1") is None


def test_a_refused_change_changes_nothing(host: FakeHost) -> None:
    before = host.links.facts()
    with pytest.raises(Conflict, match="eth1 is already enslaved to br0"):
        host.network.bond_create(BondCreate("bond0", ("eth0", "eth1"), options=FAST))
    assert host.links.facts() == before and host.links.applied == []


def test_bonds_on_a_kernel_without_bonding(tmp_path: Path) -> None:
    host = build_fake_host(tmp_path / "s", bridges=(), nics=("eth0", "eth1"), bonding=False)
    before = host.links.facts()
    with pytest.raises(NetworkConfigError, match="bonding driver is not available") as info:
        host.network.bond_create(BondCreate("bond0", ("eth0", "eth1"), options=FAST))
    assert info.value.details["rolled_back"] is True
    assert host.links.facts().interfaces == before.interfaces
    host.close()


def test_bond_failover_and_removal(tmp_path: Path) -> None:
    host = build_fake_host(tmp_path / "s", bridges=(), nics=("eth0", "eth1"))
    result = host.network.bond_create(BondCreate("bond0", ("eth0", "eth1"), primary="eth0", options=FAST))
    assert result.state == "applied", result
    bond = host.links.facts().bond("bond0")
    assert bond is not None and (bond.mode, bond.active_slave, bond.primary) == (
        "active-backup",
        "eth0",
        "eth0",
    )
    assert [(s.name, s.state) for s in bond.slaves] == [("eth0", "active"), ("eth1", "backup")]
    bond0 = host.links.facts().interface("bond0")
    assert bond0 is not None and bond0.addresses == ("192.0.2.10/24",)
    host.links.set_cable("eth0", False)
    bond = host.links.facts().bond("bond0")
    assert bond is not None and bond.active_slave == "eth1"
    assert host.probe(1.0).ok  # still reachable through eth1
    removed = host.network.bond_remove(InterfaceRemove("bond0", restore_to="eth1", options=FAST))
    assert removed.state == "applied", removed
    eth1 = host.links.facts().interface("eth1")
    assert (
        eth1 is not None and eth1.addresses == ("192.0.2.10/24",) and host.links.facts().bond("bond0") is None
    )
    host.close()


def test_link_driver_mirrors_netlink_errors_and_kernel_side_effects() -> None:
    links = FakeLinkDriver.simple(nics=("eth0", "eth1"), address="10.0.0.2/24", gateway="10.0.0.1")
    with pytest.raises(NetworkConfigError, match=r"^interface nope does not exist$"):
        links.apply(SetMaster("eth0", "nope"))
    with pytest.raises(NetworkConfigError, match="Network is unreachable \\(the gateway"):
        links.apply(AddRoute(RouteInfo("10.5.0.0/16", "eth1", "10.0.0.1")))
    with pytest.raises(NetworkConfigError, match="File exists"):
        links.apply(AddRoute(RouteInfo("default", "eth0", "10.0.0.254")))
    links.apply(DeleteLink("nope"))  # gone already: fine, like NetlinkDriver
    links.apply(AddAddress("eth0", "10.0.0.2/24"))  # there already: fine
    links.apply(SetLinkUp("eth0", False))  # the kernel flushes the routes of a link that goes down
    assert links.facts().routes == ()
    links.apply(SetLinkUp("eth0", True))  # and brings back only the connected one
    assert [(r.dst, r.proto) for r in links.facts().routes] == [("10.0.0.0/24", "kernel")]
    links.apply(AddRoute(RouteInfo("default", "eth0", "10.0.0.1")))
    links.apply(DelAddress("eth0", "10.0.0.2/24"))  # the last address: its routes go too
    assert links.facts().routes == () and not links.reaches("10.0.0.1")
    links.apply(AddAddress("eth1", "2001:db8::2/64"))
    links.apply(AddRoute(RouteInfo("default", "eth1", "2001:db8::1", family="inet6")))
    assert [r.metric for r in links.facts().routes if r.dst == "default"] == [1024]
    links.fail_next(NetworkConfigError("injected"), SetMaster)
    links.apply(SetLinkUp("eth1", True))  # another step type: not affected
    with pytest.raises(NetworkConfigError, match="injected"):
        links.apply(SetMaster("eth1", "eth0"))


def test_agent_construction_uses_the_fake_images(host: FakeHost) -> None:
    agent = host.agent(MemoryBroker().transport("agent-fake1"))
    try:
        body = ImageCreate(ImageLocation(volume="blank.qcow2"), DiskFormat.QCOW2, 3)
        env = request(vmops_msgs.IMAGE_CREATE, body, "test", timeout=60)
        outcome = agent.dispatcher(Delivery(env, "fake1", False, "amq.reply", user_id="controller"))
        assert outcome.reply is not None
        info = unwrap(outcome.reply, vmops_msgs.IMAGE_CREATE)
        assert info.path == "/var/lib/virtfleet/images/blank.qcow2" and info.virtual_size_bytes == 3 * 1024**3
        assert host.hypervisor.volume_path("default", "blank.qcow2") == info.path  # refreshed into the pool
        assert not Path(info.path).exists()  # only in the fake's files
    finally:
        agent.journal.close()


def test_a_node_file_host(tmp_path: Path) -> None:
    host = build_fake_host(tmp_path / "s", node_xml=NODES / "small.xml")
    facts = host.hypervisor.node_facts()
    assert facts.hypervisor_type == "TEST" and facts.cpu.cpus == 8 and facts.bridges == ("br0",)
    assert host.links.facts().bridge("br0") is not None
    host.close()


def test_concurrent_creates_on_one_host(host: FakeHost) -> None:
    table = host.table(lambda: 0)

    def create(i: int) -> None:
        table.handler(vm_msgs.VM_CREATE)(CreateVm(spec=vm(f"vm{i}")))

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(create, range(12)))  # re-raises what a create raised
    statuses = host.hypervisor.list_statuses()
    assert len(statuses) == 12 and all(s.state is PowerState.RUNNING for s in statuses)
    assert len(host.hypervisor.volumes()) == 12


def test_a_full_host_report(host: FakeHost) -> None:
    host.table(lambda: 0).handler(vm_msgs.VM_CREATE)(CreateVm(spec=vm(memory_mib=2048)))
    report = build_report(
        host_id=host.config.host_id,
        libvirt_uri=host.config.libvirt_uri,
        agent_version="test",
        facts=host.hypervisor.node_facts(),
        vms=host.hypervisor.list_statuses(),
        seq=1,
        started_at=0,
        reported_at=0,
    )
    for module in host.modules:
        report = module.enrich_report(report)
    assert (report.hypervisor_type, report.memory_mib, report.memory_free_mib) == (
        "QEMU",
        16384,
        16384 - 2048,
    )
    assert report.bridges == ("br0",) and report.networks == ("default",)
    assert report.tuning is not None and report.tuning.dedicated_cpus == "2-7" and report.tuning.simulated
    assert report.network is not None and report.network.persistence == "networkd"
    assert report.network.dns == ("192.0.2.1",) and report.network.ipv4_forwarding is False
