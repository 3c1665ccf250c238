"""The model card (README.md) of a committed training stage's ``model/`` directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..data.prompt_format import DEFAULT_SYSTEM, render_prompt


def _licence_tag(text: str) -> str:
    word = (text or "unknown").split()[0].lower()
    return word if word not in ("unknown", "") else "other"


def write_model_card(
    path: Path,
    *,
    recipe_name: str,
    stage: str,
    base_model: str,
    base_licence: str,
    data: list[dict[str, Any]],
    mode: str,
    mode_description: str,
    steps: int,
    final_loss: float | None,
    examples: int,
    trainer_settings: dict[str, Any],
    lora_settings: dict[str, Any],
    merge_dtype: str,
) -> None:
    """``data``: [{"name", "rows", "licence", "note"}] for every dataset the stage trained on."""
    tags = ["bezoar-jobs", "openbezoar", "dpo" if stage == "dpo" else "sft", "lora-merged"]
    if mode.startswith("qlora"):
        tags.append("qlora")
    head = [
        "---",
        f"license: {_licence_tag(base_licence)}",
        "library_name: transformers",
        "pipeline_tag: text-generation",
    ]
    head += ["tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    loss = f"{final_loss:.4f}" if final_loss is not None else "n/a"
    lines = [
        f"# {recipe_name}: {stage}",
        "",
        f"A full checkpoint (LoRA adapter merged into {merge_dtype} weights) written by the `{stage}` stage of "
        f"the bezoar-jobs recipe `{recipe_name}`.",
        "",
        "## Training",
        "",
        f"- Started from: `{base_model}`",
        f"- Method: {mode_description}",
        f"- Examples: {examples}; optimizer steps: {steps}; final training loss: {loss}",
        "",
        "## Data",
        "",
    ]
    for d in data:
        note = f" ({d['note']})" if d.get("note") else ""
        lines.append(f"- `{d['name']}`: {d['rows']} rows; licence: {d['licence']}{note}")
    lines += [
        "",
        "## Prompt format",
        "",
        "```",
        render_prompt("{instruction}", system=DEFAULT_SYSTEM) + "{response}<eos>",
        "```",
        "",
        "Orca-style rows put their own system message in the System block; earlier turns of a dialogue "
        "are completed Instruction/Response pairs before the final instruction. The tokenizer's chat template "
        "renders this layout, so `apply_chat_template` and a server's chat route prompt the model as it was trained.",
        "",
        "## Licences",
        "",
        f"- Base model: {base_licence}",
    ]
    for d in data:
        lines.append(f"- Data `{d['name']}`: {d['licence']}")
    lines += [
        "- Synthetic data inherit the terms of the teacher model that wrote them; check them before release.",
        "",
        "## Settings",
        "",
        "```json",
        json.dumps({"trainer": trainer_settings, "lora": lora_settings}, indent=2, sort_keys=True, default=str),
        "```",
        "",
    ]
    path.write_text("\n".join(head + lines), encoding="utf-8")
