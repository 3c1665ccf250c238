"""The run layout's names, in one place (README.md, "What a run looks like").

```
<run>/recipe.yaml                 the run's recipe, frozen when the run starts
<run>/<stage>/_MANIFEST.json      written last: the stage is committed
<run>/<stage>/_work/              in-progress records and checkpoints (never read as output)
<run>/_cache/<namespace>/         teacher/judge answers by request hash
<run>/_leases/<name>.json         who is running a stage (or the run) right now: one writer each
<run>/_damaged/<stage>/<time>/    what `bezoar repair` moved aside (a damaged manifest, its files)
<run>/_control/cancelled.json     `bezoar cancel` was here: every controller of the run stops
<run>/_control/status.json        what the Kubernetes controller sees (Pending, Unschedulable, Kueue)
<run>/_control/teacher-shares/    which pods sharing the teacher are done with it (llm/budget.py)
```
Every path is relative to the run (see :mod:`bezoar_jobs.store`).
"""

from __future__ import annotations

RECIPE_FILE = "recipe.yaml"
MANIFEST = "_MANIFEST.json"
WORK_DIR = "_work"
CACHE_DIR = "_cache"
LEASE_DIR = "_leases"
DAMAGED_DIR = "_damaged"
RUN_LEASE = "run"  # the lease `bezoar run` holds on the whole run (stage names never clash with it)
CANCELLED_FILE = "_control/cancelled.json"
CONTROLLER_STATUS_FILE = "_control/status.json"


def manifest_path(stage: str) -> str:
    return f"{stage}/{MANIFEST}"


def work_prefix(stage: str) -> str:
    """``<stage>/_work`` (no trailing slash)."""
    return f"{stage}/{WORK_DIR}"


def is_work_path(rel: str, stage: str) -> bool:
    return rel.startswith(work_prefix(stage) + "/")


def lease_path(name: str) -> str:
    return f"{LEASE_DIR}/{name}.json"
