"""The three generation schemes: LaMini, Evol-Instruct and Orca (../shared/RECIPE.md).

Each scheme is a sequence of request phases (see common.Phase). Work is split into *units* with
stable ids (a LaMini prompt, an Evol-Instruct lineage, an Orca seed row); ``--shard i/N`` takes the
units whose id hashes to ``i`` mod ``N`` and writes only records. The run without ``--shard`` reads
the records of every shard, asks for whatever is still missing, deduplicates and commits.
"""

from __future__ import annotations

import logging
import random
import re
import string
from typing import Any

from ..data.io import dataset_card, load_rows, load_template, local_copy, read_jsonl, render, write_jsonl
from ..errors import BadInput
from ..llm.base import request
from ..runner import StageContext, StageOutput
from .common import Phase, cost_usd, endpoint_info, normalise, open_client, usage_dict
from .records import in_shard, stable_hash

log = logging.getLogger("bezoar")

DOLLY_FIELDS = ("instruction", "context", "response", "category")
FLAN_FIELDS = ("inputs", "targets", "task_source", "task_name", "template_type")


def _rng(ctx: StageContext, *parts: Any) -> random.Random:
    return random.Random(stable_hash(ctx.recipe.seed, ctx.name, *parts))


def _req_seed(ctx: StageContext, *parts: Any) -> int:
    return stable_hash(ctx.recipe.seed, *parts) % (2**31 - 1)


# ------------------------------------------------------------------------------------------------
# LaMini
# ------------------------------------------------------------------------------------------------
_TAGGED = re.compile(r"<example>(.*?)</example>", re.S | re.I)
_OPEN_TAG = re.compile(r"<example>(.*?)(?=<example>|$)", re.S | re.I)
_LIST_PREFIX = re.compile(r"^\s*(?:\d+\s*[.):\]-]|[-*\u2022]|\(\d+\)|[a-z][.)])\s+", re.I)
_LABEL_PREFIX = re.compile(r"^\s*(?:task|instruction|question|new task|example)\s*\d*\s*[:.-]\s*", re.I)


def parse_instructions(text: str, min_words: int = 3) -> list[str]:
    """Instructions from a teacher's answer: ``<example>`` tags first; tolerate a missing closing
    tag, numbered or bulleted lists, and "Task 3:" style labels."""
    found = _TAGGED.findall(text)
    if not found and "<example>" in text.lower():
        found = _OPEN_TAG.findall(text)
    if not found:
        found = [ln for ln in text.splitlines() if _LIST_PREFIX.match(ln) or _LABEL_PREFIX.match(ln)]
        if not found:
            found = text.splitlines()
    out = []
    for item in found:
        item = re.sub(r"</?example>", "", item, flags=re.I)
        item = _LABEL_PREFIX.sub("", _LIST_PREFIX.sub("", item.strip())).strip().strip('"').strip()
        item = _WS.sub(" ", item)
        if len(item.split()) >= min_words and not item.endswith(":") and not _PREAMBLE.match(item):
            out.append(item)
    return out


# a model's own framing lines ("Here are 8 new tasks ...") are not instructions
_PREAMBLE = re.compile(r"^(?:here (?:are|is)|these are|sure\b|okay\b|below (?:are|is)|\d+ new tasks?\b)", re.I)


_WS = re.compile(r"\s+")


def _examples_block(items: list[str]) -> str:
    return "\n".join(f"<example>{x}</example>" for x in items)


