"""What the netlab guest (tests/realnet) sends back: its pytest run, read on the host.

The session fixture ``netlab_run`` (tests/realnet/conftest.py) boots the guest and builds a
:class:`NetlabRun`; tests/realnet/test_net_realnet.py asserts on it. Both import this module by
name, like the other support modules beside it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class GuestCase:
    name: str
    outcome: str  # passed | failed | skipped | error
    message: str = ""


@dataclass
class NetlabRun:
    """What came back from the guest."""

    rc: int | None
    boot_s: float
    console: str
    pytest_log: str
    cases: dict[str, GuestCase] = field(default_factory=dict)

    def explain(self) -> str:
        return (
            f"guest rc={self.rc} after {self.boot_s:.1f}s\n--- guest pytest output ---\n{self.pytest_log[-6000:]}"
            f"\n--- guest console (tail) ---\n{self.console[-3000:]}"
        )


def parse_junit(path: Path) -> dict[str, GuestCase]:
    """The guest's test cases by name, from its junit.xml (none if it wrote none)."""
    cases: dict[str, GuestCase] = {}
    if not path.exists():
        return cases
    for tc in ET.parse(path).getroot().iter("testcase"):
        name = tc.get("name", "")
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (el.get("message") or "") + "\n" + (el.text or "")
                break
        cases[name] = GuestCase(name, outcome, message)
    return cases
