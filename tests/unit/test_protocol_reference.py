"""docs/protocol.md's generated sections match the code, name everything, and can be read back.

The file is the reference for people writing independent clients, so it must change whenever a
descriptor, a message type, an error or a queue changes: these tests fail until it is
regenerated, and the queue arguments they parse back from the Markdown (what such a client
would redeclare) must be exactly the topology's.
"""

from __future__ import annotations

import ast
import enum
import typing
from pathlib import Path
from typing import ClassVar

import msgspec
import pytest
from protocoldoc import DOC, arguments, code, section, table, yes

from common import protocol_reference as ref
from common.errors import WIRE_TYPES, InvalidRequest
from common.messages.base import Message
from common.messages.catalogue import CATALOGUE
from common.messages.descriptor import Family, Op, Timeout, Version, command
from common.transport import topology
from common.transport.topology import EXCHANGES, SHARED_QUEUES, agent_queue

TEMPLATE_HOST = "<host_id>"


# ------------------------------------------------------------------ (a) the file is up to date


def test_committed_doc_is_what_the_generator_produces() -> None:
    current = DOC.read_text(encoding="utf-8")
    expected = ref.regenerated(current)
    if current != expected:
        changes = ref.diff(DOC)
        shown = "".join(changes.splitlines(keepends=True)[:80])
        pytest.fail(
            f"docs/protocol.md is out of date with the code; regenerate it with\n\n    {ref.REGENERATE}\n\n"
            f"and commit the result. Start of the difference:\n{shown}"
        )


def test_check_mode_exits_1_with_a_diff_on_a_stale_copy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "protocol.md"
    stale.write_text(DOC.read_text().replace("| `vm.start` | command |", "| `vm.start` | api |"))
    assert ref.main(["--check", str(stale)]) == 1
    captured = capsys.readouterr()
    assert "-| `vm.start` | api |" in captured.out
    assert "+| `vm.start` | command |" in captured.out
    assert ref.REGENERATE in captured.err
    assert ref.main(["--write", str(stale)]) == 0
    assert ref.main(["--check", str(stale)]) == 0
    assert "| `vm.start` | command |" in stale.read_text()


def test_writing_keeps_the_prose_and_replaces_only_between_markers() -> None:
    document = "intro\n<!-- generated: errors -->\nold\n<!-- end generated: errors -->\noutro\n"
    out = ref.splice(document, {"errors": "NEW"})
    assert out == "intro\n<!-- generated: errors -->\nNEW\n<!-- end generated: errors -->\noutro\n"
    assert ref.splice(out, {"errors": "NEW"}) == out


@pytest.mark.parametrize(
    "document",
    [
        "no markers at all\n",
        "<!-- generated: errors -->\n<!-- generated: errors -->\n<!-- end generated: errors -->\n",
        "<!-- end generated: errors -->\n<!-- generated: errors -->\n",
    ],
)
def test_missing_repeated_or_swapped_markers_are_refused(document: str) -> None:
    with pytest.raises(ValueError, match="errors"):
        ref.splice(document, {"errors": "x"})


def test_output_is_deterministic() -> None:
    assert ref.render_sections() == ref.render_sections()


# ------------------------------------------------------------------ (b) everything is named


def _message_types() -> tuple[set[type[msgspec.Struct]], set[type[enum.Enum]]]:
    """Message types and enums reachable from any body or result (found without the generator)."""
    messages: set[type[msgspec.Struct]] = set()
    enums: set[type[enum.Enum]] = set()
    # types and type expressions (X | None, tuple[X, ...]) alike
    todo: list[object] = [t for op in CATALOGUE.values() for t in (op.body, op.result)]
    while todo:
        tp = todo.pop()
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            enums.add(tp)
        elif isinstance(tp, type) and issubclass(tp, msgspec.Struct) and tp not in messages:
            messages.add(tp)
            todo += [f.type for f in msgspec.structs.fields(tp)]
        else:
            todo += typing.get_args(tp)  # X | None, tuple[X, ...], dict[str, X]
    return messages, enums


def test_every_kind_has_a_row() -> None:
    kinds = {code(row["Kind"]) for row in _kind_rows()}
    assert kinds == set(CATALOGUE)


def _kind_rows() -> list[dict[str, str]]:
    text = section(DOC.read_text(), "kinds")
    return [row for part in text.split("#### Family ")[1:] for row in table(part)]


def test_kind_rows_say_what_the_descriptors_say() -> None:
    for row in _kind_rows():
        op = CATALOGUE[code(row["Kind"])]
        assert row["Route"] == op.route.value
        assert row["Role"] == op.role.value
        assert yes(row["Idempotent"]) == op.idempotent
        assert row["Since"] == f"{op.family.name} {op.introduced}"
        assert row["Body"] == f"[{op.body.__name__}](#type-{op.body.__name__})"


def test_every_reachable_message_type_and_enum_has_a_section() -> None:
    text = DOC.read_text()
    messages, enums = _message_types()
    assert len(messages) > 100
    for cls in messages:
        assert f'<a id="type-{cls.__name__}"></a>`{cls.__name__}`' in section(text, "messages"), cls
        fields = [f.encode_name for f in msgspec.structs.fields(cls)]
        block = section(text, "messages").split(f'id="type-{cls.__name__}"', 1)[1].split("#####", 1)[0]
        if fields:
            assert [code(row["Field"]) for row in table(block)] == fields, cls
    for enum_cls in enums:
        block = section(text, "enums").split(f'id="enum-{enum_cls.__name__}"', 1)[1].split("####", 1)[0]
        assert [ast.literal_eval(code(row["Value"])) for row in table(block)] == [m.value for m in enum_cls]


