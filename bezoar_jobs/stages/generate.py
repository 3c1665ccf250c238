"""What the generate stages share; each scheme's own logic is its module under ``bezoar_jobs/schemes/``.

A scheme's ``generate(ctx)`` is a sequence of request phases (:class:`bezoar_jobs.stages.common.Phase`).
Work is split into *units* with stable ids (a LaMini prompt, an Evol-Instruct lineage, an Orca seed
row); ``--shard i/N`` takes the units whose id hashes to ``i`` mod ``N`` and writes only records. The
run without ``--shard`` reads the records of every shard, asks for whatever is still missing,
deduplicates and commits with :func:`finish`.
"""

from __future__ import annotations

import random
from typing import Any

from ..data.io import dataset_card, write_jsonl
from ..llm.base import UsageTotals
from ..recipe_view import get_path
from ..runner import StageContext, StageOutput
from .common import endpoint_info, usage_dict
from .records import stable_hash

DOLLY_FIELDS = ("instruction", "context", "response", "category")
FLAN_FIELDS = ("inputs", "targets", "task_source", "task_name", "template_type")


def unit_rng(ctx: StageContext, *parts: Any) -> random.Random:
    """A random generator seeded by the recipe seed, the stage and ``parts`` (a unit id, a round)."""
    return random.Random(stable_hash(ctx.recipe.seed, ctx.name, *parts))


def req_seed(ctx: StageContext, *parts: Any) -> int:
    """The sampling seed sent with a request: stable across runs, shards and resumes."""
    return stable_hash(ctx.recipe.seed, *parts) % (2**31 - 1)


def finish(
    ctx: StageContext,
    rows: list[dict[str, Any]],
    rejected: list[dict[str, Any]],
    counts: dict[str, Any],
    usage: UsageTotals,
    summary: str,
    seed_field: str,
    details: dict[str, Any],
    extra_usage: dict[str, Any] | None = None,
) -> StageOutput:
    """Write ``data/train.jsonl`` with its dataset card and ``rejected/``; the manifest's extras.
    ``seed_field`` is the recipe field of the scheme's seed data (``seeds.dolly``): its licence goes
    into the card, its source into the manifest."""
    source = get_path(ctx.recipe, seed_field)
    data = ctx.out / "data"
    write_jsonl(data / "train.jsonl", rows)
    dataset_card(data / "README.md", f"{ctx.recipe.name}: {ctx.name}", summary, source.licence,
                 {**details, "counts": counts}, ["train.jsonl"])
    if rejected:
        write_jsonl(ctx.out / "rejected" / "rejected.jsonl", rejected)
    teacher = ctx.recipe.teacher
    u = usage_dict(usage)
    return StageOutput(
        counts=counts,
        extra={
            "teacher": {**endpoint_info(teacher), "model_id": teacher.model},
            "usage": {"teacher": u, **(extra_usage or {})},
            "cost_usd": teacher.cost_usd(u["prompt_tokens"], u["completion_tokens"]),
            "seed_data": {seed_field.rsplit(".", 1)[-1]: source.model_dump(mode="json")},
        },
    )
