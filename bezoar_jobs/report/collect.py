"""Collecting what a run committed, for the report: manifests, states, the frozen recipe, and the
numbers behind the generic sections (stages, data funnel, training losses, usage, producers).

Only files a stage's manifest lists are read. Evaluation results are read through
:func:`results` by each evaluation's own report section (its module, see the registry).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..layout import RECIPE_FILE
from ..llm.base import TAIL_COUNTS
from ..manifest import DamagedInput, manifest_state
from ..registry import CANONICAL, SCHEME_NAMES, STAGES
from ..state import stage_state
from ..store import NotFoundInStore, Store


def expected() -> list[str]:
    """The stages a complete run has committed (every stage but those that read the whole run)."""
    return [n for n in CANONICAL if not STAGES[n].reads_whole_run]


@dataclass
class RunData:
    uri: str
    manifests: dict[str, dict[str, Any]]  # committed stages only
    states: dict[str, str]  # stage -> committed | partial | not run
    recipe_text: str | None
    recipe: Any  # the parsed Recipe, or None
    recipe_error: str | None
    files: dict[str, Any] = field(default_factory=dict)  # (stage, rel) -> parsed content cache

    @property
    def missing(self) -> list[str]:
        return [n for n in expected() if n not in self.manifests]

    @property
    def partial(self) -> bool:
        return bool(self.missing)


def collect(store: Store) -> RunData:
    manifests: dict[str, dict[str, Any]] = {}
    states: dict[str, str] = {}
    for name in expected():
        state, m, _ = manifest_state(store, name)
        if m is not None:
            manifests[name] = m
            states[name] = "committed"
        elif state == "damaged":
            states[name] = "damaged"
        else:
            states[name] = "partial" if stage_state(store, name) == "partial" else "not run"
    text, recipe, err = None, None, None
    try:
        text = store.read_text(RECIPE_FILE)
    except NotFoundInStore:
        err = f"{store.url(RECIPE_FILE)} does not exist (no run has been started here)"
    if text is not None:
        from ..errors import BadInput
        from ..recipe import parse_recipe

        try:
            recipe = parse_recipe(text, store.url(RECIPE_FILE))
        except BadInput as e:  # an older or hand-edited recipe: show it, do not trust its fields
            err = str(e)
    return RunData(store.uri, manifests, states, text, recipe, err)


def read_listed(store: Store, data: RunData, stage: str, rel: str) -> str | None:
    """A committed file's text, only if the stage's manifest lists it, and only as its manifest
    lists it (size and sha256 checked: a damaged file is refused, naming it)."""
    m = data.manifests.get(stage)
    if m is None or rel not in m.get("files", {}):
        return None
    raw = store.read_bytes(f"{stage}/{rel}")
    meta = m["files"][rel]
    if len(raw) != meta.get("size") or hashlib.sha256(raw).hexdigest() != meta.get("sha256"):
        raise DamagedInput(f"report: input {store.url(f'{stage}/{rel}')} differs from its manifest: the committed "
                           f"file was changed or damaged after commit; run `bezoar verify --run {store.uri}`")
    return raw.decode("utf-8")


def jsonl(text: str | None) -> list[dict[str, Any]]:
    rows = []
    for line in (text or "").splitlines():
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line is skipped: the report must build from what is there
            if isinstance(obj, dict):
                rows.append(obj)
    return rows


# ---------------------------------------------------------------------------------------------
# the numbers behind each section
# ---------------------------------------------------------------------------------------------
def _scalar_counts(counts: dict[str, Any]) -> str:
    parts = []
    for k, v in counts.items():
        if isinstance(v, bool | int | float | str) and not isinstance(v, dict):
            parts.append(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts)


def stage_rows(data: RunData) -> list[dict[str, Any]]:
    rows = []
    for name in expected():
        m = data.manifests.get(name)
        rows.append({
            "stage": name,
            # an evaluation committed as skipped (its section's enabled: false) evaluated nothing
            "status": "skipped" if (m or {}).get("counts", {}).get("skipped") is True else data.states[name],
            "seconds": (m or {}).get("timings", {}).get("seconds"),
            "committed_at": (m or {}).get("committed_at"),
            "counts": _scalar_counts((m or {}).get("counts", {})),
            "code_version": (m or {}).get("code_version"),
        })
    return rows


def _requests(m: dict[str, Any] | None) -> dict[str, Any]:
    r = (m or {}).get("requests")
    return r if isinstance(r, dict) else {}


def funnel(data: RunData) -> list[dict[str, Any]]:
    """Per scheme: candidates generated, eliminated at generation, judged, kept/rejected by the judge,
    rows that failed (no usable verdict), and the requests of both stages lost for good and retried."""
    rows = []
    for s in SCHEME_NAMES:
        gm, fm = data.manifests.get(f"generate-{s}"), data.manifests.get(f"filter-{s}")
        g = (gm or {}).get("counts")
        f = (fm or {}).get("counts")
        if not g and not f:
            continue
        row: dict[str, Any] = {"scheme": s}
        reqs = [_requests(gm), _requests(fm)]
        if any(reqs):
            row["requests_lost"] = sum(int(r.get("failed", 0) or 0) for r in reqs)
            row["retries"] = sum(int(r.get("retries", 0) or 0) for r in reqs)
            causes: dict[str, int] = {}
            for r in reqs:
                for c, n in (r.get("failed_by_cause") or {}).items():
                    causes[c] = causes.get(c, 0) + int(n)
            row["lost_by_cause"] = causes
        if g:
            row["committed"] = int(g.get("rows", 0))
            row["eliminated"] = int(g.get("rejected", 0))
            row["generated"] = row["committed"] + row["eliminated"]
        if f:
            row["judged"] = int(f.get("input_rows", 0))
            row["kept"] = int(f.get("kept", 0))
            row["rejected_by_judge"] = int(f.get("rejected", 0))
            row["unparseable"] = int(f.get("unparseable", 0) or 0)
            row["failed"] = int(f.get("failed", 0) or 0)
            row["retention"] = f.get("retention")
        rows.append(row)
    return rows


def _training_stages(data: RunData) -> list[str]:
    return [n for n in expected() if STAGES[n].family in ("sft", "dpo")]


def loss_curves(store: Store, data: RunData) -> dict[str, list[tuple[float, float]]]:
    """Per committed training stage: (step, loss) from its metrics.jsonl (training losses only)."""
    out = {}
    for name in _training_stages(data):
        pts = []
        for rec in jsonl(read_listed(store, data, name, "metrics.jsonl")):
            step, loss = rec.get("step"), rec.get("loss")
            if isinstance(step, int | float) and isinstance(loss, int | float) and not isinstance(loss, bool):
                pts.append((float(step), float(loss)))
        if pts:
            out[name] = sorted(pts)
    return out


def results(store: Store, data: RunData, stage: str, rel: str) -> dict[str, Any] | None:
    """An evaluation stage's committed results file, or None (not committed, or the stage was skipped)."""
    text = read_listed(store, data, stage, rel)
    if text is None:
        return None
    results = json.loads(text)
    return None if results.get("skipped") else results


