"""Rendering the report: tables, the HTML page (self-contained, charts embedded) and the Markdown
summary. Sections of the evaluations come from each evaluation's module (:class:`Section`)."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from typing import Any

from ..llm.base import tails_text
from .charts import Chart
from .collect import RunData, expected, scrub


def fmt(v: object, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return str(v)


def score(v: dict[str, Any] | None) -> str:
    if not v or v.get("value") is None:
        return "-"
    s = fmt(v["value"])
    return f"{s} ± {fmt(v['stderr'])}" if v.get("stderr") is not None else s


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Section:
    """An evaluation's part of the report (its module's ``report_section``): a table, charts, and
    details below them (HTML snippets and Markdown lines); ``numbers`` go to report.json."""

    key: str
    heading: str
    table: Table | None = None
    charts: list[Chart] = field(default_factory=list)
    details_html: list[str] = field(default_factory=list)
    details_md: list[str] = field(default_factory=list)
    numbers: Any = None
    empty: str = ""  # shown when there is nothing (not committed, or switched off)


def build_tables(data: RunData, stages: list[dict[str, Any]], fun: list[dict[str, Any]], usage: list[dict[str, Any]],
                 prod: list[dict[str, Any]], teacher: dict[str, Any] | None = None) -> dict[str, Table]:
    """The generic sections' tables: stages, data funnel, usage, producers. ``teacher``: the shared
    teacher's GPU time over the union of the generate stages' spans (collect.teacher_gpu_union)."""
    t: dict[str, Table] = {}
    t["stages"] = Table(
        "Stages",
        ["stage", "status", "seconds", "committed at", "counts"],
        [[r["stage"], r["status"], fmt(r["seconds"], 3), r["committed_at"] or "-", r["counts"] or "-"] for r in stages],
    )
    if fun:
        t["funnel"] = Table(
            "Data funnel",
            [
                "scheme",
                "generated",
                "eliminated at generation",
                "judged",
                "kept by judge",
                "rejected by judge",
                "failed (no verdict)",
                "retention",
                "requests lost",
                "retries",
                "released rows",
                "kept vs released",
            ],
            [
                [
                    r["scheme"],
                    fmt(r.get("generated")),
                    fmt(r.get("eliminated")),
                    fmt(r.get("judged")),
                    fmt(r.get("kept")),
                    fmt(r.get("rejected_by_judge")),
                    fmt(r.get("failed")),
                    fmt(r.get("retention")),
                    fmt(r.get("requests_lost"))
                    + (f" ({', '.join(f'{c}: {n}' for c, n in r['lost_by_cause'].items())})"
                       if r.get("lost_by_cause") else ""),
                    fmt(r.get("retries")),
                    f"{r['released_rows']:,} ({r['released_dataset']})" if r.get("released_rows") else "-",
                    f"{r['vs_released']:+,}" if r.get("vs_released") is not None else "-",
                ]
                for r in fun
            ],
            "generated = rows the generate stage produced (committed + eliminated); "
            "the judge rates what was committed; failed = rows whose verdict stayed unparseable or whose "
            "judge request failed for good (neither kept nor rejected); requests lost and retries count the "
            "teacher and judge requests of both stages. Released rows: the authors' published datasets "
            "(SurgeGlobal/LaMini, Evol-Instruct, Orca).",
        )
    if usage:
        tot = {
            k: sum((r[k] or 0) for r in usage) for k in ("seconds", "prompt_tokens", "completion_tokens", "gpu_hours")
        }
        api = [r["api_cost_usd"] for r in usage if r["api_cost_usd"] is not None]
        # (GPU-hours, GPU cost) of what the total counts: a cost of None with GPU-hours is unknown, not 0
        counted = [(r["gpu_hours"], r["gpu_cost_usd"]) for r in usage]
        if teacher is not None:  # the generate stages share one teacher: count its time once
            own = [r for r in usage if not r.get("teacher_span")]
            tot["gpu_hours"] = sum((r["gpu_hours"] or 0) for r in own) + teacher["gpu_hours"]
            counted = [(r["gpu_hours"], r["gpu_cost_usd"]) for r in own]
            counted.append((teacher["gpu_hours"], teacher.get("gpu_cost_usd")))
        gpu = [c for _, c in counted if c is not None]
        # some GPU-hours have no price: the sum of the priced ones is a lower bound
        gpu_unpriced = any(c is None and h for h, c in counted)
        rows = [
            [
                r["stage"],
                fmt(r["seconds"], 3),
                str(r["prompt_tokens"]),
                str(r["completion_tokens"]),
                fmt(r["model_tokens"]),
                fmt(r["gpu_hours"], 3),
                fmt(r["api_cost_usd"], 4),
                fmt(r["gpu_cost_usd"], 4),
                ", ".join(f"{role} {u:.2f}{tails_text((r.get('tails') or {}).get(role))}"
                          for role, u in (r.get("busy") or {}).items()) or "-",
            ]
            for r in usage
        ]
        rows.append(
            [
                "total",
                fmt(round(tot["seconds"], 1), 6),
                str(tot["prompt_tokens"]),
                str(tot["completion_tokens"]),
                "",
                fmt(round(tot["gpu_hours"], 4), 3),
                fmt(round(sum(api), 4), 4) if api else "-",
                ("≥ " if gpu_unpriced else "") + fmt(round(sum(gpu), 4), 4) if gpu else "-",
                "",
            ]
        )
        t["usage"] = Table(
            "Tokens, time and cost",
            [
                "stage",
                "seconds",
                "API tokens in",
                "API tokens out",
                "trained / generated tokens",
                "GPU-hours",
                "API cost $",
                "GPU cost $",
                "slots busy",
            ],
            rows,
            "API tokens: teacher and judge requests (in-process ones included; token-probability ratings "
            "count none). Trained / generated: tokens a training stage trained on, or MT-Bench answer tokens "
            "the evaluated models wrote. API cost only where the recipe gives the endpoint's prices; GPU cost "
            "with report.gpu_hour_usd, and for the generate stages with the teacher's own gpu_hour_usd over the "
            "span it served each of them (the total counts the teacher once, over the union of those spans"
            + (f": {fmt(teacher['gpu_hours'], 3)} GPU-hours" if teacher else "") + ")"
            + ("; ≥: some GPU-hours have no price (report.gpu_hour_usd, or the teacher's gpu_hour_usd), so the "
               "GPU cost total counts only the priced ones" if gpu_unpriced and gpu else "")
            + ". Slots busy: the share of "
            "the teacher's (judge's) request slots the stage kept busy with answered requests over its span, as "
            "its client saw them (idle slots are GPU time paid for nothing); in brackets the requests its pool "
            "sent again after a failure, raced with a duplicate past the running p99 (hedged) or cut at their "
            "deadline and sent again (abandoned).",
        )
    if prod:
        t["producers"] = Table(
            "Teacher, judges and models",
            ["stage", "role", "backend", "model id", "revision", "base URL", "note"],
            [
                [
                    r["stage"],
                    r["role"],
                    r["backend"] or "",
                    r["model_id"] or "",
                    r["revision"] or "-",
                    r["base_url"] or "-",
                    r["note"],
                ]
                for r in prod
            ],
        )
    return t


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;
padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}th,td{border:1px solid #ccc;padding:3px 8px;
text-align:left;vertical-align:top}
th{background:#f3f3f3}.banner{background:#fff3cd;border:1px solid #e0c36a;padding:.6em 1em;margin:1em 0}
.note{color:#555;font-size:.85em}pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.85em}
figure{margin:1em 0}img{max-width:100%}details{margin:.3em 0}"""


