"""The WizardLM Evol-Instruct scheme (generate-evol) over dolly-15k seeds (docs/recipe.md, "Evol-Instruct":
what WizardLM and OpenBezoar do beside what we do, and each departure).

Each lineage starts from a seed: a dolly instruction with its context passage after a blank line
(the passage is part of the task being evolved). Each round evolves the lineage's current
instruction once, with one prompt drawn uniformly among the in-depth operations and in-breadth
(WizardLM's code: 0.8 / 0.2 with four depth prompts; ``in_depth_weight`` overrides), asks for the
evolution's response, asks the judge whether the evolution adds anything (rule 1), then applies
WizardLM's elimination rules. A kept evolution becomes the lineage's current instruction (its row
names its parent); an eliminated one returns the instruction to the pool unchanged, as in WizardLM.

Two rules keep a lineage a chain:

- request ids carry a key of the text they ask about, so a saved answer is reused only for the
  question it answered (a rerun after the chain moved on asks afresh, never picks up an answer to
  an older instruction);
- when a request of round k fails for good (the teacher, not an elimination), the lineage stops
  for this run: later rounds would evolve an instruction the chain never reached. A rerun
  (``--force``, whose records are kept) asks round k again and continues from its answer.
"""

from __future__ import annotations

import logging
import random
import re
import string
from typing import Any

from ..data.inputs import row_checks
from ..data.io import load_rows, load_template, render
from ..errors import BadInput
from ..estimate import Ask, Typical, dolly_seed_tokens, template_tokens
from ..llm.base import LLMClient, request
from ..llm.flow import Flow
from ..recipe import EvolConfig, Recipe
from ..recipe_base import Decoding
from ..runner import StageContext, StageOutput
from ..stages.common import Phase, endpoint_info, normalise, open_client, run_flow
from ..stages.generate import ContextGuard, TeacherClock, finish, req_seed, text_key, unit_rng
from ..stages.records import in_shard
from ..store import Store

log = logging.getLogger("bezoar")

# the columns sft-evol trains on: instruction, response, system (none: the default system text)
TRAIN_COLUMNS: tuple[str, str, str | None] = ("instruction", "response", None)

# an equality check needs a word or two of answer
EQUALITY_MAX_NEW_TOKENS = 8


def judge_pair(row: dict[str, Any], recipe: Recipe | None = None) -> tuple[str, str]:
    """The instruction and response the filter's judge rates."""
    return str(row["instruction"]), str(row.get("response") or "")


def judge_tokens(recipe: Recipe) -> tuple[int, float]:
    """(instruction tokens, response cap) of what the filter's judge sees for a typical row."""
    return dolly_seed_tokens(recipe.seeds.dolly) + 30, recipe.generation.evol.response_decoding.max_new_tokens


def expected_rows(recipe: Recipe) -> int:
    c = recipe.generation.evol
    return int(c.seeds * c.rounds)


def estimate(recipe: Recipe, store: Store, stage: str) -> list[Ask]:
    """Per round and lineage: an evolution, its response, an equality check. Realistic sizes: an
    evolved task is about a seed plus 20 words (passages kept); a response runs long."""
    c = recipe.generation.evol
    seed = dolly_seed_tokens(recipe.seeds.dolly)
    evolved = seed + 30
    n = c.seeds * c.rounds
    ops = [*c.depth_operations, "breadth"]
    evolve_prompt = sum(template_tokens(f"{c.templates_dir}/{op}.txt") for op in ops) // len(ops) + evolved
    asks = [
        Ask(recipe.teacher, n, evolve_prompt, c.evolve_decoding, evolved, "evolve"),
        Ask(recipe.teacher, n, template_tokens(c.response_template.path) + evolved, c.response_decoding,
            Typical.RESPONSE, "responses"),
    ]
    if c.equality_check:
        asks.append(Ask(recipe.judge, n, template_tokens(c.equality_template.path) + seed + evolved,
                        equality_decoding(recipe), Typical.EQUALITY, "equality checks"))
    return asks


def equality_decoding(recipe: Recipe) -> Decoding:
    """The judge's decoding for an equality check: the filter's settings, cut to a few tokens."""
    return recipe.filter.decoding.model_copy(update={"max_new_tokens": EQUALITY_MAX_NEW_TOKENS})


