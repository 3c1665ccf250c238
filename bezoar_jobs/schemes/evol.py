"""The WizardLM Evol-Instruct scheme (generate-evol) over dolly-15k seeds (../shared/RECIPE.md
"Evol-Instruct scheme").

Each lineage starts from a seed instruction (with its context passage); each round evolves it once
(in depth or in breadth), asks for the evolution's response, asks the judge whether the evolution
adds anything (rule 1), then applies WizardLM's elimination rules. A kept evolution becomes the
lineage's current instruction; a failed one returns it to the pool unchanged.
"""

from __future__ import annotations

import logging
import re
import string
from typing import Any

from ..data.io import load_rows, load_template, render
from ..errors import BadInput
from ..estimate import TYPICAL_INSTRUCTION_TOKENS, Ask, template_tokens
from ..llm.base import request
from ..recipe import EvolConfig, Recipe
from ..recipe_base import Decoding
from ..runner import StageContext, StageOutput
from ..stages.common import Phase, endpoint_info, normalise, open_client, usage_dict
from ..stages.generate import DOLLY_FIELDS, finish, req_seed, unit_rng
from ..stages.records import in_shard
from ..store import Store

log = logging.getLogger("bezoar")

# the columns sft-evol trains on: instruction, response, system (none: the default system text)
TRAIN_COLUMNS: tuple[str, str, str | None] = ("instruction", "response", None)

# an equality check needs a word or two of answer
EQUALITY_MAX_NEW_TOKENS = 8


def judge_pair(row: dict[str, Any]) -> tuple[str, str]:
    """The instruction and response the filter's judge rates."""
    return str(row["instruction"]), str(row.get("response") or "")


def expected_rows(recipe: Recipe) -> int:
    c = recipe.generation.evol
    return int(c.seeds * c.rounds)


def estimate(recipe: Recipe, store: Store, stage: str) -> list[Ask]:
    c = recipe.generation.evol
    ins = TYPICAL_INSTRUCTION_TOKENS
    n = c.seeds * c.rounds
    asks = [Ask(recipe.teacher, n, 100 + ins, c.evolve_decoding), Ask(recipe.teacher, n, 2 * ins, c.response_decoding)]
    if c.equality_check:
        asks.append(
            Ask(recipe.judge, n, template_tokens(c.equality_template.path) + 2 * ins, equality_decoding(recipe))
        )
    return asks


def equality_decoding(recipe: Recipe) -> Decoding:
    """The judge's decoding for an equality check: the filter's settings, cut to a few tokens."""
    return recipe.filter.decoding.model_copy(update={"max_new_tokens": EQUALITY_MAX_NEW_TOKENS})


_STOP_WORDS = frozenset(
    "a an the and or but if then so of to in on at by for with from as is are was were be been it this that these "
    "those i you he she we they me him her us them my your our their its not no yes ok okay".split()
)
_EVOL_LABEL = re.compile(r"^\s*(?:#?\s*(?:new|rewritten|created|invented)\s+(?:task|prompt)\s*#?\s*[:.-]?)\s*", re.I)


def clean_evolved(text: str) -> str:
    text = _EVOL_LABEL.sub("", text.strip())
    # the first paragraph is the task; the rest is usually the model answering it
    return text.split("\n\n")[0].strip().strip('"').strip()


def only_stopwords(text: str) -> bool:
    words = [w for w in re.split(r"\s+", text.lower().translate(str.maketrans("", "", string.punctuation))) if w]
    return all(w in _STOP_WORDS for w in words)


def parse_equal(text: str) -> bool | None:
    t = text.strip().lower()
    if re.search(r"\b(different|not equal|not the same|unequal)\b", t):
        return False
    if re.search(r"\b(equal|same|identical)\b", t):
        return True
    return None


