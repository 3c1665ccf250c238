"""What the stages that talk to a teacher or judge share: opening clients, request phases whose
answers are persisted as records, usage figures, and the accounting of every request.

Losses are loud and counted: each :class:`Phase` records in the stage's manifest (``requests``, via
:attr:`StageContext.accounting`) how many requests it needed, found done, asked, got answered,
retried, and lost, by cause (``HTTP 503``, ``timeout``, ``unparseable`` ...); a phase that lost any
says so in a WARNING, and one that lost more than ``generation.max_failed_fraction`` of its requests
fails the stage (retryable) naming the causes and an example; as bad input (exit 2) when the server's
refusals of requests as sent (4xx) alone are that many, since they would be refused again. Its answered
records are saved, so the rerun asks only for the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import BadInput, Interrupted, RetryableError
from ..llm.base import GenRequest, GenResult, LLMClient, StopRequests, UsageTotals
from ..llm.faults import is_refusal
from ..recipe import Endpoint
from ..redact import redact
from ..runner import StageContext
from .records import RecordLog, StoreUnavailable

if TYPE_CHECKING:
    from ..llm.flow import Flow

log = logging.getLogger("bezoar")

# eval-mtbench's own limit on failed judge requests (the data stages use generation.max_failed_fraction)
MAX_FAILED_FRACTION = 0.10


def work_key(ctx: StageContext) -> str:
    """Where the stage's records live under ``_work/``: its parameters and, for a stage that reads
    committed inputs (a filter), the inputs' manifest hashes. A record is found by its request id, and
    a filter's ids name a row (``lamini-resp-<hash of the instruction>``), not the response it judged:
    a regenerated input keeps the ids with other responses, and a key of the parameters alone handed
    the filter the verdicts on the old ones. The judge's answer cache (keyed by the prompt) still
    answers every unchanged row at no cost. A stage without inputs (generate) keeps its old key, unless
    it reads a local file (a seed file, a template), whose content joins the key."""
    if not ctx.inputs and not ctx.source_files:
        return "records-" + ctx.params_hash[:12]
    # and the content of the local files it reads (source_files.py): a seed file edited in place is other data
    key: dict[str, Any] = {"params": ctx.params_hash, "inputs": ctx.inputs}
    if ctx.source_files:
        key["files"] = ctx.source_files
    blob = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return "records-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def open_client(
    ctx: StageContext, endpoint: Endpoint, role: str, cached: bool = False, namespace: str | None = None,
    accept: Callable[[GenResult], bool] | None = None, teacher: LLMClient | None = None,
) -> LLMClient:
    """The client for ``endpoint``; ``cached``: answers are kept in ``<run>/_cache/<namespace>/``
    (default: the role), so a rerun, a resume or a retried Job never pays twice for one; ``accept``:
    which answers may be cached as final (an unparseable verdict may not); ``teacher``: the stage's teacher
    client, when a judge runs beside it."""
    from ..llm import make_client

    # a judge on the teacher's own server spreads over the teacher's replicas as the teacher does, within the same
    # counts when the teacher's client is in this process (llm/fleet.py)
    # and, with no teacher client in this process (a filter stage), within the pod's share of the teacher's capacity
    judge = role == "judge"
    client = make_client(endpoint, role=role, teacher_url=ctx.teacher_url if judge else None, teacher=teacher,
                         teacher_backend=ctx.teacher_backend if judge else None)
    budget = getattr(client, "budget", None)
    if budget is not None and budget.capacity and budget.parties > 1:  # shared: the share grows as others finish
        from ..llm.budget import Board, party_names

        party = party_names(ctx.name, ctx.shard[1])[ctx.shard[0]] if ctx.shard is not None else ctx.name
        client.board = Board(ctx.store, party, budget.capacity, budget.parties,  # type: ignore[attr-defined]
                             min(endpoint.max_concurrency, budget.capacity))
    if cached:
        from ..llm.cache import CachedClient

        client = CachedClient(client, ctx.store, namespace=namespace or role, accept=accept)
    return client


def causes_text(causes: Counter[str] | dict[str, int]) -> str:
    return ", ".join(f"{c}: {n}" for c, n in sorted(causes.items(), key=lambda kv: (-kv[1], kv[0])))


def saved_tokens(rec: dict[str, Any]) -> tuple[int, int] | None:
    """(prompt, completion) tokens a saved record's answer cost (its ``_tokens``), None when it does not say."""
    tokens = rec.get("_tokens")
    if isinstance(tokens, list) and len(tokens) == 2 and all(isinstance(t, int) for t in tokens):
        return tokens[0], tokens[1]
    return None


