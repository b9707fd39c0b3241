"""Agent command handlers against a stateful in-memory fake hypervisor.

The fake is strict like libvirt: starting a running domain, destroying a stopped one or defining a
second domain with a taken name raise, so idempotency has to come from the handlers.
"""

from __future__ import annotations

import threading
import uuid as uuid_mod
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from agent.handlers import AgentHandlers, volume_name
from agent.journal import SqliteJournal
from agent.ports import ACTIVE_STATES, Hypervisor, NodeFacts
from common.domain_xml import parse_domain_xml
from common.errors import (
    AlreadyExists,
    Conflict,
    HypervisorError,
    InvalidRequest,
    NotFound,
    Unsupported,
)
from common.messages.catalogue import KINDS, Route
from common.messages.envelope import Envelope
from common.messages.host import CpuTopology, ReportAck, ReportRequest, StoragePoolInfo
from common.messages.vm import (
    CreateVm,
    DeleteVm,
    DiskDevice,
    DiskFormat,
    DiskSpec,
    DomainType,
    PowerState,
    SetAutostart,
    ShutdownVm,
    VmAction,
    VmRef,
    VmResult,
    VmSpec,
    VmStatus,
)
from common.schema import to_plain
from common.transport.amqp import Delivery
from common.transport.rpc import Dispatcher, request, unwrap

# ------------------------------------------------------------------------------------------ the fake


@dataclass
class FakeDomain:
    uuid: str
    name: str
    xml: str
    state: PowerState = PowerState.SHUTOFF
    autostart: bool = False
    owned: tuple[str, ...] = ()


