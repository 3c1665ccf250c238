"""What the generate stages share; each scheme's own logic is its module under ``bezoar_jobs/schemes/``.

A scheme's ``generate(ctx)`` asks its steps (:class:`bezoar_jobs.stages.common.Phase`, one per kind of
request) through one :class:`bezoar_jobs.llm.flow.Flow`: a record's next step goes out as soon as its
answer is in, and what is committed is decided from the records in a fixed order.
Work is split into *units* with stable ids (a LaMini prompt, an Evol-Instruct lineage, an Orca seed
row); ``--shard i/N`` takes the units whose id hashes to ``i`` mod ``N`` and writes only records. The
run without ``--shard`` reads the records of every shard, asks for whatever is still missing,
deduplicates and commits with :func:`finish`.

Also here: :class:`ContextGuard` (a request that cannot fit the teacher's context window is skipped
and counted instead of being refused by the server on every retry) and :class:`TeacherClock` (the
span the teacher served a stage, for GPU-hours).
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from typing import Any

from ..data.io import dataset_card, write_jsonl
from ..errors import RetryableError
from ..llm.base import LLMClient, UsageTotals
from ..recipe_base import Endpoint
from ..recipe_view import get_path
from ..runner import StageContext, StageOutput
from ..training.types import Tokenizer
from .common import endpoint_info, usage_dict, utilization
from .records import stable_hash

log = logging.getLogger("bezoar")

# a chat API adds a few tokens per message around the texts (role markers)
CHAT_OVERHEAD_TOKENS = 16


def unit_rng(ctx: StageContext, *parts: Any) -> random.Random:
    """A random generator seeded by the recipe seed, the stage and ``parts`` (a unit id, a round)."""
    return random.Random(stable_hash(ctx.recipe.seed, ctx.name, *parts))


def req_seed(ctx: StageContext, *parts: Any) -> int:
    """The sampling seed sent with a request: stable across runs, shards and resumes."""
    return stable_hash(ctx.recipe.seed, *parts) % (2**31 - 1)


def text_key(text: str) -> str:
    """A short content key for request ids: a record answers exactly the text that was asked."""
    return format(stable_hash(text), "016x")[:10]


class ContextGuard:
    """Whether a request fits the endpoint's context window (``context_tokens``).

    The prompt is measured as the server sees it: rendered with the endpoint's ``prompt_format``
    (or its chat template, in process) and tokenized with the endpoint's tokenizer (``tokenizer``,
    else the model's; for a hub model only the tokenizer files are fetched). A request fits when its
    prompt tokens plus ``max_new_tokens`` are at most ``context_tokens``. Without ``context_tokens``
    everything fits and nothing is loaded. ``measured`` and ``too_long`` count the checks.
    """

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint
        self.limit = endpoint.context_tokens
        self.measured = 0
        self.too_long = 0
        self._tok: Any = None

    @property
    def active(self) -> bool:
        return self.limit is not None

    def _tokenizer(self) -> Tokenizer:
        if self._tok is None:
            from ..models import load_tokenizer_of

            e = self.endpoint
            rev = None if e.tokenizer else e.revision
            self._tok = load_tokenizer_of(e.tokenizer or e.model, rev, trust_remote_code=e.trust_remote_code)
        return self._tok

    def prompt_tokens(self, user: str, system: str | None = None) -> int:
        from ..llm.render import chat_messages, merge_system, render_raw

        e = self.endpoint
        tok = self._tokenizer()
        if e.prompt_format:
            return len(tok(render_raw(e.prompt_format, system, user), add_special_tokens=True)["input_ids"])
        if e.backend == "local" and getattr(tok, "chat_template", None):
            msgs = chat_messages(system, user, e.system_prompt_supported)
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            return len(tok(text, add_special_tokens=False)["input_ids"])
        return len(tok(merge_system(system, user), add_special_tokens=False)["input_ids"]) + CHAT_OVERHEAD_TOKENS

    def fits(self, user: str, max_new_tokens: int, system: str | None = None) -> bool:
        if self.limit is None:
            return True
        self.measured += 1
        ok = self.prompt_tokens(user, system) + max_new_tokens <= self.limit
        if not ok:
            self.too_long += 1
        return ok

    def counts(self) -> dict[str, Any]:
        return {"context_tokens": self.limit, "measured": self.measured, "too_long": self.too_long}


class TeacherClock:
    """The span a stage kept the teacher busy: from the first request to the last answer of the
    phases it timed (records already on disk cost no teacher time). GPU-hours are that span times
    the endpoint's ``gpus``; a self-hosted teacher is paid by the hour whether or not it is busy,
    so this is a lower bound of what the teacher Deployment costs (the report adds spans up as a
    union, since the generate stages share one teacher).

    Each timed span is also saved beside the stage's records (``_work/<records key>/
    teacher-spans/``), when it ends or is cut short by an error or SIGTERM, so the attempts before the
    committing one, whose answers the stage reuses, are counted too (:meth:`earlier`). An attempt
    killed outright (SIGKILL) saves nothing of its last span."""

    def __init__(self, ctx: StageContext) -> None:
        self.start: float | None = None
        self.end: float | None = None
        self.seconds = 0.0
        self.mono: tuple[float, float] | None = None  # (first start, last end), monotonic: for utilization
        self._t0: float | None = None
        self._m0 = 0.0
        self.ctx = ctx
        self._saved: set[str] = set()  # this attempt's span files

    @property
    def _prefix(self) -> str:
        from .common import work_key

        return f"{work_key(self.ctx)}/teacher-spans/"

    def _save(self, start: float, end: float) -> None:
        if self.ctx.shard is not None:  # a shard's span: its own pod's, not counted twice
            return
        name = f"{self._prefix}{uuid.uuid4().hex}.json"
        try:
            self.ctx.work.put_bytes(name, json.dumps({"start": start, "end": end}).encode())
            self._saved.add(name)
        except (RetryableError, OSError) as e:  # best effort: a figure, not data
            log.warning("%s: the teacher's span was not saved (%s): a rerun will not count it", self.ctx.name, e)

    def earlier(self) -> list[tuple[float, float]]:
        """The spans saved by the attempts before this one (their records are this stage's data too)."""
        out = []
        for name in self.ctx.work.list(self._prefix):
            if name in self._saved or not name.endswith(".json"):
                continue
            try:
                span = json.loads(self.ctx.work.get_bytes(name))
                out.append((float(span["start"]), float(span["end"])))
            except (ValueError, KeyError, TypeError) as e:
                log.warning("%s: %s is not a span (%s): not counted", self.ctx.name, self.ctx.work.url(name), e)
        return sorted(out)

    def __enter__(self) -> TeacherClock:
        self._t0 = time.time()
        self._m0 = time.monotonic()
        if self.start is None:
            self.start = self._t0
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._t0 is not None
        self.end = time.time()
        self.seconds += self.end - self._t0
        self.mono = (self.mono[0] if self.mono else self._m0, time.monotonic())
        self._save(self._t0, self.end)
        self._t0 = None


def finish(
    ctx: StageContext,
    rows: list[dict[str, Any]],
    rejected: list[dict[str, Any]],
    counts: dict[str, Any],
    usage: UsageTotals,
    summary: str,
    seed_field: str,
    details: dict[str, Any],
    judge_usage: UsageTotals | None = None,
    clock: TeacherClock | None = None,
    clients: dict[str, LLMClient] | None = None,
) -> StageOutput:
    """Write ``data/train.jsonl`` with its dataset card and ``rejected/``; the manifest's extras.
    ``seed_field`` is the recipe field of the scheme's seed data (``seeds.dolly``): its licence goes
    into the card, its source into the manifest. ``cost_usd`` is every API dollar the stage spent
    (the teacher's tokens when priced, and the judge's, e.g. Evol-Instruct's equality checks);
    ``teacher_gpu`` the teacher's GPU time over ``clock``'s span; ``utilization`` what ``clients`` (by
    role) kept busy of their slots over that span, as the client saw it (:func:`common.utilization`)."""
    source = get_path(ctx.recipe, seed_field)
    data = ctx.out / "data"
    write_jsonl(data / "train.jsonl", rows)
    dataset_card(data / "README.md", f"{ctx.recipe.name}: {ctx.name}", summary, source.licence,
                 {**details, "counts": counts}, ["train.jsonl"])
    if rejected:
        write_jsonl(ctx.out / "rejected" / "rejected.jsonl", rejected)
    teacher = ctx.recipe.teacher
    u = usage_dict(usage)
    usages: dict[str, Any] = {"teacher": u}
    costs = {"teacher": teacher.cost_usd(u["prompt_tokens"], u["completion_tokens"])}
    if judge_usage is not None:
        j = usage_dict(judge_usage)
        usages["judge"] = j
        costs["judge"] = ctx.recipe.judge.cost_usd(j["prompt_tokens"], j["completion_tokens"])
    priced = [c for c in costs.values() if c is not None]
    extra: dict[str, Any] = {
        "teacher": {**endpoint_info(teacher), "model_id": teacher.model},
        "usage": usages,
        "cost_usd": round(sum(priced), 6) if priced else None,
        "cost_usd_by_role": costs,
        "seed_data": {seed_field.rsplit(".", 1)[-1]: source.model_dump(mode="json")},
    }
    if clock is not None and clock.start is not None:
        earlier = clock.earlier()
        served = clock.seconds + sum(b - a for a, b in earlier)  # this attempt's and the earlier ones' spans
        hours = teacher.gpu_hours(served)
        extra["teacher_gpu"] = {
            "span_s": round(clock.seconds, 3),  # this attempt: it decoded usage's decoded_tokens (plan.py's rate)
            "start": clock.start,
            "end": clock.end,
            "gpus": teacher.gpus,
            "gpu_hours": hours,
            "gpu_hour_usd": teacher.gpu_hour_usd,
            "gpu_cost_usd": teacher.gpu_cost_usd(served),
        }
        if earlier:  # the attempts before it, whose answers it reused: their serving time is this data's too
            extra["teacher_gpu"]["earlier_spans"] = [[round(a, 3), round(b, 3)] for a, b in earlier]
            extra["teacher_gpu"]["earlier_s"] = round(served - clock.seconds, 3)
        if hours is not None:
            extra["gpu_hours"] = hours
    if clock is not None and clock.mono is not None and clients:
        extra["utilization"] = utilization(clients, *clock.mono)
    return StageOutput(counts=counts, extra=extra)
