"""Nothing wrong is committed, nothing is lost quietly (issue 11, findings 1 and 2).

A judge that answers nonsense, a teacher that keeps failing, a filter that keeps nothing: the stages
run through the real CLI against the scripted servers over HTTP, and what they commit (or refuse to
commit), print and cache is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from bezoar_jobs.manifest import read_manifest
from bezoar_jobs.store import open_store
from tests.llm_server import LLMTestServer
from tests.scripted import scripted_answer, scripted_recipe

LAMINI = ("--only", "generate-lamini", "filter-lamini")


def bezoar(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    e = {**os.environ, "SCRIPTED_JUDGE_KEY": "test-key", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "bezoar_jobs.cli", *args], capture_output=True, text=True, env=e, timeout=timeout
    )


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _judged(srv: LLMTestServer) -> list:
    return [c for c in srv.calls if "Reply with JSON only" in c.prompt]


def test_garbage_judge_fails_the_filter_and_poisons_nothing(tmp_path):
    """Finding 1: a judge answering HTTP 200 with no parseable verdict made filter-lamini commit
    "kept 0" with exit 0, and cached the garbage so that the rerun after fixing the judge sent 0
    requests and committed "kept 0" again."""
    broken = {"on": True}

    def script(prompt: str) -> str:
        if broken["on"] and "Reply with JSON only" in prompt:
            return "I cannot decide."
        return scripted_answer(prompt)

    with LLMTestServer(script=script, api_key="test-key") as srv:
        recipe = scripted_recipe(tmp_path, srv.url)
        run = tmp_path / "run"
        res = bezoar("run", "--recipe", str(recipe), "--run", str(run), *LAMINI)
        assert res.returncode == 3, res.stderr[-3000:]  # retryable, not committed
        gen = _rows(run / "generate-lamini" / "data" / "train.jsonl")
        n = len(gen)
        assert f"filter-lamini: {n} of {n} rows failed for good (unparseable: {n}" in res.stderr
        assert "e.g. lamini-resp-" in res.stderr and "I cannot decide" in res.stderr  # an example
        assert "generation.max_failed_fraction=0.01" in res.stderr
        assert read_manifest(open_store(run), "filter-lamini") is None
        assert len(_judged(srv)) == 2 * n  # asked again once (filter.max_attempts 2)
        # an unparseable answer is never cached as final
        cached = "".join(p.read_text() for p in (run / "_cache" / "judge").rglob("*.jsonl"))
        assert "I cannot decide" not in cached

        broken["on"] = False  # the judge is fixed: the rerun asks it again and commits real verdicts
        srv.reset()
        res = bezoar("run", "--recipe", str(recipe), "--run", str(run), *LAMINI)
        assert res.returncode == 0, res.stderr[-3000:]
        assert len(_judged(srv)) == n
        m = read_manifest(open_store(run), "filter-lamini")
        assert m["counts"]["failed"] == 0 and m["counts"]["kept"] > 0
        assert m["counts"]["kept"] + m["counts"]["rejected"] == n


def test_a_few_unparseable_verdicts_fail_their_rows_loudly(tmp_path):
    """Rows whose verdict stays unparseable are neither kept nor rejected: they are written to
    failed/, counted in the manifest and named in a WARNING; within max_failed_fraction the stage
    commits, beyond it it fails."""

    def script(prompt: str) -> str:
        if "Reply with JSON only" in prompt and zlib.crc32(prompt.encode()) % 4 == 0:
            return "I cannot decide."
        return scripted_answer(prompt)

    with LLMTestServer(script=script, api_key="test-key") as srv:
        run = tmp_path / "run"
        strict = scripted_recipe(tmp_path, srv.url)
        res = bezoar("run", "--recipe", str(strict), "--run", str(run), *LAMINI)
        assert res.returncode == 3 and "unparseable:" in res.stderr
        lenient = scripted_recipe(tmp_path, srv.url, **{"generation.max_failed_fraction": 0.5})
        res = bezoar("run", "--recipe", str(lenient), "--run", str(run), *LAMINI)
        assert res.returncode == 0, res.stderr[-3000:]
    failed = _rows(run / "filter-lamini" / "failed" / "failed.jsonl")
    kept = _rows(run / "filter-lamini" / "data" / "train.jsonl")
    dropped = _rows(run / "filter-lamini" / "rejected" / "rejected.jsonl")
    gen = _rows(run / "generate-lamini" / "data" / "train.jsonl")
    assert failed and len(failed) + len(kept) + len(dropped) == len(gen)
    assert all(r["gpt4_status"] == "error" and "unparseable verdict after 2 attempts" in r["gpt4_reason"]
               for r in failed)
    assert not {r["id"] for r in failed} & {r["id"] for r in kept + dropped}
    m = read_manifest(open_store(run), "filter-lamini")
    assert m["counts"]["failed"] == m["counts"]["unparseable"] == len(failed)
    assert "failed/failed.jsonl" in m["files"]
    warning = [ln for ln in res.stderr.splitlines() if " WARNING " in ln and "filter-lamini:" in ln]
    assert warning and f"{len(failed)} of {len(gen)} rows failed for good (unparseable: {len(failed)}" in warning[0]
    # the manifest records the requests of each attempt
    req = m["requests"]
    assert set(req["phases"]) == {"verdicts-a1", "verdicts-a2"}
    assert req["phases"]["verdicts-a2"]["needed"] == len(failed)


def test_a_filter_that_keeps_nothing_is_an_error_unless_allowed(tmp_path):
    def script(prompt: str) -> str:
        if "Reply with JSON only" in prompt:
            return json.dumps({"status": "fail", "rating": 1, "reason": "no"})
        return scripted_answer(prompt)

    with LLMTestServer(script=script, api_key="test-key") as srv:
        run = tmp_path / "run"
        res = bezoar("run", "--recipe", str(scripted_recipe(tmp_path, srv.url)), "--run", str(run), *LAMINI)
        assert res.returncode == 2, res.stderr[-2000:]
        assert "filter-lamini: the judge kept none of the" in res.stderr and "filter.allow_empty" in res.stderr
        assert read_manifest(open_store(run), "filter-lamini") is None
        asked = len(_judged(srv))
        allowed = scripted_recipe(tmp_path, srv.url, **{"filter.allow_empty": True})
        res = bezoar("run", "--recipe", str(allowed), "--run", str(run), *LAMINI)
        assert res.returncode == 0, res.stderr[-2000:]
        assert len(_judged(srv)) == asked  # the verdicts came from the cache: not paid twice
    assert read_manifest(open_store(run), "filter-lamini")["counts"]["kept"] == 0


def test_teacher_losses_are_loud_counted_and_limited(tmp_path):
    """Finding 2: with 60% 503s generate-orca committed 976 of 1,000 rows with exit 0, an INFO line,
    no retries in the manifest and no HTTP detail in the rejected rows."""
    def always_503(prompt: str) -> str | None:  # a quarter of the tasks never get an answer
        return "503" if zlib.crc32(prompt.encode()) % 4 == 0 else None

    with LLMTestServer(script=scripted_answer, api_key="test-key", rule=always_503, rates={"503": 0.3},
                       retry_after=None) as srv:
        run = tmp_path / "run"
        res = bezoar("stage", "generate-orca", "--recipe", str(scripted_recipe(tmp_path, srv.url)), "--run", str(run))
        assert res.returncode == 3, res.stderr[-2000:]
        err = [ln for ln in res.stderr.splitlines() if " ERROR " in ln]
        assert len(err) == 1 and "generate-orca/responses:" in err[0] and "(HTTP 503:" in err[0]
        assert "retries)" in err[0] and "e.g. orca-" in err[0] and "overloaded" in err[0]
        assert read_manifest(open_store(run), "generate-orca") is None
        lenient = scripted_recipe(tmp_path, srv.url, **{"generation.max_failed_fraction": 0.5})
        res = bezoar("stage", "generate-orca", "--recipe", str(lenient), "--run", str(run))
        assert res.returncode == 0, res.stderr[-2000:]
    m = read_manifest(open_store(run), "generate-orca")
    req = m["requests"]
    lost = req["failed"]
    assert lost > 0 and req["failed_by_cause"] == {"HTTP 503": lost} and req["retries"] > 0
    assert req["resumed"] > 0 and req["needed"] == 24 and req["resumed"] + req["asked"] == 24
    assert m["counts"]["rows"] == 24 - lost
    warning = [ln for ln in res.stderr.splitlines() if " WARNING " in ln]
    assert any(f"{lost} of 24 requests failed for good (HTTP 503: {lost}" in ln for ln in warning)
    rejected = _rows(run / "generate-orca" / "rejected" / "rejected.jsonl")
    assert len(rejected) == lost
    assert all(r["reason"].startswith("teacher error: failed after 4 attempts: HTTP 503") for r in rejected)
    # the report's funnel shows the loss
    from bezoar_jobs.report.collect import collect, funnel

    row = next(r for r in funnel(collect(open_store(run))) if r["scheme"] == "orca")
    assert row["requests_lost"] == lost and row["retries"] == req["retries"]
    assert row["lost_by_cause"] == {"HTTP 503": lost}


def test_requests_the_server_refuses_as_sent_stop_the_stage_as_bad_input_not_retryable(tmp_path):
    """More stop sequences than TGI takes (its --max-stop-sequences, 4 by default) are refused with a 422 on every
    request that carries them. Evol-Instruct's evolutions were answered first, so the pool did not stop at the
    responses' refusals (only a run whose first requests are all refused does), and the stage failed retryable
    (exit 3): the Job's retries and every rerun sent the same requests and were refused again. Refusals alone over
    the limit are bad input (exit 2), naming what was refused."""
    stops = ["\n\n###", "\nUser:", "\nQuestion:", "</s>", "\nHuman:"]
    with LLMTestServer(script=scripted_answer, api_key="test-key") as srv:
        run = tmp_path / "run"
        recipe = scripted_recipe(tmp_path, srv.url, **{"generation.evol.response_decoding.stop": stops})
        res = bezoar("stage", "generate-evol", "--recipe", str(recipe), "--run", str(run))
        assert res.returncode == 2, res.stderr[-3000:]
        refused = [c for c in srv.calls if c.status == 422]
        assert refused
        assert any(c.status == 200 for c in srv.calls)  # the evolutions were answered
        line = next(ln for ln in res.stderr.splitlines() if "The server refused" in ln)
        assert f"refused {len(refused)} of them as sent (HTTP 422 refused: {len(refused)})" in line
        assert "supports up to 4 stop sequences" in line  # the server's own words, as the example
        assert read_manifest(open_store(run), "generate-evol") is None  # nothing committed
        # four are taken: the same run commits, asking only for what was refused
        asked = len(srv.calls)
        ok = scripted_recipe(tmp_path, srv.url, **{"generation.evol.response_decoding.stop": stops[:4]})
        res = bezoar("stage", "generate-evol", "--recipe", str(ok), "--run", str(run))
        assert res.returncode == 0, res.stderr[-3000:]
        assert all(c.status == 200 for c in srv.calls[asked:])
    assert read_manifest(open_store(run), "generate-evol")["counts"]["rows"] > 0


def test_refusals_within_the_limit_beside_transient_losses_over_it_stay_retryable():
    from types import SimpleNamespace

    from bezoar_jobs.errors import BadInput, RetryableError
    from bezoar_jobs.stages.common import check_losses

    ctx = SimpleNamespace(recipe=SimpleNamespace(generation=SimpleNamespace(max_failed_fraction=0.1)))
    with pytest.raises(RetryableError):  # 5 refused of 100 are within 0.1; the 503s are what a rerun may fix
        check_losses(ctx, "s", 100, {"HTTP 422 refused": 5, "HTTP 503": 20}, {"r1": "HTTP 503: busy"})
    with pytest.raises(BadInput, match=r"refused 11 of them as sent \(HTTP 400 refused: 11\)"):
        check_losses(ctx, "s", 100, {"HTTP 400 refused": 11, "HTTP 503": 20}, {"r1": "HTTP 400: bad"})
    check_losses(ctx, "s", 100, {"HTTP 422 refused": 10}, {"r1": "HTTP 422: no"})  # at the limit: commits


def test_causes_read_from_an_error_text():
    from bezoar_jobs.stages.common import cause_of

    assert cause_of("judge request failed: failed after 7 attempts: HTTP 503: overloaded") == "HTTP 503"
    assert cause_of("refused by the server: HTTP 400: bad max_tokens") == "HTTP 400 refused"
    assert cause_of("failed after 3 attempts: no answer within timeout_s=10") == "timeout"
    assert cause_of("failed after 3 attempts: malformed answer: no usage") == "malformed"
    assert cause_of("something else") == "error"


def test_evol_rejected_rows_carry_the_teachers_error(tmp_path):
    def evolve_503(prompt: str) -> str | None:  # some evolutions never get an answer
        evolving = "write only the new task" in prompt.lower() or "invented task" in prompt.lower()
        return "503" if evolving and zlib.crc32(prompt.encode()) % 3 == 0 else None

    with LLMTestServer(script=scripted_answer, api_key="test-key", rule=evolve_503, retry_after=None) as srv:
        recipe = scripted_recipe(tmp_path, srv.url, **{"generation.max_failed_fraction": 0.9})
        run = tmp_path / "run"
        res = bezoar("stage", "generate-evol", "--recipe", str(recipe), "--run", str(run))
        assert res.returncode == 0, res.stderr[-2000:]
    rejected = _rows(run / "generate-evol" / "rejected" / "rejected.jsonl")
    errors = [r for r in rejected if r["reason"].startswith("teacher error")]
    assert errors and all("failed after 4 attempts: HTTP 503" in r["reason"] for r in errors)
    m = read_manifest(open_store(run), "generate-evol")
    assert m["requests"]["failed_by_cause"] == {"HTTP 503": len(errors)}


def test_answers_cut_at_max_new_tokens_are_counted_and_said(tmp_path):
    """An answer that stopped at max_new_tokens (finish_reason "length") was taken as whole with nothing said:
    a too-small response_decoding.max_new_tokens cut every response of the stage quietly. They are still kept
    (the data is what the server answered) but counted in the manifest, per step and in total, and a WARNING
    says how many."""
    def long_responses(prompt: str) -> str:
        answer = scripted_answer(prompt)
        return answer if "Reply with JSON only" in prompt else answer + " and more" * 200

    with LLMTestServer(script=long_responses, api_key="test-key") as srv:
        run = tmp_path / "run"
        res = bezoar("stage", "generate-orca", "--recipe", str(scripted_recipe(tmp_path, srv.url)), "--run", str(run))
        assert res.returncode == 0, res.stderr[-2000:]
    req = read_manifest(open_store(run), "generate-orca")["requests"]
    assert req["cut_short"] == req["answered"] == 24 and req["phases"]["responses"]["cut_short"] == 24
    assert "generate-orca/responses: 24 of 24 answers received stopped at max_new_tokens (cut short, kept)" \
        in res.stderr