def test_every_wire_error_type_has_a_row() -> None:
    rows = table(section(DOC.read_text(), "errors"))
    assert [code(row["`type`"]) for row in rows] == list(WIRE_TYPES)
    for row in rows:
        cls = WIRE_TYPES[code(row["`type`"])]
        assert (row["Default `retryable`"] == "**true**") == cls.retryable_default


def test_every_exchange_and_queue_is_listed() -> None:
    text = DOC.read_text()
    exchanges = {code(row["Exchange"]): code(row["Type"]) for row in table(section(text, "exchanges"))}
    assert exchanges == {x.name: x.type.value for x in EXCHANGES}
    queues = [code(row["Queue"]) for row in table(section(text, "queues"))]
    assert set(queues) == {q.name for q in SHARED_QUEUES} | {topology.AGENT_QUEUE_PATTERN}


def test_field_meanings_come_from_comments_docstrings_and_checks() -> None:
    text = section(DOC.read_text(), "messages")
    host_report = text.split('id="type-HostReport"', 1)[1].split("#####", 1)[0]
    rows = {code(row["Field"]): row for row in table(host_report)}
    assert rows["hw_virt"]["Meaning"].startswith("/dev/kvm is usable")  # a `#:` comment
    assert rows["hypervisor_type"]["Meaning"].startswith("what libvirt calls it")  # a trailing comment
    assert rows["network"]["Type"] == "[HostNetworkReport](#type-HostNetworkReport) | None"
    assert rows["network"]["Default"] == "`None`"
    assert rows["storage"]["Default"] == "required"
    graphics = text.split('id="type-GraphicsSpec"', 1)[1].split("#####", 1)[0]
    assert "VNC port must be between 5900 and 65535" in graphics
    assert "*Checked*" in {code(r["Field"]): r for r in table(graphics)}["port"]["Meaning"]


# ------------------------------------------------------------------ (c) the broker tables read back


def _topology_queues() -> dict[str, topology.Queue]:
    return {q.name: q for q in (*SHARED_QUEUES, agent_queue(TEMPLATE_HOST))}


def test_documented_queue_arguments_are_the_declared_ones() -> None:
    rows = table(section(DOC.read_text(), "queues"))
    declared = _topology_queues()
    assert {code(row["Queue"]) for row in rows} == set(declared)
    for row in rows:
        queue = declared[code(row["Queue"])]
        documented = arguments(row["Arguments"])
        assert documented == dict(queue.arguments), queue.name
        # equal is not enough: 10000 and 10000.0 compare equal but RabbitMQ refuses the swap
        assert {k: type(v) for k, v in documented.items()} == {k: type(v) for k, v in queue.arguments.items()}
        assert yes(row["Durable"]) == queue.durable
        assert yes(row["Exclusive"]) == queue.exclusive
        assert yes(row["Auto-delete"]) == queue.auto_delete
        assert yes(row["Disposable"]) == queue.disposable


def test_documented_bindings_are_the_declared_ones() -> None:
    rows = table(section(DOC.read_text(), "bindings"))
    documented = {(code(r["Exchange"]), code(r["Routing key"]), code(r["Queue"])) for r in rows}
    declared = {
        (b.exchange.name, b.routing_key, queue.name)
        for queue in _topology_queues().values()
        for b in queue.bindings
    }
    assert documented == declared


def test_every_documented_argument_is_explained() -> None:
    rows = table(section(DOC.read_text(), "queue-arguments"))
    used = {name for q in _topology_queues().values() for name in q.arguments}
    assert {code(row["Argument"]) for row in rows} == used
    assert all(row["What RabbitMQ does with it"] for row in rows)


# ------------------------------------------------------------------ the generator on test-only types

_TEST_FAMILY = Family("testfam", Version(1, 2), "a family for this test")


class Colour(enum.StrEnum):
    """Colours for the test."""

    RED = "red"  # warm
    BLUE = "blue"


class Sample(Message, frozen=True):
    """A test body.

    It has a second paragraph.
    """

    __since__: ClassVar[dict[str, Version]] = {"added": Version(1, 2)}

    #: what the name is
    name: str
    colour: Colour = Colour.RED  # the colour
    tags: tuple[str, ...] = ()
    added: int | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise InvalidRequest(f"a sample needs a name, got {self.name!r}")


class Nothing(Message, frozen=True):
    pass


_SAMPLE: Op[Sample, Nothing] = command(_TEST_FAMILY, "test.sample", Sample, Nothing, Timeout.NORMAL, "try it")


def test_generator_renders_comments_defaults_since_and_checks() -> None:
    catalogue = {"test.sample": _SAMPLE}
    kinds = ref.render_kinds(catalogue)
    assert (
        "| `test.sample` | command | testfam 1.0 | [Sample](#type-Sample) | [Nothing](#type-Nothing) "
        "| normal, 120 s | controller | no | try it. |" in kinds
    )
    messages = ref.render_messages(catalogue)
    assert "A test body.\n\nIt has a second paragraph." in messages
    assert "| `name` | str | required | what the name is. *Checked* (below). |" in messages
    assert "| `colour` | [Colour](#enum-Colour) | `'red'` | the colour. |" in messages
    assert "| `tags` | tuple[str, ...] | `[]` |  |" in messages
    assert "| `added` | int \\| None | `None` | Since 1.2. |" in messages
    assert "* If `not self.name`: refuses `a sample needs a name, got {self.name!r}`" in messages
    assert "No fields: sent as an empty map `{}`." in messages
    enums = ref.render_enums(catalogue)
    assert "| `'red'` | warm |" in enums
    assert "Colours for the test." in enums


def test_an_unknown_queue_argument_must_be_explained_first() -> None:
    odd = topology.Queue("odd", arguments={"x-single-active-consumer": True})
    with pytest.raises(KeyError, match="x-single-active-consumer"):
        ref.render_queue_arguments((odd,))
