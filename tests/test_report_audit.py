"""Audit of the report's figures against what the stages record: a stage that is missing, skipped or not
judged yet is shown as such (never as zero, success or kept rows), a cost total with unpriced GPU-hours is a
lower bound, and text from the run cannot break the Markdown report."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest

from bezoar_jobs.manifest import CommitInfo, commit
from bezoar_jobs.registry import EVALUATIONS
from bezoar_jobs.report import evaluation_section
from bezoar_jobs.report.collect import RunData, collect, stage_rows
from bezoar_jobs.report.released import with_released_sizes
from bezoar_jobs.report.render import Table, build_tables, md_table, render
from bezoar_jobs.store import open_store

# the module (bezoar_jobs.report re-exports its function charts under the same name)
charts_mod = importlib.import_module("bezoar_jobs.report.charts")


def test_a_skipped_evaluation_is_shown_as_skipped_not_as_not_committed_or_done(tmp_path: Path) -> None:
    """eval-harness with evaluation.harness.enabled false commits a skipped summary: the stage table said
    'committed' (models=0) and its section said the stage 'is not committed'."""
    store = open_store(tmp_path / "run")
    out = tmp_path / "out"
    (out / "results").mkdir(parents=True)
    (out / "results" / "summary.json").write_text(json.dumps({"skipped": True, "reason": "disabled"}))
    commit(store, out, CommitInfo("eval-harness", "p", {}, {"models": 0, "skipped": True}, {"seconds": 1.0}, {}))
    data = collect(store)
    row = next(r for r in stage_rows(data) if r["stage"] == "eval-harness")
    assert row["status"] == "skipped"
    harness = next(ev for ev in EVALUATIONS if ev.name == "harness")
    mtbench = next(ev for ev in EVALUATIONS if ev.name == "mtbench")
    sec = evaluation_section(store, data, harness, 3)
    assert sec.table is None and "skipped" in sec.empty and "not committed" not in sec.empty
    assert "evaluation.harness.enabled is false" in sec.empty
    # a stage that is not committed still says so, with its state
    assert evaluation_section(store, data, mtbench, 3).empty == "eval-mtbench is not committed (not run)."


class _Axes:
    def __init__(self, calls: list[dict[str, Any]]):
        self.calls = calls

    def barh(self, names: list[str], values: list[float], left: Any = None, color: Any = None,
             label: str = "") -> None:
        self.calls.append({"names": list(names), "values": list(values), "label": label})

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


class _Figure:
    def __init__(self, calls: list[dict[str, Any]]):
        self.calls = calls

    def add_subplot(self, *a: Any) -> _Axes:
        return _Axes(self.calls)


def _funnel_bars(monkeypatch: pytest.MonkeyPatch, fun: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """label -> scheme -> rows, as the funnel chart draws its stacked bars."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(charts_mod, "new_figure", lambda w, h: _Figure(calls))
    monkeypatch.setattr(charts_mod, "png", lambda fig: b"")
    drawn = charts_mod.charts([], fun, {})
    assert [c.name for c in drawn] == ["funnel"]
    return {c["label"]: dict(zip(c["names"], c["values"], strict=True)) for c in calls}


def test_the_funnel_chart_never_draws_rows_not_judged_as_kept_and_shows_failed_rows(monkeypatch) -> None:
    """A partial run: filter-lamini committed (7 kept, 2 rejected, 1 without a verdict), filter-evol not yet.
    The chart labelled evol's 10 unjudged rows 'kept by the judge' (one scheme judged made every green bar
    'kept') and left lamini's failed row out, so its bar fell short of the 12 rows generated."""
    fun = [
        {"scheme": "lamini", "committed": 10, "eliminated": 2, "generated": 12, "judged": 10, "kept": 7,
         "rejected_by_judge": 2, "unparseable": 1, "failed": 1, "retention": 0.7},
        {"scheme": "evol", "committed": 10, "eliminated": 0, "generated": 10},
    ]
    bars = _funnel_bars(monkeypatch, fun)
    assert bars["kept by the judge"].get("evol", 0) == 0
    assert bars["kept by the judge"]["lamini"] == 7
    for r in fun:  # every bar adds up to what the generate stage produced
        assert sum(seg.get(r["scheme"], 0) for seg in bars.values()) == r["generated"]


