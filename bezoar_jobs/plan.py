"""``bezoar plan``: what would run or be skipped and why, with expected requests, tokens and cost.

Figures are upper bounds computed from the recipe alone (counts x max_new_tokens; prompt sizes from
the template lengths at ~4 characters a token), so a user can price a run before paying for it.
Training, the harness and the report send no API requests: their rows show 0 (their cost is GPU
time, which the manifests record once they ran).
"""

from __future__ import annotations

from typing import Any

from .data.io import read_text_uri
from .errors import BadInput
from .manifest import read_manifest
from .recipe import Decoding, Endpoint, Recipe
from .runner import up_to_date
from .store import Store

CHARS_PER_TOKEN = 4
TYPICAL_INSTRUCTION_TOKENS = 40  # a seed or generated instruction, for prompt-size estimates


def _tmpl_tokens(uri: str) -> int:
    try:
        return len(read_text_uri(uri)) // CHARS_PER_TOKEN
    except BadInput:
        return 100


class _Tally:
    def __init__(self) -> None:
        self.requests = 0
        self.prompt = 0
        self.completion = 0
        self.by_endpoint: list[tuple[Endpoint, int, int]] = []

    def add(self, endpoint: Endpoint, n: int, prompt_each: int, dec: Decoding) -> None:
        self.requests += n
        self.prompt += n * prompt_each
        self.completion += n * dec.max_new_tokens
        self.by_endpoint.append((endpoint, n * prompt_each, n * dec.max_new_tokens))

    def cost(self) -> float | None:
        total, priced = 0.0, False
        for e, p, c in self.by_endpoint:
            if e.price_input_per_mtok is not None or e.price_output_per_mtok is not None:
                priced = True
                total += p / 1e6 * (e.price_input_per_mtok or 0) + c / 1e6 * (e.price_output_per_mtok or 0)
        return round(total, 4) if priced else None


def _expected_rows(recipe: Recipe, scheme: str) -> int:
    g = recipe.generation
    if scheme == "lamini":
        n = (g.lamini.example_prompts + g.lamini.topic_prompts) * g.lamini.instructions_per_prompt
        return min(n, g.lamini.max_instructions) if g.lamini.max_instructions else n
    if scheme == "evol":
        return g.evol.seeds * g.evol.rounds
    return g.orca.seeds


def _question_count(src) -> int:
    """Questions in a local or packaged question file; MT-Bench's 80 when it lives on the hub."""
    from .data.io import PKG, local_copy

    if src.path.startswith((PKG, "/", "./", "file://")):
        try:
            n = sum(1 for line in local_copy(src.path).read_text(encoding="utf-8").splitlines() if line.strip())
            return min(n, src.limit) if src.limit else n
        except BadInput:
            pass
    return src.limit or 80


def estimate(recipe: Recipe, store: Store, stage: str) -> _Tally:
    t = _Tally()
    g = recipe.generation
    ins = TYPICAL_INSTRUCTION_TOKENS
    if stage == "generate-lamini":
        c = g.lamini
        prompt = _tmpl_tokens(c.example_template.path) + c.examples_per_prompt * ins
        t.add(recipe.teacher, c.example_prompts + c.topic_prompts, prompt, c.instruction_decoding)
        t.add(recipe.teacher, _expected_rows(recipe, "lamini"), ins, c.response_decoding)
    elif stage == "generate-evol":
        c = g.evol
        n = c.seeds * c.rounds
        t.add(recipe.teacher, n, 100 + ins, c.evolve_decoding)
        t.add(recipe.teacher, n, 2 * ins, c.response_decoding)
        if c.equality_check:
            t.add(recipe.judge, n, _tmpl_tokens(c.equality_template.path) + 2 * ins, recipe.filter.decoding.model_copy(update={"max_new_tokens": 8}))
    elif stage == "generate-orca":
        c = g.orca
        t.add(recipe.teacher, c.seeds, 60 + 2 * ins, c.response_decoding)
    elif stage == "eval-mtbench":
        mt = recipe.evaluation.mtbench
        if mt.enabled:
            n_models = len(recipe.evaluation.model_names())
            n_q = _question_count(mt.questions)
            judge = mt.judge or recipe.judge
            dec = mt.judge_decoding if mt.judge_method == "generate" else mt.judge_decoding.model_copy(update={"max_new_tokens": 1})
            # two turns per question and model, each graded once; answers come from the checkpoints themselves
            t.add(judge, 2 * n_q * n_models, _tmpl_tokens(mt.judge_prompts) + 3 * mt.answer_max_new_tokens // 2, dec)
    elif stage.startswith("filter-"):
        scheme = stage.split("-", 1)[1]
        m = read_manifest(store, f"generate-{scheme}")
        rows = m["counts"].get("rows", 0) if m else _expected_rows(recipe, scheme)
        prompt = _tmpl_tokens(recipe.filter.rubric_template.path) + ins + 200
        if recipe.filter.method == "logprobs":
            t.add(recipe.judge, rows, prompt, recipe.filter.decoding.model_copy(update={"max_new_tokens": 1}))
        else:
            t.add(recipe.judge, rows, prompt, recipe.filter.decoding)
    return t


def plan(recipe: Recipe, store: Store, stages: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in stages:
        ok, why = up_to_date(store, recipe, name)
        t = estimate(recipe, store, name)
        rows.append({
            "stage": name,
            "action": "skip" if ok else "run",
            "why": why,
            "requests": t.requests if not ok else 0,
            "prompt_tokens": t.prompt if not ok else 0,
            "completion_tokens": t.completion if not ok else 0,
            "cost_usd": (t.cost() if not ok else (0.0 if t.cost() is not None else None)),
        })
    return rows
