"""The Kubernetes executor: a controller that runs a pipeline's stages as Jobs and watches them.

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

Configuration: inside a pod (``KUBERNETES_SERVICE_HOST`` set) the service-account token is used;
elsewhere the kubeconfig (``$KUBECONFIG``, else ``~/.kube/config``; ``context`` picks a context).
Tests inject ``api_client`` (a real client pointed at a loopback API server).

What the controller does, in order:

1. Freezes the recipe into ``<run>/recipe.yaml`` (:func:`bezoar_jobs.runner.freeze_recipe`): every
   stage pod reads that copy, so concurrent runs never share a mutable ConfigMap.
2. Lists the run's Jobs and pods, then WATCHES them (``list_namespaced_job`` /
   ``list_namespaced_pod`` with the run's label selector, from the list's ``resourceVersion``;
   a ``410 Gone`` re-lists). Job state is never polled.
3. Starts each selected stage as soon as the stages it reads (``pipeline.stage_inputs``) are
   committed: independent stages run side by side, and a stage never waits for an unrelated
   one of the same "wave". The report, which declares no inputs because it reads whatever is
   committed, starts after every other selected stage. A stage already committed with the same
   parameters and inputs (:func:`bezoar_jobs.runner.up_to_date`) is skipped unless ``force``;
   ``force`` deletes its manifest first so the stage really reruns. (The report's own freshness
   check lives in ``bezoar_jobs.stages``, which the controller never imports: its Job always
   runs, and returns at once when the report is current.)
4. Creates the stage's Job from the pure builder (:func:`bezoar_jobs.executors.jobs.build_job`):
   *get before create*. A Job of that deterministic name that is still running is ADOPTED (a
   restarted controller picks up where the last one was; nothing runs twice); a finished one (of
   a stage that is not committed, or with ``force``) is deleted and created anew; ``409 Conflict``
   on create (another controller won the race) means adopt as well. A sharded stage whose commit
   Job is running is adopted at that Job; if only its shards Job is found finished, the shards run
   again, which is cheap: every shard resumes from the records it already wrote under ``_work/``.
5. Streams each pod's log (``follow=True``, one thread per pod) prefixed with ``[stage]``
   (``[stage#i]`` for shard ``i``), keeping the last lines for the error report.
6. On the Job's ``Complete`` condition, checks the stage's manifest: ``Complete`` without a
   committed, up-to-date manifest is a failure. A sharded generate stage's Indexed Job is followed
   by its commit Job (the stage without ``--shard``, which gathers every shard's records).
   On ``Failed``, stops the pipeline at once, naming the stage, the Job condition's reason and
   message (``BackoffLimitExceeded``, ``PodFailurePolicy``, ``DeadlineExceeded``) and the last log
   lines. Other stages' Jobs that are still running are left alone: they commit what they can, and
   the next ``bezoar run`` adopts or skips them (``bezoar cancel`` stops them).
7. When ``teacher.deployment`` is set: before the first generate stage that must run, scales the
   teacher Deployment up to ``teacher.replicas`` if it is at 0 and (``waitReady``) waits until it
   has a ready replica (the Deployment is polled with ``get``: the chart's Role grants no watch on
   Deployments); once every generate stage of the pipeline is committed it scales the teacher to
   0 (``scaleDownAfterGeneration``).

The controller never imports torch, transformers, trl or ``bezoar_jobs.stages``: the controller
image stays small (a test holds this). It is also restart-safe by construction: killing it loses
nothing, since the Jobs keep running and the next controller adopts them.

Minimum Kubernetes: 1.31 (podFailurePolicy and podReplacementPolicy on by default).
RBAC it needs in ``cluster.namespace``: jobs (batch) create/get/list/watch/delete; pods
get/list/watch; pods/log get; deployments (apps) get; deployments/scale get/patch.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from ..errors import BadInput, BezoarError, RetryableError
from ..manifest import manifest_path, read_manifest
from ..pipeline import STAGES, spec, stage_inputs
from ..recipe import Recipe, parse_recipe
from ..runner import freeze_recipe, up_to_date
from ..store import Store, open_store
from .cluster import ClusterSettings
from .jobs import (
    CONTAINER,
    LABEL_STAGE,
    Phase,
    build_job,
    is_sharded,
    job_name,
    run_id_from_uri,
    run_selector,
    short_run_id,
)

EXIT_STAGE_FAILED = 1
EXIT_BAD_INPUT = 2
TAIL_LINES = 20  # log lines kept per stage for the failure report
TEACHER_READY_TIMEOUT_S = 3600.0
_WAITING_PROBLEMS = {"CreateContainerConfigError", "CreateContainerError", "ErrImagePull", "ImagePullBackOff",
                     "InvalidImageName", "RunContainerError"}


def make_api_client(context: str | None = None, kubeconfig: str | None = None) -> Any:
    """A ``kubernetes.client.ApiClient``: in-cluster config inside a pod, else the kubeconfig."""
    from kubernetes import client, config

    cfg = client.Configuration()
    # One watch per kind plus one log stream per running pod share the pool: leave room.
    cfg.connection_pool_maxsize = 64
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST") and not kubeconfig:
            config.load_incluster_config(client_configuration=cfg)
            return client.ApiClient(configuration=cfg)
        path = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        return config.new_client_from_config(config_file=path, context=context, client_configuration=cfg)
    except config.ConfigException as e:
        raise BadInput(
            f"no usable Kubernetes configuration ({e}); set KUBECONFIG, or run inside a cluster "
            "(KUBERNETES_SERVICE_HOST set by Kubernetes)"
        ) from None


def _api_exception() -> type[Exception]:
    from kubernetes.client.exceptions import ApiException

    return ApiException


def _raw(resp: Any) -> dict[str, Any]:
    """The JSON body of a ``_preload_content=False`` response (objects stay plain dicts)."""
    try:
        return json.loads(resp.data)
    finally:
        resp.release_conn()


def _condition(job: dict[str, Any]) -> dict[str, Any] | None:
    """The Job's terminal condition (Complete or Failed, status True), if any."""
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") in ("Complete", "Failed") and c.get("status") == "True":
            return c
    return None


