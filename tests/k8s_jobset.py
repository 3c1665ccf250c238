"""JobSet (jobset.x-k8s.io/v1alpha2) and Kubeflow Trainer v2 (trainer.kubeflow.org/v1alpha1) for the loopback
harness (k8s_harness.py): their API (served only where the harness "installs" the CRDs), webhooks and
controllers, modelled from their source (docs/distributed.md, "JobSet and TrainJob in the harness", names
the commits and lines read). The harness's own Job controller runs the child Jobs, so everything a Job
does (podFailurePolicy, backoff, pods, DNS under a headless Service) holds for a group as well.

**JobSet.** The mutating webhook defaults ``successPolicy`` (All), ``startupPolicy`` (AnyOrder), each
replicated Job's ``completionMode`` (Indexed) and pod ``restartPolicy`` (OnFailure when unset),
``network.enableDNSHostnames`` and ``publishNotReadyAddresses`` (true) and unnamed failure-policy rules.
The validating webhook refuses what upstream refuses: child Job or pod names over 63 characters or not
DNS-1035, rule names outside ``^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$`` or repeated, unknown
``onJobFailureReasons``, actions behind feature gates (RestartJob*), unknown replicated Jobs in targets;
each replicated Job's template must be a valid batch/v1 Job (the harness's strict Job schema).
``network``, ``successPolicy``, ``failurePolicy``, ``startupPolicy`` are immutable (CEL). The
controller, each pass: child Jobs (owned, ``jobset.sigs.k8s.io/restart-attempt`` below ``status.restarts``:
from an earlier attempt, deleted with propagation Foreground and not made again until their pods are
gone); a failed child Job applies the failure policy (first matching rule by the Job's failure reason and
replicated Job; none matching: RestartJobSet; no policy: Failed ``FailedJobs``); RestartJobSet counts a
restart (``status.restarts`` and ``restartsCountTowardsMax``, condition ``RestartingJobSet``) unless
``maxRestarts`` is reached (Failed ``ReachedMaxRestarts``); FailJobSet fails it at once
(``FailJobSetFailurePolicyAction``); the success policy (All: every Job of the targeted replicated Jobs;
Any: one) gives ``Completed`` (``AllJobsCompleted``); a finished JobSet deletes its active Jobs. It makes
the headless Service (name: the subdomain, default the JobSet's name; selector
``jobset.sigs.k8s.io/jobset-name``) and the missing Jobs, named ``<jobset>-<replicatedJob>-<index>``,
labelled and annotated (Job and pod template) with ``jobset.sigs.k8s.io/{jobset-name, jobset-uid,
replicatedjob-name, replicatedjob-replicas, global-replicas, job-index, job-key, job-global-index,
group-name, group-replicas, job-group-index, restart-attempt}``, ``subdomain`` set on the pods when DNS
hostnames are on, ``suspend`` following the JobSet.

**TrainJob.** The webhook refuses a TrainJob whose ClusterTrainingRuntime does not exist, ``PET_*``
variables in ``trainer.env``, ``numProcPerNode < 1``, a name that is not an RFC 1035 label, runtime patches
with a manager that is not a domain-prefixed path, a replicated Job or container the runtime does not
have, or env for the ``node`` container; ``runtimeRef``, ``trainer``, ``initializer`` are immutable and
``runtimePatches`` change only while suspended. The controller builds a JobSet named like the TrainJob
(owned by it) from the runtime's template: the runtime patches merged in (strategic merge: lists keyed by
name), the trainer's ``numNodes`` as the trainer replicated Job's parallelism/completions (replicas 1),
``image``/``command``/``args`` on its ``node`` container, ``env`` upserted, ``resourcesPerNode`` over the
container's resources, and the torch plugin's ``PET_NNODES``, ``PET_NPROC_PER_NODE`` (``auto`` without a
GPU: the CPU count), ``PET_NODE_RANK`` (the completion index), ``PET_MASTER_ADDR``
(``<trainjob>-node-0-0.<trainjob>``), ``PET_MASTER_PORT`` (29500) and container port 29500. Its status
copies the JobSet's ``Completed`` (as ``Complete``) and ``Failed`` conditions and per-Job counts.

Not modelled: TTL after finished, startup order, dependsOn, coordinator, in-place restarts, volume claim
policies, Kueue admission of JobSets/TrainJobs, initializers, other ML policies than torch.

The module is over 500 lines because it holds two controllers and their admission webhooks, which share
their helpers (conditions, the JobSet a TrainJob becomes); splitting them would only move imports around.
"""

from __future__ import annotations

import copy
import hashlib
import re
import time
import uuid
from typing import Any

JOBSET_GROUP, JOBSET_VERSION = "jobset.x-k8s.io", "v1alpha2"
TRAINER_GROUP, TRAINER_VERSION = "trainer.kubeflow.org", "v1alpha1"
K = "jobset.sigs.k8s.io/"
RESTARTS = K + "restart-attempt"
JOBSET_NAME = K + "jobset-name"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
RULE_NAME = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
JOB_FAILURE_REASONS = ("BackoffLimitExceeded", "DeadlineExceeded", "FailedIndexes", "MaxFailedIndexesExceeded",
                       "PodFailurePolicy")
