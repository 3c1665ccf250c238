"""Runs one stage in this process: the body of ``bezoar stage NAME``.

The contract (../DESIGN): a committed stage returns at once; otherwise the stage function writes
its outputs into a local directory, this module uploads them and writes the manifest last. A stage
function receives a :class:`StageContext` and returns a :class:`StageOutput`.

Exit codes: 0 committed, 2 bad input, anything else retryable (see errors.py).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BadInput, Interrupted
from .manifest import CommitInfo, commit, manifest_hash, read_manifest
from .pipeline import spec, stage_inputs
from .recipe import Recipe
from .recipe_training import TRAINING_STAGE_PARAMS
from .store import Store

log = logging.getLogger("bezoar")

# stage -> "module:function"
STAGE_FUNCS: dict[str, str] = {
    "generate-lamini": "bezoar_jobs.stages.generate:run_lamini",
    "generate-evol": "bezoar_jobs.stages.generate:run_evol",
    "generate-orca": "bezoar_jobs.stages.generate:run_orca",
    "filter-lamini": "bezoar_jobs.stages.filter:run_filter",
    "filter-evol": "bezoar_jobs.stages.filter:run_filter",
    "filter-orca": "bezoar_jobs.stages.filter:run_filter",
    "sft-lamini": "bezoar_jobs.stages.sft:run_sft",
    "sft-evol": "bezoar_jobs.stages.sft:run_sft",
    "sft-orca": "bezoar_jobs.stages.sft:run_sft",
    "sft-hh": "bezoar_jobs.stages.sft:run_sft",
    "dpo": "bezoar_jobs.stages.dpo:run_dpo",
    "eval-harness": "bezoar_jobs.stages.evaluate:run_harness",
    "eval-mtbench": "bezoar_jobs.stages.evaluate:run_mtbench",
    "report": "bezoar_jobs.stages.report:run_report",
}

# stage -> the recipe fields (dotted) it reads; their hash is the stage's parameter key
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "generate-lamini": ("seed", "teacher", "seeds.dolly", "generation.lamini"),
    "generate-evol": ("seed", "teacher", "judge", "seeds.dolly", "generation.evol"),
    "generate-orca": ("seed", "teacher", "seeds.flan", "generation.orca"),
    "filter-lamini": ("seed", "judge", "filter"),
    "filter-evol": ("seed", "judge", "filter"),
    "filter-orca": ("seed", "judge", "filter"),
    **TRAINING_STAGE_PARAMS,
    "eval-harness": ("seed", "student", "evaluation.checkpoints", "evaluation.baselines", "evaluation.dtype",
                     "evaluation.device", "evaluation.harness"),
    "eval-mtbench": ("seed", "student", "judge", "evaluation.checkpoints", "evaluation.baselines", "evaluation.dtype",
                     "evaluation.device", "evaluation.mtbench"),
    "report": ("report",),
}


# Families whose _work/ survives --force: their records are paid-for teacher and judge answers,
# keyed by the parameter hash, so a forced rerun re-parses and re-filters without paying again.
KEEP_WORK_ON_FORCE = frozenset({"generate", "filter"})


def params_hash(recipe: Recipe, stage: str) -> str:
    return recipe.section_hash(*STAGE_PARAMS[stage])


class WorkArea:
    """``<run>/<stage>/_work/``: in-progress records and checkpoints, never read as output."""

    def __init__(self, store: Store, stage: str):
        self.store = store
        self.prefix = f"{stage}/_work"

    def rel(self, name: str) -> str:
        return f"{self.prefix}/{name.lstrip('/')}"

    def put_bytes(self, name: str, data: bytes) -> None:
        self.store.write_bytes(self.rel(name), data)

    def get_bytes(self, name: str) -> bytes:
        return self.store.read_bytes(self.rel(name))

    def exists(self, name: str) -> bool:
        return self.store.exists(self.rel(name))

    def list(self, sub: str = "") -> list[str]:
        base = self.rel(sub) if sub else self.prefix + "/"
        n = len(self.prefix) + 1
        return [r[n:] for r in self.store.list(base)]

    def delete(self, name: str) -> None:
        self.store.delete(self.rel(name))

    def clear(self) -> None:
        self.store.delete_prefix(self.prefix + "/")

    def upload_dir(self, local: Path, name: str) -> None:
        self.store.upload_dir(local, self.rel(name))

    def download_dir(self, name: str, local: Path) -> None:
        self.store.download_dir(self.rel(name), local)


@dataclass
class StageContext:
    name: str
    recipe: Recipe
    store: Store
    out: Path  # local directory: everything written here is committed under <run>/<stage>/
    scratch: Path  # local scratch directory, deleted afterwards
    work: WorkArea
    shard: tuple[int, int] | None = None
    log: logging.Logger = log
    _stop: dict = field(default_factory=lambda: {"flag": False})

    @property
    def run_uri(self) -> str:
        return self.store.uri

    def stop_requested(self) -> bool:
        return self._stop["flag"]

    def check_stop(self) -> None:
        if self._stop["flag"]:
            raise Interrupted(f"{self.name}: stopped by SIGTERM; progress is saved under _work/")

    def input_manifest(self, stage: str) -> dict[str, Any]:
        m = read_manifest(self.store, stage)
        if m is None:
            raise BadInput(f"{self.name}: input stage {stage!r} is not committed in {self.store.uri}")
        return m

    def fetch_input(self, stage: str, sub: str) -> Path:
        """Download the committed ``<run>/<stage>/<sub>/`` (only files its manifest lists)."""
        m = self.input_manifest(stage)
        dest = self.scratch / "inputs" / stage / sub
        wanted = [rel for rel in m["files"] if rel == sub or rel.startswith(sub.rstrip("/") + "/")]
        if not wanted:
            raise BadInput(f"{self.name}: input stage {stage!r} has no {sub}/ in its manifest")
        for rel in wanted:
            self.store.download_file(f"{stage}/{rel}", self.scratch / "inputs" / stage / rel)
        return dest

    def metrics(self, record: dict[str, Any]) -> None:
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")


@dataclass
class StageOutput:
    counts: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # manifest extras: models, revisions, tokens
    committed: bool = True  # False for a shard run: only _work/ was written


def stage_function(name: str):
    mod, _, fn = STAGE_FUNCS[spec(name).name].partition(":")
    return getattr(importlib.import_module(mod), fn)


def input_hashes(store: Store, name: str, recipe: Recipe | None = None) -> dict[str, str]:
    out = {}
    for inp in stage_inputs(name, recipe):
        m = read_manifest(store, inp)
        if m is None:
            raise BadInput(f"{name}: input stage {inp!r} is not committed in {store.uri}")
        out[inp] = manifest_hash(m)
    return out


def up_to_date(store: Store, recipe: Recipe, name: str) -> tuple[bool, str]:
    """Whether the committed output of ``name`` matches the recipe and inputs, and why not."""
    m = read_manifest(store, name)
    if m is None:
        return False, "not committed"
    if m.get("params_hash") != params_hash(recipe, name):
        return False, "recipe parameters changed"
    if name == "report":  # its inputs are every committed stage, not declared ones
        from .stages.report import report_is_current

        return report_is_current(store, m)
    for inp in stage_inputs(name, recipe):
        im = read_manifest(store, inp)
        if im is None:
            return False, f"input {inp} not committed"
        if m.get("inputs", {}).get(inp) != manifest_hash(im):
            return False, f"input {inp} changed"
    return True, "committed, parameters and inputs unchanged"


def _install_sigterm(flag: dict) -> Any:
    def handler(signum, frame):
        flag["flag"] = True
        log.warning("SIGTERM received: finishing the current step, saving progress, then exiting")

    return signal.signal(signal.SIGTERM, handler)


def run_stage(name: str, recipe: Recipe, store: Store, shard: tuple[int, int] | None = None, force: bool = False) -> int:
    """Run one stage to commit. Returns the exit code; exceptions map to codes in the CLI."""
    spec(name)
    if not force and shard is None:
        ok, why = up_to_date(store, recipe, name)
        if ok:
            log.info("%s: already committed (%s)", name, why)
            return 0
    if force and shard is None:
        if read_manifest(store, name) is not None:
            store.delete(f"{name}/_MANIFEST.json")
        if spec(name).family not in KEEP_WORK_ON_FORCE:
            # a forced rerun recomputes: training restarts from its base model, evaluation re-scores
            WorkArea(store, name).clear()
    inputs = input_hashes(store, name, recipe)
    fn = stage_function(name)
    tmp = Path(tempfile.mkdtemp(prefix=f"bezoar-{name}-", dir=os.environ.get("BEZOAR_SCRATCH")))
    out, scratch = tmp / "out", tmp / "scratch"
    out.mkdir()
    scratch.mkdir()
    ctx = StageContext(name=name, recipe=recipe, store=store, out=out, scratch=scratch, work=WorkArea(store, name), shard=shard)
    prev = _install_sigterm(ctx._stop)
    t0 = time.time()
    try:
        result: StageOutput = fn(ctx)
        ctx.check_stop()
        if not result.committed:
            log.info("%s: shard %s/%s done (records under _work/)", name, *(shard or (0, 1)))
            return 0
        info = CommitInfo(
            stage=name,
            params_hash=params_hash(recipe, name),
            inputs=inputs,
            counts=result.counts,
            timings={"started": t0, "seconds": round(time.time() - t0, 3)},
            extra={"recipe_name": recipe.name, **result.extra},
        )
        commit(store, out, info)
        log.info("%s: committed to %s", name, store.url(name))
        return 0
    finally:
        signal.signal(signal.SIGTERM, prev)
        shutil.rmtree(tmp, ignore_errors=True)


def iter_stage_names() -> Iterator[str]:
    yield from STAGE_FUNCS


RECIPE_FILE = "recipe.yaml"


def freeze_recipe(store: Store, text: str, source: str = "<recipe>") -> None:
    """Write the recipe into ``<run>/recipe.yaml`` when the run starts.

    Every stage of a run reads this frozen copy, so concurrent runs never share a mutable file. A
    run that already has a different frozen recipe keeps running with the new one only when the
    caller asked for it (``bezoar run`` refreezes: changed parameters then make the affected
    stages rerun, which is what the parameter hashes are for).
    """
    from .recipe import parse_recipe

    parse_recipe(text, source)  # never freeze an invalid recipe
    store.write_text(RECIPE_FILE, text)