def run_lamini(ctx: StageContext) -> StageOutput:
    r = ctx.recipe
    cfg = r.generation.lamini
    seeds = [row for row in load_rows(r.seeds.dolly, DOLLY_FIELDS, "seeds.dolly") if str(row["instruction"]).strip()]
    seed_instr = [str(row["instruction"]).strip() for row in seeds]
    if len(seed_instr) < cfg.examples_per_prompt:
        raise BadInput(f"seeds.dolly: {len(seed_instr)} instructions, fewer than generation.lamini.examples_per_prompt")
    topics: list[str] = []
    if cfg.topic_prompts:
        if cfg.topics is None:
            raise BadInput("generation.lamini.topics: needed when topic_prompts > 0")
        topics = [str(t["topic"]) for t in load_rows(cfg.topics, ("topic",), "generation.lamini.topics")]
    t_example = load_template(cfg.example_template.path, "generation.lamini.example_template", ("examples", "n"))
    t_topic = load_template(cfg.topic_template.path, "generation.lamini.topic_template", ("examples", "topics", "n"))
    t_resp = load_template(cfg.response_template.path, "generation.lamini.response_template", ("instruction",))

    units = [("example", k) for k in range(cfg.example_prompts)] + [("topic", k) for k in range(cfg.topic_prompts)]
    items = []
    for kind, k in units:
        rid = f"lamini-{kind}-{k:05d}"
        if not in_shard(rid, ctx.shard):
            continue
        rng = _rng(ctx, rid)
        ex = rng.sample(seed_instr, cfg.examples_per_prompt)
        meta: dict[str, Any] = {"source": kind, "examples": ex}
        if kind == "example":
            prompt = render(t_example, examples=_examples_block(ex), n=str(cfg.instructions_per_prompt))
        else:
            tp = rng.sample(topics, min(cfg.topics_per_prompt, len(topics)))
            meta["topics"] = tp
            prompt = render(t_topic, examples=_examples_block(ex), topics=", ".join(tp), n=str(cfg.instructions_per_prompt))
        items.append((request(rid, prompt, cfg.instruction_decoding, _req_seed(ctx, rid)), meta))

    teacher = open_client(ctx, r.teacher, "teacher")
    try:
        p1 = Phase(ctx, "instructions")
        gen = p1.run(teacher, items, lambda res, m: {**m, "raw": res.text})
        ctx.check_stop()
        # parse, then deduplicate (against each other and against the seeds), in unit order
        seen = {normalise(s) for s in seed_instr}
        rejected: list[dict[str, Any]] = []
        candidates: list[tuple[str, str]] = []
        for req, _ in items:
            rec = gen.get(req.id)
            if rec is None:
                continue
            parsed = parse_instructions(rec["raw"], cfg.min_instruction_words)
            if not parsed:
                rejected.append({"id": req.id, "instruction": None, "reason": "no instruction could be parsed", "raw": rec["raw"]})
            for ins in parsed:
                key = normalise(ins)
                if key in seen:
                    rejected.append({"id": req.id, "instruction": ins, "reason": "duplicate"})
                    continue
                seen.add(key)
                candidates.append((ins, rec["source"]))
        if cfg.max_instructions:
            candidates = candidates[: cfg.max_instructions]
        ritems = []
        for ins, source in candidates:
            rid = "lamini-resp-" + format(stable_hash(normalise(ins)), "016x")
            ritems.append((request(rid, render(t_resp, instruction=ins), cfg.response_decoding, _req_seed(ctx, rid)), {"instruction": ins, "source": source}))
        p2 = Phase(ctx, "responses")
        resp = p2.run(teacher, ritems, lambda res, m: {**m, "response": res.text.strip()})
        usage = teacher.usage
    finally:
        teacher.close()
    if ctx.shard is not None:
        return StageOutput(committed=False)

    rows = []
    for req, m in ritems:
        rec = resp.get(req.id)
        if rec is None:
            rejected.append({"id": req.id, "instruction": m["instruction"], "reason": f"teacher error: {p2.failed.get(req.id)}"})
        elif not rec["response"].strip():
            rejected.append({"id": req.id, "instruction": m["instruction"], "reason": "empty response"})
        else:
            rows.append({"id": req.id, "instruction": rec["instruction"], "source": rec["source"], "response": rec["response"]})
    if not rows:
        raise BadInput("generate-lamini: the teacher's answers gave no usable instruction (see rejected/ and the teacher settings)")
    counts = {
        "prompts": len(items),
        "raw_instructions": len(candidates) + sum(1 for x in rejected if x["reason"] == "duplicate"),
        "unique_instructions": len(candidates),
        "rows": len(rows),
        "rejected": len(rejected),
    }
    return _finish(ctx, rows, rejected, counts, usage, "LaMini-style instructions and responses",
                   r.seeds.dolly.licence, {"lamini": cfg.model_dump(mode="json"), "teacher": endpoint_info(r.teacher)})


# ------------------------------------------------------------------------------------------------
# Evol-Instruct
# ------------------------------------------------------------------------------------------------
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


def eliminate(cfg, original: str, evolved: str, response: str, equal: bool | None) -> str | None:
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


