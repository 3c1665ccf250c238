"""What every training stage does around its trainer: base model, resume, train, merge, commit.

The flow of a training stage (sft-*, dpo), shared here:

1. build and validate the TRL/PEFT configs from the recipe (BadInput before anything is loaded);
2. find the base model: the previous stage's committed ``model/`` or the recipe's student;
3. the stage builds its dataset and trainer (sft.py / dpo.py);
4. resume from the newest complete checkpoint in ``_work/checkpoints/`` (if any) and train, with
   checkpoints uploaded every ``training.checkpoint_every`` steps and on SIGTERM;
5. merge the adapter into a full checkpoint under ``<out>/model/`` with a model card;
6. report steps, losses, tokens/s, real-token fraction and peak memory in the manifest.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import BadInput, Interrupted
from .checkpoint import CheckpointCallback, StoreCheckpoints
from .config import StageConfigs, build_stage_configs, check_report_to
from .packing import CountingCollator, PackedRowsCollator, SharedPrefixCollator

log = logging.getLogger("bezoar")


def prepare(ctx: Any) -> StageConfigs:
    """Configs for ``ctx.name``, validated; the trainer's output dir is in local scratch."""
    configs = build_stage_configs(ctx.recipe, ctx.name, ctx.scratch / "trainer", log=log)
    if ctx.recipe.training.report_to:
        check_report_to(ctx.recipe.training)
        # transformers' TensorBoard callback reads its directory from the environment; inside the
        # stage's output it is committed with the stage
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(ctx.out / "tensorboard")
    log.info("%s: %s", ctx.name, configs.plan.description)
    return configs


def stage_fingerprint(ctx: Any) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the stage's parameters, inputs and code."""
    from ..runner import input_hashes, params_hash

    return {
        "stage": ctx.name,
        "params": params_hash(ctx.recipe, ctx.name),
        "inputs": input_hashes(ctx.store, ctx.name, ctx.recipe),
        "code": __version__,
    }


def resolve_base(ctx: Any, base_stage: str | None) -> tuple[Path, dict[str, Any]]:
    """(local model dir, manifest info) of the model this stage starts from."""
    if base_stage is None:
        from ..models import resolve_model

        s = ctx.recipe.student
        path = resolve_model(s.model, s.revision, trust_remote_code=s.trust_remote_code)
        return path, {"base_model": s.model, "base_revision": s.revision}
    path = ctx.fetch_input(base_stage, "model")
    from ..models import check_model_dir

    check_model_dir(path, f"{base_stage}/model")
    return path, {"base_model": f"{base_stage}/model", "base_stage": base_stage}


def install_collator(trainer: Any, packing: bool, shared_prefix: bool = False) -> CountingCollator:
    """Count tokens, and pick the batch layout the model's attention can keep apart:

    - per-example attention (bezoar_segments) and ``shared_prefix``: one flat sequence per batch
      with shared prompt prefixes computed once (SharedPrefixCollator);
    - FlashAttention varlen or bezoar_segments: TRL's flattened padding-free batches;
    - any other attention with packing: packed rows with a block-diagonal mask (PackedRowsCollator).
    """
    from .attention import NAME, keeps_examples_apart

    inner = trainer.data_collator
    attn = getattr(trainer.model.config, "_attn_implementation", None)
    pad = trainer.processing_class.pad_token_id
    if packing and shared_prefix and attn == NAME:
        inner = SharedPrefixCollator(pad_token_id=pad)
    elif packing and not keeps_examples_apart(attn):
        inner = PackedRowsCollator(pad_token_id=pad)
    counter = CountingCollator(inner)
    trainer.data_collator = counter
    return counter


