"""Stage ``report`` and ``bezoar report --run URI``: one HTML page and a Markdown summary of a run.

Built only from what the run has committed (manifests and the files they list), so it can be
rebuilt at any time and from a partial run, which it says it is. Sections: stage table (status,
duration, counts), data funnel per scheme, training loss curves, evaluation tables (harness and
MT-Bench) across checkpoints and baselines with an MT-Bench chart by category, tokens / time /
GPU-hours / API cost per stage, which teacher and judges produced what, and the frozen recipe.

Outputs (``<run>/report/``): ``index.html`` (self-contained: every plot is an embedded base64 PNG),
``report.md`` (tables; plots linked from ``figures/``), ``figures/*.png`` and ``report.json`` (the
numbers behind every table and chart). Secrets never reach it: the recipe holds only the names of
environment variables, and URLs are shown without credentials.

matplotlib (Agg backend, no display) is imported inside the plotting function only.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..manifest import CommitInfo, commit, manifest_hash, read_manifest
from ..pipeline import CANONICAL, STAGES
from ..store import NotFoundInStore, Store, open_store

log = logging.getLogger("bezoar")

STAGE = "report"
SCHEMES = ("lamini", "evol", "orca")
RECIPE_FILE = "recipe.yaml"


def _expected() -> list[str]:
    return [n for n in CANONICAL if n != STAGE]


# ---------------------------------------------------------------------------------------------
# collecting what the run committed
# ---------------------------------------------------------------------------------------------
@dataclass
class RunData:
    uri: str
    manifests: dict[str, dict[str, Any]]  # committed stages only
    states: dict[str, str]  # stage -> committed | partial | not run
    recipe_text: str | None
    recipe: Any  # the parsed Recipe, or None
    recipe_error: str | None
    files: dict[str, Any] = field(default_factory=dict)  # (stage, rel) -> parsed content cache

    @property
    def missing(self) -> list[str]:
        return [n for n in _expected() if n not in self.manifests]

    @property
    def partial(self) -> bool:
        return bool(self.missing)


def collect(store: Store) -> RunData:
    manifests: dict[str, dict[str, Any]] = {}
    states: dict[str, str] = {}
    for name in _expected():
        m = read_manifest(store, name)
        if m is not None:
            manifests[name] = m
            states[name] = "committed"
        else:
            states[name] = "partial" if store.list(f"{name}/_work/") else "not run"
    text, recipe, err = None, None, None
    try:
        text = store.read_text(RECIPE_FILE)
    except NotFoundInStore:
        err = f"{store.url(RECIPE_FILE)} does not exist (no run has been started here)"
    if text is not None:
        from ..errors import BadInput
        from ..recipe import parse_recipe

        try:
            recipe = parse_recipe(text, store.url(RECIPE_FILE))
        except BadInput as e:  # an older or hand-edited recipe: show it, do not trust its fields
            err = str(e)
    return RunData(store.uri, manifests, states, text, recipe, err)


def _read_listed(store: Store, data: RunData, stage: str, rel: str) -> str | None:
    """A committed file's text, only if the stage's manifest lists it."""
    m = data.manifests.get(stage)
    if m is None or rel not in m.get("files", {}):
        return None
    return store.read_text(f"{stage}/{rel}")


def _jsonl(text: str | None) -> list[dict[str, Any]]:
    rows = []
    for line in (text or "").splitlines():
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line is skipped: the report must build from what is there
            if isinstance(obj, dict):
                rows.append(obj)
    return rows


# ---------------------------------------------------------------------------------------------
# the numbers behind each section
# ---------------------------------------------------------------------------------------------
def _scalar_counts(counts: dict[str, Any]) -> str:
    parts = []
    for k, v in counts.items():
        if isinstance(v, bool | int | float | str) and not isinstance(v, dict):
            parts.append(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts)


def stage_rows(data: RunData) -> list[dict[str, Any]]:
    rows = []
    for name in _expected():
        m = data.manifests.get(name)
        rows.append({
            "stage": name,
            "status": data.states[name],
            "seconds": (m or {}).get("timings", {}).get("seconds"),
            "committed_at": (m or {}).get("committed_at"),
            "counts": _scalar_counts((m or {}).get("counts", {})),
            "code_version": (m or {}).get("code_version"),
        })
    return rows


def funnel(data: RunData) -> list[dict[str, Any]]:
    """Per scheme: candidates generated, eliminated at generation, judged, kept/rejected by the judge."""
    rows = []
    for s in SCHEMES:
        g = data.manifests.get(f"generate-{s}", {}).get("counts")
        f = data.manifests.get(f"filter-{s}", {}).get("counts")
        if not g and not f:
            continue
        row: dict[str, Any] = {"scheme": s}
        if g:
            row["committed"] = int(g.get("rows", 0))
            row["eliminated"] = int(g.get("rejected", 0))
            row["generated"] = row["committed"] + row["eliminated"]
        if f:
            row["judged"] = int(f.get("input_rows", 0))
            row["kept"] = int(f.get("kept", 0))
            row["rejected_by_judge"] = int(f.get("rejected", 0))
            row["unparseable"] = int(f.get("unparseable", 0) or 0)
            row["retention"] = f.get("retention")
        rows.append(row)
    return rows


def _training_stages(data: RunData) -> list[str]:
    return [n for n in _expected() if STAGES[n].family in ("sft", "dpo")]


def loss_curves(store: Store, data: RunData) -> dict[str, list[tuple[float, float]]]:
    """Per committed training stage: (step, loss) from its metrics.jsonl (training losses only)."""
    out = {}
    for name in _training_stages(data):
        pts = []
        for rec in _jsonl(_read_listed(store, data, name, "metrics.jsonl")):
            step, loss = rec.get("step"), rec.get("loss")
            if isinstance(step, int | float) and isinstance(loss, int | float) and not isinstance(loss, bool):
                pts.append((float(step), float(loss)))
        if pts:
            out[name] = sorted(pts)
    return out


def _results(store: Store, data: RunData, stage: str, rel: str) -> dict[str, Any] | None:
    """An evaluation stage's committed results file, or None (not committed, or the stage was skipped)."""
    text = _read_listed(store, data, stage, rel)
    if text is None:
        return None
    results = json.loads(text)
    return None if results.get("skipped") else results


