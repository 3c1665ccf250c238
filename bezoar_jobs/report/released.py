"""The released OpenBezoar artefacts this run is compared with (docs/recipe.md: each scheme's
"released size" and the "released models" row).

- Datasets: SurgeGlobal/LaMini (1,504 rows), SurgeGlobal/Evol-Instruct (2,304), SurgeGlobal/Orca
  (3,517): the data funnel shows each scheme's kept rows beside them.
- Models: SurgeGlobal/OpenBezoar-SFT, -HH-RLHF-SFT, -HH-RLHF-DPO. A baseline of the recipe is the
  released counterpart of one of our checkpoints when its ``counterpart`` says so, or when its model
  is one of these hub ids; OpenBezoar-SFT is the last scheme SFT stage of ``training.sft_order``.
  Each pair is set side by side with the difference of every score both evaluations committed.
"""

from __future__ import annotations

from typing import Any

from ..registry import DEFAULT_SFT_ORDER, SFT_ALIAS
from .collect import RunData
from .render import Table, fmt

RELEASED_DATASETS: dict[str, tuple[str, int]] = {
    "lamini": ("SurgeGlobal/LaMini", 1504),
    "evol": ("SurgeGlobal/Evol-Instruct", 2304),
    "orca": ("SurgeGlobal/Orca", 3517),
}
RELEASED_MODELS: dict[str, str] = {
    "SurgeGlobal/OpenBezoar-SFT": SFT_ALIAS,
    "SurgeGlobal/OpenBezoar-HH-RLHF-SFT": "sft-hh",
    "SurgeGlobal/OpenBezoar-HH-RLHF-DPO": "dpo",
}
ROLE_NAMES = {SFT_ALIAS: "OpenBezoar-SFT", "sft-hh": "OpenBezoar-HH-RLHF-SFT", "dpo": "OpenBezoar-HH-RLHF-DPO"}


def with_released_sizes(funnel: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The funnel rows with the released dataset's size and our kept rows' difference to it (none
    while the scheme's filter is not committed: generated rows are not rows kept by the judge)."""
    out = []
    for row in funnel:
        rel = RELEASED_DATASETS.get(row["scheme"])
        if rel is not None:
            ours = row.get("kept")
            row = {**row, "released_dataset": rel[0], "released_rows": rel[1],
                   "vs_released": None if ours is None else int(ours) - rel[1]}
        out.append(row)
    return out


def _last_sft_stage(data: RunData) -> str:
    order = getattr(getattr(data.recipe, "training", None), "sft_order", None) or DEFAULT_SFT_ORDER
    return f"sft-{order[-1]}"


def pairs(data: RunData) -> list[tuple[str, str, str]]:
    """(our checkpoint's label, the released baseline's label, the released model's name)."""
    baselines = getattr(getattr(data.recipe, "evaluation", None), "baselines", None) or ()
    out = []
    for b in baselines:
        role = getattr(b, "counterpart", None) or RELEASED_MODELS.get(b.model)
        if role is None:
            continue
        ours = _last_sft_stage(data) if role == SFT_ALIAS else role
        out.append((ours, b.name, ROLE_NAMES.get(role, role)))
    return out


def _diff(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a - b:+.4f}".rstrip("0").rstrip(".")


def comparison(data: RunData, harness: dict[str, Any] | None, mtbench: dict[str, Any] | None) -> Table | None:
    """One row per (pair, score): ours, released, difference. None when no pair is evaluated."""
    rows: list[list[str]] = []
    for ours, theirs, name in pairs(data):
        label = f"{ours} vs {name} ({theirs})"
        if harness:
            models = harness.get("models", {})
            if ours in models and theirs in models:
                for t in harness.get("tasks", []):
                    a = models[ours]["scores"].get(t["name"], {}).get("value")
                    b = models[theirs]["scores"].get(t["name"], {}).get("value")
                    rows.append([label, f"{t['name']} ({t['num_fewshot']}-shot, {t['metric']})", fmt(a), fmt(b),
                                 _diff(a, b)])
        if mtbench:
            models = mtbench.get("models", {})
            if ours in models and theirs in models:
                for key, get in (("MT-Bench overall", lambda s: s.get("overall")),
                                 ("MT-Bench turn 1", lambda s: s.get("turns", {}).get("1")),
                                 ("MT-Bench turn 2", lambda s: s.get("turns", {}).get("2"))):
                    a, b = get(models[ours]), get(models[theirs])
                    rows.append([label, key, fmt(a), fmt(b), _diff(a, b)])
    if not rows:
        return None
    return Table("Against the released models", ["pair", "score", "this run", "released", "difference"], rows,
                 "Each checkpoint beside its released counterpart (evaluation.baselines), evaluated by the same "
                 "stages with the same settings; difference = this run minus released.")
