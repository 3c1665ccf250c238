"""The cluster settings take numbers and flags as strictly as the recipe does.

Pydantic's lax mode read ``true`` as 1 for an int, ``1`` as true for a bool, ``2.0`` as 2 and the text
"3" as 3, and a float took NaN, infinity and ``true``. ClusterSettings now types every int, float and bool
with the recipe's types (recipe_base: PosInt, NonNegInt, Float, Bool; pydantic's StrictInt where a bound
of its own applies) and refuses NaN/infinity (allow_inf_nan=False, as recipe_base.Strict): each wrong
value names the file, the line and the dotted path, and the CLI exits 2.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from bezoar_jobs.errors import BadInput
from bezoar_jobs.executors.cluster import ClusterSettings, load_cluster_settings

REPO = Path(__file__).resolve().parents[1]


def _refused(tmp_path: Path, text: str) -> tuple[Path, str]:
    p = tmp_path / "cluster.yaml"
    p.write_text(text)
    with pytest.raises(BadInput) as e:
        load_cluster_settings(p)
    return p, str(e.value)


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        # an int field: not a bool, not a float (even a whole one), not text
        ("namespace: bezoar\ngenerationShards: true\n", 2,
         "generationShards: Input should be a valid integer, got true"),
        ("generationShards: 2.0\n", 1, "generationShards: Input should be a valid integer, got 2.0"),
        ("generationShards: '3'\n", 1, "generationShards: Input should be a valid integer, got the text '3'"),
        ("teacher:\n  replicas: 2.0\n", 2, "teacher.replicas: Input should be a valid integer, got 2.0"),
        ("teacher:\n  maxConcurrentRequests: true\n", 2,
         "teacher.maxConcurrentRequests: Input should be a valid integer, got true"),
        ("teacher: {leaseSeconds: '600'}\n", 1, "teacher.leaseSeconds: Input should be a valid integer, got the text"),
        ("scheduling:\n  train:\n    gpus: false\n", 3,
         "scheduling.train.gpus: Input should be a valid integer, got false"),
        ("scheduling:\n  data:\n    backoffLimit: 3.0\n", 3,
         "scheduling.data.backoffLimit: Input should be a valid integer, got 3.0"),
        ("scheduling:\n  train:\n    tolerations:\n      - {key: k, effect: NoExecute, tolerationSeconds: 60.0}\n", 4,
         "scheduling.train.tolerations.0.tolerationSeconds: Input should be a valid integer, got 60.0"),
        ("stageOverrides:\n  sft-hh:\n    nodes: '2'\n", 3,
         "stageOverrides.sft-hh.nodes: Input should be a valid integer, got the text '2'"),
        ("distributed:\n  port: 29500.0\n", 2, "distributed.port: Input should be a valid integer, got 29500.0"),
        ("jobs:\n  ttlSecondsAfterFinished: true\n", 2,
         "jobs.ttlSecondsAfterFinished: Input should be a valid integer, got true"),
        ("controller:\n  pendingReportSeconds: '60'\n", 2,
         "controller.pendingReportSeconds: Input should be a valid integer, got the text '60'"),
        # a bool field: only true or false
        ("teacher:\n  waitReady: 1\n", 2, "teacher.waitReady: Input should be true or false, got 1"),
        ("teacher:\n  scaleDownAfterGeneration: 'yes'\n", 2,
         "teacher.scaleDownAfterGeneration: Input should be true or false, got the text 'yes'"),
        ("teacher:\n  waitReady: 'true'\n", 2, "teacher.waitReady: Input should be true or false, got the text 'true'"),
        # a float field: an int or a float, not a bool, not NaN or infinity
        ("sizing:\n  modelParamsB: true\n", 2, "sizing.modelParamsB: Input should be a number, got true"),
        ("sizing:\n  modelParamsB: .nan\n", 2, "sizing.modelParamsB: the value is NaN (not a number)"),
        ("sizing:\n  modelParamsB: .inf\n", 2, "sizing.modelParamsB: the value is infinite"),
        ("sizing:\n  modelParamsB: -.inf\n", 2, "sizing.modelParamsB: the value is minus infinite"),
    ],
)
def test_a_wrong_typed_value_is_refused_naming_file_line_and_field(tmp_path, text, line, message):
    p, msg = _refused(tmp_path, text)
    assert f"{p}:{line}: {message}" in msg, msg
    assert msg.startswith("invalid cluster settings: ")


def test_every_bound_and_default_is_kept(tmp_path):
    assert ClusterSettings() == load_cluster_settings(None)
    d = ClusterSettings()
    assert (d.generationShards, d.teacher.leaseSeconds, d.distributed.port) == (1, 600, 29500)
    assert d.sizing.modelParamsB == 3.4
    assert (d.controller.apiOutageToleranceSeconds, d.controller.pendingReportSeconds) == (900, 60)
    assert d.teacher.waitReady is True and d.teacher.scaleDownAfterGeneration is True
    for text, message in (
        ("generationShards: 1001\n", "generationShards: Input should be less than or equal to 1000"),
        ("generationShards: 0\n", "generationShards: Input should be greater than or equal to 1"),
        ("teacher: {leaseSeconds: 29}\n", "teacher.leaseSeconds: Input should be greater than or equal to 30"),
        ("teacher: {replicas: 0}\n", "teacher.replicas: Input should be greater than 0"),
        ("distributed: {port: 1023}\n", "distributed.port: Input should be greater than or equal to 1024"),
        ("distributed: {port: 65536}\n", "distributed.port: Input should be less than or equal to 65535"),
        ("controller: {apiOutageToleranceSeconds: 9}\n", "Input should be greater than or equal to 10"),
        ("controller: {pendingReportSeconds: 0}\n", "Input should be greater than or equal to 1"),
        ("sizing: {modelParamsB: 0}\n", "sizing.modelParamsB: Input should be greater than 0"),
        ("sizing: {modelParamsB: 10000.5}\n", "sizing.modelParamsB: Input should be less than or equal to 10000"),
        ("scheduling: {data: {gpus: -1}}\n", "scheduling.data.gpus: Input should be greater than or equal to 0"),
        ("scheduling: {train: {activeDeadlineSeconds: 0}}\n", "Input should be greater than 0"),
    ):
        assert message in _refused(tmp_path, text)[1], text


def test_right_typed_values_still_load(tmp_path):
    p = tmp_path / "cluster.yaml"
    p.write_text(
        "generationShards: 2\nteacher: {waitReady: false, scaleDownAfterGeneration: false, replicas: 3, "
        "leaseSeconds: 30, maxConcurrentRequests: 64}\nsizing: {modelParamsB: 7}\ndistributed: {port: 1024}\n"
        "scheduling:\n  train:\n    tolerations: [{key: k, effect: NoExecute, tolerationSeconds: -1}]\n"
        "stageOverrides: {sft-hh: {nodes: 2, processesPerNode: 8, gpus: 8}}\n"
    )
    c = load_cluster_settings(p)
    assert c.generationShards == 2 and c.teacher.replicas == 3 and c.teacher.waitReady is False
    assert c.sizing.modelParamsB == 7.0 and isinstance(c.sizing.modelParamsB, float)  # a float takes an int
    assert c.scheduling.train.tolerations[0].tolerationSeconds == -1
    assert c.scheduling_for("sft-hh").nodes == 2
    # the merged scheduling of a stage revalidates a JSON dump: it keeps loading
    assert c.scheduling_for("sft-hh").processes_per_node() == 8


def test_the_repos_cluster_settings_files_still_load():
    """examples/cluster.yaml, deploy/cluster.yaml and the chart's rendering committed under manifests/."""
    assert load_cluster_settings(REPO / "examples" / "cluster.yaml").generationShards > 1
    load_cluster_settings(REPO / "deploy" / "cluster.yaml")
    cm = yaml.safe_load((REPO / "manifests" / "chart" / "cluster-settings.yaml").read_text())
    from bezoar_jobs.executors.cluster import parse_cluster_settings

    parse_cluster_settings(cm["data"]["cluster.yaml"], "manifests/chart/cluster-settings.yaml")


