"""The Kubernetes controller, through its real ``kubernetes`` client, against the loopback harness.

Two kinds of stage command run in the harness's pods:

- the REAL ``bezoar stage ...`` CLI, in the end-to-end test at the bottom: the six data stages
  against the SeaweedFS S3 server and the scripted teacher/judge server;
- everywhere else, the scripted stand-in of tests/k8s_harness.py (``fake_entrypoints()`` maps the
  image entrypoint ``bezoar`` to it). It parses the very args the Job builder wrote, commits a real
  manifest with ``bezoar_jobs.manifest.commit`` (real parameter and input hashes), and fails,
  sleeps or skips the manifest when the test's plan says so. That keeps these tests about the
  controller (ordering, skipping, adoption, failure reports) and fast.

The first tests check the harness itself against the Job semantics documented on kubernetes.io
(backoffLimit; the podFailurePolicy examples: FailJob on exit code 42, Ignore on DisruptionTarget),
so the controller tests stand on documented behaviour rather than on the harness's say-so.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import yaml
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from bezoar_jobs.executors import kubernetes as k8s
from bezoar_jobs.executors.cluster import ClusterSettings
from bezoar_jobs.executors.jobs import job_name
from bezoar_jobs.manifest import read_manifest
from bezoar_jobs.store import open_store
from tests.k8s_harness import TOKEN, FakeCluster, fake_calls, fake_entrypoints, write_plan
from tests.k8s_kueue import Kueue

NS = "bz-test"
RECIPE = """schema_version: 1
name: k8s-test
teacher: {backend: local, model: pkg://none/teacher.gguf}
judge: {backend: local, model: pkg://none/judge.gguf}
student: {model: pkg://none/student.gguf}
"""
# a teacher behind a gateway that wants a key: its stages get OPENAI_API_KEY (as a file)
KEYED = RECIPE.replace("teacher: {backend: local, model: pkg://none/teacher.gguf}",
                       "teacher: {backend: tgi, model: t, base_url: 'http://teacher:80', prompt_format: '{user}', "
                       "api_key_env: OPENAI_API_KEY}")
DATA = ["generate-lamini", "generate-evol", "generate-orca", "filter-lamini", "filter-evol", "filter-orca"]
# Runs live on a PersistentVolumeClaim ("runs"), mounted in every stage pod at the path the controller
# (this test process) uses too, as the chart's in-cluster run store does; the pods cannot see anything
# else of this machine's /tmp (tests/k8s_sandbox.py).
_RUNS: list[Path] = []


def base() -> dict[str, Any]:
    return {"namespace": NS, "secrets": {"s3": {"name": ""}},
            "storage": {"runVolume": {"claimName": "runs", "mountPath": str(_RUNS[-1])}}}


def settings(**extra: Any) -> ClusterSettings:
    return ClusterSettings.model_validate({**base(), **extra})


def restricted(spec: dict[str, Any]) -> dict[str, Any]:
    """A pod spec made to pass the restricted Pod Security profile (the harness enforces it)."""
    spec.setdefault("securityContext", {}).update(
        {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
         "seccompProfile": {"type": "RuntimeDefault"}})
    for c in spec["containers"]:
        c.setdefault("securityContext", {}).update({"allowPrivilegeEscalation": False,
                                                    "capabilities": {"drop": ["ALL"]}})
    return spec


@pytest.fixture
def fc(tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    plan = fake / "plan.json"
    env = write_plan(plan, {})
    runs = tmp_path / "runs"
    _RUNS.append(runs)
    with FakeCluster(tmp_path / "k8s", entrypoints=fake_entrypoints(), extra_env=env,
                     host_shares=[fake]) as cluster:
        cluster.add_pvc(NS, "runs", runs)
        cluster.plan_path = plan  # type: ignore[attr-defined]
        yield cluster


def plan(fc: FakeCluster, **stages: dict) -> None:
    write_plan(fc.plan_path, {k.replace("_", "-"): v for k, v in stages.items()})  # type: ignore[attr-defined]


class Run:
    """One ``run_pipeline`` call (optionally in a thread) with its output and outcome."""

    def __init__(self, fc: FakeCluster, run_dir: Path, stages: list[str], cluster: ClusterSettings | None = None,
                 force: bool = False, recipe: str = RECIPE, **opts: Any):
        self.out = io.StringIO()
        self.outcome: k8s.RunOutcome | None = None
        self.rc: int | None = None
        self.args = (recipe, "recipe.yaml", str(run_dir), None, cluster or settings(), stages, force, fc.api_client())
        self.opts = {"tick_s": 0.2, **opts}
        self.thread: threading.Thread | None = None

    def __call__(self) -> Run:
        self.rc = k8s.run_pipeline(*self.args, out=self.out, on_outcome=self._keep, **self.opts)
        return self

    def _keep(self, o: k8s.RunOutcome) -> None:
        self.outcome = o

    def start(self) -> Run:
        self.thread = threading.Thread(target=self, daemon=True)
        self.thread.start()
        return self

    def join(self, timeout: float = 60) -> Run:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the controller did not finish"
        return self

    @property
    def text(self) -> str:
        return self.out.getvalue()


def when(fc: FakeCluster, what: str, name: str) -> float:
    return next(t for t, w, n in fc.timeline if w == what and n == name)


def job_status(fc: FakeCluster, name: str) -> dict:
    return next(j for j in fc.jobs(NS) if j["metadata"]["name"] == name)["status"]


# ---------------------------------------------------------------------------------------------
# The harness follows the documented Job semantics (checked with the real client, typed models)
# ---------------------------------------------------------------------------------------------
def _job(name: str, script: str, *, completions: int = 1, parallelism: int = 1, backoff: int = 6,
         policy: bool = True, **spec: Any) -> dict:
    body: dict[str, Any] = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {
            "completions": completions, "parallelism": parallelism, "backoffLimit": backoff,
            "template": {"spec": {"restartPolicy": "Never", "containers": [
                {"name": "main", "image": "docker.io/library/bash:5", "command": ["bash", "-c", script]}]}},
            **spec,
        },
    }
    if policy:  # the shape of the kubernetes.io podFailurePolicy example
        body["spec"]["podFailurePolicy"] = {"rules": [
            {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [42]}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        ]}
    restricted(body["spec"]["template"]["spec"])
    return body


def _wait_terminal(fc: FakeCluster, name: str, timeout: float = 20) -> client.V1Job:
    batch = client.BatchV1Api(fc.api_client())
    fc.wait_for(lambda: fc.job_condition(NS, name), timeout, f"Job {name} to finish")
    return batch.read_namespaced_job(name, NS)  # typed: the harness's objects deserialize


def test_harness_failjob_on_exit_code_42_stops_the_job_at_once(fc):
    batch = client.BatchV1Api(fc.api_client())
    batch.create_namespaced_job(NS, _job("exit-42", "echo hello; sleep 0.3; exit 42", completions=6, parallelism=2))
    job = _wait_terminal(fc, "exit-42")
    conds = {c.type: c for c in job.status.conditions}
    assert conds["Failed"].reason == "PodFailurePolicy"
    assert "failed with exit code 42 matching FailJob rule at index 0" in conds["Failed"].message
    assert conds["FailureTarget"].reason == "PodFailurePolicy"
    assert "Complete" not in conds
    # no retries: only the first parallel batch ever ran, the Job did not wait for backoffLimit
    assert len(fc.pods(NS, "exit-42")) == 2


def test_harness_backoff_limit_counts_failures(fc):
    batch = client.BatchV1Api(fc.api_client())
    batch.create_namespaced_job(NS, _job("flaky", "echo try; exit 1", backoff=2, policy=False))
    job = _wait_terminal(fc, "flaky")
    failed = next(c for c in job.status.conditions if c.type == "Failed")
    assert failed.reason == "BackoffLimitExceeded"
    assert job.status.failed == 3 and len(fc.pods(NS, "flaky")) == 3  # backoffLimit + 1 attempts


def test_harness_ignores_a_disruption_and_replaces_the_pod(fc):
    batch = client.BatchV1Api(fc.api_client())
    batch.create_namespaced_job(NS, _job("preempted", "sleep 1.2; echo done", completions=2, parallelism=2, backoff=0))
    first = fc.wait_for(lambda: [p for p in fc.pods(NS, "preempted") if p["status"]["phase"] == "Running"],
                        what="a running pod")[0]
    fc.disrupt(first["metadata"]["name"], NS)
    job = _wait_terminal(fc, "preempted")
    assert any(c.type == "Complete" for c in job.status.conditions)
    assert any(c.type == "SuccessCriteriaMet" for c in job.status.conditions)
    # with backoffLimit 0 a counted failure would have failed the Job: the disruption was not counted
    assert not job.status.failed
    pods = fc.pods(NS, "preempted")
    assert len(pods) == 3
    hit = next(p for p in pods if p["metadata"]["name"] == first["metadata"]["name"])
    assert hit["status"]["phase"] == "Failed"
    assert hit["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 143  # SIGTERM
    assert any(c["type"] == "DisruptionTarget" for c in hit["status"]["conditions"])


def test_harness_indexed_job_env_secrets_and_logs(fc):
    fc.add_secret(NS, "creds", {"token": "s3cr3t", "file": "[default]\nkey=value\n"})
    body = _job("indexed", 'echo "index=$1 from-env=$JOB_COMPLETION_INDEX token=${#TOKEN} file=$(head -1 $CRED)"',
                completions=3, parallelism=3, completionMode="Indexed")
    c = body["spec"]["template"]["spec"]["containers"][0]
    c["args"] = ["x", "$(JOB_COMPLETION_INDEX)"]
    c["env"] = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                {"name": "CRED", "value": "/var/run/creds/file"}]
    c["volumeMounts"] = [{"name": "creds", "mountPath": "/var/run/creds", "readOnly": True}]
    body["spec"]["template"]["spec"]["volumes"] = [{"name": "creds", "secret": {"secretName": "creds"}}]
    client.BatchV1Api(fc.api_client()).create_namespaced_job(NS, body)
    job = _wait_terminal(fc, "indexed")
    assert job.status.completed_indexes == "0-2" and job.status.succeeded == 3
    core = client.CoreV1Api(fc.api_client())
    logs = sorted(core.read_namespaced_pod_log(p["metadata"]["name"], NS) for p in fc.pods(NS, "indexed"))
    assert logs == [f"index={i} from-env={i} token=6 file=[default]\n" for i in range(3)]


def test_harness_deadline_suspend_and_kueue_admission(fc):
    batch = client.BatchV1Api(fc.api_client())
    batch.create_namespaced_job(NS, _job("slow", "sleep 20", activeDeadlineSeconds=1))
    t0 = time.time()
    job = _wait_terminal(fc, "slow")
    assert next(c for c in job.status.conditions if c.type == "Failed").reason == "DeadlineExceeded"
    assert time.time() - t0 < 8
    fc.kueue = Kueue({"team-a": {"cpu": "4", "memory": "8Gi"}})
    queued = _job("queued", "echo admitted", suspend=True)
    queued["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-a"}
    batch.create_namespaced_job(NS, queued)
    assert fc.pods(NS, "queued") == []  # suspended: no pods until Kueue admits it
    job = _wait_terminal(fc, "queued")
    assert any(c.type == "Complete" for c in job.status.conditions)
    assert when(fc, "admitted", "queued") < when(fc, "pod", fc.pods(NS, "queued")[0]["metadata"]["name"])


def test_harness_api_errors_watch_and_auth(fc):
    batch = client.BatchV1Api(fc.api_client())
    bad = _job("bad-policy", "true")
    bad["spec"]["template"]["spec"]["restartPolicy"] = "OnFailure"
    with pytest.raises(ApiException) as e:
        batch.create_namespaced_job(NS, bad)
    assert e.value.status == 422 and "restartPolicy" in e.value.body
    # a misspelled field: the client's own models refuse it, and so does the server (sent raw here)
    typo = _job("typo", "true")
    typo["spec"]["backofLimit"] = 1
    req = urllib.request.Request(f"{fc.url}/apis/batch/v1/namespaces/{NS}/jobs", data=json.dumps(typo).encode(),
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as he:
        urllib.request.urlopen(req, timeout=10)
    assert he.value.code == 422 and "backofLimit" in he.value.read().decode()
    batch.create_namespaced_job(NS, _job("once", "true"))
    with pytest.raises(ApiException) as e:
        batch.create_namespaced_job(NS, _job("once", "true"))
    assert e.value.status == 409
    _wait_terminal(fc, "once")
    rv = batch.list_namespaced_job(NS).metadata.resource_version
    fc.compact()
    with pytest.raises(ApiException) as e:
        for _ in watch.Watch().stream(batch.list_namespaced_job, NS, resource_version=rv, timeout_seconds=5):
            pass
    assert e.value.status == 410
    cfg = client.Configuration()
    cfg.host = fc.url
    cfg.api_key = {"BearerToken": "wrong"}
    cfg.api_key_prefix = {"BearerToken": "Bearer"}
    with pytest.raises(ApiException) as e:
        client.BatchV1Api(client.ApiClient(cfg)).list_namespaced_job(NS)
    assert e.value.status == 401 and TOKEN != "wrong"


def test_harness_deployment_scale_subresource(fc):
    fc.add_deployment(NS, "teacher", replicas=0, ready_delay=0.1)
    apps = client.AppsV1Api(fc.api_client())
    assert apps.read_namespaced_deployment_scale("teacher", NS).spec.replicas == 0
    body = client.V1Scale(
        metadata=client.V1ObjectMeta(name="teacher", namespace=NS), spec=client.V1ScaleSpec(replicas=3)
    )
    apps.replace_namespaced_deployment_scale("teacher", NS, body)
    assert apps.read_namespaced_deployment("teacher", NS).spec.replicas == 3
    fc.wait_for(lambda: apps.read_namespaced_deployment("teacher", NS).status.ready_replicas == 3, what="3 ready")
    apps.patch_namespaced_deployment_scale("teacher", NS, {"spec": {"replicas": 0}})
    dep = apps.read_namespaced_deployment("teacher", NS)
    assert dep.spec.replicas == 0 and not dep.status.ready_replicas
    assert fc.scale_history == [("teacher", 3), ("teacher", 0)]


# ---------------------------------------------------------------------------------------------
# The controller
# ---------------------------------------------------------------------------------------------
def test_stages_start_as_soon_as_their_inputs_commit(fc, tmp_path):
    plan(fc, generate_lamini={"sleep": 1.0}, generate_evol={"sleep": 2.5})
    r = Run(fc, tmp_path / "runs" / "run", DATA)()
    assert r.rc == 0, r.text
    store = open_store(tmp_path / "runs" / "run")
    assert all(read_manifest(store, s) for s in DATA)
    assert store.read_text("recipe.yaml") == RECIPE  # frozen into the run
    assert r.outcome.committed and sorted(r.outcome.committed) == sorted(DATA)
    # independent stages side by side, and filter-lamini did not wait for the slow generate-evol
    gen_created = [when(fc, "created", f"bz-run-{s}") for s in DATA[:3]]
    assert max(gen_created) < when(fc, "complete", "bz-run-generate-lamini")
    assert when(fc, "created", "bz-run-filter-lamini") < when(fc, "complete", "bz-run-generate-evol")
    assert when(fc, "created", "bz-run-filter-evol") > when(fc, "complete", "bz-run-generate-evol")
    # logs streamed with the stage prefix
    assert "[generate-evol] generate-evol: starting (attempt 0)" in r.text
    assert "[filter-orca] filter-orca: committed" in r.text
    # conditions came from watches: one list per kind, never a Job poll beyond get-before-create
    lists = [p for m, p in fc.requests if m == "GET" and p.split("?")[0].endswith("/jobs") and "watch=true" not in p]
    watches = [p for m, p in fc.requests if "watch=true" in p]
    gets = [p for m, p in fc.requests if m == "GET" and "/jobs/" in p]
    assert len(lists) == 1 and any("/jobs" in p for p in watches) and any("/pods" in p for p in watches)
    assert all("labelSelector=bezoar.dev/run=run" in unquote(p) for p in lists + watches)
    assert len(gets) == len(DATA)


def test_the_report_runs_after_every_other_selected_stage(fc, tmp_path):
    plan(fc, generate_orca={"sleep": 1.0})
    stages = ["generate-lamini", "generate-orca", "filter-lamini", "report"]
    r = Run(fc, tmp_path / "runs" / "run", stages)()
    assert r.rc == 0, r.text
    others = max(when(fc, "complete", f"bz-run-{s}") for s in stages[:-1])
    assert when(fc, "created", "bz-run-report") > others
    # the report is current while every stage it was built from is: one scheduler decides that
    # for every stage, the report included (bezoar_jobs.state, no stage imported), so a second run
    # skips them all and creates no Job
    n = len(fc.created_jobs())
    again = Run(fc, tmp_path / "runs" / "run", stages)()
    assert again.rc == 0 and again.outcome.skipped == stages and again.outcome.committed == []
    assert len(fc.created_jobs()) == n


def test_committed_stages_are_skipped_and_changed_ones_rerun(fc, tmp_path):
    run = tmp_path / "runs" / "run"
    assert Run(fc, run, DATA)().rc == 0
    n = len(fc.created_jobs())
    again = Run(fc, run, DATA)()
    assert again.rc == 0 and again.outcome.skipped == DATA and again.outcome.created == []
    assert len(fc.created_jobs()) == n and again.text.count("skipped (committed") == 6
    # a run's recipe is written once: a controller with another recipe is refused (a retried controller
    # pod whose recipe source was edited meanwhile must not change the run behind its committed stages)
    refused = Run(fc, run, DATA, recipe=RECIPE + "filter: {threshold: 8}\n")()
    assert refused.rc == 2 and "recipe is written once" in refused.text and "--refreeze" in refused.text
    assert open_store(run).read_text("recipe.yaml") == RECIPE and len(fc.created_jobs()) == n
    # asked to (--refreeze), a changed filter parameter reruns exactly the filters; their finished Jobs are replaced
    changed = Run(fc, run, DATA, recipe=RECIPE + "filter: {threshold: 8}\n", refreeze=True)()
    assert changed.rc == 0
    assert changed.outcome.skipped == DATA[:3]
    assert sorted(changed.outcome.created) == sorted(f"bz-run-{s}" for s in DATA[3:])
    assert "deleting finished Job bz-run-filter-orca" in changed.text


def test_a_failing_stage_stops_the_pipeline_naming_stage_reason_and_log(fc, tmp_path):
    plan(fc, filter_lamini={"fail_times": 10, "log": ["judging 12 rows", "judge returned 503 three times"]})
    cluster = settings(stageOverrides={"filter-lamini": {"backoffLimit": 1}})
    r = Run(fc, tmp_path / "runs" / "run", ["generate-lamini", "filter-lamini", "sft-lamini"], cluster)()
    assert r.rc == 5  # a stage failed for good: the controller Job must not run it again (its podFailurePolicy)
    o = r.outcome
    assert o.failed_stage == "filter-lamini" and o.reason == "BackoffLimitExceeded"
    assert "Job bz-run-filter-lamini" in o.message and "exit codes of its pods: 3, 3" in o.message
    assert o.last_log_lines[-1] == "filter-lamini: transient failure on attempt 1"
    assert "judge returned 503 three times" in o.last_log_lines
    assert "stage filter-lamini failed: BackoffLimitExceeded" in r.text
    assert "  filter-lamini: transient failure on attempt 1" in r.text
    assert len(fc.pods(NS, "bz-run-filter-lamini")) == 2  # backoffLimit 1: two attempts
    assert "bz-run-sft-lamini" not in fc.created_jobs()  # the pipeline stopped


def test_exit_code_2_is_not_retried_and_exits_2(fc, tmp_path):
    plan(fc, generate_orca={"exit": 2, "log": ["seeds: flan.jsonl:3: not valid JSON"]})
    r = Run(fc, tmp_path / "runs" / "run", ["generate-orca", "filter-orca"])()
    assert r.rc == 2
    assert r.outcome.failed_stage == "generate-orca" and r.outcome.reason == "PodFailurePolicy"
    assert "seeds: flan.jsonl:3: not valid JSON" in r.outcome.last_log_lines
    assert len(fc.pods(NS, "bz-run-generate-orca")) == 1  # one pod: bad input is never retried
    assert [c["stage"] for c in fake_calls(fc.plan_path)] == ["generate-orca"]


def test_a_disrupted_pod_is_retried_and_the_stage_completes(fc, tmp_path):
    plan(fc, generate_lamini={"sleep": 1.5})
    cluster = settings(stageOverrides={"generate-lamini": {"backoffLimit": 0}})
    r = Run(fc, tmp_path / "runs" / "run", ["generate-lamini"], cluster).start()
    pod = fc.wait_for(lambda: [p for p in fc.pods(NS, "bz-run-generate-lamini") if p["status"]["phase"] == "Running"],
                      what="the stage's pod to run")[0]
    fc.disrupt(pod["metadata"]["name"], NS)
    r.join()
    assert r.rc == 0, r.text
    assert len(fc.pods(NS, "bz-run-generate-lamini")) == 2
    assert not job_status(fc, "bz-run-generate-lamini").get("failed")  # backoffLimit 0 was not used up
    assert read_manifest(open_store(tmp_path / "runs" / "run"), "generate-lamini") is not None


def test_a_restarted_controller_adopts_the_running_job(fc, tmp_path):
    """The first controller is the real CLI (`bezoar run --executor kubernetes`), killed mid-stage."""
    plan(fc, generate_lamini={"sleep": 2.5})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(yaml.safe_dump(base()))
    run = tmp_path / "runs" / "run"
    env = {**os.environ, "KUBECONFIG": str(fc.kubeconfig)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    first = subprocess.Popen(
        [sys.executable, "-m", "bezoar_jobs.cli", "run", "--executor", "kubernetes", "--recipe", str(recipe),
         "--run", str(run), "--cluster", str(cluster_file), "--only", "generate-lamini"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(first.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        # killed once it is following the stage's log: the Job is running and was created by it
        fc.wait_for(lambda: any(ln.startswith("[generate-lamini] ") for ln in lines), timeout=30,
                    what="the first controller to stream the stage's log")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        reader.join(timeout=10)
    assert "[bezoar] generate-lamini: created Job bz-run-generate-lamini\n" in lines
    assert fc.job_condition(NS, "bz-run-generate-lamini") is None  # still running after the kill
    r = Run(fc, run, ["generate-lamini"])()
    assert r.rc == 0, r.text
    assert r.outcome.adopted == ["bz-run-generate-lamini"] and r.outcome.created == []
    assert fc.created_jobs() == ["bz-run-generate-lamini"]  # no second Job
    assert len(fc.pods(NS, "bz-run-generate-lamini")) == 1 and len(fake_calls(fc.plan_path)) == 1
    assert "[generate-lamini] generate-lamini: committed" in r.text  # the adopted pod's log streamed


def test_complete_without_a_manifest_is_a_failure(fc, tmp_path):
    plan(fc, generate_evol={"no_manifest": True})
    r = Run(fc, tmp_path / "runs" / "run", ["generate-evol", "filter-evol"])()
    assert r.rc == 5
    assert r.outcome.failed_stage == "generate-evol" and r.outcome.reason == "NoManifest"
    assert "generate-evol/_MANIFEST.json" in r.outcome.message and "not committed" in r.outcome.message
    assert fc.job_condition(NS, "bz-run-generate-evol") == "Complete"
    assert "bz-run-filter-evol" not in fc.created_jobs()


def test_cancel_deletes_the_runs_jobs_only_and_holds(fc, tmp_path):
    """Finding 4: `bezoar cancel` deleted the Jobs, and the controller (exit 1, retried by its Job) made them
    again. Now cancel marks the run in its store: the running controller stops with exit 4 (its Job's
    podFailurePolicy fails the Job), and any later controller of the run refuses to start."""
    plan(fc, **{s.replace("-", "_"): {"sleep": 30} for s in DATA[:3]})
    other = _job("other-run-job", "sleep 30")
    other["metadata"]["labels"] = {"bezoar.dev/run": "another-run"}
    client.BatchV1Api(fc.api_client()).create_namespaced_job(NS, other)
    r = Run(fc, tmp_path / "runs" / "run", DATA).start()
    fc.wait_for(lambda: sum(1 for p in fc.pods(NS) if p["status"]["phase"] == "Running") == 4, what="4 running pods")
    out = io.StringIO()
    assert k8s.cancel(str(tmp_path / "runs" / "run"), None, settings(), fc.api_client(), out=out) == 0
    assert "deleted 3 Job(s) of run run" in out.getvalue()
    assert [j["metadata"]["name"] for j in fc.jobs(NS)] == ["other-run-job"]
    r.join()
    assert r.rc == 4 and r.outcome.reason == "Cancelled", r.text
    assert (tmp_path / "runs" / "run" / "_control" / "cancelled.json").is_file()
    fc.wait_for(
        lambda: [p["metadata"]["name"] for p in fc.pods(NS)] == [fc.pods(NS, "other-run-job")[0]["metadata"]["name"]],
        what="the run's pods to be terminated and deleted",
    )
    # the CLI wiring (`bezoar cancel`), through the kubeconfig: nothing of this run is left
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(yaml.safe_dump(base()))
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    res = subprocess.run([sys.executable, "-m", "bezoar_jobs.cli", "cancel", "--run", str(tmp_path / "runs" / "run"),
                          "--cluster", str(cluster_file)], capture_output=True, text=True, timeout=60,
                         env={**env, "KUBECONFIG": str(fc.kubeconfig)})
    assert res.returncode == 0 and "no Jobs of run run in namespace bz-test" in res.stdout, res.stderr
    assert [j["metadata"]["name"] for j in fc.jobs(NS)] == ["other-run-job"]
    # a retried controller (or a laptop, or CI) cannot undo the cancel: it refuses before creating anything
    n = len(fc.created_jobs())
    again = Run(fc, tmp_path / "runs" / "run", DATA)()
    assert again.rc == 4 and "was cancelled" in again.text and len(fc.created_jobs()) == n
    # `bezoar cancel --undo` lifts it; the run then resumes (fresh Jobs, nothing was committed)
    assert k8s.cancel(str(tmp_path / "runs" / "run"), None, settings(), fc.api_client(), out=io.StringIO(),
                      undo=True) == 0
    plan(fc)
    assert Run(fc, tmp_path / "runs" / "run", DATA[:1])().rc == 0


def test_a_job_deleted_by_hand_while_it_runs_ends_the_run_naming_it(fc, tmp_path):
    """Not `bezoar cancel` (no mark in the run store): someone deletes a running stage's Job (`kubectl delete
    job`). The watch says DELETED; the run ends as a failed stage naming the Job, instead of waiting for a
    Job that will never finish, and nothing after it starts."""
    plan(fc, generate_lamini={"sleep": 30, "log": ["asking the teacher"]})
    r = Run(fc, tmp_path / "runs" / "run", ["generate-lamini", "filter-lamini"]).start()
    fc.wait_for(lambda: [p for p in fc.pods(NS, "bz-run-generate-lamini") if p["status"]["phase"] == "Running"],
                what="the stage's pod to run")
    client.BatchV1Api(fc.api_client()).delete_namespaced_job("bz-run-generate-lamini", NS,
                                                             propagation_policy="Background")
    r.join()
    assert r.rc == 5, r.text
    assert r.outcome.failed_stage == "generate-lamini" and r.outcome.reason == "JobDeleted", r.outcome
    assert "Job bz-run-generate-lamini was deleted while it ran" in r.outcome.message
    assert "bz-run-filter-lamini" not in fc.created_jobs()
    assert not (tmp_path / "runs" / "run" / "_control" / "cancelled.json").exists()


def test_sharded_generation_runs_shards_then_commits(fc, tmp_path):
    plan(fc, generate_lamini={"shards": 3})
    cluster = settings(generationShards=3)
    r = Run(fc, tmp_path / "runs" / "run", ["generate-lamini", "filter-lamini"], cluster)()
    assert r.rc == 0, r.text
    shard_pods = fc.pods(NS, "bz-run-generate-lamini")
    assert sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in shard_pods) == [
        "0", "1", "2"]
    assert job_status(fc, "bz-run-generate-lamini")["completedIndexes"] == "0-2"
    assert when(fc, "created", "bz-run-generate-lamini-commit") > when(fc, "complete", "bz-run-generate-lamini")
    calls = [(c["stage"], c["shard"]) for c in fake_calls(fc.plan_path)]
    assert sorted(calls[:3]) == [("generate-lamini", f"{i}/3") for i in range(3)]
    assert calls[3:] == [("generate-lamini", None), ("filter-lamini", None)]
    for i in range(3):
        assert f"[generate-lamini#{i}] generate-lamini: shard {i}/3 written" in r.text
    assert read_manifest(open_store(tmp_path / "runs" / "run"), "generate-lamini") is not None


def test_teacher_is_scaled_up_waited_for_and_scaled_down(fc, tmp_path):
    fc.add_deployment(NS, "teacher", replicas=0, ready_delay=0.6)
    cluster = settings(teacher={"deployment": "teacher", "url": "http://teacher:80", "replicas": 2})
    plan(fc, generate_lamini={"require_env": ["BEZOAR_TEACHER_URL"]})
    r = Run(fc, tmp_path / "runs" / "run", DATA, cluster)()
    assert r.rc == 0, r.text
    assert fc.scale_history == [("teacher", 2), ("teacher", 0)]
    ready = when(fc, "ready-2", "teacher")
    assert all(when(fc, "created", f"bz-run-{s}") >= ready for s in DATA[:3])  # no generation before it is ready
    # scaled down once generation was committed, while the filters may still run
    assert when(fc, "scaled-0", "teacher") >= max(when(fc, "complete", f"bz-run-{s}") for s in DATA[:3])
    assert "every generate stage is committed; no other run holds it: scaled Deployment teacher to 0" in r.text
    # a second run needs no generation: it neither scales the teacher up nor waits for it
    again = Run(fc, tmp_path / "runs" / "run", DATA, cluster)()
    assert again.rc == 0 and fc.scale_history == [("teacher", 2), ("teacher", 0)]


def test_missing_teacher_deployment_is_bad_input(fc, tmp_path):
    cluster = settings(teacher={"deployment": "no-such-teacher"})
    r = Run(fc, tmp_path / "runs" / "run", ["generate-lamini"], cluster)()
    assert r.rc == 2 and r.outcome.reason == "TeacherNotReady" and "404" in r.outcome.message
    assert fc.created_jobs() == []


def test_kueue_jobs_wait_for_admission(fc, tmp_path):
    fc.kueue = Kueue({"team-a": {"cpu": "8", "memory": "32Gi", "ephemeral-storage": "100Gi"}})
    r = Run(fc, tmp_path / "runs" / "run", ["generate-orca"], settings(kueue={"queueName": "team-a"}))()
    assert r.rc == 0, r.text
    name = "bz-run-generate-orca"
    pod = fc.pods(NS, name)[0]["metadata"]["name"]
    assert when(fc, "created", name) < when(fc, "admitted", name) < when(fc, "pod", pod)


def test_watch_expiry_relists_and_carries_on(fc, tmp_path):
    plan(fc, generate_lamini={"sleep": 1.0})
    r = Run(fc, tmp_path / "runs" / "run", ["generate-lamini", "filter-lamini"]).start()
    fc.wait_for(lambda: fc.pods(NS, "bz-run-generate-lamini"), what="the first pod")
    fc.compact()
    r.join()
    assert r.rc == 0, r.text
    lists = [p for m, p in fc.requests if m == "GET" and p.split("?")[0].endswith("/jobs") and "watch=true" not in p]
    assert len(lists) >= 2  # the initial list plus the re-list after 410 Gone


def test_secrets_reach_the_pod_and_a_missing_one_is_reported(fc, tmp_path):
    cluster = settings(secrets={"s3": {"name": "s3"}, "hfToken": {"name": "hf"},
                                "apiKeys": [{"env": "OPENAI_API_KEY", "name": "judge", "key": "key"}]})
    # the API key reaches the stage whose endpoint names it, as a file readable by the pod's user only
    plan(fc, generate_lamini={"require_env": ["AWS_REGION", "BEZOAR_SCRATCH"], "require_key_files": ["OPENAI_API_KEY"],
                              "require_files_env": ["AWS_SHARED_CREDENTIALS_FILE", "HF_TOKEN_PATH"]})
    fc.add_secret(NS, "s3", {"credentials": "[default]\naws_access_key_id = a\naws_secret_access_key = b\n"})
    fc.add_secret(NS, "hf", {"token": "hf_x"})
    fc.add_secret(NS, "judge", {"key": "sk-test"})
    assert Run(fc, tmp_path / "runs" / "run", ["generate-lamini"], cluster, recipe=KEYED)().rc == 0
    job = next(j for j in fc.jobs(NS) if j["metadata"]["name"] == "bz-run-generate-lamini")
    assert "OPENAI_API_KEY" not in {e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    # a Secret that does not exist: the pod cannot start; the controller says why, the deadline ends it
    missing = settings(secrets={"s3": {"name": ""}, "apiKeys": [{"env": "OPENAI_API_KEY", "name": "absent"}]},
                       stageOverrides={"generate-orca": {"activeDeadlineSeconds": 1}})
    r = Run(fc, tmp_path / "runs" / "run", ["generate-orca"], missing, recipe=KEYED, refreeze=True)()
    assert r.rc == 5 and r.outcome.reason == "DeadlineExceeded"
    assert 'cannot start: CreateContainerConfigError: secret "absent" not found' in r.text


def test_force_reruns_a_committed_stage(fc, tmp_path):
    run = tmp_path / "runs" / "run"
    assert Run(fc, run, ["generate-lamini"])().rc == 0
    r = Run(fc, run, ["generate-lamini"], force=True)()
    assert r.rc == 0 and r.outcome.committed == ["generate-lamini"]
    assert fc.created_jobs() == ["bz-run-generate-lamini"] * 2
    assert len(fake_calls(fc.plan_path)) == 2


def test_bad_settings_and_unreachable_cluster_fail_cleanly(fc, tmp_path, monkeypatch):
    out = io.StringIO()
    rc = k8s.run_pipeline(
        "schema_version: 1\nname: x\n",
        "r.yaml",
        str(tmp_path / "runs" / "run"),
        None,
        settings(),
        ["generate-lamini"],
        False,
        fc.api_client(),
        out=out,
    )
    assert rc == 2 and "teacher" in out.getvalue()
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    out = io.StringIO()
    rc = k8s.run_pipeline(
        RECIPE, "r.yaml", str(tmp_path / "runs" / "run"), None, settings(), ["generate-lamini"], False, out=out
    )
    assert rc == 2 and "no usable Kubernetes configuration" in out.getvalue()
    # a kubeconfig with the wrong token: the API refuses, exit 2 naming the status
    cfg = yaml.safe_load(fc.kubeconfig.read_text())
    cfg["users"][0]["user"]["token"] = "wrong"
    bad = tmp_path / "bad-kubeconfig"
    bad.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("KUBECONFIG", str(bad))
    out = io.StringIO()
    rc = k8s.run_pipeline(RECIPE, "r.yaml", str(tmp_path / "runs" / "run"), None, settings(), ["generate-lamini"],
                          False, out=out)
    assert rc == 2 and "401" in out.getvalue()
    assert job_name("generate-lamini", "run") not in fc.created_jobs()


# ---------------------------------------------------------------------------------------------
# End to end: the real stages, the real S3 store, the scripted teacher and judge
# ---------------------------------------------------------------------------------------------
def test_data_stages_end_to_end_on_s3(tmp_path, s3_server, s3_run_uri):
    """The six data stages as Jobs of the Kubernetes executor. Each pod runs the real `bezoar stage`
    with only what its Job spec gives it: S3 credentials from the mounted Secret file, the judge key
    from a secretKeyRef; nothing from this process's environment."""
    from tests.llm_server import LLMTestServer
    from tests.scripted import scripted_answer, scripted_recipe

    with LLMTestServer(script=scripted_answer, api_key="test-key") as llm, \
            FakeCluster(tmp_path / "k8s") as fc:
        recipe = scripted_recipe(tmp_path, llm.url)
        fc.add_secret(NS, "bezoar-s3", {"credentials": f"[default]\naws_access_key_id = {s3_server.access_key}\n"
                                                       f"aws_secret_access_key = {s3_server.secret_key}\n"})
        fc.add_secret(NS, "judge", {"api-key": "test-key"})
        fc.add_deployment(NS, "teacher", replicas=0, ready_delay=0.2)
        cluster = ClusterSettings.model_validate({
            "namespace": NS,
            "storage": {"s3EndpointUrl": s3_server.endpoint, "s3Region": s3_server.region, "s3AddressingStyle": "path"},
            "secrets": {"s3": {"name": "bezoar-s3"}, "apiKeys": [{"env": "SCRIPTED_JUDGE_KEY", "name": "judge"}]},
            "teacher": {"deployment": "teacher", "url": llm.url},
        })
        out = io.StringIO()
        outcomes: list[k8s.RunOutcome] = []
        rc = k8s.run_pipeline(recipe.read_text(), str(recipe), s3_run_uri, None, cluster, DATA, False,
                              fc.api_client(), out=out, on_outcome=outcomes.append)
        assert rc == 0, out.getvalue()[-4000:]
        store = open_store(s3_run_uri)
        for stage in DATA:
            m = read_manifest(store, stage)
            assert m is not None and "data/train.jsonl" in m["files"], stage
        kept = store.read_text("filter-lamini/data/train.jsonl").splitlines()
        assert len(kept) == read_manifest(store, "filter-lamini")["counts"]["kept"] > 0
        assert json.loads(kept[0])["gpt4_status"] == "pass"
        assert sorted(outcomes[0].committed) == sorted(DATA)
        assert fc.scale_history == [("teacher", 1), ("teacher", 0)]
        text = out.getvalue()
        assert "[filter-orca]" in text and "committed to s3://" in text
        assert "test-key" not in text and s3_server.secret_key not in text  # no secret in any log line
        # the pods really had no credentials but the mounted file (the harness passes no host env)
        job = next(j for j in fc.jobs(NS) if j["metadata"]["name"].endswith("generate-orca"))
        env = {e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert "AWS_ACCESS_KEY_ID" not in env and "AWS_SHARED_CREDENTIALS_FILE" in env
