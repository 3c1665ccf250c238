"""A loopback Kubernetes API server that really runs Jobs, for tests and benchmarks.

There is no cluster on the test machines, so the controller's real ``kubernetes`` client talks to
this threaded HTTP server instead. It serves the part of the REST API the controller uses:

- ``/apis/batch/v1/namespaces/{ns}/jobs``: create, get, list (``labelSelector``), watch
  (``watch=true`` + ``resourceVersion``: newline-delimited JSON events over a chunked response,
  bookmarks, ``410 Gone`` for a compacted resourceVersion), delete (one, or a collection by label;
  ``propagationPolicy`` Background/Foreground/Orphan, and without one the batch/v1 default, Orphan:
  the Job goes, its pods run on without their ownerReference, see :data:`JOB_DEFAULT_PROPAGATION`);
- ``/api/v1/namespaces/{ns}/pods``: list, get, watch; ``pods/{name}/log`` (``follow``, ``tailLines``);
- ``/apis/apps/v1/namespaces/{ns}/deployments/{name}`` (get) and ``.../scale`` (get, patch, replace).

Requests need the bearer token of the kubeconfig the harness writes (:attr:`FakeCluster.kubeconfig`),
so the client's real configuration loading is exercised too.

**Jobs really run.** For each created Job the harness plays the Job controller, the scheduler and
the kubelet: it creates pods, binds them to a node of its pool, and runs each pod's container as a
LOCAL SUBPROCESS: the container's ``command``, or the image entrypoint ``bezoar`` mapped to this
virtualenv's ``bezoar`` console script, plus ``args`` with ``$(VAR)`` expanded from the container env
as the kubelet does. The env is resolved the way the kubelet would: ``secretKeyRef`` from the
harness's own Secret store (:meth:`FakeCluster.add_secret`), ``fieldRef`` from the pod
(``JOB_COMPLETION_INDEX`` from the completion-index annotation, labels such as
``batch.kubernetes.io/job-name``). Only ``PATH``, ``PYTHONPATH`` and locale variables come from the
host, so a pod sees what its Job spec gives it and no more (that is how the tests prove a spec
carries its credentials).

**What a real cluster refuses, the harness refuses** (each part in its own module):

- the API server's validation of a created Job, here: the strict OpenAPI schema (field names and types),
  then the Go rules the schema cannot say (kubernetes/kubernetes pkg/apis/batch/validation/validation.go
  and pkg/apis/core/validation/validation.go; see :func:`validate_job_spec`, :func:`validate_pod_spec`,
  :func:`validate_meta`): label and annotation syntax and sizes, names, mounts of undefined volumes,
  requests above limits, GPUs (extended resources) overcommitted or fractional, tolerations, the
  podFailurePolicy's rules, the Indexed limits. Every cause comes back at once in a 422 ``Status`` with
  ``details.causes`` (field paths), as from the API server; a malformed quantity is a 400 decoding error;

- the pod's security context, in :mod:`k8s_sandbox`: the process runs as ``runAsUser``/``runAsGroup``
  with ``fsGroup`` as a supplementary group, on a read-only root filesystem (``readOnlyRootFilesystem``)
  where only the mounted volumes are writable (emptyDirs, PVCs; Secrets and ConfigMaps read-only),
  in a private mount namespace; a stage writing outside its mounts fails here as in a pod. Cluster
  Services (:meth:`FakeCluster.add_service`) resolve by their DNS names through the pod's
  ``/etc/hosts`` to a loopback address on the Service port that forwards to the backing server;
- the restricted Pod Security profile, in :mod:`pod_security`: a pod that violates its namespace's
  level (``restricted`` unless :meth:`FakeCluster.set_pod_security` says otherwise) is never created;
  the Job gets ``FailedCreate`` events, as from the PodSecurity admission controller;
- the scheduler, in :mod:`k8s_nodes`: pods bind to a declared node pool (GPUs, cpu, memory,
  ephemeral storage, labels, taints); a pod that fits nowhere stays Pending with
  ``PodScheduled=False``/``Unschedulable`` and a ``FailedScheduling`` event giving the reasons; a pod
  mounting a PVC that does not exist does too;
- Kueue, in :mod:`k8s_kueue`: suspended Jobs with a queue label get a Workload and are admitted when
  the queue's quota fits; without Kueue (the default) nothing admits them and its API answers 404.

Also served: ``/api/v1/namespaces/{ns}/events`` (list, ``fieldSelector``), Deployment ``PATCH``
with a ``resourceVersion`` precondition (409 on a stale one), log ``timestamps``/``sinceTime``.
:meth:`FakeCluster.outage` takes the API server away for a while (connections refused, open streams
cut) and brings it back on the same port; :meth:`FakeCluster.cut_log_streams` breaks the log streams.
Not emulated: images (every image runs this checkout), resource limits at run time, preemption.

Job status follows the documented Job semantics (kubernetes.io, "Jobs"):

- a pod exiting 0 counts as succeeded; when ``completions`` are reached (every index, for an Indexed
  Job) the Job gets ``SuccessCriteriaMet`` and then ``Complete``;
- a failed pod is matched against ``podFailurePolicy`` rules in order: ``FailJob`` -> the Job fails
  at once with reason ``PodFailurePolicy`` (other pods are terminated); ``Ignore`` -> not counted,
  a replacement pod starts; ``Count`` or no match -> counted; more counted failures than
  ``backoffLimit`` -> ``FailureTarget`` then ``Failed`` with reason ``BackoffLimitExceeded``;
- ``activeDeadlineSeconds`` -> ``Failed`` with reason ``DeadlineExceeded``;
- ``suspend: true`` -> no pods until unsuspended (by Kueue, when one is modelled: see above);
- ``podReplacementPolicy: Failed``: a replacement starts only after the failed pod has terminated.

:meth:`FakeCluster.disrupt` plays a preemption: the pod gets the ``DisruptionTarget`` condition and
SIGTERM (then SIGKILL after its grace period), exactly what the Ignore rule is for.

The module also holds a scripted stand-in for ``bezoar stage`` (``python k8s_harness.py fake-stage
...``, see :func:`fake_stage_main`) that commits a real manifest with
:func:`bezoar_jobs.manifest.commit`; tests map the ``bezoar`` entrypoint to it with
``FakeCluster(entrypoints=fake_entrypoints())`` when they test the controller's behaviour rather
than a stage's.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import yaml

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the harness's own modules, whether imported as tests.k8s_harness or run as a script
    sys.path.insert(0, str(HERE))

import k8s_jobset  # noqa: E402
import k8s_kueue  # noqa: E402
import k8s_sandbox  # noqa: E402
import k8s_services  # noqa: E402
import pod_security  # noqa: E402
from k8s_nodes import Node, default_pool, pod_requests, schedule  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKEN = "harness-token"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
JOB_UID = "batch.kubernetes.io/controller-uid"
JOB_NAME = "batch.kubernetes.io/job-name"


def rfc3339nano(ts_ns: int) -> str:
    """Kubernetes' RFC3339Nano (trailing zeros of the fraction trimmed)."""
    secs, nanos = divmod(ts_ns, 1_000_000_000)
    base = datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    frac = f"{nanos:09d}".rstrip("0")
    return f"{base}.{frac}Z" if frac else f"{base}Z"


