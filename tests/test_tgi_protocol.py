"""Our clients and the scripted server against what TGI and vLLM really answer.

The facts come from the servers' source (docs/reliability.md "What the servers refuse"): TGI's router
(text-generation-inference at db931fc: router/src/validation.rs, router/src/infer/mod.rs, router/src/server.rs,
router/src/lib.rs) and vLLM's OpenAI server (vllm/entrypoints/openai/completion/protocol.py,
engine/protocol.py). The scripted server (tests/llm_server.py) refuses what they refuse, with their statuses
and bodies, so a client that sends what a real server refuses fails here, not in production.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from bezoar_jobs.llm import GenRequest, GenResult, make_client, openai_api, tgi
from bezoar_jobs.llm.base import request
from bezoar_jobs.llm.faults import Rejected, Transient, classify_status
from bezoar_jobs.recipe import Endpoint
from bezoar_jobs.recipe_base import Decoding

try:  # tests/ is not a package today; keep working if it becomes one
    from tests.llm_server import LLMTestServer, llm_server
except ImportError:
    from llm_server import LLMTestServer, llm_server  # type: ignore[no-redef]  # noqa: F401

TGI_FORMAT = "<|prompt|>{user}<|endoftext|><|answer|>"


def endpoint(backend: str, srv: LLMTestServer, **kw: Any) -> Endpoint:
    base = srv.url + ("/v1" if backend.startswith("openai") else "")
    fmt = TGI_FORMAT if backend in ("tgi", "openai-completions") else None
    defaults = {"max_concurrency": 2, "backoff_base_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 10.0}
    return Endpoint(backend=backend, model="test/model", base_url=base, prompt_format=fmt, **{**defaults, **kw})


def run_all(client: Any, reqs: list[GenRequest]) -> dict[str, GenResult]:
    out: dict[str, GenResult] = {}
    client.run(reqs, lambda r: out.__setitem__(r.id, r), desc="test")
    return out


def post(url: str, body: dict) -> tuple[int, Any]:
    """POST ``body``; the status and the answer (JSON when it is JSON, else the text)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


