"""LLM-judge filtering of a generated dataset (filter-lamini, filter-evol, filter-orca).

The judge rates each (instruction, response) with the recipe's rubric. Two methods:
- ``generate``: the judge writes a verdict; we parse JSON first, then tolerant fallbacks. A verdict
  that says nothing is not an answer: an unparseable verdict is asked again (another seed) up to
  ``filter.max_attempts`` times, and a row whose verdict stays unparseable (or whose judge request
  failed for good) *fails*: it is neither kept nor rejected, it is written to ``failed/`` with the
  judge's raw text, counted, and named in a WARNING. More than ``generation.max_failed_fraction`` of
  failed rows fail the stage (retryable); an unparseable answer is never cached or taken as done, so
  the rerun asks the judge again.
- ``logprobs`` (in-process judge only): the rating is the expected value of the judge's
  next-token distribution over "1".."10" after the rubric and "Rating: ". A small local model
  gives usable, deterministic verdicts this way where its free text would not parse.
Kept rows go to data/, dropped ones to rejected/, both with ``{judge}_status/_rating/_reason``. A
filter that keeps nothing is an error (exit 2) unless ``filter.allow_empty`` says otherwise.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from ..data.io import dataset_card, load_template, read_jsonl, render, write_jsonl
from ..errors import BadInput
from ..estimate import Ask, Typical, template_tokens, tokens
from ..llm.base import GenRequest, GenResult, LLMClient, request
from ..manifest import read_manifest
from ..recipe import Recipe
from ..recipe_view import get_path
from ..registry import scheme as scheme_def
from ..registry import spec
from ..runner import StageContext, StageOutput
from ..store import Store
from .common import Phase, causes_text, check_losses, endpoint_info, open_client, run_flow, usage_dict, utilization
from .records import stable_hash

log = logging.getLogger("bezoar")

RATING_OPTIONS = tuple(str(i) for i in range(1, 11))


def scheme_of(stage: str) -> str:
    """The generation scheme a filter stage judges (its registry entry's ``scheme``)."""
    name = spec(stage).scheme
    if name is None:
        raise BadInput(f"{stage}: not a stage of a generation scheme")
    return name


def pair(scheme: str, row: dict[str, Any], recipe: Recipe | None = None) -> tuple[str, str]:
    """The (instruction, response) the judge sees for a row of ``scheme`` (the scheme module's
    ``judge_pair``, which may read the recipe fields its Scheme entry declares in ``filter_reads``:
    the Orca judge is shown the gold target when ``generation.orca.judge_sees_target``)."""
    ins, resp = scheme_def(scheme).load().judge_pair(row, recipe)
    return str(ins), str(resp)


# ---- verdict parsing ----------------------------------------------------------------------------
_JSON_OBJ = re.compile(r"\{.*?\}", re.S)
_NUMBER = r"(\d+(?:\.\d+)?)(?![\d.]*\d)"  # a whole number: never the start of a longer one
# "Rating: 7", "**Rating**: 7", "rating (1-10): 7" (a scale note in brackets is passed over, never read as the
# rating; nor is an opening bracket of the rubric's own "<1-10>" in front of a number)
_RATING = re.compile(r"\brating(?:[\s*]*[(\[][^)\]\n]{0,20}[)\]])?[^\w(<\[{]{0,5}" + _NUMBER, re.I)
_OUT_OF = re.compile(r"(?<![\d.])" + _NUMBER + r"\s*(?:/|out of)\s*10\b(?![./]\d)", re.I)
_BRACKETS = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")
# what may follow a number that is not a rating on our scale: a range ("1-10", "7 to 8") or another scale ("4/5")
_RANGE_AFTER = re.compile(r"\s*(?:-|–|to\b)\s*\d", re.I)
_SCALE_AFTER = re.compile(r"\s*(?:/|out of\b)\s*(\d+(?:\.\d+)?)", re.I)
_VALUE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:(?:/|out of)\s*(\d+(?:\.\d+)?))?\s*", re.I)
# a labelled status ('"status": "pass"', "Verdict: FAIL"), else the bare words
_STATUS_LABEL = re.compile(r"\b(?:status|verdict)\W{0,5}(pass|fail)\b", re.I)
_STATUS_WORD = re.compile(r"\b(pass|fail)\b", re.I)


def _clamp(x: float) -> float | None:
    return x if 1.0 <= x <= 10.0 else None


def _on_scale(text: str, end: int) -> bool:
    """Whether the number that ends at ``end`` in ``text`` is a rating on the 1-10 scale: not the
    start of a range ("1-10") and not out of another scale ("4/5", "3 out of 5")."""
    if _RANGE_AFTER.match(text, end):
        return False
    other = _SCALE_AFTER.match(text, end)
    return other is None or float(other.group(1)) == 10.0


