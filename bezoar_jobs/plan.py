"""``bezoar plan``: what would run or be skipped and why, with expected requests, tokens and cost.

What runs is decided as ``bezoar run`` decides it (:func:`bezoar_jobs.state.planned_actions`): a
stage whose inputs are about to rerun runs too. Figures come from each stage module's own
``estimate`` (named in the registry: the scheme modules, the filter, MT-Bench), see
:mod:`bezoar_jobs.estimate`: a realistic figure (typical answer lengths, prompt sizes from the
templates and seed data, or from committed outputs) and the worst case beside it (every answer
at its ``max_new_tokens``). Teacher GPU-hours are estimated from the throughput a committed
generate stage of the run measured, when there is one. Training, the harness and the report send
no API requests: their rows show 0 (their cost is GPU time, which the manifests record once they ran).
"""

from __future__ import annotations

from typing import Any

from .estimate import Ask
from .manifest import read_manifest
from .recipe import Recipe
from .registry import load_attr, spec, stages_of
from .state import planned_actions
from .store import Store


def estimate(recipe: Recipe, store: Store, stage: str) -> list[Ask]:
    ref = spec(stage).estimate
    if ref is None:
        return []
    asks: list[Ask] = load_attr(ref)(recipe, store, stage)
    return asks


def _cost(asks: list[Ask], worst: bool = False) -> float | None:
    priced = [a for a in asks if a.endpoint.priced]
    if not priced:
        return None
    total = 0.0
    for a in priced:
        if worst:
            total += a.endpoint.cost(a.prompt_total_max, a.completion_tokens_max)
        else:
            total += a.endpoint.cost(a.prompt_total, a.completion_tokens)
    return round(total, 4)


def teacher_rate(store: Store) -> float | None:
    """Teacher completion tokens per second of serving, as the run's committed generate stages
    measured them (their ``teacher_gpu.span_s`` and usage); None when none has been measured."""
    tokens, seconds = 0, 0.0
    for name in stages_of("generate"):
        m = read_manifest(store, name)
        tg = (m or {}).get("teacher_gpu") or {}
        if m and tg.get("span_s"):
            tokens += int(m.get("usage", {}).get("teacher", {}).get("completion_tokens", 0) or 0)
            seconds += float(tg["span_s"])
    return tokens / seconds if tokens and seconds > 0 else None


def plan(recipe: Recipe, store: Store, stages: list[str], force: bool = False) -> list[dict[str, Any]]:
    rows = []
    actions = planned_actions(store, recipe, stages, force)
    rate = teacher_rate(store)
    teacher = recipe.teacher
    for name in stages:
        action, why = actions[name]
        asks = estimate(recipe, store, name)
        run = action == "run"
        cost, worst = _cost(asks), _cost(asks, worst=True)
        t_out = sum(a.completion_tokens for a in asks if a.endpoint == teacher)
        gpu_h = teacher.gpu_hours(t_out / rate) if rate and t_out and run else None
        rows.append({
            "stage": name,
            "action": action,
            "why": why,
            "requests": sum(a.requests for a in asks) if run else 0,
            "prompt_tokens": sum(a.prompt_total for a in asks) if run else 0,
            "completion_tokens": sum(a.completion_tokens for a in asks) if run else 0,
            "prompt_tokens_max": sum(a.prompt_total_max for a in asks) if run else 0,
            "completion_tokens_max": sum(a.completion_tokens_max for a in asks) if run else 0,
            "cost_usd": cost if run else (0.0 if cost is not None else None),
            "cost_usd_max": worst if run else (0.0 if worst is not None else None),
            "teacher_gpu_hours": gpu_h,
            "teacher_gpu_cost_usd": round(gpu_h * teacher.gpu_hour_usd, 4)
            if gpu_h is not None and teacher.gpu_hour_usd is not None else None,
            "parts": [
                {"what": a.what, "endpoint": a.endpoint.model, "requests": a.requests, "prompt_tokens": a.prompt_total,
                 "completion_tokens": a.completion_tokens, "completion_tokens_max": a.completion_tokens_max}
                for a in asks
            ] if run else [],
        })
    return rows
