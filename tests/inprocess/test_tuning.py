"""Host tuning through the ``virtfleet`` CLI, in-process (issue 6's acceptance, formerly on real
processes in tests/e2e/test_tuning_fleet.py): a real controller and two real agents over the fakes.

Both hosts are 8 CPUs in 2 NUMA cells (tests/fixtures/nodes/tuning-numa.xml): ``pin-a`` has
dedicated CPUs 2-7 and shared 0-1, ``pin-b`` only dedicated 6-7, which a first VM takes. Dedicated
VMs then land on pin-a, NUMA-local; one beyond its free CPUs is refused with every host's reason;
concurrent creates never give a pCPU to two VMs, as the hypervisor itself reports the pins. Then
live re-pinning, taskset of a managed VM's QEMU process, hugepage pools, IO schedulers and the
``virt-host`` profile on the simulated kernel.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from builders import qemu_process
from inproc import HostShape, InProcessFleet, inprocess_fleet
from vfsupport import CliResult, wait_until

from common.cpuset import parse_cpuset

HOSTS = {
    "pin-a": HostShape("tuning-numa", dedicated_cpus="2-7", shared_cpus="0-1"),
    "pin-b": HostShape("tuning-numa", dedicated_cpus="6-7"),
}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessFleet]:
    with inprocess_fleet(tmp_path_factory.mktemp("tuning"), HOSTS) as f:
        for name in HOSTS:
            wait_until(functools.partial(facts, f, name), 30, f"tuning facts of {name}")
        yield f


def tuning(fleet: InProcessFleet, host: str) -> Any:
    return fleet.cli_ok("host", "tuning", host)


def facts(fleet: InProcessFleet, host: str) -> Any:
    """The host's tuning facts (None until its agent has reported them)."""
    return tuning(fleet, host)["facts"]


def create(fleet: InProcessFleet, name: str, *args: str) -> CliResult:
    return fleet.cli("vm", "create", name, "--memory", "256", "--disk", "1", *args)


def dedicated_args(name: str, vcpus: int, *args: str) -> tuple[str, ...]:
    return ("vm", "create", name, "--memory", "256", "--disk", "1", "--vcpus", str(vcpus),
            "--cpu-policy", "dedicated", *args)  # fmt: skip


def dedicated(fleet: InProcessFleet, name: str, vcpus: int, *args: str) -> CliResult:
    return fleet.cli(*dedicated_args(name, vcpus, *args))


def hypervisor_pins(fleet: InProcessFleet) -> dict[str, list[tuple[str, frozenset[int]]]]:
    """Every VM's vCPU pins as the hosts' hypervisors report them (``vm affinity``), by host."""
    out: dict[str, list[tuple[str, frozenset[int]]]] = {}
    for vm in fleet.cli_ok("vm", "list")["vms"]:
        view = fleet.cli_ok("vm", "affinity", vm["name"])
        for pin in view["affinity"]["vcpu_pins"]:
            out.setdefault(view["host"], []).append((vm["name"], parse_cpuset(pin["cpuset"])))
    return out


# ----------------------------------------------------------------------------- concurrent CLI calls


def cli_in_threads(fleet: InProcessFleet, calls: Sequence[tuple[str, ...]]) -> list[CliResult]:
    """Run ``virtfleet --output json ARGS`` for every ``calls`` entry at once, one thread each, as
    that many operators would (each call has its own streams)."""
    start = threading.Barrier(len(calls))

    def one(args: tuple[str, ...]) -> CliResult:
        start.wait(30)
        return fleet.cli(*args)

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(one, calls))


# ----------------------------------------------------------------------------- topology and placement


