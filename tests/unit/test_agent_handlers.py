"""Agent command handlers against the shipped in-memory hypervisor (agent.drivers.fake).

The fake is strict like libvirt: starting a running domain, destroying a stopped one or defining a
second domain with a taken name raise, so idempotency has to come from the handlers.
"""

from __future__ import annotations

import functools
import uuid as uuid_mod
from dataclasses import replace
from pathlib import Path

import pytest
from builders import vm_spec

from agent.drivers.fake import FakeHypervisor
from agent.handlers import AgentHandlers, volume_name
from agent.host_storage import HostStorage
from agent.journal import SqliteJournal
from agent.ports import GIB, Hypervisor
from agent.storage_pools import StoragePool
from common import errors
from common.codec import to_wire
from common.domain_xml import parse_domain_xml
from common.messages import vm as vm_msgs
from common.messages.catalogue import CATALOGUE
from common.messages.descriptor import Route, Side
from common.messages.envelope import Envelope
from common.messages.host import ReportAck, ReportRequest
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
)
from common.messages.vmops import SetMemory
from common.transport.port import Delivery
from common.transport.rpc import Dispatcher, HandlerTable, request, unwrap

# ------------------------------------------------------------------------------------------ helpers


class ReportRequests:
    """The reporter as the handlers see it: full reports requested, and VMs noted for a delta."""

    def __init__(self) -> None:
        self.count = 0
        self.changed: list[str] = []

    def __call__(self) -> int:
        self.count += 1
        return 100 + self.count

    def vm_changed(self, uuid: str) -> None:
        self.changed.append(uuid)


make_spec = functools.partial(vm_spec, domain_type=DomainType.QEMU)


def ref(spec: VmSpec) -> VmRef:
    return VmRef(uuid=spec.uuid, name=spec.name)


@pytest.fixture
def hv() -> FakeHypervisor:
    return FakeHypervisor(pool_path="/pools/default")


@pytest.fixture
def reports() -> ReportRequests:
    return ReportRequests()


@pytest.fixture
def handlers(hv: FakeHypervisor, reports: ReportRequests) -> AgentHandlers:
    # the hypervisor's default pool, plus an operator's images directory and a second pool
    pools = [StoragePool("images", "/srv/images"), StoragePool("fast", "/pools/fast")]
    storage = HostStorage.for_host(hv, pools)
    return AgentHandlers(hv, reports, hv.images(), vm_changed=reports.vm_changed, storage=storage)


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
    assert hv.volumes() == {("default", "web1-vda.qcow2"): "/pools/default/web1-vda.qcow2"}
    (disk,) = result.disks
    assert (disk.pool, disk.volume, disk.path) == (
        "default",
        "web1-vda.qcow2",
        "/pools/default/web1-vda.qcow2",
    )
    parsed = parse_domain_xml(hv.domain_xml(spec.uuid, live=False))
    assert [d.path for d in parsed.disks] == ["/pools/default/web1-vda.qcow2"]
    assert hv.owned_volumes(spec.uuid) == ("/pools/default/web1-vda.qcow2",)
    # ... recorded by the define itself: no second write of the definition, no window between
    assert hv.count("set_owned_volumes") == 0


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
    hv.set_autostart(spec.uuid, False)
    hv.set_owned_volumes(spec.uuid, ())  # as if the agent died right after define

    result = handlers.create(CreateVm(spec=spec, start=True))

    assert result.status is not None and result.status.state is PowerState.RUNNING
    assert result.status.autostart is True
    assert hv.owned_volumes(spec.uuid) == ("/pools/default/web1-vda.qcow2",)
    assert hv.count("define") == 1


class _Crash(BaseException):
    """The agent process dying mid-command (nothing of the handler's own cleanup runs)."""


