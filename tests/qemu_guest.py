"""Real QEMU guests for tests marked ``qemu``: libvirtd on qemu:///system, TCG, the tiny
guest built by deploy/guest/build-guest.sh (Debian kernel + busybox initramfs whose /init
prints ``GUEST-HELLO`` and then every second ``GUEST-STATE cpus=<list> memtotal_kb=<n>``,
onlines hot-added CPUs and powers off on the ACPI power button).

deploy/test.sh sets ``VIRTFLEET_REQUIRE_QEMU=1``: there, a missing libvirtd or guest is a
failure. Run by hand without it, such tests skip and say exactly what is missing.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig
from agent.main import Agent, build_hypervisor
from agent.storage_pools import StoragePool
from agent.tuning.module import TuningModule
from common.messages.base import replace
from common.messages.vm import DiskFormat, DiskSpec, DomainType, GraphicsSpec, KernelBoot, NicSpec, VmSpec

QEMU_URI = "qemu:///system"
GUEST_DIR = Path(os.environ.get("VIRTFLEET_TEST_GUEST_DIR", "/var/cache/virtfleet/guest"))
SERIAL_DIR = Path("/var/log/libvirt/qemu")
TEST_PREFIX = "vftest-"
#: Our own pool so tests never touch a real "default" pool's images.
TEST_POOL = "vftest-pool"
TEST_POOL_DIR = Path("/var/lib/virtfleet/test-images")
#: The test guest's kernel and initrd: a storage pool of the test agents (paths must lie in one).
GUEST_POOL = StoragePool("guest", str(GUEST_DIR), frozenset({DiskFormat.RAW}))

_STATE_RE = re.compile(r"GUEST-STATE cpus=(\S+) memtotal_kb=(\d+)")


def _missing() -> str | None:
    for name in ("vmlinux", "initrd.gz"):
        if not (GUEST_DIR / name).is_file():
            return (
                f"test guest file {GUEST_DIR / name} is missing (run deploy/guest/build-guest.sh {GUEST_DIR})"
            )
    try:
        import libvirt  # noqa: PLC0415 - only tests marked qemu need it

        conn = libvirt.open(QEMU_URI)
        conn.close()
    except Exception as exc:
        return f"libvirtd does not answer on {QEMU_URI} ({exc}); run deploy/services.sh"
    return None


def require_qemu() -> None:
    """Fail (under deploy/test.sh) or skip (by hand) when real QEMU guests cannot run."""
    reason = _missing()
    if reason is None:
        return
    if os.environ.get("VIRTFLEET_REQUIRE_QEMU") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def guest_name(label: str) -> str:
    return f"{TEST_PREFIX}{label}-{uuid.uuid4().hex[:6]}"


def serial_log(name: str) -> Path:
    return SERIAL_DIR / f"{name}-serial.log"


def guest_spec(
    name: str,
    *,
    vcpus: int = 1,
    max_vcpus: int = 2,
    memory_mib: int = 256,
    max_memory_mib: int = 384,
    disks: tuple[DiskSpec, ...] = (),
    nics: tuple[NicSpec, ...] = (),
    graphics: GraphicsSpec | None = None,
) -> VmSpec:
    """A spec that boots the tiny guest (direct kernel boot, TCG)."""
    return VmSpec(
        uuid=str(uuid.uuid4()),
        name=name,
        vcpus=vcpus,
        max_vcpus=max_vcpus,
        memory_mib=memory_mib,
        max_memory_mib=max_memory_mib,
        domain_type=DomainType.QEMU,
        machine="pc",
        kernel_boot=KernelBoot(
            kernel=str(GUEST_DIR / "vmlinux"),
            initrd=str(GUEST_DIR / "initrd.gz"),
            cmdline="console=ttyS0 quiet",
        ),
        disks=disks,
        nics=nics,
        graphics=graphics,
        serial_log=str(serial_log(name)),
    )


def with_new_disk(spec: VmSpec, size_gib: int = 1, fmt: DiskFormat = DiskFormat.QCOW2) -> VmSpec:
    return replace(
        spec, disks=(*spec.disks, DiskSpec(target="vda", size_gib=size_gib, format=fmt, pool=TEST_POOL))
    )


@dataclass(frozen=True)
class GuestState:
    cpus: str
    memtotal_kb: int

    @property
    def cpu_count(self) -> int:
        count = 0
        for part in self.cpus.split(","):
            lo, _, hi = part.partition("-")
            count += int(hi or lo) - int(lo) + 1
        return count


def last_state(name: str) -> GuestState | None:
    """The guest's latest GUEST-STATE line from its serial log."""
    path = serial_log(name)
    if not path.exists():
        return None
    matches = _STATE_RE.findall(path.read_text(errors="replace"))
    if not matches:
        return None
    cpus, mem = matches[-1]
    return GuestState(cpus, int(mem))


def wait_for_serial(name: str, needle: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    path = serial_log(name)
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        time.sleep(0.25)
    text = path.read_text(errors="replace")[-2000:] if path.exists() else "(no serial log)"
    raise AssertionError(f"{needle!r} did not appear on {name}'s console within {timeout}s:\n{text}")


def write_agent_toml(path: Path) -> Path:
    """An agent configuration file that puts images in the test pool (for ``virtfleet-agent --config``)."""
    path.write_text(
        f'[agent]\nstorage_pool = "{TEST_POOL}"\nimages_dir = "{TEST_POOL_DIR}"\n'
        f'[agent.pools.guest]\npath = "{GUEST_DIR}"\nformats = ["raw"]\n'
    )
    return path


def start_qemu_agent(
    conn: Any, host_id: str, amqp_url: str, state_dir: Path, *, tuning: bool = False, **settings: Any
) -> Agent:
    """An agent in this process on qemu:///system and the test pool, consuming from ``amqp_url``
    (reports every 300 s; ``settings`` are more AgentConfig fields), with the tuning module if asked."""
    cfg = AgentConfig(
        host_id=host_id,
        libvirt_uri=QEMU_URI,
        amqp_url=amqp_url,
        state_dir=state_dir,
        storage_pool=TEST_POOL,
        images_dir=TEST_POOL_DIR,
        report_interval=300,
        pools=(GUEST_POOL,),
        trust_broker_logins=False,  # the test publishes as guest: development mode
        **settings,
    )
    modules = [TuningModule.for_host(cfg, conn)] if tuning else []
    agent = Agent(cfg, build_hypervisor(cfg, conn), modules=modules)
    agent.start()
    assert agent.server.ready.wait(30), f"the agent of {host_id} never started consuming"
    return agent


def cleanup_test_domains(conn: Any) -> None:
    """Destroy and undefine every domain this test suite made (name prefix ``vftest-``)."""
    import libvirt  # noqa: PLC0415

    for dom in conn.listAllDomains(0):
        if not dom.name().startswith(TEST_PREFIX):
            continue
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isActive():
                dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefineFlags(
                libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            )
        with contextlib.suppress(OSError):
            serial_log(dom.name()).unlink()


@contextlib.contextmanager
def qemu_connection() -> Iterator[Any]:
    """An open qemu:///system connection; test domains are cleaned up afterwards."""
    import libvirt  # noqa: PLC0415

    conn = libvirt.open(QEMU_URI)
    try:
        yield conn
    finally:
        cleanup_test_domains(conn)
        conn.close()