_STOP_WORDS = frozenset(
    "a an the and or but if then so of to in on at by for with from as is are was were be been it this that these "
    "those i you he she we they me him her us them my your our their its not no yes ok okay".split()
)
# a label a model puts before its rewrite ("New task:", "#Rewritten Prompt#:") or before an answer it
# adds after it ("Answer:", "Response:")
_GENERIC_LABEL = re.compile(
    r"^\s*(?:#?\s*(?:new|rewritten|created|invented|evolved)\s+(?:task|prompt|instruction)\s*#?\s*[:.-]?)\s*", re.I
)
_ANSWER_LINE = re.compile(r"^\s*(?:#+\s*)?(?:answer|response|solution|output)\s*#?\s*:", re.I | re.M)
_LABEL_LINE = re.compile(r"^\s*([#\w][^:{}\n]{0,40}:)\s*(?:\{instruction\})?\s*$")


def template_labels(templates: list[str]) -> tuple[str, ...]:
    """The labels our evolution templates print ("Task:", "New task:", or WizardLM's
    "#The Given Prompt#:"): short lines ending in a colon, alone or before ``{instruction}``."""
    out: list[str] = []
    for t in templates:
        for line in t.splitlines():
            m = _LABEL_LINE.match(line)
            if m and m.group(1).strip() not in out:
                out.append(m.group(1).strip())
    return tuple(out)


def clean_evolved(text: str, labels: tuple[str, ...] = (), keep_paragraphs: bool = False) -> str:
    """The evolved task from a teacher's answer: leading labels (ours, WizardLM's) stripped, and an
    answer the model went on to write ("Answer: ...") cut off. With ``keep_paragraphs`` (the task
    carries an input: a dolly passage, or the complicate-input operation adds a table or code) the
    paragraphs after the first are part of the task and kept; otherwise the first paragraph is the
    task and what follows a blank line is the model answering it."""
    text = text.strip()
    for _ in range(3):  # "New task: Task: ..." happens
        before = text
        text = _GENERIC_LABEL.sub("", text)
        for label in labels:
            if text.lower().startswith(label.lower()):
                text = text[len(label):].lstrip()
        if text == before:
            break
    m = _ANSWER_LINE.search(text)
    if m and m.start() > 0:
        text = text[: m.start()]
    if not keep_paragraphs:
        text = text.strip().split("\n\n")[0]
    return text.strip().strip('"').strip()


def only_stopwords(text: str) -> bool:
    words = [w for w in re.split(r"\s+", text.lower().translate(str.maketrans("", "", string.punctuation))) if w]
    return all(w in _STOP_WORDS for w in words)


def parse_equal(text: str) -> bool | None:
    t = text.strip().lower()
    # a negated "equal" word ("not identical", "not equivalent") is a "different", not an "equal"
    if re.search(r"\b(different|unequal|not\s+(?:equal|the\s+same|identical|equivalent))\b", t):
        return False
    if re.search(r"\b(equal|same|identical|equivalent)\b", t):
        return True
    return None


def leaked(cfg: EvolConfig, evolved: str, labels: tuple[str, ...] = (), original: str = "") -> str | None:
    """The rewriting prompt's own words in an evolved instruction (rule 4): a leak phrase anywhere,
    or one of the templates' labels starting a line or a sentence ("... New task: do X"). Words the
    instruction being evolved (``original``) already had are not copied from the prompt: a phrase
    counts only where the evolution has it more often than the original (a dolly passage saying
    "the original task" would otherwise eliminate every evolution of its lineage)."""
    low, before = evolved.lower(), original.lower()
    for phrase in cfg.leak_phrases:
        p = phrase.lower()
        if low.count(p) > before.count(p):
            return phrase
    for label in labels:
        at = r"(?:^|[\n.!?]\s*)" + re.escape(label.lower())
        if len(re.findall(at, low)) > len(re.findall(at, before)):
            return label
    return None


def eliminate(cfg: EvolConfig, original: str, evolved: str, response: str, equal: bool | None,
              labels: tuple[str, ...] = ()) -> str | None:
    """The four elimination rules of WizardLM, in order; the reason, or None when kept."""
    if not evolved:
        return "empty evolution"
    if equal:
        return "rule 1: the judge found no information gain over the original"
    if "sorry" in response.lower() and len(response.split()) < cfg.sorry_max_words:
        return f"rule 2: the response says sorry and is under {cfg.sorry_max_words} words"
    if not response.strip() or only_stopwords(response):
        return "rule 3: the response is only punctuation and stop words"
    leak = leaked(cfg, evolved, labels, original)
    if leak:
        return f"rule 4: the instruction copies the rewriting prompt's words ({leak!r})"
    if normalise(evolved) == normalise(original):
        return "rule 1: identical to the original"
    return None


