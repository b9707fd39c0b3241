"""HostKernel over a directory tree (agent/tuning/sysfs.py): reads, emulated writes, errors."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from agent.tuning.sysfs import HostKernel, seed_simulated_root
from common.errors import HypervisorError, InvalidRequest, NotFound, Unsupported
from common.messages.tuning import BlockDevice, HugepagePool, NumaCell, ThreadAffinity

UUID = "0f8fad5b-d9cb-469f-a165-70867728950e"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A simulated 8-CPU, 2-cell host plus a loop device and one QEMU process."""
    seed_simulated_root(tmp_path, cpus=8, cells=2, sockets=1, cores=2, threads=2, memory_mib=16384)
    _write(tmp_path / "sys/block/loop0/queue/scheduler", "[none] mq-deadline kyber bfq\n")
    _write(tmp_path / "sys/block/loop0/queue/rotational", "0\n")
    _write(tmp_path / "sys/block/sda/queue/scheduler", "none [mq-deadline] kyber bfq\n")
    _write(tmp_path / "sys/block/sda/queue/rotational", "1\n")
    (tmp_path / "sys/block/sda/device").mkdir()
    (tmp_path / "sys/block/zram0").mkdir(parents=True)  # no scheduler file: not listed
    proc = tmp_path / "proc/4242"
    _write(proc / "cmdline", f"/usr/bin/qemu-system-x86_64\0-uuid\0{UUID}\0")
    for tid, comm, cpus in (
        (4242, "qemu-system-x86", "0"),
        (4250, "CPU 0/TCG", "1"),
        (4251, "CPU 1/TCG", "1"),
    ):
        _write(proc / f"task/{tid}/comm", comm + "\n")
        _write(proc / f"task/{tid}/status", f"Name:\t{comm}\nCpus_allowed:\tff\nCpus_allowed_list:\t{cpus}\n")
    return tmp_path


def test_topology_of_a_simulated_host(root: Path) -> None:
    kernel = HostKernel(root, emulate=True)
    assert kernel.online_cpus() == frozenset(range(8))
    topo = kernel.cpu_topology()
    assert topo[0] == topo[1] == (0, 0)  # two threads of core 0
    assert topo[2] == (0, 1)
    assert topo[4] == (1, 0)  # second package
    assert kernel.numa_cells() == (NumaCell(0, "0-3", 8192), NumaCell(1, "4-7", 8192))


def test_numa_falls_back_to_one_cell(tmp_path: Path) -> None:
    _write(tmp_path / "sys/devices/system/cpu/online", "0-1\n")
    _write(tmp_path / "proc/meminfo", "MemTotal: 2097152 kB\n")
    assert HostKernel(tmp_path).numa_cells() == (NumaCell(0, "0-1", 2048),)


def test_seeding_keeps_tunables_but_follows_the_node_shape(root: Path) -> None:
    kernel = HostKernel(root, emulate=True)
    kernel.set_io_scheduler("vda", "none")
    seed_simulated_root(root, cpus=4, cells=1, sockets=1, cores=4, threads=1, memory_mib=4096)
    assert kernel.online_cpus() == frozenset(range(4))
    assert kernel.block_device("vda").scheduler == "none"


def test_hugepage_pools_and_emulated_resize(root: Path) -> None:
    kernel = HostKernel(root, emulate=True)
    assert kernel.default_hugepage_kib() == 2048
    assert kernel.hugepage_pools() == (
        HugepagePool(2048, 0, 0, mounted=True),
        HugepagePool(1048576, 0, 0, mounted=True),
    )
    kernel.set_hugepages(2048, 64)
    assert kernel.hugepage_pool(2048) == HugepagePool(2048, 64, 64, mounted=True)
    # 10 pages in use: shrinking below that leaves them (as surplus would on a real kernel)
    (root / "sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages").write_text("54\n")
    kernel.set_hugepages(2048, 4)
    pool = kernel.hugepage_pool(2048)
    assert (pool.total, pool.free) == (10, 0)
    assert pool.available == 0
    with pytest.raises(Unsupported):
        kernel.hugepage_pool(16384)
    with pytest.raises(InvalidRequest):
        kernel.set_hugepages(2048, -1)


def test_reserved_pages_are_not_available() -> None:
    assert HugepagePool(2048, total=64, free=40, reserved=30).available == 10


