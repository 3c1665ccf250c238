"""Audit of the SFT examples: which tokens an example holds and which of them carry a label.

Two real tokenizers: the tiny byte-level BPE of tests/tiny_model.py and a SentencePiece Llama
tokenizer trained here in a few milliseconds and loaded the way OpenLLaMA's is (``LlamaTokenizer``
from a ``tokenizer.model``, BOS added by the tokenizer, byte fallback, a dummy prefix).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

try:
    from tests.tiny_model import build_tiny_model
except ImportError:  # run from inside tests/
    from tiny_model import build_tiny_model  # type: ignore[no-redef]

_SP_CORPUS = [
    "### System:\nBelow is an instruction that describes a task. Write a response.\n\n",
    "### Instruction:\nName a colour of the sky.\n\n### Response:\nThe sky is blue.",
    "Human: How do I boil an egg?\n\nAssistant: Put it in boiling water for eight minutes.",
    "The quick brown fox jumps over the lazy dog. Count one two three 1 2 3.",
]


def _sentencepiece_llama(dest: Path) -> Any:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    dest.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_SP_CORPUS * 50), model_prefix=str(dest / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", character_coverage=1.0, minloglevel=2,
    )
    # OpenLLaMA's tokenizer_config: the tokenizer adds BOS itself, not EOS
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "tokenizer_class": "LlamaTokenizer", "clean_up_tokenization_spaces": False,
    }), encoding="utf-8")
    return AutoTokenizer.from_pretrained(str(dest))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def toks(tmp_path_factory: pytest.TempPathFactory, tiny: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from bezoar_jobs.training.lora import setup_tokenizer

    sp = _sentencepiece_llama(tmp_path_factory.mktemp("sp"))
    assert type(sp).__name__ == "LlamaTokenizer" and sp("x")["input_ids"][0] == sp.bos_token_id
    return {"tiny-bpe": setup_tokenizer(AutoTokenizer.from_pretrained(tiny)),
            "sentencepiece-llama": setup_tokenizer(sp)}


def _labelled(row: dict[str, list[int]]) -> tuple[int, list[int]]:
    labels = row["labels"]
    n = next(i for i, x in enumerate(labels) if x != -100)
    assert all(x == -100 for x in labels[:n]) and labels[n:] == row["input_ids"][n:]
    return n, labels[n:]


@pytest.mark.parametrize("name", ["tiny-bpe", "sentencepiece-llama"])
def test_special_token_spellings_in_the_data_stay_text(toks: dict[str, Any], name: str) -> None:
    """Finding: a response (or instruction) holding the text of a special token, e.g. an HTML
    ``<s>`` strikethrough in a code answer or a ``</s>`` the teacher wrote out, was tokenized into
    the BOS/EOS ids. An EOS id in the middle of a labelled response trains the model to stop there;
    a response ending in the text ``</s>`` got no EOS of its own. Every example must hold exactly one
    BOS (first) and one EOS (last), and its labelled part must decode to the response."""
    from bezoar_jobs.data.prompt_format import render_example
    from bezoar_jobs.training.examples import encode, tokenize_example

    tok = toks[name]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    cases = [
        ("Show struck-out text in HTML.", "Use <s>old price</s> then the new price."),
        ("What does the <s> tag do?", "It strikes text out."),
        ("Say goodbye.", "Goodbye.</s>"),
    ]
    for instruction, response in cases:
        prompt, completion = render_example(instruction, response)
        row = tokenize_example(tok, prompt, completion, 512, add_bos=True)
        ids = row["input_ids"]
        assert ids.count(bos) == 1 and ids[0] == bos, (response, tok.convert_ids_to_tokens(ids))
        assert ids.count(eos) == 1 and ids[-1] == eos, (response, tok.convert_ids_to_tokens(ids))
        n, target = _labelled(row)
        assert tok.decode(target[:-1]) == completion
        assert target[-1] == eos
        # inference (MT-Bench answers go through encode too) sees the same prompt tokens
        assert ids[:n] == encode(tok, prompt, add_bos=True)


@pytest.mark.parametrize("name", ["tiny-bpe", "sentencepiece-llama"])
def test_labels_are_the_response_and_one_eos_at_the_boundary(toks: dict[str, Any], name: str) -> None:
    """The prompt/response boundary with real tokenizers: no prompt token is labelled, the first
    response token is, EOS once at the end; the ids are those of the full text as inference
    tokenizes it; a cut that leaves only prompt tokens is refused, one that keeps a response token
    is kept."""
    from bezoar_jobs.data.prompt_format import render_example
    from bezoar_jobs.training.examples import PromptTooLong, encode, tokenize_example

    tok = toks[name]
    responses = ["The sky is blue.", "42 is the answer", "1. First\n2. Second", "```python\nprint(1)\n```",
                 "éclair — délicieux", ":) ok", "- item", "'quoted'", "下雨"]
    for response in responses:
        prompt, completion = render_example("Answer it:", response)
        row = tokenize_example(tok, prompt, completion, 512, add_bos=True)
        ids = row["input_ids"]
        n, target = _labelled(row)
        p_ids = encode(tok, prompt, add_bos=True)
        assert n == len(p_ids) and ids[:n] == p_ids  # nothing of the prompt is trained
        assert ids == [*encode(tok, prompt + completion, add_bos=True), tok.eos_token_id]
        assert tok.decode(target[:-1]) == completion and target.count(tok.eos_token_id) == 1
        assert tok.decode(ids[n : n + 1]).strip() == tok.decode(target[:1]).strip() != ""
        with pytest.raises(PromptTooLong):
            tokenize_example(tok, prompt, completion, n, add_bos=True)
        cut = tokenize_example(tok, prompt, completion, n + 1, add_bos=True)
        assert cut["labels"][:n] == [-100] * n and cut["labels"][n] == ids[n]


@pytest.mark.parametrize("name", ["tiny-bpe", "sentencepiece-llama"])
def test_every_batch_layout_trains_each_response_and_its_eos_once(toks: dict[str, Any], name: str) -> None:
    """TRL's flattened batches, our padded packed rows and our shared-prefix batches: the labelled
    tokens, read per example, are exactly every response followed by its EOS; nothing is pre-shifted;
    every example's first position is unlabelled; pad (= EOS here) positions are unlabelled."""
    import datasets
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from bezoar_jobs.data.prompt_format import render_example
    from bezoar_jobs.training.examples import tokenize_example
    from bezoar_jobs.training.packing import PackedRowsCollator, SharedPrefixCollator

    tok = toks[name]
    assert tok.pad_token_id == tok.eos_token_id  # the case where padding could hide EOS
    responses = ["The sky is blue.", "Red.", "42", "One two three four five six.", "x", "Yes, the dog jumps."]
    rows = [
        tokenize_example(tok, *render_example(f"Question {i}?", r, system="Be brief." if i % 3 == 0 else None),
                         512, True)
        for i, r in enumerate(responses)
    ]
    want = sorted(r + tok.eos_token for r in responses)
    packed = list(pack_dataset(datasets.Dataset.from_list(rows), 512, "bfd", {}))
    pad = tok.pad_token_id
    layouts = {
        "trl flat examples": DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True)(rows),
        "trl flat packed": DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True)(packed),
        "padded examples": PackedRowsCollator(pad_token_id=pad)(rows),
        "padded packed rows": PackedRowsCollator(pad_token_id=pad)(packed),
        "shared prefix": SharedPrefixCollator(pad_token_id=pad, min_prefix=4)(packed),
    }
    for layout, batch in layouts.items():
        ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
        assert bool((labels[pos == 0] == -100).all()), layout
        got = []
        for r in range(ids.shape[0]):
            run: list[int] = []
            for j in range(ids.shape[1]):
                if int(labels[r, j]) == -100:
                    assert not run, layout  # a response is one labelled run, ended by its EOS
                    continue
                assert int(labels[r, j]) == int(ids[r, j]), layout
                run.append(int(ids[r, j]))
                if run[-1] == tok.eos_token_id:
                    got.append(tok.decode(run))
                    run = []
            assert not run, layout
        assert sorted(got) == want, layout


