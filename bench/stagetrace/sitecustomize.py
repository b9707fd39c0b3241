"""Stage timestamps of every create, for ``bench/fleet.py --trace FILE`` (bench/stage_report.py reads them).

Loaded by Python's ``site`` at the start of each process the fleet bench spawns (this directory is
put on their ``PYTHONPATH`` only with ``--trace``): when ``VF_TRACE_FILE`` is set, it wraps the
methods named in :data:`STAGES` so that each call appends ``<unix time> <pid> <label>.start`` and
``.end`` lines to that file. A wall-clock view of one create's path across the controller and the
agent, which a CPU profile cannot give: where a create waits, not only where a process computes.
It costs each wrapped call a few microseconds, so traced runs are slower than untraced ones:
compare stages within one traced run, never a traced figure with an untraced one.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

#: (module, class, methods): what is timed. ``ConsumerServer`` labels carry the consumer's name.
STAGES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("common.transport.amqp", "ConsumerServer", ("_on_message", "_outcome")),
    ("common.transport.amqp", "FinishQueue", ("_run",)),
    (
        "controller.service",
        "ControllerService",
        ("create_vm", "_claim_batch", "_claim_transaction", "_record_builds"),
    ),
    ("controller.fleet_state", "FleetState", ("place_batch",)),
    ("agent.handlers", "AgentHandlers", ("create", "_create_and_define", "_resolve_disks")),
    ("agent.host_files", "FormatBook", ("record",)),
    (
        "agent.drivers.libvirt_driver",
        "LibvirtHypervisor",
        ("define", "start", "status", "find", "set_owned_volumes"),
    ),
    ("sqlalchemy.engine.base", "Connection", ("execute", "_commit_impl")),
)


class _Trace:
    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def mark(self, label: str) -> None:
        line = f"{time.time():.6f} {self._pid} {label}\n"
        with self._lock:
            self._out.write(line)

    def wrap(self, cls: type, method: str) -> None:
        original: Callable[..., Any] = getattr(cls, method)
        base = f"{cls.__name__}.{method}"
        trace = self

        @functools.wraps(original)
        def timed(this: Any, *args: Any, **kwargs: Any) -> Any:
            name = getattr(this, "name", None)
            label = f"{base}[{name}]" if isinstance(name, str) else base
            trace.mark(label + ".start")
            try:
                return original(this, *args, **kwargs)
            finally:
                trace.mark(label + ".end")

        setattr(cls, method, timed)


def _install(path: str) -> None:
    trace = _Trace(open(path, "a", buffering=1, encoding="utf-8"))  # noqa: SIM115 - open for the process's life
    for module_name, class_name, methods in STAGES:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue  # not in this process's tree (the bench client has no agent, say)
        for method in methods:
            trace.wrap(cls, method)


if _path := os.environ.get("VF_TRACE_FILE"):
    _install(_path)
