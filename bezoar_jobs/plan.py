"""``bezoar plan``: what would run or be skipped and why, with expected requests, tokens and cost.

What runs is decided as ``bezoar run`` decides it (:func:`bezoar_jobs.state.planned_actions`): a
stage whose inputs are about to rerun runs too. Figures come from each stage module's own
``estimate`` (named in the registry: the scheme modules, the filter, MT-Bench), see
:mod:`bezoar_jobs.estimate`: a realistic figure (typical answer lengths, prompt sizes from the
templates and seed data, or from committed outputs) and the worst case beside it (every answer
at its ``max_new_tokens``). Teacher GPU-hours are estimated from the throughput a committed
generate stage of the run measured, when there is one. Training, the harness and the report send
no API requests: their rows show 0 (their cost is GPU time, which the manifests record once they ran).
A stage's estimate sees the run as the stages about to run will find it: the committed output of a
selected stage that reruns is about to be replaced, so it does not size what comes after it (a
filter is sized from what the recipe asks of its generate stage, not from the rows it replaces).
"""

from __future__ import annotations

from typing import Any, cast

from .estimate import Ask
from .layout import manifest_path
from .manifest import read_manifest
from .recipe import Recipe
from .registry import load_attr, spec, stages_of
from .state import planned_actions
from .store import Store
from .store_base import NotFoundInStore


class _AsIfRerun:
    """``store`` read as the stages about to run will find it: the stages in ``rerun`` are not committed
    (their manifests, the commit markers every reader goes by, are not there). Read-only use."""

    def __init__(self, store: Store, rerun: set[str]) -> None:
        self._store = store
        self._hidden = {manifest_path(s) for s in rerun}

    def read_bytes(self, rel: str) -> bytes:
        if rel in self._hidden:
            raise NotFoundInStore(f"{self._store.url(rel)}: about to be replaced (the stage reruns)")
        return self._store.read_bytes(rel)

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def exists(self, rel: str) -> bool:
        return rel not in self._hidden and self._store.exists(rel)

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - whatever the store has
        return getattr(self._store, name)


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


def _number(v: object) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _decoded(usage: dict[str, Any]) -> float | None:
    """The teacher tokens a stage's committing attempt decoded within its ``span_s``: ``decoded_tokens``;
    in a manifest older than that field, ``completion_tokens`` when no answer was reused (resumed from
    an earlier attempt's or a shard's records, or read from the answer cache: those cost that span
    nothing), else unknown."""
    if "decoded_tokens" in usage:
        return _number(usage["decoded_tokens"])
    if _number(usage.get("resumed")) or _number(usage.get("cached")):
        return None
    return _number(usage.get("completion_tokens"))


def teacher_rate(store: Store) -> float | None:
    """Teacher completion tokens per second of serving, as the run's committed generate stages
    measured them: the tokens each one's committing attempt decoded (``usage.teacher.decoded_tokens``)
    over that attempt's span (``teacher_gpu.span_s``). Answers it reused (an earlier attempt's, a
    shard's, the cache's) are in its ``completion_tokens`` but not in that span: counted, they made the
    teacher look as fast as the reuse, and the GPU-hours a fraction of the real ones. None when none
    has been measured."""
    tokens, seconds = 0.0, 0.0
    for name in stages_of("generate"):
        m = read_manifest(store, name)
        if not m:
            continue
        span = _number((m.get("teacher_gpu") or {}).get("span_s"))
        decoded = _decoded((m.get("usage") or {}).get("teacher") or {})
        if span and span > 0 and decoded and decoded > 0:  # a commit that only read records measured nothing
            tokens += decoded
            seconds += span
    return tokens / seconds if tokens and seconds > 0 else None


def plan(recipe: Recipe, store: Store, stages: list[str], force: bool = False) -> list[dict[str, Any]]:
    rows = []
    actions = planned_actions(store, recipe, stages, force)
    rate = teacher_rate(store)  # a measured throughput stays one, whether or not its stage reruns
    ahead = cast(Store, _AsIfRerun(store, {n for n, (act, _) in actions.items() if act == "run"}))
    teacher = recipe.teacher
    for name in stages:
        action, why = actions[name]
        asks = estimate(recipe, ahead, name)
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
