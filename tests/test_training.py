"""The training half on a tiny random Llama: configs, masks, packing, SFT/DPO stages, merge, resume.

Everything here runs the real code paths: real TRL trainers on a real (tiny) model, the real stage
functions through ``runner.run_stage`` or the ``bezoar`` CLI in a subprocess, the real S3 server of
conftest.py for the chained run. Nothing is mocked.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from bezoar_jobs.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, BadInput
from bezoar_jobs.manifest import CommitInfo, commit, read_manifest
from bezoar_jobs.recipe import Recipe, load_recipe, parse_recipe
from bezoar_jobs.runner import run_stage
from bezoar_jobs.store import Store, open_store

try:  # tests/ is not a package today
    from tests.tiny_model import build_tiny_model
except ImportError:  # pragma: no cover
    from tiny_model import build_tiny_model  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
TRAINING_STAGES = ("sft-lamini", "sft-orca", "sft-evol", "sft-hh", "dpo")  # the default chain
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Any:
    """The tiny model gains nothing from a second thread, and on a shared 2-core machine OpenMP
    threads that spin-wait for a descheduled sibling make every step many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tok(tiny: Path) -> Any:
    from bezoar_jobs.models import load_tokenizer
    from bezoar_jobs.training.lora import setup_tokenizer

    return setup_tokenizer(load_tokenizer(tiny))


def training_section(**over: Any) -> dict[str, Any]:
    t: dict[str, Any] = {
        "checkpoint_every": 50,
        "merge_dtype": "float32",
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ALL_LINEAR},
        "sft_args": {
            "max_length": 192,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "max_steps": 4,
            "learning_rate": "1e-2",  # a string on purpose: YAML 1.1 reads 1e-2 as one
            "warmup_steps": 0,
            "lr_scheduler_type": "constant",
        },
        "stage_args": {"sft-hh": {"max_length": 320}},
        "hh": {"data": {"path": "pkg://bezoar_jobs/demo_data/hh/train.jsonl", "limit": 32, "licence": "Apache-2.0"}},
        "dpo": {
            "dpo_args": {
                "max_length": 320,
                "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 1,
                "max_steps": 4,
            }
        },
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(t.get(k), dict):
            t[k] = {**t[k], **v}
        else:
            t[k] = v
    return t


def make_recipe(tmp_path: Path, model: Path, training: dict[str, Any], **top: Any) -> tuple[Recipe, Path]:
    data = {
        "schema_version": 1,
        "name": "tiny-test",
        "seed": 7,
        "teacher": {"backend": "local", "model": str(model)},
        "judge": {"backend": "local", "model": str(model)},
        "student": {"model": str(model), **top.pop("student", {})},
        "training": training,
        **top,
    }
    path = tmp_path / "recipe.yaml"
    text = yaml.safe_dump(data, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return parse_recipe(text, str(path)), path


def lamini_rows(n: int) -> list[dict[str, Any]]:
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
    return [
        {
            "instruction": f"Count to {words[i % 12]}.",
            "source": "example",
            "response": " ".join(words[: i % 12 + 1]),
            "id": f"r{i}",
        }
        for i in range(n)
    ]


def evol_rows(n: int) -> list[dict[str, Any]]:
    return [
        {
            "instruction": f"Explain step {i} with care.",
            "response": f"Step {i} is done by counting to {i}.",
            "category": "qa",
            "evolution_strategy": "in-depth",
            "in-depth-evolving_operation": "deepen",
            "epoch": 1,
        }
        for i in range(n)
    ]


def orca_rows(n: int) -> list[dict[str, Any]]:
    return [
        {
            "original_index": i,
            "inputs": f"Q: what is {i} plus one?",
            "targets": str(i + 1),
            "task_source": "cot",
            "task_name": "arith",
            "template_type": "zs_noopt",
            "system_message": "You are a careful math tutor." if i % 2 else "",
            "explained_targets": f"{i} plus one is {i + 1}.",
            "dataset_source": "demo",
        }
        for i in range(n)
    ]


def commit_filter(store: Store, scheme: str, rows: list[dict[str, Any]], tmp: Path, raw: str | None = None) -> None:
    """Commit a filter stage's output the way the filter stage does (data/train.jsonl + manifest)."""
    d = tmp / f"filter-{scheme}-out"
    (d / "data").mkdir(parents=True, exist_ok=True)
    text = raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows)
    (d / "data" / "train.jsonl").write_text(text, encoding="utf-8")
    commit(store, d, CommitInfo(f"filter-{scheme}", "test", {}, {"kept": len(rows)}, {}, {}))


def metrics(store: Store, stage: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in store.read_text(f"{stage}/metrics.jsonl").splitlines()]


def logits_of(model: Any, ids: list[int]) -> Any:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


# ---------------------------------------------------------------------------------------------
# configuration: pass-through checked against TRL / PEFT classes, every recipe, every stage
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe_file", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_builds_every_training_stage_on_cpu(recipe_file: Path, tmp_path: Path) -> None:
    from peft import LoraConfig
    from trl import DPOConfig, SFTConfig

    from bezoar_jobs.training.config import build_stage_configs, device_plan

    recipe, _ = load_recipe(recipe_file)
    t = recipe.training
    assert list(t.sft_order) == ["lamini", "orca", "evol"]  # the paper's order (docs/recipe.md)
    for cuda in (False, True):  # this machine's plan, and the plan of a GPU node (validated here, on CPU)
        plan = device_plan(t, cuda=cuda, bf16_ok=cuda)
        assert plan.quantize_4bit == (t.quantization == "4bit" or (t.quantization == "auto" and cuda))
        if not plan.quantize_4bit:
            assert "NOT QLoRA" in plan.description
        for stage in TRAINING_STAGES:
            c = build_stage_configs(recipe.training, recipe.seed, stage, tmp_path / stage, plan=plan)
            assert isinstance(c.trainer_args, DPOConfig if stage == "dpo" else SFTConfig)
            assert isinstance(c.lora, LoraConfig) and c.lora.task_type == "CAUSAL_LM"
            a = c.trainer_args
            # the fields the stage owns
            assert a.save_steps == t.checkpoint_every and a.logging_steps == 1 and a.seed == recipe.seed
            assert a.output_dir == str(tmp_path / stage) and not a.push_to_hub
            assert a.bf16 == plan.bf16 and a.use_cpu == (not cuda)
            # the recipe's values reached the TRL object
            given = t.stage_sft_args(stage) if stage != "dpo" else dict(t.dpo.dpo_args)
            assert a.learning_rate == pytest.approx(float(given["learning_rate"]))
            assert a.per_device_train_batch_size == given["per_device_train_batch_size"]
            assert c.lora.r == (t.dpo_lora() if stage == "dpo" else t.lora)["r"]
            if not cuda:
                assert "paged" not in str(a.optim)  # paged optimizers need CUDA: AdamW on CPU
            assert c.base_stage == {"sft-lamini": None, "sft-orca": "sft-lamini", "sft-evol": "sft-orca",
                                    "sft-hh": "sft-evol", "dpo": "sft-hh"}[stage]


