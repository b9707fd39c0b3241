"""The generated reference sections of docs/protocol.md, from the code that defines the protocol.

Every table a client implementer relies on is rendered here from the objects the running system
uses, so the reference cannot drift from them: operation descriptors
(:data:`~common.messages.catalogue.CATALOGUE`), the message types reachable from their bodies and
results, the wire error allow-list (:data:`~common.errors.WIRE_TYPES`) and the broker topology
(:mod:`common.transport.topology`). Field meanings come from the message modules' own source: a
class's docstring, the ``#:`` comment above a field, a field's trailing ``# ...`` comment, and
the checks its ``__post_init__`` makes.

docs/protocol.md keeps its hand-written prose; each generated section sits between markers::

    <!-- generated: kinds -->
    ...
    <!-- end generated: kinds -->

Run ``python -m common.protocol_reference --write docs/protocol.md`` to regenerate them and
``--check docs/protocol.md`` to fail (exit 1, with a diff) when the committed file is stale.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import enum
import inspect
import io
import re
import sys
import tokenize
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from common import codec
from common.errors import WIRE_TYPES, VirtfleetError
from common.messages.catalogue import CATALOGUE, FAMILY_MODULES
from common.messages.descriptor import (
    LONGER,
    TIMEOUT_SECONDS,
    ApiCall,
    Family,
    Op,
    Role,
    Route,
    Timeout,
    ToHostAgent,
)
from common.messages.vm import VmForward
from common.transport import topology
from common.transport.topology import (
    AGENT_QUEUE_PATTERN,
    DEFAULT_EXCHANGE,
    EXCHANGES,
    SHARED_QUEUES,
    Exchange,
    Queue,
    agent_queue,
)

#: The generated sections, in the order they appear in docs/protocol.md.
SECTIONS: tuple[str, ...] = (
    "exchanges",
    "queues",
    "queue-arguments",
    "bindings",
    "errors",
    "families",
    "kinds",
    "checks",
    "messages",
    "enums",
)

#: The command that regenerates the file (quoted in failure messages).
REGENERATE = "python -m common.protocol_reference --write docs/protocol.md"

#: What RabbitMQ does with each queue argument virtfleet declares. A new argument in the
#: topology fails the generation until it is explained here: a client must know what it
#: redeclares.
QUEUE_ARGUMENT_MEANINGS: Mapping[str, str] = types.MappingProxyType(
    {
        "x-dead-letter-exchange": (
            "The exchange that receives what the queue dead-letters: messages rejected with "
            "`requeue=false` (`basic.nack` / `basic.reject`), messages whose per-message `expiration` "
            "ran out while queued, messages dropped from the head by `x-max-length` (default "
            "overflow) and messages past `x-delivery-limit`. No `x-dead-letter-routing-key` is set, so a dead letter keeps its routing key; "
            "the broker adds the `x-death` header (queue, reason `rejected` / `expired` / `maxlen`, count)."
        ),
        "x-max-length": (
            "The most messages the queue holds. Beyond it `x-overflow` decides; without `x-overflow` "
            "(`drop-head`) the oldest message is dropped, or dead-lettered if the queue has a "
            "dead-letter exchange."
        ),
        "x-max-length-bytes": (
            "The most bytes (bodies of the ready messages) the queue holds; beyond it `x-overflow` "
            "decides, as for `x-max-length`."
        ),
        "x-queue-type": (
            "`quorum`: the queue is replicated on every node of a RabbitMQ cluster (Raft) and survives "
            "the loss of a minority of them; it is durable and neither exclusive nor auto-delete. A "
            "queue cannot change type: redeclaring a classic queue as quorum is refused (406), and "
            "`virtfleet-controller broker migrate` moves an older release's classic queues."
        ),
        "x-delivery-limit": (
            "How often a message may come back to the queue unacknowledged (a `basic.nack` with "
            "`requeue=true`, or its consumer's connection closing) before the broker dead-letters it "
            "(reason `delivery_limit`): a message that kills every consumer that takes it does not "
            "go round forever."
        ),
        "x-overflow": (
            "What a full queue does: `reject-publish` refuses new messages (a publisher in confirm "
            "mode gets `basic.nack`; a refused message is not dead-lettered) instead of dropping old ones. "
            "A quorum queue refuses once it is over the limit, so it holds one message more."
        ),
    }
)

_NONE = type(None)
_PRIMITIVES: tuple[type, ...] = (str, int, float, bool, bytes)
_SKIP_COMMENT = re.compile(r"^(noqa|type:|pragma)\b")
_RST_ROLE = re.compile(r":(?:class|func|data|attr|meth|mod|exc|obj):`(~?)([^`]+)`")
_RST_LITERAL = re.compile(r"``([^`]+)``")
_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")


# =============================================================================== text helpers


def _md(text: str) -> str:
    """reStructuredText markup of docstrings and comments -> Markdown."""
    text = _RST_ROLE.sub(lambda m: f"`{m.group(2).rpartition('.')[2] if m.group(1) else m.group(2)}`", text)
    return _no_tags(_RST_LITERAL.sub(r"`\1`", text))


def _no_tags(text: str) -> str:
    """``<kind>`` outside code spans written so that Markdown shows it instead of taking it for HTML."""
    parts = re.split(r"(`+[^`]*`+)", text)
    return "".join(p if p.startswith("`") else _TAG_START.sub("&lt;", p) for p in parts)


def _cell(text: str) -> str:
    """Text fit for one table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _code(text: str) -> str:
    """``text`` as a Markdown code span (longer fences when it holds backticks)."""
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _doc(obj: object) -> str:
    """An object's own docstring (not an inherited one), cleaned, as Markdown; "" if none."""
    raw = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    return _md(inspect.cleandoc(raw)) if isinstance(raw, str) else ""


