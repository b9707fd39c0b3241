"""One simulated hypervisor host, in-process: everything the agent takes, wired with the fakes.

:func:`build_fake_host` gives a :class:`FakeHost`: a :class:`~agent.drivers.fake.FakeHypervisor`,
:class:`~agent.drivers.fake.FakeImages` on its files, the real
:class:`~agent.tuning.module.TuningModule` over :class:`~agent.tuning.fake.FakePinning` and a
simulated kernel tree, and the real :class:`~agent.network.module.NetworkModule` over the fakes of
:mod:`agent.network.fake`. Everything it writes is under the state directory it is given (journal,
simulated /sys and /proc, resolv.conf, network configuration files, pending network changes), so
the real machine is never touched, and nothing needs root, libvirtd or QEMU.

It fits ``agent.main``: ``Agent(host.config, host.hypervisor, modules=host.modules, ...)`` is what
:meth:`FakeHost.agent` builds; :meth:`FakeHost.table` is the dispatcher table without a broker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.config import AgentConfig
from agent.drivers.fake import FakeHypervisor, FakeImages
from agent.handlers import AgentHandlers
from agent.host_runtime import AgentModule
from agent.main import Agent
from agent.network.fake import FakeLinkDriver, FakeNetworks, FakeProbe
from agent.network.module import NetworkModule, simulated_settings
from agent.storage_pools import StoragePool
from agent.tuning import cpusets
from agent.tuning.fake import FakePinning
from agent.tuning.module import TuningModule
from agent.tuning.sysfs import HostKernel, seed_simulated_root
from common.messages.descriptor import Side
from common.transport.port import Transport
from common.transport.rpc import HandlerTable


@dataclass
class FakeHost:
    """Everything the agent needs for one simulated host (see :func:`build_fake_host`)."""

    config: AgentConfig
    hypervisor: FakeHypervisor
    images: FakeImages
    links: FakeLinkDriver
    networks: FakeNetworks
    probe: FakeProbe
    pinning: FakePinning
    tuning: TuningModule
    network: NetworkModule

    @property
    def modules(self) -> tuple[AgentModule, ...]:
        """What ``agent.main.build_modules`` gives a real host, in the same order."""
        return (self.tuning, self.network)

    def handlers(self, request_report: Callable[[], int]) -> AgentHandlers:
        """The VM handlers over the fake hypervisor and the fake qemu-img."""
        return AgentHandlers(self.hypervisor, request_report, self.images)

    def table(self, request_report: Callable[[], int]) -> HandlerTable:
        """The agent's handler table for a :class:`~common.transport.rpc.Dispatcher`, built as ``Agent``
        builds it."""
        table = HandlerTable(Side.AGENT)
        self.handlers(request_report).register(table)
        for module in self.modules:
            module.register(table, request_report)
        return table

    def agent(self, transport: Transport) -> Agent:
        """``agent.main.Agent`` over this host on ``transport`` (journal in the state dir); its consumer
        connects when it is started."""
        return Agent(
            self.config, self.hypervisor, transport=transport, modules=self.modules, images=self.images
        )

    def close(self) -> None:
        """Stop the network module's confirm timer, if a change is waiting for confirmation."""
        self.network.close()


#: The simulated host's directory of operator images (ISOs, base images): a storage pool.
SIMULATED_IMAGES_POOL = StoragePool("images", "/srv/images")


def build_fake_host(
    state_dir: Path,
    *,
    host_id: str = "fake1",
    cpus: int = 8,
    memory_mib: int = 16384,
    disk_gib: int = 200,
    networks: Iterable[str] = ("default",),
    bridges: Iterable[str] = ("br0",),
    nics: Sequence[str] = ("eth0", "eth1"),
    hw_virt: bool = True,
    cells: int = 1,
    threads: int = 1,
    node_xml: Path | None = None,
    dedicated_cpus: str | None = None,
    shared_cpus: str | None = None,
    reserved_cpus: str | None = None,
    bonding: bool = True,
    host_address: str = "192.0.2.10/24",
    gateway: str = "192.0.2.1",
    broker_ip: str = "198.51.100.1",
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F",
    pools: Sequence[StoragePool] = (SIMULATED_IMAGES_POOL,),
) -> FakeHost:
    """One simulated host; nothing outside ``state_dir`` is touched.

    The hypervisor is built from the simple parameters, or from ``node_xml`` (a libvirt test-driver
    node file such as ``tests/fixtures/nodes/small.xml``; then it reports hypervisor type TEST, and
    the controller gives its VMs domain type test). The links are ``nics`` (the first with
    ``host_address`` and a default route via ``gateway``) and ``bridges`` (the first with the second
    NIC as its port); the probe reaches the broker while a usable route to ``broker_ip`` exists, so a
    change that cuts the host off is rolled back as on a real host. The CPU sets are the agent
    configuration's (``dedicated_cpus`` ...), checked against the host's CPUs. ``pools`` are the
    storage pools of its configuration besides the hypervisor's default pool (by default the
    simulated operator's images directory ``/srv/images``).
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    bridge_list = tuple(bridges)
    ports = {bridge_list[0]: tuple(nics[1:2])} if bridge_list and len(nics) > 1 else {}
    links = FakeLinkDriver.simple(
        nics=nics, bridges=bridge_list, ports=ports, address=host_address, gateway=gateway, bonding=bonding
    )
    if node_xml is not None:
        hv = FakeHypervisor.from_node_xml(
            node_xml, host=host_id, hw_virt=hw_virt, bridge_source=links.bridge_names
        )
        for name in hv.node_facts().bridges:
            links.ensure_bridge(name)
        links.applied.clear()
    else:
        hv = FakeHypervisor(
            host_id,
            cpus=cpus,
            memory_mib=memory_mib,
            disk_gib=disk_gib,
            networks=networks,
            hw_virt=hw_virt,
            cells=cells,
            threads=threads,
            bridge_source=links.bridge_names,
        )
    config = AgentConfig(
        host_id=host_id,
        libvirt_uri=f"fake:///{host_id}",
        amqp_url=amqp_url,
        state_dir=state_dir,
        storage_pool=hv.default_pool,
        images_dir=state_dir / "images",
        dedicated_cpus=dedicated_cpus,
        shared_cpus=shared_cpus,
        reserved_cpus=reserved_cpus,
        pools=tuple(pools),
    )

    cpu = hv.cpu
    root = state_dir / "simulated-host"
    seed_simulated_root(
        root,
        cpus=cpu.cpus,
        cells=cpu.numa_cells,
        sockets=max(1, cpu.sockets // cpu.numa_cells),
        cores=cpu.cores,
        threads=cpu.threads,
        memory_mib=hv.memory_mib,
    )
    kernel = HostKernel(root, emulate=True)
    sets = cpusets.resolve(kernel.online_cpus(), dedicated_cpus, shared_cpus, reserved_cpus)
    pinning = FakePinning(hv)
    tuning = TuningModule(pinning, kernel, sets, simulated=True)

    probe = FakeProbe(reachable=lambda: links.reaches(broker_ip))
    nets = FakeNetworks(hv)
    network = NetworkModule(
        links,
        nets,
        probe,
        settings=simulated_settings(state_dir, gateway),
        state_dir=state_dir,
    )
    return FakeHost(config, hv, hv.images(), links, nets, probe, pinning, tuning, network)
