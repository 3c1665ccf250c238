"""A training stage on several pods: the objects that run one group (pure builders, like jobs.py).

``scheduling.train.nodes`` (or ``stageOverrides.<stage>.nodes``) pods of ``processesPerNode`` processes
each (default: one per GPU of the pod). One pod of several processes stays a plain Job whose command has
``--nproc-per-node``; several pods are a group, run by the launcher below. Every pod runs the stage's
usual ``bezoar stage`` command with the launcher flags (:mod:`bezoar_jobs.launch`), which start
torch.distributed.run (with a static rendezvous on node 0 for a group).

``distributed.launcher`` picks the objects of a group:

- ``job`` (built in, what the controller runs): an **Indexed Job** with ``completions = parallelism =
  nodes`` (pod *i* is node rank *i*, from ``JOB_COMPLETION_INDEX``) plus a **headless Service** of the
  Job's name. The Job controller gives each pod the hostname ``<job>-<i>``; with ``subdomain: <service>``
  the cluster DNS resolves ``<job>-0.<service>`` to node 0, the rendezvous address. The Service publishes
  pods before they are ready (the rendezvous happens before any readiness). Failures:
  ``backoffLimitPerIndex`` retries each node's pod, ``maxFailedIndexes: 0`` fails the group as soon as one
  node has used up its retries, and the ``podFailurePolicy`` keeps the stage contract (exit 2: FailJob;
  a disruption: Ignore). A lost node makes the other ranks' collectives fail, so every pod of the group
  exits and is replaced; the new group resumes from the stage's last complete checkpoint (the same
  world size: the controller never changes it between attempts). Rank 0 commits; the Job completes when
  every index succeeded.
- ``jobset`` (``jobset.x-k8s.io/v1alpha2``): one replicated Job of the same Indexed shape; JobSet makes
  the headless Service itself (``network.enableDNSHostnames``) and restarts the whole group on a
  failure (``failurePolicy.maxRestarts``, the stage's ``backoffLimit``); exit 2 (bad input) fails it at
  once (a FailJobSet rule on the child Job's ``PodFailurePolicy`` reason).
- ``trainjob`` (Kubeflow Trainer v2, ``trainer.kubeflow.org/v1alpha1``): the runtime
  (``distributed.trainingRuntime``, a ClusterTrainingRuntime of the torch framework) owns the JobSet and
  passes the group's shape as ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``,
  ``PET_MASTER_PORT``; the container's args read them, and a ``runtimePatches`` entry gives the runtime's
  Jobs and pods our labels, hardening, volumes and placement.

The controller runs all three (k8s_groups.py for the two custom resources); ``bezoar render`` writes them.

Kubernetes only: nothing here imports torch or the Kubernetes client.
"""

from __future__ import annotations

import copy
from typing import Any

from .cluster import ClusterSettings, stage_family

JOBSET_API = "jobset.x-k8s.io/v1alpha2"
TRAINJOB_API = "trainer.kubeflow.org/v1alpha1"
REPLICATED_JOB = "node"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


def shape(stage: str, cluster: ClusterSettings) -> tuple[int, int]:
    """(nodes, processes per node) of ``stage``: (1, 1) for a stage that runs one process."""
    if stage_family(stage) != "train":
        return 1, 1
    sched = cluster.scheduling_for(stage)
    return sched.nodes, sched.processes_per_node()


def is_group(stage: str, cluster: ClusterSettings) -> bool:
    """Several pods (nodes): an Indexed Job + headless Service (or a JobSet / TrainJob)."""
    return shape(stage, cluster)[0] > 1


def is_multiprocess(stage: str, cluster: ClusterSettings) -> bool:
    """Several processes, on one pod or more: the stage runs under torch.distributed.run. On one pod (one node,
    e.g. ``gpus: 8``) it stays a plain Job: ``--nproc-per-node`` alone, a local rendezvous."""
    nodes, procs = shape(stage, cluster)
    return nodes * procs > 1


def service_name(job: str) -> str:
    """The headless Service of a group: the Job's own name (a DNS-1035 label: Job names start with "bz-")."""
    return job


