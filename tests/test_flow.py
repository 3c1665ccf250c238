"""Records flow through their steps instead of waiting for whole phases; tails do not idle the pool;
the scripted server honours the output limits the APIs define (issue 13)."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import random
import re
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter

import pytest

from bezoar_jobs.llm import GenRequest, make_client
from bezoar_jobs.manifest import read_manifest
from bezoar_jobs.recipe import Recipe
from bezoar_jobs.store import Store, open_store
from tests.llm_server import LLMTestServer, count_tokens, running
from tests.scripted import scripted_answer, scripted_recipe
from tests.test_llm_clients import endpoint, per_prompt, run_all
from tests.test_schemes_e2e import bezoar, dolly_file, evolving_script


# ----------------------------------------------------------------------------------------------
# the scripted server: output limits as the APIs define them
# ----------------------------------------------------------------------------------------------
def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_scripted_server_honours_max_completion_tokens_and_the_tgi_default():
    long = " ".join(f"w{i}" for i in range(300))
    with LLMTestServer(script=lambda p: long) as srv:
        chat = srv.url + "/v1/chat/completions"
        msgs = [{"role": "user", "content": "hi"}]
        status, body = _post(chat, {"model": "m", "messages": msgs, "max_completion_tokens": 8})
        assert status == 200 and body["usage"]["completion_tokens"] == 8
        assert count_tokens(body["choices"][0]["message"]["content"]) == 8
        assert body["choices"][0]["finish_reason"] == "length"
        # max_tokens is the deprecated alias; without a limit a chat answer is not cut
        assert _post(chat, {"model": "m", "messages": msgs, "max_tokens": 5})[1]["usage"]["completion_tokens"] == 5
        assert _post(chat, {"model": "m", "messages": msgs})[1]["usage"]["completion_tokens"] == 300
        assert _post(chat, {"model": "m", "messages": msgs, "max_completion_tokens": 0})[0] == 400
        # the legacy completions API knows only max_tokens (default 16)
        comp = srv.url + "/v1/completions"
        assert _post(comp, {"model": "m", "prompt": "x", "max_completion_tokens": 8})[0] == 400
        assert _post(comp, {"model": "m", "prompt": "x"})[1]["usage"]["completion_tokens"] == 16
        # TGI: max_new_tokens, default 100
        status, out = _post(srv.url + "/generate", {"inputs": "x", "parameters": {"details": True}})
        assert status == 200 and out["details"]["generated_tokens"] == 100
        status, out = _post(srv.url + "/generate", {"inputs": "x", "parameters": {"max_new_tokens": 8}})
        assert out["details"]["generated_tokens"] == 8
        with urllib.request.urlopen(srv.url + "/health", timeout=5) as r:
            assert r.status == 200


def test_equality_checks_decode_only_the_tokens_they_ask_for():
    """The judge's equality check asks for 8 tokens: a chat judge that would write more is cut there."""
    with LLMTestServer(script=lambda p: "Different, because " + "word " * 200) as srv:
        client = make_client(endpoint("openai-chat", srv))
        out = run_all(client, [GenRequest(id="e", user="Task A: x\nTask B: y", max_new_tokens=8)])
        assert out["e"].completion_tokens == 8 and srv.calls[0].output_tokens == 8


# ----------------------------------------------------------------------------------------------
# tails: deadlines from the latency distribution, Retry-After without idling the pool
# ----------------------------------------------------------------------------------------------
def test_a_hung_request_is_hedged_or_abandoned_past_the_p99_and_sent_again_with_its_seed():
    with running(rule=per_prompt({"sleepy": ["hang"]}), hang_s=30, latency=0.01) as srv:
        client = make_client(endpoint("tgi", srv, timeout_s=25.0, max_retries=0))
        reqs = [GenRequest(id=f"q{i}", user=f"quick {i}", seed=i) for i in range(70)]
        reqs.insert(60, GenRequest(id="s", user="sleepy", seed=1234))
        t0 = time.monotonic()
        out = run_all(client, reqs)
        took = time.monotonic() - t0
    assert all(r.ok for r in out.values())
    # abandoned once far past the running p99 (the 1 s floor here), not after timeout_s=25
    assert took < 8, took
    sleepy = [c for c in srv.calls if "sleepy" in c.prompt]
    assert len(sleepy) == 2 and sleepy[0].seed == sleepy[1].seed == 1234
    assert sleepy[1].arrived - sleepy[0].arrived < 5
    # answered by a duplicate (hedged past the p99) or sent again at the deadline: no attempt used up
    assert out["s"].retries == 0 and client.usage.retries <= 1


def _among_quick(req: GenRequest, n: int) -> list[GenRequest]:
    """``n`` quick requests with ``req`` the 61st: by then the running p99 is known (50 answers)."""
    reqs = [GenRequest(id=f"q{i}", user=f"quick {i}", seed=i) for i in range(n)]
    reqs.insert(60, req)
    return reqs


@pytest.mark.parametrize("hangs", [2, 3])
def test_a_duplicate_that_hangs_too_is_followed_by_another_not_cut_at_the_deadline(hangs):
    """One duplicate per attempt: when the hedge of a hung request hung as well (a 5% hang rate makes that
    one request in 400), both waited for the deadline, 3 x the p99 after the first was sent; with three
    racing at most, a third hang waited for the deadline after the newest."""
    with running(rule=per_prompt({"sleepy": ["hang"] * hangs}), hang_s=30, latency=0.01) as srv:
        client = make_client(endpoint("tgi", srv, timeout_s=25.0, max_retries=0))
        out = run_all(client, _among_quick(GenRequest(id="s", user="sleepy", seed=99), 70))
    assert all(r.ok for r in out.values())
    sleepy = [c for c in srv.calls if "sleepy" in c.prompt]
    assert [c.seed for c in sleepy] == [99] * (hangs + 1)
    # the answer came from a duplicate, each sent a hedge interval after the one before
    assert client.tail_counts()["hedged"] == hangs and client.tail_counts()["abandoned"] == 0, client.tail_counts()


def test_a_hung_request_at_the_end_is_duplicated_before_the_half_second_floor():
    """At a flow's end nothing waits for a slot, so a duplicate displaces nothing; a hung short answer still
    waited for the 0.5 s floor, and on the bench's fast server that wait was most of a filter stage's idle end
    under the fault mix (busy 0.862-0.955 over 6 runs; 0.942-0.981 with the 0.1 s floor when idle)."""
    with running(rule=per_prompt({"last one": ["hang"]}), hang_s=30, latency=0.01) as srv:
        client = make_client(endpoint("tgi", srv, max_concurrency=8, timeout_s=25.0))
        reqs = [GenRequest(id=f"q{i}", user=f"quick {i}", seed=i) for i in range(100)]
        out = run_all(client, [*reqs, GenRequest(id="last", user="last one", seed=3)])
    assert all(r.ok for r in out.values())
    hung = [c for c in srv.calls if "last one" in c.prompt]
    assert len(hung) == 2 and hung[0].seed == hung[1].seed == 3
    assert hung[1].arrived - hung[0].arrived < 0.35, hung[1].arrived - hung[0].arrived


def test_refused_duplicates_of_a_hung_request_do_not_use_up_its_duplicates():
    """Five sends per attempt counted the refused duplicates too: a hung request whose next four duplicates
    were refused (429/503) waited for the deadline, though none of them had cost the server anything."""
    faults = ["hang", "429", "503", "429", "503"]
    with running(rule=per_prompt({"sleepy": faults}), retry_after=None, hang_s=30, latency=0.01) as srv:
        client = make_client(endpoint("tgi", srv, timeout_s=25.0, max_retries=8))
        out = run_all(client, _among_quick(GenRequest(id="s", user="sleepy", seed=5), 70))
    assert all(r.ok for r in out.values())
    sleepy = [c for c in srv.calls if "sleepy" in c.prompt]
    assert [c.fault for c in sleepy] == [*faults, None] and sleepy[-1].status == 200
    assert client.tail_counts()["abandoned"] == 0, client.tail_counts()


def test_a_refused_duplicate_does_not_give_up_an_original_still_decoding_a_long_answer():
    """A duplicate answered 503 gave up the original too (presumed hung): a long answer that was still
    decoding was cancelled and asked again from the start, and the stage's end waited for it twice."""
    def latency(prompt: str) -> float:
        return 0.9 if "long one" in prompt else 0.01

    with running(rule=per_prompt({"long one": [None, "503"]}), retry_after=None, latency=latency) as srv:
        client = make_client(endpoint("tgi", srv, max_concurrency=4, timeout_s=25.0))
        out = run_all(client, _among_quick(GenRequest(id="long", user="long one", seed=7), 80))
    assert all(r.ok for r in out.values())
    long = [c for c in srv.calls if "long one" in c.prompt]
    assert long[1].status == 503  # the duplicate, sent past the 0.5 s floor, was refused
    assert long[0].status == 200 and out["long"].retries == 0, [(c.status, c.fault) for c in long]


def test_no_duplicate_races_a_long_answer_at_the_start_of_a_stage():
    """The first answers of a stage are its short ones (the long ones sent with them are still decoding),
    so the p99 of the first 50 was a fraction of the real one and the long answers of the first seconds
    were raced by duplicates: decoding spent twice while every slot was wanted."""
    def latency(prompt: str) -> float:  # log-normal, fixed per prompt: median 0.06 s, a tail cut at 0.9 s
        z = random.Random(zlib.crc32(prompt.encode())).gauss(0.0, 1.0)
        return min(0.9, 0.06 * math.exp(1.2 * z))

    with running(latency=latency) as srv:
        client = make_client(endpoint("tgi", srv, max_concurrency=32, timeout_s=25.0))
        out = run_all(client, [GenRequest(id=f"q{i}", user=f"request {i}", seed=i) for i in range(400)])
    assert all(r.ok for r in out.values())
    # none of the first half asked twice (at the very end, with nothing left to wait for a slot, a long answer
    # may be raced on purpose: the duplicate displaces nothing)
    asked = Counter(int(re.search(r"request (\d+)<", c.prompt).group(1)) for c in srv.calls)
    assert [i for i, n in asked.items() if n > 1 and i < 200] == [], client.tail_counts()


