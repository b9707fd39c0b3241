"""Pure parts of the libvirt driver: state mapping, error translation, small documents, shutdown timing."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import libvirt
import pytest

from agent.drivers import libvirt_driver as drv
from common.errors import Conflict, HypervisorError, NotFound
from common.messages.vm import DiskFormat, PowerState


@pytest.mark.parametrize(
    ("code", "state"),
    [
        (libvirt.VIR_DOMAIN_NOSTATE, PowerState.NOSTATE),
        (libvirt.VIR_DOMAIN_RUNNING, PowerState.RUNNING),
        (libvirt.VIR_DOMAIN_BLOCKED, PowerState.BLOCKED),
        (libvirt.VIR_DOMAIN_PAUSED, PowerState.PAUSED),
        (libvirt.VIR_DOMAIN_SHUTDOWN, PowerState.SHUTDOWN),
        (libvirt.VIR_DOMAIN_SHUTOFF, PowerState.SHUTOFF),
        (libvirt.VIR_DOMAIN_CRASHED, PowerState.CRASHED),
        (libvirt.VIR_DOMAIN_PMSUSPENDED, PowerState.PMSUSPENDED),
        (99, PowerState.NOSTATE),
    ],
)
def test_power_state(code: int, state: PowerState) -> None:
    assert drv.power_state(code) is state


def test_every_libvirt_state_is_mapped() -> None:
    assert set(drv.STATE_MAP) == set(range(libvirt.VIR_DOMAIN_PMSUSPENDED + 1))


class FakeLibvirtError(libvirt.libvirtError):  # type: ignore[misc]
    def __init__(self, code: int, message: str) -> None:
        Exception.__init__(self, message)
        self.err = (code, 10, message, 2, None, None, None, 0, 0)


@pytest.mark.parametrize(
    "code",
    [
        libvirt.VIR_ERR_NO_DOMAIN,
        libvirt.VIR_ERR_NO_STORAGE_POOL,
        libvirt.VIR_ERR_NO_STORAGE_VOL,
        libvirt.VIR_ERR_NO_NETWORK,
    ],
)
def test_missing_things_become_not_found(code: int) -> None:
    error = drv.translate_error(FakeLibvirtError(code, "gone"), "VM x")
    assert isinstance(error, NotFound)
    assert error.details["code"] == code
    assert error.message == "VM x: gone"


def test_other_errors_become_hypervisor_errors_with_the_code() -> None:
    with pytest.raises(HypervisorError) as info, drv.libvirt_errors("cannot start VM x"):
        raise FakeLibvirtError(libvirt.VIR_ERR_OPERATION_INVALID, "domain is already running")
    assert info.value.details["code"] == libvirt.VIR_ERR_OPERATION_INVALID
    assert "domain is already running" in info.value.message
    assert isinstance(info.value.__cause__, libvirt.libvirtError)


def test_volume_xml() -> None:
    root = ET.fromstring(drv.volume_xml("web1-vda.qcow2", DiskFormat.QCOW2, 10))
    assert root.findtext("name") == "web1-vda.qcow2"
    capacity = root.find("capacity")
    assert capacity is not None and (capacity.text, capacity.get("unit")) == ("10", "GiB")
    fmt = root.find("target/format")
    assert fmt is not None and fmt.get("type") == "qcow2"


def test_volume_xml_escapes() -> None:
    root = ET.fromstring(drv.volume_xml("a<b>&c", DiskFormat.RAW, 1))
    assert root.findtext("name") == "a<b>&c"


def test_dir_pool_xml() -> None:
    root = ET.fromstring(drv.dir_pool_xml("default", Path("/var/lib/virtfleet/images")))
    assert root.get("type") == "dir"
    assert root.findtext("target/path") == "/var/lib/virtfleet/images"
    assert drv.pool_target_path(drv.dir_pool_xml("p", Path("/x"))) == "/x"


def test_owned_volumes_roundtrip() -> None:
    paths = ("/var/lib/virtfleet/images/a.qcow2", "/var/lib/virtfleet/images/b&c.raw")
    assert drv.parse_owned_volumes(drv.owned_volumes_xml(paths)) == paths
    assert drv.parse_owned_volumes(drv.owned_volumes_xml(())) == ()
    # libvirt may return the element with its namespace prefix
    namespaced = f'<vfa:volumes xmlns:vfa="{drv.OWNED_VOLUMES_NS}"><vfa:volume path="/p"/></vfa:volumes>'
    assert drv.parse_owned_volumes(namespaced) == ("/p",)
    assert drv.parse_owned_volumes("garbage<") == ()


def test_domain_has_nvram() -> None:
    assert drv.domain_has_nvram("<domain><os><loader>x</loader><nvram>/var/n.fd</nvram></os></domain>")
    assert not drv.domain_has_nvram("<domain><os><type>hvm</type></os></domain>")


# -- shutdown timing with a stub domain and a fake clock (no real waiting)


class StubDomain:
    def __init__(self, off_after_polls: int | None) -> None:
        self.polls = 0
        self.off_after = off_after_polls
        self.destroyed = False
        self.acpi = 0

    def state(self, _flags: int) -> list[int]:
        self.polls += 1
        if self.destroyed or (self.off_after is not None and self.polls > self.off_after):
            return [libvirt.VIR_DOMAIN_SHUTOFF, 0]
        return [libvirt.VIR_DOMAIN_RUNNING, 1]

    def shutdown(self) -> int:
        self.acpi += 1
        return 0

    def destroy(self) -> int:
        self.destroyed = True
        return 0


class StubConn:
    def __init__(self, dom: StubDomain) -> None:
        self.dom = dom

    def getType(self) -> str:
        return "QEMU"

    def lookupByUUIDString(self, _uuid: str) -> StubDomain:
        return self.dom


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def make_driver(dom: StubDomain, fake: FakeTime) -> Any:
    return drv.LibvirtHypervisor(
        StubConn(dom), "default", hw_virt=False, clock=fake.clock, sleep=fake.sleep, poll_interval=2.0
    )


def test_shutdown_waits_for_shutoff() -> None:
    dom, fake = StubDomain(off_after_polls=3), FakeTime()
    make_driver(dom, fake).shutdown("u", 60, force=False)
    assert dom.acpi == 1 and not dom.destroyed
    assert fake.slept == [2.0, 2.0]


def test_shutdown_timeout_without_force_is_a_retryable_conflict() -> None:
    dom, fake = StubDomain(off_after_polls=None), FakeTime()
    with pytest.raises(Conflict, match=r"did not shut down within 5 s") as info:
        make_driver(dom, fake).shutdown("u", 5, force=False)
    assert info.value.retryable is True
    assert not dom.destroyed
    assert sum(fake.slept) == pytest.approx(5.0)


def test_shutdown_timeout_with_force_powers_off() -> None:
    dom, fake = StubDomain(off_after_polls=None), FakeTime()
    make_driver(dom, fake).shutdown("u", 3, force=True)
    assert dom.destroyed


def test_shutdown_of_a_stopped_domain_does_nothing() -> None:
    dom, fake = StubDomain(off_after_polls=0), FakeTime()
    make_driver(dom, fake).shutdown("u", 3, force=False)
    assert dom.acpi == 0
