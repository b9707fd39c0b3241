"""Message structs <-> plain data <-> bytes (common/codec.py: msgspec conversion, msgpack bytes)."""

from __future__ import annotations

import enum
import operator
import string
import typing
from collections.abc import Mapping
from typing import Any, Literal

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import codec
from common.codec import from_wire, to_wire
from common.errors import InvalidRequest
from common.messages import limits, vm
from common.messages.api import VmCreate
from common.messages.catalogue import CATALOGUE


def full_spec() -> vm.VmSpec:
    return vm.VmSpec(
        uuid="6f1c1d2e-0000-4000-8000-000000000001",
        name="web-1",
        vcpus=2,
        memory_mib=2048,
        max_vcpus=4,
        max_memory_mib=4096,
        domain_type=vm.DomainType.QEMU,
        arch="aarch64",
        machine="virt",
        cpuset="0-3",
        disks=(
            vm.DiskSpec(target="vda", size_gib=20, pool="default", volume="web-1-vda", io=vm.IoMode.IO_URING),
            vm.DiskSpec(
                target="sda",
                source="existing",
                format=vm.DiskFormat.RAW,
                path="/var/lib/iso/boot.iso",
                bus=vm.DiskBus.SATA,
                device=vm.DiskDevice.CDROM,
                cache=vm.CacheMode.WRITEBACK,
                readonly=True,
            ),
        ),
        nics=(
            vm.NicSpec(kind=vm.NicKind.NETWORK, source="default"),
            vm.NicSpec(
                kind=vm.NicKind.BRIDGE, source="br0", model=vm.NicModel.E1000, mac="52:54:00:aa:bb:cc"
            ),
        ),
        graphics=vm.GraphicsSpec(listen="0.0.0.0", port=5901, password="secret"),
        kernel_boot=vm.KernelBoot(kernel="/boot/vmlinuz", initrd="/boot/initrd", cmdline="console=ttyS0"),
        autostart=True,
        cputune=vm.CpuTune(vcpu_pins=(vm.VcpuPin(0, "2"), vm.VcpuPin(1, "3")), emulator_cpuset="0-1"),
        hugepage_size_kib=2048,
        serial_log="/var/log/vm/web-1.log",
        description="a web server",
    )


def full_plain() -> dict[str, Any]:
    return {
        "uuid": "6f1c1d2e-0000-4000-8000-000000000001",
        "name": "web-1",
        "vcpus": 2,
        "memory_mib": 2048,
        "max_vcpus": 4,
        "max_memory_mib": 4096,
        "domain_type": "qemu",
        "arch": "aarch64",
        "machine": "virt",
        "cpuset": "0-3",
        "disks": [
            {
                "target": "vda",
                "source": "new",
                "format": "qcow2",
                "size_gib": 20,
                "pool": "default",
                "volume": "web-1-vda",
                "path": None,
                "bus": "virtio",
                "device": "disk",
                "cache": "none",
                "io": "io_uring",
                "readonly": False,
            },
            {
                "target": "sda",
                "source": "existing",
                "format": "raw",
                "size_gib": 0,
                "pool": None,
                "volume": None,
                "path": "/var/lib/iso/boot.iso",
                "bus": "sata",
                "device": "cdrom",
                "cache": "writeback",
                "io": None,
                "readonly": True,
            },
        ],
        "nics": [
            {"kind": "network", "source": "default", "model": "virtio", "mac": None},
            {"kind": "bridge", "source": "br0", "model": "e1000", "mac": "52:54:00:aa:bb:cc"},
        ],
        "graphics": {"listen": "0.0.0.0", "port": 5901, "password": "secret"},
        "kernel_boot": {"kernel": "/boot/vmlinuz", "initrd": "/boot/initrd", "cmdline": "console=ttyS0"},
        "autostart": True,
        "cputune": {
            "vcpu_pins": [{"vcpu": 0, "cpuset": "2"}, {"vcpu": 1, "cpuset": "3"}],
            "emulator_cpuset": "0-1",
        },
        "hugepage_size_kib": 2048,
        "serial_log": "/var/log/vm/web-1.log",
        "description": "a web server",
    }


