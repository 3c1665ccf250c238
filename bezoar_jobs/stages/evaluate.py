"""Stages ``eval-harness`` and ``eval-mtbench``: every checkpoint the recipe names, plus baselines.

Both evaluate the same models (``evaluation.checkpoints`` and ``evaluation.baselines``, see
:mod:`bezoar_jobs.eval.targets`) one at a time, so only one model is in memory, and both save each
model's finished result under ``_work/`` before moving on: an interrupted stage resumes with the
models it had not finished (a model whose weights changed since is evaluated again).

Outputs (``<run>/<stage>/results/``):
  eval-harness   <model>.json (per task: version, shots, every metric with stderr, the primary
                 metric; lm_eval's own result tables), summary.json (primary metric per model)
  eval-mtbench   answers/<model>.jsonl, judgments/<model>.jsonl (every judgment's text, score or
                 reason for exclusion, judge model id), scores.json (overall / per turn / per
                 category per model, judge identity), questions.jsonl (the questions used)

Heavy imports (torch, transformers, lm_eval) happen inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

from ..errors import BadInput, RetryableError
from ..runner import StageContext, StageOutput, params_hash
from .common import MAX_FAILED_FRACTION, cost_usd, endpoint_info, usage_dict

log = logging.getLogger("bezoar")


def _free() -> None:
    """Return the memory of the model the caller just dropped (``del``) before the next one loads."""
    from ..models import release_memory

    release_memory()


def _write_json(path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def _write_jsonl(path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")


def _skipped(ctx: StageContext, what: str) -> StageOutput:
    _write_json(ctx.out / "results" / "summary.json", {"skipped": True, "reason": f"evaluation.{what}.enabled is false"})
    log.info("%s: evaluation.%s.enabled is false: nothing evaluated", ctx.name, what)
    return StageOutput(counts={"models": 0, "skipped": True})


# ---------------------------------------------------------------------------------------------
# eval-harness
# ---------------------------------------------------------------------------------------------
def run_harness(ctx: StageContext) -> StageOutput:
    from ..eval import harness
    from ..eval.targets import device_figures, load, targets

    r = ctx.recipe
    cfg = r.evaluation.harness
    if not cfg.enabled:
        return _skipped(ctx, "harness")
    models = targets(ctx)
    # tasks are checked (names, pinned versions) before any model is loaded
    include = harness.prepare_include_dir(cfg.include_path, ctx.scratch)
    tm = harness.task_manager(include, [t.name for t in cfg.tasks])
    _, versions = harness.load_tasks(tm, cfg.tasks)
    import lm_eval

    lm_eval_version = getattr(lm_eval, "__version__", "unknown")
    ph = params_hash(r, ctx.name)
    per_model: dict[str, dict[str, Any]] = {}
    for t in models:
        ctx.check_stop()
        name = f"harness/{t.work_key(ph)}.json"
        if ctx.work.exists(name):
            per_model[t.label] = json.loads(ctx.work.get_bytes(name))
            log.info("%s: %s already evaluated (resumed from _work/)", ctx.name, t.label)
            continue
        log.info("%s: evaluating %s (%s)", ctx.name, t.label, t.model)
        model, tok = load(ctx, t)
        # fresh task objects per model: a task keeps the requests it built for the previous one
        task_objects, _ = harness.load_tasks(tm, cfg.tasks)
        t0 = time.time()
        raw = harness.evaluate(model, tok, tm, task_objects, cfg, r.seed)
        secs = time.time() - t0
        rec = {
            "model": t.label,
            **t.info(),
            "tasks": harness.summarize(raw, cfg.tasks, versions),
            "seconds": round(secs, 2),
            **device_figures(model, secs),
            "lm_eval_version": lm_eval_version,
            "limit": cfg.limit,
            "lm_eval": harness.raw_subset(raw),
        }
        del model, tok, task_objects
        _free()
        ctx.work.put_bytes(name, json.dumps(rec, default=str).encode())
        per_model[t.label] = rec
        log.info("%s: %s: %s", ctx.name, t.label,
                 ", ".join(f"{k}={v['value']:.4f}" for k, v in rec["tasks"].items() if v["value"] is not None))
    out = ctx.out / "results"
    for label, rec in per_model.items():
        _write_json(out / f"{label}.json", rec)
    summary = {
        "lm_eval_version": lm_eval_version,
        "limit": cfg.limit,
        "tasks": [{"name": t.name, "num_fewshot": t.num_fewshot, "metric": t.metric_key, "version": versions.get(t.name)}
                  for t in cfg.tasks],
        "order": [t.label for t in models],
        "models": {
            label: {
                "kind": rec["kind"],
                "model": rec["model"],
                "revision": rec["revision"],
                "scores": {task: {"value": v["value"], "stderr": v["stderr"], "metric": v["metric"]}
                           for task, v in rec["tasks"].items()},
            }
            for label, rec in per_model.items()
        },
    }
    _write_json(out / "summary.json", summary)
    gpu_hours = round(sum(rec.get("gpu_hours", 0.0) for rec in per_model.values()), 6)
    return StageOutput(
        counts={"models": len(per_model), "tasks": len(cfg.tasks)},
        extra={
            "lm_eval_version": lm_eval_version,
            "models": {t.label: t.info() for t in models},
            "device": sorted({rec.get("device", "cpu") for rec in per_model.values()}),
            "gpu_hours": gpu_hours,
        },
    )


# ---------------------------------------------------------------------------------------------
# eval-mtbench
# ---------------------------------------------------------------------------------------------
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
    return hashlib.sha256(f"{base}\0{blob}".encode()).hexdigest()


def judge_endpoint(ctx: StageContext) -> Any:
    cfg = ctx.recipe.evaluation.mtbench
    ep = cfg.judge or ctx.recipe.judge
    if cfg.judge_method == "logprobs" and ep.backend != "local":
        where = "evaluation.mtbench.judge" if cfg.judge else "judge"
        raise BadInput(f"evaluation.mtbench.judge_method 'logprobs' needs an in-process judge; {where}.backend is {ep.backend!r}")
    return ep


def run_mtbench(ctx: StageContext) -> StageOutput:
    from ..eval import mtbench
    from ..eval.judge_prompts import load_judge_prompts
    from ..eval.targets import device_figures, load, targets

    r = ctx.recipe
    cfg = r.evaluation.mtbench
    if not cfg.enabled:
        return _skipped(ctx, "mtbench")
    # everything that can be wrong with the input is checked before a model is loaded
    questions = mtbench.load_questions(cfg)
    prompts = load_judge_prompts(cfg.judge_prompts)
    judge_ep = judge_endpoint(ctx)
    models = targets(ctx)
    ah = _answers_hash(ctx)
    ph = params_hash(r, ctx.name)

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
        _free()
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
                if {(str(j["question_id"]), j["turn"]) for j in saved_js} == {(q.key, n) for q in questions for n in (1, 2)}:
                    judgments[t.label] = saved_js
                    log.info("%s: answers of %s already judged (resumed from _work/)", ctx.name, t.label)
                    continue
            texts = {k: v["turns"] for k, v in answers[t.label].items()}
            js = mtbench.judge(client, cfg.judge_method, prompts, questions, texts, t.label, cfg.judge_decoding,
                               cfg.reference_categories, r.seed, cfg.logprobs_prefix)
            failed = [j for j in js if (j.get("excluded") or "").startswith("judge request failed")]
            if len(failed) > MAX_FAILED_FRACTION * len(js):
                raise RetryableError(
                    f"{ctx.name}: {len(failed)} of {len(js)} judge requests for {t.label} failed for good "
                    f"(e.g. {failed[0]['excluded']}); answers are saved, a rerun asks the judge again"
                )
            ctx.work.put_bytes(name, json.dumps(js).encode())
            judgments[t.label] = js
        usage = usage_dict(client.usage)
        judge_model_id = client.model_id
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
        _write_jsonl(out / "answers" / f"{t.label}.jsonl", rows)
        _write_jsonl(out / "judgments" / f"{t.label}.jsonl", judgments[t.label])
    _write_jsonl(out / "questions.jsonl", [
        {"question_id": q.qid, "category": q.category, "turns": list(q.turns),
         **({"reference": list(q.reference)} if q.reference else {})} for q in questions])
    judge_info = {**endpoint_info(judge_ep), "model_id": judge_model_id, "method": cfg.judge_method,
                  "prompts": prompts.source, "temperature": cfg.judge_decoding.temperature}
    excluded = sum(s["excluded"] for s in scores.values())
    _write_json(out / "scores.json", {
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
            "cost_usd": cost_usd(judge_ep, usage["prompt_tokens"], usage["completion_tokens"]),
            "models": {t.label: t.info() for t in models},
            "device": sorted({i.get("device", "cpu") for i in answer_info.values()}),
            "gpu_hours": gpu_hours,
        },
    )


def _open_judge(ctx: StageContext, endpoint: Any) -> Any:
    from ..llm import make_client

    client = make_client(endpoint, role="judge")
    if ctx.recipe.evaluation.mtbench.judge_method == "generate":
        from ..llm.cache import CachedClient

        # a rerun (resume, retried Job) never pays twice for a verdict it already has
        client = CachedClient(client, ctx.store, namespace=ctx.name)
    return client
