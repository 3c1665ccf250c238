"""Which models an evaluation stage evaluates, and where each one's weights come from.

A target is the base model (the recipe's student), a training stage's committed ``model/``, or a
baseline the recipe adds (e.g. the released SurgeGlobal checkpoints). Each has an ``identity``:
what its weights are (the stage's manifest hash, or the model reference and revision). An
evaluation stage keys its per-model progress in ``_work/`` by the stage's parameters and this
identity, so a resumed stage reuses exactly the finished models whose weights did not change.

A hub model whose recipe revision is not a commit (null: the default branch, or a branch or tag) is
pinned here to the commit it points at when the stage starts: that commit is what is downloaded and
loaded, what the results, the manifest and the recorded ``lm_eval`` command name, and part of the
identity (a branch that moved between two attempts is evaluated again, not taken from ``_work/``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BadInput
from ..manifest import manifest_hash
from ..recipe_eval import BASE
from ..training.types import Model, Tokenizer

if TYPE_CHECKING:
    from ..runner import StageContext

log = logging.getLogger("bezoar")


@dataclass(frozen=True)
class Target:
    label: str  # row name in results and the report: base, sft-evol, ..., or a baseline's name
    kind: str  # base | checkpoint | baseline
    model: str  # reference: student model, "<stage>/model", or the baseline's model
    revision: str | None
    identity: str  # what the weights are (see the module docstring)
    trust_remote_code: bool = False
    # the recipe's revision where ``revision`` is the commit it was pinned to here (module docstring)
    recipe_revision: str | None = None

    def info(self) -> dict[str, Any]:
        out = {"kind": self.kind, "model": self.model, "revision": self.revision, "identity": self.identity}
        if self.recipe_revision != self.revision:
            out["recipe_revision"] = self.recipe_revision
        return out

    def work_key(self, params_hash: str) -> str:
        """Stable file stem for this model's progress under ``_work/``."""
        digest = hashlib.sha256(f"{params_hash}\0{self.identity}".encode()).hexdigest()[:16]
        return f"{self.label}-{digest}"


def targets(ctx: StageContext) -> list[Target]:
    """The recipe's evaluated models, in report order (checkpoints, then baselines)."""
    r = ctx.recipe
    ev = r.evaluation
    out = []
    for name in r.evaluated_checkpoints():
        if name == BASE:
            s = r.student
            out.append(_outside(BASE, "base", s.model, s.revision, s.trust_remote_code))
        else:
            m = ctx.input_manifest(name)  # BadInput naming the stage when it is not committed
            if "model/config.json" not in m.get("files", {}):
                raise BadInput(
                    f"{ctx.name}: evaluation.checkpoints names {name!r}, whose committed output has no model/"
                )
            out.append(Target(name, "checkpoint", f"{name}/model", None, manifest_hash(m), r.student.trust_remote_code))
    for b in ev.baselines:
        out.append(_outside(b.name, "baseline", b.model, b.revision, b.trust_remote_code))
    return out


def _outside(label: str, kind: str, model: str, revision: str | None, trust_remote_code: bool) -> Target:
    """The base model or a baseline: a hub model at the commit its revision names now (module docstring)."""
    from ..models import pinned_revision

    loaded = pinned_revision(model, revision)
    if loaded != revision:
        log.warning("%s: %s revision %s is not a commit: evaluating commit %s, which the results record "
                    "(pin it in the recipe to make the run reproducible)", label, model, revision or "(default "
                    "branch)", loaded)
    return Target(label, kind, model, loaded, json.dumps({"model": model, "revision": loaded}), trust_remote_code,
                  recipe_revision=revision)


def model_dir(ctx: StageContext, t: Target) -> Path:
    """A local checkpoint directory for the target (downloaded or converted once, as needed)."""
    from ..models import check_model_dir, resolve_model

    if t.kind == "checkpoint":
        stage = t.model.split("/", 1)[0]
        return check_model_dir(ctx.fetch_input(stage, "model"), t.model)
    try:
        return resolve_model(t.model, t.revision, trust_remote_code=t.trust_remote_code)
    except BadInput as e:  # name the recipe field, not only the path
        field = "student.model" if t.kind == "base" else f"evaluation.baselines ({t.label}).model"
        raise BadInput(f"{field}: {e}") from None


def load(ctx: StageContext, t: Target, path: Path | None = None, device: str | None = None) -> tuple[Model, Tokenizer]:
    """(model, tokenizer) of a target (from ``path`` when the caller resolved its directory), in
    eval mode on ``device`` (default: the recipe's evaluation device)."""
    from ..models import load_causal_lm, load_tokenizer

    ev = ctx.recipe.evaluation
    path = path or model_dir(ctx, t)
    tok = load_tokenizer(path, trust_remote_code=t.trust_remote_code)
    model = load_causal_lm(path, ev.dtype, device or ev.device, trust_remote_code=t.trust_remote_code)
    return model, tok


def device_figures(model: Model, seconds: float, processes: int = 1) -> dict[str, Any]:
    """Where a model ran, and GPU-hours when that was a GPU (one device per process; ``processes`` > 1:
    the evaluation was data-parallel, ``device`` is rank 0's)."""
    dev = str(getattr(model, "device", "cpu"))
    gpu = dev.startswith("cuda")
    out: dict[str, Any] = {"device": dev, "gpu_hours": round(processes * seconds / 3600.0, 6) if gpu else 0.0}
    if processes > 1:
        out["data_parallel"] = processes
    return out
