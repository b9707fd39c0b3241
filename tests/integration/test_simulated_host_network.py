"""Item 8 of issue 12: an agent on libvirt's test driver never touches this machine's network.

A ``test:///`` host's network module gets in-memory links and a file tree under its state
directory: a bridge it creates exists only there, and it reports its simulated links.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import libvirt

from agent.config import AgentConfig
from agent.network.model import CreateBridge
from agent.network.module import build_network_module

NODE = Path(__file__).resolve().parents[1] / "fixtures" / "nodes" / "small.xml"


def test_a_test_driver_agent_changes_no_real_link(tmp_path: Path) -> None:
    uri = f"test://{NODE}"
    cfg = AgentConfig(host_id="sim-net", libvirt_uri=uri, state_dir=tmp_path / "state")
    conn = libvirt.open(uri)
    try:
        module = build_network_module(
            cfg, conn, env={"VIRTFLEET_NET_ROOT": "/", "VIRTFLEET_NET_PERSIST": "auto"}
        )
        names = {i.name for i in module.facts().interfaces}
        assert names == {"lo", "eth0", "eth1"}  # the simulated host's links, not this machine's
        assert module.settings.root == cfg.state_dir / "netroot"  # its files stay in its state dir
        bridge = f"vft{uuid.uuid4().hex[:8]}"
        module.driver.apply(CreateBridge(bridge))
        assert bridge in {b.name for b in module.facts().bridges}
        real = subprocess.run(
            ["ip", "-br", "link", "show", "dev", bridge], capture_output=True, text=True, check=False
        )
        assert real.returncode != 0, f"bridge {bridge} appeared on the real host: {real.stdout}"
    finally:
        conn.close()
