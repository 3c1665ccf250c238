"""Charts for the report: PNGs drawn with matplotlib (Agg backend, no display), imported inside
the plotting functions only. Each chart records how many data points it drew: a chart is made only
when there is data behind it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

Figure: TypeAlias = Any  # a matplotlib Figure (matplotlib is imported inside the functions)
Axes: TypeAlias = Any  # its matplotlib Axes


@dataclass
class Chart:
    name: str
    title: str
    png: bytes
    points: int  # data points drawn: a chart is only made when there is data


def new_figure(width: float, height: float) -> Figure:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def png(fig: Figure) -> bytes:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def grouped_bars(ax: Axes, groups: list[str], series: dict[str, list[float | None]]) -> int:
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


FUNNEL_COLOURS = {
    "kept by the judge": "#55A868",
    "committed (not judged yet)": "#A6D8B5",
    "rejected by the judge": "#C44E52",
    "failed (no verdict)": "#DD8452",
    "eliminated at generation": "#8172B2",
}


def funnel_segments(rows: list[dict[str, Any]]) -> dict[str, list[int]]:
    """The funnel chart's stacked segments, per scheme row: a scheme whose filter is not committed has
    its committed rows as not judged yet (never as kept), and rows the judge gave no verdict are drawn
    too, so a judged scheme's bar adds up to what was generated. Segments without rows are left out."""
    seg = {
        "kept by the judge": [int(r.get("kept", 0)) for r in rows],
        "committed (not judged yet)": [0 if "judged" in r else int(r.get("committed", 0)) for r in rows],
        "rejected by the judge": [int(r.get("rejected_by_judge", 0)) for r in rows],
        "failed (no verdict)": [int(r.get("failed", 0)) for r in rows],
        "eliminated at generation": [int(r.get("eliminated", 0)) for r in rows],
    }
    return {k: v for k, v in seg.items() if any(v)}


def charts(
    stages: list[dict[str, Any]], fun: list[dict[str, Any]], losses: dict[str, list[tuple[float, float]]]
) -> list[Chart]:
    """The generic sections' charts: stage durations, the data funnel, training losses."""
    out: list[Chart] = []
    timed = [r for r in stages if r["seconds"] is not None]
    if timed:
        fig = new_figure(8, 0.35 * len(timed) + 1.2)
        ax = fig.add_subplot()
        ax.barh([r["stage"] for r in timed][::-1], [r["seconds"] for r in timed][::-1], color="#4C72B0")
        ax.set_xlabel("seconds")
        ax.set_title("Stage durations")
        out.append(Chart("durations", "Stage durations", png(fig), len(timed)))
    gen = [r for r in fun if "generated" in r or "judged" in r]
    if gen:
        fig = new_figure(8, 3.2)
        ax = fig.add_subplot()
        gen = gen[::-1]  # barh draws bottom-up: keep the schemes in recipe order from the top
        names = [r["scheme"] for r in gen]
        left = [0] * len(gen)
        for label, values in funnel_segments(gen).items():
            ax.barh(names, values, left=left, color=FUNNEL_COLOURS[label], label=label)
            left = [a + b for a, b in zip(left, values, strict=True)]
        ax.set_xlabel("rows")
        ax.set_title("Data funnel per scheme")
        ax.legend(fontsize=8)
        out.append(Chart("funnel", "Data funnel per scheme", png(fig), len(gen)))
    if losses:
        n = len(losses)
        cols = min(n, 3)
        rows = (n + cols - 1) // cols
        fig = new_figure(4 * cols, 2.8 * rows)
        for i, (stage, pts) in enumerate(losses.items()):
            ax = fig.add_subplot(rows, cols, i + 1)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None)
            ax.set_title(stage)
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
        out.append(Chart("loss", "Training loss", png(fig), sum(len(p) for p in losses.values())))
    return out