def parse_rfc3339(v: str) -> float:
    return datetime.strptime(v.replace("Z", "+00:00")[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_entrypoints() -> dict[str, list[str]]:
    """``bezoar`` -> this virtualenv's console script (or ``python -c`` on the CLI module)."""
    script = Path(sys.executable).parent / "bezoar"
    if script.is_file():
        return {"bezoar": [str(script)]}
    return {"bezoar": [sys.executable, "-c", "import sys; from bezoar_jobs.cli import main; sys.exit(main())"]}


def fake_entrypoints() -> dict[str, list[str]]:
    """``bezoar`` -> the scripted stand-in stage of this module (:func:`fake_stage_main`)."""
    return {"bezoar": [sys.executable, str(Path(__file__).resolve()), "fake-stage"]}


# ---------------------------------------------------------------------------------------------
# Label selectors (the equality- and set-based grammar of the API)
# ---------------------------------------------------------------------------------------------
def _split_terms(sel: str) -> list[str]:
    terms, depth, cur = [], 0, ""
    for ch in sel:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        terms.append(cur)
    return [t.strip() for t in terms if t.strip()]


def selector_matches(selector: str | None, labels: dict[str, str] | None) -> bool:
    labels = labels or {}
    if not selector:
        return True
    for term in _split_terms(selector):
        m = re.match(r"^(\S+)\s+(in|notin)\s+\((.*)\)$", term)
        if m:
            key, op, vals = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if op == "in" and labels.get(key) not in vals:
                return False
            if op == "notin" and key in labels and labels[key] in vals:
                return False
            continue
        if term.startswith("!"):
            if term[1:] in labels:
                return False
            continue
        m = re.match(r"^([^!=]+?)\s*(==|!=|=)\s*(.*)$", term)
        if m:
            key, op, val = m.group(1), m.group(2), m.group(3)
            if op == "!=":
                if labels.get(key) == val:
                    return False
            elif labels.get(key) != val:
                return False
            continue
        if term not in labels:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Errors in the API's Status shape
# ---------------------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> dict[str, Any]:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


def _not_found(kind: str, name: str, group: str = "") -> ApiError:
    return ApiError(404, "NotFound", f'{kind} "{name}" not found', {"name": name, "group": group, "kind": kind})


# ---------------------------------------------------------------------------------------------
# What the API server refuses beyond the OpenAPI schema (its validation.go), worded as it words it
# ---------------------------------------------------------------------------------------------
# The strict OpenAPI schema (kubernetes-validate, :func:`_job_validator`) only checks types and field
# names: no enum, no bound, no name syntax. The API server validates the defaulted object with Go code;
# the rules below are the part of it that the Jobs of this project could break, read from upstream:
#
# - kubernetes/kubernetes pkg/apis/batch/validation/validation.go: ``ValidateJob`` (the longest Indexed
#   pod hostname ``<name>-<completions-1>`` must be a DNS-1123 label), ``validateJobSpec`` (non-negative
#   counts and durations, completionMode, the Indexed limits, backoffLimitPerIndex/maxFailedIndexes only
#   with Indexed, restartPolicy OnFailure or Never), ``validatePodFailurePolicy`` and its rules (at most
#   20 rules; the actions Count/FailIndex/FailJob/Ignore, FailIndex only with backoffLimitPerIndex;
#   exactly one of onExitCodes/onPodConditions; operator In/NotIn, 1-255 values, unique, ordered, no 0
#   for In, containerName one of the pod's; condition type a qualified name, status True/False/Unknown),
#   ``validatePodReplacementPolicy`` (Failed only, with a podFailurePolicy);
# - kubernetes/kubernetes pkg/apis/core/validation/validation.go (ValidatePodTemplateSpec): labels and
#   annotations (staging/src/k8s.io/apimachinery/pkg/api/validation/objectmeta.go: qualified-name keys,
#   63-character label values, 256 KiB of annotations), volume names (DNS-1123 labels, unique),
#   container names (DNS-1123 labels, unique), volumeMounts of defined volumes at unique paths, env names,
#   ``ValidateResourceRequirements`` (standard or extended resource names; requests <= limits; an extended
#   resource such as nvidia.com/gpu cannot be overcommitted: a whole number, the request equal to the
#   limit, never a request without a limit), ``ValidateTolerations``, the nodeSelector's labels,
#   secret/projected ``defaultMode`` (0-0777) and item paths, imagePullPolicy and terminationMessagePolicy;
# - staging/src/k8s.io/apimachinery/pkg/api/resource/quantity.go: a malformed quantity is not a 422 but a
#   decoding error (400 BadRequest), before any validation.
#
# The environment variable names are checked with the rule of the oldest Kubernetes the project supports
# (1.31, where RelaxedEnvironmentVariableValidation is off): a C-like name of letters, digits, '_', '-', '.'.
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$")  # quantity.go's splitRE
_SUFFIX: dict[str, int | Fraction] = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60, "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6), "m": Fraction(1, 1000), "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "P": 10**15, "E": 10**18}
_STANDARD_CONTAINER_RESOURCES = ("cpu", "memory", "ephemeral-storage")
MAX_ANNOTATIONS_BYTES = 256 * 1024  # TotalAnnotationSizeLimitB
FIELD_REFS = ("metadata.name", "metadata.namespace", "metadata.uid", "spec.nodeName", "spec.serviceAccountName",
              "status.hostIP", "status.hostIPs", "status.podIP", "status.podIPs")


def _go(v: Any) -> str:
    """A value as field.Error prints it (%q for strings, %d for integers, JSON-ish otherwise)."""
    return json.dumps(v) if isinstance(v, str | int | float | bool) or v is None else json.dumps(v, sort_keys=True)


class Invalid:
    """A ``field.ErrorList`` (k8s.io/apimachinery/pkg/util/validation/field): each cause as the API server
    words it, and :meth:`error` the 422 ``Status`` the API server answers with (``details.causes``)."""

    def __init__(self) -> None:
        self.causes: list[dict[str, str]] = []

    def _add(self, reason: str, path: str, message: str) -> None:
        self.causes.append({"reason": reason, "message": message, "field": path})

    def invalid(self, path: str, value: Any, detail: str) -> None:
        self._add("FieldValueInvalid", path, f"Invalid value: {_go(value)}: {detail}")

    def required(self, path: str, detail: str = "") -> None:
        self._add("FieldValueRequired", path, "Required value" + (f": {detail}" if detail else ""))

    def not_supported(self, path: str, value: Any, supported: tuple[str, ...]) -> None:
        self._add("FieldValueNotSupported", path, f"Unsupported value: {_go(value)}: supported values: "
                                                  + ", ".join(f'"{s}"' for s in supported))

    def duplicate(self, path: str, value: Any) -> None:
        self._add("FieldValueDuplicate", path, f"Duplicate value: {_go(value)}")

    def not_found(self, path: str, value: Any) -> None:
        self._add("FieldValueNotFound", path, f"Not found: {_go(value)}")

    def too_many(self, path: str, n: int, limit: int) -> None:
        self._add("FieldValueTooMany", path, f"Too many: {n}: must have at most {limit} items")

    def too_long(self, path: str, limit: int) -> None:
        self._add("FieldValueTooLong", path, f"Too long: may not be more than {limit} bytes")

    def error(self, kind: str, group: str, name: str) -> ApiError:
        """``<Kind>.<group> "<name>" is invalid: <cause>`` (several: ``[<cause>, <cause>]``), code 422."""
        texts = [f"{c['field']}: {c['message']}" for c in self.causes]
        what = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
        return ApiError(422, "Invalid", f'{kind}.{group} "{name}" is invalid: {what}',
                        {"name": name, "group": group, "kind": kind, "causes": list(self.causes)})


def parse_quantity(v: Any) -> Fraction | None:
    """A resource.Quantity's value, or None when the API server could not decode it (quantity.go)."""
    if isinstance(v, bool) or not isinstance(v, str | int | float):
        return None
    m = _QUANTITY.match(str(v))
    if not m:
        return None
    try:
        num = Fraction(m.group(1))
    except ValueError:
        return None
    suffix = m.group(2)
    if suffix in _SUFFIX:
        return num * _SUFFIX[suffix]
    em = re.match(r"^[eE]([-+]?[0-9]+)$", suffix)
    return num * Fraction(10) ** int(em.group(1)) if em else None


def _name_errors(value: str, rx: re.Pattern, max_len: int, what: str) -> list[str]:
    errs = []
    if len(value) > max_len:
        errs.append(f"must be no more than {max_len} characters")
    if not rx.match(value):
        errs.append(f"a lowercase RFC 1123 {what} must consist of lower case alphanumeric characters"
                    + (", '-' or '.'," if what == "subdomain" else " or '-',")
                    + " and must start and end with an alphanumeric character")
    return errs


def qualified_name_errors(value: str) -> list[str]:
    """validation.IsQualifiedName: ``[prefix/]name``, a DNS-1123 subdomain prefix, a name of at most 63."""
    parts = value.split("/")
    if len(parts) > 2:
        return ["a qualified name must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
                "with an alphanumeric character, with an optional DNS subdomain prefix and '/'"]
    errs = []
    name = parts[-1]
    if len(parts) == 2:
        if not parts[0]:
            errs.append("prefix part must be non-empty")
        else:
            errs += ["prefix part " + e for e in _name_errors(parts[0], _DNS1123_SUBDOMAIN, 253, "subdomain")]
    if not name:
        errs.append("name part must be non-empty")
    elif len(name) > 63:
        errs.append("name part must be no more than 63 characters")
    if not _QUALIFIED_NAME.match(name):
        errs.append("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
                    "with an alphanumeric character")
    return errs


def label_value_errors(value: Any) -> list[str]:
    if not isinstance(value, str):
        return ["must be a string"]
    errs = ["must be no more than 63 characters"] if len(value) > 63 else []
    if not _LABEL_VALUE.match(value):
        errs.append("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', "
                    "and must start and end with an alphanumeric character")
    return errs


def validate_labels(errs: Invalid, labels: Any, path: str) -> None:
    """unversionedvalidation.ValidateLabels (the errors name the map, as upstream's do)."""
    for k, v in (labels or {}).items():
        for msg in qualified_name_errors(k):
            errs.invalid(path, k, msg)
        for msg in label_value_errors(v):
            errs.invalid(path, v, msg)


def validate_meta(errs: Invalid, meta: dict[str, Any], path: str) -> None:
    """The labels and annotations of ValidateObjectMeta (objectmeta.go: ValidateAnnotations)."""
    validate_labels(errs, meta.get("labels"), f"{path}.labels")
    total = 0
    for k, v in (meta.get("annotations") or {}).items():
        for msg in qualified_name_errors(k.lower()):
            errs.invalid(f"{path}.annotations", k, msg)
        total += len(k) + len(v if isinstance(v, str) else "")
    if total > MAX_ANNOTATIONS_BYTES:
        errs.too_long(f"{path}.annotations", MAX_ANNOTATIONS_BYTES)


def _is_extended_resource(name: str) -> bool:
    """helper.IsExtendedResourceName: domain-prefixed, outside kubernetes.io, not ``requests.``."""
    return ("/" in name and "kubernetes.io/" not in name and not name.startswith("requests.")
            and not qualified_name_errors("requests." + name))


def _overcommit_allowed(name: str) -> bool:
    """helper.IsOvercommitAllowed: native resources (no domain, or kubernetes.io), not hugepages."""
    native = "/" not in name or "kubernetes.io/" in name
    return native and not name.startswith("hugepages-")


def validate_resources(errs: Invalid, res: dict[str, Any], path: str) -> None:
    """ValidateResourceRequirements (core validation.go) for one container."""
    quantities: dict[str, dict[str, Fraction]] = {}
    for part in ("limits", "requests"):
        quantities[part] = {}
        for rname, q in (res.get(part) or {}).items():
            p = f"{path}.{part}[{rname}]"
            if "/" not in rname:
                if rname not in _STANDARD_CONTAINER_RESOURCES and not rname.startswith("hugepages-"):
                    errs.invalid(p, rname, "must be a standard resource for containers")
            elif qualified_name_errors(rname):
                for msg in qualified_name_errors(rname):
                    errs.invalid(p, rname, msg)
            elif not _overcommit_allowed(rname) and not _is_extended_resource(rname):
                errs.invalid(p, rname, "doesn't follow extended resource name standard")
            value = parse_quantity(q)
            if value is None:
                continue  # refused earlier, as the decoder does (_decode_quantities)
            if value < 0:
                errs.invalid(p, str(q), "must be greater than or equal to 0")
            if _is_extended_resource(rname) and value.denominator != 1:
                errs.invalid(p, str(q), "must be an integer")
            quantities[part][rname] = value
    lims = quantities["limits"]
    for rname, value in quantities["requests"].items():
        req = (res.get("requests") or {})[rname]
        if rname in lims:
            lim = (res.get("limits") or {})[rname]
            if value != lims[rname] and not _overcommit_allowed(rname):
                errs.invalid(f"{path}.requests", str(req), f"must be equal to {rname} limit of {lim}")
            elif value > lims[rname]:
                errs.invalid(f"{path}.requests", str(req), f"must be less than or equal to {rname} limit of {lim}")
        elif not _overcommit_allowed(rname):
            errs.required(f"{path}.limits", "Limit must be set for non overcommitable resources")


def validate_tolerations(errs: Invalid, tolerations: list[dict[str, Any]], path: str) -> None:
    """ValidateTolerations (core validation.go)."""
    for i, t in enumerate(tolerations or []):
        p = f"{path}[{i}]"
        key, op, value = t.get("key") or "", t.get("operator") or "", t.get("value") or ""
        effect = t.get("effect") or ""
        for msg in qualified_name_errors(key) if key else []:
            errs.invalid(f"{p}.key", key, msg)
        if not key and op != "Exists":
            errs.invalid(f"{p}.operator", op, 'operator must be Exists when `key` is empty, which means "match all '
                                              'values and all keys"')
        if t.get("tolerationSeconds") is not None and effect != "NoExecute":
            errs.invalid(f"{p}.effect", effect, "effect must be 'NoExecute' when `tolerationSeconds` is set")
        if op in ("Equal", ""):
            for msg in label_value_errors(value):
                errs.invalid(f"{p}.operator", value, msg)
        elif op == "Exists":
            if value:
                errs.invalid(f"{p}.operator", t, "value must be empty when `operator` is 'Exists'")
        else:
            errs.not_supported(f"{p}.operator", op, ("Equal", "Exists"))
        if effect and effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
            errs.not_supported(f"{p}.effect", effect, ("NoExecute", "NoSchedule", "PreferNoSchedule"))


def _validate_mode_and_items(errs: Invalid, src: dict[str, Any], p: str, mode_key: str = "defaultMode") -> None:
    mode = src.get(mode_key)
    if mode is not None and not 0 <= mode <= 0o777:
        errs.invalid(f"{p}.{mode_key}", mode, "must be a number between 0 and 0777 (octal), both inclusive")
    for j, item in enumerate(src.get("items") or []):
        ip = f"{p}.items[{j}]"
        if not item.get("key"):
            errs.required(f"{ip}.key")
        ipath = item.get("path") or ""
        if not ipath:
            errs.required(f"{ip}.path")
        elif ipath.startswith("/"):
            errs.invalid(f"{ip}.path", ipath, "must be a relative path")
        elif ".." in ipath.split("/"):
            errs.invalid(f"{ip}.path", ipath, "must not contain '..'")
        if item.get("mode") is not None and not 0 <= item["mode"] <= 0o777:
            errs.invalid(f"{ip}.mode", item["mode"], "must be a number between 0 and 0777 (octal), both inclusive")


def _unique_label_name(errs: Invalid, name: str, path: str, seen: set[str]) -> None:
    """A volume's or container's name: required, a DNS-1123 label, unique in the pod."""
    if not name:
        errs.required(path)
        return
    for msg in _name_errors(name, _DNS1123_LABEL, 63, "label"):
        errs.invalid(path, name, msg)
    if name in seen:
        errs.duplicate(path, name)
    seen.add(name)


def validate_pod_spec(errs: Invalid, spec: dict[str, Any], path: str) -> None:
    """The part of ValidatePodSpec (core validation.go) that a stage pod's spec exercises."""
    vols: set[str] = set()
    for i, vol in enumerate(spec.get("volumes") or []):
        p = f"{path}.volumes[{i}]"
        _unique_label_name(errs, vol.get("name") or "", f"{p}.name", vols)
        if "secret" in vol:
            if not (vol["secret"] or {}).get("secretName"):
                errs.required(f"{p}.secret.secretName")
            _validate_mode_and_items(errs, vol["secret"] or {}, f"{p}.secret")
        if "configMap" in vol:
            _validate_mode_and_items(errs, vol["configMap"] or {}, f"{p}.configMap")
        if "projected" in vol:
            proj = vol["projected"] or {}
            _validate_mode_and_items(errs, proj, f"{p}.projected")
            for j, src in enumerate(proj.get("sources") or []):
                for kind in ("secret", "configMap"):
                    if kind in src:
                        _validate_mode_and_items(errs, src[kind] or {}, f"{p}.projected.sources[{j}].{kind}")
    containers = spec.get("containers") or []
    if not containers:
        errs.required(f"{path}.containers")
    names: set[str] = set()
    for group in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(group) or []):
            p = f"{path}.{group}[{i}]"
            _unique_label_name(errs, c.get("name") or "", f"{p}.name", names)
            if c.get("imagePullPolicy") not in (None, "Always", "Never", "IfNotPresent"):
                errs.not_supported(f"{p}.imagePullPolicy", c["imagePullPolicy"], ("Always", "IfNotPresent", "Never"))
            if c.get("terminationMessagePolicy") not in (None, "File", "FallbackToLogsOnError"):
                errs.not_supported(f"{p}.terminationMessagePolicy", c["terminationMessagePolicy"],
                                   ("FallbackToLogsOnError", "File"))
            for j, e in enumerate(c.get("env") or []):
                ep = f"{p}.env[{j}]"
                ename = e.get("name") or ""
                if not ename:
                    errs.required(f"{ep}.name")
                elif not _ENV_NAME.match(ename):
                    errs.invalid(f"{ep}.name", ename, "a valid environment variable name must consist of alphabetic "
                                                      "characters, digits, '_', '-', or '.', and must not start with "
                                                      "a digit")
                vf = e.get("valueFrom")
                if vf is not None:
                    if e.get("value"):
                        errs.invalid(f"{ep}.valueFrom", "", "may not be specified when `value` is not empty")
                    sources = [k for k in ("fieldRef", "resourceFieldRef", "configMapKeyRef", "secretKeyRef",
                                           "fileKeyRef") if vf.get(k) is not None]
                    if len(sources) != 1:
                        errs.invalid(f"{ep}.valueFrom", "", "may not have more than one field specified at a time"
                                     if sources else "must specify one of: `fieldRef`, `resourceFieldRef`, "
                                     "`configMapKeyRef` or `secretKeyRef`")
                    fp = (vf.get("fieldRef") or {}).get("fieldPath")
                    if fp is not None:
                        m = re.match(r"^metadata\.(labels|annotations)\['(.+)'\]$", fp)
                        if m:
                            for msg in qualified_name_errors(m.group(2).lower()):
                                errs.invalid(f"{ep}.valueFrom.fieldRef.fieldPath", fp, msg)
                        elif fp not in FIELD_REFS:
                            errs.not_supported(f"{ep}.valueFrom.fieldRef.fieldPath", fp, FIELD_REFS)
            mount_paths: set[str] = set()
            for j, m in enumerate(c.get("volumeMounts") or []):
                mp = f"{p}.volumeMounts[{j}]"
                if not m.get("name"):
                    errs.required(f"{mp}.name")
                elif m["name"] not in vols:
                    errs.not_found(f"{mp}.name", m["name"])
                if not m.get("mountPath"):
                    errs.required(f"{mp}.mountPath")
                elif m["mountPath"] in mount_paths:
                    errs.invalid(f"{mp}.mountPath", m["mountPath"], "must be unique")
                else:
                    mount_paths.add(m["mountPath"])
                sub = m.get("subPath") or ""
                if sub.startswith("/"):
                    errs.invalid(f"{mp}.subPath", sub, "must be a relative path")
                elif ".." in sub.split("/"):
                    errs.invalid(f"{mp}.subPath", sub, "must not contain '..'")
            validate_resources(errs, c.get("resources") or {}, f"{p}.resources")
    rp = spec.get("restartPolicy")
    if rp is not None and rp not in ("Always", "OnFailure", "Never"):
        errs.not_supported(f"{path}.restartPolicy", rp, ("Always", "OnFailure", "Never"))
    validate_labels(errs, spec.get("nodeSelector"), f"{path}.nodeSelector")
    validate_tolerations(errs, spec.get("tolerations") or [], f"{path}.tolerations")
    for key in ("hostname", "subdomain"):
        v = spec.get(key)
        if v:
            for msg in _name_errors(v, _DNS1123_LABEL, 63, "label"):
                errs.invalid(f"{path}.{key}", v, msg)
    for key in ("serviceAccountName", "priorityClassName"):
        v = spec.get(key)
        if v:
            for msg in _name_errors(v, _DNS1123_SUBDOMAIN, 253, "subdomain"):
                errs.invalid(f"{path}.{key}", v, msg)


def _decode_quantities(kind: str, spec: dict[str, Any]) -> None:
    """A quantity that does not parse fails the decoding of the whole body: 400, not 422 (quantity.go)."""
    qs: list[Any] = []
    for group in ("initContainers", "containers"):
        for c in spec.get(group) or []:
            for part in ("requests", "limits"):
                qs += list(((c.get("resources") or {}).get(part) or {}).values())
    qs += [(v.get("emptyDir") or {}).get("sizeLimit") for v in spec.get("volumes") or [] if v.get("emptyDir")]
    for q in qs:
        if q is not None and parse_quantity(q) is None:
            raise ApiError(400, "BadRequest", f'{kind} in version "v1" cannot be handled as a {kind}: quantities must '
                                              "match the regular expression "
                                              "'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'")


PFP_ACTIONS = ("Count", "FailIndex", "FailJob", "Ignore")


def validate_job_spec(errs: Invalid, name: str, spec: dict[str, Any]) -> None:
    """batch validation.go's ValidateJob/validateJobSpec/validatePodFailurePolicy on the spec as the API server
    has defaulted it (onPodConditions status True, podReplacementPolicy Failed with a podFailurePolicy)."""
    for key in ("parallelism", "completions", "activeDeadlineSeconds", "backoffLimit", "ttlSecondsAfterFinished",
                "backoffLimitPerIndex", "maxFailedIndexes"):
        v = spec.get(key)
        if v is not None and v < 0:
            errs.invalid(f"spec.{key}", v, "must be greater than or equal to 0")
    mode = spec.get("completionMode")
    indexed = mode == "Indexed"
    completions, parallelism = spec.get("completions"), spec.get("parallelism")
    if spec.get("maxFailedIndexes") is not None and spec.get("backoffLimitPerIndex") is None:
        errs.required("spec.backoffLimitPerIndex", "when maxFailedIndexes is specified")
    if mode is not None and mode not in ("NonIndexed", "Indexed"):
        errs.not_supported("spec.completionMode", mode, ("NonIndexed", "Indexed"))
    if indexed:
        if completions is None:
            errs.required("spec.completions", "when completion mode is Indexed")
        if parallelism is not None and parallelism > 100_000:
            errs.invalid("spec.parallelism", parallelism, "must be less than or equal to 100000 when completion "
                                                          "mode is Indexed")
        mfi = spec.get("maxFailedIndexes")
        if completions is not None and mfi is not None and mfi > completions:
            errs.invalid("spec.maxFailedIndexes", mfi, "must be less than or equal to completions")
        if mfi is not None and mfi > 100_000:
            errs.invalid("spec.maxFailedIndexes", mfi, "must be less than or equal to 100000")
        if completions and completions > 0:
            host = f"{name}-{completions - 1}"
            if _name_errors(host, _DNS1123_LABEL, 63, "label"):
                errs.invalid("metadata.name", name, f"will not able to create pod with invalid DNS label: {host}")
    elif mode in (None, "NonIndexed"):
        for key in ("backoffLimitPerIndex", "maxFailedIndexes"):
            if spec.get(key) is not None:
                errs.invalid(f"spec.{key}", spec[key], "requires indexed completion mode")
    pfp = spec.get("podFailurePolicy")
    pod = (spec.get("template") or {}).get("spec") or {}
    if pfp is not None:
        rules = pfp.get("rules") or []
        if len(rules) > 20:
            errs.too_many("spec.podFailurePolicy.rules", len(rules), 20)
        cnames = {c.get("name") for c in (pod.get("containers") or []) + (pod.get("initContainers") or [])}
        for i, rule in enumerate(rules):
            rp = f"spec.podFailurePolicy.rules[{i}]"
            action = rule.get("action") or ""
            if not action:
                errs.required(f"{rp}.action", "valid values: " + json.dumps(list(PFP_ACTIONS)))
            elif action == "FailIndex":
                if spec.get("backoffLimitPerIndex") is None:
                    errs.invalid(f"{rp}.action", action, "requires the backoffLimitPerIndex to be set")
            elif action not in PFP_ACTIONS:
                errs.not_supported(f"{rp}.action", action, PFP_ACTIONS)
            oe, opc = rule.get("onExitCodes"), rule.get("onPodConditions") or []
            if oe is not None:
                op = oe.get("operator") or ""
                if not op:
                    errs.required(f"{rp}.onExitCodes.operator", 'valid values: ["In","NotIn"]')
                elif op not in ("In", "NotIn"):
                    errs.not_supported(f"{rp}.onExitCodes.operator", op, ("In", "NotIn"))
                if oe.get("containerName") is not None and oe["containerName"] not in cnames:
                    errs.invalid(f"{rp}.onExitCodes.containerName", oe["containerName"],
                                 "must be one of the container or initContainer names in the pod template")
                values = oe.get("values") or []
                if not values:
                    errs.invalid(f"{rp}.onExitCodes.values", values, "at least one value is required")
                elif len(values) > 255:
                    errs.too_many(f"{rp}.onExitCodes.values", len(values), 255)
                seen: set[int] = set()
                for j, v in enumerate(values):
                    if op == "In" and v == 0:
                        errs.invalid(f"{rp}.onExitCodes.values[{j}]", v, "must not be 0 for the In operator")
                    if v in seen:
                        errs.duplicate(f"{rp}.onExitCodes.values[{j}]", v)
                    seen.add(v)
                if any(a > b for a, b in itertools.pairwise(values)):
                    errs.invalid(f"{rp}.onExitCodes.values", values, "must be ordered")
            if len(opc) > 20:
                errs.too_many(f"{rp}.onPodConditions", len(opc), 20)
            for j, pat in enumerate(opc):
                pp = f"{rp}.onPodConditions[{j}]"
                for msg in qualified_name_errors(pat.get("type") or ""):
                    errs.invalid(f"{pp}.type", pat.get("type") or "", msg)
                status = pat.get("status") or "True"  # defaulted (pkg/apis/batch/v1/defaults.go)
                if status not in ("True", "False", "Unknown"):
                    errs.not_supported(f"{pp}.status", status, ("False", "True", "Unknown"))
            if oe is not None and opc:
                errs._add("FieldValueInvalid", rp, "Invalid value: \"null\": specifying both OnExitCodes and "
                                                   "OnPodConditions is not supported")
            if oe is None and not opc:
                errs._add("FieldValueInvalid", rp, "Invalid value: \"null\": specifying one of OnExitCodes and "
                                                   "OnPodConditions is required")
    prp = spec.get("podReplacementPolicy")
    if prp is not None:
        if pfp is not None and prp != "Failed":
            errs.not_supported("spec.podReplacementPolicy", prp, ("Failed",))
        elif prp not in ("Failed", "TerminatingOrFailed"):
            errs.not_supported("spec.podReplacementPolicy", prp, ("Failed", "TerminatingOrFailed"))
    restart = pod.get("restartPolicy")
    if restart in (None, "", "Always"):  # PodSpec defaulting makes an unset one Always
        errs.required("spec.template.spec.restartPolicy", 'valid values: "OnFailure", "Never"')
    elif restart not in ("OnFailure", "Never"):
        errs.not_supported("spec.template.spec.restartPolicy", restart, ("OnFailure", "Never"))
    elif pfp is not None and restart != "Never":
        errs.invalid("spec.template.spec.restartPolicy", restart,
                     'only "Never" is supported when podFailurePolicy is specified')


