"""vCPU and emulator pinning through libvirt (``virsh vcpupin`` / ``virsh emulatorpin``).

libvirt applies a pin to the QEMU thread's affinity *and* to its cgroup cpuset (v1 on this
kind of host), so a pin made here is what ``taskset -p`` shows afterwards. Every pin is read
back: libvirt's test driver accepts pins to CPUs beyond its hard-coded 8-CPU map and silently
drops them, and a pin that did not take must not be reported as done.

Flags: on a real hypervisor a pin is made live (running domain) and in the persistent
definition (``--live --config``), so it survives a restart; the test driver supports neither
flag and gets ``AFFECT_CURRENT``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import libvirt

from agent.drivers.libvirt_driver import libvirt_errors, power_state
from common.cpuset import format_cpuset
from common.errors import HypervisorError, InvalidRequest
from common.messages.vm import PowerState, VcpuPin


def cpumap(cpus: frozenset[int], width: int) -> tuple[bool, ...]:
    """libvirt's cpumap (one bool per host CPU) for ``cpus``; InvalidRequest for CPUs beyond it."""
    beyond = sorted(c for c in cpus if c >= width or c < 0)
    if beyond:
        raise InvalidRequest(
            f"CPU(s) {format_cpuset(beyond)} are beyond this host's CPU map "
            f"(libvirt knows CPUs 0-{width - 1})"
        )
    if not cpus:
        raise InvalidRequest("cannot pin to an empty CPU set")
    return tuple(i in cpus for i in range(width))


def cpus_of(mask: Sequence[bool]) -> frozenset[int]:
    """The CPUs set in a libvirt cpumap."""
    return frozenset(i for i, on in enumerate(mask) if on)


class PinnedDomain(Protocol):
    """The domain handle :meth:`Pinning.domain` returns: what TuningModule reads from it directly
    (libvirt's ``virDomain`` spelling, so a libvirt domain is one)."""

    def name(self) -> str: ...

    def XMLDesc(self, flags: int = 0) -> str: ...  # noqa: N802 - libvirt's method name


class Pinning(Protocol):
    """What :class:`agent.tuning.module.TuningModule` needs for pinning: :class:`LibvirtPinning`
    on a real (or test-driver) host, :class:`agent.tuning.fake.FakePinning` on a fake one."""

    def cpu_map_width(self) -> int:
        """How many host CPUs a pin may name (CPUs 0 to width-1)."""
        ...

    def domain(self, uuid: str) -> PinnedDomain:
        """The domain with that uuid; NotFound when there is none."""
        ...

    def state(self, dom: PinnedDomain) -> PowerState: ...

    def vcpu_pins(self, dom: PinnedDomain) -> tuple[VcpuPin, ...]:
        """One pin per vCPU, as in effect now (live when running, else the definition)."""
        ...

    def emulator_cpuset(self, dom: PinnedDomain) -> str | None: ...

    def pin_vcpu(self, dom: PinnedDomain, vcpu: int, cpus: frozenset[int]) -> None:
        """Pin and read back; InvalidRequest for CPUs beyond the map or an unknown vCPU."""
        ...

    def pin_emulator(self, dom: PinnedDomain, cpus: frozenset[int]) -> None: ...


class LibvirtPinning:
    """Pinning operations on the domains of one libvirt connection."""

    def __init__(self, conn: Any, *, simulated: bool) -> None:
        self.conn = conn
        self.simulated = simulated

    def cpu_map_width(self) -> int:
        with libvirt_errors("cannot read the host CPU map"):
            return int(self.conn.getCPUMap()[0])

    def domain(self, uuid: str) -> Any:
        with libvirt_errors(f"VM {uuid}"):
            return self.conn.lookupByUUIDString(uuid)

    def state(self, dom: Any) -> PowerState:
        with libvirt_errors("cannot read the VM state"):
            code, _reason = dom.state(0)
        return power_state(int(code))

    def _flags(self, dom: Any, *, change: bool) -> int:
        if self.simulated:
            return 0  # VIR_DOMAIN_AFFECT_CURRENT: the test driver refuses LIVE and CONFIG
        with libvirt_errors("cannot read the VM state"):
            active = bool(dom.isActive())
            persistent = bool(dom.isPersistent())
        live, config = int(libvirt.VIR_DOMAIN_AFFECT_LIVE), int(libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        if not change:  # reading: what is in effect now
            return live if active else config
        return (live if active else 0) | (config if persistent else 0)

    def vcpu_pins(self, dom: Any) -> tuple[VcpuPin, ...]:
        flags = self._flags(dom, change=False)
        with libvirt_errors("cannot read the vCPU pinning"):
            maps = dom.vcpuPinInfo(flags)
        return tuple(VcpuPin(vcpu=i, cpuset=format_cpuset(cpus_of(m))) for i, m in enumerate(maps))

    def emulator_cpuset(self, dom: Any) -> str | None:
        flags = self._flags(dom, change=False)
        try:
            mask = dom.emulatorPinInfo(flags)
        except libvirt.libvirtError:
            return None
        return format_cpuset(cpus_of(mask)) if mask is not None else None

    def pin_vcpu(self, dom: Any, vcpu: int, cpus: frozenset[int]) -> None:
        width = self.cpu_map_width()
        mask = cpumap(cpus, width)
        pins = self.vcpu_pins(dom)
        if not 0 <= vcpu < len(pins):
            raise InvalidRequest(f"the VM has vCPUs 0-{len(pins) - 1}, not vCPU {vcpu}")
        with libvirt_errors(f"cannot pin vCPU {vcpu} to {format_cpuset(cpus)}"):
            dom.pinVcpuFlags(vcpu, mask, self._flags(dom, change=True))
        now = self.vcpu_pins(dom)[vcpu].cpuset
        if now != format_cpuset(cpus):
            raise HypervisorError(
                f"libvirt accepted the pin of vCPU {vcpu} to {format_cpuset(cpus)} but has {now or 'nothing'}"
            )

    def pin_emulator(self, dom: Any, cpus: frozenset[int]) -> None:
        mask = cpumap(cpus, self.cpu_map_width())
        with libvirt_errors(f"cannot pin the emulator threads to {format_cpuset(cpus)}"):
            dom.pinEmulator(mask, self._flags(dom, change=True))
        now = self.emulator_cpuset(dom)
        if now != format_cpuset(cpus):
            raise HypervisorError(
                f"libvirt accepted the emulator pin to {format_cpuset(cpus)} but has {now or 'nothing'}"
            )
