"""``bezoar plan``: what would run or be skipped and why, with expected requests, tokens and cost.

What runs is decided as ``bezoar run`` decides it (:func:`bezoar_jobs.state.planned_actions`): a
stage whose inputs are about to rerun runs too. Figures come from each stage module's own
``estimate`` (named in the registry: the scheme modules, the filter, MT-Bench), see
:mod:`bezoar_jobs.estimate`. Training, the harness and the report send no API requests: their rows
show 0 (their cost is GPU time, which the manifests record once they ran).
"""

from __future__ import annotations

from typing import Any

from .estimate import Ask
from .recipe import Recipe
from .registry import load_attr, spec
from .state import planned_actions
from .store import Store


def estimate(recipe: Recipe, store: Store, stage: str) -> list[Ask]:
    ref = spec(stage).estimate
    if ref is None:
        return []
    asks: list[Ask] = load_attr(ref)(recipe, store, stage)
    return asks


def _cost(asks: list[Ask]) -> float | None:
    priced = [a for a in asks if a.endpoint.priced]
    if not priced:
        return None
    return round(sum(a.endpoint.cost(a.requests * a.prompt_tokens, a.completion_tokens) for a in priced), 4)


def plan(recipe: Recipe, store: Store, stages: list[str], force: bool = False) -> list[dict[str, Any]]:
    rows = []
    actions = planned_actions(store, recipe, stages, force)
    for name in stages:
        action, why = actions[name]
        asks = estimate(recipe, store, name)
        run = action == "run"
        cost = _cost(asks)
        rows.append({
            "stage": name,
            "action": action,
            "why": why,
            "requests": sum(a.requests for a in asks) if run else 0,
            "prompt_tokens": sum(a.requests * a.prompt_tokens for a in asks) if run else 0,
            "completion_tokens": sum(a.completion_tokens for a in asks) if run else 0,
            "cost_usd": cost if run else (0.0 if cost is not None else None),
        })
    return rows
