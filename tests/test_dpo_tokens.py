"""The DPO stage tokenizes its pairs as the SFT stages do: a special token's spelling in the data is text.

TRL's DPOTrainer appended the EOS token to each answer as text and tokenized prompt and answers with
the special tokens parsed as markup, so a ``</s>`` written out in an HH-RLHF answer became the EOS id
in the middle of the answer and a ``<s>`` in a question a BOS. The stage now hands TRL the ids
(bezoar_jobs.training.dpo), and for ordinary text they are the ones TRL made. Everything runs the
real code: the ``dpo`` stage through ``run_stage`` on the tiny random Llama, TRL's own
``_prepare_dataset`` for the ids it used to train on.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bezoar_jobs.manifest import CommitInfo, commit, read_manifest
from bezoar_jobs.runner import run_stage
from bezoar_jobs.store import open_store
from tests.test_training import make_recipe, one_torch_thread, tiny, tok, training_section

SHARED_FIXTURES = (one_torch_thread, tiny, tok)  # test_training.py's fixtures, found here by name

HH_DEMO = "pkg://bezoar_jobs/demo_data/hh/train.jsonl"

# HH-RLHF rows whose text spells the tiny tokenizer's special tokens (Llama's): an HTML strikethrough
# and a written-out end-of-sequence marker in an answer, the BOS spelling in a question.
SPELLED = [
    {"chosen": "\n\nHuman: How do I strike text out in HTML?\n\nAssistant: Wrap it in <s>like this</s> tags.",
     "rejected": "\n\nHuman: How do I strike text out in HTML?\n\nAssistant: You cannot."},
    {"chosen": "\n\nHuman: What does <s> mean at the start of a Llama prompt?\n\nAssistant: It is the "
               "beginning marker; the end is written </s> and ends the text.",
     "rejected": "\n\nHuman: What does <s> mean at the start of a Llama prompt?\n\nAssistant: Nothing."},
    {"chosen": "\n\nHuman: Name a colour of the sky.\n\nAssistant: The sky is blue.",
     "rejected": "\n\nHuman: Name a colour of the sky.\n\nAssistant: </s>"},
    {"chosen": "\n\nHuman: Count to three.\n\nAssistant: one two three",
     "rejected": "\n\nHuman: Count to three.\n\nAssistant: three"},
]





def with_post_processor(tok: Any, single: str, token: str) -> Any:
    """A copy of ``tok`` whose own post-processor adds ``token`` (``single``: the template)."""
    from tokenizers import processors

    out = copy.deepcopy(tok)
    tid = tok.convert_tokens_to_ids(token)
    out._tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=f"{single} $B", special_tokens=[(token, tid)]
    )
    return out


def adds_bos(tok: Any) -> Any:
    out = with_post_processor(tok, "<s> $A", "<s>")
    assert out("x")["input_ids"][0] == tok.bos_token_id
    return out


def appends_eos(tok: Any) -> Any:
    out = with_post_processor(tok, "$A </s>", "</s>")
    assert out("x")["input_ids"][-1] == tok.eos_token_id
    return out


def assert_special_ids_only_at_the_ends(rows: list[dict[str, list[int]]], tok: Any, bos_first: bool) -> None:
    bos, eos = tok.bos_token_id, tok.eos_token_id
    for i, r in enumerate(rows):
        for side in ("chosen_ids", "rejected_ids"):
            seq = r["prompt_ids"] + r[side]
            assert [p for p, t in enumerate(seq) if t == eos] == [len(seq) - 1], (i, side, seq)
            assert r[side][-1] == eos, (i, side)
            assert [p for p, t in enumerate(seq) if t == bos] == ([0] if bos_first else []), (i, side, seq)


# ---------------------------------------------------------------------------------------------
# 1. special-token spellings in the data are text, in what the dpo stage trains on
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("add_bos", [True, False])
def test_dpo_stage_trains_on_special_token_spellings_as_text(
    tmp_path: Path, tiny: Path, tok: Any, add_bos: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer holding ``</s>`` and a question holding ``<s>``: the trainer's dataset has the EOS id
    once, at the end of each answer, and the BOS id only at position 0 (when the recipe adds one; the
    tiny tokenizer adds none itself); the spellings are there as the characters they are."""
    import bezoar_jobs.stages.training as stage_training
    from bezoar_jobs.data.hh import load_hh_rows
    from bezoar_jobs.recipe_base import DatasetSource
    from bezoar_jobs.training.dpo import dpo_pairs

    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in SPELLED), encoding="utf-8")
    store = open_store(tmp_path / "run")
    out = tmp_path / "sft-hh-out"
    shutil.copytree(tiny, out / "model")
    commit(store, out, CommitInfo("sft-hh", "test", {}, {}, {}, {}))
    dpo = {"data": {"path": str(data), "licence": "Apache-2.0"},
           "dpo_args": {"max_length": 320, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                        "max_steps": 1}}
    recipe, _ = make_recipe(tmp_path, tiny, training_section(dpo=dpo), student={"add_bos": add_bos})

    seen: dict[str, Any] = {}
    train = stage_training.train

    def spy(ctx: Any, trainer: Any, configs: Any, counter: Any) -> Any:
        seen["rows"] = trainer.train_dataset.to_list()
        # TRL's collator, under the stage's token counter (left uncounted)
        seen["batch"] = counter.inner([trainer.train_dataset[i] for i in range(2)])
        return train(ctx, trainer, configs, counter)

    monkeypatch.setattr(stage_training, "train", spy)
    assert run_stage("dpo", recipe, store) == 0
    m = read_manifest(store, "dpo")
    assert m is not None and m["counts"]["examples"] == len(SPELLED)

    rows = [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in seen["rows"]]
    assert len(rows) == len(SPELLED)
    assert_special_ids_only_at_the_ends(rows, tok, bos_first=add_bos)
    text = [tok.decode(r["prompt_ids"] + r["chosen_ids"]) for r in rows]
    assert "<s>like this</s> tags." in text[0] and "What does <s> mean" in text[1] and "written </s> and" in text[1]
    assert tok.decode(rows[2]["rejected_ids"], skip_special_tokens=True).strip() == "</s>"
    # the stage trains on dpo_pairs' ids as they are (TRL did not tokenize again)
    items = load_hh_rows(DatasetSource(path=str(data)), "training.dpo.data")
    want, _ = dpo_pairs(items, tok, 320, add_bos, "error", 0.0, "training.dpo.data", str(data))
    assert rows == want
    # and the batches hold them: the prompt masked, each answer scored through its one EOS
    ids, mask = seen["batch"]["input_ids"].tolist(), seen["batch"]["completion_mask"].tolist()
    first = rows[0]["prompt_ids"] + rows[0]["chosen_ids"]
    assert ids[0][: len(first)] == first
    assert mask[0][: len(first)] == [0] * len(rows[0]["prompt_ids"]) + [1] * len(rows[0]["chosen_ids"])


