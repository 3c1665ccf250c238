"""A training group as one JobSet or one Kubeflow Trainer v2 TrainJob (``distributed.launcher: jobset |
trainjob``): discovery, create-or-adopt, status, restarts, its pods, delete. The objects themselves are
built by distributed.py; the backend (k8s_backend.py) treats the group as one stage, exactly as a Job.

- **Before anything is created** :func:`check_served` asks the API server's discovery whether the kind is
  served (``GET /apis/<group>/<version>``: 404 when the CRD is not installed) and, for a TrainJob, whether
  the ClusterTrainingRuntime named by ``distributed.trainingRuntime`` exists; either missing is bad input
  (exit 2) naming the setting.
- **Create or adopt**, as for Jobs (k8s_jobs.JobApi): the object has the stage Job's deterministic name,
  labels (``bezoar.dev/run``, ``bezoar.dev/stage``) and controller annotation; a running one of this run
  and stage is adopted; one that failed under this same controller Job is reported as the failure it
  was; any other finished one is deleted (propagation Foreground: its Jobs and pods go first) and
  created anew. Objects are created with ``fieldValidation=Strict``: a field the installed CRD does not
  know is refused (422) instead of being dropped silently.
- **Status**: a JobSet is done on its ``Completed`` or ``Failed`` condition (reasons ``AllJobsCompleted``,
  ``FailedJobs``, ``ReachedMaxRestarts``, ``FailJobSetFailurePolicyAction``); ``status.restarts`` counts
  whole-group restarts (a failed child Job restarts every Job of the group, up to
  ``failurePolicy.maxRestarts``). A TrainJob is done on ``Complete`` or ``Failed`` (the Trainer copies its
  JobSet's condition, reason and message; ``TrainingRuntimeNotSupported`` and ``DeadlineExceeded`` are
  its own); its restarts are its JobSet's (the JobSet has the TrainJob's name).
- **Pods**: JobSet labels every pod of the group ``jobset.sigs.k8s.io/jobset-name=<JobSet>`` (for a
  TrainJob, the TrainJob's name); the run's labels reach the pods through the pod template.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

from ..errors import BadInput
from .distributed import JOBSET_API, TRAINJOB_API
from .jobs import LABEL_RUN, LABEL_STAGE
from .k8s_api import api_exception, raw
from .k8s_jobs import create_or_adopt
from .k8s_retry import ApiRetry

POD_GROUP_LABEL = "jobset.sigs.k8s.io/jobset-name"
RESTART_ATTEMPT_LABEL = "jobset.sigs.k8s.io/restart-attempt"  # on a group's Jobs and pods: the JobSet's restarts then
TRAINER_GROUP = "trainer.kubeflow.org"


@dataclass(frozen=True)
class GroupKind:
    launcher: str
    group: str
    version: str
    plural: str
    kind: str
    done: tuple[str, str]  # (success condition, failure condition)


KINDS = {
    "jobset": GroupKind("jobset", JOBSET_API.split("/")[0], JOBSET_API.split("/")[1], "jobsets", "JobSet",
                        ("Completed", "Failed")),
    "trainjob": GroupKind("trainjob", TRAINJOB_API.split("/")[0], TRAINJOB_API.split("/")[1], "trainjobs",
                          "TrainJob", ("Complete", "Failed")),
}


def group_condition(obj: dict[str, Any], kind: GroupKind) -> dict[str, Any] | None:
    """The object's terminal condition (status True), as a Job condition: ``Complete`` or ``Failed``."""
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") in kind.done and c.get("status") == "True":
            return {**c, "type": "Complete" if c["type"] == kind.done[0] else "Failed"}
    return None


