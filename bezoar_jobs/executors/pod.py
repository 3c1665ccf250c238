"""The stage pod of a Job (:mod:`bezoar_jobs.executors.jobs` builds the Job around it): container,
environment, volumes, resources and the hardened security context. Pure functions of (stage, run,
cluster settings, recipe); nothing here talks to a cluster."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..layout import RECIPE_FILE
from ..registry import spec
from .cluster import ClusterSettings
from .scheduler import cluster_parties, on_teacher_server
from .sizing import ephemeral_storage

if TYPE_CHECKING:
    from ..recipe import Recipe
    from ..recipe_base import Endpoint

CONTAINER = "stage"  # the podFailurePolicy's exit-code rule names this container
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
RUN_UID = 10001  # the images' non-root user

# Where things live inside a stage pod.
S3_SECRET_DIR = "/var/run/secrets/bezoar/s3"
HF_SECRET_DIR = "/var/run/secrets/bezoar/hf"
KEYS_DIR = "/var/run/secrets/bezoar/keys"
SCRATCH_DIR = "/scratch"
CACHE_DIR = "/cache"
TMP_DIR = "/tmp"
SHM_DIR = "/dev/shm"


def stage_args(stage: str, run_uri: str, shards: int = 1) -> list[str]:
    """The container args (the image entrypoint is ``bezoar``): exactly the stage contract's command."""
    run = run_uri.rstrip("/")
    args = ["stage", stage, "--recipe", f"{run}/{RECIPE_FILE}", "--run", run]
    if shards > 1:
        # $(VAR) is expanded by the kubelet from the container's env (JOB_COMPLETION_INDEX below).
        args += ["--shard", f"$(JOB_COMPLETION_INDEX)/{shards}"]
    return args


def stage_endpoints(stage: str, recipe: Recipe) -> list[Endpoint]:
    """The recipe endpoints (teacher, judge) the stage calls, from its registry ``needs``."""
    st = spec(stage)
    out: list[Endpoint] = []
    if "teacher" in st.needs:
        out.append(recipe.teacher)
    if "judge" in st.needs:
        section = getattr(recipe.evaluation, st.evaluation, None) if st.evaluation else None
        out.append(getattr(section, "judge", None) or recipe.judge)
    return out


def keys_for(stage: str, cluster: ClusterSettings, recipe: Recipe | None) -> list[str]:
    """Env names of the API keys (``secrets.apiKeys`` with a Secret) the stage's pods get: the ones its
    endpoints name (``api_key_env``, or an ``api_key_file`` under the keys directory). Without a
    recipe: every key, for the stages that call a teacher or judge at all."""
    available = [k.env for k in cluster.secrets.apiKeys if k.name]
    if recipe is None:
        return available if spec(stage).needs else []
    named: set[str] = set()
    for ep in stage_endpoints(stage, recipe):
        if ep.backend == "local":
            continue
        if ep.api_key_env:
            named.add(ep.api_key_env)
        if ep.api_key_file and ep.api_key_file.startswith(KEYS_DIR + "/"):
            named.add(ep.api_key_file[len(KEYS_DIR) + 1:])
    return [e for e in available if e in named]


def uses_hub(stage: str) -> bool:
    """Whether the stage may download from the Hugging Face Hub (models, datasets): all but the report,
    which only reads the run."""
    return not spec(stage).reads_whole_run


