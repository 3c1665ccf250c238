"""Stages ``sft-lamini``, ``sft-evol``, ``sft-orca`` and ``sft-hh`` (see bezoar_jobs.training.sft).

Heavy imports (torch, transformers, trl, peft) happen inside the function, so importing the stage
registry stays cheap.
"""

from __future__ import annotations

from ..runner import StageContext, StageOutput


def run_sft(ctx: StageContext) -> StageOutput:
    from ..training.sft import run_sft_stage

    return run_sft_stage(ctx)
