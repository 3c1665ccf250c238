"""The Orca scheme (generate-orca): explanation answers to Flan Collection tasks, each under a
system message drawn for its sub-mix (docs/recipe.md, "Orca": the paper's system messages, their
mapping to sub-mixes and each departure from it).

Seeds are streamed (:func:`bezoar_jobs.data.io.stream_rows`: a hub dataset through ``datasets``
streaming, or a file read incrementally) and sampled per sub-mix in bounded memory
(:mod:`bezoar_jobs.data.sampling`): ``seeds`` rows split by ``submix_weights`` (default Orca's
sample sizes), zero-shot templates only by default, and a row whose prompt plus ``max_new_tokens``
cannot fit the teacher's context window skipped and counted (measured with the teacher's own
tokenizer). The sample is saved under ``_work/`` so shards and resumed runs do not read the
collection again.

System messages follow Orca's 16 (our wording, numbered like Orca's) and its mapping: CoT {6, 11,
16}; NIv2 {1, 2, 5, 7, 9, 12, 13, 14, 15}; T0 {1, 2, 3, 5, 7}; Flan 2021 {3, 4, 7}, and {8, 10}
for its multiple-choice rows (an ``*_opt`` template whose prompt lists options). The mapping lives in the
messages file (``submixes``), so a user's own file carries its own.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Iterator
from typing import Any

from ..data.inputs import row_checks
from ..data.io import load_rows, load_template, render, stream_rows
from ..data.sampling import SampleStats, allocate, bottom_k, first_k, shuffled
from ..errors import BadInput
from ..estimate import FLAN_INPUT_TOKENS, FLAN_TARGET_TOKENS, Ask, Typical, mean_tokens, template_tokens
from ..llm.base import request
from ..recipe import Recipe
from ..runner import StageContext, StageOutput
from ..stages.common import Phase, endpoint_info, open_client, work_key
from ..stages.generate import ContextGuard, TeacherClock, finish, req_seed, unit_rng
from ..stages.records import in_shard, stable_hash
from ..store import Store

log = logging.getLogger("bezoar")

# the columns sft-orca trains on: instruction, response, and the row's own system message
TRAIN_COLUMNS: tuple[str, str, str | None] = ("inputs", "explained_targets", "system_message")

# Flan's task_source values (and the SirNeural file prefixes) -> Orca's sub-mix names
SUBMIX_NAMES = {"cot": "cot", "niv2": "niv2", "sni": "niv2", "t0": "t0", "p3": "t0", "flan2021": "flan2021",
                "flan": "flan2021"}
MC_SUFFIX = "_mc"


def submix(row: dict[str, Any]) -> str:
    src = str(row.get("task_source", "")).strip().lower().replace(" ", "").replace("_", "")
    return SUBMIX_NAMES.get(src, src)


def judge_pair(row: dict[str, Any], recipe: Recipe | None = None) -> tuple[str, str]:
    """The task (with the system message the teacher was given and, when the recipe says
    ``generation.orca.judge_sees_target``, the Flan target as a reference) and the answer."""
    ins = str(row["inputs"])
    if row.get("system_message"):
        ins = f"(The assistant was told: {row['system_message']})\n\n{ins}"
    if recipe is not None and recipe.generation.orca.judge_sees_target and str(row.get("targets") or "").strip():
        ins = f"{ins}\n\n(Reference answer from the dataset: {str(row['targets']).strip()})"
    return ins, str(row.get("explained_targets") or "")


def judge_tokens(recipe: Recipe) -> tuple[int, float]:
    """(instruction tokens, response cap) of what the filter's judge sees for a typical row."""
    c = recipe.generation.orca
    ins = mean_tokens(recipe.seeds.flan, ("inputs",), FLAN_INPUT_TOKENS) + mean_tokens(c.system_messages, ("text",), 30)
    if c.judge_sees_target:
        ins += mean_tokens(recipe.seeds.flan, ("targets",), FLAN_TARGET_TOKENS) + 10
    return ins, c.response_decoding.max_new_tokens


# a local seed file larger than this is taken to hold enough rows of every sub-mix
_SCAN_FOR_PLAN = 200_000


