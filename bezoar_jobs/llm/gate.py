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
from collections.abc import Hashable

# a TGI "Model is overloaded" (more at once than it admits, from everyone calling it): the requests a client
# may have at that server drop to this share, at most once per OVERLOAD_EVERY_S (one burst of refusals is one
# signal), and grow back by one per limit's worth of answers and at most once per GROW_EVERY_S, up to the
# ceiling; only while OVERLOADED_SHARE of the last OVERLOAD_WINDOW outcomes there were such refusals
OVERLOAD_DECREASE = 0.5
OVERLOAD_EVERY_S = 0.1
GROW_EVERY_S = 1.0
OVERLOAD_WINDOW = 32
OVERLOADED_SHARE = 0.5
# refused as overloaded while most recent outcomes there were such refusals, the server is full now: the client may
# have there what it still has, and one more each FULL_HOLD_S (others' requests end and free places). Sent again at
# once, a stage's first burst bounced off a replica another client had filled ~55 times in its first 40 ms: each
# refused request's place went at once to a fresh request, refused in turn (and the limit was not cut: the client
# held few there between refusals). One refusal is not enough: a fault mix refuses one attempt in five at random,
# and held after each the pool used half its places
FULL_HOLD_S = 0.1


class Gate:
    """A lane's slots: at most ``limit`` attempts hold one at a time. Waiters are served by rank, not first
    come first served: an attempt that retries a failure before a first attempt (a record deep in a retry
    chain is what the end of a stage waits for), then the request's ``priority`` (a step that unlocks
    more work first), then arrival order. ``limit`` may move while the lane runs (a dynamic share of the
    teacher's capacity, llm/budget.py). A gate over ``places`` (the server's :class:`Admission`) has no limit of its
    own: it is theirs, which the server's refusals and answers move (:meth:`wake` after a growth), and fewer are let
    in while those refusals hold the client back (:meth:`Admission.room`)."""

    def __init__(self, limit: int | None = None, places: Admission | None = None):
        if places is None and limit is None:
            raise ValueError("a gate needs a limit or the places it keeps within")
        if places is not None and places.limit is None:
            raise ValueError("a gate over places needs their limit known")
        self._limit = max(1, limit or 1)
        self.places = places  # its limit is theirs; their refusals as overloaded hold it below that for a moment
        self.held = 0
        self.waiters: list[tuple[tuple[int, int], int, asyncio.Future]] = []
        self._waiting = 0  # waiters not cancelled
        self._seq = itertools.count()
        self._ticking = False

    async def acquire(self, rank: tuple[int, int]) -> None:
        if self.held < self._room() and not self._waiting:
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

    @property
    def limit(self) -> int:
        """The most holders: its own, or (over ``places``) the places' limit, which their refusals and answers move
        (call :meth:`wake` after)."""
        if self.places is not None:
            assert self.places.limit is not None
            return max(1, self.places.limit)
        return self._limit

    def set_limit(self, limit: int) -> None:
        if self.places is not None:
            raise ValueError("a gate over places takes their limit")
        self._limit = max(1, limit)
        self._grant()

    def wake(self) -> None:
        """The places' limit moved: waiters take what room there is now."""
        self._grant()

    def refused(self) -> None:
        """The server refused as full (``places`` took it): while that holds the client back, waiters are let in
        as its room grows back."""
        if not self._ticking and self.places is not None and self.places.holding():
            self._ticking = True
            asyncio.get_running_loop().call_later(FULL_HOLD_S, self._tick)

    def _tick(self) -> None:
        self._ticking = False
        self._grant()
        self.refused()

    def _room(self) -> int:
        if self.places is None:
            return self._limit
        room = self.places.room()  # their limit, or less while a refusal holds the client back
        assert room is not None  # a known limit (checked when made) is never unknown again
        return room

    def waiting(self) -> int:
        return self._waiting

    def _grant(self) -> None:
        while self.waiters and self.held < self._room():
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
    and then changes nothing, and neither does a refusal while the client wants fewer than half its limit there:
    what it holds there, or the distinct requests refused there lately when more (a stage's last retries,
    refused in a row, are not what fills the server; a stage's first burst, all bouncing off a server another
    client filled, is, though it holds few there between refusals). While most recent
    outcomes are refusals each one says the server is full now: for a moment the client may have there only what
    it still has, one more each ``FULL_HOLD_S`` (:meth:`room`). A refusal of the place the limit last grew by
    takes that place back at once. The pool keeps one for its server (llm/pool.py ``_wire_gate``), a fleet one
    per replica (llm/fleet.py)."""

    def __init__(self, ceiling: int | None):
        self.ceiling = ceiling
        self.limit = ceiling  # None: unknown and never cut
        # each outcome: None, or the request refused as overloaded (the distinct ones: what the client wants there)
        self.recent: deque[Hashable | None] = deque(maxlen=OVERLOAD_WINDOW)
        self._shrunk_at = self._grown_at = -OVERLOAD_EVERY_S
        self._credit = 0
        self._full: tuple[int, float] | None = None  # the last refusal: what the client still had there, and when
        self._probe: float | None = None  # when the limit last grew by one

    def room(self) -> int | None:
        """The requests the client may have at the server now: its limit, or less for a moment after a refusal
        as overloaded (what it still had there, one more each FULL_HOLD_S); None: no limit known."""
        if self._full is not None:
            had, at = self._full
            grown = had + int((time.monotonic() - at) / FULL_HOLD_S)
            if self.limit is not None and grown < self.limit:
                return grown
            self._full = None
        return self.limit

    def holding(self) -> bool:
        """Whether a refusal holds the client below its limit now."""
        return self.room() != self.limit

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

    def overloaded(self, held: int, who: Hashable | None = None) -> int | None:
        """An attempt (of request ``who``; None: unknown, taken as a request of its own) refused as overloaded
        while ``held`` others are at the server: the new, lower limit, or None when it stays (or only the place it
        last grew by went back)."""
        self.recent.append(object() if who is None else who)
        now = time.monotonic()
        refused = [k for k in self.recent if k is not None]
        if self._probe is not None and now - self._probe < GROW_EVERY_S and self.limit is not None \
                and held + 1 >= self.limit:
            # refused while it used the place it last grew by: the server had no room for it, so that place goes
            # again at once (waiting for most outcomes to be refusals, each such probe cost ~15 of them)
            self._probe = None
            self._grown_at, self._credit = now, 0
            self.limit -= 1  # not news (None): a gate over these places sees it in room()
            return None
        if len(refused) < OVERLOADED_SHARE * OVERLOAD_WINDOW:
            return None
        self._full = (held, now)
        if now - self._shrunk_at < OVERLOAD_EVERY_S:
            return None
        # what it wants there: what it holds, or the requests refused there when more (all of a burst bounced)
        wanted = max(held, len(set(refused)) - 1)
        current = self.limit if self.limit is not None else wanted + 1
        if 2 * (wanted + 1) < current:
            return None
        self._shrunk_at, self._grown_at, self._credit = now, now, 0
        if self.ceiling is None:  # unknown: what the client had there is what it grows back to
            self.ceiling = current
        limit = max(1, int(min(current, wanted + 1) * OVERLOAD_DECREASE))
        if self.limit is not None and limit >= self.limit:
            return None
        self.limit = limit
        return limit

    def answered(self) -> int | None:
        """An answer: the new, higher limit, or None when it stays."""
        self.recent.append(None)
        if self.limit is None or self.ceiling is None or self.limit >= self.ceiling:
            return None
        self._credit += 1
        now = time.monotonic()
        if self._credit >= self.limit and now - self._grown_at >= GROW_EVERY_S:
            self._credit, self._grown_at, self._probe = 0, now, now
            self.limit += 1
            return self.limit
        return None

    def failed(self) -> None:
        """A failure other than overload (a 503, a timeout): it counts among the recent outcomes."""
        self.recent.append(None)