def harness_summary(store: Store, data: RunData) -> dict[str, Any] | None:
    return _results(store, data, "eval-harness", "results/summary.json")


def mtbench_scores(store: Store, data: RunData) -> dict[str, Any] | None:
    return _results(store, data, "eval-mtbench", "results/scores.json")


def sample_judgments(store: Store, data: RunData, scores: dict[str, Any], n: int) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for label in scores.get("order", []):
        rows = _jsonl(_read_listed(store, data, "eval-mtbench", f"results/judgments/{label}.jsonl"))
        if rows and n:
            out[label] = rows[:n]
    return out


def _gpu_hours(name: str, m: dict[str, Any]) -> float | None:
    if isinstance(m.get("gpu_hours"), int | float):
        return float(m["gpu_hours"])
    tr = m.get("training")
    if isinstance(tr, dict):
        on_gpu = "CUDA" in str(tr.get("mode_description", "")) or str(tr.get("device", "")).startswith("cuda")
        secs = m.get("timings", {}).get("seconds") or 0.0
        return round(secs / 3600.0, 6) if on_gpu else 0.0
    return None


def usage_rows(data: RunData, gpu_hour_usd: float | None) -> list[dict[str, Any]]:
    """Per committed stage: seconds, API tokens in/out, training tokens, GPU-hours, cost."""
    rows = []
    for name in _expected():
        m = data.manifests.get(name)
        if m is None:
            continue
        p_tok = c_tok = 0
        for u in (m.get("usage") or {}).values():
            if isinstance(u, dict):
                p_tok += int(u.get("prompt_tokens", 0) or 0)
                c_tok += int(u.get("completion_tokens", 0) or 0)
        tr = m.get("training") if isinstance(m.get("training"), dict) else {}
        answers = m.get("answers") if isinstance(m.get("answers"), dict) else {}
        gpu_h = _gpu_hours(name, m)
        api = m.get("cost_usd")
        gpu_cost = round(gpu_h * gpu_hour_usd, 4) if gpu_h and gpu_hour_usd is not None else None
        rows.append({
            "stage": name,
            "seconds": m.get("timings", {}).get("seconds"),
            "prompt_tokens": p_tok,
            "completion_tokens": c_tok,
            "model_tokens": tr.get("real_tokens", answers.get("completion_tokens")),
            "gpu_hours": gpu_h,
            "api_cost_usd": api if isinstance(api, int | float) else None,
            "gpu_cost_usd": gpu_cost,
        })
    return rows