# ------------------------------------------------------------------ to_plain / round trip


def test_the_wire_form_of_a_full_spec_is_exact_plain_data() -> None:
    assert codec.decode(codec.encode(to_wire(full_spec()))) == full_plain()


def test_to_wire_output_has_only_plain_types() -> None:
    def check(value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                assert type(k) is str
                check(v)
        elif isinstance(value, list | tuple):
            for v in value:
                check(v)
        else:
            assert value is None or type(value) in {str, int, float, bool}, repr(value)

    check(to_wire(full_spec()))


def test_full_spec_round_trips() -> None:
    spec = full_spec()
    rebuilt = from_wire(vm.VmSpec, to_wire(spec))
    assert rebuilt == spec
    assert type(rebuilt.disks) is tuple
    assert type(rebuilt.domain_type) is vm.DomainType
    assert rebuilt.disks[0].io is vm.IoMode.IO_URING
    assert rebuilt.disks[1].io is None
    assert type(rebuilt.cputune) is vm.CpuTune
    assert rebuilt.cputune.vcpu_pins == (vm.VcpuPin(0, "2"), vm.VcpuPin(1, "3"))


def test_full_spec_round_trips_through_the_codec() -> None:
    spec = full_spec()
    assert from_wire(vm.VmSpec, codec.decode(codec.encode(to_wire(spec)))) == spec


def test_nested_command_round_trips() -> None:
    cmd = vm.CreateVm(spec=full_spec(), start=False)
    assert from_wire(vm.CreateVm, to_wire(cmd)) == cmd


def test_minimal_spec_takes_defaults() -> None:
    spec = from_wire(vm.VmSpec, {"uuid": "u", "name": "a", "vcpus": 1, "memory_mib": 64})
    assert spec == vm.VmSpec(uuid="u", name="a", vcpus=1, memory_mib=64)
    assert spec.disks == ()
    assert spec.graphics is None
    assert spec.domain_type is vm.DomainType.KVM


def test_unknown_fields_are_ignored_at_every_level() -> None:
    plain = full_plain()
    plain["future_field"] = {"anything": [1, 2]}
    plain["disks"][0]["iothread"] = 3
    plain["graphics"]["gl"] = True
    plain["cputune"]["vcpu_pins"][0]["numa"] = 1
    assert from_wire(vm.VmSpec, plain) == full_spec()


def test_to_wire_of_plain_values() -> None:
    assert to_wire(vm.DiskBus.SCSI) == "scsi"
    assert to_wire([vm.DiskBus.IDE, (1, 2)]) == ["ide", (1, 2)]  # tuples stay tuples: msgpack arrays
    assert to_wire({"k": vm.DiskFormat.RAW}) == {"k": "raw"}
    assert to_wire(None) is None
    assert to_wire(b"\x00") == b"\x00"


def _message_types() -> set[type]:
    """Every message type reachable from a catalogue body or result."""
    found: set[type] = set()
    todo = [t for op in CATALOGUE.values() for t in (op.body, op.result) if isinstance(t, type)]
    while todo:
        tp = todo.pop()
        if tp in found or not (isinstance(tp, type) and issubclass(tp, msgspec.Struct)):
            continue
        found.add(tp)
        for hint in typing.get_type_hints(tp).values():
            todo += _leaves(hint)
    return found


def _leaves(hint: Any) -> list[Any]:
    args = typing.get_args(hint)
    return [hint, *[leaf for a in args for leaf in _leaves(a)]]


def test_no_message_declares_a_set() -> None:
    # A set's order follows string hashing, which differs per process: its bytes would not be
    # deterministic (and the golden wire test would flap). Messages use sorted tuples instead.
    offenders = sorted(
        f"{tp.__name__}.{name}"
        for tp in _message_types()
        for name, hint in typing.get_type_hints(tp).items()
        if any(typing.get_origin(h) in (set, frozenset) or h in (set, frozenset) for h in _leaves(hint))
    )
    assert offenders == []


# ------------------------------------------------------------------ test-only types


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Inner(msgspec.Struct, frozen=True):
    n: int


class Everything(msgspec.Struct, frozen=True):
    s: str
    i: int
    f: float
    b: bool
    raw: bytes = b""
    opt: int | None = None
    colour: Colour = Colour.RED
    level: Level = Level.LOW
    items: tuple[int, ...] = ()
    pair: tuple[str, int] = ("a", 0)
    fset: frozenset[str] = frozenset()
    labels: dict[str, int] = msgspec.field(default_factory=dict)
    mapping: Mapping[str, Inner] = msgspec.field(default_factory=dict)
    mode: Literal["on", "off"] = "off"
    number: Literal[1, 2] = 1
    inner: Inner | None = None
    anything: Any = None


def everything() -> Everything:
    return Everything(
        s="x",
        i=-3,
        f=2.5,
        b=True,
        raw=b"\x01\x02",
        opt=7,
        colour=Colour.BLUE,
        level=Level.HIGH,
        items=(1, 2, 3),
        pair=("k", 9),
        fset=frozenset({"z", "y"}),
        labels={"a": 1},
        mapping={"m": Inner(4)},
        mode="on",
        number=2,
        inner=Inner(5),
        anything={"free": ["form"]},
    )


def test_everything_round_trips() -> None:
    value = everything()
    plain = to_wire(value)
    assert sorted(plain["fset"]) == ["y", "z"]
    assert list(plain["pair"]) == ["k", 9]
    assert plain["mapping"] == {"m": {"n": 4}}
    assert plain["level"] == 2
    rebuilt = from_wire(Everything, codec.decode(codec.encode(plain)))
    assert rebuilt == value
    assert type(rebuilt.fset) is frozenset
    assert type(rebuilt.mapping["m"]) is Inner


def test_int_is_accepted_for_float_and_becomes_float() -> None:
    value = from_wire(Everything, {"s": "", "i": 0, "f": 3, "b": False})
    assert value.f == 3.0
    assert type(value.f) is float


@pytest.mark.parametrize(
    ("field_name", "value", "message"),
    [
        ("i", True, "body.i: expected an integer, got a boolean"),
        ("i", "3", "body.i: expected an integer, got a string"),
        ("i", 3.0, "body.i: expected an integer, got a number"),
        ("i", None, "body.i: expected an integer, got null"),
        ("f", True, "body.f: expected a number, got a boolean"),
        ("f", "1.5", "body.f: expected a number, got a string"),
        ("b", 1, "body.b: expected true/false, got an integer"),
        ("b", "true", "body.b: expected true/false, got a string"),
        ("s", 5, "body.s: expected a string, got an integer"),
        ("s", b"x", "body.s: expected a string, got bytes"),
        ("raw", 5, "body.raw: expected bytes, got an integer"),
        ("opt", "x", "body.opt: expected an integer or null, got a string"),
        ("colour", "green", "body.colour: must be one of 'red', 'blue', got 'green'"),
        ("colour", ["red"], "body.colour: expected a string, got a list"),
        ("level", 3, "body.level: must be one of 1, 2, got 3"),
        ("items", {"a": 1}, "body.items: expected a list, got a map"),
        ("items", "123", "body.items: expected a list, got a string"),
        ("items", [1, "2"], "body.items[1]: expected an integer, got a string"),
        ("pair", ["a"], "body.pair: expected 2 items, got 1"),
        ("pair", ["a", "b"], "body.pair[1]: expected an integer, got a string"),
        ("fset", [1], "body.fset[0]: expected a string, got an integer"),
        ("labels", [1, 2], "body.labels: expected a map, got a list"),
        # msgspec names a map value by position, not by key
        ("labels", {"a": "1"}, "body.labels[...]: expected an integer, got a string"),
        ("mapping", {"m": {"n": "x"}}, "body.mapping[...].n: expected an integer, got a string"),
        ("mapping", {"m": {}}, "body.mapping[...].n: required field is missing"),
        ("mode", "auto", "body.mode: must be one of 'on', 'off', got 'auto'"),
        ("number", 3, "body.number: must be one of 1, 2, got 3"),
        ("inner", [1], "body.inner: expected a map or null, got a list"),
        ("inner", {"n": False}, "body.inner.n: expected an integer, got a boolean"),
    ],
)
def test_wrong_types_name_the_path(field_name: str, value: object, message: str) -> None:
    plain: dict[str, Any] = {"s": "", "i": 0, "f": 0.0, "b": False, field_name: value}
    with pytest.raises(InvalidRequest) as info:
        from_wire(Everything, plain)
    assert info.value.message == message


def test_any_field_takes_anything() -> None:
    assert from_wire(Everything, {"s": "", "i": 0, "f": 0, "b": False, "anything": [b"x"]}).anything == [b"x"]


def test_top_level_must_be_a_map() -> None:
    with pytest.raises(InvalidRequest) as info:
        from_wire(vm.VmSpec, [1, 2])
    assert info.value.message == "body: expected a map, got a list"
    with pytest.raises(InvalidRequest) as info:
        from_wire(vm.VmSpec, None, "result")
    assert info.value.message == "result: expected a map, got null"


@pytest.mark.parametrize("value", [True, 1.0])
def test_literal_refuses_equal_values_of_another_type(value: object) -> None:
    with pytest.raises(InvalidRequest):
        from_wire(Everything, {"s": "", "i": 0, "f": 0.0, "b": False, "number": value})


# ------------------------------------------------------------------ real message paths


@pytest.mark.parametrize("missing", ["uuid", "name", "vcpus", "memory_mib"])
def test_missing_required_top_level_field(missing: str) -> None:
    plain = full_plain()
    del plain[missing]
    with pytest.raises(InvalidRequest) as info:
        from_wire(vm.VmSpec, plain)
    assert info.value.message == f"body.{missing}: required field is missing"


def test_missing_required_nested_fields_name_the_path() -> None:
    cases = [
        (("disks", 0, "target"), "body.disks[0].target: required field is missing"),
        (("nics", 1, "kind"), "body.nics[1].kind: required field is missing"),
        (("nics", 0, "source"), "body.nics[0].source: required field is missing"),
        (("kernel_boot", "kernel"), "body.kernel_boot.kernel: required field is missing"),
        (
            ("cputune", "vcpu_pins", 1, "cpuset"),
            "body.cputune.vcpu_pins[1].cpuset: required field is missing",
        ),
    ]
    for keys, message in cases:
        plain = full_plain()
        node: Any = plain
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]
        with pytest.raises(InvalidRequest) as info:
            from_wire(vm.VmSpec, plain)
        assert info.value.message == message


