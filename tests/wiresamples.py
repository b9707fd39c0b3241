"""Deterministic sample messages for wire tests: every field valid and, where possible, not its default.

:func:`sample` builds an instance of any message type (a frozen dataclass today, a msgspec
``Struct`` tomorrow) from its type hints alone. A value equal to a field's default would hide
bugs such as a dropped field, a changed default or ``omit_defaults``, so the builder searches
for values that differ from the default *and* pass the type's ``__post_init__`` checks:

* every field gets a short list of candidates, chosen by its type and by hints in its name
  (``mac`` -> ``52:54:00:AB:CD:EF``, ``path`` -> an absolute path, ``cpuset`` -> ``1-2``, ...),
  followed by its default as the last resort;
* a deterministic local search then keeps changing one, two or three fields at a time while the
  instance still constructs and covers more fields (counted over the whole nested tree, so that
  two fields of the same nested type may show two different shapes, e.g. an image by path and
  an image by pool volume).

Fields that stay at their default are not hidden: :meth:`Sampler.uncovered` names them, and
tests/unit/test_wire_golden.py pins that list to an explicit allow-list.

Run ``PYTHONPATH=tests python -m wiresamples [KIND ...]`` to print the samples of catalogue kinds
and the fields the whole catalogue leaves at their defaults.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import sys
import types
import typing
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, get_args, get_origin

T = TypeVar("T")

_UUID = "6f1c2a3b-4d5e-4f60-8a9b-0c1d2e3f4a5b"
# Upper case on purpose: NicSpec and friends store MACs lower-cased in __post_init__, and the
# golden bytes must notice if a new message implementation stops doing that.
_MAC = "52:54:00:AB:CD:EF"

# Name hints: a field whose name (or one of its ``_``-separated words) is a key gets these
# candidates first. Values are valid for every validator of that name in common/messages; the
# search tries the next candidate where one is not. Order only matters for readability of the
# golden data: the first candidate that works wins.
_STR_HINTS: tuple[tuple[frozenset[str], tuple[str, ...]], ...] = (
    (frozenset({"uuid"}), (_UUID,)),
    (frozenset({"mac", "hwaddr"}), (_MAC,)),
    (frozenset({"address", "addresses", "dst"}), ("192.0.2.10/24",)),
    (frozenset({"gateway"}), ("192.0.2.1",)),
    (frozenset({"dns"}), ("192.0.2.53",)),
    (frozenset({"prefsrc"}), ("192.0.2.10",)),
    (frozenset({"dhcp_start"}), ("192.0.2.100",)),
    (frozenset({"dhcp_end"}), ("192.0.2.200",)),
    (frozenset({"listen"}), ("0.0.0.0",)),
    (frozenset({"password"}), ("s3cret",)),  # VNC allows 8 characters
    (frozenset({"path", "file", "kernel", "initrd", "log", "cdrom"}), ("/var/lib/golden/{name}.img",)),
    (frozenset({"cpuset", "cpus", "pcpus", "allowance"}), ("1-2",)),
    (frozenset({"target"}), ("vdb",)),
    (frozenset({"resource"}), ("MEMORY_MIB",)),
    (frozenset({"reset"}), ("cpu_ratio",)),
    (frozenset({"mode"}), ("nat", "isolated", "802.3ad")),
    (frozenset({"policy"}), ("dedicated", "anti-affinity")),
    (frozenset({"size"}), ("1G",)),
    (frozenset({"domain_type"}), ("qemu",)),
    (frozenset({"source"}), ("default", "existing")),
    (frozenset({"bridge", "bridges"}), ("br0",)),
    (
        frozenset({"slaves", "slave", "nics", "nic", "primary", "restore_to", "dev", "link", "master"}),
        ("eth1", "eth2"),
    ),
    (frozenset({"change_id"}), ("chg-0001",)),
    (frozenset({"host", "host_id"}), ("hv01",)),
    (frozenset({"profile"}), ("virt-host",)),
    (frozenset({"scheduler"}), ("mq-deadline",)),
    (frozenset({"device"}), ("nvme0n1",)),
    (frozenset({"xml"}), ("<domain type='kvm'><name>golden</name></domain>",)),
    (frozenset({"uri"}), ("qemu+ssh://hv01/system",)),
    (frozenset({"state", "power_state", "desired_power"}), ("running",)),
    (frozenset({"setting"}), ("thp.enabled",)),
    (frozenset({"family"}), ("inet6",)),
    (frozenset({"arch"}), ("aarch64",)),
    (frozenset({"machine"}), ("q35",)),
    (frozenset({"format"}), ("qcow2",)),
)
# Dict keys are checked too (page sizes as labels).
_KEY_HINTS: tuple[tuple[frozenset[str], tuple[str, ...]], ...] = (
    (frozenset({"hugepages", "hugepages_claimed"}), ("1G", "2M")),
)
# Integers: varied widths on purpose (MessagePack picks fixint, uint8, uint16, uint32 or uint64).
# Numbers from these tables get a small per-name offset (see _salt), except page sizes in KiB.
_INT_HINTS: tuple[tuple[frozenset[str], tuple[int, ...]], ...] = (
    (frozenset({"port"}), (5901,)),
    (frozenset({"pid", "tid"}), (4242,)),
    (frozenset({"vcpu"}), (1,)),
    (frozenset({"miimon"}), (200,)),
    (frozenset({"max"}), (65536,)),
    (frozenset({"min"}), (2,)),
    (frozenset({"kib"}), (2048,)),
    (frozenset({"mib"}), (4096,)),
    (frozenset({"gib"}), (20,)),
    (frozenset({"ns", "bytes"}), (10_737_418_240,)),
    (frozenset({"mhz"}), (2400,)),
)
_FLOAT_HINTS: tuple[tuple[frozenset[str], tuple[float, ...]], ...] = (
    (frozenset({"ratio"}), (1.5,)),
    (frozenset({"at", "since", "heartbeat"}), (1764110000.25,)),
    (frozenset({"s"}), (45.5,)),  # timeouts and deadlines in seconds
    (frozenset({"score"}), (0.75,)),
)


def _hinted(name: str, table: tuple[tuple[frozenset[str], tuple[Any, ...]], ...]) -> list[Any]:
    """Candidates from a hint table whose key is the field name or one of its words, in table order."""
    words = {name, *name.split("_")}
    return [v for keys, values in table if keys & words for v in values]


def _salt(name: str, modulo: int) -> int:
    """A small number derived from the field name: different fields get different values, stably.

    Distinct values let the round-trip and golden checks notice two fields swapped on the wire.
    """
    return zlib.crc32(name.encode()) % modulo


def _dedup(values: Iterable[Any]) -> list[Any]:
    # Equality with a type check: True == 1 and "raw" == DiskFormat.RAW must stay distinct.
    out: list[Any] = []
    for v in values:
        if not any(type(v) is type(o) and v == o for o in out):
            out.append(v)
    return out


def _struct_module() -> Any:
    """msgspec if it is installed (the builder must work before the migration adds it)."""
    try:
        import msgspec  # noqa: PLC0415 - optional dependency, imported only when present
    except ImportError:
        return None
    return msgspec


def is_message_type(tp: object) -> bool:
    """True for a dataclass type or a msgspec Struct type."""
    if not isinstance(tp, type):
        return False
    if dataclasses.is_dataclass(tp):
        return True
    msgspec = _struct_module()
    return msgspec is not None and issubclass(tp, msgspec.Struct)


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One constructor field of a message type.

    ``baseline`` is the value that does not exercise the field: its default, or None for a
    required ``X | None`` field. ``has_baseline`` is False for other required fields.
    """

    name: str
    type: Any
    has_baseline: bool
    baseline: Any
    #: the type with its msgspec bounds (``Annotated[int, Meta(le=4096)]``): samples stay within them
    bounded: Any = None

    def admits(self, value: Any) -> bool:
        """Whether ``value`` is within the field's bounds (a decoder would take it)."""
        msgspec = _struct_module()
        if self.bounded is None or msgspec is None or "Annotated" not in repr(self.bounded):
            return True
        try:
            msgspec.convert(msgspec.to_builtins(value), self.bounded)
        except (msgspec.ValidationError, TypeError, ValueError):
            return False
        return True


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType) and type(None) in get_args(tp)


