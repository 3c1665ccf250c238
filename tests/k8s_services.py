"""Headless Services and the DNS names of an Indexed Job's pods, for the loopback harness (k8s_harness.py).

What a real cluster does, and what it refuses, that the harness models:

- a Service's name is a DNS-1035 label (a letter first, at most 63 characters); ``spec.clusterIP`` is
  immutable once set; only headless Services (``clusterIP: None``) are served here: their DNS records
  are the pods', which is all a training group needs (anything else is refused with 422 naming why);
- the Job controller sets an Indexed Job pod's hostname to ``<job name>-<index>``; with
  ``spec.subdomain`` naming a headless Service of the namespace whose selector matches the pod's labels,
  cluster DNS answers ``<hostname>.<subdomain>``, ``.<namespace>``, ``.<namespace>.svc`` and
  ``.<namespace>.svc.cluster.local`` with the pod's IP. Without such a Service (missing, not headless,
  a selector that does not match, another namespace) the name does not resolve;
- pods of a Service that does not set ``publishNotReadyAddresses`` are only published once Ready; the
  harness's pods are Ready as soon as they run, so that difference is not modelled.

Each pod of a group gets a loopback address of its own (``127.a.b.<index + 2>``, fixed per Job and
index, so a replacement pod of an index keeps its address as a real pod keeps its DNS name); the names
go into the pod's ``/etc/hosts`` (the sandbox, k8s_sandbox.py), which is how a pod resolves here.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"


class Refused(Exception):
    """What the API server answers 422 Invalid with."""


def check_service(body: dict[str, Any]) -> None:
    meta = body.get("metadata") or {}
    name = meta.get("name", "")
    if body.get("apiVersion") != "v1" or body.get("kind") != "Service":
        raise Refused(f'Service "{name}": only v1 Service objects can be created here')
    if not DNS_1035.match(name) or len(name) > 63:
        raise Refused(f'Service "{name}" is invalid: metadata.name: a DNS-1035 label must consist of lower case '
                      "alphanumeric characters or '-', start with a letter, end with an alphanumeric character, "
                      "at most 63 characters")
    spec = body.get("spec") or {}
    if spec.get("clusterIP") != "None":
        raise Refused(f'Service "{name}": harness: only headless Services (spec.clusterIP: None) are modelled')
    sel = spec.get("selector")
    if not isinstance(sel, dict) or not sel or not all(isinstance(v, str) for v in sel.values()):
        raise Refused(f'Service "{name}" is invalid: spec.selector: a headless Service for pods needs a selector')
    for i, p in enumerate(spec.get("ports") or []):
        if not isinstance(p.get("port"), int) or not 0 < p["port"] < 65536:
            raise Refused(f'Service "{name}" is invalid: spec.ports[{i}].port: must be between 1 and 65535')


def check_service_patch(old: dict[str, Any], new: dict[str, Any]) -> None:
    if (old.get("spec") or {}).get("clusterIP") != (new.get("spec") or {}).get("clusterIP"):
        raise Refused(f'Service "{old["metadata"]["name"]}" is invalid: spec.clusterIP: field is immutable')


def pod_ip(job_uid: str, index: int) -> str:
    h = hashlib.sha256(job_uid.encode()).digest()
    return f"127.{h[0] % 200 + 20}.{h[1] % 250 + 1}.{index + 2}"


def group_hosts(namespace: str, job: dict[str, Any], pod_labels: dict[str, str],
                services: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """{ip: names} for every index of an Indexed Job whose pods name a matching headless Service as their
    subdomain (``services``: the namespace's Services by name); {} when its names do not resolve."""
    spec = job["spec"]
    sub = spec["template"]["spec"].get("subdomain")
    if spec.get("completionMode") != "Indexed" or not sub:
        return {}
    svc = services.get(sub)
    if svc is None or (svc.get("spec") or {}).get("clusterIP") != "None":
        return {}
    sel = svc["spec"].get("selector") or {}
    if any(pod_labels.get(k) != v for k, v in sel.items()):
        return {}
    out: dict[str, list[str]] = {}
    for i in range(int(spec.get("completions", 1))):
        host = f"{job['metadata']['name']}-{i}"
        out[pod_ip(job["metadata"]["uid"], i)] = [
            f"{host}.{sub}", f"{host}.{sub}.{namespace}", f"{host}.{sub}.{namespace}.svc",
            f"{host}.{sub}.{namespace}.svc.cluster.local"]
    return out