def test_missing_field_inside_a_command_names_the_full_path() -> None:
    plain = to_wire(vm.CreateVm(spec=full_spec()))
    del plain["spec"]["disks"][1]["target"]
    with pytest.raises(InvalidRequest) as info:
        from_wire(vm.CreateVm, plain)
    assert info.value.message == "body.spec.disks[1].target: required field is missing"


def refusal_with(keys: tuple[Any, ...], value: object) -> str:
    """The message of from_wire's refusal of :func:`full_plain` with ``value`` at the path ``keys``."""
    plain = full_plain()
    node: Any = plain
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    with pytest.raises(InvalidRequest) as info:
        from_wire(vm.VmSpec, plain)
    return info.value.message


@pytest.mark.parametrize(
    ("keys", "value", "message"),
    [
        (("vcpus",), True, "body.vcpus: expected an integer, got a boolean"),
        (("vcpus",), "2", "body.vcpus: expected an integer, got a string"),
        (("name",), 7, "body.name: expected a string, got an integer"),
        (("disks",), {"vda": {}}, "body.disks: expected a list, got a map"),
        (("disks", 0, "size_gib"), 1.5, "body.disks[0].size_gib: expected an integer, got a number"),
        (("disks", 0, "readonly"), 0, "body.disks[0].readonly: expected true/false, got an integer"),
        (
            ("disks", 0, "format"),
            "vmdk",
            "body.disks[0].format: must be one of 'raw', 'qcow2', got 'vmdk'",
        ),
        (
            ("disks", 1, "io"),
            "aio",
            "body.disks[1].io: must be one of 'native', 'threads', 'io_uring', got 'aio'",
        ),
        (("graphics",), [], "body.graphics: expected a map or null, got a list"),
        (("graphics", "port"), "5901", "body.graphics.port: expected an integer or null, got a string"),
        (
            ("cputune", "vcpu_pins", 0, "vcpu"),
            False,
            "body.cputune.vcpu_pins[0].vcpu: expected an integer, got a boolean",
        ),
        (("cputune",), [1], "body.cputune: expected a map or null, got a list"),
        (("domain_type",), "xen", "body.domain_type: must be one of 'kvm', 'qemu', 'test', got 'xen'"),
    ],
)
def test_wrong_types_in_vm_spec_name_the_path(keys: tuple[Any, ...], value: object, message: str) -> None:
    assert refusal_with(keys, value) == message


