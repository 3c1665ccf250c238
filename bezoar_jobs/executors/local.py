"""The local backend: each stage is a subprocess of ``bezoar stage`` on this machine.

Exactly the command a Kubernetes Job's container runs, so a pipeline that works here works there.
Independent stages may run side by side (``--parallel``); the default is one at a time, which is
what a 2-core laptop wants, except the stages that call a teacher server: they run together, each
with its share of the teacher's capacity (they spend their time waiting for the server, not on the
CPU). The DAG walk is the scheduler's (executors/scheduler.py).

The run's cancel mark (``bezoar cancel``, run_control.py) is honoured as the Kubernetes controller honours it: no
stage starts once it is there, and the stages running are stopped (SIGTERM); the run exits 4. Before, a local run
cancelled while it ran went on starting stages and exited 0.

SIGINT or SIGTERM to ``bezoar run`` stops the run (:func:`run_local`): no stage starts any more, the
stages running get SIGTERM (what a pod gets: they save what they can and exit 143), their last lines
are relayed, and ``bezoar run`` exits 130 or 143 once they have ended. After SIGINT they get a moment
first: a Ctrl-C in a terminal reached them too. A second signal kills them (SIGKILL). Before, SIGTERM
killed ``bezoar run`` alone and SIGINT made it return at once, the stages running on, orphaned.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

from ..cluster_env import teacher_url
from ..errors import BadInput
from ..layout import RECIPE_FILE
from ..llm.budget import mark_done, mark_live
from ..logfmt import LOG_FORMAT_ENV
from ..recipe import Recipe
from ..redact import redact
from ..registry import spec
from ..run_control import EXIT_CANCELLED, cancelled
from ..store import Store
from .cluster import TEACHER_STAGES
from .scheduler import RunOutcome, Scheduler, StageEvent, on_teacher_server, parties_at_once, signal_name

log = logging.getLogger("bezoar")

TAIL_LINES = 20
# after SIGINT to `bezoar run`, how long the stages get to end by themselves before they are sent SIGTERM: a Ctrl-C in
# a terminal reached them too (one process group), and a second signal on its heels could cut their own clean-up
SIGINT_GRACE_S = 3.0
CANCEL_LOOK_S = 5.0  # how often a running `bezoar run` reads the run's cancel mark (as the controller does)


def exit_status(rc: int) -> tuple[int, str | None]:
    """A stage process's exit status as the code `bezoar run` passes on, and the signal that killed it, if one did:
    ``Popen`` gives a process killed by a signal as minus the signal, which `bezoar run` exited with modulo 256
    (SIGKILL: 247); a shell's 128 + signal (137) instead, as the launcher does for its workers (launch.py)."""
    if rc >= 0:
        return rc, None
    return 128 - rc, signal_name(-rc)


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
        self._stop_signals: list[tuple[int, float]] = []  # SIGINT/SIGTERM to `bezoar run`, and when (request_stop)
        self._sent: set[int] = set()  # the signals already passed on to the stages
        # `bezoar --log-format json run`: one JSON object per line, the stages' lines included (they carry "stage")
        self._json = os.environ.get(LOG_FORMAT_ENV, "").lower() == "json"
        self._cancelled = False
        self._next_cancel_look = time.monotonic() + CANCEL_LOOK_S

    def start(self) -> None:
        pass

    def _check_cancelled(self) -> bool:
        """Whether the run is cancelled (``bezoar cancel``); a store that cannot say now is asked again later."""
        if not self._cancelled:
            try:
                self._cancelled = cancelled(self.store) is not None
            except Exception as e:  # asked again at the next look
                log.info("could not read the run's cancel mark (%s)", e)
        return self._cancelled

    def _cancelled_event(self, stage: str, what: str) -> StageEvent:
        return StageEvent(stage, EXIT_CANCELLED, "Cancelled", f"run {self.store.uri} was cancelled (bezoar cancel): "
                          f"{what}; `bezoar cancel --run {self.store.uri} --undo` lifts it")

    def submit(self, stage: str) -> None:
        if self._check_cancelled():  # never start a stage of a cancelled run
            self._running.add(stage)
            self._events.put(self._cancelled_event(stage, "the stage was not started"))
            return
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
        # errors="replace": a byte that is not text (a native library's message, a write cut mid-character) would stop
        # the relay, and with it the walk, which waited for this stage's end for ever
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                bufsize=1, env=env)
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
        try:
            for line in proc.stdout:
                line = redact(line)  # the stage masks secrets itself; this is the second line of defence
                tail.append(line.rstrip("\n"))
                out = self._relayed(stage, line)
                if out:
                    sys.stderr.write(out)
        except Exception as e:  # the stage's end must still be told, or the walk waits for it for ever
            log.warning("[%s] its output can no longer be relayed: %s", stage, e)
            proc.stdout.close()  # the stage's next write fails instead of blocking on a full pipe
        rc, killed_by = exit_status(proc.wait())
        log.info("[%s] exit %d after %.1f s%s", stage, rc, time.time() - t0,
                 f" (killed by {killed_by})" if killed_by else "")
        with self._lock:
            self._procs.pop(stage, None)
        if rc == 0:
            reason, message = "", "the stage process exited 0"
        elif self._cancelled:
            ev = self._cancelled_event(stage, f"the stage was stopped (exit code {rc})")
            ev.log_tail = list(tail)
            self._events.put(ev)
            return
        elif killed_by:
            reason = f"killed by {killed_by} (exit code {rc})"
            message = f"`bezoar stage {stage}` was killed by {killed_by}"
        else:
            reason, message = f"exit code {rc}", f"`bezoar stage {stage}` exited {rc}"
        self._events.put(StageEvent(stage, rc, reason, message, list(tail)))

    def _relayed(self, stage: str, line: str) -> str:
        """A stage's output line as this process writes it: prefixed ``[stage]``; under ``--log-format json`` a JSON
        object (the stage's own log lines are: they pass as they are; anything else it printed, a traceback, is
        wrapped into one), where the prefix made every relayed line something no JSON reader takes. Always ends with
        a newline: a last line cut short (a progress bar, a kill) must not run into the next."""
        text = line.rstrip("\n")
        if not self._json:
            return f"[{stage}] {text}\n"
        if not text.strip():
            return ""
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and "stage" in obj:
            return text + "\n"
        ts = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        return json.dumps({"ts": ts, "level": "INFO", "logger": "bezoar.stage", "msg": text, "stage": stage},
                          ensure_ascii=False) + "\n"

    def request_stop(self, signum: int) -> None:
        """``bezoar run`` got SIGINT or SIGTERM: the stages running are stopped (:meth:`wait` does it). Called from a
        signal handler, so it only records the signal."""
        self._stop_signals.append((signum, time.monotonic()))

    def _pass_on_stop(self) -> float | None:
        """Stop the stages as the signals to `bezoar run` (or the run's cancel mark) ask: SIGTERM at once after SIGTERM
        or a cancel, after ``SIGINT_GRACE_S`` after SIGINT; SIGKILL after a second signal. The seconds until the
        grace ends, if it has not."""
        if not self._stop_signals and not self._cancelled:
            return None
        if len(self._stop_signals) > 1:
            sig = signal.SIGKILL
        else:
            first, at = self._stop_signals[0] if self._stop_signals else (signal.SIGTERM, 0.0)
            left = at + SIGINT_GRACE_S - time.monotonic() if first == signal.SIGINT and not self._cancelled else 0.0
            if left > 0:
                return left
            sig = signal.SIGTERM
        if sig in self._sent:
            return None
        self._sent.add(sig)
        with self._lock:
            procs = list(self._procs.items())
        for stage, p in procs:
            if p.poll() is None:
                log.info("[%s] stopping: %s", stage, "the run is cancelled" if self._cancelled else sig.name)
                p.send_signal(sig)
        return None

    def _look_for_cancel(self) -> None:
        """Every ``CANCEL_LOOK_S``: once the run is cancelled, the stages running are stopped (SIGTERM)."""
        now = time.monotonic()
        if self._cancelled or now < self._next_cancel_look:
            return
        self._next_cancel_look = now + CANCEL_LOOK_S
        self._check_cancelled()  # _pass_on_stop stops the stages

    def wait(self, timeout: float) -> list[StageEvent]:
        self._look_for_cancel()
        left = self._pass_on_stop()
        if left is not None:
            timeout = min(timeout, left)
        out = []
        try:
            out.append(self._events.get(timeout=timeout))
            while True:
                out.append(self._events.get_nowait())
        except queue.Empty:
            pass
        for ev in out:
            self._running.discard(ev.stage)
            if ev.exit_code != 0 and ev.stage in self.board_stages and self.teacher_parties > 1:
                # it asks the teacher nothing more: a stage killed (or failed before its client closed) left its
                # .live marker, which kept the others' shares small for the rest of the run and the next runs
                mark_done(self.store, ev.stage)
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
    with _stop_on_signals(scheduler, backend):
        return scheduler.run(stages, force)


@contextmanager
def _stop_on_signals(scheduler: Scheduler, backend: LocalBackend) -> Iterator[None]:
    """While the stages run, SIGINT and SIGTERM to this process stop the run instead of ending this process at once
    (SIGTERM) or raising KeyboardInterrupt out of the walk (SIGINT), which left the stages running, orphaned."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        scheduler.interrupt(signum)
        backend.request_stop(signum)

    # a signal this process was started with ignored (SIGINT for `bezoar run ... &` in a script) stays ignored
    previous = {sig: h for sig in (signal.SIGINT, signal.SIGTERM) if (h := signal.getsignal(sig)) != signal.SIG_IGN}
    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h if h is not None else signal.SIG_DFL)
