"""The SFT stages: sft-lamini, sft-evol, sft-orca (filtered synthetic data) and sft-hh (HH-RLHF).

Each starts from the previous stage in ``training.sft_order`` (the first from the recipe's
student); sft-hh starts from the last of them. Rows become prompt/completion pairs in the one
prompt format (data/prompt_format.py), are tokenized with the loss on the response only
(examples.py) and trained with TRL's SFTTrainer and a LoRA adapter (QLoRA on CUDA).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import BadInput
from . import run
from .examples import Example, read_filtered_rows, scheme_example, tokenize_examples

log = logging.getLogger("bezoar")


def scheme_examples(ctx: Any, scheme: str) -> tuple[list[Example], dict[str, Any], Path]:
    stage = f"filter-{scheme}"
    data_dir = ctx.fetch_input(stage, "data")
    label = ctx.store.url(f"{stage}/data/train.jsonl")
    rows = read_filtered_rows(data_dir / "train.jsonl", label)
    if not rows:
        raise BadInput(f"{label}: the filter kept no rows: nothing to train {ctx.name} on")
    examples = [scheme_example(scheme, where, row) for where, row in rows]
    licences = {"lamini": ctx.recipe.seeds.dolly.licence, "evol": ctx.recipe.seeds.dolly.licence, "orca": ctx.recipe.seeds.flan.licence}
    info = {
        "name": f"{stage}/data/train.jsonl",
        "rows": len(rows),
        "licence": f"seeds: {licences[scheme]}",
        "note": f"synthetic, written by {ctx.recipe.teacher.model}, filtered by {ctx.recipe.judge.model}",
    }
    return examples, info, data_dir


def hh_examples(ctx: Any) -> tuple[list[Example], Counter, dict[str, Any]]:
    from ..data.hh import SkipRow, load_hh_rows, sft_example

    src = ctx.recipe.training.hh.data
    items = load_hh_rows(src, "training.hh.data")
    examples, skipped = [], Counter()
    for where, row in items:
        try:
            prompt, completion = sft_example(row)
        except SkipRow as e:
            skipped[e.reason] += 1
            continue
        examples.append(Example(where, prompt, completion))
    info = {"name": src.path, "rows": len(items), "licence": src.licence, "note": "chosen dialogues; target = final assistant turn"}
    if src.revision:
        info["revision"] = src.revision
    return examples, skipped, info


def make_trainer(
    base_dir: Path,
    plan: Any,
    args: Any,
    lora: Any,
    tok: Any,
    dataset: Any,
    attention: str = "auto",
    response_head: bool = True,
    trust_remote_code: bool = False,
    shared_prefix: bool = True,
) -> tuple[Any, Any]:
    """The SFT trainer of a stage (and of bench/training.py) with its token counter: the model
    loaded with ``attention`` (auto: per-example SDPA for padding-free batches), TRL's SFTTrainer
    (with the response-only LM head on CPU when ``response_head``), our collator (shared prompt
    prefixes computed once per batch when ``shared_prefix`` and the attention allows it)."""
    from trl import SFTTrainer

    from .attention import choose, is_padding_free
    from .lora import load_for_training
    from .loss import sft_trainer_class

    attn = choose(attention, is_padding_free(args))
    model = load_for_training(base_dir, plan, trust_remote_code, bool(args.activation_checkpointing), attn)
    cls = sft_trainer_class() if response_head else SFTTrainer
    trainer = cls(model=model, args=args, train_dataset=dataset, processing_class=tok, peft_config=lora)
    return trainer, run.install_collator(trainer, bool(args.packing), shared_prefix)


def run_sft_stage(ctx: Any) -> Any:
    import datasets

    from .lora import setup_tokenizer

    configs = run.prepare(ctx)
    args = configs.trainer_args
    t = ctx.recipe.training
    base_dir, base_info = run.resolve_base(ctx, configs.base_stage)
    from ..models import load_tokenizer

    tok = setup_tokenizer(load_tokenizer(base_dir, trust_remote_code=ctx.recipe.student.trust_remote_code))

    data_dirs: list[Path] = []
    skipped: Counter = Counter()
    if ctx.name == "sft-hh":
        examples, skipped, info = hh_examples(ctx)
        label = "training.hh.data"
    else:
        scheme = ctx.name.removeprefix("sft-")
        examples, info, data_dir = scheme_examples(ctx, scheme)
        data_dirs.append(data_dir)
        label = info["name"]
    max_length = int(t.stage_sft_args(ctx.name)["max_length"])
    tokenized = tokenize_examples(
        tok,
        examples,
        max_length,
        ctx.recipe.student.add_bos,
        t.long_prompts,
        t.max_dropped_fraction,
        label,
        skipped,
    )
    ctx.check_stop()
    log.info(
        "%s: %d examples, %d tokens (%d response tokens) from %s",
        ctx.name, len(tokenized.rows), tokenized.tokens, tokenized.response_tokens, label,
    )
    dataset = datasets.Dataset.from_list(tokenized.rows)
    trainer, counter = make_trainer(
        base_dir, configs.plan, args, configs.lora, tok, dataset, t.attention, t.response_head,
        ctx.recipe.student.trust_remote_code, t.shared_prefix,
    )
    result = run.train(ctx, trainer, configs, counter)
    packed_rows = len(trainer.train_dataset)
    attention = str(getattr(trainer.model.config, "_attn_implementation", None) or "default")
    layout = type(counter.inner).__name__
    response_head = bool(getattr(trainer, "used_response_head", False))
    del trainer
    run.release()
    counts = {**tokenized.counts, "tokens": tokenized.tokens, "response_tokens": tokenized.response_tokens}
    return run.finish(
        ctx, configs, base_dir, base_info, tok, result, [info], counts,
        extra={"packed_rows": packed_rows, "packing": bool(args.packing), "attention": attention, "batch_layout": layout,
               "response_only_lm_head": response_head},
        data_dirs=data_dirs,
    )
