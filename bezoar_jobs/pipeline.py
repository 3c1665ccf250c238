"""The DAG: stage names, their inputs, and the --from/--until/--only selection.

This module is pure (no torch, no Kubernetes) so both executors and the CLI use it.
Stages that are not built yet are absent from ``CANONICAL``; they slot in as they land.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import BadInput


@dataclass(frozen=True)
class StageSpec:
    name: str
    inputs: tuple[str, ...]  # stages whose committed outputs this one reads
    family: str  # generate | filter | sft | dpo | evaluate | report
    needs: tuple[str, ...] = ()  # servers it talks to: teacher, judge
    gpu: bool = False


_ALL = [
    StageSpec("generate-lamini", (), "generate", ("teacher",)),
    StageSpec("generate-evol", (), "generate", ("teacher", "judge")),
    StageSpec("generate-orca", (), "generate", ("teacher",)),
    StageSpec("filter-lamini", ("generate-lamini",), "filter", ("judge",)),
    StageSpec("filter-evol", ("generate-evol",), "filter", ("judge",)),
    StageSpec("filter-orca", ("generate-orca",), "filter", ("judge",)),
    # training: inputs for the default training.sft_order (lamini, evol, orca); stage_inputs() follows the recipe
    StageSpec("sft-lamini", ("filter-lamini",), "sft", gpu=True),
    StageSpec("sft-evol", ("filter-evol", "sft-lamini"), "sft", gpu=True),
    StageSpec("sft-orca", ("filter-orca", "sft-evol"), "sft", gpu=True),
    StageSpec("sft-hh", ("sft-orca",), "sft", gpu=True),
    StageSpec("dpo", ("sft-hh",), "dpo", gpu=True),
    # evaluation reads the checkpoints it evaluates (the default evaluation.checkpoints; stage_inputs
    # follows the recipe's list; the base model needs no stage)
    StageSpec("eval-harness", ("sft-orca", "sft-hh", "dpo"), "evaluate", gpu=True),
    StageSpec("eval-mtbench", ("sft-orca", "sft-hh", "dpo"), "evaluate", ("judge",), gpu=True),
    # the report reads whatever is committed (a partial run too): no declared inputs
    StageSpec("report", (), "report"),
]

CANONICAL: tuple[str, ...] = tuple(s.name for s in _ALL)
STAGES: dict[str, StageSpec] = {s.name: s for s in _ALL}


SCHEME_SFT = ("sft-lamini", "sft-evol", "sft-orca")


def stage_inputs(name: str, recipe: Any = None) -> tuple[str, ...]:
    """The stages ``name`` reads. The scheme SFT stages follow the recipe's
    ``training.sft_order`` (each starts from the previous one's model, sft-hh from the last); the
    evaluation stages read the trained stages in ``evaluation.checkpoints`` (the base model needs
    none). The static ``StageSpec.inputs`` are that graph for the default recipe."""
    s = spec(name)
    if s.family == "evaluate" and recipe is not None:
        evaluated = set(getattr(getattr(recipe, "evaluation", None), "checkpoints", None) or ())
        return tuple(n for n in CANONICAL if n in evaluated)
    order = getattr(getattr(recipe, "training", None), "sft_order", None)
    if not order or name not in (*SCHEME_SFT, "sft-hh"):
        return s.inputs
    chain = [f"sft-{x}" for x in order]
    if name == "sft-hh":
        return (chain[-1],)
    i = chain.index(name)
    return (f"filter-{name[4:]}",) + ((chain[i - 1],) if i else ())


def spec(name: str) -> StageSpec:
    try:
        return STAGES[name]
    except KeyError:
        raise BadInput(f"unknown stage {name!r}; stages are: {', '.join(CANONICAL)}") from None


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


def levels(names: list[str], recipe: Any = None) -> list[list[str]]:
    """Group the selected stages into waves whose members do not depend on each other
    (inputs outside the selection are taken as already committed)."""
    chosen = set(names)
    done: set[str] = set()
    waves: list[list[str]] = []
    remaining = list(names)
    while remaining:
        wave = [n for n in remaining if all(i in done or i not in chosen for i in stage_inputs(n, recipe))]
        if not wave:  # pragma: no cover - the DAG is acyclic by construction
            raise RuntimeError("cycle in stage graph")
        waves.append(wave)
        done.update(wave)
        remaining = [n for n in remaining if n not in done]
    return waves
