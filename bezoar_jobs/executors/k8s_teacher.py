"""The teacher's lifecycle when the cluster settings name its Deployment (``teacher.deployment``),
shared safely between runs.

Several runs (a scheduled retraining and a manual one, two run ids in one namespace) may use one
teacher Deployment. Each run holds a **lease** on it while it needs it: the annotation
``leases.bezoar.dev/<run>`` on the Deployment, whose value is the lease's expiry time. A run

- takes its lease before the first stage that needs the teacher, then scales the Deployment up to
  ``teacher.replicas`` if it is at 0 and (``waitReady``) waits until a replica is ready, at most
  ``teacher.readyTimeoutSeconds`` (the chart sets it from the server's startup timeout); while it
  waits it reports why the teacher's pods are not running (Pending and the scheduler's reason, image
  pull errors, crash loops);
- renews the lease every third of ``teacher.leaseSeconds`` while it holds it, so a run that crashed
  (no renewals) stops holding the teacher once its lease expires;
- releases it once none of the run's own generate stages is left to start or still going (with the
  recipe's judge served by the teacher's own server, none of its filters either: they call it,
  executors/scheduler.py ``party_stages``), and scales the Deployment to 0
  (``scaleDownAfterGeneration``) only when no other run holds an unexpired lease. The release and
  the scale-down are ONE patch carrying the Deployment's ``resourceVersion`` as a precondition: if
  another run took a lease in between, the API answers 409, and the release looks again (and then
  leaves the teacher up).

The chart never renders ``replicas`` for the teacher, so ``helm upgrade`` does not fight the
controllers over it (see the chart's teacher-deployment.yaml).

Readiness is found in a thread; the outcome arrives as a ``("teacher", "ready" | "failed" | "bad",
message)`` event on the controller's queue (``bad``: 403/404, a setup error).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from ..registry import stages_of
from .cluster import Teacher
from .k8s_api import api_exception, raw
from .k8s_retry import ApiRetry

LEASE_PREFIX = "leases.bezoar.dev/"
_POD_PROBLEMS = {"CreateContainerConfigError", "CreateContainerError", "ErrImagePull", "ImagePullBackOff",
                 "InvalidImageName", "RunContainerError", "CrashLoopBackOff"}


def _now() -> datetime:
    return datetime.now(UTC)


def _stamp(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(v: str) -> datetime | None:
    try:
        return datetime.strptime(v, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except (TypeError, ValueError):
        return None


def leases(dep: dict[str, Any]) -> dict[str, datetime | None]:
    """Every run's lease on the Deployment: run -> expiry (None: unreadable, treated as expired)."""
    anns = dep["metadata"].get("annotations") or {}
    return {k[len(LEASE_PREFIX):]: _parse(v) for k, v in anns.items() if k.startswith(LEASE_PREFIX)}


def pod_problem(pod: dict[str, Any]) -> str | None:
    """Why a pod is not running, in the words of the scheduler or the kubelet (None: no problem seen)."""
    st = pod.get("status") or {}
    for c in st.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False":
            return f"Pending: {c.get('reason') or 'Unschedulable'}: {c.get('message', '')}".rstrip(": ")
    for cs in st.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in _POD_PROBLEMS:
            return f"{waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
    return None


