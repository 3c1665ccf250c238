"""MT-Bench: two-turn questions, answers in the OpenBezoar prompt format, single-answer grading.

* Questions are in MT-Bench's ``question.jsonl`` format (``question_id``, ``category``, ``turns``
  with two user messages, optional ``reference`` with one answer per turn) or the column names of
  the hub copy (``prompt_id``, ``prompt``). A malformed question is an error naming file and line.
* Answers: turn 1 is the first message alone; turn 2 puts turn 1 and the model's own answer before
  the second message, both rendered by :func:`bezoar_jobs.data.prompt_format.render_prompt` (the
  one prompt format training used) and tokenised as training did. Temperature by category.
* Judging: one judge request per (model, question, turn); the turn-2 prompt shows the whole
  conversation and asks about the second reply only; math, reasoning and coding prompts carry the
  reference answers. The verdict is read as FastChat reads it (below). With an in-process judge the
  score may instead be the expected rating under the judge's next-token probabilities of "1".."10".
* References: without ``reference_answers`` they are the questions' own ``reference``. FastChat's judge
  never reads those: it takes its reference_answer/gpt-4.jsonl (long GPT-4 answers), while MT-Bench's
  question.jsonl (and so the hub copy) holds short human-written ones, and none for one coding question
  (123), which is then an error here. For FastChat's figures give its gpt-4.jsonl as
  ``reference_answers`` with its question.jsonl as ``reference_questions``.
* Scores: per model, the mean over judged answers overall, per turn and per category; unparseable
  verdicts are excluded from every mean and counted.

Verdict parsing follows FastChat's ``single`` mode: the first match of ``\\[\\[(\\d+\\.?\\d*)\\]\\]``,
else the first match of ``\\[(\\d+\\.?\\d*)\\]``, else no score. Where FastChat would keep a number
outside the 1-10 scale (``[[0]]``, ``[[100]]``), it is excluded here as unparseable: a score the
scale cannot hold is a misread verdict, and one would skew a mean of ten-point scores.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadInput
from ..llm.base import GenRequest, GenResult, LLMClient, request
from .judge_prompts import JudgePrompt, JudgePrompts

log = logging.getLogger("bezoar")

RATING_MIN, RATING_MAX = 1.0, 10.0
RATING_OPTIONS: tuple[str, ...] = tuple(str(i) for i in range(1, 11))

_ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


# ---------------------------------------------------------------------------------------------
# questions
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Question:
    qid: Any  # as in the file (FastChat uses ints)
    category: str
    turns: tuple[str, str]
    reference: tuple[str, ...]
    where: str  # file:line (or file: row N) for messages

    @property
    def key(self) -> str:
        return str(self.qid)


def _rows_with_lines(src: Any, field: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) pairs; JSONL files keep their line numbers, other sources a row number."""
    from ..data.io import PKG, iter_jsonl, load_rows, local_copy

    p = src.path
    if p.endswith((".jsonl", ".ndjson")) and (
        p.startswith((PKG, "s3://", "file://", "/", "./", "../")) or Path(p).exists()
    ):
        out = [(f"{p}:{n}", row) for n, row in iter_jsonl(local_copy(p), f"{field}: {p}")]
        if src.limit:
            out = out[: src.limit]
        if not out:
            raise BadInput(f"{field}: {p}: no questions")
        return out
    return [(f"{p}: row {i}", row) for i, row in enumerate(load_rows(src, (), field), start=1)]


def _texts(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple) and all(isinstance(x, str) for x in value):
        return list(value)
    return None