def test_wrapped_packing_is_refused_before_it_trains_across_examples(
    tiny: Path, toks: dict[str, Any], tmp_path: Path
) -> None:
    """Finding: ``training.sft_args.packing_strategy: wrapped`` (a valid TRL value, accepted with
    ``training.batching: packed``) gave rows of max_length cut through examples, with TRL's padded
    collator and an all-ones attention mask: each example attended to the examples before it in its
    row, and an example cut at a row end had the rest of its response trained in the next row without
    its prompt. The SFT trainer now refuses it; bfd keeps whole examples apart."""
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig

    from bezoar_jobs.data.prompt_format import render_example
    from bezoar_jobs.errors import BadInput
    from bezoar_jobs.training.config import DevicePlan
    from bezoar_jobs.training.examples import tokenize_example
    from bezoar_jobs.training.sft import make_trainer

    tok = toks["tiny-bpe"]
    rows = [tokenize_example(tok, *render_example(f"Count to {i}.", " ".join(["one"] * (1 + 5 * i))), 512, True)
            for i in range(6)]
    plan = DevicePlan(cuda=False, quantize_4bit=False, load_dtype="float32", compute_dtype="float32", bf16=False,
                      fp16=False, description="LoRA")
    args = SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", bf16=False,
                     per_device_train_batch_size=2, packing=True, packing_strategy="wrapped", max_length=128)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM")
    with pytest.raises(BadInput, match=r"packing_strategy 'wrapped'.*use bfd"):
        make_trainer(tiny, plan, args, lora, tok, datasets.Dataset.from_list(rows))


def test_a_hub_flash_kernel_gets_the_flattened_batches_flash_attention_keeps_apart() -> None:
    """transformers takes any attention whose name holds "flash" for FlashAttention (utils/generic.py
    is_flash_attention_requested), hub kernels included; only names starting with "flash" got the flattened
    padding-free batches, and a kernel such as kernels-community/flash-attn3 got padded packed rows."""
    from transformers.utils.generic import is_flash_attention_requested

    from bezoar_jobs.training.attention import NAME, keeps_examples_apart

    for name in ("flash_attention_2", "kernels-community/flash-attn3", "kernels-community/vllm-flash-attn3"):
        assert is_flash_attention_requested(requested_attention_implementation=name)
        assert keeps_examples_apart(name), name
    for name in ("sdpa", "eager", "flex_attention", None):
        assert not keeps_examples_apart(name), name
    assert keeps_examples_apart(NAME)