def _field_spec(name: str, tp: Any, default: Any, default_factory: Any, missing: object) -> FieldSpec:
    """A field's spec from its default or default factory, either of which may be ``missing``."""
    if default is not missing:
        return FieldSpec(name, tp, True, default)
    if default_factory is not missing:
        return FieldSpec(name, tp, True, default_factory())
    return FieldSpec(name, tp, _is_optional(tp), None)


def message_fields(cls: type) -> tuple[FieldSpec, ...]:
    """The constructor fields of a dataclass or msgspec Struct, with resolved type hints."""
    hints = typing.get_type_hints(cls)
    if dataclasses.is_dataclass(cls):
        return tuple(
            _field_spec(f.name, hints[f.name], f.default, f.default_factory, dataclasses.MISSING)
            for f in dataclasses.fields(cls)
            if f.init
        )
    msgspec = _struct_module()
    if msgspec is None or not issubclass(cls, msgspec.Struct):
        raise TypeError(f"{cls!r} is neither a dataclass nor a msgspec Struct")
    bounded = typing.get_type_hints(cls, include_extras=True)
    return tuple(
        dataclasses.replace(
            _field_spec(info.name, hints[info.name], info.default, info.default_factory, msgspec.NODEFAULT),
            bounded=bounded[info.name],
        )
        for info in msgspec.structs.fields(cls)
    )


