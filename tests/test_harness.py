"""eval-harness on the tiny model with the demo's local lm-eval tasks: the results' shape (what the
report reads), per-checkpoint resume, and bad input (an unknown task, a version pin) exiting 2."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from bezoar_jobs.cli import main as cli_main
from bezoar_jobs.errors import EXIT_BAD_INPUT
from bezoar_jobs.manifest import CommitInfo, commit, read_manifest
from bezoar_jobs.recipe import parse_recipe
from bezoar_jobs.registry import EVALUATIONS
from bezoar_jobs.report import evaluation_section
from bezoar_jobs.report.collect import collect
from bezoar_jobs.runner import run_stage
from bezoar_jobs.store import open_store
from tests.tiny_model import build_tiny_model

TASKS = [
    {"name": "bezoar_demo_facts", "num_fewshot": 2, "metric": "acc_norm", "version": 1.0},
    {"name": "bezoar_demo_cloze", "num_fewshot": 0, "metric": "acc", "version": "1.0"},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _recipe(tmp: Path, tiny: Path, tasks=None, **harness) -> Path:
    data = {
        "schema_version": 1,
        "name": "harness-test",
        "teacher": {"backend": "local", "model": str(tiny), "prompt_format": "{user}"},
        "judge": {"backend": "local", "model": str(tiny), "prompt_format": "{user}"},
        "student": {"model": str(tiny)},
        "evaluation": {
            "checkpoints": ["base", "dpo"],
            "harness": {"include_path": "pkg://bezoar_jobs/demo_data/harness_tasks", "tasks": tasks or TASKS,
                        "batch_size": 8, "bootstrap_iters": 100, **harness},
            "mtbench": {"enabled": False},
        },
    }
    p = tmp / "recipe.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def _commit_checkpoints(run: Path, model: Path) -> None:
    store = open_store(run)
    for s in ("sft-orca", "sft-hh", "dpo"):
        out = run.parent / f"_{s}"
        shutil.copytree(model, out / "model", dirs_exist_ok=True)
        commit(store, out, CommitInfo(s, "p", {}, {"steps": 1}, {"seconds": 1.0}, {}))


def test_harness_on_local_tasks_and_resume(tmp_path, tiny, caplog):
    run = tmp_path / "run"
    _commit_checkpoints(run, build_tiny_model(tmp_path / "other", seed=3))
    recipe_path = _recipe(tmp_path, tiny)
    assert cli_main(["stage", "eval-harness", "--recipe", str(recipe_path), "--run", str(run)]) == 0
    store = open_store(run)
    m = read_manifest(store, "eval-harness")
    assert m["counts"] == {"models": 2, "tasks": 2}
    assert set(m["files"]) == {"results/base.json", "results/dpo.json", "results/summary.json"}
    assert m["models"]["dpo"]["kind"] == "checkpoint" and m["lm_eval_version"]

    summary = json.loads(store.read_text("eval-harness/results/summary.json"))
    assert summary["order"] == ["base", "dpo"]
    assert [t["name"] for t in summary["tasks"]] == ["bezoar_demo_facts", "bezoar_demo_cloze"]
    assert [float(t["version"]) for t in summary["tasks"]] == [1.0, 1.0]
    for label in ("base", "dpo"):
        per = json.loads(store.read_text(f"eval-harness/results/{label}.json"))
        facts, cloze = per["tasks"]["bezoar_demo_facts"], per["tasks"]["bezoar_demo_cloze"]
        assert facts["num_fewshot"] == 2 and per["lm_eval"]["n-shot"]["bezoar_demo_facts"] == 2
        assert cloze["num_fewshot"] == 0 and facts["n_samples"] == 20 == cloze["n_samples"]
        assert facts["metric"] == "acc_norm,none" and 0.0 <= facts["value"] <= 1.0 and facts["stderr"] > 0
        assert set(facts["metrics"]) == {"acc,none", "acc_norm,none"}
        assert (
            set(cloze["metrics"]) == {"acc,none", "perplexity,none"}
            and cloze["metrics"]["perplexity,none"]["value"] > 1
        )
        # the summary carries exactly the primary metric of each per-model file
        assert summary["models"][label]["scores"]["bezoar_demo_facts"] == {
            "value": facts["value"], "stderr": facts["stderr"], "metric": "acc_norm,none"}
    # different weights, different log-likelihoods
    base = json.loads(store.read_text("eval-harness/results/base.json"))["tasks"]["bezoar_demo_cloze"]["metrics"]
    dpo = json.loads(store.read_text("eval-harness/results/dpo.json"))["tasks"]["bezoar_demo_cloze"]["metrics"]
    assert base["perplexity,none"]["value"] != dpo["perplexity,none"]["value"]

    # the report reads this shape: one row per model, one column per task
    data = collect(store)
    section = evaluation_section(store, data, EVALUATIONS[0], 3)
    table = section.table
    assert table is not None and section.key == "harness"
    assert [r[0] for r in table.rows] == ["base", "dpo"]
    assert table.header[2].startswith("bezoar_demo_facts (2-shot, acc_norm,none)")

    # a stage interrupted before its commit (here: the manifest gone, as after a kill) resumes per
    # checkpoint: it finds both models' results in _work/ and evaluates nothing again
    recipe = parse_recipe(recipe_path.read_text())
    caplog.set_level(logging.INFO, logger="bezoar")
    store.delete("eval-harness/_MANIFEST.json")
    assert run_stage("eval-harness", recipe, store) == 0
    assert caplog.text.count("already evaluated (resumed from _work/)") == 2
    assert json.loads(store.read_text("eval-harness/results/summary.json")) == summary


def test_unknown_task_is_bad_input(tmp_path, tiny):
    run = tmp_path / "run"
    _commit_checkpoints(run, tiny)
    recipe = _recipe(tmp_path, tiny, tasks=[TASKS[0], {"name": "hellaswagg", "num_fewshot": 10}])
    with pytest.raises(Exception) as e:
        run_stage("eval-harness", parse_recipe(recipe.read_text()), open_store(run))
    assert "evaluation.harness.tasks.1.name" in str(e.value) and "'hellaswagg'" in str(e.value)
    assert "hellaswag" in str(e.value)  # a close match is suggested
    assert cli_main(["stage", "eval-harness", "--recipe", str(recipe), "--run", str(run)]) == EXIT_BAD_INPUT
    assert read_manifest(open_store(run), "eval-harness") is None


def test_version_pin_mismatch_is_bad_input(tmp_path, tiny):
    run = tmp_path / "run"
    _commit_checkpoints(run, tiny)
    recipe = _recipe(tmp_path, tiny, tasks=[{**TASKS[0], "version": 2.0}])
    assert cli_main(["stage", "eval-harness", "--recipe", str(recipe), "--run", str(run)]) == EXIT_BAD_INPUT
    from bezoar_jobs.errors import BadInput
    from bezoar_jobs.eval import harness

    tm = harness.task_manager(harness.prepare_include_dir("pkg://bezoar_jobs/demo_data/harness_tasks", tmp_path),
                              ["bezoar_demo_facts"])
    cfg = parse_recipe(recipe.read_text()).evaluation.harness
    with pytest.raises(
        BadInput, match=r"tasks.0.version: 'bezoar_demo_facts' is pinned to version 2.0 .* has version 1.0"
    ):
        harness.load_tasks(tm, cfg.tasks)


def test_default_seeds_are_lm_evals_and_the_recorded_command_line_reproduces_the_numbers(tmp_path, tiny):
    """Evaluation comparable with published numbers: lm_eval's own seeds (few-shot 1234) unless the
    recipe says otherwise, and every results file holds the lm_eval CLI command lines that reproduce
    it; the demo tasks run with the CLI as shipped (no placeholder only the stage fills)."""
    import glob
    import shlex
    import subprocess

    run = tmp_path / "run"
    _commit_checkpoints(run, tiny)
    recipe = _recipe(tmp_path, tiny)
    assert cli_main(["stage", "eval-harness", "--recipe", str(recipe), "--run", str(run)]) == 0
    per = json.loads(open_store(run).read_text("eval-harness/results/base.json"))
    assert per["seed"] == [0, 1234, 1234, 1234]
    commands = per["lm_eval_command"]
    assert len(commands) == 2  # the two tasks have different shot counts: one command each
    assert "--seed 0,1234,1234,1234" in commands[0] and "--num_fewshot 2" in commands[0]
    include = str(Path(__file__).resolve().parents[1] / "bezoar_jobs" / "demo_data" / "harness_tasks")
    for cmd in commands:
        assert f"--include_path {include}" in cmd and f"pretrained={tiny}" in cmd
        out = tmp_path / "cli" / str(abs(hash(cmd)))
        res = subprocess.run(f"{cmd} --output_path {shlex.quote(str(out))}", shell=True, capture_output=True,
                             text=True, timeout=600, cwd=tmp_path,
                             env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
        assert res.returncode == 0, res.stderr[-3000:]
        cli = json.loads(Path(glob.glob(str(out / "**" / "results*.json"), recursive=True)[0]).read_text())
        for task, got in cli["results"].items():
            ours = per["tasks"][task]["metrics"]
            for key, m in ours.items():
                # accuracies exactly; a log-likelihood aggregate to float32 rounding (this random tiny
                # model's perplexity is ~5e13, where summation order shows in the 8th digit)
                assert got[key] == pytest.approx(m["value"], rel=1e-6, abs=0), (task, key)
                if key.startswith("acc"):
                    assert got[key] == m["value"], (task, key)
    # a checkpoint's command names its committed model/ in the run (the stage's own copy is gone)
    dpo = json.loads(open_store(run).read_text("eval-harness/results/dpo.json"))
    assert f"pretrained={run / 'dpo' / 'model'}," in dpo["lm_eval_command"][0]
    # a recipe's own seeds are used and recorded
    seeded = _recipe(tmp_path, tiny, seed=42)
    run2 = tmp_path / "run2"
    _commit_checkpoints(run2, tiny)
    assert cli_main(["stage", "eval-harness", "--recipe", str(seeded), "--run", str(run2)]) == 0
    per2 = json.loads(open_store(run2).read_text("eval-harness/results/base.json"))
    assert per2["seed"] == [42, 42, 42, 42] and "--seed 42,42,42,42" in per2["lm_eval_command"][0]


DTYPES = ("auto", "float32", "bfloat16", "float16")


def _vllm_init() -> tuple[set[str], set[str]]:
    """The keywords lm_eval's ``VLLM`` model takes and the dtype names its annotation allows, read from the
    installed source (importing it needs the vllm package, which this image lacks)."""
    import ast
    from importlib.util import find_spec

    spec = find_spec("lm_eval.models.vllm_causallms")
    assert spec is not None and spec.origin
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "VLLM"]
    (init,) = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"]
    (dtype,) = [a for a in init.args.args if a.arg == "dtype"]
    names = {c.value for c in ast.walk(dtype.annotation) if isinstance(c, ast.Constant)} if dtype.annotation else set()
    return {a.arg for a in init.args.args + init.args.kwonlyargs}, names


@pytest.mark.parametrize("dtype", DTYPES)
def test_vllm_model_args_take_the_recipes_dtype(tmp_path, tiny, dtype):
    """evaluation.dtype reaches lm_eval's vLLM model as is (auto stays auto: vLLM's own choice), under names
    lm_eval's wrapper accepts, with every other keyword (but one) a parameter of the wrapper."""
    from typing import get_args

    from bezoar_jobs.eval.harness import vllm_model_args
    from bezoar_jobs.recipe_eval import EvaluationConfig

    data = yaml.safe_load(_recipe(tmp_path, tiny, backend="vllm").read_text())
    data["evaluation"]["dtype"] = dtype
    r = parse_recipe(yaml.safe_dump(data))
    kw = vllm_model_args("/m", r.evaluation.harness, r.evaluation.dtype)
    assert kw["dtype"] == dtype and kw["pretrained"] == "/m"
    params, names = _vllm_init()
    # gpu_memory_utilization goes through the wrapper's **kwargs to vLLM's engine; dtype is handed on unchanged
    assert set(kw) - {"gpu_memory_utilization"} <= params, set(kw) - params
    assert set(get_args(EvaluationConfig.model_fields["dtype"].annotation)) <= names