def _first_paragraph(text: str) -> str:
    return text.split("\n\n", 1)[0]


def _sentence(text: str) -> str:
    """``text`` ending in a full stop, so that notes can follow it ("" stays "")."""
    return text if not text or text.endswith((".", "!", "?")) else f"{text}."


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def type_anchor(cls: type) -> str:
    """The Markdown anchor of a message type or an enum in the generated sections."""
    prefix = "enum" if issubclass(cls, enum.Enum) else "type"
    return f"{prefix}-{cls.__name__}"


def _link(cls: type) -> str:
    return f"[{cls.__name__}](#{type_anchor(cls)})"


# =============================================================================== source reading


@dataclass(frozen=True, slots=True)
class _Source:
    """One module's source: its syntax tree, its lines and its comments by line."""

    tree: ast.Module
    lines: tuple[str, ...]
    comments: Mapping[int, str]

    @classmethod
    def of(cls, module: types.ModuleType) -> _Source:
        text = inspect.getsource(module)
        comments = {
            tok.start[0]: tok.string[1:].strip()
            for tok in tokenize.generate_tokens(io.StringIO(text).readline)
            if tok.type == tokenize.COMMENT
        }
        return cls(ast.parse(text), tuple(text.splitlines()), comments)

    def top_level(self, name: str) -> ast.ClassDef | ast.FunctionDef | None:
        for node in self.tree.body:
            if isinstance(node, ast.ClassDef | ast.FunctionDef) and node.name == name:
                return node
        return None

    def attribute_comments(self, body: Sequence[ast.stmt]) -> dict[str, str]:
        """name -> the ``#:`` comment above and the trailing ``# ...`` comment of each assignment."""
        out: dict[str, str] = {}
        for node in body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                name = node.target.id
            elif (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
            ):
                name = node.targets[0].id
            else:
                continue
            above: list[str] = []
            line = node.lineno - 1
            while line >= 1 and self.lines[line - 1].lstrip().startswith("#:"):
                above.insert(0, self.lines[line - 1].lstrip()[2:].strip())
                line -= 1
            end = node.end_lineno or node.lineno
            trailing = [
                self.comments[n]
                for n in range(node.lineno, end + 1)
                if n in self.comments
                and not self.lines[n - 1].lstrip().startswith("#")
                and not _SKIP_COMMENT.match(self.comments[n])
            ]
            text = " ".join([*above, *trailing]).strip()
            if text:
                out[name] = _md(text)
        return out


class _Sources:
    """Module sources, read once per rendering (no module-level cache: nothing outlives a call)."""

    def __init__(self) -> None:
        self._modules: dict[str, _Source] = {}

    def of(self, obj: Any) -> _Source:
        name = obj.__name__ if isinstance(obj, types.ModuleType) else obj.__module__
        if name not in self._modules:
            self._modules[name] = _Source.of(sys.modules[name])
        return self._modules[name]

    def class_node(self, cls: type) -> ast.ClassDef:
        node = self.of(cls).top_level(cls.__name__)
        if not isinstance(node, ast.ClassDef):
            raise LookupError(f"{cls.__module__}.{cls.__name__} is not a top-level class of its module")
        return node

    def member_comments(self, cls: type) -> dict[str, str]:
        return self.of(cls).attribute_comments(self.class_node(cls).body)


# =============================================================================== the model


def _type_leaves(tp: Any) -> list[Any]:
    args = typing.get_args(tp)
    return [tp, *[leaf for arg in args for leaf in _type_leaves(arg)]]


def _is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def _is_enum(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, enum.Enum)


@dataclass(frozen=True, slots=True)
class Reachable:
    """The message types and enums reachable from the bodies and results of a catalogue."""

    messages: tuple[type[msgspec.Struct], ...]
    enums: tuple[type[enum.Enum], ...]
    #: type -> where it is used: ``("body", kind)``, ``("result", kind)`` or ``("field", Type.field)``
    uses: Mapping[type, tuple[tuple[str, str], ...]]


