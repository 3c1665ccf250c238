"""eval-harness against the installed lm_eval: what the stage hands lm_eval, and the recorded ``lm_eval``
command lines, give the same evaluation as that command run by hand (unit level, on the tiny model)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from bezoar_jobs.errors import BadInput
from bezoar_jobs.eval import harness
from bezoar_jobs.recipe_eval import HarnessConfig, HarnessTask
from tests.tiny_model import build_tiny_model

DEMO = Path(__file__).resolve().parents[1] / "bezoar_jobs" / "demo_data" / "harness_tasks"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _cli_model_args(cmd: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict[str, Any]]:
    """(--model, --model_args) as the installed lm_eval CLI parses the recorded command line."""
    import shlex

    from lm_eval._cli import HarnessCLI

    argv = shlex.split(cmd)
    assert argv[0] == "DISABLE_MULTIPROC=1" and argv[1] == "lm_eval"
    monkeypatch.setattr(sys, "argv", argv[1:])
    ns = HarnessCLI().parse_args()
    return ns.model, ns.model_args


def test_add_bos_token_reaches_the_tokenizer_as_with_the_cli(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """add_bos_token: true puts BOS in front of every request, as ``--model_args ...,add_bos_token=True`` does
    (lm_eval loads the tokenizer with it); the tiny tokenizer adds no BOS by itself."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from bezoar_jobs.models import load_causal_lm, load_tokenizer

    seen: list[Any] = []
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda model, **kw: seen.append(model) or {"results": {}})
    cfg = HarnessConfig(add_bos_token=True, batch_size=1)
    model, tok = load_causal_lm(tiny, "float32", "cpu"), load_tokenizer(tiny)
    harness.evaluate(model, tok, None, [], cfg)
    (ours,) = seen
    cli = HFLM(pretrained=str(tiny), dtype="float32", device="cpu", batch_size=1, add_bos_token=True)
    text = "Question: How many legs does a spider have?\nAnswer:"
    assert cli.tok_encode(text)[0] == cli.tokenizer.bos_token_id
    assert ours.tok_encode(text) == cli.tok_encode(text)
    assert ours.tok_batch_encode([text])[0].tolist() == cli.tok_batch_encode([text])[0].tolist()


