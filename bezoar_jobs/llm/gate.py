"""A lane's slots (llm/pool.py): at most ``limit`` attempts hold one, waiters served by rank; and how many
requests a client may have at one server while that server says it is overloaded.

First come first served let a retry (the record a stage's end waits on) queue behind every fresh request
asked before it, and a step that unlocks more work (a LaMini list, an Evol-Instruct evolution) behind
the responses asked before it: the stage then ended waiting on records that had been ready long before.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque

# a TGI "Model is overloaded" (more at once than it admits, from everyone calling it): the requests a client
# may have at that server drop to this share, at most once per OVERLOAD_EVERY_S (one burst of refusals is one
# signal), and grow back by one per limit's worth of answers and at most once per GROW_EVERY_S, up to the
# ceiling; only while OVERLOADED_SHARE of the last OVERLOAD_WINDOW outcomes there were such refusals
OVERLOAD_DECREASE = 0.5
OVERLOAD_EVERY_S = 0.1
GROW_EVERY_S = 1.0
OVERLOAD_WINDOW = 32
OVERLOADED_SHARE = 0.5


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


class Admission:
    """How many requests one client may have at one server at once, as that server's refusals say.

    ``ceiling`` is what the client may have there when nobody else crowds it (its share of TGI's admission
    limit, llm/budget.py; ``None``: unknown). A server refusing "Model is overloaded" for most of the recent
    outcomes has more callers than the budget knows (a judge pointed at the teacher's server, another run, a
    user): the limit halves, once per ``OVERLOAD_EVERY_S``, and grows back by one per limit's worth of
    answers, once per ``GROW_EVERY_S`` at most (additive increase, multiplicative decrease). A refusal now
    and then (TGI marks every 429 "overloaded"; a server that is merely unlucky) changes nothing, and neither
    does a refusal while the client holds fewer than half its limit there (a stage's last retries, refused in a
    row, are not what fills the server). The pool keeps one for its server (llm/pool.py ``_wire_gate``), a
    fleet one per replica (llm/fleet.py)."""

    def __init__(self, ceiling: int | None):
        self.ceiling = ceiling
        self.limit = ceiling  # None: unknown and never cut
        self.recent: deque[bool] = deque(maxlen=OVERLOAD_WINDOW)  # each outcome: refused as overloaded?
        self._shrunk_at = self._grown_at = -OVERLOAD_EVERY_S
        self._credit = 0

    def set_ceiling(self, ceiling: int | None) -> None:
        """A new share (others finished or started). A limit cut for overload stays cut by as much, up to the new
        share: what pods that finished no longer send is free whoever crowds the server, so a larger share comes
        at once (before, a cut limit grew back one place a second however much the others left: a pod cut to 11
        of 42 took minutes to use the 128 its stage then had alone); a smaller one caps the cut limit."""
        if ceiling == self.ceiling:
            return
        if self.limit is None or ceiling is None or self.ceiling is None or self.limit >= self.ceiling:
            self.limit = ceiling  # not cut: the new share
        elif ceiling > self.ceiling:
            self.limit = min(ceiling, self.limit + ceiling - self.ceiling)
        else:
            self.limit = min(self.limit, ceiling)
        self.ceiling = ceiling

    def overloaded(self, held: int) -> int | None:
        """An attempt refused as overloaded while ``held`` others are at the server: the new, lower limit, or
        None when it stays."""
        self.recent.append(True)
        now = time.monotonic()
        if now - self._shrunk_at < OVERLOAD_EVERY_S or sum(self.recent) < OVERLOADED_SHARE * OVERLOAD_WINDOW:
            return None
        current = self.limit if self.limit is not None else held + 1
        if 2 * (held + 1) < current:
            return None
        self._shrunk_at, self._grown_at, self._credit = now, now, 0
        if self.ceiling is None:  # unknown: what the client had there is what it grows back to
            self.ceiling = current
        limit = max(1, int(min(current, held + 1) * OVERLOAD_DECREASE))
        if self.limit is not None and limit >= self.limit:
            return None
        self.limit = limit
        return limit

    def answered(self) -> int | None:
        """An answer: the new, higher limit, or None when it stays."""
        self.recent.append(False)
        if self.limit is None or self.ceiling is None or self.limit >= self.ceiling:
            return None
        self._credit += 1
        now = time.monotonic()
        if self._credit >= self.limit and now - self._grown_at >= GROW_EVERY_S:
            self._credit, self._grown_at = 0, now
            self.limit += 1
            return self.limit
        return None

    def failed(self) -> None:
        """A failure other than overload (a 503, a timeout): it counts among the recent outcomes."""
        self.recent.append(False)
