"""The one scheduler: the DAG walk of ``bezoar run``, over a small backend interface.

Where a stage runs is the backend's business (:class:`Backend`: a local subprocess, a Kubernetes
Job); everything else is decided here, the same way for every backend:

- **ready set**: a selected stage starts once every selected stage it waits for is done
  (:func:`bezoar_jobs.pipeline.waits_for`: its inputs; for the report, which reads the whole run,
  every other selected stage). Inputs outside the selection count as committed (the stage itself
  refuses, exit 2, when they are not). Stages start in canonical order, at most ``parallel`` at once;
  the stages that call the teacher count as one together, so they run side by side by default (with the
  filters when the judge is the teacher's own server: :func:`party_stages`).
- **skip committed**: a stage whose manifest is current (:func:`bezoar_jobs.state.up_to_date`) is
  skipped unless ``force``; with ``force`` its manifest (and, for training and evaluation, its
  ``_work/``) is removed first (:func:`bezoar_jobs.state.prepare_force`), so it really reruns.
- **check the commit**: a stage whose backend reports success but whose manifest is missing or stale
  has failed (``NoManifest`` / ``StaleManifest``).
- **failure**: the first failure stops the pipeline: no new stage starts; the outcome names the
  stage, the reason, the message and the last log lines, and carries the exit code. Stages still
  running are waited for (local processes) or left to the cluster (Jobs: the next ``bezoar run``
  adopts them), as the backend says. An error of the walk itself (a lease another process holds on a
  stage ``--force`` reruns, a store that fails while a manifest is checked) stops it the same way
  before it is raised: local stages started before it were left running, orphaned, and committed
  after ``bezoar run`` had exited.
- **interrupt** (:meth:`Scheduler.interrupt`, SIGINT or SIGTERM to ``bezoar run``): no new stage
  starts; the stages running are waited for as after a failure (the local backend stops them), and
  the run exits 128 + the signal (130, 143) unless a stage had failed before.

A backend is the kubeflow/sdk RuntimeBackend idea cut to what this needs: ``submit`` a stage,
``wait`` for what happened, ``cancel``, and the last ``logs`` of a stage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ..cluster_env import teacher_url
from ..layout import manifest_path
from ..pipeline import waits_for
from ..recipe import Recipe
from ..registry import CANONICAL, STAGES, spec
from ..state import prepare_force, up_to_date
from ..store import Store

if TYPE_CHECKING:
    from .cluster import ClusterSettings

log = logging.getLogger("bezoar")

# the stages that call the teacher: they share its capacity, and run together as one slot of `parallel`
TEACHER_STAGES = frozenset(n for n, st in STAGES.items() if "teacher" in st.needs)
# the data stages that call only the judge (the filters): parties too when the judge is the teacher's server
JUDGE_DATA_STAGES = frozenset(n for n, st in STAGES.items()
                              if st.pod == "data" and "judge" in st.needs and "teacher" not in st.needs)


def on_teacher_server(recipe: Recipe, teacher_url: str | None = None,
                      environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """Every stage that calls the teacher's server: the stages that call the teacher and those whose judge it
    serves (an open judge at its ``/v1``: llm/fleet.py ``on_teacher``): the filters with the recipe's judge,
    MT-Bench with its own judge or the recipe's. ``teacher_url``: where the pods reach the teacher (the
    cluster's), else the recipe's."""
    from ..llm.budget import BUDGETED_BACKENDS
    from ..llm.fleet import on_teacher

    if recipe.teacher.backend not in BUDGETED_BACKENDS:
        return TEACHER_STAGES
    url = teacher_url or recipe.teacher.base_url
    out = set(TEACHER_STAGES)
    for name, st in STAGES.items():
        if "judge" in st.needs and name not in out:
            section = getattr(recipe.evaluation, st.evaluation, None) if st.evaluation else None
            judge = getattr(section, "judge", None) or recipe.judge
            if judge.backend != "local" and on_teacher(judge.base_url, url, environ):
                out.add(name)
    return frozenset(out)


def party_stages(recipe: Recipe, teacher_url: str | None = None,
                 environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """The stages whose pods share the teacher's server (llm/budget.py), and run together as one slot of
    ``parallel``: the stages that call the teacher and, when the recipe's judge is served by the teacher's own
    server, the data stages that call the judge (the filters). Their requests reach the same admission limit:
    counted apart, a filter pod sent its whole ``judge.max_concurrency`` on top of the generate stages' shares,
    which the server refused as overloaded.
    An evaluation's judge on the teacher (MT-Bench) is not one of these: it waits for training and keeps a slot of
    its own, and one left to start does not keep the teacher up through training (on Kubernetes the teacher is
    brought up again for it, executors/k8s_teacher.py). It does take a share of the teacher's capacity: the
    budget divides it among every stage of :func:`on_teacher_server` (:func:`cluster_parties`, executors/local.py);
    an MT-Bench evaluating only the base model or an early checkpoint runs beside the data stages."""
    return on_teacher_server(recipe, teacher_url, environ) & (TEACHER_STAGES | JUDGE_DATA_STAGES)


def parties_at_once(parties: Iterable[str], stages: Iterable[str], recipe: Recipe | None = None,
                    pods: Callable[[str], int] = lambda s: 1) -> int:
    """How many pods of ``parties`` may call the teacher at once in a run of ``stages``: the widest set of them
    none of which waits for another (a filter starts after its generate stage, so the three generate stages
    and their three filters are three at once, not six), each stage counted as its ``pods`` (its shards).
    Dilworth: the width of the order is the number of pods less a largest matching of "a before b"."""
    chosen = list(stages)
    before: dict[str, set[str]] = {}

    def ancestors(s: str) -> set[str]:
        if s not in before:
            before[s] = set()
            for d in waits_for(s, chosen, recipe):
                before[s] |= {d} | ancestors(d)
        return before[s]

    nodes = [(s, i) for s in chosen if s in set(parties) for i in range(max(1, pods(s)))]
    later = {n: [m for m in nodes if n[0] in ancestors(m[0])] for n in nodes}
    match: dict[tuple[str, int], tuple[str, int]] = {}  # later pod -> the earlier one it is matched with

    def augment(n: tuple[str, int], seen: set[tuple[str, int]]) -> bool:
        for m in later[n]:
            if m not in seen:
                seen.add(m)
                if m not in match or augment(match[m], seen):
                    match[m] = n
                    return True
        return False

    return len(nodes) - sum(1 for n in nodes if augment(n, set()))

EXIT_STAGE_FAILED = 1
EXIT_BAD_INPUT = 2


def signal_name(signum: int) -> str:
    """SIGTERM, SIGKILL ... ("signal N" for a number no signal has)."""
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass
class StageEvent:
    """A stage's run ended: ``exit_code`` 0 means the backend saw it succeed (the scheduler still
    checks its manifest); otherwise ``reason`` and ``message`` say why, ``log_tail`` what it said."""

    stage: str
    exit_code: int
    reason: str = ""
    message: str = ""
    log_tail: list[str] = field(default_factory=list)


def cluster_parties(cluster: ClusterSettings, recipe: Recipe | None, stages: Iterable[str] = CANONICAL) -> int:
    """``BEZOAR_TEACHER_PARTIES`` on Kubernetes: the teacher stages among ``stages`` (a run's selection; a
    manifest applied by hand does not know what runs beside it: every stage), each in all its shards; with the
    ``recipe``, also the other stages that call the teacher's server (:func:`on_teacher_server`: the filters and
    MT-Bench when their judge is that server), as many as can run beside the rest (a filter starts once its
    generate stage is done; MT-Bench once the checkpoints it evaluates are trained)."""
    parties = on_teacher_server(recipe, cluster.teacher.url or None, {}) if recipe is not None else TEACHER_STAGES
    return max(1, parties_at_once(parties, stages, recipe,
                                  pods=lambda s: cluster.generationShards if STAGES[s].shardable else 1))


class Backend(Protocol):
    """Where stages run. ``parallel``: how many at once (None: no limit). ``wait_on_failure``:
    after a failure, whether the scheduler waits for the stages still running (True for local
    processes, which would be orphaned) or leaves them (False for Jobs, which run on by themselves)."""

    parallel: int | None
    wait_on_failure: bool

    def start(self) -> None:
        """Prepare (watches, connections) before the first submit."""

    def submit(self, stage: str) -> None:
        """Start ``stage`` (exactly ``bezoar stage NAME --recipe <run>/recipe.yaml --run <run>``)."""

    def wait(self, timeout: float) -> list[StageEvent]:
        """The stages that ended since the last call (none after ``timeout`` seconds)."""

    def stage_done(self, stage: str, skipped: bool, pending: Sequence[str] = ()) -> None:
        """Told after each stage that is done (committed or skipped): e.g. to release the teacher once no stage
        that needs it is left. ``pending``: the run's selected stages not started yet."""

    def running(self) -> list[str]:
        """The stages submitted and not ended."""

    def cancel(self) -> None:
        """Stop every stage this backend started."""

    def logs(self, stage: str) -> list[str]:
        """The last log lines of ``stage``."""

    def close(self) -> None:
        """Release what ``start`` took (the stages the backend leaves running keep running)."""


