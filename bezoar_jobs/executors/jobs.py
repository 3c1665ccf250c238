"""The Job builder: one pure function from (stage, run, cluster settings) to a batch/v1 Job.

Nothing here talks to a cluster. The controller (:mod:`bezoar_jobs.executors.kubernetes`) calls
:func:`build_job` at run time and ``bezoar render`` writes the same objects to YAML files
(:func:`render`), so a Job applied by hand with kubectl and a Job the controller creates are the
same object. This module imports neither the Kubernetes client nor any machine-learning library.

What a stage Job looks like (and why):

- **Name** ``bz-<run>-<stage>``: deterministic, so a restarted controller finds (and adopts) the
  Jobs of its run instead of starting them twice. ``<run>`` is the run id made DNS-safe and
  shortened with a hash suffix (:func:`short_run_id`) so that every name of the run, the longest
  suffix included, fits the 63 characters of a label value. The full run id is kept in the
  ``bezoar.dev/run-id`` annotation.
- **Labels**: the ``app.kubernetes.io/*`` set plus ``bezoar.dev/run`` (the short run id: the
  controller's watch and ``bezoar cancel`` select on it) and ``bezoar.dev/stage``.
- **Command**: the image entrypoint is ``bezoar``; the container's args are exactly
  ``stage NAME --recipe <run>/recipe.yaml --run <run>``. The controller froze the recipe into the run
  first, so every pod of the run reads the same recipe.
- **Failure semantics** (the stage contract: exit 0 committed, 2 bad input, other retryable):
  ``restartPolicy: Never`` and a ``podFailurePolicy`` whose rules are, in order, *FailJob* when the
  stage container exits 2 (a retry cannot fix bad input) and *Ignore* when the pod was disrupted
  (``DisruptionTarget``: preemption, eviction, node drain: not the stage's fault, so it does not
  use up ``backoffLimit``). Everything else counts against ``backoffLimit``.
  ``podReplacementPolicy: Failed`` waits for a failed pod to be fully gone before its replacement
  starts, so two pods of one stage never write the same ``_work/`` at once.
- **Distributed training** (``nodes`` x ``processesPerNode`` > 1 for a training stage): an Indexed Job
  of one pod per node plus a headless Service, or a JobSet / TrainJob (:mod:`bezoar_jobs.executors.distributed`).
- **Sharded generation** (``generationShards`` > 1): a generate stage runs as an Indexed Job with
  ``completions = generationShards`` whose pods run ``... --shard $(JOB_COMPLETION_INDEX)/N`` and only
  write ``<run>/<stage>/_work/``; then the controller runs the *commit* Job
  ``bz-<run>-<stage>-commit`` (the same command without ``--shard``), which finds every shard's
  records, deduplicates and commits. ``build_job(..., phase="commit")`` builds it.
- **Hardened pod** (the restricted Pod Security profile): non-root UID/GID 10001,
  ``seccompProfile: RuntimeDefault``, no privilege escalation, all capabilities dropped, read-only
  root filesystem with writable ``emptyDir`` volumes for ``/tmp``, ``/scratch`` and ``/cache``
  (``HOME``, ``HF_HOME``, ``BEZOAR_CACHE``; or the ``storage.cacheVolume`` PVC), each sized by
  ``ephemeralStorage`` (``auto``: from the model, :mod:`bezoar_jobs.executors.sizing`), a
  memory-backed ``/dev/shm`` (``shmSize``), and no service-account token (stages never talk to the
  API server). ``storage.runVolume`` adds the PVC of an in-cluster run store at its mount path.
- **Secrets by reference, and only where used**: the S3 credentials file is mounted read-only
  (``AWS_SHARED_CREDENTIALS_FILE``), the Hugging Face token into every stage but the report
  (``HF_TOKEN_PATH``), and each API key only into the stages whose recipe endpoints name it, as the
  file ``/var/run/secrets/bezoar/keys/<ENV>`` (``BEZOAR_KEYS_DIR``; :mod:`bezoar_jobs.llm.keys`
  reads it there). No secret is an environment variable of a pod spec, and no value is in a Job.
- **The cluster's teacher**: the stages that call the teacher get ``BEZOAR_TEACHER_URL`` /
  ``BEZOAR_TEACHER_BACKEND`` (which override the recipe's endpoint, :mod:`bezoar_jobs.cluster_env`)
  and their share of its capacity (``BEZOAR_TEACHER_CAPACITY`` / ``BEZOAR_TEACHER_PARTIES``,
  :mod:`bezoar_jobs.llm.budget`).
- **No silent CPU**: a pod that requests GPUs carries ``BEZOAR_GPUS``; a stage that then finds no
  usable CUDA device exits 2 naming the driver and CUDA versions (:mod:`bezoar_jobs.device_check`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from .. import __version__
from ..errors import BadInput
from .cluster import ALL_STAGES, IMAGE_OF_FAMILY, ClusterSettings, stage_family
from .distributed import group_job_spec, group_objects, is_group, is_multiprocess, job_master, launch_flags
from .pod import (  # the pod's pieces, re-exported for the modules that name them here
    CACHE_DIR,
    COMPLETION_INDEX_ANNOTATION,
    CONTAINER,
    HF_SECRET_DIR,
    KEYS_DIR,
    RUN_UID,
    S3_SECRET_DIR,
    SCRATCH_DIR,
    SHM_DIR,
    TMP_DIR,
    keys_for,
    pod_spec,
    stage_args,
    stage_endpoints,
    uses_hub,
)

if TYPE_CHECKING:
    from ..recipe import Recipe

__all__ = [
    "CACHE_DIR", "COMPLETION_INDEX_ANNOTATION", "CONTAINER", "HF_SECRET_DIR", "KEYS_DIR", "RUN_UID", "S3_SECRET_DIR",
    "SCRATCH_DIR", "SHM_DIR", "TMP_DIR", "build_job", "build_stage_jobs", "image_ref", "job_name", "keys_for",
    "render", "render_jobs", "run_id_from_uri", "run_selector", "short_run_id", "stage_args", "stage_endpoints",
    "stage_labels", "uses_hub",
]

# ---------------------------------------------------------------------------------------------
# Names and labels
# ---------------------------------------------------------------------------------------------
NAME_PREFIX = "bz-"
COMMIT_SUFFIX = "-commit"
MAX_NAME = 63
# Room for the longest stage name plus the commit suffix: every Job name of a run then fits.
_LONGEST_SUFFIX = max(len(s) for s in ALL_STAGES) + len(COMMIT_SUFFIX)
RUN_ID_BUDGET = MAX_NAME - len(NAME_PREFIX) - 1 - _LONGEST_SUFFIX  # 37 characters

LABEL_RUN = "bezoar.dev/run"
LABEL_STAGE = "bezoar.dev/stage"
LABEL_PHASE = "bezoar.dev/phase"
ANNOTATION_RUN_ID = "bezoar.dev/run-id"
ANNOTATION_RUN_URI = "bezoar.dev/run-uri"
ANNOTATION_CONTROLLER = "bezoar.dev/controller-uid"  # the controller Job that created it (retry-safe failures)
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
MANAGED_BY = "bezoar-controller"
PART_OF = "bezoar-jobs"  # the same app.kubernetes.io labels as the chart (helm/openbezoar/templates/_helpers.tpl)
APP_NAME = "openbezoar"

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")

Phase = Literal["main", "commit"]


def run_id_from_uri(run_uri: str) -> str:
    """The run id a run URI implies: its last path component (``s3://b/runs/r1`` -> ``r1``)."""
    tail = str(run_uri).rstrip("/").rsplit("/", 1)[-1]
    if not tail or tail.endswith(":"):
        raise BadInput(f"run URI {run_uri!r} has no last path component to use as the run id: pass --run-id")
    return tail


def short_run_id(run_id: str) -> str:
    """A DNS-1123-label form of ``run_id`` of at most ``RUN_ID_BUDGET`` (37) characters.

    An id that is already a short lowercase DNS label is used as it is (``r1`` stays ``r1``). Any
    other id (too long, upper case, underscores, ...) is sanitised, cut, and given an 8-hex-digit
    suffix of the sha256 of the *full* id, so two different ids never share Job names (``Run_1``
    and ``run-1`` differ).
    """
    if not run_id or not run_id.strip():
        raise BadInput("the run id is empty (pass --run-id, or a run URI whose last component names the run)")
    clean = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")
    clean = re.sub(r"-{2,}", "-", clean)
    if clean == run_id and len(clean) <= RUN_ID_BUDGET:
        return clean
    digest = hashlib.sha256(run_id.encode("utf-8")).hexdigest()[:8]
    head = clean[: RUN_ID_BUDGET - len(digest) - 1].rstrip("-")
    return f"{head}-{digest}" if head else f"r-{digest}"


def job_name(stage: str, run_id: str, phase: Phase = "main") -> str:
    """``bz-<short run id>-<stage>`` (``-commit`` for a sharded stage's commit Job)."""
    stage_family(stage)
    name = f"{NAME_PREFIX}{short_run_id(run_id)}-{stage}" + (COMMIT_SUFFIX if phase == "commit" else "")
    assert len(name) <= MAX_NAME, name  # guaranteed by RUN_ID_BUDGET
    return name


def run_selector(run_id: str) -> str:
    """The label selector matching every Job (and pod) of a run."""
    return f"{LABEL_RUN}={short_run_id(run_id)}"


def _label_safe(v: str) -> str:
    v = re.sub(r"[^A-Za-z0-9_.-]+", "-", v)[:63].strip("-_.")
    return v if _LABEL_VALUE.match(v) else ""


def is_sharded(stage: str, cluster: ClusterSettings) -> bool:
    """Whether ``stage`` runs as shards (an Indexed Job) plus a commit Job."""
    return stage.startswith("generate-") and cluster.generationShards > 1


def stage_labels(stage: str, run_id: str, cluster: ClusterSettings, phase: Phase = "main") -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/instance": short_run_id(run_id),
        "app.kubernetes.io/component": f"stage-{stage_family(stage)}",
        "app.kubernetes.io/part-of": PART_OF,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/version": _label_safe(cluster.images.tag) or _label_safe(__version__),
        LABEL_RUN: short_run_id(run_id),
        LABEL_STAGE: stage,
        # main: the stage's one Job; shards: a sharded stage's Indexed Job; commit: its commit Job
        LABEL_PHASE: "commit" if phase == "commit" else ("shards" if is_sharded(stage, cluster) else "main"),
    }
    if cluster.kueue.queueName:
        labels[KUEUE_QUEUE_LABEL] = cluster.kueue.queueName
    return labels


