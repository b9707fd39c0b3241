"""Issue 12 attacks 5 and 6 through the CLI, in-process: every path a command names must lie in a
storage pool of the host's agent; a refusal is InvalidRequest (exit 2) and changes nothing.

The simulated hosts' pools are the hypervisor's default pool (/var/lib/virtfleet/images) and the
operator's images directory /srv/images (:data:`agent.fakehost.SIMULATED_IMAGES_POOL`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from inproc import HostShape, InProcessFleet, inprocess_fleet

from agent.ports import GIB
from common.messages.vm import DiskFormat

# SQLite only (deploy/test.sh): the agent refuses the paths; the database only holds the fleet for the CLI.
pytestmark = pytest.mark.backend_neutral

HOST = "medium"
IMAGES = "/srv/images"
OUTSIDE = ("/etc/shadow", "/root/secret", "/var/lib/virtfleet/images/../../../etc/shadow")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessFleet]:
    with inprocess_fleet(tmp_path_factory.mktemp("hostaccess"), {HOST: HostShape(HOST)}) as f:
        files = f.fake(HOST).hypervisor.storage
        files.add_dir(IMAGES)
        files.add_file("/etc/shadow", "raw", 4096)
        files.add_file("/root/secret", "raw", 4096)
        yield f


def _files(fleet: InProcessFleet) -> set[str]:
    return set(fleet.fake(HOST).hypervisor.storage.files)


def _refused(fleet: InProcessFleet, *args: str) -> dict[str, Any]:
    """The command exits 2 with an InvalidRequest and no file appears or goes on the host."""
    before = _files(fleet)
    result = fleet.cli(*args)
    assert result.code == 2, result.stdout + result.stderr
    error: dict[str, Any] = result.json["error"]
    assert error["type"] == "InvalidRequest"
    assert _files(fleet) == before
    return error


@pytest.mark.parametrize("path", OUTSIDE)
def test_image_info_outside_the_pools_is_refused(fleet: InProcessFleet, path: str) -> None:
    error = _refused(fleet, "image", "info", HOST, path)
    assert path in error["message"]
    # the agent names its pools; a path with '..' is refused by the message type already
    assert "/srv/images" in error["message"] or "normalised" in error["message"]


def test_a_missing_file_outside_is_refused_with_the_same_words_as_an_existing_one(
    fleet: InProcessFleet,
) -> None:
    there = _refused(fleet, "image", "info", HOST, "/root/secret")["message"]
    absent = _refused(fleet, "image", "info", HOST, "/root/absent")["message"]
    assert there.replace("/root/secret", "P") == absent.replace("/root/absent", "P")


def test_image_create_and_convert_outside_the_pools_are_refused(fleet: InProcessFleet) -> None:
    _refused(fleet, "image", "create", HOST, "/root/new.qcow2", "--format", "qcow2", "--size", "1")
    _refused(fleet, "image", "create", HOST, "/etc/cron.d/x", "--format", "raw", "--size", "1")
    _refused(fleet, "image", "convert", HOST, "/etc/shadow", f"{IMAGES}/shadow.raw", "--format", "raw")
    fleet.cli_ok("image", "create", HOST, f"{IMAGES}/ok.raw", "--format", "raw", "--size", "1")
    _refused(fleet, "image", "convert", HOST, f"{IMAGES}/ok.raw", "/tmp/leak.raw", "--format", "raw")


def test_vm_create_with_a_disk_outside_the_pools_is_refused(fleet: InProcessFleet) -> None:
    used = fleet.used(HOST)
    for path in ("/root/secret", "/etc/shadow"):
        _refused(fleet, "vm", "create", "thief", "--host", HOST, "--memory", "64", "--disk", f"path={path}")
        assert fleet.cli("vm", "show", "thief").code == 3  # forgotten, claim released
        _refused(
            fleet, "vm", "create", "thief", "--host", HOST, "--memory", "64", "--disk", "1", "--cdrom", path
        )
        _refused(
            fleet, "vm", "create", "thief", "--host", HOST, "--memory", "64", "--disk", "1", "--kernel", path
        )
        assert fleet.cli("vm", "show", "thief").code == 3
    assert fleet.used(HOST) == used
    assert fleet.fake(HOST).hypervisor.count("define") == 0


def test_disk_attach_outside_the_pools_is_refused(fleet: InProcessFleet) -> None:
    fleet.cli_ok("vm", "create", "victim", "--host", HOST, "--memory", "64", "--disk", "1")
    xml = fleet.fake(HOST).hypervisor
    before = xml.count("attach_device")
    _refused(fleet, "vm", "disk", "attach", "victim", "--path", "/root/secret", "--target", "vdc")
    assert xml.count("attach_device") == before


def test_a_qcow2_header_in_a_raw_image_is_read_as_raw(fleet: InProcessFleet) -> None:
    """Attack 6: the image virtfleet made raw now starts with a qcow2 header naming a host file."""
    path = f"{IMAGES}/guest-written.raw"
    fleet.cli_ok("image", "create", HOST, path, "--format", "raw", "--size", "1")
    made = fleet.fake(HOST).hypervisor.storage.get(path)
    assert made is not None
    made.format, made.backing, made.backing_format = "qcow2", "/etc/shadow", "raw"  # the guest's doing
    info = fleet.cli_ok("image", "info", HOST, path)["image"]
    assert (info["format"], info["backing_file"]) == ("raw", None)


def test_a_qcow2_image_with_a_backing_file_outside_is_refused(fleet: InProcessFleet) -> None:
    path = f"{IMAGES}/overlay.qcow2"
    fleet.cli_ok("image", "create", HOST, path, "--format", "qcow2", "--size", "1")
    made = fleet.fake(HOST).hypervisor.storage.get(path)
    assert made is not None
    made.backing, made.backing_format = "/etc/shadow", "raw"
    error = _refused(fleet, "image", "info", HOST, path)
    assert "backing file /etc/shadow" in error["message"]
    _refused(fleet, "image", "convert", HOST, path, f"{IMAGES}/copy.raw", "--format", "raw")
    made.backing, made.backing_format = f"{IMAGES}/ok.raw", None  # inside, but qemu would probe it
    assert "no stated format" in _refused(fleet, "image", "info", HOST, path)["message"]


def test_images_inside_the_pools_still_work(fleet: InProcessFleet) -> None:
    path = f"{IMAGES}/fine.qcow2"
    created = fleet.cli_ok("image", "create", HOST, path, "--format", "qcow2", "--size", "2")["image"]
    assert (created["format"], created["virtual_size_bytes"]) == ("qcow2", 2 * GIB)
    fleet.fake(HOST).hypervisor.add_file(f"{IMAGES}/operator.qcow2", DiskFormat.QCOW2, 1)
    # An image virtfleet has no record of is read as raw: its format is never guessed.
    assert fleet.cli_ok("image", "info", HOST, f"{IMAGES}/operator.qcow2")["image"]["format"] == "raw"


# ------------------------------------------------------------------------------------------ attack 7

_UUID = "0b5c3f1e-8d1a-4c44-9a55-6f1e2d3c4b5a"
_FORBIDDEN = {
    "emulator": "<emulator>/tmp/evil-qemu</emulator>",
    "filesystem": "<filesystem type='mount'><source dir='/'/><target dir='host'/></filesystem>",
    "hostdev": "<hostdev mode='subsystem' type='pci'><source><address bus='0x01' slot='0x00'/></source></hostdev>",
    "qemu:commandline": "",
}


def _domain(devices: str, extra: str = "") -> str:
    return (
        "<domain type='test' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
        f"<name>intruder</name><uuid>{_UUID}</uuid><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        f"<os><type arch='x86_64'>hvm</type></os><devices>{devices}</devices>{extra}</domain>"
    )


@pytest.mark.parametrize("element", sorted(_FORBIDDEN))
def test_vm_import_refuses_elements_that_reach_the_host(
    fleet: InProcessFleet, tmp_path: Any, element: str
) -> None:
    extra = (
        "<qemu:commandline><qemu:arg value='-fsdev'/></qemu:commandline>"
        if element == "qemu:commandline"
        else ""
    )
    xml = tmp_path / "intruder.xml"
    xml.write_text(_domain(_FORBIDDEN[element], extra))
    used = fleet.used(HOST)
    error = _refused(fleet, "vm", "import", str(xml), "--host", HOST)
    assert f"<{element}" in error["message"]
    assert fleet.cli("vm", "show", "intruder").code == 3
    assert fleet.used(HOST) == used
    assert fleet.fake(HOST).hypervisor.uuid_for_name("intruder") is None


def test_vm_import_refuses_a_disk_outside_the_pools(fleet: InProcessFleet, tmp_path: Any) -> None:
    disk = "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/root/secret'/><target dev='vda'/></disk>"
    xml = tmp_path / "intruder.xml"
    xml.write_text(_domain(disk))
    assert "outside the storage pools" in _refused(fleet, "vm", "import", str(xml), "--host", HOST)["message"]
    assert fleet.fake(HOST).hypervisor.uuid_for_name("intruder") is None
