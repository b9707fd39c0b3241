"""Run a program inside a network namespace the tests created (no shell, no ``ip netns exec``).

    python tests/nsexec.py --netns NAME [--private-mounts SPEC.json] -- PROGRAM ARGS...

``--netns`` joins ``/run/netns/NAME`` (setns) and execs the program. ``--private-mounts``
additionally gives the program a private mount namespace, remounts /sys for the new network
namespace (as ``ip netns exec`` does), re-creates the cgroup v1 mounts that hides (libvirtd
needs them; host-facts.md §6) and bind-mounts the directories listed in the JSON file
(``[[host_dir, mount_point], ...]``) so a second libvirtd keeps its state apart from the host's.
Nothing here changes the host's own mounts: everything happens in the child's namespaces.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import sys
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
CGROUP_V1 = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags), data and data.encode()
        ),
        f"mount {fstype} {source} on {target}",
    )


def join_netns(name: str) -> None:
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), f"setns {name}")
    finally:
        os.close(fd)


def private_mounts(spec: list[list[str]]) -> None:
    """Inside the new mount namespace (already in the target network namespace)."""
    mount("sysfs", "/sys", "sysfs")
    mount("tmpfs", "/sys/fs/cgroup", "tmpfs")
    for ctl in CGROUP_V1:
        path = f"/sys/fs/cgroup/{ctl}"
        Path(path).mkdir(exist_ok=True)
        try:
            mount("cgroup", path, "cgroup", 0, ctl)
        except OSError as exc:  # a controller this kernel lacks: libvirt copes
            print(f"nsexec: {exc}", file=sys.stderr)
    for source, target in spec:
        Path(target).mkdir(parents=True, exist_ok=True)
        mount(source, target, "none", MS_BIND)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--netns", required=True)
    parser.add_argument("--private-mounts", type=Path)
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        parser.error("no program given")
    # Mount namespace first: /sys is remounted *after* joining the network namespace so
    # that it shows that namespace's devices.
    if args.private_mounts is not None:
        _check(_libc.unshare(CLONE_NEWNS), "unshare mount namespace")
        mount("none", "/", "none", MS_REC | MS_PRIVATE)
    join_netns(args.netns)
    if args.private_mounts is not None:
        private_mounts(json.loads(args.private_mounts.read_text()))
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
