"""Users' YAML files (taskdefs, SWOP profiles): loading with line numbers, and validation whose errors name
the file, the line, the key path and what to do — one line per problem, e.g.

    taskdefs/run.yaml:12: Body.SharedContent[0].MType: must be 'BIND' or 'VOLUME', got the text 'bind'

Models for such files derive from `YamlModel`; lists of environment variables use the `EnvVars` type.

Files are read with ruamel.yaml's round-trip loader, which records where every key and item sits and
refuses a key written twice, then handed to callers as plain dict/list/str/int/float/bool/None (and
datetime.date/datetime for timestamps). The YAML is 1.2, ruamel's default: `yes`, `no`, `on` and `off`
are text, not booleans (the 1.1 rule turned an env value `yes` into "True" and a key `on:` into True),
`0755` is the number 755 and `1:30` is text. Fields typed bool still accept yes/no/on/off: pydantic
reads those words as true and false.
"""

from __future__ import annotations

import datetime as dt
import difflib
import io
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    ModelWrapValidatorHandler,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.composer import Composer, ComposerError
from ruamel.yaml.constructor import ConstructorError, DuplicateKeyError, RoundTripConstructor
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import AliasEvent
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.reader import ReaderError
from ruamel.yaml.scanner import RoundTripScanner, ScannerError
from ruamel.yaml.scalarbool import ScalarBoolean

from swarmlearn.errors import ConfigError

KeyPath = tuple[Any, ...]  # ("Body", "Envvars", 1): mapping keys and sequence indexes, as pydantic's `loc`
M = TypeVar("M", bound=BaseModel)

# Validators that must point at another line (a duplicate's first use) find the LineMap here in the
# pydantic validation context.
LINES = "yaml_lines"


# --------------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class LineMap:
    """The 1-based line of every mapping key and sequence item of one YAML file, by key path."""

    lines: Mapping[KeyPath, int]

    def line_of(self, path: Iterable[Any]) -> int:
        """Line of `path`, or of its deepest prefix in the file (a missing key: the mapping that lacks it)."""
        path = tuple(path)
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path, 1)


def load_yaml(path: str | os.PathLike) -> tuple[Any, LineMap]:
    """Parse one YAML document safely; return its data (plain Python values) and where each key and
    item sits.

    Raises ConfigError for a missing or unreadable file, a syntax error (with line:column), a key
    written twice in one mapping (YAML would silently keep the last), tags naming Python objects or
    other types, and hostile shapes: nesting deeper than MAX_DEPTH, also once aliases are expanded,
    aliases and `<<:` merges that expand to more than MAX_NODES values (an "alias bomb"), an alias inside
    itself, and files over MAX_YAML_BYTES.
    """
    raw = _read(path)
    reader = _round_trip_reader()
    root = None
    try:
        root = reader.compose(raw)
        document = None if root is None else reader.constructor.construct_document(root)
    except _WrittenTwice as exc:
        where = _node_path(root, exc.mapping) if root is not None else None
        key = key_path((*where, exc.key)) if where is not None else str(exc.key)
        raise ConfigError(f"{path}:{exc.problem_mark.line + 1}: {key}: this key is written twice in one mapping "
                          f"(first on line {exc.first_line}); keep one") from None
    except _OverBudget as exc:
        raise ConfigError(f"{path}:{exc.problem_mark.line + 1}: {exc.problem}; {exc.advice}") from None
    except MarkedYAMLError as exc:
        raise ConfigError(_syntax_error(path, exc)) from exc
    except ReaderError as exc:  # bytes that are not UTF-8 text, or control characters
        line = raw[:exc.position].count(b"\n") + 1 if isinstance(exc.position, int) else 1
        raise ConfigError(f"{path}:{line}: not a YAML text file: {' '.join(str(exc).split())}") from exc
    except YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    plain = _Plain(path, 1 if root is None else root.start_mark.line + 1)
    return plain.value(document, (), plain.lines[()], frozenset()), LineMap(plain.lines)