def test_every_number_and_flag_of_the_cluster_settings_is_strict():
    """Each int and bool of ClusterSettings' schema is strict, and each float refuses true/false (the
    recipe's check, tests/test_recipe.py): a field added later with a bare int, float or bool fails here."""
    from bezoar_jobs.recipe_base import _number_not_bool

    def lax(schema: Any, path: str = "", guarded: bool = False, finite: bool = False) -> list[str]:
        out: list[str] = []
        if isinstance(schema, dict):
            kind = schema.get("type")
            fn = schema["function"].get("function") if isinstance(schema.get("function"), dict) else None
            if kind == "model":  # a model's config says whether its floats may be NaN or infinite
                finite = schema.get("config", {}).get("allow_inf_nan", True) is False
            if (kind in ("int", "bool") and not schema.get("strict")) or (kind == "float" and not guarded):
                out.append(path)
            if kind == "float" and not finite and schema.get("allow_inf_nan", True):
                out.append(f"{path} (NaN/infinity)")
            for k, v in schema.items():
                fenced = kind == "function-before" and fn is _number_not_bool and k == "schema"
                out += lax(v, f"{path}.{k}", fenced, finite)
        elif isinstance(schema, list | tuple):
            for i, v in enumerate(schema):
                out += lax(v, f"{path}[{i}]", False, finite)
        return out

    assert lax(ClusterSettings.__pydantic_core_schema__) == []