def test_thp(root: Path) -> None:
    kernel = HostKernel(root, emulate=True)
    assert kernel.thp("enabled").selected == "madvise"
    kernel.set_thp("enabled", "never")
    assert (root / "sys/kernel/mm/transparent_hugepage/enabled").read_text() == "always madvise [never]\n"
    assert kernel.thp("enabled").selected == "never"
    with pytest.raises(InvalidRequest):
        kernel.set_thp("enabled", "sometimes")
    with pytest.raises(InvalidRequest):
        kernel.thp("khugepaged")


def test_thp_missing_is_unsupported(tmp_path: Path) -> None:
    kernel = HostKernel(tmp_path, emulate=True)
    assert kernel.thp("enabled").options == ()
    with pytest.raises(Unsupported):
        kernel.set_thp("enabled", "never")


def test_block_devices(root: Path) -> None:
    kernel = HostKernel(root, emulate=True)
    assert kernel.block_devices() == (
        BlockDevice(
            "loop0", "none", ("none", "mq-deadline", "kyber", "bfq"), rotational=False, physical=False
        ),
        BlockDevice(
            "sda", "mq-deadline", ("none", "mq-deadline", "kyber", "bfq"), rotational=True, physical=True
        ),
        BlockDevice(
            "vda", "mq-deadline", ("none", "mq-deadline", "kyber", "bfq"), rotational=False, physical=True
        ),
    )
    kernel.set_io_scheduler("sda", "kyber")
    assert (root / "sys/block/sda/queue/scheduler").read_text() == "none mq-deadline [kyber] bfq\n"
    with pytest.raises(InvalidRequest):
        kernel.set_io_scheduler("sda", "cfq")
    with pytest.raises(NotFound):
        kernel.set_io_scheduler("zram0", "none")
    with pytest.raises(InvalidRequest):
        kernel.block_device("../sda")


def test_a_refused_write_is_a_hypervisor_error(root: Path) -> None:
    # A real kernel refuses with an errno; here the file is a directory (EISDIR).
    target = root / "sys/block/sda/queue/scheduler"
    kernel = HostKernel(root)
    target.unlink()
    target.mkdir()
    (root / "sys/block/sda/queue/scheduler2").write_text("x")
    with pytest.raises(NotFound):
        kernel.set_io_scheduler("sda", "none")  # no readable scheduler file: not a device with one
    nr = root / "sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
    nr.unlink()
    nr.mkdir()
    with pytest.raises(HypervisorError) as err:
        kernel.set_hugepages(2048, 8)
    assert err.value.details["errno"] == errno.EISDIR


def test_threads_of_a_process(root: Path) -> None:
    kernel = HostKernel(root, emulate=True)
    assert sorted(kernel.pids()) == [4242]
    assert UUID.encode() in kernel.cmdline(4242)
    assert kernel.threads(4242) == (
        ThreadAffinity(4242, "qemu-system-x86", "0"),
        ThreadAffinity(4250, "CPU 0/TCG", "1", vcpu=0),
        ThreadAffinity(4251, "CPU 1/TCG", "1", vcpu=1),
    )
    kernel.set_thread_affinity(4250, frozenset({0, 1}))
    assert kernel.threads(4242)[1].cpus == "0-1"
    with pytest.raises(NotFound):
        kernel.threads(999)
    with pytest.raises(NotFound):
        kernel.cmdline(999)
    with pytest.raises(NotFound):
        kernel.set_thread_affinity(999, frozenset({0}))


def test_real_affinity_errors_are_translated(tmp_path: Path) -> None:
    def refuse(tid: int, cpus: frozenset[int]) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    def gone(tid: int, cpus: frozenset[int]) -> None:
        raise ProcessLookupError(errno.ESRCH, "No such process")

    with pytest.raises(HypervisorError) as err:
        HostKernel(tmp_path, set_affinity=refuse).set_thread_affinity(7, frozenset({1}))
    assert "cgroup cpuset" in err.value.message
    with pytest.raises(NotFound):
        HostKernel(tmp_path, set_affinity=gone).set_thread_affinity(7, frozenset({1}))
    seen: list[tuple[int, frozenset[int]]] = []
    HostKernel(tmp_path, set_affinity=lambda tid, cpus: seen.append((tid, cpus))).set_thread_affinity(
        7, frozenset({0})
    )
    assert seen == [(7, frozenset({0}))]