def parse_question(row: dict[str, Any], where: str, field: str = "evaluation.mtbench.questions") -> Question:
    qid = row.get("question_id", row.get("prompt_id"))
    if qid is None:
        raise BadInput(f"{field}: {where}: missing 'question_id'")
    category = row.get("category")
    if not isinstance(category, str) or not category.strip():
        raise BadInput(f"{field}: {where}: question {qid}: missing or empty 'category'")
    raw_turns = row.get("turns", row.get("prompt"))
    turns = _texts(raw_turns) if raw_turns is not None else None
    if turns is None:
        raise BadInput(f"{field}: {where}: question {qid}: 'turns' must be a list of two user messages")
    if len(turns) != 2 or not all(t.strip() for t in turns):
        n = sum(1 for t in turns if t.strip())
        raise BadInput(
            f"{field}: {where}: question {qid}: 'turns' has {n} non-empty turn(s); MT-Bench questions have exactly 2"
        )
    ref_raw = row.get("reference")
    reference: list[str] = []
    if ref_raw not in (None, [], ""):
        got = _texts(ref_raw)
        if got is None:
            raise BadInput(f"{field}: {where}: question {qid}: 'reference' must be a list of strings")
        reference = got
    return Question(
        qid=qid, category=category.strip(), turns=(turns[0], turns[1]), reference=tuple(reference), where=where
    )


def load_questions(cfg: Any) -> list[Question]:
    """The recipe's questions (``evaluation.mtbench``), checked, with references merged in."""
    field = "evaluation.mtbench.questions"
    questions = [parse_question(row, where, field) for where, row in _rows_with_lines(cfg.questions, field)]
    seen: dict[str, str] = {}
    for q in questions:
        if q.key in seen:
            raise BadInput(f"{field}: {q.where}: question_id {q.qid} repeats {seen[q.key]}")
        seen[q.key] = q.where
    # every question the file has, for matching references before the categories cut the list
    complete = not cfg.questions.limit and not cfg.categories
    if cfg.categories:
        questions = [q for q in questions if q.category in set(cfg.categories)]
        if not questions:
            raise BadInput(
                f"evaluation.mtbench.categories: no question has one of the categories {list(cfg.categories)}"
            )
    if cfg.reference_answers is not None:
        questions = with_reference_file(questions, cfg, complete)
    for q in questions:
        if q.category in cfg.reference_categories and len(q.reference) < 2:
            raise BadInput(
                f"{field}: {q.where}: question {q.qid} ({q.category}) needs a reference answer for each of its two "
                f"turns (it has {len(q.reference)}); give 'reference' or evaluation.mtbench.reference_answers"
            )
    return questions


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def with_reference_file(questions: list[Question], cfg: Any, complete: bool = True) -> list[Question]:
    """References from an answer file in FastChat's format (``question_id``, ``choices[0].turns``),
    matched to the questions by id, through ``reference_id_map``, or by the first turn's text via
    ``reference_questions`` (FastChat's question.jsonl). A reference that matches no question is an
    error (unless ``questions.limit`` / ``categories`` leave questions out), and so is a question of a
    reference category that gets none: the file replaces the questions' own references, it never
    silently falls back to them."""
    field = "evaluation.mtbench.reference_answers"
    refs: list[tuple[str, str, list[str]]] = []  # (where, answer-file id, turns)
    for where, row in _rows_with_lines(cfg.reference_answers, field):
        qid = row.get("question_id")
        choices = row.get("choices")
        turns = None
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            turns = _texts(choices[0].get("turns"))
        if qid is None or turns is None:
            raise BadInput(f"{field}: {where}: expected question_id and choices[0].turns (a list of strings)")
        refs.append((where, str(qid), turns))
    by_key = {q.key: q for q in questions}
    target: dict[str, str] = {}  # answer-file id -> our question key
    if cfg.reference_questions is not None:
        qfield = "evaluation.mtbench.reference_questions"
        texts: dict[str, str] = {}
        for where, row in _rows_with_lines(cfg.reference_questions, qfield):
            q = parse_question(row, where, qfield)
            texts[q.key] = _norm(q.turns[0])
        ours = {_norm(q.turns[0]): q.key for q in questions}
        for where, rid, _ in refs:
            if rid not in texts:
                raise BadInput(f"{field}: {where}: question_id {rid} is not in evaluation.mtbench.reference_questions")
            if texts[rid] in ours:
                target[rid] = ours[texts[rid]]
    elif cfg.reference_id_map:
        target = {rid: str(cfg.reference_id_map[rid]) for _, rid, _ in refs if rid in cfg.reference_id_map}
    else:
        target = {rid: rid for _, rid, _ in refs if rid in by_key}
    unmatched = [(where, rid) for where, rid, _ in refs if target.get(rid) not in by_key]
    if unmatched and complete:
        where, rid = unmatched[0]
        how = ("by the text of its question in reference_questions" if cfg.reference_questions is not None
               else "through reference_id_map" if cfg.reference_id_map else "by question_id")
        raise BadInput(
            f"{field}: {where}: the reference for question_id {rid} matches none of the questions {how} "
            f"({len(unmatched)} of {len(refs)} references unmatched; the questions' ids look like "
            f"{', '.join(list(by_key)[:3])}): give reference_questions (match by text) or reference_id_map"
        )
    got: dict[str, list[str]] = {}
    for _, rid, turns in refs:
        if target.get(rid) in by_key:
            got[target[rid]] = turns
    out = []
    for q in questions:
        if q.category in cfg.reference_categories and q.key not in got:
            raise BadInput(
                f"{field}: no reference answer for question {q.qid} ({q.category}, {q.where}); the file's references "
                f"replace the questions' own, so every {'/'.join(cfg.reference_categories)} question needs one"
            )
        r = got.get(q.key)
        out.append(Question(q.qid, q.category, q.turns, tuple(r), q.where) if r else q)
    return out