def _rating_value(value: object) -> float | None:
    """A JSON ``rating``: a number or a numeric string ("8", "8.5", "8/10"), on the 1-10 scale; a
    boolean, a range or a rating out of another scale ("4/5") is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return _clamp(float(value))
    if isinstance(value, str):
        m = _VALUE.fullmatch(value)
        if m and (m.group(2) is None or float(m.group(2)) == 10.0):
            return _clamp(float(m.group(1)))
    return None


def _json_objects(text: str) -> Iterator[object]:
    """Every JSON object in ``text``, outer ones first: read with the JSON decoder at each "{" (so a
    brace inside a string, as in a reason that quotes code, does not cut the object short), else the
    shortest "{...}" there with single quotes and a trailing comma tolerated."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            yield decoder.raw_decode(text, m.start())[0]
            continue
        except json.JSONDecodeError:
            pass
        blob = _JSON_OBJ.match(text, m.start())
        if blob is None:
            continue
        try:
            yield json.loads(re.sub(r",\s*}", "}", blob.group(0).replace("'", '"')))
        except json.JSONDecodeError:
            continue


def _status_in(text: str) -> str | None:
    """pass/fail from free text: a labelled status, else the one of the two words that occurs (neither
    or both: None, the rating decides). "passage", "fails" and "failure" are not verdicts."""
    said = _STATUS_LABEL.search(text)
    if said:
        return said.group(1).lower()
    words = {w.lower() for w in _STATUS_WORD.findall(text)}
    return words.pop() if len(words) == 1 else None


def parse_verdict(text: str) -> dict[str, Any] | None:
    """``{"status", "rating", "reason"}`` from a judge's text, or None when it cannot be read.

    JSON first (the first object that has a rating on the 1-10 scale, tolerating single quotes and
    trailing commas), then "[[7]]", "rating: 7", "7/10"; status from the JSON, else a labelled
    "status: pass" or the one word pass/fail, else None (the caller decides from the rating). A number
    that is the start of a range ("rating (1-10)", the rubric's own "<1-10>") or out of another scale
    ("4/5") is never read as the rating.
    """
    for obj in _json_objects(text):
        if isinstance(obj, dict) and "rating" in obj:
            rating = _rating_value(obj["rating"])
            if rating is None:
                continue
            said = str(obj.get("status", "")).strip().lower()
            return {
                "status": said if said in ("pass", "fail") else None,
                "rating": rating,
                "reason": str(obj.get("reason", "")).strip(),
            }
    for rx in (_BRACKETS, _RATING, _OUT_OF):
        for found in rx.finditer(text):
            rating = _clamp(float(found.group(1)))
            if rating is not None and (rx is _OUT_OF or _on_scale(text, found.end(1))):
                return {"status": _status_in(text), "rating": rating, "reason": text.strip()[:500]}
    return None


def decide(verdict: dict[str, Any], threshold: float, require_pass: bool) -> bool:
    ok = verdict["rating"] >= threshold
    if require_pass and verdict.get("status") is not None:
        ok = ok and verdict["status"] == "pass"
    return ok


