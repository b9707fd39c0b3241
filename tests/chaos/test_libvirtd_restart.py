"""libvirtd killed (-9) and restarted under a running guest (issue 13, item 7).

The shared libvirtd is never touched: the test starts a PRIVATE libvirtd serving qemu:///system as
a plain process, in a mount namespace of its own (``unshare --mount``) where /etc/libvirt,
/run/libvirt, /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt are bind mounts of
directories under the test's temp dir. A second qemu:///system daemon needs that: the QEMU driver
keeps its state (domain status XML, driver.pid lock, monitor sockets) at fixed paths, so on the
host's own paths it would meet the shared daemon's domains. Its sockets are in the temp dir too
(``unix_sock_dir``): the agent connects with ``qemu+unix:///system?socket=...``. It uses no
cgroups, no security driver and no virtlogd (qemu.conf below), so nothing outside the temp dir
changes. A restart starts it again in a new namespace over the same directories, where it finds
the guest's status and monitor socket and reattaches to the running QEMU, as after a
``systemctl restart libvirtd``.

A controller and the CLI run in-process over the memory broker (tests/inproc.py); the agent runs
in-process on the private daemon through its real libvirt driver and :class:`LibvirtLink`. The test
boots the tiny guest through the CLI, kills libvirtd with SIGKILL and checks from outside: the
host shows ``degraded`` with the reason, a command fails with ``HypervisorUnavailable``; after the
restart the host is ``up``, the agent reconnected, the QEMU process is the same pid, ``virsh
domstate`` says running, and a change made with virsh reaches ``vm show`` through the lifecycle
events that the agent registered again on its new connection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from inproc import InProcessFleet, inprocess_fleet
from qemu_guest import GUEST_DIR, GUEST_POOL, require_qemu
from vfsupport import wait_until

from agent.config import AgentConfig
from agent.main import Agent, HostLibvirt, build_hypervisor

pytestmark = [pytest.mark.chaos, pytest.mark.qemu]

LIBVIRTD = "/usr/sbin/libvirtd"
HOST = "lvd"
VM = "vfchaos-lvd"
#: bounds of the waits (the whole test takes ~15 s on the 2-core box)
SOON = 30.0

#: the host's libvirt directories the private daemon gets its own copies of
PRIVATE_DIRS = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
}


@dataclasses.dataclass
class PrivateLibvirtd:
    """A libvirtd for qemu:///system of the test's own (see the module docstring)."""

    root: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.root / "sock" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    def prepare(self) -> None:
        for name in (*PRIVATE_DIRS, "sock"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        # The QEMU capabilities cache: without it the first start probes QEMU for ~12 s.
        with contextlib.suppress(OSError):
            shutil.copytree("/var/cache/libvirt/qemu", self.root / "cache" / "qemu", dirs_exist_ok=True)
        (self.root / "etc" / "libvirtd.conf").write_text(
            f'unix_sock_dir = "{self.root / "sock"}"\n'
            'unix_sock_rw_perms = "0700"\n'
            'auth_unix_rw = "none"\n'
            'auth_unix_ro = "none"\n'
            f'log_outputs = "3:file:{self.root / "libvirtd.log"}"\n'
        )
        (self.root / "etc" / "qemu.conf").write_text(
            'user = "root"\ngroup = "root"\ndynamic_ownership = 0\nsecurity_driver = "none"\n'
            'cgroup_controllers = [ ]\nstdio_handler = "file"\n'
        )
        mounts = "".join(f"mount --bind {self.root / n} {path}\n" for n, path in PRIVATE_DIRS.items())
        (self.root / "start.sh").write_text(
            f"set -e\n{mounts}exec {LIBVIRTD} --config {self.root / 'etc' / 'libvirtd.conf'}"
            f" --pid-file {self.root / 'libvirtd.pid'}\n"
        )

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "the private libvirtd runs already"
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()  # a killed daemon leaves it behind
        with (self.root / "libvirtd.out").open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    "/usr/bin/unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "--",
                    "sh",
                    str(self.root / "start.sh"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(self._answers, SOON, f"the private libvirtd to answer on {self.socket}", interval=0.1)

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"the private libvirtd exited ({self.proc.returncode}):\n{self.output()}")
        return self.virsh("version").returncode == 0

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)  # Popen's pid is libvirtd itself (sh execs it)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def qemu_pid(self, name: str) -> int:
        return int((self.root / "run" / "qemu" / f"{name}.pid").read_text().strip())

    def qemu_pids(self) -> list[int]:
        pids = []
        for path in (self.root / "run" / "qemu").glob("*.pid"):
            with contextlib.suppress(ValueError, OSError):
                pids.append(int(path.read_text().strip()))
        return pids

    def virsh(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["virsh", "-c", self.uri, *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def output(self) -> str:
        logs = [self.root / "libvirtd.out", self.root / "libvirtd.log"]
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in logs if p.exists())


def _why_not() -> str | None:
    """Why a private qemu:///system libvirtd cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "a private qemu:///system libvirtd needs root (bind mounts in its own mount namespace)"
    for tool in (LIBVIRTD, "/usr/bin/unshare"):
        if not Path(tool).exists():
            return f"{tool} is missing"
    if shutil.which("virsh") is None:
        return "virsh is missing"
    probe = subprocess.run(
        ["/usr/bin/unshare", "--mount", "--propagation", "private", "--", "true"],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        return f"cannot make a mount namespace: {probe.stderr.decode(errors='replace').strip()}"
    return None


@pytest.fixture
def libvirtd(tmp_path: Path) -> Iterator[PrivateLibvirtd]:
    require_qemu()  # the tiny guest (and a working QEMU) exist
    reason = _why_not()
    if reason is not None:
        pytest.skip(
            f"libvirtd restart on a real host (reconnect, degraded, guest untouched) untested: {reason}"
        )
    daemon = PrivateLibvirtd(tmp_path / "libvirtd")
    daemon.prepare()
    try:
        daemon.start()
        yield daemon
    finally:
        # The guest goes with the daemon, whatever happened: destroyed through it when it still
        # answers, and its QEMU (only ours: the pids in the private run dir) killed in any case.
        with contextlib.suppress(Exception):
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.virsh("destroy", VM)
        daemon.stop()
        for pid in daemon.qemu_pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[InProcessFleet]:
    (tmp_path / "fleet").mkdir()
    with inprocess_fleet(tmp_path / "fleet", {}) as f:
        yield f


@dataclasses.dataclass
class RunningAgent:
    agent: Agent
    libvirt: HostLibvirt


@pytest.fixture
def agent(fleet: InProcessFleet, libvirtd: PrivateLibvirtd, tmp_path: Path) -> Iterator[RunningAgent]:
    cfg = AgentConfig(
        host_id=HOST,
        libvirt_uri=libvirtd.uri,
        amqp_url="memory://fleet",
        state_dir=tmp_path / "agent",
        storage_pool="vfchaos-pool",
        images_dir=tmp_path / "images",
        report_interval=300,  # what shows in time came from events and the link's reports
        heartbeat_interval=fleet.heartbeat_interval,
        pools=(GUEST_POOL,),
        key_file=fleet.key_file(HOST) if fleet.signed else None,
    )
    conn = HostLibvirt(cfg.libvirt_uri)
    try:
        running = Agent(
            cfg,
            build_hypervisor(cfg, conn.driver),
            transport=fleet.broker.transport(f"agent-{HOST}", user=f"agent-{HOST}"),
        )
        running.start()
        try:
            fleet.wait_hosts({HOST})
            yield RunningAgent(running, conn)
        finally:
            running.stop(timeout=10)
    finally:
        conn.close()


def guest_states(serial: Path) -> int:
    """How many GUEST-STATE lines the guest has printed on its serial console so far."""
    return serial.read_text(errors="replace").count("GUEST-STATE") if serial.exists() else 0


def status(fleet: InProcessFleet) -> dict[str, Any]:
    return dict(fleet.hosts().get(HOST, {}))


def test_libvirtd_killed_and_restarted_leaves_the_guest_running_and_the_host_degraded_meanwhile(
    fleet: InProcessFleet, libvirtd: PrivateLibvirtd, agent: RunningAgent, tmp_path: Path
) -> None:
    link = agent.libvirt.link
    assert link is not None, "a real host's agent keeps a reconnecting LibvirtLink"
    created = fleet.cli(
        "vm", "create", VM, "--host", HOST, "--domain-type", "qemu", "--machine", "pc",
        "--vcpus", "1", "--memory", "256", "--disk", "none",
        "--kernel", str(GUEST_DIR / "vmlinux"), "--initrd", str(GUEST_DIR / "initrd.gz"),
        "--kernel-args", "console=ttyS0 quiet", "--serial-log", str(tmp_path / "images" / f"{VM}-serial.log"),
    )  # fmt: skip
    assert created.code == 0, created.stdout + created.stderr + libvirtd.output()
    qemu = libvirtd.qemu_pid(VM)
    assert libvirtd.virsh("domstate", VM).stdout.strip() == "running"
    serial = tmp_path / "images" / f"{VM}-serial.log"
    # The guest's own userspace runs (it prints GUEST-STATE every second once booted).
    states_before = wait_until(lambda: guest_states(serial), SOON * 3, "the guest's GUEST-STATE lines")

    killed = time.monotonic()
    libvirtd.kill9()
    degraded = wait_until(
        lambda: (s := status(fleet)).get("status") == "degraded" and s, SOON, "the host shown degraded"
    )
    assert "libvirt unreachable" in degraded["state_reason"], degraded
    refused = fleet.cli("vm", "suspend", VM)
    assert refused.code == 5, refused.stdout  # unavailable for the moment: retry
    assert refused.json["error"]["type"] == "HypervisorUnavailable", refused.json
    assert refused.json["error"]["retryable"] is True
    os.kill(qemu, 0)  # QEMU runs on without libvirtd

    libvirtd.start()
    wait_until(lambda: status(fleet).get("status") == "up", SOON, "the host up again after the restart")
    back = time.monotonic()
    assert status(fleet)["state_reason"] is None
    assert link.reconnects == 1  # the agent reconnected by itself (it was never restarted)
    last = agent.agent.reporter.last_report
    assert last is not None and last.hypervisor_error is None

    # Untouched: the same QEMU process, running for libvirt and for the controller.
    os.kill(qemu, 0)
    assert libvirtd.qemu_pid(VM) == qemu
    assert libvirtd.virsh("domstate", VM).stdout.strip() == "running"
    assert fleet.cli_ok("vm", "show", VM)["power_state"] == "running"
    wait_until(
        lambda: guest_states(serial) > states_before, SOON, "the guest still printing after the restart"
    )

    # The lifecycle events were registered again on the new connection: a change made behind the
    # controller's back reaches it long before the next full report (300 s).
    assert libvirtd.virsh("suspend", VM).returncode == 0
    wait_until(
        lambda: fleet.cli_ok("vm", "show", VM)["power_state"] == "paused",
        SOON,
        "the suspend seen through events",
    )
    fleet.cli_ok("vm", "resume", VM)  # and commands work again
    assert libvirtd.virsh("domstate", VM).stdout.strip() == "running"
    print(
        f"libvirtd kill -9 -> restarted -> host up again: {back - killed:.1f} s (degraded meanwhile); "
        f"same QEMU pid {qemu}; agent reconnects: {link.reconnects}"
    )
