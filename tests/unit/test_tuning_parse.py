"""Pure parsers of /sys and /proc text (agent/tuning/parse.py) and page-size names (common)."""

from __future__ import annotations

import pytest

from agent.tuning import parse
from common import cpuset
from common.errors import InvalidRequest
from common.messages.tuning import page_size_kib, page_size_label

# Captured on the project machine (kernel 6.18, Debian 12 guest) unless noted.
MEMINFO = """MemTotal:       24596880 kB
MemFree:        20112340 kB
AnonHugePages:         0 kB
HugePages_Total:     128
HugePages_Free:       64
HugePages_Rsvd:        0
HugePages_Surp:        0
Hugepagesize:       2048 kB
Hugetlb:          262144 kB
"""
NODE_MEMINFO = """Node 0 MemTotal:        6252320 kB
Node 0 MemFree:         4880748 kB
Node 0 MemUsed:         1371572 kB
"""
MOUNTS = """proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
/dev/vda / ext4 rw,relatime 0 0
hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0
hugetlbfs /dev/hugepages1G hugetlbfs rw,relatime,pagesize=1024M 0 0
"""
STATUS = """Name:\tqemu-system-x86
Umask:\t0077
State:\tS (sleeping)
Tgid:\t4242
Cpus_allowed:\t2
Cpus_allowed_list:\t1
Mems_allowed_list:\t0
"""


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0-1\n", {0, 1}), ("0-3,8-11\n", {0, 1, 2, 3, 8, 9, 10, 11}), ("5", {5}), ("\n", set()), ("", set())],
)
def test_cpu_list(text: str, cpus: set[int]) -> None:
    assert parse.cpu_list(text) == frozenset(cpus)


def test_cpu_list_refuses_garbage() -> None:
    with pytest.raises(cpuset.CpuSetSyntaxError):
        parse.cpu_list("0-x")


@pytest.mark.parametrize(
    ("text", "selected", "options"),
    [
        ("always [madvise] never\n", "madvise", ("always", "madvise", "never")),
        (
            "always defer defer+madvise [madvise] never",
            "madvise",
            ("always", "defer", "defer+madvise", "madvise", "never"),
        ),
        ("none [mq-deadline] kyber bfq\n", "mq-deadline", ("none", "mq-deadline", "kyber", "bfq")),
        ("[none] mq-deadline kyber bfq\n", "none", ("none", "mq-deadline", "kyber", "bfq")),
        ("[always] madvise never", "always", ("always", "madvise", "never")),
        ("none\n", "none", ("none",)),
        ("", "", ()),
    ],
)
def test_selection(text: str, selected: str, options: tuple[str, ...]) -> None:
    assert parse.selection(text) == parse.Selection(selected, options)


def test_meminfo_and_node_meminfo() -> None:
    info = parse.meminfo(MEMINFO)
    assert info["Hugepagesize"] == 2048
    assert info["HugePages_Total"] == 128
    assert info["MemTotal"] == 24596880
    assert parse.meminfo(NODE_MEMINFO)["MemTotal"] == 6252320


def test_hugepage_dir_names() -> None:
    assert parse.hugepage_dir_kib("hugepages-2048kB") == 2048
    assert parse.hugepage_dir_kib("hugepages-1048576kB") == 1048576
    assert parse.hugepage_dir_kib("hugepages") is None
    assert parse.hugepage_dir_kib("hugepages-2MB") is None


@pytest.mark.parametrize(
    ("text", "kib"), [("2M", 2048), ("1024M", 1048576), ("1G", 1048576), ("2048k", 2048), ("2097152", 2048)]
)
def test_size_kib(text: str, kib: int) -> None:
    assert parse.size_kib(text) == kib


def test_size_kib_unparsable() -> None:
    assert parse.size_kib("big") is None
    assert parse.size_kib("12") is None  # 12 bytes is less than a KiB


def test_hugetlbfs_page_sizes_from_mounts() -> None:
    assert parse.hugetlbfs_page_sizes(MOUNTS, 2048) == {2048, 1048576}
    assert parse.hugetlbfs_page_sizes("none /dev/hugepages hugetlbfs rw,relatime 0 0\n", 2048) == {2048}
    assert parse.hugetlbfs_page_sizes("/dev/vda / ext4 rw 0 0\n", 2048) == frozenset()


def test_status_field() -> None:
    assert parse.status_field(STATUS, "Cpus_allowed_list") == "1"
    assert parse.status_field(STATUS, "Tgid") == "4242"
    assert parse.status_field(STATUS, "Nope") is None


@pytest.mark.parametrize(
    ("comm", "vcpu"),
    [
        ("CPU 0/TCG", 0),
        ("CPU 3/KVM", 3),
        ("CPU 12/KVM\n", 12),
        ("qemu-system-x86", None),
        ("IO mon_iothread", None),
    ],
)
def test_vcpu_of_thread(comm: str, vcpu: int | None) -> None:
    assert parse.vcpu_of_thread(comm) == vcpu


def test_qemu_uuid_from_cmdline() -> None:
    uuid = "0f8fad5b-d9cb-469f-a165-70867728950e"
    argv = [
        b"/usr/bin/qemu-system-x86_64",
        b"-name",
        b"guest=vm1,debug-threads=on",
        b"-uuid",
        uuid.upper().encode(),
    ]
    assert parse.qemu_uuid(b"\0".join(argv) + b"\0") == uuid
    assert parse.qemu_uuid(b"\0".join([b"qemu-kvm", b"-uuid", uuid.encode()])) == uuid
    # not QEMU, no -uuid, -uuid without a uuid, empty
    assert parse.qemu_uuid(b"\0".join([b"/bin/sleep", b"-uuid", uuid.encode()])) is None
    assert parse.qemu_uuid(b"/usr/bin/qemu-system-x86_64\0-m\0512\0") is None
    assert parse.qemu_uuid(b"/usr/bin/qemu-system-x86_64\0-uuid\0nope\0") is None
    assert parse.qemu_uuid(b"") is None


def test_topology_counts() -> None:
    # 2 sockets x 2 cores x 2 threads
    cpus = {0: (0, 0), 1: (0, 0), 2: (0, 1), 3: (0, 1), 4: (1, 0), 5: (1, 0), 6: (1, 1), 7: (1, 1)}
    assert parse.topology_counts(cpus) == (2, 2, 2)
    assert parse.topology_counts({0: (0, 0), 1: (0, 1)}) == (1, 2, 1)  # this machine
    assert parse.topology_counts({}) == (1, 1, 1)


def test_even_cells() -> None:
    assert parse.even_cells(range(8), 2) == [frozenset(range(4)), frozenset(range(4, 8))]
    assert parse.even_cells(range(5), 2) == [frozenset({0, 1, 2}), frozenset({3, 4})]
    assert parse.even_cells(range(2), 1) == [frozenset({0, 1})]


def test_page_size_names() -> None:
    assert page_size_kib("2M") == 2048
    assert page_size_kib("1g") == 1048576
    assert page_size_kib("2048k") == 2048
    assert page_size_kib("2MiB") == 2048
    assert page_size_label(2048) == "2M"
    assert page_size_label(1048576) == "1G"
    assert page_size_label(64) == "64K"
    for bad in ("4K", "3M", "huge", ""):
        with pytest.raises(InvalidRequest):
            page_size_kib(bad)