def dump_yaml(data: Any) -> str:
    """Plain data as block-style YAML 1.2 text, keys in their order, that load_yaml reads back equal."""
    writer = YAML(typ="rt")
    writer.default_flow_style = False
    text = io.StringIO()
    writer.dump(data, text)
    return text.getvalue()


# A file whose aliases expand to more values than this is refused: `*alias` reuses a node, so a few
# lines can stand for billions of them, and copying or validating that would never end; `<<: [*a, *a]`
# makes ruamel copy every key of `a` once per alias while it constructs. The composer counts the
# expanded size before either happens.
MAX_NODES = 100_000
# Real files nest a handful of levels; the limit keeps every recursive step (composing, constructing,
# copying, pydantic) far from Python's recursion limit.
MAX_DEPTH = 64
# A taskdef or profile is a few kilobytes; a file far bigger is a mistake (data pasted in, the wrong
# file) and would only fail later, less clearly (an SN refusing a task too big to send, say).
MAX_YAML_BYTES = 1 << 20


def _read(path: str | os.PathLike) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)  # bytes: the reader detects UTF-8/UTF-16 and reports bad bytes by position
            if len(raw) > MAX_YAML_BYTES:
                size = os.fstat(f.fileno()).st_size  # 0 for a pipe or a device
                what = f"{size} bytes" if size > MAX_YAML_BYTES else f"over {MAX_YAML_BYTES} bytes"
                raise ConfigError(f"{path}: {what}, more than the {MAX_YAML_BYTES >> 20} MiB a swarmlearn YAML file "
                                  f"may have; is it the right file? Keep data in the files it names")
            return raw
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; check the path (relative paths start at {os.getcwd()})") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a YAML file; name the file inside it") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}; check its permissions") from None


def _round_trip_reader() -> YAML:
    """A fresh round-trip loader (one per file: ruamel's YAML objects keep state while loading)."""
    reader = YAML(typ="rt")
    reader.Scanner = _DepthLimitedScanner
    reader.Composer = _BoundedComposer
    reader.Constructor = _Constructor
    return reader


_TOO_DEEP = f"nested more than {MAX_DEPTH} levels deep"
_MERGE_TAG = "tag:yaml.org,2002:merge"  # what the resolver makes of a `<<` key
_TOO_MANY = (f"holds more than {MAX_NODES} values once its *aliases are expanded",
             "write the repeated parts out or use fewer *aliases")
_TOO_DEEP_ALIASED = (f"{_TOO_DEEP} once its *aliases are expanded",
                     "use fewer *aliases inside one another, or flatten the values they name")


class _OverBudget(MarkedYAMLError):
    """A document that expands past MAX_NODES or MAX_DEPTH; `advice` says what to do about it."""

    def __init__(self, reason: tuple[str, str], mark: Any):
        super().__init__(problem=reason[0], problem_mark=mark)
        self.advice = reason[1]


class _DepthLimitedScanner(RoundTripScanner):
    """Refuses brackets nested deeper than MAX_DEPTH as soon as it reads them: the scanner's work per
    bracket grows with the brackets still open, so a file of a million `[` would take hours."""

    def fetch_flow_collection_start(self, TokenClass: Any, to_push: str) -> None:
        if self.flow_level >= MAX_DEPTH:
            raise ScannerError(None, None, _TOO_DEEP, self.reader.get_mark())
        super().fetch_flow_collection_start(TokenClass, to_push)


