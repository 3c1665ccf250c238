"""Sampling a fixed number of rows per group from a stream of any length, in bounded memory.

Two methods (``generation.orca.sampling``):

- ``reservoir`` (default): a bottom-k sample. Every row gets a key, a hash of the recipe seed and
  the row's content; each group keeps the ``k`` rows with the smallest keys seen so far (a
  max-heap of size ``k``). After one full pass that is a uniform random sample of the group's
  eligible rows without replacement, independent of the stream's order and of how it is sharded,
  and the same for the same seed. A row is checked for eligibility (``accept``: e.g. whether it
  fits the teacher's context, which costs a tokenizer call) only when its key would enter the
  sample, so the expensive check runs on O(k log(n/k)) rows, not on all n. Memory: k rows per group.
- ``shuffle_buffer``: rows pass through a buffer of ``buffer_size`` rows from which one is drawn
  at random (the recipe seed), as ``datasets.IterableDataset.shuffle`` does; each group takes the
  first ``k`` eligible rows that come out and the pass stops as soon as every group is full. Much
  faster on a huge collection, but only as random as the buffer is large compared with how the
  collection is ordered (Flan files are grouped by task: a small buffer yields the first tasks).
  Memory: the buffer plus k rows per group.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

Row = dict[str, Any]


@dataclass
class SampleStats:
    scanned: int = 0  # rows read from the stream
    by_group: dict[str, int] = field(default_factory=dict)  # rows seen per kept group
    other_groups: dict[str, int] = field(default_factory=dict)  # rows of groups not sampled
    filtered: int = 0  # rows the pre-filter refused (e.g. not a zero-shot template)
    checked: int = 0  # rows the eligibility check ran on
    refused: int = 0  # rows it refused (e.g. too long for the teacher's context)
    duplicates: int = 0  # rows identical (same key) to one already in the sample


def allocate(total: int, weights: dict[str, float]) -> dict[str, int]:
    """``total`` split in proportion to ``weights`` (largest remainder, ties by name)."""
    w = {k: v for k, v in weights.items() if v > 0}
    s = sum(w.values())
    if not w or total <= 0:
        return {k: 0 for k in weights}
    exact = {k: total * v / s for k, v in w.items()}
    out = {k: int(x) for k, x in exact.items()}
    left = total - sum(out.values())
    for k in sorted(w, key=lambda k: (-(exact[k] - out[k]), k))[:left]:
        out[k] += 1
    return {k: out.get(k, 0) for k in weights}


def _eligible(rows: Iterable[Row], quotas: dict[str, int], group: Callable[[Row], str],
              keep: Callable[[Row], bool], st: SampleStats) -> Iterator[tuple[int, str, Row]]:
    """(position, group, row) of the rows of a wanted group that pass ``keep``, counted in ``st``."""
    for n, row in enumerate(rows):
        st.scanned += 1
        g = group(row)
        if g not in quotas:
            st.other_groups[g] = st.other_groups.get(g, 0) + 1
            continue
        if not keep(row):
            st.filtered += 1
            continue
        st.by_group[g] = st.by_group.get(g, 0) + 1
        yield n, g, row


def bottom_k(
    rows: Iterable[Row],
    quotas: dict[str, int],
    group: Callable[[Row], str],
    key: Callable[[Row, str], int],
    keep: Callable[[Row], bool] = lambda r: True,
    accept: Callable[[Row], bool] = lambda r: True,
    stats: SampleStats | None = None,
) -> dict[str, list[tuple[int, Row]]]:
    """Per group, the ``quotas[group]`` eligible rows of smallest key, as (key, row) sorted by key.
    ``keep`` is a cheap pre-filter applied to every row; ``accept`` the costly check, applied only
    to rows that would enter the sample."""
    st = stats or SampleStats()
    heaps: dict[str, list[tuple[int, int, Row]]] = {g: [] for g in quotas}
    members: dict[str, set[int]] = {g: set() for g in quotas}
    for n, g, row in _eligible(rows, quotas, group, keep, st):
        k = quotas[g]
        if k <= 0:
            continue
        h = heaps[g]
        kk = key(row, g)
        if len(h) >= k and kk >= -h[0][0]:
            continue
        if kk in members[g]:
            st.duplicates += 1
            continue
        st.checked += 1
        if not accept(row):
            st.refused += 1
            continue
        heapq.heappush(h, (-kk, n, row))
        members[g].add(kk)
        if len(h) > k:
            out = heapq.heappop(h)
            members[g].discard(-out[0])
    return {g: sorted(((-nk, row) for nk, _, row in h), key=lambda x: x[0]) for g, h in heaps.items()}


def shuffled(rows: Iterable[Row], buffer_size: int, seed: int) -> Iterator[Row]:
    """Rows in a buffer-shuffled order (``datasets.IterableDataset.shuffle``'s method)."""
    rng = random.Random(seed)
    buf: list[Row] = []
    for row in rows:
        if len(buf) < buffer_size:
            buf.append(row)
            continue
        i = rng.randrange(buffer_size)
        out, buf[i] = buf[i], row
        yield out
    rng.shuffle(buf)
    yield from buf


def first_k(
    rows: Iterable[Row],
    quotas: dict[str, int],
    group: Callable[[Row], str],
    key: Callable[[Row, str], int],
    keep: Callable[[Row], bool] = lambda r: True,
    accept: Callable[[Row], bool] = lambda r: True,
    stats: SampleStats | None = None,
) -> dict[str, list[tuple[int, Row]]]:
    """Per group, the first ``quotas[group]`` eligible rows; stops once every group is full."""
    st = stats or SampleStats()
    out: dict[str, list[tuple[int, Row]]] = {g: [] for g in quotas}
    seen: dict[str, set[int]] = {g: set() for g in quotas}
    need = sum(max(0, q) for q in quotas.values())
    if need <= 0:
        return out
    for _, g, row in _eligible(rows, quotas, group, keep, st):
        if len(out[g]) >= quotas[g]:
            continue
        kk = key(row, g)
        if kk in seen[g]:
            st.duplicates += 1
            continue
        st.checked += 1
        if not accept(row):
            st.refused += 1
            continue
        out[g].append((kk, row))
        seen[g].add(kk)
        need -= 1
        if need <= 0:
            break
    return out
