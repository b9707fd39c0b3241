"""A private RabbitMQ cluster on loopback for chaos tests: plain ``rabbitmq-server`` processes.

Each node has its own name (``vfhaN<random>@localhost``), AMQP and distribution ports (free
ones picked at start, never 5672/25672), data, log and configuration files under one temporary
directory, no plugins, and a private ``HOME`` holding the cluster's Erlang cookie. epmd is shared
with the machine's broker (it only maps node names to ports). Nodes 2..N join node 1
(``rabbitmqctl join_cluster``). :meth:`RabbitCluster.close` kills every node and removes the
directory, whatever happened before; the machine's own broker is never touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vfsupport import free_port

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
#: A cold node start is ~6 s on an idle 2-core machine (/work/shared/host-facts.md); three at
#: once on a loaded one take far longer.
START_TIMEOUT_S = 120.0


@dataclass
class Node:
    """One RabbitMQ node of the cluster."""

    name: str
    amqp_port: int
    dist_port: int
    base: Path
    env: dict[str, str]
    popen: subprocess.Popen[bytes] | None = None

    def url(self, vhost: str = "%2F") -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/{vhost}"

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log(self, tail: int = 40) -> str:
        path = self.base / "log" / "node.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-tail:])


@dataclass
class RabbitCluster:
    """``size`` nodes, started by :meth:`start`, every one killed by :meth:`close`."""

    size: int = 3
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="vf-rabbitcluster-")))
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        home = self.root / "home"
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex.upper())
        cookie.chmod(0o400)
        empty = self.root / "empty.conf"
        empty.write_text("")
        for i in range(1, self.size + 1):
            base = self.root / f"node{i}"
            (base / "log").mkdir(parents=True)
            amqp_port, dist_port = free_port(), free_port()
            (base / "rabbitmq.conf").write_text(
                f"listeners.tcp.default = 127.0.0.1:{amqp_port}\n"
                # A lost node is noticed by its peers within seconds, not a minute.
                "net_ticktime = 10\n"
            )
            (base / "enabled_plugins").write_text("[].\n")
            name = f"vfha{i}{tag}@localhost"
            env = {
                "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                "HOME": str(home),
                "RABBITMQ_NODENAME": name,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(amqp_port),
                "RABBITMQ_DIST_PORT": str(dist_port),
                "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
                "RABBITMQ_LOG_BASE": str(base / "log"),
                "RABBITMQ_LOGS": str(base / "log" / "node.log"),
                "RABBITMQ_PID_FILE": str(base / "node.pid"),
                "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
                "RABBITMQ_CONF_ENV_FILE": str(empty),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
                "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            }
            self.nodes.append(Node(name, amqp_port, dist_port, base, env))

    # -- control --------------------------------------------------------------------------
    def ctl(self, node: Node, *args: str, timeout: float = 60) -> str:
        """``rabbitmqctl -n NODE ARGS`` with the cluster's cookie; its stdout."""
        done = subprocess.run(
            [CTL, "-n", node.name, *args],
            env=node.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"rabbitmqctl -n {node.name} {' '.join(args)}: {done.stderr}{done.stdout}")
        return done.stdout

    def _launch(self, node: Node) -> None:
        out = (node.base / "log" / "stdout.log").open("ab")
        node.popen = subprocess.Popen(
            [SERVER],
            env=node.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=node.base,  # where a crashing node writes its MnesiaCore dump: not the checkout
        )
        out.close()

    def _await(self, node: Node) -> None:
        # ``wait PIDFILE``, not ``await_startup``: the latter gives up at once on a node that has
        # not registered with epmd yet.
        try:
            self.ctl(
                node,
                "wait",
                str(node.base / "node.pid"),
                "--timeout",
                str(int(START_TIMEOUT_S)),
                timeout=START_TIMEOUT_S + 10,
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{node.log()}") from None

    def start(self) -> None:
        """Start every node and join nodes 2..N to node 1."""
        for node in self.nodes:
            self._launch(node)
        for node in self.nodes:
            self._await(node)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
        running = self.ctl(first, "cluster_status", "--formatter", "json")
        for node in self.nodes:
            assert node.name in running, running

    def urls(self, vhost: str = "%2F") -> str:
        """Every node's URL, comma-separated (what the fleet is given)."""
        return ",".join(node.url(vhost) for node in self.nodes)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def leader(self, queue: str, *, via: Node | None = None) -> Node:
        """The node that leads quorum queue ``queue`` (of vhost ``/``)."""
        asker = via or next(n for n in self.nodes if n.alive())
        out = self.ctl(asker, "-q", "list_queues", "--no-table-headers", "name", "leader")
        for line in out.splitlines():
            name, _, leader = line.partition("\t")
            if name == queue:
                return self.node(leader.strip())
        raise AssertionError(f"no queue {queue} in {out!r}")

    def kill(self, node: Node) -> None:
        """kill -9 the node (its whole process group: the Erlang VM and its helpers)."""
        if node.popen is not None and node.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.popen.pid, signal.SIGKILL)
            node.popen.wait(30)

    def close(self) -> None:
        """Kill every node, then remove the directory."""
        for node in self.nodes:
            self.kill(node)
        # Erlang's helper processes (erl_child_setup, inet_gethost) may outlive the VM by a moment.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(n.alive() for n in self.nodes):
            time.sleep(0.2)
        if not os.environ.get("VF_KEEP_CLUSTER"):
            shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def rabbit_cluster(size: int = 3) -> Iterator[RabbitCluster]:
    """A started cluster of ``size`` nodes; every node killed and its data removed afterwards."""
    cluster = RabbitCluster(size)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
