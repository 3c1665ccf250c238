"""QLoRA SFT on a GPU: an OpenLLaMA-3B-shaped random model at 2048 tokens, ours against TRL's default.

    python bench/qlora_gpu.py [--shape openllama-3b] [--steps 30] [--batch 4] [--setups ours,trl-default]
                              [--nproc-per-node N] [--peak-tflops T] [--json FILE]
    python bench/qlora_gpu.py --smoke          # a tiny shape on CPU, plain LoRA: checks the code path only

No hub: the model is a randomly initialised LlamaForCausalLM of the named shape (OpenLLaMA-3B v2: 26
layers, hidden 3200, MLP 8640, 32 heads, vocabulary 32000), saved once as bf16 safetensors and loaded
the way the SFT stage loads it (training/lora.py: 4-bit NF4, double quantization, bf16 compute,
k-bit preparation, gradient checkpointing), with the recipe's LoRA (r 16 on q/k/v, as the paper). The
examples are random token ids with long-tailed lengths capped at ``--max-length`` (2048): a prompt of
32-256 tokens and a response whose length is log-normal (median 300), labels on the response only.

Setups (the same examples in the same optimizer steps):

- ``ours``: the stage's trainer (bezoar_jobs.training.sft.make_trainer): a batch of examples flattened
  into one sequence without padding, per-example attention;
- ``trl-default``: TRL's SFTTrainer as it comes (``packing=False``): rows padded to the batch's longest.

Reported per setup: real tokens per second (the examples' tokens, padding not counted), the real-token
fraction, peak CUDA memory (max allocated), and model FLOPs utilization: (6 N + 6 L h s) FLOPs per real
token (N the model's parameters, L layers, h hidden size, s the mean example length: the causal
attention's share) times real tokens/s, over the GPU's peak dense bf16 FLOP/s (``--peak-tflops``, or
known from the device name). This is the usual "model FLOPs" convention: the recomputation of gradient
checkpointing and the 4-bit dequantization are work the GPU does that MFU does not count.

``--nproc-per-node N`` reruns this script under torch.distributed.run: N ranks of DDP, each with its own
4-bit copy on its own GPU, the per-device batch kept (the global batch grows N-fold, as for a
throughput-scaling bench), tokens summed over the ranks. Compare with the 1-process figure for the
scaling. Figures go to docs/benchmarks.md ("QLoRA on a GPU").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

SHAPES = {
    # layers, hidden, intermediate, heads, kv heads, vocabulary
    "openllama-3b": (26, 3200, 8640, 32, 32, 32000),
    "tiny": (2, 64, 128, 4, 2, 512),
}
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0, "4090": 165.0}


def build_model(dest: Path, shape: str, dtype: str) -> tuple[Path, int]:
    """A random model of ``shape`` with a small BPE tokenizer (tests/tiny_model.py's); (dir, parameters)."""
    import torch
    from tiny_model import build_tiny_model
    from transformers import LlamaConfig, LlamaForCausalLM

    build_tiny_model(dest)  # the tokenizer (its tiny weights are replaced below)
    layers, hidden, inter, heads, kv, vocab = SHAPES[shape]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(dest, safe_serialization=True)
    del model
    return dest, n


def make_rows(n: int, vocab: int, max_length: int, seed: int = 1) -> list[dict[str, list[int]]]:
    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = rnd.randint(32, 256)
        resp = min(max_length - prompt, max(8, int(rnd.lognormvariate(math.log(300), 0.9))))
        ids = [rnd.randrange(3, vocab) for _ in range(prompt + resp)]
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})  # as training/examples.py
    return rows


def run_setup(name: str, model_dir: Path, rows: list[dict[str, list[int]]], a: argparse.Namespace,
              cuda: bool, out: Path) -> dict[str, Any]:
    import datasets
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from bezoar_jobs.models import load_tokenizer
    from bezoar_jobs.ranks import world
    from bezoar_jobs.training import dist
    from bezoar_jobs.training.config import DevicePlan
    from bezoar_jobs.training.lora import load_for_training, setup_tokenizer
    from bezoar_jobs.training.packing import CountingCollator
    from bezoar_jobs.training.sft import make_trainer

    tok = setup_tokenizer(load_tokenizer(model_dir))
    plan = DevicePlan(cuda=cuda, quantize_4bit=cuda, load_dtype="bfloat16" if cuda else "float32",
                      compute_dtype="bfloat16" if cuda else "float32", bf16=cuda, fp16=False,
                      description="QLoRA" if cuda else "LoRA (smoke, CPU)")
    kwargs: dict[str, Any] = {
        "output_dir": str(out / name), "per_device_train_batch_size": a.batch, "gradient_accumulation_steps": 1,
        "max_steps": a.steps, "learning_rate": 2e-4, "save_strategy": "no", "report_to": "none", "logging_steps": 1,
        "use_cpu": not cuda, "bf16": cuda, "seed": 0, "disable_tqdm": True, "activation_checkpointing": cuda,
        "optim": "paged_adamw_8bit" if cuda else "adamw_torch", "ddp_find_unused_parameters": False,
        "max_length": a.max_length,
    }
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj"],
                      task_type="CAUSAL_LM")
    dataset = datasets.Dataset.from_list(rows)
    if name == "ours":
        kwargs.update(packing=False, padding_free=True, max_length=None)
        trainer, counter = make_trainer(model_dir, plan, SFTConfig(**kwargs), lora, tok, dataset, attention=a.attention)
    else:
        kwargs.update(packing=False)
        model = load_for_training(model_dir, plan, False, bool(kwargs["activation_checkpointing"]))
        trainer = SFTTrainer(model=model, args=SFTConfig(**kwargs), train_dataset=dataset, processing_class=tok,
                             peft_config=lora)
        counter = CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.time()
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    secs = time.time() - t0
    tokens = dist.sum_ranks({"real": counter.real_tokens, "all": counter.total_tokens})
    peak = int(torch.cuda.max_memory_allocated()) if cuda else 0
    del trainer
    attention = a.attention if name == "ours" else "sdpa, padded"
    return {"setup": name, "attention": attention, "world_size": world().size, "steps": a.steps,
            "seconds": round(secs, 2),
            "real_tokens": int(tokens["real"]), "real_fraction": round(tokens["real"] / tokens["all"], 4),
            "real_tokens_per_s": round(tokens["real"] / secs, 1), "peak_memory_gib_rank0": round(peak / 2**30, 2)}