def test_every_hung_request_is_hedged_when_hangs_are_more_than_the_hedge_budget():
    """The hedge budget counted every duplicate (4 + 5% of the attempts): with more hangs than that, the rest
    waited for the deadline. A hung request's duplicate is the one that answers, so it adds no load; the
    budget now bounds the duplicates that proved unneeded."""
    hung = {f"quick {i}<": ["hang"] for i in range(5, 160, 10)}  # 16 of 160 hang once
    with running(rule=per_prompt(hung), hang_s=30, latency=0.01) as srv:
        client = make_client(endpoint("tgi", srv, max_concurrency=8, timeout_s=25.0, max_retries=0))
        out = run_all(client, [GenRequest(id=f"q{i}", user=f"quick {i}", seed=i) for i in range(160)])
    assert all(r.ok for r in out.values())
    for key in hung:
        calls = [c for c in srv.calls if key in c.prompt]
        assert len(calls) == 2 and calls[0].seed == calls[1].seed, key
    counts = client.tail_counts()
    assert counts["abandoned"] == 0 and counts["hedged"] == len(hung), counts


def test_hung_requests_and_their_duplicates_stay_within_the_servers_admission_limit():
    """Past its p99 an attempt gave its slot to the next request and a duplicate raced it, both on top of the
    budget: against TGI's admission limit (``/info`` max_concurrent_requests, the budget's capacity) the server
    saw more than it admits and refused the excess at once ("Model is overloaded"). With three stages sharing
    the limit that was thousands of refusals and rows lost after their retries ran out."""
    hung = {f"quick {i}<": ["hang"] for i in range(5, 160, 10)}  # 16 of 160 hang once
    with running(rule=per_prompt(hung), hang_s=30, latency=0.01, max_concurrent_requests=8) as srv:
        client = make_client(endpoint("tgi", srv, max_concurrency=8, timeout_s=25.0, max_retries=0), role="teacher")
        out = run_all(client, [GenRequest(id=f"q{i}", user=f"quick {i}", seed=i) for i in range(160)])
    refused = [c for c in srv.calls if c.status == 429]
    assert not refused and srv.max_in_flight <= 8, (len(refused), srv.max_in_flight)
    assert all(r.ok for r in out.values())
    for key in hung:  # each hung request was still raced by a duplicate, not left to its deadline
        calls = [c for c in srv.calls if key in c.prompt]
        assert len(calls) == 2 and calls[0].seed == calls[1].seed, key
    assert client.tail_counts()["abandoned"] == 0


def test_a_limit_cut_for_overload_takes_what_the_finished_pods_freed_at_once():
    """A pod whose limit was cut for overload (42 -> 21: a client outside the budget crowds the server) got none
    of the share the other pods freed when they finished: the cut limit grew back one place a second, so its
    stage, alone on 128 slots, used 21 of them for a minute and more. The cut now stays cut by as much."""
    from bezoar_jobs.llm.gate import Admission

    places = Admission(42)
    while places.limit == 42:
        places.overloaded(41)  # most recent attempts refused as overloaded, with 41 others there
    assert places.limit == 21
    places.set_ceiling(128)  # the two other stages finished: their 86 places are free, whoever crowds
    assert places.limit == 21 + 86
    places.set_ceiling(64)  # one came back (a retried pod): the smaller share caps it
    assert places.limit == 64
    fresh = Admission(42)
    fresh.set_ceiling(128)
    assert fresh.limit == 128  # never cut: the new share


def _clock(monkeypatch) -> list[float]:
    """llm/gate.py's clock, moved by the test (``now[0]``)."""
    from types import SimpleNamespace

    import bezoar_jobs.llm.gate as gate

    now = [1000.0]
    monkeypatch.setattr(gate, "time", SimpleNamespace(monotonic=lambda: now[0]))
    return now


def test_a_burst_refused_by_a_server_others_fill_is_held_and_cut_though_it_holds_few_there(monkeypatch):
    """A stage's first burst at a server another client had filled: each refused request's place went at once to
    a fresh request, refused in turn, and with few held there between refusals the limit was never cut (the
    fleet's crowded replica: ~55 refusals in 40 ms). Most recent outcomes refused, the client now has there only
    what it still has, one more each FULL_HOLD_S, and the limit is cut by what it wanted there."""
    from bezoar_jobs.llm.gate import FULL_HOLD_S, Admission

    now = _clock(monkeypatch)
    places = Admission(8)
    cuts = [places.overloaded(held=i % 2, who=f"r{i % 10}") for i in range(16)]  # 10 requests, 0-1 held each time
    assert cuts[:15] == [None] * 15 and cuts[15] == 4  # it wanted 10 there: cut to half its limit
    assert places.room() == 1  # full now: what it still had there ...
    now[0] += 2.5 * FULL_HOLD_S
    assert places.room() == 3  # ... and one more each FULL_HOLD_S
    now[0] += 10 * FULL_HOLD_S
    assert places.room() == 4 and not places.holding()  # back at its (cut) limit
    # a stage's last retries, refused in a row: few requests, however many refusals, are not a cut
    tail = Admission(8)
    assert all(tail.overloaded(held=1, who=f"t{i % 2}") is None for i in range(40)) and tail.limit == 8


def test_a_refused_probe_gives_its_place_back_at_once(monkeypatch):
    """A limit cut for overload grows back one place at a time to find room; a refusal of the place it grew by
    waited for most recent outcomes to be refusals before the limit dropped (~15 refusals a probe, each client,
    each second). The place it grew by now goes at the first refusal while the client used it."""
    from bezoar_jobs.llm.gate import GROW_EVERY_S, Admission

    now = _clock(monkeypatch)
    places = Admission(8)
    while places.limit == 8:
        places.overloaded(held=7, who=object())
    assert places.limit == 4
    for _ in range(32):  # the server answers: the window is answers only
        places.answered()
    now[0] += GROW_EVERY_S
    assert places.answered() == 5  # grown by one
    assert places.overloaded(held=4, who="probe") is None and places.room() == places.limit == 4  # had 5 there
    now[0] += GROW_EVERY_S
    for _ in range(4):
        places.answered()
    assert places.limit == 5
    assert places.overloaded(held=2, who="elsewhere") is None and places.limit == 5  # not the probe's place


def test_a_gate_over_places_follows_their_limit_without_a_copy_of_it(monkeypatch):
    """The pool's places at the server (llm/pool.py ``_wire_gate``) are a Gate over an Admission. The gate kept a copy
    of the limit that the pool mirrored on each cut and growth, but not on a refused probe, so after one the gate
    still counted the place given back (a duplicate saw a place at the server that was not there). It now reads the
    Admission's limit: a cut, a refused probe and a growth show at once, and a growth lets a waiter in on wake()."""
    from bezoar_jobs.llm.gate import GROW_EVERY_S, Admission, Gate

    now = _clock(monkeypatch)
    places = Admission(8)
    gate = Gate(places=places)
    assert gate.limit == 8
    while places.limit == 8:
        places.overloaded(held=7, who=object())
    assert gate.limit == places.limit == 4
    for _ in range(32):
        places.answered()
    now[0] += GROW_EVERY_S
    assert places.answered() == 5 and gate.limit == 5
    places.overloaded(held=4, who="probe")  # the grown place refused: given back, no new limit reported
    assert gate.limit == 4
    with pytest.raises(ValueError, match="takes their limit"):
        gate.set_limit(6)

    async def scenario() -> list[str]:
        order: list[str] = []
        for _ in range(4):
            await gate.acquire((1, 0))
        waiter = asyncio.ensure_future(gate.acquire((1, 0)))
        await asyncio.sleep(0)
        assert not waiter.done()  # at its limit of 4
        for _ in range(4):
            places.answered()
        now[0] += GROW_EVERY_S
        assert places.answered() == 5
        gate.wake()
        await asyncio.sleep(0)
        order.append("in" if waiter.done() else "waiting")
        return order

    assert asyncio.run(scenario()) == ["in"]


def test_a_stage_that_starts_on_a_server_another_client_filled_waits_for_room_instead_of_bouncing_off_it():
    """The pool end to end: a TGI server another client has filled (8 long requests at its admission limit of 8)
    when a stage starts. Before, its 40 requests bounced off the full server ~ every 10 ms each for as long as the
    others held it, hundreds of refusals; now it is held while the server refuses most attempts."""
    import threading

    def occupy(srv: LLMTestServer, i: int) -> None:
        body = json.dumps({"inputs": f"occupant {i}", "parameters": {"max_new_tokens": 300}}).encode()
        req = urllib.request.Request(srv.url + "/generate", data=body, headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=30).read()

    with running(capacity=8, per_token_s=0.002, max_concurrent_requests=8,
                 script=lambda p: "tok " * (300 if "occupant" in p else 20)) as srv:
        others = [threading.Thread(target=occupy, args=(srv, i)) for i in range(8)]
        for t in others:
            t.start()
        deadline = time.monotonic() + 10
        while srv.in_flight < 8 and time.monotonic() < deadline:
            time.sleep(0.005)
        client = make_client(endpoint("tgi", srv, max_concurrency=8, max_retries=3), role="teacher")
        out = run_all(client, [GenRequest(id=f"s{i}", user=f"stage {i}", seed=i) for i in range(40)])
        for t in others:
            t.join()
    assert all(r.ok for r in out.values()) and len(out) == 40
    occupied = [c for c in srv.calls if "occupant" in c.prompt]
    assert len(occupied) == 8 and all(c.status == 200 for c in occupied)
    held_until = min(c.finished for c in occupied)
    refused = [c for c in srv.calls if c.status == 429]
    assert refused and all(c.arrived < held_until + 1.0 for c in refused)
    assert len(refused) <= 40, len(refused)  # the old code: hundreds


