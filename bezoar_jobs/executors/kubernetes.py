"""The Kubernetes backend: each stage runs as a Job of the run; the scheduler (executors/scheduler.py)
decides what runs when, exactly as for local processes.

Entry points (the ``bezoar`` CLI calls these; each returns the process exit code):

``bezoar run --executor kubernetes --recipe FILE --run URI [--run-id ID] [--cluster FILE]
[--from/--until/--only/--force] [--refreeze]``
    -> :func:`run_pipeline`. Exit codes, chosen so the chart's controller Job retries only what a
    retry can cure (its podFailurePolicy fails the Job at once on 2, 4 and 5):

    - 0: every selected stage is committed;
    - 2: bad input (the recipe, the settings, a stage that exited 2, a Job the cluster will never
      run: a Pod Security refusal, a Kueue queue with no Kueue installed);
    - 3: retryable: the API server did not answer within ``controller.apiOutageToleranceSeconds``;
    - 4: the run is cancelled (``<run>/_control/cancelled.json``, :mod:`bezoar_jobs.run_control`);
    - 5: a stage failed for good (its Job used up its ``backoffLimit``, its deadline, ...): running
      the controller again would only run it again;
    - 1: anything unexpected (a bug): retryable by contract.
``bezoar cancel --run URI [--run-id ID] [--cluster FILE] [--undo]``
    -> :func:`cancel`: marks the run cancelled in its store, then deletes every Job of the run
    (label ``bezoar.dev/run``, propagationPolicy Background: their pods go too), and first every JobSet
    or TrainJob of the run when ``distributed.launcher`` names one (propagation Foreground). Every controller of
    the run honours the mark: a running one stops (exit 4), a restarted or retried one refuses to
    start, so a cancel is not undone by a controller that happened to restart. ``--undo`` lifts it.
``bezoar render --recipe FILE --cluster FILE --run URI [--run-id ID] --out DIR``
    -> :func:`bezoar_jobs.executors.jobs.render` (no cluster needed).

What the backend does for a stage the scheduler submits:

1. Creates the stage's Job from the pure builder (:func:`bezoar_jobs.executors.jobs.build_job`),
   *get before create* (k8s_jobs.py): a running Job of that deterministic name is ADOPTED (a
   restarted controller picks up where the last one was; nothing runs twice); a Job that failed
   under this same controller Job (``bezoar.dev/controller-uid``, from the chart's downward API) is
   reported as the failure it was, not run again; any other finished one is deleted and created
   anew; ``409 Conflict`` on create means adopt as well. A sharded stage whose commit Job is running
   is adopted at that Job. A training stage on several nodes is one group: an Indexed Job with its
   headless Service, or a JobSet / TrainJob (``distributed.launcher``, k8s_groups.py: the kind's API
   must be served, else exit 2), created, adopted, watched and deleted the same way.
2. Watches the run's Jobs and pods (k8s_jobs.py); follows each pod's log, reconnecting after breaks
   (k8s_logs.py); says why a Job's pod is not running (k8s_diagnose.py: Unschedulable with the
   scheduler's reason, image pulls, Pod Security refusals, Kueue admission) and keeps that view in
   ``<run>/_control/status.json`` for ``bezoar status``.
3. On the Job's ``Complete`` condition reports success (the scheduler then checks the manifest). A
   sharded generate stage's Indexed Job is followed by its commit Job (the stage without
   ``--shard``, which gathers every shard's records). On ``Failed`` it reports the Job condition's
   reason and message (``BackoffLimitExceeded``, ``PodFailurePolicy``, ``DeadlineExceeded``), the
   pods' exit codes and the last log lines. Jobs still running after a failure elsewhere are left
   alone: they commit what they can, and the next ``bezoar run`` adopts or skips them.
4. Before the first stage that needs the teacher, takes a lease on the teacher Deployment, brings it
   up and waits for it (k8s_teacher.py); once none of the run's generate stages is left to start or
   still going (nor its filters, when the recipe's judge is the teacher's own server), releases the
   lease and scales the teacher down unless another run holds one.

Every API call rides out outages of the API server with backoff (k8s_retry.py).

Configuration: inside a pod (``KUBERNETES_SERVICE_HOST`` set) the service-account token is used;
elsewhere the kubeconfig (``$KUBECONFIG``, else ``~/.kube/config``). Tests inject ``api_client``
(a real client pointed at a loopback API server).

The controller never imports torch, transformers, trl or ``bezoar_jobs.stages``: the controller
image stays small (a test holds this). It is restart-safe by construction: killing it loses
nothing, since the Jobs keep running and the next controller adopts them.

Minimum Kubernetes: 1.31 (podFailurePolicy, podReplacementPolicy, SuccessCriteriaMet, the
``batch.kubernetes.io/*`` pod labels). RBAC it needs in ``cluster.namespace``: jobs (batch)
create/get/list/watch/delete; pods get/list/watch; pods/log get; events get/list; the teacher
Deployment (apps, by name) get/patch; workloads (kueue.x-k8s.io) get/list when a queue is set; for a
training stage on several nodes: services create/patch (``distributed.launcher: job``), jobsets
(jobset.x-k8s.io) create/get/list/watch/delete (``jobset``), or trainjobs (trainer.kubeflow.org)
create/get/list/watch/delete, jobsets get and, cluster-wide, clustertrainingruntimes get (``trainjob``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from ..errors import BezoarError
from ..layout import RECIPE_FILE
from ..recipe import Recipe, parse_recipe
from ..registry import spec
from ..run_control import (
    EXIT_CANCELLED,
    cancel_run,
    freeze_once,
    refuse_if_cancelled,
    uncancel,
)
from ..store import open_store
from .cluster import ClusterSettings
from .distributed import is_group
from .jobs import (
    job_name,
    run_id_from_uri,
    run_selector,
    short_run_id,
)
from .k8s_api import api_exception, make_api_client
from .k8s_backend import KubernetesBackend
from .k8s_groups import GroupApi
from .k8s_jobs import JobApi
from .k8s_retry import ApiRetry
from .scheduler import EXIT_BAD_INPUT, EXIT_STAGE_FAILED, RunOutcome, Scheduler

__all__ = ["KubernetesBackend", "RunOutcome", "cancel", "make_api_client", "run_pipeline"]

EXIT_RUN_FAILED = 5  # a stage failed for good: the controller Job must not run it again
CONTROLLER_UID_ENV = "BEZOAR_CONTROLLER_UID"  # the chart passes its controller Job's uid (downward API)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def _api_error_code(e: Exception) -> int:
    status = getattr(e, "status", None)
    return EXIT_BAD_INPUT if status in (401, 403, 404, 422) else EXIT_STAGE_FAILED


def controller_exit_code(outcome: RunOutcome) -> int:
    """The process exit code for a finished run (see the module docstring)."""
    if outcome.failed_stage is None:
        return 0
    if outcome.exit_code in (EXIT_BAD_INPUT, EXIT_CANCELLED):
        return outcome.exit_code
    return EXIT_RUN_FAILED


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
    refreeze: bool = False,
    controller_uid: str | None = None,
    **backend_options: Any,
) -> int:
    """``bezoar run --executor kubernetes``: run ``stages`` of the run as Jobs; return the exit code.

    ``out`` receives the controller's messages and the stages' log lines (default stdout);
    ``on_outcome`` receives the :class:`RunOutcome` (tests and tools that want the details).
    ``refreeze`` replaces a frozen recipe that differs (``--refreeze``); ``controller_uid`` (default:
    ``$BEZOAR_CONTROLLER_UID``) is the controller Job's uid the chart passes in.
    """
    out = out or sys.stdout
    ApiException = api_exception()
    uid = controller_uid if controller_uid is not None else (os.environ.get(CONTROLLER_UID_ENV) or None)
    try:
        recipe: Recipe = parse_recipe(recipe_text, recipe_source)
        rid = run_id or run_id_from_uri(run_uri)
        short_run_id(rid)
        for s in stages:
            spec(s)
            job_name(s, rid)  # refuses a stage the Job builder does not know
        store = open_store(run_uri)
        refuse_if_cancelled(store)
        api = api_client if api_client is not None else make_api_client()
        groups = [s for s in stages if is_group(s, cluster)]
        if groups and cluster.distributed.launcher != "job":  # a JobSet / TrainJob: is it served here?
            _group_api(api, cluster, rid).check_served(cluster.distributed.trainingRuntime, groups)
            backend_options.setdefault("watch_groups", True)
        how = freeze_once(store, recipe_text, recipe_source, replace=refreeze)
        out.write(f"[bezoar] run {rid}: recipe {'frozen at' if how != 'unchanged' else 'as frozen in'} "
                  f"{store.url(RECIPE_FILE)}; stages: {', '.join(stages)}\n")
        outcome = RunOutcome()
        backend = KubernetesBackend(api, cluster, run_uri, rid, store, outcome, out=out, image_digests=image_digests,
                                    recipe=recipe, stages=stages, controller_uid=uid, **backend_options)
        Scheduler(backend, store, recipe, backend.say, outcome).run(stages, force)
        backend.finish(outcome)
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
    return controller_exit_code(outcome)


def _group_api(api: Any, cluster: ClusterSettings, rid: str) -> GroupApi:
    from kubernetes import client

    return GroupApi(client.CustomObjectsApi(api), client.CoreV1Api(api), cluster.namespace, short_run_id(rid),
                    cluster.distributed.launcher,
                    ApiRetry(cluster.controller.apiOutageToleranceSeconds, lambda _m: None))


def cancel(
    run_uri: str,
    run_id: str | None,
    cluster: ClusterSettings,
    api_client: Any = None,
    *,
    out: TextIO | None = None,
    undo: bool = False,
    delete_jobs: bool = True,
) -> int:
    """``bezoar cancel``: mark the run cancelled in its store, then delete every Job of the run
    (propagationPolicy Background); return 0. ``undo`` removes the mark (and deletes nothing);
    ``delete_jobs=False`` (a local run, no cluster to reach) only marks it: its ``bezoar run`` stops its stages.

    Deleting a Job terminates its pods (SIGTERM, then the grace period): a stage saves what it can
    under ``_work/``, and a later ``bezoar run`` (after ``--undo``) resumes from there. Committed
    stages stay committed.
    """
    from kubernetes import client

    out = out or sys.stdout
    ApiException = api_exception()
    try:
        rid = run_id or run_id_from_uri(run_uri)
        store = open_store(run_uri)
        if undo:
            lifted = uncancel(store)
            out.write(f"[bezoar] cancel --undo: run {rid} {'may run again' if lifted else 'was not cancelled'}\n")
            return 0
        marker = cancel_run(store)
        out.write(f"[bezoar] cancel: run {rid} marked cancelled in {store.uri} ({marker.get('cancelled_at')}): "
                  "no controller of it will start or go on\n")
        if not delete_jobs:
            out.write("[bezoar] cancel: no Kubernetes configuration here: a local `bezoar run` of it stops its stages "
                      "(exit 4); no Jobs to delete\n")
            return 0
        api = api_client if api_client is not None else make_api_client()
        jobs = JobApi(client.BatchV1Api(api), client.CoreV1Api(api), cluster.namespace, short_run_id(rid),
                      ApiRetry(cluster.controller.apiOutageToleranceSeconds,
                               lambda m: print(f"[bezoar] {m}", file=out)))
        names: list[str] = []
        if cluster.distributed.launcher != "job":  # groups first: their controller would make their Jobs again
            names += _group_api(api, cluster, rid).delete_run(run_selector(rid))
        names += jobs.delete_run_jobs(run_selector(rid))
        if names:
            what = {"jobset": "JobSet(s) and Job(s)", "trainjob": "TrainJob(s) and Job(s)"}.get(
                cluster.distributed.launcher, "Job(s)")
            out.write(f"[bezoar] cancel: deleted {len(names)} {what} of run {rid} in namespace {cluster.namespace}: "
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