def html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in t.rows)
    note = f'<p class="note">{html.escape(t.note)}</p>' if t.note else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"


def md_inline(text: object) -> str:
    """Text from the run (recipe names, model ids, judge names) for one Markdown line: every line break
    (``\\r`` too, which Markdown also ends a line on) becomes a space, and ``<`` is written ``&lt;`` so
    that the text is never taken as raw HTML."""
    return re.sub(r"\r\n|\r|\n", " ", str(text)).replace("<", "&lt;")


def md_fence(text: str) -> str:
    """A code fence longer than any run of backticks in ``text`` (which could otherwise close it)."""
    return "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))


def md_table(t: Table) -> str:
    def cell(x: str) -> str:
        return md_inline(x).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in t.header) + " |", "|" + "---|" * len(t.header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in t.rows]
    if t.note:
        lines += ["", f"_{md_inline(t.note)}_"]
    return "\n".join(lines)


def figure_html(c: Chart) -> str:
    b64 = base64.b64encode(c.png).decode("ascii")
    return (f'<figure data-chart="{c.name}" data-points="{c.points}"><img alt="{html.escape(c.title)}" '
            f'src="data:image/png;base64,{b64}"><figcaption class="note">{html.escape(c.title)}</figcaption></figure>')


def render(data: RunData, title: str, tables: dict[str, Table], chart_list: list[Chart],
           evaluations: list[Section], include_recipe: bool, built_at: str) -> tuple[str, str]:
    """(index.html, report.md)."""
    ch = {c.name: c for c in chart_list}
    n_done, n_all = len(data.manifests), len(expected())
    status = (
        f"Partial run: {n_done} of {n_all} stages committed; not committed: {', '.join(data.missing)}."
        if data.partial
        else f"Complete run: all {n_all} stages committed."
    )
    h: list[str] = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">Run <code>{html.escape(scrub(data.uri))}</code>, report built {html.escape(built_at)}.</p>',
        f'<div class="banner" id="run-status">{html.escape(status)}</div>'
        if data.partial
        else f'<p id="run-status">{html.escape(status)}</p>',
    ]
    md: list[str] = [f"# {md_inline(title)}", "", f"Run `{scrub(data.uri)}`, report built {built_at}.", "",
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
            h.append(html_table(t))
            md.extend([md_table(t), ""])
        for c in cs:
            h.append(figure_html(c))
            md.extend([f"![{c.title}](figures/{c.name}.png)", ""])

    section("stages", "Stages", ("durations",))
    section("funnel", "Data funnel per scheme", ("funnel",), "No generate or filter stage is committed yet.")
    h.append('<h2 id="training">Training loss</h2>')
    md.extend(["## Training loss", ""])
    if "loss" in ch:
        h.append(figure_html(ch["loss"]))
        md.extend(["![Training loss](figures/loss.png)", ""])
    else:
        h.append('<p class="note">No training stage with logged losses is committed yet.</p>')
        md.extend(["_No training stage with logged losses is committed yet._", ""])
    for sec in evaluations:  # in registry order
        h.append(f'<h2 id="{sec.key}">{html.escape(sec.heading)}</h2>')
        md.extend([f"## {sec.heading}", ""])
        if sec.table is None and not sec.charts:
            h.append(f'<p class="note">{html.escape(sec.empty)}</p>')
            md.extend([f"_{sec.empty}_", ""])
            continue
        if sec.table is not None:
            h.append(html_table(sec.table))
            md.extend([md_table(sec.table), ""])
        for c in sec.charts:
            h.append(figure_html(c))
            md.extend([f"![{c.title}](figures/{c.name}.png)", ""])
        h.extend(sec.details_html)
        md.extend(sec.details_md)
    section("released", "Against the released models", (),
            "No checkpoint and its released counterpart (evaluation.baselines) are both evaluated.")
    section("usage", "Tokens, time and cost", (), "No stage is committed yet.")
    section("producers", "Teacher, judges and models", (), "No stage is committed yet.")
    if include_recipe:
        h.append('<h2 id="recipe">Recipe</h2>')
        md.extend(["## Recipe", ""])
        if data.recipe_error:
            h.append(f'<p class="note">{html.escape(data.recipe_error)}</p>')
            md.extend([f"_{md_inline(data.recipe_error)}_", ""])
        if data.recipe_text is not None:
            text = scrub(data.recipe_text)
            h.append(f"<pre>{html.escape(text)}</pre>")
            fence = md_fence(text)
            md.extend([f"{fence}yaml", text.rstrip("\n"), fence, ""])
    h.append("</body></html>")
    return "\n".join(h), "\n".join(md)


