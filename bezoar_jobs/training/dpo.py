"""DPO preference pairs from HH-RLHF rows, ready for TRL's DPOTrainer.

Pairs: prompt = the dialogue up to its last assistant turn (in the OpenBezoar prompt format),
chosen/rejected = the two final assistant turns (data/hh.py). A prompt that alone fills
``max_length`` is an error or dropped (``training.long_prompts``), like the SFT stages. The stage
(bezoar_jobs.stages.dpo) loads the rows and trains; this module takes plain values.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from ..errors import BadInput
from .examples import encode

log = logging.getLogger("bezoar")


def bos_text(tok: Any, add_bos: bool) -> str:
    """TRL tokenizes the prompt text with the tokenizer's own special tokens; when the recipe wants
    a BOS the tokenizer does not add, it goes in as text (the tokenizer maps it to the BOS id)."""
    if add_bos and tok.bos_token is not None:
        probe = tok("x", add_special_tokens=True)["input_ids"]
        if not probe or probe[0] != tok.bos_token_id:
            return str(tok.bos_token)
    return ""


def dpo_pairs(
    items: list[tuple[str, dict[str, Any]]],
    tok: Any,
    max_length: int,
    add_bos: bool,
    long_prompts: str,
    max_dropped_fraction: float,
    field: str,
    source: str,
) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """(pairs, counts) from ``(file:line, row)`` items; ``field`` and ``source`` name the data in errors."""
    from ..data.hh import SkipRow, dpo_pair

    prefix = bos_text(tok, add_bos)
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
        n_prompt = len(encode(tok, pair["prompt"], add_bos))
        if n_prompt >= max_length:
            if long_prompts == "error":
                raise BadInput(
                    f"{where}: the prompt alone is {n_prompt} tokens; training.dpo.dpo_args.max_length is "
                    f"{max_length}: raise it or set training.long_prompts: drop"
                )
            skipped["prompt_too_long"] += 1
            continue
        pair["prompt"] = prefix + pair["prompt"]
        rows.append(pair)
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
