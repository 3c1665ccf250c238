"""The LaMini-LM scheme (generate-lamini): instructions from example- and topic-guided prompts, then
a response to each (docs/recipe.md, "LaMini": what LaMini-LM and OpenBezoar do, what we do, each departure).

Phase 0 (topic-guided prompts without a topic file): the teacher proposes ``topics_per_category``
subjects per dolly category, each checked (one to ``topic_max_words`` words, letters, no
sentence) and deduplicated; the list is committed with the stage (``topics.jsonl``). It runs in the
stage's one flow: the example-guided lists and their responses go out meanwhile, the topic-guided
lists once every category's proposal is in (each samples from the whole list). LaMini drew
its topics from Wikipedia categories, which cannot be shipped or fetched here; a user can still
give a file (``generation.lamini.topics``). Phase 1 asks for ``instructions_per_prompt`` new
instructions per prompt (three sampled seed instructions as examples, plus three topics in
topic-guided prompts); they are parsed, then deduplicated against each other and the seeds in unit
order. Phase 2 asks for each one's response.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from ..data.inputs import row_checks
from ..data.io import load_rows, load_template, render, write_jsonl
from ..errors import BadInput
from ..estimate import GENERATED_INSTRUCTION_TOKENS, Ask, Typical, mean_tokens, template_tokens
from ..llm.base import GenRequest, LLMClient, request
from ..llm.flow import Flow
from ..recipe import Recipe
from ..runner import StageContext, StageOutput
from ..stages.common import Phase, endpoint_info, normalise, open_client, run_flow
from ..stages.generate import TeacherClock, finish, req_seed, text_key, unit_rng
from ..stages.records import in_shard, stable_hash
from ..store import Store

# the columns sft-lamini trains on: instruction, response, system (none: the default system text)
TRAIN_COLUMNS: tuple[str, str, str | None] = ("instruction", "response", None)


def judge_pair(row: dict[str, Any], recipe: Recipe | None = None) -> tuple[str, str]:
    """The instruction and response the filter's judge rates."""
    return str(row["instruction"]), str(row.get("response") or "")


def judge_tokens(recipe: Recipe) -> tuple[int, float]:
    """(instruction tokens, response cap) of what the filter's judge sees for a typical row."""
    return GENERATED_INSTRUCTION_TOKENS, recipe.generation.lamini.response_decoding.max_new_tokens


def expected_rows(recipe: Recipe) -> int:
    c = recipe.generation.lamini
    n = (c.example_prompts + c.topic_prompts) * c.instructions_per_prompt
    return min(n, c.max_instructions) if c.max_instructions else n


def estimate(recipe: Recipe, store: Store, stage: str) -> list[Ask]:
    c = recipe.generation.lamini
    ins = mean_tokens(recipe.seeds.dolly, ("instruction",), 18) + 4  # an example in its tags
    prompt = template_tokens(c.example_template.path) + c.examples_per_prompt * ins
    asks = []
    if c.topic_prompts and c.topics is None:
        asks.append(Ask(recipe.teacher, len(DOLLY_CATEGORIES), template_tokens(c.topic_list_template.path)
                        + c.examples_per_prompt * ins, c.topic_decoding, Typical.TOPIC_LIST, "topics"))
    asks += [
        Ask(recipe.teacher, c.example_prompts + c.topic_prompts, prompt, c.instruction_decoding,
            Typical.INSTRUCTION_LIST, "instructions"),
        Ask(recipe.teacher, expected_rows(recipe), template_tokens(c.response_template.path)
            + GENERATED_INSTRUCTION_TOKENS, c.response_decoding, Typical.RESPONSE, "responses"),
    ]
    return asks


# dolly-15k's eight categories, in words the topic prompt can use
DOLLY_CATEGORIES: dict[str, str] = {
    "brainstorming": "brainstorming",
    "classification": "classification",
    "closed_qa": "questions about a given text",
    "creative_writing": "creative writing",
    "general_qa": "general questions",
    "information_extraction": "extracting information from a text",
    "open_qa": "open questions",
    "summarization": "summarizing a text",
}
_TOPIC_TAG = re.compile(r"<topic>(.*?)</topic>", re.S | re.I)
_TOPIC_OK = re.compile(r"^[A-Za-z][A-Za-z0-9'&.-]*(?: [A-Za-z0-9'&.-]+)*$")


