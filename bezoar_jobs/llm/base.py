"""The one small interface every teacher and judge client implements.

Stages build :class:`GenRequest` objects (a system text, a user text, decoding settings, a stable
id and a seed) and hand a whole batch to :meth:`LLMClient.run`. The client decides how to render
the prompt (a raw prompt format for TGI / completions endpoints, messages for chat APIs, the
tokenizer's chat template in process), how many requests to keep in flight, and how to retry. Each
finished request is handed to ``on_result`` as soon as it is done, so the stage can persist it at
once (that is what makes an interrupted stage resumable without duplicates).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..recipe_base import Decoding
    from .flow import Flow


@dataclass(frozen=True)
class GenRequest:
    id: str  # stable id: the stage's record id, reused on resume
    user: str  # the instruction / prompt text
    system: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # which request a pool sends first when several wait for a slot (higher first): a step that unlocks
    # more work (a LaMini list, an Evol-Instruct evolution) before one that ends a record. Scheduling
    # only: not part of the request's answer or its cache key
    priority: int = 0


def request(rid: str, user: str, dec: Decoding, seed: int | None, system: str | None = None,
            priority: int = 0) -> GenRequest:
    """A request with the recipe's decoding settings (a ``Decoding`` section) and a seed."""
    return GenRequest(
        id=rid,
        user=user,
        system=system,
        max_new_tokens=dec.max_new_tokens,
        temperature=dec.temperature,
        top_p=dec.top_p,
        repetition_penalty=dec.repetition_penalty,
        seed=seed,
        stop=tuple(dec.stop),
        priority=priority,
    )


@dataclass
class GenResult:
    id: str
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None  # set when the request failed for good (after retries)
    cause: str | None = None  # with error: its cause, for counts (``HTTP 503``, ``timeout``, ``unparseable``)
    cached: bool = False
    retries: int = 0  # failed attempts before this result (a cached answer: 0)
    extra: dict = field(default_factory=dict)
    # the question's identity when a cache stands in front of the client (llm/cache.py): the answer to one
    # question is paid once, however many records asked it and however many attempts read it back
    key: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class StopRequests(Exception):
    """Raised by an ``on_result`` callback that cannot keep what it gets (the run store is down): the
    client starts no new request, still delivers the ones in flight (they are paid for), then
    raises ``error`` from ``run()``."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


@dataclass
class UsageTotals:
    """What a stage's answers cost: ``requests`` answers used (``cached``: of them, read from the answer
    cache; ``resumed``: read back from the records an earlier attempt of the stage saved), and their
    tokens, each question counted once (by its cache ``key`` where it has one). So the tokens are what
    the stage's data cost across its attempts, not what the last attempt alone paid."""

    requests: int = 0
    failed: int = 0
    cached: int = 0
    resumed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    seconds: float = 0.0
    # of the completion tokens, those the server decoded for this attempt (not read back, not shared): what
    # its serving time bought (a throughput's numerator)
    decoded_tokens: int = 0
    _counted: set[str] = field(default_factory=set, repr=False, compare=False)

    def add(self, r: GenResult) -> None:
        self.requests += 1
        self.failed += 0 if r.ok else 1
        self.cached += 1 if r.cached else 0
        self._count(r.key, r.prompt_tokens, r.completion_tokens, fresh=not r.cached)

    def add_saved(self, prompt_tokens: int, completion_tokens: int, key: str | None = None) -> None:
        """An answer an earlier attempt paid for and saved as a record, used again."""
        self.requests += 1
        self.resumed += 1
        self._count(key, prompt_tokens, completion_tokens, fresh=False)

    def _count(self, key: str | None, prompt_tokens: int, completion_tokens: int, fresh: bool) -> None:
        if key is not None:
            if key in self._counted:  # the same question, already paid: by another record or attempt
                return
            self._counted.add(key)
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.decoded_tokens += completion_tokens if fresh else 0


class LLMClient(ABC):
    """A teacher or judge. ``model_id`` is the exact model the answers came from."""

    model_id: str
    usage: UsageTotals

    @abstractmethod
    def run(
        self,
        requests: Sequence[GenRequest],
        on_result: Callable[[GenResult], None],
        desc: str = "generate",
    ) -> None:
        """Answer every request, calling ``on_result`` once per request as each finishes.

        Requests that fail for good are reported with ``error`` set, not raised, unless the
        failure means every request would fail (bad credentials, unknown model: ``BadInput``;
        the server unreachable after all retries or a spending cap: ``RetryableError``).
        """

    def enqueue(self, flow: Flow, req: GenRequest, on_result: Callable[[GenResult], None]) -> None:
        """Ask ``req`` within ``flow`` (see :mod:`bezoar_jobs.llm.flow`); ``on_result`` is called once,
        in the flow's thread. By default the request waits in a batch that the flow hands to :meth:`run`
        when nothing else is ready (the in-process client generates in batches); the pooled remote
        clients send it at once."""
        flow.batch(self, req, on_result)

    def busy_intervals(self) -> list[tuple[float, float]]:
        """(start, end) of every answered attempt, monotonic clock (remote clients; else none)."""
        return []

    def slot_capacity(self) -> int | None:
        """How many requests this client may keep in flight against its server (None: not a pooled client)."""
        return None

    def tail_counts(self) -> dict[str, int] | None:
        """What the pool did for this client's requests (pooled clients; else None): ``attempts`` sent,
        ``retries`` after a failure, ``hedged`` (a duplicate raced a late attempt), ``abandoned`` (an attempt
        cut at its deadline and sent again)."""
        return None

    def rating_distribution(
        self, requests: Sequence[GenRequest], prefix: str, options: Sequence[str]
    ) -> list[dict[str, float]]:
        """For each request, the probability of each option as the next text after the rendered
        prompt plus ``prefix`` (e.g. ``"Rating: "``), normalised over ``options``.

        Only the in-process client can do this; remote clients raise ``NotImplementedError`` and
        the recipe validator refuses ``filter.method: logprobs`` with a remote judge.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot score rating tokens")

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release resources (HTTP sessions, model memory)."""


# what a pooled client counts of its requests (LLMClient.tail_counts), recorded per role in each stage's
# manifest beside its utilization and shown by `bezoar status` and the report
TAIL_COUNTS = ("attempts", "retries", "hedged", "abandoned")


def tails_text(counts: dict[str, int] | None) -> str:
    """`` (12 retries, 3 hedged, 1 abandoned)`` for a role's counts; empty without any."""
    if not counts:
        return ""
    parts = [f"{counts[k]} {'retries' if k == 'retries' else k}" for k in TAIL_COUNTS[1:] if k in counts]
    return f" ({', '.join(parts)})" if parts else ""


def slot_utilization(intervals: Sequence[tuple[float, float]], capacity: int, t0: float, t1: float) -> float:
    """Busy slot-seconds over capacity-seconds in [t0, t1]: at each moment, min(attempts in flight that
    were answered, ``capacity``) slots count as busy (a client that keeps more in flight than the server
    decodes gets queueing, not more work done)."""
    if t1 <= t0 or capacity <= 0:
        return 0.0
    events: list[tuple[float, int]] = []
    for a, b in intervals:
        a, b = max(a, t0), min(b, t1)
        if b > a:
            events += [(a, 1), (b, -1)]
    events.sort()
    busy = 0.0
    n = 0
    last = t0
    for t, d in events:
        busy += min(n, capacity) * (t - last)
        n += d
        last = t
    return min(1.0, busy / (capacity * (t1 - t0)))