# ---------------------------------------------------------------------------------------------
# The pod
# ---------------------------------------------------------------------------------------------
def image_ref(stage: str, cluster: ClusterSettings, image_digests: Mapping[str, str] | None = None) -> str:
    """``registry/name:tag``, or ``registry/name@sha256:...`` when a digest is pinned: in
    ``image_digests`` (family -> digest, e.g. from ``bezoar render --image-digest``) or in the
    settings' ``images.digests``."""
    family = IMAGE_OF_FAMILY[stage_family(stage)]
    repo = cluster.image_for(stage)
    digest = (image_digests or {}).get(family) or cluster.digest_for(stage)
    if digest:
        if not _DIGEST.match(digest):
            raise BadInput(f"image digest for the {family} image: {digest!r} is not sha256:<64 hex digits>")
        return f"{repo}@{digest}"
    return f"{repo}:{cluster.images.tag}"


def _scanner_skips(stage: str, cluster: ClusterSettings, image_digests: Mapping[str, str] | None) -> dict[str, str]:
    """checkov skip annotations (``checkov.io/skipN: CHECK=reason``) for the deliberate choices
    that a policy scanner flags, each only while the choice is in effect, so a scan of rendered
    Jobs (manifests/, ``bezoar render``) fails on anything else."""
    reasons = []
    if not ((image_digests or {}).get(IMAGE_OF_FAMILY[stage_family(stage)]) or cluster.digest_for(stage)):
        reasons.append("CKV_K8S_43=pinned by release tag (images are built once per release); "
                       "set images.digests to pin by digest")
    if cluster.images.pullPolicy != "Always":
        reasons.append(f"CKV_K8S_15={cluster.images.pullPolicy} with a release tag or digest that is never rebuilt")
    return {f"checkov.io/skip{i}": r for i, r in enumerate(reasons, start=1)}