# ---- the stage ----------------------------------------------------------------------------------
def run_filter(ctx: StageContext) -> StageOutput:
    r = ctx.recipe
    cfg = r.filter
    scheme = scheme_of(ctx.name)
    src = f"generate-{scheme}"
    data_dir = ctx.fetch_input(src, "data")
    rows = read_jsonl(data_dir / "train.jsonl", ("id",), f"{ctx.store.url(src)}/data/train.jsonl")
    if not rows:
        raise BadInput(f"{ctx.name}: {src} committed an empty dataset")
    if cfg.method == "logprobs":
        rubric = load_template(cfg.rating_template.path, "filter.rating_template")
    else:
        rubric = load_template(cfg.rubric_template.path, "filter.rubric_template")
    judge_col = cfg.judge_name
    prompts = {}
    for row in rows:
        ins, resp = pair(scheme, row, r)
        prompts[row["id"]] = render(rubric, instruction=ins, response=resp)
    verdicts: dict[str, dict[str, Any]] = {}
    judge = open_client(ctx, r.judge, "judge", cached=cfg.method == "generate", accept=_parses)
    t0 = time.monotonic()
    try:
        if cfg.method == "logprobs":
            verdicts = _rate_logprobs(ctx, judge, rows, prompts)
        else:
            verdicts = _rate_generate(ctx, judge, rows, prompts)
        usage = judge.usage
        busy = utilization({"judge": judge}, t0, time.monotonic())
    finally:
        judge.close()
    kept: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for row in rows:
        v = verdicts[row["id"]]
        out = {
            **row,
            f"{judge_col}_status": v["status"],
            f"{judge_col}_rating": v["rating"],
            f"{judge_col}_reason": v["reason"],
        }
        (failed if v["status"] == "error" else kept if v["keep"] else dropped).append(out)
    causes = Counter(str(v["cause"]) for v in verdicts.values() if v["status"] == "error")
    check_losses(ctx, ctx.name, len(rows), causes,
                 {x["id"]: str(x[f"{judge_col}_reason"]) for x in failed}, judge.usage.retries, unit="rows")
    if not kept and not cfg.allow_empty:
        raise BadInput(
            f"{ctx.name}: the judge kept none of the {len(rows)} rows (filter.threshold {cfg.threshold:g}"
            + (", filter.require_pass" if cfg.require_pass else "")
            + (f"; {len(failed)} failed: {causes_text(causes)}" if failed else "")
            + "); nothing is committed. Check the judge's answers and the threshold, or set filter.allow_empty: "
            "true to commit an empty dataset (the judge's answers are cached: a rerun does not pay again)"
        )
    counts = {
        "input_rows": len(rows),
        "kept": len(kept),
        "rejected": len(dropped),
        "failed": len(failed),
        "unparseable": causes.get("unparseable", 0),
        "retention": round(len(kept) / len(rows), 4),
        "scheme": scheme,
    }
    data = ctx.out / "data"
    write_jsonl(data / "train.jsonl", kept)
    write_jsonl(ctx.out / "rejected" / "rejected.jsonl", dropped)
    if failed:
        write_jsonl(ctx.out / "failed" / "failed.jsonl", failed)
    dataset_card(
        data / "README.md",
        f"{r.name}: {ctx.name}",
        f"{scheme} rows kept by the LLM judge ({r.judge.model}, method {cfg.method}, threshold {cfg.threshold}).",
        get_path(r, f"{scheme_def(scheme).seed}.licence"),
        {"filter": cfg.model_dump(mode="json"), "judge": endpoint_info(r.judge), "counts": counts},
        ["train.jsonl"],
    )
    u = usage_dict(usage)
    log.info("%s: kept %d of %d rows (%.0f%%), rejected %d, failed %d", ctx.name, len(kept), len(rows),
             100 * len(kept) / len(rows), len(dropped), len(failed))
    return StageOutput(
        counts=counts,
        extra={
            "judge": {**endpoint_info(r.judge), "model_id": r.judge.model, "method": cfg.method},
            "usage": {"judge": u},
            "cost_usd": r.judge.cost_usd(u["prompt_tokens"], u["completion_tokens"]),
            "utilization": busy,
        },
    )


def _parses(res: GenResult) -> bool:
    """A judge answer is final only when its verdict can be read (CachedClient's ``accept``)."""
    return parse_verdict(res.text) is not None