def test_openbezoar_values_from_the_paper() -> None:
    recipe, _ = load_recipe(REPO / "recipes" / "openbezoar.yaml")
    t = recipe.training
    assert t.lora["r"] == 16 and t.lora["lora_alpha"] == 16 and t.lora["lora_dropout"] == 0.05
    assert t.lora["target_modules"] == ["q_proj", "k_proj", "v_proj"]
    assert t.hh.data.path == "Anthropic/hh-rlhf" and t.hh.data.limit == 100_000
    assert t.stage_sft_args("sft-hh")["num_train_epochs"] == 1 and t.dpo.dpo_args["beta"] == 0.1


@pytest.mark.parametrize(
    ("training", "message"),
    [
        (
            {"sft_args": {"learnin_rate": 1e-4}},
            "training.sft_args.learnin_rate: unknown key: not a field of SFTConfig (did you mean 'learning_rate'?)",
        ),
        ({"sft_args": {"output_dir": "/tmp/x"}}, "training.sft_args.output_dir: set by the stage"),
        ({"sft_args": {"save_steps": 10}}, "training.checkpoint_every"),
        ({"sft_args": {"push_to_hub": True}}, "use training.push"),
        ({"sft_args": {"hub_model_id": "me/x"}}, "training.sft_args.hub_model_id: set by the stage"),
        ({"sft_args": {"report_to": "wandb"}}, "use training.report_to"),
        ({"sft_args": {"completion_only_loss": False}}, "response tokens only"),
        ({"sft_args": {"learning_rate": "fast"}}, "training.sft_args.learning_rate: 'fast' is not a number"),
        ({"sft_args": {"packing": True}},
         "training.sft_args.packing: set by the stage, not the recipe (use training.batching"),
        ({"sft_args": {"packing_strategy": "wrapped"}}, "only used with training.batching: packed"),
        ({"batching": "packed", "sft_args": {"packing_strategy": "wrapped"}},
         "training.sft_args.packing_strategy: 'wrapped' cuts examples at row ends"),
        ({"dpo": {"dpo_args": {"sync_ref_model": True}}},
         "training.dpo.dpo_args.sync_ref_model: set by the stage, not the recipe (the reference is sft-hh's"),
        ({"stage_args": {"sft-hh": {"num_epochs": 2}}}, "training.stage_args.sft-hh.num_epochs: unknown key"),
        ({"lora": {"rank": 8}}, "training.lora.rank: unknown key: not a field of LoraConfig"),
        ({"lora": {"task_type": "SEQ_CLS"}}, "training.lora.task_type: set by the stage"),
        (
            {"dpo": {"dpo_args": {"betta": 0.2}}},
            "training.dpo.dpo_args.betta: unknown key: not a field of DPOConfig (did you mean 'beta'?)",
        ),
        (
            {"dpo": {"dpo_args": {"loss_type": ["sigmoid", "hinge"], "loss_weights": [1.0]}}},
            "training.dpo.dpo_args: DPOConfig refused the settings",
        ),
    ],
)
def test_pass_through_errors_name_the_dotted_path(tmp_path: Path, tiny: Path, training: dict, message: str) -> None:
    """Each error is found when the recipe loads (the schema of the TRL/PEFT fields: issue 11's
    finding 4), except a combination only the class itself refuses; building the stage's configs
    refuses every one of them too, with the same message."""
    from bezoar_jobs.training.config import build_stage_configs, device_plan

    post_init_only = "refused the settings" in message
    if post_init_only:
        recipe, _ = make_recipe(tmp_path, tiny, training)
    else:
        with pytest.raises(BadInput) as at_load:
            make_recipe(tmp_path, tiny, training)
        assert message in str(at_load.value) and at_load.value.exit_code == EXIT_BAD_INPUT
        assert f"{tmp_path / 'recipe.yaml'}:" in str(at_load.value)  # the file and the line
        recipe = Recipe.model_validate(yaml.safe_load((tmp_path / "recipe.yaml").read_text()))
    plan = device_plan(recipe.training, cuda=False, bf16_ok=False)
    with pytest.raises(BadInput) as e:
        for stage in TRAINING_STAGES:
            build_stage_configs(recipe.training, recipe.seed, stage, tmp_path / "out", plan=plan)
    assert message in str(e.value)
    assert e.value.exit_code == EXIT_BAD_INPUT


def test_unknown_attention_is_refused_when_the_recipe_loads(tmp_path: Path, tiny: Path) -> None:
    with pytest.raises(BadInput) as e:
        make_recipe(tmp_path, tiny, {"attention": "sdpaa"})
    assert "training.attention" in str(e.value) and "unknown attention implementation 'sdpaa'" in str(e.value)
    for ok in ("auto", "bezoar_segments", "eager", "flash_attention_2", "kernels-community/flash-attn"):
        assert make_recipe(tmp_path, tiny, {"attention": ok})[0].training.attention == ok


def test_recipe_section_is_typed_and_merges_overrides(tmp_path: Path, tiny: Path) -> None:
    recipe, _ = make_recipe(tmp_path, tiny, {"sft_args": {"learning_rate": 5e-5, "optim": None}})
    args = recipe.training.sft_args
    assert args["learning_rate"] == 5e-5 and "optim" not in args  # null drops our default
    assert args["max_length"] == 2048  # the other defaults stay
    with pytest.raises(BadInput, match=r"training\.sft_order: .*exactly once"):
        make_recipe(tmp_path, tiny, {"sft_order": ["lamini", "lamini", "orca"]})
    with pytest.raises(BadInput, match=r"recipe\.yaml:\d+: training\.lora_args: unknown key"):
        make_recipe(tmp_path, tiny, {"lora_args": {"r": 4}})
    with pytest.raises(BadInput, match=r"training\.quantization"):
        make_recipe(tmp_path, tiny, {"quantization": "8bit"})


def test_gradient_checkpointing_under_its_old_name_reaches_the_trainer(tmp_path: Path, tiny: Path) -> None:
    """transformers 5 reads ``gradient_checkpointing`` only while ``activation_checkpointing`` is unset, and
    our defaults set the new name to false: the old name, which SFTConfig and DPOConfig still accept, is
    read as the new one (in sft_args, stage_args and dpo_args) instead of being dropped without a word."""
    from bezoar_jobs.training.config import build_stage_configs, device_plan

    on = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
    section = training_section(sft_args=on, stage_args={"sft-hh": {"gradient_checkpointing": False}},
                               dpo={"dpo_args": {**on, "max_length": 320}})
    recipe, _ = make_recipe(tmp_path, tiny, section)
    t = recipe.training
    plan = device_plan(t, cuda=False, bf16_ok=False)
    want = {"sft-lamini": True, "sft-orca": True, "sft-evol": True, "sft-hh": False, "dpo": True}
    for stage, on_ in want.items():
        a = build_stage_configs(t, recipe.seed, stage, tmp_path / stage, plan=plan).trainer_args
        assert a.activation_checkpointing is on_ and a.gradient_checkpointing is on_, stage
        if on_:
            assert a.activation_checkpointing_kwargs == {"use_reentrant": False}, stage
    with pytest.raises(BadInput, match=r"gradient_checkpointing and activation_checkpointing are one setting"):
        make_recipe(tmp_path, tiny, {"sft_args": {"gradient_checkpointing": True, "activation_checkpointing": False}})