def eliminate(cfg: EvolConfig, original: str, evolved: str, response: str, equal: bool | None) -> str | None:
    """The four elimination rules of WizardLM, in order; the reason, or None when kept."""
    if not evolved:
        return "empty evolution"
    if equal:
        return "rule 1: the judge found no information gain over the original"
    if "sorry" in response.lower() and len(response.split()) < cfg.sorry_max_words:
        return f"rule 2: the response says sorry and is under {cfg.sorry_max_words} words"
    if not response.strip() or only_stopwords(response):
        return "rule 3: the response is only punctuation and stop words"
    low = evolved.lower()
    for phrase in cfg.leak_phrases:
        if phrase.lower() in low:
            return f"rule 4: the instruction copies the rewriting prompt's words ({phrase!r})"
    if normalise(evolved) == normalise(original):
        return "rule 1: identical to the original"
    return None


def generate(ctx: StageContext) -> StageOutput:
    r = ctx.recipe
    cfg = r.generation.evol
    seeds = [row for row in load_rows(r.seeds.dolly, DOLLY_FIELDS, "seeds.dolly") if str(row["instruction"]).strip()]
    pick = unit_rng(ctx, "seeds")
    chosen = pick.sample(range(len(seeds)), min(cfg.seeds, len(seeds)))
    if len(chosen) < cfg.seeds:
        log.warning("generate-evol: %d seeds asked, only %d in seeds.dolly", cfg.seeds, len(chosen))
    ops = {
        op: load_template(
            f"{cfg.templates_dir}/{op}.txt", f"generation.evol.templates_dir ({op}.txt)", ("instruction",)
        )
        for op in (*cfg.depth_operations, "breadth")
    }
    t_resp = load_template(cfg.response_template.path, "generation.evol.response_template", ("instruction",))
    t_eq = load_template(cfg.equality_template.path, "generation.evol.equality_template", ("first", "second"))

    # lineages: each carries its current instruction; a failed evolution returns to the pool unchanged
    lineages = []
    for idx in chosen:
        lid = f"evol-{idx:06d}"
        if in_shard(lid, ctx.shard):
            row = seeds[idx]
            ins = str(row["instruction"]).strip()
            if str(row.get("context") or "").strip():
                ins = f"{ins}\n\n{str(row['context']).strip()}"
            lineages.append({"id": lid, "current": ins, "category": row["category"]})

    teacher = open_client(ctx, r.teacher, "teacher")
    judge = open_client(ctx, r.judge, "judge", cached=r.judge.backend != "local") if cfg.equality_check else None
    rows: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    try:
        for rnd in range(1, cfg.rounds + 1):
            plan: dict[str, tuple[str, str]] = {}
            for lin in lineages:
                rng = unit_rng(ctx, lin["id"], rnd)
                if rng.random() < cfg.in_depth_weight:
                    plan[lin["id"]] = (rng.choice(cfg.depth_operations), "in-depth")
                else:
                    plan[lin["id"]] = ("breadth", "in-breadth")
            evolve_items = [
                (
                    request(
                        f"{lin['id']}-r{rnd}-evolve",
                        render(ops[plan[lin["id"]][0]], instruction=lin["current"]),
                        cfg.evolve_decoding,
                        req_seed(ctx, lin["id"], rnd),
                    ),
                    {"lineage": lin["id"]},
                )
                for lin in lineages
            ]
            p_evo = Phase(ctx, f"round{rnd}-evolve")
            evo = p_evo.run(
                teacher, evolve_items, lambda res, m: {**m, "evolved": clean_evolved(res.text)}
            )
            ctx.check_stop()
            resp_items = [
                (
                    request(
                        f"{lin['id']}-r{rnd}-response",
                        render(t_resp, instruction=evo[f"{lin['id']}-r{rnd}-evolve"]["evolved"]),
                        cfg.response_decoding,
                        req_seed(ctx, lin["id"], rnd, "r"),
                    ),
                    {"lineage": lin["id"]},
                )
                for lin in lineages
                if f"{lin['id']}-r{rnd}-evolve" in evo and evo[f"{lin['id']}-r{rnd}-evolve"]["evolved"]
            ]
            p_resp = Phase(ctx, f"round{rnd}-response")
            resp = p_resp.run(
                teacher, resp_items, lambda res, m: {**m, "response": res.text.strip()}
            )
            ctx.check_stop()
            eq: dict[str, Any] = {}
            if judge is not None:
                eq_items = [
                    (
                        request(
                            f"{lin['id']}-r{rnd}-equal",
                            render(t_eq, first=lin["current"], second=evo[f"{lin['id']}-r{rnd}-evolve"]["evolved"]),
                            equality_decoding(r),
                            req_seed(ctx, lin["id"], rnd, "e"),
                        ),
                        {"lineage": lin["id"]},
                    )
                    for lin in lineages
                    if f"{lin['id']}-r{rnd}-evolve" in evo
                ]
                if r.judge.backend == "local":
                    # in process: compare the judge's probabilities of the two answer words (one
                    # forward pass, deterministic) instead of parsing a small model's free text
                    eq = {}
                    dists = (
                        judge.rating_distribution([q for q, _ in eq_items], "Answer: ", ("Equal", "Different"))
                        if eq_items
                        else []
                    )
                    for (q, m), dist in zip(eq_items, dists, strict=True):
                        eq[q.id] = {**m, "verdict": f"p(Equal)={dist['Equal']:.3f}", "equal": dist["Equal"] > 0.5}
                else:
                    eq = Phase(ctx, f"round{rnd}-equal").run(
                        judge,
                        eq_items,
                        lambda res, m: {**m, "verdict": res.text.strip(), "equal": parse_equal(res.text)},
                    )
                ctx.check_stop()
            for lin in lineages:
                e = evo.get(f"{lin['id']}-r{rnd}-evolve")
                a = resp.get(f"{lin['id']}-r{rnd}-response")
                if e is None or a is None:
                    failed = p_evo.failed.get(f"{lin['id']}-r{rnd}-evolve") or p_resp.failed.get(
                        f"{lin['id']}-r{rnd}-response")
                    why = "empty evolution" if e is not None and not e["evolved"] else f"teacher error: {failed}"
                    rejected.append(
                        {"id": f"{lin['id']}-r{rnd}", "instruction": e and e["evolved"], "epoch": rnd, "reason": why}
                    )
                    continue
                verdict = eq.get(f"{lin['id']}-r{rnd}-equal")
                op, strategy = plan[lin["id"]]
                reason = eliminate(
                    cfg, lin["current"], e["evolved"], a["response"], verdict["equal"] if verdict else None
                )
                row = {
                    "id": f"{lin['id']}-r{rnd}",
                    "instruction": e["evolved"],
                    "response": a["response"],
                    "category": lin["category"],
                    "evolution_strategy": strategy,
                    "in-depth-evolving_operation": op if strategy == "in-depth" else "",
                    "epoch": rnd,
                }
                if reason:
                    rejected.append({**row, "reason": reason})
                else:
                    rows.append(row)
                    lin["current"] = e["evolved"]
        t_usage, j_usage = teacher.usage, (judge.usage if judge else None)
    finally:
        teacher.close()
        if judge is not None:
            judge.close()
    if ctx.shard is not None:
        return StageOutput(committed=False)
    # deduplicate across lineages (breadth steps from similar seeds can meet)
    seen: set[str] = set()
    unique = []
    for row in rows:
        k = normalise(row["instruction"])
        if k in seen:
            rejected.append({**row, "reason": "duplicate"})
        else:
            seen.add(k)
            unique.append(row)
    if not unique:
        raise BadInput(
            "generate-evol: every evolution was eliminated (see rejected/); check the teacher and judge settings"
        )
    reasons: dict[str, int] = {}
    for x in rejected:
        key = x["reason"].split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    counts = {
        "seeds": len(lineages),
        "rounds": cfg.rounds,
        "rows": len(unique),
        "rejected": len(rejected),
        "eliminated_by": reasons,
    }
    extra_usage = {"judge": usage_dict(j_usage)} if j_usage else {}
    return finish(
        ctx,
        unique,
        rejected,
        counts,
        t_usage,
        "Evol-Instruct evolutions and responses",
        "seeds.dolly",
        {"evol": cfg.model_dump(mode="json"), "teacher": endpoint_info(r.teacher), "judge": endpoint_info(r.judge)},
        extra_usage,
    )


