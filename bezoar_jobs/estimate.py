"""The pieces ``bezoar plan``'s request estimates are made of (each stage module estimates its own).

An :class:`Ask` is a number of requests to one endpoint, with the prompt size a request typically
has and the completion it typically gets, and the worst case beside them: every completion at its
``max_new_tokens``. The typical completions are the figures in :class:`Typical` (what such answers
run to: a JSON verdict is 50-80 tokens, not the 256 it may take; a long-form teacher answer often
reaches its cap); prompt sizes come from the template files and from the seed data itself where it
is a local file (:func:`mean_tokens`), else from the documented figures below, at about four
characters a token. When an earlier stage is committed, its real outputs size the next one's
prompts (the filters read the generated rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from .errors import BadInput
from .recipe_base import DatasetSource, Decoding, Endpoint

CHARS_PER_TOKEN = 4
TYPICAL_INSTRUCTION_TOKENS = 40  # a seed or generated instruction, for prompt-size estimates
# databricks-dolly-15k: instructions average ~18 tokens; about 30% of rows carry a context passage
# of ~230 tokens on average, so a seed task (instruction, blank line, passage) averages ~85 tokens
DOLLY_SEED_TOKENS = 85
# a LaMini-generated instruction (one line, 10-30 words)
GENERATED_INSTRUCTION_TOKENS = 25
# Flan Collection zero-shot inputs (CoT and T0 short, NIv2 with its task definition long)
FLAN_INPUT_TOKENS = 200
FLAN_TARGET_TOKENS = 20
# MT-Bench: a turn's question, and a reference answer (math, reasoning, coding)
MTBENCH_QUESTION_TOKENS = 60
MTBENCH_REFERENCE_TOKENS = 150


class Typical:
    """Completion tokens a request typically takes. An int is a token count (capped at the
    request's ``max_new_tokens``); a float is a fraction of ``max_new_tokens``."""

    INSTRUCTION_LIST = 0.5  # LaMini: 20 instructions in tags, about half of a 1024-token cap
    TOPIC_LIST = 0.5  # LaMini topics: a list of short names
    RESPONSE = 0.75  # long-form teacher answers: the paper's run up to their 512-768 caps
    EVOLVED = 120  # an evolved task: the seed plus 10-20 words (its passage kept)
    EQUALITY = 2  # "Equal" / "Different"
    VERDICT = 70  # the filter's JSON verdict (status, rating, a sentence of reason): 50-80
    MTBENCH_JUDGMENT = 300  # a short explanation then [[rating]]: 200-400
    MTBENCH_ANSWER = 0.4  # an evaluated 3B model's MT-Bench answer: a few hundred of its 1,024 tokens


@dataclass(frozen=True)
class Ask:
    """``requests`` requests to ``endpoint`` of about ``prompt_tokens`` each (at most
    ``prompt_tokens_max``), decoded with ``decoding``, each answered with about ``typical``
    completion tokens (see :class:`Typical`; None: ``max_new_tokens``)."""

    endpoint: Endpoint
    requests: int
    prompt_tokens: int
    decoding: Decoding
    typical: int | float | None = None
    what: str = ""
    prompt_tokens_max: int | None = None
    # the worst case asks each request up to this many times (the filter asks an unreadable verdict again, up to
    # filter.max_attempts: a verdict cut at its cap is the likely unreadable one)
    attempts_max: int = 1

    @property
    def completion_per_request(self) -> int:
        cap = self.decoding.max_new_tokens
        if self.typical is None:
            return cap
        if isinstance(self.typical, float):
            return max(1, round(cap * self.typical))
        return min(cap, self.typical)

    @property
    def completion_tokens(self) -> int:
        return self.requests * self.completion_per_request

    @property
    def completion_tokens_max(self) -> int:
        return self.requests * self.attempts_max * self.decoding.max_new_tokens

    @property
    def format_tokens(self) -> int:
        """What the endpoint's raw prompt format adds around the texts (h2oGPT's markers, ~8 tokens)."""
        fmt = self.endpoint.prompt_format or ""
        return tokens(fmt.replace("{system}", "").replace("{user}", ""))

    @property
    def prompt_total(self) -> int:
        return self.requests * (self.prompt_tokens + self.format_tokens)

    @property
    def prompt_total_max(self) -> int:
        return self.requests * self.attempts_max * ((self.prompt_tokens_max or self.prompt_tokens) + self.format_tokens)


def tokens(text: str) -> int:
    return len(text) // CHARS_PER_TOKEN


def template_tokens(uri: str) -> int:
    """A template file's length in tokens (100 when it cannot be read here)."""
    from .data.io import read_text_uri

    try:
        return tokens(read_text_uri(uri))
    except BadInput:
        return 100


def _is_local_file(src: DatasetSource) -> bool:
    from .data.io import is_local_source

    return is_local_source(src.path)


@lru_cache(maxsize=32)
def _mean_tokens(src: DatasetSource, fields: tuple[str, ...], sample: int) -> float | None:
    from .data.io import stream_rows

    total, n = 0, 0
    try:
        for row in stream_rows(src, fields, "estimate"):
            total += tokens("\n\n".join(str(row.get(f) or "") for f in fields))
            n += 1
            if n >= sample:
                break
    except BadInput:
        return None
    return total / n if n else None


def mean_tokens(src: DatasetSource, fields: Sequence[str], default: int, sample: int = 2000) -> int:
    """The mean size of ``fields`` joined, over the first ``sample`` rows of a local seed file;
    ``default`` for hub datasets and files the plan cannot read here (it never downloads)."""
    if not _is_local_file(src):
        return default
    got = _mean_tokens(src, tuple(fields), sample)
    return default if got is None else max(1, round(got))


def dolly_seed_tokens(src: DatasetSource | None = None) -> int:
    """A dolly seed task's typical size: instruction plus passage."""
    return DOLLY_SEED_TOKENS if src is None else mean_tokens(src, ("instruction", "context"), DOLLY_SEED_TOKENS)