def test_vllm_stage_evaluates_and_records_in_the_recipes_dtype(tmp_path, tiny, monkeypatch):
    """With backend vllm the stage hands evaluation.dtype to the vLLM evaluation and writes it in the
    reproducing lm_eval command (lm_eval itself faked: no vllm or GPU here)."""
    from bezoar_jobs.eval import harness

    seen: list[tuple[str, str]] = []

    def fake_vllm(model_dir, tm, task_objects, cfg, *rest, **kw):
        seen.append((model_dir, *rest))
        return {"results": {"bezoar_demo_facts": {"acc_norm,none": 0.5, "acc_norm_stderr,none": 0.1},
                            "bezoar_demo_cloze": {"acc,none": 0.25, "acc_stderr,none": 0.1}}}

    monkeypatch.setattr(harness, "check_backend", lambda cfg: None)
    monkeypatch.setattr(harness, "evaluate_vllm", fake_vllm)
    data = yaml.safe_load(_recipe(tmp_path, tiny, backend="vllm").read_text())
    data["evaluation"].update(dtype="float16", checkpoints=["base"])
    run = tmp_path / "run"
    assert run_stage("eval-harness", parse_recipe(yaml.safe_dump(data)), open_store(run)) == 0
    assert [rest for _, *rest in seen] == [["float16"]]
    per = json.loads(open_store(run).read_text("eval-harness/results/base.json"))
    assert per["tasks"]["bezoar_demo_cloze"]["value"] == 0.25
    for cmd in per["lm_eval_command"]:
        assert "--model vllm" in cmd and ",dtype=float16," in cmd and "dtype=auto" not in cmd