def _scrub(text: str) -> str:
    """URLs without user:password@ and without key/token query values."""
    text = re.sub(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@", r"\1***@", text)
    return re.sub(r"(?i)([?&](?:api[_-]?key|key|token|secret|password|sig)=)[^&\s\"']+", r"\1***", text)


def producers(data: RunData) -> list[dict[str, Any]]:
    """Which teacher / judge / base model produced each committed stage's output."""
    rows = []
    for name in _expected():
        m = data.manifests.get(name)
        if m is None:
            continue
        for role in ("teacher", "judge"):
            e = m.get(role)
            if isinstance(e, dict):
                extra = e.get("method")
                rows.append({"stage": name, "role": role if name != "eval-mtbench" else "MT-Bench judge",
                             "backend": e.get("backend"), "model_id": e.get("model_id") or e.get("model"),
                             "revision": e.get("revision"), "base_url": _scrub(str(e["base_url"])) if e.get("base_url") else None,
                             "note": f"method {extra}" if extra else ""})
        if m.get("base_model"):
            rows.append({"stage": name, "role": "trained from", "backend": "", "model_id": m["base_model"],
                         "revision": m.get("base_revision"), "base_url": None, "note": ""})
        if name == "eval-harness" and m.get("lm_eval_version"):
            rows.append({"stage": name, "role": "evaluator", "backend": "lm_eval", "model_id": f"lm_eval {m['lm_eval_version']}",
                         "revision": None, "base_url": None, "note": ""})
    return rows


# ---------------------------------------------------------------------------------------------
# charts
# ---------------------------------------------------------------------------------------------
@dataclass
class Chart:
    name: str
    title: str
    png: bytes
    points: int  # data points drawn: a chart is only made when there is data


def _fig(width: float, height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    return fig


def _png(fig: Any) -> bytes:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _grouped_bars(ax: Any, groups: list[str], series: dict[str, list[float | None]]) -> int:
    n = max(len(series), 1)
    width = 0.8 / n
    drawn = 0
    for k, (label, values) in enumerate(series.items()):
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(groups))]
        ys = [v if v is not None else 0.0 for v in values]
        ax.bar(xs, ys, width=width, label=label)
        drawn += sum(1 for v in values if v is not None)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right")
    ax.legend(fontsize=8)
    return drawn