def launch_flags(stage: str, cluster: ClusterSettings, master: str) -> list[str]:
    """The ``bezoar stage`` flags of one pod of the group; ``master``: node 0's DNS name."""
    nodes, procs = shape(stage, cluster)
    flags = ["--nproc-per-node", str(procs)]
    if nodes > 1:
        flags += ["--nnodes", str(nodes), "--node-rank", "$(JOB_COMPLETION_INDEX)", "--master-addr", master,
                  "--master-port", str(cluster.distributed.port)]
    return flags


def job_master(job: str) -> str:
    """Node 0 of an Indexed Job with its headless Service: ``<job>-0.<service>``."""
    return f"{job}-0.{service_name(job)}"


def group_job_spec(spec: dict[str, Any], stage: str, cluster: ClusterSettings, job: str) -> None:
    """Make a stage Job's spec (jobs.build_job) the Indexed Job of a group, in place."""
    nodes, _ = shape(stage, cluster)
    sched = cluster.scheduling_for(stage)
    spec["completionMode"] = "Indexed"
    spec["completions"] = nodes
    spec["parallelism"] = nodes
    spec.pop("backoffLimit", None)  # per index: each node's pod has its own retries
    spec["backoffLimitPerIndex"] = sched.backoffLimit
    spec["maxFailedIndexes"] = 0  # one node out of retries fails the group (its pods are terminated)
    spec["template"]["spec"]["subdomain"] = service_name(job)


def headless_service(job: dict[str, Any], cluster: ClusterSettings) -> dict[str, Any]:
    """The headless Service that gives the group's pods their DNS names (``<job>-<i>.<service>``)."""
    name = job["metadata"]["name"]
    labels = dict(job["metadata"]["labels"])
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service_name(name), "namespace": job["metadata"]["namespace"], "labels": labels,
                     "annotations": dict(job["metadata"].get("annotations") or {})},
        "spec": {
            "clusterIP": "None",
            # the Job controller labels every pod of the Job with its name
            "selector": {"batch.kubernetes.io/job-name": name},
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": cluster.distributed.port, "protocol": "TCP"}],
        },
    }


def jobset(job: dict[str, Any], stage: str, cluster: ClusterSettings) -> dict[str, Any]:
    """The group as a JobSet: one replicated Job (the Indexed Job's spec), DNS hostnames from JobSet."""
    name = job["metadata"]["name"]
    inner = copy.deepcopy(job["spec"])
    inner.pop("ttlSecondsAfterFinished", None)  # the JobSet's own
    inner.pop("suspend", None)
    inner["template"]["spec"].pop("subdomain", None)  # JobSet sets it (network.subdomain)
    # JobSet's pods are <jobset>-<replicatedJob>-<job index>-<pod index>, under the JobSet's headless Service
    master = f"{name}-{REPLICATED_JOB}-0-0.{name}"
    args = inner["template"]["spec"]["containers"][0]["args"]
    inner["template"]["spec"]["containers"][0]["args"] = _replace_master(args, master)
    sched = cluster.scheduling_for(stage)
    inner.pop("backoffLimitPerIndex", None)
    inner.pop("maxFailedIndexes", None)
    inner["backoffLimit"] = 0  # a failed pod fails its Job; JobSet restarts the whole group
    # the child Jobs carry the run's labels (the controller watches them; Kueue reads its label on the JobSet)
    child_meta = {"labels": child_labels(job), "annotations": dict(job["metadata"].get("annotations") or {})}
    return {
        "apiVersion": JOBSET_API,
        "kind": "JobSet",
        "metadata": copy.deepcopy(job["metadata"]),
        "spec": {
            "network": {"enableDNSHostnames": True, "subdomain": name, "publishNotReadyAddresses": True},
            # JobSet's webhook: rule names start with a letter, then letters, digits, '_', ',' or ':'
            "failurePolicy": {"maxRestarts": sched.backoffLimit,
                              "rules": [{"name": "bad_input", "action": "FailJobSet",
                                         "onJobFailureReasons": ["PodFailurePolicy"]}]},
            "successPolicy": {"operator": "All"},
            "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": 1,
                                "template": {"metadata": child_meta, "spec": inner}}],
            "ttlSecondsAfterFinished": cluster.jobs.ttlSecondsAfterFinished,
            **({"suspend": True} if job["spec"].get("suspend") else {}),
        },
    }