def test_hosts_report_topology_and_cpu_sets(fleet: InProcessFleet) -> None:
    facts = tuning(fleet, "pin-a")["facts"]
    assert (facts["sockets"], facts["cores_per_socket"], facts["threads_per_core"]) == (2, 2, 2)
    assert [(c["id"], c["cpus"]) for c in facts["cells"]] == [(0, "0-3"), (1, "4-7")]
    assert (facts["dedicated_cpus"], facts["shared_cpus"], facts["reserved_cpus"]) == ("2-7", "0-1", "")
    assert facts["simulated"] is True
    b = tuning(fleet, "pin-b")
    assert (b["facts"]["dedicated_cpus"], b["facts"]["shared_cpus"], b["free_pcpus"]) == ("6-7", "0-5", "6-7")
    table = fleet.cli("host", "tuning", "pin-a", output="table")
    assert table.code == 0 and "NUMA cell 1" in table.stdout and "dedicated" in table.stdout


def test_dedicated_vms_land_where_cpus_are_free_and_never_share_one(fleet: InProcessFleet) -> None:
    # pin-b's two dedicated CPUs go to a first VM: afterwards pin-b has none free.
    filled = dedicated(fleet, "fill-b", 2, "--host", "pin-b")
    assert filled.code == 0, filled.stdout + filled.stderr
    assert tuning(fleet, "pin-b")["free_pcpus"] == ""

    explained = dedicated(fleet, "ded-1", 2, "--dry-run")
    rejected = {r["host"]: r["message"] for r in explained.json["placement"]["rejected"]}
    assert rejected["pin-b"] == "dedicated cpu short by 2 pCPU at ratio 1.0"
    first = dedicated(fleet, "ded-1", 2)
    assert first.code == 0, first.stdout + first.stderr
    assert first.json["vm"]["host"] == "pin-a"
    view = fleet.cli_ok("vm", "affinity", "ded-1")
    assert (view["cpu_policy"], view["pcpus"], view["allowance"]) == (
        "dedicated",
        "2-3",
        "2-3",
    )  # NUMA cell 0
    assert [(p["vcpu"], p["cpuset"]) for p in view["affinity"]["vcpu_pins"]] == [(0, "2"), (1, "3")]
    assert view["affinity"]["emulator_cpuset"] == "0-1"

    # Beyond pin-a's 4 free CPUs: refused, with every host's reason.
    refused = dedicated(fleet, "ded-big", 5)
    assert refused.code == 4, refused.stdout + refused.stderr
    error = refused.json["error"]
    assert error["type"] == "NoValidHost"
    reasons = {r["host"]: r for r in error["details"]["reasons"]}
    assert reasons["pin-a"]["rule"] == "dedicated_cpus"
    assert reasons["pin-a"]["message"] == "dedicated cpu short by 1 pCPU at ratio 1.0"
    assert reasons["pin-b"]["message"] == "dedicated cpu short by 5 pCPU at ratio 1.0"

    # Six concurrent 1-vCPU creates for pin-a's 4 free CPUs: 4 land, 2 are refused.
    results = cli_in_threads(fleet, [dedicated_args(f"race-{i}", 1) for i in range(6)])
    codes = sorted(r.code for r in results)
    assert codes == [0, 0, 0, 0, 4, 4], [r.stdout + r.stderr for r in results]
    for r in results:
        if r.code == 4:
            assert r.json["error"]["type"] == "NoValidHost", r.stdout
        else:
            assert r.json["vm"]["host"] == "pin-a", r.stdout
    assert tuning(fleet, "pin-a")["free_pcpus"] == ""

    pins = hypervisor_pins(fleet)
    for host, dedicated_set in (("pin-a", set(range(2, 8))), ("pin-b", {6, 7})):
        cpus = [cpu for _vm, pinned in pins[host] for cpu in pinned]
        assert all(len(p) == 1 for _vm, p in pins[host]), pins[host]
        assert len(cpus) == len(set(cpus)), f"a pCPU of {host} is pinned twice: {pins[host]}"
        assert set(cpus) == dedicated_set
    held = {vm["name"]: vm["pcpus"] for vm in tuning(fleet, "pin-a")["pinned"]}
    assert set(held) == {"ded-1", *(f"race-{i}" for i, r in enumerate(results) if r.code == 0)}

    # Deleting a VM gives its CPUs back.
    fleet.cli_ok("vm", "delete", "ded-1")
    assert tuning(fleet, "pin-a")["free_pcpus"] == "2-3"
    again = dedicated(fleet, "ded-2", 2)
    assert again.code == 0 and again.json["vm"]["host"] == "pin-a"
    # Its vCPUs are pinned one to one: the count cannot change live, and nothing is claimed.
    held_before = tuning(fleet, "pin-a")["pinned"]
    calls_before = fleet.fake("pin-a").hypervisor.count("set_vcpus")
    changed = fleet.cli("vm", "setvcpus", "ded-2", "3")
    assert changed.code == 1 and "has dedicated CPUs" in changed.json["error"]["message"]
    assert tuning(fleet, "pin-a")["pinned"] == held_before
    assert fleet.fake("pin-a").hypervisor.count("set_vcpus") == calls_before  # refused before the agent