@pytest.mark.parametrize(
    ("keys", "value", "message"),
    [
        (
            ("disks", 0, "size_gib"),
            0,
            "body.disks[0]: disk vda size (GiB) must be a positive integer, got 0",
        ),
        (("disks", 0, "source"), "url", "body.disks[0]: disk vda: source must be 'new' or 'existing'"),
        (
            ("disks", 1, "path"),
            "relative.iso",
            "body.disks[1]: disk sda: path must be absolute, got 'relative.iso'",
        ),
        (("disks", 1, "path"), None, "body.disks[1]: disk sda: an existing image needs a path"),
        (
            ("nics", 1, "mac"),
            "01:00:5e:00:00:01",
            "body.nics[1]: invalid MAC address '01:00:5e:00:00:01': multicast bit set",
        ),
        (("nics", 0, "source"), "", "body.nics[0]: a NIC needs a source network or bridge"),
        (
            ("graphics", "port"),
            80,
            "body.graphics: VNC port must be between 5900 and 65535, got 80",
        ),
        (("graphics", "password"), "123456789", "body.graphics: VNC passwords are limited to 8 characters"),
        (("vcpus",), 0, "body: vcpus must be a positive integer, got 0"),
        (("max_vcpus",), 1, "body: max vcpus (1) is below vcpus (2)"),
        (("max_memory_mib",), 1024, "body: max memory (1024 MiB) is below memory (2048 MiB)"),
    ],
)
def test_post_init_errors_get_the_path_prefix(keys: tuple[Any, ...], value: object, message: str) -> None:
    assert refusal_with(keys, value) == message