def _rate_generate(ctx: StageContext, judge: LLMClient, rows: list[dict[str, Any]],
                   prompts: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Every row's verdict. A verdict that does not parse (or a request that failed for good) is asked
    again (attempt 2, 3 ...) as soon as it comes back, in the same flow as the first asks, so re-asks
    never wait for the whole first pass."""
    from ..llm.flow import Flow

    cfg = ctx.recipe.filter
    verdicts: dict[str, dict[str, Any]] = {}
    raw: dict[str, list[str]] = {row["id"]: [] for row in rows}
    errors: dict[str, tuple[str, str]] = {}  # row -> (cause, message) of its last failed request
    phases: dict[int, Phase] = {}
    unparseable: Counter[int] = Counter()
    flow = Flow(f"{ctx.name}:verdicts")

    def phase(attempt: int) -> Phase:
        if attempt not in phases:
            phases[attempt] = Phase(ctx, f"verdicts-a{attempt}", valid=_verdict_parses)
        return phases[attempt]

    def ask(rid: str, attempt: int) -> None:
        # a re-ask goes before first asks: its row has waited longest (scheduling only, llm/pool.py)
        req = request(f"{rid}-a{attempt}", prompts[rid], cfg.decoding,
                      stable_hash(ctx.recipe.seed, rid, attempt) % (2**31 - 1), priority=attempt - 1)
        # a retried ask must not be answered from the first ask's cache: greedy decoding would repeat it
        if attempt > 1 and cfg.decoding.temperature == 0:
            req = _with_temperature(req, cfg.retry_temperature)
        phase(attempt).ask(flow, judge, req, {"row": rid}, lambda res, m: {**m, "text": res.text},
                           then=lambda rec: answered(rid, attempt, rec))

    def answered(rid: str, attempt: int, rec: dict[str, Any] | None) -> None:
        if rec is None:
            req_id = f"{rid}-a{attempt}"
            p = phases[attempt]
            errors[rid] = (p.failed_cause.get(req_id, "error"), p.failed.get(req_id, "no answer"))
        else:
            raw[rid].append(rec["text"])
            v = parse_verdict(rec["text"])
            if v is not None:
                verdicts[rid] = {**v, "keep": decide(v, cfg.threshold, cfg.require_pass), "cause": None}
                if verdicts[rid]["status"] is None:
                    verdicts[rid]["status"] = "pass" if verdicts[rid]["keep"] else "fail"
                return
            unparseable[attempt] += 1
            errors.pop(rid, None)
        if attempt < cfg.max_attempts:
            ask(rid, attempt + 1)

    for row in rows:
        ask(row["id"], 1)
    # failures are asked again; the limit applies to the rows that fail in the end
    run_flow(ctx, flow, phases.values(), check=False)
    for attempt, p in phases.items():
        p.stats["unparseable"] = unparseable[attempt]
    ctx.check_stop()
    for row in rows:
        rid = row["id"]
        if rid in verdicts:
            continue
        if rid in errors and not raw[rid]:
            cause, msg = errors[rid]
            reason = f"the judge request failed for good after {cfg.max_attempts} attempts: {msg}"
        else:
            cause = "unparseable"
            text = " | ".join(raw[rid]) or "no answer from the judge"
            reason = f"unparseable verdict after {cfg.max_attempts} attempts: {text[:1000]}"
        verdicts[rid] = {"status": "error", "rating": None, "reason": reason, "keep": False, "cause": cause}
    return verdicts


def _verdict_parses(rec: dict[str, Any]) -> bool:
    return parse_verdict(rec["text"]) is not None


def _with_temperature(req: GenRequest, t: float) -> GenRequest:
    from dataclasses import replace

    return replace(req, temperature=t)


def _rate_logprobs(ctx: StageContext, judge: LLMClient, rows: list[dict[str, Any]],
                   prompts: dict[str, str]) -> dict[str, dict[str, Any]]:
    cfg = ctx.recipe.filter
    reqs = [request(row["id"], prompts[row["id"]], cfg.decoding, 0) for row in rows]
    dists = judge.rating_distribution(reqs, "Rating: ", RATING_OPTIONS)
    verdicts = {}
    for row, dist in zip(rows, dists, strict=True):
        rating = round(sum(float(k) * p for k, p in dist.items()), 3)
        top = max(dist, key=lambda k: dist[k])
        keep = rating >= cfg.threshold
        verdicts[row["id"]] = {
            "status": "pass" if keep else "fail",
            "rating": rating,
            "reason": f"expected rating from the judge's token probabilities (most likely {top}, p={dist[top]:.2f})",
            "keep": keep,
        }
    return verdicts


def estimate(recipe: Recipe, store: Store, stage: str) -> list[Ask]:
    """One verdict per generated row. When the generate stage is committed, its rows size the
    prompts exactly (the rubric filled with each row's instruction and response); else what the
    recipe asks for, with a typical response (:class:`~bezoar_jobs.estimate.Typical`) and, as the
    worst case, every response at its cap. A verdict is typically 50-80 tokens whatever the cap."""
    scheme = scheme_of(stage)
    mod = scheme_def(scheme).load()
    cfg = recipe.filter
    template = cfg.rating_template if cfg.method == "logprobs" else cfg.rubric_template
    base = template_tokens(template.path)
    dec = cfg.decoding
    typical: int | float | None = Typical.VERDICT
    attempts = cfg.max_attempts  # the worst case: every verdict unreadable until the last ask
    if cfg.method == "logprobs":
        dec, typical, attempts = dec.model_copy(update={"max_new_tokens": 1}), None, 1
    m = read_manifest(store, f"generate-{scheme}")
    if m is not None and "data/train.jsonl" in m.get("files", {}):
        sizes = []
        for line in store.read_text(f"generate-{scheme}/data/train.jsonl").splitlines():
            if line.strip():
                ins, resp = pair(scheme, json.loads(line), recipe)
                sizes.append(base + tokens(ins) + tokens(resp))
        if sizes:
            return [Ask(recipe.judge, len(sizes), round(sum(sizes) / len(sizes)), dec, typical, "verdicts",
                        max(sizes), attempts)]
    rows = mod.expected_rows(recipe)
    ins, cap = mod.judge_tokens(recipe)
    prompt = base + ins + round(cap * Typical.RESPONSE)
    return [Ask(recipe.judge, rows, prompt, dec, typical, "verdicts", base + ins + int(cap), attempts)]
