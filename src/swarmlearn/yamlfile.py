"""Users' YAML files (taskdefs, SWOP profiles): loading with line numbers, and validation whose errors name
the file, the line, the key path and what to do — one line per problem, e.g.

    taskdefs/run.yaml:12: Body.SharedContent[0].MType: must be 'BIND' or 'VOLUME', got the text 'bind'

Models for such files derive from `YamlModel`; lists of environment variables use the `EnvVars` type.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import yaml
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
    """Parse one YAML document safely; return its data and where each key and item sits.

    Raises ConfigError for a missing or unreadable file, a syntax error (with line:column), a key
    written twice in one mapping (YAML would silently keep the last), and hostile shapes: nesting too
    deep to parse, aliases that expand to more than MAX_NODES nodes (an "alias bomb"), and files over
    MAX_YAML_BYTES.
    """
    raw = _read(path)
    loader = None
    try:
        loader = _Loader(raw)
        root = loader.get_single_node()
        lines: dict[KeyPath, int] = {(): 1 if root is None else root.start_mark.line + 1}
        duplicates: list[tuple[KeyPath, int, int]] = []
        if root is not None:
            _index(loader, root, (), lines, duplicates, frozenset(), _Budget(path))
        if duplicates:
            raise ConfigError("\n".join(
                f"{path}:{line}: {key_path(where)}: this key is written twice in one mapping (first on line "
                f"{first}); keep one" for where, line, first in duplicates))
        data = None if root is None else loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(_syntax_error(path, exc)) from exc
    except yaml.reader.ReaderError as exc:  # bytes that are not UTF-8 text, or control characters
        line = raw[:exc.position].count(b"\n") + 1 if isinstance(exc.position, int) else 1
        raise ConfigError(f"{path}:{line}: not a YAML text file: {' '.join(str(exc).split())}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    except RecursionError:
        mark = loader.get_mark() if loader is not None else None
        where = f"{path}:{mark.line + 1}" if mark else f"{path}"
        raise ConfigError(f"{where}: nested too deeply to read; flatten the brackets or indentation") from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, LineMap(lines)


# A file whose aliases expand to more nodes than this is refused: `*alias` reuses a node, so a few
# lines can stand for billions of them, and indexing or validating that would never end.
MAX_NODES = 100_000


class _Budget:
    def __init__(self, path: str | os.PathLike):
        self.path = path
        self.left = MAX_NODES

    def spend(self, node: yaml.Node) -> None:
        self.left -= 1
        if self.left < 0:
            raise ConfigError(f"{self.path}:{node.start_mark.line + 1}: its aliases expand to more than "
                              f"{MAX_NODES} values; write the repeated parts out or use fewer *aliases")


class _Loader(yaml.SafeLoader):
    """SafeLoader whose constructors report bad scalars (an integer of 5000 digits, 2001-13-45) as
    YAML errors at their line instead of raising ValueError."""

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError, TypeError) as exc:
            raise yaml.constructor.ConstructorError(None, None, f"cannot read this value: {exc}",
                                                    node.start_mark) from None


# A taskdef or profile is a few kilobytes; a file far bigger is a mistake (data pasted in, the wrong
# file) and would only fail later, less clearly (an SN refusing a task too big to send, say).
MAX_YAML_BYTES = 1 << 20


def _read(path: str | os.PathLike) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)  # bytes: PyYAML detects UTF-8/UTF-16 and reports bad bytes by position
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


_MERGE_TAG = "tag:yaml.org,2002:merge"
_UNHASHABLE = object()  # a complex key (`? [a, b]`); the constructor reports it, we only skip it


def _index(loader: yaml.SafeLoader, node: yaml.Node, path: KeyPath, lines: dict, duplicates: list,
           ancestors: frozenset[int], budget: _Budget) -> None:
    """Record the line of every key and item under `node` (composed, not yet constructed).

    Runs before construction because constructing `<<: *anchor` merges rewrites the nodes, after which an
    explicit key overriding a merged one would look like a duplicate.
    """
    if id(node) in ancestors:  # an alias of its own ancestor (a recursive structure): indexed already
        return
    ancestors = ancestors | {id(node)}
    budget.spend(node)
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _index(loader, item, path + (i,), lines, duplicates, ancestors, budget)
    elif isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        merged: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merged.append(value_node)
                continue
            key = _key(loader, key_node)
            if key is _UNHASHABLE:
                continue
            line = key_node.start_mark.line + 1
            if key in seen:
                duplicates.append((path + (key,), line, seen[key]))
                continue
            seen[key] = lines[path + (key,)] = line
            _index(loader, value_node, path + (key,), lines, duplicates, ancestors, budget)
        # Merged keys point at the anchor they come from; keys written here win, as in YAML.
        for source in merged:
            for mapping in source.value if isinstance(source, yaml.SequenceNode) else [source]:
                if not isinstance(mapping, yaml.MappingNode):
                    continue
                for key_node, value_node in mapping.value:
                    key = _key(loader, key_node)
                    if key is _UNHASHABLE or key_node.tag == _MERGE_TAG or key in seen:
                        continue
                    seen[key] = lines[path + (key,)] = key_node.start_mark.line + 1
                    _index(loader, value_node, path + (key,), lines, duplicates, ancestors, budget)


def _key(loader: yaml.SafeLoader, key_node: yaml.Node) -> Any:
    if not isinstance(key_node, yaml.ScalarNode):
        return _UNHASHABLE
    try:
        return loader.construct_object(key_node)
    except yaml.YAMLError:  # construct_document raises it again, with its mark
        return _UNHASHABLE


# What people usually did when PyYAML says this.
_SYNTAX_HINTS = (
    ("'\\t'", "indent with spaces; YAML does not allow tabs"),
    ("cannot start any token", "quote values that start with @ or `"),
    ("mapping values are not allowed", "quote a value that contains \": \", or fix the indentation"),
    ("could not find expected ':'", "a key needs \"key: value\"; check the indentation and close any quote"),
    ("expected <block end>", "this line's indentation does not match the lines above it"),
    ("found unexpected end of stream", "a quote or bracket is never closed"),
    ("found undefined alias", "define the &anchor before using *alias"),
    ("expected a single document", "keep one document per file (remove the extra ---)"),
)


def _syntax_error(path: str | os.PathLike, exc: yaml.MarkedYAMLError) -> str:
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
