"""The Kubernetes backend: each stage runs as a Job of the run; the scheduler (executors/scheduler.py)
decides what runs when, exactly as for local processes.

Entry points (the ``bezoar`` CLI calls these; each returns the process exit code):

``bezoar run --executor kubernetes --recipe FILE --run URI [--run-id ID] [--cluster FILE]
[--from/--until/--only/--force]``
    -> :func:`run_pipeline(recipe_text, recipe_source, run_uri, run_id, cluster, stages, force,
    api_client=None) <run_pipeline>`: ``cluster`` from :func:`~bezoar_jobs.executors.cluster.load_cluster_settings`
    (``--cluster FILE``; in the chart, the mounted ConfigMap), ``stages`` from
    :func:`bezoar_jobs.pipeline.select`. Exit 0 when every selected stage is committed; 2 when a
    stage failed with exit code 2 (bad input: the Job's podFailurePolicy stopped it at once) or the
    run's inputs/settings are bad; 1 for any other stage failure.
``bezoar cancel --run URI [--run-id ID] [--cluster FILE]``
    -> :func:`cancel(run_uri, run_id, cluster, api_client=None) <cancel>`: deletes every Job of the
    run (label ``bezoar.dev/run``, propagationPolicy Background: their pods go too).
``bezoar render --recipe FILE --cluster FILE --run URI [--run-id ID] --out DIR``
    -> :func:`bezoar_jobs.executors.jobs.render` (no cluster needed).

What the backend does for a stage the scheduler submits:

1. Creates the stage's Job from the pure builder (:func:`bezoar_jobs.executors.jobs.build_job`),
   *get before create* (k8s_jobs.py): a running Job of that deterministic name is ADOPTED (a
   restarted controller picks up where the last one was; nothing runs twice); a finished one is
   deleted and created anew; ``409 Conflict`` on create means adopt as well. A sharded stage whose
   commit Job is running is adopted at that Job.
2. Watches the run's Jobs and pods (k8s_jobs.py); follows each pod's log (k8s_logs.py).
3. On the Job's ``Complete`` condition reports success (the scheduler then checks the manifest). A
   sharded generate stage's Indexed Job is followed by its commit Job (the stage without
   ``--shard``, which gathers every shard's records). On ``Failed`` it reports the Job condition's
   reason and message (``BackoffLimitExceeded``, ``PodFailurePolicy``, ``DeadlineExceeded``), the
   pods' exit codes and the last log lines. Jobs still running after a failure elsewhere are left
   alone: they commit what they can, and the next ``bezoar run`` adopts or skips them.
4. Before the first stage that needs the teacher, brings the teacher Deployment up and waits for it
   (k8s_teacher.py); once every generate stage is committed, scales it down.

Configuration: inside a pod (``KUBERNETES_SERVICE_HOST`` set) the service-account token is used;
elsewhere the kubeconfig (``$KUBECONFIG``, else ``~/.kube/config``). Tests inject ``api_client``
(a real client pointed at a loopback API server).

The controller never imports torch, transformers, trl or ``bezoar_jobs.stages``: the controller
image stays small (a test holds this). It is restart-safe by construction: killing it loses
nothing, since the Jobs keep running and the next controller adopts them.

Minimum Kubernetes: 1.31 (podFailurePolicy and podReplacementPolicy on by default).
RBAC it needs in ``cluster.namespace``: jobs (batch) create/get/list/watch/delete; pods
get/list/watch; pods/log get; deployments (apps) get; deployments/scale get/patch.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from ..errors import BezoarError, RetryableError
from ..layout import RECIPE_FILE
from ..recipe import Recipe, parse_recipe
from ..registry import spec
from ..state import freeze_recipe
from ..store import Store, open_store
from .cluster import ClusterSettings
from .jobs import (
    COMPLETION_INDEX_ANNOTATION,
    Phase,
    build_job,
    is_sharded,
    job_name,
    run_id_from_uri,
    run_selector,
    short_run_id,
)
from .k8s_api import api_exception, condition, make_api_client
from .k8s_jobs import Event, JobApi, RunWatch
from .k8s_logs import LogFollower
from .k8s_teacher import TEACHER_READY_TIMEOUT_S, TeacherLifecycle
from .scheduler import EXIT_BAD_INPUT, EXIT_STAGE_FAILED, RunOutcome, Scheduler, StageEvent

__all__ = ["KubernetesBackend", "RunOutcome", "cancel", "make_api_client", "run_pipeline"]

_WAITING_PROBLEMS = {"CreateContainerConfigError", "CreateContainerError", "ErrImagePull", "ImagePullBackOff",
                     "InvalidImageName", "RunContainerError"}


@dataclass
class _Tracked:
    stage: str
    phase: Phase
    uid: str


class KubernetesBackend:
    """Runs stages as Jobs of one run (see the module docstring). One instance per ``bezoar run``."""

    parallel: int | None = None  # the cluster (and Kueue) decide how many run at once
    wait_on_failure = False  # Jobs run on by themselves: the next `bezoar run` adopts them

    def __init__(
        self,
        api_client: Any,
        cluster: ClusterSettings,
        run_uri: str,
        run_id: str,
        store: Store,
        outcome: RunOutcome,
        *,
        out: TextIO | None = None,
        image_digests: Mapping[str, str] | None = None,
        teacher_timeout_s: float = TEACHER_READY_TIMEOUT_S,
        teacher_poll_s: float = 2.0,
        watch_timeout_s: int = 240,
    ):
        from kubernetes import client

        self.cluster = cluster
        self.ns = cluster.namespace
        self.run_uri = run_uri.rstrip("/")
        self.run_id = run_id
        self.store = store
        self.outcome = outcome
        self.out = out or sys.stdout
        self.image_digests = image_digests
        self.events: queue.Queue[Event] = queue.Queue()
        self.stop = threading.Event()
        self._print_lock = threading.Lock()
        batch, core = client.BatchV1Api(api_client), client.CoreV1Api(api_client)
        self.jobs = JobApi(batch, core, self.ns, short_run_id(run_id))
        self.watch = RunWatch(batch, core, self.ns, run_selector(run_id), self.events, self.stop, watch_timeout_s)
        self.logs_ = LogFollower(core, self.ns, self.emit, self.say, self.stop)
        self.teacher = TeacherLifecycle(client.AppsV1Api(api_client), self.ns, cluster.teacher, store, self.say,
                                        self.events, self.stop, teacher_timeout_s, teacher_poll_s)
        self.pods: dict[str, dict[str, Any]] = {}
        self.active: dict[str, _Tracked] = {}  # Job name -> what it runs
        self.warned: set[tuple[str, str]] = set()
        self._waiting_teacher: list[str] = []
        self._ended: list[StageEvent] = []

    # -- output ---------------------------------------------------------------------------------
    def emit(self, line: str) -> None:
        with self._print_lock:
            self.out.write(line + "\n")
            self.out.flush()

    def say(self, msg: str) -> None:
        self.emit(f"[bezoar] {msg}")

    # -- the backend interface ------------------------------------------------------------------
    def start(self) -> None:
        found = self.watch.start()
        for pod in found["pod"]:
            self.pods[pod["metadata"]["name"]] = pod

    def submit(self, stage: str) -> None:
        if self.teacher.managed and "teacher" in spec(stage).needs and self.teacher.state != "ready":
            if self.teacher.state == "failed":
                self._ended.append(StageEvent(stage, EXIT_STAGE_FAILED, "TeacherNotReady",
                                              "the teacher Deployment is not ready"))
                return
            self._waiting_teacher.append(stage)
            self.teacher.request()
            return
        if is_sharded(stage, self.cluster) and self._adopt_running_commit(stage):
            return
        self._submit(stage, "main")

    def wait(self, timeout: float) -> list[StageEvent]:
        if not self._ended:
            try:
                kind, etype, obj = self.events.get(timeout=timeout)
            except queue.Empty:
                return []
            self._handle(kind, etype, obj)
        out, self._ended = self._ended, []
        return out

    def stage_done(self, stage: str, skipped: bool) -> None:
        if spec(stage).family == "generate":
            self.teacher.after_generation([t.stage for t in self.active.values()])

    def running(self) -> list[str]:
        return sorted({t.stage for t in self.active.values()} | set(self._waiting_teacher)
                      | {ev.stage for ev in self._ended})

    def cancel(self) -> None:
        self.jobs.delete_run_jobs(run_selector(self.run_id))

    def logs(self, stage: str) -> list[str]:
        return list(self.logs_.tails.get(stage, ()))

    def close(self) -> None:
        self.watch.close()
        self.logs_.close()

    # -- events ---------------------------------------------------------------------------------
    def _handle(self, kind: str, etype: str, obj: Any) -> None:
        if kind == "job":
            if etype == "RELIST":
                self._relist_jobs(obj)
            else:
                self._on_job(obj, deleted=etype == "DELETED")
        elif kind == "pod":
            if etype == "RELIST":
                for p in obj:
                    self._on_pod(p)
            elif etype == "DELETED":
                self.pods.pop(obj["metadata"]["name"], None)
            else:
                self._on_pod(obj)
        elif kind == "teacher":
            waiting, self._waiting_teacher = self._waiting_teacher, []
            if etype == "ready":
                self.teacher.state = "ready"
                for s in waiting:
                    self._submit(s, "main")
            else:
                self.teacher.state = "failed"
                code = EXIT_BAD_INPUT if etype == "bad" else EXIT_STAGE_FAILED
                for s in waiting:
                    self._ended.append(StageEvent(s, code, "TeacherNotReady", str(obj)))
        elif kind == "watch-error":
            raise RetryableError(f"watching the run's {etype}s failed: {obj}")

    # -- Jobs -----------------------------------------------------------------------------------
    def _adopt_running_commit(self, stage: str) -> bool:
        """After a restart, a sharded stage may already be committing: adopt that Job, do not
        start the shards again next to it."""
        name = job_name(stage, self.run_id, "commit")
        existing = self.jobs.get(name)
        if existing is None or condition(existing) is not None or not self.jobs.belongs(existing, stage):
            return False
        self.say(f"{stage}: adopting running Job {name}")
        self.outcome.adopted.append(name)
        self._track(name, stage, "commit", existing)
        return True

    def _submit(self, stage: str, phase: Phase) -> None:
        """Create (or adopt) the Job running ``stage``/``phase`` and track it."""
        body = build_job(stage, self.run_uri, self.run_id, self.cluster, self.image_digests, phase=phase)
        name = body["metadata"]["name"]
        job, adopted = self.jobs.create_or_adopt(
            body, stage, on_replace=lambda n: self.say(f"{stage}: deleting finished Job {n} from an earlier attempt"))
        if adopted:
            self.say(f"{stage}: adopting running Job {name}")
            self.outcome.adopted.append(name)
        else:
            self.say(
                f"{stage}: created Job {name}"
                + (" (shards)" if is_sharded(stage, self.cluster) and phase == "main" else "")
            )
            self.outcome.created.append(name)
        self._track(name, stage, phase, job)

    def _track(self, name: str, stage: str, phase: Phase, job: dict[str, Any]) -> None:
        self.active[name] = _Tracked(stage, phase, job["metadata"]["uid"])
        self.logs_.tail(stage)
        for pod in list(self.pods.values()):  # pods we saw before we knew the Job (adoption)
            self._on_pod(pod)
        self._on_job(job)

    def _relist_jobs(self, items: list[dict[str, Any]]) -> None:
        seen = {j["metadata"]["name"] for j in items}
        for j in items:
            self._on_job(j)
        for name, t in list(self.active.items()):
            if name not in seen:
                self._on_job({"metadata": {"name": name, "uid": t.uid}}, deleted=True)

    def _on_job(self, job: dict[str, Any], deleted: bool = False) -> None:
        name = job["metadata"]["name"]
        t = self.active.get(name)
        if t is None or job["metadata"].get("uid") != t.uid:
            return  # not ours (an older Job of the same name, another stage's history)
        if deleted:
            del self.active[name]
            self._ended.append(StageEvent(t.stage, EXIT_STAGE_FAILED, "JobDeleted",
                                          f"Job {name} was deleted while it ran (bezoar cancel, or by hand)",
                                          self._last_lines(t.stage, t.uid)))
            return
        cond = condition(job)
        if cond is None:
            return
        del self.active[name]
        if cond["type"] == "Failed":
            self._ended.append(self._failed(t.stage, name, t.uid, cond))
        elif t.phase == "main" and is_sharded(t.stage, self.cluster):
            self.say(f"{t.stage}: all {self.cluster.generationShards} shards done; committing")
            self._submit(t.stage, "commit")
        else:
            self._ended.append(StageEvent(t.stage, 0, "Complete", f"Job {name} completed"))

    def _failed(self, stage: str, name: str, uid: str, cond: dict[str, Any]) -> StageEvent:
        reason = cond.get("reason") or "Failed"
        message = cond.get("message") or ""
        codes = self.jobs.exit_codes(uid, self.pods)
        # Our podFailurePolicy's only FailJob rule is "the stage exited 2" (bad input).
        bad_input = reason == "PodFailurePolicy" or bool(codes and codes[-1] == 2)
        if codes:
            message += f" (exit code{'s' if len(codes) > 1 else ''} of its pods: {', '.join(map(str, codes))})"
        return StageEvent(stage, EXIT_BAD_INPUT if bad_input else EXIT_STAGE_FAILED, reason, f"Job {name}: {message}",
                          self._last_lines(stage, uid))

    def _last_lines(self, stage: str, uid: str) -> list[str]:
        return self.logs_.last_lines(stage, self.jobs.pods_of(uid, self.pods))

    # -- pods -----------------------------------------------------------------------------------
    def _on_pod(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        self.pods[meta["name"]] = pod
        labels = meta.get("labels") or {}
        t = self.active.get(labels.get("job-name", ""))
        if t is None or labels.get("controller-uid", t.uid) != t.uid:
            return
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in _WAITING_PROBLEMS and (meta["name"], waiting["reason"]) not in self.warned:
                self.warned.add((meta["name"], waiting["reason"]))
                self.say(
                    f"{t.stage}: pod {meta['name']} cannot start: {waiting['reason']}: {waiting.get('message', '')}"
                )
        index = (meta.get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION)
        sharded = index is not None and t.phase == "main" and is_sharded(t.stage, self.cluster)
        self.logs_.follow(pod, t.stage, f"[{t.stage}#{index}]" if sharded else f"[{t.stage}]")


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def _api_error_code(e: Exception) -> int:
    status = getattr(e, "status", None)
    return EXIT_BAD_INPUT if status in (401, 403, 404, 422) else EXIT_STAGE_FAILED


def run_pipeline(
    recipe_text: str,
    recipe_source: str,
    run_uri: str,
    run_id: str | None,
    cluster: ClusterSettings,
    stages: list[str],
    force: bool,
    api_client: Any = None,
    *,
    out: TextIO | None = None,
    image_digests: Mapping[str, str] | None = None,
    on_outcome: Callable[[RunOutcome], None] | None = None,
    **backend_options: Any,
) -> int:
    """``bezoar run --executor kubernetes``: run ``stages`` of the run as Jobs; return the exit code.

    ``out`` receives the controller's messages and the stages' log lines (default stdout);
    ``on_outcome`` receives the :class:`RunOutcome` (tests and tools that want the details).
    """
    out = out or sys.stdout
    ApiException = api_exception()
    try:
        recipe: Recipe = parse_recipe(recipe_text, recipe_source)
        rid = run_id or run_id_from_uri(run_uri)
        short_run_id(rid)
        for s in stages:
            spec(s)
            job_name(s, rid)  # refuses a stage the Job builder does not know
        store = open_store(run_uri)
        api = api_client if api_client is not None else make_api_client()
        freeze_recipe(store, recipe_text, recipe_source)
        out.write(f"[bezoar] run {rid}: recipe frozen at {store.url(RECIPE_FILE)}; stages: {', '.join(stages)}\n")
        outcome = RunOutcome()
        backend = KubernetesBackend(api, cluster, run_uri, rid, store, outcome, out=out, image_digests=image_digests,
                                    **backend_options)
        Scheduler(backend, store, recipe, backend.say, outcome).run(stages, force)
    except BezoarError as e:
        out.write(f"[bezoar] error: {e}\n")
        out.flush()
        return e.exit_code
    except ApiException as e:
        status, reason, body = getattr(e, "status", None), getattr(e, "reason", ""), getattr(e, "body", "") or ""
        out.write(f"[bezoar] error: Kubernetes API: {status} {reason}: {body[:500]}\n")
        out.flush()
        return _api_error_code(e)
    if on_outcome is not None:
        on_outcome(outcome)
    return outcome.exit_code


def cancel(
    run_uri: str,
    run_id: str | None,
    cluster: ClusterSettings,
    api_client: Any = None,
    *,
    out: TextIO | None = None,
) -> int:
    """``bezoar cancel``: delete every Job of the run (propagationPolicy Background); return 0.

    Deleting a Job terminates its pods (SIGTERM, then the grace period): a stage saves what it can
    under ``_work/``, and a later ``bezoar run`` resumes from there. Committed stages stay committed.
    """
    from kubernetes import client

    out = out or sys.stdout
    ApiException = api_exception()
    try:
        rid = run_id or run_id_from_uri(run_uri)
        api = api_client if api_client is not None else make_api_client()
        jobs = JobApi(client.BatchV1Api(api), client.CoreV1Api(api), cluster.namespace, short_run_id(rid))
        names = jobs.delete_run_jobs(run_selector(rid))
        if names:
            out.write(f"[bezoar] cancel: deleted {len(names)} Job(s) of run {rid} in namespace {cluster.namespace}: "
                      f"{', '.join(names)}\n")
        else:
            out.write(f"[bezoar] cancel: no Jobs of run {rid} in namespace {cluster.namespace}\n")
        out.flush()
        return 0
    except BezoarError as e:
        out.write(f"[bezoar] error: {e}\n")
        return e.exit_code
    except ApiException as e:
        out.write(f"[bezoar] error: Kubernetes API: {getattr(e, 'status', None)} {getattr(e, 'reason', '')}\n")
        return _api_error_code(e)
