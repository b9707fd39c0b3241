"""Persistence across reboot: the host's network configuration files, rendered by pure code.

Three backends, chosen by detection on the host (or forced by configuration):

=========== ===================================================== ==========================
backend     files                                                  detected when
=========== ===================================================== ==========================
keyfile     /etc/NetworkManager/system-connections/virtfleet-*.nmconnection   /run/NetworkManager exists (NetworkManager runs)
ifcfg       /etc/sysconfig/network-scripts/ifcfg-<name> (as in the ops notes) /etc/sysconfig/network-scripts exists (RHEL family)
networkd    /etc/systemd/network/10-virtfleet-<name>.netdev/.network          /etc/systemd/network exists
none        nothing is written (the result says so)                            none of the above
=========== ===================================================== ==========================

:func:`configs_from_facts` describes the touched interfaces as they are after a change (pure);
``render_*`` turn one :class:`IfaceConfig` into file contents (pure, golden-file tested);
:class:`Persister` writes and deletes the files atomically under a root directory.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.errors import NetworkConfigError
from common.messages.network import BOND_MODES, HostNetworkReport

BACKENDS = ("ifcfg", "networkd", "keyfile", "none")


@dataclass(frozen=True, slots=True)
class IfaceConfig:
    """The persistent configuration of one interface."""

    name: str
    kind: str = "ethernet"  # ethernet | bridge | bond
    master: str | None = None
    master_kind: str | None = None  # bridge | bond
    addresses: tuple[str, ...] = ()
    gateway: str | None = None
    gateway6: str | None = None
    dns: tuple[str, ...] = ()
    stp: bool = False
    bond_mode: str = "active-backup"
    miimon: int = 100
    primary: str | None = None  # bond: its primary slave
    primary_slave: bool = False  # bond slave: it is its bond's primary


def configs_from_facts(
    facts: HostNetworkReport, names: Iterable[str], dns: tuple[str, ...] = ()
) -> list[IfaceConfig]:
    """Configurations of ``names`` as the host has them now (unknown names are skipped).

    ``dns`` (resolv.conf's servers) goes with the interface that carries the default route.
    """
    out: list[IfaceConfig] = []
    kinds = {i.name: i.kind for i in facts.interfaces}
    for name in dict.fromkeys(names):
        iface = facts.interface(name)
        if iface is None:
            continue
        kind = iface.kind if iface.kind in ("bridge", "bond") else "ethernet"
        gw4 = next(
            (r.gateway for r in facts.routes if r.dst == "default" and r.dev == name and r.family == "inet"),
            None,
        )
        gw6 = next(
            (r.gateway for r in facts.routes if r.dst == "default" and r.dev == name and r.family == "inet6"),
            None,
        )
        bridge = facts.bridge(name)
        bond = facts.bond(name)
        master_bond = facts.bond(iface.master) if iface.master else None
        out.append(
            IfaceConfig(
                name=name,
                kind=kind,
                master=iface.master,
                master_kind=kinds.get(iface.master) if iface.master else None,
                addresses=iface.addresses if iface.master is None else (),
                gateway=gw4,
                gateway6=gw6,
                dns=dns if (gw4 or gw6) else (),
                stp=bridge.stp if bridge is not None else False,
                bond_mode=bond.mode if bond is not None else "active-backup",
                miimon=bond.miimon if bond is not None else 100,
                primary=bond.primary if bond is not None else None,
                primary_slave=master_bond is not None and master_bond.primary == name,
            )
        )
    return out


def _v4(addresses: Iterable[str]) -> list[ipaddress.IPv4Interface]:
    return [a for a in map(ipaddress.ip_interface, addresses) if isinstance(a, ipaddress.IPv4Interface)]


def _v6(addresses: Iterable[str]) -> list[ipaddress.IPv6Interface]:
    return [a for a in map(ipaddress.ip_interface, addresses) if isinstance(a, ipaddress.IPv6Interface)]


# ------------------------------------------------------------------------------- ifcfg (RHEL)


def render_ifcfg(cfg: IfaceConfig) -> dict[str, str]:
    """``ifcfg-<name>`` as in the ops notes (network service, NM_CONTROLLED=no)."""
    lines = ["# written by virtfleet", f"DEVICE={cfg.name}", f"NAME={cfg.name}"]
    lines.append({"bridge": "TYPE=Bridge", "bond": "TYPE=Bond"}.get(cfg.kind, "TYPE=Ethernet"))
    if cfg.kind == "bond":
        lines.append("BONDING_MASTER=yes")
        opts = f"mode={BOND_MODES[cfg.bond_mode]} miimon={cfg.miimon}"
        if cfg.primary:
            opts += f" primary={cfg.primary}"
        lines.append(f'BONDING_OPTS="{opts}"')
    lines += ["BOOTPROTO=none", "ONBOOT=yes", "NM_CONTROLLED=no", "USERCTL=no"]
    if cfg.kind == "bridge":
        lines.append(f"STP={'yes' if cfg.stp else 'no'}")
    if cfg.master_kind == "bridge":
        lines.append(f"BRIDGE={cfg.master}")
    elif cfg.master_kind == "bond":
        lines += [f"MASTER={cfg.master}", "SLAVE=yes"]
    for i, a in enumerate(_v4(cfg.addresses)):
        suffix = "" if i == 0 else str(i)
        lines += [f"IPADDR{suffix}={a.ip}", f"PREFIX{suffix}={a.network.prefixlen}"]
    if cfg.gateway:
        lines.append(f"GATEWAY={cfg.gateway}")
    v6 = _v6(cfg.addresses)
    if v6 or cfg.gateway6:
        lines.append("IPV6INIT=yes")
    if v6:
        lines.append(f"IPV6ADDR={v6[0]}")
    if len(v6) > 1:
        lines.append(f'IPV6ADDR_SECONDARIES="{" ".join(map(str, v6[1:]))}"')
    if cfg.gateway6:
        lines.append(f"IPV6_DEFAULTGW={cfg.gateway6}")
    lines += [f"DNS{i}={d}" for i, d in enumerate(cfg.dns, 1)]
    return {f"ifcfg-{cfg.name}": "\n".join(lines) + "\n"}


def ifcfg_files(name: str) -> tuple[str, ...]:
    return (f"ifcfg-{name}",)


# -------------------------------------------------------------------------- systemd-networkd


def render_networkd(cfg: IfaceConfig) -> dict[str, str]:
    files: dict[str, str] = {}
    stem = f"10-virtfleet-{cfg.name}"
    if cfg.kind == "bridge":
        files[f"{stem}.netdev"] = (
            f"# written by virtfleet\n[NetDev]\nName={cfg.name}\nKind=bridge\n\n"
            f"[Bridge]\nSTP={'yes' if cfg.stp else 'no'}\n"
        )
    elif cfg.kind == "bond":
        bond = f"[Bond]\nMode={cfg.bond_mode}\nMIIMonitorSec={cfg.miimon}ms\n"
        files[f"{stem}.netdev"] = f"# written by virtfleet\n[NetDev]\nName={cfg.name}\nKind=bond\n\n{bond}"
    network = ["# written by virtfleet", "[Match]", f"Name={cfg.name}", "", "[Network]"]
    if cfg.master_kind == "bridge":
        network.append(f"Bridge={cfg.master}")
    elif cfg.master_kind == "bond":
        network.append(f"Bond={cfg.master}")
        if cfg.primary_slave:
            network.append("PrimarySlave=yes")
    network += [f"Address={a}" for a in cfg.addresses]
    if cfg.gateway:
        network.append(f"Gateway={cfg.gateway}")
    if cfg.gateway6:
        network.append(f"Gateway={cfg.gateway6}")
    network += [f"DNS={d}" for d in cfg.dns]
    if not cfg.addresses and cfg.master is None:
        network.append("LinkLocalAddressing=no")
    files[f"{stem}.network"] = "\n".join(network) + "\n"
    return files


def networkd_files(name: str) -> tuple[str, ...]:
    return (f"10-virtfleet-{name}.netdev", f"10-virtfleet-{name}.network")


# ------------------------------------------------------------------- NetworkManager keyfiles


def render_keyfile(cfg: IfaceConfig) -> dict[str, str]:
    conn_type = {"bridge": "bridge", "bond": "bond"}.get(cfg.kind, "ethernet")
    out = [
        "# written by virtfleet",
        "[connection]",
        f"id=virtfleet-{cfg.name}",
        f"type={conn_type}",
        f"interface-name={cfg.name}",
        "autoconnect=true",
    ]
    if cfg.master is not None and cfg.master_kind in ("bridge", "bond"):
        out += [f"master={cfg.master}", f"slave-type={cfg.master_kind}"]
    if cfg.kind == "bridge":
        out += ["", "[bridge]", f"stp={'true' if cfg.stp else 'false'}"]
    elif cfg.kind == "bond":
        out += ["", "[bond]", f"mode={cfg.bond_mode}", f"miimon={cfg.miimon}"]
        if cfg.primary:
            out.append(f"primary={cfg.primary}")
    if cfg.master is None:
        v4, v6 = _v4(cfg.addresses), _v6(cfg.addresses)
        dns4 = [d for d in cfg.dns if ":" not in d]
        dns6 = [d for d in cfg.dns if ":" in d]
        out += _keyfile_ip("ipv4", "manual" if v4 else "disabled", v4, cfg.gateway, dns4)
        out += _keyfile_ip("ipv6", "manual" if v6 else "ignore", v6, cfg.gateway6, dns6)
    return {f"virtfleet-{cfg.name}.nmconnection": "\n".join(out) + "\n"}


def _keyfile_ip(
    section: str, method: str, addresses: Sequence[object], gateway: str | None, dns: Sequence[str]
) -> list[str]:
    """A keyfile's ``[ipv4]`` or ``[ipv6]`` section."""
    out = ["", f"[{section}]", f"method={method}"]
    out += [f"address{i}={a}" for i, a in enumerate(addresses, 1)]
    if gateway:
        out.append(f"gateway={gateway}")
    if dns:
        out.append("dns=" + "".join(f"{d};" for d in dns))
    return out


def keyfile_files(name: str) -> tuple[str, ...]:
    return (f"virtfleet-{name}.nmconnection",)


# --------------------------------------------------------------------------------- backends


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    directory: str  # relative to the root
    render: Callable[[IfaceConfig], dict[str, str]]
    files_for: Callable[[str], tuple[str, ...]]
    mode: int = 0o644


BACKEND_TABLE: Mapping[str, Backend] = {
    "ifcfg": Backend("ifcfg", "etc/sysconfig/network-scripts", render_ifcfg, ifcfg_files),
    "networkd": Backend("networkd", "etc/systemd/network", render_networkd, networkd_files),
    "keyfile": Backend(
        "keyfile", "etc/NetworkManager/system-connections", render_keyfile, keyfile_files, 0o600
    ),
}


def detect(root: Path) -> str:
    """Which network configuration system the host under ``root`` uses (see the module doc)."""
    if (root / "run/NetworkManager").is_dir():
        return "keyfile"
    if (root / "etc/sysconfig/network-scripts").is_dir():
        return "ifcfg"
    if (root / "etc/systemd/network").is_dir():
        return "networkd"
    return "none"


def render_all(backend: str, configs: Iterable[IfaceConfig]) -> dict[str, str]:
    """Relative path -> content for every config (pure)."""
    if backend == "none":
        return {}
    b = BACKEND_TABLE[backend]
    files: dict[str, str] = {}
    for cfg in configs:
        for name, content in b.render(cfg).items():
            files[f"{b.directory}/{name}"] = content
    return files


SYSCTL_FILE = "etc/sysctl.d/90-virtfleet-ip-forward.conf"


def render_ip_forward(enabled: bool) -> str:
    return f"# written by virtfleet\nnet.ipv4.ip_forward = {1 if enabled else 0}\n"


class Persister:
    """Writes rendered files under ``root`` (``/`` on a real host)."""

    def __init__(self, root: Path, backend: str = "auto") -> None:
        if backend not in ("auto", *BACKENDS):
            raise ValueError(f"unknown persistence backend {backend!r}")
        self.root = root
        self._setting = backend

    @property
    def backend(self) -> str:
        return detect(self.root) if self._setting == "auto" else self._setting

    def apply(self, configs: Iterable[IfaceConfig], removed: Iterable[str]) -> list[str]:
        """Write the configs, delete the files of removed interfaces; the paths touched."""
        backend = self.backend
        if backend == "none":
            return []
        b = BACKEND_TABLE[backend]
        done: list[str] = []
        configs = list(configs)
        written = render_all(backend, configs)
        kept = {c.name for c in configs}
        for name in removed:
            if name in kept:
                continue
            for fname in b.files_for(name):
                path = self.root / b.directory / fname
                if path.exists():
                    self._remove(path)
                    done.append(f"-{path}")
        for cfg in configs:
            # a bridge that became a plain interface (or the reverse) leaves no stale .netdev behind
            for fname in b.files_for(cfg.name):
                path = self.root / b.directory / fname
                rel = f"{b.directory}/{fname}"
                if rel not in written and path.exists():
                    self._remove(path)
                    done.append(f"-{path}")
        for rel, content in written.items():
            path = self.root / rel
            self.write(path, content, b.mode)
            done.append(str(path))
        return done

    def write_ip_forward(self, enabled: bool) -> str:
        path = self.root / SYSCTL_FILE
        self.write(path, render_ip_forward(enabled), 0o644)
        return str(path)

    @staticmethod
    def write(path: Path, content: str, mode: int) -> None:
        tmp = path.with_name(f".{path.name}.virtfleet-tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(content, encoding="utf-8")
            tmp.chmod(mode)
            tmp.replace(path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise NetworkConfigError(f"cannot write {path}: {exc.strerror or exc}") from None

    @staticmethod
    def _remove(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise NetworkConfigError(f"cannot remove {path}: {exc.strerror or exc}") from None