class FakeHypervisor:
    """In-memory hypervisor with libvirt's refusals; counts the calls that change something."""

    def __init__(self, *, hw_virt: bool = True, pool: str = "default") -> None:
        self._hw_virt = hw_virt
        self._pool = pool
        self.domains: dict[str, FakeDomain] = {}
        self.volumes: dict[tuple[str, str], str] = {}
        self.files: set[str] = set()
        self.calls: list[str] = []
        self.ignore_acpi = False
        self.fail_define = False
        self.lock = threading.Lock()

    def count(self, name: str) -> int:
        return self.calls.count(name)

    @property
    def default_pool(self) -> str:
        return self._pool

    def hw_virt(self) -> bool:
        return self._hw_virt

    def node_facts(self) -> NodeFacts:
        return NodeFacts(
            hostname="fake",
            hypervisor_type="FAKE",
            hypervisor_version="1.0.0",
            libvirt_version="9.0.0",
            cpu=CpuTopology(cpus=8, cores=4, threads=2),
            memory_mib=16384,
            free_memory_mib=0,
            storage=StoragePoolInfo(self._pool, "/pools/default", 200, 0, 200),
            networks=("default",),
            bridges=(),
            hw_virt=self._hw_virt,
        )

    # storage
    def volume_path(self, pool: str, name: str) -> str | None:
        return self.volumes.get((pool, name))

    def create_volume(self, pool: str, name: str, fmt: DiskFormat, size_gib: int) -> str:
        self.calls.append("create_volume")
        assert size_gib > 0
        return self.volumes.setdefault((pool, name), f"/pools/{pool}/{name}")

    def delete_volume(self, pool: str, name: str) -> bool:
        self.calls.append("delete_volume")
        return self.volumes.pop((pool, name), None) is not None

    def delete_volume_path(self, path: str) -> bool:
        self.calls.append("delete_volume_path")
        for key, value in list(self.volumes.items()):
            if value == path:
                del self.volumes[key]
                return True
        return False

    def path_exists(self, path: str) -> bool:
        return path in self.files or path in self.volumes.values()

    # domains
    def _get(self, uuid: str) -> FakeDomain:
        try:
            return self.domains[uuid]
        except KeyError:
            raise NotFound(f"VM {uuid}: Domain not found", details={"code": 42}) from None

    def find(self, uuid: str) -> VmStatus | None:
        return self.status(uuid) if uuid in self.domains else None

    def uuid_for_name(self, name: str) -> str | None:
        return next((d.uuid for d in self.domains.values() if d.name == name), None)

    def define(self, xml: str) -> str:
        self.calls.append("define")
        if self.fail_define:
            raise HypervisorError("cannot define the domain: boom", details={"code": 1})
        parsed = parse_domain_xml(xml)
        other = self.uuid_for_name(parsed.name)
        if other is not None and other != parsed.uuid:
            raise HypervisorError(
                f"domain '{parsed.name}' already exists with uuid {other}", details={"code": 9}
            )
        dom = self.domains.get(parsed.uuid)
        if dom is None:
            self.domains[parsed.uuid] = FakeDomain(parsed.uuid, parsed.name, xml)
        else:
            dom.xml = xml
        return parsed.uuid

    def set_owned_volumes(self, uuid: str, paths: tuple[str, ...]) -> None:
        self._get(uuid).owned = paths

    def owned_volumes(self, uuid: str) -> tuple[str, ...]:
        return self._get(uuid).owned

    def domain_xmls(self) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
        return tuple((d.uuid, d.name, (d.xml,)) for d in self.domains.values())

    def _require(self, dom: FakeDomain, states: set[PowerState], op: str) -> None:
        if dom.state not in states:
            raise HypervisorError(f"cannot {op}: domain is {dom.state.value}", details={"code": 55})

    def start(self, uuid: str) -> None:
        self.calls.append("start")
        dom = self._get(uuid)
        self._require(dom, {PowerState.SHUTOFF, PowerState.CRASHED}, "start")
        dom.state = PowerState.RUNNING

    def shutdown(self, uuid: str, timeout_s: float, force: bool) -> None:
        self.calls.append("shutdown")
        dom = self._get(uuid)
        self._require(dom, set(ACTIVE_STATES), "shut down")
        if self.ignore_acpi and not force:
            raise Conflict(f"VM {uuid} did not shut down within {timeout_s:g} s", retryable=True)
        dom.state = PowerState.SHUTOFF

    def destroy(self, uuid: str) -> None:
        self.calls.append("destroy")
        dom = self._get(uuid)
        self._require(dom, set(ACTIVE_STATES), "destroy")
        dom.state = PowerState.SHUTOFF

    def reboot(self, uuid: str) -> None:
        self.calls.append("reboot")
        self._require(self._get(uuid), {PowerState.RUNNING}, "reboot")

    def suspend(self, uuid: str) -> None:
        self.calls.append("suspend")
        dom = self._get(uuid)
        self._require(dom, {PowerState.RUNNING}, "suspend")
        dom.state = PowerState.PAUSED

    def resume(self, uuid: str) -> None:
        self.calls.append("resume")
        dom = self._get(uuid)
        self._require(dom, {PowerState.PAUSED}, "resume")
        dom.state = PowerState.RUNNING

    def undefine(self, uuid: str) -> None:
        self.calls.append("undefine")
        self._get(uuid)
        del self.domains[uuid]

    def set_autostart(self, uuid: str, enabled: bool) -> None:
        self.calls.append("set_autostart")
        self._get(uuid).autostart = enabled

    def status(self, uuid: str) -> VmStatus:
        dom = self._get(uuid)
        parsed = parse_domain_xml(dom.xml)
        return VmStatus(
            uuid=dom.uuid,
            name=dom.name,
            state=dom.state,
            vcpus=parsed.vcpus,
            max_vcpus=parsed.max_vcpus,
            memory_mib=parsed.memory_mib,
            max_memory_mib=parsed.max_memory_mib,
            autostart=dom.autostart,
            managed=parsed.managed,
        )

    def list_statuses(self) -> tuple[VmStatus, ...]:
        return tuple(self.status(u) for u in sorted(self.domains))


# ------------------------------------------------------------------------------------------ helpers


class ReportRequests:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> int:
        self.count += 1
        return 100 + self.count