def test_a_custom_sft_order_rewires_the_stage_graph(tmp_path: Path, tiny: Path) -> None:
    from bezoar_jobs.pipeline import stage_inputs, waits_for
    from bezoar_jobs.training.config import build_stage_configs, device_plan

    recipe, _ = make_recipe(tmp_path, tiny, {"sft_order": ["evol", "lamini", "orca"]})
    plan = device_plan(recipe.training, cuda=False, bf16_ok=False)
    bases = {s: build_stage_configs(recipe.training, recipe.seed, s, tmp_path, plan=plan).base_stage
             for s in ("sft-evol", "sft-lamini", "sft-orca", "sft-hh")}
    assert bases == {"sft-evol": None, "sft-lamini": "sft-evol", "sft-orca": "sft-lamini", "sft-hh": "sft-orca"}
    # the executors schedule (and hash) exactly the model each stage starts from
    for stage, base in bases.items():
        inputs = stage_inputs(stage, recipe)
        assert [i for i in inputs if i.startswith("sft-")] == ([base] if base else [])
    assert stage_inputs("sft-lamini", recipe) == ("filter-lamini", "sft-evol")
    chain = ["sft-lamini", "sft-evol", "sft-orca", "sft-hh", "dpo"]
    assert {s: waits_for(s, chain, recipe) for s in chain} == {
        "sft-evol": [],
        "sft-lamini": ["sft-evol"],
        "sft-orca": ["sft-lamini"],
        "sft-hh": ["sft-orca"],
        "dpo": ["sft-hh"],
    }
    # without a recipe (or with the default order lamini, orca, evol) the static graph applies
    assert stage_inputs("sft-evol") == ("filter-evol", "sft-orca")
    assert stage_inputs("sft-lamini") == ("filter-lamini",)
    # and the stages run in that order: sft-lamini second, from sft-evol
    store = open_store(tmp_path / "run")
    commit_filter(store, "evol", evol_rows(8), tmp_path)
    commit_filter(store, "lamini", lamini_rows(8), tmp_path)
    assert run_stage("sft-evol", recipe, store) == 0
    assert run_stage("sft-lamini", recipe, store) == 0
    m = read_manifest(store, "sft-lamini")
    assert m is not None and set(m["inputs"]) == {"filter-lamini", "sft-evol"} and m["base_stage"] == "sft-evol"


# ---------------------------------------------------------------------------------------------
# examples: the response-only mask, token by token; long prompts; packing
# ---------------------------------------------------------------------------------------------
def test_response_only_mask_token_by_token(tok: Any) -> None:
    from bezoar_jobs.data.prompt_format import render_example
    from bezoar_jobs.training.examples import tokenize_example

    prompt, completion = render_example("Name a colour of the sky.", "The sky is blue.")
    row = tokenize_example(tok, prompt, completion, max_length=512, add_bos=True)
    ids, labels = row["input_ids"], row["labels"]
    assert len(ids) == len(labels)
    assert ids[0] == tok.bos_token_id  # the tiny tokenizer adds no BOS itself: add_bos does
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    n = labels.index(next(x for x in labels if x != -100))
    # every position before n is prompt (-100), every position from n on is trained, unchanged
    assert all(x == -100 for x in labels[:n])
    assert labels[n:] == ids[n:]
    assert tok.decode(ids[1:n]) == prompt
    assert tok.decode(ids[n:-1]) == completion
    # the ids are exactly those of the full text as inference sees it
    assert ids[1:-1] == tok(prompt + completion, add_special_tokens=False)["input_ids"]
    # without add_bos there is no BOS; a cut keeps the prompt and the start of the response
    row2 = tokenize_example(tok, prompt, completion, max_length=n + 2, add_bos=True)
    assert row2["input_ids"] == ids[: n + 2] and row2["labels"][n:] == ids[n : n + 2]
    assert tokenize_example(tok, prompt, completion, 512, add_bos=False)["input_ids"] == ids[1:]


def test_long_prompts_error_or_drop_and_nothing_left_is_an_error(tok: Any) -> None:
    from bezoar_jobs.training.examples import Example, PromptTooLong, tokenize_example, tokenize_examples

    long_prompt = "### Instruction:\n" + "word " * 300
    with pytest.raises(PromptTooLong):
        tokenize_example(tok, long_prompt, "ok", 64, True)
    exs = [
        Example("f.jsonl:1", "### Instruction:\nhi\n\n### Response:\n", "hello"),
        Example("f.jsonl:2", long_prompt, "ok"),
    ]
    with pytest.raises(BadInput, match=r"f\.jsonl:2: the prompt alone is \d+ tokens; max_length is 64"):
        tokenize_examples(tok, exs, 64, True, "error", 1.0, "f.jsonl")
    kept = tokenize_examples(tok, exs, 64, True, "drop", 1.0, "f.jsonl")
    assert kept.counts["examples"] == 1 and kept.counts["dropped_prompt_too_long"] == 1
    with pytest.raises(BadInput, match=r"more than training\.max_dropped_fraction=0\.2"):
        tokenize_examples(tok, exs, 64, True, "drop", 0.2, "f.jsonl")
    with pytest.raises(BadInput, match=r"f\.jsonl: no examples to train on \(prompt_too_long: 1\)"):
        tokenize_examples(tok, exs[1:], 64, True, "drop", 1.0, "f.jsonl")


def _boundaries(batch: dict[str, Any], r: int) -> list[tuple[int, int]]:
    """(start, end) of every example in row ``r``: where position ids restart (packed rows), else
    the attention mask's real tokens."""
    width = batch["input_ids"].shape[1]
    if batch.get("position_ids") is not None:
        pos = batch["position_ids"][r]
        starts = [i for i in range(width) if pos[i] == 0] + [width]
        return list(itertools.pairwise(starts))
    return [(0, int(batch["attention_mask"][r].sum()))]