PET = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
TRAINER_PORT = 29500
ANCESTOR = "trainer.kubeflow.org/trainjob-ancestor-step"

# Where each kind is served, for discovery and the routes: (group, version) -> {plural: (kind, namespaced)}
RESOURCES = {
    (JOBSET_GROUP, JOBSET_VERSION): {"jobsets": ("JobSet", True)},
    (TRAINER_GROUP, TRAINER_VERSION): {"trainjobs": ("TrainJob", True),
                                       "clustertrainingruntimes": ("ClusterTrainingRuntime", False)},
}
CRD_OF_GROUP = {JOBSET_GROUP: "jobset", TRAINER_GROUP: "trainjob"}

# The fields each object of these kinds may have (unknown ones: refused with fieldValidation=Strict, else
# dropped, as the API server prunes custom resources). "*": any content (validated elsewhere).
_META = "*"
_JOBSET_SPEC = {
    "replicatedJobs": [{"name": None, "groupName": None, "replicas": None, "dependsOn": "*",
                        "template": {"metadata": _META, "spec": "*"}}],
    "network": {"enableDNSHostnames": None, "subdomain": None, "publishNotReadyAddresses": None},
    "successPolicy": {"operator": None, "targetReplicatedJobs": None},
    "failurePolicy": {"maxRestarts": None, "restartStrategy": None,
                      "rules": [{"name": None, "action": None, "onJobFailureReasons": None,
                                 "onJobFailureMessagePatterns": None, "targetReplicatedJobs": None}]},
    "startupPolicy": {"startupPolicyOrder": None}, "suspend": None, "coordinator": "*", "managedBy": None,
    "ttlSecondsAfterFinished": None, "volumeClaimPolicies": "*",
}
_CONTAINER_PATCH = {"name": None, "env": "*", "volumeMounts": "*", "securityContext": "*"}
_POD_SPEC_PATCH = {"serviceAccountName": None, "volumes": "*", "initContainers": [_CONTAINER_PATCH],
                   "containers": [_CONTAINER_PATCH], "imagePullSecrets": "*", "securityContext": "*",
                   "nodeSelector": "*", "affinity": "*", "tolerations": "*", "schedulingGates": "*",
                   "terminationGracePeriodSeconds": None}
_LABELS_ONLY = {"labels": "*", "annotations": "*"}
_TRAINJOB_SPEC = {
    "runtimeRef": {"name": None, "apiGroup": None, "kind": None},
    "initializer": "*",
    "trainer": {"image": None, "command": None, "args": None, "env": "*", "numNodes": None,
                "resourcesPerNode": "*", "numProcPerNode": None},
    "runtimePatches": [{"manager": None, "time": None, "trainingRuntimeSpec": {"template": {
        "metadata": _LABELS_ONLY,
        "spec": {"replicatedJobs": [{"name": None, "template": {
            "metadata": _LABELS_ONLY,
            "spec": {"template": {"metadata": _LABELS_ONLY, "spec": _POD_SPEC_PATCH}}}}]}}}}],
    "suspend": None, "activeDeadlineSeconds": None, "managedBy": None,
}
SCHEMAS: dict[str, Any] = {
    "JobSet": {"apiVersion": None, "kind": None, "metadata": _META, "spec": _JOBSET_SPEC, "status": "*"},
    "TrainJob": {"apiVersion": None, "kind": None, "metadata": _META, "spec": _TRAINJOB_SPEC, "status": "*"},
    "ClusterTrainingRuntime": {"apiVersion": None, "kind": None, "metadata": _META, "spec": "*", "status": "*"},
}


class Refused(Exception):
    """What the API server (or the kind's webhook) answers with ``code``."""

    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


def invalid(kind: str, group: str, name: str, what: str) -> Refused:
    return Refused(422, "Invalid", f'{kind}.{group} "{name}" is invalid: {what}')


# ---------------------------------------------------------------------------------------------
# Unknown fields, discovery
# ---------------------------------------------------------------------------------------------
def prune(obj: Any, schema: Any, strict: bool, path: str = "") -> list[str]:
    """Drop (or, ``strict``, list) the fields ``schema`` does not know; returns the unknown paths."""
    if schema == "*" or schema is None:
        return []
    unknown: list[str] = []
    if isinstance(schema, list) and isinstance(obj, list):
        for i, item in enumerate(obj):
            unknown += prune(item, schema[0], strict, f"{path}[{i}]")
        return unknown
    if isinstance(schema, dict) and isinstance(obj, dict):
        for key in list(obj):
            if key not in schema:
                unknown.append(f"{path}.{key}" if path else key)
                if not strict:
                    del obj[key]
                continue
            unknown += prune(obj[key], schema[key], strict, f"{path}.{key}" if path else key)
    return unknown


def check_fields(body: dict[str, Any], strict: bool) -> None:
    unknown = prune(body, SCHEMAS[body.get("kind", "")], strict)
    if strict and unknown:
        raise Refused(400, "BadRequest", f'{body["kind"]} in version "{body["apiVersion"].split("/")[-1]}" cannot '
                                         f"be handled as a {body['kind']}: strict decoding error: "
                                         + ", ".join(f'unknown field "{u}"' for u in unknown))