def test_post_init_error_inside_command_gets_full_prefix() -> None:
    plain = to_wire(vm.CreateVm(spec=full_spec()))
    plain["spec"]["name"] = "-bad"
    with pytest.raises(InvalidRequest) as info:
        from_wire(vm.CreateVm, plain, "request")
    assert info.value.message.startswith("request.spec: invalid VM name '-bad'")


def test_duplicate_disk_targets_refused_with_prefix() -> None:
    plain = full_plain()
    plain["disks"][1]["target"] = "vda"
    with pytest.raises(InvalidRequest) as info:
        from_wire(vm.VmSpec, plain)
    assert info.value.message == "body: duplicate disk targets in ['vda', 'vda']"


def test_post_init_error_keeps_details() -> None:
    class Picky(msgspec.Struct, frozen=True):
        a: int = 0

        def __post_init__(self) -> None:
            raise InvalidRequest("nope", details={"why": "always"})

    with pytest.raises(InvalidRequest) as info:
        from_wire(Picky, {})
    assert info.value.message == "body: nope"
    assert info.value.details == {"why": "always"}


def test_optional_nested_dataclass_null_and_value() -> None:
    plain = full_plain()
    plain["graphics"] = None
    assert from_wire(vm.VmSpec, plain).graphics is None
    plain["graphics"] = {}
    assert from_wire(vm.VmSpec, plain).graphics == vm.GraphicsSpec()