def reachable(catalogue: Mapping[str, Op[Any, Any]] = CATALOGUE) -> Reachable:
    """Every message type and enum a body or result of ``catalogue`` contains, in reference order."""
    uses: dict[type, list[tuple[str, str]]] = {}
    todo: list[type] = []
    for op in catalogue.values():
        for role, tp in (("body", op.body), ("result", op.result)):
            if _is_struct(tp):
                uses.setdefault(tp, []).append((role, op.kind))
                todo.append(tp)
    messages: list[type[msgspec.Struct]] = []
    enums: list[type[enum.Enum]] = []
    while todo:
        cls = todo.pop(0)
        if cls in messages:
            continue
        messages.append(cls)
        for info in msgspec.structs.fields(cls):
            for leaf in _type_leaves(info.type):
                if _is_struct(leaf) or _is_enum(leaf):
                    where = ("field", f"{cls.__name__}.{info.encode_name}")
                    if where not in uses.setdefault(leaf, []):
                        uses[leaf].append(where)
                if _is_struct(leaf):
                    todo.append(leaf)
                elif _is_enum(leaf) and leaf not in enums:
                    enums.append(leaf)
    sources = _Sources()
    return Reachable(
        messages=tuple(sorted(messages, key=lambda cls: _reference_order(cls, sources))),
        enums=tuple(sorted(enums, key=lambda cls: _reference_order(cls, sources))),
        uses={tp: tuple(where) for tp, where in uses.items()},
    )


def _reference_order(cls: type, sources: _Sources) -> tuple[int, str, int, str]:
    """Family modules in catalogue order, then any other module by name; source order inside one."""
    names = [m.__name__ for m in FAMILY_MODULES]
    module_rank = names.index(cls.__module__) if cls.__module__ in names else len(names)
    # Not inspect.getsourcelines: it parses the whole module again for every class.
    return (module_rank, cls.__module__, sources.class_node(cls).lineno, cls.__name__)


def _families(catalogue: Mapping[str, Op[Any, Any]]) -> list[tuple[Family, list[Op[Any, Any]]]]:
    """Families with their operations: agent-served families first, then the rest, each in catalogue order."""
    grouped: dict[str, tuple[Family, list[Op[Any, Any]]]] = {}
    for op in catalogue.values():
        grouped.setdefault(op.family.name, (op.family, []))[1].append(op)
    ordered = list(grouped.values())
    return sorted(ordered, key=lambda fam: not any(op.route is Route.COMMAND for op in fam[1]))


# =============================================================================== type names

_INT64 = (-(2**63), 2**63 - 1)


def _bounded_name(base: str, metas: Sequence[msgspec.Meta]) -> str:
    """A type with msgspec bounds: ``int64`` for the database's range, else e.g. ``int (ge 0, le 9)``
    or ``str (max_length 64)``."""
    bounds = [(meta.ge, meta.le) for meta in metas if meta.ge is not None or meta.le is not None]
    if base == "int" and bounds == [_INT64] and all(m.lt is None and m.gt is None for m in metas):
        return "int64"
    words = [
        f"{name} {value}"
        for meta in metas
        for name in ("ge", "gt", "le", "lt", "min_length", "max_length")
        if (value := getattr(meta, name)) is not None
    ]
    return f"{base} ({', '.join(words)})" if words else base


def type_name(tp: Any) -> str:
    """A field's type as a reader would write it, message types and enums linked to their sections."""
    if tp is _NONE:
        return "None"
    if tp is Any:
        return "Any"
    if tp in _PRIMITIVES:
        return str(tp.__name__)
    if _is_struct(tp) or _is_enum(tp):
        return _link(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _bounded_name(type_name(args[0]), [m for m in tp.__metadata__ if isinstance(m, msgspec.Meta)])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{type_name(args[0])}, ...]"
        return f"tuple[{', '.join(type_name(a) for a in args)}]"
    if origin in (dict, Mapping):
        return f"dict[{type_name(args[0])}, {type_name(args[1])}]"
    if origin in (frozenset, set, list):
        return f"{origin.__name__}[{type_name(args[0])}]"
    if origin is typing.Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    raise TypeError(f"the protocol reference cannot name the type {tp!r}: teach type_name() about it")