def _per_example_losses(
    model: Any, batch: dict[str, Any], forward: dict[str, Any] | None = None
) -> dict[tuple[int, ...], float]:
    """Mean next-token loss of every example in a batch, keyed by the example's token ids.
    ``forward`` replaces the model inputs (to run the same tokens another way)."""
    import torch

    inputs = forward or {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        # no KV cache, as in training: transformers reads packed rows from position ids only then
        logits = model(**inputs, use_cache=False).logits.float()
    out = {}
    ids, labels = batch["input_ids"], batch["labels"]
    for r in range(ids.shape[0]):
        for a, b in _boundaries(batch, r):
            lab = labels[r, a + 1 : b]
            mask = lab != -100
            if not mask.any():
                continue  # a padding block
            lp = torch.log_softmax(logits[r, a : b - 1], -1)
            nll = -lp[mask].gather(-1, lab[mask][:, None]).squeeze(-1)
            out[tuple(ids[r, a:b].tolist())] = float(nll.mean())
    return out


def test_packed_batches_give_the_same_per_example_losses(tiny: Path, tok: Any) -> None:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from bezoar_jobs.data.prompt_format import render_example
    from bezoar_jobs.training.examples import tokenize_example
    from bezoar_jobs.training.packing import PackedRowsCollator

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    rows = [
        tokenize_example(tok, *render_example(f"Count to {i}.", " ".join(["one"] * (1 + 5 * i))), 512, True)
        for i in range(6)
    ]
    # unpacked: right-padded batches with an attention mask (TRL's default collator)
    padded = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(rows)
    ref = _per_example_losses(model, padded)
    assert len(ref) == 6
    # packed: best-fit-decreasing rows of at most 256 tokens, position ids restart per example
    packed = list(pack_dataset(datasets.Dataset.from_list(rows), 256, "bfd", {}))
    assert len(packed) < len(rows)
    batch = PackedRowsCollator(pad_token_id=tok.pad_token_id)(packed)
    assert "attention_mask" not in batch
    got = _per_example_losses(model, batch)
    assert set(got) == set(ref)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-4)
    # TRL's flattened padding-free batch agrees too
    flat = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(packed)
    got_flat = _per_example_losses(model, flat)
    assert set(got_flat) == set(ref)
    for k in ref:
        assert got_flat[k] == pytest.approx(ref[k], abs=1e-4)
    # the check has teeth: with plain causal attention over the packed row, later examples see earlier ones
    leaky = {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(batch["input_ids"])}
    leaked = _per_example_losses(model, batch, forward=leaky)
    assert max(abs(leaked[k] - ref[k]) for k in ref) > 1e-3


def test_segment_attention_keeps_examples_apart_in_every_batch_layout(tiny: Path, tok: Any) -> None:
    """bezoar_segments (per-example SDPA, the CPU stand-in for FlashAttention varlen) gives each
    example the loss it has alone, for flattened batches, packed rows and right-padded batches."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from bezoar_jobs.data.prompt_format import render_example
    from bezoar_jobs.training.attention import register, segment_bounds
    from bezoar_jobs.training.examples import tokenize_example
    from bezoar_jobs.training.packing import PackedRowsCollator

    sdpa = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    seg = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32, attn_implementation=register()).eval()
    assert seg.config._attn_implementation == "bezoar_segments"
    rows = [
        tokenize_example(tok, *render_example(f"Count to {i}.", " ".join(["two"] * (2 + 4 * i))), 512, True)
        for i in range(6)
    ]
    padded = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(rows)
    ref = _per_example_losses(sdpa, padded)
    assert len(ref) == 6
    packed = list(pack_dataset(datasets.Dataset.from_list(rows), 256, "bfd", {}))
    flat = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(packed)
    assert flat["input_ids"].shape[0] == 1 and "cu_seq_lens_q" in flat
    layouts = {
        "flat, cu_seq_lens": (flat, {k: flat[k] for k in ("input_ids", "position_ids", "cu_seq_lens_q")}),
        "flat, position ids only": (flat, None),
        "packed rows": (PackedRowsCollator(pad_token_id=tok.pad_token_id)(packed), None),
        "right-padded with a mask": (padded, None),
    }
    for name, (batch, forward) in layouts.items():
        got = _per_example_losses(seg, batch, forward=forward)
        assert set(got) == set(ref), name
        for k in ref:
            assert got[k] == pytest.approx(ref[k], abs=1e-4), name
    # the boundaries it cuts at, from each source
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert segment_bounds(1, 6, None, {"position_ids": pos}) == [[(0, 3), (3, 5), (5, 6)]]
    assert segment_bounds(1, 6, None, {"cu_seq_lens_q": torch.tensor([0, 4, 6]), "position_ids": pos}) == [
        [(0, 4), (4, 6)]
    ]
    assert segment_bounds(2, 4, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]), {}) == [[(0, 2), (2, 4)], [(0, 4)]]
    # what it cannot express is refused, not silently attended across
    with pytest.raises(ValueError, match="right-padded"):
        segment_bounds(1, 4, torch.tensor([[0, 0, 1, 1]]), {})
    with pytest.raises(ValueError, match="2-D"):
        segment_bounds(1, 4, torch.ones(1, 1, 4, 4), {})


def test_shared_prefixes_give_each_example_its_own_loss(tiny: Path, tok: Any) -> None:
    """SharedPrefixCollator computes a common system block once per batch; with per-example
    attention every example still gets exactly the loss it has alone."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from bezoar_jobs.data.prompt_format import render_example
    from bezoar_jobs.training.attention import register
    from bezoar_jobs.training.examples import tokenize_example
    from bezoar_jobs.training.packing import CountingCollator, SharedPrefixCollator

    sdpa = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    seg = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32, attn_implementation=register()).eval()
    systems = [None, None, "You are a careful tutor.", None, "You are a careful tutor.", "Answer briefly."]
    rows = [
        tokenize_example(
            tok, *render_example(f"Count to {i}.", " ".join(["three"] * (2 + 3 * i)), system=sy), 512, True
        )
        for i, sy in enumerate(systems)
    ]
    ref = _per_example_losses(sdpa, DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(rows))
    packed = list(pack_dataset(datasets.Dataset.from_list(rows), 256, "bfd", {}))
    counter = CountingCollator(SharedPrefixCollator(pad_token_id=tok.pad_token_id))
    batch = counter(packed)
    layout = batch["segment_prefix"].tolist()
    n_tokens = sum(len(r["input_ids"]) for r in rows)
    # three groups share a prefix: the default system block (x3), the tutor (x2); "Answer briefly" is alone
    prefixes = [r for r in layout if r[2] == r[3] and any(o[2] == r[0] and o[3] > o[2] for o in layout)]
    assert len(prefixes) == 2
    assert batch["input_ids"].shape == (1, n_tokens - counter.shared_tokens) and counter.shared_tokens > 0
    assert counter.real_tokens == n_tokens and counter.real_fraction == 1.0
    # a shared prefix ends before every member's first target
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    for s0, _e0, ps, pe in layout:
        assert labels[s0] == -100  # no target predicted across a cut
        if pe > ps:
            assert (labels[ps:pe] == -100).all()
    # per-example losses, each example reassembled from its prefix and its own part
    with torch.no_grad():
        logits = (
            seg(**{k: batch[k] for k in ("input_ids", "position_ids", "segment_prefix")}, use_cache=False)
            .logits[0]
            .float()
        )
    got = {}
    for s0, e0, ps, pe in layout:
        if any(o[2] == s0 and o[3] > o[2] for o in layout):
            continue  # a prefix segment
        full_ids = torch.cat([ids[ps:pe], ids[s0:e0]])
        full_logits = torch.cat([logits[ps:pe], logits[s0:e0]])
        full_labels = torch.cat([labels[ps:pe], labels[s0:e0]])
        lab = full_labels[1:]
        mask = lab != -100
        lp = torch.log_softmax(full_logits[:-1], -1)
        got[tuple(full_ids.tolist())] = float(-lp[mask].gather(-1, lab[mask][:, None]).squeeze(-1).mean())
    assert set(got) == set(ref)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-4)
    # the check has teeth: without the prefix in view, the examples' losses change
    leaky = {k: batch[k] for k in ("input_ids", "position_ids")}
    with torch.no_grad():
        alone = seg(**leaky, use_cache=False).logits[0].float()
    assert not torch.allclose(alone, logits, atol=1e-3)


