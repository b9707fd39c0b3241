"""vCPU and emulator pinning on a :class:`~agent.drivers.fake.FakeHypervisor`'s domains.

:class:`FakePinning` is a :class:`~agent.tuning.pinning.Pinning` with LibvirtPinning's rules: the
CPU map is the host's CPUs (all of them, unlike the test driver's hard-coded 8), a pin is checked
against it and against the domain's vCPUs, and it is made live (running domain) and in the
definition (persistent domain), where ``<cputune>`` then shows it.
"""

from __future__ import annotations

from agent.drivers.fake import FakeHypervisor
from agent.tuning.pinning import PinnedDomain, Pinning, cpumap
from common.cpuset import format_cpuset
from common.errors import InternalError, InvalidRequest
from common.messages.vm import PowerState, VcpuPin

#: virDomainXMLFlags' VIR_DOMAIN_XML_INACTIVE: the persistent definition.
XML_INACTIVE = 2


class FakeDomain:
    """The handle :meth:`FakePinning.domain` returns: the libvirt calls TuningModule makes on it."""

    def __init__(self, hypervisor: FakeHypervisor, uuid: str) -> None:
        self.hypervisor = hypervisor
        self.uuid = uuid

    def name(self) -> str:
        return self.hypervisor.domain_name(self.uuid)

    def XMLDesc(self, flags: int = 0) -> str:  # noqa: N802 - libvirt's method name
        """The live definition (``flags`` 0) or the persistent one (``XML_INACTIVE``)."""
        return self.hypervisor.domain_xml(self.uuid, live=not flags & XML_INACTIVE)

    def UUIDString(self) -> str:  # noqa: N802 - libvirt's method name
        return self.uuid


class FakePinning:
    """:class:`~agent.tuning.pinning.Pinning` over a FakeHypervisor."""

    def __init__(self, hypervisor: FakeHypervisor) -> None:
        self.hypervisor = hypervisor

    def _uuid(self, dom: PinnedDomain) -> str:
        if not isinstance(dom, FakeDomain) or dom.hypervisor is not self.hypervisor:
            raise InternalError(f"FakePinning got a domain handle of another hypervisor: {dom!r}")
        return dom.uuid

    def cpu_map_width(self) -> int:
        return self.hypervisor.cpu_count

    def domain(self, uuid: str) -> FakeDomain:
        """NotFound (as LibvirtPinning raises it) when there is no such domain."""
        self.hypervisor.domain_name(uuid)
        return FakeDomain(self.hypervisor, uuid)

    def state(self, dom: PinnedDomain) -> PowerState:
        return self.hypervisor.state_of(self._uuid(dom))

    def vcpu_pins(self, dom: PinnedDomain) -> tuple[VcpuPin, ...]:
        return tuple(VcpuPin(vcpu=i, cpuset=c) for i, c in self.hypervisor.vcpu_pins(self._uuid(dom)))

    def emulator_cpuset(self, dom: PinnedDomain) -> str | None:
        return self.hypervisor.emulator_cpuset(self._uuid(dom))

    def pin_vcpu(self, dom: PinnedDomain, vcpu: int, cpus: frozenset[int]) -> None:
        uuid = self._uuid(dom)
        cpumap(cpus, self.cpu_map_width())  # the same refusals as LibvirtPinning
        pins = self.vcpu_pins(dom)
        if not 0 <= vcpu < len(pins):
            raise InvalidRequest(f"the VM has vCPUs 0-{len(pins) - 1}, not vCPU {vcpu}")
        self.hypervisor.pin_vcpu(uuid, vcpu, format_cpuset(cpus))

    def pin_emulator(self, dom: PinnedDomain, cpus: frozenset[int]) -> None:
        uuid = self._uuid(dom)
        cpumap(cpus, self.cpu_map_width())
        self.hypervisor.pin_emulator(uuid, format_cpuset(cpus))


def _typecheck(fake: FakePinning) -> Pinning:
    """Never called: mypy fails here when the Pinning protocol grows and FakePinning does not."""
    return fake
