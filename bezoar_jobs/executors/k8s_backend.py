"""The Kubernetes backend of the scheduler: one :class:`KubernetesBackend` per ``bezoar run
--executor kubernetes`` creates, adopts and watches the run's Jobs (what it does for each stage is
described in :mod:`bezoar_jobs.executors.kubernetes`, which holds the entry points).

It is over 500 lines because a training group run as a JobSet or TrainJob is tracked here beside the Jobs (the
same active set, events, cancel and failure report); the API calls of those kinds live in k8s_groups.py."""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from ..errors import RetryableError
from ..llm.budget import mark_done, mark_live, party_names
from ..recipe import Recipe
from ..run_control import EXIT_CANCELLED, cancelled, write_controller_status
from ..store import Store
from .cluster import TEACHER_STAGES, ClusterSettings
from .distributed import group_objects, headless_service, is_group, service_name
from .jobs import COMPLETION_INDEX_ANNOTATION, Phase, build_job, is_sharded, job_name, run_selector, short_run_id
from .k8s_api import condition, raw
from .k8s_diagnose import Diagnosis
from .k8s_groups import POD_GROUP_LABEL, RESTART_ATTEMPT_LABEL, GroupApi, group_condition
from .k8s_jobs import Event, JobApi, RunWatch, pod_job
from .k8s_logs import LogFollower
from .k8s_retry import ApiRetry
from .k8s_teacher import TeacherLifecycle
from .scheduler import (
    EXIT_BAD_INPUT,
    EXIT_STAGE_FAILED,
    RunOutcome,
    StageEvent,
    cluster_parties,
    on_teacher_server,
    party_stages,
)

CANCEL_LOOK_S = 5.0  # how often a running controller reads the run's cancel mark


