"""End to end on a real QEMU guest: the ops notes' VM operations through the ``virtfleet`` CLI, against
a real controller and a real agent process on qemu:///system, checked with libvirt's own API, the
guest's serial console (its ``GUEST-STATE`` lines) and sysfs.

One tiny guest is booted for the module and reused by the tests, in file order (TCG on two cores:
each boot costs about ten seconds). The tests are a sequence; a failure early on fails the later ones.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu_guest import (
    GUEST_DIR,
    QEMU_URI,
    TEST_POOL,
    TEST_POOL_DIR,
    guest_name,
    last_state,
    qemu_connection,
    require_qemu,
    serial_log,
    wait_for_serial,
    write_agent_toml,
)
from vfsupport import Fleet, private_fleet, wait_until

from common.domain_xml import parse_domain_xml

# Not `db`: what these tests add over tests/e2e/test_vm_operations.py (which does run on
# PostgreSQL too) is the real guest, which does not depend on the database; booting the
# guests a second time would cost deploy/test.sh about a minute and a half.
pytestmark = [pytest.mark.broker, pytest.mark.qemu]

HOST = "qemu-host"
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def conn() -> Iterator[Any]:
    require_qemu()
    with qemu_connection() as c:
        yield c


@pytest.fixture(scope="module")
def fleet(conn: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("vmops-qemu")
    config = write_agent_toml(tmp / "agent.toml")
    try:
        with private_fleet(tmp) as f:
            f.start_controller(down_after=30.0)
            f.start_agent(HOST, QEMU_URI, "--config", str(config))
            f.wait_hosts({HOST})
            yield f
    finally:
        if TIMINGS:
            print("real-guest timings (s): " + ", ".join(f"{k}={v:.1f}" for k, v in TIMINGS.items()))


@pytest.fixture(scope="module")
def bridge() -> Iterator[str]:
    """A bridge with no uplink in the host namespace, for NIC hot-plug; deleted afterwards."""
    from pyroute2 import IPRoute  # noqa: PLC0415

    name = f"vftestbr{os.urandom(2).hex()}"
    with IPRoute() as ip:
        ip.link("add", ifname=name, kind="bridge")
        index = ip.link_lookup(ifname=name)[0]
        ip.link("set", index=index, state="up")
    try:
        yield name
    finally:
        with IPRoute() as ip, contextlib.suppress(Exception):
            ip.link("del", index=ip.link_lookup(ifname=name)[0])


@pytest.fixture(scope="module")
def guest(fleet: Fleet, conn: Any) -> str:
    """The module's guest: created and booted through the CLI, as an operator would."""
    name = guest_name("ops")
    started = time.monotonic()
    result = fleet.cli(
        "vm", "create", name, "--host", HOST, "--domain-type", "qemu", "--machine", "pc",
        "--vcpus", "1", "--max-vcpus", "2", "--memory", "256", "--max-memory", "384",
        "--disk", "size=1,format=qcow2",
        "--kernel", str(GUEST_DIR / "vmlinux"), "--initrd", str(GUEST_DIR / "initrd.gz"),
        "--kernel-args", "console=ttyS0 quiet", "--serial-log", str(serial_log(name)),
        "--graphics", "vnc",
        output="table",
    )  # fmt: skip
    assert result.code == 0, result.stdout + result.stderr + fleet.logs()
    assert "done" in result.stderr  # progress
    TIMINGS["create"] = time.monotonic() - started
    wait_for_serial(name, "GUEST-STATE", timeout=120)
    TIMINGS["boot"] = time.monotonic() - started
    return name


def _dom(conn: Any, name: str) -> Any:
    return conn.lookupByName(name)


def _show(fleet: Fleet, name: str) -> dict[str, Any]:
    shown: dict[str, Any] = fleet.cli_ok("vm", "show", name)
    return shown


def test_create_runs_a_real_guest(fleet: Fleet, conn: Any, guest: str) -> None:
    import libvirt  # noqa: PLC0415

    dom = _dom(conn, guest)
    state, max_kib, _mem, vcpus, _cpu = dom.info()
    assert state == libvirt.VIR_DOMAIN_RUNNING
    assert (max_kib, vcpus) == (384 * 1024, 1)
    parsed = parse_domain_xml(dom.XMLDesc(0))
    assert parsed.domain_type == "qemu" and parsed.max_vcpus == 2 and parsed.managed
    assert parsed.disks[0].path == f"{TEST_POOL_DIR}/{guest}-vda.qcow2"
    shown = _show(fleet, guest)
    assert (shown["host"], shown["status"], shown["power_state"]) == (HOST, "active", "running")

    console = fleet.cli_ok("vm", "console", guest)
    assert console["listen"] == "127.0.0.1" and console["port"] >= 5900
    with socket.create_connection(("127.0.0.1", console["port"]), timeout=10) as sock:
        assert sock.recv(12).startswith(b"RFB ")  # a VNC server answers where virtfleet says