def _wire_literal(value: Any) -> str:
    """A default as the plain data a client sends (tuples as lists, enums as their values)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return repr(plain(codec.to_wire(value)))


def _default(info: msgspec.structs.FieldInfo) -> str:
    if info.required:
        return "required"
    value = info.default if info.default is not msgspec.NODEFAULT else info.default_factory()
    if _is_struct(type(value)):
        return f"{_code(type(value).__name__ + '()')} (its defaults)"
    return _code(_wire_literal(value))


# =============================================================================== __post_init__ checks


@dataclass(frozen=True, slots=True)
class Checks:
    """What a message type's ``__post_init__`` checks (also on receipt)."""

    #: the rules, in source order: refusal messages, helper calls, nested message checks
    rules: tuple[str, ...]
    #: fields the checks read
    fields: frozenset[str]
    #: the helper functions called (documented in the ``checks`` section)
    helpers: tuple[Callable[..., Any], ...]


def _message_template(node: ast.expr) -> str:
    """An error message expression as a template: f-string fields become ``{expression}``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts: list[str] = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            elif isinstance(value, ast.FormattedValue):
                conversion = f"!{chr(value.conversion)}" if value.conversion != -1 else ""
                spec = f":{_message_template(value.format_spec)}" if value.format_spec is not None else ""
                parts.append(f"{{{ast.unparse(value.value)}{conversion}{spec}}}")
        return "".join(parts)
    return f"{{{ast.unparse(node)}}}"


def _refusal(node: ast.Raise) -> str | None:
    """The message template of ``raise InvalidRequest(message)``, else None."""
    exc = node.exc
    if (
        isinstance(exc, ast.Call)
        and isinstance(exc.func, ast.Name)
        and exc.func.id == "InvalidRequest"
        and exc.args
    ):
        return _message_template(exc.args[0])
    return None


#: (kind, Markdown text, helper function called) of one check; kinds: ``rule`` (shown),
#: ``field`` (a field the checks read), ``method`` (a method of the message that is followed).
_Item = tuple[str, str, Callable[..., Any] | None]


class _CheckReader:
    """Walks ``__post_init__`` (and the methods and helpers it calls) of message types."""

    def __init__(self, sources: _Sources) -> None:
        self._sources = sources

    def of_class(self, cls: type) -> Checks | None:
        """The checks of a message type, or None when it has no ``__post_init__``."""
        if "__post_init__" not in cls.__dict__:
            return None
        node = self._sources.class_node(cls)
        methods = {n.name: n for n in node.body if isinstance(n, ast.FunctionDef)}
        field_names = {f.name for f in msgspec.structs.fields(cls)}
        scope = vars(sys.modules[cls.__module__])
        rules: list[str] = []
        fields: set[str] = set()
        helpers: list[Callable[..., Any]] = []
        seen: set[str] = set()

        def visit(function: ast.FunctionDef) -> None:
            if function.name in seen:
                return
            seen.add(function.name)
            for kind, value, callee in _items(function, scope):
                if kind == "method" and value in methods:
                    visit(methods[value])
                elif kind == "field" and value in field_names:
                    fields.add(value)
                elif kind == "rule" and value not in rules:
                    rules.append(value)
                if callee is not None and callee not in helpers:
                    helpers.append(callee)

        visit(methods["__post_init__"])
        return Checks(tuple(rules), frozenset(fields), tuple(helpers))

    def of_helper(self, function: Callable[..., Any]) -> tuple[list[str], list[Callable[..., Any]]]:
        """The rules of one helper function and the helpers it calls."""
        node = self._sources.of(function).top_level(function.__name__)
        if not isinstance(node, ast.FunctionDef):
            return [], []
        rules: list[str] = []
        helpers: list[Callable[..., Any]] = []
        for kind, value, callee in _items(node, vars(sys.modules[function.__module__])):
            if kind == "rule" and value not in rules:
                rules.append(value)
            if callee is not None and callee is not function and callee not in helpers:
                helpers.append(callee)
        return rules, helpers


def _items(function: ast.FunctionDef, scope: Mapping[str, Any]) -> list[_Item]:
    """Every check in ``function``, in source order, each rule with the conditions it is under."""
    parents = {child: parent for parent in ast.walk(function) for child in ast.iter_child_nodes(parent)}
    # The value force_setattr stores is shown with it, not again as a check of its own.
    stored = {
        id(node.args[2])
        for node in ast.walk(function)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "force_setattr"
        and len(node.args) == 3
    }
    found: list[tuple[tuple[int, int], _Item]] = []
    for node in ast.walk(function):
        if id(node) in stored:
            continue
        where = (getattr(node, "lineno", 0), getattr(node, "col_offset", 0))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            found.append((where, ("field", node.attr, None)))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append((where, ("field", node.value, None)))  # getattr(self, "name") loops
        elif isinstance(node, ast.Name) and _is_names(scope.get(node.id)):
            found += [(where, ("field", name, None)) for name in scope[node.id]]  # loops over NAMES
        elif isinstance(node, ast.Raise) and (template := _refusal(node)) is not None:
            rule = _ruled(f"refuses {_code(template)}", node, parents, function, scope)
            found.append((where, ("rule", rule, None)))
        elif isinstance(node, ast.Call):
            for kind, text, callee in _call_items(node, scope):
                shown = _ruled(text, node, parents, function, scope) if kind == "rule" else text
                found.append((where, (kind, shown, callee)))
    return [item for _where, item in sorted(found, key=lambda pair: pair[0])]


def _ruled(
    text: str, node: ast.AST, parents: Mapping[ast.AST, ast.AST], function: ast.AST, scope: Mapping[str, Any]
) -> str:
    """``text`` prefixed with the ``if`` / ``for`` / ``except`` it sits in, and the constants they name."""
    conditions: list[str] = []
    involved: list[ast.AST] = [node]
    child, parent = node, parents.get(node)
    while parent is not None and child is not function:
        if isinstance(parent, ast.If) and child is not parent.test:
            test = ast.unparse(parent.test)
            conditions.append(f"if {_code(test if child in parent.body else f'not ({test})')}")
            involved.append(parent.test)
        elif isinstance(parent, ast.For) and child is not parent.iter:
            conditions.append(
                f"for each {_code(f'{ast.unparse(parent.target)} in {ast.unparse(parent.iter)}')}"
            )
            involved.append(parent.iter)
        elif isinstance(parent, ast.ExceptHandler) and parent.type is not None:
            conditions.append(f"when it raises {_code(ast.unparse(parent.type))}")
        child, parent = parent, parents.get(parent)
    prefix = ", ".join(reversed(conditions))
    text = f"{prefix}: {text}" if prefix else text
    return text[:1].upper() + text[1:] + _constants(involved, scope)


def _constants(nodes: Sequence[ast.AST], scope: Mapping[str, Any]) -> str:
    """`` (where `NAME` = `value`)`` for the module constants (patterns, limits, choices) ``nodes`` use."""
    named: dict[str, str] = {}
    for tree in nodes:
        for sub in ast.walk(tree):
            if not isinstance(sub, ast.Name) or sub.id in named or sub.id not in scope:
                continue
            value = scope[sub.id]
            if isinstance(value, re.Pattern):
                named[sub.id] = _code(str(value.pattern))
            elif _is_plain_constant(value):
                named[sub.id] = _code(repr(value))
    if not named:
        return ""
    return " (where " + ", ".join(f"`{name}` = {value}" for name, value in named.items()) + ")"


def _is_names(value: object) -> bool:
    """A module constant listing field names, such as ``RATIO_SETTINGS``."""
    return isinstance(value, tuple) and all(isinstance(v, str) for v in value)


def _is_plain_constant(value: object) -> bool:
    if isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, tuple | frozenset):
        return all(_is_plain_constant(v) for v in value)
    if isinstance(value, Mapping):
        return all(_is_plain_constant(k) and _is_plain_constant(v) for k, v in value.items())
    return False


def _call_items(node: ast.Call, scope: Mapping[str, Any]) -> list[_Item]:
    func = node.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "self":
        return [("method", func.attr, None)]
    if not isinstance(func, ast.Name) or func.id == "InvalidRequest":
        return []
    target = scope.get(func.id)
    if func.id == "force_setattr" and len(node.args) == 3 and isinstance(node.args[1], ast.Constant):
        stored = node.args[2]
        text = f"stores `{node.args[1].value!s}` as {_code(ast.unparse(stored))} returns it"
        helper = (
            scope.get(stored.func.id)
            if isinstance(stored, ast.Call) and isinstance(stored.func, ast.Name)
            else None
        )
        if isinstance(helper, types.FunctionType):
            return [("rule", f"{text} ([{helper.__name__}](#{helper_anchor(helper)}))", helper)]
        return [("rule", text, None)]
    if isinstance(target, type) and _is_struct(target):
        return [("rule", f"checks the values as {_link(target)} does", None)]
    if isinstance(target, types.FunctionType):
        anchor = helper_anchor(target)
        return [("rule", f"{_code(ast.unparse(node))} ([{target.__name__}](#{anchor}))", target)]
    return []


def helper_anchor(function: Callable[..., Any]) -> str:
    """The Markdown anchor of a check helper in the ``checks`` section."""
    return f"check-{function.__module__.rpartition('.')[2]}-{function.__name__}"


# =============================================================================== sections: broker


def _argument(name: str, value: Any) -> str:
    # The value and its type: RabbitMQ compares both when a queue is declared again.
    return f"{_code(f'{name}: {value!r}')} ({type(value).__name__})"


def _all_queues(queues: Sequence[Queue]) -> list[tuple[Queue, bool]]:
    """(queue, is the agent template) for the shared queues and the agent queue template."""
    template = agent_queue("<host_id>")
    if template.name != AGENT_QUEUE_PATTERN:
        raise ValueError(
            f"agent_queue() names {template.name}, AGENT_QUEUE_PATTERN says {AGENT_QUEUE_PATTERN}"
        )
    return [(template, True), *((q, False) for q in queues)]


def render_exchanges(exchanges: Sequence[Exchange] = EXCHANGES) -> str:
    """The exchanges table (every exchange is declared durable, without arguments)."""
    sources = _Sources()
    comments = sources.of(topology).attribute_comments(sources.of(topology).tree.body)
    lines = _table(
        ("Exchange", "Type", "Durable", "Meaning"),
        [(_code(x.name), _code(x.type.value), "yes", _md(x.doc)) for x in exchanges],
    )
    lines += [
        "",
        f"Plus the default exchange {_code(repr(DEFAULT_EXCHANGE))} (the empty name), built into the broker and "
        f"never declared: {comments.get('DEFAULT_EXCHANGE', '')}",
    ]
    return "\n".join(lines)


def render_queues(queues: Sequence[Queue] = SHARED_QUEUES) -> str:
    """The queues table: flags and arguments exactly as declared, and the agent queue template."""
    rows = []
    for queue, template in _all_queues(queues):
        arguments = "<br>".join(_argument(k, v) for k, v in queue.arguments.items()) or "none"
        meaning = _md(queue.doc) + (
            "; one per host, `<host_id>` being the agent's host id" if template else ""
        )
        rows.append(
            (
                _code(queue.name),
                _yes(queue.durable),
                _yes(queue.exclusive),
                _yes(queue.auto_delete),
                arguments,
                _yes(queue.disposable),
                meaning,
            )
        )
    header = ("Queue", "Durable", "Exclusive", "Auto-delete", "Arguments", "Disposable", "Meaning")
    return "\n".join(_table(header, rows))


def render_queue_arguments(queues: Sequence[Queue] = SHARED_QUEUES) -> str:
    """What each declared queue argument means, where it is used, and the topology's limits."""
    used: dict[str, list[str]] = {}
    for queue, _template in _all_queues(queues):
        for name, value in queue.arguments.items():
            used.setdefault(name, []).append(f"{_code(queue.name)}: {_code(repr(value))}")
    missing = sorted(set(used) - set(QUEUE_ARGUMENT_MEANINGS))
    if missing:
        raise KeyError(f"explain the queue arguments {missing} in QUEUE_ARGUMENT_MEANINGS")
    lines = _table(
        ("Argument", "What RabbitMQ does with it", "Declared on"),
        [(_code(name), QUEUE_ARGUMENT_MEANINGS[name], ", ".join(on)) for name, on in sorted(used.items())],
    )
    sources = _Sources()
    comments = sources.of(topology).attribute_comments(sources.of(topology).tree.body)
    limits = [
        (_code(name), _code(repr(value)), comments[name])
        for name, value in vars(topology).items()
        if isinstance(value, int) and not isinstance(value, bool) and name in comments
    ]
    lines += [
        "",
        "Limits (`common/transport/topology.py`):",
        "",
        *_table(("Name", "Value", "Meaning"), limits),
    ]
    return "\n".join(lines)


