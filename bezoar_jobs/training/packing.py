"""Batching: packed rows without cross-example attention, and token accounting.

TRL's ``packing_strategy="bfd"`` places whole examples into rows of at most ``max_length`` tokens
(best-fit decreasing) and records each example's length (``seq_lengths``). TRL's own collator then
flattens the *whole batch* into one sequence, which is ideal with FlashAttention's variable-length
kernels but makes SDPA/eager attention (CPU, GPUs without flash-attn) compute a (batch x
max_length)^2 mask. :class:`PackedRowsCollator` keeps the rows apart instead: each row's
``position_ids`` restart at 0 at every example, no attention mask is passed, and transformers
turns the restarts into a block-diagonal causal mask per row (``find_packed_sequence_indices``).
So no token attends to another example, the per-example losses equal those of unpacked batches,
and the attention cost stays batch x max_length^2.

:class:`CountingCollator` wraps any collator and counts real versus total (padded) tokens, for the
stage's ``real_token_fraction`` and tokens/s figures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class PackedRowsCollator:
    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        pos = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n] = torch.as_tensor(e["input_ids"])
            labels[i, :n] = torch.as_tensor(e.get("labels", e["input_ids"]))
            lengths = list(e.get("seq_lengths") or [n])
            if width > n:
                lengths.append(width - n)  # the padding tail is a block of its own (labels -100)
            pos[i] = torch.cat([torch.arange(k) for k in lengths])
        # the first token of an example would be predicted from the previous example's last token:
        # never a target (our prompts are masked anyway; this keeps the rule for any labels)
        labels[pos == 0] = -100
        return {"input_ids": ids, "labels": labels, "position_ids": pos}


class CountingCollator:
    """Counts real and total tokens of every batch it builds."""

    def __init__(self, inner: Callable[[list[dict[str, Any]]], dict[str, Any]]):
        self.inner = inner
        self.real_tokens = 0
        self.total_tokens = 0
        self.batches = 0

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        ids = batch["input_ids"]
        if "attention_mask" in batch:
            real = int(batch["attention_mask"].sum())
        else:
            real = sum(len(e["input_ids"]) for e in examples)
        self.real_tokens += real
        self.total_tokens += int(ids.numel())
        self.batches += 1
        return batch

    @property
    def real_fraction(self) -> float | None:
        return self.real_tokens / self.total_tokens if self.total_tokens else None