def choose_operation(cfg: EvolConfig, rng: random.Random) -> tuple[str, str]:
    """(operation, strategy): uniform over the prompts unless ``in_depth_weight`` is given."""
    depth = list(cfg.depth_operations)
    if cfg.in_depth_weight is None:
        op = rng.choice([*depth, "breadth"])
        return (op, "in-breadth") if op == "breadth" else (op, "in-depth")
    if depth and rng.random() < cfg.in_depth_weight:
        return rng.choice(depth), "in-depth"
    return "breadth", "in-breadth"


def keep_input(evolved: str, passage: str, strategy: str, current: str | None = None) -> tuple[str, bool]:
    """An in-depth rewrite must keep the task's input; when the teacher dropped the seed's passage,
    it is put back after a blank line (counted). In-breadth tasks are new tasks: left alone. With
    ``current`` (the instruction that was evolved), the passage is put back only when that
    instruction still carried it: a task a kept in-breadth step made without it has no such input."""
    if not passage or strategy != "in-depth" or normalise(passage) in normalise(evolved):
        return evolved, False
    if current is not None and normalise(passage) not in normalise(current):
        return evolved, False
    return f"{evolved}\n\n{passage}", True


def seed_text(row: dict[str, Any]) -> tuple[str, str]:
    """(task, passage): the dolly instruction with its context after a blank line, and the context."""
    ins = str(row["instruction"]).strip()
    ctx = str(row.get("context") or "").strip()
    return (f"{ins}\n\n{ctx}" if ctx else ins), ctx


def generate(ctx: StageContext) -> StageOutput:
    r = ctx.recipe
    cfg = r.generation.evol
    ops = {
        op: load_template(f"{cfg.templates_dir}/{op}.txt", f"generation.evol.templates_dir ({op}.txt)")
        for op in (*cfg.depth_operations, "breadth")
    }
    labels = template_labels(list(ops.values()))
    t_resp = load_template(cfg.response_template.path, "generation.evol.response_template")
    t_eq = load_template(cfg.equality_template.path, "generation.evol.equality_template")
    guard = ContextGuard(r.teacher)
    longest_op = max(ops.values(), key=len)
    seeds = []
    for row in load_rows(r.seeds.dolly, field="seeds.dolly", **row_checks("seeds.dolly")):
        if not str(row["instruction"]).strip():
            continue
        # a seed whose evolution prompt cannot fit the teacher's context would be refused on every retry
        if guard.active and not guard.fits(render(longest_op, instruction=seed_text(row)[0]),
                                           cfg.evolve_decoding.max_new_tokens):
            continue
        seeds.append(row)
    if guard.too_long:
        log.info("generate-evol: %d dolly rows skipped: their evolution prompt does not fit teacher.context_tokens",
                 guard.too_long)
    pick = unit_rng(ctx, "seeds")
    chosen = pick.sample(range(len(seeds)), min(cfg.seeds, len(seeds)))
    if len(chosen) < cfg.seeds:
        log.warning("generate-evol: %d seeds asked, only %d usable in seeds.dolly", cfg.seeds, len(chosen))

    lineages = []
    for idx in chosen:
        lid = f"evol-{idx:06d}"
        if in_shard(lid, ctx.shard):
            text, passage = seed_text(seeds[idx])
            lineages.append({"id": lid, "current": text, "parent": f"{lid}-r0", "passage": passage,
                             "category": seeds[idx]["category"], "stopped": None})

    teacher = open_client(ctx, r.teacher, "teacher")
    judge = (open_client(ctx, r.judge, "judge", cached=r.judge.backend != "local", teacher=teacher)
             if cfg.equality_check else None)
    clock = TeacherClock(ctx)
    try:
        chain = _Chains(ctx, teacher, judge, lineages, ops, labels, t_resp, t_eq)
        with clock:
            chain.run()
        decided = chain.decided
        restored = chain.restored
        t_usage, j_usage = teacher.usage, (judge.usage if judge else None)
    finally:
        teacher.close()
        if judge is not None:
            judge.close()
    # what each lineage did, in (round, lineage) order whatever the order the answers came in; an
    # instruction that another lineage reached first (in that order) is committed once
    rows: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _, kind, row in sorted(decided, key=lambda d: d[0]):
        if kind == "row":
            key = normalise(row["instruction"])
            if key in seen:
                rejected.append({**row, "reason": "duplicate: another lineage reached the same instruction"})
                continue
            seen.add(key)
            rows.append(row)
        else:
            rejected.append(row)
    if ctx.shard is not None:
        return StageOutput(committed=False)
    if not rows:
        raise BadInput(
            "generate-evol: every evolution was eliminated (see rejected/); check the teacher and judge settings"
        )
    reasons: dict[str, int] = {}
    for x in rejected:
        k = x["reason"].split(":")[0].split(" in round")[0]
        reasons[k] = reasons.get(k, 0) + 1
    counts = {
        "seeds": len(lineages),
        "seeds_asked": cfg.seeds,
        "rounds": cfg.rounds,
        "rows": len(rows),
        "rejected": len(rejected),
        "eliminated_by": reasons,
        "lineages_stopped_by_teacher_errors": sum(1 for lin in lineages if lin["stopped"] is not None),
        "input_restored": restored,
        "seeds_too_long": guard.too_long,
    }
    return finish(
        ctx, rows, rejected, counts, t_usage, "Evol-Instruct evolutions and responses", "seeds.dolly",
        {"evol": cfg.model_dump(mode="json"), "teacher": endpoint_info(r.teacher), "judge": endpoint_info(r.judge)},
        judge_usage=j_usage, clock=clock, clients={"teacher": teacher, **({"judge": judge} if judge else {})},
    )