def child_labels(job: dict[str, Any]) -> dict[str, str]:
    """The labels of a group's child Jobs: the stage Job's, less Kueue's queue (Kueue admits the group object)."""
    return {k: v for k, v in (job["metadata"].get("labels") or {}).items() if k != KUEUE_QUEUE_LABEL}


def _replace_master(args: list[str], master: str) -> list[str]:
    out = list(args)
    if "--master-addr" in out:
        out[out.index("--master-addr") + 1] = master
    return out


PATCH_MANAGER = "bezoar.dev/controller"
# what a TrainJob's runtimePatches may set on the runtime's pods (trainer.kubeflow.org/v1alpha1)
PATCHABLE_POD_FIELDS = ("securityContext", "volumes", "nodeSelector", "tolerations", "serviceAccountName",
                        "imagePullSecrets", "terminationGracePeriodSeconds")
PET = {"--nnodes": "$(PET_NNODES)", "--nproc-per-node": "$(PET_NPROC_PER_NODE)", "--node-rank": "$(PET_NODE_RANK)",
       "--master-addr": "$(PET_MASTER_ADDR)", "--master-port": "$(PET_MASTER_PORT)"}


def trainjob(job: dict[str, Any], stage: str, cluster: ClusterSettings) -> dict[str, Any]:
    """The group as a Kubeflow Trainer v2 TrainJob on ``distributed.trainingRuntime``: the runtime owns the
    pods' shape and rendezvous (PET_* variables); the stage's image, args, env and resources are ours."""
    nodes, procs = shape(stage, cluster)
    c = job["spec"]["template"]["spec"]["containers"][0]
    args = list(c["args"])
    base = args[: args.index("--nproc-per-node")] if "--nproc-per-node" in args else args
    flags: list[str] = []
    for flag, value in PET.items():
        flags += [flag, value]
    return {
        "apiVersion": TRAINJOB_API,
        "kind": "TrainJob",
        "metadata": copy.deepcopy(job["metadata"]),
        "spec": {
            "runtimeRef": {"name": cluster.distributed.trainingRuntime, "apiGroup": "trainer.kubeflow.org",
                           "kind": "ClusterTrainingRuntime"},
            "trainer": {
                "image": c["image"],
                "command": ["bezoar"],
                "args": base + flags,
                "env": [e for e in c.get("env", []) if e["name"] != "JOB_COMPLETION_INDEX"],
                "numNodes": nodes,
                "numProcPerNode": procs,
                "resourcesPerNode": c["resources"],
            },
            # the runtime's pods get our hardening, volumes and placement (the fields a patch may set), and
            # our labels: on the JobSet (the TrainJob's own are not passed on), its Jobs and its pods
            "runtimePatches": [_runtime_patch(job)],
            **({"suspend": True} if job["spec"].get("suspend") else {}),
        },
    }


def _runtime_patch(job: dict[str, Any]) -> dict[str, Any]:
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    pod_patch = {**{k: v for k, v in pod.items() if k in PATCHABLE_POD_FIELDS},
                 "containers": [{"name": REPLICATED_JOB, "securityContext": c["securityContext"],
                                 "volumeMounts": c["volumeMounts"]}]}
    pod_meta = job["spec"]["template"].get("metadata") or {}
    job_template = {"metadata": {"labels": child_labels(job)},
                    "spec": {"template": {"metadata": {"labels": dict(pod_meta.get("labels") or {}),
                                                       "annotations": dict(pod_meta.get("annotations") or {})},
                                          "spec": pod_patch}}}
    return {"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {
        "metadata": {"labels": child_labels(job)},
        "spec": {"replicatedJobs": [{"name": REPLICATED_JOB, "template": job_template}]}}}}


def group_objects(job: dict[str, Any], stage: str, cluster: ClusterSettings) -> list[dict[str, Any]]:
    """What ``bezoar render`` writes for a group, by ``distributed.launcher``."""
    launcher = cluster.distributed.launcher
    if launcher == "jobset":
        return [jobset(job, stage, cluster)]
    if launcher == "trainjob":
        return [trainjob(job, stage, cluster)]
    return [headless_service(job, cluster), job]
