"""What every training stage (sft-*, dpo) does around its trainer, with the stage's context:

1. build and validate the TRL/PEFT configs from the recipe (BadInput before anything is loaded);
2. find the base model: the previous stage's committed ``model/`` or the recipe's student;
3. the stage builds its dataset and trainer (stages/sft.py, stages/dpo.py);
4. resume from the newest complete checkpoint in ``_work/checkpoints/`` (if any) and train, with
   checkpoints uploaded every ``training.checkpoint_every`` steps and on SIGTERM;
5. merge the adapter into a full checkpoint under ``<out>/model/`` with a model card;
6. report steps, losses, tokens/s, real-token fraction and peak memory in the manifest.

The machine-learning work is the library in :mod:`bezoar_jobs.training`; this module only wires it
to the run. torch, transformers and trl are imported by the library, inside the functions here.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import BadInput
from ..ranks import world
from ..runner import StageContext, StageOutput
from ..training.types import Tokenizer, Trainer

log = logging.getLogger("bezoar")

if TYPE_CHECKING:  # the library imports torch and transformers: at run time only inside functions
    from ..training.config import StageConfigs
    from ..training.packing import CountingCollator
    from ..training.run import TrainResult


def gpu_hours(seconds: float, cuda: bool, world_size: int) -> float:
    """A training stage's GPU-hours: its wall time on every GPU it held (one per process of a distributed
    run, which holds them all through rank 0's merge too); 0 on CPU. Wall time alone counted a run on N
    GPUs as one."""
    return round(seconds * max(1, world_size) / 3600.0, 6) if cuda else 0.0


def prepare(ctx: StageContext) -> StageConfigs:
    """The stage's configs, validated; the trainer's output dir is in local scratch."""
    from ..training.config import build_stage_configs, check_report_to

    t = ctx.recipe.training
    configs = build_stage_configs(t, ctx.recipe.seed, ctx.name, ctx.scratch / "trainer", log=log)
    if t.report_to:
        from ..training.tracking import configure

        check_report_to(t)
        # the Trainer's tracker callbacks read their settings from the environment: one run per stage, tagged
        # with the run id and the stage; local files inside the stage's output are committed with it
        run_id = ctx.run_uri.rstrip("/").rsplit("/", 1)[-1]
        configure(t.report_to, ctx.out, run_id, ctx.name, ctx.recipe.name)
    log.info("%s: %s", ctx.name, configs.plan.description)
    d = configs.distributed
    if d.get("world_size", 1) > 1:
        log.info("%s: %d processes (rank %d): global batch %d kept = %d per device x %d accumulation x %d ranks "
                 "(the recipe: %d x %d on one device)", ctx.name, d["world_size"], world().rank, d["global_batch"],
                 d["per_device_batch"], d["gradient_accumulation_steps"], d["world_size"],
                 d["recipe_per_device_batch"], d["recipe_gradient_accumulation_steps"])
    return configs


def fingerprint(ctx: StageContext) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the stage's parameters, inputs and code."""
    return {"stage": ctx.name, "params": ctx.params_hash, "inputs": dict(ctx.inputs), "code": __version__}


def resolve_base(ctx: StageContext, base_stage: str | None) -> tuple[Path, dict[str, Any]]:
    """(local model dir, manifest info) of the model this stage starts from."""
    from ..models import check_model_dir, pinned_revision, resolve_model

    if base_stage is None:
        s = ctx.recipe.student
        # a branch (null: the default one) is trained, and recorded, at the commit it points at now
        revision = pinned_revision(s.model, s.revision)
        try:
            path = resolve_model(s.model, revision, trust_remote_code=s.trust_remote_code)
        except BadInput as e:  # name the recipe field, not only the path
            raise BadInput(f"student.model: {e}") from None
        info = {"base_model": s.model, "base_revision": revision}
        return path, info if revision == s.revision else {**info, "recipe_revision": s.revision}
    path = ctx.fetch_input(base_stage, "model")
    check_model_dir(path, f"{base_stage}/model")
    return path, {"base_model": f"{base_stage}/model", "base_stage": base_stage}


def load_tokenizer(ctx: StageContext, base_dir: Path) -> Tokenizer:
    from ..models import load_tokenizer as load
    from ..training.lora import setup_tokenizer

    return setup_tokenizer(load(base_dir, trust_remote_code=ctx.recipe.student.trust_remote_code))


