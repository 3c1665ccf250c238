"""The node pool of the loopback harness and the scheduler's filter step over it.

A real cluster leaves a pod Pending when no node passes the scheduler's filters, with a
``PodScheduled=False`` condition (reason ``Unschedulable``) and a ``FailedScheduling`` event whose
message counts why each node was rejected, e.g. ``0/2 nodes are available: 1 Insufficient
nvidia.com/gpu, 1 node(s) had untolerated taint {nvidia.com/gpu: }. preemption: 0/2 nodes are
available: 2 No preemption victims found for incoming pod.``. This module models the filters that
decide our pods' fate: resource requests (cpu, memory, ephemeral-storage, extended resources such as
GPUs) against what is left of each node's allocatable, ``nodeSelector``, required node affinity
(``In``/``NotIn``/``Exists``/``DoesNotExist``), taints and tolerations (``NoSchedule``/``NoExecute``),
and the PersistentVolumeClaims a pod mounts. Not modelled: preemption, topology spread, pod
(anti-)affinity, volume topology, limits (requests decide placement, as for the real scheduler).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity(q: Any) -> float:
    """A Kubernetes quantity as a number (cpu in cores, memory and storage in bytes)."""
    if isinstance(q, int | float):
        return float(q)
    m = re.fullmatch(r"([0-9.]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?", str(q).strip())
    if not m:
        raise ValueError(f"not a quantity: {q!r}")
    return float(m.group(1)) * _SUFFIX[m.group(2) or ""]


@dataclass
class Node:
    name: str
    cpu: str = "64"
    memory: str = "512Gi"
    ephemeral: str = "2Ti"
    gpus: int = 0
    gpu_resource: str = "nvidia.com/gpu"
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[dict[str, str]] = field(default_factory=list)

    def allocatable(self) -> dict[str, float]:
        out = {"cpu": quantity(self.cpu), "memory": quantity(self.memory),
               "ephemeral-storage": quantity(self.ephemeral)}
        if self.gpus:
            out[self.gpu_resource] = float(self.gpus)
        return out

    def as_object(self) -> dict[str, Any]:
        alloc = {k: (str(int(v)) if k != "cpu" else f"{v:g}") for k, v in self.allocatable().items()}
        return {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.name, "labels": {"kubernetes.io/hostname": self.name, **self.labels}},
                "spec": {"taints": list(self.taints)} if self.taints else {},
                "status": {"allocatable": alloc, "capacity": alloc}}


def default_pool() -> list[Node]:
    """A CPU node and a tainted 8-GPU node: what a typical cluster for this recipe offers."""
    return [
        Node("cpu-node-1", cpu="64", memory="512Gi", ephemeral="2Ti"),
        Node("gpu-node-1", cpu="96", memory="1Ti", ephemeral="2Ti", gpus=8,
             labels={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.memory": "81559"},
             taints=[{"key": "nvidia.com/gpu", "value": "", "effect": "NoSchedule"}]),
    ]


def pod_requests(spec: dict[str, Any]) -> dict[str, float]:
    """What the scheduler reserves for a pod: the sum of its containers' requests, or the largest
    init container's when that is more (a resource with only a limit requests the limit)."""
    def of(c: dict[str, Any]) -> dict[str, float]:
        res = c.get("resources") or {}
        req = dict(res.get("limits") or {})
        req.update(res.get("requests") or {})
        return {k: quantity(v) for k, v in req.items()}

    total: dict[str, float] = {}
    for c in spec.get("containers", []):
        for k, v in of(c).items():
            total[k] = total.get(k, 0.0) + v
    for c in spec.get("initContainers", []):
        for k, v in of(c).items():
            total[k] = max(total.get(k, 0.0), v)
    return total


def _tolerated(taint: dict[str, str], tolerations: list[dict[str, Any]]) -> bool:
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        if t.get("operator") == "Exists":
            if not t.get("key") or t["key"] == taint.get("key"):
                return True
        elif t.get("key") == taint.get("key") and (t.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


def _affinity_ok(spec: dict[str, Any], labels: dict[str, str]) -> bool:
    req = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
           .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    terms = req.get("nodeSelectorTerms") or []
    if not terms:
        return True

    def expr_ok(e: dict[str, Any]) -> bool:
        op, key, vals = e["operator"], e["key"], e.get("values") or []
        if op == "In":
            return labels.get(key) in vals
        if op == "NotIn":
            return labels.get(key) not in vals
        if op == "Exists":
            return key in labels
        if op == "DoesNotExist":
            return key not in labels
        raise ValueError(f"harness: unsupported node affinity operator {op}")

    return any(all(expr_ok(e) for e in t.get("matchExpressions") or []) for t in terms)


def filter_node(node: Node, spec: dict[str, Any], used: dict[str, float]) -> list[str]:
    """Why ``node`` cannot take the pod (empty: it can), in the scheduler's words."""
    reasons: list[str] = []
    sel = spec.get("nodeSelector") or {}
    labels = {"kubernetes.io/hostname": node.name, **node.labels}
    if any(labels.get(k) != v for k, v in sel.items()) or not _affinity_ok(spec, labels):
        reasons.append("node(s) didn't match Pod's node affinity/selector")
    for taint in node.taints:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not _tolerated(taint, spec.get("tolerations") or []):
            reasons.append(f"node(s) had untolerated taint {{{taint['key']}: {taint.get('value', '')}}}")
    alloc = node.allocatable()
    for res, amount in sorted(pod_requests(spec).items()):
        if amount and used.get(res, 0.0) + amount > alloc.get(res, 0.0):
            reasons.append(f"Insufficient {res}")
    return reasons


def schedule(spec: dict[str, Any], nodes: list[Node], used: dict[str, dict[str, float]],
             missing_claims: list[str]) -> tuple[str | None, str]:
    """(the node to bind to, "") or (None, the FailedScheduling message)."""
    if missing_claims:
        n = len(nodes)
        return None, (f'0/{n} nodes are available: persistentvolumeclaim "{missing_claims[0]}" not found. '
                      f"preemption: 0/{n} nodes are available: {n} Preemption is not helpful for scheduling.")
    counts: dict[str, int] = {}
    for node in nodes:
        reasons = filter_node(node, spec, used.get(node.name, {}))
        if not reasons:
            return node.name, ""
        for r in reasons:
            counts[r] = counts.get(r, 0) + 1
    n = len(nodes)
    detail = ", ".join(f"{c} {r}" for r, c in sorted(counts.items()))
    return None, (f"0/{n} nodes are available: {detail}. preemption: 0/{n} nodes are available: "
                  f"{n} No preemption victims found for incoming pod.")