def test_suspend_resume_and_a_change_by_hand_shows_up(fleet: Fleet, conn: Any, guest: str) -> None:
    import libvirt  # noqa: PLC0415

    dom = _dom(conn, guest)
    assert fleet.cli_ok("vm", "suspend", guest)["vm"]["power_state"] == "paused"
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    assert fleet.cli_ok("vm", "resume", guest)["vm"]["power_state"] == "running"
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING

    dom.suspend()  # virsh suspend, by hand: the next report must tell the controller
    try:
        wait_until(
            lambda: _show(fleet, guest)["power_state"] == "paused", 30, "the hand-made pause to be reported"
        )
        listed = {v["name"]: v for v in fleet.cli_ok("vm", "list", "--all")["vms"]}
        assert listed[guest]["power_state"] == "paused"
    finally:
        dom.resume()
    wait_until(
        lambda: _show(fleet, guest)["power_state"] == "running", 30, "the hand-made resume to be reported"
    )


def test_snapshot_on_qcow2_and_refusal_on_raw(fleet: Fleet, conn: Any, guest: str) -> None:
    started = time.monotonic()
    created = fleet.cli_ok("vm", "snapshot", "create", guest, "booted")
    TIMINGS["snapshot-create"] = time.monotonic() - started
    assert created["snapshots"][0]["memory"] is True
    assert _dom(conn, guest).snapshotListNames(0) == ["booted"]
    started = time.monotonic()
    reverted = fleet.cli_ok("vm", "snapshot", "revert", guest, "booted")
    TIMINGS["snapshot-revert"] = time.monotonic() - started
    assert reverted["vm"]["power_state"] == "running"
    fleet.cli_ok("vm", "snapshot", "delete", guest, "booted")
    assert _dom(conn, guest).snapshotListNames(0) == []

    raw = guest_name("raw")
    fleet.cli_ok(
        "vm", "create", raw, "--host", HOST, "--domain-type", "qemu", "--memory", "128",
        "--disk", "size=1,format=raw", "--no-start",
    )  # fmt: skip
    refused = fleet.cli("vm", "snapshot", "create", raw, "s1")
    assert refused.code == 1
    assert "raw" in refused.json["error"]["message"] and "qcow2" in refused.json["error"]["message"]
    assert _dom(conn, raw).snapshotNum(0) == 0
    fleet.cli_ok("vm", "delete", raw, "--delete-disks")


def test_vcpu_hot_add_reaches_the_guest(fleet: Fleet, conn: Any, guest: str) -> None:
    wait_until(lambda: (s := last_state(guest)) is not None and s.cpu_count == 1, 60, "one CPU in the guest")
    assert fleet.cli_ok("vm", "setvcpus", guest, "2")["vm"]["vcpus"] == 2
    assert _dom(conn, guest).info()[3] == 2
    started = time.monotonic()
    wait_until(
        lambda: (s := last_state(guest)) is not None and s.cpu_count == 2, 60, "the guest to see 2 CPUs"
    )
    TIMINGS["vcpu-seen-by-guest"] = time.monotonic() - started
    refused = fleet.cli("vm", "setvcpus", guest, "1")
    assert refused.code == 1 and "can only be added live" in refused.json["error"]["message"]
    assert _dom(conn, guest).info()[3] == 2
    # A snapshot now could not be restored (host-facts: hot-plugged vCPU state): refused up front.
    guarded = fleet.cli("vm", "snapshot", "create", guest, "after-hotplug")
    assert guarded.code == 4 and "hot-added" in guarded.json["error"]["message"]


def test_balloon_changes_the_guests_memory(fleet: Fleet, conn: Any, guest: str) -> None:
    before = wait_until(lambda: last_state(guest), 30, "a GUEST-STATE line")
    assert fleet.cli_ok("vm", "setmem", guest, "200")["vm"]["memory_mib"] == 200
    started = time.monotonic()
    shrunk = wait_until(
        lambda: (
            s
            if (s := last_state(guest)) is not None and s.memtotal_kb < before.memtotal_kb - 40 * 1024
            else None
        ),
        60,
        "the guest's MemTotal to drop",
    )
    TIMINGS["balloon-down-seen"] = time.monotonic() - started
    # QEMU reports the balloon's progress in rate-limited BALLOON_CHANGE events, so libvirt's
    # current memory (and memstat's "actual") arrive at the target a little after the guest moved.
    wait_until(lambda: _dom(conn, guest).info()[2] == 200 * 1024, 30, "libvirt to see the 200 MiB balloon")
    assert fleet.cli_ok("vm", "memstat", guest)["balloon_kib"] == 200 * 1024
    assert "balloon: actual=200" in fleet.cli("vm", "memstat", guest, output="table").stdout
    fleet.cli_ok("vm", "setmem", guest, "384")
    wait_until(
        lambda: (s := last_state(guest)) is not None and s.memtotal_kb > shrunk.memtotal_kb + 100 * 1024,
        60,
        "the guest's MemTotal to grow again",
    )
    too_much = fleet.cli("vm", "setmem", guest, "512")
    assert too_much.code == 2 and "max memory" in too_much.json["error"]["message"]


