"""Stages ``sft-<scheme>`` (filtered synthetic data) and ``sft-hh`` (HH-RLHF).

Each scheme stage starts from the previous stage in ``training.sft_order`` (the first from the
recipe's student); sft-hh starts from the last of them. Rows become prompt/completion pairs in the
one prompt format (data/prompt_format.py), are tokenized with the loss on the response only
(training/examples.py) and trained with TRL's SFTTrainer and a LoRA adapter (QLoRA on CUDA).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import BadInput
from ..recipe_view import get_path
from ..registry import scheme as scheme_def
from ..registry import spec
from ..runner import StageContext, StageOutput
from . import training

log = logging.getLogger("bezoar")

NAMED_DROPS = 20  # dropped HH-RLHF rows named in the manifest (all are counted)


def scheme_examples(ctx: StageContext, scheme: str) -> tuple[list[Any], dict[str, Any], Path]:
    """The filtered rows of ``scheme`` as training examples, with the data's card entry."""
    from ..training.examples import read_filtered_rows, scheme_example

    sd = scheme_def(scheme)
    columns = sd.load().TRAIN_COLUMNS
    stage = f"filter-{scheme}"
    data_dir = ctx.fetch_input(stage, "data")
    label = ctx.store.url(f"{stage}/data/train.jsonl")
    rows = read_filtered_rows(data_dir / "train.jsonl", label)
    if not rows:
        raise BadInput(f"{label}: the filter kept no rows: nothing to train {ctx.name} on")
    examples = [scheme_example(scheme, columns, where, row) for where, row in rows]
    info = {
        "name": f"{stage}/data/train.jsonl",
        "rows": len(rows),
        "licence": f"seeds: {get_path(ctx.recipe, sd.seed).licence}",
        "note": f"synthetic, written by {ctx.recipe.teacher.model}, filtered by {ctx.recipe.judge.model}",
    }
    return examples, info, data_dir


def hh_examples(ctx: StageContext) -> tuple[list[Any], Counter[str], dict[str, Any]]:
    from ..data.hh import SkipRow, load_hh_rows, sft_example
    from ..training.examples import Example

    src = ctx.recipe.training.hh.data
    items = load_hh_rows(src, "training.hh.data")
    examples, skipped = [], Counter[str]()
    named: list[dict[str, str]] = []
    for where, row in items:
        try:
            prompt, completion = sft_example(row)
        except SkipRow as e:
            skipped[e.reason] += 1
            if len(named) < NAMED_DROPS:
                named.append({"row": where, "reason": str(e)})
            continue
        examples.append(Example(where, prompt, completion))
    info: dict[str, Any] = {
        "name": src.path,
        "rows": len(items),
        "licence": src.licence,
        "note": "chosen dialogues; target = final assistant turn",
    }
    if named:  # every dropped row is counted; the first ones are named, here and in the manifest
        info["dropped_rows"] = named
        log.warning("%s: %d of %d rows of training.hh.data dropped (%s), e.g. %s", ctx.name, sum(skipped.values()),
                    len(items), ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())),
                    "; ".join(f"{d['row']}: {d['reason']}" for d in named[:3]))
    if src.revision:
        info["revision"] = src.revision
    return examples, skipped, info


def run_sft(ctx: StageContext) -> StageOutput:
    import datasets

    from ..training.attention import in_use
    from ..training.examples import tokenize_examples
    from ..training.run import release
    from ..training.sft import make_trainer

    configs = training.prepare(ctx)
    args = configs.trainer_args
    t = ctx.recipe.training
    student = ctx.recipe.student
    base_dir, base_info = training.resolve_base(ctx, configs.base_stage)
    tok = training.load_tokenizer(ctx, base_dir)

    data_dirs: list[Path] = []
    skipped: Counter[str] = Counter()
    scheme = spec(ctx.name).scheme
    if scheme is None:  # sft-hh
        examples, skipped, info = hh_examples(ctx)
        label = "training.hh.data"
    else:
        examples, info, data_dir = scheme_examples(ctx, scheme)
        data_dirs.append(data_dir)
        label = info["name"]
    tokenized = tokenize_examples(
        tok, examples, configs.max_length, student.add_bos, t.long_prompts, t.max_dropped_fraction, label, skipped,
    )
    ctx.check_stop()
    log.info(
        "%s: %d examples, %d tokens (%d response tokens) from %s",
        ctx.name, len(tokenized.rows), tokenized.tokens, tokenized.response_tokens, label,
    )
    dataset = datasets.Dataset.from_list(tokenized.rows)
    trainer, counter = make_trainer(
        base_dir, configs.plan, args, configs.lora, tok, dataset, t.attention, t.response_head,
        student.trust_remote_code, t.shared_prefix,
    )
    result = training.train(ctx, trainer, configs, counter)
    packed_rows = len(trainer.train_dataset)
    attention = in_use(trainer.model)
    layout = type(counter.inner).__name__
    response_head = bool(getattr(trainer, "used_response_head", False))
    del trainer
    release()
    counts = {**tokenized.counts, "tokens": tokenized.tokens, "response_tokens": tokenized.response_tokens}
    return training.finish(
        ctx,
        configs,
        base_dir,
        base_info,
        tok,
        result,
        [info],
        counts,
        extra={
            "packed_rows": packed_rows,
            "packing": bool(args.packing),
            # what an optimizer step holds: training.batching examples, or packed rows of max_length
            "batching": t.batching,
            # over every rank (the recipe's global batch): one rank's share is this over world_size
            "batch_rows_per_step": int(configs.distributed.get("global_batch") or (
                int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps))),
            "attention": attention,
            "batch_layout": layout,
            "response_only_lm_head": response_head,
        },
        data_dirs=data_dirs,
    )