def test_pairs_end_in_one_eos_and_start_with_one_bos_whatever_the_tokenizer_adds(tok: Any) -> None:
    """A tokenizer that adds BOS itself gets no second one from the recipe; one that appends EOS
    itself ends each answer with that EOS, not two, and its prompt does not end with one."""
    from bezoar_jobs.training.dpo import dpo_pairs
    from bezoar_jobs.training.examples import starts_with_bos

    items = [(f"prefs.jsonl:{i}", r) for i, r in enumerate(SPELLED, start=1)]
    for t in (tok, adds_bos(tok), appends_eos(tok), appends_eos(adds_bos(tok))):
        for add_bos in (True, False):
            rows, counts = dpo_pairs(items, t, 320, add_bos, "error", 0.0, "training.dpo.data", "prefs.jsonl")
            assert counts["examples"] == len(SPELLED)
            assert_special_ids_only_at_the_ends(rows, t, bos_first=starts_with_bos(t, add_bos))


# ---------------------------------------------------------------------------------------------
# 2. ordinary text: the ids TRL trained on before
# ---------------------------------------------------------------------------------------------
def trl_ids(tok: Any, pairs: list[dict[str, str]], tmp: Path) -> list[dict[str, list[int]]]:
    """What TRL 1.16's own DPOTrainer._prepare_dataset made of the text pairs the stage handed it."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp / "trl"), max_length=320, use_cpu=True, report_to="none", bf16=False)
    owner = SimpleNamespace(_tokenizer=tok)  # all _prepare_dataset reads of the trainer
    out = DPOTrainer._prepare_dataset(owner, datasets.Dataset.from_list(pairs), tok, args, "train")
    return [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in out]


@pytest.mark.parametrize("tokenizer", ["no_bos", "adds_bos"])
@pytest.mark.parametrize("add_bos", [True, False])
def test_ordinary_pairs_get_the_ids_trl_made_from_their_text(
    tmp_path: Path, tok: Any, tokenizer: str, add_bos: bool
) -> None:
    """The demo HH-RLHF pairs (no special-token spellings): our prompt/chosen/rejected ids equal those
    TRL made from the text pairs the stage used to hand it (the BOS, when the recipe asked for one the
    tokenizer does not add, written as text in front of the prompt; TRL appending the EOS text)."""
    from bezoar_jobs.data.hh import dpo_pair, load_hh_rows
    from bezoar_jobs.recipe_base import DatasetSource
    from bezoar_jobs.training.dpo import dpo_pairs

    t = tok if tokenizer == "no_bos" else adds_bos(tok)
    items = load_hh_rows(DatasetSource(path=HH_DEMO), "training.hh.data")
    assert len(items) > 30 and not any("<s>" in json.dumps(r) or "</s>" in json.dumps(r) for _, r in items)
    ours, _ = dpo_pairs(items, t, 320, add_bos, "error", 0.0, "training.hh.data", HH_DEMO)
    bos_as_text = t.bos_token if add_bos and tokenizer == "no_bos" else ""
    pairs = [dpo_pair(row) for _, row in items]
    theirs = trl_ids(t, [{**p, "prompt": bos_as_text + p["prompt"]} for p in pairs], tmp_path)
    assert len(ours) == len(theirs) == len(items)
    assert ours == theirs
    assert all((r["prompt_ids"][0] == t.bos_token_id) == (add_bos or tokenizer == "adds_bos") for r in ours)