def run_evol(ctx: StageContext) -> StageOutput:
    r = ctx.recipe
    cfg = r.generation.evol
    seeds = [row for row in load_rows(r.seeds.dolly, DOLLY_FIELDS, "seeds.dolly") if str(row["instruction"]).strip()]
    pick = _rng(ctx, "seeds")
    chosen = pick.sample(range(len(seeds)), min(cfg.seeds, len(seeds)))
    if len(chosen) < cfg.seeds:
        log.warning("generate-evol: %d seeds asked, only %d in seeds.dolly", cfg.seeds, len(chosen))
    ops = {op: load_template(f"{cfg.templates_dir}/{op}.txt", f"generation.evol.templates_dir ({op}.txt)", ("instruction",)) for op in (*cfg.depth_operations, "breadth")}
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
            plan = {}
            for lin in lineages:
                rng = _rng(ctx, lin["id"], rnd)
                if rng.random() < cfg.in_depth_weight:
                    op, strategy = rng.choice(cfg.depth_operations), "in-depth"
                else:
                    op, strategy = "breadth", "in-breadth"
                plan[lin["id"]] = (op, strategy)
            evolve_items = [
                (request(f"{lin['id']}-r{rnd}-evolve", render(ops[plan[lin['id']][0]], instruction=lin["current"]), cfg.evolve_decoding, _req_seed(ctx, lin["id"], rnd)), {"lineage": lin["id"]})
                for lin in lineages
            ]
            evo = Phase(ctx, f"round{rnd}-evolve").run(teacher, evolve_items, lambda res, m: {**m, "evolved": clean_evolved(res.text)})
            ctx.check_stop()
            resp_items = [
                (request(f"{lin['id']}-r{rnd}-response", render(t_resp, instruction=evo[f"{lin['id']}-r{rnd}-evolve"]["evolved"]), cfg.response_decoding, _req_seed(ctx, lin["id"], rnd, "r")), {"lineage": lin["id"]})
                for lin in lineages
                if f"{lin['id']}-r{rnd}-evolve" in evo and evo[f"{lin['id']}-r{rnd}-evolve"]["evolved"]
            ]
            resp = Phase(ctx, f"round{rnd}-response").run(teacher, resp_items, lambda res, m: {**m, "response": res.text.strip()})
            ctx.check_stop()
            eq: dict[str, Any] = {}
            if judge is not None:
                eq_items = [
                    (request(f"{lin['id']}-r{rnd}-equal", render(t_eq, first=lin["current"], second=evo[f"{lin['id']}-r{rnd}-evolve"]["evolved"]), r.filter.decoding.model_copy(update={"max_new_tokens": 8}), _req_seed(ctx, lin["id"], rnd, "e")), {"lineage": lin["id"]})
                    for lin in lineages
                    if f"{lin['id']}-r{rnd}-evolve" in evo
                ]
                if r.judge.backend == "local":
                    # in process: compare the judge's probabilities of the two answer words (one
                    # forward pass, deterministic) instead of parsing a small model's free text
                    eq = {}
                    dists = judge.rating_distribution([q for q, _ in eq_items], "Answer: ", ("Equal", "Different")) if eq_items else []
                    for (q, m), dist in zip(eq_items, dists, strict=True):
                        eq[q.id] = {**m, "verdict": f"p(Equal)={dist['Equal']:.3f}", "equal": dist["Equal"] > 0.5}
                else:
                    eq = Phase(ctx, f"round{rnd}-equal").run(judge, eq_items, lambda res, m: {**m, "verdict": res.text.strip(), "equal": parse_equal(res.text)})
                ctx.check_stop()
            for lin in lineages:
                e = evo.get(f"{lin['id']}-r{rnd}-evolve")
                a = resp.get(f"{lin['id']}-r{rnd}-response")
                if e is None or a is None:
                    why = "empty evolution" if e is not None and not e["evolved"] else "teacher error"
                    rejected.append({"id": f"{lin['id']}-r{rnd}", "instruction": e and e["evolved"], "epoch": rnd, "reason": why})
                    continue
                q = eq.get(f"{lin['id']}-r{rnd}-equal")
                op, strategy = plan[lin["id"]]
                why = eliminate(cfg, lin["current"], e["evolved"], a["response"], q["equal"] if q else None)
                row = {
                    "id": f"{lin['id']}-r{rnd}",
                    "instruction": e["evolved"],
                    "response": a["response"],
                    "category": lin["category"],
                    "evolution_strategy": strategy,
                    "in-depth-evolving_operation": op if strategy == "in-depth" else "",
                    "epoch": rnd,
                }
                if why:
                    rejected.append({**row, "reason": why})
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
        raise BadInput("generate-evol: every evolution was eliminated (see rejected/); check the teacher and judge settings")
    reasons: dict[str, int] = {}
    for x in rejected:
        key = x["reason"].split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    counts = {"seeds": len(lineages), "rounds": cfg.rounds, "rows": len(unique), "rejected": len(rejected), "eliminated_by": reasons}
    extra_usage = {"judge": usage_dict(j_usage)} if j_usage else {}
    return _finish(ctx, unique, rejected, counts, t_usage, "Evol-Instruct evolutions and responses", r.seeds.dolly.licence,
                   {"evol": cfg.model_dump(mode="json"), "teacher": endpoint_info(r.teacher), "judge": endpoint_info(r.judge)}, extra_usage)