def render_bindings(queues: Sequence[Queue] = SHARED_QUEUES) -> str:
    """Every binding: exchange, routing key, queue (``""`` is the empty routing key)."""
    rows = [
        (_code(b.exchange.name), _code(b.routing_key or '""'), _code(queue.name))
        for queue, _template in _all_queues(queues)
        for b in queue.bindings
    ]
    return "\n".join(_table(("Exchange", "Routing key", "Queue"), rows))


# =============================================================================== sections: errors


def render_errors(wire_types: Mapping[str, type[VirtfleetError]] = WIRE_TYPES) -> str:
    """The wire error allow-list: type, parent, retryable default, meaning."""
    rows = []
    for name, cls in wire_types.items():
        parent = next((b for b in cls.__bases__ if issubclass(b, VirtfleetError)), None)
        rows.append(
            (
                _code(name),
                _code(parent.__name__) if parent is not None else "—",
                "**true**" if cls.retryable_default else "false",
                _first_paragraph(_doc(cls)),
            )
        )
    return "\n".join(_table(("`type`", "Parent", "Default `retryable`", "Meaning"), rows))


# =============================================================================== sections: operations


def render_families(catalogue: Mapping[str, Op[Any, Any]] = CATALOGUE) -> str:
    """The families: name, version, who serves their operations, how many, what they are."""
    rows = []
    for family, ops in _families(catalogue):
        served = sorted({op.served_by.value for op in ops})
        rows.append(
            (
                _code(family.name),
                _code(str(family.version)),
                ", ".join(served),
                str(len(ops)),
                _md(family.doc),
            )
        )
    return "\n".join(_table(("Family", "Version", "Served by", "Kinds", "Meaning"), rows))


