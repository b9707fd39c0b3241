"""Where one create's wall time goes, stage by stage, from a ``bench/fleet.py --trace FILE`` run.

Reads the ``<unix time> <pid> <label>.start|end`` lines that bench/stagetrace/sitecustomize.py
appended, finds the controller (the process with ``ControllerService.create_vm``) and the agent
(``AgentHandlers.create``), and takes only the creates that ran alone (no other create started
between their start and end: the sequential samples of ``--phases small``). For each, the path
is cut at the stages below, in order; it prints the median and 90th percentile of each step and
of the whole, then the median duration of every timed method on those creates' path.

    .venv/bin/python bench/fleet.py --phases small --database postgres --trace /tmp/vf.trace
    .venv/bin/python bench/stage_report.py /tmp/vf.trace
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

CREATE = "ControllerService.create_vm"
HANDLER = "AgentHandlers.create"


@dataclass(frozen=True)
class Event:
    at: float
    label: str  # without its .start / .end
    start: bool


def read(path: Path) -> dict[int, list[Event]]:
    """The events of each process, in time order."""
    by_pid: dict[int, list[Event]] = defaultdict(list)
    for line in path.read_text(encoding="utf-8").splitlines():
        at, pid, tag = line.split(" ", 2)
        label, _, kind = tag.rpartition(".")
        by_pid[int(pid)].append(Event(float(at), label, kind == "start"))
    for events in by_pid.values():
        events.sort(key=lambda e: e.at)
    return by_pid


def _pid_with(by_pid: dict[int, list[Event]], label: str) -> int:
    return next(pid for pid, events in by_pid.items() if any(e.label == label for e in events))


def _first(events: Sequence[Event], after: float, match: Callable[[Event], bool]) -> float | None:
    return next((e.at for e in events if e.at >= after and match(e)), None)


def _last(events: Sequence[Event], before: float, match: Callable[[Event], bool]) -> float | None:
    found = None
    for e in events:
        if e.at > before:
            break
        if match(e):
            found = e.at
    return found


def _is(prefix: str, *, start: bool, having: str = "") -> Callable[[Event], bool]:
    return lambda e: e.start is start and e.label.startswith(prefix) and having in e.label


def stages(
    ctl: Sequence[Event], agent: Sequence[Event], begin: float, end: float
) -> list[tuple[str, float]] | None:
    """One create's path: (stage, time) in order; None when a stage is missing."""
    api = "-api]"  # the controller's API consumer (not -api-read)
    path: list[tuple[str, float | None]] = [
        ("API delivery", _last(ctl, begin, _is("ConsumerServer._on_message", start=True, having=api))),
        ("API worker picks it up", _last(ctl, begin, _is("ConsumerServer._outcome", start=True, having=api))),
        ("create_vm", begin),
        ("claim begins", _first(ctl, begin, _is("ControllerService._claim_batch", start=True))),
        ("claim done", _first(ctl, begin, _is("ControllerService._claim_batch", start=False))),
    ]
    claimed = path[-1][1]
    if claimed is None:
        return None
    handler_end = _first(agent, claimed, _is(HANDLER, start=False))
    path += [
        ("agent delivery", _first(agent, claimed, _is("ConsumerServer._on_message", start=True))),
        ("agent worker picks it up", _first(agent, claimed, _is("ConsumerServer._outcome", start=True))),
        ("handler begins", _first(agent, claimed, _is(HANDLER, start=True))),
        ("handler done", handler_end),
    ]
    if handler_end is None:
        return None
    replied = _first(agent, handler_end, _is("FinishQueue._run", start=False))
    path += [
        ("agent worker done", _first(agent, handler_end, _is("ConsumerServer._outcome", start=False))),
        ("agent reply and ack sent", replied),
        (
            "result transaction begins",
            _first(ctl, handler_end, _is("ControllerService._record_builds", start=True)),
        ),
        (
            "result transaction done",
            _first(ctl, handler_end, _is("ControllerService._record_builds", start=False)),
        ),
        ("create_vm returns", end),
        ("API reply and ack sent", _first(ctl, end, _is("FinishQueue._run", start=False))),
    ]
    if any(at is None for _, at in path):
        return None
    return [(name, at) for name, at in path if at is not None]


def durations(events: Sequence[Event], windows: Sequence[tuple[float, float]]) -> dict[str, list[float]]:
    """Milliseconds of every timed call that started inside one of ``windows``."""
    out: dict[str, list[float]] = defaultdict(list)
    opened: dict[str, list[float]] = defaultdict(list)
    w = 0
    for e in events:
        if e.start:
            opened[e.label].append(e.at)
        elif opened[e.label]:
            began = opened[e.label].pop()
            while w < len(windows) and windows[w][1] < began:
                w += 1
            if w < len(windows) and windows[w][0] <= began <= windows[w][1]:
                out[e.label].append((e.at - began) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trace", type=Path)
    args = parser.parse_args()
    by_pid = read(args.trace)
    ctl, agent = by_pid[_pid_with(by_pid, CREATE)], by_pid[_pid_with(by_pid, HANDLER)]
    spans: list[tuple[float, float]] = []
    begin: float | None = None
    overlapped = False
    for e in ctl:
        if e.label != CREATE:
            continue
        if e.start:
            overlapped = begin is not None
            begin = e.at
        elif begin is not None:
            if not overlapped:
                spans.append((begin, e.at))
            begin = None
    steps: dict[str, list[float]] = defaultdict(list)
    windows: list[tuple[float, float]] = []
    for begin, end in spans:
        path = stages(ctl, agent, begin, end)
        if path is None:
            continue
        windows.append((path[0][1], path[-1][1]))
        for (a, ta), (b, tb) in itertools.pairwise(path):
            steps[f"{a} -> {b}"].append((tb - ta) * 1000)
        steps["whole: API delivery -> API reply sent"].append((path[-1][1] - path[0][1]) * 1000)
    print(f"{len(windows)} creates that ran alone (of {len(spans)} sequential)\n")
    print("| step | median ms | p90 ms |\n|---|---|---|")
    for name, values in steps.items():
        ordered = sorted(values)
        print(f"| {name} | {statistics.median(values):.3f} | {ordered[int(len(ordered) * 0.9)]:.3f} |")
    print(
        "\n| timed call (on those creates' path) | process | calls per create | median ms |\n|---|---|---|---|"
    )
    for who, events in (("controller", ctl), ("agent", agent)):
        for label, values in sorted(durations(events, windows).items()):
            if "ConsumerServer" in label or "FinishQueue" in label:
                continue
            print(
                f"| {label} | {who} | {len(values) / max(1, len(windows)):.1f} | {statistics.median(values):.3f} |"
            )


if __name__ == "__main__":
    main()