def make_spec(name: str = "web1", *, uuid: str | None = None, **kw: object) -> VmSpec:
    fields: dict[str, object] = {
        "uuid": uuid or str(uuid_mod.uuid4()),
        "name": name,
        "vcpus": 2,
        "memory_mib": 1024,
        "domain_type": DomainType.QEMU,
        "disks": (DiskSpec(target="vda", size_gib=10),),
    }
    fields.update(kw)
    return VmSpec(**fields)  # type: ignore[arg-type]


def ref(spec: VmSpec) -> VmRef:
    return VmRef(uuid=spec.uuid, name=spec.name)


@pytest.fixture
def hv() -> FakeHypervisor:
    return FakeHypervisor()


@pytest.fixture
def reports() -> ReportRequests:
    return ReportRequests()


@pytest.fixture
def handlers(hv: FakeHypervisor, reports: ReportRequests) -> AgentHandlers:
    return AgentHandlers(hv, reports)


def test_fake_satisfies_the_port() -> None:
    hv: Hypervisor = FakeHypervisor()  # mypy would flag a drifted fake; the assert keeps ruff quiet
    assert hv.default_pool == "default"


# ------------------------------------------------------------------------------------------ vm.create


def test_create_makes_volume_defines_and_starts(handlers: AgentHandlers, hv: FakeHypervisor) -> None:
    spec = make_spec()
    result = handlers.create(CreateVm(spec=spec))

    assert result.status is not None
    assert result.status.state is PowerState.RUNNING
    assert result.status.managed is True
    assert hv.volumes == {("default", "web1-vda.qcow2"): "/pools/default/web1-vda.qcow2"}
    (disk,) = result.disks
    assert (disk.pool, disk.volume, disk.path) == (
        "default",
        "web1-vda.qcow2",
        "/pools/default/web1-vda.qcow2",
    )
    parsed = parse_domain_xml(hv.domains[spec.uuid].xml)
    assert [d.path for d in parsed.disks] == ["/pools/default/web1-vda.qcow2"]
    assert hv.owned_volumes(spec.uuid) == ("/pools/default/web1-vda.qcow2",)


def test_create_twice_with_the_same_uuid_defines_once(handlers: AgentHandlers, hv: FakeHypervisor) -> None:
    spec = make_spec()
    first = handlers.create(CreateVm(spec=spec))
    second = handlers.create(CreateVm(spec=spec))

    assert hv.count("define") == 1
    assert hv.count("create_volume") == 1
    assert hv.count("start") == 1
    assert second.status == first.status
    assert second.disks == first.disks
    assert second.message == "already defined"


def test_create_again_finishes_an_interrupted_create(handlers: AgentHandlers, hv: FakeHypervisor) -> None:
    spec = make_spec(autostart=True)
    handlers.create(CreateVm(spec=spec, start=False))
    assert hv.status(spec.uuid).state is PowerState.SHUTOFF
    hv.domains[spec.uuid].autostart = False
    hv.domains[spec.uuid].owned = ()  # as if the agent died right after define

    result = handlers.create(CreateVm(spec=spec, start=True))

    assert result.status is not None and result.status.state is PowerState.RUNNING
    assert result.status.autostart is True
    assert hv.owned_volumes(spec.uuid) == ("/pools/default/web1-vda.qcow2",)
    assert hv.count("define") == 1


def test_create_reuses_a_volume_left_by_an_earlier_attempt(
    handlers: AgentHandlers, hv: FakeHypervisor
) -> None:
    hv.volumes[("default", "web1-vda.qcow2")] = "/pools/default/web1-vda.qcow2"
    handlers.create(CreateVm(spec=make_spec()))
    assert hv.count("create_volume") == 0


def test_create_with_a_taken_name_and_another_uuid_is_already_exists(
    handlers: AgentHandlers, hv: FakeHypervisor
) -> None:
    handlers.create(CreateVm(spec=make_spec()))
    with pytest.raises(AlreadyExists) as info:
        handlers.create(CreateVm(spec=make_spec(disks=(DiskSpec(target="vdb", size_gib=5),))))
    assert info.value.details["name"] == "web1"
    assert hv.count("define") == 1
    assert ("default", "web1-vdb.qcow2") not in hv.volumes