# ------------------------------------------------------------------------------------------------
# Orca
# ------------------------------------------------------------------------------------------------
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


def run_orca(ctx: StageContext) -> StageOutput:
    r = ctx.recipe
    cfg = r.generation.orca
    flan = load_rows(r.seeds.flan, FLAN_FIELDS, "seeds.flan")
    msg_path = local_copy(cfg.system_messages.path)
    messages = read_jsonl(msg_path, ("id", "text", "submixes"), cfg.system_messages.path)
    t_resp = load_template(cfg.response_template.path, "generation.orca.response_template", ("inputs",))
    # weighted sampling by sub-mix, without replacement
    rng = _rng(ctx, "seeds")
    by_sub: dict[str, list[int]] = {}
    for i, row in enumerate(flan):
        by_sub.setdefault(str(row["task_source"]).lower(), []).append(i)
    unknown = sorted(set(by_sub) - set(cfg.submix_weights))
    if unknown:
        log.warning("seeds.flan: task_source values %s have no weight in generation.orca.submix_weights: skipped", unknown)
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
        msg = choose_system_message(messages, row, _rng(ctx, rid))
        user = render(t_resp, inputs=str(row["inputs"]), targets=str(row["targets"]) if cfg.show_gold_target else "")
        items.append((request(rid, user, cfg.response_decoding, _req_seed(ctx, rid), system=msg["text"] or None), {"index": i, "system_message": msg["text"]}))
    teacher = open_client(ctx, r.teacher, "teacher")
    try:
        out = Phase(ctx, "responses").run(teacher, items, lambda res, m: {**m, "explained_targets": res.text.strip()})
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
            rejected.append({**base, "reason": "teacher error" if rec is None else "empty response"})
        else:
            rows.append({**base, "explained_targets": rec["explained_targets"], "dataset_source": r.seeds.flan.path})
    if not rows:
        raise BadInput("generate-orca: no usable teacher answer (see rejected/)")
    counts = {"seeds": len(items), "rows": len(rows), "rejected": len(rejected)}
    return _finish(ctx, rows, rejected, counts, usage, "Orca-style explanation answers to Flan tasks", r.seeds.flan.licence,
                   {"orca": cfg.model_dump(mode="json"), "teacher": endpoint_info(r.teacher)})


# ------------------------------------------------------------------------------------------------
def _finish(ctx, rows, rejected, counts, usage, summary, licence, details, extra_usage=None) -> StageOutput:
    data = ctx.out / "data"
    write_jsonl(data / "train.jsonl", rows)
    dataset_card(data / "README.md", f"{ctx.recipe.name}: {ctx.name}", summary, licence, {**details, "counts": counts}, ["train.jsonl"])
    if rejected:
        write_jsonl(ctx.out / "rejected" / "rejected.jsonl", rejected)
    r = ctx.recipe
    u = usage_dict(usage)
    return StageOutput(
        counts=counts,
        extra={
            "teacher": {**endpoint_info(r.teacher), "model_id": r.teacher.model},
            "usage": {"teacher": u, **(extra_usage or {})},
            "cost_usd": cost_usd(r.teacher, u["prompt_tokens"], u["completion_tokens"]),
            "seed_data": {"dolly": r.seeds.dolly.model_dump(mode="json"), "flan": r.seeds.flan.model_dump(mode="json")},
        },
    )