# ---------------------------------------------------------------------------------------------
# The Job
# ---------------------------------------------------------------------------------------------
def build_job(
    stage: str,
    run_uri: str,
    run_id: str,
    cluster: ClusterSettings,
    image_digests: Mapping[str, str] | None = None,
    *,
    phase: Phase = "main",
    recipe: Recipe | None = None,
    controller_uid: str | None = None,
    parties: int | None = None,
) -> dict[str, Any]:
    """The batch/v1 Job (a plain dict) that runs ``stage`` of the run at ``run_uri``.

    ``image_digests`` maps a family (``data``/``train``/``eval``) to ``sha256:...`` to pin images
    by digest (beside ``images.digests`` of the settings). ``phase="commit"`` builds the unsharded
    commit Job of a sharded generate stage; for an unsharded stage the main Job already commits and
    ``commit`` is refused. ``recipe`` (the run's) decides which API keys the pods get and sizes
    ``ephemeralStorage: auto``; ``controller_uid`` (the in-cluster controller Job's uid) is recorded
    so a retried controller recognises a failure of its own run attempt. ``parties``: how many pods of the
    run call the teacher's server at once (``BEZOAR_TEACHER_PARTIES``; the controller counts its run's
    selection); None: as many as any run of the recipe could have (a manifest applied by hand).
    """
    stage_family(stage)  # refuses an unknown stage
    sharded = is_sharded(stage, cluster)
    if phase == "commit" and not sharded:
        raise BadInput(f"{stage}: only a sharded generate stage (generationShards > 1) has a commit Job")
    if not run_uri:
        raise BadInput("the run URI is empty")
    shards = cluster.generationShards if sharded and phase == "main" else 1
    sched = cluster.scheduling_for(stage)
    group = is_group(stage, cluster)
    name = job_name(stage, run_id, phase)
    h = recipe.evaluation.harness if recipe is not None and stage == "eval-harness" else None
    # hf on a CPU pod (no GPUs): data_parallel_size gloo processes; on GPUs one per process, as vllm needs them
    if h is not None and h.gpus > sched.gpus and (h.backend == "vllm" or sched.gpus > 0):
        raise BadInput(f"evaluation.harness: data_parallel_size x tensor_parallel_size = {h.gpus} GPUs, but the "
                       f"eval-harness pod gets {sched.gpus} (scheduling.eval.gpus or stageOverrides.eval-harness.gpus)")
    labels = stage_labels(stage, run_id, cluster, phase)
    # Pods carry the same labels except the Kueue one (Kueue reads it from the Job).
    pod_labels = {k: v for k, v in labels.items() if k != KUEUE_QUEUE_LABEL}
    annotations = {ANNOTATION_RUN_ID: run_id, ANNOTATION_RUN_URI: run_uri.rstrip("/")}
    job_annotations = {**annotations, **_scanner_skips(stage, cluster, image_digests)}
    if controller_uid:
        job_annotations[ANNOTATION_CONTROLLER] = controller_uid
    spec: dict[str, Any] = {
        "backoffLimit": sched.backoffLimit,
        "activeDeadlineSeconds": sched.activeDeadlineSeconds,
        "ttlSecondsAfterFinished": cluster.jobs.ttlSecondsAfterFinished,
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": {
            "rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [2]}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]
        },
        "template": {
            "metadata": {"labels": pod_labels, "annotations": dict(annotations)},
            "spec": pod_spec(stage, run_uri, cluster, image_ref(stage, cluster, image_digests), shards, recipe,
                             launch=launch_flags(stage, cluster, job_master(name))
                             if is_multiprocess(stage, cluster) else None, parties=parties),
        },
    }
    if group:  # a training stage on several processes: an Indexed Job, pod i = node rank i (distributed.py)
        group_job_spec(spec, stage, cluster, name)
    elif shards > 1:
        spec["completionMode"] = "Indexed"
        spec["completions"] = shards
        spec["parallelism"] = min(shards, sched.parallelism or shards)
    else:
        spec["completions"] = 1
        spec["parallelism"] = 1
    if cluster.kueue.queueName:
        # Kueue admits the Job by unsuspending it once the queue has quota for it.
        spec["suspend"] = True
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": cluster.namespace,
            "labels": labels,
            "annotations": job_annotations,
        },
        "spec": spec,
    }


