"""Job lifecycle and watches: creating (or adopting) a stage's Job, deleting a finished one, finding
its pods and their exit codes, and watching the run's Jobs and pods.

Watches: ``list_namespaced_job`` / ``list_namespaced_pod`` with the run's label selector, from the
list's ``resourceVersion``; a ``410 Gone`` re-lists (a ``RELIST`` event carries everything again).
Job state is never polled. Events go to a queue as ``(kind, type, object)``: kind ``job`` or
``pod``; ``watch-error`` when a watch cannot go on: a refusal (401/403), or an API server that has
not answered for longer than the outage tolerance (:mod:`bezoar_jobs.executors.k8s_retry`); shorter
outages are ridden out with backoff and the watch resumes from its last resourceVersion.

Pods are found by the labels the Job controller sets, ``batch.kubernetes.io/controller-uid`` and
``batch.kubernetes.io/job-name`` (Kubernetes 1.27+; the unprefixed ``controller-uid``/``job-name``
are legacy).
"""

from __future__ import annotations

import builtins
import contextlib
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..errors import BadInput
from .jobs import ANNOTATION_CONTROLLER, CONTAINER, LABEL_RUN, LABEL_STAGE
from .k8s_api import api_exception, condition, raw
from .k8s_retry import ApiRetry, transient

Event = tuple[str, str, Any]
POD_JOB_UID = "batch.kubernetes.io/controller-uid"
POD_JOB_NAME = "batch.kubernetes.io/job-name"


def pod_job(pod: dict[str, Any]) -> tuple[str, str]:
    """(Job name, Job uid) of a Job's pod, from the labels the Job controller sets."""
    labels = pod["metadata"].get("labels") or {}
    return labels.get(POD_JOB_NAME, ""), labels.get(POD_JOB_UID, "")


class _Owned(Protocol):
    ns: str
    run_label: str
    controller_uid: str | None

    def get(self, name: str) -> dict[str, Any] | None: ...
    def belongs(self, obj: dict[str, Any], stage: str) -> bool: ...
    def delete_and_wait(self, name: str, uid: str, timeout: float = 120.0) -> None: ...


def create_or_adopt(api: _Owned, kind: str, body: dict[str, Any], stage: str,
                    condition_of: Callable[[dict[str, Any]], dict[str, Any] | None], create: Callable[[str], Any],
                    on_replace: Any = None, refused: Callable[[Exception, str], None] | None = None,
                    ) -> tuple[dict[str, Any], str]:
    """A Job's or a group object's create-or-adopt (:meth:`JobApi.create_or_adopt` says what each answer
    means); ``create(name)`` sends it, ``refused(error, name)`` may turn an API refusal into bad input."""
    ApiException = api_exception()
    name = body["metadata"]["name"]
    for _attempt in range(3):
        existing = api.get(name)
        if existing is not None:
            if not api.belongs(existing, stage):
                raise BadInput(f"a {kind} named {name} already exists in namespace {api.ns} but does not belong to "
                               f"run {api.run_label} stage {stage}; delete it or use another --run-id")
            cond = condition_of(existing)
            if cond is None:
                return existing, "adopted"
            ours = (existing["metadata"].get("annotations") or {}).get(ANNOTATION_CONTROLLER)
            if cond["type"] == "Failed" and api.controller_uid and ours == api.controller_uid:
                return existing, "failed"
            if on_replace is not None:
                on_replace(name)
            api.delete_and_wait(name, existing["metadata"]["uid"])
        try:
            return raw(create(name)), "created"
        except ApiException as e:
            if getattr(e, "status", None) == 409:  # someone created it between our get and create
                continue
            if refused is not None:
                refused(e, name)
            raise
    raise RuntimeError(f"could not create or adopt {kind} {name}")