def parse_topics(text: str, max_words: int) -> list[str]:
    """Topics from a teacher's answer: ``<topic>`` tags first, else one per line (list markers
    dropped); kept when 1 to ``max_words`` words of letters (a name, not a sentence)."""
    found = _TOPIC_TAG.findall(text) or [ln for ln in text.splitlines() if ln.strip()]
    out = []
    for t in found:
        t = _WS.sub(" ", _LIST_PREFIX.sub("", re.sub(r"</?topic>", "", t, flags=re.I).strip())).strip().strip('"')
        t = t.rstrip(".")
        if t and len(t.split()) <= max_words and _TOPIC_OK.match(t) and not _PREAMBLE.match(t):
            out.append(t)
    return out


TopicAsks = tuple[list[tuple[GenRequest, dict[str, Any]]], dict[str, list[str]]]


def topic_requests(ctx: StageContext, seeds: list[dict[str, Any]]) -> TopicAsks:
    """Phase 0's requests: one per dolly category, asking the teacher to propose topics; and the seed
    instructions by category."""
    cfg = ctx.recipe.generation.lamini
    t_topics = load_template(cfg.topic_list_template.path, "generation.lamini.topic_list_template")
    by_cat: dict[str, list[str]] = {}
    for row in seeds:
        by_cat.setdefault(str(row["category"]), []).append(str(row["instruction"]).strip())
    items = []
    for cat in sorted(by_cat):
        rid = f"lamini-topics-{stable_hash(cat) % 10**8:08d}"
        rng = unit_rng(ctx, rid)
        ex = rng.sample(by_cat[cat], min(cfg.examples_per_prompt, len(by_cat[cat])))
        prompt = render(t_topics, category=DOLLY_CATEGORIES.get(cat, cat.replace("_", " ")),
                        examples=_examples_block(ex), n=str(cfg.topics_per_category),
                        max_words=str(cfg.topic_max_words))  # the limit parse_topics applies
        items.append((request(rid, prompt, cfg.topic_decoding, req_seed(ctx, rid)), {"category": cat}))
    return items, by_cat


