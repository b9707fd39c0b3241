"""Issue 12 attack 6 with the real ``qemu-img``: an image whose header names a backing file on
the host is never followed, and nothing outside the pools is ever copied into one.

The agent's image handlers run on this machine's files (a pool in a temporary directory) over
:class:`agent.drivers.images.QemuImg`; the "host secret" is a temporary file outside the pool
holding a marker.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
import uuid
from pathlib import Path

import pytest

from agent.drivers.fake import FakeHypervisor
from agent.drivers.images import QemuImg
from agent.handlers import AgentHandlers
from agent.host_files import FormatBook, OsPathLookup
from agent.host_storage import HostStorage
from agent.storage_pools import PoolPolicy, StoragePool
from common.errors import InvalidRequest
from common.messages.vm import CreateVm, DiskFormat, DiskSpec, VmSpec
from common.messages.vmops import ImageConvert, ImageCreate, ImageInfoRequest, ImageLocation

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")


class Host:
    def __init__(self, tmp: Path) -> None:
        self.pool = tmp / "pool"
        self.pool.mkdir()
        self.marker = f"HOST-SECRET-{uuid.uuid4().hex}".encode()
        self.secret = tmp / "outside" / "secret.raw"
        self.secret.parent.mkdir()
        self.secret.write_bytes(self.marker * 4096)  # 128 KiB+ of marker, as a raw "disk"
        storage = HostStorage(
            PoolPolicy((StoragePool("default", str(self.pool)),)),
            OsPathLookup(),
            FormatBook(tmp / "formats.db"),
        )
        self.agent = AgentHandlers(FakeHypervisor(), lambda: 0, QemuImg(), storage=storage)
        self.handlers = self.agent.vmops

    def at(self, name: str) -> ImageLocation:
        return ImageLocation(path=str(self.pool / name))

    def marker_in_pool(self) -> list[str]:
        return [p.name for p in self.pool.rglob("*") if p.is_file() and self.marker in p.read_bytes()]

    def qcow2_header_to(self, backing: Path) -> bytes:
        """The first bytes of a qcow2 overlay of ``backing``: what a guest writes into its raw disk."""
        overlay = self.pool.parent / "crafted.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "raw", str(overlay), "1M"],
            check=True,
        )
        return overlay.read_bytes()


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def test_a_raw_image_with_a_qcow2_header_stays_raw(host: Host) -> None:
    host.handlers.image_create(ImageCreate(host.at("guest.raw"), DiskFormat.RAW, 1))
    with (host.pool / "guest.raw").open("r+b") as disk:  # the guest writes a qcow2 header
        disk.write(host.qcow2_header_to(host.secret))

    info = host.handlers.image_info(ImageInfoRequest(host.at("guest.raw")))
    assert (info.format, info.backing_file) == ("raw", None)  # -f raw: the header is just bytes

    copy = host.handlers.image_convert(
        ImageConvert(host.at("guest.raw"), host.at("copy.qcow2"), DiskFormat.QCOW2)
    )
    assert copy.backing_file is None
    assert host.marker_in_pool() == []  # the copy holds the header's bytes, never the host file


def test_an_unrecorded_image_dropped_into_the_pool_is_read_as_raw(host: Host) -> None:
    (host.pool / "dropped.img").write_bytes(host.qcow2_header_to(host.secret))
    info = host.handlers.image_info(ImageInfoRequest(host.at("dropped.img")))
    assert (info.format, info.backing_file) == ("raw", None)
    host.handlers.image_convert(ImageConvert(host.at("dropped.img"), host.at("copy.raw"), DiskFormat.RAW))
    assert host.marker_in_pool() == []


def test_a_qcow2_image_whose_backing_file_leaves_the_pool_is_refused(host: Host) -> None:
    host.handlers.image_create(ImageCreate(host.at("vm.qcow2"), DiskFormat.QCOW2, 1))
    subprocess.run(  # its header rewritten to back onto the host file
        [
            "qemu-img",
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            str(host.secret),
            "-F",
            "raw",
            str(host.pool / "vm.qcow2"),
        ],
        check=True,
    )
    with pytest.raises(InvalidRequest, match=f"backing file {host.secret}"):
        host.handlers.image_info(ImageInfoRequest(host.at("vm.qcow2")))
    with pytest.raises(InvalidRequest, match="backing file"):
        host.handlers.image_convert(ImageConvert(host.at("vm.qcow2"), host.at("leak.raw"), DiskFormat.RAW))
    assert not (host.pool / "leak.raw").exists()
    assert sorted(p.name for p in host.pool.iterdir()) == ["vm.qcow2"]  # no copy, no temporary left
    assert host.marker_in_pool() == []


def test_a_backing_file_inside_the_pool_with_a_stated_format_is_followed(host: Host) -> None:
    host.handlers.image_create(ImageCreate(host.at("base.raw"), DiskFormat.RAW, 1))
    host.handlers.image_create(ImageCreate(host.at("top.qcow2"), DiskFormat.QCOW2, 1))
    subprocess.run(
        [
            "qemu-img",
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            str(host.pool / "top.qcow2"),
        ],
        check=True,
    )
    info = host.handlers.image_info(ImageInfoRequest(host.at("top.qcow2")))
    assert info.backing_file == str(host.pool / "base.raw")


def test_created_and_converted_images_are_readable_by_their_owner_only(host: Host) -> None:
    host.handlers.image_create(ImageCreate(host.at("a.qcow2"), DiskFormat.QCOW2, 1))
    host.handlers.image_convert(ImageConvert(host.at("a.qcow2"), host.at("b.raw"), DiskFormat.RAW))
    for name in ("a.qcow2", "b.raw"):
        assert stat.S_IMODE((host.pool / name).stat().st_mode) == 0o600, name


def test_image_convert_of_a_root_only_file_outside_is_refused(host: Host) -> None:
    host.secret.chmod(0o600)
    with pytest.raises(InvalidRequest, match="outside the storage pools"):
        host.handlers.image_convert(
            ImageConvert(ImageLocation(path=str(host.secret)), host.at("stolen.raw"), DiskFormat.RAW)
        )
    assert list(host.pool.iterdir()) == []


def _vm_with(path: Path, fmt: DiskFormat) -> CreateVm:
    disk = DiskSpec(target="vda", source="existing", path=str(path), format=fmt)
    return CreateVm(VmSpec(uuid=str(uuid.uuid4()), name="vm", vcpus=1, memory_mib=64, disks=(disk,)))


def test_a_vm_cannot_read_a_raw_image_as_the_qcow2_its_guest_wrote(host: Host) -> None:
    """Attack 6 through vm create: libvirt told format=qcow2 would follow the header's backing file."""
    host.handlers.image_create(ImageCreate(host.at("guest.raw"), DiskFormat.RAW, 1))
    with (host.pool / "guest.raw").open("r+b") as disk:
        disk.write(host.qcow2_header_to(host.secret))
    with pytest.raises(InvalidRequest, match="is a raw image"):
        host.agent.create(_vm_with(host.pool / "guest.raw", DiskFormat.QCOW2))
    (host.pool / "dropped.qcow2").write_bytes(host.qcow2_header_to(host.secret))  # no record: checked
    with pytest.raises(InvalidRequest, match="backing file"):
        host.agent.create(_vm_with(host.pool / "dropped.qcow2", DiskFormat.QCOW2))
