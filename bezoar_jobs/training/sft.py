"""The SFT trainer of a stage (and of bench/training.py): model, TRL's SFTTrainer, our collator.

The stage logic (which rows, which base model, resume and commit) is bezoar_jobs.stages.sft; this
module is the library part and takes plain values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import BadInput
from .config import DevicePlan
from .packing import CountingCollator
from .run import install_collator


def make_trainer(
    base_dir: Path,
    plan: DevicePlan,
    args: Any,
    lora: Any,
    tok: Any,
    dataset: Any,
    attention: str = "auto",
    response_head: bool = True,
    trust_remote_code: bool = False,
    shared_prefix: bool = True,
) -> tuple[Any, CountingCollator]:
    """The SFT trainer of a stage (and of bench/training.py) with its token counter: the model
    loaded with ``attention`` (auto: per-example SDPA for padding-free batches), TRL's SFTTrainer
    (with the response-only LM head on CPU when ``response_head``), our collator (shared prompt
    prefixes computed once per batch when ``shared_prefix`` and the attention allows it)."""
    from trl import SFTTrainer

    from .attention import choose, is_padding_free
    from .lora import load_for_training
    from .loss import sft_trainer_class

    padding_free = is_padding_free(args)
    if getattr(args, "packing", False) and not padding_free:
        # TRL's "wrapped" packing cuts examples at row ends (the tail of a response trained without its
        # prompt) and keeps no example boundaries: its padded collator lets every token attend to the
        # examples before it in the row. Only the best-fit strategies keep whole examples apart.
        strategy = getattr(args, "packing_strategy", None)
        raise BadInput(
            f"training.sft_args.packing_strategy {strategy!r}: the SFT stages pack whole examples that attend "
            "only to themselves; use bfd (or bfd_split)"
        )
    attn = choose(attention, padding_free)
    model = load_for_training(base_dir, plan, trust_remote_code, bool(args.activation_checkpointing), attn)
    cls = sft_trainer_class() if response_head else SFTTrainer
    trainer = cls(model=model, args=args, train_dataset=dataset, processing_class=tok, peft_config=lora)
    return trainer, install_collator(trainer, padding_free, shared_prefix)