def build_stage_jobs(
    stage: str, run_uri: str, run_id: str, cluster: ClusterSettings, image_digests: Mapping[str, str] | None = None,
    recipe: Recipe | None = None,
) -> list[dict[str, Any]]:
    """Every Job a stage runs, in order: one, or for a sharded stage the shards then the commit."""
    jobs = [build_job(stage, run_uri, run_id, cluster, image_digests, recipe=recipe)]
    if is_sharded(stage, cluster):
        jobs.append(build_job(stage, run_uri, run_id, cluster, image_digests, phase="commit", recipe=recipe))
    return jobs


# ---------------------------------------------------------------------------------------------
# bezoar render
# ---------------------------------------------------------------------------------------------
class _Dumper(yaml.SafeDumper):
    """Block-style YAML with multi-line strings kept readable."""


def _str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str_presenter)


def to_yaml(objs: list[dict[str, Any]]) -> str:
    """Kubernetes objects as one multi-document YAML text (stable key order: as built)."""
    return "---\n".join(yaml.dump(o, Dumper=_Dumper, sort_keys=False, default_flow_style=False) for o in objs)


def render_jobs(
    run_uri: str,
    run_id: str | None,
    cluster: ClusterSettings,
    image_digests: Mapping[str, str] | None = None,
    stages: tuple[str, ...] = ALL_STAGES,
    recipe: Recipe | None = None,
) -> dict[str, str]:
    """``{file name: YAML}`` for the given stages (default: all 14 canonical stages)."""
    rid = run_id or run_id_from_uri(run_uri)
    out = {}
    for s in stages:
        objs = build_stage_jobs(s, run_uri, rid, cluster, image_digests, recipe)
        if is_group(s, cluster):  # a training group: Service + Indexed Job, or a JobSet / TrainJob
            objs = group_objects(objs[0], s, cluster)
        out[f"{s}.yaml"] = to_yaml(objs)
    return out


def render(
    run_uri: str,
    run_id: str | None,
    cluster: ClusterSettings,
    out_dir: str | Path,
    image_digests: Mapping[str, str] | None = None,
    recipe_text: str | None = None,
    recipe_source: str = "<recipe>",
) -> list[Path]:
    """``bezoar render``: write one YAML file per canonical stage (all 14) into ``out_dir``.

    ``<stage>.yaml`` holds the stage's Job; for a sharded generate stage it holds two Jobs, the
    shards then the commit Job (apply the second once the first is Complete). The recipe does not
    change what the pods run (they read the copy frozen into ``<run>/recipe.yaml``), only which API
    keys each stage's pods get and the ``auto`` disk sizes; an invalid recipe is refused. Applying
    these files by hand needs that frozen copy in place first: the controller writes it; by hand,
    upload the recipe to ``<run>/recipe.yaml``. Returns the paths written, in canonical order.
    """
    recipe = None
    if recipe_text is not None:
        from ..recipe import parse_recipe

        recipe = parse_recipe(recipe_text, recipe_source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_jobs(run_uri, run_id, cluster, image_digests, recipe=recipe).items():
        path = out / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
