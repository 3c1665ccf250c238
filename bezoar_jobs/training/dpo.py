"""DPO preference pairs from HH-RLHF rows, tokenized here, and the TRL DPOTrainer that trains on them.

Pairs: prompt = the dialogue up to its last assistant turn (in the OpenBezoar prompt format),
chosen/rejected = the two final assistant turns (data/hh.py). A prompt that alone fills
``max_length`` is an error or dropped (``training.long_prompts``), like the SFT stages. The stage
(bezoar_jobs.stages.dpo) loads the rows and trains; this module takes plain values.

The pairs are tokenized here, with the SFT stages' rules (:func:`bezoar_jobs.training.examples.encode`),
and not by TRL. TRL's DPOTrainer appends the EOS token to each answer as text and tokenizes the text
with the tokenizer's special tokens parsed as markup: a ``</s>`` written out inside an HH-RLHF answer
(Llama's EOS spelling) became the EOS id in the middle of the answer, preferred or dispreferred as
the point to stop, and a ``<s>`` (an HTML strikethrough) a BOS. Here the text is data: the only BOS
is the one the tokenizer or the recipe's ``student.add_bos`` puts first (:func:`starts_with_bos`),
the only EOS the one that ends each answer. The ids are TRL's columns (``prompt_ids``,
``chosen_ids``, ``rejected_ids``), split where TRL splits them: the answer starts where the tokenized
prompt and the tokenized prompt+answer diverge, so a token merged across the boundary belongs to the
answer. :func:`dpo_trainer_class` is a DPOTrainer that takes such a dataset as it is instead of
tokenizing it again. For text without special-token spellings the ids are the ones TRL made.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from ..errors import BadInput
from .examples import common_prefix, encode

log = logging.getLogger("bezoar")

# TRL 1.16's tokenized preference columns: what its DataCollatorForPreference reads and what
# DPOTrainer._set_signature_columns_if_needed keeps (with the precomputed reference log-probs).
ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def pair_ids(
    tok: Any, prompt: str, chosen: str, rejected: str, add_bos: bool, prompt_ids: list[int] | None = None
) -> dict[str, list[int]]:
    """``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` of one pair: each answer ends in one EOS
    (the tokenizer's own when it appends one, else ours); the prompt is the common prefix of the
    tokenized prompt and both tokenized prompt+answer texts. ``prompt_ids``: ``encode`` of the
    prompt, when the caller has it already."""
    eos = tok.eos_token_id
    p_ids = list(prompt_ids) if prompt_ids is not None else encode(tok, prompt, add_bos)
    # a tokenizer that appends EOS itself ended the prompt with it too; the answers keep theirs
    if eos is not None and p_ids and p_ids[-1] == eos:
        p_ids = p_ids[:-1]
    full = []
    for answer in (chosen, rejected):
        ids = encode(tok, prompt + answer, add_bos)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        full.append(ids)
    n = min(common_prefix(p_ids, seq) for seq in full)
    return {"prompt_ids": p_ids[:n], "chosen_ids": full[0][n:], "rejected_ids": full[1][n:]}


def dpo_trainer_class() -> type:
    """TRL's ``DPOTrainer`` that trains on a dataset of :data:`ID_COLUMNS` as it is (any other
    dataset goes through TRL's own preparation)."""
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            names = dataset.column_names
            if names is None:  # a stream whose columns are not declared
                names = list(next(iter(dataset)))
            if set(ID_COLUMNS) <= set(names):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return PretokenizedDPOTrainer


def dpo_pairs(
    items: list[tuple[str, dict[str, Any]]],
    tok: Any,
    max_length: int,
    add_bos: bool,
    long_prompts: str,
    max_dropped_fraction: float,
    field: str,
    source: str,
) -> tuple[list[dict[str, list[int]]], dict[str, Any]]:
    """(rows of :data:`ID_COLUMNS`, counts) from ``(file:line, row)`` items; ``field`` and ``source``
    name the data in errors."""
    from ..data.hh import SkipRow, dpo_pair

    rows, skipped = [], Counter[str]()
    named: list[str] = []
    for where, row in items:
        try:
            pair = dpo_pair(row)
        except SkipRow as e:
            skipped[e.reason] += 1
            if len(named) < 3:
                named.append(f"{where}: {e}")
            continue
        p_ids = encode(tok, pair["prompt"], add_bos)
        n_prompt = len(p_ids)
        if n_prompt >= max_length:
            if long_prompts == "error":
                raise BadInput(
                    f"{where}: the prompt alone is {n_prompt} tokens; training.dpo.dpo_args.max_length is "
                    f"{max_length}: raise it or set training.long_prompts: drop"
                )
            skipped["prompt_too_long"] += 1
            continue
        rows.append(pair_ids(tok, pair["prompt"], pair["chosen"], pair["rejected"], add_bos, p_ids))
    total = len(items)
    dropped = total - len(rows)
    counts = {
        "rows_read": total,
        "examples": len(rows),
        "dropped": dropped,
        **{f"dropped_{k}": v for k, v in sorted(skipped.items())},
    }
    if named:  # counted above; the first ones named, so a reader can find them
        log.warning("%s (%s): %d of %d rows dropped (%s), e.g. %s", field, source, dropped, total,
                    ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())), "; ".join(named))
    if not rows:
        why = f" ({dict(skipped)}; e.g. {named[0]})" if named else " (empty)"
        if skipped and set(skipped) <= {"unparseable", "missing_chosen", "missing_rejected"}:
            why += ("; each row's 'chosen' and 'rejected' must each be a whole HH-RLHF transcript, its turns "
                    "opened by a blank line and 'Human:' or 'Assistant:' (a separate 'prompt' column is not read)")
        raise BadInput(f"{field} ({source}): no preference pairs to train on{why}")
    if dropped / total > max_dropped_fraction:
        raise BadInput(f"{field} ({source}): {dropped} of {total} rows dropped ({dict(skipped)}), more than "
                       f"training.max_dropped_fraction={max_dropped_fraction}")
    return rows, counts