def field_label(cls: type, name: str) -> str:
    """``module.Class.field`` with the last module component: how fallbacks are named."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__qualname__}.{name}"


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and bool(a == b)


class Sampler:
    """Builds samples; remembers what it built for its own lifetime (one per test session is plenty).

    Everything is deterministic: candidates come in a fixed order and the search takes the first
    improving move in a fixed enumeration order.
    """

    def __init__(self) -> None:
        self._fields: dict[type, tuple[FieldSpec, ...]] = {}
        self._best: dict[type, dict[str, Any]] = {}
        self._variants: dict[type, tuple[Any, ...]] = {}
        self._building: set[type] = set()

    # ------------------------------------------------------------------ public

    def sample(self, cls: type[T]) -> T:
        """The sample of ``cls``: valid, every field non-default where the search found a way."""
        return cls(**self._best_kwargs(cls))

    def uncovered(self, roots: Iterable[type], values: Iterable[object]) -> tuple[str, ...]:
        """Fields of message types reachable from ``roots`` that no instance inside ``values`` sets.

        A field counts as set when it differs from its baseline (its default, or None for a
        required ``X | None``); a type that never occurs in ``values`` leaves all its fields unset.
        """
        covered: set[tuple[type, str]] = set()
        for value in values:
            covered |= self._coverage(value)
        reachable: list[type] = []
        for root in roots:
            self._reach(root, reachable)
        return tuple(
            sorted(
                field_label(cls, f.name)
                for cls in reachable
                for f in self.fields(cls)
                if (cls, f.name) not in covered
            )
        )

    def fields(self, cls: type) -> tuple[FieldSpec, ...]:
        """:func:`message_fields`, remembered."""
        if cls not in self._fields:
            self._fields[cls] = message_fields(cls)
        return self._fields[cls]

    # ------------------------------------------------------------------ search

    def _best_kwargs(self, cls: type) -> dict[str, Any]:
        if cls not in self._best:
            if cls in self._building:
                raise TypeError(f"{cls.__qualname__} contains itself; recursive types need an override")
            self._building.add(cls)
            try:
                self._best[cls] = self._search(cls, None, frozenset())
            finally:
                self._building.discard(cls)
        return self._best[cls]

    def _search(self, cls: type, start: dict[str, Any] | None, pinned: frozenset[str]) -> dict[str, Any]:
        """Hill climbing from ``start`` (default: every field at its baseline) with ``pinned`` fixed."""
        specs = self.fields(cls)
        values = {f.name: self._values(f) for f in specs}
        for f in specs:
            if not values[f.name]:
                raise TypeError(f"no candidate values for {field_label(cls, f.name)} ({f.type!r})")
        # Start from the baselines (required fields: their first candidate) and climb from there.
        current = (
            dict(start)
            if start is not None
            else {f.name: values[f.name][-1 if f.has_baseline else 0] for f in specs}
        )
        score = self._score(cls, current)
        while True:
            for kwargs in self._moves(specs, values, current, pinned):
                new = self._score(cls, kwargs)
                if new is not None and (score is None or new > score):
                    current, score = kwargs, new
                    break
            else:
                break
        if score is None:
            raise ValueError(f"found no valid {cls.__qualname__}: add candidates for its fields")
        return current

    def _moves(
        self,
        specs: Sequence[FieldSpec],
        values: Mapping[str, list[Any]],
        current: dict[str, Any],
        pinned: frozenset[str],
    ) -> Iterator[dict[str, Any]]:
        """Neighbouring assignments: one field changed; a field at its baseline plus any other; or
        two fields at their baseline set while one set field goes back to its baseline (for
        either/or fields such as an image named by path or by pool + volume)."""
        free = [f for f in specs if f.name not in pinned]
        unset = [f for f in free if f.has_baseline and _same(current[f.name], f.baseline)]

        def others(f: FieldSpec) -> list[Any]:
            return [v for v in values[f.name] if not _same(v, current[f.name])]

        for f in free:
            for v in others(f):
                yield {**current, f.name: v}
        for a in unset:
            for b in free:
                if b is a:
                    continue
                for v, w in itertools.product(others(a), others(b)):
                    yield {**current, a.name: v, b.name: w}
        for a, b in itertools.combinations(unset, 2):
            for c in free:
                if c in (a, b) or not c.has_baseline or _same(current[c.name], c.baseline):
                    continue
                for v, w in itertools.product(others(a), others(b)):
                    yield {**current, a.name: v, b.name: w, c.name: c.baseline}

    def _score(self, cls: type, kwargs: dict[str, Any]) -> tuple[int, int] | None:
        """How much an assignment exercises; None when ``cls`` refuses ``kwargs``.

        First the fields of ``cls`` itself that are set (a nested type's own sample exercises its
        fields, so a parent must not give up one of its fields for a richer nested value), then the
        distinct fields (type, name) set anywhere in the tree. Counting distinct fields, not
        occurrences, keeps tuples at one element unless a second, different one sets more.
        """
        try:
            value = cls(**kwargs)
        except Exception:  # __post_init__ refusing the combination is the normal case here
            return None
        covered = self._coverage(value)
        return sum(1 for f in self.fields(cls) if (cls, f.name) in covered), len(covered)

    def _coverage(self, value: object) -> set[tuple[type, str]]:
        covered: set[tuple[type, str]] = set()
        stack: list[object] = [value]
        while stack:
            item = stack.pop()
            if is_message_type(type(item)):
                for f in self.fields(type(item)):
                    v = getattr(item, f.name)
                    if not f.has_baseline or not _same(v, f.baseline):
                        covered.add((type(item), f.name))
                    stack.append(v)
            elif isinstance(item, tuple | list | frozenset | set):
                stack.extend(item)
            elif isinstance(item, dict):
                stack.extend(item.values())
        return covered

    def _reach(self, tp: Any, seen: list[type]) -> None:
        if is_message_type(tp):
            if tp in seen:
                return
            seen.append(tp)
            for f in self.fields(tp):
                self._reach(f.type, seen)
        for arg in get_args(tp):
            self._reach(arg, seen)

    # ------------------------------------------------------------------ candidates

    def _values(self, f: FieldSpec) -> list[Any]:
        """Candidates that differ from the baseline, then the baseline itself as the last resort."""
        cands = [
            v
            for v in self._candidates(f.name, f.type)
            if not (f.has_baseline and _same(v, f.baseline)) and f.admits(v)
        ]
        return [*cands, f.baseline] if f.has_baseline else cands

    def _nested(self, cls: type) -> list[Any]:
        """The sample of a nested type, then variants with one or two fields pinned to their baseline.

        The parent may refuse the best sample (``VmCreate`` wants a new disk where the best
        ``DiskSpec`` is an existing CD-ROM image: two fields away): a variant lets the parent keep
        the nested value and its own fields anyway.
        """
        if cls not in self._variants:
            best = self._best_kwargs(cls)
            out: list[Any] = [cls(**best)]
            settable = [
                f.name for f in self.fields(cls) if f.has_baseline and not _same(best[f.name], f.baseline)
            ]
            pins = [frozenset({n}) for n in settable] + [
                frozenset(p) for p in itertools.combinations(settable, 2)
            ]
            base = {f.name: f.baseline for f in self.fields(cls)}
            for pin in pins:
                try:
                    kwargs = self._search(cls, {**best, **{n: base[n] for n in pin}}, pin)
                except ValueError:
                    continue
                variant = cls(**kwargs)
                if not any(variant == o for o in out):
                    out.append(variant)
            self._variants[cls] = tuple(out)
        return list(self._variants[cls])

    def _candidates(self, name: str, tp: Any) -> list[Any]:
        origin = get_origin(tp)
        args = get_args(tp)
        if tp is Any:
            return [f"{name}-any", 7]
        if tp is type(None):
            return [None]
        if is_message_type(tp):
            return self._nested(tp)
        if origin in (typing.Union, types.UnionType):
            return _dedup(v for a in args for v in self._candidates(name, a))
        if origin is typing.Literal:
            return list(args)
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            members = list(tp)
            # The first member is usually the zero value (NONE, NOSTATE): try the others first.
            return members[1:] + members[:1]
        if tp is bool:
            return [True, False]
        if tp is int:
            offset = 0 if "kib" in name.split("_") else _salt(name, 40)
            hinted_ints = [v + offset for v in _hinted(name, _INT_HINTS)]
            return _dedup([*hinted_ints, 2 + _salt(name, 90), 1, 3, 300, 70000])
        if tp is float:
            hinted_floats = [v + _salt(name, 40) for v in _hinted(name, _FLOAT_HINTS)]
            return _dedup([*hinted_floats, 2.5 + _salt(name, 50), 1.5, 0.25])
        if tp is str:
            hinted = [v.format(name=name) for v in _hinted(name, _STR_HINTS)]
            return _dedup([*hinted, name.replace("_", "-")])
        if tp is bytes:
            return [b"\x00golden\xff"]
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            elems = self._candidates(name, args[0])
            two = [(elems[0], elems[1])] if len(elems) > 1 else []
            return [(e,) for e in elems] + two
        if origin is tuple:
            per_slot = [self._candidates(f"{name}_{i}", a) for i, a in enumerate(args)]
            return [tuple(c[0] for c in per_slot)]
        if origin is frozenset:
            return [frozenset({e}) for e in self._candidates(name, args[0])]
        if origin in (dict, Mapping) or tp is dict:
            key_t, val_t = args
            keys = self._candidates(name, key_t)
            if key_t is str:
                keys = _dedup([*_hinted(name, _KEY_HINTS), *keys])
            vals = self._candidates(name, val_t)
            return [{k: vals[0]} for k in keys] + [{keys[0]: v} for v in vals[1:]]
        raise TypeError(f"wiresamples cannot build a value of type {tp!r} (field {name!r})")


def sample(cls: type[T]) -> T:
    """A deterministic instance of the message type ``cls`` with every field exercised where valid."""
    return Sampler().sample(cls)


def _main(argv: Sequence[str]) -> int:
    """Print samples and the fields the catalogue's samples leave at their defaults."""
    from common.messages.catalogue import CATALOGUE  # noqa: PLC0415 - only this debugging aid needs it

    sampler = Sampler()
    chosen = [op for kind, op in CATALOGUE.items() if not argv or kind in argv]
    roots: list[type] = []
    values: list[object] = []
    for op in chosen:
        # a report has no reply, so only its body goes on the wire
        for tp in (op.body, op.result) if op.replies else (op.body,):
            roots.append(tp)
            values.append(sampler.sample(tp))
            print(f"{op.kind} {tp.__qualname__}: {values[-1]!r}")
    print("left at their defaults:", *sampler.uncovered(roots, values), sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