def collect_topics(ctx: StageContext, asks: TopicAsks, got: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    """The topics the teacher proposed (``got``: request id -> its record), checked and deduplicated (against
    each other and the category names), in category order; each as {topic, category}."""
    cfg = ctx.recipe.generation.lamini
    items, by_cat = asks
    seen = {normalise(c) for c in by_cat} | {normalise(v) for v in DOLLY_CATEGORIES.values()}
    topics = []
    for req, m in items:
        rec = got.get(req.id)
        for t in parse_topics(rec["raw"], cfg.topic_max_words) if rec else []:
            if normalise(t) not in seen:
                seen.add(normalise(t))
                topics.append({"topic": t, "category": m["category"]})
    if len(topics) < cfg.topics_per_prompt:
        raise BadInput(
            f"generation.lamini.topics: the teacher proposed {len(topics)} usable topic(s), fewer than "
            f"topics_per_prompt ({cfg.topics_per_prompt}); give a topic file or check the teacher settings"
        )
    return topics


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


def generate(ctx: StageContext) -> StageOutput:
    r = ctx.recipe
    cfg = r.generation.lamini
    seeds = [row for row in load_rows(r.seeds.dolly, field="seeds.dolly", **row_checks("seeds.dolly"))
             if row["instruction"].strip()]
    seed_instr = [str(row["instruction"]).strip() for row in seeds]
    if len(seed_instr) < cfg.examples_per_prompt:
        raise BadInput(f"seeds.dolly: {len(seed_instr)} instructions, fewer than generation.lamini.examples_per_prompt")
    t_example = load_template(cfg.example_template.path, "generation.lamini.example_template")
    t_topic = load_template(cfg.topic_template.path, "generation.lamini.topic_template")
    t_resp = load_template(cfg.response_template.path, "generation.lamini.response_template")

    teacher = open_client(ctx, r.teacher, "teacher")
    clock = TeacherClock(ctx)
    try:
        topic_rows: list[dict[str, Any]] = []
        proposals = None
        if cfg.topic_prompts:
            if cfg.topics is not None:
                where = "generation.lamini.topics"
                topics = load_rows(cfg.topics, field=where, **row_checks(where))
                topic_rows = [{"topic": t["topic"], "category": None} for t in topics]
            else:  # asked in the stage's flow: the example-guided lists do not wait for them
                proposals = topic_requests(ctx, seeds)
        return _generate(ctx, teacher, clock, seed_instr, topic_rows, proposals, (t_example, t_topic, t_resp))
    finally:
        teacher.close()


def _generate(ctx: StageContext, teacher: LLMClient, clock: TeacherClock, seed_instr: list[str],
              topic_rows: list[dict[str, Any]], proposals: TopicAsks | None,
              templates: tuple[str, str, str]) -> StageOutput:
    r = ctx.recipe
    cfg = r.generation.lamini
    t_example, t_topic, t_resp = templates
    topics = [str(t["topic"]) for t in topic_rows]
    items: list[tuple[GenRequest, dict[str, Any]]] = []

    def unit(kind: str, k: int) -> tuple[GenRequest, dict[str, Any]] | None:
        rid = f"lamini-{kind}-{k:05d}"
        if not in_shard(rid, ctx.shard):
            return None
        rng = unit_rng(ctx, rid)
        ex = rng.sample(seed_instr, cfg.examples_per_prompt)
        meta: dict[str, Any] = {"source": kind, "examples": ex}
        if kind == "example":
            prompt = render(t_example, examples=_examples_block(ex), n=str(cfg.instructions_per_prompt))
        else:
            tp = rng.sample(topics, min(cfg.topics_per_prompt, len(topics)))
            meta["topics"] = tp
            prompt = render(
                t_topic, examples=_examples_block(ex), topics=", ".join(tp), n=str(cfg.instructions_per_prompt)
            )
        return request(rid, prompt, cfg.instruction_decoding, req_seed(ctx, rid)), meta

    # One flow: as soon as a prompt's list is in, each of its instructions that is new against the seeds
    # and everything answered so far has its response asked, while other lists are still being written.
    # What is committed is then decided in unit order, exactly as a whole pass decides it (parse, drop
    # duplicates of the seeds and of earlier units, keep the first max_instructions), so it does not
    # depend on the order the lists came in: each row's response is asked under the row's id and seed
    # with the row's own text; the rare row whose near-duplicate (same key, other wording) from a later
    # unit was answered first is asked again with its own text at the end.
    p1, p2 = Phase(ctx, "instructions"), Phase(ctx, "responses")
    seed_keys = {normalise(s) for s in seed_instr}
    answered: dict[str, str] = {}  # key -> the text asked under it

    def row_id(ins: str) -> str:
        return "lamini-resp-" + format(stable_hash(normalise(ins)), "016x")

    def respond(flow: Flow, ins: str, source: str, rid: str | None = None) -> None:
        req = request(rid or row_id(ins), render(t_resp, instruction=ins), cfg.response_decoding,
                      req_seed(ctx, row_id(ins)))
        p2.ask(flow, teacher, req, {"instruction": ins, "source": source},
               lambda res, m: {**m, "response": res.text.strip()})

    def early(rec: dict[str, Any] | None) -> None:
        for ins in parse_instructions(rec["raw"], cfg.min_instruction_words) if rec else []:
            key = normalise(ins)
            if key in seed_keys or key in answered:
                continue
            if cfg.max_instructions and len(answered) >= cfg.max_instructions:
                return
            answered[key] = ins
            respond(flow, ins, rec["source"] if rec else "")

    flow = Flow(ctx.name)

    def ask_units(kind: str, n: int) -> None:
        """Each unit's list, in unit order (the committed set is decided in the order of ``items``)."""
        for k in range(n):
            item = unit(kind, k)
            if item is not None:
                items.append(item)
                # a list unlocks its responses: sent before them (scheduling only)
                p1.ask(flow, teacher, replace(item[0], priority=1), item[1], lambda res, m: {**m, "raw": res.text},
                       then=early)

    phases = [p1, p2]
    ask_units("example", cfg.example_prompts)
    if proposals is None:
        ask_units("topic", cfg.topic_prompts)
    else:
        # phase 0 in the same flow: the topic-guided lists need every category's topics (each samples from
        # the whole deduplicated list), the example-guided ones and their responses need none
        p0 = Phase(ctx, "topics")
        phases.append(p0)
        got: dict[str, dict[str, Any] | None] = {}

        def proposed(rid: str, rec: dict[str, Any] | None) -> None:
            got[rid] = rec
            if len(got) == len(proposals[0]):
                p0.check(p0.needed)  # proposals lost beyond generation.max_failed_fraction: retryable, said so
                topic_rows.extend(collect_topics(ctx, proposals, got))
                topics.extend(str(t["topic"]) for t in topic_rows)
                ask_units("topic", cfg.topic_prompts)

        for req, meta in proposals[0]:
            p0.ask(flow, teacher, replace(req, priority=2), meta, lambda res, m: {**m, "raw": res.text},
                   then=lambda rec, rid=req.id: proposed(rid, rec))  # type: ignore[misc]
    with clock:
        run_flow(ctx, flow, phases)
    ctx.check_stop()
    # the committed set, in unit order
    seen = set(seed_keys)
    rejected: list[dict[str, Any]] = []
    candidates: list[tuple[str, str]] = []
    for req, _ in items:
        rec = p1.log.get(req.id)
        if rec is None:
            continue
        parsed = parse_instructions(rec["raw"], cfg.min_instruction_words)
        if not parsed:
            rejected.append(
                {"id": req.id, "instruction": None, "reason": "no instruction could be parsed", "raw": rec["raw"]}
            )
        for ins in parsed:
            key = normalise(ins)
            if key in seen:
                rejected.append({"id": req.id, "instruction": ins, "reason": "duplicate"})
                continue
            seen.add(key)
            candidates.append((ins, rec["source"]))
    n_candidates = len(candidates)
    duplicates = sum(1 for x in rejected if x["reason"] == "duplicate")
    if cfg.max_instructions:
        candidates = candidates[: cfg.max_instructions]
    # each row's record: the response to exactly its text
    record_id: dict[str, str] = {}
    tail = Flow(ctx.name)
    for ins, source in candidates:
        rid = row_id(ins)
        rec = p2.log.get(rid)
        if rec is None and rid in p2.failed:  # failed for good: counted, and a rerun asks again
            record_id[rid] = rid
            continue
        if rec is not None and rec["instruction"] != ins:
            record_id[rid] = f"{rid}-{text_key(ins)}"
        else:
            record_id[rid] = rid
        if rec is None or record_id[rid] != rid:
            respond(tail, ins, source, record_id[rid])
    if tail.asked:
        with clock:
            run_flow(ctx, tail, (p2,))
        ctx.check_stop()
    ritems = [(row_id(ins), {"instruction": ins, "source": source}) for ins, source in candidates]
    usage = teacher.usage
    if ctx.shard is not None:
        return StageOutput(committed=False)

    rows = []
    for rid, m in ritems:
        rec = p2.log.get(record_id[rid])
        if rec is None:
            why = p2.failed.get(record_id[rid])
            rejected.append({"id": rid, "instruction": m["instruction"], "reason": f"teacher error: {why}"})
        elif not rec["response"].strip():
            rejected.append({"id": rid, "instruction": m["instruction"], "reason": "empty response"})
        else:
            rows.append({"id": rid, "instruction": m["instruction"], "source": m["source"],
                         "response": rec["response"]})
    if not rows:
        raise BadInput(
            "generate-lamini: the teacher's answers gave no usable instruction (see rejected/ and the teacher settings)"
        )
    counts = {
        "prompts": len(items),
        "raw_instructions": min(n_candidates, cfg.max_instructions or n_candidates) + duplicates,
        "unique_instructions": len(ritems),
        "rows": len(rows),
        "rejected": len(rejected),
        "topics": len(topics),
        "topics_source": "file" if cfg.topics is not None else ("teacher" if topics else "none"),
    }
    if topic_rows:
        write_jsonl(ctx.out / "topics.jsonl", topic_rows)
    return finish(ctx, rows, rejected, counts, usage, "LaMini-style instructions and responses", "seeds.dolly",
                  {"lamini": cfg.model_dump(mode="json"), "teacher": endpoint_info(r.teacher)}, clock=clock,
                  clients={"teacher": teacher})