# ----------------------------------------------------------------------------- live pinning, taskset


def test_live_repin_within_the_allowance(fleet: InProcessFleet) -> None:
    assert create(fleet, "shared-1", "--vcpus", "2", "--host", "pin-a").code == 0
    view = fleet.cli_ok("vm", "pin", "shared-1", "--vcpu", "1", "--cpus", "1")
    assert view["allowance"] == "0-1"
    assert [(p["vcpu"], p["cpuset"]) for p in view["affinity"]["vcpu_pins"]] == [(0, "0-1"), (1, "1")]
    outside = fleet.cli("vm", "pin", "shared-1", "--vcpu", "0", "--cpus", "2")
    assert outside.code == 2
    assert "outside its allowance 0-1 (the host's shared CPUs)" in outside.json["error"]["message"]
    emulator = fleet.cli_ok("vm", "pin", "shared-1", "--emulator", "--cpus", "0")
    assert emulator["affinity"]["emulator_cpuset"] == "0"
    # Made live and in the definition (virsh vcpupin --live --config): the export shows <cputune>.
    exported = fleet.cli("vm", "export", "shared-1", output="table").stdout
    assert '<vcpupin vcpu="1" cpuset="1" />' in exported and '<emulatorpin cpuset="0" />' in exported


def test_taskset_only_for_the_qemu_process_of_a_managed_vm(fleet: InProcessFleet) -> None:
    made = create(fleet, "task-1", "--host", "pin-a")
    assert made.code == 0, made.stdout + made.stderr
    vm_uuid = made.json["vm"]["uuid"]
    root = fleet.fake("pin-a").tuning.kernel.root
    # A process of anyone's that names the VM's uuid on its command line is not its QEMU.
    qemu_process(root, 4000, vm_uuid)
    forged = fleet.cli("host", "taskset", "pin-a", "4000", "--cpus", "0-1")
    assert forged.code == 4 and "not a QEMU process" in forged.json["error"]["message"]
    assert "Cpus_allowed_list:\t0-7" in (root / "proc/4000/task/4001/status").read_text()
    qemu_process(root, 4100, vm_uuid, libvirt_name="task-1")  # libvirt's record names this one
    done = fleet.cli_ok("host", "taskset", "pin-a", "4100", "--cpus", "0-1")
    assert done["vm"] == "task-1"
    assert [t["cpus"] for t in done["result"]["before"]] == ["0-7", "0-7"]
    assert [t["cpus"] for t in done["result"]["after"]] == ["0-1", "0-1"]  # every thread (taskset -a)
    assert [t["vcpu"] for t in done["result"]["after"]] == [None, 0]

    # Outside the VM's allowance (a shared VM: the shared CPUs 0-1): refused, nothing changes.
    outside = fleet.cli("host", "taskset", "pin-a", "4100", "--cpus", "0-2")
    assert outside.code == 2 and "outside its allowance 0-1" in outside.json["error"]["message"]
    status = (fleet.fake("pin-a").tuning.kernel.root / "proc/4100/task/4101/status").read_text()
    assert "Cpus_allowed_list:\t0-1" in status

    # A QEMU process of a VM virtfleet does not know, and a process that is not QEMU: refused.
    qemu_process(fleet.fake("pin-a").tuning.kernel.root, 4200, "6a1f0c3e-0d5e-4f0a-9c3e-2b7f6f1d9a02")
    foreign = fleet.cli("host", "taskset", "pin-a", "4200", "--cpus", "0")
    assert foreign.code == 4 and "not a QEMU process" in foreign.json["error"]["message"]
    sshd = fleet.fake("pin-a").tuning.kernel.root / "proc" / "4300"
    sshd.mkdir()
    (sshd / "cmdline").write_bytes(b"/usr/sbin/sshd\0-D\0")
    not_qemu = fleet.cli("host", "taskset", "pin-a", "4300", "--cpus", "0")
    assert not_qemu.code == 4 and "not a QEMU process" in not_qemu.json["error"]["message"]
    # The process of a VM on the other host is not pin-b's to set.
    wrong_host = fleet.cli("host", "taskset", "pin-b", "4100", "--cpus", "0")
    assert wrong_host.code == 3  # pin-b has no such process


