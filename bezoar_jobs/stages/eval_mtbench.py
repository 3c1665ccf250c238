"""Stage ``eval-mtbench``: MT-Bench (80 two-turn questions, LLM-as-a-judge single-answer grading)
on every checkpoint the recipe names, plus baselines, and its section of the run report.

Outputs (``<run>/eval-mtbench/results/``): answers/<model>.jsonl, judgments/<model>.jsonl (every
judgment's text, score or reason for exclusion, judge model id), scores.json (overall / per turn /
per category per model, judge identity), questions.jsonl (the questions used). Heavy imports
(torch, transformers) happen inside the functions.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from ..errors import BadInput, RetryableError
from ..estimate import MTBENCH_QUESTION_TOKENS, MTBENCH_REFERENCE_TOKENS, Ask, Typical, template_tokens
from ..llm.base import LLMClient, UsageTotals
from ..llm.faults import is_refusal
from ..recipe import Recipe
from ..recipe_base import DatasetSource, Endpoint
from ..recipe_eval import MTBENCH_TEMPERATURES
from ..report.charts import Chart, grouped_bars, new_figure, png
from ..report.collect import jsonl
from ..report.render import Section, Table, fmt
from ..runner import StageContext, StageOutput
from ..store import Store
from .common import MAX_FAILED_FRACTION, cause_of, endpoint_info, open_client, usage_dict
from .evaluate import free, skipped, write_json, write_jsonl

log = logging.getLogger("bezoar")


_ANSWER_FIELDS = ("questions", "reference_answers", "categories", "temperatures", "default_temperature",
                  "answer_max_new_tokens", "answer_batch_size", "answer_system")


def _answers_hash(ctx: StageContext) -> str:
    """The recipe fields that decide the answers (not the judge's): changing only the judge
    re-judges the saved answers instead of generating them again."""
    r = ctx.recipe
    m = r.evaluation.mtbench
    part = {k: getattr(m, k) for k in _ANSWER_FIELDS}
    blob = json.dumps({k: (v.model_dump(mode="json") if hasattr(v, "model_dump") else v) for k, v in part.items()},
                      sort_keys=True, default=list)
    base = r.section_hash("seed", "student", "evaluation.dtype", "evaluation.device")
    if ctx.source_files:  # a local question file's content (source_files.py): edited in place, answered again
        base += json.dumps(ctx.source_files, sort_keys=True)
    return hashlib.sha256(f"{base}\0{blob}".encode()).hexdigest()


def judge_endpoint(ctx: StageContext) -> Endpoint:
    cfg = ctx.recipe.evaluation.mtbench
    ep = cfg.judge or ctx.recipe.judge
    if cfg.judge_method == "logprobs" and ep.backend != "local":
        where = "evaluation.mtbench.judge" if cfg.judge else "judge"
        raise BadInput(
            f"evaluation.mtbench.judge_method 'logprobs' needs an in-process judge; {where}.backend is {ep.backend!r}"
        )
    return ep


def run(ctx: StageContext) -> StageOutput:
    from ..eval import mtbench
    from ..eval.judge_prompts import load_judge_prompts
    from ..eval.targets import device_figures, load, targets

    r = ctx.recipe
    cfg = r.evaluation.mtbench
    if not cfg.enabled:
        return skipped(ctx, "mtbench")
    # everything that can be wrong with the input is checked before a model is loaded
    questions = mtbench.load_questions(cfg)
    prompts = load_judge_prompts(cfg.judge_prompts)
    judge_ep = judge_endpoint(ctx)
    models = targets(ctx)
    ah = _answers_hash(ctx)
    ph = ctx.params_hash

    answers: dict[str, dict[str, dict[str, Any]]] = {}
    answer_info: dict[str, dict[str, Any]] = {}
    for t in models:
        ctx.check_stop()
        name = f"mtbench/answers-{t.work_key(ah)}.json"
        if ctx.work.exists(name):
            saved = json.loads(ctx.work.get_bytes(name))
            # the same file name with other questions in it (edited in place): answer them again
            if all(q.key in saved["answers"] for q in questions):
                answers[t.label], answer_info[t.label] = saved["answers"], saved["info"]
                log.info("%s: answers of %s already generated (resumed from _work/)", ctx.name, t.label)
                continue
        log.info("%s: answering %d questions with %s (%s)", ctx.name, len(questions), t.label, t.model)
        model, tok = load(ctx, t)
        t0 = time.time()
        got = mtbench.generate_answers(model, tok, questions, cfg, r.student.add_bos, r.seed, ctx.check_stop)
        secs = time.time() - t0
        info = {"seconds": round(secs, 2), **device_figures(model, secs),
                "tokens": sum(sum(a["tokens"]) for a in got.values())}
        del model, tok
        free()
        ctx.work.put_bytes(name, json.dumps({"answers": got, "info": info}).encode())
        answers[t.label], answer_info[t.label] = got, info

    judgments: dict[str, list[dict[str, Any]]] = {}
    client = _open_judge(ctx, judge_ep)
    try:
        for t in models:
            ctx.check_stop()
            name = f"mtbench/judgments-{t.work_key(ph + ah)}.json"
            if ctx.work.exists(name):
                saved_js = json.loads(ctx.work.get_bytes(name))
                if {(str(j["question_id"]), j["turn"]) for j in saved_js} == {
                    (q.key, n) for q in questions for n in (1, 2)
                }:
                    judgments[t.label] = saved_js
                    for j in saved_js:  # judged by an earlier attempt: what they cost is this stage's too
                        if j.get("tokens"):
                            client.usage.add_saved(*j["tokens"])
                    log.info("%s: answers of %s already judged (resumed from _work/)", ctx.name, t.label)
                    continue
            texts = {k: v["turns"] for k, v in answers[t.label].items()}
            js = mtbench.judge(client, cfg.judge_method, prompts, questions, texts, t.label, cfg.judge_decoding,
                               cfg.reference_categories, r.seed, cfg.logprobs_prefix)
            failed = [j for j in js if (j.get("excluded") or "").startswith("judge request failed")]
            refused = [j for j in failed if is_refusal(cause_of(j["excluded"]))]
            if len(refused) > MAX_FAILED_FRACTION * len(js):  # refused as sent: refused again (stages/common.py)
                raise BadInput(
                    f"{ctx.name}: the judge refused {len(refused)} of {len(js)} judge requests for {t.label} as "
                    f"sent (e.g. {refused[0]['excluded']}): sent again they would be refused again; change "
                    "evaluation.mtbench.judge (or the recipe's judge) or evaluation.mtbench.judge_decoding first "
                    "(the answers are saved)"
                )
            if len(failed) > MAX_FAILED_FRACTION * len(js):
                raise RetryableError(
                    f"{ctx.name}: {len(failed)} of {len(js)} judge requests for {t.label} failed for good "
                    f"(e.g. {failed[0]['excluded']}); answers are saved, a rerun asks the judge again"
                )
            ctx.work.put_bytes(name, json.dumps(js).encode())
            judgments[t.label] = js
        usage = usage_dict(client.usage)
        judge_model_id = client.model_id
        _account(ctx, judgments, client.usage)
    finally:
        client.close()

    scores = mtbench.aggregate(j for js in judgments.values() for j in js)
    out = ctx.out / "results"
    for t in models:
        rows = []
        for q in questions:
            a = answers[t.label][q.key]
            rows.append({"question_id": q.qid, "category": q.category, "model_id": t.label, "model": t.model,
                         "choices": [{"index": 0, "turns": a["turns"]}], "tokens": a["tokens"], "finish": a["finish"]})
        write_jsonl(out / "answers" / f"{t.label}.jsonl", rows)
        write_jsonl(out / "judgments" / f"{t.label}.jsonl", judgments[t.label])
    write_jsonl(
        out / "questions.jsonl",
        [
            {
                "question_id": q.qid,
                "category": q.category,
                "turns": list(q.turns),
                **({"reference": list(q.reference)} if q.reference else {}),
            }
            for q in questions
        ],
    )
    judge_info = {
        **endpoint_info(judge_ep),
        "model_id": judge_model_id,
        "method": cfg.judge_method,
        "role": "MT-Bench judge",
        "prompts": prompts.source,
        "temperature": cfg.judge_decoding.temperature,
    }
    excluded = sum(s["excluded"] for s in scores.values())
    write_json(out / "scores.json", {
        "judge": judge_info,
        "order": [t.label for t in models],
        "kinds": {t.label: t.kind for t in models},
        "categories": sorted({q.category for q in questions}),
        "questions": len(questions),
        "models": scores,
    })
    for label, s in scores.items():
        log.info("%s: %s: overall %s (turn 1 %s, turn 2 %s), %d excluded", ctx.name, label, s["overall"],
                 s["turns"].get("1"), s["turns"].get("2"), s["excluded"])
    gpu_hours = round(sum(i.get("gpu_hours", 0.0) for i in answer_info.values()), 6)
    return StageOutput(
        counts={"models": len(models), "questions": len(questions),
                "judgments": sum(len(js) for js in judgments.values()), "excluded": excluded},
        extra={
            "judge": judge_info,
            "usage": {"judge": usage},
            "answers": {"completion_tokens": sum(i["tokens"] for i in answer_info.values()),
                        "seconds": round(sum(i["seconds"] for i in answer_info.values()), 2)},
            "cost_usd": judge_ep.cost_usd(usage["prompt_tokens"], usage["completion_tokens"]),
            "models": {t.label: t.info() for t in models},
            "device": sorted({i.get("device", "cpu") for i in answer_info.values()}),
            "gpu_hours": gpu_hours,
        },
    )


def _account(ctx: StageContext, judgments: dict[str, list[dict[str, Any]]], u: UsageTotals) -> None:
    """The manifest's ``requests`` (stages/common.py): judge requests asked, retried, lost by cause,
    and verdicts without a rating."""
    causes: Counter[str] = Counter()
    unparseable = 0
    for js in judgments.values():
        for j in js:
            why = j.get("excluded") or ""
            if why.startswith("judge request failed"):
                causes[cause_of(why)] += 1
            elif why:
                unparseable += 1
    ctx.accounting["judge"] = {
        "needed": sum(len(js) for js in judgments.values()), "asked": u.requests - u.resumed,
        "answered": u.requests - u.resumed - u.failed, "cached": u.cached, "resumed": u.resumed,
        "retries": u.retries, "failed": sum(causes.values()), "failed_by_cause": dict(causes),
        "unparseable": unparseable,
    }


def _open_judge(ctx: StageContext, endpoint: Endpoint) -> LLMClient:
    # a rerun (resume, retried Job) never pays twice for a verdict it already has
    cached = ctx.recipe.evaluation.mtbench.judge_method == "generate"
    return open_client(ctx, endpoint, "judge", cached=cached, namespace=ctx.name)


# ---------------------------------------------------------------------------------------------
# the plan and the report
# ---------------------------------------------------------------------------------------------
def _question_count(src: DatasetSource) -> int:
    """Questions in a local or packaged question file; MT-Bench's 80 when it lives on the hub."""
    from ..data.io import PKG, local_copy

    if src.path.startswith((PKG, "/", "./", "file://")):
        try:
            n = sum(1 for line in local_copy(src.path).read_text(encoding="utf-8").splitlines() if line.strip())
            return min(n, src.limit) if src.limit else n
        except BadInput:
            pass
    return int(src.limit or 80)


def estimate(recipe: Recipe, store: Store, stage: str) -> list[Ask]:
    """Two turns per question and model, each graded once. A judgment typically runs to a few
    hundred tokens (a short explanation, then ``[[rating]]``), not the 2,048 it may take. Its
    prompt holds the judge template's section, the question(s) and the evaluated model's
    answer(s) (turn 2: both turns), and the reference answers in the reference categories:
    typically answers of ``Typical.MTBENCH_ANSWER`` of their cap, at worst every answer at it."""
    mt = recipe.evaluation.mtbench
    if not mt.enabled:
        return []
    n_models = len(recipe.evaluation.model_names())
    judge = mt.judge or recipe.judge
    logprobs = mt.judge_method != "generate"
    dec = mt.judge_decoding if not logprobs else mt.judge_decoding.model_copy(update={"max_new_tokens": 1})
    ref_share = len(set(mt.reference_categories) & set(tuple(MTBENCH_TEMPERATURES))) / len(tuple(MTBENCH_TEMPERATURES))
    section = template_tokens(mt.judge_prompts) // 5  # the file holds five sections (system, single, ..., turn2-ref)

    def prompt(answer: float) -> int:
        per_turn = MTBENCH_QUESTION_TOKENS + answer + ref_share * MTBENCH_REFERENCE_TOKENS
        return round(section + 1.5 * per_turn)  # turn 1 shows one exchange, turn 2 both: 1.5 on average

    cap = mt.answer_max_new_tokens
    return [Ask(judge, 2 * _question_count(mt.questions) * n_models, prompt(Typical.MTBENCH_ANSWER * cap), dec,
                None if logprobs else Typical.MTBENCH_JUDGMENT, "judgments", prompt(cap))]


def report_section(scores: dict[str, Any], read: Callable[[str], str | None], shown: int) -> Section:
    """Overall, per-turn and per-category scores per model, a chart by category, and a few
    judgments quoted per model (``report.judgments_shown``)."""
    sec = Section("mtbench", "Evaluation: MT-Bench", numbers=dict(scores))
    if not scores.get("models"):
        return sec
    cats = list(scores.get("categories") or [])
    header = ["model", "kind", "overall", "turn 1", "turn 2", *cats, "judged", "excluded"]
    rows = []
    for label in scores.get("order", list(scores["models"])):
        s = scores["models"].get(label)
        if s:
            rows.append(
                [
                    label,
                    scores.get("kinds", {}).get(label, ""),
                    fmt(s["overall"], 3),
                    fmt(s["turns"].get("1"), 3),
                    fmt(s["turns"].get("2"), 3),
                    *[fmt(s["categories"].get(c), 3) for c in cats],
                    str(s["judged"]),
                    str(s["excluded"]),
                ]
            )
    j = scores.get("judge", {})
    sec.table = Table("MT-Bench", header, rows,
                      f"{scores.get('questions')} questions; single-answer grading 1-10 by {j.get('model_id')} "
                      f"({j.get('backend')}, method {j.get('method')}); unparseable verdicts are excluded.")
    cats = list(scores.get("categories") or sorted({c for s in scores["models"].values() for c in s["categories"]}))
    series = {label: [scores["models"][label]["categories"].get(c) for c in cats]
              for label in scores.get("order", scores["models"]) if label in scores["models"]}
    if any(v is not None for vs in series.values() for v in vs):
        fig = new_figure(9, 3.8)
        ax = fig.add_subplot()
        pts = grouped_bars(ax, cats, series)
        ax.set_ylim(0, 10)
        ax.set_ylabel("score (1-10)")
        ax.set_title(f"MT-Bench by category (judge: {j.get('model_id', '?')})")
        sec.charts.append(Chart("mtbench", "MT-Bench by category", png(fig), pts))
    samples = {}
    for label in scores.get("order", []):
        judged = jsonl(read(f"results/judgments/{label}.jsonl"))
        if judged and shown:
            samples[label] = judged[:shown]
    if samples:
        sec.details_html.append("<h3>Sample judgments</h3>")
        for label, js in samples.items():
            for x in js:
                summary = (f"{label} - question {x.get('question_id')} ({x.get('category')}), turn {x.get('turn')}: "
                           f"score {fmt(x.get('score'))} by {x.get('judge')}")
                sec.details_html.append(
                    f"<details><summary>{html.escape(summary)}</summary>"
                    f"<pre>{html.escape(str(x.get('judgment') or x.get('excluded') or ''))}</pre></details>"
                )
        sec.details_md.extend(["_Every judgment's text is in `eval-mtbench/results/judgments/`._", ""])
    return sec
