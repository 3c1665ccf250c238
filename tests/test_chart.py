"""The Helm chart, rendered by the real helm binary and checked object by object.

Every scenario is rendered with `helm template`: "default" with no values at all (the CPU demo),
"base" with values-paper.yaml and ci/base-values.yaml, every other one with its
helm/openbezoar/ci/<scenario>-values.yaml layered on "base". Every object is validated with
kubernetes-validate --strict against the oldest supported and a current Kubernetes, every pod spec
against the restricted Pod Security profile (tests/pod_security.py), and pytest asserts on the objects.
helm-unittest cannot be installed offline, so the assertions are plain Python over the YAML. The infra
linters (checkov over the chart directory and the rendered scenarios, the Dockerfiles and manifests/;
actionlint over the workflows) run here too.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import tarfile
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

import bezoar_jobs
from bezoar_jobs.executors.cluster import ClusterSettings, parse_cluster_settings

try:  # tests/ is not a package today; keep working if it becomes one
    from tests import infra_tools, pod_security
except ImportError:
    import infra_tools  # type: ignore[no-redef]
    import pod_security  # type: ignore[no-redef]

REPO = infra_tools.REPO
CHART = REPO / "helm" / "openbezoar"
CI = CHART / "ci"
RELEASE, NAMESPACE = "openbezoar", "bezoar"
SCENARIOS = ("default", "base", "vllm", "no-teacher", "init-s3", "cronjob", "kueue", "irsa", "dev-secrets", "egress")
# The chart's kubeVersion floor and a current release: fields must exist in both.
K8S_VERSIONS = ("1.31", "1.35")
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
PAPER = yaml.safe_load((CHART / "values-paper.yaml").read_text())
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
UID = 10001


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    exe = infra_tools.helm_bin()
    return str(exe), infra_tools.helm_env(tmp_path_factory.mktemp("helm-home"))


def run_helm(helm: tuple[str, dict[str, str]], *args: str) -> subprocess.CompletedProcess[str]:
    exe, env = helm
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env, cwd=REPO)


def values_files(scenario: str) -> list[str]:
    if scenario == "default":
        return []
    files = [CHART / "values-paper.yaml", CI / "base-values.yaml"]
    files += [] if scenario == "base" else [CI / f"{scenario}-values.yaml"]
    out: list[str] = []
    for f in files:
        out += ["-f", str(f)]
    return out


def template(helm: tuple[str, dict[str, str]], *args: str) -> list[dict[str, Any]]:
    proc = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def rendered(helm: tuple[str, dict[str, str]]) -> dict[str, list[dict[str, Any]]]:
    return {s: template(helm, *values_files(s)) for s in SCENARIOS}


def objs(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in objs(docs, kind)
        if component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"expected one {kind} {component or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def cluster_yaml(docs: list[dict[str, Any]]) -> dict[str, Any]:
    cm = one(docs, "ConfigMap", "cluster-settings")
    assert cm["metadata"]["name"] == f"{RELEASE}-cluster-settings"
    return yaml.safe_load(cm["data"]["cluster.yaml"])


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in {"Deployment", "Job", "CronJob"}]


# ---------------------------------------------------------------------------------------------
# helm lint, kubernetes-validate --strict
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_strict(helm: tuple[str, dict[str, str]], scenario: str) -> None:
    proc = run_helm(helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, *values_files(scenario))
    assert proc.returncode == 0 and "0 chart(s) failed" in proc.stdout, proc.stdout + proc.stderr


def test_every_object_validates_strict(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kinds: set[str] = set()
    for scenario, docs in rendered.items():
        for d in docs:
            kinds.add(d["kind"])
            assert d["metadata"].get("namespace") == NAMESPACE, (scenario, d["kind"], d["metadata"]["name"])
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(d, version, strict=True)
                except kubernetes_validate.ValidationError as e:  # pragma: no cover - the failure message
                    pytest.fail(f"{scenario}: {d['kind']}/{d['metadata']['name']} invalid for {version}: {e.message}")
    assert kinds == {
        "ConfigMap",
        "CronJob",
        "Deployment",
        "Job",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "Role",
        "RoleBinding",
        "Secret",
        "Service",
        "ServiceAccount",
    }


def test_objects_rendered_into_the_default_namespace_validate_strict(helm: tuple[str, dict[str, str]]) -> None:
    """What a scan renders (`helm template` without -n, namespace "default") carries checkov skip
    annotations; they belong under metadata: the teacher Service once put them under spec too, a field
    a strict API server refuses."""
    for scenario in SCENARIOS:
        proc = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", "default", *values_files(scenario),
                        "--set", "teacher.replicas=2", "--set", "teacher.cache.type=emptyDir")
        assert proc.returncode == 0, proc.stderr
        for d in (d for d in yaml.safe_load_all(proc.stdout) if d):
            try:
                kubernetes_validate.validate(d, K8S_VERSIONS[-1], strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{scenario} in default: {d['kind']}/{d['metadata']['name']}: {e.message}")


def test_strict_validation_catches_unknown_fields(rendered: dict[str, list[dict[str, Any]]]) -> None:
    # A control for the test above: a misspelt field must fail.
    job = copy.deepcopy(one(rendered["base"], "Job"))
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSIONS[-1], strict=True)


# ---------------------------------------------------------------------------------------------
# Every pod is hardened, sized and identity-scoped
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pods_are_hardened_and_sized(rendered: dict[str, list[dict[str, Any]]], scenario: str) -> None:
    for w in workloads(rendered[scenario]):
        where = f"{scenario}: {w['kind']}/{w['metadata']['name']}"
        spec = pod_spec(w)
        # finding 1: the TGI teacher too runs under the restricted profile now (our image, UID 10001)
        assert pod_security.check(spec, "restricted") == [], where
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == UID, where
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        is_controller = w["metadata"]["labels"]["app.kubernetes.io/component"] == "controller"
        # Only the controller calls the API server; every other pod runs without a token.
        assert spec["automountServiceAccountToken"] is is_controller, where
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True, where
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][part]), f"{where}: {c['name']} {part}"
            # A read-only root needs writable scratch: /tmp (HOME) from an emptyDir.
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{where}: {c['name']} has no writable /tmp"
            for e in c.get("env", []):
                assert "secretKeyRef" not in e.get("valueFrom", {}), f"{where}: secret {e['name']} as env var"
            assert not c.get("envFrom"), where


def test_teacher_probes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for scenario in ("base", "vllm", "init-s3"):
        (server,) = pod_spec(one(rendered[scenario], "Deployment"))["containers"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert server[probe]["httpGet"] == {"path": "/health", "port": "http"}, (scenario, probe)
        # The startup probe covers teacher.startupTimeoutSeconds of model download and load.
        p = server["startupProbe"]
        assert p["periodSeconds"] * p["failureThreshold"] == VALUES["teacher"]["startupTimeoutSeconds"]


# ---------------------------------------------------------------------------------------------
# The default install: TGI teacher, controller Job, RBAC, cluster settings
# ---------------------------------------------------------------------------------------------
def test_default_tgi_teacher(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["base"]
    dep = one(docs, "Deployment", "teacher")
    assert dep["metadata"]["name"] == f"{RELEASE}-teacher"
    # finding 6: Helm rendered replicas: 1, so every `helm upgrade` brought the 2-GPU teacher back in
    # the middle of training; the controllers own the replica count now
    assert dep["spec"]["strategy"] == {"type": "Recreate"} and "replicas" not in dep["spec"]
    spec = pod_spec(dep)
    assert "initContainers" not in spec
    (c,) = spec["containers"]
    # finding 1: our non-root build of the pinned TGI release (images/teacher), as UID 10001
    assert c["image"] == "ghcr.io/example/bezoar-jobs/bezoar-teacher:0.1.0"
    assert spec["securityContext"]["runAsUser"] == c["securityContext"]["runAsUser"] == UID
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["command"] == ["/bin/sh", "-c"]
    args = c["args"][1:]
    assert args[0] == "text-generation-launcher"
    flags = dict(zip(args[1::2], args[2::2], strict=True))
    assert flags == {
        "--model-id": "h2oai/h2ogpt-gm-oasst1-en-2048-falcon-40b-v2",
        "--revision": "main",
        "--num-shard": "2",
        "--max-total-tokens": "2048",
        "--max-input-tokens": "1536",
        "--max-concurrent-requests": "128",
        "--hostname": "0.0.0.0",
        "--port": "8080",
    }
    gpu = VALUES["clusterSettings"]["jobs"]["gpuResourceName"]
    assert c["resources"]["requests"][gpu] == c["resources"]["limits"][gpu] == 2
    # finding 7: the weights' emptyDir counts against the node's disk: requested, so the pod lands
    # where they fit and is not evicted halfway through the download
    assert c["resources"]["requests"]["ephemeral-storage"] == c["resources"]["limits"]["ephemeral-storage"] == "102Gi"
    env = env_of(c)
    assert env["HF_HOME"] == "/data" and "HF_HUB_OFFLINE" not in env and "HF_TOKEN_PATH" not in env
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts["/data"]]["emptyDir"] == {"sizeLimit": "100Gi"}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}
    assert spec["tolerations"] == VALUES["teacher"]["tolerations"]
    # finding 7: a 16-bit 40B model over two GPUs needs 80GB-class ones: the paper values require them
    (term,) = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    (expr,) = term["matchExpressions"]
    assert expr["key"] == "nvidia.com/gpu.product" and expr["operator"] == "In"
    assert expr["values"] and all("80GB" in v or "H100" in v or "H200" in v for v in expr["values"])
    # finding 10: no checkov skip the teacher does not need (no secret is an env var anywhere)
    skips = " ".join(dep["metadata"].get("annotations", {}).values())
    assert "CKV_K8S_35" not in skips
    svc = one(docs, "Service", "teacher")
    assert svc["metadata"]["name"] == dep["metadata"]["name"]
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    # No Secret is ever created by default: the chart references Secrets by name only.
    assert objs(docs, "Secret") == []


def test_standard_labels(rendered: dict[str, list[dict[str, Any]]]) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    for d in rendered["base"]:
        labels = d["metadata"]["labels"]
        assert labels["helm.sh/chart"] == f"openbezoar-{chart['version']}"
        assert labels["app.kubernetes.io/name"] == "openbezoar"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/version"] == chart["appVersion"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert DNS_LABEL.match(d["metadata"]["name"]) and len(d["metadata"]["name"]) <= 63


def test_controller_job_runs_the_run(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["base"]
    job = one(docs, "Job", "controller")
    assert job["metadata"]["name"] == f"{RELEASE}-controller-ci-run-1"
    # `helm upgrade --set run.id=<next>` must not delete a run that is still going.
    assert job["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    spec = pod_spec(job)
    (c,) = spec["containers"]
    assert c["image"] == "ghcr.io/example/bezoar-jobs/bezoar-controller:0.1.0"
    assert c["command"] == ["bezoar"]
    assert c["args"] == [
        "run",
        "--executor",
        "kubernetes",
        "--recipe",
        "s3://bezoar-ci/recipes/openbezoar.yaml",
        "--run",
        "s3://bezoar-ci/runs/ci-run-1",
        "--run-id",
        "ci-run-1",
        "--cluster",
        "/etc/bezoar/cluster.yaml",
    ]
    assert spec["restartPolicy"] == "Never"
    sa = one(docs, "ServiceAccount", "controller")
    assert spec["serviceAccountName"] == sa["metadata"]["name"] and sa["automountServiceAccountToken"] is False
    # /etc/bezoar/cluster.yaml is the cluster-settings ConfigMap's key.
    (config,) = [v for v in spec["volumes"] if v["name"] == "config"]
    (source,) = config["projected"]["sources"]
    assert source["configMap"]["name"] == one(docs, "ConfigMap", "cluster-settings")["metadata"]["name"]
    assert source["configMap"]["items"] == [{"key": "cluster.yaml", "path": "cluster.yaml"}]
    assert {"name": "config", "mountPath": "/etc/bezoar", "readOnly": True} in c["volumeMounts"]
    # S3 credentials as a mounted file, located by AWS_SHARED_CREDENTIALS_FILE.
    env = env_of(c)
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == "/var/run/secrets/bezoar/s3/credentials"
    assert env["AWS_REGION"] == "us-east-1"
    (creds,) = [v for v in spec["volumes"] if v["name"] == "s3-credentials"]
    assert creds["secret"]["secretName"] == "bezoar-s3"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    # finding 4: only exit 2 stopped the controller Job, and the controller exited 1 on a failed stage
    # and on cancel, so Kubernetes retried it and it ran the stage again; 4 (cancelled) and 5 (a stage
    # failed for good) stop it now (test_cluster.py runs this Job in the harness)
    assert rules[0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "controller", "operator": "In", "values": [2, 4, 5]},
    }
    uid_env = next(e for e in c["env"] if e["name"] == "BEZOAR_CONTROLLER_UID")
    assert uid_env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/controller-uid']"
    assert rules[1]["action"] == "Ignore" and rules[1]["onPodConditions"][0]["type"] == "DisruptionTarget"
    assert job["spec"]["activeDeadlineSeconds"] == VALUES["controller"]["activeDeadlineSeconds"]
    # The controller serves nothing: its NetworkPolicy selects it and admits no ingress.
    np = one(docs, "NetworkPolicy", "controller")
    assert np["spec"]["podSelector"]["matchLabels"].items() <= spec_labels(job).items()
    assert np["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in np["spec"]


def test_stage_pods_network_policy_selects_the_builders_pods(rendered: dict[str, list[dict[str, Any]]]) -> None:
    # The chart isolates the stage pods the controller creates: its selector must match the labels
    # the Job builder puts on them, for every stage family and both phases.
    from bezoar_jobs.executors.jobs import stage_labels

    np = one(rendered["base"], "NetworkPolicy", "stages")
    selector = np["spec"]["podSelector"]["matchLabels"]
    cluster = ClusterSettings.model_validate(cluster_yaml(rendered["base"]))
    for stage, phase in (("generate-lamini", "main"), ("generate-orca", "commit"), ("dpo", "main"), ("report", "main")):
        assert selector.items() <= stage_labels(stage, "ci-run-1", cluster, phase).items(), stage
    assert np["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in np["spec"]
    # ... and not the chart's own pods (the teacher must stay reachable).
    assert not selector.items() <= spec_labels(one(rendered["base"], "Deployment")).items()


def spec_labels(obj: dict[str, Any]) -> dict[str, str]:
    return obj["spec"]["template"]["metadata"]["labels"]


def rbac_rules(docs: list[dict[str, Any]]) -> set[tuple[str, str, tuple[str, ...], tuple[str, ...]]]:
    role = one(docs, "Role")
    out = set()
    for r in role["rules"]:
        for group in r["apiGroups"]:
            for res in r["resources"]:
                out.add((group, res, tuple(sorted(r["verbs"])), tuple(r.get("resourceNames", ()))))
    return out


def test_rbac_is_namespaced_least_privilege(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["base"]
    teacher = (f"{RELEASE}-teacher",)
    assert rbac_rules(docs) == {
        ("batch", "jobs", ("create", "delete", "get", "list", "watch"), ()),
        ("", "pods", ("get", "list", "watch"), ()),
        ("", "pods/log", ("get",), ()),
        # finding 7: the scheduler's reasons come from events
        ("", "events", ("get", "list"), ()),
        # leases (annotations) and the replica count are patches of the teacher Deployment itself
        ("apps", "deployments", ("get", "patch"), teacher),
    }
    # Kueue's Workloads are read only where a queue is configured
    assert ("kueue.x-k8s.io", "workloads", ("get", "list"), ()) in rbac_rules(rendered["kueue"])
    assert not objs(docs, "ClusterRole") and not objs(docs, "ClusterRoleBinding")
    rb, role, sa = one(docs, "RoleBinding"), one(docs, "Role"), one(docs, "ServiceAccount", "controller")
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}]
    # The teacher the Role may scale is the one the controller is told to scale.
    assert cluster_yaml(docs)["teacher"]["deployment"] == one(docs, "Deployment")["metadata"]["name"]


def test_cluster_settings_validate_against_the_model(rendered: dict[str, list[dict[str, Any]]]) -> None:
    # The exact path the controller takes: parse the ConfigMap's cluster.yaml.
    for scenario, docs in rendered.items():
        cm = one(docs, "ConfigMap", "cluster-settings")
        cs = parse_cluster_settings(cm["data"]["cluster.yaml"], f"{scenario}:cluster.yaml")
        # what the controller reads is what the chart rendered, not the model's defaults in its place
        assert cs.model_dump(mode="json", exclude_unset=True) == cluster_yaml(docs), scenario


def test_default_cluster_settings_are_the_models_defaults(rendered: dict[str, list[dict[str, Any]]]) -> None:
    # The chart's default values, as rendered, validate and equal ClusterSettings' own defaults,
    # except what the chart fills in: the teacher it deploys (namespace: the release's, = "bezoar").
    # The paper's values (values-paper.yaml) render ClusterSettings' own defaults, except what the
    # chart fills in: the teacher it deploys (namespace: the release's, = "bezoar").
    rendered_cs = cluster_yaml(rendered["base"])
    model = ClusterSettings.model_validate(rendered_cs)
    got = model.model_dump(mode="json", exclude_none=True)
    want = ClusterSettings().model_dump(mode="json", exclude_none=True)
    fills = {"deployment": f"{RELEASE}-teacher", "url": f"http://{RELEASE}-teacher.{NAMESPACE}.svc:80",
             "backend": "tgi", "maxConcurrentRequests": 128, "readyTimeoutSeconds": 3600 + 900}
    for k, v in fills.items():
        assert got["teacher"].pop(k) == v, k
        want["teacher"].pop(k)
    assert got == want
    # And verbatim: every key of the chart's clusterSettings (defaults + values-paper) comes through
    # unchanged, save the documented fills.
    raw = copy.deepcopy(VALUES["clusterSettings"])
    raw["namespace"] = NAMESPACE
    for k, v in rendered_cs["teacher"].items():
        if k in fills:
            raw["teacher"][k] = v
    assert {k: v for k, v in rendered_cs.items() if k not in PAPER["clusterSettings"]} == \
        {k: v for k, v in raw.items() if k not in PAPER["clusterSettings"]}
    ClusterSettings.model_validate(raw)


def test_the_default_install_is_the_cpu_demo_on_an_in_cluster_run_store(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Finding 10: the chart did not render with its defaults, so `helm install` with no values failed
    (and checkov scanned nothing). Now no values at all is the demo: the embedded SmolLM2 recipe, CPU
    pods, runs on a PVC, the run id from the release."""
    docs = rendered["default"]
    assert not objs(docs, "Deployment")  # the demo's teacher runs in process
    job = one(docs, "Job", "controller")
    args = pod_spec(job)["containers"][0]["args"]
    assert args[args.index("--run-id") + 1] == RELEASE and args[args.index("--run") + 1] == f"/runs/{RELEASE}"
    assert args[args.index("--recipe") + 1] == "/etc/bezoar/recipe.yaml"
    recipe = one(docs, "ConfigMap", "recipe")["data"]["recipe.yaml"]
    assert yaml.safe_load(recipe) == yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())
    assert (CHART / "files" / "openbezoar.yaml").read_text() == (REPO / "recipes" / "openbezoar.yaml").read_text()
    pvc = one(docs, "PersistentVolumeClaim", "run-store")
    assert pvc["metadata"]["name"] == f"{RELEASE}-runs" and pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    (mount,) = [m for m in pod_spec(job)["containers"][0]["volumeMounts"] if m["mountPath"] == "/runs"]
    (vol,) = [v for v in pod_spec(job)["volumes"] if v["name"] == mount["name"]]
    assert vol["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    cs = ClusterSettings.model_validate(cluster_yaml(docs))
    assert cs.storage.runVolume.claimName == pvc["metadata"]["name"] and cs.storage.runVolume.mountPath == "/runs"
    assert cs.secrets.s3.name == "" and cs.teacher.deployment == ""
    from bezoar_jobs.executors.jobs import build_job
    from bezoar_jobs.registry import CANONICAL

    for stage in CANONICAL:  # every stage pod of the demo: CPU, the all-in-one demo image, the PVC
        built = build_job(stage, f"/runs/{RELEASE}", RELEASE, cs)
        c = built["spec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in c["resources"]["requests"], stage
        assert c["image"].startswith("ghcr.io/example/bezoar-jobs/bezoar-demo:"), stage
        assert {"name": "runs", "mountPath": "/runs"} in c["volumeMounts"]
        assert pod_security.check(built["spec"]["template"]["spec"]) == []


# ---------------------------------------------------------------------------------------------
# Value switches
# ---------------------------------------------------------------------------------------------
def test_vllm_switch(rendered: dict[str, list[dict[str, Any]]]) -> None:
    (c,) = pod_spec(one(rendered["vllm"], "Deployment"))["containers"]
    assert c["image"] == "vllm/vllm-openai:v0.11.0"
    assert "exec vllm serve" in c["args"][0]
    args = c["args"][1:]
    assert args[:2] == ["vllm", "h2oai/h2ogpt-gm-oasst1-en-2048-falcon-40b-v2"]
    flags = dict(zip(args[2:-2:2], args[3:-2:2], strict=True))
    assert flags == {
        "--served-model-name": "h2oai/h2ogpt-gm-oasst1-en-2048-falcon-40b-v2",
        "--revision": "0123456789abcdef0123456789abcdef01234567",
        "--tokenizer-revision": "0123456789abcdef0123456789abcdef01234567",
        "--max-num-seqs": "128",
        "--tensor-parallel-size": "1",
        "--max-model-len": "2048",
        "--host": "0.0.0.0",
        "--port": "8080",
        "--quantization": "bitsandbytes",
    }
    assert args[-2:] == ["--gpu-memory-utilization", "0.92"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = env_of(c)
    assert env["VLLM_NO_USAGE_STATS"] == "1"
    # a UID without a passwd entry: torch's inductor cache needs USER/LOGNAME or a cache dir of its own
    assert env["USER"] and env["LOGNAME"] and env["TORCHINDUCTOR_CACHE_DIR"].startswith("/tmp/")
    # finding 2: the stage pods get the vLLM endpoint and protocol, whatever the recipe says
    cs = cluster_yaml(rendered["vllm"])["teacher"]
    assert cs["url"] == f"http://{RELEASE}-teacher.{NAMESPACE}.svc:80/v1" and cs["backend"] == "openai-completions"


def test_teacher_disabled(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["no-teacher"]
    assert not objs(docs, "Deployment") and not objs(docs, "Service") and not objs(docs, "PersistentVolumeClaim")
    components = [np["metadata"]["labels"]["app.kubernetes.io/component"] for np in objs(docs, "NetworkPolicy")]
    assert components == ["controller", "stages"]
    # Nothing to scale: no Deployment permissions at all.
    assert not [r for r in rbac_rules(docs) if r[0] == "apps"]
    cs = cluster_yaml(docs)
    assert cs["teacher"]["deployment"] == "" and cs["teacher"]["url"] == "http://tgi.shared-inference.svc:80"
    assert one(docs, "Job", "controller")


def test_init_from_s3_pvc_mirror_and_token(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["init-s3"]
    dep = one(docs, "Deployment")
    spec = pod_spec(dep)
    (init,) = spec["initContainers"]
    assert init["image"] == "amazon/aws-cli:2.27.0"
    env = env_of(init)
    assert env["MODEL_URI"] == "s3://bezoar-ci/models/h2ogpt-falcon-40b/"
    assert env["AWS_ENDPOINT_URL_S3"] == env["BEZOAR_S3_ENDPOINT_URL"] == "http://seaweedfs.storage.svc:8333"
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == "/var/run/secrets/bezoar/s3/credentials"
    assert "addressing_style" in init["args"][0] and env["BEZOAR_S3_ADDRESSING_STYLE"] == "path"
    # an S3-compatible store: the aws CLI sends no checksums that are not required (bezoar_jobs/s3settings.py)
    assert env["AWS_REQUEST_CHECKSUM_CALCULATION"] == env["AWS_RESPONSE_CHECKSUM_VALIDATION"] == "when_required"
    assert "BEZOAR_S3_CHECKSUMS" not in env  # the stage pods pick the same for themselves
    assert {"name": "model-cache", "mountPath": "/data"} in init["volumeMounts"]
    (server,) = spec["containers"]
    args = server["args"]
    assert args[args.index("--model-id") + 1] == "/data/model" and "--revision" not in args
    senv = env_of(server)
    assert senv["HF_HUB_OFFLINE"] == "1"
    assert senv["HF_ENDPOINT"] == "https://hf-mirror.internal.example"
    assert senv["HF_TOKEN_PATH"] == "/var/run/secrets/bezoar/hf/token"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["hf-token"]["secret"]["secretName"] == "bezoar-hf"
    pvc = one(docs, "PersistentVolumeClaim")
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "250Gi"
    assert pvc["spec"]["storageClassName"] == "fast-ssd"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_the_s3_checksums_setting_reaches_the_stage_pods_the_controller_and_the_aws_cli(
        helm: tuple[str, dict[str, str]]) -> None:
    from bezoar_jobs.executors.cluster import parse_cluster_settings
    from bezoar_jobs.executors.pod import pod_spec as stage_pod

    docs = template(helm, *values_files("init-s3"), "--set", "clusterSettings.storage.s3Checksums=when_supported")
    init = pod_spec(one(docs, "Deployment"))["initContainers"][0]
    env = env_of(init)
    assert env["AWS_REQUEST_CHECKSUM_CALCULATION"] == env["AWS_RESPONSE_CHECKSUM_VALIDATION"] == "when_supported"
    assert env["BEZOAR_S3_CHECKSUMS"] == "when_supported"
    assert env_of(pod_spec(one(docs, "Job", "controller"))["containers"][0])["BEZOAR_S3_CHECKSUMS"] == "when_supported"
    cs = parse_cluster_settings(one(docs, "ConfigMap", "cluster-settings")["data"]["cluster.yaml"])
    assert cs.storage.s3Checksums == "when_supported"
    (stage,) = stage_pod("generate-orca", "s3://b/runs/r", cs, "bezoar-data", 1, None)["containers"]
    assert env_of(stage)["BEZOAR_S3_CHECKSUMS"] == "when_supported"
    # AWS itself (no endpoint): boto3's and the aws CLI's own defaults, nothing set
    docs = template(helm, *values_files("base"), "--set", "teacher.initFromS3.enabled=true",
                    "--set", "teacher.initFromS3.uri=s3://b/m/")
    env = env_of(pod_spec(one(docs, "Deployment"))["initContainers"][0])
    assert not {"AWS_REQUEST_CHECKSUM_CALCULATION", "BEZOAR_S3_CHECKSUMS"} & set(env)
    proc = run_helm(helm, "template", RELEASE, str(CHART), *values_files("base"),
                    "--set", "clusterSettings.storage.s3Checksums=sometimes")
    assert proc.returncode != 0 and "s3Checksums" in proc.stderr


def test_teacher_start_script_reads_the_token_file(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    # Run the container's real start script with a stand-in launcher: the token reaches the
    # server's environment from the mounted file, and every flag passes through untouched.
    (server,) = pod_spec(one(rendered["init-s3"], "Deployment"))["containers"]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    launcher = bindir / "text-generation-launcher"
    launcher.write_text('#!/bin/sh\nprintf "%s\\n" "HF_TOKEN=$HF_TOKEN" "$@"\n')
    launcher.chmod(0o755)
    token = tmp_path / "token"
    token.write_text("hf_secret_value")
    proc = subprocess.run(
        [*server["command"], *server["args"]],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": f"{bindir}:/usr/bin:/bin", "HF_TOKEN_PATH": str(token)},
    )
    lines = proc.stdout.splitlines()
    assert lines[0] == "HF_TOKEN=hf_secret_value"
    assert lines[1:] == server["args"][2:]


def test_cronjob_retraining(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    docs = rendered["cronjob"]
    cron = one(docs, "CronJob")
    assert cron["spec"]["schedule"] == "0 3 * * 0" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron["spec"]["timeZone"] == "Etc/UTC"
    (c,) = pod_spec(cron)["containers"]
    assert c["command"] == ["/bin/sh", "-c"]
    # finding 5: the run id came from `date` inside the pod, so a retried or preempted pod started a
    # second run beside the first. It comes from the Job's name now: the CronJob names the Job of a
    # tick <cronjob>-<scheduled minutes since the epoch> (kubernetes/pkg/controller/cronjob), and the
    # pod reads that name from its batch.kubernetes.io/job-name label.
    jn = next(e for e in c["env"] if e["name"] == "JOB_NAME")
    assert jn["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
    assert cron["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2, 4, 5]
    # Run the real script with a stand-in `bezoar` that prints its arguments, and a `date` that
    # would give away any use of the clock.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "bezoar").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (bindir / "bezoar").chmod(0o755)
    (bindir / "date").write_text('#!/bin/sh\ncase "$*" in *@*) exec /bin/date "$@";; esac\necho NOW-USED; exit 1\n')
    (bindir / "date").chmod(0o755)
    job_name = f"{cron['metadata']['name']}-29000000"  # the tick scheduled at 29000000 min = 2025-02-19 21:20 UTC

    def start(name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*c["command"], *c["args"]], capture_output=True, text=True,
                              env={"PATH": f"{bindir}:/usr/bin:/bin", "JOB_NAME": name})

    first, retried = start(job_name), start(job_name)  # two pods of the tick's Job
    assert first.returncode == 0, first.stderr
    got = first.stdout.splitlines()
    run_id = got[got.index("--run-id") + 1]
    assert run_id == "retrain-20250219-2120" and DNS_LABEL.match(run_id)
    assert retried.stdout == first.stdout  # the same run, never a second one beside it
    bad = start("not-a-cronjob-job")
    assert bad.returncode == 2 and "cannot read the scheduled time" in bad.stderr
    assert got == [
        "run",
        "--executor",
        "kubernetes",
        "--recipe",
        "/etc/bezoar/recipe.yaml",
        "--run",
        f"s3://bezoar-ci/runs/{run_id}",
        "--run-id",
        run_id,
        "--cluster",
        "/etc/bezoar/cluster.yaml",
        "--from",
        "generate-lamini",
    ]
    # The inline recipe: a ConfigMap per run id, projected next to cluster.yaml.
    recipe_cm = one(docs, "ConfigMap", "recipe")
    assert yaml.safe_load(recipe_cm["data"]["recipe.yaml"]) == {"schema_version": 1, "name": "ci-inline"}
    for w in (cron, one(docs, "Job")):
        (config,) = [v for v in pod_spec(w)["volumes"] if v["name"] == "config"]
        names = [s["configMap"]["name"] for s in config["projected"]["sources"]]
        assert names == [f"{RELEASE}-cluster-settings", recipe_cm["metadata"]["name"]]
    job_args = pod_spec(one(docs, "Job"))["containers"][0]["args"]
    assert job_args[job_args.index("--recipe") + 1] == "/etc/bezoar/recipe.yaml"
    assert job_args[-2:] == ["--from", "generate-lamini"]


def test_kueue_queue(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["kueue"]
    cs = cluster_yaml(docs)
    assert cs["kueue"]["queueName"] == "gpu-queue" and cs["priorityClassName"] == "batch-low"
    dep = one(docs, "Deployment")
    assert dep["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert spec_labels(dep)["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert pod_spec(dep)["priorityClassName"] == "inference-high"
    # The controller stays out of the GPU queue: it must run to admit anything at all.
    job = one(docs, "Job")
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]
    assert "kueue.x-k8s.io/queue-name" not in one(rendered["base"], "Deployment")["metadata"]["labels"]


def test_irsa_identities(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["irsa"]
    sa = one(docs, "ServiceAccount", "controller")
    runner = one(docs, "ServiceAccount", "runner")
    assert sa["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/bezoar-controller"
    }
    assert runner["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith("role/bezoar-runner")
    assert runner["automountServiceAccountToken"] is False
    assert sa["imagePullSecrets"] == runner["imagePullSecrets"] == [{"name": "regcred"}]
    cs = cluster_yaml(docs)
    assert cs["runnerServiceAccount"] == runner["metadata"]["name"]
    # No static keys: no credentials Secret mounted, no AWS_SHARED_CREDENTIALS_FILE.
    job_spec = pod_spec(one(docs, "Job"))
    assert "AWS_SHARED_CREDENTIALS_FILE" not in env_of(job_spec["containers"][0])
    assert all(v["name"] != "s3-credentials" for v in job_spec["volumes"])
    assert job_spec["imagePullSecrets"] == [{"name": "regcred"}]
    teacher_spec = pod_spec(one(docs, "Deployment"))
    assert teacher_spec["serviceAccountName"] == runner["metadata"]["name"]
    assert teacher_spec["imagePullSecrets"] == [{"name": "regcred"}]
    subjects = one(docs, "RoleBinding")["subjects"]
    assert {"kind": "Group", "name": "ci-bezoar", "apiGroup": "rbac.authorization.k8s.io"} in subjects


def test_dev_secrets_match_the_references(rendered: dict[str, list[dict[str, Any]]]) -> None:
    secrets = {s["metadata"]["name"]: s["stringData"] for s in objs(rendered["dev-secrets"], "Secret")}
    assert set(secrets) == {"bezoar-s3", "bezoar-hf", "bezoar-judges"}
    assert "aws_access_key_id = dev" in secrets["bezoar-s3"]["credentials"]
    assert secrets["bezoar-hf"] == {"token": "hf_dev_token"}
    assert secrets["bezoar-judges"] == {"openai": "sk-dev", "anthropic": "ant-dev"}
    # The settings the stage pods get reference exactly these names and keys.
    ClusterSettings.model_validate(cluster_yaml(rendered["dev-secrets"]))


# ---------------------------------------------------------------------------------------------
# Invalid values fail with the chart's own message
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["teacher.server=sglang"], 'teacher.server must be tgi or vllm, not "sglang"'),
        (["run.id=Bad_Run"], 'run.id "Bad_Run" is not a DNS label'),
        (["run.id=" + "a" * 64], f'run.id "{"a" * 64}" is not a DNS label'),
        (["teacher.gpus=0"], "teacher.gpus must be at least 1 while teacher.enabled"),
        (["teacher.numShards=4"], "teacher.gpus (2) must be at least teacher.numShards (4)"),
        (["run.baseUri=", "run.uri="], "set run.uri"),  # the paper values turn the runStore off
        (["run.recipeInline=a: 1"], "set only one of run.recipe and run.recipeInline"),
        (["retrain.schedule=0 3 * * 0", "run.baseUri=", "run.uri=s3://b/r/x"],
         "retrain.schedule needs run.baseUri or runStore"),
        (["teacher.initFromS3.enabled=true"], "teacher.initFromS3.uri must be an s3:// prefix"),
        (["teacher.cache.type=hostPath"], "teacher.cache.type must be emptyDir or pvc"),
        (
            ["clusterSettings.namespace=elsewhere"],
            'clusterSettings.namespace "elsewhere" differs from the release namespace',
        ),
        (["serviceAccount.create=false"], "serviceAccount.name is required"),
        (["teacher.replicas=2", "teacher.cache.type=pvc"], "teacher.replicas > 1 with teacher.cache.type pvc"),
    ],
)
def test_invalid_values_fail_with_our_message(helm: tuple[str, dict[str, str]], sets: list[str], message: str) -> None:
    args = [a for s in sets for a in ("--set", s)]
    proc = run_helm(helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, *values_files("base"), *args)
    assert proc.returncode != 0
    assert f"openbezoar: {message}" in proc.stderr, proc.stderr


def test_schema_refuses_unknown_and_mistyped_values(helm: tuple[str, dict[str, str]]) -> None:
    for sets, message in (
        (["teacher.gpu=1"], "additional properties 'gpu' not allowed"),
        (["clusterSettings.kueue.queue=x"], "additional properties 'queue' not allowed"),
        (["teacher.gpus=two"], "/teacher/gpus"),
        (["teacher.replica=2"], "additional properties 'replica' not allowed"),
        (["teacher.replicas=0"], "/teacher/replicas"),
        (["teacher.cache.size=200G"], "/teacher/cache/size"),
        (["teacher.image.tgi.digest=latest"], "/teacher/image/tgi/digest"),
    ):
        args = [a for s in sets for a in ("--set", s)]
        proc = run_helm(helm, "template", RELEASE, str(CHART), *values_files("base"), *args)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------
# The chart refuses at install time what the controller refuses in the cluster
# ---------------------------------------------------------------------------------------------
# The audit: `helm lint`/`helm template` accepted values that ClusterSettings (or the run store, or the
# recipe loader) refuses only once the controller pod reads them. values.schema.json now mirrors the
# model field by field; the checks across keys are `fail`s in openbezoar.validate (_helpers.tpl).
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
# values outside clusterSettings that the chart fills into it: where they land
FILLED_INTO = {
    "runnerServiceAccount.name": "runnerServiceAccount",
    "runStore.existingClaim": "storage.runVolume.claimName",
    "teacher.maxConcurrentRequests": "teacher.maxConcurrentRequests",
}


def set_path(node: Any, path: tuple[Any, ...], value: Any) -> None:
    """node[path] = value, making the mappings and list items on the way."""
    for key, nxt in zip(path, (*path[1:], None), strict=True):
        if isinstance(node, list):
            node.extend({} for _ in range(key + 1 - len(node)))
        elif key not in node:
            node[key] = {}
        if nxt is None:
            node[key] = value
        else:
            node = node[key]


def as_helm_renders(value: Any) -> Any:
    """A value as the chart's toYaml writes it: Helm holds numbers as float64 and writes a whole one
    (below 1e21) as an integer, so 1e12 or 2.0 in the values reach the controller as ints
    (test_whole_floats_in_the_values_render_as_ints_the_strict_model_takes)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return int(value)
    if isinstance(value, dict):
        return {k: as_helm_renders(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_helm_renders(v) for v in value]
    return value


def refused_by_the_model(cs: dict[str, Any]) -> bool:
    try:
        ClusterSettings.model_validate(cs)
    except ValueError:  # pydantic's ValidationError
        return True
    return False


@pytest.mark.parametrize(
    ("key", "value", "message", "extra"),
    [
        # the audit's findings
        ("clusterSettings.scheduling.data.resources.limits.cpu", "two", None, []),
        ("clusterSettings.stageOverrides.dpoo.priorityClassName", "x",
         "at '/clusterSettings/stageOverrides': additional properties 'dpoo' not allowed", []),
        ("clusterSettings.stageOverrides.dpo.priorityClassName", "x",
         "at '/clusterSettings/stageOverrides/dpo': additional properties 'priorityClassName' not allowed", []),
        ("clusterSettings.teacher.maxConcurrentRequests", 2,
         "openbezoar: clusterSettings.teacher.maxConcurrentRequests (2) cannot be divided among the 3 pods", []),
        ("clusterSettings.images.tag", "bad tag!", None, []),
        # the other gaps between the schema and the model
        ("clusterSettings.scheduling.data.resources.requests.cpu", 1000000, None, []),  # %g: "1e+06"
        ("clusterSettings.scheduling.train.resources.limits.memory", -1, None, []),
        ("clusterSettings.scheduling.eval.resources.requests", {"GPU count": "1"},
         "at '/clusterSettings/scheduling/eval/resources/requests': additional properties 'GPU count'", []),
        ("clusterSettings.scheduling.data.shmSize", "1 Gi", None, []),
        ("clusterSettings.scheduling.report.ephemeralStorage", "lots", None, []),
        ("clusterSettings.scheduling.train.tolerations",
         [{"key": "nvidia.com/gpu", "operator": "Exists", "value": "x"}],
         "at '/clusterSettings/scheduling/train/tolerations/0/value'", []),
        ("clusterSettings.scheduling.train.tolerations",
         [{"key": "k", "effect": "NoSchedule", "tolerationSeconds": 60}],
         "at '/clusterSettings/scheduling/train/tolerations/0/effect'", []),
        ("clusterSettings.scheduling.data.tolerations", [{"operator": "Equals"}],
         "at '/clusterSettings/scheduling/data/tolerations/0/operator'", []),
        ("clusterSettings.scheduling.eval.tolerations", [{"keys": "k"}],
         "at '/clusterSettings/scheduling/eval/tolerations/0': additional properties 'keys'", []),
        ("clusterSettings.stageOverrides.dpo.gpus", -1, None, []),
        ("clusterSettings.stageOverrides.sft-hh.resources.limits.memory", "96 GB", None, []),
        ("clusterSettings.stageOverrides.generate-lamini.nodes", 2, None, []),
        ("clusterSettings.stageOverrides.eval-harness.processesPerNode", 2, None, []),
        ("clusterSettings.images.tag", "-rc1", None, []),
        ("clusterSettings.runnerServiceAccount", "Runner_SA", None, []),
        ("clusterSettings.imagePullSecrets", ["Reg_Cred"], "at '/clusterSettings/imagePullSecrets/0'", []),
        ("clusterSettings.storage.runVolume.claimName", "Runs!", None, []),
        ("clusterSettings.storage.cacheVolume.claimName", "cache pvc", None, []),
        ("clusterSettings.secrets.s3.name", "S3-Creds", None, []),
        ("clusterSettings.secrets.s3.credentialsFileKey", "aws/credentials", None, []),
        ("clusterSettings.secrets.hfToken.name", "hf_token", None, []),
        ("clusterSettings.secrets.hfToken.key", "hf token", None, []),
        ("clusterSettings.secrets.apiKeys", [{"env": "OPENAI_API_KEY", "name": "Judges", "key": "api-key"}],
         "at '/clusterSettings/secrets/apiKeys/0/name'", []),
        ("clusterSettings.secrets.apiKeys", [{"env": "OPENAI_API_KEY", "name": "", "key": "a:b"}],
         "at '/clusterSettings/secrets/apiKeys/0/key'", []),
        ("clusterSettings.secrets.apiKeys",
         [{"env": "K", "name": "", "key": "x"}, {"env": "K", "name": "", "key": "y"}],
         'openbezoar: clusterSettings.secrets.apiKeys lists env "K" more than once', []),
        ("clusterSettings.teacher.deployment", "Teacher", None, []),
        ("clusterSettings.generationShards", 50,
         "cannot be divided among the 150 pods that call the teacher at once (3 stages x "
         "clusterSettings.generationShards 50)", []),
        ("clusterSettings.generationShards", 1001, None, ["teacher.enabled=false"]),
        ("clusterSettings.priorityClassName", "High_Priority", None, []),
        ("clusterSettings.kueue.queueName", "gpu queue", None, []),
        ("clusterSettings.jobs.gpuResourceName", "nvidia gpu", None, []),
        ("clusterSettings.sizing.modelParamsB", 20000, None, []),
        ("clusterSettings.distributed.trainingRuntime", "Torch_H100", None, []),
        # values the chart fills into the cluster settings
        ("teacher.maxConcurrentRequests", 2, "openbezoar: clusterSettings.teacher.maxConcurrentRequests (2, filled "
         "from teacher.maxConcurrentRequests 2 x teacher.replicas 1)", []),
        ("runnerServiceAccount.name", "Runner_SA", None, ["runnerServiceAccount.create=true"]),
        ("runStore.existingClaim", "Runs_PVC", None, ["runStore.enabled=true", "run.baseUri="]),
    ],
)
def test_cluster_settings_the_controller_refuses_fail_at_template_time(
        helm: tuple[str, dict[str, str]], rendered: dict[str, list[dict[str, Any]]],
        key: str, value: Any, message: str | None, extra: list[str]) -> None:
    extra_args = [a for s in extra for a in ("--set", s)]
    # The controller refuses it: the ConfigMap the chart renders without it, with this one value.
    cs = cluster_yaml(template(helm, *values_files("base"), *extra_args) if extra else rendered["base"])
    assert not refused_by_the_model(cs)
    set_path(cs, tuple(FILLED_INTO.get(key, key.removeprefix("clusterSettings.")).split(".")), copy.deepcopy(value))
    assert refused_by_the_model(cs), f"ClusterSettings accepts {key}={value!r}: not a case for this test"
    # The chart refuses it, and the message names the key.
    proc = run_helm(helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, *values_files("base"), *extra_args,
                    "--set-json", f"{key}={json.dumps(value)}")
    assert proc.returncode != 0, f"helm template accepts {key}={value!r}"
    assert (message or f"at '/{key.replace('.', '/')}'") in proc.stderr, proc.stderr


def test_run_locations_and_recipes_the_controller_refuses_fail_at_template_time(
        helm: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    """run.uri / run.baseUri: what bezoar_jobs.store.open_store opens (a path, file://, s3://bucket/...);
    run.recipe: what recipe.load_recipe reads (a path, file://, s3://bucket/key); run.recipeInline: a
    YAML mapping with the schema_version recipe.parse_recipe reads. Each refused value is refused by
    that code first; each accepted one renders."""
    from bezoar_jobs.errors import BadInput
    from bezoar_jobs.recipe import SCHEMA_VERSION, load_recipe, parse_recipe
    from bezoar_jobs.store import open_store

    def helm_template(sets: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        args = [a for k, v in sets.items() for a in ("--set-json", f"{k}={json.dumps(v)}")]
        return run_helm(helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, *values_files("base"), *args)

    inline = {"run.recipe": ""}
    refused = [
        ({"run.uri": "http://x/y"}, "at '/run/uri'", lambda: open_store("http://x/y")),
        ({"run.uri": "s3:///runs/x"}, "at '/run/uri'", lambda: open_store("s3:///runs/x")),
        ({"run.uri": "gs://bucket/runs/x"}, "at '/run/uri'", lambda: open_store("gs://bucket/runs/x")),
        ({"run.baseUri": "https://bucket/runs"}, "at '/run/baseUri'", lambda: open_store("https://bucket/runs/ci-run-1")),
        ({"run.recipe": "s3://bucket"}, "at '/run/recipe'", lambda: load_recipe("s3://bucket")),
        ({"run.recipe": "https://example.com/recipe.yaml"}, "at '/run/recipe'",
         lambda: load_recipe("https://example.com/recipe.yaml")),
        ({**inline, "run.recipeInline": "a: ["}, "openbezoar: run.recipeInline is not a YAML mapping",
         lambda: parse_recipe("a: [")),
        ({**inline, "run.recipeInline": "- a\n- b\n"}, "openbezoar: run.recipeInline is not a YAML mapping",
         lambda: parse_recipe("- a\n- b\n")),
        ({**inline, "run.recipeInline": "name: x\n"}, "openbezoar: run.recipeInline: schema_version is missing",
         lambda: parse_recipe("name: x\n")),
        ({**inline, "run.recipeInline": f"schema_version: {SCHEMA_VERSION + 1}\n"},
         f"openbezoar: run.recipeInline: schema_version must be {SCHEMA_VERSION} ",
         lambda: parse_recipe(f"schema_version: {SCHEMA_VERSION + 1}\n")),
    ]
    for sets, message, controller in refused:
        with pytest.raises(BadInput):
            controller()
        proc = helm_template(sets)
        assert proc.returncode != 0 and message in proc.stderr, (sets, proc.stderr)
    demo = (REPO / "recipes" / "demo.yaml").read_text()
    parse_recipe(demo)
    for sets in ({"run.uri": "s3://bucket/runs/x"}, {"run.uri": "S3://bucket/runs/x"}, {"run.uri": "/runs/x"},
                 {"run.uri": "file:///runs/x"}, {"run.baseUri": "s3://bucket"}, {"run.baseUri": "/runs"},
                 {"run.recipe": "/etc/recipes/r.yaml"}, {"run.recipe": "file:///etc/recipes/r.yaml"},
                 {"run.recipe": "s3://bucket/recipes/r.yaml"}, {**inline, "run.recipeInline": demo}):
        proc = helm_template(sets)
        assert proc.returncode == 0, (sets, proc.stderr)
    s3 = open_store("S3://bucket/runs/x")  # urlparse lower-cases the scheme
    assert s3.uri == "s3://bucket/runs/x"


def test_teacher_capacity_check_is_the_models(helm: tuple[str, dict[str, str]],
                                             rendered: dict[str, list[dict[str, Any]]]) -> None:
    """ClusterSettings refuses a teacher capacity the pods of the teacher-calling stages cannot divide;
    the template's check has the same bound (its stage count is cluster.TEACHER_STAGES')."""
    from bezoar_jobs.executors.cluster import TEACHER_STAGES

    for shards in (1, 2):
        bound = len(TEACHER_STAGES) * shards
        for cap in (bound - 1, bound):
            cs = cluster_yaml(rendered["base"])
            cs["teacher"]["maxConcurrentRequests"], cs["generationShards"] = cap, shards
            proc = run_helm(helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, *values_files("base"),
                            "--set", f"clusterSettings.teacher.maxConcurrentRequests={cap}",
                            "--set", f"clusterSettings.generationShards={shards}")
            assert (proc.returncode != 0) == refused_by_the_model(cs) == (cap < bound), (cap, shards, proc.stderr)


def test_whole_floats_in_the_values_render_as_ints_the_strict_model_takes(
        helm: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    """ClusterSettings' ints are strict (2.0, true and "2" are refused). Helm reads the values as float64
    and its toYaml writes a whole number as an integer, so a value file with 2.0 or 1e12 still renders
    settings the controller loads; the chart's own fills (teacher.replicas, maxConcurrentRequests,
    readyTimeoutSeconds) are computed with int/mul/add and render as integers too."""
    values = tmp_path / "floats.yaml"
    values.write_text(
        "clusterSettings:\n  generationShards: 2.0\n  jobs: {ttlSecondsAfterFinished: 1e12}\n"
        "  teacher: {leaseSeconds: 600.0}\n  sizing: {modelParamsB: 7.0}\n"
        "  distributed: {port: 29500.0}\n  scheduling: {train: {gpus: 8.0, nodes: 2.0}}\n"
        "teacher: {replicas: 2.0, maxConcurrentRequests: 64.0, startupTimeoutSeconds: 600.0}\n"
    )
    docs = template(helm, *values_files("base"), "-f", str(values))
    text = one(docs, "ConfigMap", "cluster-settings")["data"]["cluster.yaml"]
    cs = parse_cluster_settings(text, "cluster.yaml")
    assert (cs.generationShards, cs.jobs.ttlSecondsAfterFinished, cs.teacher.leaseSeconds) == (2, 10**12, 600)
    assert (cs.distributed.port, cs.scheduling.train.gpus, cs.scheduling.train.nodes) == (29500, 8, 2)
    assert (cs.teacher.replicas, cs.teacher.maxConcurrentRequests, cs.teacher.readyTimeoutSeconds) == (2, 128, 1500)
    assert cs.sizing.modelParamsB == 7.0
    assert re.search(r"^generationShards: 2$", text, re.M)  # written as an int
    assert not re.search(r": -?[0-9]+\.0$", text, re.M), text  # no whole number written as a float


@pytest.mark.parametrize(
    ("line", "message"),
    [("schema_version: 1.0", 'run.recipeInline: schema_version must be the integer 1, not "1.0"'),
     ("schema_version: 1.", 'run.recipeInline: schema_version must be the integer 1, not "1."'),
     ("schema_version: 1e0", 'run.recipeInline: schema_version must be the integer 1, not "1e0"'),
     ('schema_version: "1"', 'run.recipeInline: schema_version must be 1 (the recipe format the controller reads), '
                             'not "1"'),
     ("schema_version: '1'", 'run.recipeInline: schema_version must be 1 (the recipe format the controller reads), '
                             'not "1"'),
     ("schema_version: 1", None),
     ("schema_version: 1   # the recipe format", None)],
)
def test_an_inline_recipe_schema_version_must_be_the_int_1(
        helm: tuple[str, dict[str, str]], line: str, message: str | None) -> None:
    """Helm's fromYaml makes every number a float64, so the chart's check took schema_version: 1.0,
    which the controller's recipe loader refuses (it reads the int 1). The chart now checks how the
    value is written too: refused at template time exactly when parse_recipe refuses it."""
    from bezoar_jobs.errors import BadInput
    from bezoar_jobs.recipe import parse_recipe

    demo = (REPO / "recipes" / "demo.yaml").read_text()
    assert "\nschema_version: 1\n" in demo
    recipe = demo.replace("\nschema_version: 1\n", f"\n{line}\n")
    proc = run_helm(helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, *values_files("base"),
                    "--set-json", 'run.recipe=""', "--set-json", f"run.recipeInline={json.dumps(recipe)}")
    if message is None:
        parse_recipe(recipe)
        assert proc.returncode == 0, proc.stderr
        docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
        assert one(docs, "ConfigMap", "recipe")["data"]["recipe.yaml"] == recipe
    else:
        with pytest.raises(BadInput, match="schema_version"):
            parse_recipe(recipe)
        assert proc.returncode != 0
        assert f"openbezoar: {message}" in proc.stderr, proc.stderr


def test_an_inline_recipe_in_flow_style_is_checked_too(helm: tuple[str, dict[str, str]]) -> None:
    for recipe, ok in (("{schema_version: 1.0, name: x}", False), ("{name: x, schema_version: 1}", True)):
        proc = run_helm(helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, *values_files("base"),
                        "--set-json", 'run.recipe=""', "--set-json", f"run.recipeInline={json.dumps(recipe)}")
        assert (proc.returncode == 0) == ok, proc.stderr
        assert ok or 'schema_version must be the integer 1, not "1.0"' in proc.stderr


# Probe values: each is put at every key of the cluster settings in turn.
PROBES: tuple[Any, ...] = (
    "", "a", "x", "two", "1", "0.5", "500m", "8Gi", "1 Gi", "1e3", "-1", "auto", "Bad_Name", "bad name", "a.b",
    "a/b", "nvidia.com/gpu", "-a", "a-", ".a", "é", "x" * 64, "x" * 129, "x" * 254, "sha256:" + "0" * 64,
    "sha256:abc", "Always", "job", "dns", "tgi", "path", "Exists", "NoExecute", "/runs", "runs", "OPENAI_API_KEY",
    -1, 0, 1, 2, 29, 30, 1023, 1024, 65535, 65536, 1000, 1001, 10000, 10001, 0.5, 1.5, 0.00001, 999999, 1000000,
    1e12, 10**20, True, None, [], {},
)
# ClusterSettings' checks across keys: template fails, tested with helm above
TEMPLATE_CHECKED = {("teacher", "maxConcurrentRequests")}


def probe_targets(cs: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Every key of the cluster settings, list items and mapping keys included."""
    from bezoar_jobs.executors.cluster import ALL_STAGES, SchedulingOverride, Toleration

    out = [p for p in leaf_paths(cs) if not isinstance(dig(cs, p), list | dict)]
    out += [("imagePullSecrets", 0), *(("secrets", "apiKeys", 0, k) for k in ("env", "name", "key"))]
    for fam in cs["scheduling"]:
        out += [("scheduling", fam, "tolerations", 0, k) for k in Toleration.model_fields]
        out += [("scheduling", fam, "resources", part, "<key>") for part in ("requests", "limits")]
    for stage in (*ALL_STAGES, "dpoo", "DPO"):
        out += [("stageOverrides", stage), ("stageOverrides", stage, "priorityClassName")]
        out += [("stageOverrides", stage, k) for k in SchedulingOverride.model_fields]
    return out


def dig(node: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        node = node[k]
    return node


def across_resources(cs: dict[str, Any], path: tuple[Any, ...]) -> bool:
    """Whether the settings break a rule across a family's resources (a request above its limit, a GPU requested
    without a limit equal to it): JSON Schema cannot say it, the chart's template checks it
    (test_the_template_refuses_the_resources_the_api_server_refuses)."""
    from bezoar_jobs.executors.k8s_types import _quantity, resources_problem

    if path[:1] != ("scheduling",) or "resources" not in path:
        return False
    res = cs["scheduling"][path[1]].get("resources") or {}

    def quantities(part: str) -> dict[str, str]:  # as the model takes each value (a number as %g)
        return {k: _quantity(v) for k, v in (res.get(part) or {}).items()}

    try:
        return resources_problem(quantities("requests"), quantities("limits")) is not None
    except (AssertionError, ValueError, TypeError, ZeroDivisionError):  # a malformed quantity: the schema's to refuse
        return False


def test_the_schema_refuses_every_cluster_setting_the_model_refuses(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Property check over every key x PROBES (and combinations the model checks across fields): where
    ClusterSettings refuses the settings the chart renders with that value, values.schema.json refuses
    them too (jsonschema here; helm validates with the same draft-07 schema)."""
    import jsonschema

    # one validator per key of clusterSettings (the schema has no rule across them): fast
    cs_schema = SCHEMA["properties"]["clusterSettings"]
    validators = {k: jsonschema.Draft7Validator({**node, "definitions": SCHEMA.get("definitions", {})})
                  for k, node in cs_schema["properties"].items()}
    base = cluster_yaml(rendered["default"])
    assert set(base) == set(validators) and cs_schema["additionalProperties"] is False
    cases: list[tuple[tuple[Any, ...], Any]] = [(p, v) for p in probe_targets(base) for v in PROBES]
    cases += [(("scheduling", "train", "tolerations"), [t]) for t in (
        {"operator": "Exists", "value": "x"}, {"operator": "Exists", "value": ""}, {"operator": "Equal", "value": "x"},
        {"tolerationSeconds": 60}, {"tolerationSeconds": 60, "effect": "NoExecute"},
        {"tolerationSeconds": 60, "effect": "NoSchedule"}, {"tolerationSeconds": None, "effect": "NoSchedule"})]
    missed = []
    for path, value in cases:
        cs = {**base, path[0]: copy.deepcopy(base[path[0]])}
        if path[-1] == "<key>":  # a probe as a resource name
            if not isinstance(value, str):
                continue
            path, value = path[:-1], {value: "1"}
        if path == ("namespace",) and not value:
            continue  # the chart fills the release namespace
        set_path(cs, path, as_helm_renders(copy.deepcopy(value)))
        if path in TEMPLATE_CHECKED and isinstance(value, int) and value > 0:
            continue
        if refused_by_the_model(cs) and validators[path[0]].is_valid(cs[path[0]]):
            if across_resources(cs, path):
                continue  # a rule across keys (a request above its limit): the template's, tested below
            missed.append(f"clusterSettings.{'.'.join(map(str, path))} = {value!r}")
    assert not missed, "the schema accepts what ClusterSettings refuses:\n" + "\n".join(missed)


@pytest.mark.parametrize(("values", "message"), [
    ({"scheduling": {"train": {"resources": {"requests": {"memory": "200Gi"}}}}},
     "clusterSettings.scheduling.train.resources: requests.memory 200Gi is more than limits.memory "),
    ({"scheduling": {"data": {"resources": {"limits": {"cpu": "100m"}}}}},
     "clusterSettings.scheduling.data.resources: requests.cpu "),
    ({"scheduling": {"data": {"resources": {"requests": {"nvidia.com/gpu": 1}}}}},
     "clusterSettings.scheduling.data.resources: requests.nvidia.com/gpu 1 needs limits.nvidia.com/gpu equal"),
    ({"scheduling": {"eval": {"resources": {"requests": {"example.com/fpga": 1}, "limits": {"example.com/fpga": 2}}}}},
     "clusterSettings.scheduling.eval.resources: requests.example.com/fpga 1 must equal limits.example.com/fpga 2"),
    ({"scheduling": {"report": {"resources": {"limits": {"example.com/fpga": "500m"}}}}},
     "clusterSettings.scheduling.report.resources: example.com/fpga: an extended resource must be a whole number "
     "(got 500m)"),
    ({"stageOverrides": {"sft-hh": {"resources": {"limits": {"cpu": "100m"}}}}},
     "clusterSettings.stageOverrides.sft-hh.resources (merged onto scheduling.train): requests.cpu "),
    ({"scheduling": {"train": {"resources": {"limits": {"memory": "64Gi", "cpu": 8},
                                             "requests": {"memory": "64Gi", "cpu": "8000m"}}}},
      "stageOverrides": {"sft-hh": {"resources": {"limits": {"memory": "96Gi"}}}}}, None),
])
def test_the_template_refuses_the_resources_the_api_server_refuses(
        helm: tuple[str, dict[str, str]], tmp_path: Path, values: dict[str, Any], message: str | None) -> None:
    """A request above its limit (the family's requests merged in), a GPU requested without a limit or other than
    it, a fractional extended resource: the API server refuses such a Job (422) when the controller creates it,
    hours into a run. ClusterSettings refuses them when it loads (tests/test_cluster_strict.py), and the chart
    when it renders (JSON Schema cannot compare two keys: the template does, with the same rules)."""
    f = tmp_path / "v.yaml"
    f.write_text(yaml.safe_dump({"clusterSettings": values}))
    proc = run_helm(helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, *values_files("base"), "-f", str(f))
    if message is None:
        assert proc.returncode == 0, proc.stderr
        cs = parse_cluster_settings(one([d for d in yaml.safe_load_all(proc.stdout) if d], "ConfigMap",
                                        "cluster-settings")["data"]["cluster.yaml"], "cluster.yaml")
        assert cs.scheduling_for("sft-hh").resources.limits["memory"] == "96Gi"
        return
    assert proc.returncode != 0 and f"openbezoar: {message}" in proc.stderr, proc.stderr
    assert "is more than limits" in proc.stderr or "never overcommitted" in proc.stderr \
        or "whole number" in proc.stderr, proc.stderr


def test_schema_enums_and_bounds_follow_the_model() -> None:
    """Enums (Literal), numeric bounds and the stage names of values.schema.json's clusterSettings are
    the ClusterSettings model's, both ways: a launcher, a stage or a bound added to the model must be
    added to the schema, and the schema names no key the model lacks."""
    import types
    import typing

    import annotated_types
    from pydantic import BaseModel

    from bezoar_jobs.executors.cluster import ALL_STAGES, STAGE_FAMILIES, SchedulingOverride

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        ref = node.get("$ref")
        return dig(SCHEMA, tuple(ref.removeprefix("#/").split("/"))) if ref else node

    def parts(annotation: Any) -> tuple[Any, list[Any]]:
        """The annotation without None and Annotated, and the constraints Annotated carried."""
        meta: list[Any] = []
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) == 1:
                annotation = args[0]
        if typing.get_origin(annotation) is typing.Annotated:
            for m in annotation.__metadata__:
                meta += getattr(m, "metadata", [m])
            annotation = typing.get_args(annotation)[0]
        return annotation, meta

    checked: list[str] = []

    def compare(model: type[BaseModel], node: dict[str, Any], where: str) -> None:
        node = resolve(node)
        props = node["properties"]
        unknown = set(props) - set(model.model_fields)
        assert not unknown, f"{where}: the schema names {unknown}, not fields of {model.__name__}"
        for name, field in model.model_fields.items():
            if name not in props:
                continue  # the schema may be stricter (e.g. nodes on the train family only)
            sub, at = resolve(props[name]), f"{where}.{name}"
            ann, meta = parts(field.annotation)
            meta += field.metadata
            if typing.get_origin(ann) is typing.Literal:
                assert set(sub["enum"]) - {None} == set(typing.get_args(ann)) - {None}, at
                checked.append(at)
            for m in meta:
                if isinstance(m, annotated_types.Ge):
                    assert sub.get("minimum") == m.ge, at
                elif isinstance(m, annotated_types.Gt):
                    assert sub.get("exclusiveMinimum") == m.gt or (ann is int and sub.get("minimum") == m.gt + 1), at
                elif isinstance(m, annotated_types.Le):
                    assert sub.get("maximum") == m.le, at
                else:
                    continue
                checked.append(at)
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                compare(ann, sub, at)
            elif typing.get_origin(ann) is tuple:
                item, _ = parts(typing.get_args(ann)[0])
                if isinstance(item, type) and issubclass(item, BaseModel):
                    compare(item, sub["items"], f"{at}[]")

    compare(ClusterSettings, SCHEMA["properties"]["clusterSettings"], "clusterSettings")
    # stageOverrides: the registry's stages, each a SchedulingOverride; nodes > 1 on training stages only
    over = SCHEMA["properties"]["clusterSettings"]["properties"]["stageOverrides"]
    assert over["additionalProperties"] is False
    (every, not_train) = over["patternProperties"].items()
    assert every[0] == "^(" + "|".join(ALL_STAGES) + ")$"
    assert not_train[0] == "^(" + "|".join(s for s in ALL_STAGES if STAGE_FAMILIES[s] != "train") + ")$"
    compare(SchedulingOverride, every[1], "clusterSettings.stageOverrides.<stage>")
    assert {"clusterSettings.distributed.launcher", "clusterSettings.generationShards",
            "clusterSettings.sizing.modelParamsB", "clusterSettings.teacher.leaseSeconds",
            "clusterSettings.scheduling.train.tolerations[].effect"} <= set(checked)


def test_digest_pins_replace_tags_and_lift_the_skips(helm: tuple[str, dict[str, str]]) -> None:
    digest = "sha256:" + "ab" * 32
    docs = template(
        helm,
        *values_files("base"),
        "--set",
        f"teacher.image.tgi.digest={digest}",
        "--set",
        f"clusterSettings.images.digests.controller={digest}",
        "--set",
        f"clusterSettings.images.digests.train={digest}",
    )
    for w in workloads(docs):
        for c in pod_spec(w)["containers"]:
            assert c["image"].endswith(f"@{digest}"), c["image"]
        skipped = " ".join(w["metadata"].get("annotations", {}).values())
        assert "CKV_K8S_43" not in skipped and "CKV_K8S_15" not in skipped
    # finding 8: the stage images pin through the same settings the controller builds Jobs from
    from bezoar_jobs.executors.jobs import build_job

    cs = ClusterSettings.model_validate(cluster_yaml(docs))
    assert build_job("dpo", "s3://b/r", "r", cs)["spec"]["template"]["spec"]["containers"][0]["image"] == (
        f"ghcr.io/example/bezoar-jobs/bezoar-train@{digest}")


def test_long_release_and_run_id_names_fit(helm: tuple[str, dict[str, str]]) -> None:
    run_id = "r" * 63
    proc = run_helm(
        helm,
        "template",
        "a-very-long-release-name-for-openbezoar-testing",
        str(CHART),
        "-n",
        NAMESPACE,
        *values_files("base"),
        "--set",
        f"run.id={run_id}",
    )
    assert proc.returncode == 0, proc.stderr
    for d in yaml.safe_load_all(proc.stdout):
        if d:
            assert len(d["metadata"]["name"]) <= 63 and DNS_LABEL.match(d["metadata"]["name"]), d["metadata"]["name"]


# ---------------------------------------------------------------------------------------------
# values.yaml, the schema, versions
# ---------------------------------------------------------------------------------------------
def leaf_paths(node: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(node, dict) and node:
        out = []
        for k, v in node.items():
            out += leaf_paths(v, (*prefix, k))
        return out
    return [prefix]


def schema_at(schema: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    node = schema
    for key in path:
        props = node.get("properties", {})
        patterns = [s for p, s in node.get("patternProperties", {}).items() if re.search(p, key)]
        if key in props:
            node = props[key]
        elif patterns:
            node = patterns[0]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        elif "properties" not in node and node.get("additionalProperties", True) is not False:
            return node  # a free-form object (e.g. a securityContext): typed as a whole
        else:
            return None
    return node


def test_schema_covers_every_value_and_nothing_else() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    for path in leaf_paths(VALUES):
        assert schema_at(schema, path) is not None, f"{'.'.join(path)} is not in values.schema.json"

    # Every object the schema spells out refuses unknown keys, and every key it names has a default.
    def walk(node: dict[str, Any], path: tuple[str, ...]) -> None:
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{'.'.join(path) or 'root'} accepts unknown keys"
            default = VALUES
            for k in path:
                default = default[k]
            extra = set(node["properties"]) - set(default) - {"global"}
            assert not extra, f"schema names {sorted(extra)} under {'.'.join(path)} with no default in values.yaml"
            for k, sub in node["properties"].items():
                if k != "global":
                    walk(sub, (*path, k))

    walk(schema, ())


def test_every_value_is_documented() -> None:
    # Each key in values.yaml carries a comment on the line(s) just above it, unless an ancestor's
    # "# --" comment documents its whole block (e.g. a resources or securityContext mapping).
    lines = (CHART / "values.yaml").read_text().splitlines()
    key_re = re.compile(r"^(\s*)(-\s+)?([A-Za-z][\w./-]*):")
    stack: list[tuple[int, bool]] = []  # (indent, documents its whole block)
    undocumented = []
    in_list_item_indent: int | None = None
    for i, line in enumerate(lines):
        m = key_re.match(line)
        if not m or line.lstrip().startswith("#"):
            continue
        indent = len(m.group(1))
        if in_list_item_indent is not None and indent > in_list_item_indent:
            continue  # keys inside a list item are the item's content, documented by the list's key
        in_list_item_indent = None
        if m.group(2):
            in_list_item_indent = indent
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        above = lines[i - 1].strip() if i else ""
        documented = above.startswith("#")
        whole_block = documented and any(ln.strip().startswith("# --") for ln in _comment_block(lines, i))
        if not documented and not any(block for _, block in stack):
            undocumented.append(f"line {i + 1}: {m.group(3)}")
        stack.append((indent, whole_block))
    assert not undocumented, "undocumented values:\n" + "\n".join(undocumented)


def _comment_block(lines: list[str], i: int) -> list[str]:
    out = []
    j = i - 1
    while j >= 0 and lines[j].strip().startswith("#"):
        out.append(lines[j])
        j -= 1
    return out


def test_versions_move_together() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    package = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert chart["version"] == chart["appVersion"] == package == bezoar_jobs.__version__
    assert VALUES["clusterSettings"]["images"]["tag"] == package == ClusterSettings().images.tag


def test_no_hyperparameters_in_values() -> None:
    # Machine-learning knobs live in the recipe only.
    text = json.dumps(VALUES).lower()
    for word in (
        "learning_rate",
        "learningrate",
        "lora",
        "epochs",
        "batch_size",
        "batchsize",
        "beta",
        "temperature",
        "top_p",
    ):
        assert f'"{word}"' not in text, word


def test_package_leaves_ci_values_out(helm: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    proc = run_helm(helm, "package", str(CHART), "-d", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    tgz = tmp_path / f"openbezoar-{version}.tgz"
    with tarfile.open(tgz) as tf:
        names = tf.getnames()
    assert "openbezoar/values.schema.json" in names and "openbezoar/templates/NOTES.txt" in names
    assert not [n for n in names if "/ci/" in n]


def test_notes_tell_how_to_follow_the_run(helm: tuple[str, dict[str, str]]) -> None:
    proc = run_helm(helm, "install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client", *values_files("base"))
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert f"kubectl -n {NAMESPACE} logs -f job/{RELEASE}-controller-ci-run-1" in notes
    assert "bezoar status --run s3://bezoar-ci/runs/ci-run-1" in notes
    assert "-l bezoar.dev/run=ci-run-1" in notes


def test_notes_name_the_label_the_jobs_carry_for_any_run_id(helm: tuple[str, dict[str, str]]) -> None:
    """Finding 10: NOTES.txt fell back to app.kubernetes.io/name=bezoar-jobs, a label no Job carries
    (the name label is "openbezoar"), for run ids the Job builder shortens. The chart now computes the
    same short id as bezoar_jobs.executors.jobs.short_run_id."""
    from bezoar_jobs.executors.jobs import short_run_id

    for run_id in ("ci-run-1", "a--b", "retrain-2026-11-24-a-very-long-run-identifier-from-ci"):
        proc = run_helm(helm, "install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client",
                        *values_files("base"), "--set", f"run.id={run_id}")
        assert proc.returncode == 0, proc.stderr
        notes = proc.stdout.split("NOTES:", 1)[1]
        assert f"-l bezoar.dev/run={short_run_id(run_id)}\n" in notes, (run_id, notes)
        assert "app.kubernetes.io/name=bezoar-jobs" not in notes


def test_versions_of_kubernetes_agree() -> None:
    """Finding 10: README and Chart.yaml said Kubernetes 1.29 while the controller needs 1.31."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=1.31.0-0"
    assert "Minimum Kubernetes: 1.31" in (REPO / "bezoar_jobs" / "executors" / "kubernetes.py").read_text()
    for doc in (REPO / "README.md", REPO / "docs" / "kubernetes.md", CHART / "README.md"):
        text = doc.read_text()
        assert "1.29" not in text and "1.31" in text, doc


def test_the_chart_readme_lists_every_value() -> None:
    """`helm show readme` documents every value (generated from values.yaml's comments)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_chart_readme", REPO / "scripts" / "gen_chart_readme.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    readme = (CHART / "README.md").read_text()
    assert readme == mod.render(), "helm/openbezoar/README.md is stale: run scripts/gen_chart_readme.py"
    for path in leaf_paths(VALUES):
        assert f"`{'.'.join(path)}`" in readme, ".".join(path)
    assert "helm install openbezoar helm/openbezoar" in readme and "values-paper.yaml" in readme


def test_teacher_security_context_can_be_overridden_per_component(helm: tuple[str, dict[str, str]]) -> None:
    """The one documented exception: an image that must run as root (upstream TGI), teacher only."""
    docs = template(helm, *values_files("base"), "--set", "teacher.image.tgi.repository=ghcr.io/huggingface/"
                    "text-generation-inference", "--set", "teacher.image.tgi.tag=3.3.6",
                    "--set", "teacher.podSecurityContext.runAsNonRoot=false",
                    "--set", "teacher.podSecurityContext.runAsUser=0",
                    "--set", "teacher.securityContext.runAsNonRoot=false",
                    "--set", "teacher.securityContext.runAsUser=0")
    spec = pod_spec(one(docs, "Deployment"))
    assert spec["securityContext"]["runAsUser"] == 0 and spec["containers"][0]["securityContext"]["runAsUser"] == 0
    assert spec["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod_security.check(spec, "restricted") and pod_security.check(spec, "baseline") == []
    ctl = pod_spec(one(docs, "Job", "controller"))
    assert ctl["securityContext"]["runAsUser"] == UID  # nobody else is affected


def test_egress_policies_for_a_default_deny_namespace(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Finding 8: NetworkPolicies were ingress-only; a namespace that denies egress by default broke
    every pod. With networkPolicy.egress.enabled each pod may reach exactly what it needs."""
    assert all("egress" not in np["spec"] for np in objs(rendered["base"], "NetworkPolicy"))
    by = {np["metadata"]["labels"]["app.kubernetes.io/component"]: np["spec"] for np in
          objs(rendered["egress"], "NetworkPolicy")}
    assert set(by) == {"teacher", "controller", "stages"}

    def ports(rule: dict[str, Any]) -> set[tuple[int, str]]:
        return {(p["port"], p["protocol"]) for p in rule["ports"]}

    for comp, spec in by.items():
        assert spec["policyTypes"] == ["Ingress", "Egress"], comp
        dns = spec["egress"][0]
        assert ports(dns) == {(53, "UDP"), (53, "TCP")}
        assert dns["to"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
        storage = spec["egress"][1]
        assert storage["to"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
        assert ports(storage) == {(443, "TCP"), (8333, "TCP")}
    assert by["controller"]["egress"][2]["to"] == [{"ipBlock": {"cidr": "172.20.0.1/32"}}]
    assert len(by["teacher"]["egress"]) == 2  # DNS and storage (the Hub) only
    teacher_rule = by["stages"]["egress"][3]
    assert teacher_rule["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "teacher"
    assert ports(teacher_rule) == {(8080, "TCP")}


# ---------------------------------------------------------------------------------------------
# Infra linters: checkov (chart, images, manifests/), actionlint (workflows)
# ---------------------------------------------------------------------------------------------
def test_checkov_zero_failed_checks(helm: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    # checkov's own helm framework renders one value set in the "default" namespace (so it would
    # flag CKV_K8S_21 on objects whose namespace comes from `helm install -n`); scanning every
    # scenario as rendered covers each value switch instead.
    out = tmp_path / "rendered"
    out.mkdir()
    for s in SCENARIOS:
        proc = run_helm(helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, *values_files(s))
        assert proc.returncode == 0, proc.stderr
        (out / f"{s}.yaml").write_text(proc.stdout)
    dirs = [str(out), str(REPO / "images")]
    manifests = REPO / "manifests"
    if manifests.is_dir() and any(manifests.rglob("*.yaml")):
        dirs.append(str(manifests))
    cmd = [str(infra_tools.linter("checkov")), "--framework", "kubernetes", "dockerfile", "--skip-download"]
    cmd += ["-o", "json", "--compact"]
    for d in dirs:
        cmd += ["-d", d]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    # One JSON document per directory (a report, or a list of reports when several frameworks hit).
    reports: list[dict[str, Any]] = []
    decoder, text, pos = json.JSONDecoder(), proc.stdout, 0
    while text[pos:].strip():
        doc, end = decoder.raw_decode(text, len(text) - len(text[pos:].lstrip()))
        reports += doc if isinstance(doc, list) else [doc]
        pos = end
    summary: dict[str, dict[str, int]] = {}
    for r in reports:
        kind = r["check_type"]
        failed = sorted({(f["check_id"], f["check_name"], f["resource"]) for f in r["results"]["failed_checks"]})
        assert not failed, f"{kind}: fix, or skip with a reasoned checkov.io/skipN annotation:\n" + "\n".join(
            map(str, failed)
        )
        assert r["summary"]["parsing_errors"] == 0, r["summary"]
        # Every skip carries its reason (an annotation checkov.io/skipN: CHECK=reason).
        for s in r["results"]["skipped_checks"]:
            reason = s["check_result"].get("suppress_comment", "")
            assert reason and reason != "No comment provided", (s["check_id"], s["resource"])
        totals = summary.setdefault(kind, {"passed": 0, "skipped": 0})
        totals["passed"] += r["summary"]["passed"]
        totals["skipped"] += r["summary"]["skipped"]
    assert set(summary) == {"kubernetes", "dockerfile"}, proc.stderr[-2000:]
    assert all(t["passed"] > 100 for t in summary.values()), summary
    assert proc.returncode == 0


def test_checkov_scans_the_chart_directory_with_its_defaults(helm: tuple[str, dict[str, str]]) -> None:
    """Finding 10: `checkov -d helm/openbezoar` rendered nothing (the defaults did not render) and reported
    clean. Its helm framework now renders the chart's defaults (the demo) and finds nothing to fail."""
    _exe, env = helm
    proc = subprocess.run([str(infra_tools.linter("checkov")), "-d", str(CHART), "--framework", "helm",
                           "--skip-download", "-o", "json", "--compact"], capture_output=True, text=True, env=env)
    report = json.loads(proc.stdout)
    report = report[0] if isinstance(report, list) else report
    assert report["check_type"] == "helm", report
    assert report["summary"]["failed"] == 0, [f["check_id"] for f in report["results"]["failed_checks"]]
    assert report["summary"]["passed"] > 50 and report["summary"]["resource_count"] >= 8, report["summary"]
    assert proc.returncode == 0


def test_actionlint_workflows() -> None:
    workflows = sorted((REPO / ".github" / "workflows").glob("*.y*ml"))
    assert workflows
    exe = str(infra_tools.linter("actionlint"))
    proc = subprocess.run([exe, "-no-color", *map(str, workflows)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Control: the same binary flags a broken workflow.
    bad = subprocess.run(
        [exe, "-no-color", "-"],
        input="on: push\njobs:\n  x:\n    runs-on: ubuntu-24.04\n    steps:\n      - run: echo ${{ nope.x }}\n",
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0


# ---------------------------------------------------------------------------------------------
# The CI retraining workflow: its shape, and its shell steps run for real with bash
# ---------------------------------------------------------------------------------------------
WORKFLOW = REPO / ".github" / "workflows" / "retrain.yaml"


def workflow_steps() -> dict[str, dict[str, Any]]:
    wf = yaml.safe_load(WORKFLOW.read_text())
    (job,) = wf["jobs"].values()
    return {s.get("name", s.get("uses", "")): s for s in job["steps"]}


def run_step(
    step: dict[str, Any], env: dict[str, str], path_dir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    path = f"{path_dir}:/usr/bin:/bin" if path_dir else "/usr/bin:/bin"
    # GitHub runs `shell: bash` steps as `bash --noprofile --norc -eo pipefail {0}`.
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
        capture_output=True,
        text=True,
        env={"PATH": path, **env},
    )


def test_retrain_workflow_shape() -> None:
    wf = yaml.safe_load(WORKFLOW.read_text())
    on = wf[True]  # YAML 1.1 reads the key `on` as a boolean
    assert set(on["workflow_dispatch"]["inputs"]) == {"recipe", "run_id"}
    assert on["workflow_dispatch"]["inputs"]["recipe"]["default"] == "recipes/openbezoar.yaml"
    assert on["schedule"] and on["push"] == {"branches": ["main"], "paths": ["recipes/**"]}
    # finding 8: a static kubeconfig and static AWS keys; a push to recipes/ started a paid run unasked.
    # Now OIDC (id-token) into a cloud role, and the job runs in an environment with required reviewers.
    assert wf["permissions"] == {"contents": "read", "id-token": "write"}
    (job,) = wf["jobs"].values()
    assert job["environment"] == "retrain"
    assert "secrets." not in WORKFLOW.read_text()  # no static credential of any kind
    role = workflow_steps()["Assume the cloud role (OIDC, no static keys)"]
    assert role["uses"].startswith("aws-actions/configure-aws-credentials@")
    assert role["with"]["role-to-assume"] == "${{ vars.AWS_ROLE_ARN }}" and "aws-access-key-id" not in role["with"]
    assert wf["concurrency"]["group"] and wf["concurrency"]["cancel-in-progress"] is False
    uses = re.findall(r"uses:\s*(\S+)", WORKFLOW.read_text())
    assert uses and all(re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", u) for u in uses), uses
    install = workflow_steps()["Install bezoar-jobs with the Kubernetes extra"]["run"]
    assert '".[k8s]"' in install and "requirements/lock.txt" in install


@pytest.mark.parametrize(
    ("event", "override", "expected"),
    [
        ("push", "", "retrain-0123abc"),
        ("workflow_dispatch", "", "retrain-0123abc"),
        ("schedule", "", "retrain-0123abc-DATE"),
        ("workflow_dispatch", "falcon-rerun-2", "falcon-rerun-2"),
        ("workflow_dispatch", "Bad_Id", None),
    ],
)
def test_retrain_workflow_run_id(tmp_path: Path, event: str, override: str, expected: str | None) -> None:
    out = tmp_path / "out"
    proc = run_step(
        workflow_steps()["Derive the run id"],
        {
            "GITHUB_SHA": "0123abcdef0123abcdef0123abcdef0123abcdef",
            "EVENT": event,
            "RUN_ID_OVERRIDE": override,
            "GITHUB_OUTPUT": str(out),
        },
    )
    if expected is None:
        assert proc.returncode == 2 and "not a DNS label" in proc.stdout
        return
    assert proc.returncode == 0, proc.stderr
    got = out.read_text().strip()
    if expected.endswith("DATE"):
        assert re.fullmatch(expected.replace("DATE", r"\d{8}"), got.removeprefix("id=")), got
    else:
        assert got == f"id={expected}"


def test_retrain_workflow_kubeconfig_and_command(tmp_path: Path) -> None:
    steps = workflow_steps()
    github_env = tmp_path / "env"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    # a stand-in `aws` that writes what `aws eks update-kubeconfig` writes: an exec-plugin kubeconfig
    (bindir / "aws").write_text('#!/bin/sh\n[ "$1 $2" = "eks update-kubeconfig" ] || exit 9\n'
                                'while [ $# -gt 0 ]; do [ "$1" = --kubeconfig ] && out="$2"; shift; done\n'
                                'printf "apiVersion: v1\\nkind: Config\\nusers: [{name: u, user: {exec: '
                                '{command: aws}}}]\\n" > "$out"\n')
    (bindir / "aws").chmod(0o755)
    creds = steps["Get the cluster's credentials through the role"]
    proc = run_step(creds, {"CLUSTER": "gpu-cluster", "AWS_REGION": "us-east-1", "RUNNER_TEMP": str(tmp_path),
                            "GITHUB_ENV": str(github_env)}, bindir)
    assert proc.returncode == 0, proc.stderr
    (line,) = github_env.read_text().splitlines()
    kubeconfig = Path(line.removeprefix("KUBECONFIG="))
    assert kubeconfig.parent == tmp_path and "exec" in kubeconfig.read_text() and "token:" not in kubeconfig.read_text()
    assert kubeconfig.stat().st_mode & 0o777 == 0o600
    missing = run_step(creds, {"RUNNER_TEMP": str(tmp_path), "GITHUB_ENV": str(github_env)}, bindir)
    assert missing.returncode == 2 and "EKS_CLUSTER variable is not set" in missing.stdout
    # The run step, with a stand-in `bezoar` that prints its arguments.
    (bindir / "bezoar").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (bindir / "bezoar").chmod(0o755)
    proc = run_step(
        steps["Run the pipeline on the cluster"],
        {"RUN_ID": "retrain-0123abc", "BUCKET": "my-bucket", "RECIPE": "recipes/openbezoar.yaml"},
        bindir,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "run",
        "--executor",
        "kubernetes",
        "--recipe",
        "recipes/openbezoar.yaml",
        "--run",
        "s3://my-bucket/runs/retrain-0123abc",
        "--run-id",
        "retrain-0123abc",
        "--cluster",
        "deploy/cluster.yaml",
    ]


def test_a_teacher_with_replicas_gets_a_headless_service_and_the_stage_pods_a_fleet(
        helm: tuple[str, dict[str, str]]) -> None:
    """Issue 13: N teacher replicas, each request to one of them (not pinned by keep-alive to a ClusterIP)."""
    docs = template(helm, *values_files("base"), "--set", "teacher.replicas=3")
    svcs = {d["metadata"]["name"]: d for d in objs(docs, "Service")
            if d["metadata"]["labels"].get("app.kubernetes.io/component") == "teacher"}
    headless = svcs[f"{RELEASE}-teacher-replicas"]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["selector"] == svcs[
        f"{RELEASE}-teacher"]["spec"]["selector"]
    t = ClusterSettings.model_validate(cluster_yaml(docs)).teacher
    assert t.discovery == "dns" and t.replicas == 3
    assert t.url == f"http://{RELEASE}-teacher-replicas.{NAMESPACE}.svc:80"
    assert t.maxConcurrentRequests == 3 * 128  # every replica's slots, divided among the stage pods
    one_replica = ClusterSettings.model_validate(cluster_yaml(template(helm, *values_files("base")))).teacher
    assert one_replica.discovery == "" and one_replica.url == f"http://{RELEASE}-teacher.{NAMESPACE}.svc:80"


def test_a_multi_node_training_stage_lets_the_controller_create_its_service(helm: tuple[str, dict[str, str]]) -> None:
    """Only where a training stage runs on several nodes (executors/distributed.py) may the controller create
    (and hand to the Job) the group's headless Service; the settings reach the ConfigMap."""
    for sets in (["--set", "clusterSettings.scheduling.train.nodes=2"],
                 ["--set", "clusterSettings.stageOverrides.dpo.nodes=2"]):
        docs = template(helm, *values_files("base"), *sets, "--set", "clusterSettings.distributed.port=29600")
        assert ("", "services", ("create", "patch"), ()) in rbac_rules(docs)
        cs = ClusterSettings.model_validate(cluster_yaml(docs))
        assert cs.distributed.port == 29600
    docs = template(helm, *values_files("base"))
    assert not [r for r in rbac_rules(docs) if r[1] == "services"]


def test_group_launchers_get_exactly_the_rbac_they_need(helm: tuple[str, dict[str, str]]) -> None:
    """distributed.launcher jobset: jobsets (no Services: JobSet makes its own); trainjob: trainjobs, a look at the
    TrainJob's JobSet, and the named ClusterTrainingRuntime (get, by name) through a ClusterRole; nothing of this
    without a training stage on several nodes. Every object validates strictly (kubernetes-validate)."""
    nodes = ["--set", "clusterSettings.scheduling.train.nodes=2"]
    base = {("batch", "jobs", ("create", "delete", "get", "list", "watch"), ()),
            ("", "pods", ("get", "list", "watch"), ()), ("", "pods/log", ("get",), ()),
            ("", "events", ("get", "list"), ()), ("apps", "deployments", ("get", "patch"), (f"{RELEASE}-teacher",))}
    group_verbs = ("create", "delete", "get", "list", "watch")
    docs = template(helm, *values_files("base"), *nodes, "--set", "clusterSettings.distributed.launcher=jobset")
    assert rbac_rules(docs) == base | {("jobset.x-k8s.io", "jobsets", group_verbs, ())}
    assert not objs(docs, "ClusterRole")
    docs = template(helm, *values_files("base"), *nodes, "--set", "clusterSettings.distributed.launcher=trainjob",
                    "--set", "clusterSettings.distributed.trainingRuntime=torch-h100")
    assert rbac_rules(docs) == base | {("trainer.kubeflow.org", "trainjobs", group_verbs, ()),
                                       ("jobset.x-k8s.io", "jobsets", ("get",), ())}
    (cr,), (crb,) = objs(docs, "ClusterRole"), objs(docs, "ClusterRoleBinding")
    assert cr["rules"] == [{"apiGroups": ["trainer.kubeflow.org"], "resources": ["clustertrainingruntimes"],
                            "resourceNames": ["torch-h100"], "verbs": ["get"]}]
    assert crb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                              "name": cr["metadata"]["name"]}
    sa = one(docs, "ServiceAccount", "controller")
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}]
    assert ClusterSettings.model_validate(cluster_yaml(docs)).distributed.trainingRuntime == "torch-h100"
    for d in docs:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(d, version, strict=True)
    # one node per training stage: no group, none of it, whatever the launcher
    docs = template(helm, *values_files("base"), "--set", "clusterSettings.distributed.launcher=trainjob")
    assert rbac_rules(docs) == base and not objs(docs, "ClusterRole") and not objs(docs, "ClusterRoleBinding")


def test_every_pod_the_chart_renders_passes_the_api_servers_own_checks(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Beyond the OpenAPI schema (kubeconform-style checks above), the API server refuses pods by Go rules:
    label and annotation syntax, names, mounts of undefined volumes, requests above limits, GPUs requested other
    than their limit, tolerations (tests/k8s_harness.py reads them from upstream and applies them to every Job the
    controller creates). The chart's own pods (the teacher Deployment, the controller Job, the retraining CronJob)
    go through them here, in every scenario."""
    from tests.k8s_harness import Invalid, validate_job_spec, validate_meta, validate_pod_spec

    checked: set[str] = set()
    for scenario, docs in rendered.items():
        for obj in docs:
            if obj["kind"] not in ("Deployment", "Job", "CronJob", "StatefulSet"):
                continue
            errs = Invalid()
            validate_meta(errs, obj["metadata"], "metadata")
            job = obj["spec"]["jobTemplate"]["spec"] if obj["kind"] == "CronJob" else obj["spec"]
            template = job["template"]
            validate_meta(errs, template.get("metadata") or {}, "spec.template.metadata")
            validate_pod_spec(errs, pod_spec(obj), "spec.template.spec")
            if obj["kind"] in ("Job", "CronJob"):
                validate_job_spec(errs, obj["metadata"]["name"], job)
            assert not errs.causes, (scenario, obj["kind"], obj["metadata"]["name"], errs.causes)
            checked.add(obj["kind"])
    assert checked == {"Deployment", "Job", "CronJob"}, checked  # the teacher, the controller, the retraining
