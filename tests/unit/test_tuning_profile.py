"""The virt-host profile plan (agent/tuning/profile.py) and libvirt cpumaps (pinning.py)."""

from __future__ import annotations

import pytest

from agent.tuning import profile
from agent.tuning.pinning import cpumap, cpus_of
from common.errors import InvalidRequest
from common.messages.tuning import BlockDevice, HostTuningReport, HugepagePool

SCHEDS = ("none", "mq-deadline", "kyber", "bfq")
THP = {
    "enabled": ("always", "madvise", "never"),
    "defrag": ("always", "defer", "defer+madvise", "madvise", "never"),
}
VIRT = profile.lookup("virt-host")


def facts(**changes: object) -> HostTuningReport:
    base: dict[str, object] = {
        "thp_enabled": "always",
        "thp_defrag": "madvise",
        "hugepages": (HugepagePool(2048, 16, 16, mounted=True), HugepagePool(1048576, 0, 0, mounted=True)),
        "block_devices": (
            BlockDevice("nvme0n1", "mq-deadline", SCHEDS, rotational=False),
            BlockDevice("sda", "bfq", SCHEDS, rotational=True),
            BlockDevice("loop0", "mq-deadline", SCHEDS, physical=False),
            BlockDevice("md0", "none", ("none",)),
        ),
    }
    base.update(changes)
    return HostTuningReport(**base)  # type: ignore[arg-type]


def by_setting(steps: list[profile.Step]) -> dict[str, profile.Step]:
    return {s.setting: s for s in steps}


def test_virt_host_plan() -> None:
    steps = by_setting(profile.plan(VIRT, facts(), THP, {2048: 64}))
    assert (steps["thp.enabled"].before, steps["thp.enabled"].after) == ("always", "madvise")
    assert not steps["thp.defrag"].changes
    assert (steps["io.nvme0n1.scheduler"].after, steps["io.nvme0n1.scheduler"].note) == (
        "none",
        "non-rotational",
    )
    assert (steps["io.sda.scheduler"].after, steps["io.sda.scheduler"].note) == ("mq-deadline", "rotational")
    assert "io.loop0.scheduler" not in steps  # virtual devices are left alone
    assert not steps["io.md0.scheduler"].changes  # "none" is all it offers... and what it has
    assert (steps["hugepages.2M"].before, steps["hugepages.2M"].after) == ("16", "64")
    assert steps["hugepages.2M"].target == ("hugepages", 2048)


def test_plan_on_a_tuned_host_changes_nothing() -> None:
    tuned = facts(
        thp_enabled="madvise",
        block_devices=(
            BlockDevice("nvme0n1", "none", SCHEDS),
            BlockDevice("sda", "mq-deadline", SCHEDS, rotational=True),
        ),
        hugepages=(HugepagePool(2048, 64, 10, mounted=True),),
    )
    steps = profile.plan(VIRT, tuned, THP, {2048: 64})
    assert [s.setting for s in steps if s.changes] == []
    assert all(not s.as_change().changed for s in steps)


def test_pools_are_never_shrunk() -> None:
    step = by_setting(profile.plan(VIRT, facts(), THP, {2048: 8}))["hugepages.2M"]
    assert not step.changes
    assert "never shrunk" in step.note


def test_unavailable_choices_are_noted_not_forced() -> None:
    limited = facts(block_devices=(BlockDevice("sdb", "bfq", ("bfq", "none"), rotational=True),))
    steps = by_setting(profile.plan(VIRT, limited, {"enabled": ("always", "never")}, {}))
    assert not steps["io.sdb.scheduler"].changes
    assert steps["io.sdb.scheduler"].note == "mq-deadline not offered"
    assert steps["thp.enabled"].note == "madvise not offered"
    assert steps["thp.defrag"].note == "no THP"


def test_unknown_page_size_or_profile() -> None:
    with pytest.raises(InvalidRequest):
        profile.plan(VIRT, facts(hugepages=()), THP, {2048: 4})
    with pytest.raises(InvalidRequest):
        profile.lookup("throughput")


def test_as_change_records_what_the_kernel_did() -> None:
    step = profile.Step("hugepages.2M", "16", "64", ("hugepages", 2048))
    got = step.as_change(after="40")
    assert (got.before, got.after, got.changed) == ("16", "40", True)
    failed = step.as_change(after="16", note="failed: EBUSY")
    assert not failed.changed and failed.note == "failed: EBUSY"


def test_cpumaps() -> None:
    assert cpumap(frozenset({1, 3}), 4) == (False, True, False, True)
    assert cpus_of((True, False, True)) == {0, 2}
    with pytest.raises(InvalidRequest) as err:
        cpumap(frozenset({9}), 8)  # the test driver's 8-CPU map drops such pins silently
    assert "0-7" in err.value.message
    with pytest.raises(InvalidRequest):
        cpumap(frozenset(), 8)
