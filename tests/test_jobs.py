"""The pure Job builder and the cluster settings: every built Job passes kubernetes-validate --strict.

Nothing here needs a cluster: Jobs are plain dicts checked against the bundled Kubernetes schemas
(strict: an unknown or misspelled field fails) and against what the stage contract asks of them.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from bezoar_jobs import __version__
from bezoar_jobs.errors import BadInput
from bezoar_jobs.executors.cluster import (
    ALL_STAGES,
    ClusterSettings,
    load_cluster_settings,
    parse_cluster_settings,
    stage_family,
)
from bezoar_jobs.executors.jobs import (
    ANNOTATION_RUN_ID,
    KUEUE_QUEUE_LABEL,
    LABEL_RUN,
    LABEL_STAGE,
    RUN_ID_BUDGET,
    build_job,
    build_stage_jobs,
    job_name,
    render,
    run_id_from_uri,
    short_run_id,
)
from bezoar_jobs.recipe import load_recipe
from bezoar_jobs.registry import CANONICAL

REPO = Path(__file__).resolve().parents[1]
# The oldest Kubernetes we support (podFailurePolicy and SuccessCriteriaMet are GA in 1.31) and the
# newest schema kubernetes-validate bundles.
K8S_VERSIONS = ("1.31", kubernetes_validate.utils.latest_version())
RUN = "s3://bezoar-runs/runs/r1"
PAPER, _ = load_recipe(REPO / "recipes" / "openbezoar.yaml")

FULL = {
    "namespace": "ml-batch",
    "runnerServiceAccount": "bezoar-runner",
    "images": {"registry": "registry.example.com/bz/", "tag": "0.1.0", "pullPolicy": "Always"},
    "imagePullSecrets": ["regcred"],
    "storage": {"s3EndpointUrl": "http://seaweed:8333", "s3Region": "eu-west-1", "s3AddressingStyle": "path"},
    "secrets": {
        "s3": {"name": "s3-creds", "credentialsFileKey": "aws-credentials"},
        "hfToken": {"name": "hf", "key": "token"},
        "apiKeys": [{"env": "OPENAI_API_KEY", "name": "judge-keys", "key": "openai"},
                    {"env": "ANTHROPIC_API_KEY", "name": "", "key": "api-key"}],
    },
    "teacher": {"deployment": "openbezoar-teacher", "url": "http://openbezoar-teacher:80"},
    "priorityClassName": "batch-low",
    "kueue": {"queueName": "team-a"},
    "scheduling": {"train": {"gpus": 2, "nodeSelector": {"gpu": "a100"}}},
    "stageOverrides": {"dpo": {"gpus": 4, "resources": {"limits": {"memory": "96Gi"}}},
                       "filter-orca": {"backoffLimit": 0}},
    "generationShards": 4,
    "jobs": {"gpuResourceName": "amd.com/gpu", "ttlSecondsAfterFinished": 3600, "terminationGracePeriodSeconds": 600},
}


def _container(job: dict) -> dict:
    (c,) = job["spec"]["template"]["spec"]["containers"]
    return c


def _env(job: dict) -> dict:
    return {e["name"]: e for e in _container(job)["env"]}


@pytest.mark.parametrize("settings", [{}, FULL], ids=["defaults", "everything-set"])
def test_every_stage_job_validates_strictly(settings):
    cluster = ClusterSettings.model_validate(settings)
    names = set()
    for stage in ALL_STAGES:
        for job in build_stage_jobs(stage, RUN, "r1", cluster):
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(job, version, strict=True)
            names.add(job["metadata"]["name"])
            assert job["metadata"]["namespace"] == cluster.namespace
    sharded = 3 if settings else 0
    assert len(names) == len(ALL_STAGES) + sharded  # every name distinct


def test_strict_validation_catches_a_misspelled_field():
    # the check above means something: a typo in a built Job is refused
    job = build_job("dpo", RUN, "r1", ClusterSettings())
    job["spec"]["template"]["spec"]["restartPolicyy"] = "Never"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSIONS[-1], strict=True)


def test_the_client_accepts_the_dict_unchanged():
    from kubernetes.client import ApiClient, V1Job

    job = build_job("generate-evol", RUN, "r1", ClusterSettings.model_validate(FULL))
    assert ApiClient().sanitize_for_serialization(V1Job.model_validate(job)) == job


def test_names_are_deterministic_short_and_distinct():
    assert job_name("generate-lamini", "r1") == "bz-r1-generate-lamini"
    assert job_name("generate-lamini", "r1", phase="commit") == "bz-r1-generate-lamini-commit"
    long_id = "retrain-2026-11-24-a-very-long-run-identifier-from-ci-0123456789"
    a = job_name("generate-lamini", long_id, phase="commit")
    assert a == job_name("generate-lamini", long_id, phase="commit")  # deterministic
    assert len(a) <= 63
    assert a.endswith(hashlib.sha256(long_id.encode()).hexdigest()[:8] + "-generate-lamini-commit")
    # ids differing only in what sanitising removes (case, '_', '.') still get different names
    ids = ["Run_1", "run-1", "run.1", "RUN-1"]
    shorts = {short_run_id(i) for i in ids}
    assert len(shorts) == 4 and "run-1" in shorts
    for rid in [*ids, long_id, "x" * 200]:
        s = short_run_id(rid)
        assert len(s) <= RUN_ID_BUDGET and s[0].isalnum() and s[-1].isalnum() and s == s.lower()
        for stage in ALL_STAGES:
            assert len(job_name(stage, rid)) <= 63
    with pytest.raises(BadInput, match="run id is empty"):
        short_run_id("  ")
    assert run_id_from_uri("s3://bucket/runs/r7/") == "r7"
    assert run_id_from_uri("/tmp/x/run-3") == "run-3"
    with pytest.raises(BadInput, match="--run-id"):
        run_id_from_uri("s3://")


def test_labels_annotations_and_selector():
    long_id = "Nightly_Retrain.2026-11-24T03:00:00Z-with-a-long-suffix"
    job = build_job("sft-evol", RUN, long_id, ClusterSettings())
    labels = job["metadata"]["labels"]
    for k in ("name", "instance", "component", "part-of", "managed-by", "version"):
        assert labels[f"app.kubernetes.io/{k}"]
    assert labels["app.kubernetes.io/version"] == __version__
    assert labels[LABEL_RUN] == short_run_id(long_id) == labels["app.kubernetes.io/instance"]
    assert labels[LABEL_STAGE] == "sft-evol"
    assert job["metadata"]["annotations"][ANNOTATION_RUN_ID] == long_id  # the full id survives
    # pods carry the run and stage labels too (logs and `bezoar cancel` find them)
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert pod_labels[LABEL_RUN] == labels[LABEL_RUN] and pod_labels[LABEL_STAGE] == "sft-evol"


def test_image_by_family_and_digest_pinning():
    cluster = ClusterSettings.model_validate(FULL)
    # the report renders with the eval image (on CPU, see test_report_runs_on_cpu)
    expect = {"data": "bezoar-data", "train": "bezoar-train", "eval": "bezoar-eval", "report": "bezoar-eval"}
    for stage in ALL_STAGES:
        img = _container(build_job(stage, RUN, "r1", cluster))["image"]
        assert img == f"registry.example.com/bz/{expect[stage_family(stage)]}:0.1.0"
    digest = "sha256:" + "ab" * 32
    pinned = build_job("dpo", RUN, "r1", cluster, image_digests={"train": digest})
    assert _container(pinned)["image"] == f"registry.example.com/bz/bezoar-train@{digest}"
    assert _container(pinned)["imagePullPolicy"] == "Always"
    with pytest.raises(BadInput, match="sha256"):
        build_job("dpo", RUN, "r1", cluster, image_digests={"train": "latest"})


def test_every_stage_image_pins_by_digest_from_the_cluster_settings(tmp_path):
    """Finding 8: stage images could not be pinned by digest (only a render-time argument existed, and the
    CLI never passed it). Now images.digests in the settings pins every Job the controller creates."""
    d = {f: "sha256:" + c * 64 for f, c in (("data", "a"), ("train", "b"), ("eval", "c"))}
    cluster = ClusterSettings.model_validate({**FULL, "images": {**FULL["images"], "digests": d}})
    for stage in ALL_STAGES:
        job = build_job(stage, RUN, "r1", cluster)
        family = {"report": "eval"}.get(stage_family(stage), stage_family(stage))
        assert _container(job)["image"] == f"registry.example.com/bz/bezoar-{family}@{d[family]}", stage
        assert not any(v.startswith("CKV_K8S_43") for v in job["metadata"]["annotations"].values())
    with pytest.raises(BadInput, match=r"images.digests.train"):
        parse_cluster_settings("images:\n  digests: {train: 'sha256:nothex'}\n")
    # and `bezoar render --image-digest` pins from the command line
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "-m", "bezoar_jobs.cli", "render", "--recipe", str(REPO / "recipes" / "demo.yaml"),
         "--run", RUN, "--out", str(out), "--cluster", str(REPO / "examples" / "cluster.yaml"),
         "--image-digest", f"eval={d['eval']}"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert _container(yaml.safe_load((out / "report.yaml").read_text()))["image"].endswith(f"bezoar-eval@{d['eval']}")


def test_container_runs_exactly_the_stage_contract():
    c = _container(build_job("filter-evol", RUN + "/", "r1", ClusterSettings()))
    assert "command" not in c  # the image entrypoint is `bezoar`
    assert c["args"] == ["stage", "filter-evol", "--recipe", f"{RUN}/recipe.yaml", "--run", RUN]


def test_sharded_generation_is_an_indexed_job_then_a_commit_job():
    cluster = ClusterSettings.model_validate({"generationShards": 5, "scheduling": {"data": {"parallelism": 2}}})
    shards, commit = build_stage_jobs("generate-orca", RUN, "r1", cluster)
    s = shards["spec"]
    assert s["completionMode"] == "Indexed" and s["completions"] == 5 and s["parallelism"] == 2
    assert _container(shards)["args"][-2:] == ["--shard", "$(JOB_COMPLETION_INDEX)/5"]
    assert _env(shards)["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    assert commit["metadata"]["name"] == "bz-r1-generate-orca-commit"
    assert "completionMode" not in commit["spec"] and commit["spec"]["completions"] == 1
    assert "--shard" not in _container(commit)["args"]
    assert shards["metadata"]["labels"]["bezoar.dev/phase"] == "shards"
    assert commit["metadata"]["labels"]["bezoar.dev/phase"] == "commit"
    # without a parallelism cap every shard runs at once; filters are never sharded
    all_at_once = ClusterSettings.model_validate({"generationShards": 3})
    assert build_job("generate-evol", RUN, "r1", all_at_once)["spec"]["parallelism"] == 3
    assert len(build_stage_jobs("filter-evol", RUN, "r1", all_at_once)) == 1
    with pytest.raises(BadInput, match="commit Job"):
        build_job("filter-evol", RUN, "r1", all_at_once, phase="commit")


def test_env_points_at_mounted_secrets_and_never_holds_a_value():
    cluster = ClusterSettings.model_validate(FULL)
    job = build_job("generate-lamini", RUN, "r1", cluster)
    env = _env(job)
    mounts = {m["mountPath"]: m for m in _container(job)["volumeMounts"]}
    vols = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert env["BEZOAR_S3_ENDPOINT_URL"]["value"] == "http://seaweed:8333"
    assert env["AWS_REGION"]["value"] == "eu-west-1"
    assert env["BEZOAR_S3_ADDRESSING_STYLE"]["value"] == "path"
    creds = env["AWS_SHARED_CREDENTIALS_FILE"]["value"]
    assert creds == "/var/run/secrets/bezoar/s3/aws-credentials"
    assert mounts["/var/run/secrets/bezoar/s3"]["readOnly"] is True
    assert vols[mounts["/var/run/secrets/bezoar/s3"]["name"]]["secret"]["secretName"] == "s3-creds"
    assert env["HF_TOKEN_PATH"]["value"] == "/var/run/secrets/bezoar/hf/token"
    # API keys are mounted files, never env vars of the pod spec (without a recipe: every named key
    # goes to the stages that call a teacher or judge)
    assert "OPENAI_API_KEY" not in env and env["BEZOAR_KEYS_DIR"]["value"] == "/var/run/secrets/bezoar/keys"
    keys = vols[mounts["/var/run/secrets/bezoar/keys"]["name"]]["projected"]["sources"]
    assert keys == [{"secret": {"name": "judge-keys", "items": [{"key": "openai", "path": "OPENAI_API_KEY"}]}}]
    assert mounts["/var/run/secrets/bezoar/keys"]["readOnly"] is True
    assert env["BEZOAR_TEACHER_URL"]["value"] == "http://openbezoar-teacher:80"
    assert env["BEZOAR_SCRATCH"]["value"] == "/scratch" and "/scratch" in mounts
    for var in ("HOME", "HF_HOME", "BEZOAR_CACHE"):
        assert env[var]["value"].startswith("/cache") and "/cache" in mounts
    # defaults: no endpoint/style env, IRSA-style when the s3 Secret name is ""
    irsa = _env(build_job("dpo", RUN, "r1", ClusterSettings.model_validate({"secrets": {"s3": {"name": ""}}})))
    assert "AWS_SHARED_CREDENTIALS_FILE" not in irsa and "BEZOAR_S3_ENDPOINT_URL" not in irsa
    assert "BEZOAR_S3_ADDRESSING_STYLE" not in irsa and "HF_TOKEN_PATH" not in irsa


def test_resources_gpus_and_placement():
    cluster = ClusterSettings.model_validate(FULL)
    data = build_job("generate-lamini", RUN, "r1", cluster)
    res = _container(data)["resources"]
    assert res["requests"] == {"cpu": "2", "ephemeral-storage": "17Gi", "memory": "8Gi"}
    assert "amd.com/gpu" not in res["limits"]
    sft = build_job("sft-lamini", RUN, "r1", cluster)
    res = _container(sft)["resources"]
    assert res["requests"]["amd.com/gpu"] == res["limits"]["amd.com/gpu"] == "2"
    assert res["requests"]["ephemeral-storage"] == res["limits"]["ephemeral-storage"] == "26Gi"
    pod = sft["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "a100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "batch-low"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["serviceAccountName"] == "bezoar-runner"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert vols["scratch"]["emptyDir"]["sizeLimit"] == "26Gi"
    # a stage override merges into the family's entry: dpo keeps cpu/requests, raises one limit
    dpo = _container(build_job("dpo", RUN, "r1", cluster))["resources"]
    assert dpo["limits"]["memory"] == "96Gi" and dpo["requests"]["memory"] == "64Gi" and dpo["requests"]["cpu"] == "8"
    assert dpo["limits"]["amd.com/gpu"] == "4"
    assert build_job("filter-orca", RUN, "r1", cluster)["spec"]["backoffLimit"] == 0
    assert build_job("filter-evol", RUN, "r1", cluster)["spec"]["backoffLimit"] == 3
    # eval uses its own family entry (defaults like train's)
    ev = build_job("eval-harness", RUN, "r1", ClusterSettings())
    assert _container(ev)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert ev["spec"]["activeDeadlineSeconds"] == 172800


def test_failure_semantics_and_lifetimes():
    cluster = ClusterSettings.model_validate(FULL)
    job = build_job("sft-hh", RUN, "r1", cluster)
    spec = job["spec"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert spec["podReplacementPolicy"] == "Failed"
    rules = spec["podFailurePolicy"]["rules"]
    # order matters: bad input (exit 2) fails the Job at once; a disruption is not counted
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": "stage", "operator": "In", "values": [2]}}
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert _container(job)["name"] == "stage"
    assert spec["backoffLimit"] == 6 and spec["activeDeadlineSeconds"] == 172800
    assert spec["ttlSecondsAfterFinished"] == 3600
    assert pod["terminationGracePeriodSeconds"] == 600


def test_hardened_pod():
    job = build_job("report", RUN, "r1", ClusterSettings())
    pod = job["spec"]["template"]["spec"]
    c = _container(job)
    assert pod["automountServiceAccountToken"] is False
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == psc["runAsGroup"] == psc["fsGroup"] == 10001
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True and sc["privileged"] is False
    # with a read-only root, every place a stage writes is a writable emptyDir
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    for path in ("/tmp", "/scratch", "/cache", "/dev/shm"):
        assert "emptyDir" in vols[mounts[path]]


def test_kueue_queue_label_and_suspend():
    plain = build_job("dpo", RUN, "r1", ClusterSettings())
    assert "suspend" not in plain["spec"] and KUEUE_QUEUE_LABEL not in plain["metadata"]["labels"]
    q = build_job("dpo", RUN, "r1", ClusterSettings.model_validate({"kueue": {"queueName": "team-a"}}))
    assert q["spec"]["suspend"] is True and q["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "team-a"


def test_unknown_stage_is_refused():
    with pytest.raises(BadInput, match="unknown stage 'sft-foo'"):
        build_job("sft-foo", RUN, "r1", ClusterSettings())


# ---------------------------------------------------------------------------------------------
# Cluster settings
# ---------------------------------------------------------------------------------------------
def test_defaults_follow_the_contract():
    c = ClusterSettings()
    assert c.namespace == "bezoar" and c.runnerServiceAccount == ""
    assert c.images.registry == "ghcr.io/example/bezoar-jobs" and c.images.tag == __version__ == "0.1.0"
    assert (c.images.data, c.images.train, c.images.eval, c.images.controller) == (
        "bezoar-data", "bezoar-train", "bezoar-eval", "bezoar-controller")
    assert c.storage.s3Region == "us-east-1" and c.storage.s3EndpointUrl == "" and c.storage.s3AddressingStyle == ""
    assert (c.secrets.s3.name, c.secrets.s3.credentialsFileKey) == ("bezoar-s3", "credentials")
    assert [k.env for k in c.secrets.apiKeys] == ["OPENAI_API_KEY", "ANTHROPIC_API_KEY"]
    assert c.teacher.waitReady and c.teacher.scaleDownAfterGeneration and c.teacher.replicas == 1
    assert c.scheduling.data.gpus == 0 and c.scheduling.train.gpus == 1 and c.scheduling.eval.gpus == 1
    assert c.scheduling.data.backoffLimit == 3 and c.scheduling.train.backoffLimit == 6
    assert c.scheduling.train.shmSize == "16Gi" and c.scheduling.data.ephemeralStorage == "auto"
    assert c.scheduling.report.gpus == 0 and c.scheduling.report.tolerations == ()
    assert c.generationShards == 1
    assert (c.jobs.ttlSecondsAfterFinished, c.jobs.terminationGracePeriodSeconds, c.jobs.gpuResourceName) == (
        604800, 300, "nvidia.com/gpu")
    # the contract's own example document parses to the same settings
    contract = {
        "scheduling": {"data": {"resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "8Gi"}},
                                "gpus": 0, "nodeSelector": {}, "tolerations": [], "activeDeadlineSeconds": 86400,
                                "backoffLimit": 3, "ephemeralStorage": "auto", "shmSize": "1Gi"}},
    }
    assert ClusterSettings.model_validate(contract) == c


def test_partial_family_entry_keeps_that_familys_defaults():
    c = ClusterSettings.model_validate({"scheduling": {"train": {"gpus": 8}}})
    assert c.scheduling.train.gpus == 8
    assert c.scheduling.train.backoffLimit == 6 and c.scheduling.train.ephemeralStorage == "auto"
    # YAML numbers are accepted as quantities
    c = parse_cluster_settings("scheduling:\n  data:\n    resources: {requests: {cpu: 4}}\n")
    assert c.scheduling.data.resources.requests == {"cpu": "4", "memory": "8Gi"}


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        ("namespace: bezoar\nimages:\n  tagg: x\n", 3, "images.tagg: unknown key"),
        ("scheduling:\n  train:\n    gpus: -1\n", 3, "scheduling.train.gpus"),
        (
            "stageOverrides:\n  sft-foo: {gpus: 1}\n",
            2,
            "stageOverrides.sft-foo.[key]: Value error, unknown stage 'sft-foo'",
        ),
        (
            "stageOverrides:\n  dpo:\n    shmSize: lots\n",
            3,
            "stageOverrides.dpo.shmSize: Value error, 'lots' is not a Kubernetes quantity",
        ),
        ("namespace: Bezoar_NS\n", 1, "namespace: Value error, 'Bezoar_NS' is not a DNS-1123 label"),
        (
            "secrets:\n  apiKeys:\n    - {env: K}\n    - {env: K}\n",
            2,
            "secrets.apiKeys: Value error, environment variable(s) K",
        ),
        (
            "scheduling:\n  data:\n    tolerations:\n      - {operator: Exists, value: x}\n",
            4,
            "scheduling.data.tolerations.0",
        ),
        ("kueue: {queueName: 'a b'}\n", 1, "kueue.queueName"),
        ("generationShards: 0\n", 1, "generationShards"),
    ],
)
def test_errors_name_file_line_and_path(tmp_path, text, line, expected):
    f = tmp_path / "cluster.yaml"
    f.write_text(text)
    with pytest.raises(BadInput) as e:
        load_cluster_settings(f)
    assert f"{f}:{line}: {expected}" in str(e.value)


def test_load_edge_cases(tmp_path):
    with pytest.raises(BadInput, match="not found"):
        load_cluster_settings(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(BadInput, match=r"bad.yaml:\d+: cluster settings are not valid YAML"):
        load_cluster_settings(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(BadInput, match="mapping"):
        load_cluster_settings(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_cluster_settings(tmp_path / "empty.yaml") == ClusterSettings()
    assert load_cluster_settings(None) == ClusterSettings()


def test_cluster_settings_that_are_not_utf8_name_file_line_and_column(tmp_path):
    """Audit of bad input, finding 3: a Latin-1 comment was a UnicodeDecodeError (exit 1)."""
    f = tmp_path / "cluster.yaml"
    text = (REPO / "examples" / "cluster.yaml").read_text(encoding="utf-8")
    f.write_bytes(text.encode("utf-8") + "# café\n".encode("latin-1"))
    line = text.count("\n") + 1
    with pytest.raises(BadInput) as e:
        load_cluster_settings(f)
    assert f"{f}:{line}: not UTF-8 text (byte 0xe9 at column 6)" in str(e.value)
    res = subprocess.run([sys.executable, "-m", "bezoar_jobs.cli", "cancel", "--run", str(tmp_path / "run"),
                          "--cluster", str(f)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"ERROR {f}:{line}: not UTF-8 text" in res.stderr


def test_example_cluster_settings_load():
    c = load_cluster_settings(REPO / "examples" / "cluster.yaml")
    assert c.generationShards > 1 and c.kueue.queueName  # the example shows the optional features


def test_the_retraining_workflows_cluster_settings_load_and_build_every_job():
    workflow = (REPO / ".github" / "workflows" / "retrain.yaml").read_text()
    assert "--cluster deploy/cluster.yaml" in workflow
    c = load_cluster_settings(REPO / "deploy" / "cluster.yaml")
    # finding 7: deploy/cluster.yaml assumed a Kueue queue, so on a cluster without Kueue every Job
    # stayed suspended forever; the copy users start from now assumes none (the controller also
    # fails a stage at once when a queue is set and Kueue is missing: test_controller)
    assert c.kueue.queueName == ""
    for stage in ALL_STAGES:
        job = build_job(stage, RUN, "retrain-abc123", c)
        assert job["metadata"]["labels"]["app.kubernetes.io/name"] == "openbezoar"  # the chart's labels


# ---------------------------------------------------------------------------------------------
# bezoar render
# ---------------------------------------------------------------------------------------------
def test_render_writes_all_fourteen_stages(tmp_path):
    cluster = ClusterSettings.model_validate({"generationShards": 2})
    written = render(RUN, None, cluster, tmp_path / "out")
    assert [p.name for p in written] == [f"{s}.yaml" for s in ALL_STAGES]
    assert set(CANONICAL) <= set(ALL_STAGES)  # the builder knows every stage the pipeline has
    for p in written:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if d]
        stage = p.stem
        assert len(docs) == (2 if stage.startswith("generate-") else 1)
        for d in docs:
            kubernetes_validate.validate(d, K8S_VERSIONS[-1], strict=True)
            assert d["metadata"]["labels"][LABEL_RUN] == "r1"
        assert docs == build_stage_jobs(stage, RUN, "r1", cluster)  # same objects the controller creates


def test_render_refuses_an_invalid_recipe(tmp_path):
    with pytest.raises(BadInput, match="schema_version"):
        render(RUN, "r1", ClusterSettings(), tmp_path, recipe_text="name: x\n", recipe_source="r.yaml")
    assert not list(tmp_path.iterdir())


def test_bezoar_render_cli(tmp_path):
    """The CLI wiring: `bezoar render` writes what jobs.render writes."""
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("namespace: ci\ngenerationShards: 2\n")
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "-m", "bezoar_jobs.cli", "render", "--recipe", str(REPO / "recipes" / "demo.yaml"),
         "--cluster", str(cluster), "--run", RUN, "--run-id", "My_Run", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}.yaml" for s in ALL_STAGES)
    job = yaml.safe_load((out / "dpo.yaml").read_text())
    assert job["metadata"]["namespace"] == "ci"
    assert job["metadata"]["name"] == job_name("dpo", "My_Run")
    assert job["metadata"]["annotations"][ANNOTATION_RUN_ID] == "My_Run"
    bad = cluster.with_name("bad.yaml")
    bad.write_text("namespace: ci\nscheduling:\n  data:\n    gpuz: 1\n")
    res = subprocess.run(
        [sys.executable, "-m", "bezoar_jobs.cli", "render", "--recipe", str(REPO / "recipes" / "demo.yaml"),
         "--cluster", str(bad), "--run", RUN, "--out", str(tmp_path / "o2")],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 2 and f"{bad}:4: scheduling.data.gpuz: unknown key" in res.stderr


def test_scanner_skips_only_while_the_choice_holds():
    """checkov skip annotations name the deliberate choices, and disappear when they do not apply."""
    job = build_job("filter-lamini", RUN, "r1", ClusterSettings())
    skips = {k: v for k, v in job["metadata"]["annotations"].items() if k.startswith("checkov.io/skip")}
    assert sorted(v.split("=")[0] for v in skips.values()) == ["CKV_K8S_15", "CKV_K8S_43"]
    assert all(len(v.split("=", 1)[1]) > 20 for v in skips.values())  # every skip says why
    strict = ClusterSettings.model_validate({"images": {"pullPolicy": "Always"}})
    pinned = build_job("filter-lamini", RUN, "r1", strict, image_digests={"data": "sha256:" + "0" * 64})
    assert not [k for k in pinned["metadata"]["annotations"] if k.startswith("checkov.io/")]
    # API keys are mounted files: no secret is an env var, so no CKV_K8S_35 skip is needed anywhere
    keyed = build_job("filter-lamini", RUN, "r1", ClusterSettings.model_validate(FULL))
    assert not any(v.startswith("CKV_K8S_35=") for v in keyed["metadata"]["annotations"].values())


# ---------------------------------------------------------------------------------------------
# What the review of a real cluster found (issue 10): each test failed on the old builder
# ---------------------------------------------------------------------------------------------
def test_each_stage_pod_gets_only_the_keys_it_uses_as_mounted_files():
    """Finding 8: every stage pod got every judge key and the HF token as env vars. Now each key is a
    file in only the stages whose recipe endpoints name it; the HF token skips the report."""
    cluster = ClusterSettings.model_validate(FULL | {"secrets": {
        "s3": {"name": "s3-creds"}, "hfToken": {"name": "hf", "key": "token"},
        "apiKeys": [{"env": "OPENAI_API_KEY", "name": "judge-keys", "key": "openai"},
                    {"env": "ANTHROPIC_API_KEY", "name": "judge-keys", "key": "anthropic"}]}})
    got = {}
    for stage in ALL_STAGES:
        job = build_job(stage, RUN, "r1", cluster, recipe=PAPER)
        env = _env(job)
        assert not [e for e in env.values() if "secretKeyRef" in e.get("valueFrom", {})], stage
        vols = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
        got[stage] = sorted(it["path"] for src in vols.get("api-keys", {}).get("projected", {}).get("sources", [])
                            for it in src["secret"]["items"])
        assert ("HF_TOKEN_PATH" in env) == (stage != "report") == ("hf-token" in vols), stage
    # the paper: a TGI teacher without a key, the GPT-4 filter judge, the Claude MT-Bench judge
    assert got == {s: (["OPENAI_API_KEY"] if s.startswith("filter-") or s == "generate-evol" else
                       ["ANTHROPIC_API_KEY"] if s == "eval-mtbench" else []) for s in ALL_STAGES}
    # and the client finds a mounted key where the pod's env points
    from bezoar_jobs.llm.keys import resolve_api_key

    with pytest.MonkeyPatch.context() as mp, __import__("tempfile").TemporaryDirectory() as d:
        (Path(d) / "OPENAI_API_KEY").write_text("sk-from-file\n")
        mp.delenv("OPENAI_API_KEY", raising=False)
        mp.setenv("BEZOAR_KEYS_DIR", d)
        assert resolve_api_key(PAPER.judge, "judge") == "sk-from-file"


def test_the_cluster_teacher_and_its_budget_go_only_to_teacher_stages():
    """Findings 2 and 9: the URL was injected into every pod and read by none; no pod knew how many
    others shared the teacher. Now the stages that call the teacher get its URL, protocol, capacity
    and the number of pods sharing it; the stages that call a judge get where the teacher is (a judge
    pointed at it uses its replicas: llm/fleet.py ``Fleet.beside``, read by the runner's ``teacher_url``)
    and nothing of its budget; the others get none of it."""
    from bezoar_jobs.cluster_env import teacher_url

    cluster = ClusterSettings.model_validate({"generationShards": 4, "teacher": {
        "url": "http://bz-openbezoar-teacher.ml.svc:80/v1", "backend": "openai-completions",
        "maxConcurrentRequests": 96, "discovery": "dns"}})
    for stage in ALL_STAGES:
        for job in build_stage_jobs(stage, RUN, "r1", cluster):
            env = _env(job)
            if stage.startswith("generate-"):
                assert env["BEZOAR_TEACHER_URL"]["value"] == "http://bz-openbezoar-teacher.ml.svc:80/v1"
                assert env["BEZOAR_TEACHER_BACKEND"]["value"] == "openai-completions"
                assert env["BEZOAR_TEACHER_CAPACITY"]["value"] == "96"
                assert env["BEZOAR_TEACHER_PARTIES"]["value"] == "12"  # 3 generate stages x 4 shards
                assert env["BEZOAR_TEACHER_DISCOVERY"]["value"] == "dns"
            elif stage.startswith("filter-") or stage == "eval-mtbench":
                assert sorted(k for k in env if k.startswith("BEZOAR_TEACHER")) == [
                    "BEZOAR_TEACHER_DISCOVERY", "BEZOAR_TEACHER_URL"], stage
                pod_env = {k: v["value"] for k, v in env.items() if "value" in v}
                assert teacher_url(PAPER, applied=False, environ=pod_env) == "http://bz-openbezoar-teacher.ml.svc:80/v1"
            else:
                assert not [k for k in env if k.startswith("BEZOAR_TEACHER")], stage
    # fewer slots than pods cannot be divided: refused with the file and line
    with pytest.raises(BadInput, match=r"c.yaml:2: generationShards: .*maxConcurrentRequests \(8\).*12 pods"):
        parse_cluster_settings("teacher: {maxConcurrentRequests: 8}\ngenerationShards: 4\n", "c.yaml")


def test_a_filter_whose_judge_is_the_teacher_gets_the_teachers_budget_in_its_pod():
    """A judge served by the teacher's own server (an open judge at its /v1) reaches the same admission limit as
    the generate pods; its filter pod got the teacher's URL and nothing of its budget, and sent its whole
    judge.max_concurrency on top of their shares. It now gets the capacity and the number of pods sharing it: the
    most that run at once, a filter starting only after its generate stage (3 stages x 4 shards here, not 15)."""
    from bezoar_jobs.executors.scheduler import cluster_parties

    url = "http://bz-openbezoar-teacher.ml.svc:80"
    cluster = ClusterSettings.model_validate({"generationShards": 4, "teacher": {
        "url": url, "backend": "tgi", "maxConcurrentRequests": 96}})
    open_judge = PAPER.model_copy(update={"judge": PAPER.judge.model_copy(update={"base_url": url + "/v1"})})
    for recipe, filters_share in ((open_judge, True), (PAPER, False)):
        assert cluster_parties(cluster, recipe) == 12
        for stage in ("generate-orca", "filter-lamini", "eval-mtbench"):
            env = _env(build_stage_jobs(stage, RUN, "r1", cluster, recipe=recipe)[0])
            budget = {k: env[k]["value"] for k in ("BEZOAR_TEACHER_CAPACITY", "BEZOAR_TEACHER_PARTIES",
                                                   "BEZOAR_TEACHER_BACKEND") if k in env}
            shared = stage.startswith("generate") or (stage.startswith("filter") and filters_share)
            assert budget == ({"BEZOAR_TEACHER_CAPACITY": "96", "BEZOAR_TEACHER_PARTIES": "12",
                               "BEZOAR_TEACHER_BACKEND": "tgi"} if shared else {}), (stage, filters_share)


def test_an_mtbench_judge_on_the_teachers_server_takes_a_share_of_its_capacity():
    """MT-Bench's judge on the teacher's own server (an open judge at its /v1) had no share of the teacher's
    capacity: its pod sent its whole judge.max_concurrency whatever ran beside it. Evaluating the base model alone
    (or an early checkpoint), MT-Bench starts beside the generate pods and came on top of their shares, which the
    server refused as overloaded. Its pod now gets the capacity and the count of pods sharing it, and the count
    includes it when it can run beside them (the base model only: 12 generate pods and it); after training (the
    default checkpoints) it runs alone and the count is unchanged. An API judge stays outside the budget."""
    from bezoar_jobs.executors.scheduler import cluster_parties

    url = "http://bz-openbezoar-teacher.ml.svc:80"
    cluster = ClusterSettings.model_validate({"generationShards": 4, "teacher": {
        "url": url, "backend": "tgi", "maxConcurrentRequests": 96}})
    mt = PAPER.evaluation.mtbench
    open_judge = mt.model_copy(update={"judge": PAPER.judge.model_copy(update={"base_url": url + "/v1"})})
    base_only = PAPER.evaluation.model_copy(update={"checkpoints": ("base",), "mtbench": open_judge})
    after_training = PAPER.evaluation.model_copy(update={"mtbench": open_judge})
    for evaluation, parties in ((base_only, "13"), (after_training, "12")):
        recipe = PAPER.model_copy(update={"evaluation": evaluation})
        assert cluster_parties(cluster, recipe) == int(parties)
        for stage in ("generate-orca", "eval-mtbench"):
            env = _env(build_stage_jobs(stage, RUN, "r1", cluster, recipe=recipe)[0])
            budget = {k: env[k]["value"] for k in ("BEZOAR_TEACHER_CAPACITY", "BEZOAR_TEACHER_PARTIES",
                                                   "BEZOAR_TEACHER_BACKEND", "BEZOAR_TEACHER_URL") if k in env}
            assert budget == {"BEZOAR_TEACHER_CAPACITY": "96", "BEZOAR_TEACHER_PARTIES": parties,
                              "BEZOAR_TEACHER_BACKEND": "tgi", "BEZOAR_TEACHER_URL": url}, (stage, parties)
    # the paper's MT-Bench judge (an API): no share, as before
    env = _env(build_stage_jobs("eval-mtbench", RUN, "r1", cluster, recipe=PAPER)[0])
    assert "BEZOAR_TEACHER_PARTIES" not in env and "BEZOAR_TEACHER_CAPACITY" not in env
    assert cluster_parties(cluster, PAPER.model_copy(update={"evaluation": PAPER.evaluation.model_copy(
        update={"checkpoints": ("base",)})})) == 12


def test_gpu_pods_say_so_and_cpu_pods_do_not():
    """Finding 3: a pod that asked for a GPU and cannot use CUDA trained on CPU. The builder marks every
    GPU pod with BEZOAR_GPUS, which the stage checks before it starts (bezoar_jobs/device_check.py)."""
    cluster = ClusterSettings.model_validate(FULL)
    for stage in ALL_STAGES:
        env = _env(build_job(stage, RUN, "r1", cluster))
        gpus = cluster.scheduling_for(stage).gpus
        assert env.get("BEZOAR_GPUS", {}).get("value") == (str(gpus) if gpus else None), stage
        assert "NVIDIA_VISIBLE_DEVICES" not in env  # the device plugin decides which devices a pod sees


def test_local_disk_is_sized_from_the_model_and_the_report_runs_on_cpu():
    """Finding 7: train/eval requested a blanket 200Gi of ephemeral storage (more than many GPU nodes
    have), and the report held a GPU to render HTML."""
    from bezoar_jobs.executors.sizing import auto_gib, weights_gib

    assert weights_gib(3.4) == 7 and weights_gib(0.135) == 1
    paper = ClusterSettings()
    # W = 7Gi; eval: the paper evaluates 4 checkpoints and 3 released baselines: 10 + 7 x 7
    want = {"data": "17Gi", "train": "26Gi", "eval": "59Gi", "report": "5Gi"}
    for stage in ALL_STAGES:
        res = _container(build_job(stage, RUN, "r1", paper, recipe=PAPER))["resources"]
        fam = stage_family(stage)
        assert res["requests"]["ephemeral-storage"] == res["limits"]["ephemeral-storage"] == want[fam], stage
    # the recipe's evaluated checkpoints size the eval pods; a 7B student doubles the weights
    assert auto_gib("eval", 3.4, targets=2) == 24 and auto_gib("train", 7.0) == 10 + 2 * 14 + 3
    big = ClusterSettings.model_validate({"sizing": {"modelParamsB": 7.0}})
    assert _container(build_job("sft-hh", RUN, "r1", big))["resources"]["requests"]["ephemeral-storage"] == "41Gi"
    fixed = ClusterSettings.model_validate({"scheduling": {"train": {"ephemeralStorage": "120Gi"}}})
    assert _container(build_job("dpo", RUN, "r1", fixed))["resources"]["limits"]["ephemeral-storage"] == "120Gi"
    report = build_job("report", RUN, "r1", paper)
    res, pod = _container(report)["resources"], report["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in res["requests"] and "tolerations" not in pod and "BEZOAR_GPUS" not in _env(report)
    assert res["requests"]["memory"] == "4Gi"


def test_in_cluster_run_store_and_shared_cache_volumes():
    """The chart's default install keeps runs on a PVC (no S3 needed): every stage pod mounts it where
    the controller does; a cache PVC replaces the /cache emptyDir when set."""
    cluster = ClusterSettings.model_validate({"storage": {"runVolume": {"claimName": "bz-runs", "mountPath": "/runs"},
                                                          "cacheVolume": {"claimName": "bz-cache"}}})
    job = build_job("sft-orca", "/runs/demo", "demo", cluster)
    vols = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in _container(job)["volumeMounts"]}
    assert vols[mounts["/runs"]]["persistentVolumeClaim"] == {"claimName": "bz-runs"}
    assert vols[mounts["/cache"]]["persistentVolumeClaim"] == {"claimName": "bz-cache"}
    assert _container(job)["args"][-2:] == ["--run", "/runs/demo"]
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(job, version, strict=True)


def test_the_controller_job_that_created_a_stage_job_is_recorded():
    """Finding 4 (part): a retried controller must recognise a failure of its own attempt; the Job
    carries the uid of the controller Job that created it."""
    job = build_job("dpo", RUN, "r1", ClusterSettings(), controller_uid="0b1c-uid")
    assert job["metadata"]["annotations"]["bezoar.dev/controller-uid"] == "0b1c-uid"
    assert "bezoar.dev/controller-uid" not in build_job("dpo", RUN, "r1", ClusterSettings())["metadata"]["annotations"]