def _gpu_hours(name: str, m: dict[str, Any]) -> float | None:
    if isinstance(m.get("gpu_hours"), int | float):
        return float(m["gpu_hours"])
    tr = m.get("training")
    if isinstance(tr, dict):
        on_gpu = "CUDA" in str(tr.get("mode_description", "")) or str(tr.get("device", "")).startswith("cuda")
        secs = m.get("timings", {}).get("seconds") or 0.0
        return round(secs / 3600.0, 6) if on_gpu else 0.0
    return None


def usage_rows(data: RunData, gpu_hour_usd: float | None) -> list[dict[str, Any]]:
    """Per committed stage: seconds, API tokens in/out, training tokens, GPU-hours, cost."""
    rows = []
    for name in expected():
        m = data.manifests.get(name)
        if m is None:
            continue
        p_tok = c_tok = 0
        for u in (m.get("usage") or {}).values():
            if isinstance(u, dict):
                p_tok += int(u.get("prompt_tokens", 0) or 0)
                c_tok += int(u.get("completion_tokens", 0) or 0)
        tr: dict[str, Any] = m["training"] if isinstance(m.get("training"), dict) else {}
        answers: dict[str, Any] = m["answers"] if isinstance(m.get("answers"), dict) else {}
        gpu_h = _gpu_hours(name, m)
        api = m.get("cost_usd")
        gpu_cost = round(gpu_h * gpu_hour_usd, 4) if gpu_h and gpu_hour_usd is not None else None
        tg = m.get("teacher_gpu")
        if isinstance(tg, dict):  # a generate stage: the teacher's GPUs at the teacher's own price
            gpu_cost = tg.get("gpu_cost_usd")
        rows.append({
            "stage": name,
            "seconds": m.get("timings", {}).get("seconds"),
            "prompt_tokens": p_tok,
            "completion_tokens": c_tok,
            "model_tokens": tr.get("real_tokens", answers.get("completion_tokens")),
            "gpu_hours": gpu_h,
            "api_cost_usd": api if isinstance(api, int | float) else None,
            "gpu_cost_usd": gpu_cost,
            "teacher_span": isinstance(tg, dict),  # its GPU-hours are the shared teacher's (spans overlap)
            # teacher / judge slots kept busy over the stage's span, as the stage's client saw it
            "busy": {role: u["utilization"] for role, u in (m.get("utilization") or {}).items()
                     if isinstance(u, dict) and isinstance(u.get("utilization"), int | float)},
            # what the pool did for those requests: retries after failures, hedged and abandoned attempts
            "tails": {role: {k: u[k] for k in TAIL_COUNTS if isinstance(u.get(k), int)}
                      for role, u in (m.get("utilization") or {}).items() if isinstance(u, dict)},
        })
    return rows


