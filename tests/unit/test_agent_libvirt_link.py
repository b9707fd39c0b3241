"""The libvirt link (agent.drivers.libvirt_link) against scripted connections: a lost connection is
refused with HypervisorUnavailable, reopened with backoff, and the driver's domain event
callbacks are registered again on the new connection; the reporter sends a degraded report while
libvirt is away and a full one after.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import libvirt
import pytest

from agent.drivers import libvirt_driver as drv
from agent.drivers.fake import FakeHypervisor
from agent.drivers.libvirt_link import LibvirtLink, LiveConnection, is_connection_error
from agent.reporter import Reporter
from common.codec import from_wire, to_wire
from common.errors import HypervisorError, HypervisorUnavailable
from common.messages.host import HOST_REPORT, HostReport

WAIT = 10.0  # generous bound for what normally holds within milliseconds


class ScriptedError(libvirt.libvirtError):  # type: ignore[misc]
    def __init__(self, code: int, domain: int, message: str) -> None:
        Exception.__init__(self, message)
        self.err = (code, domain, message, 2, None, None, None, 0, 0)


class Dom:
    def __init__(self, uuid: str) -> None:
        self.uuid = uuid

    def UUIDString(self) -> str:
        return self.uuid


class Conn:
    """What the link and the driver's event code use of a libvirt connection."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.alive = True
        self.closed = False
        self.on_close: Callable[[Any, int, object], None] | None = None
        self.keepalive: tuple[int, int] | None = None
        self.events: dict[int, Callable[..., None]] = {}
        self._ids = iter(range(1, 1000))

    def registerCloseCallback(self, cb: Callable[[Any, int, object], None], _opaque: object) -> int:
        self.on_close = cb
        return 0

    def unregisterCloseCallback(self) -> int:
        self.on_close = None
        return 0

    def setKeepAlive(self, interval: int, count: int) -> int:
        self.keepalive = (interval, count)
        return 0

    def isAlive(self) -> int:
        return 1 if self.alive else 0

    def close(self) -> int:
        self.closed = True
        return 0

    def domainEventRegisterAny(
        self, _dom: object, event: int, cb: Callable[..., None], _opaque: object
    ) -> int:
        if not self.alive:
            raise ScriptedError(libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, "Cannot write data")
        assert event == libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE
        callback_id = next(self._ids)
        self.events[callback_id] = cb
        return callback_id

    def domainEventDeregisterAny(self, callback_id: int) -> int:
        del self.events[callback_id]
        return 0

    def getVersion(self) -> int:
        if not self.alive:
            raise ScriptedError(
                libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_RPC, "client socket is closed"
            )
        return 9000000

    def die(self, reason: int = libvirt.VIR_CONNECT_CLOSE_REASON_EOF) -> None:
        """libvirtd went away: calls fail, and the close callback fires (from the event loop)."""
        self.alive = False
        if self.on_close is not None:
            self.on_close(self, reason, None)


class Opener:
    """libvirt.open: fails while ``down``, else a new Conn each time."""

    def __init__(self) -> None:
        self.conns: list[Conn] = []
        self.down = False
        self.attempts = 0
        self.lock = threading.Lock()

    def __call__(self, uri: str) -> Conn:
        with self.lock:
            self.attempts += 1
            if self.down:
                raise ScriptedError(
                    libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, "Failed to connect socket"
                )
            conn = Conn(f"c{len(self.conns)}")
            self.conns.append(conn)
            return conn


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    done = threading.Event()
    deadline = threading.Timer(WAIT, done.set)
    deadline.start()
    try:
        while not predicate():
            if done.wait(0.01):
                raise AssertionError(f"timed out waiting for {what}")
    finally:
        deadline.cancel()


@pytest.fixture
def opener() -> Opener:
    return Opener()


@pytest.fixture
def link(opener: Opener) -> Iterator[LibvirtLink]:
    lk = LibvirtLink(
        "qemu+unix:///system", opener=opener, check_interval=0.02, backoff_initial=0.01, backoff_cap=0.05
    )
    lk.open()
    yield lk
    lk.close()


@pytest.mark.parametrize(
    ("code", "domain", "lost"),
    [
        (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, True),  # Cannot recv data: Connection reset
        (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_RPC, True),  # client socket is closed
        (libvirt.VIR_ERR_RPC, libvirt.VIR_FROM_REMOTE, True),
        (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_FROM_NONE, True),
        (libvirt.VIR_ERR_INVALID_CONN, libvirt.VIR_FROM_NONE, True),
        (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_QEMU, False),  # QEMU refused: a plain error
        (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_STORAGE, False),
        (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_RPC, False),
    ],
)
def test_connection_errors_are_translated_once_into_the_retryable_hypervisor_unavailable(
    code: int, domain: int, lost: bool
) -> None:
    assert is_connection_error(code, domain) is lost
    err = drv.translate_error(ScriptedError(code, domain, "boom"), "cannot start VM x")
    assert isinstance(err, HypervisorUnavailable) is lost
    if lost:
        assert err.retryable and isinstance(err, HypervisorError)
        assert err.details["code"] == code


