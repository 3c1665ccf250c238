"""The local backend: each stage is a subprocess of ``bezoar stage`` on this machine.

Exactly the command a Kubernetes Job's container runs, so a pipeline that works here works there.
Independent stages may run side by side (``--parallel``); the default is one at a time, which is
what a 2-core laptop wants, except the stages that call a teacher server: they run together, each
with its share of the teacher's capacity (they spend their time waiting for the server, not on the
CPU). The DAG walk is the scheduler's (executors/scheduler.py).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from ..cluster_env import teacher_url
from ..errors import BadInput
from ..layout import RECIPE_FILE
from ..llm.budget import mark_done, mark_live
from ..recipe import Recipe
from ..redact import redact
from ..registry import spec
from ..store import Store
from .cluster import TEACHER_STAGES
from .scheduler import RunOutcome, Scheduler, StageEvent, on_teacher_server, parties_at_once

log = logging.getLogger("bezoar")

TAIL_LINES = 20


def stage_command(name: str, store: Store, force: bool = False, shard: str | None = None,
                  nproc_per_node: int = 1) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "bezoar_jobs.cli",
        "stage",
        name,
        "--recipe",
        store.url(RECIPE_FILE),
        "--run",
        store.uri,
    ]
    if shard:
        cmd += ["--shard", shard]
    if nproc_per_node > 1 and spec(name).pod == "train":
        # the stage runs itself under torch.distributed.run (bezoar_jobs.launch); other stages stay one process
        cmd += ["--nproc-per-node", str(nproc_per_node)]
    if force:
        cmd.append("--force")
    return cmd


class LocalBackend:
    """Runs stages as local subprocesses; their output goes to stderr prefixed ``[stage]``."""

    wait_on_failure = True  # a subprocess left behind would be orphaned: wait for it

    def __init__(self, store: Store, parallel: int = 1, nproc_per_node: int = 1):
        self.store = store
        self.nproc_per_node = nproc_per_node
        if parallel < 1:  # `bezoar run --parallel` refuses it at parsing; a caller in code gets told too
            raise BadInput(f"parallel={parallel}: the number of stages side by side must be at least 1")
        self.parallel: int | None = parallel
        self.teacher_parties = len(TEACHER_STAGES)  # run_local narrows it to the run's selection
        # the stages whose processes divide the teacher's capacity: run_local adds the filters and MT-Bench when
        # their judge is the teacher's server (executors/scheduler.py on_teacher_server)
        self.board_stages: frozenset[str] = frozenset(TEACHER_STAGES)
        self._events: queue.Queue[StageEvent] = queue.Queue()
        self._procs: dict[str, subprocess.Popen[str]] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._tails: dict[str, deque[str]] = {}
        self._lock = threading.Lock()
        self._running: set[str] = set()  # submitted, and its end not yet handed out by wait()

    def start(self) -> None:
        pass

    def submit(self, stage: str) -> None:
        log.info("[%s] starting", stage)
        env = os.environ.copy()
        if stage in self.board_stages:
            if "BEZOAR_TEACHER_PARTIES" not in env:
                # the teacher stages run side by side (the scheduler counts them as one slot) within one
                # budget (llm/budget.py): each gets an even share of the teacher's capacity
                env["BEZOAR_TEACHER_PARTIES"] = str(self.teacher_parties)
            if self.teacher_parties > 1:
                mark_live(self.store, stage)  # the pods running give up its share before it starts
        cmd = stage_command(stage, self.store, nproc_per_node=self.nproc_per_node)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
        with self._lock:
            self._procs[stage] = proc
            self._tails[stage] = deque(maxlen=TAIL_LINES)
        self._running.add(stage)
        th = threading.Thread(target=self._follow, args=(stage, proc, time.time()), name=f"bezoar-{stage}", daemon=True)
        self._threads[stage] = th
        th.start()

    def _follow(self, stage: str, proc: subprocess.Popen[str], t0: float) -> None:
        assert proc.stdout is not None
        tail = self._tails[stage]
        for line in proc.stdout:
            line = redact(line)  # the stage masks secrets itself; this is the second line of defence
            tail.append(line.rstrip("\n"))
            sys.stderr.write(f"[{stage}] {line}")
        rc = proc.wait()
        log.info("[%s] exit %d after %.1f s", stage, rc, time.time() - t0)
        with self._lock:
            self._procs.pop(stage, None)
        self._events.put(StageEvent(stage, rc, "" if rc == 0 else f"exit code {rc}",
                                    "the stage process exited 0" if rc == 0 else f"`bezoar stage {stage}` exited {rc}",
                                    list(tail)))

    def wait(self, timeout: float) -> list[StageEvent]:
        out = []
        try:
            out.append(self._events.get(timeout=timeout))
            while True:
                out.append(self._events.get_nowait())
        except queue.Empty:
            pass
        for ev in out:
            self._running.discard(ev.stage)
        return out

    def stage_done(self, stage: str, skipped: bool, pending: Sequence[str] = ()) -> None:
        # counted among the teacher's parties: one skipped asks nothing; one that finished without opening its
        # client (everything resumed) never marked itself done
        if stage in self.board_stages and (skipped or self.teacher_parties > 1):
            mark_done(self.store, stage)

    def running(self) -> list[str]:
        return sorted(self._running)

    def cancel(self) -> None:
        with self._lock:
            procs = list(self._procs.values())
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    def logs(self, stage: str) -> list[str]:
        return list(self._tails.get(stage, ()))

    def close(self) -> None:
        for th in list(self._threads.values()):
            th.join(timeout=0.1)


def run_local(recipe: Recipe, store: Store, stages: list[str], force: bool = False, parallel: int = 1,
              say: Callable[[str], None] | None = None, nproc_per_node: int = 1) -> RunOutcome:
    """``bezoar run`` (the default executor): run ``stages`` (canonical order) to commit; each training
    stage on ``nproc_per_node`` processes (torch.distributed.run) when more than one."""
    backend = LocalBackend(store, parallel, nproc_per_node)
    scheduler = Scheduler(backend, store, recipe, say or (lambda msg: log.info("%s", msg)))
    # every stage that calls the teacher's server divides its capacity: the scheduler's parties (one slot of
    # --parallel together) and an MT-Bench judge on it, in a slot of its own
    backend.board_stages = on_teacher_server(recipe, teacher_url(recipe, applied=False))
    # the most of them that run at once: a filter on the teacher's server starts after its generate stage, MT-Bench
    # after what it evaluates, and beside the parties' slot only with a second slot (--parallel 2: it evaluates
    # the base model alone, or an early checkpoint); counted when it cannot, it kept the others to a smaller share
    together = backend.board_stages if parallel > 1 else scheduler.parties
    backend.teacher_parties = max(1, parties_at_once(together, stages, recipe))
    return scheduler.run(stages, force)
