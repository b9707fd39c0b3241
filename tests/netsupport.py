"""Test support for host networking: network namespaces the tests create, veth pairs standing in
for NICs, a peer namespace playing the gateway, a TCP relay that lets a namespace reach the
broker on the host's loopback, and a private libvirtd inside a namespace.

Nothing here touches the host's own network: every link lives in a namespace a :class:`Lab`
created, and :meth:`Lab.close` (called even when a test fails) kills every process left in those
namespaces and deletes them, which deletes their links too.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import NetNS, netns

NSEXEC = Path(__file__).resolve().parent / "nsexec.py"
BROKER = ("127.0.0.1", 5672)
#: The gateway's address where :meth:`Lab.host_behind_gateway` relays to the broker.
RELAY_IP = "10.200.0.1"


def require_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("VIRTFLEET_REQUIRE_QEMU") == "1":
            pytest.fail("network namespace tests need root")
        pytest.skip("host networking in network namespaces not tested: creating namespaces needs root")


class Lab:
    """Namespaces, links and processes of one test (module); all removed by :meth:`close`."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.namespaces: list[str] = []
        self._handles: dict[str, Any] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.relays: list[TcpRelay] = []

    # -- namespaces and links -----------------------------------------------------------
    def netns(self, role: str) -> str:
        name = f"vf{role}-{self.tag}"
        netns.create(name)
        self.namespaces.append(name)
        ip = self.ns(name)
        ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")
        return name

    def ns(self, name: str) -> Any:
        if name not in self._handles:
            self._handles[name] = NetNS(name)
        return self._handles[name]

    def index(self, ns: str, dev: str) -> int:
        found = self.ns(ns).link_lookup(ifname=dev)
        assert found, f"no {dev} in {ns}"
        return int(found[0])

    def veth(self, ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
        """A veth pair: ``name_a`` in ``ns_a`` (the host's 'NIC'), ``name_b`` in ``ns_b``; both up."""
        self.ns(ns_a).link("add", ifname=name_a, kind="veth", peer={"ifname": name_b, "net_ns_fd": ns_b})
        self.up(ns_a, name_a)
        self.up(ns_b, name_b)

    def up(self, ns: str, dev: str) -> None:
        self.ns(ns).link("set", index=self.index(ns, dev), state="up")

    def addr(self, ns: str, dev: str, cidr: str) -> None:
        ip, prefix = cidr.split("/")
        self.ns(ns).addr("add", index=self.index(ns, dev), address=ip, prefixlen=int(prefix))

    def default_route(self, ns: str, gateway: str, dev: str) -> None:
        self.ns(ns).route("add", dst="0.0.0.0/0", gateway=gateway, oif=self.index(ns, dev))

    def host_behind_gateway(self, host_role: str, gateway_role: str) -> tuple[str, str]:
        """A host namespace with two veth NICs, eth0 (10.201.0.2/24, default route via 10.201.0.1)
        and eth1 (10.202.0.2/24), whose peers (10.201.0.1, 10.202.0.1) sit in a gateway namespace.
        The gateway also holds :data:`RELAY_IP`, where a relay to the real broker listens: the host
        reaches the broker there only through its default route. Returns (host, gateway)."""
        h, g = self.netns(host_role), self.netns(gateway_role)
        for i in (0, 1):
            self.veth(h, f"eth{i}", g, f"g{i}")
            self.addr(h, f"eth{i}", f"10.20{i + 1}.0.2/24")
            self.addr(g, f"g{i}", f"10.20{i + 1}.0.1/24")
        self.addr(g, "lo", f"{RELAY_IP}/32")
        self.default_route(h, "10.201.0.1", "eth0")
        self.relays.append(TcpRelay(g, (RELAY_IP, BROKER[1])))
        return h, g

    # -- processes ----------------------------------------------------------------------
    def argv(self, ns: str, argv: list[str]) -> list[str]:
        return [sys.executable, str(NSEXEC), "--netns", ns, "--", *argv]

    def run(self, ns: str, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(ns, argv), capture_output=True, text=True, timeout=timeout, check=False
        )

    def ping(self, ns: str, ip: str, count: int = 1) -> bool:
        done = self.run(ns, ["ping", "-n", "-q", "-c", str(count), "-W", "2", ip])
        return done.returncode == 0

    def spawn(
        self, ns: str, argv: list[str], log: Path, env: dict[str, str] | None = None, **kw: Any
    ) -> subprocess.Popen[bytes]:
        handle = log.open("wb")
        proc = subprocess.Popen(self.argv(ns, argv), stdout=handle, stderr=subprocess.STDOUT, env=env, **kw)
        handle.close()
        self.procs.append(proc)
        return proc

    # -- cleanup ------------------------------------------------------------------------
    def close(self) -> None:
        for relay in self.relays:
            relay.close()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # Whatever still runs in our namespaces was started by us (dnsmasq, a stray child).
        pids = netns.ns_pids()
        for name in self.namespaces:
            for pid in pids.get(name, []):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for handle in self._handles.values():
            with contextlib.suppress(Exception):
                handle.close()
        self._handles.clear()
        for name in self.namespaces:
            with contextlib.suppress(OSError):
                netns.remove(name)
        self.namespaces.clear()


@contextlib.contextmanager
def lab() -> Iterator[Lab]:
    require_root()
    the_lab = Lab()
    try:
        yield the_lab
    finally:
        the_lab.close()


class TcpRelay:
    """Listens on ``listen`` *inside* a namespace and forwards each connection to ``target`` on
    the host's loopback (RabbitMQ only listens there). Reaching the listener from another
    namespace then depends on that namespace's routes, which is what the rollback test breaks."""

    def __init__(self, ns: str, listen: tuple[str, int], target: tuple[str, int] = BROKER) -> None:
        self.target = target
        self.server = netns.create_socket(ns, socket.AF_INET, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(listen)
        self.server.listen(64)
        self.server.settimeout(0.2)
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, name="tcp-relay", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        a.setblocking(False)
        b.setblocking(False)
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(0.2):
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = src.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        return
                    if not data:
                        return
                    key.data.setblocking(True)
                    key.data.sendall(data)
                    key.data.setblocking(False)
        except OSError:
            return
        finally:
            sel.close()
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.server.close()
        with self._lock:
            for s in self._conns:
                with contextlib.suppress(OSError):
                    s.close()
        self.thread.join(5)


def tcp_reachable(ns: str, addr: tuple[str, int], timeout: float = 1.0) -> bool:
    """Can a socket made in ``ns`` connect to ``addr``? (a probe for in-process tests)"""
    sock = netns.create_socket(ns, socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(addr)
        return True
    except OSError:
        return False
    finally:
        sock.close()


class PrivateLibvirtd:
    """A second libvirtd, run inside a test namespace with a private mount namespace: its own
    sockets, config, state, cache and log dirs (bind-mounted over /run/libvirt, /etc/libvirt/qemu,
    /var/lib/libvirt, ...), so it never meets the host's libvirtd. NAT networks, dnsmasq and
    iptables rules it creates stay in the namespace. Connect with :attr:`uri`."""

    DIRS = {
        "run": "/run/libvirt",
        "lib": "/var/lib/libvirt",
        "cache": "/var/cache/libvirt",
        "log": "/var/log/libvirt",
        "etc-qemu": "/etc/libvirt/qemu",
        "etc-storage": "/etc/libvirt/storage",
        "etc-secrets": "/etc/libvirt/secrets",
    }

    def __init__(self, the_lab: Lab, ns: str, tmp: Path) -> None:
        self.lab = the_lab
        self.ns = ns
        self.tmp = tmp
        self.uri = f"qemu:///system?socket={tmp / 'run' / 'libvirt-sock'}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90) -> None:
        import libvirt  # noqa: PLC0415 - only this helper needs it

        if not Path("/usr/sbin/libvirtd").exists():
            pytest.skip(
                "libvirt networks inside a namespace not tested: /usr/sbin/libvirtd is not installed (deploy/install.sh)"
            )
        for sub in self.DIRS:
            (self.tmp / sub).mkdir(parents=True, exist_ok=True)
        (self.tmp / "etc-qemu" / "networks" / "autostart").mkdir(parents=True, exist_ok=True)
        caps = Path("/var/cache/libvirt/qemu")
        if caps.is_dir():  # QEMU's capability cache: saves a 10 s probe on first start
            shutil.copytree(caps, self.tmp / "cache" / "qemu", dirs_exist_ok=True)
        conf = self.tmp / "libvirtd.conf"
        conf.write_text(
            'unix_sock_dir = "/run/libvirt"\nauth_unix_ro = "none"\nauth_unix_rw = "none"\n'
            'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
        )
        mounts = self.tmp / "mounts.json"
        mounts.write_text(json.dumps([[str(self.tmp / k), v] for k, v in self.DIRS.items()]))
        argv = [
            sys.executable,
            str(NSEXEC),
            "--netns",
            self.ns,
            "--private-mounts",
            str(mounts),
            "--",
            "/usr/sbin/libvirtd",
            "--config",
            str(conf),
            "--pid-file",
            str(self.tmp / "libvirtd.pid"),
        ]
        handle = (self.tmp / "libvirtd.out").open("wb")
        self.proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT)
        handle.close()
        self.lab.procs.append(self.proc)
        libvirt.registerErrorHandler(lambda _c, _e: None, None)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"private libvirtd exited {self.proc.returncode}:\n{self.log()}")
            try:
                libvirt.open(self.uri).close()
                return
            except libvirt.libvirtError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"private libvirtd did not answer in {timeout}s:\n{self.log()}"
                    ) from None
                time.sleep(0.1)

    def log(self) -> str:
        parts = []
        for name in ("libvirtd.out", "log/libvirtd.log"):
            path = self.tmp / name
            if path.exists():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop active networks (their dnsmasq), then the daemon."""
        import libvirt  # noqa: PLC0415

        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(libvirt.libvirtError):
            conn = libvirt.open(self.uri)
            for net in conn.listAllNetworks(0):
                with contextlib.suppress(libvirt.libvirtError):
                    if net.isActive():
                        net.destroy()
            conn.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def processes_in(ns: str) -> list[str]:
    """Command names of the processes running in a namespace."""
    names = []
    for pid in netns.ns_pids().get(ns, []):
        with contextlib.suppress(OSError):
            names.append(Path(f"/proc/{pid}/comm").read_text().strip())
    return names


__all__ = ["RELAY_IP", "Lab", "PrivateLibvirtd", "TcpRelay", "errno", "lab", "processes_in", "tcp_reachable"]