def discovery(group: str, version: str) -> dict[str, Any] | None:
    res = RESOURCES.get((group, version))
    if res is None:
        return None
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{group}/{version}",
            "resources": [{"name": plural, "singularName": kind.lower(), "namespaced": namespaced, "kind": kind,
                           "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
                          for plural, (kind, namespaced) in res.items()]}


def cond(ctype: str, reason: str, message: str, status: str = "True") -> dict[str, Any]:
    """A metav1.Condition (no lastProbeTime, unlike a Job's)."""
    return {"type": ctype, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def set_condition(status: dict[str, Any], new: dict[str, Any]) -> bool:
    """meta.SetStatusCondition: replace the condition of that type when anything changed; True if it did."""
    conds = status.setdefault("conditions", [])
    for i, c in enumerate(conds):
        if c["type"] == new["type"]:
            if (c["status"], c["reason"], c["message"]) == (new["status"], new["reason"], new["message"]):
                return False
            conds[i] = new
            return True
    conds.append(new)
    return True


def true(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or []
                 if c["type"] == ctype and c["status"] == "True"), None)


# ---------------------------------------------------------------------------------------------
# JobSet: webhooks
# ---------------------------------------------------------------------------------------------
def default_jobset(js: dict[str, Any]) -> None:
    spec = js["spec"]
    spec.setdefault("successPolicy", {"operator": "All"})
    spec.setdefault("startupPolicy", {"startupPolicyOrder": "AnyOrder"})
    for rj in spec.get("replicatedJobs") or []:
        rj.setdefault("replicas", 1)
        jspec = rj["template"].setdefault("spec", {})
        jspec.setdefault("completionMode", "Indexed")
        pod = jspec.setdefault("template", {}).setdefault("spec", {})
        if not pod.get("restartPolicy"):
            pod["restartPolicy"] = "OnFailure"
    net = spec.setdefault("network", {})
    net.setdefault("enableDNSHostnames", True)
    net.setdefault("publishNotReadyAddresses", True)
    for i, rule in enumerate((spec.get("failurePolicy") or {}).get("rules") or []):
        if not rule.get("name"):
            rule["name"] = f"failurePolicyRule{i}"
    if spec.get("failurePolicy") is not None:
        spec["failurePolicy"].setdefault("restartStrategy", "Recreate")


def validate_jobset(js: dict[str, Any], validate_job: Any) -> None:
    """The validating webhook and the CRD's enums; ``validate_job(name, body)`` checks a batch/v1 Job."""
    name = js["metadata"].get("name", "")
    spec = js["spec"]
    errs: list[str] = []
    rjobs = spec.get("replicatedJobs") or []
    names = [rj.get("name", "") for rj in rjobs]
    if not rjobs:
        errs.append("spec.replicatedJobs: Required value")
    if len(set(names)) != len(names):
        errs.append("spec.replicatedJobs: Duplicate value: replicated Job names must be unique")
    sub = (spec.get("network") or {}).get("subdomain")
    if sub and (not DNS_1035.match(sub) or len(sub) > 63):
        errs.append(f"spec.network.subdomain: Invalid value: {sub!r}: must be a DNS-1035 label of at most 63 "
                    "characters")
    for i, rj in enumerate(rjobs):
        jspec = rj["template"]["spec"]
        longest_job = f"{name}-{rj.get('name', '')}-{int(rj.get('replicas', 1)) - 1}"
        if not DNS_1035.match(longest_job) or len(longest_job) > 63:
            errs.append(f"spec.replicatedJobs[{i}].name: Invalid value: {longest_job!r}: JobSet name is too long, "
                        "job names generated for this JobSet will exceed 63 characters" if len(longest_job) > 63
                        else f"spec.replicatedJobs[{i}].name: Invalid value: {longest_job!r}: not a DNS-1035 label")
        if jspec.get("completionMode") == "Indexed" and jspec.get("completions"):
            pod_name = f"{longest_job}-{int(jspec['completions']) - 1}-abcde"
            if len(pod_name) > 63:
                errs.append(f"spec.replicatedJobs[{i}].name: Invalid value: {longest_job!r}: JobSet name is too long, "
                            "pod names generated for this JobSet will exceed 63 characters")
        try:
            validate_job(longest_job, {"apiVersion": "batch/v1", "kind": "Job",
                                       "metadata": {"name": longest_job, **(rj["template"].get("metadata") or {})},
                                       "spec": copy.deepcopy(jspec)})
        except Refused as e:
            errs.append(f"spec.replicatedJobs[{i}].template: {e.message}")
    fp = spec.get("failurePolicy")
    if fp is not None:
        if fp.get("restartStrategy") not in ("Recreate", "BlockingRecreate"):
            errs.append(f"spec.failurePolicy.restartStrategy: Unsupported value: {fp.get('restartStrategy')!r}: "
                        'supported values: "Recreate", "BlockingRecreate" (InPlaceRestart needs its feature gate)')
        seen: dict[str, int] = {}
        for i, rule in enumerate(fp.get("rules") or []):
            rn = rule.get("name", "")
            if not 1 <= len(rn) <= 128 or not RULE_NAME.match(rn):
                errs.append(f"invalid failure policy rule name '{rn}', a failure policy rule name must start with an "
                            "alphabetic character, optionally followed by a string of alphanumeric characters or "
                            "'_,:', and must end with an alphanumeric character or '_'")
            if rn in seen:
                errs.append(f"rule names are not unique, rules with indices [{seen[rn]} {i}] all have the same name "
                            f"'{rn}'")
            seen.setdefault(rn, i)
            action = rule.get("action")
            if action in ("RestartJob", "RestartJobAndIgnoreMaxRestarts"):
                errs.append("RestartJob and RestartJobAndIgnoreMaxRestarts failure policy actions are not allowed "
                            "when RestartJob feature gate is disabled")
            elif action not in ("FailJobSet", "RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts"):
                errs.append(f"spec.failurePolicy.rules[{i}].action: Unsupported value: {action!r}")
            for r in rule.get("onJobFailureReasons") or []:
                if r not in JOB_FAILURE_REASONS:
                    errs.append(f"invalid job failure reason '{r}' in failure policy is not a recognized job failure "
                                "reason")
            for t in rule.get("targetReplicatedJobs") or []:
                if t not in names:
                    errs.append(f"invalid replicatedJob name '{t}' in failure policy does not appear in "
                                ".spec.ReplicatedJobs")
    sp = spec.get("successPolicy") or {}
    if sp.get("operator") not in ("All", "Any"):
        errs.append(f"spec.successPolicy.operator: Unsupported value: {sp.get('operator')!r}: supported values: "
                    '"All", "Any"')
    for t in sp.get("targetReplicatedJobs") or []:
        if t not in names:
            errs.append(f"invalid replicatedJob name '{t}' does not appear in .spec.ReplicatedJobs")
    if errs:
        raise invalid("JobSet", JOBSET_GROUP, name, "; ".join(errs))