# ----------------------------------------------------------------------------- hugepages, IO, profile


def test_hugepages_io_scheduler_and_profile_on_a_simulated_host(fleet: InProcessFleet) -> None:
    refused = create(fleet, "hp-1", "--hugepage-size", "2M", "--host", "pin-b")
    assert refused.code == 4
    assert "2M hugepages short by 128 pages" in refused.json["error"]["message"]
    # More than the configured share of MemTotal (hugepage_max_share, 0.5 by default): refused.
    memory_mib = fleet.fake("pin-b").hypervisor.memory_mib
    too_many = str(memory_mib // 2 // 2 + 1)  # 2 MiB pages just above half the host's memory
    capped = fleet.cli("host", "hugepages", "pin-b", "--size", "2M", "--count", too_many)
    assert capped.code == 2 and "hugepage_max_share" in capped.json["error"]["message"], capped.stdout
    assert fleet.fake("pin-b").tuning.kernel.hugepage_pool(2048).total == 0
    done = fleet.cli_ok("host", "hugepages", "pin-b", "--size", "2M", "--count", "128")
    assert done["result"]["pool"]["total"] == 128
    wait_until(lambda: tuning(fleet, "pin-b")["facts"]["hugepages"][0]["total"] == 128, 30, "the new pool")
    placed = create(fleet, "hp-1", "--hugepage-size", "2M", "--host", "pin-b")
    assert placed.code == 0, placed.stdout + placed.stderr
    assert tuning(fleet, "pin-b")["hugepages_claimed"] == {"2M": 128}
    shrink = fleet.cli("host", "hugepages", "pin-b", "--size", "2M", "--count", "64")
    assert shrink.code == 4 and "claim 128" in shrink.json["error"]["message"]

    io_done = fleet.cli_ok("host", "io-scheduler", "pin-b", "vda", "kyber")
    assert (io_done["result"]["before"], io_done["result"]["after"]) == ("mq-deadline", "kyber")
    assert fleet.cli("host", "io-scheduler", "pin-b", "vda", "cfq").code == 2
    first = fleet.cli_ok("host", "tune", "pin-b", "--profile", "virt-host", "--hugepages", "2M=256")
    changed = {c["setting"]: (c["before"], c["after"]) for c in first["result"]["changes"] if c["changed"]}
    assert changed == {"io.vda.scheduler": ("kyber", "none"), "hugepages.2M": ("128", "256")}
    second = fleet.cli(
        "host", "tune", "pin-b", "--profile", "virt-host", "--hugepages", "2M=256", output="table"
    )
    assert second.code == 0 and "nothing to change" in second.stdout
