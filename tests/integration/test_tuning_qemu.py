"""Tuning on the real host: libvirtd with QEMU/TCG guests and this machine's kernel, driven over
the real broker (and, for hugepages, through the real controller and CLI).

This host has CPUs 0 and 1: the agent dedicates CPU 1 and shares CPU 0. Affinities are read
from /proc (``Cpus_allowed_list``, what ``taskset -p`` prints) and with ``os.sched_getaffinity``,
never from virtfleet's own answers alone. Every host setting a test changes (hugepage pool, THP,
IO scheduler) is restored, even when the test fails.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu_guest import (
    GUEST_DIR,
    guest_name,
    guest_spec,
    qemu_connection,
    require_qemu,
    serial_log,
    start_qemu_agent,
)
from vfsupport import Fleet, fresh_database, wait_until

from agent.main import Agent
from agent.tuning import parse
from common.messages import tuning
from common.messages.base import replace
from common.messages.vm import (
    VM_CREATE,
    VM_DELETE,
    CpuTune,
    CreateVm,
    DeleteVm,
    PowerState,
    VcpuPin,
    VmRef,
    VmSpec,
)
from controller.agent_api import AgentClient

pytestmark = [pytest.mark.broker, pytest.mark.qemu]

HOST = "qemu-tuned"
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.fixture
def conn() -> Iterator[Any]:
    require_qemu()
    if os.cpu_count() != 2 or parse.cpu_list(Path("/sys/devices/system/cpu/online").read_text()) != {0, 1}:
        pytest.skip(
            "CPU pinning, emulator pinning and taskset on real QEMU not tested: the tests pin to "
            "CPUs 0 and 1 and need a 2-CPU host with exactly those online"
        )
    with qemu_connection() as c:
        yield c


@pytest.fixture
def agent(conn: Any, vhost_url: str, tmp_path: Path) -> Iterator[Agent]:
    running = start_qemu_agent(
        conn,
        HOST,
        vhost_url,
        tmp_path / "state",
        tuning=True,
        heartbeat_interval=1,
        dedicated_cpus="1",
        shared_cpus="0",
    )
    yield running
    running.stop()


def affinity_from_proc(pid: int) -> dict[str, frozenset[int]]:
    """Thread name -> allowed CPUs of every thread of ``pid``, straight from the kernel."""
    out: dict[str, frozenset[int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        name = (task / "comm").read_text().strip()
        listed = parse.cpu_list(parse.status_field((task / "status").read_text(), "Cpus_allowed_list") or "")
        assert listed == frozenset(os.sched_getaffinity(int(task.name))), name
        out[f"{name}#{task.name}" if not name.startswith("CPU ") else name] = listed
    return out


def vcpu_and_emulator(pid: int) -> tuple[frozenset[int], set[frozenset[int]]]:
    threads = affinity_from_proc(pid)
    emulator = {cpus for name, cpus in threads.items() if not name.startswith("CPU ")}
    return threads["CPU 0/TCG"], emulator


def boot(client: AgentClient, spec: VmSpec) -> tuning.VmAffinity:
    created = client.call(HOST, VM_CREATE, CreateVm(spec=spec, start=True))
    assert created.status is not None and created.status.state == PowerState.RUNNING
    seen = wait_until(
        lambda: (
            (
                a := client.call(
                    HOST, tuning.TUNING_AFFINITY, tuning.GetAffinity(VmRef(spec.uuid, spec.name))
                )
            ).observed
            and a
        ),
        30,
        f"the QEMU process of {spec.name}",
    )
    assert isinstance(seen, tuning.VmAffinity)
    return seen


def test_dedicated_vm_threads_and_live_repin(conn: Any, agent: Agent, client: AgentClient) -> None:
    name = guest_name("pinned")
    spec = replace(
        guest_spec(name, vcpus=1, max_vcpus=1),
        cputune=CpuTune(vcpu_pins=(VcpuPin(0, "1"),), emulator_cpuset="0"),
    )
    seen = boot(client, spec)
    assert seen.pid is not None
    assert [(p.vcpu, p.cpuset) for p in seen.vcpu_pins] == [(0, "1")] and seen.emulator_cpuset == "0"
    reported = {t.name: t.cpus for t in seen.threads}
    assert reported["CPU 0/TCG"] == "1"
    vcpu, emulator = vcpu_and_emulator(seen.pid)
    assert vcpu == {1}  # the vCPU thread on the dedicated CPU
    assert emulator == {frozenset({0})}  # main, IO and RCU threads on the shared CPU

    ref = VmRef(spec.uuid, name)
    moved = client.call(HOST, tuning.TUNING_PIN, tuning.PinVm(ref, vcpu_pins=(VcpuPin(0, "0"),)))
    assert [p.cpuset for p in moved.vcpu_pins] == ["0"]
    assert vcpu_and_emulator(seen.pid)[0] == {0}  # live: the running thread moved
    back = client.call(
        HOST, tuning.TUNING_PIN, tuning.PinVm(ref, vcpu_pins=(VcpuPin(0, "1"),), emulator_cpuset="0-1")
    )
    assert back.emulator_cpuset == "0-1"
    vcpu, emulator = vcpu_and_emulator(seen.pid)
    assert vcpu == {1} and emulator == {frozenset({0, 1})}

    # Persistent too (--config): the pins are in the inactive definition.
    dom_xml = conn.lookupByUUIDString(spec.uuid).XMLDesc(2)  # VIR_DOMAIN_XML_INACTIVE, the agent's connection
    assert "<vcpupin vcpu='0' cpuset='1'/>" in dom_xml and "<emulatorpin cpuset='0-1'/>" in dom_xml
    client.call(HOST, VM_DELETE, DeleteVm(ref))


def test_taskset_on_a_managed_qemu_process(agent: Agent, client: AgentClient) -> None:
    name = guest_name("taskset")
    spec = guest_spec(name, vcpus=1, max_vcpus=1)  # shared: no libvirt pinning, so every CPU allowed
    seen = boot(client, spec)
    assert seen.pid is not None
    info = client.call(HOST, tuning.TUNING_PROCESS, tuning.ProcessQuery(seen.pid))
    assert (info.qemu, info.vm_uuid, info.managed) == (True, spec.uuid, True)
    assert client.call(HOST, tuning.TUNING_PROCESS, tuning.ProcessQuery(os.getpid())).qemu is False
    done = client.call(HOST, tuning.TUNING_TASKSET, tuning.SetTaskset(seen.pid, spec.uuid, "0"))
    assert {t.cpus for t in done.after} == {"0"}
    assert set(affinity_from_proc(seen.pid).values()) == {frozenset({0})}
    client.call(HOST, tuning.TUNING_TASKSET, tuning.SetTaskset(seen.pid, spec.uuid, "0-1"))
    assert set(affinity_from_proc(seen.pid).values()) == {frozenset({0, 1})}
    client.call(HOST, VM_DELETE, DeleteVm(VmRef(spec.uuid, name)))


def _block_device(name: str) -> Path:
    return Path(f"/sys/block/{name}/queue/scheduler")


@contextlib.contextmanager
def restored(*paths: Path) -> Iterator[None]:
    """Write back the selected value of each sysfs choice file (or the number) afterwards."""
    saved = {p: p.read_text() for p in paths}
    try:
        yield
    finally:
        for path, text in saved.items():
            value = parse.selection(text).selected if "[" in text else text.strip()
            path.write_text(value + "\n")
        for path, text in saved.items():
            assert path.read_text() == text, f"{path} was not restored"


def test_io_scheduler_and_profile_on_the_real_kernel(agent: Agent, client: AgentClient) -> None:
    loop = _block_device("loop0")
    vda = _block_device("vda")
    if not (loop.exists() and vda.exists()):
        pytest.skip(
            "IO scheduler and virt-host profile on the real kernel not tested: needs block devices loop0 and vda"
        )
    with restored(loop, vda, THP_ENABLED):
        done = client.call(HOST, tuning.TUNING_IO_SCHEDULER, tuning.SetIoScheduler("loop0", "mq-deadline"))
        assert done.after == "mq-deadline" and parse.selection(loop.read_text()).selected == "mq-deadline"
        # Detune, then let the profile put things right; a second run changes nothing.
        THP_ENABLED.write_text("always\n")
        other = "none" if parse.selection(vda.read_text()).selected != "none" else "kyber"
        vda.write_text(other + "\n")
        first = client.call(HOST, tuning.TUNING_PROFILE, tuning.ApplyProfile("virt-host"))
        changed = {c.setting: c.after for c in first.changes if c.changed}
        rotational = Path("/sys/block/vda/queue/rotational").read_text().strip() == "1"
        assert changed == {
            "thp.enabled": "madvise",
            "io.vda.scheduler": "mq-deadline" if rotational else "none",
        }
        assert parse.selection(THP_ENABLED.read_text()).selected == "madvise"
        assert "io.loop0.scheduler" not in {c.setting for c in first.changes}  # virtual device: untouched
        second = client.call(HOST, tuning.TUNING_PROFILE, tuning.ApplyProfile("virt-host"))
        assert [c.setting for c in second.changes if c.changed] == []


def test_hugepage_guest_starts_only_when_the_pool_has_pages(
    conn: Any, vhost_url: str, tmp_path: Path, agent: Agent
) -> None:
    original = NR_HUGEPAGES.read_text()
    try:
        # The agent runs in this process without a key file (start_qemu_agent): an unsigned fleet.
        with fresh_database(tmp_path) as db, Fleet(tmp_path, vhost_url, db, signed=False) as fleet:
            fleet.start_controller(down_after=30)
            # The agent started first: its first report found no controller queue. Ask again.
            wait_until(
                lambda: agent.reporter.request_report() and fleet.hosts().get(HOST, {}).get("status") == "up",
                60,
                f"{HOST} to be known and up",
                interval=1.0,
            )

            def pool() -> dict[str, Any]:
                facts = fleet.cli_ok("host", "tuning", HOST)["facts"]
                return next(p for p in facts["hugepages"] if p["size_kib"] == 2048)

            def create(name: str) -> Any:
                return fleet.cli(
                    "vm",
                    "create",
                    name,
                    "--host",
                    HOST,
                    "--memory",
                    "128",
                    "--hugepage-size",
                    "2M",
                    "--disk",
                    "none",
                    "--domain-type",
                    "qemu",
                    "--machine",
                    "pc",
                    "--kernel",
                    str(GUEST_DIR / "vmlinux"),
                    "--initrd",
                    str(GUEST_DIR / "initrd.gz"),
                    "--kernel-args",
                    "console=ttyS0 quiet",
                    "--serial-log",
                    str(serial_log(name)),
                )

            fleet.cli_ok("host", "hugepages", HOST, "--size", "2M", "--count", "0")
            wait_until(lambda: pool()["total"] == 0, 30, "an empty 2M pool in the host's report")
            name = guest_name("huge")
            refused = create(name)
            assert refused.code == 4, refused.stdout + refused.stderr
            assert f"{HOST}: 2M hugepages short by 64 pages" in refused.json["error"]["message"]

            grown = fleet.cli_ok("host", "hugepages", HOST, "--size", "2M", "--count", "64")
            assert grown["result"]["pool"]["total"] == 64, grown
            wait_until(lambda: pool()["total"] == 64, 30, "64 pages in the host's report")
            placed = create(name)
            assert placed.code == 0, placed.stdout + placed.stderr
            assert placed.json["vm"]["power_state"] == "running"
            dom = conn.lookupByName(name)
            assert "<hugepages>" in dom.XMLDesc(0) and "size='2048'" in dom.XMLDesc(0)
            info = parse.meminfo(Path("/proc/meminfo").read_text())
            assert info["HugePages_Free"] - info["HugePages_Rsvd"] == 0  # the guest holds every page
            # The pool is now fully claimed: the scheduler refuses a second guest.
            again = create(guest_name("huge2"))
            assert again.code == 4 and "2M hugepages short by 64 pages" in again.json["error"]["message"]
            fleet.cli_ok("vm", "delete", name)
    finally:
        with contextlib.suppress(Exception):
            for dom in conn.listAllDomains(0):
                if dom.name().startswith("vftest-huge") and dom.isActive():
                    dom.destroy()
        NR_HUGEPAGES.write_text(original)
        assert NR_HUGEPAGES.read_text() == original
