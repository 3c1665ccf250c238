"""A lane's slots (llm/pool.py): at most ``limit`` attempts hold one, waiters served by rank.

First come first served let a retry (the record a stage's end waits on) queue behind every fresh request
asked before it, and a step that unlocks more work (a LaMini list, an Evol-Instruct evolution) behind
the responses asked before it: the stage then ended waiting on records that had been ready long before.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools


class Gate:
    """A lane's slots: at most ``limit`` attempts hold one at a time. Waiters are served by rank, not first
    come first served: an attempt that retries a failure before a first attempt (a record deep in a retry
    chain is what the end of a stage waits for), then the request's ``priority`` (a step that unlocks
    more work first), then arrival order. ``limit`` may move while the lane runs (a dynamic share of the
    teacher's capacity, llm/budget.py)."""

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self.held = 0
        self.waiters: list[tuple[tuple[int, int], int, asyncio.Future]] = []
        self._waiting = 0  # waiters not cancelled
        self._seq = itertools.count()

    async def acquire(self, rank: tuple[int, int]) -> None:
        if self.held < self.limit and not self._waiting:
            self.held += 1
            return
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self.waiters, (rank, next(self._seq), fut))
        self._waiting += 1
        self._grant()  # a slot may be free (the limit grew): the best waiter takes it, maybe this one
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted, then cancelled before it ran: hand the slot on
                self.release()
            else:
                self._waiting -= 1
            raise

    def release(self) -> None:
        self.held -= 1
        self._grant()

    def set_limit(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._grant()

    def waiting(self) -> int:
        return self._waiting

    def _grant(self) -> None:
        while self.waiters and self.held < self.limit:
            _, _, fut = heapq.heappop(self.waiters)
            if fut.done():  # its task was cancelled while it waited
                continue
            self.held += 1
            self._waiting -= 1
            fut.set_result(None)
