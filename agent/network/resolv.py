"""resolv.conf: pure parsing/rendering of its nameserver lines, and a small file writer.

The ops notes set DNS with ``echo "nameserver 114.114.114.114" >> /etc/resolv.conf``. Here the
nameserver lines are replaced as a whole (appending would keep the old, maybe unreachable,
servers first) and every other line (search, options, comments) is kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

from common.errors import NetworkConfigError

HEADER = "# nameservers set by virtfleet"


def nameservers(text: str) -> tuple[str, ...]:
    """The ``nameserver`` entries of a resolv.conf, in order."""
    servers = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            servers.append(parts[1])
    return tuple(servers)


def with_nameservers(text: str, servers: Sequence[str]) -> str:
    """``text`` with its nameserver lines replaced by ``servers`` (placed where the first one was)."""
    out: list[str] = []
    placed = False
    for line in text.splitlines():
        parts = line.split()
        if line.strip() == HEADER:
            continue
        if parts[:1] == ["nameserver"]:
            if not placed:
                out += [HEADER, *(f"nameserver {s}" for s in servers)]
                placed = True
            continue
        out.append(line)
    if not placed:
        out += [HEADER, *(f"nameserver {s}" for s in servers)]
    return "\n".join(out) + "\n"


class ResolvConf:
    """The host's resolv.conf (a path, so tests and chroots can point elsewhere)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def managed_elsewhere(self) -> bool:
        """A symlink (systemd-resolved, resolvconf): not ours to rewrite at runtime."""
        return self.path.is_symlink()

    def read(self) -> str | None:
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise NetworkConfigError(f"cannot read {self.path}: {exc.strerror or exc}") from None

    def write(self, text: str) -> None:
        """Replace the file atomically (same directory, rename), keeping its mode."""
        tmp = self.path.with_name(f".{self.path.name}.virtfleet-tmp")
        try:
            mode = self.path.stat().st_mode & 0o7777 if self.path.exists() else 0o644
            tmp.write_text(text, encoding="utf-8")
            tmp.chmod(mode)
            tmp.replace(self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise NetworkConfigError(f"cannot write {self.path}: {exc.strerror or exc}") from None