def test_kvm_on_a_host_without_hw_virt_is_unsupported(reports: ReportRequests) -> None:
    hv = FakeHypervisor(hw_virt=False)
    handlers = AgentHandlers(hv, reports)
    with pytest.raises(Unsupported, match="hardware virtualisation"):
        handlers.create(CreateVm(spec=make_spec(domain_type=DomainType.KVM)))
    assert hv.calls == []
    # TCG works there
    result = handlers.create(CreateVm(spec=make_spec(domain_type=DomainType.QEMU)))
    assert result.status is not None


def test_kvm_on_a_host_with_hw_virt_is_defined_as_kvm(handlers: AgentHandlers, hv: FakeHypervisor) -> None:
    spec = make_spec(domain_type=DomainType.KVM)
    handlers.create(CreateVm(spec=spec))
    assert parse_domain_xml(hv.domains[spec.uuid].xml).domain_type == "kvm"


def test_existing_image_must_exist_and_is_not_owned(handlers: AgentHandlers, hv: FakeHypervisor) -> None:
    disk = DiskSpec(target="vda", source="existing", path="/srv/images/base.qcow2")
    with pytest.raises(NotFound, match="does not exist"):
        handlers.create(CreateVm(spec=make_spec(disks=(disk,))))
    assert hv.calls == []

    hv.files.add("/srv/images/base.qcow2")
    spec = make_spec(disks=(disk, DiskSpec(target="vdb", size_gib=1, format=DiskFormat.RAW)))
    result = handlers.create(CreateVm(spec=spec))
    assert [d.path for d in result.disks] == ["/srv/images/base.qcow2", "/pools/default/web1-vdb.raw"]
    assert hv.owned_volumes(spec.uuid) == ("/pools/default/web1-vdb.raw",)


def test_disk_in_a_named_pool_with_a_named_volume(handlers: AgentHandlers, hv: FakeHypervisor) -> None:
    spec = make_spec(disks=(DiskSpec(target="vda", size_gib=3, pool="fast", volume="root.qcow2"),))
    result = handlers.create(CreateVm(spec=spec))
    assert result.disks[0].path == "/pools/fast/root.qcow2"


def test_bad_volume_name_is_invalid(handlers: AgentHandlers, hv: FakeHypervisor) -> None:
    spec = make_spec(disks=(DiskSpec(target="vda", size_gib=3, volume="../etc/passwd"),))
    with pytest.raises(InvalidRequest, match="volume name"):
        handlers.create(CreateVm(spec=spec))
    assert hv.calls == []


def test_new_cdrom_is_invalid(handlers: AgentHandlers) -> None:
    spec = make_spec(disks=(DiskSpec(target="sda", device=DiskDevice.CDROM),))
    with pytest.raises(InvalidRequest, match="CD-ROM"):
        handlers.create(CreateVm(spec=spec))


def test_failed_define_removes_the_volumes_it_created(handlers: AgentHandlers, hv: FakeHypervisor) -> None:
    hv.fail_define = True
    with pytest.raises(HypervisorError):
        handlers.create(CreateVm(spec=make_spec()))
    assert hv.volumes == {}
    assert hv.domains == {}


def test_create_without_start_leaves_it_off(handlers: AgentHandlers, hv: FakeHypervisor) -> None:
    result = handlers.create(CreateVm(spec=make_spec(), start=False))
    assert result.status is not None and result.status.state is PowerState.SHUTOFF
    assert hv.count("start") == 0


def test_volume_name_convention() -> None:
    spec = make_spec("db")
    assert volume_name(spec, DiskSpec(target="vdb", size_gib=1, format=DiskFormat.RAW)) == "db-vdb.raw"


# ------------------------------------------------------------------------------------------ lifecycle


@pytest.fixture
def running(handlers: AgentHandlers) -> VmSpec:
    spec = make_spec()
    handlers.create(CreateVm(spec=spec))
    return spec


def test_start_of_a_running_vm_is_fine(handlers: AgentHandlers, hv: FakeHypervisor, running: VmSpec) -> None:
    result = handlers.start(VmAction(ref(running)))
    assert result.status is not None and result.status.state is PowerState.RUNNING
    assert hv.count("start") == 1  # only the create's


