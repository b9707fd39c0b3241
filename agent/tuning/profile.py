"""Host tune profiles (pure): what a profile sets, and the plan for one host's current facts.

``virt-host`` -- the documented set for a hypervisor (docs/operations.md, "Host tuning"):

* transparent hugepages ``enabled = madvise`` and ``defrag = madvise``: QEMU marks guest RAM
  with ``MADV_HUGEPAGE``, so guests keep THP while host daemons do not pay for khugepaged and
  direct compaction stalls (the ops notes' ``[always]`` default);
* IO scheduler ``none`` on non-rotational devices (SSD, NVMe: the notes' "noop for SSD") and
  ``mq-deadline`` on rotational ones (the notes' "deadline by default"), on physical block
  devices only (loop, ram, zram and device-mapper devices are left alone), and only where the
  kernel offers that scheduler;
* hugepage pools grown to the sizes the operator asks for (``--hugepages 2M=512``); a profile
  never shrinks a pool, because pages in use by guests cannot be taken back.

A plan lists every setting looked at, changed or not, so applying twice reports "unchanged".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from common.errors import InvalidRequest
from common.messages.tuning import HostTuningReport, SettingChange, page_size_label


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    thp_enabled: str
    thp_defrag: str
    io_rotational: str
    io_non_rotational: str
    doc: str


PROFILES: dict[str, Profile] = {
    "virt-host": Profile(
        name="virt-host",
        thp_enabled="madvise",
        thp_defrag="madvise",
        io_rotational="mq-deadline",
        io_non_rotational="none",
        doc="KVM hypervisor: THP madvise, none/mq-deadline IO schedulers, hugepage pools grown on request",
    )
}


@dataclass(frozen=True, slots=True)
class Step:
    """One setting: its name, current and wanted value; ``target`` says what to write where.

    ``target`` is ``("thp", which)``, ``("io", device)`` or ``("hugepages", size_kib)``.
    """

    setting: str
    before: str
    after: str
    target: tuple[str, str | int]
    note: str = ""

    @property
    def changes(self) -> bool:
        return self.before != self.after

    def as_change(self, after: str | None = None, note: str | None = None) -> SettingChange:
        final = self.after if after is None else after
        return SettingChange(
            setting=self.setting,
            before=self.before,
            after=final,
            changed=self.before != final,
            note=self.note if note is None else note,
        )


def lookup(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise InvalidRequest(f"unknown profile {name!r}; known: {', '.join(PROFILES)}") from None


def plan(
    profile: Profile,
    facts: HostTuningReport,
    thp_options: Mapping[str, tuple[str, ...]],
    hugepages: Mapping[int, int],
) -> list[Step]:
    """Every setting ``profile`` looks at on a host with ``facts``, in the order to apply them.

    ``thp_options`` are the choices the kernel offers per THP file (``enabled``/``defrag``);
    ``hugepages`` maps a page size (KiB) to the pool size to grow to.
    """
    steps: list[Step] = []
    for which, wanted in (("enabled", profile.thp_enabled), ("defrag", profile.thp_defrag)):
        current = facts.thp_enabled if which == "enabled" else facts.thp_defrag
        options = thp_options.get(which, ())
        if not options:
            steps.append(Step(f"thp.{which}", current or "-", current or "-", ("thp", which), "no THP"))
        elif wanted not in options:
            steps.append(Step(f"thp.{which}", current, current, ("thp", which), f"{wanted} not offered"))
        else:
            steps.append(Step(f"thp.{which}", current, wanted, ("thp", which)))
    for device in facts.block_devices:
        if not device.physical:
            continue
        wanted = profile.io_rotational if device.rotational else profile.io_non_rotational
        setting = f"io.{device.name}.scheduler"
        if wanted not in device.available:
            steps.append(
                Step(
                    setting, device.scheduler, device.scheduler, ("io", device.name), f"{wanted} not offered"
                )
            )
        else:
            kind = "rotational" if device.rotational else "non-rotational"
            steps.append(Step(setting, device.scheduler, wanted, ("io", device.name), kind))
    pools = {p.size_kib: p for p in facts.hugepages}
    for size, count in sorted(hugepages.items()):
        label = page_size_label(size)
        setting = f"hugepages.{label}"
        pool = pools.get(size)
        if pool is None:
            raise InvalidRequest(f"this host's kernel has no {label} hugepages")
        if count <= pool.total:
            note = "" if count == pool.total else f"kept: never shrunk below {pool.total}"
            steps.append(Step(setting, str(pool.total), str(pool.total), ("hugepages", size), note))
        else:
            steps.append(Step(setting, str(pool.total), str(count), ("hugepages", size)))
    return steps