IMMUTABLE = {"JobSet": ("network", "successPolicy", "failurePolicy", "startupPolicy"),
             "TrainJob": ("runtimeRef", "trainer", "initializer", "managedBy", "activeDeadlineSeconds")}


def check_update(old: dict[str, Any], new: dict[str, Any]) -> None:
    kind = old["kind"]
    group = JOBSET_GROUP if kind == "JobSet" else TRAINER_GROUP
    for f in IMMUTABLE[kind]:
        if old["spec"].get(f) != new["spec"].get(f):
            raise invalid(kind, group, old["metadata"]["name"], f"spec.{f}: Invalid value: \"object\": "
                          + ("Value is immutable" if kind == "JobSet" else "field is immutable"))
    if kind == "TrainJob" and old["spec"].get("runtimePatches") != new["spec"].get("runtimePatches") \
            and not (old["spec"].get("suspend") or new["spec"].get("suspend")):
        raise invalid(kind, group, old["metadata"]["name"], "spec.runtimePatches: Forbidden: RuntimePatches can "
                      "only be modified when the TrainJob is suspended before or after the update")


# ---------------------------------------------------------------------------------------------
# JobSet: the controller
# ---------------------------------------------------------------------------------------------
def subdomain(js: dict[str, Any]) -> str:
    return (js["spec"].get("network") or {}).get("subdomain") or js["metadata"]["name"]


def _job_labels(js: dict[str, Any], rj: dict[str, Any], idx: int) -> dict[str, str]:
    name, ns = js["metadata"]["name"], js["metadata"]["namespace"]
    total = sum(int(r.get("replicas", 1)) for r in js["spec"]["replicatedJobs"])
    before = 0
    for r in js["spec"]["replicatedJobs"]:
        if r["name"] == rj["name"]:
            break
        before += int(r.get("replicas", 1))
    group = rj.get("groupName") or "default"
    in_group = [r for r in js["spec"]["replicatedJobs"] if (r.get("groupName") or "default") == group]
    group_before = 0
    for r in in_group:
        if r["name"] == rj["name"]:
            break
        group_before += int(r.get("replicas", 1))
    job_name = f"{name}-{rj['name']}-{idx}"
    return {JOBSET_NAME: name, K + "jobset-uid": js["metadata"]["uid"], K + "replicatedjob-name": rj["name"],
            RESTARTS: str((js.get("status") or {}).get("restarts", 0)),
            K + "replicatedjob-replicas": str(rj.get("replicas", 1)), K + "global-replicas": str(total),
            K + "job-index": str(idx), K + "job-key": hashlib.sha1(f"{ns}/{job_name}".encode()).hexdigest(),
            K + "job-global-index": str(before + idx), K + "group-name": group,
            K + "group-replicas": str(sum(int(r.get("replicas", 1)) for r in in_group)),
            K + "job-group-index": str(group_before + idx)}


def construct_job(js: dict[str, Any], rj: dict[str, Any], idx: int) -> dict[str, Any]:
    tmpl = copy.deepcopy(rj["template"])
    extra = _job_labels(js, rj, idx)
    meta = tmpl.get("metadata") or {}
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": f"{js['metadata']['name']}-{rj['name']}-{idx}",
                        "labels": {**(meta.get("labels") or {}), **extra},
                        "annotations": {**(meta.get("annotations") or {}), **extra},
                        "ownerReferences": [{"apiVersion": f"{JOBSET_GROUP}/{JOBSET_VERSION}", "kind": "JobSet",
                                             "name": js["metadata"]["name"], "uid": js["metadata"]["uid"],
                                             "controller": True, "blockOwnerDeletion": True}]},
           "spec": tmpl["spec"]}
    pmeta = job["spec"]["template"].setdefault("metadata", {})
    pmeta["labels"] = {**(pmeta.get("labels") or {}), **extra}
    pmeta["annotations"] = {**(pmeta.get("annotations") or {}), **extra}
    if js["spec"]["network"].get("enableDNSHostnames"):
        job["spec"]["template"]["spec"]["subdomain"] = subdomain(js)
    job["spec"]["suspend"] = bool(js["spec"].get("suspend"))
    return job


