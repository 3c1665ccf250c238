"""The engine every remote client shares: a continuous pool of requests in flight.

A :class:`PoolLane` runs an event loop in a worker thread for one client within a
:class:`~bezoar_jobs.llm.flow.Flow`. Requests arrive while it runs (a record's next step is asked as
soon as its answer is in); at most ``max_concurrency`` are in flight at any moment and a new one
starts as soon as one finishes (a :class:`Gate` around each attempt, not batch-and-wait), so one long
answer never holds up the others and the server's decoding slots stay busy. Waiting requests get a
slot by rank, not in arrival order: a retry first (the record a stage's end waits on), then the
request's ``priority`` (a step that unlocks more work), then arrival. With a teacher shared by several
pods the limit grows as the others finish (llm/budget.py). Around every attempt:

* rate limits: token buckets for ``requests_per_minute`` and ``tokens_per_minute`` (a request is
  charged ``len(prompt)/4 + max_new_tokens`` up front, corrected by the server's usage afterwards);
* retries: 429, 5xx, timeouts, connection errors and malformed bodies are retried up to
  ``max_retries`` times after ``uniform(0, min(backoff_max_s, backoff_base_s * 2**k))`` seconds
  ("full jitter"; k counts the request's failures, but stays 0 for a 429/503 while fewer than half of the
  recent attempts were refused: one request's bad luck on a server that answers most, not a load to back
  off from); a ``Retry-After`` from the server is honoured for that request (that long, plus up
  to a tenth as jitter; in a fleet, for that replica: another takes the request at once). It pauses
  every other new attempt too only when the server is saturated: three quarters of the last 32
  attempts were refused with 429/503 (one refusal among many answers is that request's bad luck, and
  pausing the whole pool for it would idle the server). A request waiting to retry holds no slot;
* deadlines from the latency distribution of the request's class (its ``max_new_tokens``; all answers until
  the class has its own ``DEADLINE_MIN_SAMPLES``): an attempt still unanswered ``DEADLINE_P99_FACTOR`` x the
  running p99 latency after it (or its newest duplicate, below) was sent, and before ``timeout_s``, is
  abandoned and sent again at once, with the same seed, so the answer is the one the first attempt would have
  given; each abandon of a request doubles its next deadline (a request slow by nature still ends), and at
  most ``ABANDON_FRACTION`` of the attempts (plus a few) are abandoned, so a server that is merely slow is not
  asked twice for everything. Before that, an attempt past the p99 is *overdue*: it gives its slot to the next
  request while it waits (at most ``max_concurrency`` overdue at once, so the server never sees more than
  twice the budget); past ``HEDGE_P99_FACTOR`` x p99, and at least ``OVERDUE_MIN_S``
  (``IDLE_HEDGE_P99_FACTOR`` and ``IDLE_HEDGE_MIN_S`` when no request waits for a slot: at a flow's end a
  duplicate displaces nothing, and on a fast server the 0.5 s floor was most of a stage's idle end) a
  duplicate with the same seed races it, and another one hedge interval later if neither has answered (a
  duplicate can hang too; ``MAX_RACERS`` race at once, the oldest making room once past the deadline's base,
  ``MAX_SENDS`` in all). The budget is the load duplicates add: those that proved unneeded (an attempt sent
  before them answered first) plus those still racing stay within ``HEDGE_FRACTION`` of the attempts, all of
  them within ``HEDGE_CAP_FRACTION``; the duplicate of a hung request, the one that answers, costs nothing
  extra, so a server where 5% of requests hang gets every one hedged. A racer that fails while others race is
  dropped and the next duplicate goes once its wait is over (its Retry-After, else a short jitter): a refused
  duplicate does not give up an original that may still be decoding a long answer. A hung request idles no
  slot for long, instead of holding it for the whole ``timeout_s``;
* places at the server (``_wire_gate``): overdue attempts and duplicates included, at most the client's
  share of a TGI server's admission limit where the budget knows it (TGI refuses past it at once, "Model
  is overloaded"), else twice the slots; a duplicate takes the next free place before any fresh request,
  and when hung attempts hold them all the late racer gives up its own. Refused as "overloaded" anyway for
  most recent attempts (clients the budget does not know of), the places halve and grow back slowly
  (``_outcome``, llm/gate.py ``Admission``; in a fleet each replica's, llm/fleet.py), and such refusals do
  not use up the request's ``max_retries`` (``OVERLOADED_FREE`` first);
* errors that a retry cannot cure: 401/403/404 mean every request would fail, so the whole run
  stops with ``BadInput``; 400/413/422 fail that one request (``GenResult.error``), unless the
  first several requests are all refused, which again means a configuration problem (``BadInput``);
* exhausted retries: the request gets ``GenResult.error``, except connection failures (the server is
  unreachable: ``RetryableError`` for the run, since no request can succeed);
* spending cap: with prices and ``spend_cap_usd``, a request starts only while the money spent plus
  the worst-case cost of everything in flight stays under the cap; when nothing more fits, no new
  request starts, the ones in flight finish and are delivered, then ``RetryableError`` is raised;
* draining: an ``on_result`` that raises :class:`~bezoar_jobs.llm.base.StopRequests` (the run store
  stopped taking records) works the same way: no new request or retry starts, the answers in flight
  are still delivered (they are paid for, and kept), then its error is raised.

Threads: results go to the flow's queue; ``on_result`` is called in the flow's thread, one result at a
time, and the event loop never waits for it, so a slow ``on_result`` (writing a part file to S3) does
not idle the pool. Every answered attempt's (start, end) is kept (:meth:`RemoteClient.busy_intervals`)
for the utilization the client saw.

(This module runs over 500 lines: the lane is one state machine, slots, retries, deadlines and the spending cap acting
on the same counters; split up, that state would be scattered over modules.)
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import os
import queue
import random
import threading
import time
from abc import abstractmethod
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import BadInput, RetryableError
from ..recipe import Endpoint
from ..redact import redact, redact_known
from .base import TAIL_COUNTS, GenRequest, GenResult, LLMClient, UsageTotals
from .faults import Rejected, Transient
from .faults import classify_status as classify_status  # re-exported: the backends' one import
from .faults import parse_retry_after as parse_retry_after
from .fleet import REPLICA, Fleet
from .gate import Admission, Gate
from .ratelimit import TokenBucket
from .render import estimate_tokens

if TYPE_CHECKING:
    from .budget import Board, Budget
    from .flow import Flow

log = logging.getLogger("bezoar.llm")

# after this many refused (4xx) requests without a single success, the run stops as bad input
REFUSED_BEFORE_ANY_SUCCESS = 8
# deadlines from the observed latencies (see the module docstring)
DEADLINE_MIN_SAMPLES = 50
SETTLED_P99_FACTOR = 3.0  # duplicates and abandons wait until a class has been asked for this x its p99
DEADLINE_P99_FACTOR = 3.0
DEADLINE_MIN_S = 1.0
OVERDUE_P99_FACTOR = 1.0
OVERDUE_MIN_S = 0.5
WATCH_S = 0.25
ABANDON_FRACTION = 0.1
HEDGE_P99_FACTOR = 1.2
IDLE_HEDGE_P99_FACTOR = 0.5  # when no request waits for a slot (a duplicate then displaces nothing)
IDLE_HEDGE_MIN_S = 0.1  # the floor then (a short answer's p99 is milliseconds on a fast server)
HEDGE_FRACTION = 0.05  # of the attempts, at most this many duplicates unneeded or still racing
HEDGE_CAP_FRACTION = 0.25  # and at most this many duplicates in all
MAX_RACERS = 3  # racing at once (a new duplicate past that drops the oldest, presumed hung)
MAX_SENDS = 5  # sends per attempt not refused: the first and up to four duplicates
# a racer the client gives up (cancels) is counted against the server's admission limit this long after:
# the server frees its slot once it has seen the disconnect, not the moment the client closes
CANCEL_GRACE_S = 0.1
OVERLOADED_FREE = 16  # refusals as overloaded a request may meet before they count against its max_retries
ABANDON_SLACK = 4
LATENCY_WINDOW = 2000
# the pool pauses for a Retry-After only when at least this share of the last SATURATION_WINDOW
# attempts were refused (429/503)
SATURATION_WINDOW = 32
SATURATION_SHARE = 0.75
# a refused request's backoff doubles only while at least this share of the last SATURATION_WINDOW attempts
# were refused
LOADED_SHARE = 0.5
HEDGE_RANK = (0, 0)  # a duplicate's place at the server comes before a retry's and a fresh request's


class RemoteClient(LLMClient):
    """A client that talks HTTP to a server; subclasses implement one request (``_send``), to the
    replica in :data:`~bezoar_jobs.llm.fleet.REPLICA` when the client has a fleet (``fleet_capable``)."""

    backend = "remote"
    fleet_capable = False

    def __init__(self, endpoint: Endpoint, api_key: str | None = None, role: str = "endpoint"):
        if endpoint.spend_cap_usd is not None and (
            endpoint.price_input_per_mtok is None or endpoint.price_output_per_mtok is None
        ):
            raise BadInput(f"{role}.spend_cap_usd needs {role}.price_input_per_mtok and {role}.price_output_per_mtok")
        self.endpoint = endpoint
        self.model_id = endpoint.model
        self.role = role
        for name in ("httpx", "httpx2"):
            # the SDKs' HTTP library logs every request at INFO: thousands of lines per stage.
            # Quiet it unless someone configured that logger on purpose
            lg = logging.getLogger(name)
            if lg.level == logging.NOTSET:
                lg.setLevel(logging.WARNING)
        self.usage = UsageTotals()
        self._api_key = api_key
        self.spent_usd = 0.0  # paid by this client (all runs)
        self.prior_spent_usd = 0.0  # paid before this process (CachedClient sets it from its cache)
        self.intervals: list[tuple[float, float]] = []  # answered attempts (monotonic start, end)
        # what the pools did for this client's requests, over its life: attempts sent, retries after a
        # failure, hedges (a duplicate raced a late attempt), abandons (an attempt cut at its deadline)
        self.tails: Counter[str] = Counter()
        # a teacher shared by several pods: this pod's share grows as the others finish (llm/budget.py;
        # stages/common.open_client sets it); endpoint.max_concurrency is the even share it starts from
        self.board: Board | None = None
        self.budget: Budget | None = None  # the even share's inputs (make_client)
        # a teacher served by several replicas: each request goes to one of them (llm/fleet.py; make_client
        # gives it, once the budget is known)
        self.fleet: Fleet | None = None
        self.key_hint = (
            f"the key in ${endpoint.api_key_env}" if endpoint.api_key_env
            else f"the key in {endpoint.api_key_file}" if endpoint.api_key_file
            else f"{role}.api_key_env / {role}.api_key_file (no key is configured)"
        )

    def use_fleet(self, fleet: Fleet | None) -> None:
        """Send each request to one of ``fleet``'s replicas (a backend that can: ``fleet_capable``), each within
        its share of its own admission limit (TGI ``/info``, divided among the pods calling the teacher)."""
        if fleet is None or not self.fleet_capable:
            return
        self.fleet = fleet
        # each replica's own limit (a view's are its owner's: Fleet.view): a TGI teacher's, or those of the teacher's
        # replicas for a judge on its server that has a share of it (llm/budget.py plan); a replica is keyed by its
        # root URL, where TGI answers /info whatever path the client sends at
        if not fleet.borrowed and (self.endpoint.backend == "tgi" or self.budget is not None):
            from .budget import PARTIES_ENV, tgi_info_capacity

            parties = int(os.environ.get(PARTIES_ENV) or 1)
            known = self.budget.replicas if self.budget is not None else {}  # what the budget asked already
            fleet.set_limits({u: known[u] if u in known else tgi_info_capacity(u, self._api_key)
                              for u in fleet.replicas}, parties)
        log.info("%s: a fleet of %d replica(s): %s", self.role, len(fleet.replicas), ", ".join(fleet.urls()))

    def fleet_of_one(self) -> Fleet | None:
        """The books of this client's server for another client of it in this process (a judge on the teacher's
        server beside the teacher: an Evol-Instruct stage's equality checks): its fleet, or, a single TGI server
        whose limit the budget knows, a fleet of one replica made now, so both count against one limit there (the
        pod's share; llm/fleet.py ``Fleet.view``). Each with places of its own, the judge's requests came on top of
        the teacher's share, and the server refused the excess as overloaded. Called before the client's pool
        starts (its pool decides at start where its places are kept). None: no books to share."""
        b, url = self.budget, (self.endpoint.base_url or "").rstrip("/")
        if self.fleet is not None or not self.fleet_capable or self.endpoint.backend != "tgi" or not url \
                or b is None or not b.capacity:
            return self.fleet
        fleet = Fleet([url])
        fleet.set_limits({url: b.capacity}, b.parties)
        self.fleet = fleet
        log.info("%s: shares its places at %s with a judge on the same server", self.role, url)
        return fleet

    def __repr__(self) -> str:  # never shows the key
        return f"{type(self).__name__}(model={self.model_id!r}, base_url={redact(self.endpoint.base_url)!r})"

    @property
    def where(self) -> str:
        url = redact(self.endpoint.base_url) if self.endpoint.base_url else "default URL"
        return f"{self.role} ({self.backend} {url}, model {self.model_id})"

    @property
    def cache_identity(self) -> dict[str, Any]:
        """What, besides the request, decides the answer: part of CachedClient's key."""
        e = self.endpoint
        # the endpoint too: two servers under one model name (a misconfigured proxy, a fixed base_url)
        # do not give the same answers
        return {"backend": self.backend, "base_url": e.base_url, "model": e.model, "revision": e.revision,
                "prompt_format": e.prompt_format, "system_prompt_supported": e.system_prompt_supported}

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return self.endpoint.cost(prompt_tokens, completion_tokens)

    # -- what a backend implements (all called on the pool's event loop) --------------------
    @abstractmethod
    def prompt_text(self, req: GenRequest) -> str:
        """The text sent as prompt (for token estimates)."""

    async def _open(self) -> None:
        """Create the SDK client: it binds to the running event loop."""

    async def _close(self) -> None:
        """Close what ``_open`` created: by default the SDK client kept in ``self._client``."""
        client = getattr(self, "_client", None)
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
            self._client = None

    @abstractmethod
    async def _send(self, req: GenRequest) -> GenResult:
        """One attempt. Raise Transient, Rejected or BadInput; return the result otherwise."""

    # -- the interface -----------------------------------------------------------------------
    def run(
        self, requests: Sequence[GenRequest], on_result: Callable[[GenResult], None], desc: str = "generate"
    ) -> None:
        from .flow import run_requests

        run_requests(self, requests, on_result, desc)

    def enqueue(self, flow: Flow, req: GenRequest, on_result: Callable[[GenResult], None]) -> None:
        flow.lane(self, lambda out, desc: PoolLane(self, out, desc)).submit(req, on_result)

    def busy_intervals(self) -> list[tuple[float, float]]:
        return self.intervals

    def slot_capacity(self) -> int | None:
        """The slots utilization is counted against: the endpoint's limit (with a share that grows as other
        pods finish, the even share it starts from: a pod that took more counts as fully busy)."""
        return self.endpoint.max_concurrency

    def max_slots(self) -> int:
        """The most requests this client may ever keep in flight (its share once every other pod is done)."""
        return self.board.ceiling if self.board is not None else self.endpoint.max_concurrency

    def close(self) -> None:
        if self.board is not None:  # nothing more goes to the teacher from here: the others may take the share
            self.board.done()

    def tail_counts(self) -> dict[str, int]:
        return {k: int(self.tails.get(k, 0)) for k in TAIL_COUNTS}


def _sick(e: Transient) -> bool:
    """Whether a failure says the replica is dead or sick (a busy one says 429)."""
    return e.kind in ("connection", "timeout", "deadline") or (e.status or 0) >= 500


class _Stopped(Exception):
    """The lane stopped while a request waited for its slot: it is not sent."""


@dataclass
class Msg:
    """What a lane tells its flow: a ``result`` (with the callback to hand it to), a ``retry``, or that
    the lane is ``done`` (with the error that stopped it, if any)."""

    kind: str  # result | retry | done
    lane: PoolLane
    result: GenResult | None = None
    callback: Callable[[GenResult], None] | None = None
    error: BaseException | None = None


class PoolLane:
    """One client's pool within a flow: its own event loop thread, requests fed while it runs."""

    def __init__(self, client: RemoteClient, out: queue.Queue[Msg], desc: str):
        self.client = client
        self.ep = client.endpoint
        self.out = out
        self.desc = desc
        self.loop: asyncio.AbstractEventLoop | None = None
        self.wire: Gate | None = None  # places at the server, duplicates included (_wire_gate)
        self.places = Admission(None)  # how many places, as the server's "overloaded" refusals say (_wire_gate)
        self.error: BaseException | None = None  # the first run-stopping error
        self.halted = False
        self.capped = False
        self.draining = False  # no new attempt, deliver what is in flight
        self.closed = False  # no more requests will come
        # requests not started yet, highest priority first, then in the order asked
        self.feed: list[tuple[int, int, GenRequest, Callable[[GenResult], None]]] = []
        self._fed = itertools.count()
        self.unsent = 0
        self.successes = 0
        self.refused_streak = 0
        self.pause_until = 0.0
        self.reserved = 0.0
        self.active = 0  # attempts in flight (read by the flow's progress line)
        self.attempts = 0
        self.abandoned = 0
        self.overdue = 0  # attempts past the p99 that gave their slot away
        self.hedged = 0  # duplicates sent
        # duplicates that turned out not to be needed (an attempt sent before them answered first), and those
        # still racing (not known yet): together they are the extra load the hedge budget bounds
        self.hedge_wasted = 0
        self.hedges_open = 0
        # answered attempts' latencies per class of request (its max_new_tokens: an 8-token check is not
        # late when a 512-token answer would be) and over all of them (until a class has its own)
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.class_latencies: dict[int, deque[float]] = {}
        self._answered: Counter[int | None] = Counter()  # answers seen per class (None: all)
        self._p99: dict[int | None, tuple[float, int]] = {}  # class -> (p99, answers seen when computed)
        self._class_since: dict[int | None, float] = {}  # class -> when its first attempt was sent
        self.recent_refusals: deque[bool] = deque(maxlen=SATURATION_WINDOW)
        self.tasks: set[asyncio.Task] = set()
        self.ended = False
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._thread_main, name=f"bezoar-llm-{desc}", daemon=True)
        self.thread.start()
        self._ready.wait(30)

    # ---------------------------------------------------------------- the flow's thread
    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing left to do
                loop.call_soon_threadsafe(fn, *args)

    def submit(self, req: GenRequest, on_result: Callable[[GenResult], None]) -> None:
        self._call(self._push, req, on_result)

    def close(self) -> None:
        self._call(self._close)

    def drain(self) -> None:
        self._call(self._drain)

    def halt(self) -> None:
        self._call(self._halt, None)

    def join(self) -> None:
        self.thread.join()

    # ---------------------------------------------------------------- the event loop's thread
    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
            self.out.put(Msg("done", self, error=self.error))
        except BaseException as e:  # an unexpected error: hand it to the flow as is
            self.out.put(Msg("done", self, error=self.error or e))
        finally:
            self._ready.set()

    def _push(self, req: GenRequest, on_result: Callable[[GenResult], None]) -> None:
        heapq.heappush(self.feed, (-req.priority, next(self._fed), req, on_result))
        self.wake.set()

    def _close(self) -> None:
        self.closed = True
        self.wake.set()

    def _stopped(self) -> bool:
        return self.halted or self.capped or self.draining

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        n = self.client.max_slots()
        self.inflight = Gate(self.ep.max_concurrency)
        self.wire = self._wire_gate()
        # live tasks (in flight, waiting for a slot, or sleeping before a retry): bounded so a
        # million requests do not become a million coroutines, loose enough that requests in
        # backoff never starve the in-flight slots
        live = asyncio.Semaphore(4 * n)
        self.wake = asyncio.Event()
        self.budget_changed = asyncio.Event()
        self.rpm = (TokenBucket(self.ep.requests_per_minute / 60, self.ep.requests_per_minute / 60)
                    if self.ep.requests_per_minute else None)
        self.tpm = (TokenBucket(self.ep.tokens_per_minute / 60, self.ep.tokens_per_minute / 60)
                    if self.ep.tokens_per_minute else None)
        self._ready.set()
        await self.client._open()
        board = asyncio.create_task(self._follow_board()) if self.client.board is not None else None
        try:
            while True:
                if not self.feed:
                    if self.closed or self._stopped():
                        break
                    self.wake.clear()
                    await self.wake.wait()
                    continue
                await live.acquire()
                if self._stopped():
                    live.release()
                    break
                _, _, req, cb = heapq.heappop(self.feed)
                task = asyncio.create_task(self._one(req, cb))
                self.tasks.add(task)

                def done(t: asyncio.Task) -> None:
                    self.tasks.discard(t)
                    live.release()
                    if not t.cancelled() and t.exception() is not None:  # a bug, not a server failure
                        self._halt(t.exception())

                task.add_done_callback(done)
            self.unsent += len(self.feed)
            self.feed.clear()
            while self.tasks:
                await asyncio.wait(set(self.tasks))
        finally:
            if board is not None:
                board.cancel()
                await asyncio.gather(board, return_exceptions=True)
            for t in list(self.tasks):
                t.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            await self.client._close()
        if self.capped and self.error is None:
            e = self.ep
            self.error = RetryableError(
                f"{self.client.where}: spending cap reached "
                f"(${self.client.prior_spent_usd + self.client.spent_usd:.4f} "
                f"spent of spend_cap_usd ${e.spend_cap_usd}); {self.unsent} requests were not sent"
            )

    def _wire_gate(self) -> Gate | None:
        """The places this client may take at the server at once, duplicates and overdue attempts included.
        At a TGI server whose admission limit the budget knows (``/info`` max_concurrent_requests, or the
        configured capacity) its share of that limit: TGI refuses a request past it at once ("Model is
        overloaded"), and an overdue attempt that gave its slot away, or a duplicate racing it, still counts
        there. Elsewhere twice the slots (the most overdue attempts may add). Fewer while the server says it
        is overloaded (:meth:`_outcome`). None for a fleet: llm/fleet.py keeps each replica within its own
        limit."""
        if self.client.fleet is not None:
            return None
        b = self.client.budget
        self.places = Admission(self._wire_ceiling(b.parties if b is not None else 1))
        return Gate(places=self.places)

    def _wire_ceiling(self, parties: int) -> int:
        """The most places: the share of a known TGI admission limit among ``parties`` pods, else twice the
        slots."""
        b = self.client.budget
        if b is not None and b.capacity and self.ep.backend == "tgi":
            return b.capacity // max(1, parties)
        return 2 * self.client.max_slots()

    def _set_ceiling(self, parties: int) -> None:
        """A new share of the server (others finished): places cut for overload stay cut, up to it."""
        if self.wire is not None:
            self.places.set_ceiling(self._wire_ceiling(parties))
            self.wire.wake()

    def _outcome(self, error: Transient | None) -> None:
        """An attempt's outcome at the server, for its places (llm/gate.py :class:`Admission`): refused as
        overloaded, more clients than the budget knows call it (a judge on the teacher's server, another run, a
        user), and fewer places while most recent attempts are refused so; an answer, and they grow back. None
        for a fleet: each replica has its own (llm/fleet.py)."""
        wire = self.wire
        if wire is None:
            return
        if error is None:
            if self.places.answered() is not None:
                wire.wake()
        elif error.kind != "overloaded":  # refused as overloaded: taken as the attempt left (_overloaded)
            self.places.failed()

    def _overloaded(self, held: int, who: str) -> None:
        """An attempt of request ``who`` refused as overloaded while ``held`` others of this client are at the
        server."""
        wire = self.wire
        assert wire is not None
        cut = self.places.overloaded(held, who)
        wire.refused()
        if cut is not None:
            log.info("%s: the server says it is overloaded: at most %d request(s) at it at once for now",
                     self.desc, cut)  # a cut admits no one: the gate reads it from the places

    async def _follow_board(self) -> None:
        """The share of a teacher several pods call: more slots as the others finish (llm/budget.py)."""
        from .budget import POLL_S

        board = self.client.board
        assert board is not None
        fleet = self.client.fleet
        seen = board.parties
        while True:
            left = await asyncio.to_thread(board.left)
            limit = board.share(left)
            if limit != self.inflight.limit:
                log.info("%s: teacher share now %d request(s) in flight", self.desc, limit)
                self.inflight.set_limit(limit)
            self._set_ceiling(left)
            if fleet is not None and fleet.capacities and left != seen:  # each replica's share too
                fleet.set_limits(fleet.capacities, left)
            seen = left
            await asyncio.sleep(POLL_S)

    def _halt(self, error: BaseException | None) -> None:
        """Stop the run: remember the first error, cancel every live request but the caller."""
        if error is not None and self.error is None:
            self.error = error
        self.halted = True
        self.wake.set()
        me = asyncio.current_task()
        for t in list(self.tasks):
            if t is not me:
                t.cancel()

    def _drain(self) -> None:
        """No new request or retry from now on; those in flight finish and are delivered."""
        self.draining = True
        self.wake.set()
        self.budget_changed.set()

    def _deliver(self, res: GenResult, cb: Callable[[GenResult], None]) -> None:
        if res.text:  # a server that echoes the request into its answer must not put a key into our data
            res.text = redact_known(res.text)
        self.out.put(Msg("result", self, res, cb))

    async def _reserve(self, amount: float) -> bool:
        """Hold ``amount`` dollars of the cap for a request about to start; False: cap reached."""
        cap = self.ep.spend_cap_usd
        if cap is None:
            return True
        while True:
            if self._stopped():
                return False
            spent = self.client.prior_spent_usd + self.client.spent_usd
            if spent + self.reserved + amount <= cap:
                self.reserved += amount
                return True
            if self.reserved <= 1e-12:  # nothing in flight will free money: we are done
                self.capped = True
                self.budget_changed.set()
                self.wake.set()
                return False
            self.budget_changed.clear()
            await self.budget_changed.wait()

    def _settle(self, reserved: float, actual: float) -> None:
        """A request that held ``reserved`` of the cap ended, costing ``actual``."""
        self.client.spent_usd += actual
        if self.ep.spend_cap_usd is not None:
            self.reserved -= reserved
            self.budget_changed.set()

    def observe(self, req: GenRequest, latency: float) -> None:
        self.latencies.append(latency)
        cls = self.class_latencies.get(req.max_new_tokens)
        if cls is None:
            cls = self.class_latencies[req.max_new_tokens] = deque(maxlen=LATENCY_WINDOW)
        cls.append(latency)
        self._answered[None] += 1
        self._answered[req.max_new_tokens] += 1

    def p99(self, req: GenRequest | None = None, settled: bool = False) -> float | None:
        """The running p99 of answered attempts' latencies: of ``req``'s class (its ``max_new_tokens``) once
        that class has ``DEADLINE_MIN_SAMPLES`` answers, else of every answer (None until that many).

        ``settled``: None also until the class has been asked for ``SETTLED_P99_FACTOR`` x that p99. The first
        answers of a stage are its short ones (a long answer sent at the start is still decoding), so early on
        the p99 is too low, and duplicates sent on it would race long answers that are merely long."""
        key: int | None = None
        window = self.latencies
        if req is not None:
            cls = self.class_latencies.get(req.max_new_tokens)
            if cls is not None and len(cls) >= DEADLINE_MIN_SAMPLES:
                key, window = req.max_new_tokens, cls
        n = len(window)
        if n < DEADLINE_MIN_SAMPLES:
            return None
        seen = self._answered[key]
        cached = self._p99.get(key)
        if cached is None or seen - cached[1] >= 20:
            ordered = sorted(window)
            cached = self._p99[key] = (ordered[min(n - 1, int(0.99 * n))], seen)
        if settled and time.monotonic() - self._class_since.get(key, 0.0) < SETTLED_P99_FACTOR * cached[0]:
            return None
        return cached[0]

    async def _attempt(self, req: GenRequest, abandoned: int, again: bool,
                       avoid: dict[str, float] | None = None) -> tuple[GenResult, float, float]:
        """One attempt in a slot: the answer and when it was sent and answered. Past the running p99
        (``OVERDUE_P99_FACTOR``) an attempt is *overdue*: it gives its slot to the next request (at most
        ``max_concurrency`` overdue at once) and keeps waiting; past ``HEDGE_P99_FACTOR`` x p99 a
        duplicate (same seed: the same answer; another replica in a fleet) races it while the hedge
        budget lasts, the first answer wins; past the deadline both are abandoned
        (``Transient(kind="deadline")``) while the abandon budget lasts, else they wait out ``timeout_s``."""
        ep = self.ep
        await self.inflight.acquire((0 if again else 1, -req.priority))
        if self.halted or self.draining:
            self.inflight.release()
            raise _Stopped
        held = True
        self.active += 1
        self.attempts += 1
        self.client.tails["attempts"] += 1
        t0 = time.monotonic()
        self._class_since.setdefault(req.max_new_tokens, t0)
        self._class_since.setdefault(None, t0)
        fleet = self.client.fleet
        assert self.loop is not None
        racers: dict[asyncio.Future, tuple[str | None, float]] = {}  # the request, its hedges: -> replica, sent
        last_sent = t0
        n_sent = 0  # racers sent and not refused
        n_failed = 0  # racers that failed while others raced
        hedge_due: float | None = None  # set when a racer failed while others race: the next duplicate's time

        async def send(rank: tuple[int, int], wired: bool = False) -> None:
            """One racer out: a place at the server first (``wired``: taken already), then its replica."""
            nonlocal last_sent, n_sent
            if self.wire is not None and not wired:
                await self.wire.acquire(rank)
            replica = await fleet.acquire(self.loop, avoid) if fleet is not None and self.loop else None
            token = REPLICA.set(fleet.address(replica) if fleet is not None and replica is not None else None)
            f = asyncio.ensure_future(self.client._send(req))
            REPLICA.reset(token)
            f.add_done_callback(lambda t: t.cancelled() or t.exception())  # an abandoned attempt's end is not news
            last_sent = time.monotonic()
            n_sent += 1
            racers[f] = (replica, last_sent)

        def drop(f: asyncio.Future, ok: bool, sick: bool, overloaded: bool = False) -> tuple[str | None, float]:
            """Take ``f`` out of the race: its hedge count and its replica's books (``overloaded``: it was refused
            so, which may lower that replica's limit)."""
            replica, sent = racers.pop(f)
            if f is not first:
                self.hedges_open -= 1

            def leave() -> None:  # its place at the server and its replica's count
                if self.wire is not None:
                    if overloaded:  # before its place is free: the server is full, not for the next at once
                        self._overloaded(self.wire.held - 1, req.id)
                    self.wire.release()
                if fleet is not None and replica is not None:
                    fleet.done(replica, ok, sick, overloaded=overloaded, who=req.id)

            if f.done():  # answered or refused: the server is done with it
                leave()
            else:  # given up: counted there until the server can have seen the disconnect
                assert self.loop is not None
                self.loop.call_later(CANCEL_GRACE_S, leave)
            return replica, sent

        def give_up_oldest() -> None:
            """The oldest racer, presumed hung, makes room (a duplicate past MAX_RACERS, or one with no place)."""
            oldest = min(racers, key=lambda r: racers[r][1])
            drop(oldest, False, False)
            oldest.cancel()

        async def hedge(wired: bool) -> None:
            """A duplicate races the request (the oldest racer, presumed hung, making room past MAX_RACERS)."""
            nonlocal hedge_due
            if len(racers) >= MAX_RACERS:
                give_up_oldest()
            hedge_due = None
            self.hedged += 1
            self.hedges_open += 1
            self.client.tails["hedged"] += 1
            await send(HEDGE_RANK, wired)

        def next_due(factor: float, p99: float, floor: float) -> float:
            return hedge_due if hedge_due is not None else last_sent + max(floor, factor * p99)

        room: asyncio.Future | None = None  # a duplicate waiting for a place at the server (wire)
        await send((1 if again else 2, -req.priority))
        first = next(iter(racers))
        sick = False
        try:
            # the p99 moves (and is unknown for the first answers): the deadlines are looked at again
            # every WATCH_S while the attempt waits, so an attempt that hung before the p99 was known
            # is still cut once it is
            while True:
                age = time.monotonic() - t0
                if age >= ep.timeout_s:
                    raise Transient(f"no answer within timeout_s={ep.timeout_s:g}", kind="timeout")
                # an overdue attempt gives its slot away on the running p99 (that costs the server nothing); a
                # duplicate or an abandon waits for a settled one
                p99 = self.p99(req)
                if p99 is not None and held and self.overdue < ep.max_concurrency and \
                        age >= max(OVERDUE_MIN_S, OVERDUE_P99_FACTOR * p99):
                    held = False
                    self.overdue += 1
                    self.inflight.release()
                p99 = self.p99(req, settled=True)
                wake = WATCH_S
                if p99 is not None:
                    idle = not self.feed and not self.inflight.waiting()
                    factor = IDLE_HEDGE_P99_FACTOR if idle else HEDGE_P99_FACTOR
                    floor = IDLE_HEDGE_MIN_S if idle else OVERDUE_MIN_S
                    now = time.monotonic()
                    # a racer given up to make room for another duplicate is presumed hung: only once past the
                    # deadline's base when duplicates come fast (past MAX_RACERS; with no place at the server, when
                    # idle). Sent IDLE_HEDGE_MIN_S apart, the third gave up a long answer that was merely long and
                    # it was decoded again; a hedge interval apart (OVERDUE_MIN_S) they come later than that anyway
                    deadline_base = max(DEADLINE_MIN_S, DEADLINE_P99_FACTOR * p99)
                    hung_at = min((sent for _, sent in racers.values()), default=now) + deadline_base
                    no_place = self.wire is not None and self.wire.held >= self.wire.limit and bool(racers)
                    makes_room = len(racers) >= MAX_RACERS or (idle and no_place)
                    # a duplicate once the newest racer is past the hedge point: a hung original's duplicate
                    # that hangs too is followed by another, instead of both waiting for the deadline
                    if now >= next_due(factor, p99, floor) and n_sent < MAX_SENDS and room is None \
                            and (now >= hung_at or not makes_room) and self._may_hedge():
                        if self.wire is None:
                            await hedge(False)
                        else:  # it waits for a place at the server ahead of every fresh request, watched below
                            if no_place:
                                # no place for it (hung attempts can fill them all): the late racer gives up its
                                # own, which the server counts until it sees the disconnect (CANCEL_GRACE_S)
                                give_up_oldest()
                            room = asyncio.ensure_future(self.wire.acquire(HEDGE_RANK))
                    # woken when the next duplicate is due, not on the next tick (up to WATCH_S late); one that is
                    # due but held back (budget, sends, no racer presumed hung yet) is looked at again on the tick
                    due_at = next_due(factor, p99, floor)
                    if due_at > time.monotonic():
                        wake = min(wake, due_at - time.monotonic() + 0.001)
                    # each abandon of the same request doubles its deadline: a request that is slow by
                    # nature still ends (at timeout_s at the latest), a hung one is cut every time
                    # counted from the newest racer: a duplicate sent a moment ago is not cut with the hung
                    # attempt it stands in for
                    deadline = deadline_base * 2 ** abandoned
                    newest = max((sent for _, sent in racers.values()), default=t0)
                    if deadline <= time.monotonic() - newest and age < ep.timeout_s and self._may_abandon():
                        self.abandoned += 1
                        self.client.tails["abandoned"] += 1
                        raise Transient(f"no answer {age:.1f} s after it was sent ({DEADLINE_P99_FACTOR:g} x the "
                                        "p99 latency): abandoned and sent again", kind="deadline")
                waits = set(racers) | ({room} if room is not None else set())
                done, _ = await asyncio.wait(waits, timeout=min(wake, ep.timeout_s - age),
                                             return_when=asyncio.FIRST_COMPLETED)
                for f in [f for f in done if f is not room]:
                    error = f.exception()
                    failed = isinstance(error, Transient)
                    replica, sent = drop(f, error is None, failed and _sick(error),  # type: ignore[arg-type]
                                         overloaded=failed and error.kind == "overloaded")  # type: ignore[union-attr]
                    if error is None:  # its own latency (a hedge's from when the hedge was sent)
                        # the duplicates sent after the winner were not needed (those before it hung)
                        self.hedge_wasted += sum(1 for _, s in racers.values() if s > sent)
                        return f.result(), sent, time.monotonic()
                    if isinstance(error, Transient):
                        error.replica = replica
                    n_failed += 1
                    if not racers or not failed or n_failed > ep.max_retries:
                        # nothing else racing, not a server failure, or as many failed as a request may: this is
                        # the answer, retried as it says
                        raise error
                    n_sent -= 1  # a refused duplicate cost the server nothing: it does not use up the sends
                    # one racer failed (a refused duplicate, or the original while its duplicate races): the others
                    # may still answer, a long one still decoding among them, so they are not given up; the next
                    # duplicate goes once the failure's wait is over (its Retry-After, else a short jitter)
                    assert isinstance(error, Transient)
                    wait = error.retry_after if error.retry_after is not None else random.uniform(0, ep.backoff_base_s)
                    hedge_due = time.monotonic() + wait
                if room is not None and room in done:  # the duplicate has its place at the server
                    room = None
                    await hedge(True)
        except Transient as e:  # a dead or sick replica fails like this; a busy one says 429
            sick = _sick(e)
            raise
        finally:
            if room is not None:  # a duplicate that was still waiting for its place, or got it too late
                if room.done() and not room.cancelled() and room.exception() is None:
                    assert self.wire is not None
                    self.wire.release()
                else:
                    room.cancel()
            for f in list(racers):
                drop(f, False, sick)
                if not f.done():
                    f.cancel()
            self.active -= 1
            if held:
                self.inflight.release()
            else:
                self.overdue -= 1

    def _may_hedge(self) -> bool:
        """Duplicates are bounded by the load they may add: those that proved unneeded plus those still
        racing stay within ``HEDGE_FRACTION`` of the attempts (a hung request's duplicate, the one that
        answered, costs nothing extra), and all of them within ``HEDGE_CAP_FRACTION``."""
        return (self.hedge_wasted + self.hedges_open < ABANDON_SLACK + HEDGE_FRACTION * self.attempts
                and self.hedged < ABANDON_SLACK + HEDGE_CAP_FRACTION * self.attempts)

    def _may_abandon(self) -> bool:
        return self.abandoned < ABANDON_SLACK + ABANDON_FRACTION * self.attempts

    async def _one(self, req: GenRequest, cb: Callable[[GenResult], None]) -> None:
        ep, client = self.ep, self.client
        est_in = estimate_tokens(client.prompt_text(req))
        est_total = est_in + req.max_new_tokens
        worst_cost = client.cost(est_in, req.max_new_tokens)
        attempt = 0
        overloads = 0  # refusals as overloaded not counted in ``attempt`` (OVERLOADED_FREE)
        abandoned = 0  # attempts of this request cut at their deadline
        avoid: dict[str, float] = {}  # fleet replicas that said Retry-After to this request -> until when
        while True:
            while (wait := self.pause_until - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            if self.draining:
                self.unsent += 1
                return
            if self.rpm:
                await self.rpm.take(1)
            if self.tpm:
                await self.tpm.take(est_total)
            if not await self._reserve(worst_cost):
                self.unsent += 1
                return
            failure: Transient
            try:
                res, t0, t1 = await self._attempt(req, abandoned, attempt > 0 or abandoned > 0, avoid)
            except _Stopped:
                self._settle(worst_cost, 0.0)
                self.unsent += 1
                return
            except Transient as e:
                failure = e
                self._settle(worst_cost, 0.0)
                self.recent_refusals.append(e.status in (429, 503))
                self._outcome(e)
            except Rejected as e:
                self._settle(worst_cost, 0.0)
                self.refused_streak += 1
                if self.successes == 0 and self.refused_streak >= REFUSED_BEFORE_ANY_SUCCESS:
                    self._halt(BadInput(f"{client.where}: the first {self.refused_streak} requests were all refused "
                                        f"(last: {e}); check the endpoint settings and decoding parameters"))
                    return
                self._deliver(GenResult(id=req.id, text="", error=f"refused by the server: {e}", cause=e.cause,
                                        retries=attempt + overloads), cb)
                return
            except BadInput as e:
                self._settle(worst_cost, 0.0)
                self._halt(e)
                return
            except asyncio.CancelledError:
                self._settle(worst_cost, 0.0)
                raise
            else:
                actual = client.cost(res.prompt_tokens, res.completion_tokens)
                self._settle(worst_cost, actual)
                if self.tpm:
                    self.tpm.adjust(res.prompt_tokens + res.completion_tokens - est_total)
                self.successes += 1
                self.refused_streak = 0
                self.recent_refusals.append(False)
                self._outcome(None)
                self.observe(req, t1 - t0)
                client.intervals.append((t0, t1))
                res.retries = attempt + overloads
                self._deliver(res, cb)
                return
            if failure.kind == "deadline":
                # not the server's failure: sent again at once, not counted against max_retries
                abandoned += 1
                self.out.put(Msg("retry", self))
                log.debug("%s: request %s: %s", self.desc, req.id, failure.reason)
                continue
            if failure.kind == "overloaded" and overloads < OVERLOADED_FREE:
                # the server did nothing with it and says why: everyone's load, which the pool answers by sending
                # fewer (_outcome); not this request's failure, so its max_retries are kept for those
                overloads += 1
            else:
                attempt += 1
            if attempt > ep.max_retries:
                if failure.kind == "connection":
                    self._halt(
                        RetryableError(f"{client.where}: unreachable after {attempt} attempts: {failure.reason}")
                    )
                    return
                self._deliver(GenResult(id=req.id, text="", error=f"failed after {attempt} attempts: {failure.reason}",
                                        cause=failure.cause, retries=attempt - 1 + overloads), cb)
                return
            # the backoff doubles with the request's failures, except for a refusal (429/503) while most
            # attempts are answered: that is this request's bad luck, not a loaded server, and doubling its wait
            # only stretches the stage's end (TGI's 429 says no Retry-After)
            refusal = failure.status in (429, 503)
            loaded = sum(self.recent_refusals) >= LOADED_SHARE * len(self.recent_refusals)
            k = max(0, attempt + overloads - 1) if loaded or not refusal else 0
            delay = random.uniform(0.0, min(ep.backoff_max_s, ep.backoff_base_s * 2 ** k))
            if failure.retry_after is not None:
                # the server said when: then, with a little jitter (a tenth) so refused requests do not return
                # in one burst; the exponential backoff is for failures that say nothing
                delay = failure.retry_after * random.uniform(1.0, 1.1)
                fleet = client.fleet
                if fleet is not None and failure.replica is not None:
                    # a fleet: the wait is that replica's; another live one that did not ask for it takes the
                    # request now
                    now = time.monotonic()
                    avoid[failure.replica] = now + delay
                    if any(r.out_until == 0.0 and avoid.get(u, 0.0) <= now for u, r in fleet.replicas.items()):
                        delay = 0.0
                refused = sum(self.recent_refusals)
                if refused >= SATURATION_SHARE * SATURATION_WINDOW:  # the server is saturated: everyone waits
                    self.pause_until = max(self.pause_until, time.monotonic() + failure.retry_after)
            log.debug("%s: request %s attempt %d failed (%s); retrying in %.2f s", self.desc, req.id, attempt,
                      failure.reason, delay)
            self.client.tails["retries"] += 1
            self.out.put(Msg("retry", self))
            await asyncio.sleep(delay)