class TeacherLifecycle:
    def __init__(self, apps: Any, core: Any, namespace: str, settings: Teacher, run_label: str,
                 say: Callable[[str], None], events: queue.Queue[tuple[str, str, Any]], stop: threading.Event,
                 retry: ApiRetry, timeout_s: float | None = None, poll_s: float = 2.0):
        self.apps = apps
        self.core = core
        self.ns = namespace
        self.t = settings
        self.run = run_label
        self.say = say
        self.events = events
        self.stop = stop
        self.retry = retry
        self.timeout_s = timeout_s if timeout_s is not None else float(settings.readyTimeoutSeconds)
        self.poll_s = poll_s
        self.state = "unknown"  # unknown | starting | ready | failed
        self.held = False
        self._released = False
        self._renewer: threading.Thread | None = None
        self._seen_problems: set[str] = set()

    @property
    def managed(self) -> bool:
        return bool(self.t.deployment)

    @property
    def key(self) -> str:
        return LEASE_PREFIX + self.run

    # -- the API ------------------------------------------------------------------------------
    def _get(self) -> dict[str, Any]:
        return raw(self.retry.call(f"get Deployment {self.t.deployment}", self.apps.read_namespaced_deployment,
                                   self.t.deployment, self.ns, _preload_content=False))

    def _patch(self, body: dict[str, Any]) -> dict[str, Any]:
        return raw(self.retry.call(f"patch Deployment {self.t.deployment}", self.apps.patch_namespaced_deployment,
                                   self.t.deployment, self.ns, body, _preload_content=False))

    def _lease_body(self) -> dict[str, Any]:
        return {"metadata": {"annotations": {self.key: _stamp(_now() + timedelta(seconds=self.t.leaseSeconds))}}}

    # -- up -----------------------------------------------------------------------------------
    def request(self) -> None:
        """Make sure the teacher is coming up (once)."""
        if self.state == "unknown":  # at first, or after a release (an MT-Bench judge served by the teacher)
            self._released = False
            self.state = "starting"
            threading.Thread(target=self._up, name="bezoar-teacher", daemon=True).start()

    def _up(self) -> None:
        """Take the lease, scale up if at 0, wait for a ready replica (in a thread)."""
        ApiException = api_exception()
        t = self.t
        try:
            dep = self._patch(self._lease_body())
            self.held = True
            self._renewer = threading.Thread(target=self._renew, name="bezoar-teacher-lease", daemon=True)
            self._renewer.start()
            others = [r for r, exp in leases(dep).items() if r != self.run and exp and exp > _now()]
            self.say(f"teacher: lease taken on Deployment {t.deployment}"
                     + (f" (also held by run(s) {', '.join(sorted(others))})" if others else ""))
            if not (dep.get("spec") or {}).get("replicas"):
                self.say(f"teacher: scaling Deployment {t.deployment} to {t.replicas}")
                dep = self._patch({"spec": {"replicas": t.replicas}})
            if t.waitReady:
                self.say(f"teacher: waiting for Deployment {t.deployment} to be ready "
                         f"(at most {self.timeout_s:.0f} s)")
                deadline = time.monotonic() + self.timeout_s
                polls = 0
                while not self.stop.is_set():
                    st = dep.get("status") or {}
                    fresh = (st.get("observedGeneration") or 0) >= (dep["metadata"].get("generation") or 0)
                    if fresh and (st.get("readyReplicas") or 0) >= 1:
                        break
                    if time.monotonic() > deadline:
                        self.events.put(("teacher", "failed", f"Deployment {t.deployment} had no ready replica after "
                                                              f"{self.timeout_s:.0f} s (teacher.readyTimeoutSeconds)"))
                        return
                    polls += 1
                    if polls % 5 == 0:
                        self._report_pods(dep)
                    # quick at first (a warm server is ready in a second), then every poll_s
                    self.stop.wait(min(self.poll_s, 0.1 * 2**polls))
                    dep = self._get()
                self.say(f"teacher: Deployment {t.deployment} is ready")
            self.events.put(("teacher", "ready", None))
        except ApiException as e:
            status = getattr(e, "status", None)
            self.events.put(("teacher", "bad" if status in (403, 404) else "failed",
                             f"Deployment {self.ns}/{t.deployment}: {status} {getattr(e, 'reason', '')}"))
        except Exception as e:  # reported as the waiting stage's failure
            self.events.put(("teacher", "failed", f"Deployment {self.ns}/{t.deployment}: {e}"))

    def _report_pods(self, dep: dict[str, Any]) -> None:
        """Say why the teacher's pods are not ready (once per distinct reason)."""
        labels = ((dep.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        if not labels:
            return
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        try:
            pods = raw(self.retry.call("list teacher pods", self.core.list_namespaced_pod, self.ns,
                                       label_selector=selector, _preload_content=False)).get("items", [])
        except Exception:  # diagnosis only
            return
        for pod in pods:
            why = pod_problem(pod)
            if why and why not in self._seen_problems:
                self._seen_problems.add(why)
                self.say(f"teacher: pod {pod['metadata']['name']} is not running: {why}")

    def _renew(self) -> None:
        every = max(5.0, self.t.leaseSeconds / 3)
        while not self.stop.wait(every):
            if not self.held:
                return
            try:
                self._patch(self._lease_body())
            except Exception as e:  # the next renewal tries again; the lease lasts leaseSeconds
                self.say(f"teacher: could not renew the lease: {type(e).__name__}: {e}")

    # -- down ---------------------------------------------------------------------------------
    def after_generation(self, running: Iterable[str], pending: Iterable[str] = (), parties: Iterable[str] = (),
                         calls: Iterable[str] = ()) -> None:
        """Release the lease once no stage of this run that generates with the teacher is left to start
        (``pending``: its selected stages not started yet) and none of ``running`` (its stages still going)
        calls it; scale to 0 when no other run holds a lease. ``parties``: the data stages that call the
        teacher's server (executors/scheduler.py ``party_stages``): with the judge served by the teacher, the
        filters need it too, and it stays up until they are done; ``calls``: every stage that calls it (an
        MT-Bench judge on it too: one left to start does not keep it up through training, it brings it up
        again, :meth:`request`). A generate stage outside the run's selection is not waited for (it used to be,
        until committed: a run of one scheme's stages kept the teacher through its training to the run's end)."""
        if self._released or not self.t.deployment:
            return
        generate, calling = set(stages_of("generate")) | set(parties), set(calls)
        if any(s in generate or s in calling for s in running):
            return  # a Job of this run that calls the teacher is still going (it may have committed, not ended)
        if any(s in generate for s in pending):
            return
        self.release(scale_down=self.t.scaleDownAfterGeneration,
                     why="every stage that calls it is committed" if set(parties) - set(stages_of("generate"))
                     else "every generate stage is committed")

    def release(self, scale_down: bool, why: str) -> None:
        """Drop this run's lease (and expired ones); scale to 0 in the same guarded patch when asked
        and no other run holds the teacher."""
        if self._released or not self.t.deployment:
            return
        self._released = True
        self.held = False
        self.state = "unknown"  # a later stage that calls it asks for it again
        ApiException = api_exception()
        try:
            for _attempt in range(10):
                dep = self._get()
                now = _now()
                held = leases(dep)
                others = sorted(r for r, exp in held.items() if r != self.run and exp and exp > now)
                gone = [r for r, exp in held.items() if r == self.run or not exp or exp <= now]
                if not gone and not (scale_down and not others):
                    break
                body: dict[str, Any] = {"metadata": {"resourceVersion": dep["metadata"]["resourceVersion"],
                                                     "annotations": {LEASE_PREFIX + r: None for r in gone}}}
                scaled = scale_down and not others and bool((dep.get("spec") or {}).get("replicas"))
                if scaled:
                    body["spec"] = {"replicas": 0}
                try:
                    self._patch(body)
                except ApiException as e:
                    if getattr(e, "status", None) == 409:  # changed meanwhile (a lease taken?): look again
                        continue
                    raise
                if scaled:
                    self.say(f"teacher: {why}; no other run holds it: scaled Deployment {self.t.deployment} to 0")
                elif scale_down and others:
                    self.say(f"teacher: {why}; lease released, Deployment {self.t.deployment} stays up for "
                             f"run(s) {', '.join(others)}")
                else:
                    self.say(f"teacher: {why}; lease released")
                return
        except ApiException as e:  # a teacher left running costs money but breaks nothing: say so, go on
            self.say(f"teacher: could not release the lease on Deployment {self.t.deployment}: "
                     f"{getattr(e, 'status', '')} {getattr(e, 'reason', '')}")
        except Exception as e:
            self.say(f"teacher: could not release the lease on Deployment {self.t.deployment}: {e}")