@dataclass
class RunOutcome:
    """What a run did; ``exit_code`` is what ``bezoar run`` exits with."""

    exit_code: int = 0
    failed_stage: str | None = None
    reason: str = ""
    message: str = ""
    last_log_lines: list[str] = field(default_factory=list)
    committed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)  # Kubernetes: Job names this run created
    adopted: list[str] = field(default_factory=list)  # Kubernetes: running Jobs it picked up instead
    still_running: list[str] = field(default_factory=list)  # left running after a failure
    interrupted: str = ""  # the signal that stopped the run (SIGINT, SIGTERM), if one did
    stopped: list[str] = field(default_factory=list)  # stages that ended unfinished after it

    def describe(self) -> str:
        if self.failed_stage is None:
            if self.interrupted:
                return (f"interrupted by {self.interrupted}: no stage started after it"
                        + (f"; stopped unfinished: {', '.join(self.stopped)}" if self.stopped else ""))
            return "ok"
        lines = [f"stage {self.failed_stage} failed: {self.reason}: {self.message}"]
        if self.last_log_lines:
            lines.append(f"last log lines of {self.failed_stage}:")
            lines += [f"  {ln}" for ln in self.last_log_lines]
        return "\n".join(lines)


class Scheduler:
    """Runs the selected stages of one run on a backend (see the module docstring)."""

    def __init__(self, backend: Backend, store: Store, recipe: Recipe, say: Callable[[str], None],
                 outcome: RunOutcome | None = None):
        self.backend = backend
        self.store = store
        self.recipe = recipe
        self.say = say
        self.outcome = outcome or RunOutcome()
        self.parties = party_stages(recipe, teacher_url(recipe, applied=False))  # they share the teacher's server
        self._pending: list[str] = []  # the selected stages not started yet
        self._signal: int | None = None  # set by interrupt(): no stage starts any more
        self._error: Exception | None = None  # an error of the walk itself, raised once the running stages ended

    def interrupt(self, signum: int) -> None:
        """``bezoar run`` got SIGINT or SIGTERM: no stage starts from now on; the running ones are waited for
        as after a failure (stopping them is the backend's business). Called from a signal handler, so it only
        records the signal."""
        if self._signal is None:
            self._signal = signum

    def _stopping(self) -> bool:
        return self.outcome.failed_stage is not None or self._signal is not None or self._error is not None

    def run(self, stages: list[str], force: bool = False) -> RunOutcome:
        for s in stages:
            spec(s)
        o = self.outcome
        pending = self._pending = list(stages)
        done: set[str] = set()
        self.backend.start()
        try:
            while True:
                if not self._stopping():
                    try:
                        self._start_ready(stages, pending, done, force)
                    except Exception as e:  # raised below, once the stages running have ended
                        self._walk_error(e)
                self._announce_interrupt()
                running = self.backend.running()
                if self._stopping() and (not running or not self.backend.wait_on_failure):
                    break
                if not running:
                    if pending and o.failed_stage is None:  # pragma: no cover - the DAG is acyclic by construction
                        raise RuntimeError(f"stages {pending} can never start")
                    break
                for ev in self.backend.wait(1.0):
                    self._announce_interrupt()
                    try:
                        self._ended(ev, done)
                    except Exception as e:  # as above
                        self._walk_error(e)
        finally:
            o.still_running = sorted(self.backend.running())
            self.backend.close()
        cut_short = self._signal is not None and o.failed_stage is None and bool(o.stopped or pending)
        if cut_short:  # (an interrupt that came while the last stages were finishing cut nothing short)
            o.exit_code = 128 + (self._signal or 0)
        if o.failed_stage is not None or (cut_short and self._error is None):
            self.say(f"error: {o.describe()}")
        if o.still_running:
            self.say(f"still running (left alone; the next `bezoar run` adopts them, `bezoar cancel` stops them): "
                     f"{', '.join(o.still_running)}")
        if self._error is not None:
            raise self._error
        if o.failed_stage is None and not cut_short:
            self.say(f"{len(o.committed)} stage(s) committed, {len(o.skipped)} already up to date")
        return o

    def _announce_interrupt(self) -> None:
        o = self.outcome
        if self._signal is None or o.interrupted:
            return
        o.interrupted = signal_name(self._signal)
        running = self.backend.running()
        self.say(f"{o.interrupted}: no stage starts any more"
                 + (f"; stopping {', '.join(running)}" if running and self.backend.wait_on_failure else ""))

    def _walk_error(self, e: Exception) -> None:
        """An error of the walk itself (not a stage's): no stage starts any more; raised by :meth:`run` once the
        stages running have ended (or at once when the backend leaves them running). After a stage's failure or
        an interrupt, which already stopped the walk and give the run its exit code, it is only said."""
        if self._stopping():
            self.say(f"also: {type(e).__name__}: {e}")
            return
        self._error = e
        running = self.backend.running()
        if running and self.backend.wait_on_failure:
            self.say(f"error: {e}; no stage starts any more; waiting for {', '.join(running)}")

    def _start_ready(self, stages: list[str], pending: list[str], done: set[str], force: bool) -> None:
        progressed = True
        while progressed:
            progressed = False
            for s in list(pending):
                if self._signal is not None:  # interrupted while starting stages: start none after it
                    return
                if not self._room_for(s):
                    if s in self.parties and self.recipe.teacher.backend != "local":
                        continue  # a stage after it may still join the teacher's group
                    return
                if not all(d in done for d in waits_for(s, stages, self.recipe)):
                    continue
                pending.remove(s)
                progressed = True
                if not force:
                    ok, why = up_to_date(self.store, self.recipe, s)
                    if ok:
                        self.say(f"{s}: skipped ({why})")
                        self.outcome.skipped.append(s)
                        done.add(s)
                        self.backend.stage_done(s, skipped=True, pending=pending)
                        continue
                else:
                    self.say(f"{s}: --force: removing its manifest so the stage reruns")
                    prepare_force(self.store, s)
                self.backend.submit(s)

    def _room_for(self, stage: str) -> bool:
        """Whether ``stage`` may start now under ``parallel``. The stages that call a teacher server (and the
        filters, when their judge is that server: :func:`party_stages`) count as one slot together: they run
        side by side by default, within one budget of the teacher's capacity (llm/budget.py), instead of one
        after another with the teacher idle in between. (An in-process teacher is a model per stage process:
        those stages keep to ``parallel``.)"""
        limit = self.backend.parallel
        if limit is None:
            return True
        if self.recipe.teacher.backend == "local":  # an in-process teacher: each stage loads its own copy
            return len(self.backend.running()) < limit
        running = self.backend.running()
        teacher = [r for r in running if r in self.parties]
        used = len(running) - len(teacher) + (1 if teacher else 0)
        need = 0 if stage in self.parties and teacher else 1
        return used + need <= limit

    def _ended(self, ev: StageEvent, done: set[str]) -> None:
        if ev.exit_code != 0 and self._signal is not None and self.outcome.failed_stage is None:
            # stopped by the interrupt (or ended some other way after it): the run's failure is the interrupt
            self.say(f"{ev.stage}: stopped unfinished ({ev.reason or f'exit code {ev.exit_code}'})")
            self.outcome.stopped.append(ev.stage)
            return
        if ev.exit_code != 0:
            self._fail(ev)
            return
        ok, why = up_to_date(self.store, self.recipe, ev.stage)
        if not ok:
            reason = "NoManifest" if why == "not committed" else "StaleManifest"
            self._fail(StageEvent(ev.stage, EXIT_STAGE_FAILED, reason,
                                  f"{ev.message or 'it finished'} but the stage is not committed as expected "
                                  f"({why}: {self.store.url(manifest_path(ev.stage))})", ev.log_tail))
            return
        self.say(f"{ev.stage}: committed ({self.store.url(ev.stage)})")
        self.outcome.committed.append(ev.stage)
        done.add(ev.stage)
        self.backend.stage_done(ev.stage, skipped=False, pending=self._pending)

    def _fail(self, ev: StageEvent) -> None:
        o = self.outcome
        if o.failed_stage is not None:
            return
        o.failed_stage, o.reason, o.message, o.exit_code = ev.stage, ev.reason, ev.message, ev.exit_code
        o.last_log_lines = list(ev.log_tail) or self.backend.logs(ev.stage)