def test_nic_attach_live_to_a_bridge(fleet: Fleet, conn: Any, guest: str, bridge: str) -> None:
    attached = fleet.cli_ok("vm", "nic", "attach", guest, "--bridge", bridge, "--model", "virtio")
    (row,) = [n for n in attached["nics"] if n["source"] == bridge]
    assert row["mac"].startswith("52:54:00:") and row["interface"].startswith("vnet")
    master = Path(f"/sys/class/net/{row['interface']}/master").resolve().name
    assert master == bridge  # the tap is enslaved to the bridge, as brctl show would list it
    live = parse_domain_xml(_dom(conn, guest).XMLDesc(0))
    assert [n.mac for n in live.nics] == [row["mac"]]
    listed = fleet.cli_ok("vm", "nic", "list", guest)["nics"]
    assert listed == attached["nics"]
    fleet.cli_ok("vm", "nic", "detach", guest, "--mac", row["mac"])
    import libvirt  # noqa: PLC0415

    config = parse_domain_xml(_dom(conn, guest).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    assert config.nics == ()


def test_data_disk_attach_resize_detach(fleet: Fleet, conn: Any, guest: str) -> None:
    attached = fleet.cli_ok("vm", "disk", "attach", guest, "--size", "1")
    assert attached["vm"]["disk_gib"] == 2
    dom = _dom(conn, guest)
    volume = f"{TEST_POOL_DIR}/{guest}-vdb.qcow2"
    assert [d.path for d in parse_domain_xml(dom.XMLDesc(0)).disks if d.target == "vdb"] == [volume]
    fleet.cli_ok("vm", "disk", "resize", guest, "vdb", "2", "--yes-i-know")
    assert dom.blockInfo("vdb", 0)[0] == 2 * 1024**3
    assert fleet.cli_ok("vm", "show", guest)["disk_gib"] == 3
    fleet.cli_ok("vm", "disk", "detach", guest, "vdb", "--delete-volume")
    wait_until(lambda: not os.path.exists(volume), 30, "the data volume to be deleted")
    assert fleet.cli_ok("vm", "show", guest)["disk_gib"] == 1


def test_export_destroy_delete_import_shutdown(fleet: Fleet, conn: Any, guest: str, tmp_path: Path) -> None:
    import libvirt  # noqa: PLC0415

    exported = fleet.cli("vm", "export", guest, output="table")
    assert exported.code == 0
    backup = tmp_path / "backup.xml"
    backup.write_text(exported.stdout)
    uuid = parse_domain_xml(exported.stdout).uuid

    assert fleet.cli_ok("vm", "destroy", guest)["vm"]["power_state"] == "shutoff"
    assert _dom(conn, guest).isActive() == 0
    fleet.cli_ok("vm", "delete", guest)  # keeps the disk
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName(guest)
    assert Path(f"{TEST_POOL_DIR}/{guest}-vda.qcow2").exists()

    serial_log(guest).unlink(missing_ok=True)
    started = time.monotonic()
    imported = fleet.cli_ok("vm", "import", str(backup), "--start")
    assert imported["vm"]["host"] == HOST and imported["vm"]["uuid"] == uuid
    dom = conn.lookupByUUIDString(uuid)
    assert dom.name() == guest and dom.isPersistent() == 1 and dom.isActive() == 1
    assert parse_domain_xml(dom.XMLDesc(0)).managed
    wait_for_serial(guest, "GUEST-STATE", timeout=120)
    TIMINGS["import-and-boot"] = time.monotonic() - started

    started = time.monotonic()
    stopped = fleet.cli_ok("vm", "shutdown", guest, "--grace", "60")  # ACPI: the guest powers itself off
    TIMINGS["acpi-shutdown"] = time.monotonic() - started
    assert stopped["vm"]["power_state"] == "shutoff"
    assert dom.isActive() == 0
    fleet.cli_ok("vm", "delete", guest, "--delete-disks")
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByUUIDString(uuid)
    pool = conn.storagePoolLookupByName(TEST_POOL)
    pool.refresh(0)
    assert f"{guest}-vda.qcow2" not in pool.listVolumes()
