"""A loopback Kubernetes API server that really runs Jobs, for tests and benchmarks.

There is no cluster on the test machines, so the controller's real ``kubernetes`` client talks to
this threaded HTTP server instead. It serves the part of the REST API the controller uses:

- ``/apis/batch/v1/namespaces/{ns}/jobs``: create, get, list (``labelSelector``), watch
  (``watch=true`` + ``resourceVersion``: newline-delimited JSON events over a chunked response,
  bookmarks, ``410 Gone`` for a compacted resourceVersion), delete (one, or a collection by label);
- ``/api/v1/namespaces/{ns}/pods``: list, get, watch; ``pods/{name}/log`` (``follow``, ``tailLines``);
- ``/apis/apps/v1/namespaces/{ns}/deployments/{name}`` (get) and ``.../scale`` (get, patch, replace).

Requests need the bearer token of the kubeconfig the harness writes (:attr:`FakeCluster.kubeconfig`),
so the client's real configuration loading is exercised too.

**Jobs really run.** For each created Job the harness plays the Job controller and the kubelet: it
creates pods and runs each pod's container as a LOCAL SUBPROCESS: the container's ``command``, or the
image entrypoint ``bezoar`` mapped to this virtualenv's ``bezoar`` console script, plus ``args`` with
``$(VAR)`` expanded from the container env as the kubelet does. The env is resolved the way the
kubelet would: ``secretKeyRef`` from the harness's own Secret store (:meth:`FakeCluster.add_secret`),
``fieldRef`` from the pod (``JOB_COMPLETION_INDEX`` from the completion-index annotation). Mounted
volumes become directories under the pod's temp root (secret volumes hold the Secret's files), and
env values that point into a mount are rewritten to the matching directory. Only ``PATH``,
``PYTHONPATH`` and locale variables come from the host, so a pod sees what its Job spec gives it and
no more (that is how the tests prove a spec carries its credentials). Not emulated: images (every
image runs this checkout), resource limits, ``readOnlyRootFilesystem``, the security context.

Job status follows the documented Job semantics (kubernetes.io, "Jobs"):

- a pod exiting 0 counts as succeeded; when ``completions`` are reached (every index, for an Indexed
  Job) the Job gets ``SuccessCriteriaMet`` and then ``Complete``;
- a failed pod is matched against ``podFailurePolicy`` rules in order: ``FailJob`` -> the Job fails
  at once with reason ``PodFailurePolicy`` (other pods are terminated); ``Ignore`` -> not counted,
  a replacement pod starts; ``Count`` or no match -> counted; more counted failures than
  ``backoffLimit`` -> ``FailureTarget`` then ``Failed`` with reason ``BackoffLimitExceeded``;
- ``activeDeadlineSeconds`` -> ``Failed`` with reason ``DeadlineExceeded``;
- ``suspend: true`` -> no pods until unsuspended; a Job carrying the Kueue queue label is admitted
  (unsuspended) after ``kueue_admit_delay`` seconds, as Kueue would once quota is free;
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import yaml

REPO = Path(__file__).resolve().parents[1]
TOKEN = "harness-token"
NODE = "harness-node"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


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
# A pod's process
# ---------------------------------------------------------------------------------------------
class _PodProc:
    def __init__(self, popen: subprocess.Popen, log_path: Path):
        self.popen = popen
        self.log_path = log_path
        self.exit_code: int | None = None
        self.done = threading.Event()
        self.started = time.time()


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
        kueue_admit_delay: float = 0.3,
        tick: float = 0.02,
        token: str = TOKEN,
        validate_jobs: bool = True,
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.entrypoints = entrypoints or default_entrypoints()
        self.extra_env = dict(extra_env or {})
        self.retry_delay = retry_delay
        self.kueue_admit_delay = kueue_admit_delay
        self.tick = tick
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
        self.errors: list[str] = []  # harness-internal failures (a test should never see one)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.server: ThreadingHTTPServer | None = None
        self.kubeconfig = self.workdir / "kubeconfig.yaml"

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> FakeCluster:
        handler = type("Handler", (_Handler,), {"cluster": self})
        self.server = _Server(("127.0.0.1", 0), handler)
        self.server.cluster = self
        self.server.daemon_threads = True
        t = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        t.start()
        tk = threading.Thread(target=self._ticker, daemon=True)
        tk.start()
        self._threads += [t, tk]
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
        if self.server:
            self.server.shutdown()
            self.server.server_close()
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

    def add_deployment(self, namespace: str, name: str, replicas: int = 0, ready_delay: float = 0.2) -> None:
        """A Deployment whose pods become ready ``ready_delay`` s after a scale-up (no process runs)."""
        with self.cond:
            obj = {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()), "generation": 1,
                             "creationTimestamp": now_iso(), "labels": {"app": name}},
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
                 and (job is None or o["metadata"]["labels"].get("job-name") == job)),
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
            group = {"Job": "batch", "Deployment": "apps"}.get(kind, "")
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
            spec.setdefault("backoffLimit", 6)
            spec.setdefault("completionMode", "NonIndexed")
            spec.setdefault("suspend", False)
            spec.setdefault("podReplacementPolicy", "Failed" if spec.get("podFailurePolicy") else "TerminatingOrFailed")
            sel = {"batch.kubernetes.io/controller-uid": uid}
            spec["selector"] = {"matchLabels": sel}
            tlabels = spec["template"].setdefault("metadata", {}).setdefault("labels", {})
            tlabels.update({"batch.kubernetes.io/controller-uid": uid, "controller-uid": uid,
                            "batch.kubernetes.io/job-name": name, "job-name": name})
            job["status"] = {}
            if spec["suspend"]:
                job["status"]["conditions"] = [self._cond("Suspended", "JobSuspended", "Job suspended")]
            self.job_state[uid] = {"counted_failures": 0, "succeeded": set(), "accounted": set(),
                                   "next_start": 0.0, "finishing": False, "admit_at": None, "started_pods": 0}
            self._put("Job", ns, job, "ADDED")
            self.timeline.append((arrived, "created", name))
            self._reconcile(job)
            return copy.deepcopy(self.objects[("Job", ns, name)])

    def _validate_job(self, name: str, body: dict[str, Any]) -> None:
        """What the API server would refuse: schema (strict), name, and the Job API's own rules."""
        if not re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", name) or len(name) > 63:
            raise ApiError(422, "Invalid", f'Job.batch "{name}" is invalid: metadata.name: must be a DNS-1123 label '
                                           "of at most 63 characters")
        if self.validate_jobs:
            import jsonschema

            err = jsonschema.exceptions.best_match(_job_validator(VALIDATE_VERSION).iter_errors(body))
            if err is not None:
                path = ".".join(str(p) for p in err.path)
                raise ApiError(422, "Invalid", f'Job.batch "{name}" is invalid: {path}: {err.message}')
        spec = body["spec"]
        pod = spec["template"]["spec"]
        pfp = spec.get("podFailurePolicy")
        if pfp:
            if pod.get("restartPolicy") != "Never":
                raise ApiError(422, "Invalid", f'Job.batch "{name}" is invalid: spec.template.spec.restartPolicy: '
                                               'only "Never" is supported when podFailurePolicy is specified')
            if spec.get("podReplacementPolicy", "Failed") != "Failed":
                raise ApiError(422, "Invalid", f'Job.batch "{name}" is invalid: spec.podReplacementPolicy: '
                                               'must be "Failed" when podFailurePolicy is used')
            names = {c["name"] for c in pod["containers"]}
            for i, rule in enumerate(pfp["rules"]):
                oe = rule.get("onExitCodes")
                if oe and oe.get("containerName") and oe["containerName"] not in names:
                    raise ApiError(422, "Invalid", f'Job.batch "{name}" is invalid: spec.podFailurePolicy.rules[{i}]'
                                                   ".onExitCodes.containerName: must be one of the container names")
                if oe and oe.get("operator") == "In" and 0 in oe.get("values", []):
                    raise ApiError(422, "Invalid", f'Job.batch "{name}" is invalid: spec.podFailurePolicy.rules[{i}]'
                                                   ".onExitCodes.values: 0 is not allowed for the In operator")
        if spec.get("completionMode") == "Indexed" and not spec.get("completions"):
            raise ApiError(422, "Invalid", f'Job.batch "{name}" is invalid: spec.completions: required for Indexed')

    def delete_job(self, ns: str, name: str, propagation: str = "Background") -> dict[str, Any]:
        with self.cond:
            job = self._get("Job", ns, name)
            job["metadata"]["deletionTimestamp"] = now_iso()
            self._put("Job", ns, job, "DELETED")
            self.timeline.append((time.time(), "deleted", name))
            uid = job["metadata"]["uid"]
            self.job_state.pop(uid, None)
            pods = [p for (k, pns, _), p in list(self.objects.items())
                    if k == "Pod" and pns == ns and p["metadata"]["labels"].get("controller-uid") == uid]
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
                if k == "Pod" and pns == ns and p["metadata"]["labels"].get("controller-uid") == uid]

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
                        elif kind == "Deployment":
                            self._deployment_tick(obj, now)
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
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        now = time.time()
        if spec.get("suspend"):
            labels = job["metadata"].get("labels", {})
            if "kueue.x-k8s.io/queue-name" in labels:
                if st["admit_at"] is None:
                    st["admit_at"] = now + self.kueue_admit_delay
                elif now >= st["admit_at"]:
                    # Kueue admits the workload: it unsuspends the Job.
                    spec["suspend"] = False
                    conds = [c for c in status.get("conditions", []) if c["type"] != "Suspended"]
                    conds.append(self._cond("Suspended", "JobResumed", "Job resumed", status="False"))
                    status["conditions"] = conds
                    self.timeline.append((now, "admitted", name))
                    self._put("Job", ns, job, "MODIFIED")
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
        # 3. success
        if len(st["succeeded"]) >= completions:
            self._complete(job)
            return
        # 4. start pods (podReplacementPolicy Failed: only once the failed pod has terminated,
        #    which a harness pod always has by the time it is accounted)
        active = [p for p in pods if p["status"].get("phase") in ("Pending", "Running")]
        if now >= st["next_start"]:
            if indexed:
                busy = {int(p["metadata"]["annotations"][COMPLETION_INDEX]) for p in active}
                todo = [i for i in range(completions) if i not in st["succeeded"] and i not in busy]
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

    # -- the kubelet ----------------------------------------------------------------------------
    def _create_pod(self, job: dict[str, Any], index: int | None) -> None:
        ns, jname = job["metadata"]["namespace"], job["metadata"]["name"]
        tmpl = copy.deepcopy(job["spec"]["template"])
        suffix = uuid.uuid4().hex[:5]
        name = f"{jname}-{index}-{suffix}" if index is not None else f"{jname}-{suffix}"
        meta = tmpl.get("metadata", {})
        labels = dict(meta.get("labels", {}))
        annotations = dict(meta.get("annotations", {}))
        if index is not None:
            annotations[COMPLETION_INDEX] = str(index)
            labels[COMPLETION_INDEX] = str(index)
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name, "namespace": ns, "uid": str(uuid.uuid4()), "labels": labels, "annotations": annotations,
                "creationTimestamp": now_iso(),
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": jname,
                                     "uid": job["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}],
            },
            "spec": {**tmpl["spec"], "nodeName": NODE},
            "status": {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now_iso()}]},
        }
        self.job_state[job["metadata"]["uid"]]["started_pods"] += 1
        self._put("Pod", ns, pod, "ADDED")
        self.timeline.append((time.time(), "pod", name))
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
        logf = open(log_path, "wb")  # handed to the child, closed by the watcher thread
        try:
            popen = subprocess.Popen(argv, env=env, cwd=cwd, stdout=logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            # what containerd reports when the entrypoint cannot be executed: the container
            # terminates at once with exit code 128 (StartError) and, restartPolicy Never, the pod fails
            logf.close()
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
            "phase": "Running", "startTime": started, "hostIP": "127.0.0.1", "podIP": "127.0.0.1",
            "containerStatuses": [{"name": c["name"], "image": c["image"], "imageID": f"harness://{c['image']}",
                                   "containerID": f"harness://{popen.pid}", "ready": True, "started": True,
                                   "restartCount": 0, "state": {"running": {"startedAt": started}}}],
        })
        pod["status"]["conditions"] += [
            {"type": t, "status": "True", "lastTransitionTime": started}
            for t in ("Initialized", "ContainersReady", "Ready")
        ]
        self._put("Pod", ns, pod, "MODIFIED")
        threading.Thread(target=self._wait_pod, args=(ns, name, pod["metadata"]["uid"], proc, logf, started),
                         daemon=True).start()

    def _wait_pod(self, ns: str, name: str, uid: str, proc: _PodProc, logf: Any, started: str) -> None:
        try:
            self._pod_exited(ns, name, uid, proc, logf, started)
        except Exception as e:
            self._record_error(f"pod {name}", e)
            proc.done.set()

    def _pod_exited(self, ns: str, name: str, uid: str, proc: _PodProc, logf: Any, started: str) -> None:
        rc = proc.popen.wait()
        logf.close()
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
                owner = pod["metadata"]["ownerReferences"][0]["name"]
                job = self.objects.get(("Job", ns, owner))
                if job is not None:
                    self._reconcile(job)
            proc.done.set()
            self.cond.notify_all()

    def _container_process(self, pod: dict[str, Any]) -> tuple[list[str], dict[str, str], str]:
        """argv, env and cwd for the pod's (first) container, resolved as the kubelet would."""
        ns = pod["metadata"]["namespace"]
        c = pod["spec"]["containers"][0]
        root = self.workdir / "pods" / pod["metadata"]["name"]
        root.mkdir(parents=True, exist_ok=True)
        mounts: dict[str, Path] = {}
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        for m in c.get("volumeMounts", []):
            host = root / m["mountPath"].lstrip("/")
            host.mkdir(parents=True, exist_ok=True)
            vol = volumes.get(m["name"])
            if vol is None:
                raise ContainerConfigError(f'volume "{m["name"]}" is mounted but not defined')
            if "secret" in vol:
                data = self.secrets.get((ns, vol["secret"]["secretName"]))
                if data is None:
                    raise ContainerConfigError(f'secret "{vol["secret"]["secretName"]}" not found')
                items = vol["secret"].get("items") or [{"key": k, "path": k} for k in data]
                for it in items:
                    if it["key"] not in data:
                        raise ContainerConfigError(
                            f'couldn\'t find key {it["key"]} in Secret {ns}/{vol["secret"]["secretName"]}')
                    f = host / it["path"]
                    f.write_text(data[it["key"]])
                    f.chmod(it.get("mode", vol["secret"].get("defaultMode", 0o644)) | 0o400)
            mounts[m["mountPath"].rstrip("/") or "/"] = host
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
        # Paths into mounted volumes point at the pod's directories on this machine.
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
        return argv, {**host_env, **env, **self.extra_env}, str(root)

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
]
_LIST_KIND = {"Job": ("JobList", "batch/v1"), "Pod": ("PodList", "v1")}


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
            prop = (body or {}).get("propagationPolicy") or q.get("propagationPolicy", "Background")
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
            prop = (body or {}).get("propagationPolicy") or q.get("propagationPolicy", "Background")
            self._send_json(200, c.delete_job(ns, name, prop))
        else:
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on a job here")

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
        tail = int(q["tailLines"]) if "tailLines" in q else None
        if not follow:
            text = proc.log_path.read_bytes()
            if tail is not None:
                text = b"".join(text.splitlines(keepends=True)[-tail:]) if tail else b""
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)
            return
        self._start_stream("text/plain")
        try:
            with open(proc.log_path, "rb") as f:
                if tail is not None:
                    lines = f.read().splitlines(keepends=True)
                    self._chunk(b"".join(lines[-tail:]) if tail else b"")
                while not c._stopping.is_set():
                    finished = proc.done.is_set()
                    data = f.read()
                    self._chunk(data)
                    if finished and not data:
                        break
                    if not data:
                        proc.done.wait(0.02)
            self._end_stream()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _r_deployment(self, method: str, q: dict[str, str], body: Any, ns: str, name: str) -> None:
        if method != "GET":
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on deployments here")
        with self.cluster.lock:
            self._send_json(200, copy.deepcopy(self.cluster._get("Deployment", ns, name)))

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

    # -- list and watch -------------------------------------------------------------------------
    def _list_or_watch(self, kind: str, ns: str, q: dict[str, str]) -> None:
        c = self.cluster
        sel = q.get("labelSelector")
        list_kind, api_version = _LIST_KIND[kind]
        if q.get("watch") not in ("true", "1"):
            with c.lock:
                items = [copy.deepcopy(o) for (k, ons, _), o in sorted(c.objects.items())
                         if k == kind and ons == ns and selector_matches(sel, o["metadata"].get("labels"))]
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
    unsharded run requires all N shard markers).
    """
    path.write_text(json.dumps(plan))
    return {"BEZOAR_FAKE_PLAN": str(path)}


def fake_calls(plan_path: Path) -> list[dict[str, Any]]:
    """Every fake-stage invocation so far, in order."""
    calls = plan_path.with_suffix(".calls.jsonl")
    if not calls.exists():
        return []
    return [json.loads(line) for line in calls.read_text().splitlines() if line.strip()]


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
    a = p.parse_args(argv)
    plan_path = Path(os.environ["BEZOAR_FAKE_PLAN"]) if os.environ.get("BEZOAR_FAKE_PLAN") else None
    plan = json.loads(plan_path.read_text()) if plan_path else {}
    st = plan.get(a.name, {})
    attempt = 0
    if plan_path:
        attempt = sum(1 for c in fake_calls(plan_path) if c["stage"] == a.name and c["shard"] == a.shard)
        with open(plan_path.with_suffix(".calls.jsonl"), "a") as f:
            f.write(json.dumps({"stage": a.name, "shard": a.shard, "pid": os.getpid(), "time": time.time(),
                                "attempt": attempt}) + "\n")
    for line in st.get("log", [f"{a.name}: starting (attempt {attempt})"]):
        print(line, flush=True)
    for name in st.get("require_env", []):
        if not os.environ.get(name):
            print(f"error: environment variable {name} is not set", flush=True)
            return 2
    for name in st.get("require_files_env", []):
        fp = os.environ.get(name)
        if not fp or not Path(fp).is_file():
            print(f"error: {name} does not point at a readable file ({fp})", flush=True)
            return 2
    end = time.time() + float(st.get("sleep", 0))
    while time.time() < end:
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
        inputs = input_hashes(store, a.name)
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