def _zero_shot_tasks(tmp: Path) -> Path:
    """The demo tasks plus a copy of the cloze task whose config says num_fewshot: 0, and a group of both."""
    d = tmp / "tasks"
    shutil.copytree(DEMO, d)
    cloze = yaml.safe_load((DEMO / "bezoar_demo_cloze.yaml").read_text().replace("!function ", ""))
    text = (DEMO / "bezoar_demo_cloze.yaml").read_text().replace("task: bezoar_demo_cloze", "task: bezoar_zero_cloze")
    assert cloze["task"] == "bezoar_demo_cloze"
    (d / "bezoar_zero_cloze.yaml").write_text(text + "num_fewshot: 0\n")
    (d / "bezoar_mixed.yaml").write_text(yaml.safe_dump({
        "group": "bezoar_mixed", "task": ["bezoar_demo_facts", "bezoar_zero_cloze"],
        "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 1.0}}))
    return d


def test_a_group_loads_with_its_version(tmp_path: Path) -> None:
    """A group (mmlu in the default recipe): lm_eval 0.4.13's Group keeps its version under metadata."""
    tm = harness.task_manager(_zero_shot_tasks(tmp_path), ["bezoar_mixed"])
    (group,), versions = harness.load_tasks(tm, (HarnessTask(name="bezoar_mixed", num_fewshot=0, version="1.0"),))
    assert versions == {"bezoar_mixed": 1.0} and len(group.get_all_tasks()) == 2
    with pytest.raises(BadInput, match=r"tasks.0.version: 'bezoar_mixed' is pinned to version 2"):
        harness.load_tasks(tm, (HarnessTask(name="bezoar_mixed", version="2"),))


def test_a_task_lm_eval_keeps_zero_shot_is_not_given_shots(tmp_path: Path) -> None:
    """lm_eval's --num_fewshot leaves a task whose config sets num_fewshot: 0 at zero shots
    (simple_evaluate, lm_eval/evaluator.py): the stage does the same inside a group (so the recorded
    command reproduces it) and refuses a recipe that asks such a task itself for shots."""
    tm = harness.task_manager(_zero_shot_tasks(tmp_path), ["bezoar_zero_cloze", "bezoar_mixed"])
    with pytest.raises(BadInput, match=r"tasks.0.num_fewshot: 'bezoar_zero_cloze' is zero-shot in lm_eval"):
        harness.load_tasks(tm, (HarnessTask(name="bezoar_zero_cloze", num_fewshot=2),))
    (task,), _ = harness.load_tasks(tm, (HarnessTask(name="bezoar_zero_cloze", num_fewshot=0),))
    assert task.get_config("num_fewshot") == 0
    (group,), _ = harness.load_tasks(tm, (HarnessTask(name="bezoar_mixed", num_fewshot=2),))
    shots = {t.task_name: t.get_config("num_fewshot") for t in group.get_all_tasks()}
    assert shots == {"bezoar_demo_facts": 2, "bezoar_zero_cloze": 0}


def test_a_groups_n_samples_is_its_tasks_documents() -> None:
    """lm_eval's n-samples has leaf tasks only; a group (mmlu) reports its documents as sample_len."""
    raw = {
        "results": {
            "mmlu": {"alias": "mmlu", "name": "mmlu", "sample_len": 30, "acc,none": 0.5, "acc_stderr,none": 0.1},
            "mmlu_a": {"sample_len": 10, "acc,none": 0.4, "acc_stderr,none": 0.2},
            "mmlu_b": {"sample_len": 20, "acc,none": 0.55, "acc_stderr,none": 0.1},
        },
        "group_subtasks": {"mmlu": ["mmlu_a", "mmlu_b"]},
        "versions": {"mmlu": "2", "mmlu_a": 1.0, "mmlu_b": 1.0},
        "n-samples": {"mmlu_a": {"original": 10, "effective": 10}, "mmlu_b": {"original": 25, "effective": 20}},
    }
    out = harness.summarize(raw, (HarnessTask(name="mmlu", num_fewshot=5),), {"mmlu": 2})
    assert out["mmlu"]["n_samples"] == 30 and out["mmlu"]["value"] == 0.5
    assert set(out["mmlu"]["subtasks"]) == {"mmlu_a", "mmlu_b"}


def test_recorded_vllm_command_carries_the_models_keywords(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vllm command line's --model_args, as the lm_eval CLI parses them, are the keywords the stage
    gives lm_eval's VLLM (but batch_size, a flag of its own): the engine seed from the recipe's seed
    included (VLLM's own default is 1234)."""
    cfg = HarnessConfig(backend="vllm", data_parallel_size=2, seed=42, max_length=2048, add_bos_token=False,
                        tasks=(HarnessTask(name="x"),))
    kw = harness.vllm_model_args("/m", cfg, "bfloat16")
    assert kw["seed"] == 42
    (cmd,) = harness.cli_commands("/m", "bfloat16", "cuda", None, cfg, "abc123")
    model, margs = _cli_model_args(cmd, monkeypatch)
    assert model == "vllm"
    assert margs == {**{k: v for k, v in kw.items() if k != "batch_size"}, "revision": "abc123"}


def test_a_models_trust_remote_code_reaches_vllm_and_the_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    """A baseline's trust_remote_code: lm_eval's VLLM (engine, config, tokenizer) and HFLM default to False."""
    one = (HarnessTask(name="x"),)
    kw = harness.vllm_model_args("/m", HarnessConfig(backend="vllm", tasks=one), "auto", trust_remote_code=True)
    assert kw["trust_remote_code"] is True
    (cmd,) = harness.cli_commands("/m", "auto", "cuda", None, HarnessConfig(backend="vllm", tasks=one),
                                  trust_remote_code=True)
    assert _cli_model_args(cmd, monkeypatch)[1]["trust_remote_code"] is True
    (cmd,) = harness.cli_commands("/m", "float32", "cpu", None, HarnessConfig(tasks=one), trust_remote_code=True)
    assert _cli_model_args(cmd, monkeypatch)[1] == {"pretrained": "/m", "dtype": "float32", "trust_remote_code": True}


def test_vllm_stage_passes_a_baselines_trust_remote_code(tmp_path: Path, tiny: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from bezoar_jobs.recipe import parse_recipe
    from bezoar_jobs.runner import run_stage
    from bezoar_jobs.store import open_store

    seen: list[dict[str, Any]] = []

    def fake_vllm(model_dir: str, tm: Any, task_objects: Any, cfg: Any, dtype: str, **kw: Any) -> dict[str, Any]:
        seen.append(kw)
        return {"results": {"bezoar_demo_facts": {"acc_norm,none": 0.5, "acc_norm_stderr,none": 0.1}}}

    monkeypatch.setattr(harness, "check_backend", lambda cfg: None)
    monkeypatch.setattr(harness, "evaluate_vllm", fake_vllm)
    data = {
        "schema_version": 1, "name": "harness-audit",
        "teacher": {"backend": "local", "model": str(tiny), "prompt_format": "{user}"},
        "judge": {"backend": "local", "model": str(tiny), "prompt_format": "{user}"},
        "student": {"model": str(tiny)},
        "evaluation": {
            "checkpoints": [],
            "baselines": [{"name": "remote", "model": str(tiny), "trust_remote_code": True}],
            "harness": {"include_path": "pkg://bezoar_jobs/demo_data/harness_tasks", "backend": "vllm",
                        "tasks": [{"name": "bezoar_demo_facts", "num_fewshot": 2, "metric": "acc_norm"}]},
            "mtbench": {"enabled": False},
        },
    }
    run = tmp_path / "run"
    assert run_stage("eval-harness", parse_recipe(yaml.safe_dump(data)), open_store(run)) == 0
    assert seen == [{"trust_remote_code": True}]
    per = json.loads(open_store(run).read_text("eval-harness/results/remote.json"))
    assert ",trust_remote_code=True" in per["lm_eval_command"][0]


def test_the_command_note_says_bootstrap_iters_0_drops_every_stderr() -> None:
    """bootstrap_iters 0: lm_eval computes no stderr at all, not only the bootstrapped ones."""
    raw = {"results": {"x": {"acc,none": 0.5, "acc_stderr,none": "N/A"}}}
    assert harness.summarize(raw, (HarnessTask(name="x"),), {})["x"]["stderr"] is None
    note = harness.cli_note(HarnessConfig(bootstrap_iters=0))
    assert note is not None and "no stderr was computed" in note
    assert "perplexity" in (harness.cli_note(HarnessConfig(bootstrap_iters=100)) or "")
