"""The storage-pool path policy on a real directory tree: what a command may touch on the host."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from agent import config
from agent.drivers.images import QemuImg
from agent.host_files import FormatBook, OsPathLookup, create_exclusive
from agent.storage_pools import FileKind, PoolPolicy, StoragePool, parse_pools
from common.errors import AlreadyExists, InvalidRequest, NotFound
from common.messages.vm import DiskFormat

LOOKUP = OsPathLookup()


@pytest.fixture
def pool_dir(tmp_path: Path) -> Path:
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "disk.qcow2").write_bytes(b"x")
    return pool


@pytest.fixture
def policy(pool_dir: Path) -> PoolPolicy:
    return PoolPolicy((StoragePool("default", str(pool_dir)),))


def test_a_file_inside_the_pool_resolves_to_itself(policy: PoolPolicy, pool_dir: Path) -> None:
    confined = policy.resolve_existing(str(pool_dir / "disk.qcow2"), LOOKUP)
    assert (confined.path, confined.kind) == (str(pool_dir / "disk.qcow2"), FileKind.FILE)
    assert confined.pool is not None and confined.pool.name == "default"


@pytest.mark.parametrize("path", ["/etc/shadow", "/root/secret", "/nonexistent/x.qcow2", "relative.qcow2"])
def test_paths_outside_every_pool_are_refused_alike(policy: PoolPolicy, path: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        policy.resolve_existing(path, LOOKUP)
    # The same words whether the file exists or not: a refusal is no oracle of the host's files.
    assert str(refused.value.message).replace(path, "P") in {
        "image P is outside the storage pools of this host: default (" + policy.pools[0].directory + ")",
        "image 'P' must be an absolute path inside the storage pools of this host: default ("
        + policy.pools[0].directory
        + ")",
    }


def test_dot_dot_is_refused_even_when_it_stays_inside(policy: PoolPolicy, pool_dir: Path) -> None:
    for path in (f"{pool_dir}/../../etc/shadow", f"{pool_dir}/sub/../disk.qcow2"):
        with pytest.raises(InvalidRequest, match=r"'\.\.' is not allowed"):
            policy.resolve(path, LOOKUP)


def test_a_symlink_out_of_the_pool_is_refused(policy: PoolPolicy, pool_dir: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("root only")
    (pool_dir / "link.qcow2").symlink_to(secret)
    with pytest.raises(InvalidRequest, match="symbolic link"):
        policy.resolve_existing(str(pool_dir / "link.qcow2"), LOOKUP)
    # a symlinked parent directory escapes too
    (pool_dir / "escape").symlink_to(tmp_path)
    with pytest.raises(InvalidRequest, match="outside its storage pool default"):
        policy.resolve_existing(str(pool_dir / "escape" / "secret"), LOOKUP)
    with pytest.raises(InvalidRequest, match="outside its storage pool default"):
        policy.resolve_new(str(pool_dir / "escape" / "new.qcow2"), LOOKUP, DiskFormat.QCOW2)


def test_a_symlink_inside_the_pool_to_a_file_of_the_pool_is_refused_too(
    policy: PoolPolicy, pool_dir: Path
) -> None:
    (pool_dir / "alias.qcow2").symlink_to(pool_dir / "disk.qcow2")
    with pytest.raises(InvalidRequest, match="symbolic link"):
        policy.resolve_existing(str(pool_dir / "alias.qcow2"), LOOKUP)


def test_a_pool_directory_behind_a_symlink_still_works(tmp_path: Path, pool_dir: Path) -> None:
    (tmp_path / "alias").symlink_to(pool_dir)
    policy = PoolPolicy((StoragePool("default", str(tmp_path / "alias")),))
    confined = policy.resolve_existing(str(tmp_path / "alias" / "disk.qcow2"), LOOKUP)
    assert confined.path == str(pool_dir / "disk.qcow2")


def test_missing_inside_a_pool_is_not_found(policy: PoolPolicy, pool_dir: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        policy.resolve_existing(str(pool_dir / "none.qcow2"), LOOKUP)
    assert policy.resolve_new(str(pool_dir / "none.qcow2"), LOOKUP, DiskFormat.RAW).kind is FileKind.MISSING


def test_the_pool_directory_itself_is_not_an_image(policy: PoolPolicy, pool_dir: Path) -> None:
    with pytest.raises(InvalidRequest, match="outside"):
        policy.resolve(str(pool_dir), LOOKUP)
    (pool_dir / "sub").mkdir()
    with pytest.raises(InvalidRequest, match="directory, not an image"):
        policy.resolve(str(pool_dir / "sub"), LOOKUP)


def test_devices_are_refused_unless_the_pool_or_the_allow_list_allows_them() -> None:
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    no_devices = PoolPolicy((StoragePool("dev", "/dev"),))
    with pytest.raises(InvalidRequest, match="character device; storage pool dev does not allow devices"):
        no_devices.resolve_existing("/dev/null", LOOKUP)
    with_devices = PoolPolicy((StoragePool("dev", "/dev", devices=True),))
    assert with_devices.resolve_existing("/dev/null", LOOKUP).kind is FileKind.CHAR
    listed = PoolPolicy((), frozenset({"/dev/null"}))
    assert listed.resolve_existing("/dev/null", LOOKUP).kind is FileKind.CHAR
    with pytest.raises(InvalidRequest, match="outside"):
        listed.resolve_existing("/dev/zero", LOOKUP)


def test_a_pool_allows_only_its_formats(pool_dir: Path) -> None:
    policy = PoolPolicy((StoragePool("iso", str(pool_dir), frozenset({DiskFormat.RAW})),))
    with pytest.raises(InvalidRequest, match="allows only raw, not qcow2"):
        policy.resolve_new(str(pool_dir / "x.qcow2"), LOOKUP, DiskFormat.QCOW2)
    assert policy.resolve_new(str(pool_dir / "x.raw"), LOOKUP, DiskFormat.RAW).pool is not None


def test_create_exclusive_makes_a_0600_file_and_never_reuses_one(tmp_path: Path) -> None:
    target = tmp_path / "new.raw"
    create_exclusive(str(target))
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    with pytest.raises(AlreadyExists):
        create_exclusive(str(target))
    dangling = tmp_path / "dangling.raw"
    dangling.symlink_to(tmp_path / "would-be-created")
    with pytest.raises(AlreadyExists):
        create_exclusive(str(dangling))
    assert not (tmp_path / "would-be-created").exists()


def test_format_book_survives_a_restart(tmp_path: Path) -> None:
    book = FormatBook(tmp_path / "formats.db")
    assert book.format_of("/p/a") == "raw"  # unrecorded: never probed, read as bytes
    book.record("/p/a", "qcow2")
    assert FormatBook(tmp_path / "formats.db").format_of("/p/a") == "qcow2"
    book.forget("/p/a")
    assert FormatBook(tmp_path / "formats.db").get("/p/a") is None


def test_an_unreadable_format_record_reads_every_image_as_raw(tmp_path: Path) -> None:
    (tmp_path / "formats.json").write_text("{not json")  # an earlier agent's record
    assert FormatBook(tmp_path / "formats.db").format_of("/p/a") == "raw"


def test_pools_from_the_agent_config() -> None:
    cfg = config.resolve(
        {
            "pools": {
                "iso": {"path": "/srv/iso", "formats": ["raw"]},
                "lvm": {"path": "/dev/vg0", "devices": True},
            },
            "allowed_devices": ["/dev/sdb"],
        },
        {},
        {"host_id": "hv1", "libvirt_uri": "qemu:///system"},
    )
    assert cfg.pools == (
        StoragePool("iso", "/srv/iso", frozenset({DiskFormat.RAW})),
        StoragePool("lvm", "/dev/vg0", devices=True),
    )
    assert cfg.allowed_devices == frozenset({"/dev/sdb"})
    for bad in ({"x": {"path": "rel"}}, {"x": {"path": "/a/../b"}}, {"x": {"path": "/a", "mode": 1}}):
        with pytest.raises(InvalidRequest):
            parse_pools(bad)


class _Recorder:
    def __init__(self) -> None:
        self.argv: list[list[str]] = []

    def __call__(self, argv: Sequence[str], **_kw: Any) -> subprocess.CompletedProcess[str]:
        self.argv.append(list(argv))
        out = '{"format": "raw", "virtual-size": 1073741824}' if argv[1] == "info" else ""
        return subprocess.CompletedProcess(list(argv), 0, out, "")


def test_qemu_img_always_gets_the_format(tmp_path: Path) -> None:
    run = _Recorder()
    images = QemuImg(run=run)
    src = tmp_path / "a.raw"
    src.write_bytes(b"")
    images.inspect(str(src), "raw")
    images.create(str(tmp_path / "b.raw"), DiskFormat.RAW, 1)
    images.convert(str(src), "raw", str(tmp_path / "c.qcow2"), DiskFormat.QCOW2)
    images.resize(str(src), "raw", 2)
    for argv in run.argv:
        assert "-f" in argv, argv
    converts = [a for a in run.argv if a[1] == "convert"]
    assert converts and all("-n" in a for a in converts)  # into our own 0600 file
    assert stat.S_IMODE((tmp_path / "c.qcow2").stat().st_mode) == 0o600
