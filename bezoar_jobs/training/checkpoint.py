"""Training checkpoints in the run store, and resuming from them.

Layout: ``<run>/<stage>/_work/checkpoints/step-N/`` holds the HF Trainer's ``checkpoint-N``
directory (adapter, optimizer, scheduler, RNG states, trainer state with the data position) plus
the stage's ``metrics.jsonl`` up to step N. Its ``COMPLETE`` object is written last: a checkpoint
without it is an interrupted upload and is never resumed from (it is deleted on the next start).

``COMPLETE`` holds the stage's *fingerprint* (parameter hash, input manifest hashes, code version,
and the digest of the rows the trainer trains on: :meth:`StoreCheckpoints.bind_data`): a checkpoint
written for other inputs, settings or training data is ignored and deleted, so a changed recipe, or
a data source that changed under the same recipe (a local file, an unpinned hub dataset), never
resumes a stale run (a checkpoint's data position counts rows of the data it was written for).

The upload happens in :meth:`CheckpointCallback.on_save`, right after the Trainer wrote the
checkpoint locally. A stop request (SIGTERM: the callback's ``stop_requested()``) makes the next
step end with a save and a stop; the stage then raises :class:`~bezoar_jobs.errors.Interrupted`
(non-zero exit).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from transformers import TrainerCallback

from ..errors import BadInput
from ..manifest import sha256_file
from ..ranks import world
from ..store_base import NotFoundInStore
from . import dist

log = logging.getLogger("bezoar")

CKPT = "checkpoints"
MARKER = "COMPLETE"
PROGRESS = "progress"  # the metrics event carrying the run's counters at a checkpoint
_STEP = re.compile(r"^step-(\d+)/")


class WorkStore(Protocol):
    """A stage's ``_work/`` area (bezoar_jobs.runner.WorkArea): names are relative to it."""

    def list(self, sub: str = "") -> list[str]: ...
    def get_bytes(self, name: str) -> bytes: ...
    def put_bytes(self, name: str, data: bytes) -> None: ...
    def delete(self, name: str) -> None: ...
    def upload_file(self, local: Path, name: str) -> None: ...
    def download_file(self, name: str, local: Path) -> None: ...
    def url(self, name: str) -> str: ...