def expected_rows(recipe: Recipe) -> int:
    """The seeds the stage will send: ``seeds``, or fewer when a local seed file holds fewer eligible
    rows of a sub-mix than its share (the stage says so too; the plan never downloads a hub dataset)."""
    c = recipe.generation.orca
    quotas = allocate(c.seeds, {str(k): float(v) for k, v in c.submix_weights.items()})
    src = recipe.seeds.flan
    if src.on_hub or src.path.startswith("s3://"):
        return int(c.seeds)
    types = {t.lower() for t in c.template_types}
    have: dict[str, int] = {}
    try:
        for n, row in enumerate(stream_rows(src, field="seeds.flan", **row_checks("seeds.flan"))):
            if n >= _SCAN_FOR_PLAN:
                return int(c.seeds)
            if not types or str(row.get("template_type") or "").lower() in types:
                have[submix(row)] = have.get(submix(row), 0) + 1
    except BadInput:
        return int(c.seeds)
    return sum(min(q, have.get(g, 0)) for g, q in quotas.items())


def estimate(recipe: Recipe, store: Store, stage: str) -> list[Ask]:
    c = recipe.generation.orca
    prompt = (mean_tokens(recipe.seeds.flan, ("inputs",), FLAN_INPUT_TOKENS)
              + mean_tokens(c.system_messages, ("text",), 30))  # + a system message
    if c.show_gold_target:
        prompt += template_tokens(c.gold_response_template.path) + FLAN_TARGET_TOKENS
    return [Ask(recipe.teacher, expected_rows(recipe), prompt, c.response_decoding, Typical.RESPONSE, "explanations")]


# How a Flan row shows its answer options (google-research/FLAN, flan/v2: preprocessors.format_options writes
# "OPTIONS:" then the items; format_options_non_deterministic draws a header from
# templates.OPT_START_STRING_CANDIDATES, the empty one included, and an item marker such as "- ", "(ii) ", "B). ")
_OPT_HEADER = re.compile(
    r"(?:^|\s)(?:options(?: are)?|opt|possible answers|available (?:choices|options)|choose (?:your answer )?from"
    r"|choices|pick (?:your answer )?from|select from)\s*:|(?:^|\s)(?:select|pick) from the following\.",
    re.I,
)
_LABEL = r"(?:[A-Za-z]|[0-9]{1,2}|[ivxIVX]{1,5})"  # an item's name: a letter, a number, a roman numeral
_ITEM_LABEL = rf"(?:\({_LABEL}\)\.?|\[{_LABEL}\]\.?|{_LABEL}\)\.?|{_LABEL}\.)"  # (b) (b). [b]. b). b.
_ITEM_MARK = rf"(?:-{{1,2}}|\+|\*|\[[-+]\]|{_ITEM_LABEL})"  # or a bullet


def shows_options(inputs: str, target: str = "") -> bool:
    """Whether a Flan prompt lists answer options: one of Flan's option headers; or, under Flan's empty
    header, the target written as one of the listed items, or the target being an item's label (Flan
    answers "(B)." when it names the items so)."""
    if _OPT_HEADER.search(inputs):
        return True
    t = target.strip()
    if not t or len(t) > 300:
        return False
    if re.search(rf"(?:^|\s){_ITEM_MARK}[ \t]*{re.escape(t)}[ \t]*[;.]?(?=\s|$)", inputs):
        return True
    return bool(re.fullmatch(_ITEM_LABEL, t)) and bool(re.search(rf"(?:^|\s){re.escape(t)}[ \t]", inputs))


def is_multiple_choice(row: dict[str, Any]) -> bool:
    """A Flan 2021 row that shows its answer options (Orca's multiple-choice messages are for these only).
    Flan's ``zs_opt`` / ``fs_opt`` template types do not say so by themselves: Flan registers every task,
    translation and summarisation included, under ``zs_opt`` (flan/v2/tasks.py), and only the tasks with
    options show any; ``*_noopt`` rows never do. So an ``_opt`` row (or one without a template type)
    counts when its prompt lists options (:func:`shows_options`)."""
    if submix(row) != "flan2021":
        return False
    tt = str(row.get("template_type") or "").lower()
    if tt and (not tt.endswith("_opt") or tt.endswith("noopt")):
        return False
    return shows_options(str(row.get("inputs", "")), str(row.get("targets") or ""))


