"""The remote teacher/judge clients against the scripted HTTP server (tests/llm_server.py).

Every test talks real HTTP on loopback through the real clients (our TGI and OpenAI-compatible HTTP
clients, the anthropic SDK).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import huggingface_hub.constants
import pytest

from bezoar_jobs.errors import BadInput, Interrupted, RetryableError
from bezoar_jobs.llm import CachedClient, GenRequest, GenResult, make_client
from bezoar_jobs.llm.faults import parse_retry_after
from bezoar_jobs.llm.ratelimit import TokenBucket
from bezoar_jobs.llm.render import chat_messages, render_raw
from bezoar_jobs.recipe import Endpoint
from bezoar_jobs.store import LocalStore

try:  # tests/ is not a package today; keep working if it becomes one
    from tests.llm_server import LLMTestServer, count_tokens, llm_server
except ImportError:
    from llm_server import LLMTestServer, count_tokens, llm_server  # type: ignore[no-redef]  # noqa: F401

BACKENDS = ["tgi", "openai-completions", "openai-chat", "anthropic"]
TGI_FORMAT = "<|prompt|>{user}<|endoftext|><|answer|>"  # no {system}: the system text goes first
RAW_FORMAT = "### System:\n{system}\n\n### Instruction:\n{user}\n\n### Response:\n"
ROUTE = {"tgi": "tgi", "openai-completions": "completions", "openai-chat": "chat/completions", "anthropic": "messages"}


def endpoint(backend: str, srv: LLMTestServer, **kw) -> Endpoint:
    base = srv.url + ("/v1" if backend.startswith("openai") else "")
    fmt = {"tgi": TGI_FORMAT, "openai-completions": RAW_FORMAT}.get(backend)
    defaults = {"max_concurrency": 4, "backoff_base_s": 0.02, "backoff_max_s": 0.2, "timeout_s": 10.0}
    return Endpoint(backend=backend, model="test/model", base_url=base, prompt_format=fmt, **{**defaults, **kw})


def run_all(client, reqs: list[GenRequest]) -> dict[str, GenResult]:
    out: dict[str, GenResult] = {}
    client.run(reqs, lambda r: out.__setitem__(r.id, r), desc="test")
    return out


def per_prompt(faults: dict[str, list[str]]) -> Callable[[str], str | None]:
    """A server rule: the first prompt containing KEY gets the faults in order, then answers."""
    left = {k: list(v) for k, v in faults.items()}

    def rule(prompt: str) -> str | None:
        for key, seq in left.items():
            if key in prompt and seq:
                return seq.pop(0)
        return None

    return rule


def echo(prompt: str) -> str:
    # the user text (the last line once format markers are gone), reversed word by word, plus a tail
    text = re.sub(r"<\|[^|]*\|>", "\n", prompt)
    last = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("###")][-1]
    return " ".join(reversed(last.split())) + " done and dusted"


# ----------------------------------------------------------------------------------------------
# answers, token counts, seeds, rendering
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_answers_token_counts_seeds_and_rendering(backend, llm_server, monkeypatch):
    # huggingface_hub refuses every request in offline mode, loopback included: the TGI client
    # must work with it set (our pods set HF_HUB_OFFLINE=1)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    srv = llm_server(script=echo, api_key="k-123")
    monkeypatch.setenv("TEST_LLM_KEY", "k-123")
    client = make_client(endpoint(backend, srv, api_key_env="TEST_LLM_KEY"), role="teacher")
    reqs = [
        GenRequest(id="a", user="name three primes", system="Be brief.", seed=11, temperature=0.7, top_p=0.9,
                   max_new_tokens=50),
        GenRequest(id="b", user="what is {json} here", system=None, seed=12, temperature=0.0, max_new_tokens=3),
        GenRequest(id="c", user="stop at the word STOP please", seed=13, temperature=0.0, max_new_tokens=50,
                   stop=("STOP",)),
    ]
    threads = set()
    out: dict[str, GenResult] = {}

    def on_result(r: GenResult) -> None:
        threads.add(threading.get_ident())
        out[r.id] = r

    client.run(reqs, on_result, desc="test")
    assert threads == {threading.get_ident()}  # on_result runs in the caller's thread
    assert len(srv.calls) == 3 and all(c.status == 200 and c.route == ROUTE[backend] for c in srv.calls)
    assert all(c.auth == "k-123" for c in srv.calls)

    a, b, c = out["a"], out["b"], out["c"]
    assert a.ok and a.text == "primes three name done and dusted" and a.finish_reason == "stop"
    assert a.completion_tokens == 6  # the server counts one token per word
    # max_new_tokens=3 cuts the answer after three tokens
    assert b.text.split() == ["here", "{json}", "is"] and b.completion_tokens == 3 and b.finish_reason == "length"
    # the stop sequence ends the answer, and is not part of the text
    assert c.text.strip() == "please" and c.finish_reason == "stop"

    by_id = {}
    for call in srv.calls:
        key = next(r.id for r in reqs if r.user in call.prompt)
        by_id[key] = call
    if backend == "tgi":
        assert by_id["a"].prompt == "<|prompt|>Be brief.\n\nname three primes<|endoftext|><|answer|>"
        assert by_id["a"].params["do_sample"] is True and by_id["a"].params["temperature"] == 0.7
        assert by_id["a"].params["top_p"] == 0.9
        # temperature 0 is greedy: TGI refuses temperature 0, so it must not be sent
        assert by_id["b"].params["do_sample"] is False and "temperature" not in by_id["b"].params
        # the prompt's tokens as TGI counted them (its x-prompt-tokens header), not estimated
        assert a.prompt_tokens == count_tokens(by_id["a"].prompt) and not a.extra["prompt_tokens_estimated"]
        assert count_tokens(by_id["a"].prompt) != len(by_id["a"].prompt) // 4 + 1  # the estimate would differ
    elif backend == "openai-completions":
        assert by_id["a"].prompt == "### System:\nBe brief.\n\n### Instruction:\nname three primes\n\n### Response:\n"
        assert a.prompt_tokens == count_tokens(by_id["a"].prompt)
    else:
        assert by_id["a"].system == "Be brief." and by_id["a"].user == "name three primes"
        assert by_id["b"].system is None
        assert a.prompt_tokens == count_tokens(by_id["a"].prompt)
    for rid, seed in (("a", 11), ("b", 12), ("c", 13)):
        # the Messages API has no seed parameter
        assert by_id[rid].seed == (None if backend == "anthropic" else seed)
        assert by_id[rid].params["max_new_tokens"] == {"a": 50, "b": 3, "c": 50}[rid]
    assert by_id["c"].params["stop"] == ["STOP"]
    assert client.usage.requests == 3 and client.usage.completion_tokens == 6 + 3 + c.completion_tokens


def test_render_placeholders_and_system_merging():
    # braces in the texts are left alone; only {system} and {user} are placeholders
    assert render_raw("S={system} U={user} {other}", "{user}", "a {b}") == "S={user} U=a {b} {other}"
    assert render_raw("<p>{user}</p>", "sys", "hi") == "<p>sys\n\nhi</p>"
    assert render_raw("<p>{user}</p>", None, "hi") == "<p>hi</p>"
    assert chat_messages("sys", "hi", system_supported=False) == [{"role": "user", "content": "sys\n\nhi"}]
    assert chat_messages("", "hi") == [{"role": "user", "content": "hi"}]
    assert parse_retry_after({"retry-after": "2.5"}) == 2.5
    assert parse_retry_after({"retry-after-ms": "150"}) == 0.15
    assert (
        0
        < parse_retry_after({"retry-after": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))})
        <= 31
    )


def test_importing_the_package_pulls_in_no_ml_or_http_sdk():
    code = (
        "import sys, bezoar_jobs.llm as m; m.make_client; "
        "bad = [x for x in ('torch', 'transformers', 'openai', 'anthropic', 'huggingface_hub') if x in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


# ----------------------------------------------------------------------------------------------
# the pool: concurrency, continuity, rate limits
# ----------------------------------------------------------------------------------------------
def test_concurrency_bound_and_continuous_pool(llm_server):
    # one slow request among fast ones: a continuous pool keeps the other slots busy meanwhile;
    # batch-and-wait would idle them until the slow one finished
    srv = llm_server(latency=lambda p: 1.0 if "slow" in p else 0.03)
    client = make_client(endpoint("openai-completions", srv, max_concurrency=4))
    reqs = [GenRequest(id="slow", user="slow one", max_new_tokens=8)]
    reqs += [GenRequest(id=f"q{i}", user=f"fast {i}", max_new_tokens=8) for i in range(40)]
    out = run_all(client, reqs)
    assert len(out) == 41 and all(r.ok for r in out.values())
    assert srv.max_in_flight == 4  # the bound is reached and never exceeded
    slow = next(c for c in srv.calls if "slow" in c.prompt)
    during = [c for c in srv.calls if c is not slow and slow.arrived <= c.arrived and c.finished <= slow.finished]
    assert len(during) >= 25, f"only {len(during)} requests ran beside the slow one: the pool is not continuous"


def bucket_releases(monkeypatch) -> dict[int, list[tuple[float, float]]]:
    """When each rate-limit bucket lets a request go, per bucket: (time, amount).

    The limit binds when the client sends, so it is measured there: arrival times at the test
    server also carry connection set-up, which on a loaded host delays the first (new-connection)
    requests more than the last (reused) ones and shortens the observed span."""
    seen: dict[int, list[tuple[float, float]]] = {}
    take = TokenBucket.take

    async def recording_take(self, amount):
        await take(self, amount)
        seen.setdefault(id(self), []).append((time.monotonic(), amount))

    monkeypatch.setattr(TokenBucket, "take", recording_take)
    return seen


def test_requests_per_minute_limit(llm_server, monkeypatch):
    srv = llm_server()
    released = bucket_releases(monkeypatch)
    # 600/min = 10/s with a one-second burst: the 25th request cannot go before 1.5 s after the first
    client = make_client(endpoint("openai-chat", srv, max_concurrency=16, requests_per_minute=600))
    out = run_all(client, [GenRequest(id=str(i), user=f"q {i}", max_new_tokens=4) for i in range(25)])
    assert len(out) == 25 and len(srv.calls) == 25
    [sends] = released.values()  # one bucket: requests per minute
    times = sorted(t for t, _ in sends)
    assert len(times) == 25
    assert 1.5 - 1e-3 <= times[-1] - times[0] <= 4.0, times[-1] - times[0]
    # no one-second window holds more than the burst plus one second's rate
    assert max(sum(1 for t in times if s <= t < s + 1.0) for s in times) <= 20


def test_tokens_per_minute_limit(llm_server, monkeypatch):
    srv = llm_server(script=lambda p: "w " * 100)
    released = bucket_releases(monkeypatch)
    # 6000 tokens/min = 100 tokens/s, burst 100. Each request is charged its estimate up front
    # (len(prompt)/4 + max_new_tokens = 13 + 30) and corrected to the server's usage afterwards
    # (7 prompt + 30 output tokens): before the sixth request goes, at least 6 x 43 - 5 x 6 = 228
    # tokens were charged against a bucket that held 100, so it goes 1.28 s after the first or later
    client = make_client(endpoint("openai-completions", srv, max_concurrency=8, tokens_per_minute=6000))
    out = run_all(client, [GenRequest(id=str(i), user=f"q{i}", max_new_tokens=30) for i in range(6)])
    assert all(r.completion_tokens == 30 and r.prompt_tokens == 7 for r in out.values())
    assert len(srv.calls) == 6
    [sends] = released.values()
    assert [a for _, a in sends] == [43] * 6  # the estimate charged up front
    times = sorted(t for t, _ in sends)
    assert 1.28 - 1e-3 <= times[-1] - times[0] <= 5.0, times[-1] - times[0]


# ----------------------------------------------------------------------------------------------
# retries and failures
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_429_503_and_dropped_connections_are_retried_honouring_retry_after(backend, llm_server):
    srv = llm_server(rule=per_prompt({"first": ["429", "503"], "second": ["drop"]}), retry_after="0.3")
    client = make_client(endpoint(backend, srv, max_retries=3))
    out = run_all(client, [GenRequest(id="1", user="first"), GenRequest(id="2", user="second"),
                           GenRequest(id="3", user="third")])
    assert all(r.ok for r in out.values()), out
    assert [c.status for c in srv.calls].count(200) == 3 and len(srv.calls) == 6
    assert client.usage.retries == 3
    first = [c for c in srv.calls if "first" in c.prompt]
    # Retry-After: 0.3 is honoured before the next attempt
    assert first[1].arrived - first[0].finished >= 0.29


@pytest.mark.parametrize("backend", BACKENDS)
def test_hang_times_out_and_is_retried(backend, llm_server):
    srv = llm_server(rule=per_prompt({"sleepy": ["hang"]}), hang_s=20)
    client = make_client(endpoint(backend, srv, timeout_s=0.5, max_retries=2))
    t0 = time.monotonic()
    out = run_all(client, [GenRequest(id="1", user="sleepy"), GenRequest(id="2", user="awake")])
    assert all(r.ok for r in out.values())
    assert 0.5 <= time.monotonic() - t0 < 5
    assert len([c for c in srv.calls if "sleepy" in c.prompt]) == 2
    assert client.usage.retries == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_malformed_bodies_are_retried_then_recorded_as_errors(backend, llm_server):
    srv = llm_server(rule=per_prompt({"broken": ["malformed", "malformed-json"], "flaky": ["malformed"]}))
    client = make_client(endpoint(backend, srv, max_retries=1))
    out = run_all(client, [GenRequest(id="b", user="broken"), GenRequest(id="f", user="flaky")])
    assert not out["b"].ok and "malformed" in out["b"].error and "2 attempts" in out["b"].error
    assert out["f"].ok and out["f"].text
    assert len(srv.calls) == 4
    assert client.usage.failed == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_401_stops_the_run_as_bad_input_without_leaking_the_key(backend, llm_server, monkeypatch):
    srv = llm_server(api_key="the-right-key")
    monkeypatch.setenv("JUDGE_KEY", "wrong-secret-value")
    client = make_client(endpoint(backend, srv, api_key_env="JUDGE_KEY", max_concurrency=2), role="judge")
    with pytest.raises(BadInput) as e:
        run_all(client, [GenRequest(id=str(i), user=f"q{i}") for i in range(30)])
    assert "401" in str(e.value) and "JUDGE_KEY" in str(e.value)
    assert "wrong-secret-value" not in str(e.value) and "wrong-secret-value" not in repr(client)
    assert len(srv.calls) <= 4  # not retried, and the run stopped at once


def test_400_fails_only_that_request_and_is_not_retried(llm_server):
    srv = llm_server(rule=lambda p: "400" if "too long" in p else None)
    client = make_client(endpoint("openai-chat", srv))
    out = run_all(
        client, [GenRequest(id="bad", user="too long")] + [GenRequest(id=str(i), user=f"q{i}") for i in range(5)]
    )
    assert not out["bad"].ok and "HTTP 400" in out["bad"].error
    assert all(out[str(i)].ok for i in range(5))
    assert len([c for c in srv.calls if "too long" in c.prompt]) == 1


def test_every_request_refused_is_bad_input(llm_server):
    srv = llm_server(rates={"400": 1.0})
    client = make_client(endpoint("anthropic", srv, max_concurrency=2))
    with pytest.raises(BadInput, match="all refused"):
        run_all(client, [GenRequest(id=str(i), user=f"q{i}") for i in range(40)])
    assert len(srv.calls) < 40


def test_unreachable_server_is_retryable():
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ep = Endpoint(backend="openai-chat", model="m", base_url=f"http://127.0.0.1:{port}/v1", max_retries=2,
                  backoff_base_s=0.01, backoff_max_s=0.02)
    with pytest.raises(RetryableError, match="unreachable after 3 attempts"):
        run_all(make_client(ep), [GenRequest(id="1", user="hi")])


def test_api_key_sources(tmp_path, llm_server, monkeypatch):
    srv = llm_server(api_key="from-file")
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(BadInput, match=r"judge\.api_key_env: environment variable NOT_SET_ANYWHERE"):
        make_client(endpoint("openai-chat", srv, api_key_env="NOT_SET_ANYWHERE"), role="judge")
    missing = tmp_path / "nope" / "key"
    with pytest.raises(BadInput, match=rf"judge\.api_key_file: {missing} does not exist"):
        make_client(endpoint("anthropic", srv, api_key_file=str(missing)), role="judge")
    keyfile = tmp_path / "key"
    keyfile.write_text("from-file\n")
    out = run_all(make_client(endpoint("anthropic", srv, api_key_file=str(keyfile))), [GenRequest(id="1", user="hi")])
    assert out["1"].ok and srv.calls[0].auth == "from-file"


# ----------------------------------------------------------------------------------------------
# spending cap
# ----------------------------------------------------------------------------------------------
def test_spending_cap_stops_new_requests_and_delivers_finished_ones(llm_server):
    # $1 per output token, 5 tokens per answer: $5 a request; a $22 cap pays for 4
    srv = llm_server(script=lambda p: "one two three four five six seven", latency=0.05)
    ep = endpoint("openai-completions", srv, max_concurrency=3, price_input_per_mtok=0.0,
                  price_output_per_mtok=1e6, spend_cap_usd=22.0)
    client = make_client(ep)
    got: list[GenResult] = []
    with pytest.raises(RetryableError, match="spending cap reached") as e:
        client.run([GenRequest(id=str(i), user=f"q{i}", max_new_tokens=5) for i in range(10)], got.append)
    assert len(srv.calls) == 4 and len(got) == 4 and all(r.ok for r in got)
    assert client.spent_usd == pytest.approx(20.0)
    assert "6 requests were not sent" in str(e.value)


def test_spending_cap_needs_prices(llm_server):
    srv = llm_server()
    with pytest.raises(BadInput, match="spend_cap_usd needs"):
        make_client(endpoint("openai-chat", srv, spend_cap_usd=5.0), role="judge")


# ----------------------------------------------------------------------------------------------
# the response cache
# ----------------------------------------------------------------------------------------------
def test_cache_second_run_makes_no_requests(tmp_path, llm_server):
    srv = llm_server(script=echo, rule=lambda p: "400" if "refused" in p else None)
    store = LocalStore(tmp_path / "run")
    ep = endpoint("openai-chat", srv, price_input_per_mtok=1.0, price_output_per_mtok=2.0)
    reqs = [GenRequest(id=f"r{i}", user=f"question {i}", system="judge", temperature=0.0, seed=1) for i in range(5)]
    reqs.append(GenRequest(id="dup", user="question 0", system="judge", temperature=0.0, seed=1))  # same as r0
    reqs.append(GenRequest(id="no", user="refused one", temperature=0.0))
    first = run_all(CachedClient(make_client(ep), store, "filter-lamini", flush_every=2), reqs)
    assert len(srv.calls) == 6  # r0..r4 and the refused one; dup shares r0's answer
    assert first["dup"].text == first["r0"].text and first["dup"].cached
    assert not first["no"].ok
    parts = store.list("_cache/filter-lamini/")
    assert len(parts) >= 2 and all(p.rsplit("/", 1)[1].startswith("part-") and p.endswith(".jsonl") for p in parts)
    rows = [json.loads(ln) for p in parts for ln in store.read_text(p).splitlines()]
    assert len(rows) == 5  # only successful answers are cached

    # a new process: new clients, the cache read back from the store
    inner = make_client(ep)
    second_client = CachedClient(inner, store, "filter-lamini")
    second = run_all(second_client, reqs)
    assert len(srv.calls) == 7  # only the refused request is asked again
    for rid in [f"r{i}" for i in range(5)] + ["dup"]:
        assert second[rid].cached and second[rid].text == first[rid].text
        assert second[rid].completion_tokens == first[rid].completion_tokens
    # what the cached answers cost counts towards this stage's spending cap
    paid = sum(first[f"r{i}"].prompt_tokens * 1.0 + first[f"r{i}"].completion_tokens * 2.0 for i in range(5)) / 1e6
    assert inner.prior_spent_usd == pytest.approx(paid)
    # another model is another cache key
    other = CachedClient(make_client(endpoint("openai-chat", srv).model_copy(update={"model": "other/model"})),
                         store, "filter-lamini")
    run_all(other, reqs[:1])
    assert len(srv.calls) == 8


def test_cache_writes_what_it_has_when_the_run_fails(tmp_path, llm_server):
    srv = llm_server(latency=0.02)
    store = LocalStore(tmp_path / "run")
    client = CachedClient(make_client(endpoint("tgi", srv, max_concurrency=2)), store, "judge", flush_every=100)
    seen: list[GenResult] = []

    def on_result(r: GenResult) -> None:
        seen.append(r)
        if len(seen) == 3:
            raise Interrupted("stop requested")  # what a stage's on_result raises after SIGTERM

    reqs = [GenRequest(id=str(i), user=f"q{i}", temperature=0.0) for i in range(30)]
    with pytest.raises(Interrupted):
        client.run(reqs, on_result)
    asked = len(srv.calls)
    assert asked < 30  # in-flight requests were cancelled, the rest never started
    rows = [ln for p in store.list("_cache/judge/") for ln in store.read_text(p).splitlines()]
    assert len(rows) == 3
    again = run_all(CachedClient(make_client(endpoint("tgi", srv)), store, "judge"), reqs)
    assert sum(r.cached for r in again.values()) == 3 and len(srv.calls) == asked + 27


def test_cache_key_covers_the_endpoint_and_never_keeps_an_unaccepted_answer(tmp_path, llm_server):
    """Finding 1: the judge cache key left out the endpoint, so a rerun after fixing judge.base_url
    reused the garbage answers of the wrong server; and garbage was cached as final."""
    bad = llm_server(script=lambda p: "I cannot decide.")
    good = llm_server(script=lambda p: '{"rating": 8, "status": "pass"}')
    store = LocalStore(tmp_path / "run")
    reqs = [GenRequest(id=f"r{i}", user=f"rate {i}", temperature=0.0, seed=1) for i in range(3)]

    def parses(res: GenResult) -> bool:
        return "rating" in res.text

    first = run_all(CachedClient(make_client(endpoint("openai-chat", bad)), store, "judge", accept=parses), reqs)
    assert all(r.ok and r.text == "I cannot decide." for r in first.values())  # handed over, not cached
    assert not [ln for p in store.list("_cache/judge/") for ln in store.read_text(p).splitlines()]
    # same model name, another base_url: another key, so nothing of the first server is reused
    k_bad = CachedClient(make_client(endpoint("openai-chat", bad)), store, "judge").key(reqs[0])
    k_good = CachedClient(make_client(endpoint("openai-chat", good)), store, "judge").key(reqs[0])
    assert k_bad != k_good
    second = run_all(CachedClient(make_client(endpoint("openai-chat", good)), store, "judge", accept=parses), reqs)
    assert len(good.calls) == 3 and all(parses(r) for r in second.values())
    # an unaccepted answer already in a cache (written by an older version) is asked again, not used
    plain = CachedClient(make_client(endpoint("openai-chat", bad)), store, "judge")  # no accept: caches garbage
    run_all(plain, reqs)
    asked = len(bad.calls)
    run_all(CachedClient(make_client(endpoint("openai-chat", bad)), store, "judge"), reqs)
    assert len(bad.calls) == asked  # without accept the garbage is a cache hit...
    run_all(CachedClient(make_client(endpoint("openai-chat", bad)), store, "judge", accept=parses), reqs)
    assert len(bad.calls) == asked + 3  # ...with it, it is asked again


def test_a_callback_that_cannot_keep_answers_drains_the_pool(llm_server):
    """StopRequests from on_result (the store went down): no new request starts, the ones in flight
    are still delivered, then run() raises the error."""
    from bezoar_jobs.llm.base import StopRequests

    srv = llm_server(latency=0.1)
    client = make_client(endpoint("openai-chat", srv, max_concurrency=3))
    got: list[GenResult] = []
    store_down = RetryableError("store down")

    def on_result(r: GenResult) -> None:
        got.append(r)
        if len(got) == 2:
            raise StopRequests(store_down)

    with pytest.raises(RetryableError, match="store down"):
        client.run([GenRequest(id=str(i), user=f"q{i}") for i in range(30)], on_result)
    answered = [c for c in srv.calls if c.status == 200]
    assert len(srv.calls) < 30 and len(got) == len(answered)  # every answer received was delivered


def test_server_capacity_model_queues_and_measures_busy_time(llm_server):
    # what bench/generation.py relies on: at most N decode at once, the rest queue, busy is exact
    srv = llm_server(capacity=2, per_token_s=0.01, script=lambda p: "a b c d e")
    client = make_client(endpoint("openai-completions", srv, max_concurrency=4))
    out = run_all(client, [GenRequest(id=str(i), user=f"q{i}", max_new_tokens=5) for i in range(6)])
    assert all(r.ok and r.completion_tokens == 5 for r in out.values())
    spans = [(c.decode_start, c.finished) for c in srv.calls]
    for t, _ in spans:  # never more than two decoding at any start time
        assert sum(1 for s, e in spans if s <= t < e) <= 2
    assert srv.max_in_flight == 4  # the other two waited in the server's queue
    assert srv.stats().busy_s == pytest.approx(6 * 0.05, rel=0.01)
    assert 0.5 < srv.busy_fraction() <= 1.0


def test_a_bug_in_a_backend_is_raised_not_swallowed(llm_server):
    from bezoar_jobs.llm.openai_api import OpenAIChatClient

    class Broken(OpenAIChatClient):
        async def _send(self, req: GenRequest) -> GenResult:
            raise ZeroDivisionError("a bug")

    srv = llm_server()
    with pytest.raises(ZeroDivisionError):
        run_all(Broken(endpoint("openai-chat", srv)), [GenRequest(id=str(i), user="x") for i in range(5)])


def test_tgi_never_sends_the_ambient_hugging_face_token(llm_server, monkeypatch):
    # no key configured: huggingface_hub would otherwise send HF_TOKEN to whatever base_url says
    monkeypatch.setenv("HF_TOKEN", "hf_process_token_not_for_this_server")
    srv = llm_server()
    out = run_all(make_client(endpoint("tgi", srv)), [GenRequest(id="1", user="hi")])
    assert out["1"].ok and srv.calls[0].auth is None


@pytest.mark.parametrize("backend", ["tgi", "openai-chat", "anthropic"])
def test_the_clients_go_through_the_proxy_the_environment_names(backend, llm_server, monkeypatch):
    """A teacher or judge behind a corporate proxy: HTTP_PROXY / NO_PROXY are honoured as the HTTP SDKs
    (httpx) honour them; the aiohttp clients ignored them (trust_env=False) and tried the host directly."""
    proxy = llm_server(script=echo)  # plays the proxy: it answers what it is asked to forward
    for var in ("NO_PROXY", "no_proxy", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("TEST_LLM_KEY", "k")
    base = "http://teacher.invalid:8080" + ("/v1" if backend.startswith("openai") else "")
    ep = Endpoint(backend=backend, model="test/model", base_url=base, prompt_format=TGI_FORMAT if backend == "tgi"
                  else None, max_concurrency=2, timeout_s=10.0, max_retries=0, api_key_env="TEST_LLM_KEY")
    out = run_all(make_client(ep, role="teacher"), [GenRequest(id="a", user="through the proxy", max_new_tokens=8)])
    assert out["a"].ok, out["a"].error
    assert out["a"].text.startswith("proxy the through") and any("through the proxy" in c.prompt for c in proxy.calls)