def test_a_closed_connection_is_refused_at_once_then_reopened_with_backoff(
    link: LibvirtLink, opener: Opener
) -> None:
    heard: list[str | None] = []
    link.watch(heard.append)
    first = opener.conns[0]
    assert link.current() is first
    assert first.keepalive == (5, 3), "keepalive catches a libvirtd that hangs instead of closing"

    opener.down = True
    first.die()
    with pytest.raises(HypervisorUnavailable) as refused:
        link.current()
    assert refused.value.retryable
    assert "libvirtd closed the connection" in refused.value.message
    assert link.reason == "libvirtd closed the connection"
    wait_for(lambda: opener.attempts >= 4, "several reconnect attempts while libvirtd is down")
    assert heard == ["libvirtd closed the connection"]

    opener.down = False
    wait_for(lambda: link.reason is None, "the reconnect")
    assert link.current() is opener.conns[1]
    assert heard == ["libvirtd closed the connection", None]
    assert link.reconnects == 1
    assert first.closed and first.on_close is None


def test_a_dead_connection_without_a_close_callback_is_noticed_by_the_liveness_check(
    link: LibvirtLink, opener: Opener
) -> None:
    first = opener.conns[0]
    first.on_close = None  # the callback never fires: only isAlive() tells
    first.alive = False
    wait_for(lambda: link.reconnects == 1, "the reconnect")
    assert link.current() is opener.conns[1]


def test_the_modules_live_connection_follows_the_link(link: LibvirtLink, opener: Opener) -> None:
    live: Any = LiveConnection(link)
    assert live.getVersion() == 9000000
    opener.down = True
    opener.conns[0].die()
    with pytest.raises(HypervisorUnavailable):
        live.getVersion()
    opener.down = False
    wait_for(lambda: link.reason is None, "the reconnect")
    assert live.getVersion() == 9000000


def test_lifecycle_callbacks_are_registered_again_on_the_new_connection(
    link: LibvirtLink, opener: Opener
) -> None:
    hv = drv.LibvirtHypervisor(link, "default", simulated=True)
    changed: list[str] = []
    order: list[str] = []
    unwatch = hv.watch_lifecycle(changed.append)
    assert unwatch is not None
    hv.watch_connection(lambda reason: order.append(f"listener:{reason}"))
    first = opener.conns[0]
    assert len(first.events) == 1

    first.die()
    wait_for(lambda: link.reconnects == 1 and len(opener.conns) == 2, "the reconnect")
    wait_for(lambda: "listener:None" in order, "the connection listener")
    second = opener.conns[1]
    assert len(second.events) == 1, "the lifecycle callback was registered on the new connection"
    (callback,) = second.events.values()
    callback(second, Dom("u-1"), 0, 0, None)
    assert changed == ["u-1"]

    unwatch()
    assert second.events == {}


# ------------------------------------------------------------------------------ the reporter


class Sink:
    def __init__(self) -> None:
        self.reports: list[HostReport] = []

    def send(self, op: Any, body: Any, *, sent_at: float, ttl_s: float) -> None:
        if op is HOST_REPORT:  # through the wire format, as the controller would see it
            self.reports.append(from_wire(HostReport, to_wire(body)))


def test_the_reporter_sends_a_degraded_report_while_libvirt_is_lost_and_a_full_one_after() -> None:
    hv = FakeHypervisor("h")
    hv.define(
        "<domain type='qemu'><name>v1</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64'>hvm</type></os></domain>"
    )
    sink = Sink()
    reporter = Reporter(
        "h", "qemu:///system", hv, sink, report_interval=300, heartbeat_interval=300, agent_version="t"
    )
    hv.watch_connection(reporter.hypervisor_changed)
    reporter.step()
    full = sink.reports[-1]
    assert full.hypervisor_error is None and len(full.vms) == 1

    hv.lose_libvirt("libvirtd stopped answering keepalives")
    reporter.step()
    degraded = sink.reports[-1]
    assert degraded.hypervisor_error is not None
    assert "libvirtd stopped answering keepalives" in degraded.hypervisor_error
    assert degraded.vms == ()
    assert degraded.seq > full.seq and degraded.cpu == full.cpu

    hv.restore_libvirt()
    reporter.step()
    back = sink.reports[-1]
    assert back.hypervisor_error is None and len(back.vms) == 1 and back.seq > degraded.seq