# ---------------------------------------------------------------------------------------------
# A pod's process
# ---------------------------------------------------------------------------------------------
class _PodProc:
    def __init__(self, popen: subprocess.Popen, log_path: Path):
        self.popen = popen
        self.log_path = log_path
        self.exit_code: int | None = None
        self.done = threading.Event()  # the process has exited and its output is fully read
        self.started = time.time()
        self.lines: list[tuple[int, bytes]] = []  # (time.time_ns() when written, the line)
        self.more = threading.Condition()
        self.eof = threading.Event()  # the output pipe is read to its end


def _expand(s: str, env: dict[str, str]) -> str:
    """The kubelet's ``$(VAR)`` expansion: defined vars are replaced, ``$$`` escapes, others stay."""

    def repl(m: re.Match) -> str:
        if m.group(0).startswith("$$"):
            return m.group(0)[1:]
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return re.sub(r"\$\$\([^)]*\)|\$\(([A-Za-z_.-][-._A-Za-z0-9]*)\)", repl, s)


class ContainerConfigError(Exception):
    """What the kubelet reports as CreateContainerConfigError (a missing Secret or key)."""


# ---------------------------------------------------------------------------------------------
# The cluster
# ---------------------------------------------------------------------------------------------
class FakeCluster:
    """The API server, the Job controller and a kubelet in one object. Use as a context manager."""

    def __init__(
        self,
        workdir: str | Path,
        *,
        entrypoints: dict[str, list[str]] | None = None,
        extra_env: dict[str, str] | None = None,
        retry_delay: float = 0.05,
        tick: float = 0.02,
        token: str = TOKEN,
        validate_jobs: bool = True,
        nodes: list[Node] | None = None,
        kueue: k8s_kueue.Kueue | None = None,
        pod_security_level: str = "restricted",
        host_shares: list[Path] | None = None,
        legacy_job_labels: bool = True,
        crds: tuple[str, ...] = (),
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.entrypoints = entrypoints or default_entrypoints()
        self.extra_env = dict(extra_env or {})
        self.retry_delay = retry_delay
        self.tick = tick
        self.nodes = list(nodes) if nodes is not None else default_pool()
        self.kueue = kueue
        self.pss_default = pod_security_level
        self.pss_levels: dict[str, str] = {}
        self.host_shares = [Path(p) for p in host_shares or []]
        for share in self.host_shares:
            share.mkdir(parents=True, exist_ok=True)
            share.chmod(0o777)  # the pods' user writes there (the fake stage's call log)
        self.legacy_job_labels = legacy_job_labels
        # custom resources served (k8s_jobset.py): "jobset", "trainjob" (Kubeflow Trainer needs JobSet too)
        self.crds = set(crds) | ({"jobset"} if "trainjob" in crds else set())
        assert self.crds <= {"jobset", "trainjob"}, crds
        self.jobset_ctl = k8s_jobset.JobSetController(self)
        self.trainjob_ctl = k8s_jobset.TrainJobController(self)
        why_not = k8s_sandbox.available()
        self.sandboxed = why_not is None
        if not self.sandboxed and os.environ.get("BEZOAR_HARNESS_SANDBOX", "").lower() not in ("0", "off", "no"):
            raise RuntimeError(f"k8s harness: pods cannot be sandboxed here ({why_not}); set "
                               "BEZOAR_HARNESS_SANDBOX=off to run them unconfined (weaker tests)")
        self.pvcs: dict[tuple[str, str], Path] = {}
        self.configmaps: dict[tuple[str, str], dict[str, str]] = {}
        self.services: dict[str, tuple[str, int]] = {}  # DNS name -> (loopback IP, port)
        self._service_servers: list[Any] = []
        self._conns: set[Any] = set()  # open client connections (cut by an outage)
        self._log_conns: set[Any] = set()
        self.down = threading.Event()  # the API server is away (outage)
        self._said_scheduling: set[tuple[str, str]] = set()
        self.token = token
        self.validate_jobs = validate_jobs
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.rv = 0
        self.compacted_rv = 0  # watches from an older resourceVersion get 410 Gone
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (kind, ns, name) -> object
        self.events: list[tuple[int, str, str, str, dict[str, Any]]] = []  # (rv, kind, ns, type, obj)
        self.secrets: dict[tuple[str, str], dict[str, str]] = {}
        self.procs: dict[str, _PodProc] = {}  # pod uid -> process
        self.job_state: dict[str, dict[str, Any]] = {}  # job uid -> controller bookkeeping
        self.deploy_ready_at: dict[tuple[str, str], tuple[float, int]] = {}
        self.deploy_ready_delay: dict[tuple[str, str], float] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path?query) of every API request
        self.timeline: list[tuple[float, str, str]] = []  # (time.time(), what, job name)
        self.scale_history: list[tuple[str, int]] = []
        self.patches: list[tuple[str, dict[str, Any]]] = []  # Deployment patches, as received
        self.errors: list[str] = []  # harness-internal failures (a test should never see one)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.server: ThreadingHTTPServer | None = None
        self.kubeconfig = self.workdir / "kubeconfig.yaml"

    # -- lifecycle ------------------------------------------------------------------------------
    def _serve(self, port: int = 0) -> None:
        handler = type("Handler", (_Handler,), {"cluster": self})
        self.server = _Server(("127.0.0.1", port), handler)
        self.server.cluster = self
        self.server.daemon_threads = True
        t = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        t.start()
        self._threads.append(t)

    def start(self) -> FakeCluster:
        self._serve()
        tk = threading.Thread(target=self._ticker, daemon=True)
        tk.start()
        self._threads.append(tk)
        self.kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "harness", "cluster": {"server": self.url}}],
                    "users": [{"name": "harness", "user": {"token": self.token}}],
                    "contexts": [{"name": "harness", "context": {"cluster": "harness", "user": "harness"}}],
                    "current-context": "harness",
                }
            )
        )
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        """Kill every pod process (SIGTERM, then SIGKILL) and stop serving."""
        self._stopping.set()
        with self.cond:
            self.cond.notify_all()
            procs = list(self.procs.values())
        for p in procs:
            self._signal(p, signal.SIGTERM)
        deadline = time.time() + 3
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=max(0.01, deadline - time.time()))
            if p.popen.poll() is None:
                self._signal(p, signal.SIGKILL)
                p.popen.wait(timeout=5)
        if self.server and not self.down.is_set():
            self.server.shutdown()
            self.server.server_close()
        for srv in self._service_servers:
            srv.shutdown()
            srv.server_close()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> FakeCluster:
        return self.start()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.stop()
        if self.errors and exc_type is None:
            raise AssertionError("k8s harness errors:\n" + "\n".join(self.errors))

    def api_client(self):
        """A real ``kubernetes.client.ApiClient`` built from the harness's kubeconfig."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    # -- test-side API --------------------------------------------------------------------------
    def add_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        with self.lock:
            self.secrets[(namespace, name)] = dict(data)

    def add_configmap(self, namespace: str, name: str, data: dict[str, str]) -> None:
        with self.lock:
            self.configmaps[(namespace, name)] = dict(data)

    def add_pvc(self, namespace: str, name: str, host_dir: str | Path | None = None) -> Path:
        """A bound PersistentVolumeClaim backed by ``host_dir`` (default: a directory of the harness)."""
        d = Path(host_dir) if host_dir is not None else self.workdir / "pvcs" / f"{namespace}-{name}"
        d.mkdir(parents=True, exist_ok=True)
        with self.lock:
            self.pvcs[(namespace, name)] = d
        return d

    def set_pod_security(self, namespace: str, level: str) -> None:
        """The namespace's ``pod-security.kubernetes.io/enforce`` level (default: the cluster's)."""
        assert level in pod_security.LEVELS, level
        with self.lock:
            self.pss_levels[namespace] = level

    def add_service(self, namespace: str, name: str, port: int, target: str) -> str:
        """A Service ``name`` in ``namespace`` on ``port`` in front of ``target`` (``http://host:port`` of a
        server on this machine). Pods reach it as ``name``, ``name.namespace``, ``name.namespace.svc``
        and ``name.namespace.svc.cluster.local`` (their /etc/hosts), on a loopback address of its own;
        returns that address. Needs the sandbox (root)."""
        import socketserver

        if not self.sandboxed:
            raise RuntimeError("k8s harness: Services need the pod sandbox (root)")
        u = urlparse(target)
        dest = (u.hostname or "127.0.0.1", u.port or 80)
        rng = uuid.uuid4().int
        ip = f"127.{(rng >> 8) % 200 + 20}.{(rng >> 16) % 250 + 1}.{rng % 250 + 2}"

        class Proxy(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                import socket

                with contextlib.suppress(OSError), socket.create_connection(dest, timeout=30) as up:
                    def pump(a: Any, b: Any) -> None:
                        with contextlib.suppress(OSError):
                            while data := a.recv(65536):
                                b.sendall(data)
                        with contextlib.suppress(OSError):
                            b.shutdown(socket.SHUT_WR)

                    t = threading.Thread(target=pump, args=(up, self.request), daemon=True)
                    t.start()
                    pump(self.request, up)
                    t.join(timeout=600)

        srv = socketserver.ThreadingTCPServer((ip, port), Proxy, bind_and_activate=False)
        srv.daemon_threads = True
        srv.allow_reuse_address = True
        srv.server_bind()
        srv.server_activate()
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        self._service_servers.append(srv)
        for dns in (name, f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"):
            self.services[dns] = (ip, port)
        return ip

    def hosts_file(self, pod: dict[str, Any] | None = None) -> str:
        base = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else "127.0.0.1 localhost\n"
        by_ip: dict[str, list[str]] = {}
        for dns, (ip, _port) in sorted(self.services.items()):
            by_ip.setdefault(ip, []).append(dns)
        if pod is not None:  # cluster DNS: the pods of the Indexed Jobs behind the namespace's headless Services
            ns = pod["metadata"]["namespace"]
            with self.lock:
                svcs = {n: o for (k, sns, n), o in self.objects.items() if k == "Service" and sns == ns}
                jobs = [o for (k, jns, _), o in self.objects.items() if k == "Job" and jns == ns]
            for job in jobs:
                labels = {**(job["spec"]["template"].get("metadata") or {}).get("labels", {}),
                          JOB_NAME: job["metadata"]["name"]}
                for ip, names in k8s_services.group_hosts(ns, job, labels, svcs).items():
                    by_ip.setdefault(ip, []).extend(names)
        return base.rstrip("\n") + "\n" + "".join(f"{ip} {' '.join(names)}\n" for ip, names in by_ip.items())

    def _pod_ip(self, pod: dict[str, Any]) -> str:
        """A pod of an Indexed Job under a subdomain has an address of its own (its DNS name's); others 127.0.0.1."""
        idx = (pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX)
        owner = next(iter(pod["metadata"].get("ownerReferences") or []), None)
        if idx is None or owner is None or not pod["spec"].get("subdomain"):
            return "127.0.0.1"
        return k8s_services.pod_ip(owner["uid"], int(idx))

    # -- Services (headless only: k8s_services.py) ------------------------------------------------
    def create_service(self, ns: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            k8s_services.check_service(body)
        except k8s_services.Refused as e:
            raise ApiError(422, "Invalid", str(e)) from None
        name = body["metadata"]["name"]
        with self.cond:
            if ("Service", ns, name) in self.objects:
                raise ApiError(409, "AlreadyExists", f'services "{name}" already exists',
                               {"name": name, "kind": "services"})
            svc = copy.deepcopy(body)
            svc["metadata"].update({"namespace": ns, "uid": str(uuid.uuid4()), "creationTimestamp": now_iso()})
            self._put("Service", ns, svc, "ADDED")
            return copy.deepcopy(svc)

    def patch_service(self, ns: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        with self.cond:
            cur = self._get("Service", ns, name)
            new = copy.deepcopy(cur)
            _merge_patch(new, patch)
            try:
                k8s_services.check_service_patch(cur, new)
            except k8s_services.Refused as e:
                raise ApiError(422, "Invalid", str(e)) from None
            self._put("Service", ns, new, "MODIFIED")
            return copy.deepcopy(new)

    def _collect_owned(self, ns: str, owner_uid: str) -> None:
        """The garbage collector: objects whose ownerReferences name a deleted owner go with it (a JobSet's
        Jobs and Service, a TrainJob's JobSet, a Job's Service)."""
        with self.cond:
            for (kind, sns, n), o in list(self.objects.items()):
                if sns != ns or not any(r.get("uid") == owner_uid for r in o["metadata"].get("ownerReferences") or []):
                    continue
                if kind == "Service":
                    self._put("Service", ns, o, "DELETED")
                elif kind == "Job":
                    self.delete_job(ns, n, "Foreground")
                elif kind in ("JobSet", "TrainJob"):
                    self.delete_custom(kind, ns, n)

    def events_for(self, namespace: str, kind: str | None = None, name: str | None = None,
                   reason: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [copy.deepcopy(o) for (k, ns, _), o in self.objects.items()
                    if k == "Event" and ns == namespace
                    and (kind is None or o["involvedObject"]["kind"] == kind)
                    and (name is None or o["involvedObject"]["name"] == name)
                    and (reason is None or o["reason"] == reason)]

    def outage(self, seconds: float) -> None:
        """Take the API server away for ``seconds``: new connections are refused and open ones (watches,
        log streams) are cut; the Jobs, pods and kubelets carry on. Then serve again on the same port."""
        assert self.server is not None
        port = self.server.server_address[1]
        self.down.set()
        self.timeline.append((time.time(), "api-down", ""))
        self.server.shutdown()
        self.server.server_close()
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.shutdown(2)

        def back() -> None:
            if self._stopping.wait(seconds):
                return
            self._serve(port)
            self.down.clear()
            self.timeline.append((time.time(), "api-up", ""))

        threading.Thread(target=back, daemon=True).start()

    def cut_log_streams(self) -> int:
        """Break every open log stream (a load balancer dropping idle connections); how many."""
        conns = list(self._log_conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(2)
        return len(conns)

    def add_deployment(self, namespace: str, name: str, replicas: int = 0, ready_delay: float = 0.2) -> None:
        """A Deployment whose pods become ready ``ready_delay`` s after a scale-up (no process runs)."""
        with self.cond:
            obj = {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()), "generation": 1,
                             "creationTimestamp": now_iso(), "labels": {"app": name}, "annotations": {}},
                "spec": {
                    "replicas": replicas,
                    "selector": {"matchLabels": {"app": name}},
                    "template": {"metadata": {"labels": {"app": name}},
                                 "spec": {"containers": [{"name": "server", "image": "teacher:harness"}]}},
                },
                "status": {"observedGeneration": 1, "replicas": replicas, "readyReplicas": replicas,
                           "availableReplicas": replicas, "updatedReplicas": replicas},
            }
            self.deploy_ready_delay[(namespace, name)] = ready_delay
            self._put("Deployment", namespace, obj, "ADDED")

    def deployment(self, namespace: str, name: str) -> dict[str, Any]:
        with self.lock:
            return copy.deepcopy(self.objects[("Deployment", namespace, name)])

    def jobs(self, namespace: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [copy.deepcopy(o) for (k, ns, _), o in self.objects.items()
                    if k == "Job" and (namespace is None or ns == namespace)]

    def pods(self, namespace: str | None = None, job: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            order = {name: i for i, (_, what, name) in enumerate(self.timeline) if what == "pod"}
            return sorted(
                (copy.deepcopy(o) for (k, ns, _), o in self.objects.items()
                 if k == "Pod" and (namespace is None or ns == namespace)
                 and (job is None or o["metadata"]["labels"].get(JOB_NAME) == job)),
                key=lambda p: order.get(p["metadata"]["name"], -1),
            )

    def created_jobs(self) -> list[str]:
        """Names of every Job ever created, in order (a deleted one stays listed)."""
        return [name for _, what, name in self.timeline if what == "created"]

    def pod_log(self, pod_name: str, namespace: str) -> str:
        pod = self._get("Pod", namespace, pod_name)
        p = self.procs.get(pod["metadata"]["uid"])
        return p.log_path.read_text(errors="replace") if p else ""

    def disrupt(self, pod_name: str, namespace: str, reason: str = "PreemptionByScheduler") -> None:
        """Preempt a running pod: DisruptionTarget condition, then SIGTERM (SIGKILL after the grace period)."""
        with self.cond:
            pod = self._get("Pod", namespace, pod_name)
            proc = self.procs.get(pod["metadata"]["uid"])
            pod["status"].setdefault("conditions", []).append(
                {"type": "DisruptionTarget", "status": "True", "reason": reason,
                 "message": "harness: the pod was preempted to make room for another pod",
                 "lastTransitionTime": now_iso()}
            )
            self._put("Pod", namespace, pod, "MODIFIED")
            grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
        if proc is not None:
            self._terminate(proc, grace)

    def compact(self) -> None:
        """Forget every event so far, as etcd compaction does: every open watch, and any watch
        resuming from an older resourceVersion, gets ``410 Gone`` and must list again."""
        with self.cond:
            self.rv += 1
            self.compacted_rv = self.rv
            self.events.clear()
            self.cond.notify_all()

    def wait_for(self, pred: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
        deadline = time.time() + timeout
        while time.time() < deadline:
            v = pred()
            if v:
                return v
            time.sleep(0.02)
        raise TimeoutError(f"harness: timed out after {timeout}s waiting for {what}")

    def job_condition(self, namespace: str, name: str) -> str | None:
        """``Complete``/``Failed`` once the Job has that condition, else None."""
        with self.lock:
            job = self.objects.get(("Job", namespace, name))
            if job is None:
                return None
            for c in job["status"].get("conditions", []):
                if c["type"] in ("Complete", "Failed") and c["status"] == "True":
                    return c["type"]
        return None

    # -- object store ---------------------------------------------------------------------------
    def _get(self, kind: str, ns: str, name: str) -> dict[str, Any]:
        obj = self.objects.get((kind, ns, name))
        if obj is None:
            group = {"Job": "batch", "Deployment": "apps", "JobSet": k8s_jobset.JOBSET_GROUP,
                     "TrainJob": k8s_jobset.TRAINER_GROUP,
                     "ClusterTrainingRuntime": k8s_jobset.TRAINER_GROUP}.get(kind, "")
            raise _not_found(kind.lower() + "s", name, group)
        return obj

    def _put(self, kind: str, ns: str, obj: dict[str, Any], etype: str) -> None:
        """Store (or delete) an object, bump the resourceVersion, record and announce the event."""
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        key = (kind, ns, obj["metadata"]["name"])
        if etype == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        self.events.append((self.rv, kind, ns, etype, copy.deepcopy(obj)))
        self.cond.notify_all()

    # -- JobSet / TrainJob / ClusterTrainingRuntime (k8s_jobset.py) -----------------------------
    def add_training_runtime(self, name: str, image: str = "bezoar-train:harness",
                             body: dict[str, Any] | None = None) -> None:
        """A ClusterTrainingRuntime (default: a torch runtime like upstream's torch-distributed, our wording:
        one replicated Job ``node`` with the trainer ancestor label and a container ``node``)."""
        obj = body or {
            "apiVersion": f"{k8s_jobset.TRAINER_GROUP}/{k8s_jobset.TRAINER_VERSION}", "kind": "ClusterTrainingRuntime",
            "metadata": {"name": name, "labels": {"trainer.kubeflow.org/framework": "torch"}},
            "spec": {"mlPolicy": {"numNodes": 1, "torch": {}}, "template": {"spec": {"replicatedJobs": [{
                "name": "node", "template": {"metadata": {"labels": {k8s_jobset.ANCESTOR: "trainer"}},
                                             "spec": {"template": {"spec": {"containers": [
                                                 {"name": "node", "image": image}]}}}}}]}}}}
        with self.cond:
            obj = copy.deepcopy(obj)
            obj["metadata"].update({"uid": str(uuid.uuid4()), "creationTimestamp": now_iso()})
            self._put("ClusterTrainingRuntime", "", obj, "ADDED")

    def served(self, group: str, version: str) -> bool:
        crd = k8s_jobset.CRD_OF_GROUP.get(group)
        return crd in self.crds and (group, version) in k8s_jobset.RESOURCES

    def _validate_child_job(self, name: str, body: dict[str, Any]) -> None:
        try:
            self._validate_job(name, body)
        except ApiError as e:
            raise k8s_jobset.Refused(e.code, e.reason, e.message) from None

    def create_jobset(self, ns: str, body: dict[str, Any], strict: bool = False) -> dict[str, Any]:
        """Admission (defaulting and validating webhooks), then store; the JobSet controller runs at once."""
        js = copy.deepcopy(body)
        k8s_jobset.check_fields(js, strict)
        js.setdefault("metadata", {})["namespace"] = ns
        k8s_jobset.default_jobset(js)
        k8s_jobset.validate_jobset(js, self._validate_child_job)
        return self._store_custom("JobSet", ns, js, {"restarts": 0})

    def create_trainjob(self, ns: str, body: dict[str, Any], strict: bool = False) -> dict[str, Any]:
        tj = copy.deepcopy(body)
        k8s_jobset.check_fields(tj, strict)
        tj.setdefault("metadata", {})["namespace"] = ns
        k8s_jobset.default_trainjob(tj)
        with self.lock:
            runtime = self.objects.get(("ClusterTrainingRuntime", "", tj["spec"]["runtimeRef"].get("name", "")))
        k8s_jobset.validate_trainjob(tj, runtime)
        return self._store_custom("TrainJob", ns, tj, {})

    def _store_custom(self, kind: str, ns: str, obj: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        name = obj["metadata"].get("name", "")
        with self.cond:
            if (kind, ns, name) in self.objects:
                raise k8s_jobset.Refused(409, "AlreadyExists", f'{kind.lower()}s "{name}" already exists')
            obj["metadata"].update({"uid": str(uuid.uuid4()), "creationTimestamp": now_iso(), "generation": 1})
            obj["status"] = status
            self._put(kind, ns, obj, "ADDED")
            self.timeline.append((time.time(), "created", name))
            (self.jobset_ctl if kind == "JobSet" else self.trainjob_ctl).reconcile(obj)
            return copy.deepcopy(self.objects[(kind, ns, name)])

    def patch_custom(self, kind: str, ns: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        with self.cond:
            cur = self._get(kind, ns, name)
            new = copy.deepcopy(cur)
            _merge_patch(new, {k: v for k, v in patch.items() if k != "status"})
            k8s_jobset.check_update(cur, new)
            new["metadata"]["generation"] = cur["metadata"].get("generation", 1) + (new["spec"] != cur["spec"])
            self._put(kind, ns, new, "MODIFIED")
            return copy.deepcopy(new)

    def delete_custom(self, kind: str, ns: str, name: str) -> dict[str, Any]:
        with self.cond:
            obj = self._get(kind, ns, name)
            obj["metadata"]["deletionTimestamp"] = now_iso()
            self._put(kind, ns, obj, "DELETED")
            self.timeline.append((time.time(), "deleted", name))
            self._collect_owned(ns, obj["metadata"]["uid"])
            return copy.deepcopy(obj)

    def custom_objects(self, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [copy.deepcopy(o) for (k, ns, _), o in self.objects.items()
                    if k == kind and (namespace is None or ns == namespace)]

    # -- the Job API ----------------------------------------------------------------------------
    def create_job(self, ns: str, body: dict[str, Any]) -> dict[str, Any]:
        arrived = time.time()  # when the client asked: the timeline's "created" (bench/controller.py)
        meta = body.get("metadata") or {}
        name = meta.get("name", "")
        if body.get("kind") != "Job" or body.get("apiVersion") != "batch/v1":
            raise ApiError(400, "BadRequest", "harness: only batch/v1 Job objects can be created here")
        self._validate_job(name, body)
        with self.cond:
            if ("Job", ns, name) in self.objects:
                raise ApiError(409, "AlreadyExists", f'jobs.batch "{name}" already exists',
                               {"name": name, "group": "batch", "kind": "jobs"})
            job = copy.deepcopy(body)
            uid = str(uuid.uuid4())
            job["metadata"].update({"namespace": ns, "uid": uid, "creationTimestamp": now_iso(), "generation": 1})
            spec = job["spec"]
            spec.setdefault("completions", 1)
            spec.setdefault("parallelism", 1)
            # with per-index backoff the Job-wide limit defaults to MaxInt32 (kubernetes.io, "Jobs")
            spec.setdefault("backoffLimit", 2147483647 if spec.get("backoffLimitPerIndex") is not None else 6)
            spec.setdefault("completionMode", "NonIndexed")
            spec.setdefault("suspend", False)
            spec.setdefault("podReplacementPolicy", "Failed" if spec.get("podFailurePolicy") else "TerminatingOrFailed")
            sel = {JOB_UID: uid}
            spec["selector"] = {"matchLabels": sel}
            tlabels = spec["template"].setdefault("metadata", {}).setdefault("labels", {})
            tlabels.update({JOB_UID: uid, JOB_NAME: name})
            if self.legacy_job_labels:  # Kubernetes still sets the unprefixed ones too (deprecated)
                tlabels.update({"controller-uid": uid, "job-name": name})
            job["status"] = {}
            if spec["suspend"]:
                job["status"]["conditions"] = [self._cond("Suspended", "JobSuspended", "Job suspended")]
            self.job_state[uid] = {"counted_failures": 0, "succeeded": set(), "accounted": set(),
                                   "next_start": 0.0, "finishing": False, "admit_at": None, "started_pods": 0,
                                   "refused": 0, "index_failures": {}, "failed_indexes": set()}
            self._put("Job", ns, job, "ADDED")
            self.timeline.append((arrived, "created", name))
            self._reconcile(job)
            return copy.deepcopy(self.objects[("Job", ns, name)])

    def _validate_job(self, name: str, body: dict[str, Any]) -> None:
        """What the API server would refuse, in its order: the body's decoding (the strict schema: unknown
        fields and types; a malformed quantity: 400), then the Job's validation on the defaulted object
        (:func:`validate_meta`, :func:`validate_job_spec`, :func:`validate_pod_spec`: every cause at once, one
        422 ``Status`` whose ``details.causes`` name the fields, as upstream's ``field.ErrorList``).

        The name is a DNS-1123 subdomain (ValidateReplicationControllerName); what keeps it to 63 characters
        is the ``batch.kubernetes.io/job-name`` label the API server adds to the pod template (generateSelector
        in pkg/registry/batch/job/strategy.go), validated as a label value with the template's labels."""
        if self.validate_jobs:
            import jsonschema

            err = jsonschema.exceptions.best_match(_job_validator(VALIDATE_VERSION).iter_errors(body))
            if err is not None:
                path = ".".join(str(p) for p in err.path)
                raise ApiError(422, "Invalid", f'Job.batch "{name}" is invalid: {path}: {err.message}')
        spec = body.get("spec") or {}
        tmpl = spec.get("template") or {}
        pod = tmpl.get("spec") or {}
        _decode_quantities("Job", pod)
        errs = Invalid()
        if not name:
            errs.required("metadata.name", "name or generateName is required")
        else:
            for msg in _name_errors(name, _DNS1123_SUBDOMAIN, 253, "subdomain"):
                errs.invalid("metadata.name", name, msg)
        validate_meta(errs, body.get("metadata") or {}, "metadata")
        tmeta = copy.deepcopy(tmpl.get("metadata") or {})
        tlabels = tmeta.setdefault("labels", {}) or {}
        for key in (JOB_NAME, "job-name"):  # generateSelector: the labels every pod of the Job gets
            tlabels.setdefault(key, name)
        tmeta["labels"] = tlabels
        validate_meta(errs, tmeta, "spec.template.metadata")
        validate_job_spec(errs, name, spec)
        validate_pod_spec(errs, pod, "spec.template.spec")
        if errs.causes:
            raise errs.error("Job", "batch", name)

    def delete_job(self, ns: str, name: str, propagation: str = "Background") -> dict[str, Any]:
        with self.cond:
            job = self._get("Job", ns, name)
            job["metadata"]["deletionTimestamp"] = now_iso()
            self._put("Job", ns, job, "DELETED")
            self.timeline.append((time.time(), "deleted", name))
            uid = job["metadata"]["uid"]
            self.job_state.pop(uid, None)
            if propagation == "Orphan":
                # the orphan finalizer: the dependents (pods, a group's Service) lose their ownerReference to
                # the Job and stay; the pods run on, unmanaged
                for (kind, ons, _n), o in list(self.objects.items()):
                    refs = o["metadata"].get("ownerReferences") or []
                    if ons == ns and any(r.get("uid") == uid for r in refs):
                        o["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != uid]
                        self._put(kind, ns, o, "MODIFIED")
            else:
                self._collect_owned(ns, uid)
            pods = [p for (k, pns, _), p in list(self.objects.items())
                    if k == "Pod" and pns == ns and p["metadata"]["labels"].get(JOB_UID) == uid]
        if propagation != "Orphan":
            # The garbage collector: terminate and delete the Job's pods, off the request thread.
            threading.Thread(target=self._guarded, args=(f"GC of {name}", self._collect_pods, ns, pods),
                             daemon=True).start()
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": {"name": name, "group": "batch", "kind": "jobs", "uid": uid}}

    def _collect_pods(self, ns: str, pods: list[dict[str, Any]]) -> None:
        for pod in pods:
            proc = self.procs.get(pod["metadata"]["uid"])
            if proc is not None and proc.exit_code is None:
                self._terminate(proc, pod["spec"].get("terminationGracePeriodSeconds", 30))
                proc.done.wait(timeout=10)
            with self.cond:
                if ("Pod", ns, pod["metadata"]["name"]) in self.objects:
                    cur = self.objects[("Pod", ns, pod["metadata"]["name"])]
                    self._put("Pod", ns, cur, "DELETED")

    # -- the Job controller ---------------------------------------------------------------------
    @staticmethod
    def _cond(ctype: str, reason: str, message: str, status: str = "True") -> dict[str, Any]:
        t = now_iso()
        return {"type": ctype, "status": status, "reason": reason, "message": message,
                "lastProbeTime": t, "lastTransitionTime": t}

    def _job_pods(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        uid = job["metadata"]["uid"]
        ns = job["metadata"]["namespace"]
        return [p for (k, pns, _), p in self.objects.items()
                if k == "Pod" and pns == ns and p["metadata"]["labels"].get(JOB_UID) == uid]

    @staticmethod
    def _finished(job: dict[str, Any]) -> bool:
        return any(c["type"] in ("Complete", "Failed") and c["status"] == "True"
                   for c in job["status"].get("conditions", []))

    def _ticker(self) -> None:
        while not self._stopping.wait(self.tick):
            with self.cond:
                now = time.time()
                for (kind, _ns, _name), obj in list(self.objects.items()):
                    try:
                        if kind == "Job":
                            self._reconcile(obj)
                        elif kind == "JobSet":
                            self.jobset_ctl.reconcile(obj)
                        elif kind == "TrainJob":
                            self.trainjob_ctl.reconcile(obj)
                        elif kind == "Deployment":
                            self._deployment_tick(obj, now)
                        elif kind == "Pod" and obj["status"].get("phase") == "Pending" and not obj["spec"].get(
                                "nodeName") and not obj["metadata"].get("deletionTimestamp"):
                            self._schedule(obj)
                    except Exception as e:  # a harness bug: keep ticking, report it at exit
                        self._record_error(f"ticker on {kind} {_name}", e)

    def _guarded(self, where: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as e:
            self._record_error(where, e)

    def _record_error(self, where: str, e: BaseException) -> None:
        # No traceback printing from threads: on CPython 3.11.7 formatting one (it calls ast.parse)
        # while another thread parses corrupts the parser's state (gh-106905).
        self.errors.append(f"{where}: {type(e).__name__}: {e}")

    def _reconcile(self, job: dict[str, Any]) -> None:
        """One pass of the Job controller over ``job`` (called with the lock held)."""
        if self._stopping.is_set():
            return
        uid = job["metadata"]["uid"]
        st = self.job_state.get(uid)
        if st is None or self._finished(job) or st["finishing"]:
            return
        spec, status = job["spec"], job["status"]
        ns = job["metadata"]["namespace"]
        now = time.time()
        if spec.get("suspend"):
            if self.kueue is not None and k8s_kueue.QUEUE_LABEL in (job["metadata"].get("labels") or {}):
                self._kueue_reconcile(job, st, now)
            if spec.get("suspend"):
                return
        if "startTime" not in status:
            status["startTime"] = now_iso()
            st["start"] = now
        pods = self._job_pods(job)
        indexed = spec.get("completionMode") == "Indexed"
        completions = spec.get("completions", 1)
        changed = False
        # 1. account for pods that finished since the last pass
        for pod in pods:
            puid = pod["metadata"]["uid"]
            phase = pod["status"].get("phase")
            if phase not in ("Succeeded", "Failed") or puid in st["accounted"]:
                continue
            st["accounted"].add(puid)
            changed = True
            idx = int(pod["metadata"].get("annotations", {}).get(COMPLETION_INDEX, "0"))
            if phase == "Succeeded":
                st["succeeded"].add(idx if indexed else puid)
                continue
            action, rule_i, why = self._match_failure_policy(spec.get("podFailurePolicy"), pod)
            if action == "FailJob":
                st["counted_failures"] += 1
                status["failed"] = st["counted_failures"]
                self._fail(job, "PodFailurePolicy", f"{why} matching FailJob rule at index {rule_i}")
                return
            if action == "Ignore":
                st["next_start"] = now  # not counted; replace at once
                continue
            st["counted_failures"] += 1
            per_index = spec.get("backoffLimitPerIndex")
            if indexed and per_index is not None:
                # each index has its own retries; an index out of them is failed and never retried
                st["index_failures"][idx] = st["index_failures"].get(idx, 0) + 1
                if st["index_failures"][idx] > per_index:
                    st["failed_indexes"].add(idx)
                    status["failedIndexes"] = _ranges(sorted(st["failed_indexes"]))
                    cap = spec.get("maxFailedIndexes")
                    if cap is not None and len(st["failed_indexes"]) > cap:
                        status["failed"] = st["counted_failures"]
                        self._fail(job, "MaxFailedIndexesExceeded", "Job has exceeded maxFailedIndexes")
                        return
            if st["counted_failures"] > spec.get("backoffLimit", 6):
                status["failed"] = st["counted_failures"]
                self._fail(job, "BackoffLimitExceeded", "Job has reached the specified backoff limit")
                return
            # the real controller backs off 10 s, 20 s, 40 s...; the harness scales that down
            st["next_start"] = now + self.retry_delay * (2 ** (st["counted_failures"] - 1))
        # 2. the deadline
        ads = spec.get("activeDeadlineSeconds")
        if ads is not None and now - st.get("start", now) > ads:
            self._fail(job, "DeadlineExceeded", "Job was active longer than specified deadline")
            return
        # 3. success (or, with per-index backoff, every index finished and some failed)
        if st["failed_indexes"] and len(st["succeeded"]) + len(st["failed_indexes"]) >= completions:
            self._fail(job, "FailedIndexes", "Job has failed indexes")
            return
        if len(st["succeeded"]) >= completions:
            self._complete(job)
            return
        # 4. start pods (podReplacementPolicy Failed: only once the failed pod has terminated,
        #    which a harness pod always has by the time it is accounted)
        active = [p for p in pods if p["status"].get("phase") in ("Pending", "Running")]
        if now >= st["next_start"]:
            if indexed:
                busy = {int(p["metadata"]["annotations"][COMPLETION_INDEX]) for p in active}
                todo = [i for i in range(completions)
                        if i not in st["succeeded"] and i not in busy and i not in st["failed_indexes"]]
            else:
                todo = [None] * max(0, completions - len(st["succeeded"]) - len(active))
            room = max(0, spec.get("parallelism", 1) - len(active))
            for idx in todo[:room]:
                self._create_pod(job, idx)
                changed = True
            pods = self._job_pods(job)
            active = [p for p in pods if p["status"].get("phase") in ("Pending", "Running")]
        new_status = {
            "active": len(active),
            "ready": sum(1 for p in active if p["status"].get("phase") == "Running"),
            "succeeded": len(st["succeeded"]),
            "failed": st["counted_failures"],
            "terminating": 0,
        }
        if indexed:
            new_status["completedIndexes"] = _ranges(sorted(st["succeeded"]))
        if changed or any(status.get(k) != v for k, v in new_status.items()):
            status.update(new_status)
            self._put("Job", ns, job, "MODIFIED")

    @staticmethod
    def _match_failure_policy(pfp: dict[str, Any] | None, pod: dict[str, Any]) -> tuple[str | None, int, str]:
        """The first matching rule's action, its index and a description, or (None, -1, "")."""
        if not pfp:
            return None, -1, ""
        statuses = pod["status"].get("containerStatuses", [])
        pod_name = f'{pod["metadata"]["namespace"]}/{pod["metadata"]["name"]}'
        for i, rule in enumerate(pfp.get("rules", [])):
            oe = rule.get("onExitCodes")
            if oe:
                for cs in statuses:
                    if oe.get("containerName") and cs["name"] != oe["containerName"]:
                        continue
                    code = (cs.get("state", {}).get("terminated") or {}).get("exitCode")
                    if code is None or code == 0:
                        continue
                    hit = code in oe["values"] if oe["operator"] == "In" else code not in oe["values"]
                    if hit:
                        return (
                            rule["action"],
                            i,
                            f"Container {cs['name']} for pod {pod_name} failed with exit code {code}",
                        )
            for pc in rule.get("onPodConditions", []) or []:
                for c in pod["status"].get("conditions", []):
                    if c["type"] == pc["type"] and c["status"] == pc.get("status", "True"):
                        return rule["action"], i, f"Pod {pod_name} has condition {c['type']}"
        return None, -1, ""

    def _fail(self, job: dict[str, Any], reason: str, message: str) -> None:
        """FailureTarget now; terminate active pods; Failed once they are gone."""
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        st = self.job_state[job["metadata"]["uid"]]
        st["finishing"] = True
        job["status"].setdefault("conditions", []).append(self._cond("FailureTarget", reason, message))
        self._put("Job", ns, job, "MODIFIED")
        active = [p for p in self._job_pods(job) if p["status"].get("phase") in ("Pending", "Running")]

        def finish() -> None:
            for pod in active:
                proc = self.procs.get(pod["metadata"]["uid"])
                if proc is not None and proc.exit_code is None:
                    self._terminate(proc, pod["spec"].get("terminationGracePeriodSeconds", 30))
                    proc.done.wait(timeout=10)
            with self.cond:
                cur = self.objects.get(("Job", ns, name))
                if cur is None or cur["metadata"]["uid"] != job["metadata"]["uid"]:
                    return
                cur["status"]["conditions"].append(self._cond("Failed", reason, message))
                cur["status"]["active"] = 0
                cur["status"]["ready"] = 0
                self.timeline.append((time.time(), "failed", name))
                self._put("Job", ns, cur, "MODIFIED")
                self._kueue_finished(cur)

        threading.Thread(target=self._guarded, args=(f"failing {name}", finish), daemon=True).start()

    def _complete(self, job: dict[str, Any]) -> None:
        ns = job["metadata"]["namespace"]
        status = job["status"]
        st = self.job_state[job["metadata"]["uid"]]
        st["finishing"] = True
        status.update({"active": 0, "ready": 0, "succeeded": len(st["succeeded"]), "terminating": 0})
        if job["spec"].get("completionMode") == "Indexed":
            status["completedIndexes"] = _ranges(sorted(st["succeeded"]))
        # Kubernetes >= 1.31: SuccessCriteriaMet first, Complete once the pods are gone.
        status.setdefault("conditions", []).append(
            self._cond("SuccessCriteriaMet", "CompletionsReached", "Reached expected number of succeeded pods"))
        self._put("Job", ns, job, "MODIFIED")
        status["conditions"].append(
            self._cond("Complete", "CompletionsReached", "Reached expected number of succeeded pods")
        )
        status["completionTime"] = now_iso()
        self.timeline.append((time.time(), "complete", job["metadata"]["name"]))
        self._put("Job", ns, job, "MODIFIED")
        self._kueue_finished(job)

    # -- events -----------------------------------------------------------------------------------
    def _event(self, ns: str, obj: dict[str, Any], reason: str, message: str, etype: str = "Warning",
               component: str = "job-controller") -> None:
        """Record a core/v1 Event about ``obj`` (called with the lock held)."""
        meta = obj["metadata"]
        t = now_iso()
        ev = {"apiVersion": "v1", "kind": "Event",
              "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": ns,
                           "uid": str(uuid.uuid4()), "creationTimestamp": t},
              "involvedObject": {"kind": obj.get("kind", ""), "name": meta["name"], "namespace": ns,
                                 "uid": meta.get("uid", ""), "apiVersion": obj.get("apiVersion", "")},
              "reason": reason, "message": message, "type": etype, "count": 1,
              "firstTimestamp": t, "lastTimestamp": t, "source": {"component": component}}
        self._put("Event", ns, ev, "ADDED")

    # -- Kueue --------------------------------------------------------------------------------------
    def _kueue_reconcile(self, job: dict[str, Any], st: dict[str, Any], now: float) -> None:
        """Kueue's part for one suspended, queued Job: its Workload, quota, admission (k8s_kueue.py)."""
        assert self.kueue is not None
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        wname = k8s_kueue.workload_name(job)
        queue = job["metadata"]["labels"][k8s_kueue.QUEUE_LABEL]
        wl = self.objects.get(("Workload", ns, wname))
        if wl is None:
            wl = {"apiVersion": f"{k8s_kueue.GROUP}/{k8s_kueue.VERSION}", "kind": "Workload",
                  "metadata": {"name": wname, "namespace": ns, "uid": str(uuid.uuid4()), "creationTimestamp": now_iso(),
                               "labels": {k8s_kueue.JOB_UID_LABEL: job["metadata"]["uid"]},
                               "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                                    "uid": job["metadata"]["uid"], "controller": True}]},
                  "spec": {"queueName": queue, "podSets": [{"name": "main", "count": job["spec"].get("parallelism", 1),
                                                            "template": job["spec"]["template"]}]},
                  "status": {"conditions": []}}
            self._put("Workload", ns, wl, "ADDED")
            st["admit_at"] = now + self.kueue.admit_delay
            self._event(ns, job, "CreatedWorkload", f"Created Workload: {ns}/{wname}", "Normal",
                        "batch/job-kueue-controller")
            return
        if now < (st["admit_at"] or 0):
            return
        quota = self.kueue.quota(queue)
        need = k8s_kueue.pod_set_need(job)
        if quota is None:
            verdict = ("QuotaReserved", "False", "Inadmissible", f"LocalQueue {queue} doesn't exist")
        else:
            used: dict[str, float] = {}
            for (k, wns, _), other in self.objects.items():
                if k != "Workload" or other is wl or other["spec"]["queueName"] != queue:
                    continue
                conds = {c["type"]: c["status"] for c in other["status"].get("conditions", [])}
                if conds.get("Admitted") == "True" and conds.get("Finished") != "True":
                    owners = other["metadata"].get("ownerReferences") or []  # none: its Job orphaned it
                    oj = self.objects.get(("Job", wns, owners[0]["name"])) if owners else None
                    if oj is not None:
                        for r, v in k8s_kueue.pod_set_need(oj).items():
                            used[r] = used.get(r, 0.0) + v
            short = k8s_kueue.shortage(quota, used, need)
            verdict = ("Admitted", "True", "Admitted", "The workload is admitted") if short is None else (
                "QuotaReserved", "False", "Pending",
                f"couldn't assign flavors to pod set main: insufficient unused quota for {short[0]} in flavor "
                f"default-flavor, {k8s_kueue.fmt_amount(*short)} more needed")
        kind, status, reason, message = verdict
        conds = {c["type"]: c for c in wl["status"]["conditions"]}
        if kind == "Admitted":
            wl["status"]["conditions"] = [
                self._cond("QuotaReserved", "QuotaReserved", "Quota reserved in ClusterQueue"),
                self._cond("Admitted", "Admitted", message)]
            self._put("Workload", ns, wl, "MODIFIED")
            job["spec"]["suspend"] = False
            job["status"]["conditions"] = [c for c in job["status"].get("conditions", []) if c["type"] != "Suspended"]
            job["status"]["conditions"].append(self._cond("Suspended", "JobResumed", "Job resumed", status="False"))
            self.timeline.append((now, "admitted", name))
            self._put("Job", ns, job, "MODIFIED")
        elif (conds.get(kind) or {}).get("message") != message:
            wl["status"]["conditions"] = [self._cond(kind, reason, message, status=status)]
            self._put("Workload", ns, wl, "MODIFIED")

    def _kueue_finished(self, job: dict[str, Any]) -> None:
        """A finished Job's Workload is Finished: its quota is free again."""
        if self.kueue is None:
            return
        ns = job["metadata"]["namespace"]
        wl = self.objects.get(("Workload", ns, k8s_kueue.workload_name(job)))
        if wl is not None:
            wl["status"]["conditions"].append(self._cond("Finished", "JobFinished", "Job finished"))
            self._put("Workload", ns, wl, "MODIFIED")

    # -- the kubelet (and the scheduler) --------------------------------------------------------
    def _create_pod(self, job: dict[str, Any], index: int | None) -> None:
        ns, jname = job["metadata"]["namespace"], job["metadata"]["name"]
        tmpl = copy.deepcopy(job["spec"]["template"])
        suffix = uuid.uuid4().hex[:5]
        name = f"{jname}-{index}-{suffix}" if index is not None else f"{jname}-{suffix}"
        st = self.job_state[job["metadata"]["uid"]]
        level = self.pss_levels.get(ns, self.pss_default)
        violations = pod_security.check(tmpl["spec"], level)
        if violations:
            # the PodSecurity admission controller refuses the pod: no pod, a FailedCreate event on the
            # Job, and the Job controller tries again later (with backoff)
            st["refused"] += 1
            st["next_start"] = time.time() + min(10.0, self.retry_delay * 2 ** st["refused"])
            self._event(ns, job, "FailedCreate", "Error creating: " + pod_security.message(name, violations, level))
            return
        meta = tmpl.get("metadata", {})
        labels = dict(meta.get("labels", {}))
        annotations = dict(meta.get("annotations", {}))
        if index is not None:
            annotations[COMPLETION_INDEX] = str(index)
            labels[COMPLETION_INDEX] = str(index)
            # the Job controller names an Indexed Job's pod host <job>-<index> (its DNS name under a subdomain)
            tmpl["spec"].setdefault("hostname", f"{jname}-{index}")
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name, "namespace": ns, "uid": str(uuid.uuid4()), "labels": labels, "annotations": annotations,
                "creationTimestamp": now_iso(),
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": jname,
                                     "uid": job["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}],
            },
            "spec": dict(tmpl["spec"]),
            "status": {"phase": "Pending", "conditions": []},
        }
        st["started_pods"] += 1
        self._put("Pod", ns, pod, "ADDED")
        self.timeline.append((time.time(), "pod", name))
        self._schedule(pod)

    def _schedule(self, pod: dict[str, Any]) -> None:
        """Bind a Pending pod to a node of the pool, or say why it cannot be (k8s_nodes.py)."""
        ns = pod["metadata"]["namespace"]
        used: dict[str, dict[str, float]] = {}
        for (k, _pns, _), o in self.objects.items():
            if k == "Pod" and o["spec"].get("nodeName") and o["status"].get("phase") in ("Pending", "Running"):
                acc = used.setdefault(o["spec"]["nodeName"], {})
                for r, v in pod_requests(o["spec"]).items():
                    acc[r] = acc.get(r, 0.0) + v
        missing = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"].get("volumes", [])
                   if "persistentVolumeClaim" in v and (ns, v["persistentVolumeClaim"]["claimName"]) not in self.pvcs]
        node, message = schedule(pod["spec"], self.nodes, used, missing)
        if node is None:
            cond = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
                    "lastTransitionTime": now_iso(), "lastProbeTime": None}
            old = next((c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled"), None)
            if old is None or old.get("message") != message:
                pod["status"]["conditions"] = [c for c in pod["status"]["conditions"] if c["type"] != "PodScheduled"]
                pod["status"]["conditions"].append(cond)
                self._put("Pod", ns, pod, "MODIFIED")
                self._event(ns, pod, "FailedScheduling", message, component="default-scheduler")
                self.timeline.append((time.time(), "unschedulable", pod["metadata"]["name"]))
            return
        pod["spec"]["nodeName"] = node
        pod["status"]["conditions"] = [c for c in pod["status"]["conditions"] if c["type"] != "PodScheduled"]
        pod["status"]["conditions"].append({"type": "PodScheduled", "status": "True", "lastTransitionTime": now_iso()})
        self._put("Pod", ns, pod, "MODIFIED")
        self._event(ns, pod, "Scheduled", f"Successfully assigned {ns}/{pod['metadata']['name']} to {node}", "Normal",
                    "default-scheduler")
        self._start_container(pod)

    def _start_container(self, pod: dict[str, Any]) -> None:
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        try:
            argv, env, cwd = self._container_process(pod)
        except ContainerConfigError as e:
            pod["status"]["containerStatuses"] = [{
                "name": c["name"], "image": c["image"], "imageID": "", "ready": False, "restartCount": 0,
                "started": False,
                "state": {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}},
            } for c in pod["spec"]["containers"]]
            self._put("Pod", ns, pod, "MODIFIED")
            return
        log_path = self.workdir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            popen = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            # what containerd reports when the entrypoint cannot be executed: the container
            # terminates at once with exit code 128 (StartError) and, restartPolicy Never, the pod fails
            t = now_iso()
            pod["status"]["phase"] = "Failed"
            pod["status"]["containerStatuses"] = [{
                "name": pod["spec"]["containers"][0]["name"], "image": pod["spec"]["containers"][0]["image"],
                "imageID": "", "ready": False, "restartCount": 0, "started": False,
                "state": {"terminated": {"exitCode": 128, "reason": "StartError", "message": str(e),
                                         "startedAt": t, "finishedAt": t}},
            }]
            self._put("Pod", ns, pod, "MODIFIED")
            return
        proc = _PodProc(popen, log_path)
        self.procs[pod["metadata"]["uid"]] = proc
        c = pod["spec"]["containers"][0]
        started = now_iso()
        pod["status"].update({
            "phase": "Running", "startTime": started, "hostIP": "127.0.0.1", "podIP": self._pod_ip(pod),
            "containerStatuses": [{"name": c["name"], "image": c["image"], "imageID": f"harness://{c['image']}",
                                   "containerID": f"harness://{popen.pid}", "ready": True, "started": True,
                                   "restartCount": 0, "state": {"running": {"startedAt": started}}}],
        })
        pod["status"]["conditions"] += [
            {"type": t, "status": "True", "lastTransitionTime": started}
            for t in ("Initialized", "ContainersReady", "Ready")
        ]
        self._put("Pod", ns, pod, "MODIFIED")
        threading.Thread(target=self._read_output, args=(proc,), daemon=True).start()
        threading.Thread(target=self._wait_pod, args=(ns, name, pod["metadata"]["uid"], proc, None, started),
                         daemon=True).start()

    @staticmethod
    def _read_output(proc: _PodProc) -> None:
        """The container runtime's log: every line with the time it was written (for timestamps=true)."""
        assert proc.popen.stdout is not None
        with open(proc.log_path, "wb") as f:
            for line in iter(proc.popen.stdout.readline, b""):
                f.write(line)
                f.flush()
                with proc.more:
                    proc.lines.append((time.time_ns(), line))
                    proc.more.notify_all()
        proc.eof.set()
        with proc.more:
            proc.more.notify_all()

    def _wait_pod(self, ns: str, name: str, uid: str, proc: _PodProc, logf: Any, started: str) -> None:
        try:
            self._pod_exited(ns, name, uid, proc, logf, started)
        except Exception as e:
            self._record_error(f"pod {name}", e)
            proc.done.set()

    def _pod_exited(self, ns: str, name: str, uid: str, proc: _PodProc, logf: Any, started: str) -> None:
        rc = proc.popen.wait()
        proc.eof.wait(timeout=5)  # the log holds every line before the container counts as terminated
        code = rc if rc >= 0 else 128 - rc  # killed by a signal: what the runtime reports (143 = SIGTERM)
        proc.exit_code = code
        with self.cond:
            pod = self.objects.get(("Pod", ns, name))
            if pod is not None and pod["metadata"]["uid"] == uid:
                c = pod["spec"]["containers"][0]
                term: dict[str, Any] = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                        "startedAt": started, "finishedAt": now_iso(),
                                        "containerID": f"harness://{proc.popen.pid}"}
                if code != 0 and c.get("terminationMessagePolicy") == "FallbackToLogsOnError":
                    tail = proc.log_path.read_bytes()[-2048:].decode("utf-8", "replace")
                    term["message"] = "\n".join(tail.splitlines()[-80:])
                pod["status"]["phase"] = "Succeeded" if code == 0 else "Failed"
                pod["status"]["containerStatuses"][0].update(
                    {"ready": False, "started": False, "state": {"terminated": term}})
                for cond in pod["status"]["conditions"]:
                    if cond["type"] in ("Ready", "ContainersReady"):
                        cond["status"] = "False"
                        cond["reason"] = "PodCompleted" if code == 0 else "PodFailed"
                self.timeline.append((time.time(), "pod-exit", name))
                self._put("Pod", ns, pod, "MODIFIED")
                owners = pod["metadata"].get("ownerReferences") or []  # none: orphaned (its Job deleted)
                job = self.objects.get(("Job", ns, owners[0]["name"])) if owners else None
                if job is not None:
                    self._reconcile(job)
            proc.done.set()
            self.cond.notify_all()

    def _volume_dir(self, pod: dict[str, Any], root: Path, vol: dict[str, Any], fs_group: int | None) -> Path:
        """The host directory that backs one of the pod's volumes, populated as the kubelet would."""
        ns = pod["metadata"]["namespace"]
        name = vol["name"]
        if "persistentVolumeClaim" in vol:
            d = self.pvcs[(ns, vol["persistentVolumeClaim"]["claimName"])]
            if fs_group is not None and self.sandboxed:
                k8s_sandbox.grant_group(d, fs_group)  # the kubelet makes a volume's ownership the fsGroup's
            return d
        d = root / "volumes" / name
        d.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in vol:
            d.chmod(0o777)  # what the kubelet gives an emptyDir
            if fs_group is not None and self.sandboxed:
                os.chown(d, 0, fs_group)
                d.chmod(0o2777)
            return d
        files: list[tuple[str, str, int]] = []  # (path in the volume, content, mode)

        def from_secret(secret: str, items: list[dict[str, Any]] | None, mode: int, optional: bool) -> None:
            data = self.secrets.get((ns, secret))
            if data is None:
                if optional:
                    return
                raise ContainerConfigError(f'secret "{secret}" not found')
            for it in items or [{"key": k, "path": k} for k in data]:
                if it["key"] not in data:
                    raise ContainerConfigError(f'couldn\'t find key {it["key"]} in Secret {ns}/{secret}')
                files.append((it["path"], data[it["key"]], it.get("mode", mode)))

        def from_configmap(cm: str, items: list[dict[str, Any]] | None, mode: int, optional: bool) -> None:
            data = self.configmaps.get((ns, cm))
            if data is None:
                if optional:
                    return
                raise ContainerConfigError(f'configmap "{cm}" not found')
            for it in items or [{"key": k, "path": k} for k in data]:
                if it["key"] not in data:
                    raise ContainerConfigError(f'couldn\'t find key {it["key"]} in ConfigMap {ns}/{cm}')
                files.append((it["path"], data[it["key"]], it.get("mode", mode)))

        if "secret" in vol:
            v = vol["secret"]
            from_secret(v["secretName"], v.get("items"), v.get("defaultMode", 0o644), v.get("optional", False))
        elif "configMap" in vol:
            v = vol["configMap"]
            from_configmap(v["name"], v.get("items"), v.get("defaultMode", 0o644), v.get("optional", False))
        elif "projected" in vol:
            mode = vol["projected"].get("defaultMode", 0o644)
            for src in vol["projected"].get("sources", []):
                if "secret" in src:
                    from_secret(src["secret"]["name"], src["secret"].get("items"), mode,
                                src["secret"].get("optional", False))
                elif "configMap" in src:
                    from_configmap(src["configMap"]["name"], src["configMap"].get("items"), mode,
                                   src["configMap"].get("optional", False))
                else:
                    raise ContainerConfigError(f"harness: unsupported projected source {sorted(src)}")
        else:
            raise ContainerConfigError(f"harness: unsupported volume type {sorted(set(vol) - {'name'})}")
        for rel, content, mode in files:
            f = d / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(content)
            if fs_group is not None and self.sandboxed:
                os.chown(f, 0, fs_group)  # owner root, group fsGroup: readable by the pod's user through the group
            f.chmod(mode if self.sandboxed else mode | 0o400)
        return d

    def _container_process(self, pod: dict[str, Any]) -> tuple[list[str], dict[str, str], str]:
        """argv, env and cwd of the process that runs the pod's (first) container, resolved as the
        kubelet would; in the sandbox (k8s_sandbox.py) with the pod's user and filesystem view."""
        ns = pod["metadata"]["namespace"]
        c = pod["spec"]["containers"][0]
        root = self.workdir / "pods" / pod["metadata"]["name"]
        root.mkdir(parents=True, exist_ok=True)
        psc = pod["spec"].get("securityContext") or {}
        csc = c.get("securityContext") or {}
        fs_group = psc.get("fsGroup")
        uid = csc.get("runAsUser", psc.get("runAsUser", 0))  # no image to ask: an image's default user is root
        gid = csc.get("runAsGroup", psc.get("runAsGroup", 0))
        if (csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True) and uid == 0:
            raise ContainerConfigError("container has runAsNonRoot and image will run as root")
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        mounts: dict[str, Path] = {}
        sandbox_mounts: list[dict[str, Any]] = []
        for m in c.get("volumeMounts", []):
            vol = volumes.get(m["name"])
            if vol is None:
                raise ContainerConfigError(f'volume "{m["name"]}" is mounted but not defined')
            host = self._volume_dir(pod, root, vol, fs_group)
            if m.get("subPath"):
                host = host / m["subPath"]
            ro = bool(m.get("readOnly")) or any(k in vol for k in ("secret", "configMap", "projected"))
            mounts[m["mountPath"].rstrip("/") or "/"] = host
            sandbox_mounts.append({"source": str(host), "target": m["mountPath"], "readOnly": ro,
                                   "file": host.is_file()})
        env: dict[str, str] = {}
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = _expand(e["value"], env)
                continue
            vf = e.get("valueFrom", {})
            if "secretKeyRef" in vf:
                ref = vf["secretKeyRef"]
                data = self.secrets.get((ns, ref["name"]))
                if data is None or ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise ContainerConfigError(
                        f'secret "{ref["name"]}" not found' if data is None
                        else f'couldn\'t find key {ref["key"]} in Secret {ns}/{ref["name"]}')
                env[e["name"]] = data[ref["key"]]
            elif "fieldRef" in vf:
                env[e["name"]] = _field_ref(pod, vf["fieldRef"]["fieldPath"])
            else:
                raise ContainerConfigError(f"harness: unsupported valueFrom for env {e['name']}: {sorted(vf)}")
        if COMPLETION_INDEX in pod["metadata"].get("annotations", {}) and "JOB_COMPLETION_INDEX" not in env:
            env["JOB_COMPLETION_INDEX"] = pod["metadata"]["annotations"][COMPLETION_INDEX]  # the Job controller's
        if not self.sandboxed:
            # unconfined: paths into mounted volumes point at the pod's directories on this machine
            for k, v in env.items():
                for mpath, host in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
                    if v == mpath or v.startswith(mpath + "/"):
                        env[k] = str(host) + v[len(mpath):]
                        break
        argv = [_expand(a, env) for a in (c.get("command") or ["bezoar"]) + list(c.get("args", []))]
        if argv and argv[0] in self.entrypoints:
            argv = list(self.entrypoints[argv[0]]) + argv[1:]
        host_env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "SYSTEMROOT") if k in os.environ}
        host_env["PYTHONPATH"] = str(REPO)
        full_env = {**host_env, **env, **self.extra_env}
        if not self.sandboxed:
            return argv, full_env, str(root)
        for share in self.host_shares:  # test instruments (the fake stage's plan), never part of a pod spec
            sandbox_mounts.append({"source": str(share), "target": str(share), "readOnly": False, "file": False})
        spec_path = root / "sandbox.json"
        groups = [gid] + ([fs_group] if fs_group is not None else []) + list(psc.get("supplementalGroups", []))
        k8s_sandbox.write_spec(
            spec_path, argv=argv, env=full_env, cwd=c.get("workingDir", "/"), rootfs=root / "rootfs",
            mounts=sandbox_mounts, uid=uid, gid=gid, groups=groups,
            read_only_root=bool(csc.get("readOnlyRootFilesystem")),
            no_new_privs=csc.get("allowPrivilegeEscalation") is False, hosts=self.hosts_file(pod))
        return [sys.executable, str(HERE / "k8s_sandbox.py"), str(spec_path)], {"PATH": host_env.get("PATH", "")}, "/"

    def _signal(self, proc: _PodProc, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.popen.pid, sig)

    def _terminate(self, proc: _PodProc, grace: float) -> None:
        """SIGTERM the pod's process group; SIGKILL it if it outlives the grace period."""
        self._signal(proc, signal.SIGTERM)

        def reaper() -> None:
            if not proc.done.wait(timeout=grace):
                self._signal(proc, signal.SIGKILL)

        threading.Thread(target=reaper, daemon=True).start()

    # -- Deployments ----------------------------------------------------------------------------
    def patch_deployment(self, ns: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A merge (or strategic merge) patch of a Deployment. A ``metadata.resourceVersion`` in the patch
        is a precondition, as for the API server: 409 Conflict when the object has moved on."""
        with self.cond:
            dep = self._get("Deployment", ns, name)
            want_rv = (patch.get("metadata") or {}).get("resourceVersion")
            if want_rv is not None and want_rv != dep["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on deployments.apps "{name}": the '
                                                "object has been modified; please apply your changes to the latest "
                                                "version and try again", {"name": name, "group": "apps",
                                                                          "kind": "deployments"})
            new = copy.deepcopy(dep)
            patch = copy.deepcopy(patch)
            (patch.get("metadata") or {}).pop("resourceVersion", None)
            _merge_patch(new, patch)
            replicas = new["spec"].get("replicas")
            if not isinstance(replicas, int) or replicas < 0:
                raise ApiError(422, "Invalid", f'Deployment.apps "{name}" is invalid: spec.replicas: must be >= 0')
            new["spec"]["replicas"] = dep["spec"]["replicas"]
            dep["metadata"] = new["metadata"]
            if replicas != dep["spec"]["replicas"]:
                self.scale(ns, name, replicas)  # bumps the generation and announces the change
            else:
                self._put("Deployment", ns, dep, "MODIFIED")
            self.patches.append((name, copy.deepcopy(patch)))
            return copy.deepcopy(dep)

    def scale(self, ns: str, name: str, replicas: int) -> None:
        with self.cond:
            dep = self._get("Deployment", ns, name)
            if dep["spec"]["replicas"] == replicas:
                return
            dep["spec"]["replicas"] = replicas
            dep["metadata"]["generation"] += 1
            dep["status"]["observedGeneration"] = dep["metadata"]["generation"]
            dep["status"]["replicas"] = replicas
            dep["status"]["updatedReplicas"] = replicas
            if replicas < (dep["status"].get("readyReplicas") or 0):
                dep["status"]["readyReplicas"] = replicas
                dep["status"]["availableReplicas"] = replicas
            self.deploy_ready_at[(ns, name)] = (time.time() + self.deploy_ready_delay.get((ns, name), 0.2), replicas)
            self.scale_history.append((name, replicas))
            self.timeline.append((time.time(), f"scaled-{replicas}", name))
            self._put("Deployment", ns, dep, "MODIFIED")

    def _deployment_tick(self, dep: dict[str, Any], now: float) -> None:
        key = (dep["metadata"]["namespace"], dep["metadata"]["name"])
        pending = self.deploy_ready_at.get(key)
        if pending and now >= pending[0]:
            del self.deploy_ready_at[key]
            dep["status"]["readyReplicas"] = pending[1]
            dep["status"]["availableReplicas"] = pending[1]
            self.timeline.append((now, f"ready-{pending[1]}", key[1]))
            self._put("Deployment", key[0], dep, "MODIFIED")

    def scale_object(self, ns: str, name: str) -> dict[str, Any]:
        dep = self._get("Deployment", ns, name)
        return {
            "apiVersion": "autoscaling/v1", "kind": "Scale",
            "metadata": {"name": name, "namespace": ns, "uid": dep["metadata"]["uid"],
                         "resourceVersion": dep["metadata"]["resourceVersion"],
                         "creationTimestamp": dep["metadata"]["creationTimestamp"]},
            "spec": {"replicas": dep["spec"]["replicas"]},
            "status": {"replicas": dep["status"].get("replicas", 0), "selector": f"app={name}"},
        }


VALIDATE_VERSION = "1.35"  # the Kubernetes version whose strict schema the harness enforces


@functools.lru_cache(maxsize=2)
def _job_validator(version: str) -> Any:
    """kubernetes-validate's strict batch/v1 Job schema, loaded once (its ``validate()`` reads the
    multi-megabyte schema files on every call, which would make every create slow)."""
    import jsonschema
    import kubernetes_validate.utils as kvu
    from referencing import Registry, Resource

    full = [v for v in kvu.all_versions() if kvu.major_minor(v) == version][-1]
    base = f"kubernetes-json-schema/v{full}-local-strict"
    schema = kvu.schema_contents(f"{base}/job-batch-v1.json", version)
    defs = kvu.schema_contents(f"{base}/_definitions.json", version)
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def _ranges(idx: list[int]) -> str:
    """``[0, 1, 2, 4]`` -> ``"0-2,4"`` (the format of ``status.completedIndexes``)."""
    out = []
    for _, grp in itertools.groupby(enumerate(idx), key=lambda t: t[1] - t[0]):
        g = [v for _, v in grp]
        out.append(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]))
    return ",".join(out)


def _field_ref(pod: dict[str, Any], path: str) -> str:
    m = re.match(r"^metadata\.(labels|annotations)\['([^']+)'\]$", path)
    if m:
        return pod["metadata"].get(m.group(1), {}).get(m.group(2), "")
    simple = {
        "metadata.name": pod["metadata"]["name"],
        "metadata.namespace": pod["metadata"]["namespace"],
        "metadata.uid": pod["metadata"]["uid"],
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
        "status.podIP": "127.0.0.1",
        "status.hostIP": "127.0.0.1",
    }
    if path not in simple:
        raise ContainerConfigError(f"harness: unsupported fieldRef {path}")
    return simple[path]


def _merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            _merge_patch(target[k], v)
        else:
            target[k] = copy.deepcopy(v)


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------
_ROUTES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^/api/v1/namespaces/([^/]+)/pods$"), "pods"),
    (re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)$"), "pod"),
    (re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$"), "pod_log"),
    (re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs$"), "jobs"),
    (re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs/([^/]+)$"), "job"),
    (re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)$"), "deployment"),
    (re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)/scale$"), "scale"),
    (re.compile(r"^/api/v1/namespaces/([^/]+)/events$"), "events"),
    (re.compile(r"^/api/v1/namespaces/([^/]+)/services$"), "services"),
    (re.compile(r"^/api/v1/namespaces/([^/]+)/services/([^/]+)$"), "service"),
    (re.compile(r"^/apis/kueue\.x-k8s\.io/([^/]+)/namespaces/([^/]+)/workloads$"), "workloads"),
    # JobSet and Kubeflow Trainer (k8s_jobset.py), served only where FakeCluster(crds=...) installs them
    (re.compile(r"^/apis/([^/]+)/([^/]+)$"), "discovery"),
    (re.compile(r"^/apis/([^/]+)/([^/]+)/namespaces/([^/]+)/([^/]+)$"), "customs"),
    (re.compile(r"^/apis/([^/]+)/([^/]+)/namespaces/([^/]+)/([^/]+)/([^/]+)$"), "custom"),
    (re.compile(r"^/apis/([^/]+)/([^/]+)/([^/]+)/([^/]+)$"), "cluster_custom"),
]
_LIST_KIND = {"Job": ("JobList", "batch/v1"), "Pod": ("PodList", "v1"), "Event": ("EventList", "v1"),
              "Service": ("ServiceList", "v1"),
              "JobSet": ("JobSetList", f"{k8s_jobset.JOBSET_GROUP}/{k8s_jobset.JOBSET_VERSION}"),
              "TrainJob": ("TrainJobList", f"{k8s_jobset.TRAINER_GROUP}/{k8s_jobset.TRAINER_VERSION}"),
              "Workload": ("WorkloadList", f"{k8s_kueue.GROUP}/{k8s_kueue.VERSION}")}


# A batch/v1 Job deleted without a propagationPolicy ORPHANS its pods: they go on running, the garbage
# collector only strips their ownerReferences ("for backwards compatibility": DefaultGarbageCollectionPolicy
# in kubernetes/kubernetes pkg/registry/batch/job/strategy.go returns OrphanDependents for batch/v1, where
# every other kind, custom resources included, gets Background). kubectl sends Background explicitly.
JOB_DEFAULT_PROPAGATION = "Orphan"


def _propagation(body: Any, q: dict[str, str], default: str) -> str:
    """The DeleteOptions' propagation: ``propagationPolicy`` (body or query), else the deprecated
    ``orphanDependents``, else the kind's default; both, or an unknown policy, are refused as upstream
    (staging/src/k8s.io/apimachinery/pkg/apis/meta/v1/validation/validation.go ValidateDeleteOptions)."""
    opts = body if isinstance(body, dict) else {}
    policy = opts.get("propagationPolicy") or q.get("propagationPolicy")
    orphan = opts.get("orphanDependents")
    if orphan is None and "orphanDependents" in q:
        orphan = q["orphanDependents"] in ("true", "1")
    if policy is not None and orphan is not None:
        raise ApiError(422, "Invalid", "DeleteOptions.meta.k8s.io \"\" is invalid: propagationPolicy: Invalid value: "
                                       '"null": orphanDependents and deletionPropagation cannot be both set',
                       {"kind": "DeleteOptions", "group": "meta.k8s.io", "causes": [
                           {"reason": "FieldValueInvalid", "field": "propagationPolicy",
                            "message": "orphanDependents and deletionPropagation cannot be both set"}]})
    if policy is not None and policy not in ("Orphan", "Background", "Foreground"):
        raise ApiError(422, "Invalid", f'DeleteOptions.meta.k8s.io "" is invalid: propagationPolicy: Unsupported '
                                       f'value: "{policy}": supported values: "Foreground", "Background", "Orphan"',
                       {"kind": "DeleteOptions", "group": "meta.k8s.io", "causes": [
                           {"reason": "FieldValueNotSupported", "field": "propagationPolicy",
                            "message": f'Unsupported value: "{policy}"'}]})
    if policy is not None:
        return policy
    if orphan is not None:
        return "Orphan" if orphan else "Background"
    return default


def field_selector_matches(selector: str | None, obj: dict[str, Any]) -> bool:
    """``involvedObject.name=x,reason=y``-style field selectors (``=``, ``==``, ``!=``)."""
    if not selector:
        return True
    for term in selector.split(","):
        m = re.match(r"^([^!=]+?)\s*(==|!=|=)\s*(.*)$", term.strip())
        if not m:
            raise ApiError(400, "BadRequest", f"invalid field selector {term!r}")
        node: Any = obj
        for part in m.group(1).split("."):
            node = node.get(part) if isinstance(node, dict) else None
        value = "" if node is None else str(node)
        if (m.group(2) == "!=") == (value == m.group(3)):
            return False
    return True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    cluster: FakeCluster

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients closing kept-alive connections (a stopped watch, a shut log stream) is normal.
        # Anything else is recorded, never printed from this thread (see FakeCluster._record_error).
        e = sys.exc_info()[1]
        if not isinstance(e, ConnectionError | OSError):
            self.cluster._record_error(f"request from {client_address}", e or RuntimeError("unknown"))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    cluster: FakeCluster  # set on the subclass the cluster creates

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet: tests read their own output
        pass

    def setup(self) -> None:
        super().setup()
        self.cluster._conns.add(self.connection)

    def finish(self) -> None:
        self.cluster._conns.discard(self.connection)
        self.cluster._log_conns.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- plumbing -------------------------------------------------------------------------------
    def _send_json(self, code: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _start_stream(self, ctype: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def _end_stream(self) -> None:
        with contextlib.suppress(OSError):
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    def _body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise ApiError(400, "BadRequest", "harness: the request body is not JSON") from None

    def _dispatch(self, method: str) -> None:
        c = self.cluster
        url = urlparse(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        c.requests.append((method, self.path))
        if c.down.is_set():
            with contextlib.suppress(OSError):
                self.connection.shutdown(2)
            return
        try:
            body = self._body() if method in ("POST", "PUT", "PATCH", "DELETE") else None
            if self.headers.get("Authorization") != f"Bearer {c.token}":
                raise ApiError(401, "Unauthorized", "Unauthorized")
            for rx, route in _ROUTES:
                m = rx.match(url.path)
                if m:
                    getattr(self, f"_r_{route}")(method, q, body, *m.groups())
                    return
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({url.path})")
        except ApiError as e:
            self._send_json(e.code, e.status())
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # a harness bug: answer 500 (as an API server would) and record it
            c._record_error(f"{method} {self.path}", e)
            with contextlib.suppress(OSError):
                self._send_json(500, ApiError(500, "InternalError", f"harness: {type(e).__name__}: {e}").status())

    # -- routes ---------------------------------------------------------------------------------
    def _r_jobs(self, method: str, q: dict[str, str], body: Any, ns: str) -> None:
        c = self.cluster
        if method == "POST":
            self._send_json(201, c.create_job(ns, body or {}))
        elif method == "GET":
            self._list_or_watch("Job", ns, q)
        elif method == "DELETE":
            with c.lock:
                names = [
                    o["metadata"]["name"]
                    for (k, jns, _), o in c.objects.items()
                    if k == "Job"
                    and jns == ns
                    and selector_matches(q.get("labelSelector"), o["metadata"].get("labels"))
                ]
            prop = _propagation(body, q, JOB_DEFAULT_PROPAGATION)
            for n in names:
                with contextlib.suppress(ApiError):
                    c.delete_job(ns, n, prop)
            self._send_json(200, {"kind": "JobList", "apiVersion": "batch/v1", "metadata": {}, "items": []})
        else:
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on jobs")

    def _r_job(self, method: str, q: dict[str, str], body: Any, ns: str, name: str) -> None:
        c = self.cluster
        if method == "GET":
            with c.lock:
                self._send_json(200, copy.deepcopy(c._get("Job", ns, name)))
        elif method == "DELETE":
            prop = _propagation(body, q, JOB_DEFAULT_PROPAGATION)
            self._send_json(200, c.delete_job(ns, name, prop))
        else:
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on a job here")

    def _r_services(self, method: str, q: dict[str, str], body: Any, ns: str) -> None:
        if method == "POST":
            self._send_json(201, self.cluster.create_service(ns, body or {}))
        elif method == "GET":
            self._list_or_watch("Service", ns, q)
        else:
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on services here")

    def _r_service(self, method: str, q: dict[str, str], body: Any, ns: str, name: str) -> None:
        c = self.cluster
        if method == "GET":
            with c.lock:
                self._send_json(200, copy.deepcopy(c._get("Service", ns, name)))
        elif method == "PATCH":
            self._send_json(200, c.patch_service(ns, name, body or {}))
        elif method == "DELETE":
            with c.cond:
                svc = c._get("Service", ns, name)
                c._put("Service", ns, svc, "DELETED")
            self._send_json(200, svc)
        else:
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on a service here")

    def _r_pods(self, method: str, q: dict[str, str], body: Any, ns: str) -> None:
        if method != "GET":
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on pods here")
        self._list_or_watch("Pod", ns, q)

    def _r_pod(self, method: str, q: dict[str, str], body: Any, ns: str, name: str) -> None:
        if method != "GET":
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on a pod here")
        with self.cluster.lock:
            self._send_json(200, copy.deepcopy(self.cluster._get("Pod", ns, name)))

    def _r_pod_log(self, method: str, q: dict[str, str], body: Any, ns: str, name: str) -> None:
        c = self.cluster
        with c.lock:
            pod = c._get("Pod", ns, name)
            container = q.get("container") or pod["spec"]["containers"][0]["name"]
            if container not in [x["name"] for x in pod["spec"]["containers"]]:
                raise ApiError(400, "BadRequest", f"container {container} is not valid for pod {name}")
            proc = c.procs.get(pod["metadata"]["uid"])
        if proc is None:
            raise ApiError(400, "BadRequest", f'container "{container}" in pod "{name}" is waiting to start: '
                                              "ContainerCreating")
        follow = q.get("follow") in ("true", "1")
        stamps = q.get("timestamps") in ("true", "1")
        tail = int(q["tailLines"]) if "tailLines" in q else None
        since_ns = 0
        if "sinceTime" in q:
            since_ns = int(parse_rfc3339(q["sinceTime"]) * 1e9)
        elif "sinceSeconds" in q:
            since_ns = time.time_ns() - int(q["sinceSeconds"]) * 1_000_000_000

        def render(lines: list[tuple[int, bytes]]) -> bytes:
            return b"".join((rfc3339nano(t).encode() + b" " + ln) if stamps else ln for t, ln in lines)

        with proc.more:  # what is sent first and where the follow goes on from: one snapshot, or a line written
            lines = [x for x in proc.lines if x[0] >= since_ns]  # between two looks is in neither (lost on a resume)
            sent = len(proc.lines)
        if tail is not None:
            lines = lines[-tail:] if tail else []
        if not follow:
            text = render(lines)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)
            return
        self._start_stream("text/plain")
        c._log_conns.add(self.connection)
        try:
            self._chunk(render(lines))
            while not c._stopping.is_set():
                with proc.more:
                    if len(proc.lines) == sent and not proc.eof.is_set():
                        proc.more.wait(0.05)
                    new = proc.lines[sent:]
                    sent += len(new)
                    finished = proc.eof.is_set() and sent == len(proc.lines)
                self._chunk(render([x for x in new if x[0] >= since_ns]))
                if finished:
                    break
            self._end_stream()
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        finally:
            c._log_conns.discard(self.connection)

    def _r_deployment(self, method: str, q: dict[str, str], body: Any, ns: str, name: str) -> None:
        c = self.cluster
        if method == "GET":
            with c.lock:
                self._send_json(200, copy.deepcopy(c._get("Deployment", ns, name)))
            return
        if method != "PATCH":
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on deployments here")
        ctype = (self.headers.get("Content-Type") or "").split(";")[0]
        if ctype not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            raise ApiError(415, "UnsupportedMediaType", f"harness: PATCH {ctype} is not supported on deployments")
        self._send_json(200, c.patch_deployment(ns, name, body or {}))

    def _r_scale(self, method: str, q: dict[str, str], body: Any, ns: str, name: str) -> None:
        c = self.cluster
        if method == "GET":
            with c.lock:
                self._send_json(200, c.scale_object(ns, name))
            return
        if method not in ("PATCH", "PUT"):
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on deployments/scale")
        with c.lock:
            cur = c.scale_object(ns, name)
        if method == "PUT":
            new = body or {}
        elif isinstance(body, list):  # JSON patch
            new = copy.deepcopy(cur)
            for op in body:
                if op.get("op") in ("replace", "add") and op.get("path") == "/spec/replicas":
                    new["spec"]["replicas"] = op["value"]
                else:
                    raise ApiError(422, "Invalid", f"harness: unsupported JSON patch op {op}")
        else:  # merge / strategic merge patch
            new = copy.deepcopy(cur)
            _merge_patch(new, body or {})
        replicas = (new.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or replicas < 0:
            raise ApiError(422, "Invalid", f"Scale.autoscaling \"{name}\" is invalid: spec.replicas: must be >= 0")
        c.scale(ns, name, replicas)
        with c.lock:
            self._send_json(200, c.scale_object(ns, name))

    def _r_events(self, method: str, q: dict[str, str], body: Any, ns: str) -> None:
        if method != "GET":
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on events here")
        self._list_or_watch("Event", ns, q)

    def _r_workloads(self, method: str, q: dict[str, str], body: Any, version: str, ns: str) -> None:
        c = self.cluster
        if c.kueue is None or version != k8s_kueue.VERSION:  # no such API: Kueue (this version) is not installed
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({self.path})")
        if method != "GET":
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on workloads here")
        self._list_or_watch("Workload", ns, q)

    # -- JobSet / TrainJob (k8s_jobset.py) -------------------------------------------------------
    def _custom_kind(self, group: str, version: str, plural: str, namespaced: bool) -> str:
        c = self.cluster
        res = k8s_jobset.RESOURCES.get((group, version), {}).get(plural)
        if not c.served(group, version) or res is None or res[1] != namespaced:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({self.path})")
        return res[0]

    def _r_discovery(self, method: str, q: dict[str, str], body: Any, group: str, version: str) -> None:
        if not self.cluster.served(group, version) or method != "GET":
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({self.path})")
        self._send_json(200, k8s_jobset.discovery(group, version))

    def _r_customs(self, method: str, q: dict[str, str], body: Any, group: str, version: str, ns: str,
                   plural: str) -> None:
        c = self.cluster
        kind = self._custom_kind(group, version, plural, True)
        if method == "GET":
            self._list_or_watch(kind, ns, q)
            return
        if method != "POST":
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {plural} here")
        body = body or {}
        if body.get("apiVersion") != f"{group}/{version}" or body.get("kind") != kind:
            raise ApiError(400, "BadRequest", f"the API version in the data ({body.get('apiVersion')}) does not match "
                                              f"the expected API version ({group}/{version}) or kind ({kind})")
        strict = q.get("fieldValidation") == "Strict"
        try:
            made = c.create_jobset(ns, body, strict) if kind == "JobSet" else c.create_trainjob(ns, body, strict)
        except k8s_jobset.Refused as e:
            raise ApiError(e.code, e.reason, e.message) from None
        self._send_json(201, made)

    def _r_custom(self, method: str, q: dict[str, str], body: Any, group: str, version: str, ns: str, plural: str,
                  name: str) -> None:
        c = self.cluster
        kind = self._custom_kind(group, version, plural, True)
        try:
            if method == "GET":
                with c.lock:
                    self._send_json(200, copy.deepcopy(c._get(kind, ns, name)))
            elif method == "DELETE":
                self._send_json(200, c.delete_custom(kind, ns, name))
            elif method == "PATCH":
                self._send_json(200, c.patch_custom(kind, ns, name, body or {}))
            else:
                raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {plural} here")
        except k8s_jobset.Refused as e:
            raise ApiError(e.code, e.reason, e.message) from None

    def _r_cluster_custom(self, method: str, q: dict[str, str], body: Any, group: str, version: str, plural: str,
                          name: str) -> None:
        c = self.cluster
        kind = self._custom_kind(group, version, plural, False)
        if method != "GET":
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {plural} here")
        with c.lock:
            self._send_json(200, copy.deepcopy(c._get(kind, "", name)))

    # -- list and watch -------------------------------------------------------------------------
    def _list_or_watch(self, kind: str, ns: str, q: dict[str, str]) -> None:
        c = self.cluster
        sel = q.get("labelSelector")
        list_kind, api_version = _LIST_KIND[kind]
        if q.get("watch") not in ("true", "1"):
            with c.lock:
                items = [copy.deepcopy(o) for (k, ons, _), o in sorted(c.objects.items())
                         if k == kind and ons == ns and selector_matches(sel, o["metadata"].get("labels"))
                         and field_selector_matches(q.get("fieldSelector"), o)]
                self._send_json(200, {"kind": list_kind, "apiVersion": api_version,
                                      "metadata": {"resourceVersion": str(c.rv)}, "items": items})
            return
        timeout = float(q.get("timeoutSeconds") or 1800)
        bookmarks = q.get("allowWatchBookmarks") in ("true", "1")
        rv_param = q.get("resourceVersion") or ""
        deadline = time.time() + timeout
        self._start_stream("application/json")

        def send(etype: str, obj: dict[str, Any]) -> None:
            self._chunk(json.dumps({"type": etype, "object": obj}).encode() + b"\n")

        try:
            with c.cond:
                if rv_param in ("", "0"):
                    # "Any" resourceVersion: synthetic ADDED events for what exists now
                    for (k, ons, _), o in sorted(c.objects.items()):
                        if k == kind and ons == ns and selector_matches(sel, o["metadata"].get("labels")):
                            send("ADDED", o)
                    last = c.rv
                else:
                    last = int(rv_param)
                    if last < c.compacted_rv:
                        send("ERROR", ApiError(410, "Expired", f"too old resource version: {last} "
                                                               f"({c.compacted_rv})").status())
                        self._end_stream()
                        return
            idle_since = time.time()
            while not c._stopping.is_set() and time.time() < deadline:
                with c.cond:
                    batch = [e for e in c.events if e[0] > last]
                    if not batch:
                        c.cond.wait(timeout=min(0.5, max(0.01, deadline - time.time())))
                        batch = [e for e in c.events if e[0] > last]
                    if last < c.compacted_rv:  # events this watch has not seen are gone
                        send("ERROR", ApiError(410, "Expired", f"too old resource version: {last} "
                                                               f"({c.compacted_rv})").status())
                        break
                    current = c.rv
                for rv, k, ons, etype, obj in batch:
                    last = rv
                    if k == kind and ons == ns and selector_matches(sel, obj["metadata"].get("labels")):
                        send(etype, obj)
                        idle_since = time.time()
                if not batch:
                    last = max(last, current)
                if bookmarks and time.time() - idle_since > 1.0:
                    send("BOOKMARK", {"kind": kind, "apiVersion": api_version,
                                      "metadata": {"resourceVersion": str(last)}})
                    idle_since = time.time()
            self._end_stream()
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass


# ---------------------------------------------------------------------------------------------
# The scripted stand-in for `bezoar stage` (run as: python k8s_harness.py fake-stage stage NAME ...)
# ---------------------------------------------------------------------------------------------
def write_plan(path: Path, plan: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Write a fake-stage plan; return the extra env that points the fake stage at it.

    Per stage (all keys optional): ``log`` (lines to print), ``sleep`` (seconds before finishing),
    ``exit`` (exit with this code instead of committing), ``fail_times`` (exit 3 on the first N
    attempts), ``no_manifest`` (exit 0 without committing), ``require_env`` (env names that must be
    set), ``require_files_env`` (env names that must point at readable files), ``shards`` (N: the
    unsharded run requires all N shard markers), ``until_file`` (after the sleep, wait up to 120 s
    for this file to exist), ``rank_exit`` (``{"<node rank>": {"exit": code, "times": N}}``: that node
    rank of a training group exits with ``code`` on its first N attempts, once node 0 of that attempt has started
    (the group's rendezvous); ranks other than 0 never commit),
    ``resolve_master`` (the group's ``--master-addr`` must resolve, as torch.distributed.run needs).
    """
    path.write_text(json.dumps(plan))
    return {"BEZOAR_FAKE_PLAN": str(path)}


def fake_calls(plan_path: Path) -> list[dict[str, Any]]:
    """Every fake-stage invocation so far, in order."""
    calls = plan_path.with_suffix(".calls.jsonl")
    if not calls.exists():
        return []
    return [json.loads(line) for line in calls.read_text().splitlines() if line.strip()]


def _rendezvous(plan_path: Path, stage: str, attempt: int, timeout_s: float = 60.0) -> bool:
    """Hold a node of a group until node 0 of the same attempt has started, as torch.distributed.run's c10d
    rendezvous holds every node's workers until all ``--nnodes`` have joined: a worker cannot fail before its
    group has met. Attempt k of a node is its k-th start, so node 0's k-th start is the one it meets."""
    end = time.time() + timeout_s
    while time.time() < end:
        if sum(1 for c in fake_calls(plan_path) if c["stage"] == stage and c.get("rank") == "0") > attempt:
            return True
        time.sleep(0.05)
    return False


def fake_stage_main(argv: list[str]) -> int:
    """``bezoar stage NAME --recipe R --run U [--shard i/N]`` as scripted by ``$BEZOAR_FAKE_PLAN``.

    Committing goes through the real commit rule (:func:`bezoar_jobs.manifest.commit`) with the
    real parameter and input hashes, so the controller's up-to-date checks see a genuine manifest.
    """
    import argparse

    p = argparse.ArgumentParser(prog="fake-stage")
    p.add_argument("cmd", choices=["stage"])
    p.add_argument("name")
    p.add_argument("--recipe", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--shard")
    # a training group's launcher flags (executors/distributed.py): only the node rank matters here
    for flag in ("--nproc-per-node", "--nnodes", "--master-addr", "--master-port"):
        p.add_argument(flag)
    p.add_argument("--node-rank")
    a = p.parse_args(argv)
    rank = a.node_rank
    plan_path = Path(os.environ["BEZOAR_FAKE_PLAN"]) if os.environ.get("BEZOAR_FAKE_PLAN") else None
    plan = json.loads(plan_path.read_text()) if plan_path else {}
    st = plan.get(a.name, {})
    attempt = 0
    if plan_path:
        attempt = sum(1 for c in fake_calls(plan_path)
                      if c["stage"] == a.name and c["shard"] == a.shard and c.get("rank") == rank)
        with open(plan_path.with_suffix(".calls.jsonl"), "a") as f:
            f.write(json.dumps({"stage": a.name, "shard": a.shard, "pid": os.getpid(), "time": time.time(),
                                "attempt": attempt, "rank": rank, "nnodes": a.nnodes,
                                "master": a.master_addr}) + "\n")
    for line in st.get("log", [f"{a.name}: starting (attempt {attempt})"]):
        print(line, flush=True)
        if st.get("log_every"):
            time.sleep(float(st["log_every"]))
    for name in st.get("require_env", []):
        if not os.environ.get(name):
            print(f"error: environment variable {name} is not set", flush=True)
            return 2
    for name in st.get("require_files_env", []):
        fp = os.environ.get(name)
        if not fp or not Path(fp).is_file() or not os.access(fp, os.R_OK):
            print(f"error: {name} does not point at a readable file ({fp})", flush=True)
            return 2
    for target in st.get("write", []):  # where a pod may write (its mounts) and where it may not
        try:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            Path(target).write_text("x")
            print(f"wrote {target} as uid {os.getuid()}", flush=True)
        except OSError as e:
            print(f"cannot write {target} as uid {os.getuid()}: {e.strerror}", flush=True)
            return 3
    for name in st.get("require_key_files", []):
        fp = Path(os.environ.get("BEZOAR_KEYS_DIR", "/nonexistent")) / name
        if not os.access(fp, os.R_OK) or not fp.read_text().strip():
            print(f"error: API key {name} is not a readable file in $BEZOAR_KEYS_DIR ({fp})", flush=True)
            return 2
    if st.get("resolve_master") and a.master_addr:  # the group's node 0 through cluster DNS (the pod's /etc/hosts)
        import socket

        try:
            print(f"{a.name}: node 0 {a.master_addr} is {socket.gethostbyname(a.master_addr)}", flush=True)
        except OSError as e:
            print(f"{a.name}: cannot resolve node 0 {a.master_addr}: {e}", flush=True)
            return 3
    failing = (st.get("rank_exit") or {}).get(str(rank))  # {"exit": code, "times": N}: this node rank fails
    if failing and attempt < int(failing.get("times", 1 << 30)):
        if rank not in (None, "0") and plan_path and not _rendezvous(plan_path, a.name, attempt):
            print(f"{a.name}: node rank {rank}: rendezvous timed out waiting for node 0 (attempt {attempt})",
                  flush=True)
            return 3
        print(f"{a.name}: node rank {rank} exits {failing['exit']} (attempt {attempt})", flush=True)
        return int(failing["exit"])
    end = time.time() + float(st.get("sleep", 0))
    while time.time() < end:
        time.sleep(0.02)
    if st.get("until_file"):  # hold until the test says so (bounded), for orderings load must not decide
        end = time.time() + 120
        while not Path(st["until_file"]).exists() and time.time() < end:
            time.sleep(0.02)
    if attempt < int(st.get("fail_times", 0)):
        print(f"{a.name}: transient failure on attempt {attempt}", flush=True)
        return 3
    if "exit" in st:
        print(f"{a.name}: exiting with code {st['exit']}", flush=True)
        return int(st["exit"])
    if st.get("no_manifest"):
        print(f"{a.name}: exiting 0 without committing", flush=True)
        return 0
    if rank not in (None, "0"):  # only node rank 0 commits a group's stage (as the real one: rank 0 writes)
        print(f"{a.name}: node rank {rank} done", flush=True)
        return 0
    from bezoar_jobs.errors import BezoarError
    from bezoar_jobs.manifest import CommitInfo, commit
    from bezoar_jobs.recipe import load_recipe
    from bezoar_jobs.registry import spec
    from bezoar_jobs.state import built_from, input_hashes, params_hash
    from bezoar_jobs.store import open_store

    try:
        recipe, _ = load_recipe(a.recipe)
        store = open_store(a.run)
        if a.shard:
            i, n = a.shard.split("/")
            store.write_text(f"{a.name}/_work/shard-{i}-of-{n}.done", "ok")
            print(f"{a.name}: shard {i}/{n} written", flush=True)
            return 0
        shards = int(st.get("shards", 0))
        missing = [i for i in range(shards) if not store.exists(f"{a.name}/_work/shard-{i}-of-{shards}.done")]
        if missing:
            print(f"{a.name}: shards not done: {missing}", flush=True)
            return 3
        inputs = input_hashes(store, a.name, recipe)  # as the runner: the recipe decides dynamic inputs
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            (out / "data").mkdir()
            (out / "data" / "rows.jsonl").write_text(json.dumps({"stage": a.name, "shards": shards}) + "\n")
            # a stage that reads the whole run (the report) records what it was built from, as the real one does
            extra = {"built_from": built_from(store)} if spec(a.name).reads_whole_run else {}
            commit(store, out, CommitInfo(stage=a.name, params_hash=params_hash(recipe, a.name), inputs=inputs,
                                          counts={"rows": 1}, timings={"seconds": 0.0}, extra=extra))
    except BezoarError as e:
        print(f"error: {e}", flush=True)
        return e.exit_code
    print(f"{a.name}: committed", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "fake-stage":
        sys.exit(fake_stage_main(sys.argv[2:]))
    print("usage: python k8s_harness.py fake-stage stage NAME --recipe R --run U [--shard i/N]", file=sys.stderr)
    sys.exit(64)
