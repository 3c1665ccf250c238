"""The DAG, derived from the stage registry: inputs (which follow the recipe), what a stage waits
for, the --from/--until/--only selection and what lies downstream of a stage.

Pure (no torch, no Kubernetes): the CLI, ``bezoar plan``, both schedulers and the runner use it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from .errors import BadInput
from .registry import CANONICAL, STAGES, spec

if TYPE_CHECKING:
    from .recipe import Recipe


def stage_inputs(name: str, recipe: Recipe | None = None) -> tuple[str, ...]:
    """The stages ``name`` reads. The scheme SFT stages follow the recipe's ``training.sft_order``
    (each starts from the previous one's model, sft-hh from the last); the evaluation stages read the
    trained stages in ``evaluation.checkpoints`` (the base model needs none). Without a recipe: the
    graph of the default recipe (the registry's static inputs)."""
    s = spec(name)
    if recipe is not None and s.dynamic_inputs is not None:
        return s.dynamic_inputs(recipe)
    return s.inputs


def waits_for(name: str, selected: Iterable[str], recipe: Recipe | None = None) -> list[str]:
    """The selected stages ``name`` must wait for: its inputs among them; for a stage that reads the
    whole run (the report), every other selected stage. Inputs outside the selection are taken as
    committed (the stage itself refuses, exit 2, when they are not)."""
    chosen = list(selected)
    if spec(name).reads_whole_run:
        return [s for s in chosen if s != name]
    wanted = set(stage_inputs(name, recipe))
    return [s for s in chosen if s in wanted]


def in_dependency_order(stages: Iterable[str], recipe: Recipe | None = None) -> list[str]:
    """``stages`` ordered so that each comes after the selected stages it waits for (canonical order
    where the graph leaves a choice). The canonical order alone is not enough: the training chain
    follows the recipe (default lamini, orca, evol), so sft-evol can wait for sft-orca."""
    chosen = [n for n in CANONICAL if n in set(stages)]
    out: list[str] = []
    placed: set[str] = set()
    while len(out) < len(chosen):
        ready = [n for n in chosen if n not in placed and all(d in placed for d in waits_for(n, chosen, recipe))]
        if not ready:  # pragma: no cover - the registry refuses cyclic graphs
            raise BadInput(f"stages {[n for n in chosen if n not in placed]} wait for each other")
        out.append(ready[0])
        placed.add(ready[0])
    return out


def select(from_: str | None = None, until: str | None = None, only: list[str] | None = None) -> list[str]:
    """The stages to consider, in canonical order."""
    if only:
        for n in only:
            spec(n)
        if from_ or until:
            raise BadInput("--only cannot be combined with --from/--until")
        return [n for n in CANONICAL if n in set(only)]
    names = list(CANONICAL)
    lo = names.index(spec(from_).name) if from_ else 0
    hi = names.index(spec(until).name) if until else len(names) - 1
    if lo > hi:
        raise BadInput(f"--from {from_} comes after --until {until} in the canonical order")
    return names[lo : hi + 1]


def downstream(name: str, recipe: Recipe | None = None) -> list[str]:
    """Every stage that reads ``name``'s output, directly or through others (canonical order); the
    stages that read the whole run included."""
    out: set[str] = set()
    frontier = {name}
    while frontier:
        nxt = {s for s in CANONICAL if s not in out and s != name
               and (STAGES[s].reads_whole_run or frontier & set(stage_inputs(s, recipe)))}
        out |= nxt
        frontier = nxt
    return [s for s in CANONICAL if s in out]