class JobSetController:
    """One reconcile pass per tick over each JobSet (called with the harness lock held)."""

    def __init__(self, fc: Any):
        self.fc = fc
        self.deleted: dict[str, set[str]] = {}  # JobSet uid -> uids of child Jobs deleted for a restart

    def children(self, js: dict[str, Any]) -> list[dict[str, Any]]:
        uid = js["metadata"]["uid"]
        return [o for (k, ns, _), o in self.fc.objects.items() if k == "Job" and ns == js["metadata"]["namespace"]
                and any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences") or [])]

    def reconcile(self, js: dict[str, Any]) -> None:
        fc = self.fc
        ns, name, uid = js["metadata"]["namespace"], js["metadata"]["name"], js["metadata"]["uid"]
        status = js.setdefault("status", {})
        before = copy.deepcopy(status)
        restarts = int(status.get("restarts", 0))
        previous, active, succeeded, failed = [], [], [], []
        for job in self.children(js):
            if int(job["metadata"]["labels"].get(RESTARTS, "0")) < restarts:
                previous.append(job)
            elif _job_cond(job, "Failed"):
                failed.append(job)
            elif _job_cond(job, "Complete"):
                succeeded.append(job)
            else:
                active.append(job)
        status["replicatedJobsStatus"] = [
            {"name": rj["name"], "ready": sum(1 for j in active if _rj(j) == rj["name"] and _ready(j, rj)),
             "succeeded": sum(1 for j in succeeded if _rj(j) == rj["name"]),
             "failed": sum(1 for j in failed if _rj(j) == rj["name"]),
             "active": sum(1 for j in active if _rj(j) == rj["name"]),
             "suspended": sum(1 for j in active if _rj(j) == rj["name"] and j["spec"].get("suspend"))}
            for rj in js["spec"]["replicatedJobs"]]
        if true(js, "Completed") or true(js, "Failed"):
            for job in active:
                self._delete(js, job)
            self._save(js, before)
            return
        for job in previous:
            self._delete(js, job)
        if failed:
            self._failure_policy(js, failed)
            self._save(js, before)
            return
        if succeeded and self._success(js, succeeded):
            set_condition(status, cond("Completed", "AllJobsCompleted", "jobset completed successfully"))
            set_condition(status, cond("RestartingJobSet", "JobSetCompleted", "jobset completed successfully",
                                       "False"))
            status["terminalState"] = "Completed"
            fc.timeline.append((time.time(), "complete", name))
            self._event(js, "AllJobsCompleted", "jobset completed successfully", "Normal")
            self._save(js, before)
            return
        if js["spec"]["network"].get("enableDNSHostnames") and ("Service", ns, subdomain(js)) not in fc.objects:
            fc.create_service(ns, {"apiVersion": "v1", "kind": "Service", "metadata": {
                "name": subdomain(js), "namespace": ns, "ownerReferences": [_owner(js)]},
                "spec": {"clusterIP": "None", "selector": {JOBSET_NAME: name},
                         "publishNotReadyAddresses": js["spec"]["network"].get("publishNotReadyAddresses", True)}})
        # suspend / resume: the Jobs follow the JobSet (resumeJobsIfNecessary, suspendJobs)
        suspended = bool(js["spec"].get("suspend"))
        for job in active:
            if bool(job["spec"].get("suspend")) != suspended:
                job["spec"]["suspend"] = suspended
                fc._put("Job", ns, job, "MODIFIED")
        if suspended:
            set_condition(status, cond("Suspended", "SuspendedJobs", "jobset is suspended"))
        elif true(js, "Suspended"):
            set_condition(status, cond("Suspended", "ResumeJobs", "jobset is resumed", "False"))
        existing = {j["metadata"]["name"] for j in previous + active + succeeded + failed}
        pending_gc = self.deleted.get(uid, set())
        still_there = {p["metadata"]["labels"].get("batch.kubernetes.io/controller-uid") for (k, pns, _), p
                       in fc.objects.items() if k == "Pod" and pns == ns}
        if pending_gc & still_there:
            self._save(js, before)  # Foreground: the old Jobs stay until their pods are gone
            return
        self.deleted.pop(uid, None)
        for rj in js["spec"]["replicatedJobs"]:
            for idx in range(int(rj.get("replicas", 1))):
                if f"{name}-{rj['name']}-{idx}" not in existing:
                    fc.create_job(ns, construct_job(js, rj, idx))
        if restarts and all(r["ready"] == r["active"] and r["active"] for r in status["replicatedJobsStatus"]):
            set_condition(status, cond("RestartingJobSet", "JobsReady", "all jobs are ready", "False"))
        self._save(js, before)

    def _delete(self, js: dict[str, Any], job: dict[str, Any]) -> None:
        if job["metadata"].get("deletionTimestamp"):
            return
        self.deleted.setdefault(js["metadata"]["uid"], set()).add(job["metadata"]["uid"])
        self.fc.delete_job(js["metadata"]["namespace"], job["metadata"]["name"], "Foreground")

    def _failure_policy(self, js: dict[str, Any], failed: list[dict[str, Any]]) -> None:
        status = js["status"]
        first = min(failed, key=lambda j: _job_cond(j, "Failed")["lastTransitionTime"])  # type: ignore[index]
        fp = js["spec"].get("failurePolicy")
        if fp is None:
            self._fail(js, "FailedJobs", f"jobset failed due to one or more job failures (first failed job: "
                                         f"{first['metadata']['name']})")
            return
        rule, job = None, first
        for r in fp.get("rules") or []:
            hits = [j for j in failed if (not r.get("onJobFailureReasons")
                                          or _job_cond(j, "Failed")["reason"] in r["onJobFailureReasons"])  # type: ignore[index]
                    and (not r.get("onJobFailureMessagePatterns") or any(
                        re.search(p, _job_cond(j, "Failed")["message"]) for p in r["onJobFailureMessagePatterns"]))  # type: ignore[index]
                    and (not r.get("targetReplicatedJobs") or _rj(j) in r["targetReplicatedJobs"])]
            if hits:
                rule, job = r, min(hits, key=lambda j: _job_cond(j, "Failed")["lastTransitionTime"])  # type: ignore[index]
                break
        action = rule["action"] if rule else "RestartJobSet"
        jname = job["metadata"]["name"]
        if action == "FailJobSet":
            self._fail(js, "FailJobSetFailurePolicyAction",
                       f"applying FailJobSet failure policy action (first failed job: {jname})")
            return
        counts = action == "RestartJobSet"
        if counts and int(status.get("restartsCountTowardsMax", 0)) >= int(fp.get("maxRestarts", 0)):
            self._fail(js, "ReachedMaxRestarts",
                       f"jobset failed due to reaching max number of restarts (first failed job: {jname})")
            return
        status["restarts"] = int(status.get("restarts", 0)) + 1
        if counts:
            status["restartsCountTowardsMax"] = int(status.get("restartsCountTowardsMax", 0)) + 1
        reason = f"FailurePolicy_{rule['name']}" if rule else "DefaultFailurePolicy"
        msg = (f"applying {action} failure policy action (first failed job: {jname})")
        set_condition(status, cond("RestartingJobSet", reason, msg))
        self.fc.timeline.append((time.time(), f"restart-{status['restarts']}", js["metadata"]["name"]))
        self._event(js, f"{action}FailurePolicyAction", msg)

    def _fail(self, js: dict[str, Any], reason: str, message: str) -> None:
        set_condition(js["status"], cond("Failed", reason, message))
        set_condition(js["status"], cond("RestartingJobSet", "JobSetFailed", "jobset failed", "False"))
        js["status"]["terminalState"] = "Failed"
        self.fc.timeline.append((time.time(), "failed", js["metadata"]["name"]))
        self._event(js, reason, message)

    def _success(self, js: dict[str, Any], succeeded: list[dict[str, Any]]) -> bool:
        sp = js["spec"]["successPolicy"]
        targets = sp.get("targetReplicatedJobs") or [rj["name"] for rj in js["spec"]["replicatedJobs"]]
        hits = sum(1 for j in succeeded if _rj(j) in targets)
        if sp["operator"] == "Any":
            return hits >= 1
        return hits >= sum(int(rj.get("replicas", 1)) for rj in js["spec"]["replicatedJobs"] if rj["name"] in targets)

    def _event(self, js: dict[str, Any], reason: str, message: str, etype: str = "Warning") -> None:
        self.fc._event(js["metadata"]["namespace"], js, reason, message, etype, "jobset-controller")

    def _save(self, js: dict[str, Any], before: dict[str, Any]) -> None:
        if js["status"] != before:
            self.fc._put("JobSet", js["metadata"]["namespace"], js, "MODIFIED")


def _owner(obj: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": obj["metadata"]["name"],
            "uid": obj["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def _job_cond(job: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in (job.get("status") or {}).get("conditions") or []
                 if c["type"] == ctype and c["status"] == "True"), None)


def _rj(job: dict[str, Any]) -> str:
    return str(job["metadata"]["labels"].get(K + "replicatedjob-name", ""))


def _ready(job: dict[str, Any], rj: dict[str, Any]) -> bool:
    want = int(job["spec"].get("parallelism", 1))
    return int((job.get("status") or {}).get("ready", 0)) + int((job.get("status") or {}).get("succeeded", 0)) >= want


# ---------------------------------------------------------------------------------------------
# TrainJob: webhook and controller
# ---------------------------------------------------------------------------------------------
def default_trainjob(tj: dict[str, Any]) -> None:
    ref = tj["spec"].setdefault("runtimeRef", {})
    ref.setdefault("apiGroup", TRAINER_GROUP)
    ref.setdefault("kind", "ClusterTrainingRuntime")


def validate_trainjob(tj: dict[str, Any], runtime: dict[str, Any] | None) -> None:
    name = tj["metadata"].get("name", "")
    spec = tj["spec"]
    errs = []
    if not DNS_1035.match(name) or len(name) > 63:
        errs.append("metadata.name must match RFC 1035 DNS label format and be no more than 63 characters")
    ref = spec.get("runtimeRef") or {}
    if ref.get("apiGroup") != TRAINER_GROUP or ref.get("kind") not in ("ClusterTrainingRuntime", "TrainingRuntime"):
        raise Refused(403, "Forbidden", f'admission webhook "validator.trainjob.trainer.kubeflow.org" denied the '
                                        f"request: unsupported runtime: {ref.get('kind')}.{ref.get('apiGroup')}")
    if runtime is None:
        raise invalid("TrainJob", TRAINER_GROUP, name, f"spec.RuntimeRef: Invalid value: {ref}: "
                      f'clustertrainingruntimes.trainer.kubeflow.org "{ref.get("name")}" not found: specified '
                      "clusterTrainingRuntime must be created before the TrainJob is created")
    trainer = spec.get("trainer") or {}
    reserved = sorted({e["name"] for e in trainer.get("env") or []} & set(PET))
    if reserved:
        errs.append(f"spec.trainer.env: Invalid value: must not have reserved envs, invalid envs configured: "
                    f"{reserved}")
    if trainer.get("numProcPerNode") is not None and int(trainer["numProcPerNode"]) < 1:
        errs.append("spec.trainer.numProcPerNode: Invalid value: numProcPerNode must be greater than or equal to 1")
    rjobs = {rj["name"]: {c["name"] for c in rj["template"]["spec"]["template"]["spec"].get("containers", [])}
             | {c["name"] for c in rj["template"]["spec"]["template"]["spec"].get("initContainers", [])}
             for rj in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
    for p in spec.get("runtimePatches") or []:
        if not re.match(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?\.)+[a-z]{2,}/[A-Za-z0-9][-A-Za-z0-9_./]*$",
                        p.get("manager", "")):
            errs.append(f"spec.runtimePatches.manager: Invalid value: {p.get('manager')!r}: must be a domain-prefixed "
                        "path (such as \"acme.io/foo\")")
        for rp in (((p.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}).get(
                "replicatedJobs") or []:
            if rp["name"] not in rjobs:
                errs.append(f"spec.runtimePatches: Invalid value: must not have replicatedJob {rp['name']!r} that "
                            "doesn't exist in the runtime")
                continue
            pod = (((rp.get("template") or {}).get("spec") or {}).get("template") or {}).get("spec") or {}
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                if c["name"] not in rjobs[rp["name"]]:
                    errs.append(f"spec.runtimePatches: Invalid value: must not have container that doesn't exist in "
                                f"the runtime job {rp['name']}")
                elif c.get("env") and c["name"] in ("dataset-initializer", "model-initializer", "node"):
                    errs.append("spec.runtimePatches: Invalid value: must not have envs for the dataset-initializer, "
                                "model-initializer, node containers")
    if errs:
        raise invalid("TrainJob", TRAINER_GROUP, name, "; ".join(errs))


def _merge_by_name(base: list[dict[str, Any]], patch: list[dict[str, Any]], key: str = "name") -> list[dict[str, Any]]:
    out = copy.deepcopy(base)
    for item in patch:
        cur = next((x for x in out if x.get(key) == item.get(key)), None)
        if cur is None:
            out.append(copy.deepcopy(item))
        else:
            smp(cur, item)
    return out


# list fields merged by key in a strategic merge patch of a JobSet spec (the others are replaced)
_MERGE_KEYS = {"replicatedJobs": "name", "containers": "name", "initContainers": "name", "volumes": "name",
               "env": "name", "volumeMounts": "mountPath", "imagePullSecrets": "name", "ports": "containerPort"}


def smp(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """A strategic merge patch of the fields a runtime patch may hold (in place)."""
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(target.get(k), dict):
            smp(target[k], v)
        elif isinstance(v, list) and k in _MERGE_KEYS and isinstance(target.get(k), list):
            target[k] = _merge_by_name(target[k], v, _MERGE_KEYS[k])
        else:
            target[k] = copy.deepcopy(v)


def _upsert_env(env: list[dict[str, Any]], new: list[dict[str, Any]]) -> None:
    for e in new:
        for i, cur in enumerate(env):
            if cur["name"] == e["name"]:
                env[i] = copy.deepcopy(e)
                break
        else:
            env.append(copy.deepcopy(e))


def _cpu_count(res: dict[str, Any]) -> int:
    q = str(((res.get("limits") or {}).get("cpu")) or ((res.get("requests") or {}).get("cpu")) or "1")
    return max(1, int(float(q[:-1]) / 1000) if q.endswith("m") else int(float(q)))


def build_jobset(tj: dict[str, Any], runtime: dict[str, Any]) -> dict[str, Any]:
    """The JobSet the Trainer makes for ``tj`` from the runtime (the torch plugin's part included)."""
    name, ns = tj["metadata"]["name"], tj["metadata"]["namespace"]
    tmpl = copy.deepcopy(runtime["spec"]["template"])
    spec = tmpl.setdefault("spec", {})
    labels = dict((tmpl.get("metadata") or {}).get("labels") or {})
    annotations = dict((tmpl.get("metadata") or {}).get("annotations") or {})
    for p in tj["spec"].get("runtimePatches") or []:
        t = (p.get("trainingRuntimeSpec") or {}).get("template") or {}
        labels.update((t.get("metadata") or {}).get("labels") or {})
        annotations.update((t.get("metadata") or {}).get("annotations") or {})
        if t.get("spec"):
            smp(spec, t["spec"])
    trainer = tj["spec"].get("trainer") or {}
    ml = runtime["spec"].get("mlPolicy") or {}
    nodes = int(trainer.get("numNodes") or ml.get("numNodes") or 1)
    for rj in spec["replicatedJobs"]:
        if ((rj["template"].get("metadata") or {}).get("labels") or {}).get(ANCESTOR) != "trainer":
            continue
        rj["replicas"] = 1
        rj["template"]["spec"]["parallelism"] = rj["template"]["spec"]["completions"] = nodes
        for c in rj["template"]["spec"]["template"]["spec"]["containers"]:
            if c["name"] != "node":
                continue
            for f in ("image", "command", "args"):
                if trainer.get(f) is not None:
                    c[f] = copy.deepcopy(trainer[f])
            env = c.setdefault("env", [])
            _upsert_env(env, trainer.get("env") or [])
            if trainer.get("resourcesPerNode"):
                res = c.setdefault("resources", {})
                for part in ("requests", "limits"):
                    if part in trainer["resourcesPerNode"]:
                        res[part] = {**(res.get(part) or {}), **trainer["resourcesPerNode"][part]}
            if "torch" in ml:
                res = c.get("resources") or {}
                gpus = sum(int(v) for r in (res.get("requests") or res.get("limits") or {}, ) for k, v in r.items()
                           if "gpu" in k.lower())
                procs = trainer.get("numProcPerNode") or ("auto" if gpus else _cpu_count(res))
                _upsert_env(env, [
                    {"name": "PET_NNODES", "value": str(nodes)},
                    {"name": "PET_NPROC_PER_NODE", "value": str(procs)},
                    {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {
                        "fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}}},
                    {"name": "PET_MASTER_ADDR", "value": f"{name}-node-0-0.{name}"},
                    {"name": "PET_MASTER_PORT", "value": str(TRAINER_PORT)}])
                ports = c.setdefault("ports", [])
                if not any(p.get("containerPort") == TRAINER_PORT for p in ports):
                    ports.append({"containerPort": TRAINER_PORT})
    if tj["spec"].get("suspend") is not None:
        spec["suspend"] = bool(tj["spec"]["suspend"])
    return {"apiVersion": f"{JOBSET_GROUP}/{JOBSET_VERSION}", "kind": "JobSet",
            "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": annotations,
                         "ownerReferences": [_owner(tj)]},
            "spec": spec}


class TrainJobController:
    def __init__(self, fc: Any):
        self.fc = fc
        self.said: set[tuple[str, str]] = set()  # (TrainJob uid, message): each creation failure is an event once

    def reconcile(self, tj: dict[str, Any]) -> None:
        fc = self.fc
        ns, name = tj["metadata"]["namespace"], tj["metadata"]["name"]
        status = tj.setdefault("status", {})
        before = copy.deepcopy(status)
        js = fc.objects.get(("JobSet", ns, name))
        finished = true(tj, "Complete") or true(tj, "Failed")
        if js is None and not finished:
            runtime = fc.objects.get(("ClusterTrainingRuntime", "", tj["spec"]["runtimeRef"]["name"]))
            why = None
            if runtime is None:  # deleted after admission: the Trainer reports it and retries
                why = "not found ClusterTrainingRuntime specified in TrainJob"
            else:
                try:
                    js = fc.create_jobset(ns, build_jobset(tj, runtime))
                except Refused as e:
                    why = e.message
            if why is not None and (tj["metadata"]["uid"], why) not in self.said:
                self.said.add((tj["metadata"]["uid"], why))
                fc._event(ns, tj, "TrainJobResourcesCreationFailed",
                          f"TrainJob resources reconciliation failed: {why}"[:1000], "Warning", "trainjob-controller")
        elif js is not None and (tj["spec"].get("suspend") or js["spec"].get("suspend")) and \
                bool(js["spec"].get("suspend")) != bool(tj["spec"].get("suspend")):
            js["spec"]["suspend"] = bool(tj["spec"].get("suspend"))  # the JobSet is rebuilt only while suspended
            fc._put("JobSet", ns, js, "MODIFIED")
        if tj["spec"].get("suspend"):
            set_condition(status, cond("Suspended", "Suspended", "TrainJob is suspended"))
        elif true(tj, "Suspended"):
            set_condition(status, cond("Suspended", "Resumed", "TrainJob is resumed", "False"))
        if js is not None:
            for src, dst in (("Completed", "Complete"), ("Failed", "Failed")):
                c = true(js, src)
                if c is not None:
                    set_condition(status, {**c, "type": dst})
            status["jobsStatus"] = [dict(r) for r in (js.get("status") or {}).get("replicatedJobsStatus") or []]
        if status != before:
            fc._put("TrainJob", ns, tj, "MODIFIED")


def new_uid() -> str:
    return str(uuid.uuid4())
