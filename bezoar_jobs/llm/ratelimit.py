"""A token bucket for the pool's requests- and tokens-per-minute limits (:mod:`bezoar_jobs.llm.pool`)."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """``rate`` units per second, bursts up to ``capacity``. Waiters are served in order."""

    def __init__(self, rate_per_s: float, capacity: float):
        self.rate = rate_per_s
        self.capacity = max(capacity, 1.0)
        self.level = self.capacity
        self.t = time.monotonic()
        self.lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
        self.t = now

    async def take(self, amount: float) -> None:
        amount = min(amount, self.capacity)  # a request bigger than the bucket waits for a full one
        async with self.lock:
            while True:
                self._refill()
                if self.level >= amount:
                    self.level -= amount
                    return
                await asyncio.sleep((amount - self.level) / self.rate)

    def adjust(self, extra: float) -> None:
        """Charge (or refund, when negative) the difference between the estimate and the truth."""
        self._refill()
        self.level = min(self.capacity, self.level - extra)
