"""manifests/ is generated (scripts/gen_manifests.py, `make manifests`): it must be fresh and valid.

- Regenerating from the fixed example inputs gives exactly the committed files (a change to the Job
  builder, the chart or examples/cluster.yaml without `make manifests` fails here).
- Every document in manifests/ validates with kubernetes-validate --strict.
- The halves agree: the ConfigMap the chart renders holds the cluster settings the Jobs were
  built from, and the Role lets the controller do what it does.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from bezoar_jobs.executors.cluster import ALL_STAGES, ClusterSettings, parse_cluster_settings

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
K8S_VERSIONS = ("1.31", kubernetes_validate.utils.latest_version())


def _gen():
    spec = importlib.util.spec_from_file_location("gen_manifests", REPO / "scripts" / "gen_manifests.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_manifests_are_fresh(tmp_path):
    gen = _gen()
    gen.generate(tmp_path)
    stale = gen.diff_trees(tmp_path, MANIFESTS)
    assert not stale, f"manifests/ is stale ({', '.join(stale)}): run `make manifests`"


def _all_files() -> list[Path]:
    return sorted(MANIFESTS.rglob("*.yaml"))


def test_every_manifest_validates_strictly():
    files = _all_files()
    assert {p.stem for p in (MANIFESTS / "jobs").glob("*.yaml")} == set(ALL_STAGES)
    assert len(list((MANIFESTS / "chart").glob("*.yaml"))) >= 4
    for path in files:
        docs = _docs(path)
        assert docs, path
        for doc in docs:
            if doc["apiVersion"].split("/")[0] in ("jobset.x-k8s.io", "trainer.kubeflow.org"):
                continue  # CRDs: not in kubernetes-validate's schemas (test_distributed_manifests checks them)
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    pytest.fail(f"{path.relative_to(REPO)}: {doc['kind']}/{doc['metadata']['name']} "
                                f"(Kubernetes {version}): {'.'.join(map(str, e.path))}: {e.message}")


def test_chart_and_jobs_agree():
    by_kind: dict[str, list[dict]] = {}
    for path in (MANIFESTS / "chart").glob("*.yaml"):
        for d in _docs(path):
            by_kind.setdefault(d["kind"], []).append(d)
    (cm,) = [c for c in by_kind["ConfigMap"] if "cluster.yaml" in c.get("data", {})]
    settings = parse_cluster_settings(cm["data"]["cluster.yaml"], "manifests ConfigMap")
    example = parse_cluster_settings((REPO / "examples" / "cluster.yaml").read_text())
    assert settings == example
    assert isinstance(settings, ClusterSettings)
    # the teacher the controller scales is the one the chart deploys, and stage pods' SA exists
    assert settings.teacher.deployment in [d["metadata"]["name"] for d in by_kind["Deployment"]]
    assert settings.runnerServiceAccount in [s["metadata"]["name"] for s in by_kind["ServiceAccount"]]
    # the Role grants what the controller uses (kubernetes.py's docstring lists it)
    (role,) = by_kind["Role"]
    verbs = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert {"create", "get", "list", "watch", "delete"} <= verbs[("batch", "jobs")]
    assert {"get", "list", "watch"} <= verbs[("", "pods")]
    assert "get" in verbs[("", "pods/log")]
    assert {"get", "list"} <= verbs[("", "events")]  # the scheduler's reasons for a Pending pod
    assert {"get", "patch"} <= verbs[("apps", "deployments")]  # leases and the replica count
    # every stage Job lands in the settings' namespace and runs as the runner SA
    for path in (MANIFESTS / "jobs").glob("*.yaml"):
        for job in _docs(path):
            assert job["metadata"]["namespace"] == settings.namespace
            assert job["spec"]["template"]["spec"]["serviceAccountName"] == settings.runnerServiceAccount


def test_every_pod_meets_the_restricted_pod_security_profile():
    """Every pod spec of manifests/ (the stage Jobs and the chart's teacher) is admitted in a namespace
    labelled pod-security.kubernetes.io/enforce=restricted."""
    from tests import pod_security

    n = 0
    for path in _all_files():
        for doc in _docs(path):
            if doc["kind"] in ("Job", "Deployment"):
                assert pod_security.check(doc["spec"]["template"]["spec"], "restricted") == [], path.name
                n += 1
    assert n >= 18


def test_distributed_manifests_show_every_launcher():
    """A training stage on 2 nodes x 8 GPUs: Service + Indexed Job, JobSet, TrainJob (executors/distributed.py)."""
    d = MANIFESTS / "distributed"
    svc, job = _docs(d / "job" / "sft-lamini.yaml")
    assert svc["kind"] == "Service" and svc["spec"]["clusterIP"] == "None"
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    assert job["spec"]["template"]["spec"]["subdomain"] == svc["metadata"]["name"]
    (js,) = _docs(d / "jobset" / "sft-lamini.yaml")
    assert js["kind"] == "JobSet" and js["spec"]["network"]["enableDNSHostnames"] is True
    inner = js["spec"]["replicatedJobs"][0]["template"]["spec"]
    args = inner["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--master-addr") + 1] == f"{js['metadata']['name']}-node-0-0.{js['metadata']['name']}"
    (tj,) = _docs(d / "trainjob" / "sft-lamini.yaml")
    assert tj["kind"] == "TrainJob" and tj["spec"]["trainer"]["numNodes"] == 2
    assert tj["spec"]["trainer"]["numProcPerNode"] == 8 and "$(PET_MASTER_ADDR)" in tj["spec"]["trainer"]["args"]


def test_the_jobset_and_trainjob_manifests_pass_their_webhooks(tmp_path: Path) -> None:
    """The rendered JobSet and TrainJob go through the harness's models of JobSet's and Kubeflow Trainer's
    admission (tests/k8s_jobset.py: unknown fields refused, as with fieldValidation=Strict; the webhooks' rules;
    each replicated Job a valid batch/v1 Job), and so does the JobSet the Trainer builds from the TrainJob on a
    torch runtime, which carries our labels onto its pods."""
    import copy

    from tests.k8s_harness import FakeCluster, k8s_jobset  # the harness's own copy of its module

    fc = FakeCluster(tmp_path / "k8s")  # not started: only its Job validation is used

    def admit_jobset(body: dict) -> dict:
        js = copy.deepcopy(body)
        k8s_jobset.check_fields(js, strict=True)
        k8s_jobset.default_jobset(js)
        k8s_jobset.validate_jobset(js, fc._validate_child_job)
        return js

    d = MANIFESTS / "distributed"
    (js,) = _docs(d / "jobset" / "sft-lamini.yaml")
    admitted = admit_jobset(js)
    assert admitted["spec"]["failurePolicy"]["rules"][0]["name"] == "bad_input"
    (tj,) = _docs(d / "trainjob" / "sft-lamini.yaml")
    tj = copy.deepcopy(tj)
    k8s_jobset.check_fields(tj, strict=True)
    k8s_jobset.default_trainjob(tj)
    runtime = {"spec": {"mlPolicy": {"numNodes": 1, "torch": {}}, "template": {"spec": {"replicatedJobs": [{
        "name": "node", "template": {"metadata": {"labels": {k8s_jobset.ANCESTOR: "trainer"}},
                                     "spec": {"template": {"spec": {"containers": [{"name": "node",
                                                                                    "image": "x"}]}}}}}]}}}}
    with pytest.raises(k8s_jobset.Refused, match="must be created before the TrainJob"):
        k8s_jobset.validate_trainjob(tj, None)
    k8s_jobset.validate_trainjob(tj, runtime)
    tj["metadata"]["uid"] = "u"
    built = admit_jobset(k8s_jobset.build_jobset(tj, runtime))
    pod = built["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    assert pod["metadata"]["labels"]["bezoar.dev/stage"] == "sft-lamini"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    env = {e["name"] for e in pod["spec"]["containers"][0]["env"]}
    assert {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"} <= env