def charts(data: RunData, stages: list[dict[str, Any]], fun: list[dict[str, Any]], losses: dict[str, list[tuple[float, float]]],
           harness: dict[str, Any] | None, mt: dict[str, Any] | None) -> list[Chart]:
    out: list[Chart] = []
    timed = [r for r in stages if r["seconds"] is not None]
    if timed:
        fig = _fig(8, 0.35 * len(timed) + 1.2)
        ax = fig.add_subplot()
        ax.barh([r["stage"] for r in timed][::-1], [r["seconds"] for r in timed][::-1], color="#4C72B0")
        ax.set_xlabel("seconds")
        ax.set_title("Stage durations")
        out.append(Chart("durations", "Stage durations", _png(fig), len(timed)))
    gen = [r for r in fun if "generated" in r or "judged" in r]
    if gen:
        fig = _fig(8, 3.2)
        ax = fig.add_subplot()
        gen = gen[::-1]  # barh draws bottom-up: keep the schemes in recipe order from the top
        names = [r["scheme"] for r in gen]
        kept = [r.get("kept", r.get("committed", 0)) for r in gen]
        judged_out = [r.get("rejected_by_judge", 0) for r in gen]
        elim = [r.get("eliminated", 0) for r in gen]
        judged = any("kept" in r for r in gen)
        ax.barh(names, kept, color="#55A868", label="kept by the judge" if judged else "committed (not judged yet)")
        ax.barh(names, judged_out, left=kept, color="#C44E52", label="rejected by the judge")
        ax.barh(names, elim, left=[a + b for a, b in zip(kept, judged_out, strict=True)], color="#8172B2",
                label="eliminated at generation")
        ax.set_xlabel("rows")
        ax.set_title("Data funnel per scheme")
        ax.legend(fontsize=8)
        out.append(Chart("funnel", "Data funnel per scheme", _png(fig), len(gen)))
    if losses:
        n = len(losses)
        cols = min(n, 3)
        rows = (n + cols - 1) // cols
        fig = _fig(4 * cols, 2.8 * rows)
        for i, (stage, pts) in enumerate(losses.items()):
            ax = fig.add_subplot(rows, cols, i + 1)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None)
            ax.set_title(stage)
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
        out.append(Chart("loss", "Training loss", _png(fig), sum(len(p) for p in losses.values())))
    if harness and harness.get("models"):
        tasks = [t["name"] for t in harness["tasks"]]
        series = {label: [harness["models"][label]["scores"].get(t, {}).get("value") for t in tasks]
                  for label in harness.get("order", harness["models"]) if label in harness["models"]}
        if any(v is not None for vs in series.values() for v in vs):
            fig = _fig(8, 3.5)
            ax = fig.add_subplot()
            pts = _grouped_bars(ax, tasks, series)
            ax.set_title("LM Evaluation Harness (primary metric per task)")
            out.append(Chart("harness", "LM Evaluation Harness", _png(fig), pts))
    if mt and mt.get("models"):
        cats = list(mt.get("categories") or sorted({c for s in mt["models"].values() for c in s["categories"]}))
        series = {label: [mt["models"][label]["categories"].get(c) for c in cats]
                  for label in mt.get("order", mt["models"]) if label in mt["models"]}
        if any(v is not None for vs in series.values() for v in vs):
            fig = _fig(9, 3.8)
            ax = fig.add_subplot()
            pts = _grouped_bars(ax, cats, series)
            ax.set_ylim(0, 10)
            ax.set_ylabel("score (1-10)")
            ax.set_title(f"MT-Bench by category (judge: {mt.get('judge', {}).get('model_id', '?')})")
            out.append(Chart("mtbench", "MT-Bench by category", _png(fig), pts))
    return out


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return str(v)


def _score(v: dict[str, Any] | None) -> str:
    if not v or v.get("value") is None:
        return "-"
    s = _fmt(v["value"])
    return f"{s} ± {_fmt(v['stderr'])}" if v.get("stderr") is not None else s


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