# ----------------------------------------------------------------------------------------------
# the scripted server refuses what TGI's router refuses, as it answers
# ----------------------------------------------------------------------------------------------
TGI_REFUSALS = [
    ({"temperature": 0.0}, "`temperature` must be strictly positive"),
    ({"do_sample": True, "temperature": 0.7, "top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"top_p": 0.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"repetition_penalty": 0.0}, "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": 2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"typical_p": 1.0}, "`typical_p` must be > 0.0 and < 1.0"),
    ({"top_k": 0}, "`top_k` must be strictly positive"),
    ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
]


@pytest.mark.parametrize("route", ["/generate", "/"])
@pytest.mark.parametrize(("params", "message"), TGI_REFUSALS)
def test_scripted_tgi_refuses_what_the_router_refuses_with_its_status_and_body(route, params, message, llm_server):
    srv = llm_server()
    status, body = post(srv.url + route, {"inputs": "hello there", "parameters": {"max_new_tokens": 5, **params}})
    # router/src/infer/mod.rs InferError::ValidationError -> 422, error_type "validation" (server.rs)
    assert status == 422
    assert body == {"error": f"Input validation error: {message}", "error_type": "validation"}


def test_scripted_tgi_refuses_an_undeserializable_field_and_empty_inputs(llm_server):
    srv = llm_server()
    for bad in ({"seed": -1}, {"seed": 2**64}, {"seed": 1.5}, {"temperature": "hot"}):
        status, body = post(srv.url + "/generate", {"inputs": "hi", "parameters": bad})
        assert status == 422 and isinstance(body, str) and body.startswith("Failed to deserialize"), (bad, body)
    status, body = post(srv.url + "/generate", {"inputs": "", "parameters": {}})
    assert status == 422 and body["error"] == "Input validation error: `inputs` cannot be empty"
    # what TGI accepts: a u64 seed, greedy with a seed, sampling with top_p < 1, 4 stop sequences
    ok = {"seed": 2**64 - 1, "do_sample": False, "repetition_penalty": 1.1, "stop": ["a", "b", "c", "d"],
          "max_new_tokens": 3, "details": True}
    assert post(srv.url + "/generate", {"inputs": "hi there", "parameters": ok})[0] == 200
    sampled = {"seed": 1, "do_sample": True, "temperature": 5.0, "top_p": 0.999, "max_new_tokens": 3}
    assert post(srv.url + "/generate", {"inputs": "hi there", "parameters": sampled})[0] == 200


def test_scripted_vllm_refusals_are_400_in_vllms_error_shape(llm_server):
    srv = llm_server()
    base = {"model": "m", "prompt": "hi there", "max_tokens": 4}
    for bad, word in (({"top_p": 1.5}, "top_p"), ({"temperature": -0.1}, "temperature"),
                      ({"repetition_penalty": 0.0}, "repetition_penalty")):
        status, body = post(srv.url + "/v1/completions", {**base, **bad})
        assert status == 400 and body["error"]["type"] == "BadRequestError" and word in body["error"]["message"]
    # vLLM takes top_p 1.0 and temperature 0 (greedy)
    assert post(srv.url + "/v1/completions", {**base, "top_p": 1.0, "temperature": 0.0})[0] == 200


# ----------------------------------------------------------------------------------------------
# the TGI client sends, for every decoding setting a recipe allows, what TGI accepts
# ----------------------------------------------------------------------------------------------
DECODINGS = [
    {"temperature": 0.0},  # greedy, top_p 1.0 (the defaults)
    {"temperature": 0.0, "top_p": 0.9},  # greedy: top_p means nothing, and is not sent
    {"temperature": 0.7},  # sampling with top_p 1.0: TGI refuses 1.0, its default when absent
    {"temperature": 0.7, "top_p": 0.9},
    {"temperature": 5.0, "top_p": 1.0, "repetition_penalty": 1.2},
    {"temperature": 0.0, "repetition_penalty": 0.5, "stop": ["###", "</s>", "\n\n", "END"]},
]


@pytest.mark.parametrize("dec", DECODINGS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_tgi_client_sends_what_tgi_accepts_for_each_recipe_decoding(dec, llm_server):
    srv = llm_server()
    decoding = Decoding(max_new_tokens=8, **dec)
    out = run_all(make_client(endpoint("tgi", srv)), [request("a", "one two three", decoding, seed=7)])
    assert out["a"].ok, out["a"].error
    (call,) = srv.calls
    p = call.params
    assert call.status == 200 and p["seed"] == 7 and p["max_new_tokens"] == 8
    if decoding.temperature == 0:  # greedy as TGI spells it: no temperature, no top_p
        assert p["do_sample"] is False and "temperature" not in p and "top_p" not in p
    else:
        assert p["do_sample"] is True and p["temperature"] == decoding.temperature
        assert p.get("top_p") == (decoding.top_p if decoding.top_p < 1 else None)
    assert p.get("repetition_penalty") == decoding.repetition_penalty


# ----------------------------------------------------------------------------------------------
# the OpenAI clients on TGI's /v1 routes and on vLLM: top_p 1.0
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["openai-completions", "openai-chat"])
def test_openai_clients_on_tgis_v1_routes_leave_out_the_top_p_1_tgi_refuses(backend, llm_server):
    srv = llm_server(v1_server="tgi")
    client = make_client(endpoint(backend, srv, max_concurrency=1))
    reqs = [GenRequest(id=str(i), user=f"question {i}", temperature=0.7, top_p=1.0, seed=i, max_new_tokens=8)
            for i in range(4)]
    reqs.append(GenRequest(id="nucleus", user="question n", temperature=0.7, top_p=0.9, seed=9, max_new_tokens=8))
    reqs.append(GenRequest(id="greedy", user="question g", temperature=0.0, seed=10, max_new_tokens=8))
    out = run_all(client, reqs)
    assert all(r.ok for r in out.values()), {k: r.error for k, r in out.items() if not r.ok}
    # one refusal (422, TGI's validation), then the same request without top_p (TGI's default 1.0); the client
    # leaves it out from then on
    assert [c.status for c in srv.calls].count(422) == 1 and srv.calls[0].status == 422
    answered = [c for c in srv.calls if c.status == 200]
    assert len(answered) == len(reqs)
    by_seed = {c.params["seed"]: c.params for c in answered}
    assert all(by_seed[i]["top_p"] is None for i in range(4))
    assert by_seed[9]["top_p"] == 0.9  # below 1: sent as ever
    assert by_seed[10]["temperature"] == 0.0


@pytest.mark.parametrize("backend", ["openai-completions", "openai-chat"])
def test_openai_clients_keep_sending_top_p_1_to_vllm(backend, llm_server):
    # vLLM fills a parameter left out from the model's generation_config.json: top_p 1.0 must stay in the body
    srv = llm_server()
    out = run_all(make_client(endpoint(backend, srv)),
                  [GenRequest(id=str(i), user=f"q {i}", temperature=0.7, top_p=1.0, seed=i) for i in range(3)])
    assert all(r.ok for r in out.values())
    assert [c.status for c in srv.calls] == [200] * 3 and all(c.params["top_p"] == 1.0 for c in srv.calls)


@pytest.mark.parametrize("backend", ["openai-completions", "openai-chat"])
def test_a_fleet_mixing_tgi_and_vllm_leaves_top_p_1_out_only_at_the_tgi_replicas(backend, llm_server, monkeypatch):
    # one TGI replica and one vLLM replica behind the fleet client: TGI's refusal says nothing of vLLM, which fills
    # an absent top_p from the model's generation_config.json (it must keep getting 1.0)
    tgi_srv, vllm_srv = llm_server(v1_server="tgi"), llm_server()
    monkeypatch.setenv("BEZOAR_TEACHER_ENDPOINTS", f"{tgi_srv.url}/v1,{vllm_srv.url}/v1")
    client = make_client(endpoint(backend, tgi_srv, max_concurrency=2), role="teacher")
    out = run_all(client, [GenRequest(id=str(i), user=f"question {i}", temperature=0.7, top_p=1.0, seed=i,
                                      max_new_tokens=8) for i in range(40)])
    assert all(r.ok for r in out.values()) and len(out) == 40, {k: r.error for k, r in out.items() if not r.ok}
    tgi_ok = [c for c in tgi_srv.calls if c.status == 200]
    vllm_ok = [c for c in vllm_srv.calls if c.status == 200]
    assert tgi_ok and vllm_ok  # both served
    assert 1 <= [c.status for c in tgi_srv.calls].count(422) <= 2  # refused once per slot in flight, then left out
    assert all(c.params["top_p"] is None for c in tgi_ok)
    assert all(c.status == 200 and c.params["top_p"] == 1.0 for c in vllm_srv.calls)


@pytest.mark.parametrize("v1_server", ["tgi", "vllm"])
def test_a_chat_requests_repetition_penalty_reaches_tgi_as_presence_penalty_plus_2(v1_server, llm_server):
    # TGI's chat route ignores repetition_penalty and decodes with presence_penalty + 2 (router/src/lib.rs
    # ChatRequest::try_into_generate); vLLM reads repetition_penalty itself (and presence_penalty is another
    # penalty there). The scripted server records the penalty each decodes with.
    srv = llm_server(v1_server=v1_server)
    client = make_client(endpoint("openai-chat", srv))
    reqs = [GenRequest(id=str(i), user=f"q {i}", temperature=0.7, top_p=0.9, seed=i, repetition_penalty=1.2)
            for i in range(4)]
    reqs.append(GenRequest(id="plain", user="q p", temperature=0.7, top_p=0.9, seed=9))
    out = run_all(client, reqs)
    assert all(r.ok for r in out.values()), {k: r.error for k, r in out.items() if not r.ok}
    by_seed = {c.params["seed"]: c.params for c in srv.calls if c.status == 200}
    assert all(by_seed[i]["repetition_penalty"] == pytest.approx(1.2) for i in range(4))
    assert by_seed[9]["repetition_penalty"] is None
    assert srv.info_asked == 1  # asked once per server, whatever it says


def test_a_chat_request_without_a_penalty_never_asks_what_the_server_is(llm_server):
    srv = llm_server(v1_server="tgi")
    out = run_all(make_client(endpoint("openai-chat", srv)),
                  [GenRequest(id=str(i), user=f"q {i}", temperature=0.7, top_p=0.9, seed=i) for i in range(3)])
    assert all(r.ok for r in out.values()) and srv.info_asked == 0


def test_other_422s_are_not_sent_again_without_top_p(llm_server):
    srv = llm_server(v1_server="tgi")
    client = make_client(endpoint("openai-completions", srv))
    out = run_all(client, [GenRequest(id="a", user="q", temperature=0.7, top_p=1.0, repetition_penalty=0.0)]
                  + [GenRequest(id=str(i), user=f"q{i}", temperature=0.7, top_p=0.5) for i in range(3)])
    assert not out["a"].ok and "repetition_penalty" in (out["a"].error or "") and out["a"].cause == "HTTP 422 refused"
    assert len([c for c in srv.calls if c.status == 422]) == 1


# ----------------------------------------------------------------------------------------------
# too long for the model: refused for that request only, the cause counted and the message kept
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("backend", "v1_server", "status", "says"), [
    ("tgi", "vllm", 422, "`inputs` tokens + `max_new_tokens` must be <= 20"),
    ("openai-completions", "vllm", 400, "maximum context length is 20 tokens"),
    ("openai-completions", "tgi", 422, "`inputs` tokens + `max_new_tokens` must be <= 20"),
])
def test_a_prompt_too_long_fails_that_request_once_with_the_servers_message(backend, v1_server, status, says,
                                                                             llm_server):
    srv = llm_server(context_tokens=20, v1_server=v1_server)
    client = make_client(endpoint(backend, srv, max_retries=6))
    long = GenRequest(id="long", user="word " * 30, temperature=0.0, max_new_tokens=4)
    out = run_all(client, [long] + [GenRequest(id=str(i), user=f"short {i}", temperature=0.0, top_p=0.5,
                                               max_new_tokens=4) for i in range(4)])
    assert not out["long"].ok and says in (out["long"].error or "")
    assert out["long"].cause == f"HTTP {status} refused" and out["long"].retries == 0
    assert all(out[str(i)].ok for i in range(4))
    assert len([c for c in srv.calls if c.fault == "too-long"]) == 1  # never sent again


# ----------------------------------------------------------------------------------------------
# statuses and error bodies
# ----------------------------------------------------------------------------------------------
def test_tgi_424_generation_error_is_retried(llm_server):
    # router/src/server.rs: InferError::GenerationError -> 424; backends/v3/src/backend.rs send_errors fails the
    # whole batch when the shard fails (e.g. out of memory), and the server goes on: a retry answers it
    srv = llm_server(plan=["424"])
    out = run_all(make_client(endpoint("tgi", srv)), [GenRequest(id="a", user="one two", temperature=0.0)])
    assert out["a"].ok and out["a"].retries == 1
    assert [c.status for c in srv.calls] == [424, 200]


def test_the_statuses_mean_what_the_servers_mean():
    def classify(status: int, body: bytes) -> Exception:
        return classify_status(status, tgi._error_text(body), {}, "teacher", "KEY")

    overloaded = classify(429, b'{"error": "Model is overloaded", "error_type": "overloaded"}')
    assert isinstance(overloaded, Transient) and overloaded.kind == "overloaded"
    gen = classify(424, b'{"error": "Request failed during generation: Server error: OOM", "error_type": "generation"}')
    assert isinstance(gen, Transient) and gen.status == 424 and "OOM" in gen.reason
    incomplete = classify(500, b'{"error": "Incomplete generation", "error_type": "incomplete_generation"}')
    assert isinstance(incomplete, Transient)
    unhealthy = classify(503, b'{"error": "unhealthy", "error_type": "healthcheck"}')
    assert isinstance(unhealthy, Transient) and unhealthy.cause == "HTTP 503"
    invalid = classify(422, b'{"error": "Input validation error: `top_p` must be > 0.0 and < 1.0", '
                            b'"error_type": "validation"}')
    assert isinstance(invalid, Rejected) and "`top_p` must be > 0.0 and < 1.0 (validation)" in str(invalid)


def test_error_bodies_of_every_server_are_read_to_their_message():
    # vLLM now (engine/protocol.py ErrorResponse) and OpenAI; TGI's /v1 routes; vLLM before its nested errors
    assert openai_api._error_text(400, b'{"error": {"message": "too long", "type": "BadRequestError", "code": 400}}') \
        == "Error code: 400 - too long"
    assert openai_api._error_text(422, b'{"error": "Input validation error: x", "error_type": "validation"}') \
        == "Error code: 422 - Input validation error: x (validation)"
    assert openai_api._error_text(400, b'{"object": "error", "message": "too long", "type": "BadRequestError", '
                                       b'"param": null, "code": 400}') == "Error code: 400 - too long"
    assert openai_api._error_text(502, b"<html>bad gateway</html>") == "Error code: 502 - <html>bad gateway</html>"


def test_a_used_up_openai_quota_stops_the_stage_instead_of_being_retried_as_a_rate_limit():
    """OpenAI answers a used-up quota with 429 (code insufficient_quota): it was retried as a rate limit, every
    request slowly failing after max_retries; it is bad input now (exit 2), naming the account's quota. A plain
    429 and TGI's overload stay retryable."""
    from bezoar_jobs.errors import BadInput

    quota = classify_status(429, "Error code: 429 - You exceeded your current quota, please check your plan and "
                                 "billing details.", None, "judge (openai-chat)", "the key in $OPENAI_API_KEY")
    assert isinstance(quota, BadInput) and "the account's quota is used up" in str(quota)
    rate = classify_status(429, "Error code: 429 - Rate limit reached for requests", None, "judge", "k")
    over = classify_status(429, "Error code: 429 - Model is overloaded (overloaded)", None, "teacher", "k")
    assert isinstance(rate, Transient) and rate.kind == "rate"
    assert isinstance(over, Transient) and over.kind == "overloaded"


def test_the_prompt_tokens_header_is_read_only_as_a_whole_count():
    # TGI's x-prompt-tokens (router/src/server.rs: the validated input length); anything else is no count, and
    # the prompt's tokens are then estimated
    assert [tgi._header_count(v) for v in ("12", " 7 ", "0", "", "-3", "1.5", "many", None)] == [
        12, 7, None, None, None, None, None, None]


def test_an_info_that_says_true_is_no_capacity(llm_server):
    """TGI's /info max_concurrent_requests is a number; a JSON true (a proxy's or a stub's) was read as a
    capacity of 1, and the budget then let one request in flight."""
    from bezoar_jobs.llm import budget

    srv = llm_server()
    for said, capacity in ((True, None), (128, 128), (0, None), ("128", None)):
        srv.max_concurrent_requests = said  # what its GET /info says (nothing is generated here)
        assert budget.tgi_info_capacity(srv.url) == capacity, said