def test_start_of_an_unknown_vm_is_not_found(handlers: AgentHandlers) -> None:
    with pytest.raises(NotFound):
        handlers.start(VmAction(VmRef(uuid=str(uuid_mod.uuid4()), name="ghost")))


def test_destroy_twice_is_fine(handlers: AgentHandlers, hv: FakeHypervisor, running: VmSpec) -> None:
    first = handlers.destroy(VmAction(ref(running)))
    second = handlers.destroy(VmAction(ref(running)))
    assert first.status is not None and first.status.state is PowerState.SHUTOFF
    assert second.status == first.status
    assert hv.count("destroy") == 1


def test_shutdown(handlers: AgentHandlers, hv: FakeHypervisor, running: VmSpec) -> None:
    result = handlers.shutdown(ShutdownVm(ref(running), timeout_s=5))
    assert result.status is not None and result.status.state is PowerState.SHUTOFF
    again = handlers.shutdown(ShutdownVm(ref(running), timeout_s=5))
    assert again.message == "already shutoff"
    assert hv.count("shutdown") == 1


def test_shutdown_ignored_by_the_guest(handlers: AgentHandlers, hv: FakeHypervisor, running: VmSpec) -> None:
    hv.ignore_acpi = True
    with pytest.raises(Conflict, match="did not shut down"):
        handlers.shutdown(ShutdownVm(ref(running), timeout_s=1))
    result = handlers.shutdown(ShutdownVm(ref(running), timeout_s=1, force_after_timeout=True))
    assert result.status is not None and result.status.state is PowerState.SHUTOFF


def test_suspend_and_resume_are_idempotent(
    handlers: AgentHandlers, hv: FakeHypervisor, running: VmSpec
) -> None:
    for _ in range(2):
        result = handlers.suspend(VmAction(ref(running)))
        assert result.status is not None and result.status.state is PowerState.PAUSED
    for _ in range(2):
        result = handlers.resume(VmAction(ref(running)))
        assert result.status is not None and result.status.state is PowerState.RUNNING
    assert (hv.count("suspend"), hv.count("resume")) == (1, 1)


def test_suspend_resume_reboot_of_a_stopped_vm_conflict(handlers: AgentHandlers, running: VmSpec) -> None:
    handlers.destroy(VmAction(ref(running)))
    for action in (handlers.suspend, handlers.resume, handlers.reboot):
        with pytest.raises(Conflict, match="shutoff"):
            action(VmAction(ref(running)))


def test_reboot(handlers: AgentHandlers, hv: FakeHypervisor, running: VmSpec) -> None:
    result = handlers.reboot(VmAction(ref(running)))
    assert result.status is not None and result.status.state is PowerState.RUNNING
    assert hv.count("reboot") == 1


def test_autostart(handlers: AgentHandlers, hv: FakeHypervisor, running: VmSpec) -> None:
    on = handlers.autostart(SetAutostart(ref(running), enabled=True))
    on_again = handlers.autostart(SetAutostart(ref(running), enabled=True))
    off = handlers.autostart(SetAutostart(ref(running), enabled=False))
    assert on.status is not None and on.status.autostart is True
    assert on_again.status == on.status
    assert off.status is not None and off.status.autostart is False
    assert hv.count("set_autostart") == 2


# ------------------------------------------------------------------------------------------ vm.delete


def test_delete_of_a_missing_vm_is_fine(handlers: AgentHandlers, hv: FakeHypervisor) -> None:
    result = handlers.delete(DeleteVm(VmRef(uuid=str(uuid_mod.uuid4()), name="ghost"), delete_disks=True))
    assert result == VmResult(status=None, message="not defined on this host")
    assert hv.calls == []