def build_tables(data: RunData, stages, fun, harness, mt, usage, prod) -> dict[str, Table]:
    t: dict[str, Table] = {}
    t["stages"] = Table("Stages", ["stage", "status", "seconds", "committed at", "counts"],
                        [[r["stage"], r["status"], _fmt(r["seconds"], 3), r["committed_at"] or "-", r["counts"] or "-"] for r in stages])
    if fun:
        t["funnel"] = Table(
            "Data funnel", ["scheme", "generated", "eliminated at generation", "judged", "kept by judge", "rejected by judge", "retention"],
            [[r["scheme"], _fmt(r.get("generated")), _fmt(r.get("eliminated")), _fmt(r.get("judged")), _fmt(r.get("kept")),
              _fmt(r.get("rejected_by_judge")), _fmt(r.get("retention"))] for r in fun],
            "generated = rows the generate stage produced (committed + eliminated); the judge rates what was committed.")
    if harness and harness.get("models"):
        tasks = harness["tasks"]
        header = ["model", "kind"] + [f"{x['name']} ({x['num_fewshot']}-shot, {x['metric']})" for x in tasks]
        rows = []
        for label in harness.get("order", list(harness["models"])):
            mrow = harness["models"].get(label)
            if mrow:
                rows.append([label, mrow.get("kind", "")] + [_score(mrow["scores"].get(x["name"])) for x in tasks])
        note = f"lm_eval {harness.get('lm_eval_version')}; task versions: " + ", ".join(f"{x['name']} v{x['version']}" for x in tasks)
        if harness.get("limit"):
            note += f". LIMITED to {harness['limit']} items per task: not comparable with published scores."
        t["harness"] = Table("LM Evaluation Harness", header, rows, note)
    if mt and mt.get("models"):
        cats = list(mt.get("categories") or [])
        header = ["model", "kind", "overall", "turn 1", "turn 2", *cats, "judged", "excluded"]
        rows = []
        for label in mt.get("order", list(mt["models"])):
            s = mt["models"].get(label)
            if s:
                rows.append([label, mt.get("kinds", {}).get(label, ""), _fmt(s["overall"], 3), _fmt(s["turns"].get("1"), 3),
                             _fmt(s["turns"].get("2"), 3), *[_fmt(s["categories"].get(c), 3) for c in cats],
                             str(s["judged"]), str(s["excluded"])])
        j = mt.get("judge", {})
        t["mtbench"] = Table("MT-Bench", header, rows,
                             f"{mt.get('questions')} questions; single-answer grading 1-10 by {j.get('model_id')} "
                             f"({j.get('backend')}, method {j.get('method')}); unparseable verdicts are excluded.")
    if usage:
        tot = {k: sum((r[k] or 0) for r in usage) for k in ("seconds", "prompt_tokens", "completion_tokens", "gpu_hours")}
        api = [r["api_cost_usd"] for r in usage if r["api_cost_usd"] is not None]
        gpu = [r["gpu_cost_usd"] for r in usage if r["gpu_cost_usd"] is not None]
        rows = [[r["stage"], _fmt(r["seconds"], 3), str(r["prompt_tokens"]), str(r["completion_tokens"]), _fmt(r["model_tokens"]),
                 _fmt(r["gpu_hours"], 3), _fmt(r["api_cost_usd"], 4), _fmt(r["gpu_cost_usd"], 4)] for r in usage]
        rows.append(["total", _fmt(round(tot["seconds"], 1), 6), str(tot["prompt_tokens"]), str(tot["completion_tokens"]), "",
                     _fmt(round(tot["gpu_hours"], 4), 3), _fmt(round(sum(api), 4), 4) if api else "-",
                     _fmt(round(sum(gpu), 4), 4) if gpu else "-"])
        t["usage"] = Table("Tokens, time and cost", ["stage", "seconds", "API tokens in", "API tokens out", "trained / generated tokens",
                                                     "GPU-hours", "API cost $", "GPU cost $"], rows,
                           "API tokens: teacher and judge requests (in-process ones included; token-probability ratings "
                           "count none). Trained / generated: tokens a training stage trained on, or MT-Bench answer tokens "
                           "the evaluated models wrote. API cost only where the recipe gives the endpoint's prices; GPU cost "
                           "only with report.gpu_hour_usd.")
    if prod:
        t["producers"] = Table("Teacher, judges and models", ["stage", "role", "backend", "model id", "revision", "base URL", "note"],
                               [[r["stage"], r["role"], r["backend"] or "", r["model_id"] or "", r["revision"] or "-",
                                 r["base_url"] or "-", r["note"]] for r in prod])
    return t


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}.banner{background:#fff3cd;border:1px solid #e0c36a;padding:.6em 1em;margin:1em 0}
.note{color:#555;font-size:.85em}pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.85em}
figure{margin:1em 0}img{max-width:100%}details{margin:.3em 0}"""


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in t.rows)
    note = f'<p class="note">{html.escape(t.note)}</p>' if t.note else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"


def _md_table(t: Table) -> str:
    def cell(x: str) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in t.header) + " |", "|" + "---|" * len(t.header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in t.rows]
    if t.note:
        lines += ["", f"_{t.note}_"]
    return "\n".join(lines)


def _figure_html(c: Chart) -> str:
    b64 = base64.b64encode(c.png).decode("ascii")
    return (f'<figure data-chart="{c.name}" data-points="{c.points}"><img alt="{html.escape(c.title)}" '
            f'src="data:image/png;base64,{b64}"><figcaption class="note">{html.escape(c.title)}</figcaption></figure>')


def render(data: RunData, title: str, tables: dict[str, Table], chart_list: list[Chart],
           judgments: dict[str, list[dict[str, Any]]], include_recipe: bool, built_at: str) -> tuple[str, str]:
    """(index.html, report.md)."""
    ch = {c.name: c for c in chart_list}
    n_done, n_all = len(data.manifests), len(_expected())
    status = (f"Partial run: {n_done} of {n_all} stages committed; not committed: {', '.join(data.missing)}."
              if data.partial else f"Complete run: all {n_all} stages committed.")
    h: list[str] = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                    f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
                    f'<p class="note">Run <code>{html.escape(_scrub(data.uri))}</code>, report built {html.escape(built_at)}.</p>',
                    f'<div class="banner" id="run-status">{html.escape(status)}</div>' if data.partial
                    else f'<p id="run-status">{html.escape(status)}</p>']
    md: list[str] = [f"# {title}", "", f"Run `{_scrub(data.uri)}`, report built {built_at}.", "",
                     f"> **{status}**" if data.partial else status, ""]

    def section(key: str, heading: str, charts_after: tuple[str, ...] = (), empty: str = "") -> None:
        t = tables.get(key)
        cs = [ch[c] for c in charts_after if c in ch]
        h.append(f'<h2 id="{key}">{html.escape(heading)}</h2>')
        md.extend([f"## {heading}", ""])
        if t is None and not cs:
            h.append(f'<p class="note">{html.escape(empty)}</p>')
            md.extend([f"_{empty}_", ""])
            return
        if t is not None:
            h.append(_html_table(t))
            md.extend([_md_table(t), ""])
        for c in cs:
            h.append(_figure_html(c))
            md.extend([f"![{c.title}](figures/{c.name}.png)", ""])

    section("stages", "Stages", ("durations",))
    section("funnel", "Data funnel per scheme", ("funnel",), "No generate or filter stage is committed yet.")
    h.append('<h2 id="training">Training loss</h2>')
    md.extend(["## Training loss", ""])
    if "loss" in ch:
        h.append(_figure_html(ch["loss"]))
        md.extend(["![Training loss](figures/loss.png)", ""])
    else:
        h.append('<p class="note">No training stage with logged losses is committed yet.</p>')
        md.extend(["_No training stage with logged losses is committed yet._", ""])
    section("harness", "Evaluation: LM Evaluation Harness", ("harness",), "eval-harness is not committed (or evaluation.harness.enabled is false).")
    section("mtbench", "Evaluation: MT-Bench", ("mtbench",), "eval-mtbench is not committed (or evaluation.mtbench.enabled is false).")
    if judgments:
        h.append("<h3>Sample judgments</h3>")
        for label, rows in judgments.items():
            for j in rows:
                summary = (f"{label} - question {j.get('question_id')} ({j.get('category')}), turn {j.get('turn')}: "
                           f"score {_fmt(j.get('score'))} by {j.get('judge')}")
                h.append(f"<details><summary>{html.escape(summary)}</summary><pre>{html.escape(str(j.get('judgment') or j.get('excluded') or ''))}</pre></details>")
        md.extend(["_Every judgment's text is in `eval-mtbench/results/judgments/`._", ""])
    section("usage", "Tokens, time and cost", (), "No stage is committed yet.")
    section("producers", "Teacher, judges and models", (), "No stage is committed yet.")
    if include_recipe:
        h.append('<h2 id="recipe">Recipe</h2>')
        md.extend(["## Recipe", ""])
        if data.recipe_error:
            h.append(f'<p class="note">{html.escape(data.recipe_error)}</p>')
            md.extend([f"_{data.recipe_error}_", ""])
        if data.recipe_text is not None:
            text = _scrub(data.recipe_text)
            h.append(f"<pre>{html.escape(text)}</pre>")
            md.extend(["```yaml", text.rstrip("\n"), "```", ""])
    h.append("</body></html>")
    return "\n".join(h), "\n".join(md)


# ---------------------------------------------------------------------------------------------
# building, committing, freshness
# ---------------------------------------------------------------------------------------------
def built_from(store: Store) -> dict[str, str]:
    """Manifest hash of every committed stage the report reads (its real inputs)."""
    out = {}
    for name in _expected():
        m = read_manifest(store, name)
        if m is not None:
            out[name] = manifest_hash(m)
    return out


def write_report(store: Store, out_dir: Path, built_at: str | None = None) -> dict[str, Any]:
    """Build the report from ``store`` into ``out_dir``; return counts for the manifest."""
    data = collect(store)
    cfg = getattr(data.recipe, "report", None)
    gpu_usd = getattr(cfg, "gpu_hour_usd", None)
    shown = getattr(cfg, "judgments_shown", 3)
    include_recipe = getattr(cfg, "include_recipe", True)
    title = getattr(cfg, "title", None) or f"OpenBezoar run report: {getattr(data.recipe, 'name', None) or data.uri.rstrip('/').rsplit('/', 1)[-1]}"
    built_at = built_at or time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    stages = stage_rows(data)
    fun = funnel(data)
    losses = loss_curves(store, data)
    harness = harness_summary(store, data)
    mt = mtbench_scores(store, data)
    judg = sample_judgments(store, data, mt, shown) if mt else {}
    usage = usage_rows(data, gpu_usd)
    prod = producers(data)
    chart_list = charts(data, stages, fun, losses, harness, mt)
    tables = build_tables(data, stages, fun, harness, mt, usage, prod)
    page, md = render(data, title, tables, chart_list, judg, include_recipe, built_at)
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
        "harness": harness,
        "mtbench": {k: v for k, v in (mt or {}).items()} or None,
        "usage": usage,
        "producers": prod,
        "charts": {c.name: c.points for c in chart_list},
    }
    (out_dir / "report.json").write_text(json.dumps(numbers, indent=2, default=str), encoding="utf-8")
    return {"partial": data.partial, "committed_stages": len(data.manifests), "charts": len(chart_list),
            "missing": len(data.missing)}


def run_report(ctx: Any) -> Any:
    """The ``report`` stage: build from whatever the run has committed."""
    from ..runner import StageOutput

    counts = write_report(ctx.store, ctx.out)
    log.info("report: %s (%s)", ctx.store.url(f"{STAGE}/index.html"),
             "partial run" if counts["partial"] else "complete run")
    return StageOutput(counts=counts, extra={"built_from": built_from(ctx.store)})


def build_report(run_uri: str) -> list[str]:
    """``bezoar report --run URI``: rebuild and commit ``<run>/report/``; return the files' URLs."""
    from ..runner import params_hash

    store = open_store(run_uri)
    data = collect(store)
    ph = ""
    if data.recipe is not None:
        try:
            ph = params_hash(data.recipe, STAGE)
        except KeyError:  # the report stage is not registered (older code): no parameter key
            ph = ""
    tmp = Path(tempfile.mkdtemp(prefix="bezoar-report-"))
    try:
        t0 = time.time()
        counts = write_report(store, tmp)
        commit(store, tmp, CommitInfo(
            stage=STAGE, params_hash=ph, inputs={}, counts=counts,
            timings={"started": t0, "seconds": round(time.time() - t0, 3)},
            extra={"recipe_name": getattr(data.recipe, "name", None), "built_from": built_from(store), "built_by": "bezoar report"},
        ))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [store.url(f"{STAGE}/index.html"), store.url(f"{STAGE}/report.md")]


def report_is_current(store: Store, manifest: dict[str, Any]) -> tuple[bool, str]:
    """Whether a committed report was built from exactly the stages committed now."""
    if manifest.get("built_from") != built_from(store):
        return False, "stages were committed or changed since the report was built"
    return True, "committed, built from the current stages"
