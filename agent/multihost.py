"""Many hosts in one agent process (``virtfleet-agent --simulate N`` / ``--host ID=URI``).

Each host keeps what makes it a host to the controller: its own command queue, journal, reports
and heartbeats, and libvirt connection (a :class:`~agent.host_runtime.HostRuntime` each). What
a process per host would duplicate is shared: one broker connection consumes every host's queue
(:meth:`~common.transport.port.Transport.multi_consumer`, a worker pool for all hosts), and one
thread sends every host's reports and heartbeats (:class:`~agent.report_scheduler.ReportScheduler`,
staggered over the heartbeat interval). So a thousand simulated hosts cost a few threads and
connections instead of thousands.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from agent.config import AgentConfig
from agent.host_runtime import AgentModule, HostRuntime
from agent.ports import Hypervisor, Images
from agent.report_scheduler import ReportScheduler
from common.transport.factory import open_transport
from common.transport.port import Transport

log = logging.getLogger("agent")

#: Unacknowledged commands per host, as a single-host agent's prefetch.
PREFETCH = 4
#: Commands handled at once by the whole process: simulated hosts are cheap to drive, and more
#: threads would only cost memory on a machine whose CPUs are the limit.
WORKERS = 16
#: Seconds start() waits for the consumer before the first reports go out.
READY_WAIT = 60.0


@dataclass(frozen=True, slots=True)
class HostParts:
    """What the agent needs to serve one host: its configuration, hypervisor driver and modules."""

    cfg: AgentConfig
    hypervisor: Hypervisor
    modules: Sequence[AgentModule] = ()


class MultiHostAgent:
    """The running agent of several hosts: a runtime each, one consumer, one reporting thread.

    ``transport``: the fleet's broker (opened from the first host's ``amqp_url`` when not given;
    all hosts share it); ``images``: the qemu-img port (QemuImg when not given).
    """

    def __init__(
        self,
        hosts: Sequence[HostParts],
        *,
        transport: Transport | None = None,
        images: Images | None = None,
        workers: int = WORKERS,
    ) -> None:
        if not hosts:
            raise ValueError("a multi-host agent needs at least one host")
        first, last = hosts[0].cfg.host_id, hosts[-1].cfg.host_id
        self.name = f"agent-{first}" if len(hosts) == 1 else f"agent-{first}..{last}"
        self.transport = transport or open_transport(
            hosts[0].cfg.amqp_url, name=self.name, max_message_bytes=hosts[0].cfg.max_message_bytes
        )
        self.runtimes = [
            HostRuntime(
                h.cfg,
                h.hypervisor,
                self.transport,
                alive=self._consumer_healthy,
                modules=h.modules,
                images=images,
            )
            for h in hosts
        ]
        self.server = self.transport.multi_consumer(
            [r.route() for r in self.runtimes], name=self.name, prefetch=PREFETCH, workers=workers
        )
        self.scheduler = ReportScheduler(
            [r.reporter for r in self.runtimes],
            spread=min(h.cfg.heartbeat_interval for h in hosts),
            name=self.name,
        )

    def _consumer_healthy(self) -> bool:
        return self.server.healthy()

    def runtime(self, host_id: str) -> HostRuntime:
        """The runtime of ``host_id`` (KeyError when this agent does not serve it)."""
        for runtime in self.runtimes:
            if runtime.host_id == host_id:
                return runtime
        raise KeyError(host_id)

    def start(self) -> None:
        self.server.start()
        # Heartbeats only go out while the consumer is healthy: start the schedule once all the
        # queues are consumed (declaring a thousand takes seconds), or anyway after a while.
        if not self.server.ready.wait(READY_WAIT):
            log.warning("agent %s: queues not consumed after %.0fs; reporting anyway", self.name, READY_WAIT)
        self.scheduler.start()
        log.info(
            "agent %s started: %d hosts, broker consumer %s", self.name, len(self.runtimes), self.server.name
        )

    def stop(self, timeout: float = 60.0) -> None:
        """Stop consuming, finish and acknowledge in-flight commands, send every host's last
        report, close."""
        log.info("agent %s stopping", self.name)
        self.server.stop(timeout)
        self.scheduler.stop(final_report=True, timeout=timeout)
        for runtime in self.runtimes:
            runtime.close()
        self.transport.close()
        log.info("agent %s stopped", self.name)


__all__ = ["PREFETCH", "WORKERS", "HostParts", "MultiHostAgent"]