# ---------------------------------------------------------------------------------------------
# verdicts and scores
# ---------------------------------------------------------------------------------------------
def parse_rating(judgment: str) -> float | None:
    """The score in a judge's text, read as FastChat does (see the module docstring), or None."""
    m = _ONE_SCORE.search(judgment) or _ONE_SCORE_BACKUP.search(judgment)
    if not m:
        return None
    try:
        value = float(m.group(1))
    except ValueError:  # pragma: no cover - the pattern only matches digits and one dot
        return None
    if not math.isfinite(value) or not RATING_MIN <= value <= RATING_MAX:
        return None
    return value


def _mean(xs: Sequence[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def aggregate(judgments: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model: overall, per-turn and per-category mean scores over the judged answers.

    ``judgments`` are records with ``model``, ``category``, ``turn`` and ``score`` (None when the
    verdict could not be read or the judge request failed: excluded from every mean, counted under
    ``excluded``). The overall score is the mean of all judged answers of both turns (FastChat's
    "average"); a category's score is likewise over both turns.
    """
    per: dict[str, dict[str, Any]] = {}
    for j in judgments:
        m = per.setdefault(j["model"], {"all": [], "turns": {}, "categories": {}, "excluded": 0, "n": 0})
        m["n"] += 1
        if j.get("score") is None:
            m["excluded"] += 1
            m["categories"].setdefault(j["category"], [])
            continue
        s = float(j["score"])
        m["all"].append(s)
        m["turns"].setdefault(str(j["turn"]), []).append(s)
        m["categories"].setdefault(j["category"], []).append(s)
    out = {}
    for model, m in per.items():
        out[model] = {
            "overall": _mean(m["all"]),
            "turns": {t: _mean(v) for t, v in sorted(m["turns"].items())},
            "categories": {c: _mean(v) for c, v in sorted(m["categories"].items())},
            "judged": len(m["all"]),
            "excluded": m["excluded"],
            "judgments": m["n"],
        }
    return out


# ---------------------------------------------------------------------------------------------
# judge prompts
# ---------------------------------------------------------------------------------------------
def judge_input(prompts: JudgePrompts, q: Question, answers: Sequence[str], turn: int,
                reference_categories: Sequence[str]) -> tuple[JudgePrompt, str]:
    """The prompt chosen for (question, turn) and its filled text.

    Turn 2 shows the whole conversation (both user messages and both answers) and asks about the
    second answer; reference categories get the reference answers of both turns.
    """
    with_ref = q.category in reference_categories and len(q.reference) >= turn
    prompt = prompts.pick(turn, with_ref)
    values: dict[str, str]
    if turn == 1:
        values = {"question": q.turns[0], "answer": answers[0]}
    elif turn == 2:
        values = {"question_1": q.turns[0], "answer_1": answers[0], "question_2": q.turns[1], "answer_2": answers[1]}
    else:
        raise ValueError(f"turn must be 1 or 2, not {turn}")
    if with_ref:
        values["ref_answer_1"] = q.reference[0]
        if len(q.reference) > 1:
            values["ref_answer_2"] = q.reference[1]
    return prompt, prompt.render(**values)


def judge(
    client: LLMClient,
    method: str,
    prompts: JudgePrompts,
    questions: Sequence[Question],
    answers: dict[str, list[str]],
    model_label: str,
    decoding: Any,
    reference_categories: Sequence[str],
    seed: int,
    logprobs_prefix: str = "Rating: [[",
) -> list[dict[str, Any]]:
    """Judge both turns of every question for one model; one record per judgment.

    Failed requests (after the client's retries) and unreadable verdicts are kept with ``score``
    None and the reason under ``excluded``; the caller decides whether too many failed.
    """
    items: list[tuple[GenRequest, Question, int, JudgePrompt]] = []
    for q in questions:
        for turn in (1, 2):
            prompt, text = judge_input(prompts, q, answers[q.key], turn, reference_categories)
            req = request(f"{model_label}/{q.key}/t{turn}", text, decoding, seed, system=prompt.system)
            items.append((req, q, turn, prompt))
    base = [{
        "model": model_label,
        "question_id": q.qid,
        "category": q.category,
        "turn": turn,
        "judge": client.model_id,
        "judge_prompt": prompt.name,
        "user_prompt": req.user,
    } for req, q, turn, prompt in items]
    if method == "logprobs":
        dists = client.rating_distribution([it[0] for it in items], logprobs_prefix, RATING_OPTIONS)
        out = []
        for rec, dist in zip(base, dists, strict=True):
            score: float | None = round(sum(float(k) * p for k, p in dist.items()), 3)
            top = max(dist, key=lambda k: dist[k])
            out.append(
                {
                    **rec,
                    "score": score,
                    "excluded": None,
                    "distribution": {k: round(v, 5) for k, v in dist.items()},
                    "judgment": f"expected rating {score:.2f} from the judge's probabilities of the tokens 1-10 after "
                    f"{logprobs_prefix!r} (most likely {top}, p={dist[top]:.2f})",
                }
            )
        return out
    results: dict[str, GenResult] = {}

    def on_result(res: GenResult) -> None:
        results[res.id] = res

    client.run([it[0] for it in items], on_result, desc=f"judge:{model_label}")
    out = []
    for rec, (req, _q, _t, _p) in zip(base, items, strict=True):
        res = results.get(req.id)
        if res is None or not res.ok:
            why = res.error if res is not None else "no answer"
            out.append({**rec, "judgment": "", "score": None, "excluded": f"judge request failed: {why}"})
            continue
        score = parse_rating(res.text)
        out.append({
            **rec,
            "judgment": res.text,
            "score": score,
            "excluded": None if score is not None else "no [[rating]] on the 1-10 scale in the verdict",
            "tokens": [res.prompt_tokens, res.completion_tokens],
        })
    return out


# ---------------------------------------------------------------------------------------------
# answers
# ---------------------------------------------------------------------------------------------
def temperature_for(cfg: Any, category: str) -> float:
    return float(cfg.temperatures.get(category, cfg.default_temperature))


def answer_prompt(q: Question, turn: int, first_answer: str | None, system: str | None) -> str:
    """The prompt the model continues for ``turn``: turn 2 carries turn 1 and its answer."""
    from ..data.prompt_format import render_prompt

    if turn == 1:
        return render_prompt(q.turns[0], system=system)
    if first_answer is None:
        raise ValueError("turn 2 needs the model's answer to turn 1")
    return render_prompt(q.turns[1], system=system, history=[(q.turns[0], first_answer)])


def generate_answers(
    model: Any,
    tokenizer: Any,
    questions: Sequence[Question],
    cfg: Any,
    add_bos: bool,
    seed: int,
    check_stop: Callable[[], None] = lambda: None,
) -> dict[str, dict[str, Any]]:
    """Both turns for every question: ``{question key: {"turns": [a1, a2], "tokens": [n1, n2], ...}}``.

    Each row of a batch decodes at its own category's temperature (greedy where it is 0), so the
    categories share batches instead of splitting them per temperature. Sampled rows keep the model's
    top_k / top_p (transformers' default top_k 50), as FastChat's answers do.
    """
    out: dict[str, dict[str, Any]] = {q.key: {"turns": [], "tokens": [], "finish": []} for q in questions}
    for turn in (1, 2):
        items = []
        for q in questions:
            first = out[q.key]["turns"][0] if turn == 2 else None
            items.append((q, answer_prompt(q, turn, first, cfg.answer_system)))
        items.sort(key=lambda it: len(it[1]))  # similar lengths together: less padding
        bs = cfg.answer_batch_size
        for i in range(0, len(items), bs):
            batch = items[i:i + bs]
            check_stop()
            texts = _generate(
                model,
                tokenizer,
                [p for _, p in batch],
                [temperature_for(cfg, q.category) for q, _ in batch],
                cfg.answer_max_new_tokens,
                add_bos,
                seed + 7919 * turn + i,
            )
            for (q, _), (text, n, finish) in zip(batch, texts, strict=True):
                out[q.key]["turns"].append(text)
                out[q.key]["tokens"].append(n)
                out[q.key]["finish"].append(finish)
    return out


def _row_temperature(temps: list[float]) -> Any:
    """A logits processor: row i sampled at temps[i], or greedy (only its argmax left) when 0."""
    import torch
    from transformers import LogitsProcessor

    class RowTemperature(LogitsProcessor):
        def __init__(self) -> None:
            self.t: Any = None

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            if self.t is None or self.t.device != scores.device:
                self.t = torch.tensor(temps, dtype=scores.dtype, device=scores.device).unsqueeze(1)
            greedy = torch.full_like(scores, float("-inf")).scatter(1, scores.argmax(-1, keepdim=True), 0.0)
            return torch.where(self.t > 0, scores / self.t.clamp(min=1e-6), greedy)

    return RowTemperature()


def _generate(model: Any, tok: Any, prompts: list[str], temperatures: list[float], max_new_tokens: int, add_bos: bool,
              seed: int) -> list[tuple[str, int, str]]:
    """(text, new tokens, finish reason) per prompt: one left-padded batch."""
    import torch
    from transformers import LogitsProcessorList

    from ..data.prompt_format import STOP_STRINGS, cut_at_stop
    from ..training.examples import encode

    eos = tok.eos_token_id
    rows = []
    for p in prompts:
        ids = encode(tok, p, add_bos)
        if ids and eos is not None and ids[-1] == eos:  # a tokenizer that ends every text with EOS
            ids = ids[:-1]
        rows.append(ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=model.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
    kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": pad,
                          "stop_strings": list(STOP_STRINGS), "tokenizer": tok}
    if any(t > 0 for t in temperatures):
        torch.manual_seed(seed)
        # sampling with the per-row temperatures applied by the processor (greedy rows keep one token).
        # top_k / top_p are left to the model's generation config (transformers' defaults: top_k 50, top_p 1),
        # as FastChat's gen_model_answer.py leaves them (it passes do_sample and temperature only);
        # transformers applies them after a passed processor, so after the temperature, as FastChat's are
        kw.update(do_sample=True, temperature=1.0,
                  logits_processor=LogitsProcessorList([_row_temperature(temperatures)]))
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        gen = model.generate(input_ids=input_ids, attention_mask=mask, **kw)
    new = gen[:, width:]
    eos_ids = {eos} if eos is not None else set()
    cfg_eos = getattr(model.generation_config, "eos_token_id", None)
    eos_ids.update(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos] if cfg_eos is not None else [])
    out = []
    for row in new.tolist():
        n, finish = len(row), "length"
        for j, t in enumerate(row):
            if t in eos_ids:
                n, finish = j, "stop"
                break
        text = tok.decode(row[:n], skip_special_tokens=True)
        cut = cut_at_stop(text)
        if len(cut) < len(text.strip()):
            finish = "stop"
        out.append((cut, n, finish))
    return out