class _BoundedComposer(Composer):
    """Refuses, where it happens, nesting deeper than MAX_DEPTH (indentation, brackets inside it, and
    *aliases inside one another) and a document of more than MAX_NODES values once its aliases are
    expanded — before the constructor or the copy into plain values expands anything.

    Every node's expanded size and height are worked out once, as it is composed; an alias then costs
    what its anchor's node cost, looked up, so counting is as fast as reading. A `<<:` merge costs each
    merged map in full (the work ruamel does to merge it), but nests no deeper: the merged keys join the
    map that merges them. Scalar keys are not counted (a key is one scalar, written where it stands).
    """

    def __init__(self, loader: Any = None):
        super().__init__(loader)
        self.warn_double_anchors = False  # an anchor name used twice is valid YAML (the later one counts)
        self.depth = 0  # nodes open around the one being composed
        self.deepest = 0  # the deepest level the node being composed reaches, aliases expanded
        self.values = 0  # values composed so far, aliases expanded
        self.expanded: dict[int, tuple[int, int]] = {}  # id(anchored node) -> (values, levels) it expands to
        self.merge_levels: set[int] = set()  # levels where the value of a `<<` key is open

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.parser.peek_event()
        if self.depth >= MAX_DEPTH:
            raise ComposerError(None, None, _TOO_DEEP, event.start_mark)
        lift = self._merge_lift(parent, index)
        if isinstance(event, AliasEvent):
            node = super().compose_node(parent, index)
            # an alias inside the value it names has no size yet: the constructor refuses it
            values, levels = self.expanded.get(id(node), (1, 1))
            reach = self.depth + levels - lift
            if reach > MAX_DEPTH:
                raise _OverBudget(_TOO_DEEP_ALIASED, event.start_mark)
            self.deepest = max(self.deepest, reach)
            self._spend(values, event.start_mark)
            return node
        values_before, deepest_around = self.values, self.deepest
        self.depth += 1
        self.deepest = self.depth
        if lift == 1:
            self.merge_levels.add(self.depth)
        try:
            node = super().compose_node(parent, index)
        finally:
            self.merge_levels.discard(self.depth)
            self.depth -= 1
        is_key = isinstance(parent, MappingNode) and index is None  # ruamel composes a key with no index
        if not (is_key and isinstance(node, ScalarNode)):
            self._spend(1, event.start_mark)
        if node.anchor is not None:
            self.expanded[id(node)] = (max(1, self.values - values_before), self.deepest - self.depth)
        self.deepest = max(self.deepest, deepest_around)
        return node

    def _merge_lift(self, parent: Any, index: Any) -> int:
        """How many levels above where it is written a map's keys land when `<<:` merges it: one for the
        value of the `<<` key, two for an item of the list there; 0 for anything not merged."""
        if isinstance(parent, MappingNode) and isinstance(index, Node) and index.tag == _MERGE_TAG:
            return 1
        if isinstance(parent, SequenceNode) and self.depth in self.merge_levels:
            return 2
        return 0

    def _spend(self, values: int, mark: Any) -> None:
        self.values += values
        if self.values > MAX_NODES:
            raise _OverBudget(_TOO_MANY, mark)


_SELF_ALIAS = "an *alias inside the value it names would repeat forever"


class _WrittenTwice(DuplicateKeyError):
    """ruamel's duplicate-key error, plus the mapping node and the line of the key's first use."""

    def __init__(self, mapping: MappingNode, key: Any, mark: Any, first_line: int):
        super().__init__("while constructing a mapping", mapping.start_mark, "found a duplicate key", mark)
        self.mapping, self.key, self.first_line = mapping, key, first_line


class _Constructor(RoundTripConstructor):
    """The round-trip constructor, with two changes. A duplicate key names the line of its first use
    (ruamel's own error prints both values instead, which for an alias bomb never finishes). A bad
    scalar (an integer of 5000 digits, 2001-13-45) is a YAML error at its line, not a ValueError. And
    an alias inside the value it names is an error, not None."""

    def check_mapping_key(self, node: Any, key_node: Any, mapping: Any, key: Any, value: Any) -> bool:
        try:
            written = key in mapping
        except TypeError:  # `? [[a]]`: a key holding a list
            raise ConstructorError(None, None, "a key must be text or a number, not a list or a mapping",
                                   key_node.start_mark) from None
        if written:
            first_line = mapping.lc.key(key)[0] + 1
            raise _WrittenTwice(node, key, key_node.start_mark, first_line)
        return True

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        if node in self.recursive_objects and node not in self.constructed_objects:
            # ruamel would put None where the value names itself (`&b [*b]`): say so instead
            raise ConstructorError(None, None, _SELF_ALIAS, node.start_mark)
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError, TypeError, LookupError, AttributeError) as exc:
            # the last three: ruamel's constructors on shapes they do not expect (`!!int ` with no digits)
            reason = str(exc).split(";")[0]  # Python's advice to raise its integer size limit is not the user's
            raise ConstructorError(None, None, f"cannot read this value: {reason}", node.start_mark) from None