class JobApi:
    """Get, create-or-adopt and delete the Jobs of one run in one namespace."""

    def __init__(self, batch: Any, core: Any, namespace: str, run_label: str, retry: ApiRetry | None = None,
                 controller_uid: str | None = None):
        self.batch = batch
        self.core = core
        self.ns = namespace
        self.run_label = run_label  # the run's bezoar.dev/run label value
        self.retry = retry or ApiRetry(900, lambda _m: None)
        self.controller_uid = controller_uid  # the in-cluster controller Job this controller runs in, if any

    def get(self, name: str) -> dict[str, Any] | None:
        ApiException = api_exception()
        try:
            return raw(self.retry.call(f"get Job {name}", self.batch.read_namespaced_job, name, self.ns,
                                       _preload_content=False))
        except ApiException as e:
            if getattr(e, "status", None) == 404:
                return None
            raise

    def belongs(self, job: dict[str, Any], stage: str) -> bool:
        labels = job["metadata"].get("labels") or {}
        return labels.get(LABEL_STAGE) == stage and labels.get(LABEL_RUN) == self.run_label

    def delete_and_wait(self, name: str, uid: str, timeout: float = 120.0) -> None:
        """Delete a finished Job of this name and wait until the name is free again."""
        ApiException = api_exception()
        with contextlib.suppress(ApiException):
            self.retry.call(f"delete Job {name}", self.batch.delete_namespaced_job, name, self.ns,
                            body={"propagationPolicy": "Background"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cur = self.get(name)
            if cur is None or cur["metadata"].get("uid") != uid:
                return
            time.sleep(0.1)
        raise RuntimeError(f"Job {name} was deleted but did not go away within {timeout:.0f} s")

    def create_or_adopt(self, body: dict[str, Any], stage: str,
                        on_replace: Any = None) -> tuple[dict[str, Any], str]:
        """(the Job, how): ``adopted``: a running Job of that name of this run and stage (a restarted
        controller picks up where the last one was); ``failed``: a Job that FAILED for good under this
        same controller Job (its retried pod must not run the stage again: the failure stands);
        ``created``: anything else, a finished Job of an earlier ``bezoar run`` being deleted first
        (``on_replace(name)`` is told). ``409 Conflict`` on create means another controller won the
        race: look again."""
        return create_or_adopt(self, "Job", body, stage, condition, lambda name: self.retry.call(
            f"create Job {name}", self.batch.create_namespaced_job, self.ns, body, _preload_content=False),
            on_replace)

    def ensure_group_service(self, service: dict[str, Any]) -> None:
        """Create the headless Service of a training group before its Job (its pods resolve node 0 through
        it); one left by an earlier attempt of the same run and stage is kept."""
        ApiException = api_exception()
        name = service["metadata"]["name"]
        try:
            self.retry.call(f"create Service {name}", self.core.create_namespaced_service, self.ns, service,
                            _preload_content=False)
        except ApiException as e:
            if getattr(e, "status", None) != 409:
                raise

    def own_service(self, name: str, job: dict[str, Any]) -> None:
        """Hand the group's Service to its Job (ownerReferences): the garbage collector deletes it with the
        Job (ttlSecondsAfterFinished, a rerun, `bezoar cancel`)."""
        owner = {"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"],
                 "uid": job["metadata"]["uid"], "controller": False, "blockOwnerDeletion": False}
        self.retry.call(f"patch Service {name}", self.core.patch_namespaced_service, name, self.ns,
                        {"metadata": {"ownerReferences": [owner]}}, _preload_content=False)

    def pods_of(self, uid: str, known: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """The Job's pods, fresh from the API (the watch may lag the Job's condition)."""
        try:
            data = raw(self.retry.call("list pods", self.core.list_namespaced_pod, self.ns,
                                       label_selector=f"{POD_JOB_UID}={uid}", _preload_content=False))
            items = data.get("items", [])
        except Exception:  # the report is best effort; the failure itself is already known
            items = [p for p in (known or {}).values() if pod_job(p)[1] == uid]
        return sorted(items, key=lambda p: p["metadata"].get("creationTimestamp") or "")

    def exit_codes(self, uid: str, known: dict[str, dict[str, Any]] | None = None) -> list[int]:
        codes = []
        for pod in self.pods_of(uid, known):
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                term = (cs.get("state") or {}).get("terminated")
                if cs.get("name") == CONTAINER and term and term.get("exitCode") is not None:
                    codes.append(int(term["exitCode"]))
        return codes

    def delete_run_jobs(self, selector: str) -> list[str]:
        """Delete every Job matching ``selector`` (propagationPolicy Background); their names."""
        ApiException = api_exception()
        data = raw(self.retry.call("list Jobs", self.batch.list_namespaced_job, self.ns, label_selector=selector,
                                   _preload_content=False))
        names = sorted(j["metadata"]["name"] for j in data.get("items", []))
        for name in names:
            try:
                raw(self.retry.call(f"delete Job {name}", self.batch.delete_namespaced_job, name, self.ns,
                                    body={"propagationPolicy": "Background"}, _preload_content=False))
            except ApiException as e:
                if getattr(e, "status", None) != 404:  # already gone is what we wanted
                    raise
        return names


class RunWatch:
    """Watches the run's Jobs and pods (one thread per kind) into ``events``."""

    def __init__(self, batch: Any, core: Any, namespace: str, selector: str, events: queue.Queue[Event],
                 stop: threading.Event, timeout_s: int = 240, retry: ApiRetry | None = None,
                 extra: dict[str, Any] | None = None):
        self.batch = batch
        # more kinds to watch (a training group's JobSets or TrainJobs): kind -> list function (namespace, **kw)
        self.extra = dict(extra or {})
        self.core = core
        self.ns = namespace
        self.selector = selector
        self.events = events
        self.stop = stop
        self.timeout_s = timeout_s
        self.retry = retry or ApiRetry(900, lambda _m: None, stop)
        self._watches: list[Any] = []

    def _list_fn(self, kind: str) -> Any:
        if kind in self.extra:
            return self.extra[kind]
        return self.batch.list_namespaced_job if kind == "job" else self.core.list_namespaced_pod

    def list(self, kind: str) -> tuple[list[dict[str, Any]], str]:
        fn = self._list_fn(kind)
        data = raw(self.retry.call(f"list {kind}s", fn, self.ns, label_selector=self.selector,
                                   _preload_content=False))
        return data.get("items", []), data["metadata"]["resourceVersion"]

    def start(self) -> dict[str, builtins.list[dict[str, Any]]]:
        """List both kinds, start watching from there; return what the lists held."""
        found: dict[str, builtins.list[dict[str, Any]]] = {}
        for kind in ("job", "pod", *self.extra):
            items, rv = self.list(kind)
            found[kind] = items
            th = threading.Thread(target=self._watch, args=(kind, rv), name=f"bezoar-watch-{kind}", daemon=True)
            th.start()
        return found

    def close(self) -> None:
        self.stop.set()
        for w in list(self._watches):
            with contextlib.suppress(Exception):
                w.stop()

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

        ApiException = api_exception()
        api_fn = self._list_fn(kind)

        def fn(*args, **kwargs):  # type: ignore[no-untyped-def]
            # Unannotated on purpose: Watch then hands events over as plain dicts instead of
            # deserialising them into the client's models, which refuse fields newer than the
            # client (a newer API server would otherwise break the watch).
            return api_fn(*args, **kwargs)

        failures = 0
        down_since: float | None = None
        while not self.stop.is_set():
            w = watch.Watch()
            self._watches.append(w)
            try:
                for ev in w.stream(fn, self.ns, label_selector=self.selector, resource_version=rv,
                                   allow_watch_bookmarks=True, timeout_seconds=self.timeout_s,
                                   _request_timeout=(10, self.timeout_s + 30)):
                    if self.stop.is_set():
                        break
                    if down_since is not None:
                        self.retry.say(f"watching {kind}s again after {time.monotonic() - down_since:.0f} s")
                    failures, down_since = 0, None
                    if ev["type"] == "BOOKMARK":
                        rv = ev["raw_object"]["metadata"]["resourceVersion"]
                        continue
                    obj = ev["raw_object"]
                    rv = obj["metadata"]["resourceVersion"]
                    self.events.put((kind, ev["type"], obj))
            except Exception as e:  # a refusal, a 410, or a connection dropped: resume from the last resourceVersion
                if self.stop.is_set():
                    return
                status = getattr(e, "status", None) if isinstance(e, ApiException) else None
                if status == 410:  # our resourceVersion is too old: list again, then watch from there
                    items, rv = self.list(kind)
                    self.events.put((kind, "RELIST", items))
                    continue
                if status is not None and not transient(e):
                    self.events.put(("watch-error", kind, e))  # 401, 403, 404, ...: retrying cannot help
                    return
                now = time.monotonic()
                down_since = down_since or now
                if now - down_since > self.retry.tolerance_s:
                    self.events.put(("watch-error", kind, e))
                    return
                self.retry._report(f"watch of {kind}s interrupted ({type(e).__name__}); resuming from "
                                   f"resourceVersion {rv}")
                self.stop.wait(self.retry.delay(failures))
                failures += 1
            else:  # the server ended the stream (its timeout): it was reachable
                failures, down_since = 0, None
            finally:
                with contextlib.suppress(ValueError):
                    self._watches.remove(w)