@dataclass
class RunOutcome:
    """What :meth:`Controller.run` did; ``exit_code`` is what ``bezoar run`` exits with."""

    exit_code: int = 0
    failed_stage: str | None = None
    reason: str = ""
    message: str = ""
    last_log_lines: list[str] = field(default_factory=list)
    committed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)  # Job names created by this controller
    adopted: list[str] = field(default_factory=list)  # running Jobs it picked up instead

    def describe(self) -> str:
        if self.failed_stage is None:
            return "ok"
        lines = [f"stage {self.failed_stage} failed: {self.reason}: {self.message}"]
        if self.last_log_lines:
            lines.append(f"last log lines of {self.failed_stage}:")
            lines += [f"  {ln}" for ln in self.last_log_lines]
        return "\n".join(lines)


@dataclass
class _Tracked:
    stage: str
    phase: Phase
    uid: str


class Controller:
    """Runs the selected stages of one run as Jobs. One instance per ``bezoar run``."""

    def __init__(
        self,
        api_client: Any,
        cluster: ClusterSettings,
        run_uri: str,
        run_id: str,
        store: Store,
        recipe: Recipe,
        *,
        out: TextIO | None = None,
        image_digests: Mapping[str, str] | None = None,
        teacher_timeout_s: float = TEACHER_READY_TIMEOUT_S,
        teacher_poll_s: float = 2.0,
        watch_timeout_s: int = 240,
    ):
        from kubernetes import client

        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.cluster = cluster
        self.ns = cluster.namespace
        self.run_uri = run_uri.rstrip("/")
        self.run_id = run_id
        self.store = store
        self.recipe = recipe
        self.out = out or sys.stdout
        self.image_digests = image_digests
        self.teacher_timeout_s = teacher_timeout_s
        self.teacher_poll_s = teacher_poll_s
        self.watch_timeout_s = watch_timeout_s
        self.selector = run_selector(run_id)
        self.events: queue.Queue[tuple[str, str, Any]] = queue.Queue()
        self.stop = threading.Event()
        self.jobs: dict[str, dict[str, Any]] = {}  # name -> latest object seen
        self.pods: dict[str, dict[str, Any]] = {}
        self.active: dict[str, _Tracked] = {}  # Job name -> what it runs
        self.log_threads: dict[str, threading.Thread] = {}  # pod uid -> follower
        self.tails: dict[str, deque[str]] = {}
        self.warned: set[tuple[str, str]] = set()
        self.outcome = RunOutcome()
        self._print_lock = threading.Lock()
        self._watches: list[Any] = []
        self._log_resps: set[Any] = set()
        self._teacher_state = "unknown"  # unknown | starting | ready | failed
        self._waiting_teacher: list[str] = []
        self._scaled_down = False

    # -- output ---------------------------------------------------------------------------------
    def emit(self, line: str) -> None:
        with self._print_lock:
            self.out.write(line + "\n")
            self.out.flush()

    def say(self, msg: str) -> None:
        self.emit(f"[bezoar] {msg}")

    # -- the main loop --------------------------------------------------------------------------
    def run(self, stages: list[str], force: bool = False) -> RunOutcome:
        for s in stages:
            spec(s)
        selected = set(stages)
        pending = list(stages)
        done: set[str] = set()
        self._start_watches()
        try:
            while True:
                # Start everything whose inputs are committed (inputs outside the selection are
                # taken as committed: the stage itself refuses with exit 2 when they are not).
                progressed = True
                while progressed and self.outcome.failed_stage is None:
                    progressed = False
                    for s in list(pending):
                        if all(i in done for i in self._inputs(s, selected)):
                            pending.remove(s)
                            progressed = True
                            if self._begin(s, force):
                                done.add(s)
                if self.outcome.failed_stage is not None:
                    break
                if not pending and not self.active and not self._waiting_teacher:
                    break
                try:
                    kind, etype, obj = self.events.get(timeout=1.0)
                except queue.Empty:
                    continue
                finished = self._handle(kind, etype, obj)
                for s in finished:
                    done.add(s)
                if self.outcome.failed_stage is not None:
                    break
        finally:
            self._stop_watches()
        if self.outcome.failed_stage is not None:
            self.emit(f"[bezoar] error: {self.outcome.describe()}")
            still = sorted({t.stage for t in self.active.values() if t.stage != self.outcome.failed_stage})
            if still:
                self.say(f"still running (left alone; the next `bezoar run` adopts them, `bezoar cancel` "
                         f"stops them): {', '.join(still)}")
        else:
            self.say(f"run {self.run_id}: {len(self.outcome.committed)} stage(s) committed, "
                     f"{len(self.outcome.skipped)} already up to date")
        return self.outcome

    def _inputs(self, stage: str, selected: set[str]) -> list[str]:
        """The selected stages ``stage`` waits for: its declared inputs; for the report (which
        reads whatever is committed and declares none), every other selected stage."""
        if STAGES[stage].family == "report":
            return [s for s in selected if s != stage]
        return [i for i in stage_inputs(stage, self.recipe) if i in selected]

    def _is_current(self, stage: str, after_run: bool = False) -> tuple[bool, str]:
        """``runner.up_to_date``, except for the report: whether it is current depends on every
        committed stage, which only ``bezoar_jobs.stages.report`` can tell, and the controller
        never imports ``stages``. So the report always runs (its stage returns at once when it is
        current) and, once its Job is Complete, counts as done when its manifest exists."""
        if STAGES[stage].family == "report":
            if not after_run:
                return False, "the report stage decides itself whether it is current"
            return (True, "committed") if read_manifest(self.store, stage) is not None else (False, "not committed")
        return up_to_date(self.store, self.recipe, stage)

    def _begin(self, stage: str, force: bool) -> bool:
        """Start ``stage``; True when it is already done (skipped)."""
        if not force:
            ok, why = self._is_current(stage)
            if ok:
                self.say(f"{stage}: skipped ({why})")
                self.outcome.skipped.append(stage)
                self._after_commit(stage)
                return True
        elif read_manifest(self.store, stage) is not None:
            self.say(f"{stage}: --force: removing its manifest so the stage reruns")
            self.store.delete(manifest_path(stage))
        if self._needs_teacher(stage) and self._teacher_state != "ready":
            self._waiting_teacher.append(stage)
            if self._teacher_state == "unknown":
                self._teacher_state = "starting"
                threading.Thread(target=self._teacher_up, name="bezoar-teacher", daemon=True).start()
            elif self._teacher_state == "failed":
                self._fail(stage, "TeacherNotReady", "the teacher Deployment is not ready", exit_code=EXIT_STAGE_FAILED)
            return False
        if is_sharded(stage, self.cluster) and self._adopt_running_commit(stage):
            return False
        self._submit(stage, "main")
        return False

    def _adopt_running_commit(self, stage: str) -> bool:
        """After a restart, a sharded stage may already be committing: adopt that Job, do not
        start the shards again next to it."""
        name = job_name(stage, self.run_id, "commit")
        existing = self._get_job(name)
        if existing is None or _condition(existing) is not None:
            return False
        if (existing["metadata"].get("labels") or {}).get(LABEL_STAGE) != stage:
            return False
        self.say(f"{stage}: adopting running Job {name}")
        self.outcome.adopted.append(name)
        self._track(name, stage, "commit", existing)
        return True

    def _handle(self, kind: str, etype: str, obj: Any) -> list[str]:
        """Apply one event; return the stages it finished."""
        if kind == "job":
            if etype == "RELIST":
                return self._relist_jobs(obj)
            return self._on_job(obj, deleted=etype == "DELETED")
        if kind == "pod":
            if etype == "RELIST":
                for p in obj:
                    self._on_pod(p)
            elif etype == "DELETED":
                self.pods.pop(obj["metadata"]["name"], None)
            else:
                self._on_pod(obj)
            return []
        if kind == "teacher":
            waiting, self._waiting_teacher = self._waiting_teacher, []
            if etype == "ready":
                self._teacher_state = "ready"
                for s in waiting:
                    self._submit(s, "main")
            else:
                self._teacher_state = "failed"
                code = EXIT_BAD_INPUT if etype == "bad" else EXIT_STAGE_FAILED
                self._fail(waiting[0] if waiting else "teacher", "TeacherNotReady", str(obj), exit_code=code)
            return []
        if kind == "watch-error":
            raise RetryableError(f"watching the run's {etype}s failed: {obj}")
        return []

    # -- Jobs -----------------------------------------------------------------------------------
    def _get_job(self, name: str) -> dict[str, Any] | None:
        ApiException = _api_exception()
        try:
            return _raw(self.batch.read_namespaced_job(name, self.ns, _preload_content=False))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _delete_and_wait(self, name: str, uid: str) -> None:
        """Delete a finished Job of this name and wait until the name is free again."""
        ApiException = _api_exception()
        with contextlib.suppress(ApiException):
            self.batch.delete_namespaced_job(name, self.ns, body={"propagationPolicy": "Background"})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            cur = self._get_job(name)
            if cur is None or cur["metadata"].get("uid") != uid:
                return
            time.sleep(0.1)
        raise RuntimeError(f"Job {name} was deleted but did not go away within 120 s")

    def _submit(self, stage: str, phase: Phase) -> None:
        """Create (or adopt) the Job running ``stage``/``phase`` and track it."""
        ApiException = _api_exception()
        body = build_job(stage, self.run_uri, self.run_id, self.cluster, self.image_digests, phase=phase)
        name = body["metadata"]["name"]
        for _attempt in range(3):
            existing = self._get_job(name)
            if existing is not None:
                labels = existing["metadata"].get("labels") or {}
                if labels.get(LABEL_STAGE) != stage or f"bezoar.dev/run={labels.get('bezoar.dev/run')}" != self.selector:
                    raise BadInput(f"a Job named {name} already exists in namespace {self.ns} but does not belong to "
                                   f"run {self.run_id} stage {stage}; delete it or use another --run-id")
                if _condition(existing) is None:
                    self.say(f"{stage}: adopting running Job {name}")
                    self.outcome.adopted.append(name)
                    self._track(name, stage, phase, existing)
                    return
                self.say(f"{stage}: deleting finished Job {name} from an earlier attempt")
                self._delete_and_wait(name, existing["metadata"]["uid"])
            try:
                created = _raw(self.batch.create_namespaced_job(self.ns, body, _preload_content=False))
            except ApiException as e:
                if e.status == 409:  # someone created it between our get and create: adopt it
                    continue
                raise
            self.say(f"{stage}: created Job {name}" + (" (shards)" if is_sharded(stage, self.cluster) and phase == "main"
                                                       else ""))
            self.outcome.created.append(name)
            self._track(name, stage, phase, created)
            return
        raise RuntimeError(f"could not create or adopt Job {name}")

    def _track(self, name: str, stage: str, phase: Phase, job: dict[str, Any]) -> None:
        self.active[name] = _Tracked(stage, phase, job["metadata"]["uid"])
        self.jobs[name] = job
        self.tails.setdefault(stage, deque(maxlen=TAIL_LINES))
        for pod in list(self.pods.values()):  # pods we saw before we knew the Job (adoption)
            self._on_pod(pod)
        self._on_job(job)

    def _relist_jobs(self, items: list[dict[str, Any]]) -> list[str]:
        finished: list[str] = []
        seen = {j["metadata"]["name"] for j in items}
        for j in items:
            finished += self._on_job(j)
        for name, t in list(self.active.items()):
            if name not in seen:
                finished += self._on_job({"metadata": {"name": name, "uid": t.uid}}, deleted=True)
        return finished

    def _on_job(self, job: dict[str, Any], deleted: bool = False) -> list[str]:
        name = job["metadata"]["name"]
        t = self.active.get(name)
        if t is None or job["metadata"].get("uid") != t.uid:
            return []  # not ours (an older Job of the same name, another stage's history)
        self.jobs[name] = job
        if deleted:
            del self.active[name]
            self._fail(t.stage, "JobDeleted", f"Job {name} was deleted while it ran (bezoar cancel, or by hand)")
            return []
        cond = _condition(job)
        if cond is None:
            return []
        del self.active[name]
        if cond["type"] == "Failed":
            self._stage_failed(t.stage, name, t.uid, cond)
            return []
        if t.phase == "main" and is_sharded(t.stage, self.cluster):
            self.say(f"{t.stage}: all {self.cluster.generationShards} shards done; committing")
            self._submit(t.stage, "commit")
            return []
        ok, why = self._is_current(t.stage, after_run=True)
        if not ok:
            reason = "NoManifest" if why == "not committed" else "StaleManifest"
            self._fail(t.stage, reason, f"Job {name} completed but the stage is not committed as expected "
                                        f"({why}: {self.store.url(manifest_path(t.stage))})",
                       jobs=[(name, t.uid)])
            return []
        self.say(f"{t.stage}: committed ({self.store.url(t.stage)})")
        self.outcome.committed.append(t.stage)
        self._after_commit(t.stage)
        return [t.stage]

    def _stage_failed(self, stage: str, name: str, uid: str, cond: dict[str, Any]) -> None:
        reason = cond.get("reason") or "Failed"
        message = cond.get("message") or ""
        codes = self._exit_codes(name, uid)
        # Our podFailurePolicy's only FailJob rule is "the stage exited 2" (bad input).
        bad_input = reason == "PodFailurePolicy" or (codes and codes[-1] == 2)
        if codes:
            message += f" (exit code{'s' if len(codes) > 1 else ''} of its pods: {', '.join(map(str, codes))})"
        self._fail(stage, reason, f"Job {name}: {message}", exit_code=EXIT_BAD_INPUT if bad_input else EXIT_STAGE_FAILED,
                   jobs=[(name, uid)])

    def _exit_codes(self, name: str, uid: str) -> list[int]:
        codes = []
        for pod in self._pods_of(name, uid):
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                term = (cs.get("state") or {}).get("terminated")
                if cs.get("name") == CONTAINER and term and term.get("exitCode") is not None:
                    codes.append(term["exitCode"])
        return codes

    def _pods_of(self, job: str, uid: str) -> list[dict[str, Any]]:
        """The Job's pods, fresh from the API (the watch may lag the Job's condition)."""
        try:
            data = _raw(self.core.list_namespaced_pod(self.ns, label_selector=f"controller-uid={uid}",
                                                      _preload_content=False))
            items = data.get("items", [])
        except Exception:  # the report is best effort; the failure itself is already known
            items = [p for p in self.pods.values() if (p["metadata"].get("labels") or {}).get("controller-uid") == uid]
        return sorted(items, key=lambda p: p["metadata"].get("creationTimestamp") or "")

    def _fail(self, stage: str, reason: str, message: str, exit_code: int = EXIT_STAGE_FAILED,
              jobs: list[tuple[str, str]] | None = None) -> None:
        if self.outcome.failed_stage is not None:
            return
        self.outcome.failed_stage = stage
        self.outcome.reason = reason
        self.outcome.message = message
        self.outcome.exit_code = exit_code
        self.outcome.last_log_lines = self._last_lines(stage, jobs or [])

    def _last_lines(self, stage: str, jobs: list[tuple[str, str]]) -> list[str]:
        """The stage's last log lines: wait briefly for its followers, fetch logs they never got."""
        pods = [p for name, uid in jobs for p in self._pods_of(name, uid)]
        for pod in pods:
            uid = pod["metadata"]["uid"]
            t = self.log_threads.get(uid)
            if t is not None:
                t.join(timeout=5)
            elif self._container_started(pod):
                # The Job failed before the watch showed us this pod: read what it wrote.
                with contextlib.suppress(Exception):
                    resp = self.core.read_namespaced_pod_log(pod["metadata"]["name"], self.ns, container=CONTAINER,
                                                             tail_lines=TAIL_LINES, _preload_content=False)
                    text = resp.data.decode("utf-8", "replace")
                    resp.release_conn()
                    tail = self.tails.setdefault(stage, deque(maxlen=TAIL_LINES))
                    tail.extend(text.splitlines())
        return list(self.tails.get(stage, ()))

    # -- pods and logs --------------------------------------------------------------------------
    @staticmethod
    def _container_started(pod: dict[str, Any]) -> bool:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            state = cs.get("state") or {}
            if "running" in state or "terminated" in state:
                return True
        return False

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
                self.say(f"{t.stage}: pod {meta['name']} cannot start: {waiting['reason']}: {waiting.get('message', '')}")
        if meta["uid"] not in self.log_threads and self._container_started(pod):
            index = (meta.get("annotations") or {}).get("batch.kubernetes.io/job-completion-index")
            prefix = f"[{t.stage}#{index}]" if index is not None and t.phase == "main" and is_sharded(
                t.stage, self.cluster) else f"[{t.stage}]"
            th = threading.Thread(target=self._follow, args=(meta["name"], t.stage, prefix),
                                  name=f"bezoar-log-{meta['name']}", daemon=True)
            self.log_threads[meta["uid"]] = th
            th.start()

    def _follow(self, pod: str, stage: str, prefix: str) -> None:
        """Stream one pod's log until the container ends (the API closes the stream then)."""
        from kubernetes.watch.watch import iter_resp_lines

        tail = self.tails.setdefault(stage, deque(maxlen=TAIL_LINES))
        try:
            resp = self.core.read_namespaced_pod_log(pod, self.ns, container=CONTAINER, follow=True,
                                                     _preload_content=False)
        except Exception as e:  # a missing log is reported, never fatal
            self.say(f"{stage}: cannot stream the log of pod {pod}: {getattr(e, 'reason', e)}")
            return
        self._log_resps.add(resp)
        try:
            for line in iter_resp_lines(resp):
                tail.append(line)
                self.emit(f"{prefix} {line}")
        except Exception as e:  # the stream broke (pod deleted, connection lost)
            if not self.stop.is_set():
                self.say(f"{stage}: log stream of pod {pod} ended early: {type(e).__name__}")
        finally:
            self._log_resps.discard(resp)
            with contextlib.suppress(Exception):
                resp.release_conn()

    # -- watches --------------------------------------------------------------------------------
    def _list(self, kind: str) -> tuple[list[dict[str, Any]], str]:
        fn = self.batch.list_namespaced_job if kind == "job" else self.core.list_namespaced_pod
        data = _raw(fn(self.ns, label_selector=self.selector, _preload_content=False))
        return data.get("items", []), data["metadata"]["resourceVersion"]

    def _start_watches(self) -> None:
        for kind in ("job", "pod"):
            items, rv = self._list(kind)
            for obj in items:
                if kind == "job":
                    self.jobs[obj["metadata"]["name"]] = obj
                else:
                    self.pods[obj["metadata"]["name"]] = obj
            th = threading.Thread(target=self._watch, args=(kind, rv), name=f"bezoar-watch-{kind}", daemon=True)
            th.start()

    def _stop_watches(self) -> None:
        self.stop.set()
        for w in list(self._watches):
            with contextlib.suppress(Exception):
                w.stop()
        # Let followers of finished pods print their last lines, then stop streaming the logs of
        # Jobs still running (after a failure elsewhere): once `bezoar run` has returned, nothing
        # of it should still be printing.
        deadline = time.monotonic() + 3
        for th in list(self.log_threads.values()):
            th.join(timeout=max(0.0, deadline - time.monotonic()))
        for resp in list(self._log_resps):
            with contextlib.suppress(Exception):
                resp.shutdown()

    def _watch(self, kind: str, rv: str) -> None:
        """Stream events from ``rv``; re-list (and re-announce everything) on 410 Gone.

        Runs in a thread and never raises: a failure it cannot recover from becomes a
        ``watch-error`` event that stops the run in the main thread."""
        try:
            self._watch_loop(kind, rv)
        except Exception as e:
            if not self.stop.is_set():
                self.events.put(("watch-error", kind, e))

    def _watch_loop(self, kind: str, rv: str) -> None:
        from kubernetes import watch

        ApiException = _api_exception()
        api_fn = self.batch.list_namespaced_job if kind == "job" else self.core.list_namespaced_pod

        def fn(*args: Any, **kwargs: Any) -> Any:
            # Unannotated on purpose: Watch then hands events over as plain dicts instead of
            # deserialising them into the client's models, which refuse fields newer than the
            # client (a newer API server would otherwise break the watch).
            return api_fn(*args, **kwargs)

        failures = 0
        while not self.stop.is_set():
            w = watch.Watch()
            self._watches.append(w)
            try:
                for ev in w.stream(fn, self.ns, label_selector=self.selector, resource_version=rv,
                                   allow_watch_bookmarks=True, timeout_seconds=self.watch_timeout_s,
                                   _request_timeout=(10, self.watch_timeout_s + 30)):
                    if self.stop.is_set():
                        break
                    failures = 0
                    if ev["type"] == "BOOKMARK":
                        rv = ev["raw_object"]["metadata"]["resourceVersion"]
                        continue
                    obj = ev["raw_object"]
                    rv = obj["metadata"]["resourceVersion"]
                    self.events.put((kind, ev["type"], obj))
            except ApiException as e:
                if self.stop.is_set():
                    return
                if e.status == 410:  # our resourceVersion is too old: list again, then watch from there
                    items, rv = self._list(kind)
                    self.events.put((kind, "RELIST", items))
                    continue
                failures += 1
                if failures > 5 or e.status in (401, 403):
                    self.events.put(("watch-error", kind, e))
                    return
                time.sleep(min(5.0, 0.2 * 2**failures))
            except Exception as e:  # connection dropped: resume from the last resourceVersion
                if self.stop.is_set():
                    return
                failures += 1
                if failures > 5:
                    self.events.put(("watch-error", kind, e))
                    return
                time.sleep(min(5.0, 0.2 * 2**failures))
            finally:
                with contextlib.suppress(ValueError):
                    self._watches.remove(w)

    # -- the teacher ----------------------------------------------------------------------------
    def _needs_teacher(self, stage: str) -> bool:
        return bool(self.cluster.teacher.deployment) and "teacher" in STAGES[stage].needs

    def _teacher_up(self) -> None:
        """Scale the teacher up if it is at 0 and wait until a replica is ready (in a thread)."""
        ApiException = _api_exception()
        t = self.cluster.teacher
        try:
            scale = _raw(self.apps.read_namespaced_deployment_scale(t.deployment, self.ns, _preload_content=False))
            if not (scale.get("spec") or {}).get("replicas"):
                self.say(f"teacher: scaling Deployment {t.deployment} to {t.replicas}")
                self.apps.patch_namespaced_deployment_scale(t.deployment, self.ns, {"spec": {"replicas": t.replicas}},
                                                            _preload_content=False).release_conn()
            if t.waitReady:
                self.say(f"teacher: waiting for Deployment {t.deployment} to be ready")
                deadline = time.monotonic() + self.teacher_timeout_s
                polls = 0
                while not self.stop.is_set():
                    dep = _raw(self.apps.read_namespaced_deployment(t.deployment, self.ns, _preload_content=False))
                    st = dep.get("status") or {}
                    fresh = (st.get("observedGeneration") or 0) >= (dep["metadata"].get("generation") or 0)
                    if fresh and (st.get("readyReplicas") or 0) >= 1:
                        break
                    if time.monotonic() > deadline:
                        self.events.put(("teacher", "failed", f"Deployment {t.deployment} had no ready replica after "
                                                              f"{self.teacher_timeout_s:.0f} s"))
                        return
                    # quick at first (a warm server is ready in a second), then every teacher_poll_s
                    polls += 1
                    time.sleep(min(self.teacher_poll_s, 0.1 * 2**polls))
                self.say(f"teacher: Deployment {t.deployment} is ready")
            self.events.put(("teacher", "ready", None))
        except ApiException as e:
            bad = e.status in (403, 404)
            self.events.put(("teacher", "bad" if bad else "failed",
                             f"Deployment {self.ns}/{t.deployment}: {e.status} {e.reason}"))
        except Exception as e:  # reported as the waiting stage's failure
            self.events.put(("teacher", "failed", f"Deployment {self.ns}/{t.deployment}: {e}"))

    def _after_commit(self, stage: str) -> None:
        """Scale the teacher to 0 once every generate stage of the pipeline is committed."""
        t = self.cluster.teacher
        if self._scaled_down or not t.deployment or not t.scaleDownAfterGeneration or STAGES[stage].family != "generate":
            return
        generate = [s for s, sp in STAGES.items() if sp.family == "generate"]
        if any(t.stage in generate for t in self.active.values()):
            return  # a generate Job of this run is still going (it may have committed, not ended)
        if any(read_manifest(self.store, s) is None for s in generate):
            return
        self._scaled_down = True
        ApiException = _api_exception()
        try:
            scale = _raw(self.apps.read_namespaced_deployment_scale(t.deployment, self.ns, _preload_content=False))
            if (scale.get("spec") or {}).get("replicas"):
                self.apps.patch_namespaced_deployment_scale(t.deployment, self.ns, {"spec": {"replicas": 0}},
                                                            _preload_content=False).release_conn()
                self.say(f"teacher: every generate stage is committed; scaled Deployment {t.deployment} to 0")
        except ApiException as e:  # a teacher left running costs money but breaks nothing: say so, go on
            self.say(f"teacher: could not scale Deployment {t.deployment} to 0: {e.status} {e.reason}")


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
) -> int:
    """``bezoar run --executor kubernetes``: run ``stages`` of the run as Jobs; return the exit code.

    ``out`` receives the controller's messages and the stages' log lines (default stdout);
    ``on_outcome`` receives the :class:`RunOutcome` (tests and tools that want the details).
    """
    out = out or sys.stdout
    ApiException = _api_exception()
    try:
        recipe = parse_recipe(recipe_text, recipe_source)
        rid = run_id or run_id_from_uri(run_uri)
        short_run_id(rid)
        for s in stages:
            spec(s)
            job_name(s, rid)  # refuses a stage the Job builder does not know
        store = open_store(run_uri)
        api = api_client if api_client is not None else make_api_client()
        freeze_recipe(store, recipe_text, recipe_source)
        out.write(f"[bezoar] run {rid}: recipe frozen at {store.url('recipe.yaml')}; stages: {', '.join(stages)}\n")
        ctl = Controller(api, cluster, run_uri, rid, store, recipe, out=out, image_digests=image_digests)
        outcome = ctl.run(stages, force)
    except BezoarError as e:
        out.write(f"[bezoar] error: {e}\n")
        out.flush()
        return e.exit_code
    except ApiException as e:
        out.write(f"[bezoar] error: Kubernetes API: {e.status} {e.reason}: {(e.body or '')[:500]}\n")
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
    ApiException = _api_exception()
    try:
        rid = run_id or run_id_from_uri(run_uri)
        selector = run_selector(rid)
        api = api_client if api_client is not None else make_api_client()
        batch = client.BatchV1Api(api)
        data = _raw(batch.list_namespaced_job(cluster.namespace, label_selector=selector, _preload_content=False))
        names = sorted(j["metadata"]["name"] for j in data.get("items", []))
        for name in names:
            try:
                batch.delete_namespaced_job(name, cluster.namespace, body={"propagationPolicy": "Background"},
                                            _preload_content=False).release_conn()
            except ApiException as e:
                if e.status != 404:  # already gone is what we wanted
                    raise
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
        out.write(f"[bezoar] error: Kubernetes API: {e.status} {e.reason}\n")
        return _api_error_code(e)