def test_delete_with_disks_removes_only_created_volumes(handlers: AgentHandlers, hv: FakeHypervisor) -> None:
    hv.files.add("/srv/images/base.qcow2")
    hv.volumes[("default", "shared.iso")] = "/pools/default/shared.iso"
    spec = make_spec(
        disks=(
            DiskSpec(target="vda", size_gib=10),
            DiskSpec(target="vdb", source="existing", path="/srv/images/base.qcow2"),
            DiskSpec(target="vdc", source="existing", path="/pools/default/shared.iso"),
        )
    )
    handlers.create(CreateVm(spec=spec))

    result = handlers.delete(DeleteVm(ref(spec), delete_disks=True))

    assert result.status is None
    assert spec.uuid not in hv.domains
    assert hv.volumes == {("default", "shared.iso"): "/pools/default/shared.iso"}
    assert "/srv/images/base.qcow2" in hv.files
    # and once more: already gone is fine
    assert handlers.delete(DeleteVm(ref(spec), delete_disks=True)).status is None


def test_delete_keeps_disks_unless_asked(
    handlers: AgentHandlers, hv: FakeHypervisor, running: VmSpec
) -> None:
    handlers.delete(DeleteVm(ref(running)))
    assert running.uuid not in hv.domains
    assert ("default", "web1-vda.qcow2") in hv.volumes
    assert hv.count("destroy") == 1  # it was running


def test_delete_redelivered_after_the_volumes_went(
    handlers: AgentHandlers, hv: FakeHypervisor, running: VmSpec
) -> None:
    hv.volumes.clear()  # as if the first delete died between deleting volumes and undefine
    result = handlers.delete(DeleteVm(ref(running), delete_disks=True))
    assert result.status is None and running.uuid not in hv.domains


# ------------------------------------------------------------------------------------------ reports


def test_state_changes_request_a_report_even_on_failure(
    handlers: AgentHandlers, reports: ReportRequests, running: VmSpec
) -> None:
    before = reports.count
    handlers.destroy(VmAction(ref(running)))
    with pytest.raises(Conflict):
        handlers.suspend(VmAction(ref(running)))
    assert reports.count == before + 2


def test_report_now_returns_the_promised_seq(handlers: AgentHandlers, reports: ReportRequests) -> None:
    assert handlers.report_now(ReportRequest(reason="test")) == ReportAck(seq=101)
    assert reports.count == 1


def test_table_covers_every_agent_kind(handlers: AgentHandlers) -> None:
    # Host networking and tuning kinds are handled by their own agent modules (agent.main.build_modules).
    from common.messages import network, tuning  # noqa: PLC0415

    modules = {k.name for k in (*network.KINDS, *tuning.KINDS)}
    assert set(handlers.table()) == {k.name for k in KINDS if k.route is Route.AGENT} - modules


# ------------------------------------------------------------------------------------------ dispatch + journal


def test_redelivered_command_is_answered_from_the_journal(
    tmp_path: Path, hv: FakeHypervisor, handlers: AgentHandlers
) -> None:
    journal = SqliteJournal(tmp_path / "journal.db")
    dispatcher = Dispatcher("agent:h1", handlers.table(), journal=journal)
    env = request("vm.create", CreateVm(spec=make_spec()), "test", timeout=60)
    delivery = Delivery(env, "h1", redelivered=False, reply_to="amq.reply")

    first = dispatcher(delivery)
    hv.domains.clear()  # were it executed again, it would define again
    second = dispatcher(replace(delivery, redelivered=True))

    assert first.reply is not None and second.reply == first.reply
    assert hv.count("define") == 1
    result = unwrap(first.reply, VmResult)
    assert result.status is not None and result.status.state is PowerState.RUNNING
    assert journal.kind_of(env.id) == "vm.create"
    journal.close()


def test_handler_errors_travel_as_typed_errors(hv: FakeHypervisor, handlers: AgentHandlers) -> None:
    dispatcher = Dispatcher("agent:h1", handlers.table())
    env = Envelope(
        kind="vm.start",
        body=to_plain(VmAction(VmRef(uuid=str(uuid_mod.uuid4()), name="ghost"))),
        sender="test",
    )
    outcome = dispatcher(Delivery(env, "h1", False, "amq.reply"))
    assert outcome.reply is not None and not outcome.dead_letter
    with pytest.raises(NotFound):
        unwrap(outcome.reply, VmResult)