@dataclass
class _Tracked:
    stage: str
    phase: Phase
    uid: str
    job: dict[str, Any]
    kind: str = "job"  # or the group kind of distributed.launcher: jobset, trainjob
    restarts: int = 0
    children: dict[str, dict[str, Any]] = field(default_factory=dict)  # a group's Jobs, by name


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
        recipe: Recipe | None = None,
        stages: Sequence[str] | None = None,
        controller_uid: str | None = None,
        teacher_timeout_s: float | None = None,
        teacher_poll_s: float = 2.0,
        watch_timeout_s: int = 240,
        api_outage_s: float | None = None,
        api_backoff_cap_s: float = 30.0,
        report_pending_s: float | None = None,
        tick_s: float = 2.0,
        log_reconnect_s: float = 1.0,
        watch_groups: bool = False,
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
        self.recipe = recipe
        # the stages whose pods call the teacher's server: the teacher stages, and the filters when the judge is it
        self.parties = party_stages(recipe, cluster.teacher.url or None, {}) if recipe is not None else TEACHER_STAGES
        # and every stage that needs it up: an MT-Bench judge on it too (brought up again after training)
        self.calls = on_teacher_server(recipe, cluster.teacher.url or None, {}) if recipe is not None else self.parties
        # how many of their pods run at once in this run (its pods' BEZOAR_TEACHER_PARTIES): the run's selection,
        # not every stage of the recipe (a run of one generate stage waited for two parties that never came, on a
        # third of the teacher)
        self.teacher_parties = cluster_parties(cluster, recipe, stages) if stages is not None \
            else cluster_parties(cluster, recipe)
        self.controller_uid = controller_uid
        self.events: queue.Queue[Event] = queue.Queue()
        self.stop = threading.Event()
        self._print_lock = threading.Lock()
        tolerance = api_outage_s if api_outage_s is not None else cluster.controller.apiOutageToleranceSeconds
        self.retry = ApiRetry(tolerance, self.say, self.stop, cap_s=api_backoff_cap_s)
        batch, core = client.BatchV1Api(api_client), client.CoreV1Api(api_client)
        self.jobs = JobApi(batch, core, self.ns, short_run_id(run_id), self.retry, controller_uid)
        # training groups as JobSets or TrainJobs (k8s_groups.py): watched beside the Jobs when the run has any
        self.launcher = cluster.distributed.launcher
        self.groups = GroupApi(client.CustomObjectsApi(api_client), core, self.ns, short_run_id(run_id), self.launcher,
                               self.retry, controller_uid) if self.launcher != "job" else None
        extra = {"group": self.groups.list_fn()} if self.groups is not None and watch_groups else {}
        self.watch = RunWatch(batch, core, self.ns, run_selector(run_id), self.events, self.stop, watch_timeout_s,
                              self.retry, extra)
        self.logs_ = LogFollower(core, self.ns, self.emit, self.say, self.stop, self.retry, log_reconnect_s)
        self.teacher = TeacherLifecycle(client.AppsV1Api(api_client), core, self.ns, cluster.teacher,
                                        short_run_id(run_id), self.say, self.events, self.stop, self.retry,
                                        teacher_timeout_s, teacher_poll_s)
        self.diag = Diagnosis(core, client.CustomObjectsApi(api_client), self.ns, self.say, self.retry,
                              report_pending_s if report_pending_s is not None
                              else cluster.controller.pendingReportSeconds, cluster.kueue.queueName)
        self.tick_s = tick_s
        self._next_tick = 0.0
        self._next_cancel_look = 0.0
        self._status_written = 0.0
        self.pods: dict[str, dict[str, Any]] = {}
        self.active: dict[str, _Tracked] = {}  # Job name -> what it runs
        self._waiting_teacher: list[str] = []
        self._ended: list[StageEvent] = []
        self._cancelled = False

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
        if self._check_cancelled():
            self._ended.append(self._cancelled_event(stage))
            return
        if self.teacher.managed and stage in self.calls and self.teacher.state != "ready":
            if self.teacher.state == "failed":
                self._ended.append(StageEvent(stage, EXIT_STAGE_FAILED, "TeacherNotReady",
                                              "the teacher Deployment is not ready"))
                return
            self._waiting_teacher.append(stage)
            self.teacher.request()
            return
        if is_sharded(stage, self.cluster) and self._adopt_running_commit(stage):
            return
        if self.teacher_parties > 1:
            self._mark_parties(stage, mark_live)  # the pods running give up its share before its pods start
        self._submit(stage, "main")

    def _mark_parties(self, stage: str, mark: Callable[[Store, str], None]) -> None:
        """Mark each of ``stage``'s pods on the teacher's board (llm/budget.py), when it calls the teacher's server
        (an MT-Bench judge on it too: it takes a share of the capacity)."""
        if stage in self.calls:
            for party in party_names(stage, self.cluster.generationShards if is_sharded(stage, self.cluster) else 1):
                mark(self.store, party)

    def wait(self, timeout: float) -> list[StageEvent]:
        if not self._ended:
            self._tick()
        if not self._ended:
            try:
                kind, etype, obj = self.events.get(timeout=min(timeout, self.tick_s))
            except queue.Empty:
                return []
            self._handle(kind, etype, obj)
        out, self._ended = self._ended, []
        if self.teacher_parties > 1:
            for ev in out:
                if ev.exit_code != 0:  # ended for good (a Job's retries are its own): it asks the teacher nothing more
                    self._mark_parties(ev.stage, mark_done)
        return out

    def stage_done(self, stage: str, skipped: bool, pending: Sequence[str] = ()) -> None:
        self.diag.forget(stage, "Succeeded")
        # its pods are counted among the teacher's parties: skipped, they ask nothing; a pod that finished without
        # opening its client (everything resumed) never marked itself done
        if skipped or self.teacher_parties > 1:
            self._mark_parties(stage, mark_done)
        if stage in self.calls:
            self.teacher.after_generation(self.running(), pending, self.parties, self.calls)

    def running(self) -> list[str]:
        return sorted({t.stage for t in self.active.values()} | set(self._waiting_teacher)
                      | {ev.stage for ev in self._ended})

    def cancel(self) -> None:
        self._delete_run()

    def _delete_run(self) -> None:
        """The run's groups first (else their controller would make their Jobs again), then its Jobs."""
        if self.groups is not None:
            self.groups.delete_run(run_selector(self.run_id))
        self.jobs.delete_run_jobs(run_selector(self.run_id))

    def logs(self, stage: str) -> list[str]:
        return list(self.logs_.tails.get(stage, ()))

    def close(self) -> None:
        self._write_status(force=True)
        self.watch.close()
        self.logs_.close()

    def finish(self, outcome: RunOutcome) -> None:
        """After the run: a run that stopped still holding the teacher gives its lease back (and the
        teacher goes to 0 when no other run holds it), so a failed run does not keep GPUs busy."""
        if self.teacher.held:
            why = f"the run stopped ({outcome.failed_stage}: {outcome.reason})" if outcome.failed_stage else \
                "the run is done"
            self.teacher.release(scale_down=self.cluster.teacher.scaleDownAfterGeneration, why=why)

    # -- periodic checks ------------------------------------------------------------------------
    def _tick(self) -> None:
        now = time.monotonic()
        if now < self._next_tick:
            return
        self._next_tick = now + self.tick_s
        look = now >= self._next_cancel_look  # the store is asked at most every CANCEL_LOOK_S
        if look:
            self._next_cancel_look = now + max(self.tick_s, CANCEL_LOOK_S)
        if look and self._check_cancelled():
            for t in list(self.active.values()):
                self._ended.append(self._cancelled_event(t.stage))
            self.active.clear()
            for s in self._waiting_teacher:
                self._ended.append(self._cancelled_event(s))
            self._waiting_teacher = []
            with contextlib.suppress(Exception):  # the canceller deletes them too
                self._delete_run()
            return
        for name, t in list(self.active.items()):
            if t.kind != "job":
                verdict = self._check_children(t)
                if verdict is not None:  # its pods may not be created (Pod Security): it would wait forever
                    del self.active[name]
                    self._ended.append(StageEvent(t.stage, EXIT_BAD_INPUT, verdict.reason, verdict.message))
                    continue
                if look:
                    self._look_at_restarts(name, t)
                    if "group" not in self.watch.extra and self.groups is not None:  # not watched: ask
                        obj = self.groups.get(name)
                        self._on_group(obj if obj is not None else {"metadata": {"name": name, "uid": t.uid}},
                                       deleted=obj is None)
                continue
            has_pods = any(pod_job(p)[1] == t.uid for p in self.pods.values())
            verdict = self.diag.check_job(t.stage, t.job, has_pods)
            if verdict is not None:
                del self.active[name]
                self._ended.append(StageEvent(t.stage, EXIT_BAD_INPUT, verdict.reason, verdict.message))
        self._write_status()

    def _check_cancelled(self) -> bool:
        if not self._cancelled:
            try:
                self._cancelled = cancelled(self.store) is not None
            except Exception:  # the store is checked again at the next tick
                return False
        return self._cancelled

    def _cancelled_event(self, stage: str) -> StageEvent:
        return StageEvent(stage, EXIT_CANCELLED, "Cancelled",
                          f"run {self.run_id} was cancelled (bezoar cancel); its Jobs are deleted")

    def _write_status(self, force: bool = False) -> None:
        now = time.monotonic()
        if not (force or (self.diag.changed and now - self._status_written >= 5.0)):
            return
        self._status_written = now
        with contextlib.suppress(Exception):  # status is for people; never stop a run over it
            write_controller_status(self.store, {
                "run_id": self.run_id, "namespace": self.ns,
                "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "stages": self.diag.snapshot(),
            })

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
                    self.submit(s)
            else:
                self.teacher.state = "failed"
                code = EXIT_BAD_INPUT if etype == "bad" else EXIT_STAGE_FAILED
                for s in waiting:
                    self._ended.append(StageEvent(s, code, "TeacherNotReady", str(obj)))
        elif kind == "group":
            if etype == "RELIST":
                seen = {o["metadata"]["name"] for o in obj}
                for o in obj:
                    self._on_group(o)
                for name, t in list(self.active.items()):
                    if t.kind != "job" and name not in seen:
                        self._on_group({"metadata": {"name": name, "uid": t.uid}}, deleted=True)
            else:
                self._on_group(obj, deleted=etype == "DELETED")
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
        body = build_job(stage, self.run_uri, self.run_id, self.cluster, self.image_digests, phase=phase,
                         recipe=self.recipe, controller_uid=self.controller_uid, parties=self.teacher_parties)
        name = body["metadata"]["name"]
        group = is_group(stage, self.cluster)
        if group and self.groups is not None:
            self._submit_group(stage, body)
            return
        if group:  # a training group: its pods find node 0 through a headless Service (distributed.py)
            self.jobs.ensure_group_service(headless_service(body, self.cluster))
        job, how = self.jobs.create_or_adopt(
            body, stage, on_replace=lambda n: self.say(f"{stage}: deleting finished Job {n} from an earlier attempt"))
        if group and how == "created":
            self.jobs.own_service(service_name(name), job)
        if how == "failed":
            self.say(f"{stage}: Job {name} already failed under this controller Job; not running it again")
            cond = condition(job) or {}
            self._ended.append(self._failed(stage, name, job["metadata"]["uid"], cond))
            return
        if how == "adopted":
            self.say(f"{stage}: adopting running Job {name}")
            self.outcome.adopted.append(name)
        else:
            self.say(
                f"{stage}: created Job {name}"
                + (" (shards)" if is_sharded(stage, self.cluster) and phase == "main" else "")
            )
            self.outcome.created.append(name)
            # a cancel that came between the check in submit() and the create: undo our own create
            self._cancelled = False
            if self._check_cancelled():
                with contextlib.suppress(Exception):
                    self.jobs.delete_and_wait(name, job["metadata"]["uid"], timeout=30)
                self._ended.append(self._cancelled_event(stage))
                return
        self._track(name, stage, phase, job)

    def _track(self, name: str, stage: str, phase: Phase, job: dict[str, Any], kind: str = "job") -> None:
        self.active[name] = _Tracked(stage, phase, job["metadata"]["uid"], job, kind)
        self.diag.track(stage, name)
        self.logs_.tail(stage)
        for pod in list(self.pods.values()):  # pods we saw before we knew the Job (adoption)
            self._on_pod(pod)
        if kind == "job":
            self._on_job(job)
        else:
            self.active[name].restarts = self._restarts(name)
            with contextlib.suppress(Exception):  # an adopted group's Jobs (new ones arrive as watch events)
                found = raw(self.retry.call("list the group's Jobs", self.jobs.batch.list_namespaced_job, self.ns,
                                            label_selector=f"{POD_GROUP_LABEL}={name}", _preload_content=False))
                self.active[name].children = {j["metadata"]["name"]: j for j in found.get("items", [])}
            self._on_group(job)

    # -- training groups as JobSets / TrainJobs (k8s_groups.py) ---------------------------------
    def _submit_group(self, stage: str, job: dict[str, Any]) -> None:
        """Create (or adopt) the JobSet or TrainJob of a training group and track it as the stage."""
        assert self.groups is not None
        (body,) = group_objects(job, stage, self.cluster)
        name, what = body["metadata"]["name"], body["kind"]
        obj, how = self.groups.create_or_adopt(body, stage, on_replace=lambda n: self.say(
            f"{stage}: deleting finished {what} {n} from an earlier attempt"))
        if how == "failed":
            self.say(f"{stage}: {what} {name} already failed under this controller Job; not running it again")
            self._ended.append(self._failed_group(stage, name, group_condition(obj, self.groups.kind) or {}))
            return
        if how == "adopted":
            self.say(f"{stage}: adopting running {what} {name}")
            self.outcome.adopted.append(name)
        else:
            self.say(f"{stage}: created {what} {name}")
            self.outcome.created.append(name)
            self._cancelled = False
            if self._check_cancelled():
                with contextlib.suppress(Exception):
                    self.groups.delete_and_wait(name, obj["metadata"]["uid"], timeout=30)
                self._ended.append(self._cancelled_event(stage))
                return
        self._track(name, stage, "main", obj, kind=self.launcher)

    def _check_children(self, t: _Tracked) -> Any:
        """The pending-pod diagnosis of a running (not suspended) Job of the group: refused pods end the stage."""
        for child in list(t.children.values()):
            if (child.get("spec") or {}).get("suspend") or condition(child) is not None:
                continue  # suspended: the group object is what Kueue admits; finished: nothing to create
            uid = child["metadata"].get("uid")
            verdict = self.diag.check_job(t.stage, child, any(pod_job(p)[1] == uid for p in self.pods.values()))
            if verdict is not None:
                return verdict
        return None

    def _restarts(self, name: str) -> int:
        try:
            return self.groups.restarts(name) if self.groups is not None else 0
        except Exception:  # for the report only
            return 0

    def _look_at_restarts(self, name: str, t: _Tracked, known: int | None = None) -> None:
        n = self._restarts(name) if known is None else known
        if n > t.restarts:
            t.restarts = n
            self.say(f"{t.stage}: {t.job.get('kind', 'group')} {name}: a Job of the group failed; the whole group "
                     f"restarts (restart {n} of at most {self.cluster.scheduling_for(t.stage).backoffLimit})")

    def _on_group(self, obj: dict[str, Any], deleted: bool = False) -> None:
        name = obj["metadata"]["name"]
        t = self.active.get(name)
        if t is None or t.kind == "job" or obj["metadata"].get("uid") != t.uid:
            return
        if deleted:
            del self.active[name]
            self._cancelled = False
            if self._check_cancelled():
                self._ended.append(self._cancelled_event(t.stage))
                return
            self._ended.append(StageEvent(t.stage, EXIT_STAGE_FAILED, "Deleted",
                                          f"{t.job.get('kind', 'group')} {name} was deleted while it ran (by hand?)",
                                          self.logs_.last_lines(t.stage, self._group_pods(name))))
            return
        t.job = obj
        assert self.groups is not None
        if obj.get("kind") == "JobSet":
            self._look_at_restarts(name, t, int((obj.get("status") or {}).get("restarts") or 0))
        cond = group_condition(obj, self.groups.kind)
        if cond is None:
            return
        del self.active[name]
        if cond["type"] == "Failed":
            self.diag.failed(t.stage, cond.get("reason") or "Failed", cond.get("message") or "")
            self._ended.append(self._failed_group(t.stage, name, cond))
        else:
            self._ended.append(StageEvent(t.stage, 0, "Complete", f"{obj.get('kind', 'group')} {name} completed"))

    def _group_pods(self, name: str) -> list[dict[str, Any]]:
        fresh = self.groups.pods(name) if self.groups is not None else []
        return fresh or [p for p in self.pods.values()
                         if ((p["metadata"].get("labels") or {}).get(POD_GROUP_LABEL) == name)]

    def _failed_group(self, stage: str, name: str, cond: dict[str, Any]) -> StageEvent:
        """One line: the kind and name, the condition's reason and message, restarts, the pods' exit codes."""
        assert self.groups is not None
        what = self.groups.kind.kind
        reason = cond.get("reason") or "Failed"
        message = cond.get("message") or ""
        pods = self._group_pods(name)
        codes = [int(term["exitCode"]) for p in pods for cs in (p.get("status") or {}).get("containerStatuses") or []
                 if (term := (cs.get("state") or {}).get("terminated")) and term.get("exitCode") is not None]
        restarts = self._restarts(name)
        # our JobSet's only FailJobSet rule is "a child Job failed by its podFailurePolicy" (the stage exited 2)
        bad_input = reason == "FailJobSetFailurePolicyAction" or bool(codes and codes[-1] == 2)
        message += f"; the group was restarted {restarts} time{'s' if restarts != 1 else ''}"
        if codes:
            message += f" (exit code{'s' if len(codes) > 1 else ''} of its last pods: {', '.join(map(str, codes))})"
        return StageEvent(stage, EXIT_BAD_INPUT if bad_input else EXIT_STAGE_FAILED, reason,
                          f"{what} {name}: {message}", self.logs_.last_lines(stage, pods))

    def _relist_jobs(self, items: list[dict[str, Any]]) -> None:
        seen = {j["metadata"]["name"] for j in items}
        for j in items:
            self._on_job(j)
        for name, t in list(self.active.items()):
            if name not in seen and t.kind == "job":
                self._on_job({"metadata": {"name": name, "uid": t.uid}}, deleted=True)

    def _on_job(self, job: dict[str, Any], deleted: bool = False) -> None:
        name = job["metadata"]["name"]
        group = (job["metadata"].get("labels") or {}).get(POD_GROUP_LABEL)
        g = self.active.get(group) if group else None
        if g is not None and g.kind != "job":  # a child Job of a group: the Jobs of a restart carry its number
            if deleted:
                g.children.pop(name, None)
            else:
                g.children[name] = job
            attempt = (job["metadata"].get("labels") or {}).get(RESTART_ATTEMPT_LABEL, "0")
            self._look_at_restarts(group, g, int(attempt) if attempt.isdigit() else None)  # type: ignore[arg-type]
            return
        t = self.active.get(name)
        if t is None or t.kind != "job" or job["metadata"].get("uid") != t.uid:
            return  # not ours (an older Job of the same name, another stage's history)
        if deleted:
            del self.active[name]
            self._cancelled = False
            if self._check_cancelled():
                self._ended.append(self._cancelled_event(t.stage))
                return
            self._ended.append(StageEvent(t.stage, EXIT_STAGE_FAILED, "JobDeleted",
                                          f"Job {name} was deleted while it ran (by hand?)",
                                          self._last_lines(t.stage, t.uid)))
            return
        t.job = job
        cond = condition(job)
        if cond is None:
            return
        del self.active[name]
        if cond["type"] == "Failed":
            self.diag.failed(t.stage, cond.get("reason") or "Failed", cond.get("message") or "")
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
        group = (meta.get("labels") or {}).get(POD_GROUP_LABEL)
        g = self.active.get(group) if group else None
        if g is not None and g.kind != "job":  # a pod of a JobSet / TrainJob group
            self.diag.on_pod(g.stage, pod)
            self.logs_.follow(pod, g.stage, f"[{g.stage}]")
            return
        job, uid = pod_job(pod)
        t = self.active.get(job)
        if t is None or uid != t.uid:
            return
        self.diag.on_pod(t.stage, pod)
        index = (meta.get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION)
        sharded = index is not None and t.phase == "main" and is_sharded(t.stage, self.cluster)
        self.logs_.follow(pod, t.stage, f"[{t.stage}#{index}]" if sharded else f"[{t.stage}]")
