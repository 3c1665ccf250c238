"""YAML into a typed (pydantic) model with errors that name the file, the line and the field.

The recipe and the cluster settings load through here: every error is ``file:line: dotted.path:
problem`` and raises :class:`~bezoar_jobs.errors.BadInput` (exit 2). The YAML is read as
``yaml.safe_load`` reads it, except that a key given twice in one mapping is refused (PyYAML keeps
the last one silently).
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from .errors import BadInput

M = TypeVar("M", bound=BaseModel)
_MERGE = "tag:yaml.org,2002:merge"


class _LineLoader(yaml.SafeLoader):
    """A SafeLoader whose composed nodes carry their marks (the line of every key)."""


class DuplicateKey(yaml.YAMLError):
    """A mapping names one key twice: ``line`` is the second time, the message says the first."""

    def __init__(self, key: object, line: int, first: int) -> None:
        super().__init__(f"key {key!r} appears twice (first at line {first})")
        self.line = line


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader (merge keys ``<<`` included) that refuses a key given twice in one
    mapping, where PyYAML keeps the last silently. Checked as the mapping is composed: the keys as
    written, before merge keys add theirs (which an explicit key may override)."""

    def compose_mapping_node(self, anchor: Any) -> Any:
        node = super().compose_mapping_node(anchor)
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE:
                continue
            try:
                key = self.construct_object(key_node)
                hash(key)
            except (yaml.YAMLError, TypeError):  # left to the constructor to refuse
                continue
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKey(key, line, seen[key])
            seen[key] = line
        return node


def finite_problem(value: float) -> str:
    """What is wrong with a NaN or an infinite number."""
    what = "NaN (not a number)" if math.isnan(value) else "infinite" if value > 0 else "minus infinite"
    return f"the value is {what}: give a finite number"


def key_lines(text: str) -> dict[tuple[Any, ...], int]:
    """The line (1-based) of every mapping key and sequence item, by path."""
    lines: dict[tuple[Any, ...], int] = {}
    try:
        root = yaml.compose(text, Loader=_LineLoader)
    except yaml.YAMLError:
        return lines

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = (*path, k.value)
                lines[p] = k.start_mark.line + 1
                walk(v, p)
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:str":
                    try:  # a key 1 or true: the error's path holds the value (1, True), not the text
                        key = yaml.safe_load(k.value)
                        hash(key)
                    except (yaml.YAMLError, TypeError):
                        continue
                    lines[(*path, key)] = k.start_mark.line + 1
                    walk(v, (*path, key))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                p = (*path, i)
                lines[p] = v.start_mark.line + 1
                walk(v, p)

    walk(root, ())
    return lines


def parse_yaml(text: str, source: str, what: str) -> Any:
    """``yaml.safe_load`` with a BadInput naming the file and line of a syntax error, a character YAML
    refuses (line and column) or a key given twice (both lines)."""
    verb = "are" if what.endswith("s") else "is"  # "recipe is", "cluster settings are"
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: no arbitrary objects
    except DuplicateKey as e:
        raise BadInput(f"{source}:{e.line}: {e}; each key may be given once") from None
    except yaml.reader.ReaderError as e:  # a character YAML refuses: it gives an offset, we the line and column
        pos = e.position
        line, col = text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos)
        char = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
        raise BadInput(f"{source}:{line}: {what} {verb} not valid YAML: unacceptable character {char} at line "
                       f"{line}, column {col}: {e.reason}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        ctx_mark = getattr(e, "context_mark", None)
        started = f" ({e.context} at line {ctx_mark.line + 1})" if ctx_mark and getattr(e, "context", None) else ""
        raise BadInput(f"{where}: {what} {verb} not valid YAML: {getattr(e, 'problem', e)}{started}") from None


def format_errors(err: ValidationError, source: str, lines: dict[tuple[Any, ...], int], what: str) -> str:
    out = []
    for e in err.errors():
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        if e["type"] == "pass_value":  # a pass-through value: the problem is at a key inside it
            loc = (*loc, *e["ctx"]["at"])
        dotted = ".".join(str(x) for x in loc) or "<root>"
        # the nearest enclosing key that we know a line for
        line = None
        for n in range(len(loc), 0, -1):
            if loc[:n] in lines:
                line = lines[loc[:n]]
                break
        where = f"{source}:{line}" if line else source
        msg = _message(e)
        out.append(f"{where}: {msg}" if dotted == "<root>" else f"{where}: {dotted}: {msg}")
    if len(out) == 1:  # one problem: one line
        return f"invalid {what}: {out[0]}"
    return f"invalid {what}:\n  " + "\n  ".join(out)


def _shown(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return f"the text {value!r}" if isinstance(value, str) else repr(value)


def _message(e: Any) -> str:
    """Pydantic's message, made plainer where it hides what was given."""
    kind, given = e["type"], e.get("input")
    if kind == "extra_forbidden":
        return "unknown key (not a field of this section)"
    if kind == "invalid_key":
        return f"key {given!r} should be text (a field name)"
    if kind == "finite_number":
        try:
            return finite_problem(float(given))
        except (TypeError, ValueError):
            return str(e["msg"])
    if kind == "int_type" and isinstance(given, bool | float | str):  # strict: 2.0 and true are no integers
        return f"Input should be a valid integer, got {_shown(given)}"
    if kind == "bool_type" and isinstance(given, int | float | str):
        return f"Input should be true or false, got {_shown(given)}"
    return str(e["msg"])


def validate(cls: type[M], data: Any, text: str, source: str, what: str) -> M:
    """``cls.model_validate(data)``; a ValidationError becomes a BadInput naming file, line and field."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise BadInput(format_errors(e, source, key_lines(text), what)) from None
