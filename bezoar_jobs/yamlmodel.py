"""YAML into a typed (pydantic) model with errors that name the file, the line and the field.

The recipe and the cluster settings load through here: every error is ``file:line: dotted.path:
problem`` and raises :class:`~bezoar_jobs.errors.BadInput` (exit 2).
"""

from __future__ import annotations

from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from .errors import BadInput

M = TypeVar("M", bound=BaseModel)


class _LineLoader(yaml.SafeLoader):
    """A SafeLoader whose composed nodes carry their marks (the line of every key)."""


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
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                p = (*path, i)
                lines[p] = v.start_mark.line + 1
                walk(v, p)

    walk(root, ())
    return lines


def parse_yaml(text: str, source: str, what: str) -> Any:
    """``yaml.safe_load`` with a BadInput naming the file and line of a syntax error."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        ctx_mark = getattr(e, "context_mark", None)
        started = f" ({e.context} at line {ctx_mark.line + 1})" if ctx_mark and getattr(e, "context", None) else ""
        verb = "are" if what.endswith("s") else "is"  # "recipe is", "cluster settings are"
        raise BadInput(f"{where}: {what} {verb} not valid YAML: {getattr(e, 'problem', e)}{started}") from None


def format_errors(err: ValidationError, source: str, lines: dict[tuple[Any, ...], int], what: str) -> str:
    out = []
    for e in err.errors():
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        dotted = ".".join(str(x) for x in loc) or "<root>"
        # the nearest enclosing key that we know a line for
        line = None
        for n in range(len(loc), 0, -1):
            if loc[:n] in lines:
                line = lines[loc[:n]]
                break
        where = f"{source}:{line}" if line else source
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not a field of this section)"
        out.append(f"{where}: {msg}" if dotted == "<root>" else f"{where}: {dotted}: {msg}")
    if len(out) == 1:  # one problem: one line
        return f"invalid {what}: {out[0]}"
    return f"invalid {what}:\n  " + "\n  ".join(out)


def validate(cls: type[M], data: Any, text: str, source: str, what: str) -> M:
    """``cls.model_validate(data)``; a ValidationError becomes a BadInput naming file, line and field."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise BadInput(format_errors(e, source, key_lines(text), what)) from None
