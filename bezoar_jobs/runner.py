"""Runs one stage in this process: the body of ``bezoar stage NAME``.

The contract (docs/reliability.md, CONTRIBUTING.md "Rules"): a committed stage returns at once;
otherwise the stage function writes its outputs into a local directory, this module uploads them and
writes the manifest last. A stage function receives a :class:`StageContext` and returns a
:class:`StageOutput`. The context's recipe is a view that lets the stage read only the fields its
registry entry declares (:mod:`bezoar_jobs.recipe_view`), so its parameter hash always covers what it
read.

Before anything else the runner takes the stage's lease (:mod:`bezoar_jobs.lease`: one writer per
stage; a second ``bezoar stage`` or ``bezoar run`` of the same stage stops at once, naming the
holder), removes what an interrupted earlier run left half-written (temporary files, unfinished
multipart uploads), and every committed input file a stage fetches is checked against its manifest
(size and sha256) before the stage sees it. Before the commit it checks that it still holds the
lease.

Exit codes: 0 committed, 2 bad input, anything else retryable (see errors.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from .cluster_env import cluster_teacher, teacher_backend, teacher_url
from .device_check import check as check_devices
from .errors import BadInput, Interrupted
from .layout import work_prefix
from .lease import Lease
from .manifest import CommitInfo, DamagedInput, check_against, commit, read_manifest
from .ranks import runs_on_ranks, world
from .recipe_view import view
from .registry import spec
from .source_files import digests, fingerprints
from .state import input_hashes, params_hash, prepare_force, up_to_date
from .store import Store

if TYPE_CHECKING:
    from .recipe import Recipe

log = logging.getLogger("bezoar")


class WorkArea:
    """``<run>/<stage>/_work/``: in-progress records and checkpoints, never read as output."""

    def __init__(self, store: Store, stage: str):
        self.store = store
        self.prefix = work_prefix(stage)

    def rel(self, name: str) -> str:
        return f"{self.prefix}/{name.lstrip('/')}"

    def url(self, name: str) -> str:
        return self.store.url(self.rel(name))

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

    def upload_file(self, local: Path, name: str) -> None:
        self.store.upload_file(local, self.rel(name))

    def download_file(self, name: str, local: Path) -> None:
        self.store.download_file(self.rel(name), local)

    def upload_dir(self, local: Path, name: str) -> None:
        self.store.upload_dir(local, self.rel(name))

    def download_dir(self, name: str, local: Path) -> None:
        self.store.download_dir(self.rel(name), local)


@dataclass
class StageContext:
    """What a stage function gets: its name, the recipe (a view of the fields it declares), the run
    store, a local output directory (everything in it is committed under ``<run>/<stage>/``), a
    scratch directory, its ``_work/`` area, and what the runner already knows: the stage's
    parameter hash and its inputs' manifest hashes."""

    name: str
    recipe: Recipe
    store: Store
    out: Path
    scratch: Path
    work: WorkArea
    params_hash: str = ""
    inputs: dict[str, str] = field(default_factory=dict)
    shard: tuple[int, int] | None = None
    log: logging.Logger = log
    # request phase -> its counts (stages/common.Phase): the manifest's ``requests``
    accounting: dict[str, dict[str, Any]] = field(default_factory=dict)
    # where the recipe's teacher is served, for routing only (a judge on the same server uses its fleet of
    # replicas, llm/fleet.py): not a field the stage declares, and not in its parameter hash
    teacher_url: str | None = None
    teacher_backend: str | None = None  # and the server it runs (a judge on it shares its capacity: llm/budget.py)
    # the sha256 of each local file the stage reads, by recipe field, as it started (source_files.py)
    source_files: dict[str, str] = field(default_factory=dict)
    _stop: dict[str, bool] = field(default_factory=lambda: {"flag": False})

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
        """Download the committed ``<run>/<stage>/<sub>/`` (only files its manifest lists), each checked
        against its manifest (size, sha256) before it is used: a damaged input is refused (exit 2),
        naming the file."""
        m = self.input_manifest(stage)
        dest = self.scratch / "inputs" / stage / sub
        wanted = [rel for rel in m["files"] if rel == sub or rel.startswith(sub.rstrip("/") + "/")]
        if not wanted:
            raise BadInput(f"{self.name}: input stage {stage!r} has no {sub}/ in its manifest")
        for rel in wanted:
            # what it costs: docs/benchmarks.md, "Reading committed inputs"
            size, sha = self.store.fetch_hashed(f"{stage}/{rel}", self.scratch / "inputs" / stage / rel)
            problem = check_against(m["files"][rel], size, sha)
            if problem:
                raise DamagedInput(
                    f"{self.name}: input {self.store.url(f'{stage}/{rel}')}: {problem}: the committed file was changed "
                    f"or damaged after commit; nothing was read from it. Run `bezoar verify --run {self.store.uri}` "
                    f"to see the damage and `bezoar repair --run {self.store.uri}` to move {stage} aside so it "
                    "reruns (`bezoar run` reruns it by itself)")
        return dest

    def metrics(self, record: dict[str, Any]) -> None:
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")


@dataclass
class StageOutput:
    counts: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # manifest extras: models, revisions, tokens
    committed: bool = True  # False for a shard run: only _work/ was written