def test_a_judge_on_a_tgi_server_of_its_own_keeps_within_what_that_server_admits():
    """A TGI judge that is not the teacher's server had no budget: its places there were twice its slots, and a
    judge with 8 slots on a server admitting 4 sent 8 at once, the excess refused as overloaded until its limit
    was cut. It now reads that server's /info as the teacher does (no other pod of the run shares it)."""
    with running(capacity=4, per_token_s=0.002, max_concurrent_requests=4, script=lambda p: "tok " * 20) as srv:
        judge = make_client(endpoint("tgi", srv, max_concurrency=8, max_retries=3), role="judge",
                            teacher_url="http://teacher.example:80")
        assert srv.info_asked == 1 and judge.budget is not None and judge.budget.capacity == 4
        out = run_all(judge, [GenRequest(id=f"j{i}", user=f"judge {i}", seed=i) for i in range(80)])
    assert all(r.ok for r in out.values()) and len(out) == 80
    refused = [c for c in srv.calls if c.status == 429]
    assert not refused and srv.max_in_flight <= 4, (len(refused), srv.max_in_flight)


def test_the_budget_decides_every_kind_of_judge_in_one_place():
    """llm/budget.py ``plan`` decides what each judge may keep in flight (the factory had half the choice, a judge on
    a server of its own, beside ``plan``): a judge on the teacher's server without the teacher's client (a filter
    pod) gets a pod's share of the teacher's capacity; beside the teacher's client in its pod it goes through the
    teacher's books and has no budget; on a TGI server of its own it keeps within that server's /info; an API judge
    has none."""
    from bezoar_jobs.llm.budget import PARTIES_ENV, plan

    with running(capacity=4, max_concurrent_requests=12) as teacher_srv, \
            running(capacity=4, max_concurrent_requests=5) as own_srv:
        env = {PARTIES_ENV: "3"}
        judge = endpoint("openai-chat", teacher_srv, max_concurrency=8)
        ep, b = plan(judge, "judge", environ=env, teacher=(teacher_srv.url, "tgi"))
        assert b is not None and (b.capacity, b.parties, ep.max_concurrency) == (12, 3, 4)  # a filter pod's share
        ep, b = plan(judge, "judge", environ=env, teacher=(teacher_srv.url, "tgi"), teacher_here=True)
        assert b is None and ep.max_concurrency == 8  # the teacher's client in its pod keeps the books
        asked = teacher_srv.info_asked
        own = endpoint("tgi", own_srv, max_concurrency=8)
        ep, b = plan(own, "judge", environ=env, teacher=(teacher_srv.url, "tgi"))
        assert b is not None and (b.capacity, b.parties, ep.max_concurrency) == (5, 1, 5)  # its server, alone
        assert teacher_srv.info_asked == asked and own_srv.info_asked == 1  # the teacher's server not asked
        api = endpoint("openai-chat", own_srv, max_concurrency=8)
        ep, b = plan(api, "judge", environ=env, teacher=(teacher_srv.url, "tgi"))
        assert b is None and ep.max_concurrency == 8 and own_srv.info_asked == 1