def train(ctx: StageContext, trainer: Trainer, configs: StageConfigs, counter: CountingCollator) -> TrainResult:
    """Train with checkpoints in ``_work/checkpoints/`` (resuming from the newest complete one)."""
    from ..training import run
    from ..training.checkpoint import StoreCheckpoints

    ckpts = StoreCheckpoints(ctx.work, fingerprint(ctx), keep=ctx.recipe.training.keep_checkpoints)
    # in a group, rank 0 alone writes the stage's metrics (every rank sees the same, all-reduced, losses)
    record = ctx.metrics if world().zero else (lambda rec: None)
    result = run.train(
        ctx.name, trainer, counter, ckpts, Path(configs.trainer_args.output_dir), ctx.scratch / "adapter",
        ctx.out / "metrics.jsonl", configs.plan.cuda, ctx.stop_requested, record,
    )
    if ctx.recipe.training.report_to and world().zero:
        from ..training.tracking import close

        close(ctx.recipe.training.report_to, ctx.out)
    return result


def push(ctx: StageContext, model_dir: Path, data_dirs: list[Path]) -> dict[str, str]:
    """Optional upload (``training.push``): the merged checkpoint, and the training data when asked.
    The token comes from the environment variable the recipe names."""
    cfg = ctx.recipe.training.push
    if cfg is None:
        return {}
    token = os.environ.get(cfg.token_env)
    if not token:
        raise BadInput(f"training.push: the environment variable {cfg.token_env} (hub token) is not set")
    from ..training.run import push_to_hub

    data_repos = {f"{cfg.repo_prefix}-{d.parent.name}-data": d for d in data_dirs} if cfg.datasets else {}
    repos = push_to_hub(token, f"{cfg.repo_prefix}-{ctx.name}", cfg.private, model_dir,
                        f"{ctx.recipe.name}: {ctx.name}", data_repos)
    log.info("%s: pushed %s", ctx.name, ", ".join(repos.values()))
    return repos


def finish(
    ctx: StageContext,
    configs: StageConfigs,
    base_dir: Path,
    base_info: dict[str, Any],
    tokenizer: Tokenizer,
    result: TrainResult,
    data: list[dict[str, Any]],
    counts: dict[str, Any],
    extra: dict[str, Any] | None = None,
    data_dirs: list[Path] | None = None,
) -> StageOutput:
    """Merge, write the model card, optionally push; the stage's output. In a group, rank 0 alone merges
    and commits; the other ranks are done once training is."""
    from ..data.prompt_format import chat_template
    from ..training.card import write_model_card
    from ..training.examples import starts_with_bos
    from ..training.lora import base_licence, merge_adapter

    if not world().zero:
        return StageOutput(committed=False)
    t = ctx.recipe.training
    model_dir = ctx.out / "model"
    t0 = time.time()
    merged = merge_adapter(
        base_dir, result.adapter_dir, model_dir, t.merge_dtype, tokenizer, ctx.recipe.student.trust_remote_code,
        chat_template=chat_template(starts_with_bos(tokenizer, ctx.recipe.student.add_bos)),
    )
    merge_s = time.time() - t0
    lic = t.base_licence or base_licence(base_dir)
    write_model_card(
        model_dir / "README.md",
        recipe_name=ctx.recipe.name,
        stage=ctx.name,
        base_model=str(base_info.get("base_model")),
        base_licence=lic,
        data=data,
        mode=configs.plan.mode,
        mode_description=configs.plan.description,
        steps=result.steps,
        final_loss=result.final_loss,
        examples=int(counts.get("examples", 0)),
        trainer_settings=configs.settings,
        lora_settings=configs.lora_settings,
        merge_dtype=t.merge_dtype,
    )
    pushed = push(ctx, model_dir, data_dirs or [])
    figures = result.figures()
    log.info(
        "%s: %d steps, final loss %s, %.0f real tokens/s, real-token fraction %s, peak memory %.2f GiB",
        ctx.name,
        result.steps,
        f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a",
        figures["tokens_per_second"] or 0,
        figures["real_token_fraction"],
        result.peak_memory_bytes / 2**30,
    )
    return StageOutput(
        counts={**counts, "steps": result.steps},
        extra={
            **base_info,
            # GPU time of this stage (training + merge), for the report's cost table; 0 on CPU
            "gpu_hours": gpu_hours(result.runtime_s + merge_s, configs.plan.cuda,
                                   int(configs.distributed.get("world_size", 1))),
            "training": {
                "mode": configs.plan.mode,
                "mode_description": configs.plan.description,
                "device": "cuda" if configs.plan.cuda else "cpu",
                **figures,
                "merge_seconds": round(merge_s, 2),
                "merged": merged,
                "base_licence": lic,
                # the processes it trained on and how the recipe's global batch was split over them
                "distributed": {**configs.distributed, "launcher": "torch.distributed.run"
                                if configs.distributed.get("world_size", 1) > 1 else None,
                                "backend": getattr(configs.trainer_args, "ddp_backend", None)
                                if configs.distributed.get("world_size", 1) > 1 else None},
                **(extra or {}),
            },
            "data": data,
            **({"pushed": pushed} if pushed else {}),
        },
    )
