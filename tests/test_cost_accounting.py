"""What a stage's answers cost, as its manifest records it (``usage``, ``cost_usd``): every answer the stage's
data used, each question paid once, across the stage's attempts.

Before: a question asked by two records was answered once but its tokens were counted twice; an answer read
back from the cache by a later attempt was counted, while one read back from the stage's saved records was
not, so a stage resumed after a kill recorded only what its last attempt asked.
"""

from __future__ import annotations

import pytest

from bezoar_jobs.llm import CachedClient, GenRequest, GenResult, make_client
from bezoar_jobs.recipe import Endpoint
from bezoar_jobs.store import LocalStore

try:  # tests/ is not a package today; keep working if it becomes one
    from tests.llm_server import llm_server
except ImportError:
    from llm_server import llm_server  # type: ignore[no-redef]  # noqa: F401


def _endpoint(srv, **kw) -> Endpoint:
    defaults = {"max_concurrency": 4, "backoff_base_s": 0.02, "backoff_max_s": 0.2, "timeout_s": 10.0}
    return Endpoint(backend="openai-chat", model="test/model", base_url=srv.url + "/v1", **{**defaults, **kw})


def _run(client, reqs: list[GenRequest]) -> dict[str, GenResult]:
    out: dict[str, GenResult] = {}
    client.run(reqs, lambda r: out.__setitem__(r.id, r), desc="test")
    return out


def test_a_question_asked_by_two_records_is_paid_and_counted_once(tmp_path, llm_server):
    srv = llm_server(script=lambda p: "an answer of six words here", latency=0.05)
    store = LocalStore(tmp_path / "run")
    reqs = [GenRequest(id=f"r{i}", user=f"question {i}", temperature=0.0, seed=1) for i in range(3)]
    reqs += [GenRequest(id="dup", user="question 0", temperature=0.0, seed=1)]  # r0's question again
    client = CachedClient(make_client(_endpoint(srv)), store, "judge")
    got = _run(client, reqs)
    assert len(srv.calls) == 3 and got["dup"].text == got["r0"].text
    paid = [got[f"r{i}"] for i in range(3)]
    u = client.usage
    assert u.requests == 4 and u.cached == 1  # the records' answers: four, one of them shared
    assert u.prompt_tokens == sum(r.prompt_tokens for r in paid)
    assert u.completion_tokens == sum(r.completion_tokens for r in paid)

    # a later attempt reads every answer back from the cache: the data cost the same, counted the same way
    again = CachedClient(make_client(_endpoint(srv)), store, "judge")
    _run(again, reqs)
    assert len(srv.calls) == 3 and again.usage.cached == 4
    assert (again.usage.prompt_tokens, again.usage.completion_tokens) == (u.prompt_tokens, u.completion_tokens)


def test_an_answer_that_is_not_final_is_counted_each_time_it_is_paid(tmp_path, llm_server):
    """An unparseable verdict is not cached and is asked again (the filter asks with another seed; a retry pass
    may ask the same question): each time it is paid, so each time it counts, but its duplicates only once."""
    srv = llm_server(script=lambda p: "no verdict in this", latency=0.05)
    store = LocalStore(tmp_path / "run")
    reqs = [GenRequest(id="a", user="rate this", temperature=0.0, seed=1),
            GenRequest(id="b", user="rate this", temperature=0.0, seed=1)]
    client = CachedClient(make_client(_endpoint(srv)), store, "judge", accept=lambda r: "rating" in r.text)
    first = _run(client, reqs)
    one = first["a"].prompt_tokens + first["a"].completion_tokens
    assert len(srv.calls) == 1 and one > 0
    assert client.usage.prompt_tokens + client.usage.completion_tokens == one
    _run(client, reqs[:1])  # the same question again, in the same process: paid again
    assert len(srv.calls) == 2
    assert client.usage.prompt_tokens + client.usage.completion_tokens == 2 * one


# ---- the stage's manifest: a resumed stage records what its data cost, not only what its last attempt asked ----
def _usage(run, stage: str) -> dict:
    import json

    m = json.loads((run / stage / "_MANIFEST.json").read_text())
    return m


def test_a_stage_resumed_from_its_saved_records_records_what_its_data_cost(tmp_path, monkeypatch) -> None:
    """filter-lamini run once, then again with --force and no answer cache left (a cache on another volume, or
    cleared): every verdict is read back from the records the first attempt saved. Its manifest said the judge
    used 0 tokens for $0; it now says what the first attempt paid for those verdicts."""
    import shutil

    from bezoar_jobs import runner
    from bezoar_jobs.recipe import load_recipe
    from bezoar_jobs.store import open_store

    try:
        from tests.llm_server import LLMTestServer
        from tests.scripted import scripted_answer, scripted_recipe
    except ImportError:
        from llm_server import LLMTestServer  # type: ignore[no-redef]
        from scripted import scripted_answer, scripted_recipe  # type: ignore[no-redef]

    monkeypatch.setenv("SCRIPTED_JUDGE_KEY", "test-key")
    run = tmp_path / "run"
    store = open_store(run)
    with LLMTestServer(script=scripted_answer, api_key="test-key") as srv:
        recipe, _ = load_recipe(scripted_recipe(tmp_path, srv.url))
        assert runner.run_stage("generate-lamini", recipe, store) == 0
        assert runner.run_stage("filter-lamini", recipe, store) == 0
        first = _usage(run, "filter-lamini")
        shutil.rmtree(run / "_cache")
        asked = len(srv.calls)
        assert runner.run_stage("filter-lamini", recipe, store, force=True) == 0
        assert len(srv.calls) == asked  # nothing asked again
    again = _usage(run, "filter-lamini")
    u1, u2 = first["usage"]["judge"], again["usage"]["judge"]
    assert u1["prompt_tokens"] > 0
    assert (u2["prompt_tokens"], u2["completion_tokens"]) == (u1["prompt_tokens"], u1["completion_tokens"])
    assert again["cost_usd"] == first["cost_usd"] > 0
    assert u1.get("resumed") == 0 and u2.get("resumed") == u2["requests"] == u1["requests"]


