"""The real agent wiring (consumer, dispatcher, journal, reporter) against the real RabbitMQ.

The module runs in a private vhost (``vhost_url`` from tests/conftest.py, deleted afterwards, so
dead letters do not pile up in the shared ``virtfleet.dead``), and each test uses a unique host
id, so its queue and routing keys are its own; the agent queue is deleted after each test. The
hypervisor is libvirt's test driver with the small node file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid as uuid_mod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pika
import pytest
from builders import vm_spec
from vfsupport import wait_until

from agent.config import AgentConfig
from agent.drivers import host_facts
from agent.drivers.libvirt_driver import LibvirtHypervisor, open_connection
from agent.main import Agent
from common.codec import from_wire
from common.errors import NotFound
from common.messages.envelope import decode_envelope
from common.messages.host import (
    HOST_REPORT,
    HOST_REPORT_NOW,
    HOST_VM_CHANGES,
    HostReport,
    ReportRequest,
    VmChanges,
)
from common.messages.vm import (
    VM_CREATE,
    VM_START,
    CreateVm,
    PowerState,
    VmAction,
    VmRef,
)
from common.transport.amqp import AmqpTransport
from common.transport.rpc import request, unwrap
from common.transport.topology import (
    COMMANDS_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    REPORTS_EXCHANGE,
    agent_queue,
    declare,
    declare_exchange,
    report_routing_key,
)
from controller.agent_api import AgentClient

pytestmark = pytest.mark.broker

NODE = Path(__file__).resolve().parents[1] / "fixtures" / "nodes" / "small.xml"
URI = f"test://{NODE}"
WAIT = 30.0  # upper bound for things that normally take milliseconds
REPO = Path(__file__).resolve().parents[2]


class CountingHypervisor(LibvirtHypervisor):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.defines = 0

    def define(self, xml: str) -> str:
        self.defines += 1
        return super().define(xml)


class Tap:
    """A private queue bound to an exchange, read with basic_get until a condition holds."""

    def __init__(self, url: str, exchange: str, routing_key: str, declare: Callable[[Any], object]) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(url))
        self.ch = self.conn.channel()
        declare(self.ch)
        self.queue = self.ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
        self.ch.queue_bind(self.queue, exchange, routing_key)

    def wait_for(self, match: Callable[[bytes], bool]) -> bytes:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            _method, _props, body = self.ch.basic_get(self.queue, auto_ack=True)
            if body is None:
                self.conn.sleep(0.05)
            elif match(body):
                return bytes(body)
        raise AssertionError(f"no matching message on {self.queue} within {WAIT} s")

    def close(self) -> None:
        if self.conn.is_open:
            self.conn.close()


def report_of(body: bytes) -> HostReport | None:
    env = decode_envelope(body)
    return from_wire(HOST_REPORT.body, env.body) if env.kind == HOST_REPORT.kind else None


def report_matching(tap: Tap, pred: Callable[[HostReport], bool]) -> HostReport:
    body = tap.wait_for(lambda b: (r := report_of(b)) is not None and pred(r))
    report = report_of(body)
    assert report is not None
    return report


def delta_matching(tap: Tap, pred: Callable[[VmChanges], bool]) -> VmChanges:
    """The first ``host.vm_changes`` on ``tap`` that satisfies ``pred``."""

    def delta_of(body: bytes) -> VmChanges | None:
        env = decode_envelope(body)
        return from_wire(HOST_VM_CHANGES.body, env.body) if env.kind == HOST_VM_CHANGES.kind else None

    delta = delta_of(tap.wait_for(lambda b: (d := delta_of(b)) is not None and pred(d)))
    assert delta is not None
    return delta


def delete_queue(url: str, name: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        conn.channel().queue_delete(name)
    finally:
        conn.close()


@pytest.fixture
def host_id(vhost_url: str) -> Iterator[str]:
    host = f"test-agent-{uuid_mod.uuid4().hex[:12]}"
    yield host
    delete_queue(vhost_url, agent_queue(host).name)


@pytest.fixture
def reports(vhost_url: str, host_id: str) -> Iterator[Tap]:
    tap = Tap(
        vhost_url,
        REPORTS_EXCHANGE.name,
        report_routing_key(HOST_REPORT.kind, host_id),
        lambda ch: declare_exchange(ch, REPORTS_EXCHANGE),
    )
    yield tap
    tap.close()


@pytest.fixture
def deltas(vhost_url: str, host_id: str) -> Iterator[Tap]:
    tap = Tap(
        vhost_url,
        REPORTS_EXCHANGE.name,
        report_routing_key(HOST_VM_CHANGES.kind, host_id),
        lambda ch: declare_exchange(ch, REPORTS_EXCHANGE),
    )
    yield tap
    tap.close()


@pytest.fixture
def agent(vhost_url: str, host_id: str, reports: Tap, tmp_path: Path) -> Iterator[Agent]:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = open_connection(URI)
    hv = CountingHypervisor(
        conn, "default", pool_capacity_bytes=host_facts.read_node_file_pool_capacity(URI, "default")
    )
    cfg = AgentConfig(
        host_id=host_id,
        libvirt_uri=URI,
        amqp_url=vhost_url,
        state_dir=tmp_path / "state",
        report_interval=300,
        trust_broker_logins=False,  # the test publishes as guest: development mode
        heartbeat_interval=1,
    )
    running = Agent(cfg, hv)
    running.start()
    assert running.server.ready.wait(WAIT), "the agent never started consuming"
    yield running
    running.stop()
    conn.close()


def test_create_report_and_redelivery(
    agent: Agent, transport: AmqpTransport, reports: Tap, deltas: Tap, host_id: str
) -> None:
    hv = agent.handlers._hv
    assert isinstance(hv, CountingHypervisor)
    first_report = report_matching(reports, lambda r: True)
    assert first_report.host_id == host_id
    assert first_report.cpu.cpus == 8
    assert first_report.storage is not None and first_report.storage.capacity_gib == 200

    spec = vm_spec()
    # Built by hand rather than through AgentClient, so that the very same envelope can be sent twice.
    env = request(VM_CREATE, CreateVm(spec=spec), "test", timeout=120)
    reply = transport.call(COMMANDS_EXCHANGE.name, host_id, env, timeout=WAIT)
    result = unwrap(reply, VM_CREATE)
    assert result.status is not None and result.status.state is PowerState.RUNNING
    assert result.disks[0].path == "/var/lib/virtfleet/images/web1-vda.qcow2"

    # No full report after a command any more, and no delta saying again what the reply said (the
    # reporter re-read the domain after the define and start, and left it out)...
    wait_until(lambda: agent.reporter.deltas_skipped >= 1, WAIT, "the create's delta left out")
    # ... but the host's facts in the next full report.
    agent.reporter.request_report()
    shown = report_matching(reports, lambda r: any(v.uuid == spec.uuid for v in r.vms))
    (vm,) = shown.vms
    assert (vm.name, vm.state, vm.managed) == ("web1", PowerState.RUNNING, True)
    assert shown.memory_free_mib == 16384 - 1024

    again = transport.call(COMMANDS_EXCHANGE.name, host_id, env, timeout=WAIT)  # same id: a redelivery
    assert again == reply  # the journal's copy, down to the reply's own id and timestamp
    assert hv.defines == 1
    assert agent.journal.kind_of(env.id) == VM_CREATE.kind

    # A change no command made (virsh destroy) comes in a delta of that VM: the first one naming it.
    hv.destroy(spec.uuid)
    delta = delta_matching(deltas, lambda d: any(v.uuid == spec.uuid for v in d.vms))
    assert [v.state for v in delta.vms if v.uuid == spec.uuid] == [PowerState.SHUTOFF]
    assert delta.host_id == host_id and delta.seq > shown.seq


def test_garbage_is_dead_lettered_and_the_agent_carries_on(
    vhost_url: str, agent: Agent, client: AgentClient, host_id: str
) -> None:
    dead = Tap(vhost_url, DEAD_LETTER_EXCHANGE.name, "", lambda ch: declare(ch, DEAD_LETTER_QUEUE))
    try:
        marker = uuid_mod.uuid4().hex.encode()
        dead.ch.basic_publish("", agent_queue(host_id).name, b"\xc1 not msgpack " + marker)
        body = dead.wait_for(lambda b: marker in b)
        assert body.startswith(b"\xc1")
    finally:
        dead.close()

    assert client.call(host_id, HOST_REPORT_NOW, ReportRequest(reason="after garbage")).seq >= 1


def test_report_now_and_errors_over_the_wire(
    agent: Agent, client: AgentClient, reports: Tap, host_id: str
) -> None:
    report_matching(reports, lambda r: r.seq == 1)
    ack = client.call(host_id, HOST_REPORT_NOW, ReportRequest())
    report_matching(reports, lambda r: r.seq >= ack.seq)

    ghost = VmAction(VmRef(uuid=str(uuid_mod.uuid4()), name="ghost"))
    with pytest.raises(NotFound):
        client.call(host_id, VM_START, ghost)


def test_the_agent_process_stops_cleanly_on_sigterm(
    vhost_url: str, host_id: str, reports: Tap, client: AgentClient, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTFLEET_")}
    env["VIRTFLEET_AGENT_HOST_ID"] = host_id  # the host id from the environment, the rest from flags
    env["VIRTFLEET_TRUST_BROKER_LOGINS"] = "false"  # the test commands it as guest: development mode
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent.main",
            "--libvirt-uri",
            URI,
            "--amqp-url",
            vhost_url,
            "--state-dir",
            str(tmp_path / "state"),
            "--heartbeat-interval",
            "1",
            "--report-interval",
            "3600",  # no periodic report: every report below was asked for
        ],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        report_matching(reports, lambda r: r.seq == 1)
        created = client.call(host_id, VM_CREATE, CreateVm(spec=vm_spec("proc1")))
        assert created.status is not None
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    last = report_matching(reports, lambda r: r.seq > 1)  # the report sent on the way out
    assert [v.name for v in last.vms] == ["proc1"]
    assert "received SIGTERM" in err
    assert (tmp_path / "state" / "journal.db").exists()