def test_response_nll_equals_the_full_logits_loss_and_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from bezoar_jobs.training import loss as loss_mod

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden0 = torch.randn(2, 12, 16)
    labels = torch.randint(0, 50, (2, 12))
    labels[:, :4] = -100  # prompts
    labels[1, 9:] = -100  # padding
    pos = torch.tensor([list(range(7)) + list(range(5)), list(range(12))])  # row 0: two examples

    def reference() -> tuple[float, Any, int]:
        h = hidden0.clone().requires_grad_()
        logits = head(h)[:, :-1].float()
        tgt = labels[:, 1:].clone()
        tgt[pos[:, 1:] == 0] = -100  # the first token of an example is not predicted from the last one
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, 50), tgt.reshape(-1), reduction="sum", ignore_index=-100
        )
        nll.backward()
        return float(nll.detach()), h.grad, int((tgt != -100).sum())

    ref_loss, ref_grad, ref_n = reference()
    for keep, chunk in ((1 << 26, 2048), (1, 3)):  # logits kept; recomputed in backward, in chunks of 3
        monkeypatch.setattr(loss_mod, "_KEEP_LOGITS_MAX", keep)
        monkeypatch.setattr(loss_mod, "_CHUNK_TOKENS", chunk)
        h = hidden0.clone().requires_grad_()
        nll, n, correct = loss_mod.response_nll(h, labels, head, pos)
        nll.backward()
        assert int(n) == ref_n and 0 <= int(correct) <= ref_n
        assert float(nll) == pytest.approx(ref_loss, rel=1e-5)
        assert torch.allclose(h.grad, ref_grad, atol=1e-6)
    # a micro-batch without a single scored token backpropagates a zero
    h = hidden0.clone().requires_grad_()
    nll, n, _ = loss_mod.response_nll(h, torch.full_like(labels, -100), head)
    nll.backward()
    assert int(n) == 0 and float(nll) == 0.0 and float(h.grad.abs().sum()) == 0.0


def test_response_head_trainer_gives_trls_loss_and_gradients(tmp_path: Path, tiny: Path, tok: Any) -> None:
    """The stage's trainer (per-example attention, shared prompt prefixes, response-only LM head)
    against TRL's own SFTTrainer loss on the same examples: same loss, same LoRA gradients."""
    import datasets
    import torch
    from peft import LoraConfig
    from trl import SFTConfig

    from bezoar_jobs.data.prompt_format import render_example
    from bezoar_jobs.training.config import DevicePlan
    from bezoar_jobs.training.examples import tokenize_example
    from bezoar_jobs.training.sft import make_trainer

    rows = [
        tokenize_example(tok, *render_example(f"Name {i} colours.", " ".join(["red"] * (3 + 3 * i))), 256, True)
        for i in range(8)
    ]
    plan = DevicePlan(
        cuda=False,
        quantize_4bit=False,
        load_dtype="float32",
        compute_dtype="float32",
        bf16=False,
        fp16=False,
        description="LoRA",
    )
    results = {}
    for name, attention, head in (("ours", "auto", True), ("trl", "sdpa", False)):
        args = SFTConfig(
            output_dir=str(tmp_path / name),
            max_length=256,
            packing=True,
            packing_strategy="bfd",
            use_cpu=True,
            report_to="none",
            per_device_train_batch_size=8,
            bf16=False,
        )
        lora = LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        torch.manual_seed(3)
        trainer, counter = make_trainer(
            tiny, plan, args, lora, tok, datasets.Dataset.from_list(rows), attention=attention, response_head=head
        )
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
        assert (counter.shared_tokens > 0) == (name == "ours")  # the system block, computed once
        model = trainer.model.train()
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        results[name] = (
            float(loss),
            grads,
            type(trainer).__name__,
            model.config._attn_implementation,
            trainer._metrics["train"],
        )
    ours, trl = results["ours"], results["trl"]
    assert ours[2] == "ResponseHeadSFTTrainer" and ours[3] == "bezoar_segments"
    assert trl[2] == "SFTTrainer" and trl[3] == "sdpa"
    assert ours[0] == pytest.approx(trl[0], rel=1e-5)
    assert ours[1].keys() == trl[1].keys() and len(ours[1]) == 2 * 2 * 2  # A and B of q and v, 2 layers
    for k in ours[1]:
        assert torch.allclose(ours[1][k], trl[1][k], rtol=1e-4, atol=1e-6), k
    # token accuracy is logged on both paths, and agrees
    assert ours[4]["mean_token_accuracy"] == pytest.approx(trl[4]["mean_token_accuracy"])