def test_a_priced_teacher_retried_after_its_spending_cap_does_not_spend_the_cap_again(tmp_path, monkeypatch) -> None:
    """A teacher keeps no answer cache: the spend of an attempt that reached teacher.spend_cap_usd was in its
    saved records only, and the next attempt (a Job's retry) started from $0 and spent the cap again."""
    from bezoar_jobs import runner
    from bezoar_jobs.errors import RetryableError
    from bezoar_jobs.recipe import load_recipe
    from bezoar_jobs.store import open_store

    try:
        from tests.llm_server import LLMTestServer
        from tests.scripted import scripted_answer, scripted_recipe
    except ImportError:
        from llm_server import LLMTestServer  # type: ignore[no-redef]
        from scripted import scripted_answer, scripted_recipe  # type: ignore[no-redef]

    monkeypatch.setenv("SCRIPTED_JUDGE_KEY", "test-key")
    store = open_store(tmp_path / "run")
    priced = {"teacher.price_input_per_mtok": 0.0, "teacher.price_output_per_mtok": 1e6,  # $1 a token
              "teacher.spend_cap_usd": 300.0, "teacher.max_concurrency": 2}
    with LLMTestServer(script=scripted_answer, api_key="test-key") as srv:
        recipe, _ = load_recipe(scripted_recipe(tmp_path, srv.url, **priced))
        with pytest.raises(RetryableError, match="spending cap"):
            runner.run_stage("generate-lamini", recipe, store)
        first = len(srv.calls)
        assert first > 0
        with pytest.raises(RetryableError, match="spending cap"):
            runner.run_stage("generate-lamini", recipe, store)
        assert len(srv.calls) == first  # the cap was spent by the first attempt: nothing more is paid for


def test_the_teachers_time_in_attempts_before_the_committing_one_is_counted(tmp_path, monkeypatch) -> None:
    """generate-lamini's first attempt fails part way (the teacher refuses every request for a while); the second
    commits, reusing the first's saved answers. teacher_gpu counted the committing attempt's span only, so the
    GPU-hours and dollars left out the serving time that bought the reused answers; the report's union too."""
    import json

    from bezoar_jobs import runner
    from bezoar_jobs.errors import RetryableError
    from bezoar_jobs.recipe import load_recipe
    from bezoar_jobs.report.collect import collect, teacher_gpu_union
    from bezoar_jobs.store import open_store

    try:
        from tests.llm_server import LLMTestServer
        from tests.scripted import scripted_answer, scripted_recipe
    except ImportError:
        from llm_server import LLMTestServer  # type: ignore[no-redef]
        from scripted import scripted_answer, scripted_recipe  # type: ignore[no-redef]

    monkeypatch.setenv("SCRIPTED_JUDGE_KEY", "test-key")
    run = tmp_path / "run"
    store = open_store(run)
    down = {"after": 10, "seen": 0}

    def rule(prompt: str) -> str | None:  # answers the first ten requests, then refuses all
        down["seen"] += 1
        return "500" if down["seen"] > down["after"] else None

    with LLMTestServer(script=scripted_answer, api_key="test-key", rule=rule, latency=0.02) as srv:
        recipe, _ = load_recipe(scripted_recipe(tmp_path, srv.url, **{
            "teacher.gpus": 2, "teacher.gpu_hour_usd": 3.0, "teacher.max_retries": 1}))
        with pytest.raises(RetryableError):
            runner.run_stage("generate-lamini", recipe, store)
        down["after"] = 10**9  # the teacher is back
        assert runner.run_stage("generate-lamini", recipe, store) == 0
    m = json.loads((run / "generate-lamini" / "_MANIFEST.json").read_text())
    tg, u = m["teacher_gpu"], m["usage"]["teacher"]
    # the tokens: every answer the data used; of them, those decoded in the committing attempt's span_s
    assert u["resumed"] > 0 and 0 < u["decoded_tokens"] < u["completion_tokens"]
    assert len(tg["earlier_spans"]) >= 1 and tg["earlier_s"] > 0
    served = tg["span_s"] + tg["earlier_s"]
    assert tg["gpu_hours"] == pytest.approx(2 * served / 3600, abs=1e-6)
    assert tg["gpu_cost_usd"] == pytest.approx(3.0 * tg["gpu_hours"], abs=1e-6)
    union = teacher_gpu_union(collect(store))
    assert union is not None and union["seconds"] > tg["end"] - tg["start"]  # the earlier attempt's span is in it