def test_the_cli_exits_2_naming_field_and_file(tmp_path):
    """End to end: `bezoar render --cluster FILE` (the command that reads the cluster settings offline)."""
    f = tmp_path / "cluster.yaml"
    f.write_text("namespace: bezoar\ngenerationShards: 2.0\nteacher:\n  waitReady: 1\n")
    res = subprocess.run(
        [sys.executable, "-m", "bezoar_jobs.cli", "render", "--recipe", str(REPO / "recipes" / "demo.yaml"),
         "--cluster", str(f), "--run", "s3://bucket/runs/x", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert f"{f}:2: generationShards: Input should be a valid integer, got 2.0" in res.stderr
    assert f"{f}:4: teacher.waitReady: Input should be true or false, got 1" in res.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # a request above its limit, the family's default requests merged in (data requests cpu 2)
        ("scheduling: {data: {resources: {limits: {cpu: 1}}}}\n",
         "scheduling.data.resources: Value error, requests.cpu 2 is more than limits.cpu 1"),
        ("scheduling: {train: {resources: {requests: {memory: 96Gi}}}}\n",
         "scheduling.train.resources: Value error, requests.memory 96Gi is more than limits.memory 64Gi"),
        ("stageOverrides: {sft-hh: {resources: {limits: {cpu: 4}}}}\n",
         "stageOverrides.sft-hh.resources, merged onto scheduling.train: requests.cpu 8 is more than limits.cpu 4"),
        # an extended resource is never overcommitted, and counted in whole units
        ("scheduling: {data: {resources: {requests: {nvidia.com/gpu: 1}}}}\n",
         "requests.nvidia.com/gpu 1 needs limits.nvidia.com/gpu equal to it"),
        ("scheduling: {data: {resources: {requests: {example.com/fpga: 1}, limits: {example.com/fpga: 2}}}}\n",
         "requests.example.com/fpga 1 must equal limits.example.com/fpga 2"),
        ("scheduling: {data: {resources: {limits: {example.com/fpga: 500m}}}}\n",
         "example.com/fpga: an extended resource must be a whole number (got 500m)"),
        # a resource without a domain is a standard one
        ("scheduling: {data: {resources: {requests: {gpu: 1}}}}\n",
         "'gpu': a resource without a domain must be one of cpu, memory, ephemeral-storage"),
        ("jobs: {gpuResourceName: gpu}\n", "jobs.gpuResourceName: Value error, 'gpu': a resource without a domain"),
        # tolerations and node selectors as the API server reads them
        ("scheduling: {data: {tolerations: [{key: 'bad key!', operator: Exists}]}}\n",
         "scheduling.data.tolerations.0: Value error, key: 'bad key!' is not a label key"),
        ("scheduling: {data: {tolerations: [{effect: NoSchedule}]}}\n",
         "an empty key matches every taint: operator must be Exists"),
        ("scheduling: {data: {tolerations: [{key: k, value: 'a b'}]}}\n", "value 'a b' is not a valid label value"),
        ("scheduling: {data: {nodeSelector: {pool: 'gpu nodes'}}}\n",
         "scheduling.data.nodeSelector.pool: Value error, 'gpu nodes' is not a valid label value"),
        ("scheduling: {data: {nodeSelector: {-bad: x}}}\n", "'-bad' is not a label key"),
    ],
)
def test_what_the_api_server_refuses_in_a_pod_is_refused_when_the_settings_load(tmp_path, text, message):
    """The builder passed these straight into the Jobs: the settings loaded, and the API server refused the Job
    (422) when the controller created it, partway through a run (core validation.go ValidateResourceRequirements,
    validateContainerResourceName, ValidateTolerations, the nodeSelector's labels; tests/k8s_harness.py checks
    the same of every Job). They are refused when the settings load, naming the field."""
    p, msg = _refused(tmp_path, text)
    assert message in msg and str(p) in msg, msg


def test_what_the_api_server_takes_still_loads(tmp_path):
    p = tmp_path / "cluster.yaml"
    p.write_text("scheduling:\n"
                 "  data: {resources: {limits: {cpu: 4}}, nodeSelector: {cloud.google.com/gke-nodepool: gpu-a}}\n"
                 "  train:\n"
                 "    resources: {requests: {hugepages-2Mi: 1Gi, example.com/fpga: 1}, limits: {hugepages-2Mi: 1Gi, "
                 "example.com/fpga: 1}}\n"
                 "    tolerations: [{operator: Exists}, {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule},\n"
                 "                  {key: pool, value: gpu-a, effect: NoSchedule}]\n"
                 "stageOverrides: {sft-hh: {resources: {limits: {memory: 96Gi}}}}\n")
    cs = load_cluster_settings(p)
    assert cs.scheduling_for("sft-hh").resources.limits["memory"] == "96Gi"
    assert cs.scheduling.data.resources.limits["cpu"] == "4" and len(cs.scheduling.train.tolerations) == 3
