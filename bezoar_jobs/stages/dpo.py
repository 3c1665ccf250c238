"""Stage ``dpo``: DPO with a LoRA adapter from the committed sft-hh model (bezoar_jobs.training.dpo)."""

from __future__ import annotations

from ..runner import StageContext, StageOutput


def run_dpo(ctx: StageContext) -> StageOutput:
    from ..training.dpo import run_dpo_stage

    return run_dpo_stage(ctx)
