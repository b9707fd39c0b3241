"""Every VM operation of the ops notes through the ``virtfleet`` CLI, in-process: a real controller and
three real agents (hosts shaped like tests/fixtures/nodes/{small,medium,large}.xml) over the shipped
fakes (formerly tests/e2e/test_vm_operations.py, on libvirt's test driver).

Unlike the test driver the fake hypervisor hot-plugs disks and NICs, balloons and resizes disks, so
those operations are tested for what they do: the claim grows before the agent is asked and shrinks
after, the controller's spec follows, and a failure (injected with ``fail_next``, or a refusal QEMU
would make) gives the claim back and changes nothing. What real QEMU adds (the guest seeing the
change) stays in tests/e2e/test_vm_operations_qemu.py.

Each host has its own files, as real hosts do (the test-driver hosts shared this machine's
filesystem): an image an operator copied to a host by hand is put there with
``fake(host).hypervisor.add_file``; ``image create`` makes one through virtfleet.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from inproc import HostShape, InProcessFleet, inprocess_fleet

from agent.drivers.fake import VIR_ERR_INTERNAL_ERROR, VIR_FROM_QEMU, libvirt_error
from agent.ports import GIB
from common.domain_xml import ParsedDomain, parse_domain_xml
from common.messages.vm import DiskFormat
from controller.db import repository as repo

HOSTS = ("small", "medium", "large")
#: Where operators keep images by hand on every host (a storage pool of the simulated hosts: agent.fakehost).
IMAGES = "/srv/images"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessFleet]:
    with inprocess_fleet(tmp_path_factory.mktemp("vmops"), {h: HostShape(h) for h in HOSTS}) as f:
        yield f


def _error(fleet: InProcessFleet, code: int, *args: str) -> dict[str, Any]:
    result = fleet.cli(*args)
    assert result.code == code, (
        f"virtfleet {' '.join(args)}: exit {result.code}\n{result.stdout}{result.stderr}"
    )
    error: dict[str, Any] = result.json["error"]
    return error


def _vm_names(fleet: InProcessFleet) -> set[str]:
    return {v["name"] for v in fleet.cli_ok("vm", "list", "--all")["vms"]}


def _image(fleet: InProcessFleet, host: str, name: str, fmt: DiskFormat, size_gib: int = 1) -> str:
    """An image the operator put on ``host`` by hand."""
    return fleet.fake(host).hypervisor.add_file(f"{IMAGES}/{name}", fmt, size_gib)


def _record(fleet: InProcessFleet, name: str) -> repo.VmRecord:
    """What the controller holds for a VM (its spec included)."""
    assert fleet.controller is not None
    with fleet.controller.service.tx() as s:
        return repo.get_vm(s, name)


def _domain(fleet: InProcessFleet, host: str, name: str, *, live: bool) -> ParsedDomain:
    """The VM as the host's hypervisor has it (``live``: the running domain, else the definition)."""
    hv = fleet.fake(host).hypervisor
    uuid = hv.uuid_for_name(name)
    assert uuid is not None, f"{name} is not defined on {host}"
    return parse_domain_xml(hv.domain_xml(uuid, live=live))


def _hv_error(what: str) -> Any:
    """A QEMU failure as libvirt reports it (HypervisorError: exit 1)."""
    return libvirt_error(
        what, VIR_ERR_INTERNAL_ERROR, "internal error: injected by the test", domain=VIR_FROM_QEMU
    )


# ----------------------------------------------------------------------------- create (virt-install)


def test_create_takes_the_virt_install_options(fleet: InProcessFleet) -> None:
    before = fleet.used("small")
    created = fleet.cli_ok(
        "vm", "create", "testlinux", "--host", "small",
        "--vcpus", "1", "--max-vcpus", "2", "--cpuset", "1-4,6",
        "--memory", "1024", "--max-memory", "2048",
        "--disk", "size=3,format=raw,cache=writethrough,io=threads",
        "--disk", "size=2,bus=sata",
        "--network", "bridge=br0", "--network", "network=default,model=e1000,mac=52:54:00:AA:BB:CC",
        "--graphics", "vnc,password=foobar,port=5910,listen=0.0.0.0",
        "--autostart",
    )  # fmt: skip
    vm = created["vm"]
    assert (vm["host"], vm["status"], vm["power_state"]) == ("small", "active", "running")
    assert (vm["vcpus"], vm["max_vcpus"], vm["memory_mib"], vm["max_memory_mib"]) == (1, 2, 1024, 2048)
    assert vm["autostart"] is True
    assert vm["disk_gib"] == 5  # the new volumes' total is what the pool gives up
    after = fleet.used("small")
    assert after["DISK_GIB"] - before.get("DISK_GIB", 0) == 5
    assert after["VCPU"] - before.get("VCPU", 0) == 1
    volumes = fleet.fake("small").hypervisor.volumes()
    assert {name for (_pool, name) in volumes} >= {"testlinux-vda.raw", "testlinux-sda.qcow2"}

    exported = fleet.cli("vm", "export", "testlinux", "--secure", output="table")
    assert exported.code == 0, exported.stderr
    parsed = parse_domain_xml(exported.stdout)
    assert (parsed.vcpus, parsed.max_vcpus, parsed.cpuset) == (1, 2, "1-4,6")
    assert (parsed.memory_mib, parsed.max_memory_mib) == (1024, 2048)
    disks = {d.target: d for d in parsed.disks}
    assert (disks["vda"].format, disks["vda"].cache, disks["vda"].io) == ("raw", "writethrough", "threads")
    assert (disks["sda"].format, disks["sda"].bus, disks["sda"].cache) == ("qcow2", "sata", "none")
    bridge, network = parsed.nics
    assert (bridge.kind, bridge.source, bridge.model) == ("bridge", "br0", "virtio")
    assert bridge.mac is not None and bridge.mac.startswith("52:54:00:")  # generated by the controller
    assert (network.kind, network.source, network.model, network.mac) == (
        "network", "default", "e1000", "52:54:00:aa:bb:cc",
    )  # fmt: skip
    assert parsed.graphics is not None
    assert (parsed.graphics.port, parsed.graphics.listen, parsed.graphics.password) == (
        5910,
        "0.0.0.0",
        "foobar",
    )
    assert parsed.managed

    plain = fleet.cli("vm", "export", "testlinux", output="table")
    assert "passwd" not in plain.stdout  # secrets only with --secure
    live = parse_domain_xml(fleet.cli("vm", "export", "testlinux", "--live", output="table").stdout)
    # The running domain's taps. (Not their names: the fake gives every NIC of one boot the same
    # free tap, vnet0 twice here -- a bug of FakeHypervisor._boot, reported.)
    assert all(n.target is not None and n.target.startswith("vnet") for n in live.nics), live.nics

    console = fleet.cli_ok("vm", "console", "testlinux")
    assert console["port"] == 5910 and console["password_set"] is True
    assert console["address"].endswith(":5910")
    table = fleet.cli("vm", "console", "testlinux", output="table")
    assert table.stdout.strip() == console["address"]
    assert "password protected" in table.stderr