def peak_flops(a: argparse.Namespace) -> float | None:
    if a.peak_tflops:
        return float(a.peak_tflops) * 1e12
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="openllama-3b", choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4, help="examples per device per step")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--setups", default="ours,trl-default")
    ap.add_argument("--attention", default="auto",
                    help="ours: the stage's training.attention (auto: per-example SDPA; sdpa, flex_attention, ...)")
    ap.add_argument("--nproc-per-node", type=int, default=1)
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from its name)")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on CPU with plain LoRA: the code path only")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if a.smoke:
        a.shape, a.steps, a.max_length = "tiny", 3, 256
    if a.nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        from torch.distributed.run import parse_args, run

        # one model directory for every rank: rank 0 writes it, the others wait for it
        os.environ.setdefault("BEZOAR_BENCH_DIR", tempfile.mkdtemp(prefix="bezoar-qlora-"))
        args = parse_args([f"--nproc-per-node={a.nproc_per_node}", "--standalone", "--max-restarts=0", __file__])
        args.training_script_args = list(sys.argv[1:])
        try:
            run(args)
        finally:
            shutil.rmtree(os.environ["BEZOAR_BENCH_DIR"], ignore_errors=True)
        return 0

    import torch

    from bezoar_jobs.ranks import world

    cuda = torch.cuda.is_available() and not a.smoke
    if not cuda and not a.smoke:
        print("no CUDA device: run with --smoke for the CPU code path check", file=sys.stderr)
        return 2
    if cuda:
        torch.cuda.set_device(world().local_rank)
    tmp = Path(os.environ.get("BEZOAR_BENCH_DIR") or tempfile.mkdtemp(prefix="bezoar-qlora-"))
    try:
        model_dir = tmp / f"model-{a.shape}"
        marker = model_dir / "params.json"
        if world().zero and not marker.is_file():
            _, n = build_model(model_dir, a.shape, "bfloat16" if cuda else "float32")
            marker.write_text(json.dumps({"params": n}))
        while not marker.is_file():  # the other ranks wait for rank 0's model (same machine)
            time.sleep(1)
        n_params = json.loads(marker.read_text())["params"]
        layers, hidden, *_rest, vocab = SHAPES[a.shape]
        rows = make_rows(a.batch * a.steps * world().size, vocab, a.max_length)
        mean_len = sum(len(r["input_ids"]) for r in rows) / len(rows)
        flops_per_token = 6 * n_params + 6 * layers * hidden * mean_len
        peak = peak_flops(a) if cuda else None
        results = []
        for name in a.setups.split(","):
            r = run_setup(name, model_dir, rows, a, cuda, tmp)
            if peak:
                r["mfu"] = round(flops_per_token * r["real_tokens_per_s"] / (peak * world().size), 4)
            results.append(r)
            if world().zero:
                print(json.dumps(r), flush=True)
        summary = {"shape": a.shape, "params": n_params, "max_length": a.max_length, "mean_tokens": round(mean_len, 1),
                   "batch_per_device": a.batch, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                   "peak_tflops": peak / 1e12 if peak else None, "results": results}
        by = {r["setup"]: r for r in results}
        if "ours" in by and "trl-default" in by:
            summary["speedup_vs_trl_default"] = round(by["ours"]["real_tokens_per_s"]
                                                      / by["trl-default"]["real_tokens_per_s"], 2)
        if world().zero:
            print(json.dumps(summary, indent=2))
            if a.json:
                a.json.write_text(json.dumps(summary, indent=2))
    finally:
        if world().zero and world().size == 1 and not os.environ.get("BEZOAR_BENCH_DIR"):
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
