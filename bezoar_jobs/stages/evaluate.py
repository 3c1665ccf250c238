"""What the evaluation stages share (eval-harness: stages/eval_harness.py; eval-mtbench:
stages/eval_mtbench.py).

Both evaluate the same models (``evaluation.checkpoints`` and ``evaluation.baselines``, see
:mod:`bezoar_jobs.eval.targets`) one at a time, so only one model is in memory, and both save each
model's finished result under ``_work/`` before moving on: an interrupted stage resumes with the
models it had not finished (a model whose weights changed since is evaluated again).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..runner import StageContext, StageOutput

log = logging.getLogger("bezoar")


def free() -> None:
    """Return the memory of the model the caller just dropped (``del``) before the next one loads."""
    from ..models import release_memory

    release_memory()


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")


def skipped(ctx: StageContext, what: str) -> StageOutput:
    write_json(ctx.out / "results" / "summary.json", {"skipped": True, "reason": f"evaluation.{what}.enabled is false"})
    log.info("%s: evaluation.%s.enabled is false: nothing evaluated", ctx.name, what)
    return StageOutput(counts={"models": 0, "skipped": True})