def _node_path(root: Node, target: Node) -> KeyPath | None:
    """The key path of `target` in the composed document (for messages; visits each node once)."""
    todo, seen = [(root, ())], set()
    while todo:
        node, where = todo.pop()
        if node is target:
            return where
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, SequenceNode):
            todo += [(item, (*where, i)) for i, item in enumerate(node.value)]
        elif isinstance(node, MappingNode):
            todo += [(value, (*where, key.value)) for key, value in node.value if isinstance(key, ScalarNode)]
    return None


class _Plain:
    """Copies ruamel's round-trip values (CommentedMap, CommentedSeq, ScalarString, ScalarInt...) into
    plain Python ones, recording the line of every key and item. The composer has counted what this
    expands (no more than MAX_NODES values, MAX_DEPTH deep), so the copy and its recursion are bounded."""

    def __init__(self, path: str | os.PathLike, root_line: int):
        self.path = path
        self.lines: dict[KeyPath, int] = {(): root_line}
        self.merged_lines: dict[int, dict[Any, int]] = {}  # id(mapping) -> {merged key: line}

    def value(self, value: Any, where: KeyPath, line: int, ancestors: frozenset[int]) -> Any:
        if id(value) in ancestors:
            raise ConfigError(f"{self.path}:{line}: {key_path(where)}: {_SELF_ALIAS}; write the value out")
        if type(value) is CommentedMap and value.tag.value is None:
            return self._mapping(value, where, ancestors | {id(value)})
        if type(value) is CommentedSeq and value.tag.value is None:
            return self._sequence(value, where, ancestors | {id(value)})
        return self._scalar(value, where, line)

    def _scalar(self, value: Any, where: KeyPath, line: int) -> Any:
        if value is None or type(value) in (bool, dt.date):
            return value
        if isinstance(value, ScalarBoolean):  # an anchored true/false (bool cannot be subclassed)
            return bool(value)
        for kind in (int, float, str):  # ScalarInt, ScalarFloat, the ScalarStrings
            if isinstance(value, kind):
                return kind(value)
        if isinstance(value, dt.datetime):  # ruamel's TimeStamp
            return dt.datetime(*value.timetuple()[:6], value.microsecond, tzinfo=value.tzinfo)
        raise ConfigError(f"{self.path}:{line}: {key_path(where) or 'the document'}: {_not_plain(value)}; write "
                          f"text, a number, true/false, a list or a mapping")

    def _mapping(self, mapping: CommentedMap, where: KeyPath, ancestors: frozenset[int]) -> dict:
        out = {}
        for key, item in mapping.items():  # keys written here, then the ones merged in by `<<: *anchor`
            line = self._key_line(mapping, key)
            if isinstance(key, (tuple, Mapping)):  # `? [a, b]`: ruamel makes a CommentedKeySeq/KeyMap of it
                raise ConfigError(f"{self.path}:{line}: {key_path(where) or 'the document'}: a key must be text or "
                                  f"a number, not a list or a mapping; write it as text")
            key = self._scalar(key, where, line)
            self.lines[(*where, key)] = line
            out[key] = self.value(item, (*where, key), line, ancestors)
        return out

    def _sequence(self, sequence: CommentedSeq, where: KeyPath, ancestors: frozenset[int]) -> list:
        out = []
        for i, item in enumerate(sequence):
            line = self.lines[(*where, i)] = sequence.lc.item(i)[0] + 1
            out.append(self.value(item, (*where, i), line, ancestors))
        return out

    def _key_line(self, mapping: CommentedMap, key: Any) -> int:
        """Where `key` is written: in this mapping, or (merged by `<<: *anchor`) in the anchored one, or in
        the one that one merged, and so on."""
        if key in (mapping.lc.data or {}):
            return mapping.lc.key(key)[0] + 1
        return self._merged_lines(mapping).get(key, mapping.lc.line + 1)

    def _merged_lines(self, mapping: CommentedMap) -> dict[Any, int]:
        """The line of each key merged into `mapping`, worked out once per mapping: searching its merged
        maps, and theirs, for every key of every copy took time cubic in the length of a chain of merges."""
        if id(mapping) not in self.merged_lines:
            lines: dict[Any, int] = {}
            for source in mapping.merge:  # the first map listed that has a key gives it
                for key in source:
                    if key not in lines:
                        lines[key] = self._key_line(source, key)
            self.merged_lines[id(mapping)] = lines
        return self.merged_lines[id(mapping)]


