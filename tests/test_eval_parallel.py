"""eval-harness data-parallel on the hf backend (bezoar_jobs.eval.parallel), on CPU with gloo and the tiny model.

Two processes (the recipe's ``evaluation.harness.data_parallel_size: 2``, started by ``bezoar stage``
itself through torch.distributed.run) give the metrics of one process: every value and stderr within
1e-5 relative (only the batches' composition differs, hence float rounding: measured 0 on the accuracies,
3e-7 on the tiny model's perplexity of 5e13, an exponential of the mean log-likelihood), including the 2-shot
task, whose few-shot prompts lm_eval's own document sharding would change, and the bootstrapped
perplexity stderr. Each rank ran its own half of the requests, and rank 0 alone committed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from bezoar_jobs.cli import main as cli_main
from bezoar_jobs.errors import EXIT_BAD_INPUT, BadInput
from bezoar_jobs.manifest import read_manifest
from bezoar_jobs.store import open_store
from tests.tiny_model import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
TASKS = [
    {"name": "bezoar_demo_facts", "num_fewshot": 2, "metric": "acc_norm", "version": 1.0},
    {"name": "bezoar_demo_cloze", "num_fewshot": 0, "metric": "acc", "version": "1.0"},
]
REL = 1e-5


def _recipe(tmp: Path, tiny: Path, name: str, **harness: Any) -> Path:
    data = {
        "schema_version": 1,
        "name": "harness-dp",
        "teacher": {"backend": "local", "model": str(tiny), "prompt_format": "{user}"},
        "judge": {"backend": "local", "model": str(tiny), "prompt_format": "{user}"},
        "student": {"model": str(tiny)},
        "evaluation": {
            "checkpoints": ["base"],
            # batch 4: more than one batch per rank, and batches of other compositions than one process's
            "harness": {"include_path": "pkg://bezoar_jobs/demo_data/harness_tasks", "tasks": TASKS,
                        "batch_size": 4, "bootstrap_iters": 100, **harness},
            "mtbench": {"enabled": False},
        },
    }
    p = tmp / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def test_two_processes_evaluate_like_one_and_rank_zero_commits(tmp_path: Path) -> None:
    tiny = build_tiny_model(tmp_path / "model")
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli_main(["stage", "eval-harness", "--recipe", str(_recipe(tmp_path, tiny, "r1.yaml")),
                     "--run", str(one)]) == 0
    # no flag: the recipe's data_parallel_size starts the group (what a pod's plain command does)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "bezoar_jobs.cli", "stage", "eval-harness", "--recipe",
                        str(_recipe(tmp_path, tiny, "r2.yaml", data_parallel_size=2)), "--run", str(two)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    err = p.stderr
    assert p.returncode == 0, err[-4000:]
    assert "launching 2 process(es) per node" in err
    # each rank ran its own contiguous half of every request list (20 docs x choices: 2-shot facts and cloze)
    lines = [ln for ln in err.splitlines() if "ran requests" in ln]
    spans: dict[int, list[tuple[int, int, int]]] = {0: [], 1: []}
    for ln in lines:
        words = ln.split("rank ", 1)[1].split()
        lo, hi = (int(x) for x in words[3].split("-"))
        spans[int(words[0])].append((lo, hi, int(words[5])))
    assert spans[0] and len(spans[0]) == len(spans[1])
    for (lo0, hi0, n0), (lo1, hi1, n1) in zip(spans[0], spans[1], strict=True):
        assert n0 == n1 and lo0 == 0 and hi0 == lo1 and hi1 == n1 and 0 < hi0 < n0
    # rank 0 alone committed, once; rank 1 wrote nothing
    assert err.count("eval-harness: committed to") == 1
    assert "eval-harness: rank 1 done (rank 0 commits)" in err
    m = read_manifest(open_store(two), "eval-harness")
    assert m is not None and set(m["files"]) == {"results/base.json", "results/summary.json"}

    a = json.loads((one / "eval-harness/results/base.json").read_text())
    b = json.loads((two / "eval-harness/results/base.json").read_text())
    assert b["data_parallel"] == 2 and "data_parallel" not in a
    assert a["lm_eval_command"] == b["lm_eval_command"]  # one process reproduces the numbers
    for task in ("bezoar_demo_facts", "bezoar_demo_cloze"):
        ta, tb = a["tasks"][task], b["tasks"][task]
        assert ta["n_samples"] == tb["n_samples"] == 20
        assert ta["metrics"].keys() == tb["metrics"].keys()
        for key, va in ta["metrics"].items():
            vb = tb["metrics"][key]
            assert vb["value"] == pytest.approx(va["value"], rel=REL), (task, key)
            assert vb["stderr"] == pytest.approx(va["stderr"], rel=REL), (task, key)
    # the perplexity's stderr is bootstrapped: equal only because the per-document order is one process's
    assert a["tasks"]["bezoar_demo_cloze"]["metrics"]["perplexity,none"]["stderr"] is not None


def test_processes_come_from_the_flag_or_the_recipe_and_vllm_is_refused(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from bezoar_jobs.executors.cluster import ClusterSettings
    from bezoar_jobs.executors.jobs import build_job
    from bezoar_jobs.launch import launch_stage, processes_per_node
    from bezoar_jobs.recipe import parse_recipe

    tiny = tmp_path / "m"
    r2 = parse_recipe(_recipe(tmp_path, tiny, "a.yaml", data_parallel_size=2).read_text(), "a.yaml")
    r1 = parse_recipe(_recipe(tmp_path, tiny, "b.yaml").read_text(), "b.yaml")

    def args(name: str, n: int | None) -> SimpleNamespace:
        return SimpleNamespace(name=name, nproc_per_node=n, nnodes=1, node_rank=None, master_addr=None,
                               master_port=29500, shard=None, force=False, recipe="r.yaml", run=str(tmp_path / "r"))

    assert processes_per_node(args("eval-harness", None), r2) == 2  # the recipe's
    assert processes_per_node(args("eval-harness", 3), r2) == 3  # the flag wins
    assert processes_per_node(args("eval-harness", None), r1) == 1
    assert processes_per_node(args("sft-lamini", None), r2) == 1  # training stages: the flag only
    # tensor parallelism needs vllm; several processes with vllm (it runs its replicas itself) are refused
    with pytest.raises(BadInput, match=r"tensor_parallel_size needs backend: vllm"):
        _ = parse_recipe(_recipe(tmp_path, tiny, "c.yaml", tensor_parallel_size=2).read_text(), "c.yaml")
    rv = parse_recipe(_recipe(tmp_path, tiny, "d.yaml", backend="vllm").read_text(), "d.yaml")
    with pytest.raises(BadInput, match=r"backend 'vllm': vLLM runs its replicas itself"):
        launch_stage(args("eval-harness", 2), rv, open_store(tmp_path / "r"))
    assert cli_main(["stage", "eval-harness", "--recipe", str(tmp_path / "d.yaml"), "--run", str(tmp_path / "r"),
                     "--nproc-per-node", "2"]) == EXIT_BAD_INPUT
    # Kubernetes: on a GPU pod each process needs its GPU (refused when the Job is built); a CPU pod runs
    # the processes on its cores
    gpu = ClusterSettings.model_validate({"stageOverrides": {"eval-harness": {"gpus": 1}}})
    with pytest.raises(BadInput, match=r"= 2 GPUs, but the eval-harness pod gets 1"):
        build_job("eval-harness", "s3://b/r", "r", gpu, recipe=r2)
    gpu2 = ClusterSettings.model_validate({"stageOverrides": {"eval-harness": {"gpus": 2}}})
    job = build_job("eval-harness", "s3://b/r", "r", gpu2, recipe=r2)
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    cpu = ClusterSettings.model_validate({"stageOverrides": {"eval-harness": {"gpus": 0}}})
    build_job("eval-harness", "s3://b/r", "r", cpu, recipe=r2)


def test_lm_evals_own_document_sharding_would_change_the_few_shot_prompts(tmp_path: Path) -> None:
    """Why the requests, not the documents, are split (bezoar_jobs.eval.parallel): lm_eval's evaluator,
    given rank 1 of 2, builds the prompts of documents 1, 3, 5, ... with its few-shot sampler in the state a
    one-process run has at documents 0, 1, 2, ...: other few-shot examples. (Should lm_eval fix this, this
    test fails and the module's reasoning is due for a look.)"""
    from bezoar_jobs.eval.harness import load_tasks, prepare_include_dir, task_manager
    from bezoar_jobs.recipe_eval import HarnessTask

    tasks = (HarnessTask(name="bezoar_demo_facts", num_fewshot=2, metric="acc_norm"),)
    tm = task_manager(prepare_include_dir("pkg://bezoar_jobs/demo_data/harness_tasks", tmp_path), [tasks[0].name])

    def prompts(rank: int, size: int) -> dict[int, str]:
        (task,), _ = load_tasks(tm, tasks)
        task.set_fewshot_seed(1234)  # lm_eval's default few-shot seed
        task.build_all_requests(rank=rank, world_size=size)
        return {i.doc_id: i.args[0] for i in task.instances}

    one, rank1 = prompts(0, 1), prompts(1, 2)
    assert sorted(rank1) == list(range(1, 20, 2))
    assert [d for d in rank1 if rank1[d] != one[d]]
