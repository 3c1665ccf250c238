"""Experiment trackers a training stage reports to (``training.report_to``), beside its metrics.jsonl.

The HF Trainer's own integrations do the logging (only on the group's rank 0); this module points
them at the stage and names the run, through their documented environment variables, before the
trainer is built, and closes them before the commit:

- ``tensorboard``: event files under the stage's ``tensorboard/`` (committed with it);
- ``wandb``: one run per stage attempt, named after the stage, grouped by the bezoar run id, tagged
  ``run:<id>`` and ``stage:<stage>``, project ``WANDB_PROJECT`` (default ``bezoar``). Without
  ``WANDB_MODE`` or ``WANDB_API_KEY`` in the environment it runs offline and its files (``wandb/``) are
  committed with the stage, to ``wandb sync`` later; online it goes to the server as usual;
- ``mlflow``: one run per stage attempt, named after the stage, tagged ``bezoar.run_id`` and
  ``bezoar.stage``, in the experiment ``MLFLOW_EXPERIMENT_NAME`` (default: the recipe's name), on the
  tracking server of ``MLFLOW_TRACKING_URI``, or in a local file store under the stage's ``mlruns/``
  (committed with it) when none is set.

Whatever the user already set in the environment wins. The trackers' own files under the stage's
output are complete before the commit (:func:`close`): the committed copy is of the attempt that
committed (a resumed stage starts a new tracker run; its metrics.jsonl covers every attempt).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path


def configure(report_to: Iterable[str], out: Path, run_id: str, stage: str, experiment: str) -> dict[str, str]:
    """Set the trackers' environment for this stage process; returns what was set (for the log)."""
    wanted = set(report_to)
    env: dict[str, str] = {}
    if "tensorboard" in wanted:
        env["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")
    if "wandb" in wanted:
        if not os.environ.get("WANDB_MODE") and not os.environ.get("WANDB_API_KEY"):
            env["WANDB_MODE"] = "offline"  # no server to reach: the run's files are committed with the stage
            env["WANDB_DIR"] = os.environ.get("WANDB_DIR") or str(out)
        env["WANDB_PROJECT"] = os.environ.get("WANDB_PROJECT") or "bezoar"
        env["WANDB_RUN_GROUP"] = os.environ.get("WANDB_RUN_GROUP") or run_id
        env["WANDB_TAGS"] = ",".join(t for t in (os.environ.get("WANDB_TAGS"), f"run:{run_id}", f"stage:{stage}") if t)
        env["WANDB_SILENT"] = os.environ.get("WANDB_SILENT") or "true"
    if "mlflow" in wanted:
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            env["MLFLOW_TRACKING_URI"] = (out / "mlruns").as_uri()
            # MLflow 3 keeps its file store in maintenance mode and refuses it unless asked: a stage's own
            # store, committed with it, is what we want (`mlflow migrate-filestore` moves it to a database)
            env["MLFLOW_ALLOW_FILE_STORE"] = os.environ.get("MLFLOW_ALLOW_FILE_STORE") or "true"
        env["MLFLOW_EXPERIMENT_NAME"] = os.environ.get("MLFLOW_EXPERIMENT_NAME") or experiment
        tags = json.loads(os.environ.get("MLFLOW_TAGS") or "{}")
        env["MLFLOW_TAGS"] = json.dumps({**tags, "bezoar.run_id": run_id, "bezoar.stage": stage})
    os.environ.update(env)
    return env


def close(report_to: Iterable[str], out: Path) -> None:
    """Finish the trackers that outlive the trainer, so their files under ``out`` are complete before the
    commit (wandb ends its run at exit otherwise); drop the convenience symlinks wandb leaves (a commit
    holds files only)."""
    if "wandb" in set(report_to):
        import wandb

        if wandb.run is not None:
            wandb.finish()
        root = out / "wandb"
        if root.is_dir():
            for p in sorted(root.rglob("*"), reverse=True):
                if p.is_symlink():
                    p.unlink()