# Types the round-trip loader makes for tags we do not take, by the tag users wrote.
_TAG_OF_TYPE = {"CommentedOrderedMap": "!!omap", "CommentedSet": "!!set", "bytes": "!!binary", "list": "!!pairs"}


def _not_plain(value: Any) -> str:
    tag = getattr(getattr(value, "tag", None), "value", None) or _TAG_OF_TYPE.get(type(value).__name__)
    if tag:
        return f"the tag {str(tag).replace('tag:yaml.org,2002:', '!!')} is not allowed (swarmlearn reads plain YAML)"
    return f"a value of Python type {type(value).__name__} is not allowed"


# What people usually did when the YAML reader says this.
_SYNTAX_HINTS = (
    ("'\\t'", "indent with spaces; YAML does not allow tabs"),
    ("cannot start any token", "quote values that start with @ or `"),
    ("mapping values are not allowed", "quote a value that contains \": \", or fix the indentation"),
    ("could not find expected ':'", "a key needs \"key: value\"; check the indentation and close any quote"),
    ("expected <block end>", "this line's indentation does not match the lines above it"),
    ("found unexpected end of stream", "a quote or bracket is never closed"),
    ("found undefined alias", "define the &anchor before using *alias"),
    ("expected a single document", "keep one document per file (remove the extra ---)"),
    ("levels deep", "flatten the brackets or indentation"),
    ("cannot read this value", "quote it to keep it as text, or write a smaller number or a real date"),
    ("repeat forever", "write the value out instead of the *alias"),
    ("a key must be text", "write the key as text"),
    ("duplicate merge key", "merge several anchors with one `<<: [*a, *b]`"),
)


