"""A flow: requests to one or more clients, where an answer may ask the next question at once.

A stage's records move through their own steps (a LaMini instruction list is parsed, and each new
instruction's response is asked; an Evol-Instruct lineage goes evolve, respond, equality check, next
round) instead of waiting, phase by phase, for the slowest answer of every other record. A
:class:`Flow` keeps one pool per client (:class:`~bezoar_jobs.llm.pool.PoolLane`) serving every step
for its whole life, and calls each request's ``on_result`` in the thread that called :meth:`Flow.run`,
one at a time; ``on_result`` may :meth:`Flow.ask` more. The flow ends when every request asked has
been handed to its ``on_result`` and nothing more was asked.

What does not depend on timing: each request's answer (its id, prompt and seed are the record's own),
so a stage that decides what to commit from its records, in its own order, commits the same rows
whatever order the answers came in.

Clients without a pool (the in-process model) get their requests in batches: the flow hands a
client everything waiting for it to :meth:`LLMClient.run` when no other answer is ready.

Stopping: an ``on_result`` that raises :class:`~bezoar_jobs.llm.base.StopRequests` (the run store
stopped taking records), or a lane that ends with an error (a spending cap, a server unreachable,
bad credentials), drains every lane: nothing new is sent, answers in flight are still handed over,
then the first error is raised. Any other exception from ``on_result`` cancels what is in flight
and propagates.

Progress: one line per flow with requests done of asked, req/s, output tok/s, requests in flight,
retries and failures (a tqdm bar on a terminal; every 15 s in a log); with ``BEZOAR_LOG_FORMAT=json``
(``bezoar --log-format json``) the same figures are JSON log events instead.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from ..logfmt import LOG_FORMAT_ENV
from .base import GenRequest, GenResult, LLMClient, StopRequests

log = logging.getLogger("bezoar.llm")

PROGRESS_EVERY_S = 15.0

Callback = Callable[[GenResult], None]


def run_requests(client: LLMClient, requests: Sequence[GenRequest], on_result: Callable[[GenResult], None],
                 desc: str) -> None:
    """``client.run`` for a client whose requests go through a flow (``enqueue``): one flow, one step."""
    if not requests:
        return
    flow = Flow(desc)
    for req in requests:
        flow.ask(client, req, on_result)
    flow.run()


def json_logs() -> bool:
    return os.environ.get(LOG_FORMAT_ENV, "").lower() == "json"


class Flow:
    def __init__(self, desc: str = "generate"):
        self.desc = desc
        self.out: queue.Queue[Any] = queue.Queue()  # the lanes' messages (llm/pool.py Msg)
        self.lanes: dict[int, Any] = {}  # id(client) -> PoolLane
        self.batches: dict[int, tuple[LLMClient, list[tuple[GenRequest, Callback]]]] = {}
        self.ratings: dict[tuple, tuple[LLMClient, str, tuple[str, ...], list[tuple[GenRequest, Any]]]] = {}
        self.ready: deque[Callable[[], None]] = deque()
        self.outstanding = 0
        self.asked = self.done = self.failed = self.retries = self.tokens = 0
        self.error: BaseException | None = None  # a lane's error, or the StopRequests error
        self.enders: list[Callable[[], None]] = []
        self.started = time.monotonic()
        self._last_report = self._last_tick = self.started

    # ------------------------------------------------------------------ what stages call
    def ask(self, client: LLMClient, req: GenRequest, on_result: Callback) -> None:
        """Ask ``req`` of ``client``; ``on_result`` gets its answer (or its failure) once."""
        if self.error is not None:  # stopping: nothing new
            return
        self.outstanding += 1
        self.asked += 1

        def handed(res: GenResult) -> None:
            try:
                on_result(res)
            finally:
                self.outstanding -= 1

        client.enqueue(self, req, handed)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` from the flow's loop (a step whose answer is already saved: it may ask more)."""
        self.outstanding += 1

        def step() -> None:
            try:
                fn()
            finally:
                self.outstanding -= 1

        self.ready.append(step)

    def on_end(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` when the flow ends, however it ends (a cache's last write)."""
        self.enders.append(fn)

    # ------------------------------------------------------------------ what clients call
    def lane(self, client: LLMClient, start: Callable[[queue.Queue[Any], str], Any]) -> Any:
        """The pool lane of a remote client: ``start(queue, desc)`` on first use (llm/pool.py)."""
        lane = self.lanes.get(id(client))
        if lane is None:
            lane = self.lanes[id(client)] = start(self.out, self.desc)
        return lane

    def batch(self, client: LLMClient, req: GenRequest, on_result: Callback) -> None:
        self.batches.setdefault(id(client), (client, []))[1].append((req, on_result))

    def rate(self, client: LLMClient, req: GenRequest, prefix: str, options: tuple[str, ...],
             on_rating: Callable[[dict[str, float]], None]) -> None:
        """Ask ``client.rating_distribution`` for ``req`` (in-process judges), batched like :meth:`batch`."""
        if self.error is not None:
            return
        self.outstanding += 1
        group = self.ratings.setdefault((id(client), prefix, options), (client, prefix, options, []))
        group[3].append((req, on_rating))

    def later(self, on_result: Callback, res: GenResult) -> None:
        """Hand ``res`` over from the flow's loop (an answer from a cache)."""
        self.done += 1
        self.ready.append(lambda: on_result(res))

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        bar = self._bar()
        try:
            while True:
                while self.ready:
                    self._guard(self.ready.popleft())
                if self.error is not None:
                    if all(lane.ended for lane in self.lanes.values()):
                        break
                elif self.outstanding <= 0:
                    break
                try:
                    msg = self.out.get(timeout=0.0 if self._batched() else 0.5)
                except queue.Empty:
                    if self._batched():
                        self._run_batches()
                    self._progress(bar)
                    continue
                self._message(msg)
                self._progress(bar)
        except BaseException:
            for lane in self.lanes.values():
                lane.halt()
            for lane in self.lanes.values():
                lane.join()
            raise
        finally:
            if bar is not None:
                bar.close()
            for fn in self.enders:
                fn()
        for lane in self.lanes.values():
            lane.close()
        while not all(lane.ended for lane in self.lanes.values()):
            self._message(self.out.get())
        for lane in self.lanes.values():
            lane.join()
        self._progress(None, final=True)
        if self.error is not None:
            raise self.error

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except StopRequests as e:
            self._stop(e.error)

    def _stop(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.batches.clear()
        self.ratings.clear()
        for lane in self.lanes.values():
            lane.drain()

    def _message(self, msg: Any) -> None:
        lane = msg.lane
        if msg.kind == "result":
            res: GenResult = msg.result
            lane.client.usage.add(res)
            self.done += 1
            self.failed += 0 if res.ok else 1
            self.tokens += res.completion_tokens
            cb = msg.callback
            self._guard(lambda: cb(res))
        elif msg.kind == "retry":
            lane.client.usage.retries += 1
            self.retries += 1
        else:
            lane.ended = True
            if msg.error is not None:
                self._stop(msg.error)

    def _batched(self) -> bool:
        return bool(self.batches or self.ratings) and self.error is None

    def _run_batches(self) -> None:
        for rkey in list(self.ratings):
            rater, prefix, options, asks = self.ratings.pop(rkey)
            dists = rater.rating_distribution([q for q, _ in asks], prefix, options)
            for (_, on_rating), dist in zip(asks, dists, strict=True):
                try:
                    on_rating(dist)
                finally:
                    self.outstanding -= 1
        for key in list(self.batches):
            client, items = self.batches.pop(key)
            waiting: dict[str, deque[Callback]] = {}
            for req, cb in items:
                waiting.setdefault(req.id, deque()).append(cb)

            def handed(res: GenResult, waiting: dict[str, deque[Callback]] = waiting) -> None:
                self.done += 1
                self.failed += 0 if res.ok else 1
                self.tokens += res.completion_tokens
                waiting[res.id].popleft()(res)

            try:
                client.run([req for req, _ in items], handed, desc=self.desc)
            except StopRequests as e:
                self._stop(e.error)
                return

    # ------------------------------------------------------------------ progress
    def in_flight(self) -> int:
        return sum(lane.active for lane in self.lanes.values())

    def figures(self) -> dict[str, Any]:
        dt = max(time.monotonic() - self.started, 1e-6)
        return {"flow": self.desc, "asked": self.asked, "done": self.done, "in_flight": self.in_flight(),
                "retries": self.retries, "failed": self.failed, "output_tokens": self.tokens,
                "req_per_s": round(self.done / dt, 2), "tok_per_s": round(self.tokens / dt, 1),
                "elapsed_s": round(dt, 2)}

    def _bar(self) -> Any:
        if json_logs():
            return None
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        return tqdm(total=0, desc=self.desc, unit="req", file=sys.stderr, dynamic_ncols=True,
                    mininterval=0.5 if tty else PROGRESS_EVERY_S, smoothing=0.1)

    def _progress(self, bar: Any, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last_tick < 0.25:  # the figures are cheap, but not per answer
            return
        self._last_tick = now
        if bar is not None:
            if bar.total != self.asked:
                bar.total = self.asked
            f = self.figures()
            bar.set_postfix_str(f"{f['req_per_s']:.1f} req/s, {f['tok_per_s']:.0f} tok/s, {f['in_flight']} in flight, "
                                f"{self.retries} retries, {self.failed} failed", refresh=False)
            bar.update(self.done - bar.n)
            return
        if final:
            f = self.figures()
            if json_logs():
                log.info("flow done", extra={"event": "flow_done", **f})
            else:
                log.info("%s: %d answers (%d failed, %d retries), %d output tokens in %.1f s", self.desc, self.done,
                         self.failed, self.retries, self.tokens, f["elapsed_s"])
        elif json_logs() and now - self._last_report >= PROGRESS_EVERY_S:
            self._last_report = now
            log.info("progress", extra={"event": "progress", **self.figures()})
