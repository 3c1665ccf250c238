"""Stage ``dpo``: DPO on HH-RLHF preference pairs, from the committed ``sft-hh`` model.

A LoRA adapter is trained on the policy; the reference model is the same network with the adapter
disabled (TRL ``DPOTrainer(ref_model=None, peft_config=...)``), so no second copy of the weights
is held. Pairs come from :func:`bezoar_jobs.training.dpo.dpo_pairs` already tokenized, with the SFT
stages' rules (a special token's spelling in the data is text, not a BOS or EOS id), and the trainer
(:func:`bezoar_jobs.training.dpo.dpo_trainer_class`) trains on those ids rather than tokenizing the
text again its own way.
"""

from __future__ import annotations

import logging

from ..runner import StageContext, StageOutput
from . import training

log = logging.getLogger("bezoar")


def run_dpo(ctx: StageContext) -> StageOutput:
    import datasets

    from ..data.hh import load_hh_rows
    from ..training.attention import choose, in_use
    from ..training.dpo import dpo_pairs, dpo_trainer_class
    from ..training.lora import load_for_training
    from ..training.loss import compact_fused_head
    from ..training.run import install_collator, release

    configs = training.prepare(ctx)
    args = configs.trainer_args
    t = ctx.recipe.training
    student = ctx.recipe.student
    base_dir, base_info = training.resolve_base(ctx, configs.base_stage)
    tok = training.load_tokenizer(ctx, base_dir)
    src = t.dpo_data()
    field = "training.dpo.data" if t.dpo.data is not None else "training.hh.data"
    items = load_hh_rows(src, field)
    rows, counts = dpo_pairs(items, tok, int(args.max_length), student.add_bos, t.long_prompts,
                             t.max_dropped_fraction, field, src.path)
    info = {"name": src.path, "rows": len(items), "licence": src.licence,
            "note": "preference pairs (chosen vs rejected final turn)"}
    if src.revision:
        info["revision"] = src.revision
    ctx.check_stop()
    log.info("dpo: %d preference pairs from %s", len(rows), info["name"])
    dataset = datasets.Dataset.from_list(rows)
    # training.attention: a name is loaded as given; auto is the model's default here (DPO's batches are padded)
    attn = choose(t.attention, padding_free=False)
    model = load_for_training(
        base_dir, configs.plan, student.trust_remote_code, bool(args.activation_checkpointing), attn
    )
    trainer = dpo_trainer_class()(
        model=model, ref_model=None, args=args, train_dataset=dataset, processing_class=tok, peft_config=configs.lora
    )
    counter = install_collator(trainer, padding_free=False)
    with compact_fused_head(t.response_head and not configs.plan.cuda) as compact:
        result = training.train(ctx, trainer, configs, counter)
    logged = [h for h in trainer.state.log_history if "rewards/margins" in h]
    rewards = {k: v for k, v in logged[-1].items() if k.startswith("rewards/")} if logged else {}
    attention = in_use(trainer.model)
    del trainer, model
    release()
    return training.finish(
        ctx, configs, base_dir, base_info, tok, result, [info], counts,
        extra={"beta": args.beta, "last_rewards": rewards, "response_only_lm_head": compact,
               "attention": attention},
    )