def _syntax_error(path: str | os.PathLike, exc: MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else f"{path}"
    what = exc.problem or exc.context or "not valid YAML"
    if exc.context and exc.problem and exc.context_mark:
        what += f" ({exc.context} on line {exc.context_mark.line + 1})"
    hint = next((h for needle, h in _SYNTAX_HINTS if needle in what),
                "check the indentation, quotes and brackets on this line and the one before")
    return f"{where}: invalid YAML: {' '.join(what.split())}; {hint}"




# --------------------------------------------------------------------------------------------------
# Validation


def validate(model_cls: type[M], path: str | os.PathLike, data: Any = None, context: dict | None = None,
             lines: LineMap | None = None) -> M:
    """Validate the YAML file at `path` (or `data` already read from it) as `model_cls`.

    Raises ConfigError with one line per problem, in file order: `file:line: Key.Path[0]: what; fix`.
    """
    if data is None:
        data, lines = load_yaml(path)
    try:
        return model_cls.model_validate(data, context={**(context or {}), LINES: lines})
    except ValidationError as exc:
        if lines is None:
            try:
                lines = load_yaml(path)[1]
            except ConfigError:  # data did not come from a readable file: report without lines
                pass
        raise ConfigError(format_errors(path, exc, lines)) from exc


def format_errors(path: str | os.PathLike, exc: ValidationError, lines: LineMap | None) -> str:
    """One line per pydantic error, ordered by line (pydantic orders them by field)."""
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        line = lines.line_of(loc) if lines else None
        where = f"{path}:{line}:" if line else f"{path}:"
        at = f" {key_path(loc)}:" if loc else ""
        problems.append((line or 0, f"{where}{at} {_message(err)}"))
    return "\n".join(text for _, text in sorted(problems, key=lambda p: p[0]))


def key_path(loc: Iterable[Any]) -> str:
    """("Body", "Envvars", 1) -> "Body.Envvars[1]"."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) and not isinstance(part, bool) else f".{part}"
    return text.lstrip(".")


_EXPECTED = {
    "string_type": "expected text",
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "list_type": 'expected a list (lines starting with "- ")',
    "dict_type": 'expected a mapping ("key: value" lines)',
    "model_type": 'expected a mapping ("key: value" lines)',
    "model_attributes_type": 'expected a mapping ("key: value" lines)',
}


def _message(err: dict) -> str:
    kind, loc, value = err["type"], err["loc"], err.get("input")
    if kind == "missing":
        parent = f"under {key_path(loc[:-1])}" if len(loc) > 1 else "at the top level"
        return f'required key is missing; add "{loc[-1]}: ..." {parent}'
    if kind == "extra_forbidden":
        return "unknown key; remove it"
    if kind == "literal_error":
        return f"must be {err['msg'].removeprefix('Input should be ')}, got {describe(value)}"
    if kind in _EXPECTED:
        text = f"{_EXPECTED[kind]}, got {describe(value)}"
        if kind == "string_type" and isinstance(value, (dict, list)):
            text += '; quote the value if it contains ": " or starts with [ or {'
        return text
    msg = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        msg = f"{msg[0].lower()}{msg[1:]}, got {describe(value)}"
    return msg


def describe(value: Any) -> str:
    """How a YAML value reads to the person who wrote it."""
    if value is None:
        return "nothing (~)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a yes/no value)"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the text {value[:40] + '...' if len(value) > 40 else value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def line_of(info: ValidationInfo, loc: KeyPath) -> str:
    """"line N" for a key path of the file being validated, for messages that point at a second place."""
    lines = (info.context or {}).get(LINES)
    return f"line {lines.line_of(loc)}" if lines else key_path(loc)


def located_error(problems: list[tuple[KeyPath, str, Any]], title: str = "value") -> ValidationError:
    """A ValidationError at key paths relative to the value being validated; pydantic prefixes them."""
    return ValidationError.from_exception_data(title, [
        InitErrorDetails(type=PydanticCustomError("value_error", message), loc=loc, input=value)
        for loc, message, value in problems])


class YamlModel(BaseModel):
    """Base of every model read from a user's YAML file.

    Unknown keys are errors that list the keys allowed in that mapping (and name a likely typo instead of
    also reporting the key it misspells as missing); numbers are taken where text is expected (`Tag: 1.0`).
    """

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    @classmethod
    def yaml_keys(cls) -> list[str]:
        return [field.alias or name for name, field in cls.model_fields.items()]

    @model_validator(mode="wrap")
    @classmethod
    def _check_keys(cls, data: Any, handler: ModelWrapValidatorHandler, info: ValidationInfo) -> Any:
        if isinstance(data, cls):
            return handler(data)
        allowed = cls.yaml_keys()
        if not isinstance(data, dict):
            raise PydanticCustomError(
                "not_a_mapping", "expected a mapping with keys {keys}, got {got}",
                {"keys": ", ".join(allowed), "got": describe(data)})
        unknown = [key for key in data if key not in allowed]
        if not unknown or cls.model_config.get("extra") != "forbid":
            return handler(data)
        meant = {}
        for key in unknown:
            missing = [k for k in allowed if k not in data]
            guess = [k for k in missing if str(key).lower() == k.lower()] or \
                difflib.get_close_matches(str(key), missing, n=1, cutoff=0.7)
            if guess and guess[0] not in meant.values():
                meant[key] = guess[0]
        try:
            return handler(data)  # raises: there are unknown keys
        except ValidationError as exc:
            errors = exc.errors()
        listed = ", ".join(allowed)
        rebuilt = []
        for err in errors:
            loc = tuple(err["loc"])
            own = len(loc) == 1
            if own and err["type"] == "missing" and loc[0] in meant.values():
                continue  # reported as the typo that stands for it
            if own and err["type"] == "extra_forbidden":
                guess = f'did you mean "{meant[loc[0]]}"? ' if loc[0] in meant else ""
                err = {**err, "type": "unknown_key", "msg": f"unknown key; {guess}allowed keys here: {listed}"}
            rebuilt.append(InitErrorDetails(type=PydanticCustomError(err["type"], err["msg"]), loc=loc,
                                            input=err.get("input")))
        raise ValidationError.from_exception_data(cls.__name__, rebuilt)


# --------------------------------------------------------------------------------------------------
# Key/value lists as users write them


class ItemError(ValueError):
    """A bad entry of a key/value list; `loc` says which (a list index, then maybe the key)."""

    def __init__(self, message: str, loc: KeyPath = ()):
        super().__init__(message)
        self.loc = loc


def key_value_map(value: Any, what: str = "entries") -> dict[str, Any]:
    """A mapping, a list of one-key maps (block or flow style: `[A : 1, B: 2]`), or `~` -> one dict."""
    return {key: v for _, key, v in _entries(value, what)}


def env_list(value: Any) -> dict[str, str]:
    """Environment variables as users write them -> {NAME: "text"}.

    Accepts `~`, a mapping, or a list of one-key maps in block or flow style. Values become text the way
    the original passed them (`5` -> "5", `True` -> "True"). `NAME: ~` sets nothing: the process inherits
    this host's value, as a container did with a bare `-e NAME`.
    """
    out = {}
    for loc, name, v in _entries(value, "environment variables"):
        if any(c.isspace() or c in "=\0" for c in name):
            raise ItemError(f"{name!r} is not a usable environment variable name (no spaces or '=')", loc)
        if isinstance(v, (dict, list)):
            raise ItemError(f"values must be text or numbers, got {describe(v)}; "
                            f'write "{name}: value" (quote the value if it contains ": ")', loc)
        if v is not None:
            out[name] = str(v)
    return out


def _entries(value: Any, what: str) -> list[tuple[KeyPath, str, Any]]:
    """(where, key, value) of each entry. A key set twice is an error: with containers the last silently
    won, and that hid mistakes."""
    if value is None:
        return []
    if isinstance(value, dict):
        items = [((key,), key, v) for key, v in value.items()]
    elif isinstance(value, list):
        items = []
        for i, entry in enumerate(value):
            if not isinstance(entry, dict) or not entry:
                name, eq, rest = entry.partition("=") if isinstance(entry, str) else ("", "", "")
                fix = f' (write "- {name}: {rest}")' if eq else ""
                raise ItemError(f'each of the {what} must be "- NAME: value", got {describe(entry)}{fix}', (i,))
            items += [((i, key), key, v) for key, v in entry.items()]
    else:
        raise ItemError(f'expected {what} as a list of "- NAME: value" lines or a mapping, got {describe(value)}')
    first: dict[str, KeyPath] = {}
    for loc, key, _ in items:
        if not isinstance(key, str) or not key.strip():
            raise ItemError(f"names must be text, got {describe(key)}", loc)
        if key in first:
            raise ItemError(f"{key} is set twice in this list (first at {key_path(first[key])}); keep one", loc)
        first[key] = loc
    return items


def located(normalize: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Wrap a normalizer for pydantic: an ItemError is reported at the entry it names (Envvars[1])."""

    def run(value: Any) -> Any:
        try:
            return normalize(value)
        except ItemError as exc:
            if not exc.loc:
                raise
            raise located_error([(exc.loc, str(exc), value)]) from None

    return run


EnvVars = Annotated[dict[str, str], BeforeValidator(located(env_list))]
KeyValues = Annotated[dict[str, Any], BeforeValidator(located(key_value_map))]