class Phase:
    """One step of a stage's records (an instruction list, a response, a verdict) whose answers are
    persisted as records (see records.py); its requests go out through a :class:`~bezoar_jobs.llm.flow.Flow`
    shared with the stage's other steps.

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
        self.needed = self.resumed = self.asked = self.answered = self.cached = self.retries = 0
        self.cut = 0  # answers that stopped at max_new_tokens (finish_reason "length"), among those received
        self.stats: dict[str, Any] = ctx.accounting.setdefault(name, {})
        self._charged: list[LLMClient] = []

    def _charge_saved(self, client: LLMClient) -> None:
        """What this step's saved records cost, as spending before this attempt, for a client that
        keeps no answer cache (whose cache would say it: llm/cache.py): a stage retried after reaching
        its ``spend_cap_usd`` does not spend the cap again."""
        self._charged.append(client)
        cost = getattr(client, "cost", None)
        if cost is None or not hasattr(client, "prior_spent_usd"):
            return
        spent = 0.0
        for rec in self.log.records.values():
            tokens = saved_tokens(rec)
            if tokens is not None:
                spent += float(cost(*tokens))
        client.prior_spent_usd += spent

    def done(self, rid: str) -> dict[str, Any] | None:
        """The saved record of ``rid`` when it is a usable answer."""
        rec = self.log.get(rid)
        return rec if rec is not None and (self.valid is None or self.valid(rec)) else None

    def ask(
        self,
        flow: Flow,
        client: LLMClient,
        req: GenRequest,
        meta: dict[str, Any],
        make_record: Callable[[GenResult, dict[str, Any]], dict[str, Any]],
        then: Callable[[dict[str, Any] | None], None] | None = None,
    ) -> None:
        """Ask ``req`` unless its record is saved; ``then(record)`` once the record is saved (from the
        flow's loop), ``then(None)`` when the request failed for good (its error is in ``failed``)."""
        self.needed += 1
        if client not in self._charged:
            self._charge_saved(client)
        rec = self.done(req.id)
        if rec is not None:
            self.resumed += 1
            tokens = saved_tokens(rec)
            if tokens is not None:
                client.usage.add_saved(*tokens, rec.get("_key"))  # paid by an earlier attempt
            if then is not None:
                flow.call_soon(lambda: then(rec))
            return
        self.asked += 1

        def on_result(res: GenResult) -> None:
            self.retries += res.retries
            record: dict[str, Any] | None = None
            if res.ok:
                self.answered += 1
                self.cached += 1 if res.cached else 0
                self.cut += 1 if res.finish_reason == "length" else 0
                record = {"id": res.id, **make_record(res, meta), "_tokens": [res.prompt_tokens, res.completion_tokens]}
                if res.key is not None:  # the question's cache key: its answer is counted once (llm/base.py)
                    record["_key"] = res.key
                try:
                    self.log.add(record)
                except StoreUnavailable as e:  # kept in the spool; ask nothing more, keep what is in flight
                    raise StopRequests(e) from None
            else:
                self.failed[res.id] = redact(res.error or "unknown error")
                self.failed_cause[res.id] = res.cause or "error"
                self.causes[res.cause or "error"] += 1
            if self.ctx.stop_requested():
                self.log.flush()
                raise Interrupted(f"{self.ctx.name}: stopped by SIGTERM during {self.name}; records saved")
            if then is not None:
                then(record)

        flow.ask(client, req, on_result)

    def end(self, check: bool = True) -> None:
        """Write the pending records and this step's counts; ``check``: apply the failed-request limit
        (a caller that retries failures itself checks at its end)."""
        self.log.flush()
        if self.resumed:
            log.info("%s/%s: %d records already done, %d asked", self.ctx.name, self.name, self.resumed, self.asked)
        self.stats.update({
            "needed": self.needed,
            "resumed": self.resumed,
            "asked": self.asked,
            "answered": self.answered,
            "cached": self.cached,
            "retries": self.retries,
            "failed": sum(self.causes.values()),
            "failed_by_cause": dict(self.causes),
            "cut_short": self.cut,
        })
        if self.cut:  # kept as answered (the data is what the server said), but not quietly
            log.warning("%s/%s: %d of %d answers received stopped at max_new_tokens (cut short, kept): raise that "
                        "step's max_new_tokens if they should be whole", self.ctx.name, self.name, self.cut,
                        self.answered - self.cached)
        if check:
            self.check(self.needed)

    def run(
        self,
        client: LLMClient,
        items: Sequence[tuple[GenRequest, dict[str, Any]]],
        make_record: Callable[[GenResult, dict[str, Any]], dict[str, Any]],
        check: bool = True,
    ) -> dict[str, dict[str, Any]]:
        """Ask for every item not done yet, in a flow of its own; the records of those answered."""
        from ..llm.flow import Flow

        flow = Flow(f"{self.ctx.name}:{self.name}")
        for req, meta in items:
            self.ask(flow, client, req, meta, make_record)
        try:
            flow.run()
        finally:
            self.end(check=False)
        if check:
            self.check(self.needed)
        return {r.id: self.log.records[r.id] for r, _ in items if r.id in self.log.records}

    def check(self, needed: int) -> None:
        check_losses(self.ctx, f"{self.ctx.name}/{self.name}", needed, self.causes, self.failed,
                     int(self.stats.get("retries", 0)))


def run_flow(ctx: StageContext, flow: Flow, phases: Iterable[Phase], check: bool = True) -> None:
    """Run ``flow`` to its end; then every phase writes its records and counts (and, with ``check``,
    applies the failed-request limit), also when the flow stopped early. ``phases`` is read after the
    flow (a live view: steps made while it ran count too)."""
    try:
        flow.run()
    finally:
        for p in phases:
            p.end(check=False)
    if check:
        for p in phases:
            p.check(p.needed)


def utilization(clients: dict[str, LLMClient], t0: float, t1: float) -> dict[str, Any]:
    """Per role, the teacher or judge utilization the client saw over [t0, t1] (monotonic): busy
    slot-seconds (answered attempts in flight, at most the client's slots at once) over
    capacity-seconds (its slots: the server's capacity, or this pod's share of it); beside it what the
    pool did for the role's requests: attempts sent, retries after a failure, hedges and abandons
    (llm/pool.py)."""
    from ..llm.base import slot_utilization

    out: dict[str, Any] = {}
    for role, c in clients.items():
        cap = c.slot_capacity()
        if not cap or t1 <= t0:
            continue
        iv = [(a, b) for a, b in c.busy_intervals() if b > t0 and a < t1]
        busy = sum(min(b, t1) - max(a, t0) for a, b in iv)
        out[role] = {"utilization": round(slot_utilization(iv, cap, t0, t1), 4), "slots": cap,
                     "span_s": round(t1 - t0, 3), "busy_request_s": round(busy, 3), **(c.tail_counts() or {})}
    return out


def check_losses(ctx: StageContext, where: str, needed: int, causes: Counter[str] | dict[str, int],
                 examples: dict[str, str], retries: int = 0, unit: str = "requests") -> None:
    """Warn about every loss; fail (retryable) when more than ``generation.max_failed_fraction`` of
    ``needed`` were lost, as bad input when the server's refusals of requests as sent (4xx) alone are more.
    ``causes``: cause -> count; ``examples``: id -> what went wrong."""
    lost = sum(causes.values())
    if not lost or not needed:
        return
    limit = ctx.recipe.generation.max_failed_fraction
    rid, why = next(iter(examples.items())) if examples else ("?", "no detail")
    what = (f"{where}: {lost} of {needed} {unit} failed for good ({causes_text(causes)}; {retries} retries); "
            f"e.g. {rid}: {redact(why)[:300].rstrip('. ')}")
    refused = {c: n for c, n in causes.items() if is_refusal(c)}
    if sum(refused.values()) > limit * needed:
        # refusals of the requests as sent (a 4xx: TGI's validation, a prompt over the server's token limit): the
        # same requests sent again are refused again, so a retried pod or a plain rerun could only fail the same way
        raise BadInput(
            f"{what}. The server refused {sum(refused.values())} of them as sent ({causes_text(refused)}), more than "
            f"generation.max_failed_fraction={limit:g} allows: sent again they would be refused again, so the recipe "
            "or the server must change first (the refusal names what it refused: e.g. a decoding parameter, more "
            "stop sequences than it takes, a prompt plus max_new_tokens over its token limit). Nothing is "
            "committed; the usable answers are saved, and a rerun asks again only for what failed"
        )
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
        "resumed": u.resumed,
        "retries": u.retries,
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "decoded_tokens": u.decoded_tokens,  # of them, decoded for the committing attempt (llm/base.py)
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
