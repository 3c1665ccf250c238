"""The ``dpo`` stage: DPO on HH-RLHF preference pairs, from the committed ``sft-hh`` model.

A LoRA adapter is trained on the policy; the reference model is the same network with the adapter
disabled (TRL ``DPOTrainer(ref_model=None, peft_config=...)``), so no second copy of the weights
is held. Pairs: prompt = the dialogue up to its last assistant turn (in the OpenBezoar prompt
format), chosen/rejected = the two final assistant turns (data/hh.py). A prompt that alone fills
``dpo_args.max_length`` follows ``training.long_prompts`` like the SFT stages.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from ..errors import BadInput
from . import run
from .examples import encode

log = logging.getLogger("bezoar")


def dpo_rows(ctx: Any, tok: Any, max_length: int) -> tuple[list[dict[str, str]], dict[str, Any], dict[str, Any]]:
    from ..data.hh import SkipRow, dpo_pair, load_hh_rows

    t = ctx.recipe.training
    src = t.dpo_data()
    field = "training.dpo.data" if t.dpo.data is not None else "training.hh.data"
    items = load_hh_rows(src, field)
    add_bos = ctx.recipe.student.add_bos
    # TRL tokenizes the prompt text with the tokenizer's own special tokens; when the recipe wants a
    # BOS the tokenizer does not add, it goes in as text (the tokenizer maps it to the BOS id)
    bos_text = ""
    if add_bos and tok.bos_token is not None:
        probe = tok("x", add_special_tokens=True)["input_ids"]
        if not probe or probe[0] != tok.bos_token_id:
            bos_text = tok.bos_token
    rows, skipped = [], Counter()
    for where, row in items:
        try:
            pair = dpo_pair(row)
        except SkipRow as e:
            skipped[e.reason] += 1
            continue
        n_prompt = len(encode(tok, pair["prompt"], add_bos))
        if n_prompt >= max_length:
            if t.long_prompts == "error":
                raise BadInput(
                    f"{where}: the prompt alone is {n_prompt} tokens; training.dpo.dpo_args.max_length is "
                    f"{max_length}: raise it or set training.long_prompts: drop"
                )
            skipped["prompt_too_long"] += 1
            continue
        pair["prompt"] = bos_text + pair["prompt"]
        rows.append(pair)
    total = len(items)
    dropped = total - len(rows)
    counts = {"rows_read": total, "examples": len(rows), "dropped": dropped, **{f"dropped_{k}": v for k, v in sorted(skipped.items())}}
    if not rows:
        raise BadInput(f"{field} ({src.path}): no preference pairs to train on ({dict(skipped) or 'empty'})")
    if dropped / total > t.max_dropped_fraction:
        raise BadInput(f"{field} ({src.path}): {dropped} of {total} rows dropped ({dict(skipped)}), more than "
                       f"training.max_dropped_fraction={t.max_dropped_fraction}")
    info = {"name": src.path, "rows": total, "licence": src.licence, "note": "preference pairs (chosen vs rejected final turn)"}
    if src.revision:
        info["revision"] = src.revision
    return rows, counts, info


def run_dpo_stage(ctx: Any) -> Any:
    import datasets
    from trl import DPOTrainer

    from ..models import load_tokenizer
    from .lora import load_for_training, setup_tokenizer

    configs = run.prepare(ctx)
    args = configs.trainer_args
    base_dir, base_info = run.resolve_base(ctx, configs.base_stage)
    tok = setup_tokenizer(load_tokenizer(base_dir, trust_remote_code=ctx.recipe.student.trust_remote_code))
    rows, counts, info = dpo_rows(ctx, tok, int(args.max_length))
    ctx.check_stop()
    log.info("dpo: %d preference pairs from %s", len(rows), info["name"])
    dataset = datasets.Dataset.from_list(rows)
    model = load_for_training(base_dir, configs.plan, ctx.recipe.student.trust_remote_code, bool(args.activation_checkpointing))
    trainer = DPOTrainer(
        model=model, ref_model=None, args=args, train_dataset=dataset, processing_class=tok, peft_config=configs.lora
    )
    counter = run.install_collator(trainer, packing=False)
    from .loss import compact_fused_head

    with compact_fused_head(ctx.recipe.training.response_head and not configs.plan.cuda) as compact:
        result = run.train(ctx, trainer, configs, counter)
    logged = [h for h in trainer.state.log_history if "rewards/margins" in h]
    rewards = {k: v for k, v in logged[-1].items() if k.startswith("rewards/")} if logged else {}
    del trainer, model
    run.release()
    return run.finish(
        ctx, configs, base_dir, base_info, tok, result, [info], counts,
        extra={"beta": args.beta, "last_rewards": rewards, "response_only_lm_head": compact},
    )
