"""The run report: one HTML page and a Markdown summary of a run (stage ``report`` and
``bezoar report --run URI``).

Built only from what the run has committed (manifests and the files they list), so it can be
rebuilt at any time and from a partial run, which it says it is. Sections: stage table (status,
duration, counts), data funnel per scheme, training loss curves, one section per evaluation in the
registry (each drawn by the evaluation's own module: harness and MT-Bench tables and charts), tokens /
time / GPU-hours / API cost per stage, which teacher and judges produced what, and the frozen recipe.

Outputs (``<run>/report/``): ``index.html`` (self-contained: every plot is an embedded base64 PNG),
``report.md`` (tables; plots linked from ``figures/``), ``figures/*.png`` and ``report.json`` (the
numbers behind every table and chart). Secrets never reach it: the recipe holds only the names of
environment variables, and URLs are shown without credentials.

collect.py gathers, charts.py draws, render.py writes the page.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..registry import EVALUATIONS, Evaluation
from ..store import Store
from .charts import charts
from .collect import (
    RunData,
    collect,
    funnel,
    loss_curves,
    producers,
    read_listed,
    results,
    stage_rows,
    teacher_gpu_union,
    usage_rows,
)
from .released import RELEASED_DATASETS, comparison, with_released_sizes
from .render import Section, build_tables, render

__all__ = ["evaluation_section", "write_report"]


def evaluation_section(store: Store, data: RunData, ev: Evaluation, shown: int) -> Section:
    """The evaluation's section, drawn by its module from its committed results file."""
    res = results(store, data, ev.stage, ev.results_file)
    sec: Section | None = None
    if res is not None:
        sec = ev.load().report_section(res, lambda rel: read_listed(store, data, ev.stage, rel), shown)
    if sec is None:
        sec = Section(ev.name, ev.title)
    m = data.manifests.get(ev.stage)
    if m is None:
        sec.empty = f"{ev.stage} is not committed ({data.states.get(ev.stage, 'not run')})."
    elif m.get("counts", {}).get("skipped") is True:
        sec.empty = f"{ev.stage} was skipped ({ev.section}.enabled is false): nothing was evaluated."
    else:
        sec.empty = f"{ev.stage} is committed without results in {ev.results_file}."
    return sec


def write_report(store: Store, out_dir: Path, built_at: str | None = None) -> dict[str, Any]:
    """Build the report from ``store`` into ``out_dir``; return counts for the manifest."""
    data = collect(store)
    cfg = getattr(data.recipe, "report", None)
    gpu_usd = getattr(cfg, "gpu_hour_usd", None)
    shown = getattr(cfg, "judgments_shown", 3)
    include_recipe = getattr(cfg, "include_recipe", True)
    title = (
        getattr(cfg, "title", None)
        or f"OpenBezoar run report: {getattr(data.recipe, 'name', None) or data.uri.rstrip('/').rsplit('/', 1)[-1]}"
    )
    built_at = built_at or time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    stages = stage_rows(data)
    fun = with_released_sizes(funnel(data))
    losses = loss_curves(store, data)
    sections = [evaluation_section(store, data, ev, shown) for ev in EVALUATIONS]
    usage = usage_rows(data, gpu_usd)
    prod = producers(data)
    chart_list = charts(stages, fun, losses) + [c for s in sections for c in s.charts]
    teacher = teacher_gpu_union(data)
    tables = build_tables(data, stages, fun, usage, prod, teacher)
    evaluated = {ev.name: results(store, data, ev.stage, ev.results_file) for ev in EVALUATIONS}
    vs = comparison(data, evaluated.get("harness"), evaluated.get("mtbench"))
    if vs is not None:
        tables["released"] = vs
    page, md = render(data, title, tables, chart_list, sections, include_recipe, built_at)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "index.html").write_text(page, encoding="utf-8")
    (out_dir / "report.md").write_text(md, encoding="utf-8")
    figs = out_dir / "figures"
    for c in chart_list:
        figs.mkdir(exist_ok=True)
        (figs / f"{c.name}.png").write_bytes(c.png)
    numbers = {
        "partial": data.partial,
        "missing": data.missing,
        "stages": stages,
        "funnel": fun,
        "loss": {k: [list(p) for p in v] for k, v in losses.items()},
        **{s.key: s.numbers for s in sections},
        "usage": usage,
        "teacher_gpu": teacher,
        "released": {"datasets": RELEASED_DATASETS, "comparison": vs.rows if vs is not None else []},
        "producers": prod,
        "charts": {c.name: c.points for c in chart_list},
    }
    (out_dir / "report.json").write_text(json.dumps(numbers, indent=2, default=str), encoding="utf-8")
    return {"partial": data.partial, "committed_stages": len(data.manifests), "charts": len(chart_list),
            "missing": len(data.missing)}
