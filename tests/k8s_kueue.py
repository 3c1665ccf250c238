"""Kueue, as the loopback harness models it (written from Kueue's documentation and API types).

Kueue admits a Job that carries ``kueue.x-k8s.io/queue-name`` and was created suspended: it makes a
``Workload`` (``kueue.x-k8s.io/v1beta2``; name ``job-<job name>-<hash>``, label
``kueue.x-k8s.io/job-uid``) holding the Job's pod set (its pod template's requests x parallelism),
queues it in the ClusterQueue behind the LocalQueue named by the label, and when the queue's unused
nominal quota covers every requested resource, reserves the quota (``QuotaReserved=True``), admits
the Workload (``Admitted=True``) and unsuspends the Job. Until then the Workload says why:
``QuotaReserved=False`` with reason ``Pending`` and "couldn't assign flavors to pod set main:
insufficient unused quota for <resource> in flavor default-flavor, <n> more needed", or reason
``Inadmissible`` when the LocalQueue does not exist. A finished Job gives its quota back. Without
Kueue installed (``FakeCluster(kueue=None)``) nothing unsuspends a Job and the Workload API answers
404, as an API server without Kueue's CRDs does.

Modelled: one flavor per queue, FIFO admission within a queue, quota on every resource a pod set
requests. Not modelled: cohorts and borrowing, preemption, admission checks, partial admission.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from k8s_nodes import pod_requests, quantity

GROUP = "kueue.x-k8s.io"
VERSION = "v1beta2"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"


@dataclass
class Kueue:
    """``queues``: LocalQueue name -> the nominal quota of its ClusterQueue (resource -> quantity)."""

    queues: dict[str, dict[str, str]] = field(default_factory=dict)
    admit_delay: float = 0.1  # Kueue's reconcile latency

    def quota(self, queue: str) -> dict[str, float] | None:
        q = self.queues.get(queue)
        return None if q is None else {k: quantity(v) for k, v in q.items()}


def workload_name(job: dict[str, Any]) -> str:
    h = hashlib.sha256(job["metadata"]["uid"].encode()).hexdigest()[:5]
    return f"job-{job['metadata']['name']}-{h}"[:253]


def pod_set_need(job: dict[str, Any]) -> dict[str, float]:
    """What admitting the Job takes from the quota: one pod's requests x parallelism."""
    per_pod = pod_requests(job["spec"]["template"]["spec"])
    n = job["spec"].get("parallelism", 1) or 1
    return {k: v * n for k, v in per_pod.items()}


def shortage(quota: dict[str, float], used: dict[str, float], need: dict[str, float]) -> tuple[str, float] | None:
    """The first resource the queue lacks (and how much more is needed), or None when it fits."""
    for res in sorted(need):
        if not need[res]:
            continue
        free = quota.get(res, 0.0) - used.get(res, 0.0)
        if need[res] > free:
            return res, need[res] - max(free, 0.0)
    return None


def fmt_amount(res: str, amount: float) -> str:
    if res == "cpu":
        return f"{amount:g}"
    if res in ("memory", "ephemeral-storage"):
        return f"{amount / 2**30:g}Gi"
    return f"{amount:g}"
