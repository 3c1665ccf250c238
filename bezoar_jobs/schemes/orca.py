"""The Orca scheme (generate-orca): explanation answers to Flan Collection tasks, each under a
system message drawn for its sub-mix (../shared/RECIPE.md "Orca scheme")."""

from __future__ import annotations

import logging
import random
import re
from typing import Any

from ..data.io import load_rows, load_template, local_copy, read_jsonl, render
from ..errors import BadInput
from ..estimate import TYPICAL_INSTRUCTION_TOKENS, Ask
from ..llm.base import request
from ..recipe import Recipe
from ..runner import StageContext, StageOutput
from ..stages.common import Phase, endpoint_info, open_client
from ..stages.generate import FLAN_FIELDS, finish, req_seed, unit_rng
from ..stages.records import in_shard
from ..store import Store

log = logging.getLogger("bezoar")

# the columns sft-orca trains on: instruction, response, and the row's own system message
TRAIN_COLUMNS: tuple[str, str, str | None] = ("inputs", "explained_targets", "system_message")


def judge_pair(row: dict[str, Any]) -> tuple[str, str]:
    """The task (with the system message the teacher was given) and the answer the judge rates."""
    ins = str(row["inputs"])
    if row.get("system_message"):
        ins = f"(The assistant was told: {row['system_message']})\n\n{ins}"
    return ins, str(row.get("explained_targets") or "")


def expected_rows(recipe: Recipe) -> int:
    return int(recipe.generation.orca.seeds)


def estimate(recipe: Recipe, store: Store, stage: str) -> list[Ask]:
    c = recipe.generation.orca
    return [Ask(recipe.teacher, c.seeds, 60 + 2 * TYPICAL_INSTRUCTION_TOKENS, c.response_decoding)]


_MC = re.compile(r"(^|\n)\s*(options|choices)\s*:", re.I)


def is_multiple_choice(row: dict[str, Any]) -> bool:
    tt = str(row.get("template_type", ""))
    return (tt.endswith("_opt") or ("_opt" in tt and "noopt" not in tt)) or bool(_MC.search(str(row.get("inputs", ""))))


def choose_system_message(messages: list[dict[str, Any]], row: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Orca's rule: draw from the messages meant for the row's sub-mix; multiple-choice rows get the
    "answer first, then explain why the others are wrong" messages."""
    sub = str(row.get("task_source", "")).lower()
    pool = [m for m in messages if sub in m["submixes"]]
    if is_multiple_choice(row):
        mc = [m for m in pool if m.get("multiple_choice")] or [m for m in messages if m.get("multiple_choice")]
        pool = mc or pool
    else:
        pool = [m for m in pool if not m.get("multiple_choice")] or pool
    if not pool:
        pool = messages
    return rng.choice(pool)


def generate(ctx: StageContext) -> StageOutput:
    r = ctx.recipe
    cfg = r.generation.orca
    flan = load_rows(r.seeds.flan, FLAN_FIELDS, "seeds.flan")
    msg_path = local_copy(cfg.system_messages.path)
    messages = read_jsonl(msg_path, ("id", "text", "submixes"), cfg.system_messages.path)
    t_resp = load_template(cfg.response_template.path, "generation.orca.response_template", ("inputs",))
    # weighted sampling by sub-mix, without replacement
    rng = unit_rng(ctx, "seeds")
    by_sub: dict[str, list[int]] = {}
    for i, row in enumerate(flan):
        by_sub.setdefault(str(row["task_source"]).lower(), []).append(i)
    unknown = sorted(set(by_sub) - set(cfg.submix_weights))
    if unknown:
        log.warning(
            "seeds.flan: task_source values %s have no weight in generation.orca.submix_weights: skipped", unknown
        )
    weights = {s: w for s, w in cfg.submix_weights.items() if by_sub.get(s) and w > 0}
    if not weights:
        raise BadInput(f"seeds.flan: {r.seeds.flan.path}: no rows from the sub-mixes in generation.orca.submix_weights")
    for s in weights:
        rng.shuffle(by_sub[s])
    picked: list[int] = []
    while len(picked) < cfg.seeds and any(by_sub.get(s) for s in weights):
        live = [s for s in weights if by_sub.get(s)]
        s = rng.choices(live, [weights[x] for x in live])[0]
        picked.append(by_sub[s].pop())
    items = []
    for i in picked:
        rid = f"orca-{i:07d}"
        if not in_shard(rid, ctx.shard):
            continue
        row = flan[i]
        msg = choose_system_message(messages, row, unit_rng(ctx, rid))
        user = render(t_resp, inputs=str(row["inputs"]), targets=str(row["targets"]) if cfg.show_gold_target else "")
        items.append(
            (
                request(rid, user, cfg.response_decoding, req_seed(ctx, rid), system=msg["text"] or None),
                {"index": i, "system_message": msg["text"]},
            )
        )
    teacher = open_client(ctx, r.teacher, "teacher")
    try:
        phase = Phase(ctx, "responses")
        out = phase.run(teacher, items, lambda res, m: {**m, "explained_targets": res.text.strip()})
        usage = teacher.usage
    finally:
        teacher.close()
    if ctx.shard is not None:
        return StageOutput(committed=False)
    rows, rejected = [], []
    for req, m in items:
        rec = out.get(req.id)
        row = flan[m["index"]]
        base = {
            "id": req.id,
            "original_index": m["index"],
            "inputs": row["inputs"],
            "targets": row["targets"],
            "task_source": row["task_source"],
            "task_name": row["task_name"],
            "template_type": row["template_type"],
            "system_message": m["system_message"],
        }
        if rec is None or not rec["explained_targets"]:
            why = f"teacher error: {phase.failed.get(req.id)}" if rec is None else "empty response"
            rejected.append({**base, "reason": why})
        else:
            rows.append({**base, "explained_targets": rec["explained_targets"], "dataset_source": r.seeds.flan.path})
    if not rows:
        raise BadInput("generate-orca: no usable teacher answer (see rejected/)")
    counts = {"seeds": len(items), "rows": len(rows), "rejected": len(rejected)}
    return finish(ctx, rows, rejected, counts, usage, "Orca-style explanation answers to Flan tasks", "seeds.flan",
                  {"orca": cfg.model_dump(mode="json"), "teacher": endpoint_info(r.teacher)})


