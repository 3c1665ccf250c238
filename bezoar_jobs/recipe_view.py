"""A read-only view of the recipe that lets a stage read only the fields its registry entry declares.

A stage's parameter hash covers exactly the recipe fields it declares (:mod:`bezoar_jobs.registry`).
If a stage could read a field it did not declare, changing that field would change its output while
a stale committed copy kept being skipped (the bug this module exists to prevent: generate-evol read
``filter.decoding`` without hashing it). So the runner never hands a stage the recipe itself: it
hands it a :class:`RecipeView`, which

- returns the value of a declared field (or of anything under a declared field) as it is;
- returns a further view for a section some of whose fields are declared (``training`` when only
  ``training.lora`` is);
- runs the recipe's own helper methods (``training.stage_sft_args(...)``) against the view, so the
  fields they read are checked too;
- raises :class:`UndeclaredRead` for anything else, naming the stage and the field, including
  whole-object operations (``model_dump``) on a partly declared section.

The check cannot be forgotten: every stage reads the recipe through its context, and the tests run
every stage of the demo through this view.
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any, cast

from pydantic import BaseModel


class UndeclaredRead(RuntimeError):
    """A stage read a recipe field its registry entry does not declare (a bug in the stage or in
    its declaration: the field would be missing from the stage's parameter hash)."""


def get_path(obj: Any, dotted: str) -> Any:
    """``get_path(recipe, "seeds.dolly.licence")``."""
    for key in dotted.split("."):
        obj = getattr(obj, key)
    return obj


def covered(path: str, allowed: Iterable[str]) -> bool:
    """Whether ``path`` is declared, or lies under a declared field."""
    return any(path == a or path.startswith(a + ".") for a in allowed)


class RecipeView:
    """See the module docstring. Build one with :func:`view`."""

    __slots__ = ("_allowed", "_obj", "_path", "_stage")

    def __init__(self, obj: BaseModel, allowed: frozenset[str], stage: str, path: str = ""):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_allowed", allowed)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_path", path)

    def _where(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def __getattr__(self, name: str) -> Any:
        obj = self._obj
        cls = type(obj)
        path = self._where(name)
        if name in cls.model_fields:
            value = getattr(obj, name)
            if covered(path, self._allowed):
                return value
            if isinstance(value, BaseModel) and any(a.startswith(path + ".") for a in self._allowed):
                return RecipeView(value, self._allowed, self._stage, path)
            raise UndeclaredRead(
                f"stage {self._stage} reads recipe field {path!r}, which its registry entry "
                f"(bezoar_jobs/registry.py) does not declare: declare it, so the stage's parameter hash covers it"
            )
        # the recipe's own helpers (methods and properties of our section classes) run against the
        # view, so what they read is checked; pydantic's whole-object operations are refused
        for klass in cls.__mro__:
            if klass is BaseModel or not (isinstance(klass, type) and issubclass(klass, BaseModel)):
                break
            attr = vars(klass).get(name)
            if attr is None:
                continue
            if isinstance(attr, property) and attr.fget is not None:
                return attr.fget(self)
            if isinstance(attr, types.FunctionType):
                return types.MethodType(attr, self)
            if isinstance(attr, classmethod | staticmethod):
                return getattr(obj, name)
            break
        if hasattr(obj, name):
            raise UndeclaredRead(
                f"stage {self._stage} uses {name!r} on the whole of {self._path or 'the recipe'}, of which it "
                "declares only some fields (bezoar_jobs/registry.py)"
            )
        raise AttributeError(f"{cls.__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError("the recipe is read-only")

    def __repr__(self) -> str:
        return f"<recipe view of {self._path or 'the recipe'} for stage {self._stage}>"


def view(recipe: Any, stage: str, allowed: Iterable[str]) -> Any:
    """The recipe as stage ``stage`` may see it (typed as the recipe for the stage's code)."""
    return cast(Any, RecipeView(recipe, frozenset(allowed), stage))