class StoreCheckpoints:
    """The stage's checkpoints under ``_work/checkpoints/`` (any run store: local or S3)."""

    def __init__(self, work: WorkStore, fingerprint: dict[str, Any], keep: int = 2):
        self.work = work
        self.fingerprint = fingerprint
        self.keep = max(1, keep)

    def url(self, step: int) -> str:
        return self.work.url(f"{CKPT}/step-{step}")

    def bind_data(self, digest: str | None) -> None:
        """Make the digest of the training rows (:func:`bezoar_jobs.training.run.data_digest`) part of the
        fingerprint: checkpoints written for other rows are not resumed. Call it before :meth:`restore`."""
        if digest is not None:
            self.fingerprint = {**self.fingerprint, "data": digest}

    # -- listing ------------------------------------------------------------------------------
    def _steps(self) -> dict[int, list[str]]:
        """step -> the object names (relative to checkpoints/) stored for it."""
        out: dict[int, list[str]] = {}
        for rel in self.work.list(CKPT + "/"):
            sub = rel[len(CKPT) + 1 :]
            m = _STEP.match(sub)
            if m:
                out.setdefault(int(m.group(1)), []).append(sub)
        return out

    def _marker(self, step: int) -> dict[str, Any] | None:
        try:
            return json.loads(self.work.get_bytes(f"{CKPT}/step-{step}/{MARKER}"))
        except Exception:  # absent or unreadable: not a complete checkpoint
            return None

    def complete_steps(self) -> list[int]:
        """Steps with a COMPLETE marker written for this fingerprint, oldest first."""
        good = []
        for step, names in sorted(self._steps().items()):
            if f"step-{step}/{MARKER}" not in names:
                continue
            marker = self._marker(step)
            if marker and marker.get("fingerprint") == self.fingerprint:
                good.append(step)
        return good

    def _delete_step(self, step: int, names: list[str]) -> None:
        # the marker goes first, so a half-deleted checkpoint is never taken for a complete one
        marker = f"step-{step}/{MARKER}"
        if marker in names:
            self.work.delete(f"{CKPT}/{marker}")
        for sub in names:
            if sub != marker:
                self.work.delete(f"{CKPT}/{sub}")

    def clean(self) -> None:
        """Delete partial checkpoints and those of another fingerprint (run at start)."""
        good = set(self.complete_steps())
        for step, names in self._steps().items():
            if step not in good:
                log.info("checkpoints: deleting step-%d (%s)", step, self._stale_why(step, names))
                self._delete_step(step, names)

    def _stale_why(self, step: int, names: list[str]) -> str:
        if f"step-{step}/{MARKER}" not in names:
            return "incomplete upload"
        theirs = (self._marker(step) or {}).get("fingerprint") or {}
        mine = self.fingerprint
        if "data" in mine and {k: v for k, v in theirs.items() if k != "data"} == \
                {k: v for k, v in mine.items() if k != "data"}:
            return "written for other training data: the data source changed under the same recipe"
        return "written for other inputs or settings"

    def prune(self) -> None:
        """Keep the newest ``keep`` complete checkpoints."""
        good = self.complete_steps()
        steps = self._steps()
        for step in good[: -self.keep]:
            self._delete_step(step, steps.get(step, []))

    # -- upload / download --------------------------------------------------------------------
    def upload_rank_state(self, local: Path, step: int, rank: int) -> dict[str, int]:
        """A rank other than 0 of a group: its own RNG state (``rng_state_<rank>.pth``, the only file the
        Trainer writes on that rank) beside rank 0's checkpoint, before rank 0 writes the marker."""
        files: dict[str, int] = {}
        for path in sorted(Path(local).glob(f"rng_state_{rank}.pth")):
            self.work.upload_file(path, f"{CKPT}/step-{step}/trainer/{path.name}")
            files[f"trainer/{path.name}"] = path.stat().st_size
        return files

    def upload(self, local: Path, step: int, metrics: Path | None = None, world_size: int = 1,
               other_ranks: dict[str, int] | None = None) -> None:
        """Upload rank 0's checkpoint and write the marker last; ``other_ranks``: files the other ranks of
        the group uploaded for this step (their RNG states), listed in the marker with rank 0's."""
        t0 = time.time()
        prefix = f"{CKPT}/step-{step}"
        files: dict[str, int] = dict(other_ranks or {})
        sums: dict[str, str] = {}  # rank 0's files: checked end to end when restored
        for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            rel = path.relative_to(local).as_posix()
            self.work.upload_file(path, f"{prefix}/trainer/{rel}")
            files[f"trainer/{rel}"] = path.stat().st_size
            sums[f"trainer/{rel}"] = sha256_file(path)
        if metrics is not None and metrics.is_file():
            self.work.upload_file(metrics, f"{prefix}/metrics.jsonl")
            files["metrics.jsonl"] = metrics.stat().st_size
        marker = {"step": step, "fingerprint": self.fingerprint, "files": files, "sha256": sums, "time": time.time(),
                  "world_size": world_size}
        self.work.put_bytes(f"{prefix}/{MARKER}", json.dumps(marker, sort_keys=True).encode())
        log.info("checkpoint step %d saved to %s (%.1f s)", step, self.work.url(prefix), time.time() - t0)
        self.prune()

    def restore(self, output_dir: Path, metrics_out: Path | None = None, world_size: int = 1,
                cleaner: bool = True) -> tuple[int, Path] | None:
        """Download the newest complete checkpoint into ``output_dir/checkpoint-N``; (N, path). In a group
        every rank downloads the same checkpoint; only the ``cleaner`` (rank 0, before the others list)
        deletes partial ones. A checkpoint written by a group of another size is refused: its data
        position and RNG states belong to that split of the global batch."""
        if cleaner:
            self.clean()
        good = self.complete_steps()
        if not good:
            return None
        newest = self._marker(good[-1]) or {}
        written_by = int(newest.get("world_size", 1))
        if written_by != world_size:
            raise BadInput(
                f"{self.url(good[-1])}: this checkpoint was written by {written_by} training process(es) and this "
                f"attempt runs {world_size}: resume it with the same shape (--nproc-per-node x --nnodes = "
                f"{written_by}), or delete {self.work.url(CKPT)} to start the stage over on {world_size}")
        # the newest checkpoint whose files are whole; a damaged one (a file missing, cut short or changed in
        # the store) is passed over for the one before it, and deleted by the cleaner: it failed every start
        for step in reversed(good):
            marker = self._marker(step) or {}
            if int(marker.get("world_size", 1)) != world_size:
                break
            try:
                dest = self._download(step, marker, Path(output_dir), metrics_out)
            except (DamagedCheckpoint, NotFoundInStore) as e:
                log.warning("checkpoint %s is damaged (%s): %s", self.url(step), e,
                            "deleting it, trying the one before it" if cleaner else "trying the one before it")
                if cleaner:
                    self._delete_step(step, self._steps().get(step, []))
                continue
            return step, dest
        log.warning("%s: no whole checkpoint to resume from: the stage trains from its start", self.work.url(CKPT))
        return None

    def _download(self, step: int, marker: dict[str, Any], output_dir: Path, metrics_out: Path | None) -> Path:
        dest = output_dir / f"checkpoint-{step}"
        shutil.rmtree(dest, ignore_errors=True)
        tmp = output_dir / f".download-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        prefix = f"{CKPT}/step-{step}"
        sums = marker.get("sha256") or {}  # absent in checkpoints written before they were recorded
        try:
            for sub, size in marker.get("files", {}).items():
                target = tmp / sub
                self.work.download_file(f"{prefix}/{sub}", target)
                if target.stat().st_size != size:
                    raise DamagedCheckpoint(f"{sub} has {target.stat().st_size} bytes, expected {size}")
                if sub in sums and sha256_file(target) != sums[sub]:
                    raise DamagedCheckpoint(f"{sub} is not the file that was saved (sha256 differs)")
            (tmp / "trainer").rename(dest)
            if metrics_out is not None and (tmp / "metrics.jsonl").is_file():
                _copy_metrics_upto(tmp / "metrics.jsonl", metrics_out, step)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest


class DamagedCheckpoint(Exception):
    """A complete checkpoint's file is not what its marker lists."""


def _copy_metrics_upto(src: Path, dest: Path, step: int) -> None:
    """Keep the metric records of steps <= ``step`` (what the checkpoint had seen)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(src, encoding="utf-8") as f, open(dest, "w", encoding="utf-8") as out:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step", 0) <= step:
                out.write(line if line.endswith("\n") else line + "\n")


class CheckpointCallback(TrainerCallback):
    """Upload each checkpoint, log every step to metrics.jsonl, stop cleanly on SIGTERM.

    ``stop_requested`` says whether the stage was asked to stop; ``record`` writes one metrics
    record (the stage's metrics.jsonl)."""

    def __init__(self, stage: str, store_ckpts: StoreCheckpoints, metrics_path: Path,
                 stop_requested: Callable[[], bool], record: Callable[[dict[str, Any]], None],
                 progress: Callable[[], dict[str, float]] | None = None):
        self.stage = stage
        # the whole run's counters so far (tokens, training seconds): written beside each checkpoint,
        # so a resumed stage reports figures over every session, not only the last one
        self.progress = progress
        self.ckpts = store_ckpts
        self.metrics_path = metrics_path
        self.stop_requested = stop_requested
        self.record = record
        self.stopped_at: int | None = None
        self.last_logs: dict[str, float] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        # every rank of a group stops at the same step when any of them was asked to (one collective)
        if dist.any_rank(self.stop_requested()) and self.stopped_at is None:
            # save inside the grace period, then leave the training loop; the stage exits non-zero
            log.warning("SIGTERM: saving a checkpoint at step %d and stopping", state.global_step)
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        me = world()
        if me.distributed:
            # every rank: the counters summed over the group, the other ranks' RNG states uploaded, then
            # rank 0 uploads the checkpoint and writes the marker listing them all
            totals = self.progress() if self.progress is not None else None
            mine = {} if me.zero else self.ckpts.upload_rank_state(local, state.global_step, me.rank)
            others = {k: v for files in dist.gather(mine) for k, v in files.items()}
            if me.zero:
                if totals is not None:
                    self.record({"stage": self.stage, "event": PROGRESS, "step": state.global_step, **totals})
                self.ckpts.upload(local, state.global_step, self.metrics_path, me.size, others)
            dist.barrier()  # no rank runs ahead of a checkpoint it may have to resume from
            return control
        if local.is_dir():
            if self.progress is not None:
                self.record({"stage": self.stage, "event": PROGRESS, "step": state.global_step, **self.progress()})
            self.ckpts.upload(local, state.global_step, self.metrics_path)
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        if not logs:
            return control
        rec = {k: float(v) for k, v in logs.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if not rec:
            return control
        self.last_logs.update(rec)
        self.record({"stage": self.stage, "step": state.global_step, **rec})  # -> <out>/metrics.jsonl
        return control
