"""The agent's one libvirt connection, kept open across libvirtd restarts.

:class:`LibvirtLink` holds the live connection. It notices a lost one three ways: libvirt's
close callback (``registerCloseCallback``: EOF, error or keepalive timeout, delivered from the
event loop), libvirt's keepalive (``setKeepAlive``: a daemon that stops answering is declared
dead after ``interval * (count + 1)`` seconds) and :meth:`LibvirtLink.lost` from the driver when
a call failed with a connection error. A monitor thread then reopens the connection with
jittered exponential backoff (capped) until libvirtd answers again.

While the connection is away :meth:`LibvirtLink.current` raises
:class:`~common.errors.HypervisorUnavailable` at once (retryable): a command never waits for
the reconnect, so it can never outlive its own timeout because libvirtd is away. Listeners
(:meth:`LibvirtLink.watch`) hear ``reason`` when the connection is lost and ``None`` when it is
back, after the link has switched to the new connection: the driver re-registers its domain
event callbacks then (they belonged to the dead connection) and the reporter sends a full report
(events may have been missed meanwhile).

Running domains do not depend on this connection: QEMU keeps running while libvirtd restarts,
and the new libvirtd reattaches to it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import libvirt

from common.errors import HypervisorUnavailable
from common.transport.backoff import backoff_delays

log = logging.getLogger(__name__)

#: close-callback reasons (VIR_CONNECT_CLOSE_REASON_*), for the log and the host's reason
CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "connection error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "libvirtd closed the connection",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "libvirtd stopped answering keepalives",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by the agent",
}

#: libvirt error domains of the client-server channel: an error from them means the channel broke
_CHANNEL_DOMAINS = frozenset({libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE})
#: error codes that mean "no connection", whatever part of libvirt reported them
_NO_CONNECTION_CODES = frozenset({libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN})
#: error codes that mean a broken channel when they come from the RPC or remote domain
_CHANNEL_CODES = frozenset(
    {libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_ERR_RPC}
)


def is_connection_error(code: int | None, domain: int | None) -> bool:
    """True when a libvirt error (``code``, error ``domain``) says the connection to libvirtd is
    gone rather than that the call was refused ("Cannot recv data", "client socket is closed",
    "no connection driver available")."""
    if code in _NO_CONNECTION_CODES:
        return True
    return code in _CHANNEL_CODES and domain in _CHANNEL_DOMAINS


class LibvirtLink:
    """One libvirt connection to ``uri`` that reopens itself after it was lost.

    ``opener`` opens a raw connection (``libvirt.open``) and raises ``libvirt.libvirtError``;
    :meth:`open` makes the first connection (a failure there is the caller's, as before) and
    starts the monitor thread.
    """

    def __init__(
        self,
        uri: str,
        *,
        opener: Callable[[str], Any] = libvirt.open,
        keepalive_interval: int = 5,
        keepalive_count: int = 3,
        check_interval: float = 1.0,
        backoff_initial: float = 0.5,
        backoff_cap: float = 10.0,
    ) -> None:
        self.uri = uri
        self._opener = opener
        self._keepalive = (keepalive_interval, keepalive_count)
        self._check_interval = check_interval
        self._backoff = (backoff_initial, backoff_cap)
        self._lock = threading.Lock()
        self._conn: Any = None
        #: why the connection is away (None: it is up)
        self._reason: str | None = None
        self._listeners: list[Callable[[str | None], None]] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: how often the connection was reopened (diagnostics, tests)
        self.reconnects = 0

    # -- the connection ------------------------------------------------------------------------
    def open(self) -> Any:
        """Open the first connection and start watching it; returns the raw connection.
        ``libvirt.libvirtError`` when libvirtd cannot be reached at start."""
        conn = self._opener(self.uri)
        if conn is None:  # older bindings returned None instead of raising
            raise libvirt.libvirtError(f"cannot open libvirt connection {self.uri}")
        self._arm(conn)
        with self._lock:
            self._conn = conn
            self._reason = None
        self._thread = threading.Thread(target=self._run, name="libvirt-link", daemon=True)
        self._thread.start()
        return conn

    def current(self) -> Any:
        """The live connection; :class:`~common.errors.HypervisorUnavailable` while it is away."""
        with self._lock:
            conn, reason = self._conn, self._reason
        if reason is not None or conn is None:
            raise HypervisorUnavailable(
                f"libvirt unreachable ({reason or 'not connected'}); the agent is reconnecting",
                details={"uri": self.uri, "reason": reason or "not connected"},
            )
        return conn

    @property
    def reason(self) -> str | None:
        """Why libvirt is unreachable now (None when connected)."""
        with self._lock:
            return self._reason

    def watch(self, listener: Callable[[str | None], None]) -> Callable[[], None]:
        """Call ``listener(reason)`` when the connection is lost and ``listener(None)`` once it is
        back (from the link's thread or libvirt's event loop; it must not block). Returns the
        unsubscribe."""
        with self._lock:
            self._listeners.append(listener)

        def unwatch() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unwatch

    def lost(self, reason: str) -> None:
        """The connection is gone (a call failed with a connection error, or the close callback
        fired): refuse calls from now on and let the monitor reconnect. Idempotent."""
        with self._lock:
            if self._reason is not None or self._stop.is_set():
                return
            self._reason = reason
            listeners = tuple(self._listeners)
        log.warning("libvirt connection %s lost: %s; reconnecting", self.uri, reason)
        self._tell(listeners, reason)
        self._wake.set()

    def close(self) -> None:
        """Stop the monitor and close the connection (agent shutdown)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5.0)
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            self._disarm(conn)
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    # -- internals -----------------------------------------------------------------------------
    def _arm(self, conn: Any) -> None:
        """Close callback and keepalive on a fresh connection (drivers without them, such as the
        in-process test driver, cannot lose their connection anyway)."""

        def on_close(_conn: Any, reason: int, _opaque: object) -> None:
            try:
                self.lost(CLOSE_REASONS.get(reason, f"closed (reason {reason})"))
            except Exception:  # an exception must not reach libvirt's C event loop
                log.exception("libvirt close callback failed")

        with contextlib.suppress(libvirt.libvirtError):
            conn.registerCloseCallback(on_close, None)
        with contextlib.suppress(libvirt.libvirtError):
            conn.setKeepAlive(*self._keepalive)

    @staticmethod
    def _disarm(conn: Any) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()

    def _alive(self, conn: Any) -> bool:
        try:
            return bool(conn.isAlive())
        except libvirt.libvirtError:
            return False

    def _run(self) -> None:
        """Check the connection every ``check_interval`` (or when woken by :meth:`lost`); when
        it is gone, reopen it with backoff until it answers or the link is closed."""
        while not self._stop.is_set():
            self._wake.wait(self._check_interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._lock:
                conn, reason = self._conn, self._reason
            if reason is None:
                if conn is not None and not self._alive(conn):
                    self.lost("connection no longer alive")
                continue
            self._reconnect(conn)

    def _reconnect(self, old: Any) -> None:
        if old is not None:
            self._disarm(old)
            with contextlib.suppress(libvirt.libvirtError):
                old.close()
        attempt = 0
        initial, cap = self._backoff
        delays = backoff_delays(initial, cap)  # the transport's jittered backoff, shared
        while not self._stop.is_set():
            try:
                conn = self._opener(self.uri)
                if conn is None:
                    raise libvirt.libvirtError(f"cannot open libvirt connection {self.uri}")
            except libvirt.libvirtError as exc:
                delay = next(delays)
                log.info("libvirt %s still unreachable (%s); next try in %.1f s", self.uri, exc, delay)
                attempt += 1
                self._stop.wait(delay)
                continue
            self._arm(conn)
            with self._lock:
                self._conn = conn
                self._reason = None
                self.reconnects += 1
                listeners = tuple(self._listeners)
            log.warning("libvirt connection %s re-established after %d attempt(s)", self.uri, attempt + 1)
            self._tell(listeners, None)
            return

    @staticmethod
    def _tell(listeners: tuple[Callable[[str | None], None], ...], reason: str | None) -> None:
        for listener in listeners:
            try:
                listener(reason)
            except Exception:  # one listener's bug must not stop the reconnect or the others
                log.exception("libvirt connection listener failed")


class LiveConnection:
    """The link's connection of the moment, for code that keeps a connection object (the tuning
    and network modules): each attribute is looked up on :meth:`LibvirtLink.current`, so they
    use the new connection after a reconnect and get HypervisorUnavailable while it is away."""

    def __init__(self, link: LibvirtLink) -> None:
        self._link = link

    def __getattr__(self, name: str) -> Any:
        return getattr(self._link.current(), name)


__all__ = ["CLOSE_REASONS", "LibvirtLink", "LiveConnection", "is_connection_error"]