def _what(op: Op[Any, Any]) -> str:
    text = _sentence(_md(op.doc))
    forward = op.forward if isinstance(op, ApiCall) else None
    if isinstance(forward, ToHostAgent):
        text += f" Forwarded unchanged to the agent of `body.host` as {_code(forward.command.kind)}."
    elif isinstance(forward, VmForward):
        desired = f", desired power `{forward.desired.value}`" if forward.desired is not None else ""
        text += (
            f" The controller sends {_code(forward.command.kind)} to the VM's host "
            f"(task `{forward.task.value}`{desired})."
        )
    elif forward is not None:
        text += f" Forwarded ({type(forward).__name__})."
    return text


def render_kinds(catalogue: Mapping[str, Op[Any, Any]] = CATALOGUE) -> str:
    """Timeout classes, roles and one table row per kind, grouped by family."""
    sources = _Sources()
    timeout_notes = sources.member_comments(Timeout)
    role_notes = sources.member_comments(Role)
    lines = _table(
        ("Timeout class", "Seconds", "For"),
        [(_code(t.value), f"{TIMEOUT_SECONDS[t]:g}", timeout_notes.get(t.name, "")) for t in Timeout],
    )
    longer = ", ".join(f"{a.value} → {b.value}" for a, b in LONGER.items())
    lines += [
        "",
        f"An API call forwarded to a host (`ToHostAgent`) waits one class longer than its command ({longer}).",
        "",
        *_table(("Role", "Who"), [(_code(r.value), role_notes.get(r.name, "")) for r in Role]),
    ]
    for family, ops in _families(catalogue):
        lines += ["", f"#### Family `{family.name}` {family.version}", "", _md(family.doc), ""]
        rows = []
        for op in ops:
            replies = op.route is not Route.REPORT
            rows.append(
                (
                    _code(op.kind),
                    op.route.value,
                    f"{family.name} {op.introduced}",
                    _link(op.body),
                    _link(op.result) if _is_struct(op.result) else "— (no reply)",
                    f"{op.timeout.value}, {TIMEOUT_SECONDS[op.timeout]:g} s" if replies else "—",
                    op.role.value,
                    _yes(op.idempotent),
                    _what(op),
                )
            )
        header = ("Kind", "Route", "Since", "Body", "Result", "Timeout", "Role", "Idempotent", "What it does")
        lines += _table(header, rows)
    return "\n".join(lines)