def test_kept_vs_released_is_not_computed_from_rows_the_judge_has_not_seen() -> None:
    """With generate-evol committed and filter-evol not, 'kept vs released' showed generated minus released."""
    rows = with_released_sizes([{"scheme": "evol", "committed": 10, "eliminated": 0, "generated": 10},
                                {"scheme": "lamini", "committed": 10, "judged": 10, "kept": 7}])
    assert rows[0]["vs_released"] is None and rows[0]["released_rows"] == 2304
    assert rows[1]["vs_released"] == 7 - 1504
    table = build_tables(RunData("file:///r", {}, {}, None, None, None), [], rows, [], [])["funnel"]
    assert table.rows[0][-1] == "-" and table.rows[1][-1] == "-1,497"


def _usage(stage: str, gpu_hours: float | None, gpu_cost: float | None, teacher_span: bool = False) -> dict:
    return {"stage": stage, "seconds": 10.0, "prompt_tokens": 0, "completion_tokens": 0, "model_tokens": None,
            "gpu_hours": gpu_hours, "api_cost_usd": None, "gpu_cost_usd": gpu_cost, "teacher_span": teacher_span,
            "busy": {}, "tails": {}}


def test_the_gpu_cost_total_says_it_is_a_lower_bound_when_some_gpu_hours_have_no_price() -> None:
    """A CUDA training stage (0.5 GPU-hours) without report.gpu_hour_usd and a priced teacher: the total GPU
    cost showed the teacher's 6 as if it were the run's whole GPU cost."""
    data = RunData("file:///r", {}, {}, None, None, None)
    teacher = {"seconds": 3600.0, "gpus": 2, "gpu_hours": 2.0, "gpu_cost_usd": 6.0}
    usage = [_usage("generate-lamini", 2.0, 6.0, teacher_span=True), _usage("sft-lamini", 0.5, None),
             _usage("eval-harness", 0.0, None)]
    t = build_tables(data, [], [], usage, [], teacher)["usage"]
    total = t.rows[-1]
    assert total[0] == "total" and total[5] == "2.5" and total[7] == "≥ 6"
    assert "no price" in t.note
    # every GPU-hour priced (a CPU stage's 0 needs none): the total is the whole cost
    usage[1] = _usage("sft-lamini", 0.5, 1.0)
    assert build_tables(data, [], [], usage, [], teacher)["usage"].rows[-1][7] == "7"
    # no teacher spans: the stages' own figures
    assert build_tables(data, [], [], [_usage("sft-lamini", 0.5, None), _usage("dpo", 0.5, 1.0)],
                        [], None)["usage"].rows[-1][7] == "≥ 1"


def test_text_from_the_run_cannot_break_the_markdown_report() -> None:
    """A recipe name with a line break split the report's heading; a carriage return in a model id split its
    table row (Markdown ends a line on CR too); '<...>' went into report.md as raw HTML; a recipe holding a
    ``` fence closed the recipe's code block early."""
    t = Table("t", ["stage", "model id"], [["generate-lamini", "a|b\r\nc\rd<script>x</script>"]],
              "graded by judge\r<img src=x>")
    lines = md_table(t).splitlines()
    assert len(lines) == 5 and lines[2].count(" | ") == 1
    assert "<script>" not in lines[2] and "a\\|b c d&lt;script>" in lines[2]
    assert lines[4] == "_graded by judge &lt;img src=x>_"
    recipe = "name: x\ndescription: |\n  ```\n  # not a heading\n  ```\n"
    data = RunData("file:///r", {}, {}, recipe, None, None)
    _, md = render(data, "OpenBezoar run report: two\nlines <b>", {}, [], [], True, "now")
    md_lines = md.splitlines()
    assert md_lines[0] == "# OpenBezoar run report: two lines &lt;b>"
    start = md_lines.index("## Recipe") + 2
    fence = md_lines[start].removesuffix("yaml")
    assert set(fence) == {"`"} and len(fence) > 3
    end = md_lines.index(fence, start + 1)
    assert "\n".join(md_lines[start + 1:end]) == recipe.rstrip("\n")
