"""Issue 12 attacks 5, 6 and 7 against a live fleet: a controller and an agent process on
libvirt's test driver, over the real RabbitMQ, with the real ``qemu-img``, driven by the
``virtfleet`` CLI as an operator (or an attacker with an operator's login) runs it.

The agent's storage pools are its libvirt default pool and ``<tmp>/pool`` (its config file); a
"host secret" outside them holds a marker. Every attack must exit 2 (InvalidRequest), create no
file, copy nothing and leave the fleet's VMs as they were.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from vfsupport import Fleet, node_uri, private_fleet

# SQLite only (deploy/test.sh): the agent refuses the paths; the database only holds the fleet.
pytestmark = [
    pytest.mark.broker,
    pytest.mark.db,
    pytest.mark.backend_neutral,
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed"),
]

HOST = "hv-sec"


@dataclass
class Live:
    fleet: Fleet
    pool: Path
    secret: Path
    marker: bytes

    def refused(self, *args: str) -> dict[str, Any]:
        """Exit 2, InvalidRequest, and nothing new in the pool or beside the secret."""
        before = self.files()
        result = self.fleet.cli(*args)
        assert result.code == 2, f"{args}: {result.code} {result.stdout}{result.stderr}"
        error: dict[str, Any] = result.json["error"]
        assert error["type"] == "InvalidRequest", error
        assert self.files() == before
        return error

    def files(self) -> set[Path]:
        return {*self.pool.rglob("*"), *self.secret.parent.rglob("*")}

    def marker_in_pool(self) -> list[str]:
        return [p.name for p in self.pool.rglob("*") if p.is_file() and self.marker in p.read_bytes()]

    def vm_names(self) -> set[str]:
        return {v["name"] for v in self.fleet.cli_ok("vm", "list", "--all")["vms"]}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("hostaccess")
    pool = tmp / "pool"
    pool.mkdir()
    secret = tmp / "host" / "shadow"
    secret.parent.mkdir()
    marker = f"HOST-SECRET-{uuid.uuid4().hex}".encode()
    secret.write_bytes(marker * 4096)
    secret.chmod(0o600)
    config = tmp / "agent.toml"
    config.write_text(f'[agent.pools.images]\npath = "{pool}"\n')
    with private_fleet(tmp) as fleet:
        fleet.start_controller()
        fleet.start_agent(HOST, node_uri("small"), "--config", str(config))
        fleet.wait_hosts({HOST})
        fleet.cli_ok("vm", "create", "bystander", "--memory", "64", "--disk", "1")
        yield Live(fleet, pool, secret, marker)


def test_attack_5_paths_outside_the_pools(live: Live) -> None:
    for path in ("/etc/shadow", str(live.secret), "/root/absent"):
        error = live.refused("image", "info", HOST, path)
        assert "outside the storage pools" in error["message"] and str(live.pool) in error["message"]
    live.refused("image", "convert", HOST, str(live.secret), f"{live.pool}/copy.raw", "--format", "raw")
    live.refused(
        "image", "create", HOST, str(live.secret.parent / "new.qcow2"), "--format", "qcow2", "--size", "1"
    )
    live.refused("vm", "create", "thief", "--memory", "64", "--disk", f"path={live.secret}")
    assert live.vm_names() == {"bystander"}
    assert live.marker_in_pool() == []


def test_attack_6_a_backing_file_on_the_host(live: Live) -> None:
    raw = f"{live.pool}/guest.raw"
    live.fleet.cli_ok("image", "create", HOST, raw, "--format", "raw", "--size", "1")
    crafted = live.pool.parent / "crafted.qcow2"  # what the guest writes at the start of its disk
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(live.secret), "-F", "raw", str(crafted), "1M"],
        check=True,
    )
    with Path(raw).open("r+b") as disk:
        disk.write(crafted.read_bytes())
    info = live.fleet.cli_ok("image", "info", HOST, raw)["image"]
    assert (info["format"], info["backing_file"]) == ("raw", None)
    live.fleet.cli_ok("image", "convert", HOST, raw, f"{live.pool}/guest-copy.qcow2", "--format", "qcow2")
    assert live.marker_in_pool() == []

    qcow = f"{live.pool}/vm.qcow2"
    live.fleet.cli_ok("image", "create", HOST, qcow, "--format", "qcow2", "--size", "1")
    subprocess.run(
        ["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", str(live.secret), "-F", "raw", qcow], check=True
    )
    assert "backing file" in live.refused("image", "info", HOST, qcow)["message"]
    live.refused("image", "convert", HOST, qcow, f"{live.pool}/leak.raw", "--format", "raw")
    assert not Path(f"{live.pool}/leak.raw").exists()
    assert live.marker_in_pool() == []


@pytest.mark.parametrize(
    ("element", "devices"),
    [
        ("filesystem", "<filesystem type='mount'><source dir='/'/><target dir='host'/></filesystem>"),
        ("emulator", "<emulator>/bin/sh</emulator>"),
        (
            "hostdev",
            "<hostdev mode='subsystem' type='pci'><source><address bus='0x0' slot='0x1'/></source></hostdev>",
        ),
        ("qemu:commandline", ""),
    ],
)
def test_attack_7_domain_xml_that_reaches_the_host(
    live: Live, element: str, devices: str, tmp_path: Path
) -> None:
    extra = (
        "<qemu:commandline><qemu:arg value='-debugcon'/></qemu:commandline>"
        if element.startswith("qemu")
        else ""
    )
    xml = tmp_path / "import.xml"
    xml.write_text(
        "<domain type='test' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>intruder</name>"
        f"<uuid>{uuid.uuid4()}</uuid><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        f"<os><type arch='x86_64'>hvm</type></os><devices>{devices}</devices>{extra}</domain>"
    )
    error = live.refused("vm", "import", str(xml), "--host", HOST)
    assert f"<{element}" in error["message"]
    assert live.vm_names() == {"bystander"}
    assert live.fleet.cli_ok("vm", "show", "bystander")["power_state"] in ("running", "shutoff")
