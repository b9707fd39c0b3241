"""An agent on the real qemu:///system (libvirtd started by deploy/services.sh), driven over
the real broker, checked with libvirt's own API and the guest's serial console."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu_guest import (
    TEST_POOL,
    guest_name,
    guest_spec,
    qemu_connection,
    require_qemu,
    start_qemu_agent,
    wait_for_serial,
    with_new_disk,
)
from vfsupport import wait_until

from agent.main import Agent
from common.messages.vm import (
    VM_CREATE,
    VM_DELETE,
    VM_DESTROY,
    CreateVm,
    DeleteVm,
    PowerState,
    VmAction,
    VmRef,
)
from controller.agent_api import AgentClient

pytestmark = [pytest.mark.broker, pytest.mark.qemu]


@pytest.fixture
def conn() -> Iterator[Any]:
    require_qemu()
    with qemu_connection() as c:
        yield c


@pytest.fixture
def agent(conn: Any, vhost_url: str, tmp_path: Path) -> Iterator[Agent]:
    running = start_qemu_agent(conn, "qemu-host", vhost_url, tmp_path / "state", heartbeat_interval=5)
    yield running
    running.stop()


def test_create_boot_and_delete_a_real_guest(agent: Agent, conn: Any, client: AgentClient) -> None:
    import libvirt  # noqa: PLC0415

    name = guest_name("boot")
    spec = with_new_disk(guest_spec(name))
    created = client.call("qemu-host", VM_CREATE, CreateVm(spec=spec, start=True))
    assert created.status is not None
    assert created.status.state == PowerState.RUNNING

    # libvirt's own view, not ours
    dom = conn.lookupByUUIDString(spec.uuid)
    assert dom.name() == name
    assert dom.isActive() == 1
    state, max_kib, _mem_kib, vcpus, _cpu_time = dom.info()
    assert state == libvirt.VIR_DOMAIN_RUNNING
    assert (max_kib, vcpus) == (384 * 1024, 1)
    xml = dom.XMLDesc(0)
    # The persistent definition asks for 256 MiB now and 384 MiB at most.
    assert "<currentMemory unit='KiB'>262144</currentMemory>" in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert "type='qemu'" in xml or 'type="qemu"' in xml
    pool = conn.storagePoolLookupByName(TEST_POOL)
    pool.refresh(0)
    volume = pool.storageVolLookupByName(f"{name}-vda.qcow2")
    assert volume.path() in xml
    wait_for_serial(name, "GUEST-HELLO", timeout=90)
    # QEMU starts with max memory; the guest's balloon driver then gives back the rest.
    wait_until(lambda: dom.info()[2] == 256 * 1024, 60, "the balloon to settle at 256 MiB")

    ref = VmRef(spec.uuid, name)
    destroyed = client.call("qemu-host", VM_DESTROY, VmAction(ref))
    assert destroyed.status is not None and destroyed.status.state == PowerState.SHUTOFF
    assert dom.isActive() == 0

    deleted = client.call("qemu-host", VM_DELETE, DeleteVm(ref, delete_disks=True))
    assert deleted.status is None
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByUUIDString(spec.uuid)
    pool.refresh(0)
    assert f"{name}-vda.qcow2" not in pool.listVolumes()