def pool_key(row: dict[str, Any]) -> str:
    """The ``submixes`` label a row draws its system message from."""
    sub = submix(row)
    return sub + MC_SUFFIX if is_multiple_choice(row) else sub


def choose_system_message(messages: list[dict[str, Any]], row: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Orca's rule: draw uniformly from the messages mapped to the row's sub-mix (Flan 2021
    multiple-choice rows: those mapped to ``flan2021_mc``)."""
    key = pool_key(row)
    pool = [m for m in messages if key in m["submixes"]]
    if not pool:
        raise BadInput(f"generation.orca.system_messages: no message is mapped to {key!r} (field 'submixes')")
    return rng.choice(pool)


def load_messages(ctx: StageContext) -> list[dict[str, Any]]:
    cfg = ctx.recipe.generation.orca
    messages = load_rows(cfg.system_messages, field="generation.orca.system_messages",
                         **row_checks("generation.orca.system_messages"))
    for m in messages:
        if not isinstance(m["submixes"], list) or not all(isinstance(x, str) for x in m["submixes"]):
            raise BadInput(f"generation.orca.system_messages: message {m['id']}: 'submixes' must be a list of names")
    for sub, w in cfg.submix_weights.items():
        # Flan 2021's multiple-choice rows draw from their own pool: checked now, not after the whole sampling pass
        for key in (sub, sub + MC_SUFFIX) if sub == "flan2021" else (sub,):
            if w > 0 and not any(key in m["submixes"] for m in messages):
                raise BadInput(f"generation.orca.system_messages: no message is mapped to sub-mix {key!r}")
    return messages


def sample_seeds(ctx: StageContext, guard: ContextGuard, t_user: str,
                 longest: dict[str, str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The seed rows, sampled per sub-mix from the stream (see the module docstring), each with its
    position in the stream (``original_index``); and the sampling figures for the manifest. Saved
    under ``_work/`` once: a shard or a resumed run reads the saved sample."""
    r = ctx.recipe
    cfg = r.generation.orca
    saved = f"{work_key(ctx)}/seed-sample.json"
    if ctx.work.exists(saved):
        got = json.loads(ctx.work.get_bytes(saved))
        return got["rows"], got["figures"]
    quotas = allocate(cfg.seeds, {str(k): float(v) for k, v in cfg.submix_weights.items()})
    types = {t.lower() for t in cfg.template_types}
    max_new = cfg.response_decoding.max_new_tokens

    def indexed() -> Iterator[dict[str, Any]]:
        for i, row in enumerate(stream_rows(r.seeds.flan, field="seeds.flan", **row_checks("seeds.flan"))):
            yield {**row, "_index": i}

    def keep(row: dict[str, Any]) -> bool:
        return not types or str(row.get("template_type") or "").lower() in types

    def key(row: dict[str, Any], group: str) -> int:
        return stable_hash(r.seed, group, row["task_name"], row["inputs"], row["targets"])

    def fits(row: dict[str, Any]) -> bool:
        # the longest system message of the row's pool is what could push it over
        return guard.fits(_user_text(t_user, row, cfg.show_gold_target), max_new, system=longest.get(pool_key(row)))

    stats = SampleStats()
    if cfg.sampling == "reservoir":
        picked = bottom_k(indexed(), quotas, submix, key, keep, fits, stats)
    else:
        seed = stable_hash(r.seed, ctx.name, "shuffle") % (2**31 - 1)
        picked = first_k(shuffled(indexed(), cfg.shuffle_buffer_size, seed), quotas, submix, key, keep, fits, stats)
    if stats.scanned == 0:
        raise BadInput(f"seeds.flan.path: {r.seeds.flan.path}: the dataset is empty")
    short = {g: quotas[g] - len(picked[g]) for g in quotas if len(picked[g]) < quotas[g]}
    if short:
        log.warning(
            "generate-orca: fewer eligible rows than asked in sub-mix(es) %s (seeds.flan has too few rows of "
            "those sub-mixes and template types that fit the teacher's context); the sample is %d rows, not %d",
            short, sum(len(v) for v in picked.values()), cfg.seeds,
        )
    rows = [row for g in quotas for _, row in picked[g]]
    figures = {
        "sampling": cfg.sampling,
        "quotas": quotas,
        "sampled": {g: len(picked[g]) for g in quotas},
        "short_of_quota": short,
        "rows_scanned": stats.scanned,
        "rows_per_submix": stats.by_group,
        "rows_of_other_sources": stats.other_groups,
        "rows_other_templates": stats.filtered,
        "duplicates": stats.duplicates,
        "length_checked": stats.checked,
        "too_long_for_teacher": stats.refused,
        "teacher_context_tokens": guard.limit,
    }
    ctx.work.put_bytes(saved, json.dumps({"rows": rows, "figures": figures}, ensure_ascii=False).encode("utf-8"))
    return rows, figures


def _user_text(template: str, row: dict[str, Any], gold: bool) -> str:
    return render(template, inputs=str(row["inputs"]), targets=str(row["targets"]) if gold else "")


def generate(ctx: StageContext) -> StageOutput:
    r = ctx.recipe
    cfg = r.generation.orca
    messages = load_messages(ctx)
    longest: dict[str, str] = {}  # per pool, its longest system message
    for m in messages:
        for key in m["submixes"]:
            if len(str(m["text"])) > len(longest.get(key, "")):
                longest[key] = str(m["text"])
    if cfg.show_gold_target:
        t_user = load_template(cfg.gold_response_template.path, "generation.orca.gold_response_template")
    else:
        t_user = load_template(cfg.response_template.path, "generation.orca.response_template")
    guard = ContextGuard(r.teacher)
    seeds, figures = sample_seeds(ctx, guard, t_user, longest)
    items = []
    for row in seeds:
        i = int(row["_index"])
        rid = f"orca-{i:09d}"
        if not in_shard(rid, ctx.shard):
            continue
        msg = choose_system_message(messages, row, unit_rng(ctx, rid))
        user = _user_text(t_user, row, cfg.show_gold_target)
        items.append(
            (
                request(rid, user, cfg.response_decoding, req_seed(ctx, rid), system=str(msg["text"]) or None),
                {"index": i, "system_message": str(msg["text"]), "system_message_id": msg["id"]},
            )
        )
    by_index = {int(row["_index"]): row for row in seeds}
    teacher = open_client(ctx, r.teacher, "teacher")
    clock = TeacherClock(ctx)
    try:
        phase = Phase(ctx, "responses")
        with clock:
            out = phase.run(teacher, items, lambda res, m: {**m, "explained_targets": res.text.strip()})
        usage = teacher.usage
    finally:
        teacher.close()
    if ctx.shard is not None:
        return StageOutput(committed=False)
    rows, rejected = [], []
    for req, m in items:
        rec = out.get(req.id)
        row = by_index[m["index"]]
        base = {
            "id": req.id,
            "original_index": m["index"],
            "inputs": row["inputs"],
            "targets": row["targets"],
            "task_source": row["task_source"],
            "task_name": row["task_name"],
            "template_type": row["template_type"],
            "system_message": m["system_message"],
            "system_message_id": m["system_message_id"],
        }
        if rec is None or not rec["explained_targets"]:
            why = f"teacher error: {phase.failed.get(req.id)}" if rec is None else "empty response"
            rejected.append({**base, "reason": why})
        else:
            rows.append({**base, "explained_targets": rec["explained_targets"], "dataset_source": submix(row)})
    if not rows:
        raise BadInput("generate-orca: no usable teacher answer (see rejected/)")
    counts = {"seeds": len(items), "seeds_asked": cfg.seeds, "rows": len(rows), "rejected": len(rejected),
              "by_submix": {g: sum(1 for x in rows if x["dataset_source"] == g) for g in cfg.submix_weights},
              "seeds_too_long": figures["too_long_for_teacher"]}
    return finish(ctx, rows, rejected, counts, usage, "Orca-style explanation answers to Flan tasks", "seeds.flan",
                  {"orca": cfg.model_dump(mode="json"), "teacher": endpoint_info(r.teacher), "sampling": figures},
                  clock=clock, clients={"teacher": teacher})