class GroupApi:
    """Discovery, get, create-or-adopt, restarts and delete of one run's group objects of one kind."""

    def __init__(self, custom: Any, core: Any, namespace: str, run_label: str, launcher: str,
                 retry: ApiRetry | None = None, controller_uid: str | None = None):
        self.custom = custom  # kubernetes.client.CustomObjectsApi
        self.core = core
        self.ns = namespace
        self.run_label = run_label
        self.kind = KINDS[launcher]
        self.retry = retry or ApiRetry(900, lambda _m: None)
        self.controller_uid = controller_uid

    # -- discovery ------------------------------------------------------------------------------
    def check_served(self, training_runtime: str, stages: list[str]) -> None:
        """Bad input unless the cluster serves the kind (and, for a TrainJob, has the runtime)."""
        ApiException = api_exception()
        k = self.kind
        try:
            data = raw(self.retry.call(f"discover {k.group}/{k.version}", self.custom.get_api_resources, k.group,
                                       k.version, _preload_content=False))
            served = any(r.get("name") == k.plural for r in data.get("resources") or [])
        except ApiException as e:
            if getattr(e, "status", None) != 404:
                raise
            served = False
        if not served:
            what = "JobSet" if k.launcher == "jobset" else "Kubeflow Trainer v2"
            raise BadInput(f"distributed.launcher: {k.launcher!r}: the cluster does not serve {k.plural}.{k.group}/"
                           f"{k.version} ({what} is not installed), needed by {', '.join(stages)}; install it or "
                           "set distributed.launcher: job (an Indexed Job, built in)")
        if k.launcher != "trainjob":
            return
        try:
            raw(self.retry.call(f"get ClusterTrainingRuntime {training_runtime}", self.custom.get_cluster_custom_object,
                                TRAINER_GROUP, k.version, "clustertrainingruntimes", training_runtime,
                                _preload_content=False))  # read to the end: the connection goes back to the pool
        except ApiException as e:
            if getattr(e, "status", None) != 404:
                raise
            raise BadInput(f"distributed.trainingRuntime: ClusterTrainingRuntime {training_runtime!r} does not exist "
                           f"in the cluster (needed by {', '.join(stages)} with distributed.launcher: trainjob); "
                           "create it (a torch runtime with a replicated Job and container named 'node') or name "
                           "another") from None

    # -- objects --------------------------------------------------------------------------------
    def get(self, name: str, kind: GroupKind | None = None) -> dict[str, Any] | None:
        ApiException = api_exception()
        k = kind or self.kind
        try:
            return raw(self.retry.call(f"get {k.kind} {name}", self.custom.get_namespaced_custom_object, k.group,
                                       k.version, self.ns, k.plural, name, _preload_content=False))
        except ApiException as e:
            if getattr(e, "status", None) == 404:
                return None
            raise

    def belongs(self, obj: dict[str, Any], stage: str) -> bool:
        labels = obj["metadata"].get("labels") or {}
        return labels.get(LABEL_STAGE) == stage and labels.get(LABEL_RUN) == self.run_label

    def create_or_adopt(self, body: dict[str, Any], stage: str, on_replace: Any = None) -> tuple[dict[str, Any], str]:
        """(the object, how), with the same meanings as :meth:`k8s_jobs.JobApi.create_or_adopt`."""
        k = self.kind

        def create(name: str) -> Any:
            return self.retry.call(f"create {k.kind} {name}", self.custom.create_namespaced_custom_object, k.group,
                                   k.version, self.ns, k.plural, body, field_validation="Strict",
                                   _preload_content=False)

        def refused(e: Exception, name: str) -> None:
            if getattr(e, "status", None) in (400, 422):  # the API server or the kind's webhook refused it
                raise BadInput(f"{stage}: the cluster refused {k.kind} {name}: {_status_message(e)}") from None

        return create_or_adopt(self, k.kind, body, stage, lambda obj: group_condition(obj, k), create, on_replace,
                               refused)

    def delete(self, name: str) -> None:
        ApiException = api_exception()
        k = self.kind
        try:
            raw(self.retry.call(f"delete {k.kind} {name}", self.custom.delete_namespaced_custom_object, k.group,
                                k.version, self.ns, k.plural, name, body={"propagationPolicy": "Foreground"},
                                _preload_content=False))
        except ApiException as e:
            if getattr(e, "status", None) != 404:
                raise

    def delete_and_wait(self, name: str, uid: str, timeout: float = 120.0) -> None:
        with contextlib.suppress(api_exception()):
            self.delete(name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cur = self.get(name)
            if cur is None or cur["metadata"].get("uid") != uid:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.kind.kind} {name} was deleted but did not go away within {timeout:.0f} s")

    def delete_run(self, selector: str) -> list[str]:
        """Delete every object of this kind matching ``selector`` (their Jobs and pods go with them); their
        names. Nothing when the kind is not served."""
        ApiException = api_exception()
        k = self.kind
        try:
            data = raw(self.retry.call(f"list {k.plural}", self.custom.list_namespaced_custom_object, k.group,
                                       k.version, self.ns, k.plural, label_selector=selector, _preload_content=False))
        except ApiException as e:
            if getattr(e, "status", None) == 404:
                return []
            raise
        names = sorted(o["metadata"]["name"] for o in data.get("items", []))
        for name in names:
            self.delete(name)
        return names

    def restarts(self, name: str) -> int:
        """How many times the group was restarted as a whole: the JobSet's ``status.restarts`` (a TrainJob's
        JobSet has its name)."""
        js = self.get(name, KINDS["jobset"])
        return int(((js or {}).get("status") or {}).get("restarts") or 0)

    def pods(self, name: str) -> list[dict[str, Any]]:
        try:
            data = raw(self.retry.call("list pods", self.core.list_namespaced_pod, self.ns,
                                       label_selector=f"{POD_GROUP_LABEL}={name}", _preload_content=False))
        except Exception:  # the report is best effort
            return []
        return sorted(data.get("items", []), key=lambda p: p["metadata"].get("creationTimestamp") or "")

    def list_fn(self) -> Any:
        """``list_namespaced_custom_object`` bound to this kind, shaped like the Job list (namespace first)."""
        k = self.kind

        def fn(namespace, **kwargs):  # type: ignore[no-untyped-def]  # unannotated: Watch hands over plain dicts
            return self.custom.list_namespaced_custom_object(k.group, k.version, namespace, k.plural, **kwargs)

        return fn


def _status_message(e: Exception) -> str:
    import json

    body = getattr(e, "body", "") or ""
    try:
        return str(json.loads(body).get("message") or body)[:800]
    except (ValueError, AttributeError):
        return str(body)[:800] or str(e)