def _env(stage: str, cluster: ClusterSettings, indexed: bool, keys: list[str],
         recipe: Recipe | None = None, parties: int | None = None) -> list[dict[str, Any]]:
    st, sec = cluster.storage, cluster.secrets
    env: list[dict[str, Any]] = [
        {"name": "PYTHONUNBUFFERED", "value": "1"},  # log lines reach `kubectl logs` (and the controller) at once
        {"name": "AWS_REGION", "value": st.s3Region},
    ]
    if st.s3EndpointUrl:
        env.append({"name": "BEZOAR_S3_ENDPOINT_URL", "value": st.s3EndpointUrl})
    if st.s3AddressingStyle:
        env.append({"name": "BEZOAR_S3_ADDRESSING_STYLE", "value": st.s3AddressingStyle})
    if st.s3Checksums:
        env.append({"name": "BEZOAR_S3_CHECKSUMS", "value": st.s3Checksums})
    if sec.s3.name:
        env.append({"name": "AWS_SHARED_CREDENTIALS_FILE", "value": f"{S3_SECRET_DIR}/{sec.s3.credentialsFileKey}"})
    if sec.hfToken.name and uses_hub(stage):
        env.append({"name": "HF_TOKEN_PATH", "value": f"{HF_SECRET_DIR}/{sec.hfToken.key}"})
    if keys:
        env.append({"name": "BEZOAR_KEYS_DIR", "value": KEYS_DIR})
    t = cluster.teacher
    # a filter or MT-Bench whose judge is the teacher's server (the recipe says) takes a share of its capacity as
    # the generate stages do (executors/scheduler.py on_teacher_server)
    judge_party = (recipe is not None and "teacher" not in spec(stage).needs
                   and stage in on_teacher_server(recipe, t.url or None, {}))
    if "teacher" in spec(stage).needs or judge_party:
        if t.url:
            env.append({"name": "BEZOAR_TEACHER_URL", "value": t.url})
        if t.backend:
            env.append({"name": "BEZOAR_TEACHER_BACKEND", "value": t.backend})
        if t.discovery:
            env.append({"name": "BEZOAR_TEACHER_DISCOVERY", "value": t.discovery})
        if t.maxConcurrentRequests:
            env.append({"name": "BEZOAR_TEACHER_CAPACITY", "value": str(t.maxConcurrentRequests)})
        env.append({"name": "BEZOAR_TEACHER_PARTIES", "value": str(parties or cluster_parties(cluster, recipe))})
    elif "judge" in spec(stage).needs:  # where the teacher is, for a judge pointed at it (its replicas: llm/fleet.py)
        if t.url:
            env.append({"name": "BEZOAR_TEACHER_URL", "value": t.url})
        if t.discovery:
            env.append({"name": "BEZOAR_TEACHER_DISCOVERY", "value": t.discovery})
    gpus = cluster.scheduling_for(stage).gpus
    if gpus:
        # the pod asked for GPUs: a stage that cannot use CUDA exits 2 instead of training on CPU
        env.append({"name": "BEZOAR_GPUS", "value": str(gpus)})
    env += [
        {"name": "BEZOAR_SCRATCH", "value": SCRATCH_DIR},
        {"name": "HOME", "value": CACHE_DIR},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "BEZOAR_CACHE", "value": f"{CACHE_DIR}/bezoar"},
        {"name": "TMPDIR", "value": TMP_DIR},
    ]
    if indexed:
        # The Job controller injects this too; declaring it makes the $(JOB_COMPLETION_INDEX) in
        # the args explicit and keeps the spec readable on its own.
        env.append(
            {
                "name": "JOB_COMPLETION_INDEX",
                "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}},
            }
        )
    return env


def _secret_volume(name: str, secret: str, key: str) -> dict[str, Any]:
    # owner root, group fsGroup, 0440: readable by the stage user only
    return {"name": name, "secret": {"secretName": secret, "items": [{"key": key, "path": key}], "defaultMode": 0o440}}