def test_a_batch_is_examples_as_in_the_qlora_reference(tmp_path: Path, tiny: Path, tok: Any) -> None:
    """Finding 13: with packing, 'batch 4 x accumulation 4' meant 16 packed rows of max_length per
    optimizer step (~100 examples), not 16 examples. Now a batch holds exactly the recipe's number of
    examples (padding-free), so the stage takes TRL's default steps, with the same losses step by
    step; tokens-per-step batching only when the recipe says training.batching: packed."""
    import datasets
    import torch
    from trl import SFTTrainer

    from bezoar_jobs.data.prompt_format import render_example
    from bezoar_jobs.training.config import build_stage_configs, device_plan
    from bezoar_jobs.training.examples import tokenize_example
    from bezoar_jobs.training.lora import load_for_training
    from bezoar_jobs.training.sft import make_trainer

    paper, _ = load_recipe(REPO / "recipes" / "openbezoar.yaml")
    for cuda in (False, True):
        plan = device_plan(paper.training, cuda=cuda, bf16_ok=cuda)
        a = build_stage_configs(paper.training, paper.seed, "sft-lamini", tmp_path / "p", plan=plan).trainer_args
        assert a.packing is False and a.padding_free is True
        assert a.per_device_train_batch_size * a.gradient_accumulation_steps == 16  # examples per step
    section = training_section()
    section["sft_args"].update(max_steps=None, num_train_epochs=1, per_device_train_batch_size=4,
                               learning_rate=1e-3, max_length=600)
    recipe, _ = make_recipe(tmp_path, tiny, section)
    packed, _ = make_recipe(tmp_path, tiny, {**section, "batching": "packed"})
    plan = device_plan(recipe.training, cuda=False, bf16_ok=False)
    rows = [tokenize_example(tok, *render_example(f"Name {i} colours.", " ".join(["red", "blue"] * (2 + i % 5))),
                             192, True) for i in range(24)]
    losses, steps = {}, {}
    for name, r in (("examples", recipe), ("packed", packed), ("trl-default", recipe)):
        c = build_stage_configs(r.training, r.seed, "sft-lamini", tmp_path / name, plan=plan)
        torch.manual_seed(5)
        if name == "trl-default":  # TRL as it comes: random batches of 4 examples padded to the longest
            args = c.trainer_args
            args.padding_free, args.max_length = False, 600
            model = load_for_training(tiny, plan, False, False, None)
            trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tok, peft_config=c.lora)
        else:
            trainer, _ = make_trainer(tiny, plan, c.trainer_args, c.lora, tok, datasets.Dataset.from_list(rows))
        trainer.train()
        steps[name] = trainer.state.global_step
        losses[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert steps["examples"] == steps["trl-default"] == 6  # 24 examples, 4 per step
    assert steps["packed"] < steps["examples"]  # packed rows of 192 tokens hold several examples each
    assert losses["examples"] == pytest.approx(losses["trl-default"], rel=2e-3)


def test_dpo_on_cpu_scores_only_labelled_positions_with_the_same_loss(
    tmp_path: Path, tiny: Path, tok: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compact_fused_head: TRL's fused LM head takes its compact path on CPU (DPO keeps TRL's loss)."""
    import datasets
    import torch
    import trl.trainer.utils as trl_utils
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from bezoar_jobs.training.loss import compact_fused_head

    pairs = [
        {
            "prompt": f"### Instruction:\nSay {i} twice.\n\n### Response:\n",
            "chosen": " yes" * (i + 2),
            "rejected": " no",
        }
        for i in range(4)
    ]
    args = DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        per_device_train_batch_size=4,
        max_length=128,
        use_cpu=True,
        report_to="none",
        bf16=False,
    )
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=datasets.Dataset.from_list(pairs),
        processing_class=tok,
        peft_config=lora,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    scored: list[int] = []
    apply = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(
        trl_utils._ChunkedLogProbFunction, "apply", lambda *a: (scored.append(int(a[0].shape[0])), apply(*a))[1]
    )
    full = float(trainer.compute_loss(trainer.model, dict(batch)))
    every_position, scored = list(scored), []
    with compact_fused_head() as on:
        assert on and trl_utils._use_triton(torch.device("cpu")) is True
        compact = float(trainer.compute_loss(trainer.model, dict(batch)))
    assert trl_utils._use_triton(torch.device("cpu")) is False  # restored
    assert compact == pytest.approx(full, abs=1e-6)
    assert every_position and scored and max(scored) < min(every_position)  # prompts and pads skipped
    with compact_fused_head(enabled=False) as on:
        assert not on and trl_utils._use_triton(torch.device("cpu")) is False


# ---------------------------------------------------------------------------------------------
# stages on the tiny model
# ---------------------------------------------------------------------------------------------
def test_sft_stage_overfits_and_merged_checkpoint_matches_base_plus_adapter(tmp_path: Path, tiny: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe, _ = make_recipe(
        tmp_path, tiny, training_section(checkpoint_every=20, sft_args={"max_steps": 40, "max_length": 128})
    )
    store = open_store(tmp_path / "run")
    commit_filter(store, "lamini", lamini_rows(8), tmp_path)
    assert run_stage("sft-lamini", recipe, store) == 0
    m = read_manifest(store, "sft-lamini")
    assert m is not None and m["counts"]["examples"] == 8 and m["counts"]["steps"] == 40
    tr = m["training"]
    assert tr["mode"] == "lora" and "NOT QLoRA" in tr["mode_description"]
    assert (
        tr["attention"] == "bezoar_segments"
        and tr["response_only_lm_head"] is True
        and tr["real_token_fraction"] == 1.0
    )
    assert tr["batch_layout"] == "SharedPrefixCollator" and tr["shared_prefix_tokens"] > 0
    assert tr["tokens_per_second"] > 0 and 0 < tr["real_token_fraction"] <= 1 and tr["peak_memory_bytes"] > 0
    assert m["base_model"] == str(tiny) and m["inputs"].keys() == {"filter-lamini"}
    # losses every step; the loss falls by at least half on 8 examples
    recs = [r for r in metrics(store, "sft-lamini") if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, 41))
    first, last = recs[0]["loss"], sum(r["loss"] for r in recs[-3:]) / 3
    assert last <= first / 2, (first, last)
    # the model card names recipe, data, steps, loss, licences
    card = store.read_text("sft-lamini/model/README.md")
    for needle in (
        "tiny-test",
        "filter-lamini/data/train.jsonl",
        "optimizer steps: 40",
        "final training loss",
        "license: apache-2.0",
        "Licences",
    ):
        assert needle in card
    # the merged checkpoint loads on its own and equals base + adapter (from the last checkpoint)
    merged_dir = tmp_path / "merged"
    store.download_dir("sft-lamini/model", merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert merged.dtype == torch.float32 and not hasattr(merged, "peft_config")
    adapter_dir = tmp_path / "adapter"
    store.download_dir("sft-lamini/_work/checkpoints/step-40/trainer", adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, adapter_dir).eval()
    mtok = AutoTokenizer.from_pretrained(merged_dir)
    assert mtok.pad_token == mtok.eos_token
    ids = mtok("### Instruction:\nCount to five.\n\n### Response:\n")["input_ids"]
    a, b = logits_of(merged, ids), logits_of(with_adapter, ids)
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
    assert not torch.allclose(a, logits_of(AutoModelForCausalLM.from_pretrained(tiny), ids), atol=1e-3)


def test_qlora_code_path_on_cpu_merges_into_unquantized_weights(tmp_path: Path, tiny: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe, _ = make_recipe(tmp_path, tiny, training_section(quantization="4bit", sft_args={"max_steps": 3}))
    store = open_store(tmp_path / "run")
    commit_filter(store, "lamini", lamini_rows(8), tmp_path)
    assert run_stage("sft-lamini", recipe, store) == 0
    m = read_manifest(store, "sft-lamini")
    assert m["training"]["mode"] == "qlora-4bit" and "NF4" in m["training"]["mode_description"]
    merged_dir = tmp_path / "merged"
    store.download_dir("sft-lamini/model", merged_dir)
    cfg = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "float32"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    adapter = tmp_path / "adapter"
    store.download_dir("sft-lamini/_work/checkpoints/step-3/trainer", adapter)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32), adapter).eval()
    ids = list(range(3, 40))
    # merged into the unquantized base: equal to full-precision base + adapter (a merge into the
    # dequantized 4-bit weights would be off by the quantization error, far above this tolerance)
    a, b = logits_of(merged, ids), logits_of(ref, ids)
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())


def test_the_five_training_stages_chain_through_the_s3_store(
    tmp_path: Path, tiny: Path, s3_run_uri: str, s3_client: Any
) -> None:
    recipe, _ = make_recipe(
        tmp_path, tiny, training_section(checkpoint_every=2, keep_checkpoints=1, merge_dtype="bfloat16")
    )
    store = open_store(s3_run_uri)
    commit_filter(store, "lamini", lamini_rows(10), tmp_path)
    commit_filter(store, "evol", evol_rows(10), tmp_path)
    commit_filter(store, "orca", orca_rows(10), tmp_path)
    for stage in TRAINING_STAGES:
        assert run_stage(stage, recipe, store) == 0, stage
    ms = {s: read_manifest(store, s) for s in TRAINING_STAGES}
    assert [ms[s]["base_model"] for s in TRAINING_STAGES] == [
        str(tiny),
        "sft-lamini/model",
        "sft-orca/model",
        "sft-evol/model",
        "sft-hh/model",
    ]
    assert ms["sft-evol"]["inputs"].keys() == {"filter-evol", "sft-orca"}
    assert all(ms[s]["counts"]["steps"] == 4 for s in TRAINING_STAGES)
    assert all(ms[s]["training"]["merged"]["dtype"] == "bfloat16" for s in TRAINING_STAGES)
    assert json.loads(store.read_text("dpo/model/config.json"))["dtype"] == "bfloat16"
    assert ms["sft-hh"]["counts"]["rows_read"] == 32 and ms["sft-hh"]["data"][0]["licence"] == "Apache-2.0"
    assert ms["dpo"]["counts"]["examples"] == 32 and ms["dpo"]["training"]["beta"] == 0.1
    assert "rewards/margins" in ms["dpo"]["training"]["last_rewards"]
    assert any("rewards/chosen" in r for r in metrics(store, "dpo"))
    # checkpoints went through S3: only the newest complete one is kept (keep_checkpoints: 1)
    bucket, _, prefix = s3_run_uri[len("s3://") :].partition("/")
    keys = [
        o["Key"]
        for o in s3_client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/dpo/_work/checkpoints/").get("Contents", [])
    ]
    assert f"{prefix}/dpo/_work/checkpoints/step-4/COMPLETE" in keys
    assert not [k for k in keys if "/step-2/" in k]
    assert any(k.endswith("step-4/trainer/optimizer.pt") for k in keys)
    # a committed stage is not run again
    assert (
        run_stage("dpo", recipe, store) == 0
        and read_manifest(store, "dpo")["committed_at"] == ms["dpo"]["committed_at"]
    )


def test_a_distributed_training_stage_counts_every_gpu_it_held() -> None:
    """The manifest's gpu_hours was the stage's wall time: torchrun on 4 GPUs was counted, and priced in the
    report, as one GPU."""
    from bezoar_jobs.stages.training import gpu_hours

    assert gpu_hours(1800.0, cuda=True, world_size=4) == 2.0
    assert gpu_hours(1800.0, cuda=True, world_size=1) == 0.5
    assert gpu_hours(1800.0, cuda=False, world_size=4) == 0.0  # CPU: no GPU time


def test_dpo_loads_the_model_with_the_recipes_attention(tmp_path: Path, tiny: Path) -> None:
    """training.attention reaches the DPO stage's model as it reaches the SFT stages' (auto: the model's
    default, since DPO's batches are padded)."""
    import shutil

    store = open_store(tmp_path / "run")
    out = tmp_path / "sft-hh-out"
    shutil.copytree(tiny, out / "model")
    commit(store, out, CommitInfo("sft-hh", "test", {}, {}, {}, {}))
    dpo = {"dpo_args": {"max_length": 320, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                        "max_steps": 1}}
    hh = {"data": {"path": "pkg://bezoar_jobs/demo_data/hh/train.jsonl", "limit": 4, "licence": "Apache-2.0"}}
    recipe, _ = make_recipe(tmp_path, tiny, training_section(attention="eager", dpo=dpo, hh=hh))
    assert run_stage("dpo", recipe, store) == 0
    m = read_manifest(store, "dpo")
    assert m is not None and m["training"]["attention"] == "eager"
    assert m["training"]["total_tokens"] >= m["training"]["real_tokens"] > 0  # the batches' counts reach it


# ---------------------------------------------------------------------------------------------
# bad input: exit 2 with the file, line and field named
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", r"filter-lamini/data/train\.jsonl: the filter kept no rows"),
        ("no_response", r"filter-lamini/data/train\.jsonl:2: field 'response' is missing"),
        ("empty_response", r"filter-lamini/data/train\.jsonl:3: field 'response' is empty"),
        ("prompt_too_long", r"filter-lamini/data/train\.jsonl:2: the prompt alone is \d+ tokens; max_length is 160"),
        ("all_dropped", r"no examples to train on \(prompt_too_long: 2\)"),
        ("missing_model", r"does not exist"),
        ("not_committed", r"input stage 'filter-lamini' is not committed"),
    ],
)
def test_bad_input_is_a_clear_error_with_exit_code_2(tmp_path: Path, tiny: Path, case: str, message: str) -> None:
    training = training_section()
    top: dict[str, Any] = {}
    rows = lamini_rows(3)
    raw = None
    long = {"instruction": "word " * 200, "response": "ok"}
    if case == "empty":
        raw = ""
    elif case == "no_response":
        rows[1].pop("response")
    elif case == "empty_response":
        rows[2]["response"] = "  "
    elif case == "prompt_too_long":
        rows[1] = long
        training = training_section(sft_args={"max_length": 160})
    elif case == "all_dropped":
        rows = [long, long]
        training = training_section(long_prompts="drop", sft_args={"max_length": 160})
    elif case == "missing_model":
        top["student"] = {"model": str(tmp_path / "no-such-model")}
    recipe, _ = make_recipe(tmp_path, tiny, training, **top)
    store = open_store(tmp_path / "run")
    if case != "not_committed":
        commit_filter(store, "lamini", rows, tmp_path, raw)
    with pytest.raises(BadInput) as e:
        run_stage("sft-lamini", recipe, store)
    assert e.value.exit_code == EXIT_BAD_INPUT
    assert re.search(message, str(e.value)), str(e.value)
    assert read_manifest(store, "sft-lamini") is None


