"""Attack 7 (issue 12) at the agent: ``vm.define`` builds the domain from the validated spec of the
XML it is given, never the XML itself, and refuses elements that reach beyond the VM's images.

The agent is asked directly (as a forged command would), so the controller's own check is no help.
"""

from __future__ import annotations

import pytest

from agent.disks import OWNED_VOLUMES_NS
from agent.drivers.fake import FakeHypervisor
from agent.handlers import AgentHandlers
from common.domain_xml import unsafe_elements
from common.errors import InvalidRequest
from common.messages.vm import DeleteVm, DiskFormat, VmRef
from common.messages.vmops import DefineVm

UUID = "0b5c3f1e-8d1a-4c44-9a55-6f1e2d3c4b5a"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def domain(devices: str = "", extra: str = "", os_extra: str = "", kind: str = "test") -> str:
    return (
        f"<domain type='{kind}' xmlns:qemu='{QEMU_NS}'><name>guest</name><uuid>{UUID}</uuid>"
        "<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        f"<os><type arch='x86_64'>hvm</type>{os_extra}</os><devices>{devices}</devices>{extra}</domain>"
    )


FORBIDDEN = {
    "emulator": domain("<emulator>/usr/local/bin/not-qemu</emulator>"),
    "filesystem": domain("<filesystem type='mount'><source dir='/'/><target dir='root'/></filesystem>"),
    "hostdev": domain("<hostdev mode='subsystem' type='usb'><source><vendor id='0x1'/></source></hostdev>"),
    "qemu:commandline": domain(extra="<qemu:commandline><qemu:arg value='-debugcon'/></qemu:commandline>"),
    "qemu:override": domain(extra="<qemu:override><qemu:device alias='x'/></qemu:override>"),
    "redirdev": domain("<redirdev bus='usb' type='spicevmc'/>"),
    "shmem": domain("<shmem name='host-mem'/>"),
    "loader": domain(os_extra="<loader>/etc/shadow</loader>"),
    "seclabel": domain(extra="<seclabel type='none'/>"),
}


@pytest.fixture
def hv() -> FakeHypervisor:
    return FakeHypervisor()


@pytest.mark.parametrize("element", sorted(FORBIDDEN))
def test_each_element_that_reaches_the_host_is_refused_by_name(hv: FakeHypervisor, element: str) -> None:
    handlers = AgentHandlers(hv, lambda: 0, hv.images())
    with pytest.raises(InvalidRequest, match=f"<{element}"):
        handlers.vmops.define(DefineVm(uuid=UUID, name="guest", xml=FORBIDDEN[element]))
    assert hv.find(UUID) is None
    assert hv.calls == []


def test_the_hosts_own_emulator_and_dynamic_labels_are_fine() -> None:
    assert unsafe_elements(domain("<emulator>/usr/bin/qemu-system-x86_64</emulator>")) == []
    assert unsafe_elements(domain(extra="<seclabel type='dynamic' model='dac' relabel='yes'/>")) == []


def test_the_domain_defined_is_rebuilt_from_the_spec(hv: FakeHypervisor) -> None:
    handlers = AgentHandlers(hv, lambda: 0, hv.images())
    given = domain(
        "<emulator>/usr/bin/qemu-system-x86_64</emulator><watchdog model='i6300esb' action='poweroff'/>",
        extra="<on_crash>coredump-restart</on_crash>",
        kind="qemu",
    )
    handlers.vmops.define(DefineVm(uuid=UUID, name="guest", xml=given))
    defined = hv.domain_xml(UUID, live=False)
    for absent in ("emulator", "watchdog", "coredump"):  # our builder writes its own <on_crash>
        assert absent not in defined, absent


def test_an_import_keeps_only_the_volume_claims_it_can_vouch_for(hv: FakeHypervisor) -> None:
    own = hv.create_volume("default", "guest-vda.qcow2", DiskFormat.QCOW2, 1)
    other = hv.create_volume("default", "someone-else.qcow2", DiskFormat.QCOW2, 1)
    claims = f"<vfa:volumes xmlns:vfa='{OWNED_VOLUMES_NS}'><vfa:volume path='{own}'/><vfa:volume path='{other}'/></vfa:volumes>"
    xml = domain(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{own}'/>"
        "<target dev='vda' bus='virtio'/></disk>",
        extra=f"<metadata>{claims}</metadata>",
        kind="qemu",
    )
    handlers = AgentHandlers(hv, lambda: 0, hv.images())
    handlers.vmops.define(DefineVm(uuid=UUID, name="guest", xml=xml))
    assert hv.owned_volumes(UUID) == (own,)  # its own disk, not the other VM's volume
    handlers.delete(DeleteVm(VmRef(UUID, "guest"), delete_disks=True))
    assert hv.volumes() == {("default", "someone-else.qcow2"): other}
