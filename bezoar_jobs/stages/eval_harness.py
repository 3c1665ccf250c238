"""Stage ``eval-harness``: EleutherAI's LM Evaluation Harness on every checkpoint the recipe names,
plus baselines, and its section of the run report.

Outputs (``<run>/eval-harness/results/``): ``<model>.json`` (per task: version, shots, every metric
with stderr, the primary metric; lm_eval's own result tables), ``summary.json`` (primary metric per
model). Heavy imports (torch, transformers, lm_eval) happen inside the functions.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import BadInput, Interrupted
from ..report.charts import Chart, grouped_bars, new_figure, png
from ..report.render import Section, Table, score
from ..runner import StageContext, StageOutput

if TYPE_CHECKING:
    from ..eval.targets import Target
from .evaluate import free, skipped, write_json

log = logging.getLogger("bezoar")


def run(ctx: StageContext) -> StageOutput:
    from ..eval import harness, parallel
    from ..eval.targets import device_figures, load, model_dir, targets
    from ..ranks import world

    r = ctx.recipe
    cfg = r.evaluation.harness
    me = world()  # several processes (hf, data_parallel_size): each evaluates a share, rank 0 writes and commits
    if not cfg.enabled:
        return skipped(ctx, "harness") if me.zero else StageOutput(committed=False)
    models = targets(ctx)
    harness.check_backend(cfg)  # vllm: the package, ray for replicas, the GPUs (exit 2 before any model loads)
    if me.distributed and cfg.backend != "hf":
        raise BadInput(f"evaluation.harness.backend {cfg.backend!r}: runs in one process (vLLM starts its replicas "
                       f"itself); this stage was started on {me.size}")
    parallel.join_group()
    device = parallel.device_for(r.evaluation.device)
    # tasks are checked (names, pinned versions) before any model is loaded
    include = harness.prepare_include_dir(cfg.include_path, ctx.scratch)
    tm = harness.task_manager(include, [t.name for t in cfg.tasks])
    _, versions = harness.load_tasks(tm, cfg.tasks)
    import lm_eval

    lm_eval_version = getattr(lm_eval, "__version__", "unknown")
    ph = ctx.params_hash
    per_model: dict[str, dict[str, Any]] = {}
    for t in models:
        name = f"harness/{t.work_key(ph)}.json"
        # rank 0 decides what is done (it alone writes _work/), any rank's SIGTERM stops all: every rank
        # evaluates the same models
        done, stop = parallel.agree(me.zero and ctx.work.exists(name), ctx.stop_requested())
        if stop:
            raise Interrupted(f"{ctx.name}: stopped by SIGTERM; progress is saved under _work/")
        if done:
            if me.zero:
                per_model[t.label] = json.loads(ctx.work.get_bytes(name))
            log.info("%s: %s already evaluated (resumed from _work/)", ctx.name, t.label)
            continue
        log.info("%s: evaluating %s (%s)", ctx.name, t.label, t.model)
        path = model_dir(ctx, t)
        # fresh task objects per model: a task keeps the requests it built for the previous one
        task_objects, _ = harness.load_tasks(tm, cfg.tasks)
        if cfg.backend == "vllm":  # vLLM loads the checkpoint itself, over data_parallel x tensor_parallel GPUs
            model = tok = None
            dtype: str = r.evaluation.dtype  # as the recipe says (auto: vLLM's own choice), on the command line too
            t0 = time.time()
            raw: dict[str, Any] | None = harness.evaluate_vllm(str(path), tm, task_objects, cfg, dtype,
                                                                    trust_remote_code=t.trust_remote_code)
            secs = time.time() - t0
            figures = {"device": "cuda", "gpus": cfg.gpus, "gpu_hours": round(cfg.gpus * secs / 3600.0, 6)}
        else:
            model, tok = load(ctx, t, path, device=device)
            t0 = time.time()
            raw = harness.evaluate(model, tok, tm, task_objects, cfg)
            secs = time.time() - t0
            dtype = str(getattr(model, "dtype", "float32")).removeprefix("torch.")
            figures = device_figures(model, secs, me.size)
        if raw is None:  # another rank than 0: its share is in rank 0's result
            del model, tok, task_objects
            free()
            continue
        ref, rev = _cli_model(ctx, t, str(path))
        # one process reproduces a data-parallel run's numbers (bezoar_jobs.eval.parallel): the commands are for one
        # (rank 0's device)
        include_cli = harness.include_path_for_cli(cfg.include_path)
        commands = harness.cli_commands(ref, dtype, str(figures["device"]), include_cli, cfg, rev,
                                        trust_remote_code=t.trust_remote_code)
        rec = {
            "model": t.label,
            **t.info(),
            "tasks": harness.summarize(raw, cfg.tasks, versions),
            "seconds": round(secs, 2),
            **figures,
            "lm_eval_version": lm_eval_version,
            "limit": cfg.limit,
            "seed": list(harness.seeds(cfg)),
            # the lm_eval CLI invocations (one per shot count) that reproduce these numbers
            "lm_eval_command": commands,
            "lm_eval_command_note": harness.cli_note(cfg),
            "lm_eval": harness.raw_subset(raw),
        }
        del model, tok, task_objects
        free()
        ctx.work.put_bytes(name, json.dumps(rec, default=str).encode())
        per_model[t.label] = rec
        log.info("%s: %s: %s", ctx.name, t.label,
                 ", ".join(f"{k}={v['value']:.4f}" for k, v in rec["tasks"].items() if v["value"] is not None))
    if not me.zero:
        return StageOutput(committed=False)
    out = ctx.out / "results"
    for label, rec in per_model.items():
        write_json(out / f"{label}.json", rec)
    summary = {
        "lm_eval_version": lm_eval_version,
        "limit": cfg.limit,
        "tasks": [
            {"name": t.name, "num_fewshot": t.num_fewshot, "metric": t.metric_key, "version": versions.get(t.name)}
            for t in cfg.tasks
        ],
        "order": [t.label for t in models],
        "models": {
            label: {
                "kind": rec["kind"],
                "model": rec["model"],
                "revision": rec["revision"],
                "scores": {
                    task: {"value": v["value"], "stderr": v["stderr"], "metric": v["metric"]}
                    for task, v in rec["tasks"].items()
                },
            }
            for label, rec in per_model.items()
        },
    }
    write_json(out / "summary.json", summary)
    gpu_hours = round(sum(rec.get("gpu_hours", 0.0) for rec in per_model.values()), 6)
    return StageOutput(
        counts={"models": len(per_model), "tasks": len(cfg.tasks)},
        extra={
            "lm_eval_version": lm_eval_version,
            "evaluator": {"backend": "lm_eval", "model_id": f"lm_eval {lm_eval_version}"},
            "models": {t.label: t.info() for t in models},
            "device": sorted({rec.get("device", "cpu") for rec in per_model.values()}),
            "gpu_hours": gpu_hours,
        },
    )


def _cli_model(ctx: StageContext, t: Target, local: str) -> tuple[str, str | None]:
    """Where the lm_eval CLI finds the evaluated weights: a checkpoint's committed ``model/`` in the
    run (an s3:// one must be downloaded first: the CLI reads local directories and hub ids), a hub
    model at its revision, else the local directory the stage loaded."""
    from ..recipe_base import is_hub_model

    if t.kind == "checkpoint":
        return ctx.store.url(t.model).removeprefix("file://"), None
    if is_hub_model(t.model):
        return t.model, t.revision
    return local, None


def report_section(summary: dict[str, Any], read: Callable[[str], str | None], shown: int) -> Section:
    """One row per model, one column per task (primary metric ± stderr), and a bar chart."""
    sec = Section("harness", "Evaluation: LM Evaluation Harness", numbers=summary)
    if not summary.get("models"):
        return sec
    tasks = summary["tasks"]
    header = ["model", "kind"] + [f"{x['name']} ({x['num_fewshot']}-shot, {x['metric']})" for x in tasks]
    rows = []
    for label in summary.get("order", list(summary["models"])):
        mrow = summary["models"].get(label)
        if mrow:
            rows.append([label, mrow.get("kind", "")] + [score(mrow["scores"].get(x["name"])) for x in tasks])
    note = f"lm_eval {summary.get('lm_eval_version')}; task versions: " + ", ".join(
        f"{x['name']} v{x['version']}" for x in tasks
    )
    if summary.get("limit"):
        note += f". LIMITED to {summary['limit']} items per task: not comparable with published scores."
    sec.table = Table("LM Evaluation Harness", header, rows, note)
    names = [t["name"] for t in tasks]
    series = {label: [summary["models"][label]["scores"].get(t, {}).get("value") for t in names]
              for label in summary.get("order", summary["models"]) if label in summary["models"]}
    if any(v is not None for vs in series.values() for v in vs):
        fig = new_figure(8, 3.5)
        ax = fig.add_subplot()
        pts = grouped_bars(ax, names, series)
        ax.set_title("LM Evaluation Harness (primary metric per task)")
        sec.charts.append(Chart("harness", "LM Evaluation Harness", png(fig), pts))
    return sec
