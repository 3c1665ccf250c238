"""Local disk of a stage pod, sized from the model (``ephemeralStorage: auto``).

A pod's ephemeral storage is its container's writable layer plus its emptyDirs (``/tmp``,
``/scratch``, ``/cache``); the kubelet evicts a pod that goes over its limit, and a request larger
than any node's allocatable disk never schedules. A blanket figure is wrong both ways (200Gi does not
fit many GPU nodes; 20Gi does not hold a 7B checkpoint twice), so ``auto`` computes it from what the
stage keeps on disk at its peak:

    W         = ceil(params x 2 bytes) GiB   one full checkpoint in 16-bit safetensors (what is downloaded
                                             and what a merge writes; 4-bit quantization happens in GPU memory)
    data      = 10 GiB + W                   seeds, records, caches; W for an in-process teacher or judge of
                                             the student's size (the demo); a remote teacher needs none
    train     = 10 GiB + 2 W + ceil(0.1 W x keep_checkpoints)
                                             the base (or previous stage's) checkpoint, the merged output,
                                             and the kept resume checkpoints (LoRA adapter + optimizer state,
                                             under 10 % of W each at r <= 64)
    eval      = 10 GiB + W x targets         every evaluated checkpoint (the recipe's evaluation.checkpoints
                                             plus its baselines; 4 when the recipe is not known)
    report    = 5 GiB                        results files and the rendered report

``params`` is ``sizing.modelParamsB`` of the cluster settings (3.4 for OpenLLaMA-3B: W = 7 GiB, so
data 17Gi, train 26Gi, eval 38Gi). The 10 GiB covers the pip/Hub/torch caches, datasets and logs.
Set ``ephemeralStorage`` to a quantity to override.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .cluster import ClusterSettings, stage_family

if TYPE_CHECKING:
    from ..recipe import Recipe

GIB = 1024**3
OVERHEAD_GIB = 10
REPORT_GIB = 5
DEFAULT_EVAL_TARGETS = 4
DEFAULT_KEEP_CHECKPOINTS = 2


def weights_gib(params_b: float) -> int:
    """GiB of one 16-bit checkpoint of ``params_b`` billion parameters, rounded up."""
    return max(1, math.ceil(params_b * 1e9 * 2 / GIB))


def eval_targets(recipe: Recipe | None) -> int:
    if recipe is None:
        return DEFAULT_EVAL_TARGETS
    ev = recipe.evaluation
    return max(1, len(ev.checkpoints) + len(getattr(ev, "baselines", ()) or ()))


def auto_gib(family: str, params_b: float, *, targets: int = DEFAULT_EVAL_TARGETS,
             keep_checkpoints: int = DEFAULT_KEEP_CHECKPOINTS) -> int:
    """The formula of the module docstring, in GiB."""
    w = weights_gib(params_b)
    if family == "data":
        return OVERHEAD_GIB + w
    if family == "train":
        return OVERHEAD_GIB + 2 * w + math.ceil(0.1 * w * max(1, keep_checkpoints))
    if family == "eval":
        return OVERHEAD_GIB + w * max(1, targets)
    if family == "report":
        return REPORT_GIB
    raise ValueError(f"unknown pod family {family!r}")


def ephemeral_storage(stage: str, cluster: ClusterSettings, recipe: Recipe | None = None) -> str:
    """The stage pod's ephemeral-storage quantity: the settings' value, or the formula for ``auto``."""
    value = cluster.scheduling_for(stage).ephemeralStorage
    if value != "auto":
        return value
    keep = DEFAULT_KEEP_CHECKPOINTS
    if recipe is not None:
        keep = int(getattr(recipe.training, "keep_checkpoints", keep) or keep)
    gib = auto_gib(stage_family(stage), cluster.sizing.modelParamsB, targets=eval_targets(recipe),
                   keep_checkpoints=keep)
    return f"{gib}Gi"
