"""A response cache in the run, so a rerun (resume, ``--force``, a retried Job) never pays twice.

Key: sha256 of the inner client's identity (backend, endpoint URL, model id, revision, prompt
format: whatever besides the request decides the answer) and the request's rendered fields (system,
user, decoding settings, seed). The request id is not part of the key, so the same question asked by two records
is paid once, except for sampled requests without a seed (temperature > 0, seed None), where
identical prompts are meant to give different answers: their id joins the key.

Layout: ``<run>/_cache/<namespace>/part-<uuid>.jsonl``. S3 has no append, so results are written as
new part objects every ``flush_every`` results and at the end (also when the run fails), and every
part is loaded when the first run starts. Only successful answers are cached: failures are asked
again next time. ``accept`` (the caller's test of an answer, e.g. "the verdict parses") keeps
answers that say nothing out of the cache too, and an entry already stored that fails it (written
by an older version) is not used: an unparseable verdict is never a final answer.

Spending: every cached answer was paid for by an earlier attempt, so their cost is handed to the
inner client as prior spend (``prior_spent_usd``): a stage that is retried after hitting its
``spend_cap_usd`` does not spend the cap again. Use one namespace per stage (e.g. the stage name),
so that the cap counts that stage's own spending.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from ..errors import RetryableError
from ..layout import CACHE_DIR
from ..store import Store
from .base import GenRequest, GenResult, LLMClient, StopRequests, UsageTotals

if TYPE_CHECKING:
    from .flow import Flow

log = logging.getLogger("bezoar.llm")

CACHE_PREFIX = CACHE_DIR


class CachedClient(LLMClient):
    def __init__(self, inner: LLMClient, store: Store, namespace: str, flush_every: int = 64,
                 accept: Callable[[GenResult], bool] | None = None):
        if not namespace or "/" in namespace or namespace.startswith("."):
            raise ValueError(f"cache namespace {namespace!r}: use a plain name (e.g. the stage name)")
        self.inner = inner
        self.store = store
        self.namespace = namespace
        self.flush_every = max(1, flush_every)
        self.accept = accept
        self._store_down = False
        self.model_id = inner.model_id
        self.usage = UsageTotals()
        self._entries: dict[str, dict[str, Any]] | None = None
        self._flow: Flow | None = None  # the flow being served, and its questions in flight by key
        self._waiting: dict[str, list[tuple[str, Callable[[GenResult], None]]]] = {}
        self._pending: list[dict[str, Any]] = []  # answers not yet written

    @property
    def prefix(self) -> str:
        return f"{CACHE_PREFIX}/{self.namespace}/"

    def _identity(self) -> dict[str, Any]:
        return getattr(self.inner, "cache_identity", None) or {"model": self.inner.model_id}

    def key(self, req: GenRequest, kind: str = "generate", extra: Any = None) -> str:
        fields = {
            "kind": kind,
            "client": self._identity(),
            "system": req.system,
            "user": req.user,
            "max_new_tokens": req.max_new_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "repetition_penalty": req.repetition_penalty,
            "seed": req.seed,
            "stop": list(req.stop),
            "extra": extra,
        }
        if req.temperature > 0 and req.seed is None:
            fields["id"] = req.id
        blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    # ------------------------------------------------------------------ the store
    def load(self) -> dict[str, dict[str, Any]]:
        """Read every part once (first use); later runs in this process reuse the dict."""
        if self._entries is not None:
            return self._entries
        entries: dict[str, dict[str, Any]] = {}
        parts = [p for p in self.store.list(self.prefix) if p.endswith(".jsonl")]
        for rel in parts:
            for n, line in enumerate(self.store.read_text(rel).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    entries[rec["key"]] = rec
                except (ValueError, KeyError, TypeError):
                    log.warning("%s line %d: not a cache record, ignored", self.store.url(rel), n)
        self._entries = entries
        prior = sum(self._cost(r) for r in entries.values())
        if prior and hasattr(self.inner, "prior_spent_usd"):
            setattr(self.inner, "prior_spent_usd", prior)  # noqa: B010 - only remote clients have it
        if entries:
            log.info("cache %s: %d answers from %d parts", self.store.url(self.prefix), len(entries), len(parts))
        return entries

    def _cost(self, rec: dict[str, Any]) -> float:
        cost = getattr(self.inner, "cost", None)
        if cost is None or rec.get("kind") != "generate":
            return 0.0
        r = rec["result"]
        return float(cost(r.get("prompt_tokens", 0), r.get("completion_tokens", 0)))

    def _write_part(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        self.store.write_text(f"{self.prefix}part-{uuid.uuid4().hex}.jsonl", body)

    # ------------------------------------------------------------------ the interface
    def run(
        self, requests: Sequence[GenRequest], on_result: Callable[[GenResult], None], desc: str = "generate"
    ) -> None:
        from .flow import run_requests

        run_requests(self, requests, on_result, desc)

    def enqueue(self, flow: Flow, req: GenRequest, on_result: Callable[[GenResult], None]) -> None:
        """A cached answer is handed over at once; a question already in flight (the same key from
        another record) waits for that answer instead of being asked again."""
        entries = self.load()
        k = self.key(req)
        rec = entries.get(k)
        hit = None if rec is None else GenResult(**{**rec["result"], "id": req.id, "cached": True, "key": k})
        if hit is not None and (self.accept is None or self.accept(hit)):
            self.usage.add(hit)
            flow.later(on_result, hit)
            return
        if self._flow is not flow:
            self._flow = flow
            self._waiting = {}
            flow.on_end(lambda: self._flush(self._pending, final=True))
        waiters = self._waiting.get(k)
        if waiters is not None:
            waiters.append((req.id, on_result))
            return
        self._waiting[k] = [(req.id, on_result)]
        flow.ask(self.inner, req, lambda res: self._answered(k, res))

    def _answered(self, k: str, res: GenResult) -> None:
        final = res.ok and (self.accept is None or self.accept(res))
        # a final answer is this question's for good: counted once under its key, by every record and attempt
        # that reads it; one that is not (a failure, an unparseable verdict) may be asked again and paid again
        res = replace(res, key=k if final else None)
        if final:
            rec = {"key": k, "kind": "generate", "model": self.model_id,
                   "result": {f: v for f, v in asdict(res).items() if f not in ("id", "cached", "retries", "key")}}
            self.load()[k] = rec
            self._pending.append(rec)
            if len(self._pending) >= self.flush_every:
                self._flush(self._pending)
        self.usage.retries += res.retries
        waiters = self._waiting.pop(k)
        stop: StopRequests | None = None
        first = True
        for rid, cb in waiters:
            # the same question from another record: answered once, not paid again
            # (a final answer's tokens count once by its key; one that is not final counts with the first)
            r = res if first else replace(res, id=rid, cached=res.ok, retries=0, extra=dict(res.extra),
                                          prompt_tokens=res.prompt_tokens if final else 0,
                                          completion_tokens=res.completion_tokens if final else 0)
            first = False
            try:
                self.usage.add(r)
                cb(r)
            except StopRequests as e:  # hand the duplicates over too, then pass the signal on
                stop = stop or e
        if stop is not None:
            raise stop

    def busy_intervals(self) -> list[tuple[float, float]]:
        return self.inner.busy_intervals()

    def slot_capacity(self) -> int | None:
        return self.inner.slot_capacity()

    def tail_counts(self) -> dict[str, int] | None:
        return self.inner.tail_counts()

    def _flush(self, pending: list[dict[str, Any]], final: bool = False) -> None:
        """Write the pending answers as a part. The cache is an optimisation (the stage keeps its own
        records): when the store does not take a part, the answers wait in memory for the final
        flush, and if that fails too the cache goes without them (a later run asks again)."""
        # on_result runs in the caller's thread (see pool.py), so no other thread touches pending
        if self._store_down and not final:
            return
        batch = list(pending)
        pending.clear()
        try:
            self._write_part(batch)
        except RetryableError as e:
            self._store_down = True
            if final:
                log.warning("cache %s: %d answers not cached, the store did not take them (%s)",
                            self.store.url(self.prefix), len(batch), e)
            else:
                pending[:0] = batch

    def rating_distribution(
        self, requests: Sequence[GenRequest], prefix: str, options: Sequence[str]
    ) -> list[dict[str, float]]:
        entries = self.load()
        keys = [self.key(r, "rating", [prefix, list(options)]) for r in requests]
        todo = [i for i, k in enumerate(keys) if k not in entries]
        if todo:
            got = self.inner.rating_distribution([requests[i] for i in todo], prefix, options)
            new = []
            for i, dist in zip(todo, got, strict=True):
                rec = {"key": keys[i], "kind": "rating", "model": self.model_id, "result": dist}
                entries[keys[i]] = rec
                new.append(rec)
            self._write_part(new)
        return [dict(entries[k]["result"]) for k in keys]

    def close(self) -> None:
        self.inner.close()
