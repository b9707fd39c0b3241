"""Bonds and VLANs on a real kernel: a QEMU/TCG guest booted once per test run.

This machine's kernel has no bonding or 802.1Q and cannot load modules, so the tests marked
``realnet_guest`` run inside a Debian kernel booted under QEMU (deploy/guest/build-netlab.sh,
/work/shared/bond-in-guest.md): the guest mounts this host's root filesystem read-only over
virtio-9p and runs ``pytest -m realnet_guest tests/realnet`` with this very checkout and venv.
Its junit.xml, output and exit code come back through a writable 9p share.

On the host, ``realnet_guest`` tests are deselected; the ``realnet`` tests (test_net_realnet.py)
boot the guest through the session fixture :func:`netlab_run` and assert on its results. Inside
the guest (``VIRTFLEET_NETLAB_GUEST=1``) only the ``realnet_guest`` tests run.

Under deploy/test.sh (``VIRTFLEET_REQUIRE_QEMU=1``) a guest that cannot be built or booted is a
failure; run by hand without it, the realnet tests skip and say why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netlab import NetlabRun, parse_junit

REPO = Path(__file__).resolve().parents[2]
IN_GUEST = os.environ.get("VIRTFLEET_NETLAB_GUEST") == "1"
NETLAB_DIR = Path(os.environ.get("VIRTFLEET_NETLAB_DIR", "/var/cache/virtfleet/netlab"))
BOOT_TIMEOUT = float(os.environ.get("VIRTFLEET_NETLAB_TIMEOUT", "420"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "realnet_guest: runs inside the netlab QEMU guest (bonding, 802.1Q)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IN_GUEST:
        return
    guest_only = [i for i in items if i.get_closest_marker("realnet_guest") is not None]
    if guest_only:
        config.hook.pytest_deselected(items=guest_only)
        items[:] = [i for i in items if i.get_closest_marker("realnet_guest") is None]


def _unavailable(reason: str) -> None:
    reason = f"bonding and 802.1Q on a real kernel (the netlab guest) not tested: {reason}"
    if os.environ.get("VIRTFLEET_REQUIRE_QEMU") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def _warm_bytecode() -> None:
    """Compile the modules the guest imports on the host first: the guest cannot write
    __pycache__ (read-only share) and compiling there costs ~20x host time."""
    import compileall  # noqa: PLC0415

    for sub in ("agent/network", "common", "tests/realnet"):
        compileall.compile_dir(str(REPO / sub), quiet=1)
    for name in ("agent/__init__.py", "tests/netlab.py"):
        compileall.compile_file(str(REPO / name), quiet=1)


GUEST_SCRIPT = """\
cd {repo} || exit 97
export HOME=/run/vftmp TMPDIR=/run/vftmp PYTHONDONTWRITEBYTECODE=1 VIRTFLEET_NETLAB_GUEST=1
mkdir -p /run/vftmp
echo "NETLAB-PYTEST uptime=$(cut -d' ' -f1 /proc/uptime)"
{python} -m pytest -m realnet_guest tests/realnet --confcutdir=tests/realnet -p no:cacheprovider \\
    -p no:hypothesispytest -q -rA --junitxml=/run/out/junit.xml >/run/out/pytest.log 2>&1
rc=$?
echo $rc >/run/out/rc
exit $rc
"""


@pytest.fixture(scope="session")
def netlab_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetlabRun]:
    """Build (cached) and boot the netlab guest once; the guest runs the realnet_guest tests."""
    if os.geteuid() != 0:
        _unavailable("the netlab guest needs root (QEMU exports / over 9p as root)")
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        _unavailable("qemu-system-x86_64 is not installed (deploy/install.sh)")
    assert qemu is not None
    build = subprocess.run(
        ["bash", str(REPO / "deploy/guest/build-netlab.sh"), str(NETLAB_DIR)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if build.returncode != 0:
        _unavailable(f"deploy/guest/build-netlab.sh failed:\n{build.stdout}{build.stderr}")
    _warm_bytecode()
    out = tmp_path_factory.mktemp("netlab-out")
    (out / "guest.sh").write_text(GUEST_SCRIPT.format(repo=REPO, python=sys.executable))
    argv = [
        qemu,
        "-accel", "tcg", "-M", "pc", "-m", "512", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-nic", "none", "-no-reboot",
        "-serial", f"file:{out / 'console.log'}",
        "-kernel", str(NETLAB_DIR / "vmlinux"),
        "-initrd", str(NETLAB_DIR / "initrd.gz"),
        "-append", "console=ttyS0 quiet panic=-1",
        "-fsdev", "local,id=fs0,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=fs0,mount_tag=hostroot",
        "-fsdev", f"local,id=fs1,path={out},security_model=none",
        "-device", "virtio-9p-pci,fsdev=fs1,mount_tag=out",
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        qemu_out, _ = proc.communicate(timeout=BOOT_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        qemu_out, _ = proc.communicate()
    boot_s = time.monotonic() - started
    rc_file = out / "rc"
    rc = int(rc_file.read_text().strip()) if rc_file.exists() else None
    console = (out / "console.log").read_text(errors="replace") if (out / "console.log").exists() else ""
    log = (out / "pytest.log").read_text(errors="replace") if (out / "pytest.log").exists() else ""
    run = NetlabRun(
        rc, boot_s, console + qemu_out.decode(errors="replace"), log, parse_junit(out / "junit.xml")
    )
    print(f"\nnetlab guest: rc={rc}, {len(run.cases)} tests, {boot_s:.1f}s from QEMU start to power off")
    yield run