def test_create_reuses_its_own_volume_left_by_an_attempt_that_died(
    handlers: AgentHandlers, hv: FakeHypervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = make_spec()

    def die(_xml: str) -> str:
        raise _Crash

    with monkeypatch.context() as patched:
        patched.setattr(hv, "define", die)  # the agent dies after the volume was made
        with pytest.raises(_Crash):
            handlers.create(CreateVm(spec=spec))
    hv.calls.clear()

    result = handlers.create(CreateVm(spec=spec))  # the command, redelivered

    assert result.status is not None and result.status.state is PowerState.RUNNING
    assert hv.count("create_volume") == 0
    assert hv.owned_volumes(spec.uuid) == ("/pools/default/web1-vda.qcow2",)


def test_create_refuses_a_volume_kept_by_a_deleted_vm_of_the_same_name(
    handlers: AgentHandlers, hv: FakeHypervisor
) -> None:
    """A new VM never starts on an old VM's data: the disk ``vm delete`` kept (without
    ``--delete-disks``) has the name the new VM's disk would get, and is not used for it."""
    old = make_spec()
    handlers.create(CreateVm(spec=old))
    handlers.delete(DeleteVm(ref(old)))
    hv.calls.clear()

    new = make_spec()  # the same name, another VM
    with pytest.raises(errors.AlreadyExists) as info:
        handlers.create(CreateVm(spec=new))

    assert "volume default/web1-vda.qcow2 exists already" in info.value.message
    assert info.value.details["path"] == "/pools/default/web1-vda.qcow2"
    assert hv.find(new.uuid) is None and hv.count("define") == 0
    assert hv.volume_path("default", "web1-vda.qcow2") is not None, "the kept disk is left alone"
    # ... which the deleted VM can still be brought back with (vm import, an existing disk)
    handlers.delete(DeleteVm(ref(new), delete_disks=True))  # the controller's cleanup: nothing of its own
    assert hv.volume_path("default", "web1-vda.qcow2") is not None


def test_create_refuses_a_volume_that_virtfleet_did_not_make(
    handlers: AgentHandlers, hv: FakeHypervisor
) -> None:
    hv.create_volume("default", "web1-vda.qcow2", DiskFormat.QCOW2, 10)  # virsh vol-create-as
    with pytest.raises(errors.AlreadyExists):
        handlers.create(CreateVm(spec=make_spec()))
    assert hv.count("define") == 0


def test_a_volume_that_cannot_be_made_leaves_no_record(
    handlers: AgentHandlers, hv: FakeHypervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = make_spec()

    def full(*_args: object) -> str:
        raise errors.StorageError("pool default is full")

    monkeypatch.setattr(hv, "create_volume", full)
    with pytest.raises(errors.StorageError):
        handlers.create(CreateVm(spec=spec))
    assert handlers.storage.formats.get("/pools/default/web1-vda.qcow2") is None
    assert handlers.storage.formats.owner("/pools/default/web1-vda.qcow2") is None


def test_create_with_a_taken_name_and_another_uuid_is_already_exists(
    handlers: AgentHandlers, hv: FakeHypervisor
) -> None:
    handlers.create(CreateVm(spec=make_spec()))
    with pytest.raises(errors.AlreadyExists) as info:
        handlers.create(CreateVm(spec=make_spec(disks=(DiskSpec(target="vdb", size_gib=5),))))
    assert info.value.details["name"] == "web1"
    assert hv.count("define") == 1
    assert hv.volume_path("default", "web1-vdb.qcow2") is None


def test_kvm_on_a_host_without_hw_virt_is_unsupported(reports: ReportRequests) -> None:
    hv = FakeHypervisor(hw_virt=False)
    handlers = AgentHandlers(hv, reports)
    with pytest.raises(errors.Unsupported, match="hardware virtualisation"):
        handlers.create(CreateVm(spec=make_spec(domain_type=DomainType.KVM)))
    assert hv.calls == []
    # TCG works there
    result = handlers.create(CreateVm(spec=make_spec(domain_type=DomainType.QEMU)))
    assert result.status is not None


def test_kvm_on_a_host_with_hw_virt_is_defined_as_kvm(handlers: AgentHandlers, hv: FakeHypervisor) -> None:
    spec = make_spec(domain_type=DomainType.KVM)
    handlers.create(CreateVm(spec=spec))
    assert parse_domain_xml(hv.domain_xml(spec.uuid, live=False)).domain_type == "kvm"


def test_existing_image_must_exist_and_is_not_owned(handlers: AgentHandlers, hv: FakeHypervisor) -> None:
    disk = DiskSpec(target="vda", source="existing", path="/srv/images/base.qcow2")
    with pytest.raises(errors.NotFound, match="does not exist"):
        handlers.create(CreateVm(spec=make_spec(disks=(disk,))))
    assert hv.calls == []

    hv.add_file("/srv/images/base.qcow2")
    spec = make_spec(disks=(disk, DiskSpec(target="vdb", size_gib=1, format=DiskFormat.RAW)))
    result = handlers.create(CreateVm(spec=spec))
    assert [d.path for d in result.disks] == ["/srv/images/base.qcow2", "/pools/default/web1-vdb.raw"]
    assert hv.owned_volumes(spec.uuid) == ("/pools/default/web1-vdb.raw",)


def test_disk_in_a_named_pool_with_a_named_volume(handlers: AgentHandlers, hv: FakeHypervisor) -> None:
    hv.add_pool("fast", "/pools/fast", 100 * GIB)
    spec = make_spec(disks=(DiskSpec(target="vda", size_gib=3, pool="fast", volume="root.qcow2"),))
    result = handlers.create(CreateVm(spec=spec))
    assert result.disks[0].path == "/pools/fast/root.qcow2"


def test_bad_volume_name_is_invalid(handlers: AgentHandlers, hv: FakeHypervisor) -> None:
    spec = make_spec(disks=(DiskSpec(target="vda", size_gib=3, volume="../etc/passwd"),))
    with pytest.raises(errors.InvalidRequest, match="volume name"):
        handlers.create(CreateVm(spec=spec))
    assert hv.calls == []


def test_new_cdrom_is_invalid(handlers: AgentHandlers) -> None:
    spec = make_spec(disks=(DiskSpec(target="sda", device=DiskDevice.CDROM),))
    with pytest.raises(errors.InvalidRequest, match="CD-ROM"):
        handlers.create(CreateVm(spec=spec))


def test_failed_define_removes_the_volumes_it_created(handlers: AgentHandlers, hv: FakeHypervisor) -> None:
    hv.fail_next("define", errors.HypervisorError("cannot define the domain: boom", details={"code": 1}))
    with pytest.raises(errors.HypervisorError):
        handlers.create(CreateVm(spec=make_spec()))
    assert hv.volumes() == {}
    assert hv.list_statuses() == ()


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
    with pytest.raises(errors.NotFound):
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
    with pytest.raises(errors.Conflict, match="did not shut down"):
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


def test_suspend_resume_reboot_reset_of_a_stopped_vm_conflict(
    handlers: AgentHandlers, running: VmSpec
) -> None:
    handlers.destroy(VmAction(ref(running)))
    for action in (handlers.suspend, handlers.resume, handlers.reboot, handlers.reset):
        with pytest.raises(errors.Conflict, match="shutoff"):
            action(VmAction(ref(running)))


def test_reboot(handlers: AgentHandlers, hv: FakeHypervisor, running: VmSpec) -> None:
    result = handlers.reboot(VmAction(ref(running)))
    assert result.status is not None and result.status.state is PowerState.RUNNING
    assert hv.count("reboot") == 1


def test_reset_keeps_the_power_state(handlers: AgentHandlers, hv: FakeHypervisor, running: VmSpec) -> None:
    result = handlers.reset(VmAction(ref(running)))
    assert result.status is not None and result.status.state is PowerState.RUNNING
    handlers.suspend(VmAction(ref(running)))
    result = handlers.reset(VmAction(ref(running)))  # like QEMU's system_reset: a paused VM stays paused
    assert result.status is not None and result.status.state is PowerState.PAUSED
    assert hv.count("reset") == 2


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
    hv.add_file("/srv/images/base.qcow2")
    hv.create_volume("default", "shared.iso", DiskFormat.RAW, 1)
    spec = make_spec(
        disks=(
            DiskSpec(target="vda", size_gib=10),
            DiskSpec(target="vdb", source="existing", path="/srv/images/base.qcow2"),
            DiskSpec(
                target="vdc", source="existing", path="/pools/default/shared.iso", format=DiskFormat.RAW
            ),
        )
    )
    handlers.create(CreateVm(spec=spec))

    result = handlers.delete(DeleteVm(ref(spec), delete_disks=True))

    assert result.status is None
    assert hv.find(spec.uuid) is None
    assert hv.volumes() == {("default", "shared.iso"): "/pools/default/shared.iso"}
    assert hv.path_exists("/srv/images/base.qcow2")
    # and once more: already gone is fine
    assert handlers.delete(DeleteVm(ref(spec), delete_disks=True)).status is None


def test_delete_keeps_disks_unless_asked(
    handlers: AgentHandlers, hv: FakeHypervisor, running: VmSpec
) -> None:
    handlers.delete(DeleteVm(ref(running)))
    assert hv.find(running.uuid) is None
    assert hv.volume_path("default", "web1-vda.qcow2") is not None
    assert hv.count("destroy") == 1  # it was running


def test_delete_redelivered_after_the_volumes_went(
    handlers: AgentHandlers, hv: FakeHypervisor, running: VmSpec
) -> None:
    # as if the first delete died between deleting volumes and undefine
    hv.delete_volume("default", "web1-vda.qcow2")
    result = handlers.delete(DeleteVm(ref(running), delete_disks=True))
    assert result.status is None and hv.find(running.uuid) is None


# ------------------------------------------------------------------------------------------ reports


def test_state_changes_note_the_vm_for_a_delta_even_on_failure(
    handlers: AgentHandlers, reports: ReportRequests, running: VmSpec
) -> None:
    before = (reports.count, len(reports.changed))
    handlers.destroy(VmAction(ref(running)))
    with pytest.raises(errors.Conflict):
        handlers.suspend(VmAction(ref(running)))
    assert reports.changed[before[1] :] == [running.uuid, running.uuid]
    assert reports.count == before[0], "a VM command no longer asks for a full host report"


def test_vm_operations_note_the_vm_for_a_delta(
    handlers: AgentHandlers, reports: ReportRequests, running: VmSpec
) -> None:
    """The operations of agent/vmops.py share the handlers' lock and note (one example)."""
    before = len(reports.changed)
    handlers.vmops.set_memory(SetMemory(vm=ref(running), memory_mib=512))
    assert reports.changed[before:] == [running.uuid]


def test_report_now_returns_the_promised_seq(handlers: AgentHandlers, reports: ReportRequests) -> None:
    assert handlers.report_now(ReportRequest(reason="test")) == ReportAck(seq=101)
    assert reports.count == 1


def test_table_covers_every_agent_kind(handlers: AgentHandlers) -> None:
    # Host networking and tuning kinds are handled by their own agent modules (agent.main.build_modules).
    from common.messages import network, tuning  # noqa: PLC0415

    table = HandlerTable(Side.AGENT)
    handlers.register(table)
    served = {op.kind for op in table.ops()}
    modules = {op.family for op in CATALOGUE.values() if op.family in (network.NET, tuning.TUNING)}
    assert served == {
        k for k, op in CATALOGUE.items() if op.route is Route.COMMAND and op.family not in modules
    }


# ------------------------------------------------------------------------------------------ dispatch + journal


def test_redelivered_command_is_answered_from_the_journal(
    tmp_path: Path, hv: FakeHypervisor, handlers: AgentHandlers
) -> None:
    journal = SqliteJournal(tmp_path / "journal.db")
    dispatcher = Dispatcher("agent:h1", table_of(handlers), journal=journal)
    spec = make_spec()
    env = request(vm_msgs.VM_CREATE, CreateVm(spec=spec), "test", timeout=60)
    delivery = Delivery(env, "h1", redelivered=False, reply_to="amq.reply")

    first = dispatcher(delivery)
    hv.destroy(spec.uuid)  # were it executed again, it would define again
    hv.undefine(spec.uuid)
    second = dispatcher(replace(delivery, redelivered=True))

    assert first.reply is not None and second.reply is not None
    assert second.reply.encode() == first.reply.encode()
    assert hv.count("define") == 1
    result = unwrap(first.reply, vm_msgs.VM_CREATE)
    assert result.status is not None and result.status.state is PowerState.RUNNING
    assert journal.kind_of(env.id) == vm_msgs.VM_CREATE.kind
    journal.close()


def test_handler_errors_travel_as_typed_errors(hv: FakeHypervisor, handlers: AgentHandlers) -> None:
    dispatcher = Dispatcher("agent:h1", table_of(handlers))
    env = Envelope(
        kind=vm_msgs.VM_START.kind,
        body=to_wire(VmAction(VmRef(uuid=str(uuid_mod.uuid4()), name="ghost"))),
        sender="test",
    )
    outcome = dispatcher(Delivery(env, "h1", False, "amq.reply"))
    assert outcome.reply is not None and not outcome.dead_letter
    with pytest.raises(errors.NotFound):
        unwrap(outcome.reply, vm_msgs.VM_START)


def table_of(handlers: AgentHandlers) -> HandlerTable:
    table = HandlerTable(Side.AGENT)
    handlers.register(table)
    return table
