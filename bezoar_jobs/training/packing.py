"""Batching: packed rows without cross-example attention, and token accounting.

TRL's ``packing_strategy="bfd"`` places whole examples into rows of at most ``max_length`` tokens
(best-fit decreasing) and records each example's length (``seq_lengths``). TRL's own collator then
flattens the *whole batch* into one sequence with no pad token at all. That layout needs an
attention that keeps the examples apart by itself: FlashAttention's variable-length kernels, or
our per-example SDPA (attention.py, ``bezoar_segments``, the default for padding-free batches);
the stage keeps it then. With any other attention (a recipe that sets ``training.attention: sdpa``
or ``eager``), transformers would compute a (batch x max_length)^2 block-diagonal mask over the
flat sequence, so :class:`PackedRowsCollator` keeps the rows apart instead: each row's
``position_ids`` restart at 0 at every example, no attention mask is passed, and transformers
turns the restarts into a block-diagonal causal mask per row (``find_packed_sequence_indices``).
Either way no token attends to another example, and the per-example losses equal those of
unpacked batches.

:class:`CountingCollator` wraps any collator and counts real versus total (padded) tokens, for the
stage's ``real_token_fraction`` and tokens/s figures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .examples import common_prefix


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


def _first_target(labels: list[int]) -> int:
    return next((j for j, x in enumerate(labels) if x != -100), len(labels))


@dataclass
class SharedPrefixCollator:
    """One flat sequence per batch in which a prompt prefix several examples share is computed once.

    Every LaMini and Evol-Instruct example starts with the same system block (~56 tokens, a third
    of a median demo example), Orca examples with one of a few system messages. Within one
    optimizer step the weights are fixed, so that prefix has the same hidden states in every
    example: this collator places it once, followed by each example *without* it (position ids
    continuing after the prefix), and describes the layout in ``segment_prefix`` (rows of start,
    end, prefix start, prefix end) for the per-example attention (attention.py), which lets each
    example attend to its prefix and causally to itself. Losses and gradients are those of the
    examples run separately (the prefix's gradient is the sum over its examples, as it would be).

    A prefix is shared only when it is at least ``min_prefix`` tokens long and ends before the
    first scored token of every example in its group (so no target is predicted across the cut).
    Examples come from the packed rows (``seq_lengths``) or are rows themselves.
    """

    pad_token_id: int
    min_prefix: int = 8
    last_shared_tokens: int = 0

    @staticmethod
    def examples_of(rows: list[dict[str, Any]]) -> list[tuple[list[int], list[int]]]:
        out = []
        for r in rows:
            ids, labels = list(r["input_ids"]), list(r.get("labels", r["input_ids"]))
            at = 0
            for n in list(r.get("seq_lengths") or [len(ids)]):
                out.append((ids[at : at + n], labels[at : at + n]))
                at += n
        return out

    def groups(
        self, examples: list[tuple[list[int], list[int]]]
    ) -> list[tuple[int, list[tuple[list[int], list[int]]]]]:
        """(shared prefix length, members): examples sorted by their ids, grouped greedily."""
        out: list[tuple[int, list[tuple[list[int], list[int]]]]] = []
        for ex in sorted(examples, key=lambda e: e[0]):
            cap = _first_target(ex[1]) - 1  # the token after the prefix must not be a target
            if out:
                shared, members = out[-1]
                first = members[0][0]
                joined = min(shared, common_prefix(first, ex[0]), cap)
                if joined >= self.min_prefix:
                    out[-1] = (joined, [*members, ex])
                    continue
            out.append((cap, [ex]))
        return [(p if len(m) > 1 and p >= self.min_prefix else 0, m) for p, m in out]

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        layout: list[tuple[int, int, int, int]] = []
        shared_saved = 0
        for prefix, members in self.groups(self.examples_of(rows)):
            p0 = len(ids)
            if prefix:
                ids += members[0][0][:prefix]
                labels += [-100] * prefix
                pos += range(prefix)
                layout.append((p0, p0 + prefix, p0, p0))
                shared_saved += prefix * (len(members) - 1)
            for e_ids, e_labels in members:
                s = len(ids)
                ids += e_ids[prefix:]
                tail = e_labels[prefix:]
                labels += [-100, *tail[1:]] if not prefix else tail  # an example's first token is never a target
                pos += range(prefix, len(e_ids))
                layout.append((s, len(ids), p0, p0 + prefix) if prefix else (s, len(ids), s, s))
        self.last_shared_tokens = shared_saved
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([pos], dtype=torch.long),
            "segment_prefix": torch.tensor(layout, dtype=torch.long),
        }


class CountingCollator:
    """Counts, over every batch it builds: ``real_tokens``, the examples' tokens (what tokens/s
    counts); ``total_tokens``, the positions the model processed (pads included);
    ``shared_tokens``, example tokens covered by a prefix computed once (SharedPrefixCollator)."""

    def __init__(self, inner: Callable[[list[dict[str, Any]]], dict[str, Any]]):
        self.inner = inner
        self.real_tokens = 0
        self.total_tokens = 0
        self.shared_tokens = 0
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
        self.shared_tokens += int(getattr(self.inner, "last_shared_tokens", 0))
        self.batches += 1
        return batch

    @property
    def real_fraction(self) -> float | None:
        """Fraction of the processed positions that are real (non-pad) tokens."""
        return (self.real_tokens - self.shared_tokens) / self.total_tokens if self.total_tokens else None
