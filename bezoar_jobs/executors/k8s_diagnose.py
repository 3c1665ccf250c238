"""Why a stage is not running, said out loud: the controller's view of its Jobs and pods.

A Job that cannot start does not fail; it waits, until its deadline or forever. This module turns
what the cluster knows into log lines and into ``<run>/_control/status.json`` (``bezoar status``
shows it):

- **Unschedulable pods**: a pod whose ``PodScheduled`` condition is False, with the scheduler's
  message ("0/3 nodes are available: 3 Insufficient nvidia.com/gpu ..."), refined by the newest
  ``FailedScheduling`` event of the pod (cluster autoscalers add theirs there). Reported at once
  and whenever the reason changes; the Job keeps waiting (capacity may appear).
- **Pods that cannot start** (image pull errors, a missing Secret): the kubelet's waiting reason.
- **Pods the Job controller may not create** (``FailedCreate`` events on the Job): a Pod Security
  refusal ("violates PodSecurity ...") cannot cure itself, so the stage fails at once with exit 2
  (``PodSecurity``); any other refusal (a ResourceQuota) is reported and waited out.
- **Kueue**: a Job created suspended for a queue is waiting for admission. Its Kueue Workload
  (``kueue.x-k8s.io/job-uid=<uid>``, API v1beta2 or v1beta1) says why (``QuotaReserved`` /
  ``Admitted`` conditions: no quota, a LocalQueue that does not exist ...). When no Workload API
  exists at all, Kueue is not installed and nothing will ever unsuspend the Job: the stage fails with
  exit 2 (``KueueNotInstalled``).

Reads need, besides the Job and pod permissions: ``events`` get/list, and ``workloads``
(kueue.x-k8s.io) get/list when a queue is configured (the chart's Role grants both).
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .k8s_api import api_exception, raw
from .k8s_retry import ApiRetry
from .k8s_teacher import pod_problem

KUEUE_GROUP = "kueue.x-k8s.io"
KUEUE_VERSIONS = ("v1beta2", "v1beta1")
KUEUE_JOB_UID = "kueue.x-k8s.io/job-uid"


@dataclass
class StageView:
    """What the controller last saw of one stage's Job."""

    job: str
    state: str = "Created"  # Created | Suspended | Pending | Running | Succeeded | Failed
    reason: str = ""
    message: str = ""
    since: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {"job": self.job, "state": self.state, "reason": self.reason, "message": self.message,
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since))}


@dataclass
class Verdict:
    """A stage that can never start: ``exit_code`` 2 and why."""

    stage: str
    reason: str
    message: str


def _latest(items: list[dict[str, Any]]) -> dict[str, Any] | None:
    def when(e: dict[str, Any]) -> str:
        return str(e.get("lastTimestamp") or e.get("eventTime") or e["metadata"].get("creationTimestamp") or "")

    return max(items, key=when) if items else None


