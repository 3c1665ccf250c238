"""`bezoar plan`'s figures against what the stages do (an audit of plan.py and estimate.py).

1. Teacher GPU-hours: the plan's throughput divided every completion token a committed generate stage
   used by the span of its committing attempt; the answers that attempt reused (an earlier attempt's
   or a shard's records, the answer cache) are in those tokens but cost that span nothing, so a stage
   resumed, rerun with --force, or committed after its shards made the teacher look tens of times
   faster and the GPU-hours a fraction of the real ones.
2. A filter was sized from its generate stage's committed rows even when that stage was about to
   rerun (a changed recipe): the rows being replaced, not the ones the filter will judge.
"""

from __future__ import annotations

import json

import pytest

from bezoar_jobs.layout import manifest_path
from bezoar_jobs.plan import plan, teacher_rate
from bezoar_jobs.recipe import load_recipe
from bezoar_jobs.store import LocalStore

try:  # tests/ is not a package today; keep working if it becomes one
    from tests.scripted import scripted_recipe
except ImportError:
    from scripted import scripted_recipe  # type: ignore[no-redef]


def _commit(store: LocalStore, stage: str, rows: list[dict] | None = None, **extra) -> None:
    """A committed stage as the readers see it: its manifest (and its rows)."""
    files = {}
    if rows is not None:
        text = "".join(json.dumps(r) + "\n" for r in rows)
        store.write_text(f"{stage}/data/train.jsonl", text)
        files["data/train.jsonl"] = {"size": len(text), "sha256": "0" * 64}
    store.write_text(manifest_path(stage), json.dumps({"stage": stage, "files": files, **extra}))


def test_the_teachers_rate_counts_only_the_tokens_decoded_in_the_measured_span(tmp_path):
    store = LocalStore(tmp_path / "run")
    # committed after its shards (or a --force rerun): every answer read back, a span of a second
    _commit(store, "generate-lamini", usage={"teacher": {"completion_tokens": 100_000, "decoded_tokens": 0,
                                                         "resumed": 900, "cached": 0}},
            teacher_gpu={"span_s": 1.0})
    # resumed after a kill: 3,600 of its tokens decoded in its 36 s, the rest read back
    _commit(store, "generate-orca", usage={"teacher": {"completion_tokens": 50_000, "decoded_tokens": 3_600,
                                                       "resumed": 100}},
            teacher_gpu={"span_s": 36.0})
    # a manifest older than decoded_tokens: answers reused, so its tokens say nothing of the span
    _commit(store, "generate-evol", usage={"teacher": {"completion_tokens": 80_000, "resumed": 40}},
            teacher_gpu={"span_s": 2.0})
    assert teacher_rate(store) == pytest.approx(100.0)

    recipe, _ = load_recipe(str(scripted_recipe(tmp_path, "http://127.0.0.1:9", **{
        "teacher.gpus": 2, "teacher.gpu_hour_usd": 4.0})))
    row = next(r for r in plan(recipe, store, ["generate-evol"]) if r["stage"] == "generate-evol")
    t_out = sum(p["completion_tokens"] for p in row["parts"] if p["endpoint"] == recipe.teacher.model)
    assert row["teacher_gpu_hours"] == pytest.approx(2 * t_out / 100.0 / 3600, rel=1e-3)


def test_an_old_manifest_without_reused_answers_still_measures_the_rate(tmp_path):
    store = LocalStore(tmp_path / "run")
    _commit(store, "generate-orca", usage={"teacher": {"completion_tokens": 7_200, "resumed": 0, "cached": 0}},
            teacher_gpu={"span_s": 36.0})
    assert teacher_rate(store) == pytest.approx(200.0)


def test_a_filter_is_sized_from_what_its_generate_stage_will_write_when_that_stage_reruns(tmp_path):
    store = LocalStore(tmp_path / "run")
    # generate-lamini committed by an earlier recipe (5 rows); this recipe asks for 32
    _commit(store, "generate-lamini",
            [{"id": f"r{i}", "instruction": f"Say {i}", "response": "An answer."} for i in range(5)],
            params_hash="an earlier recipe's")
    recipe, _ = load_recipe(str(scripted_recipe(tmp_path, "http://127.0.0.1:9")))
    rows = {r["stage"]: r for r in plan(recipe, store, ["generate-lamini", "filter-lamini"])}
    assert rows["generate-lamini"]["action"] == "run"
    lamini_rows = 32  # demo.yaml: max_instructions
    assert rows["filter-lamini"]["requests"] == lamini_rows
    # not selected, generate-lamini is not rerun: the filter judges the committed rows, and is sized by them
    only = {r["stage"]: r for r in plan(recipe, store, ["filter-lamini"])}
    assert only["filter-lamini"]["requests"] == 5


def test_a_filters_worst_case_counts_every_ask_an_unreadable_verdict_may_get(tmp_path):
    """An unreadable verdict is asked again, up to filter.max_attempts, and a verdict cut at its cap is the likely
    unreadable one: the worst case priced one ask per row, so it was not a bound (the paper recipe's filter-orca:
    $177 shown, up to about three times that possible)."""
    store = LocalStore(tmp_path / "run")
    once, _ = load_recipe(scripted_recipe(tmp_path, "http://127.0.0.1:9", **{"filter.max_attempts": 1}))
    thrice, _ = load_recipe(scripted_recipe(tmp_path, "http://127.0.0.1:9", **{"filter.max_attempts": 3}))
    one = {r["stage"]: r for r in plan(once, store, ["filter-lamini"])}["filter-lamini"]
    three = {r["stage"]: r for r in plan(thrice, store, ["filter-lamini"])}["filter-lamini"]
    assert three["requests"] == one["requests"] and three["completion_tokens"] == one["completion_tokens"]
    assert three["completion_tokens_max"] == 3 * one["completion_tokens_max"]
    assert three["prompt_tokens_max"] == 3 * one["prompt_tokens_max"]
    assert three["cost_usd_max"] == pytest.approx(3 * one["cost_usd_max"], rel=1e-3)
    assert three["cost_usd"] == one["cost_usd"]  # the typical figure: one ask a row
