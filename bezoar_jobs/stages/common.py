"""What the stages that talk to a teacher or judge share: opening clients, request phases whose
answers are persisted as records, usage figures."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import Interrupted, RetryableError
from ..llm.base import GenRequest, GenResult, LLMClient, UsageTotals
from ..recipe import Endpoint
from ..runner import StageContext
from .records import RecordLog

log = logging.getLogger("bezoar")

# above this fraction of requests failing for good, the stage fails (retryable) instead of committing
MAX_FAILED_FRACTION = 0.10


def work_key(ctx: StageContext) -> str:
    return "records-" + ctx.params_hash[:12]


def open_client(
    ctx: StageContext, endpoint: Endpoint, role: str, cached: bool = False, namespace: str | None = None
) -> LLMClient:
    """The client for ``endpoint``; ``cached``: answers are kept in ``<run>/_cache/<namespace>/``
    (default: the role), so a rerun, a resume or a retried Job never pays twice for one."""
    from ..llm import make_client

    client = make_client(endpoint, role=role)
    if cached:
        from ..llm.cache import CachedClient

        client = CachedClient(client, ctx.store, namespace=namespace or role)
    return client


class Phase:
    """One round of requests whose answers are persisted as records (see records.py)."""

    def __init__(self, ctx: StageContext, name: str):
        self.ctx = ctx
        self.name = name
        self.log = RecordLog(ctx.work, work_key(ctx), name, flush_every=ctx.recipe.generation.flush_every)
        self.failed: dict[str, str] = {}
        self.asked = 0

    def run(
        self,
        client: LLMClient,
        items: Sequence[tuple[GenRequest, dict[str, Any]]],
        make_record: Callable[[GenResult, dict[str, Any]], dict[str, Any]],
    ) -> dict[str, dict[str, Any]]:
        todo = [(r, m) for r, m in items if r.id not in self.log]
        if self.log.resumed:
            log.info(
                "%s/%s: %d records already done, %d to ask", self.ctx.name, self.name, len(items) - len(todo), len(todo)
            )
        meta = {r.id: m for r, m in todo}

        def on_result(res: GenResult) -> None:
            if res.ok:
                self.log.add(
                    {
                        "id": res.id,
                        **make_record(res, meta[res.id]),
                        "_tokens": [res.prompt_tokens, res.completion_tokens],
                    }
                )
            else:
                self.failed[res.id] = res.error or "unknown error"
            if self.ctx.stop_requested():
                self.log.flush()
                raise Interrupted(f"{self.ctx.name}: stopped by SIGTERM during {self.name}; records saved")

        self.asked = len(todo)
        try:
            if todo:
                client.run([r for r, _ in todo], on_result, desc=f"{self.ctx.name}:{self.name}")
        finally:
            self.log.flush()
        if todo and len(self.failed) > MAX_FAILED_FRACTION * len(todo):
            sample = "; ".join(f"{k}: {v}" for k, v in list(self.failed.items())[:3])
            raise RetryableError(
                f"{self.ctx.name}/{self.name}: {len(self.failed)} of {len(todo)} requests failed for good "
                f"(e.g. {sample}); finished records are saved, a rerun asks only for the rest"
            )
        return {r.id: self.log.records[r.id] for r, _ in items if r.id in self.log.records}


def usage_dict(u: UsageTotals) -> dict[str, Any]:
    return {
        "requests": u.requests,
        "failed": u.failed,
        "cached": u.cached,
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
    }


_WS = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]")


def normalise(text: str) -> str:
    """A key for deduplication: lower case, no punctuation, single spaces."""
    return _WS.sub(" ", _PUNCT.sub("", text.lower())).strip()


def endpoint_info(e: Endpoint) -> dict[str, Any]:
    return {"backend": e.backend, "model": e.model, "revision": e.revision, "base_url": e.base_url}