class _Chains:
    """Every lineage's chain in one flow: round k's evolution, then its response and (at the same
    time) the judge's equality check, then the elimination rules, then round k+1, each lineage on its
    own. A lineage's chain depends only on its own answers (ids and seeds are the lineage's), so it is
    the same whatever the timing; duplicates across lineages are settled when the stage commits."""

    def __init__(self, ctx: StageContext, teacher: LLMClient, judge: LLMClient | None,
                 lineages: list[dict[str, Any]], ops: dict[str, str], labels: tuple[str, ...], t_resp: str,
                 t_eq: str):
        self.ctx, self.teacher, self.judge = ctx, teacher, judge
        self.cfg = ctx.recipe.generation.evol
        self.lineages, self.ops, self.labels, self.t_resp, self.t_eq = lineages, ops, labels, t_resp, t_eq
        self.flow = Flow(ctx.name)
        self.phases: dict[str, Phase] = {}
        self.decided: list[tuple[tuple[int, int], str, dict[str, Any]]] = []  # ((round, lineage), kind, row)
        self.restored = 0

    def phase(self, name: str) -> Phase:
        if name not in self.phases:
            self.phases[name] = Phase(self.ctx, name)
        return self.phases[name]

    def run(self) -> None:
        for i in range(len(self.lineages)):
            self.evolve(i, 1)
        run_flow(self.ctx, self.flow, self.phases.values())

    def steps_left(self, rnd: int, step: str) -> int:
        """The steps a lineage has left from this one (its priority in the pool: the longest chain first,
        so the stage does not end waiting on lineages that started late; scheduling only)."""
        return 2 * (self.cfg.rounds - rnd) + (2 if step == "evolve" else 1)

    def evolve(self, i: int, rnd: int) -> None:
        if rnd > self.cfg.rounds:
            return
        ctx, lin = self.ctx, self.lineages[i]
        lid = lin["id"]
        op, strategy = choose_operation(self.cfg, unit_rng(ctx, lid, rnd))
        # ids carry a key of the asked text: a saved answer is reused only for that question
        eid = f"{lid}-r{rnd}-{text_key(op + lin['current'])}-evolve"
        req = request(eid, render(self.ops[op], instruction=lin["current"]), self.cfg.evolve_decoding,
                      req_seed(ctx, lid, rnd), priority=self.steps_left(rnd, "evolve"))
        self.phase(f"round{rnd}-evolve").ask(
            self.flow, self.teacher, req, {"lineage": lid}, lambda res, m: {**m, "raw": res.text},
            then=lambda rec: self.evolved(i, rnd, op, strategy, eid, rec))

    def evolved(self, i: int, rnd: int, op: str, strategy: str, eid: str, rec: dict[str, Any] | None) -> None:
        lin = self.lineages[i]
        lid = lin["id"]
        if rec is None:
            self.stop(i, rnd, None, "teacher", self.phases[f"round{rnd}-evolve"].failed.get(eid))
            return
        # a task that carries an input keeps its paragraphs
        multi = "\n\n" in lin["current"] or op == "complicate_input"
        cleaned = clean_evolved(rec["raw"], self.labels, keep_paragraphs=multi)
        if not cleaned:
            self.decided.append(((rnd, i), "rejected", {"id": f"{lid}-r{rnd}", "instruction": "", "epoch": rnd,
                                                        "parent_id": lin["parent"], "reason": "empty evolution"}))
            self.evolve(i, rnd + 1)
            return
        text, put_back = keep_input(cleaned, lin["passage"], strategy, lin["current"])
        self.restored += put_back
        got: dict[str, dict[str, Any] | None] = {}
        rid = f"{lid}-r{rnd}-{text_key(text)}-response"
        qid = f"{lid}-r{rnd}-{text_key(lin['current'] + text)}-equal"

        def arrived(which: str, value: dict[str, Any] | None) -> None:
            got[which] = value
            if len(got) == 2:
                self.decide(i, rnd, op, strategy, text, got["response"], got["equal"], rid, qid)

        self.phase(f"round{rnd}-response").ask(
            self.flow, self.teacher,
            request(rid, render(self.t_resp, instruction=text), self.cfg.response_decoding,
                    req_seed(self.ctx, lid, rnd, "r"), priority=self.steps_left(rnd, "answer")),
            {"lineage": lid}, lambda res, m: {**m, "response": res.text.strip()},
            then=lambda rec: arrived("response", rec))
        if self.judge is None:
            arrived("equal", {"equal": None})
            return
        q = request(qid, render(self.t_eq, first=lin["current"], second=text), equality_decoding(self.ctx.recipe),
                    req_seed(self.ctx, lid, rnd, "e"), priority=self.steps_left(rnd, "answer"))
        if self.ctx.recipe.judge.backend == "local":
            # in process: compare the judge's probabilities of the two answer words (one forward pass,
            # deterministic) instead of parsing a small model's free text
            def rated(d: dict[str, float]) -> None:
                arrived("equal", {"lineage": lid, "verdict": f"p(Equal)={d['Equal']:.3f}", "equal": d["Equal"] > 0.5})

            self.flow.rate(self.judge, q, "Answer: ", ("Equal", "Different"), rated)
            return
        self.phase(f"round{rnd}-equal").ask(
            self.flow, self.judge, q, {"lineage": lid},
            lambda res, m: {**m, "verdict": res.text.strip(), "equal": parse_equal(res.text)},
            then=lambda rec: arrived("equal", rec))

    def decide(self, i: int, rnd: int, op: str, strategy: str, text: str, a: dict[str, Any] | None,
               verdict: dict[str, Any] | None, rid: str, qid: str) -> None:
        lin = self.lineages[i]
        lid = lin["id"]
        if a is None:
            self.stop(i, rnd, text, "teacher", self.phases[f"round{rnd}-response"].failed.get(rid))
            return
        if verdict is None:
            self.stop(i, rnd, text, "judge", self.phases[f"round{rnd}-equal"].failed.get(qid))
            return
        row_id = f"{lid}-r{rnd}"
        row = {
            "id": row_id,
            "instruction": text,
            "response": a["response"],
            "category": lin["category"],
            "evolution_strategy": strategy,
            "in-depth-evolving_operation": op if strategy == "in-depth" else "",
            "epoch": rnd,
            "parent_id": lin["parent"],
        }
        reason = eliminate(self.cfg, lin["current"], text, a["response"], verdict["equal"], self.labels)
        if reason:
            self.decided.append(((rnd, i), "rejected", {**row, "reason": reason}))
        else:
            self.decided.append(((rnd, i), "row", row))
            lin["current"], lin["parent"] = text, row_id
        self.evolve(i, rnd + 1)

    def stop(self, i: int, rnd: int, text: str | None, who: str, err: str | None) -> None:
        """A request of round ``rnd`` failed for good: the lineage stops for this run."""
        lin = self.lineages[i]
        lin["stopped"] = rnd
        self.decided.append(((rnd, i), "rejected", {
            "id": f"{lin['id']}-r{rnd}", "instruction": text, "epoch": rnd, "parent_id": lin["parent"],
            "reason": f"{who} error: {err} (request failed for good in round {rnd}: the lineage stops here for "
                      "this run; a rerun asks this round again)"}))