# ------------------------------------------------------------------ property: VmCreate bodies

_ALNUM = string.ascii_letters + string.digits
#: Any text a string field takes: no NUL (every bounded string refuses it, common.messages.limits),
#: and only what UTF-8 can carry (a lone surrogate cannot be on the wire: the codec refuses it on
#: encode, and the round trips failed whenever hypothesis drew one).
texts = st.text(alphabet=st.characters(codec="utf-8", blacklist_characters="\x00"), max_size=40)
names = st.builds(operator.add, st.sampled_from(_ALNUM), st.text(alphabet=_ALNUM + "_.-", max_size=63))
vm_create_bodies = st.fixed_dictionaries(
    {
        "name": names,
        "vcpus": st.integers(min_value=1, max_value=limits.MAX_VCPUS),
        "memory_mib": st.integers(min_value=1, max_value=limits.MAX_MEMORY_MIB),
        "disk_gib": st.integers(min_value=1, max_value=limits.MAX_DISK_GIB),
    },
    optional={
        "host": st.none() | names,
        "wait": st.booleans(),
        "dry_run": st.booleans(),
        "start": st.booleans(),
        "idempotency_key": st.none() | texts,
        "domain_type": st.sampled_from([None, "kvm", "qemu", "test"]),
    },
)


@settings(max_examples=150, deadline=None)
@given(vm_create_bodies)
def test_random_valid_vm_create_bodies_round_trip(body: dict[str, Any]) -> None:
    req = from_wire(VmCreate, codec.decode(codec.encode(body)))
    plain = to_wire(req)
    for key, value in body.items():
        assert plain[key] == value
    assert from_wire(VmCreate, codec.decode(codec.encode(plain))) == req


disk_targets = st.lists(st.sampled_from([f"vd{c}" for c in "abcdefgh"]), unique=True, max_size=4)


@st.composite
def vm_specs(draw: st.DrawFn) -> vm.VmSpec:
    vcpus = draw(st.integers(1, 64))
    memory = draw(st.integers(1, 2**20))
    disks = tuple(
        vm.DiskSpec(
            target=t,
            size_gib=draw(st.integers(1, 4096)),
            format=draw(st.sampled_from(vm.DiskFormat)),
            bus=draw(st.sampled_from(vm.DiskBus)),
            cache=draw(st.sampled_from(vm.CacheMode)),
            io=draw(st.none() | st.sampled_from(vm.IoMode)),
            pool=draw(st.none() | st.just("default")),
        )
        for t in draw(disk_targets)
    )
    nics = tuple(
        vm.NicSpec(
            kind=draw(st.sampled_from(vm.NicKind)), source=src, model=draw(st.sampled_from(vm.NicModel))
        )
        for src in draw(st.lists(st.sampled_from(["default", "br0", "br1"]), max_size=3))
    )
    return vm.VmSpec(
        uuid=draw(st.uuids()).hex,
        name=draw(names),
        vcpus=vcpus,
        memory_mib=memory,
        max_vcpus=draw(st.sampled_from([0, vcpus, vcpus + 2])),
        max_memory_mib=draw(st.sampled_from([0, memory, memory * 2])),
        domain_type=draw(st.sampled_from(vm.DomainType)),
        disks=disks,
        nics=nics,
        graphics=draw(st.none() | st.builds(vm.GraphicsSpec, port=st.none() | st.integers(5900, 65535))),
        autostart=draw(st.booleans()),
        description=draw(texts),
    )


@settings(max_examples=60, deadline=None)
@given(vm_specs())
def test_random_vm_specs_round_trip(spec: vm.VmSpec) -> None:
    assert from_wire(vm.VmSpec, codec.decode(codec.encode(to_wire(spec)))) == spec
