"""Host and VM networking on the agent (issue 5).

* :mod:`~agent.network.planner` (pure): request + facts -> ordered idempotent steps, and the way
  back to a snapshot;
* :mod:`~agent.network.netlink`: facts and steps over pyroute2 (the only pyroute2 importer);
* :mod:`~agent.network.libvirt_net`: libvirt networks (pure XML + a thin driver);
* :mod:`~agent.network.transaction`: snapshot, apply, broker probe, automatic rollback, confirm;
* :mod:`~agent.network.probe`: the real broker probe (an AMQP round trip);
* :mod:`~agent.network.persist`: ifcfg / systemd-networkd / NetworkManager files (pure renderers);
* :mod:`~agent.network.resolv`: resolv.conf nameservers;
* :mod:`~agent.network.module`: the AgentModule (handlers + report facts) and its wiring.
"""