def peak_memory_bytes(cuda: bool) -> int:
    if cuda:
        import torch

        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    train_loss: float | None
    runtime_s: float
    resumed_from: int | None
    real_tokens: int
    total_tokens: int
    peak_memory_bytes: int
    adapter_dir: Path
    memory_kind: str = "process max RSS"
    shared_tokens: int = 0

    def figures(self) -> dict[str, Any]:
        tps = self.real_tokens / self.runtime_s if self.runtime_s > 0 else None
        return {
            "steps": self.steps,
            "final_loss": self.final_loss,
            "train_loss": self.train_loss,
            "train_runtime_s": round(self.runtime_s, 3),
            "resumed_from_step": self.resumed_from,
            "real_tokens": self.real_tokens,
            "total_tokens": self.total_tokens,
            # of the positions processed, the fraction that are real tokens (not padding)
            "real_token_fraction": round((self.real_tokens - self.shared_tokens) / self.total_tokens, 4) if self.total_tokens else None,
            # example tokens covered by a shared prompt prefix computed once per batch
            "shared_prefix_tokens": self.shared_tokens,
            "tokens_per_second": round(tps, 2) if tps else None,
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_memory": self.memory_kind,
        }


def _finished_state(checkpoint: Path) -> dict[str, Any] | None:
    """The trainer state of a checkpoint taken at the end of training, else None. (The Trainer,
    resumed from its final checkpoint, would run one step past max_steps.)"""
    path = checkpoint / "trainer_state.json"
    if not path.is_file():
        return None
    state = json.loads(path.read_text(encoding="utf-8"))
    return state if state.get("max_steps") and state.get("global_step", 0) >= state["max_steps"] else None


