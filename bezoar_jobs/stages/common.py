"""What the stages that talk to a teacher or judge share: opening clients, request phases whose
answers are persisted as records, usage figures, and the accounting of every request.

Losses are loud and counted: each :class:`Phase` records in the stage's manifest (``requests``, via
:attr:`StageContext.accounting`) how many requests it needed, found done, asked, got answered,
retried, and lost, by cause (``HTTP 503``, ``timeout``, ``unparseable`` ...); a phase that lost any
says so in a WARNING, and one that lost more than ``generation.max_failed_fraction`` of its requests
fails the stage (retryable) naming the causes and an example. Its answered records are saved, so the
rerun asks only for the rest.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import Interrupted, RetryableError
from ..llm.base import GenRequest, GenResult, LLMClient, StopRequests, UsageTotals
from ..recipe import Endpoint
from ..redact import redact
from ..runner import StageContext
from .records import RecordLog, StoreUnavailable

log = logging.getLogger("bezoar")

# eval-mtbench's own limit on failed judge requests (the data stages use generation.max_failed_fraction)
MAX_FAILED_FRACTION = 0.10


def work_key(ctx: StageContext) -> str:
    return "records-" + ctx.params_hash[:12]


def open_client(
    ctx: StageContext, endpoint: Endpoint, role: str, cached: bool = False, namespace: str | None = None,
    accept: Callable[[GenResult], bool] | None = None,
) -> LLMClient:
    """The client for ``endpoint``; ``cached``: answers are kept in ``<run>/_cache/<namespace>/``
    (default: the role), so a rerun, a resume or a retried Job never pays twice for one; ``accept``:
    which answers may be cached as final (an unparseable verdict may not)."""
    from ..llm import make_client

    client = make_client(endpoint, role=role)
    if cached:
        from ..llm.cache import CachedClient

        client = CachedClient(client, ctx.store, namespace=namespace or role, accept=accept)
    return client


def causes_text(causes: Counter[str] | dict[str, int]) -> str:
    return ", ".join(f"{c}: {n}" for c, n in sorted(causes.items(), key=lambda kv: (-kv[1], kv[0])))


class Phase:
    """One round of requests whose answers are persisted as records (see records.py).

    ``valid(record)``: whether a saved record is a usable answer; one that is not (an unparseable
    verdict) is asked again on a rerun instead of being taken as done.
    """

    def __init__(self, ctx: StageContext, name: str, valid: Callable[[dict[str, Any]], bool] | None = None):
        self.ctx = ctx
        self.name = name
        self.valid = valid
        self.log = RecordLog(ctx.work, work_key(ctx), name, flush_every=ctx.recipe.generation.flush_every,
                             valid=valid)
        self.failed: dict[str, str] = {}  # request id -> what went wrong
        self.failed_cause: dict[str, str] = {}  # request id -> its cause
        self.causes: Counter[str] = Counter()
        self.asked = 0
        self.stats: dict[str, Any] = ctx.accounting.setdefault(name, {})

    def _done(self, rid: str) -> bool:
        rec = self.log.get(rid)
        return rec is not None and (self.valid is None or self.valid(rec))

    def run(
        self,
        client: LLMClient,
        items: Sequence[tuple[GenRequest, dict[str, Any]]],
        make_record: Callable[[GenResult, dict[str, Any]], dict[str, Any]],
        check: bool = True,
    ) -> dict[str, dict[str, Any]]:
        """Ask for every item not done yet; the records of those answered. ``check``: apply the
        failed-request limit to this phase (a caller that retries failures itself checks at its end)."""
        todo = [(r, m) for r, m in items if not self._done(r.id)]
        if len(todo) < len(items):
            log.info(
                "%s/%s: %d records already done, %d to ask", self.ctx.name, self.name, len(items) - len(todo), len(todo)
            )
        meta = {r.id: m for r, m in todo}
        answered = cached = 0

        def on_result(res: GenResult) -> None:
            nonlocal answered, cached
            if res.ok:
                answered += 1
                cached += 1 if res.cached else 0
                try:
                    self.log.add(
                        {
                            "id": res.id,
                            **make_record(res, meta[res.id]),
                            "_tokens": [res.prompt_tokens, res.completion_tokens],
                        }
                    )
                except StoreUnavailable as e:  # kept in the spool; ask nothing more, keep what is in flight
                    raise StopRequests(e) from None
            else:
                self.failed[res.id] = redact(res.error or "unknown error")
                self.failed_cause[res.id] = res.cause or "error"
                self.causes[res.cause or "error"] += 1
            if self.ctx.stop_requested():
                self.log.flush()
                raise Interrupted(f"{self.ctx.name}: stopped by SIGTERM during {self.name}; records saved")

        self.asked = len(todo)
        retries_before = client.usage.retries
        try:
            if todo:
                client.run([r for r, _ in todo], on_result, desc=f"{self.ctx.name}:{self.name}")
        except StopRequests as e:  # a client without a pool (in process) lets it through
            raise e.error from None
        finally:
            self.log.flush()
            self.stats.update({
                "needed": len(items),
                "resumed": len(items) - len(todo),
                "asked": len(todo),
                "answered": answered,
                "cached": cached,
                "retries": client.usage.retries - retries_before,
                "failed": sum(self.causes.values()),
                "failed_by_cause": dict(self.causes),
            })
        if check:
            self.check(len(items))
        return {r.id: self.log.records[r.id] for r, _ in items if r.id in self.log.records}

    def check(self, needed: int) -> None:
        check_losses(self.ctx, f"{self.ctx.name}/{self.name}", needed, self.causes, self.failed,
                     int(self.stats.get("retries", 0)))


def check_losses(ctx: StageContext, where: str, needed: int, causes: Counter[str] | dict[str, int],
                 examples: dict[str, str], retries: int = 0, unit: str = "requests") -> None:
    """Warn about every loss; fail (retryable) when more than ``generation.max_failed_fraction`` of
    ``needed`` were lost. ``causes``: cause -> count; ``examples``: id -> what went wrong."""
    lost = sum(causes.values())
    if not lost or not needed:
        return
    limit = ctx.recipe.generation.max_failed_fraction
    rid, why = next(iter(examples.items())) if examples else ("?", "no detail")
    what = (f"{where}: {lost} of {needed} {unit} failed for good ({causes_text(causes)}; {retries} retries); "
            f"e.g. {rid}: {redact(why)[:300].rstrip('. ')}")
    if lost > limit * needed:
        raise RetryableError(
            f"{what}. That is more than generation.max_failed_fraction={limit:g} allows: nothing is committed; "
            "the usable answers are saved, and a rerun asks again only for what failed"
        )
    log.warning("%s (within generation.max_failed_fraction=%g: the stage commits without them)", what, limit)


def usage_dict(u: UsageTotals) -> dict[str, Any]:
    return {
        "requests": u.requests,
        "failed": u.failed,
        "cached": u.cached,
        "retries": u.retries,
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
    }


_HTTP = re.compile(r"\bHTTP (\d{3})\b")


def cause_of(error: str) -> str:
    """The cause of a request failure from its text (for stages that keep only the text)."""
    m = _HTTP.search(error)
    if m:
        return f"HTTP {m.group(1)}" + (" refused" if "refused by the server" in error else "")
    for key, cause in (("timeout", "timeout"), ("timed out", "timeout"), ("connection", "connection"),
                       ("malformed", "malformed")):
        if key in error:
            return cause
    return "error"


_WS = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]")


def normalise(text: str) -> str:
    """A key for deduplication: lower case, no punctuation, single spaces."""
    return _WS.sub(" ", _PUNCT.sub("", text.lower())).strip()


def endpoint_info(e: Endpoint) -> dict[str, Any]:
    return {"backend": e.backend, "model": e.model, "revision": e.revision,
            "base_url": redact(e.base_url) if e.base_url else e.base_url}
