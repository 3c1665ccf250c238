"""The loopback API server (tests/k8s_harness.py) refuses what a real API server refuses.

The strict OpenAPI schema the harness also checks (kubernetes-validate) only knows field names and types;
everything below is the API server's Go validation (pkg/apis/batch/validation, pkg/apis/core/validation
of kubernetes/kubernetes), its decoding of quantities, and the batch/v1 Job's default delete propagation
(Orphan: pkg/registry/batch/job/strategy.go). Each refused case was accepted by the harness before; the
Status bodies have the real shape (kind Status, reason Invalid, details.causes with the field paths).
The last tests make sure that every Job the product builds still gets through.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from bezoar_jobs.executors.cluster import ALL_STAGES, ClusterSettings
from bezoar_jobs.executors.jobs import build_stage_jobs
from tests.k8s_harness import JOB_UID, FakeCluster, fake_entrypoints

NS = "bz-harness"


@pytest.fixture(scope="module")
def fc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeCluster]:
    with FakeCluster(tmp_path_factory.mktemp("k8s"), entrypoints=fake_entrypoints()) as cluster:
        yield cluster


def _job(name: str = "ok", **spec: Any) -> dict[str, Any]:
    """A suspended (so: podless) Job shaped like a stage Job, valid as it is."""
    body: dict[str, Any] = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "openbezoar"},
                     "annotations": {"bezoar.dev/run-uri": "s3://b/runs/r1"}},
        "spec": {
            "suspend": True, "backoffLimit": 3, "activeDeadlineSeconds": 60, "ttlSecondsAfterFinished": 0,
            "podReplacementPolicy": "Failed",
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": "stage", "operator": "In", "values": [2]}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]},
            "template": {
                "metadata": {"labels": {"bezoar.dev/stage": "generate-lamini"}},
                "spec": {
                    "restartPolicy": "Never",
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                        "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "stage", "image": "img:1", "command": ["true"],
                        "env": [{"name": "HOME", "value": "/cache"}],
                        "resources": {"requests": {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"},
                                      "limits": {"memory": "8Gi", "nvidia.com/gpu": "1"}},
                        "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
                        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                    }],
                    "volumes": [{"name": "cache", "emptyDir": {"sizeLimit": "1Gi"}}],
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                },
            },
            **spec,
        },
    }
    return body


def _pod(b: dict[str, Any]) -> dict[str, Any]:
    return b["spec"]["template"]["spec"]


def _c(b: dict[str, Any]) -> dict[str, Any]:
    return _pod(b)["containers"][0]


def _create(fc: FakeCluster, body: dict[str, Any]) -> Any:
    return client.BatchV1Api(fc.api_client()).create_namespaced_job(NS, body, _preload_content=False)


def _refusal(fc: FakeCluster, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    with pytest.raises(ApiException) as e:
        _create(fc, body)
    return e.value.status, json.loads(e.value.body)


def _rules(b: dict[str, Any]) -> list[dict[str, Any]]:
    return b["spec"]["podFailurePolicy"]["rules"]


# (what, mutation, a field the Status names, a piece of its message)
REFUSED: list[tuple[str, Callable[[dict[str, Any]], Any], str, str]] = [
    # resources (ValidateResourceRequirements)
    ("memory request above its limit", lambda b: _c(b)["resources"]["requests"].update(memory="16Gi"),
     "spec.template.spec.containers[0].resources.requests", "must be less than or equal to memory limit of 8Gi"),
    ("GPU request below its limit", lambda b: _c(b)["resources"]["limits"].update({"nvidia.com/gpu": "2"}),
     "spec.template.spec.containers[0].resources.requests", "must be equal to nvidia.com/gpu limit of 2"),
    ("GPU request without a limit", lambda b: _c(b)["resources"]["limits"].pop("nvidia.com/gpu"),
     "spec.template.spec.containers[0].resources.limits", "Limit must be set for non overcommitable resources"),
    ("half a GPU", lambda b: [_c(b)["resources"][p].update({"nvidia.com/gpu": "500m"}) for p in ("requests", "limits")],
     "spec.template.spec.containers[0].resources.limits[nvidia.com/gpu]", "must be an integer"),
    ("a resource name without a domain", lambda b: _c(b)["resources"]["limits"].update(gpu="1"),
     "spec.template.spec.containers[0].resources.limits[gpu]", "must be a standard resource for containers"),
    ("a negative request", lambda b: _c(b)["resources"]["requests"].update(cpu="-1"),
     "spec.template.spec.containers[0].resources.requests[cpu]", "must be greater than or equal to 0"),
    # volumes, mounts, names, env
    ("a mount of an undefined volume", lambda b: _c(b)["volumeMounts"].append({"name": "scratch", "mountPath": "/s"}),
     "spec.template.spec.containers[0].volumeMounts[1].name", 'Not found: "scratch"'),
    ("two mounts at one path", lambda b: _c(b)["volumeMounts"].append({"name": "cache", "mountPath": "/cache"}),
     "spec.template.spec.containers[0].volumeMounts[1].mountPath", "must be unique"),
    ("a volume name that is not a DNS label", lambda b: _pod(b)["volumes"].append({"name": "Cache_2", "emptyDir": {}}),
     "spec.template.spec.volumes[1].name", "RFC 1123 label"),
    ("two volumes of one name", lambda b: _pod(b)["volumes"].append({"name": "cache", "emptyDir": {}}),
     "spec.template.spec.volumes[1].name", 'Duplicate value: "cache"'),
    ("a secret volume mode above 0777", lambda b: _pod(b)["volumes"].append(
        {"name": "keys", "secret": {"secretName": "s", "defaultMode": 0o1440}}),
     "spec.template.spec.volumes[1].secret.defaultMode", "between 0 and 0777"),
    ("a secret item path with ..", lambda b: _pod(b)["volumes"].append(
        {"name": "keys", "secret": {"secretName": "s", "items": [{"key": "k", "path": "../k"}]}}),
     "spec.template.spec.volumes[1].secret.items[0].path", "must not contain '..'"),
    ("a container name that is not a DNS label", lambda b: _c(b).update(name="Stage"),
     "spec.template.spec.containers[0].name", "RFC 1123 label"),
    ("an env name starting with a digit", lambda b: _c(b)["env"].append({"name": "1KEY", "value": "x"}),
     "spec.template.spec.containers[0].env[1].name", "valid environment variable name"),
    ("an env fieldRef the kubelet cannot resolve", lambda b: _c(b)["env"].append(
        {"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.hostname"}}}),
     "spec.template.spec.containers[0].env[1].valueFrom.fieldRef.fieldPath", "Unsupported value"),
    ("an imagePullPolicy that does not exist", lambda b: _c(b).update(imagePullPolicy="Sometimes"),
     "spec.template.spec.containers[0].imagePullPolicy", "Unsupported value"),
    # labels, annotations, placement
    ("a label value of 64 characters", lambda b: b["metadata"]["labels"].update({"bezoar.dev/run": "r" * 64}),
     "metadata.labels", "must be no more than 63 characters"),
    ("a label key with a space", lambda b: b["metadata"]["labels"].update({"bezoar.dev/my run": "r1"}),
     "metadata.labels", "name part must consist of alphanumeric characters"),
    ("a pod template label value with a slash", lambda b: b["spec"]["template"]["metadata"]["labels"].update(
        {"bezoar.dev/run-uri": "s3://b/runs/r1"}), "spec.template.metadata.labels", "a valid label must be"),
    ("annotations over 256 KiB", lambda b: b["metadata"]["annotations"].update({"bezoar.dev/big": "x" * 262144}),
     "metadata.annotations", "Too long: may not be more than 262144 bytes"),
    ("a nodeSelector value with a space", lambda b: _pod(b).update(nodeSelector={"pool": "gpu nodes"}),
     "spec.template.spec.nodeSelector", "a valid label must be"),
    ("a toleration without key or operator", lambda b: _pod(b)["tolerations"].append({"effect": "NoSchedule"}),
     "spec.template.spec.tolerations[1].operator", "operator must be Exists when `key` is empty"),
    ("an Exists toleration with a value", lambda b: _pod(b)["tolerations"].append(
        {"key": "k", "operator": "Exists", "value": "v"}),
     "spec.template.spec.tolerations[1].operator", "value must be empty when `operator` is 'Exists'"),
    # the Job spec (validateJobSpec)
    ("no restartPolicy (defaulted to Always)",
     lambda b: (_pod(b).pop("restartPolicy"), b["spec"].pop("podFailurePolicy")),
     "spec.template.spec.restartPolicy", 'Required value: valid values: "OnFailure", "Never"'),
    ("a negative activeDeadlineSeconds", lambda b: b["spec"].update(activeDeadlineSeconds=-1),
     "spec.activeDeadlineSeconds", "must be greater than or equal to 0"),
    ("a negative ttlSecondsAfterFinished", lambda b: b["spec"].update(ttlSecondsAfterFinished=-1),
     "spec.ttlSecondsAfterFinished", "must be greater than or equal to 0"),
    ("a negative backoffLimit", lambda b: b["spec"].update(backoffLimit=-1),
     "spec.backoffLimit", "must be greater than or equal to 0"),
    ("an unknown completionMode", lambda b: b["spec"].update(completionMode="Sharded"),
     "spec.completionMode", 'Unsupported value: "Sharded"'),
    ("an unknown podReplacementPolicy", lambda b: (b["spec"].pop("podFailurePolicy"),
                                                   b["spec"].update(podReplacementPolicy="Never")),
     "spec.podReplacementPolicy", 'Unsupported value: "Never"'),
    ("Indexed pod hostnames longer than a DNS label",
     lambda b: b.update(metadata={"name": "j" * 62}) or b["spec"].update(
         completionMode="Indexed", completions=10, parallelism=10),
     "metadata.name", "will not able to create pod with invalid DNS label: " + "j" * 62 + "-9"),
    ("an Indexed parallelism above 100000", lambda b: b["spec"].update(
        completionMode="Indexed", completions=3, parallelism=100_001),
     "spec.parallelism", "must be less than or equal to 100000 when completion mode is Indexed"),
    # podFailurePolicy (validatePodFailurePolicy)
    ("exit codes out of order", lambda b: _rules(b)[0]["onExitCodes"].update(values=[3, 2]),
     "spec.podFailurePolicy.rules[0].onExitCodes.values", "must be ordered"),
    ("an exit code twice", lambda b: _rules(b)[0]["onExitCodes"].update(values=[2, 2]),
     "spec.podFailurePolicy.rules[0].onExitCodes.values[1]", "Duplicate value: 2"),
    ("no exit code", lambda b: _rules(b)[0]["onExitCodes"].update(values=[]),
     "spec.podFailurePolicy.rules[0].onExitCodes.values", "at least one value is required"),
    ("an unknown operator", lambda b: _rules(b)[0]["onExitCodes"].update(operator="Equals"),
     "spec.podFailurePolicy.rules[0].onExitCodes.operator", 'Unsupported value: "Equals"'),
    ("an unknown action", lambda b: _rules(b)[0].update(action="Retry"),
     "spec.podFailurePolicy.rules[0].action", 'Unsupported value: "Retry"'),
    ("FailIndex without backoffLimitPerIndex", lambda b: _rules(b)[0].update(action="FailIndex"),
     "spec.podFailurePolicy.rules[0].action", "requires the backoffLimitPerIndex to be set"),
    ("a rule on exit codes and conditions at once", lambda b: _rules(b)[0].update(
        onPodConditions=[{"type": "DisruptionTarget"}]),
     "spec.podFailurePolicy.rules[0]", "specifying both OnExitCodes and OnPodConditions is not supported"),
    ("a rule on nothing", lambda b: _rules(b).append({"action": "Ignore"}),
     "spec.podFailurePolicy.rules[2]", "specifying one of OnExitCodes and OnPodConditions is required"),
    ("21 rules", lambda b: _rules(b).extend(
        [{"action": "Count", "onExitCodes": {"operator": "In", "values": [i]}} for i in range(3, 22)]),
     "spec.podFailurePolicy.rules", "Too many: 21: must have at most 20 items"),
    ("a condition status that is not True/False/Unknown", lambda b: _rules(b)[1]["onPodConditions"][0].update(
        status="Yes"), "spec.podFailurePolicy.rules[1].onPodConditions[0].status", 'Unsupported value: "Yes"'),
]


@pytest.mark.parametrize(("what", "mutate", "field", "said"), REFUSED, ids=[r[0] for r in REFUSED])
def test_the_harness_refuses_what_the_api_server_refuses(fc: FakeCluster, what: str, mutate: Callable,
                                                         field: str, said: str) -> None:
    body = _job("refused")
    mutate(body)
    code, status = _refusal(fc, body)
    assert code == 422, status
    assert status["kind"] == "Status" and status["status"] == "Failure" and status["reason"] == "Invalid"
    assert status["details"]["kind"] == "Job" and status["details"]["group"] == "batch"
    assert status["details"]["name"] == body["metadata"]["name"]
    causes = status["details"]["causes"]
    assert any(c["field"] == field and said in c["message"] for c in causes), causes
    assert status["message"].startswith(f'Job.batch "{body["metadata"]["name"]}" is invalid: ')
    assert said in status["message"]
    assert not any(j["metadata"]["name"] == body["metadata"]["name"] for j in fc.jobs(NS))  # nothing was stored


def test_every_cause_is_reported_at_once_as_the_api_server_does(fc: FakeCluster) -> None:
    body = _job("several")
    body["spec"]["backoffLimit"] = -1
    _c(body)["env"].append({"name": "1KEY", "value": "x"})
    code, status = _refusal(fc, body)
    assert code == 422
    fields = [c["field"] for c in status["details"]["causes"]]
    assert fields == ["spec.backoffLimit", "spec.template.spec.containers[0].env[1].name"]
    assert status["message"].startswith('Job.batch "several" is invalid: [spec.backoffLimit: Invalid value: -1: ')
    assert all(c["reason"] == "FieldValueInvalid" for c in status["details"]["causes"])


def test_a_malformed_quantity_fails_decoding_with_400(fc: FakeCluster) -> None:
    body = _job("quantity")
    _c(body)["resources"]["limits"]["memory"] = "8 GB"
    code, status = _refusal(fc, body)
    assert code == 400 and status["reason"] == "BadRequest"
    assert "quantities must match the regular expression" in status["message"]


def test_a_dotted_job_name_is_accepted_as_upstream_accepts_it(fc: FakeCluster) -> None:
    """A Job's name is a DNS-1123 subdomain; only the job-name label keeps it to 63 characters."""
    _create(fc, _job("stage.v2"))
    code, status = _refusal(fc, _job("s." + "x" * 62))
    assert code == 422
    assert any(c["field"] == "spec.template.metadata.labels" and "no more than 63" in c["message"]
               for c in status["details"]["causes"])