def train(ctx: Any, trainer: Any, configs: StageConfigs, counter: CountingCollator) -> TrainResult:
    """Resume if a complete checkpoint exists, train with store checkpoints, save the adapter."""
    t = ctx.recipe.training
    output_dir = Path(configs.trainer_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpts = StoreCheckpoints(ctx.work, stage_fingerprint(ctx), keep=t.keep_checkpoints)
    metrics_path = ctx.out / "metrics.jsonl"
    callback = CheckpointCallback(ctx, ckpts, metrics_path)
    trainer.add_callback(callback)
    restored = ckpts.restore(output_dir, metrics_out=metrics_path)
    resume_path = None
    if restored:
        step, resume_path = restored
        log.info("%s: resuming from the checkpoint at step %d (%s)", ctx.name, step, ctx.work.store.url(ctx.work.rel(f"checkpoints/step-{step}")))
        ctx.metrics({"stage": ctx.name, "event": "resumed", "step": step})
    else:
        log.info("%s: no complete checkpoint: training from step 0", ctx.name)
    ctx.check_stop()
    mem_kind = "CUDA max allocated" if configs.plan.cuda else "process max RSS"
    done = _finished_state(resume_path) if resume_path else None
    if done is not None and resume_path is not None:
        # killed after the last checkpoint but before the commit: nothing left to train
        log.info("%s: the checkpoint at step %d ends the training: merging it", ctx.name, done["global_step"])
        losses = [h["loss"] for h in done.get("log_history", []) if "loss" in h]
        return TrainResult(
            steps=int(done["global_step"]), final_loss=float(losses[-1]) if losses else None,
            train_loss=None, runtime_s=0.0, resumed_from=int(done["global_step"]), real_tokens=0, total_tokens=0,
            peak_memory_bytes=peak_memory_bytes(configs.plan.cuda), adapter_dir=resume_path, memory_kind=mem_kind,
        )
    if configs.plan.cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    out = trainer.train(resume_from_checkpoint=str(resume_path) if resume_path else None)
    runtime = time.time() - t0
    if ctx.stop_requested():
        at = callback.stopped_at if callback.stopped_at is not None else trainer.state.global_step
        raise Interrupted(f"{ctx.name}: stopped by SIGTERM; checkpoint at step {at} is in _work/checkpoints/")
    adapter_dir = ctx.scratch / "adapter"
    trainer.model.save_pretrained(str(adapter_dir))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = TrainResult(
        steps=int(trainer.state.global_step),
        final_loss=float(losses[-1]) if losses else None,
        train_loss=float(out.training_loss) if out is not None and out.training_loss is not None else None,
        runtime_s=runtime,
        resumed_from=restored[0] if restored else None,
        real_tokens=counter.real_tokens,
        total_tokens=counter.total_tokens,
        shared_tokens=counter.shared_tokens,
        peak_memory_bytes=peak_memory_bytes(configs.plan.cuda),
        adapter_dir=adapter_dir,
        memory_kind=mem_kind,
    )
    if result.steps < 1:
        raise BadInput(f"{ctx.name}: training ran 0 optimizer steps (too few examples for the batch size?)")
    return result


def release() -> None:
    """Free memory once the caller dropped trainer and model (the merge reloads the base in float32)."""
    from ..models import release_memory

    release_memory()


def push_to_hub(ctx: Any, model_dir: Path, data_dirs: list[Path]) -> dict[str, str]:
    """Optional upload (``training.push``): the merged checkpoint, and the training data when asked.
    Production only: the token comes from the environment variable the recipe names."""
    cfg = ctx.recipe.training.push
    if cfg is None:
        return {}
    token = os.environ.get(cfg.token_env)
    if not token:
        raise BadInput(f"training.push: the environment variable {cfg.token_env} (hub token) is not set")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repos = {}
    repo = f"{cfg.repo_prefix}-{ctx.name}"
    api.create_repo(repo, private=cfg.private, exist_ok=True)
    api.upload_folder(folder_path=str(model_dir), repo_id=repo, commit_message=f"{ctx.recipe.name}: {ctx.name}")
    repos["model"] = repo
    if cfg.datasets:
        for d in data_dirs:
            drepo = f"{cfg.repo_prefix}-{d.parent.name}-data"
            api.create_repo(drepo, repo_type="dataset", private=cfg.private, exist_ok=True)
            api.upload_folder(folder_path=str(d), repo_id=drepo, repo_type="dataset")
            repos[f"data:{d.parent.name}"] = drepo
    log.info("%s: pushed %s", ctx.name, ", ".join(repos.values()))
    return repos


def finish(
    ctx: Any,
    configs: StageConfigs,
    base_dir: Path,
    base_info: dict[str, Any],
    tokenizer: Any,
    result: TrainResult,
    data: list[dict[str, Any]],
    counts: dict[str, Any],
    extra: dict[str, Any] | None = None,
    data_dirs: list[Path] | None = None,
) -> Any:
    """Merge, write the model card, optionally push; return the StageOutput."""
    from ..runner import StageOutput
    from .card import write_model_card
    from .lora import base_licence, merge_adapter

    t = ctx.recipe.training
    model_dir = ctx.out / "model"
    t0 = time.time()
    merged = merge_adapter(
        base_dir, result.adapter_dir, model_dir, t.merge_dtype, tokenizer, ctx.recipe.student.trust_remote_code
    )
    merge_s = time.time() - t0
    lic = t.base_licence or base_licence(base_dir)
    trainer_settings = ctx.recipe.training.stage_sft_args(ctx.name) if ctx.name != "dpo" else dict(t.dpo.dpo_args)
    lora_settings = t.dpo_lora() if ctx.name == "dpo" else dict(t.lora)
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
        trainer_settings=trainer_settings,
        lora_settings=lora_settings,
        merge_dtype=t.merge_dtype,
    )
    pushed = push_to_hub(ctx, model_dir, data_dirs or [])
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
            "gpu_hours": round((result.runtime_s + merge_s) / 3600.0, 6) if configs.plan.cuda else 0.0,
            "training": {
                "mode": configs.plan.mode,
                "mode_description": configs.plan.description,
                "device": "cuda" if configs.plan.cuda else "cpu",
                **figures,
                "merge_seconds": round(merge_s, 2),
                "merged": merged,
                "base_licence": lic,
                **(extra or {}),
            },
            "data": data,
            **({"pushed": pushed} if pushed else {}),
        },
    )
