"""The command tree's top level: its groups, and the root group that builds each one on demand.

``virtfleet --help`` only lists the groups, so it must not pay for their commands: importing the
``cmd_*`` modules loads the message types (and typer inspects every command's signature), which
is most of a cold start. The root group therefore lists the groups declared here and builds the
one a command line reaches, and only then (docs/performance.md, "CLI start-up").

The command modules register on the group objects declared here; :func:`load_commands` names
them all, in the order their commands are listed.
"""

from __future__ import annotations

import threading
from typing import Any

import typer
import typer.core
import typer.main
from typer._click import Command, Context, HelpFormatter
from typer._click.utils import make_default_short_help


def _group(help_text: str) -> typer.Typer:
    # No rich help: typer's rich formatter imports rich.markdown and costs more than all of
    # virtfleet's --help otherwise (docs/performance.md, "CLI start-up"); click's plain help shows
    # the same options, defaults, env vars and commands.
    return typer.Typer(help=help_text, no_args_is_help=True, rich_markup_mode=None)


host_app = _group("Hypervisor hosts.")
vm_app = _group("Virtual machines.")
net_app = _group("libvirt virtual networks on hosts (virsh net-*), IPv4 forwarding.")
hostgroup_app = _group("Host groups: shared overcommit defaults for a set of hosts.")
group_app = _group("Server groups: affinity and anti-affinity of VMs.")
image_app = _group("Disk images on a host (qemu-img).")
audit_app = _group("The audit log: who changed what, and what was refused (admins).")

#: The top-level groups by name, in the order ``virtfleet --help`` lists them.
GROUPS: dict[str, typer.Typer] = {
    "host": host_app,
    "vm": vm_app,
    "net": net_app,
    "hostgroup": hostgroup_app,
    "group": group_app,
    "image": image_app,
    "audit": audit_app,
}


def load_commands() -> None:
    """Register every command on the groups above (importing a command module registers its
    commands; importing it again does nothing)."""
    # Imported here, not at the top: this is the import ``virtfleet --help`` avoids.
    from controller.cli import (  # noqa: F401, PLC0415
        cmd_audit,
        cmd_core,
        cmd_network,
        cmd_placement,
        cmd_tuning,
        cmd_vmops,
    )


def _help_of(group: typer.Typer) -> str:
    text = group.info.help
    return text if isinstance(text, str) else ""


class LazyRoot(typer.core.TyperGroup):
    """The ``virtfleet`` group: lists :data:`GROUPS` from their declarations and builds a group's
    click commands the first time a command line reaches it (then keeps them: in-process tests
    run many commands in one process)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._built: dict[str, Command] = {}
        # In-process tests run CLI calls from several threads; one builds a group, the others wait.
        self._lock = threading.Lock()

    def list_commands(self, ctx: Context) -> list[str]:
        return list(GROUPS)

    def get_command(self, ctx: Context, cmd_name: str) -> Command | None:
        group = GROUPS.get(cmd_name)
        if group is None:
            return None
        with self._lock:
            built = self._built.get(cmd_name)
            if built is None:
                load_commands()
                built = typer.main.get_group(group)
                built.name = cmd_name
                self._built[cmd_name] = built
            return built

    def format_commands(self, ctx: Context, formatter: HelpFormatter) -> None:
        """The Commands section from the declarations alone (click's would build every group to
        read its help); same layout as click's."""
        limit = formatter.width - 6 - max(len(name) for name in GROUPS)
        rows = [(name, make_default_short_help(_help_of(group), limit)) for name, group in GROUPS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)
