"""Cluster settings: the ONE typed file that says how stage Jobs run on a Kubernetes cluster.

The same YAML is used in two places. The Helm chart renders ``.Values.clusterSettings`` verbatim
into the ConfigMap ``<release>-cluster-settings`` (key ``cluster.yaml``) that the in-cluster
controller reads from a mounted file; a laptop or CI passes the same file with ``--cluster FILE``.
Keys are camelCase because they are Kubernetes-facing (they sit next to Kubernetes fields in Helm
values). Unknown keys are refused; every error names the dotted path, the file and the line.

Machine-learning hyperparameters never live here: they are in the recipe. This file only holds
images, resources, scheduling, secrets (by *name*; never values), and the teacher server's
Deployment.

Per-family scheduling: a stage belongs to one family (``data``: generate-*/filter-*; ``train``:
sft-*/dpo; ``eval``: eval-harness/eval-mtbench; ``report``: the report, on CPU, with the eval image).
A partial ``scheduling.<family>`` entry is merged onto that family's defaults, and
``stageOverrides.<stage>`` is merged onto the family's entry. Merging is deep for mappings
(``resources.requests``, ``nodeSelector``) and replaces lists (``tolerations``), so
``stageOverrides: {sft-hh: {resources: {limits: {memory: 96Gi}}}}`` raises one limit and keeps
everything else.

The defaults are the paper's GPU setup (``helm/openbezoar/values-paper.yaml`` renders exactly these);
the chart's own defaults are the CPU-sized demo. Local disk (``ephemeralStorage: auto``) is sized from
the model (:mod:`bezoar_jobs.executors.sizing`), not a blanket figure.

(This module runs over 500 lines: it is the one schema of the settings file, each section a model whose
fields and checks are the chart's values schema and the docs' reference; split, the cross-section checks
would reach across modules.)
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .. import __version__
from ..errors import BadInput
from ..recipe_base import Bool, Float, NonNegInt, PosInt
from ..registry import CANONICAL, POD_CLASSES, STAGES
from ..yamlmodel import parse_yaml, validate
from .k8s_types import (
    AutoQuantity,
    DnsLabel,
    DnsSubdomain,
    EnvName,
    LabelKey,
    LabelValue,
    OptionalName,
    Quantity,
    ResourceName,
    SecretKey,
    resources_problem,
    toleration_problem,
)

# Every stage of the registry, in canonical order, with the pod class that sizes its pods.
STAGE_FAMILIES: dict[str, str] = {name: STAGES[name].pod for name in CANONICAL}
ALL_STAGES: tuple[str, ...] = CANONICAL
FAMILIES: tuple[str, ...] = POD_CLASSES
# the stages that call the teacher (they share its capacity)
TEACHER_STAGES: tuple[str, ...] = tuple(n for n in CANONICAL if "teacher" in STAGES[n].needs)


def stage_family(stage: str) -> str:
    try:
        return STAGE_FAMILIES[stage]
    except KeyError:
        raise BadInput(f"unknown stage {stage!r}; stages are: {', '.join(ALL_STAGES)}") from None


def _known_stage(v: str) -> str:
    if v not in STAGE_FAMILIES:
        raise ValueError(f"unknown stage {v!r}; stages are: {', '.join(ALL_STAGES)}")
    return v


StageName = Annotated[str, AfterValidator(_known_stage)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # as recipe_base.Strict


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------
_DIGEST_PATTERN = r"^(sha256:[0-9a-f]{64})?$"


class ImageDigests(_Model):
    """``sha256:...`` per image ("" = pulled by tag): a pinned digest is what runs, whatever the tag says."""

    data: str = Field("", pattern=_DIGEST_PATTERN, description="digest of the data image")
    train: str = Field("", pattern=_DIGEST_PATTERN, description="digest of the train image")
    eval: str = Field("", pattern=_DIGEST_PATTERN, description="digest of the eval image (eval-* and report)")
    controller: str = Field("", pattern=_DIGEST_PATTERN, description="digest of the controller image (the chart's)")


# The image each pod class runs: the report renders with the evaluation image (its charts), on CPU.
IMAGE_OF_FAMILY: dict[str, str] = {"data": "data", "train": "train", "eval": "eval", "report": "eval"}


class Images(_Model):
    """``<registry>/<name>:<tag>`` per stage family, or ``<registry>/<name>@sha256:...`` when ``digests``
    names one (``bezoar render --image-digest`` can pin them too)."""

    registry: str = Field("ghcr.io/example/bezoar-jobs", min_length=1, description="build arg REGISTRY")
    tag: str = Field(__version__, pattern=r"^[\w][\w.-]{0,127}$", description="= package version = chart appVersion")
    pullPolicy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    data: str = Field("bezoar-data", min_length=1, description="generate-*/filter-* stages")
    train: str = Field("bezoar-train", min_length=1, description="sft-*, dpo")
    eval: str = Field("bezoar-eval", min_length=1, description="eval-*, report")
    controller: str = Field("bezoar-controller", min_length=1, description="the controller Job (the chart's)")
    digests: ImageDigests = ImageDigests()

    @field_validator("registry")
    @classmethod
    def _registry(cls, v: str) -> str:
        return v.rstrip("/")


class RunVolume(_Model):
    """A PersistentVolumeClaim that holds runs stored as plain directories (``--run /runs/<id>``): the
    in-cluster run store of the chart's default install. Every stage pod mounts it at ``mountPath``,
    as the controller does, so a run path means the same files everywhere. ReadWriteOnce works on a
    single-node cluster (kind, minikube, k3d); several nodes need ReadWriteMany (or an S3 run store)."""

    claimName: OptionalName = Field("", description='the PVC ("" = none: runs live in S3)')
    mountPath: str = Field("/runs", pattern=r"^/[^:]*$", description="where every pod sees it")


class CacheVolume(_Model):
    claimName: OptionalName = Field(
        "", description='a PVC mounted at /cache instead of an emptyDir ("" = emptyDir): downloaded and '
        "converted models are then shared by the stage pods (ReadWriteMany on several nodes)"
    )


class Storage(_Model):
    s3EndpointUrl: str = Field("", description="-> env BEZOAR_S3_ENDPOINT_URL when set (S3-compatible stores)")
    s3Region: str = Field("us-east-1", description="-> env AWS_REGION")
    s3AddressingStyle: Literal["", "path", "virtual"] = Field("", description="-> env BEZOAR_S3_ADDRESSING_STYLE")
    s3Checksums: Literal["", "when_supported", "when_required"] = Field(
        "", description='-> env BEZOAR_S3_CHECKSUMS ("": when_required with s3EndpointUrl, else boto3\'s)'
    )
    runVolume: RunVolume = RunVolume()
    cacheVolume: CacheVolume = CacheVolume()


class S3Secret(_Model):
    name: OptionalName = Field("bezoar-s3", description='Secret with an AWS shared credentials file; "" = none (IRSA)')
    credentialsFileKey: SecretKey = "credentials"


class HfTokenSecret(_Model):
    name: OptionalName = Field("", description='Secret with the Hugging Face token; "" = none')
    key: SecretKey = "token"


class ApiKeySecret(_Model):
    """An API key a recipe endpoint names with ``api_key_env``: mounted as the file
    ``/var/run/secrets/bezoar/keys/<env>`` into the pods of the stages whose endpoints name it (never
    an environment variable of the pod spec); the client reads it from there (``BEZOAR_KEYS_DIR``)."""

    env: EnvName = Field(description="the recipe's api_key_env naming this key")
    name: OptionalName = Field("", description='Secret holding the key; "" = not set')
    key: SecretKey = "api-key"


class Secrets(_Model):
    s3: S3Secret = S3Secret()
    hfToken: HfTokenSecret = HfTokenSecret()
    apiKeys: tuple[ApiKeySecret, ...] = (
        ApiKeySecret(env="OPENAI_API_KEY"),
        ApiKeySecret(env="ANTHROPIC_API_KEY"),
    )

    @field_validator("apiKeys")
    @classmethod
    def _unique_env(cls, v: tuple[ApiKeySecret, ...]) -> tuple[ApiKeySecret, ...]:
        seen = [k.env for k in v]
        dup = sorted({e for e in seen if seen.count(e) > 1})
        if dup:
            raise ValueError(f"environment variable(s) {', '.join(dup)} listed more than once")
        return v


class Teacher(_Model):
    """The teacher server as the cluster knows it. ``url`` and ``backend`` override the recipe's
    ``teacher.base_url`` / ``teacher.backend`` in the pods of the stages that call the teacher (logged
    and recorded in their manifests), so another release name, namespace or server still works."""

    deployment: OptionalName = Field("", description='the teacher Deployment ("" = not managed)')
    url: str = Field("", description="base URL stage pods use (-> env BEZOAR_TEACHER_URL)")
    backend: Literal["", "tgi", "openai-completions"] = Field(
        "", description='protocol spoken at url (-> env BEZOAR_TEACHER_BACKEND; "" = the recipe\'s): tgi for '
        "TGI, openai-completions (url ending in /v1) for vLLM"
    )
    maxConcurrentRequests: NonNegInt = Field(
        0, description="the server's capacity: TGI --max-concurrent-requests, vLLM --max-num-seqs (0 = ask TGI's "
        "/info); the stages calling the teacher divide it (-> env BEZOAR_TEACHER_CAPACITY)"
    )
    waitReady: Bool = Field(True, description="wait for the Deployment to be ready before generate stages")
    readyTimeoutSeconds: PosInt = Field(
        3600, description="how long the controller waits for a ready teacher (the chart: its startup timeout "
        "plus time to schedule and pull)"
    )
    scaleDownAfterGeneration: Bool = Field(
        True, description="scale to 0 once every generate-* stage is committed and no other run holds a lease"
    )
    replicas: PosInt = Field(1, description="replicas to scale up to when it is at 0")
    discovery: Literal["", "dns"] = Field(
        "", description='"dns": stage pods spread requests over every address of url\'s host, a headless Service '
        "with one per ready teacher pod (-> env BEZOAR_TEACHER_DISCOVERY; bezoar_jobs/llm/fleet.py)"
    )
    leaseSeconds: Annotated[StrictInt, Field(ge=30)] = Field(
        600, description="a run's lease on the teacher lasts this long unless renewed (a crashed run's lease expires)"
    )


class Kueue(_Model):
    queueName: LabelValue = Field(
        "", description="non-empty: label kueue.x-k8s.io/queue-name and create Jobs suspended"
    )


class ResourceMaps(_Model):
    """A container's requests and limits as given (a stage override's part: checked once merged)."""

    requests: dict[ResourceName, Quantity] = {}
    limits: dict[ResourceName, Quantity] = {}


class Resources(ResourceMaps):
    @model_validator(mode="after")
    def _check(self) -> Resources:
        problem = resources_problem(self.requests, self.limits)  # what the API server would refuse of the Job
        if problem:
            raise ValueError(problem)
        return self


class Toleration(_Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    tolerationSeconds: StrictInt | None = None

    @model_validator(mode="after")
    def _check(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("operator Exists takes no value")
        if self.tolerationSeconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds only applies to effect NoExecute")
        problem = toleration_problem(self.key, self.operator, self.value)
        if problem:
            raise ValueError(problem)
        return self


class Scheduling(_Model):
    """How one family's (or one stage's) pods are sized and placed.

    ``resources`` are the container's requests/limits as Kubernetes spells them; the defaults set
    no CPU limit on purpose (a CPU limit throttles tokenisation and data loading; the request
    reserves the CPU), add ``limits.cpu`` where a cluster policy wants one. ``ephemeralStorage``
    is the pod's local disk: the container's ephemeral-storage request and limit, and the size
    bound of the ``/scratch`` and ``/cache`` emptyDirs (they all count against that one limit).
    ``shmSize`` is a memory-backed emptyDir, so it counts against the memory limit too.
    ``parallelism`` departs from the contract sketch (which showed ``parallelism: 1`` for data):
    1 would run a sharded stage's shards one at a time, so it defaults to unset (all at once).
    """

    resources: Resources = Resources()
    gpus: NonNegInt = Field(0, description="GPUs requested and limited (jobs.gpuResourceName)")
    nodeSelector: dict[LabelKey, LabelValue] = {}
    tolerations: tuple[Toleration, ...] = ()
    activeDeadlineSeconds: PosInt = 86400
    backoffLimit: NonNegInt = Field(3, description="retries of retryable failures (preemptions are not counted)")
    ephemeralStorage: AutoQuantity = Field(
        "auto", description='ephemeral-storage request/limit and /scratch size ("auto" = sized from the model)'
    )
    shmSize: Quantity = Field("1Gi", description="size of the memory-backed /dev/shm")
    parallelism: PosInt | None = Field(
        None,
        description="sharded (Indexed) generate Jobs only: shard pods running at once; "
        "unset = all generationShards at once. Unsharded Jobs always run one pod.",
    )
    nodes: PosInt = Field(1, description="training stages: pods (nodes) the stage runs on, one per node")
    processesPerNode: PosInt | None = Field(
        None, description="training stages: torch.distributed.run processes per pod (unset = gpus, at least 1)")

    def processes_per_node(self) -> int:
        return self.processesPerNode or max(1, self.gpus)


class Distributed(_Model):
    """How a training stage on several pods is run (docs/kubernetes.md, "Distributed training")."""

    launcher: Literal["job", "jobset", "trainjob"] = Field(
        "job", description="job: an Indexed Job plus a headless Service (built in); jobset / trainjob: a JobSet "
        "or a Kubeflow Trainer v2 TrainJob, for clusters that have them installed (the controller checks)")
    port: Annotated[StrictInt, Field(ge=1024, le=65535)] = Field(29500, description="rendezvous port on node 0")
    trainingRuntime: DnsSubdomain = Field(
        "torch-distributed", description="trainjob: the ClusterTrainingRuntime the TrainJob refers to")


class SchedulingOverride(_Model):
    """A partial :class:`Scheduling`: only the keys given replace (mappings merge deeply)."""

    resources: ResourceMaps | None = None
    gpus: NonNegInt | None = None
    nodeSelector: dict[LabelKey, LabelValue] | None = None
    tolerations: tuple[Toleration, ...] | None = None
    activeDeadlineSeconds: PosInt | None = None
    backoffLimit: NonNegInt | None = None
    ephemeralStorage: AutoQuantity | None = None
    shmSize: Quantity | None = None
    parallelism: PosInt | None = None
    nodes: PosInt | None = None
    processesPerNode: PosInt | None = None


_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {
        "resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "8Gi"}},
        "gpus": 0,
        "nodeSelector": {},
        "tolerations": [],
        "activeDeadlineSeconds": 86400,
        "backoffLimit": 3,
        "ephemeralStorage": "auto",
        "shmSize": "1Gi",
    },
    "train": {
        "resources": {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"memory": "64Gi"}},
        "gpus": 1,
        "nodeSelector": {},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "activeDeadlineSeconds": 172800,
        "backoffLimit": 6,
        "ephemeralStorage": "auto",
        "shmSize": "16Gi",
    },
    # the report reads results files and renders HTML: no GPU, small
    "report": {
        "resources": {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "4Gi"}},
        "gpus": 0,
        "nodeSelector": {},
        "tolerations": [],
        "activeDeadlineSeconds": 7200,
        "backoffLimit": 3,
        "ephemeralStorage": "auto",
        "shmSize": "1Gi",
    },
}
_FAMILY_DEFAULTS["eval"] = copy.deepcopy(_FAMILY_DEFAULTS["train"])


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` onto ``base``: mappings merge key by key, anything else (lists included) replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class SchedulingSet(_Model):
    data: Scheduling = Scheduling.model_validate(_FAMILY_DEFAULTS["data"])
    train: Scheduling = Scheduling.model_validate(_FAMILY_DEFAULTS["train"])
    eval: Scheduling = Scheduling.model_validate(_FAMILY_DEFAULTS["eval"])
    report: Scheduling = Scheduling.model_validate(_FAMILY_DEFAULTS["report"])

    @model_validator(mode="before")
    @classmethod
    def _onto_defaults(cls, data: Any) -> Any:
        # A partial family entry keeps that family's defaults (not the generic field defaults).
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for fam in FAMILIES:
            if isinstance(data.get(fam), dict):
                out[fam] = _deep_merge(_FAMILY_DEFAULTS[fam], data[fam])
        return out


class Sizing(_Model):
    """What ``ephemeralStorage: auto`` is computed from (formula in :mod:`bezoar_jobs.executors.sizing`)."""

    modelParamsB: Annotated[Float, Field(gt=0, le=10000)] = Field(
        3.4, description="parameters of the student (and of an in-process teacher/judge), in billions"
    )


class ControllerSettings(_Model):
    apiOutageToleranceSeconds: Annotated[StrictInt, Field(ge=10)] = Field(
        900, description="how long the controller retries while the API server cannot be reached"
    )
    pendingReportSeconds: Annotated[StrictInt, Field(ge=1)] = Field(
        60, description="a pod Pending (or a Job suspended) this long is reported with the scheduler's / Kueue's reason"
    )


class JobsSettings(_Model):
    ttlSecondsAfterFinished: NonNegInt = 604800
    terminationGracePeriodSeconds: NonNegInt = Field(300, description="long enough for a final checkpoint upload")
    gpuResourceName: ResourceName = "nvidia.com/gpu"


# ---------------------------------------------------------------------------------------------
# The settings
# ---------------------------------------------------------------------------------------------
class ClusterSettings(_Model):
    """Everything the Job builder and the controller need to know about the cluster."""

    namespace: DnsLabel = Field("bezoar", description="where stage Jobs are created")
    runnerServiceAccount: OptionalName = Field("", description='SA of stage pods ("" = default); token never mounted')
    images: Images = Images()
    imagePullSecrets: tuple[DnsSubdomain, ...] = ()
    storage: Storage = Storage()
    secrets: Secrets = Secrets()
    teacher: Teacher = Teacher()
    priorityClassName: OptionalName = ""
    kueue: Kueue = Kueue()
    scheduling: SchedulingSet = SchedulingSet()
    stageOverrides: dict[StageName, SchedulingOverride] = {}
    generationShards: Annotated[StrictInt, Field(ge=1, le=1000)] = Field(
        1, description=">1: generate-* stages run as Indexed Jobs with this many shards"
    )
    jobs: JobsSettings = JobsSettings()
    sizing: Sizing = Sizing()
    controller: ControllerSettings = ControllerSettings()
    distributed: Distributed = Distributed()

    @model_validator(mode="after")
    def _shapes_on_training_only(self) -> ClusterSettings:
        for fam in FAMILIES:
            sched: Scheduling = getattr(self.scheduling, fam)
            if fam != "train" and (sched.nodes > 1 or (sched.processesPerNode or 1) > 1):
                raise ValueError(f"scheduling.{fam}: nodes and processesPerNode apply to training stages only")
        for stage, over in self.stageOverrides.items():
            if stage_family(stage) != "train" and ((over.nodes or 1) > 1 or (over.processesPerNode or 1) > 1):
                raise ValueError(f"stageOverrides.{stage}: nodes and processesPerNode apply to training stages only")
            base: Resources = getattr(self.scheduling, stage_family(stage)).resources
            problem = over.resources and resources_problem({**base.requests, **over.resources.requests},
                                                           {**base.limits, **over.resources.limits})
            if problem:  # as the Job gets them: the family's merged in (scheduling_for)
                raise ValueError(f"stageOverrides.{stage}.resources, merged onto scheduling.{stage_family(stage)}: "
                                 f"{problem}")
        return self

    @field_validator("generationShards")
    @classmethod
    def _teacher_budget(cls, shards: int, info: ValidationInfo) -> int:
        teacher = info.data.get("teacher")
        cap, parties = (teacher.maxConcurrentRequests if teacher else 0), len(TEACHER_STAGES) * shards
        if cap and cap < parties:
            raise ValueError(
                f"teacher.maxConcurrentRequests ({cap}) cannot be divided among the {parties} pods that call the "
                f"teacher at once ({len(TEACHER_STAGES)} stages x generationShards {shards}): raise it or lower "
                "generationShards"
            )
        return shards

    def scheduling_for(self, stage: str) -> Scheduling:
        """The family's scheduling entry with the stage's override merged on top."""
        base: Scheduling = getattr(self.scheduling, stage_family(stage))
        over = self.stageOverrides.get(stage)
        if over is None:
            return base
        merged = _deep_merge(base.model_dump(mode="json"), over.model_dump(mode="json", exclude_none=True))
        return Scheduling.model_validate(merged)

    def image_for(self, stage: str) -> str:
        """``registry/name`` (no tag) of the image that runs ``stage``."""
        return f"{self.images.registry}/{getattr(self.images, IMAGE_OF_FAMILY[stage_family(stage)])}"

    def digest_for(self, stage: str) -> str:
        """The pinned digest of the image that runs ``stage`` ("" = by tag)."""
        return str(getattr(self.images.digests, IMAGE_OF_FAMILY[stage_family(stage)]))


# ---------------------------------------------------------------------------------------------
# Loading with errors that name path, file and line
# ---------------------------------------------------------------------------------------------
def parse_cluster_settings(text: str, source: str = "<cluster settings>") -> ClusterSettings:
    """Validate cluster-settings YAML text; BadInput names ``file:line: dotted.path: problem``."""
    data = parse_yaml(text, source, "cluster settings")
    if data is None:
        data = {}  # an empty file means "all defaults"
    if not isinstance(data, dict):
        raise BadInput(f"{source}: cluster settings must be a YAML mapping at the top level")
    return validate(ClusterSettings, data, text, source, "cluster settings")


def load_cluster_settings(path: str | Path | None) -> ClusterSettings:
    """Load ``--cluster FILE`` (None: every default). Errors name the dotted path, file and line."""
    if path is None:
        return ClusterSettings()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"{p}: cluster settings file not found") from None
    except IsADirectoryError:
        raise BadInput(f"{p}: is a directory, not a cluster settings file") from None
    except UnicodeDecodeError:
        from ..data.io import not_utf8  # "file:line: not UTF-8 text (byte 0x.. at column N) ..."

        raise BadInput(not_utf8(p, str(p))) from None
    except OSError as e:
        raise BadInput(f"{p}: the cluster settings cannot be read: {e.strerror}") from None
    return parse_cluster_settings(text, str(p))