def teacher_gpu_union(data: RunData) -> dict[str, Any] | None:
    """The teacher's GPU-hours over the union of the spans it served the generate stages (they run
    side by side on one teacher, so their own figures overlap and must not be added up)."""
    spans, gpus, price = [], None, None
    for m in data.manifests.values():
        tg = m.get("teacher_gpu")
        if isinstance(tg, dict) and tg.get("start") is not None and tg.get("end") is not None and tg.get("gpus"):
            spans.append((float(tg["start"]), float(tg["end"])))
            gpus, price = int(tg["gpus"]), tg.get("gpu_hour_usd")
            for earlier in tg.get("earlier_spans") or []:  # the attempts before the committing one
                if isinstance(earlier, list) and len(earlier) == 2 and all(isinstance(x, int | float) for x in earlier):
                    spans.append((float(earlier[0]), float(earlier[1])))
    if not spans or gpus is None:
        return None
    spans.sort()
    total, (lo, hi) = 0.0, spans[0]
    for a, b in spans[1:]:
        if a > hi:
            total, lo, hi = total + hi - lo, a, b
        else:
            hi = max(hi, b)
    total += hi - lo
    hours = round(gpus * total / 3600.0, 6)
    return {"seconds": round(total, 3), "gpus": gpus, "gpu_hours": hours,
            "gpu_cost_usd": round(hours * price, 6) if price is not None else None}


def scrub(text: str) -> str:
    """URLs without user:password@ and without key/token query values."""
    text = re.sub(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@", r"\1***@", text)
    return re.sub(r"(?i)([?&](?:api[_-]?key|key|token|secret|password|sig)=)[^&\s\"']+", r"\1***", text)


def producers(data: RunData) -> list[dict[str, Any]]:
    """Which teacher / judge / base model / evaluator produced each committed stage's output (a
    manifest's ``teacher`` and ``judge`` entries, its ``base_model``, its ``evaluator``)."""
    rows = []
    for name in expected():
        m = data.manifests.get(name)
        if m is None:
            continue
        for role in ("teacher", "judge"):
            e = m.get(role)
            if isinstance(e, dict):
                extra = e.get("method")
                rows.append(
                    {
                        "stage": name,
                        "role": e.get("role") or role,
                        "backend": e.get("backend"),
                        "model_id": e.get("model_id") or e.get("model"),
                        "revision": e.get("revision"),
                        "base_url": scrub(str(e["base_url"])) if e.get("base_url") else None,
                        "note": f"method {extra}" if extra else "",
                    }
                )
        if m.get("base_model"):
            rows.append({"stage": name, "role": "trained from", "backend": "", "model_id": m["base_model"],
                         "revision": m.get("base_revision"), "base_url": None, "note": ""})
        ev = m.get("evaluator")
        if isinstance(ev, dict):
            rows.append(
                {
                    "stage": name,
                    "role": "evaluator",
                    "backend": ev.get("backend", ""),
                    "model_id": ev.get("model_id"),
                    "revision": None,
                    "base_url": None,
                    "note": "",
                }
            )
    return rows