def test_bad_rows_exit_2_through_the_cli(tmp_path: Path, tiny: Path) -> None:
    _, recipe_path = make_recipe(tmp_path, tiny, training_section())
    store = open_store(tmp_path / "run")
    rows = lamini_rows(3)
    rows[1]["response"] = None
    commit_filter(store, "lamini", rows, tmp_path)
    p = _cli(recipe_path, tmp_path / "run", "sft-lamini")
    _, err = p.communicate(timeout=120)
    assert p.returncode == EXIT_BAD_INPUT, err
    assert "train.jsonl:2: field 'response' is missing" in err


# ---------------------------------------------------------------------------------------------
# preemption: SIGTERM saves and exits non-zero, SIGKILL resumes from the newest checkpoint
# ---------------------------------------------------------------------------------------------
def _cli(recipe: Path, run: Path | str, stage: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # see one_torch_thread
    return subprocess.Popen(
        [sys.executable, "-m", "bezoar_jobs.cli", "stage", stage, "--recipe", str(recipe), "--run", str(run)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


class _Tail:
    """Collect a process's stderr in a thread, so waiting on a line never blocks the pipe."""

    def __init__(self, p: subprocess.Popen):
        self.lines: list[str] = []
        self.t = threading.Thread(target=self._read, args=(p,), daemon=True)
        self.t.start()

    def _read(self, p: subprocess.Popen) -> None:
        for line in p.stderr:
            self.lines.append(line)

    def text(self) -> str:
        self.t.join(timeout=30)
        return "".join(self.lines)


def _wait_for(pred: Callable[[], Any], p: subprocess.Popen, timeout: float = 120, every: float = 0.1) -> Any:
    end = time.time() + timeout
    while time.time() < end:
        got = pred()
        if got:
            return got
        if p.poll() is not None:
            raise AssertionError(f"process ended (rc {p.returncode}) before the condition held")
        time.sleep(every)
    raise AssertionError("timed out")


def _complete_steps(store: Store, stage: str) -> list[int]:
    return sorted(
        int(m.group(1))
        for r in store.list(f"{stage}/_work/checkpoints/")
        if (m := re.search(r"step-(\d+)/COMPLETE$", r))
    )


def _merged_state(store: Store, stage: str, dest: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    store.download_dir(f"{stage}/model", dest)
    return load_file(dest / "model.safetensors")


def test_sigterm_then_sigkill_resume_to_the_same_result(tmp_path: Path, tiny: Path, s3_run_uri: str) -> None:
    import torch

    steps, every = 60, 10
    training = training_section(
        checkpoint_every=every,
        sft_args={"max_steps": steps, "learning_rate": 3e-3, "per_device_train_batch_size": 2},
        lora={"lora_dropout": 0.1},  # dropout makes the result depend on the restored RNG state
    )
    recipe, recipe_path = make_recipe(tmp_path, tiny, training)
    store = open_store(s3_run_uri)
    commit_filter(store, "lamini", lamini_rows(8), tmp_path)

    # 1. SIGTERM after the first checkpoint: a final checkpoint is saved, the exit code is non-zero
    p = _cli(recipe_path, s3_run_uri, "sft-lamini")
    tail = _Tail(p)
    _wait_for(lambda: _complete_steps(store, "sft-lamini"), p)
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=120)
    log1 = tail.text()
    assert p.returncode == EXIT_INTERRUPTED, log1
    assert "SIGTERM" in log1 and read_manifest(store, "sft-lamini") is None
    stopped = max(_complete_steps(store, "sft-lamini"))
    assert 0 < stopped < steps
    assert f"checkpoint at step {stopped}" in log1

    # 2. restart: it resumes from that step; SIGKILL it once a newer checkpoint is complete
    p = _cli(recipe_path, s3_run_uri, "sft-lamini")
    tail = _Tail(p)
    _wait_for(lambda: max(_complete_steps(store, "sft-lamini")) > stopped, p)
    p.kill()
    p.wait(timeout=60)
    log2 = tail.text()
    assert f"resuming from the checkpoint at step {stopped}" in log2
    killed_at = max(_complete_steps(store, "sft-lamini"))
    assert stopped < killed_at < steps

    # 3. the third run continues from the newest complete checkpoint (not from zero) and commits
    p = _cli(recipe_path, s3_run_uri, "sft-lamini")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert f"resuming from the checkpoint at step {killed_at}" in err
    m = read_manifest(store, "sft-lamini")
    assert m["training"]["resumed_from_step"] == killed_at and m["counts"]["steps"] == steps
    recs = metrics(store, "sft-lamini")
    # the history carries both restarts, and every step's loss exactly once
    assert [r["step"] for r in recs if r.get("event") == "resumed"] == [stopped, killed_at]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, steps + 1))

    # 4. same result as an uninterrupted run, up to numerical noise
    ref_store = open_store(tmp_path / "ref-run")
    commit_filter(ref_store, "lamini", lamini_rows(8), tmp_path)
    assert run_stage("sft-lamini", recipe, ref_store) == 0
    a = _merged_state(store, "sft-lamini", tmp_path / "a")
    b = _merged_state(ref_store, "sft-lamini", tmp_path / "b")
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-4, worst
    ref_loss = [r["loss"] for r in metrics(ref_store, "sft-lamini") if "loss" in r]
    got_loss = [r["loss"] for r in recs if "loss" in r]
    assert torch.allclose(torch.tensor(got_loss), torch.tensor(ref_loss), atol=1e-4)
    # 5. the manifest's figures cover the whole run across both resumes, not the last session's steps
    # (issue 11, finding 10): the mean loss of every step, the tokens of every session
    ref = read_manifest(ref_store, "sft-lamini")["training"]
    got = m["training"]
    assert ref["train_loss"] == pytest.approx(sum(ref_loss) / steps, abs=1e-6)
    assert got["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-4)
    assert got["final_loss"] == pytest.approx(ref["final_loss"], abs=1e-4)
    assert got["real_tokens"] == pytest.approx(ref["real_tokens"], rel=0.15)  # batches prefetched at a kill
    assert got["tokens_per_second"] and got["train_runtime_s"] > 0


def test_kill_before_any_checkpoint_starts_over_cleanly(tmp_path: Path, tiny: Path) -> None:
    training = training_section(checkpoint_every=1000, sft_args={"max_steps": 30})
    recipe, recipe_path = make_recipe(tmp_path, tiny, training)
    run = tmp_path / "run"
    store = open_store(run)
    commit_filter(store, "lamini", lamini_rows(8), tmp_path)
    p = _cli(recipe_path, run, "sft-lamini")
    tail = _Tail(p)
    _wait_for(lambda: any("training from step 0" in line for line in tail.lines), p)
    p.kill()
    p.wait(timeout=60)
    log = tail.text()
    assert _complete_steps(store, "sft-lamini") == [] and read_manifest(store, "sft-lamini") is None, log
    # an upload that died half-way leaves files without COMPLETE: never resumed from, deleted
    store.write_bytes("sft-lamini/_work/checkpoints/step-20/trainer/adapter_model.safetensors", b"partial")
    assert run_stage("sft-lamini", recipe, store) == 0
    m = read_manifest(store, "sft-lamini")
    assert m["training"]["resumed_from_step"] is None and m["counts"]["steps"] == 30
    assert not store.exists("sft-lamini/_work/checkpoints/step-20/trainer/adapter_model.safetensors")
    assert _complete_steps(store, "sft-lamini") == [30], (log, metrics(store, "sft-lamini"))
    # killed after the last checkpoint but before the commit: the rerun trains nothing more (the
    # HF Trainer alone would run a step past max_steps) and commits the same weights
    before = read_manifest(store, "sft-lamini")
    first = before["files"]["model/model.safetensors"]["sha256"]
    store.delete("sft-lamini/_MANIFEST.json")
    assert run_stage("sft-lamini", recipe, store) == 0
    m = read_manifest(store, "sft-lamini")
    assert m["training"]["resumed_from_step"] == 30 and m["counts"]["steps"] == 30
    assert m["files"]["model/model.safetensors"]["sha256"] == first
    # the figures are the run's, not null (issue 11, finding 10): loss over all 30 steps, tokens/s
    for key in ("train_loss", "final_loss", "real_tokens", "total_tokens"):
        assert m["training"][key] == pytest.approx(before["training"][key], rel=1e-6), key
    assert m["training"]["tokens_per_second"] and m["training"]["train_runtime_s"] > 0
    assert _complete_steps(store, "sft-lamini") == [30]