# =============================================================================== sections: messages


def _uses(uses: Sequence[tuple[str, str]]) -> str:
    groups: dict[str, list[str]] = {"body": [], "result": [], "field": []}
    for role, where in uses:
        groups[role].append(where)
    parts = []
    if groups["body"]:
        parts.append("Body of " + ", ".join(_code(k) for k in groups["body"]))
    if groups["result"]:
        parts.append("Result of " + ", ".join(_code(k) for k in groups["result"]))
    if groups["field"]:
        links = []
        for where in sorted(groups["field"]):
            owner, _dot, name = where.partition(".")
            links.append(f"[{owner}](#type-{owner}).`{name}`")
        parts.append("In " + ", ".join(links))
    return "; ".join(parts) + "."


def render_messages(catalogue: Mapping[str, Op[Any, Any]] = CATALOGUE) -> str:
    """One subsection per message type reachable from a body or result: its fields and checks."""
    found = reachable(catalogue)
    sources = _Sources()
    reader = _CheckReader(sources)
    lines: list[str] = []
    module = ""
    for cls in found.messages:
        if cls.__module__ != module:
            module = cls.__module__
            path = module.replace(".", "/") + ".py"
            lines += [f"#### Module `{path}`", ""]
        comments = sources.member_comments(cls)
        checks = reader.of_class(cls)
        since: Mapping[str, Any] = getattr(cls, "__since__", {})
        lines += _type_heading(cls, "#####", found)
        fields = msgspec.structs.fields(cls)
        if not fields:
            lines += ["No fields: sent as an empty map `{}`.", ""]
        else:
            rows = []
            for info in fields:
                notes = [_sentence(comments.get(info.name, ""))]
                if info.name in since:
                    notes.append(f"Since {since[info.name]}.")
                if checks is not None and info.name in checks.fields:
                    notes.append("*Checked* (below).")
                rows.append(
                    (
                        _code(info.encode_name),
                        type_name(info.type),
                        _default(info),
                        " ".join(n for n in notes if n),
                    )
                )
            lines += [*_table(("Field", "Type", "Default", "Meaning"), rows), ""]
        if checks is not None and checks.rules:
            lines += ["Checked when built and on receipt (`__post_init__`):", ""]
            lines += [f"* {rule}" for rule in checks.rules]
            lines.append("")
    return "\n".join(lines).rstrip("\n")