class Diagnosis:
    def __init__(self, core: Any, custom: Any, namespace: str, say: Callable[[str], None], retry: ApiRetry,
                 report_after_s: float, queue_name: str = ""):
        self.core = core
        self.custom = custom
        self.ns = namespace
        self.say = say
        self.retry = retry
        self.report_after_s = report_after_s
        self.queue = queue_name
        self.views: dict[str, StageView] = {}
        self.changed = False
        self._said: set[tuple[str, str]] = set()
        self._kueue_version: str | None = None
        self._next_look: dict[str, float] = {}  # Job uid -> when to ask the API about it again
        self.look_every_s = min(15.0, max(1.0, report_after_s))

    # -- bookkeeping -------------------------------------------------------------------------
    def track(self, stage: str, job: str) -> None:
        self.views[stage] = StageView(job)
        self.changed = True

    def forget(self, stage: str, state: str) -> None:
        v = self.views.get(stage)
        if v is not None and v.state != state:
            v.state, v.reason, v.message, v.since = state, "", "", time.time()
            self.changed = True

    def failed(self, stage: str, reason: str, message: str) -> None:
        """The stage's Job failed: keep what kept it from running, if anything did (a deadline that hit
        a Pending pod is about the scheduler's reason, not the deadline)."""
        v = self.views.get(stage)
        if v is None:
            return
        before = f" (it was {v.state}: {v.reason}: {v.message})" if v.state in ("Pending", "Suspended") else ""
        v.state, v.reason, v.message, v.since = "Failed", reason, message + before, time.time()
        self.changed = True

    def _set(self, stage: str, state: str, reason: str = "", message: str = "") -> None:
        v = self.views.get(stage)
        if v is None:
            return
        if (v.state, v.reason, v.message) != (state, reason, message):
            if v.state != state:
                v.since = time.time()
            v.state, v.reason, v.message = state, reason, message
            self.changed = True

    def _say_once(self, stage: str, msg: str) -> None:
        if (stage, msg) not in self._said:
            self._said.add((stage, msg))
            self.say(f"{stage}: {msg}")

    def snapshot(self) -> dict[str, Any]:
        self.changed = False
        return {s: v.as_dict() for s, v in self.views.items()}

    # -- pods ---------------------------------------------------------------------------------
    def on_pod(self, stage: str, pod: dict[str, Any]) -> None:
        """Update the stage's view from one of its pods, reporting what keeps it from running."""
        phase = (pod.get("status") or {}).get("phase")
        name = pod["metadata"]["name"]
        problem = pod_problem(pod)
        if problem is not None and problem.startswith("Pending:"):
            detail = self._scheduling_event(name) or problem[len("Pending: "):]
            reason, _, message = detail.partition(": ")
            self._set(stage, "Pending", reason or "Unschedulable", message)
            self._say_once(stage, f"pod {name} is Pending, the scheduler says: {detail}")
        elif problem is not None:
            reason, _, message = problem.partition(": ")
            self._set(stage, "Pending", reason, message)
            self._say_once(stage, f"pod {name} cannot start: {problem}")
        elif phase == "Running":
            self._set(stage, "Running")
        elif phase == "Pending":
            self._set(stage, "Pending", "ContainerCreating")

    def _scheduling_event(self, pod: str) -> str | None:
        """``FailedScheduling: <message>`` from the pod's newest scheduling event, if any."""
        try:
            items = raw(self.retry.call("list events", self.core.list_namespaced_event, self.ns,
                                        field_selector=f"involvedObject.kind=Pod,involvedObject.name={pod}",
                                        _preload_content=False)).get("items", [])
        except Exception:  # events are diagnosis only (and RBAC may not grant them)
            return None
        ev = _latest([e for e in items if e.get("reason") in ("FailedScheduling", "NotTriggerScaleUp")])
        return f"{ev['reason']}: {ev.get('message', '')}" if ev else None

    # -- Jobs without pods ---------------------------------------------------------------------
    def check_job(self, stage: str, job: dict[str, Any], has_pods: bool) -> Verdict | None:
        """A Job with no pod yet: suspended by Kueue, refused by admission, or just young."""
        meta = job["metadata"]
        created = meta.get("creationTimestamp")
        age = time.time() - _epoch(created) if created else 0.0
        if has_pods or age < self.report_after_s:
            if not (job.get("spec") or {}).get("suspend"):
                return None
        now = time.monotonic()
        if now < self._next_look.get(meta["uid"], 0.0):
            return None  # asked recently: events and Workloads change slowly, spare the API server
        if age >= self.report_after_s:
            self._next_look[meta["uid"]] = now + self.look_every_s
        if (job.get("spec") or {}).get("suspend"):
            v = self.views.get(stage)
            if v is not None and v.state != "Suspended":
                self._set(stage, "Suspended", "WaitingForAdmission",
                          f"Kueue queue {self.queue}" if self.queue else "the Job is suspended")
            if age >= self.report_after_s:
                return self._kueue(stage, meta)
            return None
        try:
            items = raw(self.retry.call("list events", self.core.list_namespaced_event, self.ns,
                                        field_selector=f"involvedObject.kind=Job,involvedObject.name={meta['name']}",
                                        _preload_content=False)).get("items", [])
        except Exception:
            return None
        ev = _latest([e for e in items if e.get("reason") == "FailedCreate"])
        if ev is None:
            return None
        msg = ev.get("message", "")
        if "forbidden" in msg and "PodSecurity" in msg:
            return Verdict(stage, "PodSecurity", f"Job {meta['name']} may not create its pods: {msg}")
        self._set(stage, "Pending", "FailedCreate", msg)
        self._say_once(stage, f"Job {meta['name']} cannot create its pod: {msg}")
        return None

    def _kueue(self, stage: str, meta: dict[str, Any]) -> Verdict | None:
        ApiException = api_exception()
        versions = (self._kueue_version,) if self._kueue_version else KUEUE_VERSIONS
        for version in versions:
            try:
                data = raw(self.retry.call("list Kueue workloads", self.custom.list_namespaced_custom_object,
                                           KUEUE_GROUP, version, self.ns, "workloads",
                                           label_selector=f"{KUEUE_JOB_UID}={meta['uid']}", _preload_content=False))
            except ApiException as e:
                if getattr(e, "status", None) == 404:
                    continue
                if getattr(e, "status", None) == 403:
                    self._say_once(stage, f"Job {meta['name']} is suspended (waiting for Kueue); the controller may "
                                          "not read Kueue workloads to say why (RBAC)")
                    return None
                raise
            self._kueue_version = version
            return self._workload(stage, meta, data.get("items", []))
        if self.queue:
            return Verdict(stage, "KueueNotInstalled",
                           f"Job {meta['name']} was created suspended for Kueue queue {self.queue!r}, but this cluster "
                           f"has no Kueue Workload API ({KUEUE_GROUP}): nothing will ever admit it. Install Kueue, "
                           "or set kueue.queueName to \"\" in the cluster settings")
        self._say_once(stage, f"Job {meta['name']} is suspended and no Kueue is installed to admit it")
        return None

    def _workload(self, stage: str, meta: dict[str, Any], items: list[dict[str, Any]]) -> Verdict | None:
        if not items:
            self._say_once(stage, f"Job {meta['name']} is suspended; Kueue has not created its Workload yet "
                                  f"(is LocalQueue {self.queue!r} in namespace {self.ns}?)")
            return None
        wl = items[0]
        conds = {c.get("type"): c for c in (wl.get("status") or {}).get("conditions") or []}
        for kind in ("Admitted", "QuotaReserved"):
            c = conds.get(kind)
            if c is not None and c.get("status") == "False":
                reason, message = c.get("reason", "Pending"), c.get("message", "")
                self._set(stage, "Suspended", f"Kueue{kind}False:{reason}", message)
                self._say_once(stage, f"Job {meta['name']} waits for Kueue admission (workload "
                                      f"{wl['metadata']['name']}): {kind}=False {reason}: {message}")
                return None
        self._say_once(stage, f"Job {meta['name']} is suspended; Kueue workload {wl['metadata']['name']} has no "
                              "verdict yet")
        return None


def _epoch(ts: str) -> float:
    try:
        return float(calendar.timegm(time.strptime(ts, "%Y-%m-%dT%H:%M:%SZ")))
    except (TypeError, ValueError):
        return time.time()