def test_deleting_a_job_without_a_policy_orphans_its_pods(fc: FakeCluster) -> None:
    """batch/v1's default propagation is Orphan: the pod keeps running and loses its ownerReference."""
    batch = client.BatchV1Api(fc.api_client())
    core = client.CoreV1Api(fc.api_client())
    body = _job("orphaning")
    del body["spec"]["podFailurePolicy"]
    body["spec"]["suspend"] = False
    _c(body)["command"] = ["sleep", "60"]
    for part in ("requests", "limits"):
        _c(body)["resources"][part].pop("nvidia.com/gpu")
    _pod(body)["tolerations"] = []
    uid = _create(fc, body).json()["metadata"]["uid"]

    def running() -> list[dict[str, Any]]:
        return [p for p in fc.pods(NS, "orphaning") if p["status"].get("phase") == "Running"]

    fc.wait_for(running, 20, "the Job's pod to run")
    batch.delete_namespaced_job("orphaning", NS)  # no propagationPolicy, as a bare client call sends none
    time.sleep(1.0)
    (pod,) = fc.pods(NS, "orphaning")
    assert pod["status"]["phase"] == "Running" and pod["metadata"]["labels"][JOB_UID] == uid
    assert not pod["metadata"].get("ownerReferences")
    assert core.read_namespaced_pod(pod["metadata"]["name"], NS).status.phase == "Running"
    with pytest.raises(ApiException) as e:
        batch.delete_namespaced_job("orphaning", NS)
    assert e.value.status == 404
    with pytest.raises(ApiException) as e:
        batch.delete_namespaced_job("ok", NS, propagation_policy="Later")
    assert e.value.status == 422


def test_every_job_the_product_builds_is_accepted(fc: FakeCluster) -> None:
    """The stage Jobs of the default settings, of sharded generation with Kueue, Secrets and PVCs, and of a
    training group, exactly as the builder makes them (suspended here, so that no pod runs)."""
    settings = [
        {},
        {"generationShards": 7, "kueue": {"queueName": "team-a"}, "runnerServiceAccount": "runner",
         "secrets": {"hfToken": {"name": "hf"}, "apiKeys": [{"env": "OPENAI_API_KEY", "name": "oa"}]},
         "storage": {"runVolume": {"claimName": "runs"}, "cacheVolume": {"claimName": "cache"}}},
        {"scheduling": {"train": {"nodes": 3, "gpus": 8}}},
    ]
    seen = 0
    for i, extra in enumerate(settings):
        cs = ClusterSettings.model_validate({"namespace": NS, **extra})
        for stage in ALL_STAGES:
            for job in build_stage_jobs(stage, "s3://b/runs/Run_1.x", f"Run_1.x-{i}", cs):
                body = copy.deepcopy(job)
                body["spec"]["suspend"] = True
                _create(fc, body)
                seen += 1
    assert seen >= 3 * len(ALL_STAGES)
