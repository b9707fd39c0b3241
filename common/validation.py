"""Validation of names and sizes shared by the CLI, the controller and the agent."""

from __future__ import annotations

import re

from common.errors import InvalidRequest

VM_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
HOST_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Linux IFNAMSIZ is 16 including the NUL; '/' and whitespace break sysfs paths and tools.
IFNAME_RE = re.compile(r"[^/\s:\x00]{1,15}")
MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def check_name(value: str, what: str = "name") -> str:
    """Return ``value`` if it is a valid VM-style name, else raise InvalidRequest."""
    if not VM_NAME_RE.fullmatch(value):
        raise InvalidRequest(
            f"invalid {what} {value!r}: use 1-64 characters from A-Z a-z 0-9 _ . -, starting with a letter or digit"
        )
    return value


def check_host_id(value: str) -> str:
    """Return ``value`` if it is a valid host id."""
    return check_name(value, "host id")


def check_ifname(value: str) -> str:
    """Return ``value`` if it is a valid Linux interface name (at most 15 bytes, no '/', ':' or spaces)."""
    if not IFNAME_RE.fullmatch(value) or len(value.encode()) > 15 or value in {".", ".."}:
        raise InvalidRequest(f"invalid interface name {value!r}: 1-15 bytes, no '/', ':' or whitespace")
    return value


def check_positive(value: int, what: str) -> int:
    """Return ``value`` if it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidRequest(f"{what} must be a positive integer, got {value!r}")
    return value


def check_mac(value: str) -> str:
    """Return the lower-cased MAC if it is a valid unicast colon-separated address."""
    mac = value.lower()
    if not MAC_RE.fullmatch(mac):
        raise InvalidRequest(f"invalid MAC address {value!r}: expected six hex pairs like 52:54:00:12:34:56")
    if int(mac[:2], 16) & 1:
        raise InvalidRequest(f"invalid MAC address {value!r}: multicast bit set")
    return mac
