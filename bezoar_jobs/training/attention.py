"""Per-example attention for padding-free batches, without FlashAttention.

A padding-free batch (TRL's ``packing_strategy="bfd"`` collator) is one flat sequence of whole
examples whose ``position_ids`` restart at 0 at each example; FlashAttention's variable-length
kernels attend inside each example only. Without them (CPU, GPUs without flash-attn) transformers
turns the restarts into a block-diagonal mask over the *whole* flat sequence and SDPA computes
every masked block too: for a batch of T tokens in examples of length n, the attention costs T^2
instead of T*n, which on a 1,000-token batch of 140-token examples is more than the linear layers.

:func:`segment_attention` (registered with transformers as ``"bezoar_segments"``) does what the
varlen kernels do, with plain SDPA: it cuts the sequence at the example boundaries
(``cu_seq_lens_q`` from TRL's collator, else the ``position_ids`` restarts, else a right-padded
2-D attention mask) and runs causal SDPA on each example. Since transformers builds no mask for an
attention function it does not know, the boundaries are all it uses; it refuses what it cannot
express (left padding, arbitrary 4-D masks) rather than attend across examples.

It is for training and scoring full sequences; a query shorter than its keys (generation with a
KV cache) is handed to transformers' SDPA unchanged.
"""

from __future__ import annotations

from typing import Any

NAME = "bezoar_segments"


def _row_bounds(starts: list[int], length: int) -> list[tuple[int, int]]:
    starts = sorted({s for s in starts if 0 <= s < length} | {0})
    return list(zip(starts, [*starts[1:], length], strict=True))


def segment_bounds(batch: int, length: int, attention_mask: Any, kwargs: dict[str, Any]) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each example: from cu_seq_lens, position_ids or a 2-D mask."""
    import torch

    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and batch == 1:
        return [_row_bounds([int(x) for x in cu.tolist()[:-1]], length)]
    if attention_mask is not None:
        if not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
            raise ValueError(
                f"{NAME} attention: only a 2-D padding mask is supported, got shape {tuple(attention_mask.shape)}"
            )
        out = []
        for row in attention_mask.bool():
            n = int(row.sum())
            if not bool(row[:n].all()):
                raise ValueError(f"{NAME} attention: the padding mask is not right-padded")
            out.append(_row_bounds([n], length))  # the padding tail is a block of its own
        return out
    pos = kwargs.get("position_ids")
    if pos is None:
        return [[(0, length)] for _ in range(batch)]
    if pos.shape[0] != batch:
        pos = pos.expand(batch, -1)
    return [_row_bounds((row == 0).nonzero().flatten().tolist(), length) for row in pos]


def _sdpa(q: Any, k: Any, v: Any, dropout: float, scaling: float | None, gqa: bool, prefix: int = 0) -> Any:
    """Causal SDPA of q over k/v; with ``prefix``, k/v start with that many shared prefix
    positions that every query sees (causal, aligned at the bottom right)."""
    import torch
    import torch.nn.functional as F

    if not prefix:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
    m = q.shape[2]
    mask = torch.ones(m, m + prefix, dtype=torch.bool, device=q.device).tril(diagonal=prefix)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=gqa)


def _prefix_layout_attention(
    query: Any, key: Any, value: Any, layout: Any, dropout: float, scaling: float | None, gqa: bool
) -> Any:
    """One flat row (batch 1) cut by ``layout``: rows (start, end, prefix_start, prefix_end) in
    sequence order; a segment attends to its prefix segment (if any) and causally to itself."""
    import torch

    spans = [tuple(int(x) for x in r) for r in layout.tolist()]
    sizes = [e - s for s, e, _, _ in spans]
    if sum(sizes) != query.shape[2] or any(b <= a for a, b, _, _ in spans):
        raise ValueError(f"{NAME} attention: segment_prefix layout does not cover the {query.shape[2]} positions")
    index = {s: i for i, (s, _, _, _) in enumerate(spans)}
    qs, ks, vs = (t.split(sizes, dim=2) for t in (query, key, value))
    parts = []
    for i, (_, _, ps, pe) in enumerate(spans):
        if pe > ps:
            j = index[ps]
            k = torch.cat([ks[j], ks[i]], dim=2)
            v = torch.cat([vs[j], vs[i]], dim=2)
            parts.append(_sdpa(qs[i], k, v, dropout, scaling, gqa, prefix=pe - ps))
        else:
            parts.append(_sdpa(qs[i], ks[i], vs[i], dropout, scaling, gqa))
    return torch.cat(parts, dim=2)


def segment_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """Causal SDPA inside each example; output in transformers' (batch, length, heads, dim) layout."""
    import torch

    batch, heads, length, _ = query.shape
    if key.shape[2] != length:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    gqa = key.shape[1] != heads
    layout = kwargs.get("segment_prefix")
    if layout is not None:
        if batch != 1:
            raise ValueError(f"{NAME} attention: a segment_prefix layout needs a flattened batch (batch size 1)")
        out = _prefix_layout_attention(query, key, value, layout, dropout, scaling, gqa)
        return out.transpose(1, 2).contiguous(), None
    rows = []
    for b, bounds in enumerate(segment_bounds(batch, length, attention_mask, kwargs)):
        sizes = [e - s for s, e in bounds]
        # split (not slice): its backward concatenates the pieces' gradients instead of filling a
        # full-size zero tensor per piece
        row = (query, key, value) if batch == 1 else (query[b : b + 1], key[b : b + 1], value[b : b + 1])
        qs, ks, vs = (t.split(sizes, dim=2) for t in row)
        parts = [_sdpa(q, k, v, dropout, scaling, gqa) for q, k, v in zip(qs, ks, vs, strict=True)]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if batch == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def is_padding_free(args: Any) -> bool:
    """Whether TRL's collator flattens each batch into one sequence (as SFTTrainer decides it)."""
    return bool(getattr(args, "padding_free", False)) or (
        bool(getattr(args, "packing", False)) and getattr(args, "packing_strategy", None) in ("bfd", "bfd_split")
    )


def choose(setting: str, padding_free: bool) -> str | None:
    """The ``attn_implementation`` to load the model with (None: the model's default)."""
    if setting == "auto":
        return register() if padding_free else None
    if setting == NAME:
        return register()
    return setting


def in_use(model: Any) -> str:
    """The attention a loaded model runs with, as a stage's manifest records it ("default": the model's own)."""
    return str(getattr(model.config, "_attn_implementation", None) or "default")


def keeps_examples_apart(attn_implementation: str | None) -> bool:
    """Whether attention stays inside each example of a flattened batch without a mask: ours, or any
    FlashAttention, which transformers recognises by "flash" anywhere in the name (a hub kernel such as
    ``kernels-community/flash-attn3`` too: utils/generic.py ``is_flash_attention_requested``) and runs
    varlen over the restarting position ids of one flattened row. Given padded rows instead, its path
    takes no restarts from the position ids and the examples of a row would attend to each other."""
    name = str(attn_implementation or "")
    return name == NAME or "flash" in name


def register() -> str:
    """Make ``attn_implementation="bezoar_segments"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, segment_attention)
    return NAME