def requests_summary(accounting: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The manifest's ``requests``: totals over the stage's request phases, and each phase's counts."""
    total: dict[str, Any] = {"needed": 0, "resumed": 0, "asked": 0, "answered": 0, "cached": 0, "retries": 0,
                             "failed": 0, "unparseable": 0, "cut_short": 0}
    by_cause: dict[str, int] = {}
    for st in accounting.values():
        for k in total:
            total[k] += int(st.get(k, 0) or 0)
        for c, n in (st.get("failed_by_cause") or {}).items():
            by_cause[c] = by_cause.get(c, 0) + int(n)
    return {**total, "failed_by_cause": by_cause, "phases": accounting}


def _install_sigterm(flag: dict[str, bool]) -> signal._HANDLER:
    def handler(signum: int, frame: FrameType | None) -> None:
        flag["flag"] = True
        log.warning("SIGTERM received: finishing the current step, saving progress, then exiting")

    return signal.signal(signal.SIGTERM, handler)


def commit_output(store: Store, name: str, out: Path, params: str, inputs: dict[str, str], result: StageOutput,
                  started: float, recipe_name: str | None,
                  fence: Callable[[], None] | None = None) -> dict[str, Any]:
    """Commit what a stage wrote into ``out``: upload it, then write the manifest last; ``fence``: the
    stage lease's check, made again before each upload and the manifest (manifest.commit)."""
    info = CommitInfo(
        stage=name,
        params_hash=params,
        inputs=inputs,
        counts=result.counts,
        timings={"started": started, "seconds": round(time.time() - started, 3)},
        extra={"recipe_name": recipe_name, **result.extra},
    )
    manifest = commit(store, out, info, fence=fence)
    log.info("%s: committed to %s", name, store.url(name))
    return manifest


def run_stage(
    name: str, recipe: Recipe, store: Store, shard: tuple[int, int] | None = None, force: bool = False
) -> int:
    """Run one stage to commit. Returns the exit code; exceptions map to codes in the CLI."""
    stage = spec(name)
    if not force and shard is None:
        ok, why = up_to_date(store, recipe, name)
        if ok:
            log.info("%s: already committed (%s)", name, why)
            return 0
    check_devices()  # a pod that asked for GPUs and cannot use CUDA stops here (exit 2), never trains on CPU
    me = world()
    if me.distributed:
        if not runs_on_ranks(name, stage.pod) or shard is not None:
            raise BadInput(f"{name}: only training stages and eval-harness run on several processes "
                           f"(WORLD_SIZE={me.size})")
        if not me.zero:
            # a worker of a group (bezoar_jobs.launch): rank 0 holds the lease and commits; this rank trains
            # (or evaluates) its share and writes nothing to the run but its own RNG state beside each checkpoint
            return _run(name, stage.function(), recipe, store, None, {"flag": False}, None)
    lease_name = name if shard is None else f"{name}.shard-{shard[0]}-of-{shard[1]}"
    command = f"bezoar stage {name}" + (f" --shard {shard[0]}/{shard[1]}" if shard else "")
    stop: dict[str, bool] = {"flag": False}
    lease = Lease(store, lease_name, command, on_lost=lambda why: stop.update(flag=True))
    with lease:
        if shard is None:
            if not force:  # it may have been committed while we waited for the lease
                ok, why = up_to_date(store, recipe, name)
                if ok:
                    log.info("%s: already committed (%s)", name, why)
                    return 0
            removed = store.clean_temp(name + "/")
            if removed:
                log.info("%s: removed %d temporary object(s) an interrupted run left behind", name, removed)
            if force:
                prepare_force(store, name, holder=lease.id)
        try:
            return _run(name, stage.function(), recipe, store, shard, stop, lease)
        except Interrupted:
            lease.check()  # a lost lease, not a SIGTERM: say so (LeaseLost, exit 3)
            raise


def _run(name: str, fn: Callable[[StageContext], StageOutput], recipe: Recipe, store: Store,
         shard: tuple[int, int] | None, stop: dict[str, bool], lease: Lease | None) -> int:
    """``lease`` is None on the ranks of a group other than 0: they never commit."""
    inputs = input_hashes(store, name, recipe)
    ph = params_hash(recipe, name)  # from the frozen recipe: the cluster's teacher endpoint is not a parameter
    sources = fingerprints(recipe, name)  # the local files it reads, as they are now (source_files.py)
    needs_teacher = "teacher" in spec(name).needs
    run_recipe, teacher_endpoint = cluster_teacher(recipe, name) if needs_teacher else (recipe, None)
    tmp = Path(tempfile.mkdtemp(prefix=f"bezoar-{name}-", dir=os.environ.get("BEZOAR_SCRATCH")))
    out, scratch = tmp / "out", tmp / "scratch"
    out.mkdir()
    scratch.mkdir()
    ctx = StageContext(name=name, recipe=view(run_recipe, name, spec(name).readable), store=store, out=out,
                       scratch=scratch, work=WorkArea(store, name), params_hash=ph, inputs=inputs, shard=shard,
                       teacher_url=teacher_url(run_recipe, needs_teacher),
                       teacher_backend=teacher_backend(run_recipe, needs_teacher), source_files=digests(sources),
                       _stop=stop)
    prev = _install_sigterm(ctx._stop)
    t0 = time.time()
    try:
        result: StageOutput = fn(ctx)
        ctx.check_stop()
        if not result.committed:
            if shard is not None:
                log.info("%s: shard %s/%s done (records under _work/)", name, *shard)
            else:
                log.info("%s: rank %d done (rank 0 commits)", name, world().rank)
            return 0
        if lease is None:
            raise RuntimeError(f"{name}: rank {world().rank} has no lease and must not commit")
        if ctx.accounting and "requests" not in result.extra:
            result.extra["requests"] = requests_summary(ctx.accounting)
        lease.check()  # never commit after another process took the stage over
        if teacher_endpoint is not None:
            result.extra["teacher_endpoint"] = teacher_endpoint
        if sources:
            result.extra["input_files"] = sources
        commit_output(store, name, out, ph, inputs, result, t0, recipe.name, fence=lease.check)
        return 0
    finally:
        signal.signal(signal.SIGTERM, prev)
        shutil.rmtree(tmp, ignore_errors=True)