def _volumes(stage: str, cluster: ClusterSettings, disk: str,
             keys: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    sched = cluster.scheduling_for(stage)
    sec, st = cluster.secrets, cluster.storage
    cache: dict[str, Any] = (
        {"name": "cache", "persistentVolumeClaim": {"claimName": st.cacheVolume.claimName}}
        if st.cacheVolume.claimName else {"name": "cache", "emptyDir": {"sizeLimit": disk}}
    )
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
        {"name": "scratch", "emptyDir": {"sizeLimit": disk}},
        cache,
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": sched.shmSize}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "tmp", "mountPath": TMP_DIR},
        {"name": "scratch", "mountPath": SCRATCH_DIR},
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "dshm", "mountPath": SHM_DIR},
    ]
    if st.runVolume.claimName:
        volumes.append({"name": "runs", "persistentVolumeClaim": {"claimName": st.runVolume.claimName}})
        mounts.append({"name": "runs", "mountPath": st.runVolume.mountPath})
    if sec.s3.name:
        volumes.append(_secret_volume("s3-credentials", sec.s3.name, sec.s3.credentialsFileKey))
        mounts.append({"name": "s3-credentials", "mountPath": S3_SECRET_DIR, "readOnly": True})
    if sec.hfToken.name and uses_hub(stage):
        volumes.append(_secret_volume("hf-token", sec.hfToken.name, sec.hfToken.key))
        mounts.append({"name": "hf-token", "mountPath": HF_SECRET_DIR, "readOnly": True})
    if keys:
        by_env = {k.env: k for k in sec.apiKeys}
        volumes.append({
            "name": "api-keys",
            "projected": {
                "defaultMode": 0o440,
                "sources": [{"secret": {"name": by_env[e].name, "items": [{"key": by_env[e].key, "path": e}]}}
                            for e in keys],
            },
        })
        mounts.append({"name": "api-keys", "mountPath": KEYS_DIR, "readOnly": True})
    return volumes, mounts


def _resources(stage: str, cluster: ClusterSettings, disk: str) -> dict[str, dict[str, Any]]:
    sched = cluster.scheduling_for(stage)
    requests: dict[str, Any] = dict(sched.resources.requests)
    limits: dict[str, Any] = dict(sched.resources.limits)
    requests["ephemeral-storage"] = disk
    limits["ephemeral-storage"] = disk
    if sched.gpus:
        # Extended resources must have request == limit. (A training pod of a group asks for its node's GPUs.)
        requests[cluster.jobs.gpuResourceName] = str(sched.gpus)
        limits[cluster.jobs.gpuResourceName] = str(sched.gpus)
    return {"requests": dict(sorted(requests.items())), "limits": dict(sorted(limits.items()))}


def pod_spec(stage: str, run_uri: str, cluster: ClusterSettings, image: str, shards: int,
             recipe: Recipe | None, launch: list[str] | None = None, parties: int | None = None) -> dict[str, Any]:
    """``launch``: the ``bezoar stage`` flags of a training stage on several processes (distributed.py);
    its pods are the indices of an Indexed Job too (JOB_COMPLETION_INDEX is their node rank). ``parties``:
    how many pods of the run call the teacher's server at once (executors/scheduler.py ``cluster_parties``;
    None: as many as any run could have)."""
    sched = cluster.scheduling_for(stage)
    disk = ephemeral_storage(stage, cluster, recipe)
    keys = keys_for(stage, cluster, recipe)
    volumes, mounts = _volumes(stage, cluster, disk, keys)
    env = _env(stage, cluster, indexed=shards > 1 or bool(launch), keys=keys, recipe=recipe, parties=parties)
    if launch:  # torchrun forwards SIGTERM to the workers: they have the grace period (less a margin) to save
        grace = cluster.jobs.terminationGracePeriodSeconds
        env.append({"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(max(10, grace - 30))})
    container = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": cluster.images.pullPolicy,
        "args": stage_args(stage, run_uri, shards) + list(launch or []),
        "env": env,
        "resources": _resources(stage, cluster, disk),
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": RUN_UID,
            "runAsGroup": RUN_UID,
        },
        # The stage's last words (e.g. a BadInput message) show up in the pod status, so the
        # controller can name the reason even when logs are gone.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,  # stage pods need no service env vars (and a huge env slows exec)
        "terminationGracePeriodSeconds": cluster.jobs.terminationGracePeriodSeconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_UID,
            "runAsGroup": RUN_UID,
            "fsGroup": RUN_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if cluster.runnerServiceAccount:
        spec["serviceAccountName"] = cluster.runnerServiceAccount
    if cluster.imagePullSecrets:
        spec["imagePullSecrets"] = [{"name": n} for n in cluster.imagePullSecrets]
    if cluster.priorityClassName:
        spec["priorityClassName"] = cluster.priorityClassName
    if sched.nodeSelector:
        spec["nodeSelector"] = dict(sched.nodeSelector)
    if sched.tolerations:
        spec["tolerations"] = [t.model_dump(exclude_none=True) for t in sched.tolerations]
    return spec