def test_clients_the_budget_does_not_know_of_share_the_servers_admission_limit_instead_of_losing_rows():
    """A judge on the teacher's own server (Evol-Instruct's equality checks, a filter with an open judge) is not
    in the teacher's budget: together they sent more than TGI admits, it refused the excess as overloaded, and
    refused requests went back at once (most attempts were answered), were refused again, and their retries
    ran out: rows lost. Told "overloaded", a client now sends fewer at once and grows back slowly."""
    import threading

    with running(capacity=8, per_token_s=0.002, max_concurrent_requests=8, script=lambda p: "tok " * 20) as srv:
        clients = {role: make_client(endpoint("tgi", srv, max_concurrency=8, max_retries=3), role=role)
                   for role in ("teacher", "judge")}
        outs: dict[str, dict] = {}

        def run(role: str) -> None:
            outs[role] = run_all(clients[role], [GenRequest(id=f"{role}{i}", user=f"{role} {i}") for i in range(300)])

        threads = [threading.Thread(target=run, args=(role,)) for role in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    failed = [r.id for o in outs.values() for r in o.values() if not r.ok]
    refused = [c for c in srv.calls if c.status == 429]
    assert not failed and len(outs["teacher"]) == len(outs["judge"]) == 300, failed[:5]
    assert len(refused) < 0.2 * len(srv.calls), (len(refused), len(srv.calls))  # the old code: ~65%


def test_refusals_as_overloaded_now_and_then_do_not_make_the_pool_send_fewer():
    """The other side of the test above: TGI marks every 429 "overloaded", and a fault mix refuses one attempt
    in five at random. Halving on each of those left one or two places and a stage of hung requests stalled
    behind them; the pool sends fewer only while most recent attempts are refused."""
    with running(capacity=8, per_token_s=0.002, rates={"429": 0.2}, retry_after=None, seed=3,
                 script=lambda p: "tok " * 20) as srv:
        client = make_client(endpoint("tgi", srv, max_concurrency=8, max_retries=8), role="teacher")
        out = run_all(client, [GenRequest(id=f"q{i}", user=f"quick {i}") for i in range(300)])
    assert all(r.ok for r in out.values())
    assert [c for c in srv.calls if c.status == 429]
    served = sorted((c for c in srv.calls if c.status == 200), key=lambda c: c.decode_start)
    late = served[len(served) // 3: -len(served) // 3]  # the middle of the run, past any start
    events = sorted([(c.decode_start, 1) for c in late] + [(c.finished, -1) for c in late])
    most, n = 0, 0
    for _, d in events:
        n += d
        most = max(most, n)
    assert most >= 6, most


def test_one_retry_after_does_not_pause_the_whole_pool():
    """A Retry-After paused every new attempt of the pool: one 429 among many answers idled the server."""
    with running(rule=per_prompt({"unlucky": ["429"]}), retry_after="1.5", latency=0.02) as srv:
        client = make_client(endpoint("tgi", srv, max_concurrency=4))
        reqs = [GenRequest(id="u", user="unlucky")] + [GenRequest(id=f"q{i}", user=f"quick {i}") for i in range(120)]
        out = run_all(client, reqs)
    assert all(r.ok for r in out.values())
    unlucky = [c for c in srv.calls if "unlucky" in c.prompt]
    assert len(unlucky) == 2 and unlucky[1].arrived - unlucky[0].finished >= 1.4  # honoured for that request
    refused_at = unlucky[0].finished
    meanwhile = [c for c in srv.calls if refused_at < c.arrived < refused_at + 1.0]
    assert len(meanwhile) >= 20, len(meanwhile)


def _longest_jitter(monkeypatch) -> None:
    """Every full-jitter draw at its top, so a backoff's length is known."""
    import bezoar_jobs.llm.pool as pool

    monkeypatch.setattr(pool.random, "uniform", lambda lo, hi: hi)


def test_a_request_refused_again_and_again_while_the_rest_are_answered_does_not_back_off_longer(monkeypatch):
    """A 429/503 without Retry-After doubled the request's wait each time (0.2, 0.4, ... 3.2 s) though the
    server answered nearly everything else: one unlucky record's chain held up the stage's end."""
    _longest_jitter(monkeypatch)
    refusals = ["503", "429", "503", "429", "503"]
    with running(rule=per_prompt({"unlucky": refusals}), retry_after=None, latency=0.02) as srv:
        client = make_client(endpoint("tgi", srv, max_concurrency=4, backoff_base_s=0.2, backoff_max_s=10.0))
        reqs = [GenRequest(id=f"q{i}", user=f"quick {i}") for i in range(60)]
        reqs.insert(20, GenRequest(id="u", user="unlucky"))
        out = run_all(client, reqs)
    assert all(r.ok for r in out.values()) and out["u"].retries == len(refusals)
    tries = [c for c in srv.calls if "unlucky" in c.prompt]
    gaps = [b.arrived - a.finished for a, b in itertools.pairwise(tries)]
    assert all(0.19 <= g < 0.5 for g in gaps), gaps


def test_refusals_from_a_server_that_refuses_most_requests_still_back_off_exponentially(monkeypatch):
    _longest_jitter(monkeypatch)
    with running(rule=lambda prompt: "503", retry_after=None, latency=0.01) as srv:
        client = make_client(endpoint("tgi", srv, max_concurrency=1, backoff_base_s=0.1, backoff_max_s=10.0,
                                      max_retries=3))
        out = run_all(client, [GenRequest(id="a", user="anything")])
    assert not out["a"].ok
    gaps = [b.arrived - a.finished for a, b in itertools.pairwise(srv.calls)]
    assert len(gaps) == 3 and gaps[0] >= 0.09 and gaps[1] >= 0.19 and gaps[2] >= 0.39, gaps


def test_a_retry_and_a_step_that_unlocks_work_go_before_fresh_requests_waiting_for_a_slot():
    """Waiters for a slot were served first come first served: a retry (the record a stage's end waits on)
    queued behind every fresh request, and a LaMini list behind the responses asked before it."""
    with running(rule=per_prompt({"unlucky": ["500"]}), latency=0.03) as srv:
        client = make_client(endpoint("tgi", srv, max_concurrency=2, backoff_base_s=0.01, backoff_max_s=0.01))
        reqs = ([GenRequest(id="u", user="unlucky")] + [GenRequest(id=f"q{i}", user=f"quick {i}") for i in range(60)]
                + [GenRequest(id="list", user="a list that unlocks more", priority=1)])
        out = run_all(client, reqs)
    assert all(r.ok for r in out.values())
    order = [c.prompt for c in srv.calls]
    again = [i for i, p in enumerate(order) if "unlucky" in p]
    assert len(again) == 2 and again[1] <= 5, again  # the retry took the next free slot
    assert next(i for i, p in enumerate(order) if "unlocks" in p) <= 12  # not behind the 60 asked before it
    assert client.tail_counts() == {"attempts": 63, "retries": 1, "hedged": 0, "abandoned": 0}


def test_a_hung_short_request_is_hedged_by_its_own_classes_p99_not_the_longest_answers():
    """One p99 over every request: an 8-token check that hung waited for 1.5 x the p99 of the long answers."""
    def latency(prompt: str) -> float:
        return 0.8 if "long" in prompt else 0.01  # the long ones answer before the 1 s deadline floor

    with running(rule=per_prompt({"check 150": ["hang"]}), hang_s=30, latency=latency) as srv:
        client = make_client(endpoint("tgi", srv, max_concurrency=8, timeout_s=25.0))
        reqs = [GenRequest(id=f"l{i}", user=f"long {i}", max_new_tokens=512, seed=i) for i in range(6)]
        reqs += [GenRequest(id=f"c{i}", user=f"check {i}", max_new_tokens=8, seed=i) for i in range(200)]
        out = run_all(client, reqs)
    assert all(r.ok for r in out.values())
    hung = [c for c in srv.calls if "check 150<" in c.prompt]
    assert len(hung) == 2 and hung[0].seed == hung[1].seed
    # the checks' own p99 is milliseconds: the floor (0.5 s) decides, not a factor of the long answers' 0.8 s
    assert hung[1].arrived - hung[0].arrived < 0.95, hung[1].arrived - hung[0].arrived
    assert client.tail_counts()["hedged"] + client.tail_counts()["abandoned"] >= 1


# ----------------------------------------------------------------------------------------------
# records flow; the committed data does not depend on the timing
# ----------------------------------------------------------------------------------------------
def _slow_some(prompt: str) -> float:
    """A quarter of the prompts take 0.4 s, the rest 10 ms: fixed per prompt."""
    return 0.4 if zlib.crc32(prompt.encode()) % 4 == 0 else 0.01


def _stage(tmp_path, name: str, stage: str, latency, script=scripted_answer, pre: tuple[str, ...] = (),
           server: dict | None = None, **overrides) -> tuple[LLMTestServer, str, str]:
    d = tmp_path / name
    d.mkdir()
    with LLMTestServer(script=script, api_key="test-key", latency=latency, **(server or {})) as srv:
        recipe = scripted_recipe(d, srv.url, **overrides)
        res = bezoar(*pre, "stage", stage, "--recipe", str(recipe), "--run", str(d / "run"))
        assert res.returncode == 0, res.stderr[-3000:]
    return srv, str(d / "run"), res.stderr


def _files(run: str, stage: str) -> tuple[str, str]:
    base = f"{run}/{stage}"
    rej = f"{base}/rejected/rejected.jsonl"
    return open(f"{base}/data/train.jsonl").read(), open(rej).read() if os.path.exists(rej) else ""


def test_lamini_answers_an_instruction_before_the_last_list_is_in_and_commits_the_same_rows(tmp_path):
    kw = {"generation.lamini.example_prompts": 8, "generation.lamini.topic_prompts": 4,
          "generation.lamini.max_instructions": 40}
    _, fast, _ = _stage(tmp_path, "fast", "generate-lamini", 0.0, **kw)
    # the slow run's server also fails one list once (500): a retry, counted in the manifest
    srv, slow, err = _stage(tmp_path, "slow", "generate-lamini", _slow_some, pre=("--log-format", "json"),
                            server={"rule": per_prompt({"<example>": ["500"]})}, **kw)
    assert _files(fast, "generate-lamini") == _files(slow, "generate-lamini")
    lists = [c for c in srv.calls if "<example>" in c.prompt and "Write" in c.prompt]
    answers = [c for c in srv.calls if c not in lists]
    assert min(c.arrived for c in answers) < max(c.finished for c in lists)  # no barrier between the steps
    # the cap: responses asked as lists come in stop at max_instructions; the committed rows are the
    # first 40 in unit order (those not asked yet are asked at the end)
    assert read_manifest(open_store(slow), "generate-lamini")["counts"]["unique_instructions"] == 40
    assert 40 <= len(answers) <= 80
    u = read_manifest(open_store(slow), "generate-lamini")["utilization"]["teacher"]
    assert 0 < u["utilization"] <= 1 and u["slots"] == 8
    # what the pool did, per role beside the utilization: every attempt the server saw, the one retry
    assert (u["attempts"], u["retries"], u["hedged"], u["abandoned"]) == (len(srv.calls), 1, 0, 0)
    # visible: `bezoar status` shows it; --log-format json gives one JSON object per event, no progress bar
    status = bezoar("status", "--run", slow)
    assert f"teacher busy {u['utilization']:.2f} (1 retries, 0 hedged, 0 abandoned)" in status.stdout
    from bezoar_jobs.report.collect import RunData, usage_rows  # and the report's usage table
    from bezoar_jobs.report.render import build_tables

    data = RunData("file:///r", {"generate-lamini": read_manifest(open_store(slow), "generate-lamini")}, {}, None,
                   None, None)
    row = build_tables(data, [], [], usage_rows(data, None), [], None)["usage"].rows[0]
    assert row[-1] == f"teacher {u['utilization']:.2f} (1 retries, 0 hedged, 0 abandoned)"
    events = [json.loads(ln) for ln in err.splitlines() if ln.strip()]
    done = [e for e in events if e.get("event") == "flow_done"]
    assert done and {e["stage"] for e in done} == {"generate-lamini"} and sum(e["done"]
                                                                           for e in done) == len(srv.calls) - 1
    assert {"req_per_s", "tok_per_s", "in_flight", "retries", "failed"} <= set(done[0])


def test_lamini_asks_the_example_lists_while_the_teacher_still_proposes_topics(tmp_path):
    """Topic proposals (no topic file) were a phase of their own: every list waited for the slowest proposal."""
    def slow_topics(prompt: str) -> float:
        return 0.6 if "<topic>" in prompt else 0.01

    kw = {"generation.lamini.topics": None, "generation.lamini.example_prompts": 6,
          "generation.lamini.topic_prompts": 4, "generation.lamini.max_instructions": 30,
          "teacher.max_concurrency": 12}  # room beside the 8 proposals (one per category, asked first)
    _, fast, _ = _stage(tmp_path, "fast", "generate-lamini", 0.0, **kw)
    srv, slow, _ = _stage(tmp_path, "slow", "generate-lamini", slow_topics, **kw)
    assert _files(fast, "generate-lamini") == _files(slow, "generate-lamini")
    assert open(f"{fast}/generate-lamini/topics.jsonl").read() == open(f"{slow}/generate-lamini/topics.jsonl").read()
    proposals = [c for c in srv.calls if "<topic>" in c.prompt]
    example_lists = [c for c in srv.calls if "<example>" in c.prompt and "each one about one of these subjects"
                     not in c.prompt and "<topic>" not in c.prompt]
    topic_lists = [c for c in srv.calls if "each one about one of these subjects" in c.prompt]
    assert proposals and example_lists and topic_lists
    last_proposal = max(c.finished for c in proposals)
    assert min(c.arrived for c in example_lists) < last_proposal  # no barrier before the example lists
    assert min(c.arrived for c in topic_lists) >= last_proposal  # the topic lists need every proposal


def test_evol_lineages_move_on_their_own_and_commit_the_same_rows_whatever_the_timing(tmp_path):
    kw = {"seeds.dolly": {"path": str(dolly_file(tmp_path))}, "generation.evol.seeds": 12,
          "generation.evol.rounds": 2}
    _, fast, _ = _stage(tmp_path, "fast", "generate-evol", 0.0, script=evolving_script(), **kw)
    srv, slow, _ = _stage(tmp_path, "slow", "generate-evol", _slow_some, script=evolving_script(), **kw)
    assert _files(fast, "generate-evol") == _files(slow, "generate-evol")
    evolves = [c for c in srv.calls if c.prompt.rstrip().endswith("task:<|endoftext|><|answer|>")]
    second = [c for c in evolves if "explain step" in c.prompt]  # evolving a round-1 evolution
    checks = [c for c in srv.calls if "Task A:" in c.prompt and "explain step" not in c.prompt.split("Task B:")[0]]
    assert second and checks
    # a lineage started round 2 while other lineages' round-1 equality checks were still being answered
    assert min(c.arrived for c in second) < max(c.finished for c in checks)
    m = read_manifest(open_store(slow), "generate-evol")
    assert set(m["utilization"]) == {"teacher", "judge"}


def test_filter_asks_again_as_soon_as_a_verdict_fails_to_parse(tmp_path):
    """A re-ask waited for the whole first pass of verdicts."""
    d = tmp_path / "f"
    d.mkdir()

    def judge(prompt: str, params: dict) -> str:
        # the greedy first verdict of a third of the rows does not parse; the re-ask (sampled) does
        if "Reply with JSON only" in prompt and zlib.crc32(prompt.encode()) % 3 == 0 and params.get("temperature") == 0:
            return "I cannot decide."
        return scripted_answer(prompt)

    with LLMTestServer(script=judge, api_key="test-key", latency=_slow_some) as srv:
        recipe = scripted_recipe(d, srv.url, **{"generation.lamini.example_prompts": 6,
                                                "generation.lamini.topic_prompts": 0,
                                                "filter.decoding": {"max_new_tokens": 64, "temperature": 0}})
        for stage in ("generate-lamini", "filter-lamini"):
            res = bezoar("stage", stage, "--recipe", str(recipe), "--run", str(d / "run"))
            assert res.returncode == 0, res.stderr[-3000:]
    verdicts = [c for c in srv.calls if "Reply with JSON only" in c.prompt]
    first = [c for c in verdicts if c.params.get("temperature") == 0]
    again = [c for c in verdicts if c.params.get("temperature") != 0]
    assert again and min(c.arrived for c in again) < max(c.finished for c in first)
    m = read_manifest(open_store(str(d / "run")), "filter-lamini")
    assert m["counts"]["failed"] == 0 and m["requests"]["phases"]["verdicts-a2"]["needed"] == len(again)


# ----------------------------------------------------------------------------------------------
# the generate stages share one teacher: run together by default
# ----------------------------------------------------------------------------------------------
class _Backend:
    """Stages 'run' until the scheduler waits; each wait ends the oldest one."""

    wait_on_failure = True

    def __init__(self) -> None:
        self.parallel = 1
        self.live: list[str] = []
        self.together: list[set[str]] = []

    def start(self) -> None: ...
    def close(self) -> None: ...
    def cancel(self) -> None: ...
    def stage_done(self, stage: str, skipped: bool, pending: object = ()) -> None: ...
    def logs(self, stage: str) -> list[str]:
        return []

    def running(self) -> list[str]:
        return list(self.live)

    def submit(self, stage: str) -> None:
        self.live.append(stage)
        self.together.append(set(self.live))

    def wait(self, timeout: float):
        from bezoar_jobs.executors.scheduler import StageEvent

        return [StageEvent(self.live.pop(0), 0)] if self.live else []


@pytest.mark.parametrize("backend", ["tgi", "local"])
def test_the_generate_stages_run_together_by_default_when_they_share_a_teacher_server(tmp_path, monkeypatch, backend):
    from bezoar_jobs.executors import scheduler
    from bezoar_jobs.recipe import load_recipe

    rec = scripted_recipe(tmp_path, "http://127.0.0.1:9", **({"teacher": {"backend": "local", "model": "x"}}
                                                                if backend == "local" else {}))
    recipe, _ = load_recipe(rec)
    monkeypatch.setattr(scheduler, "up_to_date", lambda store, r, s: (s in done, "stub"))
    done: set[str] = set()
    b = _Backend()
    orig = b.wait

    def wait(timeout: float):
        evs = orig(timeout)
        done.update(e.stage for e in evs)
        return evs

    b.wait = wait  # type: ignore[method-assign]
    stages = ["generate-lamini", "generate-evol", "generate-orca", "filter-lamini"]
    out = scheduler.Scheduler(b, open_store(str(tmp_path / "run")), recipe, lambda m: None).run(stages)
    assert out.exit_code == 0 and set(out.committed) == set(stages)
    biggest = max(b.together, key=len)
    if backend == "tgi":  # one slot of --parallel 1 for the three teacher stages; the filter waits its turn
        assert biggest == {"generate-lamini", "generate-evol", "generate-orca"}
    else:  # an in-process teacher is a model per process: one at a time
        assert len(biggest) == 1


def test_a_filter_whose_judge_is_the_teacher_runs_beside_the_generate_stages_as_one_of_their_party(
        tmp_path, monkeypatch):
    """A filter whose judge is the teacher's own server (an open judge at its /v1) calls the same admission limit
    as the generate stages: it is one of the teacher's parties, so it joins their slot of ``--parallel 1`` once
    its generate stage is done (before, it waited for all three) and the run counts it among the pods sharing
    the teacher. An API judge's filter still waits its turn."""
    from bezoar_jobs.executors import scheduler
    from bezoar_jobs.recipe import load_recipe
    from bezoar_jobs.registry import CANONICAL

    stages = ["generate-lamini", "generate-evol", "generate-orca", "filter-lamini"]
    seen = {}
    for judge in ("http://127.0.0.1:9/v1", "https://api.judge.example/v1"):
        recipe, _ = load_recipe(scripted_recipe(tmp_path, "http://127.0.0.1:9", **{"judge.base_url": judge}))
        done: set[str] = set()
        monkeypatch.setattr(scheduler, "up_to_date", lambda store, r, s, done=done: (s in done, "stub"))
        b = _Backend()
        orig = b.wait

        def wait(timeout: float, orig=orig, done=done):
            evs = orig(timeout)
            done.update(e.stage for e in evs)
            return evs

        b.wait = wait  # type: ignore[method-assign]
        run = scheduler.Scheduler(b, open_store(str(tmp_path / f"run{len(seen)}")), recipe, lambda m: None)
        out = run.run(stages)
        assert out.exit_code == 0 and set(out.committed) == set(stages)
        seen[judge] = (run, next(t for t in b.together if "filter-lamini" in t))
    run, beside = seen["http://127.0.0.1:9/v1"]
    assert beside == {"generate-evol", "generate-orca", "filter-lamini"}  # lamini's data is there: it starts
    assert {"filter-lamini", "filter-evol", "filter-orca"} <= run.parties
    run, beside = seen["https://api.judge.example/v1"]
    assert beside == {"filter-lamini"} and "filter-lamini" not in run.parties  # after all three, a slot of its own
    parties = run.parties
    # how many pods share the teacher at once: a filter starts after its generate stage, not beside it
    on_teacher = parties | {"filter-lamini", "filter-evol", "filter-orca"}
    assert scheduler.parties_at_once(on_teacher, CANONICAL) == 3
    assert scheduler.parties_at_once(on_teacher, CANONICAL, pods=lambda s: 4 if s.startswith("generate") else 1) == 12
    assert scheduler.parties_at_once(on_teacher, ["filter-lamini", "filter-orca", "generate-evol"]) == 3
    assert scheduler.parties_at_once(on_teacher, ["generate-lamini", "filter-lamini"]) == 1


def _local_run_shares(monkeypatch: pytest.MonkeyPatch, recipe: Recipe, store: Store, stages: list[str],
                      parallel: int = 1) -> tuple[dict[str, tuple[str | None, bool]], set[str]]:
    """`bezoar run` (local) of ``stages`` with stage processes that say nothing and exit 0 (their commits stubbed):
    each stage's BEZOAR_TEACHER_PARTIES and whether it was marked running on the teacher's board when started;
    the board's marks after."""
    from bezoar_jobs.executors import local, scheduler

    seen: dict[str, tuple[str | None, bool]] = {}

    class Proc:
        def __init__(self, cmd: list[str], env: dict[str, str], **kw: object) -> None:
            stage = cmd[cmd.index("stage") + 1]
            seen[stage] = (env.get("BEZOAR_TEACHER_PARTIES"),
                           store.exists(f"_control/teacher-shares/{stage}.live"))
            self.stdout: list[str] = []

        def wait(self) -> int:
            return 0

        def poll(self) -> int:
            return 0

    monkeypatch.setattr(local.subprocess, "Popen", Proc)
    monkeypatch.setattr(scheduler, "up_to_date", lambda store, r, s: (s in seen, "stub"))
    out = local.run_local(recipe, store, stages, parallel=parallel)
    assert out.exit_code == 0 and set(out.committed) == set(stages)
    return seen, set(store.list("_control/teacher-shares/"))


def test_a_stage_killed_in_a_local_run_gives_its_share_of_the_teacher_back(tmp_path, monkeypatch):
    """A stage process killed (SIGKILL: the OOM killer) never closed its client, so its .live mark stayed on the
    teacher's board: the stages still running kept dividing the teacher with it for the rest of the run, and every
    later run in that store counted it as a pod running. A stage that ended unsuccessfully is now marked done."""
    from bezoar_jobs.executors import local, scheduler
    from bezoar_jobs.recipe import load_recipe

    monkeypatch.delenv("BEZOAR_TEACHER_PARTIES", raising=False)
    store = open_store(str(tmp_path / "run"))
    recipe, _ = load_recipe(scripted_recipe(tmp_path, "http://127.0.0.1:9"))
    marked: dict[str, bool] = {}

    class Proc:
        def __init__(self, cmd: list[str], env: dict[str, str], **kw: object) -> None:
            self.stage = cmd[cmd.index("stage") + 1]
            marked[self.stage] = store.exists(f"_control/teacher-shares/{self.stage}.live")
            self.stdout: list[str] = []

        def wait(self) -> int:
            return -9 if self.stage == "generate-orca" else 0

        def poll(self) -> int:
            return self.wait()

    monkeypatch.setattr(local.subprocess, "Popen", Proc)
    monkeypatch.setattr(scheduler, "up_to_date", lambda store, r, s: (s in marked and s != "generate-orca", "stub"))
    out = local.run_local(recipe, store, ["generate-lamini", "generate-orca"], parallel=2)
    assert out.failed_stage == "generate-orca" and "SIGKILL" in out.reason
    assert marked == {"generate-lamini": True, "generate-orca": True}  # both were marked running when started
    marks = set(store.list("_control/teacher-shares/"))
    assert "_control/teacher-shares/generate-orca.done" in marks
    assert not [m for m in marks if m.endswith(".live")], marks


def test_a_local_run_counts_a_filter_on_the_teachers_server_among_its_parties(tmp_path, monkeypatch):
    """`bezoar run` (local) gave a filter whose judge is the teacher's server nothing of the teacher's budget. It
    now gets the number of pods sharing the teacher (the most that run at once: a filter starts after its generate
    stage), is marked running on the board when it is started (the others give up its share before its first
    request) and done when it is committed."""
    from bezoar_jobs.recipe import load_recipe

    monkeypatch.delenv("BEZOAR_TEACHER_PARTIES", raising=False)
    stages = ["generate-lamini", "generate-orca", "filter-lamini"]

    def run(judge: str, where: str) -> tuple[dict[str, tuple[str | None, bool]], set[str]]:
        recipe, _ = load_recipe(scripted_recipe(tmp_path, "http://127.0.0.1:9", **{"judge.base_url": judge}))
        return _local_run_shares(monkeypatch, recipe, open_store(str(tmp_path / where)), stages)

    seen, marks = run("http://127.0.0.1:9/v1", "teacher")
    assert seen == {s: ("2", True) for s in stages}, seen  # two at once: lamini and orca, then the filter beside orca
    assert "_control/teacher-shares/filter-lamini.done" in marks
    seen, marks = run("https://api.judge.example/v1", "api")
    assert seen["filter-lamini"] == (None, False) and seen["generate-orca"] == ("2", True), seen
    assert not [m for m in marks if "filter" in m]


def test_a_local_run_counts_an_mtbench_judge_on_the_teachers_server_when_it_runs_beside_the_data_stages(
        tmp_path, monkeypatch):
    """MT-Bench whose judge is the teacher's own server got nothing of the teacher's budget in a local run: with
    only the base model to evaluate it starts at once, and with a second slot (--parallel 2) ran beside the
    generate stages with its whole judge.max_concurrency on top of their shares. It is now counted among the pods
    sharing the teacher when it can run beside them, gets the count and is marked on the board (running when
    started, done when committed). With one slot it cannot: the count stays the generate stages' (counted, it
    kept them to a third of the teacher where they could have half), and it still takes part in the board."""
    from bezoar_jobs.recipe import load_recipe

    monkeypatch.delenv("BEZOAR_TEACHER_PARTIES", raising=False)
    stages = ["generate-lamini", "generate-orca", "eval-mtbench"]

    def run(judge: str, where: str, parallel: int) -> tuple[dict[str, tuple[str | None, bool]], set[str]]:
        recipe, _ = load_recipe(scripted_recipe(tmp_path, "http://127.0.0.1:9", **{
            "judge.base_url": judge, "evaluation.checkpoints": ["base"]}))
        return _local_run_shares(monkeypatch, recipe, open_store(str(tmp_path / where)), stages, parallel)

    seen, marks = run("http://127.0.0.1:9/v1", "beside", parallel=2)
    assert seen == {s: ("3", True) for s in stages}, seen
    assert "_control/teacher-shares/eval-mtbench.done" in marks
    seen, marks = run("http://127.0.0.1:9/v1", "one-slot", parallel=1)
    assert seen == {s: ("2", True) for s in stages}, seen
    assert "_control/teacher-shares/eval-mtbench.done" in marks
    seen, marks = run("https://api.judge.example/v1", "api", parallel=2)
    assert seen["eval-mtbench"] == (None, False) and seen["generate-orca"] == ("2", True), seen
    assert not [m for m in marks if "mtbench" in m]


def test_a_filter_pod_whose_judge_is_the_teacher_keeps_within_its_share_of_the_teachers_capacity(tmp_path, monkeypatch):
    """A filter's judge on the teacher's server had no budget: beside two generate stages holding their shares it
    sent its whole judge.max_concurrency (8) to a server that admits 6, which refused the excess as overloaded.
    It is now one of the pods sharing the teacher: its share of /info's limit, on the board as the others."""
    from bezoar_jobs.llm import budget
    from bezoar_jobs.stages.common import open_client

    monkeypatch.setenv("BEZOAR_TEACHER_PARTIES", "3")
    monkeypatch.setattr(budget, "POLL_S", 0.1)
    store = open_store(str(tmp_path / "run"))
    with running(capacity=6, per_token_s=0.002, max_concurrent_requests=6, script=lambda p: "tok " * 30) as srv:

        class Ctx:  # what open_client reads of a stage's context
            shard = None

            def __init__(self, name: str, backend: str | None) -> None:
                self.name, self.store, self.teacher_url, self.teacher_backend = name, store, srv.url, backend

        teachers = [open_client(Ctx(n, None), endpoint("tgi", srv, max_concurrency=8), "teacher")  # type: ignore[arg-type]
                    for n in ("generate-evol", "generate-orca")]
        judge = open_client(Ctx("filter-lamini", "tgi"), endpoint("openai-chat", srv, max_concurrency=8),  # type: ignore[arg-type]
                            "judge")
        assert judge.slot_capacity() == 2 and judge.board is not None  # 6 slots among 3 pods
        elsewhere = endpoint("openai-chat", srv, max_concurrency=8).model_copy(
            update={"base_url": "https://api.judge.example/v1"})
        api = open_client(Ctx("filter-orca", "tgi"), elsewhere, "judge")  # type: ignore[arg-type]
        assert api.budget is None and api.slot_capacity() == 8  # another server's judge: not the teacher's party
        outs = _side_by_side(("evol", teachers[0], 60), ("orca", teachers[1], 60), ("judge", judge, 120))
        for c in (*teachers, judge):
            c.close()
    assert all(len(outs[k]) == n and all(r.ok for r in outs[k].values()) for k, n in
               (("evol", 60), ("orca", 60), ("judge", 120)))
    assert not [c for c in srv.calls if c.status not in (200, 0)] and srv.max_in_flight <= 6
    assert sum(1 for c in srv.calls if c.route != "tgi" and c.status == 200) >= 120  # the judge at its own route
    assert store.exists("_control/teacher-shares/filter-lamini.done")  # done: its share goes to the others


def test_a_filter_judge_on_the_teachers_fleet_keeps_within_its_share_of_each_replica(monkeypatch):
    """The filter pod's judge on the teacher's replicas knew no replica's limit (its fleet learnt them only for a
    TGI client, and would have asked /info under the judge's /v1): its share could all go to one replica. It now
    reads each replica's /info at the replica's root and keeps its share of it there."""
    def srv() -> object:
        return running(capacity=4, per_token_s=0.002, max_concurrent_requests=4, script=lambda p: "tok " * 20)

    with srv() as a, srv() as b:
        monkeypatch.setenv("BEZOAR_TEACHER_ENDPOINTS", f"{a.url},{b.url}")
        monkeypatch.setenv("BEZOAR_TEACHER_PARTIES", "2")
        judge = make_client(endpoint("openai-chat", a, max_concurrency=8), role="judge", teacher_url=a.url,
                            teacher_backend="tgi")
        assert judge.slot_capacity() == 4  # 8 slots over two replicas, two pods
        assert {u: r.room for u, r in judge.fleet.replicas.items()} == {a.url: 2, b.url: 2}
        out = run_all(judge, [GenRequest(id=f"j{i}", user=f"judge {i}", seed=i) for i in range(60)])
    assert all(r.ok for r in out.values()) and len(out) == 60
    assert a.max_in_flight <= 2 and b.max_in_flight <= 2  # the other pod has the rest of each
    assert not [c for s in (a, b) for c in s.calls if c.route == "tgi"]  # at the judge's own route only


def test_a_fleet_asks_each_replicas_info_once_when_its_client_opens(monkeypatch):
    """A teacher on a fleet asked every replica's /info twice as its client opened: once for the budget (the
    fleet's capacity, the sum of theirs) and once more for each replica's own limit; a judge on the teacher's
    replicas did the same. Twice the start-up wait for a replica that does not answer. The budget's answers are
    now the fleet's."""
    def srv() -> object:
        return running(capacity=4, per_token_s=0.002, max_concurrent_requests=6, script=lambda p: "tok " * 5)

    with srv() as a, srv() as b:
        monkeypatch.setenv("BEZOAR_TEACHER_ENDPOINTS", f"{a.url},{b.url}")
        monkeypatch.setenv("BEZOAR_TEACHER_PARTIES", "2")
        teacher = make_client(endpoint("tgi", a, max_concurrency=8), role="teacher")
        assert (a.info_asked, b.info_asked) == (1, 1)
        assert {u: r.room for u, r in teacher.fleet.replicas.items()} == {a.url: 3, b.url: 3}  # 6 each, 2 pods
        judge = make_client(endpoint("openai-chat", a, max_concurrency=8), role="judge", teacher_url=a.url,
                            teacher_backend="tgi")
        assert (a.info_asked, b.info_asked) == (2, 2)
        assert {u: r.room for u, r in judge.fleet.replicas.items()} == {a.url: 3, b.url: 3}
        out = run_all(teacher, [GenRequest(id=f"t{i}", user=f"say {i}", seed=i) for i in range(12)])
    assert all(r.ok for r in out.values()) and len(out) == 12


def test_a_teacher_share_grows_as_the_other_pods_finish(tmp_path):
    from bezoar_jobs.llm.budget import Board

    store = open_store(str(tmp_path / "run"))
    lamini, evol, orca = (Board(store, s, capacity=12, parties=3, ceiling=12)
                          for s in ("generate-lamini", "generate-evol", "generate-orca"))
    assert lamini.share() == 4  # all three run: the even share
    evol.done()
    assert lamini.share() == orca.share() == 6  # what evol no longer uses, divided
    orca.done()
    assert lamini.share() == 12
    assert Board(store, "generate-lamini", capacity=12, parties=3, ceiling=8).share() == 8  # the recipe's limit
    Board(store, "generate-evol", capacity=12, parties=3, ceiling=12)  # a retried evol pod is back
    assert lamini.share() == 6
    # a later `bezoar run` of two stages: evol's marker from the earlier run is not one of its parties
    store.delete("_control/teacher-shares/generate-evol.live")
    store.write_text("_control/teacher-shares/generate-evol.done", "1\n")
    again = [Board(store, s, capacity=12, parties=2, ceiling=12) for s in ("generate-lamini", "generate-orca")]
    assert again[0].share() == 6  # both run: the even share, whatever evol left behind
    again[1].done()
    assert again[0].share() == 12


def test_a_stage_takes_up_the_capacity_another_stage_sharing_the_teacher_freed(tmp_path, monkeypatch):
    """Each stage sharing a teacher kept a fixed even share: once one finished, its share idled."""
    import threading

    from bezoar_jobs.llm import budget
    from bezoar_jobs.stages.common import open_client

    monkeypatch.setenv("BEZOAR_TEACHER_PARTIES", "2")
    monkeypatch.setattr(budget, "POLL_S", 0.1)
    store = open_store(str(tmp_path / "run"))
    with running(capacity=8, per_token_s=0.002, max_concurrent_requests=8, script=lambda p: "tok " * 50) as srv:
        # TGI's timing headers on every answer, as its router sets them
        req = urllib.request.Request(srv.url + "/generate", data=json.dumps({"inputs": "x"}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert int(r.headers["x-queue-time"]) >= 0 and int(r.headers["x-inference-time"]) >= 90
        srv.reset()

        class Ctx:  # what open_client reads of a stage's context
            shard = None

            def __init__(self, name: str) -> None:
                self.name, self.store = name, store

        a, b = (open_client(Ctx(n), endpoint("tgi", srv, max_concurrency=8), "teacher")  # type: ignore[arg-type]
                for n in ("generate-a", "generate-b"))
        assert a.slot_capacity() == b.slot_capacity() == 4  # capacity 8 from /info, two parties
        outs: dict[str, dict] = {}

        def run(name: str, client, n: int) -> None:
            outs[name] = run_all(client, [GenRequest(id=f"{name}{i}", user=f"{name}-{i}") for i in range(n)])
            client.close()

        ts = [threading.Thread(target=run, args=("a", a, 24)), threading.Thread(target=run, args=("b", b, 200))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert len(outs["a"]) == 24 and len(outs["b"]) == 200 and all(r.ok for o in outs.values() for r in o.values())
    # never refused, never over the capacity (0: a duplicate that lost its race at b's end, when nothing waits for a
    # slot and a hung answer is raced early: llm/pool.py IDLE_HEDGE_MIN_S)
    assert not [c for c in srv.calls if c.status not in (200, 0)] and srv.max_in_flight <= 8
    a_end = max(c.finished for c in srv.calls if "<|prompt|>a-" in c.prompt)
    later = [c for c in srv.calls if "<|prompt|>b-" in c.prompt and c.decode_start >= a_end]
    events = sorted([(c.decode_start, 1) for c in later] + [(c.finished, -1) for c in later])
    most, n = 0, 0
    for _, d in events:
        n += d
        most = max(most, n)
    assert most >= 7, most  # b took up a's share once a was done (a fixed share stays at 4)


# ----------------------------------------------------------------------------------------------
# a fleet of replicas
# ----------------------------------------------------------------------------------------------
def test_a_fleet_spreads_requests_per_request_and_survives_a_replica_that_dies(monkeypatch):
    with running(latency=0.02, max_concurrent_requests=4) as a, running(latency=0.02, max_concurrent_requests=4) as b:
        monkeypatch.setenv("BEZOAR_TEACHER_ENDPOINTS", f"{a.url},{b.url}")
        client = make_client(endpoint("tgi", a, max_concurrency=8), role="teacher")
        assert client.slot_capacity() == 8  # the budget: both replicas' /info
        n = [0]

        def rule(prompt: str) -> str | None:
            n[0] += 1
            if n[0] == 20:  # the second replica goes away: refused connections from now on
                b.healthy = False
                asyncio.run_coroutine_threadsafe(b.stop_async(), b._loop).result(5)  # type: ignore[arg-type]
            return None

        a.rule = rule
        out = run_all(client, [GenRequest(id=f"r{i}", user=f"prompt {i}", seed=i) for i in range(120)])
        assert all(r.ok for r in out.values()) and len(out) == 120  # nothing lost
        ok_a = sum(1 for c in a.calls if c.status == 200)
        ok_b = sum(1 for c in b.calls if c.status == 200)
        assert ok_a + ok_b >= 120 and ok_b >= 8  # both served before b went away (a hedge may be answered twice)
        assert a.max_in_flight <= 4 and b.max_in_flight <= 4  # each replica within its own limit


def test_a_fleet_sends_a_request_that_one_replica_told_to_wait_to_another_at_once(monkeypatch):
    """A Retry-After from one replica held the request back from every replica."""
    with running(latency=0.01, retry_after="5") as a, running(latency=0.01, retry_after="5") as b:
        monkeypatch.setenv("BEZOAR_TEACHER_ENDPOINTS", f"{a.url},{b.url}")
        refused: list[str] = []

        def rule(prompt: str) -> str | None:  # whichever replica gets the request first says: not before 5 s
            if refused:
                return None
            refused.append(prompt)
            return "429"

        a.rule = b.rule = rule
        client = make_client(endpoint("tgi", a, max_concurrency=2), role="teacher")
        t0 = time.monotonic()
        out = run_all(client, [GenRequest(id="u", user="unlucky", seed=7)])
        took = time.monotonic() - t0
    assert out["u"].ok and out["u"].retries == 1 and took < 2.5, took  # not 5 s
    calls = sorted(a.calls + b.calls, key=lambda c: c.arrived)
    assert [c.status for c in calls] == [429, 200] and calls[0].seed == calls[1].seed == 7
    assert (calls[0] in a.calls) != (calls[1] in a.calls)  # the other replica answered: the Retry-After was its own


def _side_by_side(*work: tuple[str, object, int]) -> dict[str, dict]:
    """Each (name, client, n): n requests ``"<name> <i>"`` (seed i), every client in a thread of its own at once."""
    import threading

    outs: dict[str, dict] = {}

    def run(name: str, client: object, n: int) -> None:
        outs[name] = run_all(client, [GenRequest(id=f"{name}{i}", user=f"{name} {i}", seed=i) for i in range(n)])

    threads = [threading.Thread(target=run, args=w) for w in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outs


def test_a_fleet_sends_less_to_a_replica_that_others_crowd_and_more_to_the_rest(monkeypatch):
    """A judge pointed at one replica of the teacher's fleet is outside the fleet's budget: that replica refused
    the excess as overloaded while the fleet kept its full share there (the bench's three stages on two
    replicas: ~5,900 refusals on one replica and ~6% of decoding on duplicates). Each replica's limit now halves
    while it refuses most attempts so, and the work goes to the other."""
    def srv() -> object:
        return running(capacity=8, per_token_s=0.002, max_concurrent_requests=8, script=lambda p: "tok " * 20)

    with srv() as a, srv() as b:
        monkeypatch.setenv("BEZOAR_TEACHER_ENDPOINTS", f"{a.url},{b.url}")
        teacher = make_client(endpoint("tgi", a, max_concurrency=16, max_retries=3), role="teacher")
        monkeypatch.delenv("BEZOAR_TEACHER_ENDPOINTS")
        judge = make_client(endpoint("tgi", a, max_concurrency=8, max_retries=3), role="judge")  # replica a only
        outs = _side_by_side(("teacher", teacher, 600), ("judge", judge, 300))
    failed = [r.id for o in outs.values() for r in o.values() if not r.ok]
    assert not failed and len(outs["teacher"]) == 600 and len(outs["judge"]) == 300, failed[:5]
    refused = [c for c in a.calls if c.status == 429]
    assert len(refused) < 0.2 * len(a.calls), (len(refused), len(a.calls))
    teacher_at = {name: sum(1 for c in s.calls if c.status == 200 and "teacher" in c.prompt)
                  for name, s in (("a", a), ("b", b))}
    assert teacher_at["b"] > teacher_at["a"], teacher_at  # the uncrowded replica took more of the fleet's work


def test_a_judge_on_the_teachers_server_spreads_over_the_teachers_replicas(monkeypatch):
    """A judge whose base URL is the teacher's (an open judge served by the teacher, as the bench runs it) went
    to that one URL: with a fleet, one replica took every judge request on top of its share of the teacher's."""
    from bezoar_jobs.llm.fleet import Fleet

    with running(latency=0.01) as a, running(latency=0.01) as b:
        monkeypatch.setenv("BEZOAR_TEACHER_ENDPOINTS", f"{a.url},{b.url}")
        judge = make_client(endpoint("openai-chat", a, max_concurrency=8), role="judge", teacher_url=a.url)
        out = run_all(judge, [GenRequest(id=f"j{i}", user=f"judge {i}", seed=i) for i in range(40)])
        elsewhere = make_client(endpoint("openai-chat", a, max_concurrency=8), role="judge")  # no teacher given
        assert elsewhere.fleet is None
    assert all(r.ok for r in out.values())
    served = [sum(1 for c in s.calls if c.status == 200) for s in (a, b)]
    assert min(served) >= 10, served  # both replicas, at the judge's own route
    dns = {"BEZOAR_TEACHER_DISCOVERY": "dns"}
    fleet = Fleet.beside("http://localhost:8080/v1", "http://localhost:8080", dns)
    assert fleet is not None and "http://127.0.0.1:8080/v1" in fleet.urls()
    import bezoar_jobs.llm.fleet as fleet_mod

    looked_up: list[str] = []
    monkeypatch.setattr(fleet_mod.socket, "getaddrinfo", lambda host, *a, **k: looked_up.append(host) or [])
    assert Fleet.beside("http://judge.example:443/v1", "http://localhost:8080", dns) is None  # another server ...
    assert looked_up == []  # ... and the teacher's name is not looked up for it (no warning when it has no pods)


def test_a_teacher_found_by_dns_is_looked_up_once_at_start(monkeypatch):
    """With ``BEZOAR_TEACHER_DISCOVERY=dns`` the budget (each replica's /info) and the client's fleet each resolved
    the headless Service's name at start-up: two lookups, and two views of the replicas that could differ. The
    factory now finds the fleet once and the budget asks the replicas it found; so does a filter pod's judge."""
    import socket

    import bezoar_jobs.llm.fleet as fleet_mod

    with running(capacity=4, max_concurrent_requests=12) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        looked_up: list[str] = []
        real = socket.getaddrinfo

        def resolve(host, *a, **k):  # the Service's name to the server; anything else (127.0.0.1) as it is
            if host != "teacher-headless.example":
                return real(host, *a, **k)
            looked_up.append(host)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

        monkeypatch.setattr(fleet_mod.socket, "getaddrinfo", resolve)
        monkeypatch.setenv("BEZOAR_TEACHER_DISCOVERY", "dns")
        svc = f"http://teacher-headless.example:{port}"
        ep = endpoint("tgi", srv, max_concurrency=8).model_copy(update={"base_url": svc})
        teacher = make_client(ep, role="teacher")
        assert looked_up == ["teacher-headless.example"], looked_up
        assert teacher.budget is not None and teacher.budget.capacity == 12 and srv.info_asked == 1
        assert teacher.fleet is not None and teacher.fleet.urls() == [f"http://127.0.0.1:{port}"]
        looked_up.clear()
        judge_ep = endpoint("openai-chat", srv, max_concurrency=8).model_copy(update={"base_url": svc + "/v1"})
        judge = make_client(judge_ep, role="judge", teacher_url=svc, teacher_backend="tgi")
        assert looked_up == ["teacher-headless.example"], looked_up
        assert judge.budget is not None and judge.budget.capacity == 12 and srv.info_asked == 2
        assert judge.fleet is not None and judge.fleet.urls() == [f"http://127.0.0.1:{port}/v1"]


def test_a_judge_beside_the_teacher_in_one_pod_stays_within_the_pods_share_of_each_replica(monkeypatch):
    """An Evol-Instruct stage's judge on the teacher's server kept its own count of requests at each replica, on
    top of the pod's share there: the replicas refused the excess as overloaded, and the teacher's limit at the
    crowded replica was cut (the bench's three stages on two replicas: one replica 0.80-0.89 busy in 1 run of 4-6).
    It now counts against the teacher's books, so the pod never has more at a replica than the replica admits."""
    def srv() -> object:
        return running(capacity=4, per_token_s=0.002, max_concurrent_requests=4, script=lambda p: "tok " * 20)

    with srv() as a, srv() as b:
        monkeypatch.setenv("BEZOAR_TEACHER_ENDPOINTS", f"{a.url},{b.url}")
        teacher = make_client(endpoint("tgi", a, max_concurrency=8, max_retries=3), role="teacher")
        judge = make_client(endpoint("openai-chat", a, max_concurrency=8, max_retries=3), role="judge",
                            teacher_url=a.url, teacher=teacher)
        assert judge.fleet is not None and judge.fleet.replicas is teacher.fleet.replicas
        outs = _side_by_side(("teacher", teacher, 300), ("judge", judge, 300))
    assert len(outs["teacher"]) == len(outs["judge"]) == 300 and all(r.ok for o in outs.values() for r in o.values())
    refused = [(s.url, c.route) for s in (a, b) for c in s.calls if c.status == 429]
    assert not refused, (len(refused), refused[:3])  # never more at a replica than it admits
    judged = [sum(1 for c in s.calls if c.status == 200 and c.route != "tgi") for s in (a, b)]
    assert min(judged) >= 50, judged  # the judge on both replicas, at its own route


def test_a_judge_beside_the_teacher_on_its_single_server_stays_within_the_pods_share_there(monkeypatch):
    """With one teacher server (no fleet), an Evol-Instruct stage's judge on that server kept places of its own on
    top of the teacher's share: here 80 of 680 attempts were refused as overloaded (a server admitting 4, each
    client allowed 8), and in the bench 129 requests once reached a server admitting 128. The teacher's single
    server is now a fleet of one whose books the judge shares: together they never have more there than it admits."""
    monkeypatch.delenv("BEZOAR_TEACHER_ENDPOINTS", raising=False)
    monkeypatch.delenv("BEZOAR_TEACHER_DISCOVERY", raising=False)
    with running(capacity=4, per_token_s=0.002, max_concurrent_requests=4, script=lambda p: "tok " * 20) as a:
        teacher = make_client(endpoint("tgi", a, max_concurrency=8, max_retries=3), role="teacher")
        judge = make_client(endpoint("openai-chat", a, max_concurrency=8, max_retries=3), role="judge",
                            teacher_url=a.url, teacher=teacher)
        assert teacher.fleet is not None and judge.fleet is not None
        assert judge.fleet.replicas is teacher.fleet.replicas and judge.fleet.urls() == [a.url + "/v1"]
        outs = _side_by_side(("teacher", teacher, 300), ("judge", judge, 300))
    assert len(outs["teacher"]) == len(outs["judge"]) == 300 and all(r.ok for o in outs.values() for r in o.values())
    refused = [c.route for c in a.calls if c.status == 429]
    assert not refused, (len(refused), len(a.calls))
    assert {c.route for c in a.calls if c.status == 200} == {"tgi", "chat/completions"}  # each at its own route
    # a judge on another server, or a teacher whose server's limit is unknown: nothing shared, as before
    with running(latency=0.01) as b:
        lone = make_client(endpoint("tgi", b, max_concurrency=8), role="teacher")
        other = make_client(endpoint("openai-chat", b, max_concurrency=8).model_copy(
            update={"base_url": "https://api.judge.example/v1"}), role="judge", teacher_url=b.url, teacher=lone)
        assert lone.fleet is None and other.fleet is None


def test_a_fleet_ranks_a_replica_whose_limit_is_unknown_as_roomy_not_as_room_for_one():
    """A judge's own fleet knows no replica's limit until one is cut for overload: the uncut replica, counted as
    room for one, then took a tenth of what the crowded one took."""
    from bezoar_jobs.llm.fleet import Fleet

    fleet = Fleet(["http://a:1", "http://b:1"])
    crowded = fleet.replicas["http://a:1"].places
    while crowded.limit is None:  # "Model is overloaded" for most attempts with 20 there: cut to 10
        crowded.overloaded(20)
    assert crowded.limit == 10 and fleet.replicas["http://b:1"].room is None
    picks = Counter(fleet.pick() for _ in range(30))
    assert picks["http://b:1"] > picks["http://a:1"], picks


def test_a_fleets_limits_follow_the_share_as_the_other_pods_finish():
    """The pool hands the fleet its own capacities again with fewer parties (llm/pool.py ``_follow_board``); kept
    in place for a judge's view, they were cleared before being read, and every replica's limit was lost."""
    from bezoar_jobs.llm.fleet import Fleet

    fleet = Fleet(["http://a:1", "http://b:1"])
    judge = fleet.view("/v1")
    fleet.set_limits({"http://a:1": 128, "http://b:1": 64}, 3)
    assert [fleet.replicas[u].room for u in ("http://a:1", "http://b:1")] == [42, 21]
    fleet.set_limits(fleet.capacities, 1)  # the two other pods are done
    assert [fleet.replicas[u].room for u in ("http://a:1", "http://b:1")] == [128, 64]
    assert judge.capacities == {"http://a:1": 128, "http://b:1": 64} and judge.urls() == ["http://a:1/v1",
                                                                                          "http://b:1/v1"]


def test_a_judge_fleet_without_the_teacher_in_its_pod_asks_a_replica_back_at_its_root_health_route(monkeypatch):
    """A filter stage's judge on the teacher's server uses the teacher's replicas at its own path (/v1); a replica
    taken out after a failure was asked GET /v1/health, which TGI does not serve, and never came back."""
    with running(latency=0.01) as a, running(latency=0.01) as b:
        monkeypatch.setenv("BEZOAR_TEACHER_ENDPOINTS", f"{a.url},{b.url}")
        failed: list[str] = []

        def once(prompt: str) -> str | None:  # the first request, at whichever replica, fails as a sick server's
            if failed:
                return None
            failed.append(prompt)
            return "500"

        a.rule = b.rule = once
        judge = make_client(endpoint("openai-chat", a, max_concurrency=4), role="judge", teacher_url=a.url)
        assert run_all(judge, [GenRequest(id="first", user="judge first", seed=1)])["first"].ok
        out = next(s for s in (a, b) if any(c.status == 500 for c in s.calls))
        assert [r for r in judge.fleet.replicas.values() if r.out_until]  # taken out
        time.sleep(1.2)  # past EJECT_S: the next pick asks its /health
        served_before = sum(1 for c in out.calls if c.status == 200)
        for batch in range(3):
            assert all(r.ok for r in run_all(judge, [GenRequest(id=f"b{batch}-{i}", user=f"judge {batch} {i}", seed=i)
                                                     for i in range(20)]).values())
            time.sleep(0.2)
    assert sum(1 for c in out.calls if c.status == 200) > served_before  # back in


def test_fleet_replicas_from_a_headless_services_dns_and_health_gated():
    from bezoar_jobs.llm.fleet import Fleet

    fleet = Fleet.from_env("http://localhost:8080", {"BEZOAR_TEACHER_DISCOVERY": "dns"})
    assert fleet is not None and "http://127.0.0.1:8080" in fleet.urls()  # every address of the name
    assert Fleet.from_env("http://localhost:8080", {}) is None  # no fleet unless asked
    two = Fleet(["http://a:1", "http://b:1"])
    picks = [two.pick() for _ in range(4)]
    assert sorted(picks) == ["http://a:1", "http://a:1", "http://b:1", "http://b:1"]  # spread, not pinned
    for u in picks:
        two.done(u, ok=True)
    two.done(two.pick(), ok=False, sick=True)  # the replica that failed is taken out ...
    out = next(r for r in two.replicas.values() if r.out_until)
    assert {two.pick() for _ in range(3)} == {u for u in two.urls() if u != out.url}  # ... and not picked


def test_a_stage_skipped_as_committed_gives_its_teacher_share_to_those_that_run(tmp_path):
    """`bezoar run` counts every teacher stage of its selection as a party; one committed before is skipped
    and used to keep its share idle for the whole run (it never ran, so it never marked itself done)."""
    from kubernetes import client as k8s_client

    from bezoar_jobs.executors.cluster import ClusterSettings
    from bezoar_jobs.executors.k8s_backend import KubernetesBackend
    from bezoar_jobs.executors.local import LocalBackend
    from bezoar_jobs.executors.scheduler import RunOutcome
    from bezoar_jobs.llm.budget import Board

    store = open_store(str(tmp_path / "local"))
    lamini = Board(store, "generate-lamini", capacity=12, parties=3, ceiling=12)
    assert lamini.share() == 4
    LocalBackend(store).stage_done("generate-evol", skipped=True)
    LocalBackend(store).stage_done("filter-evol", skipped=True)  # not a teacher party: no marker
    assert lamini.share() == 6 and not any("filter" in n for n in store.list("_control/teacher-shares/"))
    # on Kubernetes, with sharded generation, each shard is a party
    store = open_store(str(tmp_path / "k8s"))
    cluster = ClusterSettings.model_validate({"generationShards": 2, "teacher": {"maxConcurrentRequests": 12}})
    shard = Board(store, "generate-orca.0-of-2", capacity=12, parties=6, ceiling=12)
    assert shard.share() == 2
    backend = KubernetesBackend(k8s_client.ApiClient(), cluster, str(tmp_path / "k8s"), "r", store, RunOutcome())
    backend.stage_done("generate-lamini", skipped=True)
    assert shard.share() == 3  # 12 // (6 - 2)
