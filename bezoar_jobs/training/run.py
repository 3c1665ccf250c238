"""The training loop around a TRL trainer: batch layout, resume from store checkpoints, figures.

A library: it takes plain values (a trainer, a :class:`~bezoar_jobs.training.checkpoint.StoreCheckpoints`,
callables to ask whether to stop and to record metrics) and knows nothing of stages or the run. The
stages (:mod:`bezoar_jobs.stages.training`) wire it to their context.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadInput, Interrupted, RetryableError
from ..ranks import world
from . import dist
from .checkpoint import PROGRESS, CheckpointCallback, StoreCheckpoints
from .packing import CountingCollator, PackedRowsCollator, SharedPrefixCollator

log = logging.getLogger("bezoar")


def install_collator(trainer: Any, padding_free: bool, shared_prefix: bool = False) -> CountingCollator:
    """Count tokens, and pick the batch layout the model's attention can keep apart. Batches are
    ``padding_free`` (a batch of examples, or of packed rows, flattened into one sequence) unless the
    trainer is TRL's padded default:

    - per-example attention (bezoar_segments) and ``shared_prefix``: one flat sequence per batch
      with shared prompt prefixes computed once (SharedPrefixCollator);
    - FlashAttention varlen or bezoar_segments: TRL's flattened padding-free batches;
    - any other attention: rows (an example, or a packed row of examples) padded to the longest,
      with a block-diagonal mask from the restarting position ids (PackedRowsCollator).
    """
    from .attention import NAME, keeps_examples_apart

    inner = trainer.data_collator
    attn = getattr(trainer.model.config, "_attn_implementation", None)
    pad = trainer.processing_class.pad_token_id
    if padding_free and shared_prefix and attn == NAME:
        inner = SharedPrefixCollator(pad_token_id=pad)
    elif padding_free and not keeps_examples_apart(attn):
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
    data_sha256: str | None = None  # the rows trained on (data_digest)

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
            "real_token_fraction": round((self.real_tokens - self.shared_tokens) / self.total_tokens, 4)
            if self.total_tokens
            else None,
            # example tokens covered by a shared prompt prefix computed once per batch
            "shared_prefix_tokens": self.shared_tokens,
            "tokens_per_second": round(tps, 2) if tps else None,
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_memory": self.memory_kind,
            "train_data_sha256": self.data_sha256,
        }


def whole_run(metrics_path: Path) -> tuple[float | None, float | None, dict[str, float]]:
    """(mean training loss over every step, the last step's loss, the counters of the last checkpoint)
    from the stage's metrics.jsonl, which a resume restores up to its checkpoint and then extends: so
    the figures cover the whole run, across resumes, not only the steps since the last one."""
    per_step: dict[int, float] = {}
    progress: dict[str, float] = {}
    if metrics_path.is_file():
        for line in metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("event") == PROGRESS:
                progress = {k: float(rec[k]) for k in PROGRESS_KEYS if isinstance(rec.get(k), int | float)}
            elif isinstance(rec.get("step"), int) and isinstance(rec.get("loss"), int | float) and "event" not in rec:
                per_step[rec["step"]] = float(rec["loss"])  # a step logged again after a resume: the last one
    if not per_step:
        return None, None, progress
    return sum(per_step.values()) / len(per_step), per_step[max(per_step)], progress


PROGRESS_KEYS = ("real_tokens", "total_tokens", "shared_tokens", "train_seconds")


def data_digest(dataset: Any) -> str | None:
    """sha256 of the rows a trainer trains on, in their order: every column of integers (token ids, masks),
    booleans or text; columns of floats are values computed from the rows (DPO's precomputed reference
    log-probabilities), which need not repeat bit for bit. None for anything but an in-memory
    ``datasets.Dataset`` (a stream is not hashed)."""
    import hashlib

    try:
        from datasets import Dataset
    except ImportError:  # pragma: no cover - the training extra installs it
        return None
    if not isinstance(dataset, Dataset):
        return None
    h = hashlib.sha256(f"rows {len(dataset)}\n".encode())
    for table in dataset.with_format("arrow").iter(batch_size=8192):
        for name in sorted(table.column_names):
            col = table.column(name)
            if _floating(col.type):
                continue
            h.update(f"{name}:{col.type}\n".encode())
            for chunk in col.chunks:
                _hash_array(h, chunk)
    return h.hexdigest()


def _floating(tp: Any) -> bool:
    import pyarrow as pa

    while pa.types.is_list(tp) or pa.types.is_large_list(tp) or pa.types.is_fixed_size_list(tp):
        tp = tp.value_type
    return bool(pa.types.is_floating(tp))


def _hash_array(h: Any, arr: Any) -> None:
    """Hash an Arrow array by its values (not its buffers, which a slice shares with rows outside it)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    h.update(arr.is_null().to_numpy(zero_copy_only=False).tobytes())
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        h.update(pc.list_value_length(arr).fill_null(-1).to_numpy(zero_copy_only=False).astype("int64").tobytes())
        _hash_array(h, arr.flatten())
    elif pa.types.is_integer(arr.type) or pa.types.is_boolean(arr.type):
        filled = arr.fill_null(False if pa.types.is_boolean(arr.type) else 0)
        h.update(filled.to_numpy(zero_copy_only=False).astype("int64").tobytes())
    else:
        h.update(json.dumps(arr.to_pylist(), sort_keys=True, default=str).encode())


class TrainedTokens:
    """The token counters of the batches the trainer trained on. Each batch carries its own counts (under
    ``KEY``, taken off before the step sees it), because the batches the collator builds are not the ones
    trained: the training dataloader (accelerate's DataLoaderShard) collates one batch ahead of the step that
    uses it, so the collator's running totals include, at a checkpoint, the first batch of the next step (which
    the resumed run collates and counts again) and, at the end of training, a batch never trained (per rank).
    And with ``dataloader_num_workers`` above 0 the collator runs in worker processes, whose counters this
    process never sees: only what travels with a batch reaches it."""

    KEYS = ("real_tokens", "total_tokens", "shared_tokens")
    KEY = "bezoar_token_counts"

    def __init__(self, trainer: Any, counter: CountingCollator):
        self.counter = counter
        self.trained = dict.fromkeys(self.KEYS, 0)
        self._collate = trainer.data_collator
        trainer.data_collator = self
        step = trainer.training_step

        def training_step(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            counts = inputs.pop(self.KEY, None)
            if counts is not None:
                for k, v in zip(self.KEYS, counts, strict=True):
                    self.trained[k] += int(v)
            return step(model, inputs, *args, **kwargs)

        trainer.training_step = training_step

    def _counts(self) -> tuple[int, ...]:
        return tuple(int(getattr(self.counter, k)) for k in self.KEYS)

    def __call__(self, examples: list[dict[str, Any]]) -> Any:
        before = self._counts()
        batch = self._collate(examples)
        batch[self.KEY] = tuple(a - b for a, b in zip(self._counts(), before, strict=True))
        return batch


def _finished_state(checkpoint: Path) -> dict[str, Any] | None:
    """The trainer state of a checkpoint taken at the end of training, else None. (The Trainer,
    resumed from its final checkpoint, would run one step past max_steps.)"""
    path = checkpoint / "trainer_state.json"
    if not path.is_file():
        return None
    state: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return state if state.get("max_steps") and state.get("global_step", 0) >= state["max_steps"] else None


def train(
    stage: str,
    trainer: Any,
    counter: CountingCollator,
    ckpts: StoreCheckpoints,
    output_dir: Path,
    adapter_dir: Path,
    metrics_path: Path,
    cuda: bool,
    stop_requested: Callable[[], bool],
    record: Callable[[dict[str, Any]], None],
) -> TrainResult:
    """Resume if a complete checkpoint exists, train with store checkpoints, save the adapter into
    ``adapter_dir``. ``stop_requested``: whether SIGTERM arrived (save, stop, raise Interrupted);
    ``record``: write one metrics record."""
    output_dir.mkdir(parents=True, exist_ok=True)
    prior: dict[str, float] = {}
    session = {"t0": time.time()}

    me = world()
    trained = TrainedTokens(trainer, counter)

    def progress() -> dict[str, float]:
        # in a group each rank counts its own batches: the tokens are summed over the ranks (a collective:
        # every rank calls this at the same checkpoint), the seconds are this rank's
        tokens = dist.sum_ranks({k: float(v) for k, v in trained.trained.items()})
        now = {**tokens, "train_seconds": time.time() - session["t0"]}
        return {k: prior.get(k, 0.0) + now[k] for k in PROGRESS_KEYS}

    callback = CheckpointCallback(stage, ckpts, metrics_path, stop_requested, record, progress)
    trainer.add_callback(callback)
    # a checkpoint resumes only on the rows it was written for: its data position counts rows of that data (a
    # data source can change under the same recipe: a local file, an unpinned hub dataset). In a group every
    # rank must hold the same rows: the sampler shards one index space, so another rank's rows would be
    # trained on silently
    digest = data_digest(trainer.train_dataset)
    if me.distributed:
        digests = dist.gather(digest)
        if len(set(digests)) > 1:
            by_rank = ", ".join(str(d)[:12] for d in digests)
            raise RetryableError(f"{stage}: the ranks built different training data (row digests by rank: {by_rank}); "
                                 "did the data source change while they read it?")
    ckpts.bind_data(digest)
    if me.distributed and not me.zero:
        dist.barrier()  # rank 0 deletes partial checkpoints first; then every rank takes the same one
    restored = ckpts.restore(output_dir, metrics_out=metrics_path, world_size=me.size, cleaner=me.zero)
    if me.distributed and me.zero:
        dist.barrier()
    if me.distributed:  # one checkpoint for all: a file damaged in one rank's download sent it to an older one
        steps = dist.gather(restored[0] if restored else None)
        if len(set(steps)) > 1:
            raise RetryableError(f"{stage}: the ranks resumed from different checkpoints (steps by rank: {steps}); "
                                 "a rerun resumes them from one")
    prior.update(whole_run(metrics_path)[2])  # what the sessions before this one did
    resume_path = None
    if restored:
        step, resume_path = restored
        log.info("%s: resuming from the checkpoint at step %d (%s)", stage, step, ckpts.url(step))
        record({"stage": stage, "event": "resumed", "step": step})
    else:
        log.info("%s: no complete checkpoint: training from step 0", stage)
    if stop_requested():
        raise Interrupted(f"{stage}: stopped by SIGTERM; progress is saved under _work/")
    mem_kind = "CUDA max allocated" if cuda else "process max RSS"
    done = _finished_state(resume_path) if resume_path else None
    if done is not None and resume_path is not None:
        # killed after the last checkpoint but before the commit: nothing left to train
        log.info("%s: the checkpoint at step %d ends the training: merging it", stage, done["global_step"])
        mean, last, _ = whole_run(metrics_path)
        losses = [h["loss"] for h in done.get("log_history", []) if "loss" in h]
        return TrainResult(
            steps=int(done["global_step"]), final_loss=last if last is not None else float(losses[-1]) if losses
            else None, train_loss=mean, runtime_s=prior.get("train_seconds", 0.0),
            resumed_from=int(done["global_step"]), real_tokens=int(prior.get("real_tokens", 0)),
            total_tokens=int(prior.get("total_tokens", 0)), shared_tokens=int(prior.get("shared_tokens", 0)),
            peak_memory_bytes=peak_memory_bytes(cuda), adapter_dir=resume_path, memory_kind=mem_kind,
            data_sha256=digest,
        )
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
    session["t0"] = time.time()
    trainer.train(resume_from_checkpoint=str(resume_path) if resume_path else None)
    if stop_requested() or callback.stopped_at is not None:
        at = callback.stopped_at if callback.stopped_at is not None else trainer.state.global_step
        raise Interrupted(f"{stage}: stopped by SIGTERM; checkpoint at step {at} is in _work/checkpoints/")
    total = progress()  # every rank (a collective in a group)
    save_adapter(trainer, adapter_dir, me.zero)
    # over the whole run, every session's steps and tokens (HF's own training_loss and counters only
    # see the steps of this process)
    mean, last, _ = whole_run(metrics_path)
    result = TrainResult(
        steps=int(trainer.state.global_step),
        final_loss=last,
        train_loss=mean,
        runtime_s=total["train_seconds"],
        resumed_from=restored[0] if restored else None,
        real_tokens=int(total["real_tokens"]),
        total_tokens=int(total["total_tokens"]),
        shared_tokens=int(total["shared_tokens"]),
        peak_memory_bytes=peak_memory_bytes(cuda),
        adapter_dir=adapter_dir,
        memory_kind=mem_kind,
        data_sha256=digest,
    )
    if result.steps < 1:
        raise BadInput(f"{stage}: training ran 0 optimizer steps (too few examples for the batch size?)")
    return result


def save_adapter(trainer: Any, adapter_dir: Path, zero: bool) -> None:
    """Save the trained adapter. DDP: the same on every rank, rank 0 writes it. FSDP: each rank holds a shard,
    so every rank calls the Trainer's save_model, which gathers the full state dict (a collective) and writes
    it on rank 0."""
    if getattr(trainer, "is_fsdp_enabled", False):
        trainer.save_model(str(adapter_dir))
    elif zero:
        trainer.model.save_pretrained(str(adapter_dir))


def release() -> None:
    """Free memory once the caller dropped trainer and model (the merge reloads the base in float32)."""
    from ..models import release_memory

    release_memory()


def push_to_hub(token: str, repo: str, private: bool, model_dir: Path, message: str,
                data_repos: dict[str, Path] | None = None) -> dict[str, str]:
    """Upload a merged checkpoint to ``repo`` and, for each ``{dataset repo: directory}``, the
    training data. Production only (needs the hub)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repos = {}
    api.create_repo(repo, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(model_dir), repo_id=repo, commit_message=message)
    repos["model"] = repo
    for drepo, d in (data_repos or {}).items():
        api.create_repo(drepo, repo_type="dataset", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(d), repo_id=drepo, repo_type="dataset")
        repos[f"data:{d.parent.name}"] = drepo
    return repos