def test_create_warns_about_writeback_and_shows_progress(fleet: InProcessFleet) -> None:
    result = fleet.cli(
        "vm", "create", "wb", "--memory", "256", "--disk", "size=1,cache=writeback", output="table"
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert "cache=writeback" in result.stderr and "warning" in result.stderr
    assert "wb: done" in result.stderr  # --wait (the default) reports progress on stderr
    assert "wb created on host" in result.stdout
    # A console on loopback (the default listen) gets the ssh tunnel hint.
    fleet.cli_ok("vm", "create", "vnc-local", "--memory", "256", "--disk", "1", "--graphics", "vnc")
    local = fleet.cli("vm", "console", "vnc-local", output="table")
    assert local.code == 0 and local.stdout.strip().startswith("127.0.0.1:59")
    assert "ssh -L" in local.stderr
    assert _error(fleet, 3, "vm", "console", "wb")["message"].startswith("VM wb has no graphical console")


def test_bad_create_options_are_refused_and_change_nothing(fleet: InProcessFleet) -> None:
    names = _vm_names(fleet)
    defines = {h: fleet.fake(h).hypervisor.count("define") for h in HOSTS}
    cases = [
        (("--disk", "size=0"), "size must be a positive"),
        (("--disk", "size=1,format=vmdk"), "format must be raw|qcow2"),
        (("--disk", "path=relative.raw"), "absolute"),
        (("--network", "bridge=br0,speed=10"), "unknown key 'speed'"),
        (("--graphics", "spice"), "only vnc"),
        (("--vcpus", "4", "--max-vcpus", "2"), "max vcpus (2) is below vcpus (4)"),
        (("--memory", "1024", "--max-memory", "512"), "below memory"),
        (("--cpuset", "1-x"), "invalid cpuset"),
        (("--cpu-policy", "exclusive"), "cpu policy must be shared or dedicated"),
        (("--hugepage-size", "4M"), "hugepage size must be 2M or 1G"),
        (("--network", "bridge=br0,mac=01:00:5e:00:00:01"), "multicast"),
        (("--graphics", "vnc,password=muchtoolong"), "8 characters"),
        (("--disk", "none"), "nothing to boot from"),
    ]
    for args, message in cases:
        error = _error(fleet, 2, "vm", "create", "bad-opts", *args)
        assert message in error["message"], (args, error)
    assert _vm_names(fleet) == names
    assert {h: fleet.fake(h).hypervisor.count("define") for h in HOSTS} == defines  # no host was asked


def test_dry_run_counts_only_new_disks(fleet: InProcessFleet) -> None:
    # A 5000 GiB image on every host is bigger than any pool: as an existing image it takes nothing
    # from the pool, so a plan with it fits; a new volume of that size fits nowhere.
    for host in HOSTS:
        _image(fleet, host, "huge.raw", DiskFormat.RAW, 5000)
    plan = fleet.cli_ok(
        "vm", "create", "dry-disks", "--memory", "256", "--disk", f"path={IMAGES}/huge.raw",
        "--disk", "size=4", "--network", "network=default", "--dry-run",
    )  # fmt: skip
    assert plan["dry_run"] is True and plan["vm"] is None
    assert plan["placement"]["host"] in HOSTS and plan["placement"]["rejected"] == []
    refused = _error(
        fleet, 4, "vm", "create", "dry-disks", "--memory", "256", "--disk", "size=5000", "--dry-run"
    )
    assert refused["type"] == "NoValidHost"
    reasons = refused["details"]["reasons"]
    assert {r["rule"] for r in reasons} == {"capacity"}, refused
    assert all("disk short by" in r["message"] for r in reasons), refused
    assert "dry-disks" not in _vm_names(fleet)
    assert all(fleet.fake(h).hypervisor.uuid_for_name("dry-disks") is None for h in HOSTS)


# ----------------------------------------------------------------------------- refusals


def test_name_in_use_is_refused(fleet: InProcessFleet) -> None:
    fleet.cli_ok("vm", "create", "dup-name", "--memory", "256", "--disk", "1")
    error = _error(fleet, 4, "vm", "create", "dup-name", "--memory", "256", "--disk", "1")
    assert error["type"] == "AlreadyExists" and "already exists" in error["message"]


def test_disk_in_use_by_another_guest_is_refused_unless_allowed(fleet: InProcessFleet) -> None:
    image = _image(fleet, "medium", "CentOS-7-x86_64.raw", DiskFormat.RAW, 2)
    start = fleet.used("medium")
    fleet.cli_ok(
        "vm", "create", "CentOS-7-x86_64", "--host", "medium", "--memory", "512", "--disk", f"path={image}"
    )
    before = fleet.used("medium")
    assert before.get("DISK_GIB", 0) == start.get(
        "DISK_GIB", 0
    )  # an existing image takes nothing from the pool
    assert before["MEMORY_MIB"] - start.get("MEMORY_MIB", 0) == 512

    error = _error(
        fleet, 4, "vm", "create", "CentOS-7.5-x86_64", "--host", "medium", "--memory", "512",
        "--disk", f"path={image}",
    )  # fmt: skip
    assert error["type"] == "AlreadyExists"
    assert f"disk {image} is already in use by other guests ['CentOS-7-x86_64']" in error["message"]
    assert "--allow-shared-disk" in error["message"]
    assert "CentOS-7.5-x86_64" not in _vm_names(fleet)  # nothing recorded ...
    assert fleet.used("medium") == before  # ... and nothing claimed
    assert fleet.fake("medium").hypervisor.uuid_for_name("CentOS-7.5-x86_64") is None  # nor defined

    # With the flag it is defined, with a warning. It cannot run while the first guest does: QEMU
    # holds the image's write lock, and so does the fake (libvirt's test driver started both).
    shared = fleet.cli(
        "vm", "create", "CentOS-7.5-x86_64", "--host", "medium", "--memory", "512", "--disk", f"path={image}",
        "--allow-shared-disk", "--no-start", output="table",
    )  # fmt: skip
    assert shared.code == 0, shared.stderr
    assert "allow-shared-disk" in shared.stderr  # warned
    assert fleet.used("medium")["MEMORY_MIB"] == before["MEMORY_MIB"] + 512
    locked = _error(fleet, 1, "vm", "start", "CentOS-7.5-x86_64")
    assert f'Failed to get "write" lock. Is another process using the image [{image}]?' in locked["message"]
    assert fleet.cli_ok("vm", "show", "CentOS-7.5-x86_64")["power_state"] == "shutoff"
    fleet.cli_ok("vm", "destroy", "CentOS-7-x86_64")
    assert fleet.cli_ok("vm", "start", "CentOS-7.5-x86_64")["vm"]["power_state"] == "running"
    # A CD-ROM (read-only) may be shared freely.
    iso = _image(fleet, "medium", "install.iso", DiskFormat.RAW, 1)
    for name in ("iso-1", "iso-2"):
        made = fleet.cli_ok(
            "vm", "create", name, "--host", "medium", "--memory", "256", "--disk", "1", "--cdrom", iso
        )
        assert made["vm"]["power_state"] == "running"


def test_an_error_naming_a_path_in_brackets_prints_for_people(fleet: InProcessFleet) -> None:
    image = _image(fleet, "small", "bracketed.raw", DiskFormat.RAW)
    fleet.cli_ok("vm", "create", "holder", "--host", "small", "--memory", "256", "--disk", f"path={image}")
    fleet.cli_ok(
        "vm", "create", "waiter", "--host", "small", "--memory", "256", "--disk", f"path={image}",
        "--allow-shared-disk", "--no-start",
    )  # fmt: skip
    refused = fleet.cli("vm", "start", "waiter", output="table")
    assert refused.code == 1
    assert f"Is another process using the image [{image}]?" in refused.stderr


def test_missing_image_is_refused_and_changes_nothing(fleet: InProcessFleet) -> None:
    before = fleet.used("small")
    # An image on another host does not help either: each host has its own files.
    _image(fleet, "large", "only-on-large.raw", DiskFormat.RAW)
    for image in ("nope.raw", "only-on-large.raw"):
        error = _error(
            fleet, 3, "vm", "create", "no-image", "--host", "small", "--memory", "256",
            "--disk", f"path={IMAGES}/{image}",
        )  # fmt: skip
        assert "does not exist on this host" in error["message"], image
        assert "no-image" not in _vm_names(fleet)
        assert fleet.used("small") == before


# ----------------------------------------------------------------------------- lifecycle


def test_lifecycle_suspend_resume_reboot_reset_autostart(fleet: InProcessFleet) -> None:
    hv = fleet.fake("large").hypervisor
    fleet.cli_ok("vm", "create", "life2", "--host", "large", "--memory", "512", "--disk", "1")
    assert fleet.cli_ok("vm", "suspend", "life2")["vm"]["power_state"] == "paused"
    listed = {v["name"]: v for v in fleet.cli_ok("vm", "list", "--all")["vms"]}
    assert listed["life2"]["power_state"] == "paused"
    assert "life2" not in {v["name"] for v in fleet.cli_ok("vm", "list", "--running")["vms"]}
    assert fleet.cli_ok("vm", "suspend", "life2")["message"] == "already paused"  # idempotent
    # A hard reset keeps the power state: a paused VM stays paused (QEMU's system_reset).
    resets = hv.count("reset")
    assert fleet.cli_ok("vm", "reset", "life2")["vm"]["power_state"] == "paused"
    assert fleet.cli_ok("vm", "resume", "life2")["vm"]["power_state"] == "running"
    assert fleet.cli_ok("vm", "resume", "life2")["message"] == "already running"
    assert fleet.cli_ok("vm", "reset", "life2")["vm"]["power_state"] == "running"
    assert hv.count("reset") == resets + 2
    reboots = hv.count("reboot")
    assert fleet.cli_ok("vm", "reboot", "life2")["vm"]["power_state"] == "running"
    assert hv.count("reboot") == reboots + 1
    assert fleet.cli_ok("vm", "autostart", "life2")["vm"]["autostart"] is True
    assert fleet.cli_ok("vm", "show", "life2")["autostart"] is True
    assert "autostart on" in fleet.cli("vm", "autostart", "life2", output="table").stdout
    assert fleet.cli_ok("vm", "autostart", "life2", "--disable")["vm"]["autostart"] is False
    assert (
        fleet.cli_ok("vm", "shutdown", "life2", "--grace", "5", "--force")["vm"]["power_state"] == "shutoff"
    )
    error = _error(fleet, 4, "vm", "suspend", "life2")
    assert "cannot be suspended: it is shutoff" in error["message"]
    error = _error(fleet, 4, "vm", "reboot", "life2")
    assert "cannot reboot" in error["message"]
    error = _error(fleet, 4, "vm", "reset", "life2")
    assert "cannot be reset: it is shutoff" in error["message"]
    assert hv.count("reset") == resets + 2  # refused before the hypervisor was asked
    shown = fleet.cli("vm", "show", "life2", output="table").stdout
    for field in (
        "state",
        "vcpus",
        "cpu time",
        "max memory",
        "used memory",
        "autostart",
        "persistent",
        "host",
    ):
        assert field in shown
    fleet.cli_ok("vm", "delete", "life2", "--delete-disks")
    assert "life2" not in _vm_names(fleet)
    assert hv.uuid_for_name("life2") is None
    assert not any(name.startswith("life2-") for (_pool, name) in hv.volumes())


# ----------------------------------------------------------------------------- export / import


def test_export_delete_import_round_trip(fleet: InProcessFleet, tmp_path: Path) -> None:
    # The image is on every host (shared storage, or copied by hand), so the VM may be placed anywhere.
    for host in HOSTS:
        image = _image(fleet, host, "roundtrip.qcow2", DiskFormat.QCOW2)
    fleet.cli_ok(
        "vm", "create", "roundtrip", "--host", "small", "--vcpus", "1", "--max-vcpus", "3", "--memory", "384",
        "--disk", f"path={image}", "--network", "network=default", "--no-start",
    )  # fmt: skip
    exported = fleet.cli("vm", "export", "roundtrip", output="table")
    assert exported.code == 0
    backup = tmp_path / "backup.xml"
    backup.write_text(exported.stdout)
    original = parse_domain_xml(exported.stdout)

    again = _error(fleet, 4, "vm", "import", str(backup))
    assert again["type"] == "AlreadyExists"

    fleet.cli_ok("vm", "delete", "roundtrip")  # the image is kept (no --delete-disks)
    assert fleet.fake("small").hypervisor.storage.get(image) is not None
    assert fleet.fake("small").hypervisor.uuid_for_name("roundtrip") is None
    used_before = {h: fleet.used(h) for h in HOSTS}
    imported = fleet.cli_ok("vm", "import", str(backup))  # placed by the scheduler
    vm = imported["vm"]
    assert vm["name"] == "roundtrip" and vm["uuid"] == original.uuid
    assert (vm["vcpus"], vm["max_vcpus"], vm["memory_mib"]) == (1, 3, 384)
    assert vm["power_state"] == "shutoff" and vm["status"] == "active"
    assert imported["placement"]["host"] == vm["host"]
    used_after = fleet.used(vm["host"])
    assert used_after["MEMORY_MIB"] - used_before[vm["host"]].get("MEMORY_MIB", 0) == 384
    assert used_after.get("DISK_GIB", 0) == used_before[vm["host"]].get("DISK_GIB", 0)
    reexported = parse_domain_xml(fleet.cli("vm", "export", "roundtrip", output="table").stdout)
    assert reexported.managed and reexported.disks[0].path == image
    assert reexported.nics[0].mac == original.nics[0].mac
    assert fleet.cli_ok("vm", "start", "roundtrip")["vm"]["power_state"] == "running"
    assert fleet.cli_ok("vm", "start", "roundtrip")["message"] == "already running"

    fleet.cli_ok("vm", "delete", "roundtrip")
    on_medium = fleet.cli_ok("vm", "import", str(backup), "--host", "medium", "--start")
    assert on_medium["vm"]["host"] == "medium" and on_medium["vm"]["power_state"] == "running"
    assert _domain(fleet, "medium", "roundtrip", live=True).uuid == original.uuid
    # From stdin too (vm import -).
    fleet.cli_ok("vm", "delete", "roundtrip")
    stdin = fleet.cli("vm", "import", "-", "--host", "large")
    assert stdin.code == 2 and stdin.json["error"]["message"] == "the domain XML is empty"  # read stdin


def test_import_refuses_bad_xml_and_missing_disks(fleet: InProcessFleet, tmp_path: Path) -> None:
    names = _vm_names(fleet)
    used = fleet.used("large")
    bad = tmp_path / "bad.xml"
    bad.write_text("<domain><name>x</name>")
    assert "malformed domain XML" in _error(fleet, 2, "vm", "import", str(bad))["message"]
    missing = tmp_path / "missing.xml"
    missing.write_text(
        "<domain type='test'><name>ghost</name><uuid>6a1f0c3e-0d5e-4f0a-9c3e-2b7f6f1d9a01</uuid>"
        "<memory unit='MiB'>256</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os><devices>"
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/srv/images/ghost.raw'/>"
        "<target dev='vda' bus='virtio'/></disk></devices></domain>"
    )
    error = _error(fleet, 3, "vm", "import", str(missing), "--host", "large")
    assert "/srv/images/ghost.raw does not exist" in error["message"]
    assert _vm_names(fleet) == names
    assert fleet.used("large") == used  # the claim made for the placement was given back
    assert fleet.fake("large").hypervisor.uuid_for_name("ghost") is None
    assert (
        "no such file"
        in fleet.cli("vm", "import", str(tmp_path / "nope.xml")).json["error"]["message"].lower()
    )


# ----------------------------------------------------------------------------- snapshots


def test_snapshots_on_qcow2_and_refusal_on_raw(fleet: InProcessFleet) -> None:
    fleet.cli_ok(
        "vm", "create", "snappy", "--host", "large", "--memory", "256", "--disk", "size=1,format=qcow2"
    )
    created = fleet.cli_ok("vm", "snapshot", "create", "snappy", "before-upgrade", "--description", "pre")
    assert [s["name"] for s in created["snapshots"]] == ["before-upgrade"]
    assert created["snapshots"][0]["current"] is True
    dup = _error(fleet, 4, "vm", "snapshot", "create", "snappy", "before-upgrade")
    assert dup["type"] == "AlreadyExists"
    fleet.cli_ok("vm", "snapshot", "create", "snappy", "second")
    listed = fleet.cli_ok("vm", "snapshot", "list", "snappy")["snapshots"]
    assert [s["name"] for s in listed] == ["before-upgrade", "second"]
    assert listed[0]["state"] == "running" and listed[0]["description"] == "pre"
    assert listed[0]["memory"] is True  # taken while running: with its memory
    fleet.cli_ok("vm", "destroy", "snappy")
    reverted = fleet.cli_ok("vm", "snapshot", "revert", "snappy", "before-upgrade")
    assert reverted["vm"]["power_state"] == "running"  # taken while running: reverting runs it again
    assert fleet.cli_ok("vm", "show", "snappy")["desired_power"] == "running"
    left = fleet.cli_ok("vm", "snapshot", "delete", "snappy", "second")["snapshots"]
    assert [s["name"] for s in left] == ["before-upgrade"]
    missing = _error(fleet, 3, "vm", "snapshot", "revert", "snappy", "second")
    assert "has no snapshot named second" in missing["message"]
    table = fleet.cli("vm", "snapshot", "list", "snappy", output="table").stdout
    assert "before-upgrade" in table
    # The snapshot lives inside the qcow2 file (internal), as qemu-img info shows.
    path = _domain(fleet, "large", "snappy", live=False).disks[0].path
    assert path is not None
    assert fleet.cli_ok("image", "info", "large", path)["image"]["snapshots"] == 1

    fleet.cli_ok("vm", "create", "rawvm", "--host", "large", "--memory", "256", "--disk", "size=1,format=raw")
    refused = fleet.cli("vm", "snapshot", "create", "rawvm", "s1")
    assert refused.code == 1
    error = refused.json["error"]
    assert error["type"] == "Unsupported"
    assert "disk vda" in error["message"] and "raw" in error["message"] and "need qcow2" in error["message"]
    assert fleet.cli_ok("vm", "snapshot", "list", "rawvm")["snapshots"] == []


# ----------------------------------------------------------------------------- live vCPUs and memory


def test_setvcpus_and_setmem_reclaim_capacity(fleet: InProcessFleet) -> None:
    fleet.cli_ok(
        "vm", "create", "elastic", "--host", "small", "--vcpus", "1", "--max-vcpus", "4",
        "--memory", "512", "--max-memory", "4096", "--disk", "1",
    )  # fmt: skip
    base = fleet.used("small")
    grown = fleet.cli_ok("vm", "setvcpus", "elastic", "3")["vm"]
    assert grown["vcpus"] == 3
    assert fleet.used("small")["VCPU"] == base["VCPU"] + 2
    assert _domain(fleet, "small", "elastic", live=True).vcpus == 3  # hot-added to the running VM ...
    assert _domain(fleet, "small", "elastic", live=False).vcpus == 3  # ... and in its definition
    spec = _record(fleet, "elastic").spec
    assert spec is not None and spec.vcpus == 3
    shrink = _error(fleet, 1, "vm", "setvcpus", "elastic", "2")
    assert "vCPUs can only be added live" in shrink["message"]
    assert fleet.cli_ok("vm", "show", "elastic")["vcpus"] == 3
    assert fleet.used("small")["VCPU"] == base["VCPU"] + 2  # a refused change releases nothing
    too_many = _error(fleet, 2, "vm", "setvcpus", "elastic", "5")
    assert "at most 4 vCPUs" in too_many["message"]
    # QEMU cannot restore a snapshot of a VM with hot-added vCPUs: refused until it restarts.
    hot = _error(fleet, 4, "vm", "snapshot", "create", "elastic", "hot")
    assert "hot-added" in hot["message"]

    assert fleet.cli_ok("vm", "setmem", "elastic", "2048")["vm"]["memory_mib"] == 2048
    assert fleet.used("small")["MEMORY_MIB"] == base["MEMORY_MIB"] + 1536
    assert fleet.cli_ok("vm", "setmem", "elastic", "256")["vm"]["memory_mib"] == 256
    assert fleet.used("small")["MEMORY_MIB"] == base["MEMORY_MIB"] - 256  # a shrink releases
    assert _domain(fleet, "small", "elastic", live=True).memory_mib == 256  # the balloon target
    spec = _record(fleet, "elastic").spec
    assert spec is not None and spec.memory_mib == 256
    above = _error(fleet, 2, "vm", "setmem", "elastic", "8192")
    assert "higher than its max memory (4096 MiB)" in above["message"]
    stat = fleet.cli_ok("vm", "memstat", "elastic")
    assert (stat["memory_mib"], stat["max_memory_mib"], stat["balloon_kib"]) == (256, 4096, 256 * 1024)
    assert stat["stats"]["actual"] == 256 * 1024
    assert "balloon: actual=256" in fleet.cli("vm", "memstat", "elastic", output="table").stdout

    # Fill the host until a grow cannot fit: refused by the controller, naming the shortfall,
    # before the hypervisor is asked.
    free = fleet.free("small")
    fleet.cli_ok(
        "vm", "create", "filler", "--host", "small", "--memory", str(free["MEMORY_MIB"] - 1024),
        "--vcpus", str(free["VCPU"]), "--disk", "1",
    )  # fmt: skip
    calls = {m: fleet.fake("small").hypervisor.count(m) for m in ("set_memory", "set_vcpus")}
    full = _error(fleet, 4, "vm", "setmem", "elastic", "4096")
    assert full["type"] == "CapacityExceeded"
    assert "memory short by 2816 MiB" in full["message"]
    assert fleet.cli_ok("vm", "show", "elastic")["memory_mib"] == 256
    no_cpu = _error(fleet, 4, "vm", "setvcpus", "elastic", "4")
    assert no_cpu["type"] == "CapacityExceeded" and "vcpu short by 1" in no_cpu["message"], no_cpu
    assert fleet.cli_ok("vm", "show", "elastic")["vcpus"] == 3
    assert {m: fleet.fake("small").hypervisor.count(m) for m in calls} == calls  # the agent was never asked
    fleet.cli_ok("vm", "setmem", "elastic", "1024")  # what fits is fine
    fleet.cli_ok("vm", "delete", "filler", "--delete-disks")

    fleet.cli_ok("vm", "destroy", "elastic")
    assert fleet.cli_ok("vm", "setvcpus", "elastic", "1")["vm"]["vcpus"] == 1  # shut off: lowering is fine
    assert fleet.used("small")["VCPU"] == base["VCPU"]
    off = fleet.cli_ok("vm", "setmem", "elastic", "512")
    assert off["message"] == "512 MiB at the next start"
    assert "balloon: actual=-" in fleet.cli("vm", "memstat", "elastic", output="table").stdout
    assert fleet.cli_ok("vm", "memstat", "elastic")["balloon_kib"] is None


def test_failed_setvcpus_and_setmem_give_the_claim_back_and_change_nothing(fleet: InProcessFleet) -> None:
    hv = fleet.fake("medium").hypervisor
    fleet.cli_ok(
        "vm", "create", "flaky", "--host", "medium", "--vcpus", "1", "--max-vcpus", "4",
        "--memory", "512", "--max-memory", "2048", "--disk", "1",
    )  # fmt: skip
    used = fleet.used("medium")
    before_live = _domain(fleet, "medium", "flaky", live=True)

    hv.fail_next("set_vcpus", _hv_error("cannot set the vCPUs"))
    failed = _error(fleet, 1, "vm", "setvcpus", "flaky", "3")
    assert failed["type"] == "HypervisorError" and "injected by the test" in failed["message"]
    hv.fail_next("set_memory", _hv_error("cannot set the memory"))
    assert _error(fleet, 1, "vm", "setmem", "flaky", "1536")["type"] == "HypervisorError"

    assert fleet.used("medium") == used  # both grows were claimed, then given back
    shown = fleet.cli_ok("vm", "show", "flaky")
    assert (shown["vcpus"], shown["memory_mib"], shown["task"]) == (1, 512, None)
    assert "injected by the test" in shown["last_error"]
    spec = _record(fleet, "flaky").spec
    assert spec is not None and (spec.vcpus, spec.memory_mib) == (1, 512)
    after_live = _domain(fleet, "medium", "flaky", live=True)
    assert (after_live.vcpus, after_live.memory_mib) == (before_live.vcpus, before_live.memory_mib)

    # The next attempt goes through.
    assert fleet.cli_ok("vm", "setvcpus", "flaky", "3")["vm"]["vcpus"] == 3
    assert fleet.used("medium")["VCPU"] == used["VCPU"] + 2


# ----------------------------------------------------------------------------- disks


def test_disk_attach_claims_and_detach_gives_back(fleet: InProcessFleet) -> None:
    hv = fleet.fake("medium").hypervisor
    fleet.cli_ok("vm", "create", "disks", "--host", "medium", "--memory", "256", "--disk", "1")
    used = fleet.used("medium")

    attached = fleet.cli_ok("vm", "disk", "attach", "disks", "--size", "2")
    assert attached["message"] == "attached vdb" and attached["vm"]["disk_gib"] == 3
    assert fleet.used("medium")["DISK_GIB"] == used["DISK_GIB"] + 2
    live = {d.target: d for d in _domain(fleet, "medium", "disks", live=True).disks}
    config = {d.target: d for d in _domain(fleet, "medium", "disks", live=False).disks}
    assert set(live) == set(config) == {"vda", "vdb"}  # hot-plugged and in the definition
    volume = live["vdb"].path
    assert volume is not None and volume.endswith("/disks-vdb.qcow2")
    file = hv.storage.get(volume)
    assert file is not None and file.virtual_size == 2 * GIB
    spec = _record(fleet, "disks").spec
    assert spec is not None and [d.target for d in spec.disks] == ["vda", "vdb"]

    # An image the operator copied to the host takes nothing from the pool.
    data = _image(fleet, "medium", "data.qcow2", DiskFormat.QCOW2, 50)
    by_path = fleet.cli_ok("vm", "disk", "attach", "disks", "--path", data, "--target", "vdc")
    assert by_path["vm"]["disk_gib"] == 3
    assert fleet.used("medium")["DISK_GIB"] == used["DISK_GIB"] + 2
    missing = _error(fleet, 3, "vm", "disk", "attach", "disks", "--path", f"{IMAGES}/not-here.qcow2")
    assert "does not exist on this host" in missing["message"]
    taken = _error(fleet, 4, "vm", "disk", "attach", "disks", "--size", "1", "--target", "vdb")
    assert "has a disk vdb already" in taken["message"]

    # An operator's image is only ever detached, never deleted; a volume virtfleet made goes with
    # --delete-volume, and its claim with it.
    never = _error(fleet, 4, "vm", "disk", "detach", "disks", "vdc", "--delete-volume")
    assert "was not created by virtfleet" in never["message"]
    assert "vdc" in {d.target for d in _domain(fleet, "medium", "disks", live=True).disks}
    kept = fleet.cli_ok("vm", "disk", "detach", "disks", "vdc")
    assert kept["message"] == "detached vdc"
    assert hv.storage.get(data) is not None
    deleted = fleet.cli_ok("vm", "disk", "detach", "disks", "vdb", "--delete-volume")
    assert deleted["message"] == f"detached vdb and deleted {volume}"
    assert deleted["vm"]["disk_gib"] == 1
    assert fleet.used("medium")["DISK_GIB"] == used["DISK_GIB"]  # the claim shrank back
    assert hv.storage.get(volume) is None
    assert [d.target for d in _domain(fleet, "medium", "disks", live=True).disks] == ["vda"]
    spec = _record(fleet, "disks").spec
    assert spec is not None and [d.target for d in spec.disks] == ["vda"]
    assert _error(fleet, 3, "vm", "disk", "detach", "disks", "vdz")["message"].endswith("has no disk vdz")


def test_delete_volume_before_the_guest_releases_the_disk_keeps_its_claim(fleet: InProcessFleet) -> None:
    hv = fleet.fake("small").hypervisor
    fleet.cli_ok("vm", "create", "slow-guest", "--host", "small", "--memory", "256", "--disk", "1")
    fleet.cli_ok("vm", "disk", "attach", "slow-guest", "--size", "2")
    used = fleet.used("small")
    hv.guest_acks_unplug = False
    try:
        pending = fleet.cli_ok("vm", "disk", "detach", "slow-guest", "vdb", "--delete-volume")
    finally:
        hv.guest_acks_unplug = True
    assert "the guest has not released it yet" in pending["message"]
    assert ("default", "slow-guest-vdb.qcow2") in hv.volumes()  # the agent kept the volume ...
    assert fleet.used("small")["DISK_GIB"] == used["DISK_GIB"]  # ... so its 2 GiB stay claimed


def test_failed_disk_attach_gives_the_claim_back_and_changes_nothing(fleet: InProcessFleet) -> None:
    hv = fleet.fake("medium").hypervisor
    fleet.cli_ok("vm", "create", "devices", "--host", "medium", "--memory", "256", "--disk", "1",
                 "--network", "network=default")  # fmt: skip
    used = fleet.used("medium")
    volumes = hv.volumes()
    definition = fleet.cli("vm", "export", "devices", output="table").stdout

    hv.fail_next("attach_device", _hv_error("cannot attach a device"))
    error = _error(fleet, 1, "vm", "disk", "attach", "devices", "--size", "2")
    assert error["type"] == "HypervisorError" and "injected by the test" in error["message"]
    # A bus QEMU cannot hot-plug is refused by the hypervisor itself (libvirt: Unsupported).
    sata = _error(fleet, 1, "vm", "disk", "attach", "devices", "--size", "2", "--bus", "sata")
    assert sata["type"] == "Unsupported" and "cannot be hotplugged" in sata["message"]

    assert fleet.used("medium") == used  # each grow claimed first was given back
    assert hv.volumes() == volumes  # the new volume was removed again
    assert fleet.cli("vm", "export", "devices", output="table").stdout == definition  # owned volumes too
    shown = fleet.cli_ok("vm", "show", "devices")
    assert (shown["disk_gib"], shown["task"]) == (1, None)
    spec = _record(fleet, "devices").spec
    assert spec is not None and [d.target for d in spec.disks] == ["vda"]


def test_disk_resize_claims_the_growth(fleet: InProcessFleet) -> None:
    hv = fleet.fake("medium").hypervisor
    fleet.cli_ok("vm", "create", "growing", "--host", "medium", "--memory", "256", "--disk", "1")
    used = fleet.used("medium")
    path = _domain(fleet, "medium", "growing", live=True).disks[0].path
    assert path is not None

    refused = fleet.cli("vm", "disk", "resize", "growing", "vda", "5", output="table")
    assert refused.code == 2 and "--yes-i-know" in refused.stderr and "warning" in refused.stderr
    # The grow is claimed first: 2000 GiB does not fit medium's 500 GiB pool (less its
    # reserve and what the other VMs hold), and the refusal says by how much.
    short = (2000 - 1) - fleet.free("medium")["DISK_GIB"]
    full = _error(fleet, 4, "vm", "disk", "resize", "growing", "vda", "2000", "--yes-i-know")
    assert full["type"] == "CapacityExceeded" and f"disk short by {short} GiB" in full["message"]
    assert fleet.used("medium") == used

    hv.fail_next("block_resize", _hv_error("cannot resize disk vda"))
    assert _error(fleet, 1, "vm", "disk", "resize", "growing", "vda", "5", "--yes-i-know")["type"] == (
        "HypervisorError"
    )
    assert fleet.used("medium") == used  # given back
    file = hv.storage.get(path)
    assert file is not None and file.virtual_size == 1 * GIB

    grown = fleet.cli_ok("vm", "disk", "resize", "growing", "vda", "5", "--yes-i-know")
    assert "grown to 5 GiB" in grown["message"] and grown["vm"]["disk_gib"] == 5
    assert fleet.used("medium")["DISK_GIB"] == used["DISK_GIB"] + 4
    assert file.virtual_size == 5 * GIB  # the running VM's disk (block_resize)
    spec = _record(fleet, "growing").spec
    assert spec is not None and spec.disks[0].size_gib == 5
    same = fleet.cli_ok("vm", "disk", "resize", "growing", "vda", "5", "--yes-i-know")
    assert same["message"] == "vda is 5 GiB already"
    smaller = _error(fleet, 2, "vm", "disk", "resize", "growing", "vda", "3", "--yes-i-know")
    assert "shrinking a disk loses data" in smaller["message"]

    # Shut off, qemu-img grows the file; an image with internal snapshots cannot be resized.
    fleet.cli_ok("vm", "destroy", "growing")
    assert fleet.cli_ok("vm", "disk", "resize", "growing", "vda", "6", "--yes-i-know")["vm"]["disk_gib"] == 6
    assert file.virtual_size == 6 * GIB
    fleet.cli_ok("vm", "snapshot", "create", "growing", "s1")
    with_snapshot = _error(fleet, 1, "vm", "disk", "resize", "growing", "vda", "8", "--yes-i-know")
    assert "snapshots" in with_snapshot["message"]
    assert fleet.used("medium")["DISK_GIB"] == used["DISK_GIB"] + 5
    assert file.virtual_size == 6 * GIB


# ----------------------------------------------------------------------------- NICs


def test_nic_attach_list_detach(fleet: InProcessFleet) -> None:
    hv = fleet.fake("medium").hypervisor
    fleet.cli_ok("vm", "create", "nics", "--host", "medium", "--memory", "256", "--disk", "1",
                 "--network", "network=default")  # fmt: skip
    used = fleet.used("medium")
    nics = fleet.cli_ok("vm", "nic", "list", "nics")["nics"]
    assert len(nics) == 1 and nics[0]["type"] == "network" and nics[0]["source"] == "default"
    first_mac = nics[0]["mac"]
    assert first_mac.startswith("52:54:00:")
    table = fleet.cli("vm", "nic", "list", "nics", output="table").stdout
    for column in ("INTERFACE", "TYPE", "SOURCE", "MODEL", "MAC"):
        assert column in table

    # The notes' NAT-to-bridge change: a second NIC on br0 (live and in the definition).
    attached = fleet.cli_ok("vm", "nic", "attach", "nics", "--bridge", "br0", "--model", "e1000")
    assert len(attached["nics"]) == 2
    new = next(n for n in attached["nics"] if n["mac"] != first_mac)
    assert (new["type"], new["source"], new["model"]) == ("bridge", "br0", "e1000")
    assert new["interface"].startswith("vnet")  # a tap on the running VM
    assert attached["message"] == f"attached {new['mac']} to bridge br0"
    assert [n.mac for n in _domain(fleet, "medium", "nics", live=False).nics] == [first_mac, new["mac"]]
    spec = _record(fleet, "nics").spec
    assert spec is not None and [n.mac for n in spec.nics] == [first_mac, new["mac"]]
    again = fleet.cli_ok("vm", "nic", "attach", "nics", "--bridge", "br0", "--mac", new["mac"])
    assert again["message"] == f"{new['mac']} already attached" and len(again["nics"]) == 2
    assert fleet.used("medium") == used  # NICs claim nothing

    # Refusals change nothing.
    nobridge = _error(fleet, 3, "vm", "nic", "attach", "nics", "--bridge", "br9")
    assert "no bridge br9" in nobridge["message"]
    assert (
        "no libvirt network nonet"
        in _error(fleet, 3, "vm", "nic", "attach", "nics", "--network", "nonet")["message"]
    )
    fleet.cli_ok("vm", "create", "nics-other", "--host", "medium", "--memory", "256", "--disk", "1")
    clash = _error(fleet, 4, "vm", "nic", "attach", "nics-other", "--network", "default", "--mac", first_mac)
    assert "already used by VM nics" in clash["message"]
    hv.fail_next("attach_device", _hv_error("cannot attach a device"))
    assert (
        _error(fleet, 1, "vm", "nic", "attach", "nics", "--network", "default")["type"] == "HypervisorError"
    )
    assert len(fleet.cli_ok("vm", "nic", "list", "nics")["nics"]) == 2
    spec = _record(fleet, "nics").spec
    assert spec is not None and len(spec.nics) == 2
    missing = _error(fleet, 3, "vm", "nic", "detach", "nics", "--mac", "52:54:00:00:00:01")
    assert "no interface with MAC" in missing["message"]

    # A live detach completes when the guest acknowledges it; until then the output says so.
    hv.guest_acks_unplug = False
    try:
        pending = fleet.cli_ok("vm", "nic", "detach", "nics", "--mac", first_mac)
    finally:
        hv.guest_acks_unplug = True
    assert "has not released the device yet" in pending["message"]
    assert first_mac in {n["mac"] for n in pending["nics"]}  # still on the running VM
    assert [n.mac for n in _domain(fleet, "medium", "nics", live=False).nics] == [new["mac"]]
    uuid = hv.uuid_for_name("nics")
    assert uuid is not None
    hv.release_devices(uuid)
    assert [n["mac"] for n in fleet.cli_ok("vm", "nic", "list", "nics")["nics"]] == [new["mac"]]
    spec = _record(fleet, "nics").spec
    assert spec is not None and [n.mac for n in spec.nics] == [new["mac"]]


# ----------------------------------------------------------------------------- images


def test_images_create_info_convert(fleet: InProcessFleet) -> None:
    for host in ("large", "medium"):
        fleet.fake(host).hypervisor.storage.add_dir(IMAGES)  # the operator's mkdir
    raw = f"{IMAGES}/CentOS-7-x86_64-img.raw"
    created = fleet.cli_ok("image", "create", "large", raw, "--format", "raw", "--size", "2")
    assert created["image"]["format"] == "raw"
    assert created["image"]["virtual_size_bytes"] == 2 * 1024**3
    again = fleet.cli_ok("image", "create", "large", raw, "--format", "raw", "--size", "2")
    assert again["image"]["path"] == raw  # the same image again: idempotent
    clash = _error(fleet, 4, "image", "create", "large", raw, "--format", "qcow2", "--size", "2")
    assert "never overwrites" in clash["message"]
    nodir = _error(
        fleet, 3, "image", "create", "large", f"{IMAGES}/no/such/dir/x.raw", "--format", "raw", "--size", "1"
    )
    assert "directory does not exist" in nodir["message"]
    # Each host has its own files: the image made on large is not on medium.
    assert "does not exist on this host" in _error(fleet, 3, "image", "info", "medium", raw)["message"]

    qcow = f"{IMAGES}/CentOS-7-x86_64-img.qcow2"
    converted = fleet.cli_ok("image", "convert", "large", raw, qcow, "--format", "qcow2")
    info = converted["image"]
    assert (info["format"], info["virtual_size_bytes"], info["cluster_size"]) == ("qcow2", 2 * 1024**3, 65536)
    assert info["actual_size_bytes"] < 2 * 1024**3  # sparse
    text = fleet.cli("image", "info", "large", qcow, output="table").stdout
    for line in (
        "file format: qcow2",
        "virtual size: 2 GiB (2147483648 bytes)",
        "disk size:",
        "cluster_size: 65536",
    ):
        assert line in text
    back = fleet.cli_ok("image", "convert", "large", qcow, f"{IMAGES}/back.raw", "--format", "raw")
    assert back["image"]["format"] == "raw" and back["image"]["cluster_size"] is None
    exists = _error(fleet, 4, "image", "convert", "large", raw, qcow, "--format", "qcow2")
    assert "never overwrites" in exists["message"]
    missing = _error(fleet, 3, "image", "info", "large", f"{IMAGES}/nope.qcow2")
    assert "does not exist" in missing["message"]
    relative = _error(fleet, 2, "image", "info", "large", "/x/../etc/passwd")
    assert "normalised path" in relative["message"]
    assert _error(fleet, 3, "image", "info", "no-such-host", qcow)["type"] == "NotFound"

    # A volume name in the host's pool: the pool lists it, so a VM can use it like any pool volume.
    vol = fleet.cli_ok("image", "create", "medium", "base.qcow2", "--format", "qcow2", "--size", "3")
    assert vol["image"]["path"] == "/var/lib/virtfleet/images/base.qcow2"
    assert ("default", "base.qcow2") in fleet.fake("medium").hypervisor.volumes()
    assert fleet.cli_ok("image", "info", "medium", "base.qcow2")["image"]["virtual_size_bytes"] == 3 * 1024**3
    # A running VM holds its image's write lock: converting from it is refused, as qemu-img does.
    user_image = _image(fleet, "medium", "in-use.qcow2", DiskFormat.QCOW2)
    fleet.cli_ok(
        "vm", "create", "img-user", "--host", "medium", "--memory", "256", "--disk", f"path={user_image}"
    )
    locked = _error(
        fleet, 1, "image", "convert", "medium", user_image, f"{IMAGES}/copy.raw", "--format", "raw"
    )
    assert "lock" in locked["message"]
    fleet.cli_ok("vm", "destroy", "img-user")
    assert fleet.cli_ok("image", "convert", "medium", user_image, f"{IMAGES}/copy.raw", "--format", "raw")