def render_checks(catalogue: Mapping[str, Op[Any, Any]] = CATALOGUE) -> str:
    """The helper functions message checks call, with the rules each enforces."""
    sources = _Sources()
    reader = _CheckReader(sources)
    todo: list[Callable[..., Any]] = []
    for cls in reachable(catalogue).messages:
        checks = reader.of_class(cls)
        todo += list(checks.helpers) if checks is not None else []
    done: list[Callable[..., Any]] = []
    rules: dict[Callable[..., Any], list[str]] = {}
    while todo:
        helper = todo.pop(0)
        if helper in done:
            continue
        done.append(helper)
        rules[helper], nested = reader.of_helper(helper)
        todo += nested
    lines: list[str] = []
    for helper in sorted(done, key=lambda f: (f.__module__, f.__name__)):
        title = f'#### <a id="{helper_anchor(helper)}"></a>`{helper.__module__}.{helper.__name__}`'
        lines += [title, ""]
        if doc := _doc(helper):
            lines += [_first_paragraph(doc), ""]
        lines += [f"* {rule}" for rule in rules[helper]] or ["* no refusal of its own"]
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def _type_heading(cls: type, level: str, found: Reachable) -> list[str]:
    """The start of a message type's or an enum's section: its anchored heading, where it is
    used and its docstring."""
    lines = [
        f'{level} <a id="{type_anchor(cls)}"></a>`{cls.__name__}`',
        "",
        _uses(found.uses.get(cls, ())),
        "",
    ]
    if doc := _doc(cls):
        lines += [doc, ""]
    return lines


def render_enums(catalogue: Mapping[str, Op[Any, Any]] = CATALOGUE) -> str:
    """Every enum a message field uses: its values (sent as these exact strings) and their meaning."""
    found = reachable(catalogue)
    sources = _Sources()
    lines: list[str] = []
    for cls in found.enums:
        comments = sources.member_comments(cls)
        lines += _type_heading(cls, "####", found)
        rows = [(_code(repr(member.value)), comments.get(member.name, "")) for member in cls]
        lines += [*_table(("Value", "Meaning"), rows), ""]
    return "\n".join(lines).rstrip("\n")


# =============================================================================== the document


def render_sections() -> dict[str, str]:
    """Every generated section by name, from the running code."""
    renderers: Mapping[str, Callable[[], str]] = {
        "exchanges": render_exchanges,
        "queues": render_queues,
        "queue-arguments": render_queue_arguments,
        "bindings": render_bindings,
        "errors": render_errors,
        "families": render_families,
        "kinds": render_kinds,
        "checks": render_checks,
        "messages": render_messages,
        "enums": render_enums,
    }
    return {name: renderers[name]() for name in SECTIONS}


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- generated: {name} -->", f"<!-- end generated: {name} -->"


def splice(document: str, sections: Mapping[str, str]) -> str:
    """``document`` with the text between each section's markers replaced by the section.

    ValueError when a section's markers are missing, repeated or out of order: the hand-written
    prose decides where each section goes, so it must say so exactly once.
    """
    for name, body in sections.items():
        start, end = _markers(name)
        if document.count(start) != 1 or document.count(end) != 1:
            raise ValueError(f"the document needs exactly one {start!r} and one {end!r}")
        head, _sep, rest = document.partition(start)
        _old, _sep, tail = rest.partition(end)
        if end not in rest:
            raise ValueError(f"{end!r} comes before {start!r}")
        document = f"{head}{start}\n{body}\n{end}{tail}"
    return document


def regenerated(document: str) -> str:
    """``document`` with every generated section rendered from the running code."""
    return splice(document, render_sections())


def diff(path: Path) -> str:
    """A unified diff from the file at ``path`` to its regenerated text ("" when up to date)."""
    current = path.read_text(encoding="utf-8")
    expected = regenerated(current)
    return "".join(
        difflib.unified_diff(
            current.splitlines(keepends=True),
            expected.splitlines(keepends=True),
            fromfile=f"{path} (committed)",
            tofile=f"{path} (generated)",
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``--write PATH`` regenerates the sections in place; ``--check PATH`` exits 1 with a diff if stale."""
    parser = argparse.ArgumentParser(
        prog="python -m common.protocol_reference",
        description="Generate docs/protocol.md's reference sections.",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", type=Path, metavar="PATH", help="rewrite the generated sections of PATH")
    mode.add_argument("--check", type=Path, metavar="PATH", help="exit 1 with a diff when PATH is stale")
    args = parser.parse_args(argv)
    if args.write is not None:
        path: Path = args.write
        text = path.read_text(encoding="utf-8")
        new = regenerated(text)
        if new != text:
            path.write_text(new, encoding="utf-8")
            print(f"{path}: regenerated")
        return 0
    changes = diff(args.check)
    if changes:
        sys.stdout.write(changes)
        print(f"\n{args.check} is out of date: run `{REGENERATE}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
