"""A scripted LLM server on loopback for tests and the generation benchmark.

It speaks the HTTP routes our remote clients use, with the bodies those clients read:

* TGI: ``POST /`` (TGI's compatible route, what our TGI client and
  ``huggingface_hub.AsyncInferenceClient(base_url=...).text_generation`` post to: the base URL
  itself, answered with a one-element list) and ``POST /generate`` (a
  single object). Request ``{"inputs", "parameters": {...}}``; answer ``generated_text`` plus
  ``details`` (finish_reason, generated_tokens, seed, prefill, tokens).
* OpenAI-compatible: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (with ``usage``).
* Anthropic: ``POST /v1/messages`` (content blocks, ``usage.input_tokens/output_tokens``).

Answers come from ``script(prompt) -> text`` (or ``script(prompt, params)``, params being the
decoding parameters as sent: ``max_new_tokens``, ``seed``, ...) so pipeline tests get
deterministic teacher and judge answers. The server's "tokenizer" is whitespace: one token per
word, so tests can predict counts.

Failure injection (checked in this order for every request): ``rule(prompt) -> fault``, then the
``plan`` (a sequence of faults consumed in arrival order, None meaning "answer normally"), then
``rates`` (a random fraction per fault). Faults: ``"429"`` and ``"503"`` (with ``Retry-After``),
``"500"``, ``"424"`` (TGI's "Request failed during generation", error_type "generation": a shard failed
the batch), ``"400"``, ``"401"``, ``"404"``, ``"hang"`` (sleeps ``hang_s``, longer than a client's
timeout), ``"malformed"`` (200 with a body that is not JSON), ``"malformed-json"`` (200 with JSON
missing the expected fields), ``"drop"`` (closes the connection without an answer).
``echo_headers=True`` makes every error answer quote the request's headers (Authorization
included), as some gateways and debug proxies do: the redaction tests use it.

Capacity model (for the benchmark): at most ``capacity`` sequences decode at once (extra requests
wait in the server's queue, as TGI/vLLM queue them, first come first served), each takes
``latency + tokens * per_token_s``. The slots are a computed schedule (a request gets the earliest
free slot when it arrives and is answered when its decode ends), and every decode interval is
recorded, so ``busy_fraction()`` says how much of the decoding capacity the client kept busy. A
request the client abandons (timeout) keeps its slot until its decode would have ended.

TGI's timing headers: a TGI answer carries ``x-queue-time`` (ms waited for a decoding slot),
``x-inference-time``, ``x-total-time`` and the rest of the headers TGI's router sets, from the
capacity model's schedule (the client's dynamic share, llm/budget.py, reads the queue time).

TGI's own admission limit: with ``max_concurrent_requests=N`` the server answers ``GET /info`` with
``max_concurrent_requests`` (as TGI does) and refuses a request that would make more than N in flight
with 429 "Model is overloaded" (TGI's ``--max-concurrent-requests`` behaviour), so a client that does
not keep to the budget gets the storm of 429s a real server gives it.

Refusals as the real servers refuse (what tests would otherwise only learn from production):

* TGI's routes (``/``, ``/generate``) validate ``parameters`` as TGI's router does
  (``router/src/validation.rs`` ``Validation::validate``, TGI at db931fc): ``temperature`` > 0,
  ``repetition_penalty`` > 0, ``-2 <= frequency_penalty <= 2``, ``0 < top_p < 1``, ``0 < typical_p < 1``,
  ``top_k`` > 0, ``max_new_tokens`` > 0, at most ``max_stop_sequences`` (TGI's default 4) stop
  sequences, non-empty ``inputs``, and with ``context_tokens`` prompt tokens + ``max_new_tokens`` at most
  that. A refusal is HTTP 422 ``{"error": "Input validation error: ...", "error_type": "validation"}``
  (``router/src/infer/mod.rs`` InferError, ``router/src/server.rs`` its status). A field of the wrong type
  (a negative or fractional ``seed``: TGI's is a u64) fails deserialization: 422 with axum's plain-text
  "Failed to deserialize the JSON body ...".
* The OpenAI-compatible routes answer as ``v1_server`` says. ``"vllm"`` (default): refusals are HTTP 400
  ``{"error": {"message", "type": "BadRequestError", "param", "code": 400}}`` (vLLM's ErrorResponse);
  ``temperature`` >= 0, ``0 < top_p <= 1``, ``repetition_penalty`` > 0; a prompt too long for
  ``context_tokens`` gets vLLM's "This model's maximum context length is N tokens ...". ``"tgi"``: TGI's
  ``/v1/completions`` and ``/v1/chat/completions`` (``router/src/server.rs`` completions,
  ``router/src/lib.rs`` ChatRequest::try_into_generate): temperature 0 becomes greedy decoding, every
  other parameter goes to the validation above as sent (``top_p: 1.0`` is refused), refusals are TGI's
  422 body.

Every request is recorded in ``server.calls`` (tests assert retries, seeds, and that cached requests
were not asked again). Use it as a context manager, through the ``llm_server`` pytest fixture, or as
a process: ``python tests/llm_server.py --capacity 32 --per-token-ms 2 --longtail`` prints
``PORT <n>`` and serves ``GET /_stats`` and ``POST /_reset`` until terminated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import math
import random
import re
import signal
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pytest
from aiohttp import web

# TGI's documented default for ``parameters.max_new_tokens``
TGI_DEFAULT_MAX_NEW_TOKENS = 100

FAULTS = ("429", "503", "500", "424", "400", "401", "404", "hang", "malformed", "malformed-json", "drop")
# TGI's launcher default for --max-stop-sequences (the router refuses more stop sequences than this)
TGI_MAX_STOP_SEQUENCES = 4
_U64_MAX = 2**64 - 1


class Refusal(Exception):
    """A request refused before anything is generated: ``status``, and ``body`` as the server writes it
    (a dict: JSON; a str: plain text, as axum answers a body it cannot deserialize)."""

    def __init__(self, status: int, body: dict | str):
        super().__init__(str(body))
        self.status = status
        self.body = body


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def tgi_validate(p: Mapping[str, Any], inputs: str, max_stop_sequences: int = TGI_MAX_STOP_SEQUENCES) -> None:
    """Refuse what TGI's router refuses of a generate request's ``parameters`` (router/src/validation.rs
    ``validate``, in its order): :class:`Refusal` with TGI's 422 body."""

    def refuse(msg: str) -> None:
        raise Refusal(422, {"error": f"Input validation error: {msg}", "error_type": "validation"})

    def undeserializable(field: str, v: Any, expected: str) -> None:
        raise Refusal(422, "Failed to deserialize the JSON body into the target type: "
                           f"parameters.{field}: invalid value: {json.dumps(v)}, expected {expected}")

    for f in ("temperature", "repetition_penalty", "frequency_penalty", "top_p", "typical_p"):
        if p.get(f) is not None and not _number(p[f]):
            undeserializable(f, p[f], "f32")
    for f, hi in (("top_k", 2**31 - 1), ("max_new_tokens", 2**32 - 1), ("seed", _U64_MAX)):
        v = p.get(f)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v > hi or (f != "top_k" and v < 0)):
            undeserializable(f, v, {"top_k": "i32", "max_new_tokens": "u32", "seed": "u64"}[f])
    if "do_sample" in p and not isinstance(p["do_sample"], bool):
        undeserializable("do_sample", p["do_sample"], "a boolean")
    stop = p.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
        undeserializable("stop", stop, "a sequence of strings")
    if p.get("temperature") is not None and p["temperature"] <= 0:
        refuse("`temperature` must be strictly positive")
    if p.get("repetition_penalty") is not None and p["repetition_penalty"] <= 0:
        refuse("`repetition_penalty` must be strictly positive")
    if p.get("frequency_penalty") is not None and not -2.0 <= p["frequency_penalty"] <= 2.0:
        refuse("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if p.get("top_p") is not None and not 0 < p["top_p"] < 1:
        refuse("`top_p` must be > 0.0 and < 1.0")
    if p.get("typical_p") is not None and not 0 < p["typical_p"] < 1:
        refuse("`typical_p` must be > 0.0 and < 1.0")
    if p.get("top_k") is not None and p["top_k"] <= 0:
        refuse("`top_k` must be strictly positive")
    if p.get("max_new_tokens") == 0:
        refuse("`max_new_tokens` must be strictly positive")
    if len(stop) > max_stop_sequences:
        refuse(f"`stop` supports up to {max_stop_sequences} stop sequences. Given: {len(stop)}")
    if not inputs:
        refuse("`inputs` cannot be empty")


def vllm_refusal(msg: str) -> Refusal:
    """vLLM's 400 (its ErrorResponse: vllm/entrypoints/openai/engine/protocol.py)."""
    return Refusal(400, {"error": {"message": msg, "type": "BadRequestError", "param": None, "code": 400}})

Script = Callable[[str], str] | Callable[[str, dict], str]


def default_script(prompt: str) -> str:
    words = prompt.split()
    return "Answer to: " + " ".join(words[:8])


def longtail_script(mu: float = 4.0, sigma: float = 1.0, seed: int = 0) -> Script:
    """Answers whose length in tokens follows a log-normal distribution (median e**mu, a long
    tail), fixed per prompt so a sequential and a concurrent run of the same prompts do the same work."""

    def script(prompt: str) -> str:
        rng = random.Random(zlib.crc32(prompt.encode()) ^ seed)
        n = max(1, round(math.exp(rng.gauss(mu, sigma))))
        return "tok " * n

    return script


_TOKEN = re.compile(r"\S+\s*")


def count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def truncate_tokens(text: str, n: int) -> tuple[str, int, bool]:
    pieces = _TOKEN.findall(text)
    lead = text[: len(text) - len(text.lstrip())]
    if len(pieces) <= n:
        return text, len(pieces), False
    return lead + "".join(pieces[:n]), n, True


@dataclass
class Call:
    """One request the server received."""

    n: int
    route: str  # tgi | completions | chat/completions | messages
    path: str
    prompt: str  # the text the script saw (chat: system and user joined by a blank line)
    system: str | None
    user: str | None
    params: dict[str, Any]  # decoding parameters as sent (seed, temperature, max tokens, stop ...)
    auth: str | None  # the credential the request carried (the fake test key, never a real one)
    fault: str | None = None
    status: int = 0
    arrived: float = 0.0
    decode_start: float | None = None
    finished: float | None = None
    output_tokens: int = 0

    @property
    def seed(self) -> int | None:
        return self.params.get("seed")


@dataclass
class ServerStats:
    requests: int
    by_status: dict[str, int]
    max_in_flight: int
    capacity: int | None
    first_arrival: float | None
    last_decode_start: float | None
    last_finish: float | None
    busy_s: float
    output_tokens: int


@dataclass
class LLMTestServer:
    script: Script = default_script
    latency: float | Callable[[str], float] = 0.0
    capacity: int | None = None
    per_token_s: float = 0.0
    plan: Sequence[str | None] = ()
    rates: Mapping[str, float] | None = None
    rule: Callable[[str], str | None] | None = None
    retry_after: str | None = "1"
    hang_s: float = 30.0
    api_key: str | None = None
    echo_headers: bool = False
    max_concurrent_requests: int | None = None
    # the model's context window: a request whose prompt tokens plus max_new_tokens exceed it is
    # refused with HTTP 422, as TGI refuses it ("inputs tokens + max_new_tokens must be <= N")
    context_tokens: int | None = None
    # what answers on the OpenAI-compatible routes, for their refusals: "vllm" or "tgi" (TGI's /v1 routes)
    v1_server: str = "vllm"
    max_stop_sequences: int = TGI_MAX_STOP_SEQUENCES
    seed: int = 0
    healthy: bool = True
    host: str = "127.0.0.1"
    port: int = 0
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self) -> None:
        for f in list(self.plan) + list((self.rates or {}).keys()):
            if f is not None and f not in FAULTS:
                raise ValueError(f"unknown fault {f!r}; known: {FAULTS}")
        if self.v1_server not in ("vllm", "tgi"):
            raise ValueError(f"v1_server must be 'vllm' or 'tgi', not {self.v1_server!r}")
        self._plan = list(self.plan)
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.info_asked = 0  # GET /info answered
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._slot_free: list[float] = [0.0] * (self.capacity or 0)  # when each decoding slot is next free
        # a script may take the request's decoding parameters too: script(prompt, params)
        import inspect

        self._script_takes_params = len(inspect.signature(self.script).parameters) >= 2

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/", self._tgi)
        app.router.add_post("/generate", self._tgi)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_get("/info", self._info_route)
        app.router.add_get("/health", self._health_route)
        app.router.add_get("/_stats", self._stats_route)
        app.router.add_get("/_timeline", self._timeline_route)
        app.router.add_post("/_reset", self._reset_route)
        return app

    async def start_async(self) -> None:
        # handler_cancellation: a client that gives up (timeout) frees its handler, as a real
        # server would notice the closed connection; shutdown_timeout: stop() does not wait on hangs
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop_async(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start(self) -> LLMTestServer:
        """Serve from a background thread with its own event loop."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="llm-test-server", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.start_async(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.stop_async(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> LLMTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ measurements
    def reset(self) -> None:
        with self._lock:
            self.calls.clear()
            self.max_in_flight = self.in_flight

    def stats(self) -> ServerStats:
        with self._lock:
            calls = list(self.calls)
        by_status: dict[str, int] = {}
        for c in calls:
            by_status[str(c.status)] = by_status.get(str(c.status), 0) + 1
        starts = answered_or_all(calls, "decode_start")
        ends = answered_or_all(calls, "finished")
        busy = sum(c.finished - c.decode_start for c in calls if c.decode_start is not None and c.finished is not None)
        return ServerStats(
            requests=len(calls),
            by_status=by_status,
            max_in_flight=self.max_in_flight,
            capacity=self.capacity,
            first_arrival=min((c.arrived for c in calls), default=None),
            last_decode_start=max(starts, default=None),
            last_finish=max(ends, default=None),
            busy_s=busy,
            output_tokens=sum(c.output_tokens for c in calls),
        )

    def busy_fraction(self, t0: float | None = None, t1: float | None = None) -> float:
        """Decoding slot-seconds used over ``capacity * (t1 - t0)``; default window: first arrival
        to last finish. Needs ``capacity``."""
        if not self.capacity:
            raise ValueError("busy_fraction needs a capacity model (capacity=N)")
        return busy_fraction(self.calls, self.capacity, t0, t1)

    def routes(self) -> list[str]:
        return [c.route for c in self.calls]

    # ------------------------------------------------------------------ request handling
    def _pick_fault(self, prompt: str) -> str | None:
        if self.rule is not None:
            f = self.rule(prompt)
            if f is not None:
                return f
        with self._lock:
            if self._plan:
                return self._plan.pop(0)
            for f, p in (self.rates or {}).items():
                if self._rng.random() < p:
                    return f
        return None

    def _auth_ok(self, request: web.Request, route: str) -> tuple[bool, str | None]:
        h = request.headers.get("Authorization", "")
        given = h[7:] if h.startswith("Bearer ") else None
        if route == "messages" and given is None:
            # Anthropic's API key header; the anthropic SDK 2.x sends a Bearer token instead
            given = request.headers.get("x-api-key")
        return (self.api_key is None or given == self.api_key), given

    def _latency(self, prompt: str) -> float:
        return self.latency(prompt) if callable(self.latency) else self.latency

    async def _serve(
        self,
        request: web.Request,
        route: str,
        parse: Callable[[dict], tuple[str, str | None, str | None, dict]],
        render: Callable[[Call, str, str], dict],
        error: Callable[[int, str], dict],
        as_list: bool = False,
    ) -> web.StreamResponse:
        arrived = time.monotonic()
        raw = await request.read()
        invalid: str | None = None
        refusal: Refusal | None = None
        try:
            prompt, system, user, params = parse(json.loads(raw))
        except Refusal as e:
            prompt, system, user, params, refusal = "", None, None, {}, e
        except (ValueError, KeyError, TypeError, IndexError) as e:
            prompt, system, user, params, invalid = "", None, None, {}, f"bad request body: {e}"
        ok, given = self._auth_ok(request, route)
        if self.echo_headers:
            plain_error = error

            def error(status: int, msg: str) -> dict:  # the same error body, quoting the credentials first
                sent = f"Authorization: {request.headers.get('Authorization')}, x-api-key: " \
                       f"{request.headers.get('x-api-key')}"
                return plain_error(status, f"{msg}; you sent {sent}; all headers: {json.dumps(dict(request.headers))}")

        with self._lock:
            call = Call(n=len(self.calls), route=route, path=request.path, prompt=prompt, system=system, user=user,
                        params=params, auth=given, arrived=arrived)
            self.calls.append(call)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            overloaded = self.max_concurrent_requests is not None and self.in_flight > self.max_concurrent_requests
        try:
            if overloaded:  # TGI's --max-concurrent-requests: refused at once, never queued
                call.status, call.fault = 429, "overloaded"
                return web.json_response(error(429, "Model is overloaded"), status=429)
            if not ok:  # the auth layer answers before the body is read
                call.status = 401
                return web.json_response(error(401, "invalid API key"), status=401)
            if refusal is not None:
                call.status, call.fault = refusal.status, "invalid"
                if isinstance(refusal.body, str):
                    return web.Response(status=refusal.status, text=refusal.body, content_type="text/plain")
                return web.json_response(refusal.body, status=refusal.status)
            if invalid is not None:
                call.status, call.fault = 400, "invalid"
                return web.json_response(error(400, invalid), status=400)
            if self.context_tokens is not None and route in ("tgi", "completions"):
                n_in, n_new = count_tokens(prompt), int(params.get("max_new_tokens") or 0)
                if n_in + n_new > self.context_tokens:
                    call.fault = "too-long"
                    if route == "tgi" or self.v1_server == "tgi":  # router/src/validation.rs MaxTotalTokens
                        call.status = 422
                        msg = (f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= "
                               f"{self.context_tokens}. Given: {n_in} `inputs` tokens and {n_new} `max_new_tokens`")
                        return web.json_response({"error": msg, "error_type": "validation"}, status=422)
                    call.status = 400
                    too_long = vllm_refusal(
                        f"This model's maximum context length is {self.context_tokens} tokens. However, you requested "
                        f"{n_in + n_new} tokens ({n_in} in the messages, {n_new} in the completion). Please reduce "
                        "the length of the messages or completion.")
                    return web.json_response(too_long.body, status=400)
            fault = call.fault = self._pick_fault(prompt)
            if fault in ("429", "503"):
                call.status = int(fault)
                headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
                msg = "rate limited" if fault == "429" else "overloaded, try later"
                return web.json_response(error(call.status, msg), status=call.status, headers=headers)
            if fault in ("500", "400", "404"):
                call.status = int(fault)
                return web.json_response(error(call.status, f"scripted HTTP {fault}"), status=call.status)
            if fault == "424":  # TGI's InferError::GenerationError: the shard failed the batch
                call.status = 424
                msg = "Request failed during generation: Server error: CUDA out of memory (scripted)"
                body = {"error": msg, "error_type": "generation"} if route == "tgi" else error(424, msg)
                return web.json_response(body, status=424)
            if fault == "401":
                call.status = 401
                return web.json_response(error(401, "invalid API key"), status=401)
            if fault == "drop":
                call.status = -1
                assert request.transport is not None
                request.transport.close()
                return web.Response(status=500)  # never reaches the client: the socket is closed
            if fault == "hang":
                await asyncio.sleep(self.hang_s)
            max_new = params.get("max_new_tokens")  # None: not cut (chat without a limit)
            stops = [s for s in (params.get("stop") or []) if s]
            text = self.script(prompt, params) if self._script_takes_params else self.script(prompt)  # type: ignore[call-arg,arg-type]
            finish = "eos"
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                hit = next(s for s in stops if text.find(s) == cut)
                text, finish = text[:cut], "stop"
                params = {**params, "_stop_hit": hit}
            text, n_out, truncated = truncate_tokens(text, max_new if max_new is not None else 1 << 30)
            if truncated:
                finish = "length"
            duration = self._latency(prompt) + n_out * self.per_token_s
            if self.capacity:
                # the capacity model as a schedule: the earliest free of N slots, FIFO. Times are
                # computed, not observed, so the busy figure measures the client, not how
                # promptly this process's event loop happens to wake up
                with self._lock:
                    start = max(time.monotonic(), heapq.heappop(self._slot_free))
                    heapq.heappush(self._slot_free, start + duration)
                call.decode_start, call.finished = start, start + duration
                await asyncio.sleep(max(0.0, call.finished - time.monotonic()))
            else:
                call.decode_start = time.monotonic()
                if duration > 0:
                    await asyncio.sleep(duration)
                call.finished = time.monotonic()
            call.output_tokens = n_out
            call.params = params
            if fault == "malformed":
                call.status = 200
                return web.Response(
                    status=200, text="<html>upstream proxy error</html>", content_type="application/json"
                )
            if fault == "malformed-json":
                call.status = 200
                return web.json_response({"unexpected": "shape"})
            call.status = 200
            out = render(call, text, finish)
            headers = tgi_timing_headers(call, arrived) if route == "tgi" else None
            return web.json_response([out] if as_list else out, headers=headers)
        finally:
            if call.finished is None:  # error answers and cancelled hangs end here
                call.finished = time.monotonic()
            with self._lock:
                self.in_flight -= 1

    # -- TGI ---------------------------------------------------------------------------------
    async def _tgi(self, request: web.Request) -> web.StreamResponse:
        def parse(body: dict) -> tuple[str, str | None, str | None, dict]:
            prompt = body.get("inputs")
            if not isinstance(prompt, str):
                raise Refusal(422, "Failed to deserialize the JSON body into the target type: "
                                   "missing field `inputs` or not a string")
            p = dict(body.get("parameters") or {})
            tgi_validate(p, prompt, self.max_stop_sequences)  # what TGI itself refuses, as it answers
            n = p.get("max_new_tokens")
            p["max_new_tokens"] = TGI_DEFAULT_MAX_NEW_TOKENS if n is None else n
            return prompt, None, None, p

        def render(call: Call, text: str, finish: str) -> dict:
            p = call.params
            hit = p.get("_stop_hit")
            out = {
                # TGI keeps the matched stop sequence at the end of generated_text
                "generated_text": text + (hit or ""),
                "details": {
                    "finish_reason": {"eos": "eos_token", "stop": "stop_sequence", "length": "length"}[finish],
                    "generated_tokens": call.output_tokens,
                    "seed": p.get("seed") if p.get("do_sample") else None,
                    "prefill": [],
                    "tokens": [],
                },
            }
            return out

        def error(status: int, msg: str) -> dict:
            kind = {429: "overloaded", 503: "overloaded", 400: "validation", 422: "validation",
                    424: "generation"}.get(status)
            return {"error": msg, "error_type": kind} if kind else {"error": msg}

        # the compat route "/" answers with a one-element list, /generate with the object
        return await self._serve(request, "tgi", parse, render, error, as_list=request.path == "/")

    # -- OpenAI ------------------------------------------------------------------------------
    def _openai_params(self, body: dict, chat: bool) -> dict:
        """The decoding parameters as the OpenAI API reads them. The output limit: chat takes
        ``max_completion_tokens`` (``max_tokens`` is its deprecated alias; without either the answer
        is not cut); the legacy completions route knows only ``max_tokens`` (default 16) and refuses
        ``max_completion_tokens`` as an unrecognized argument. A limit below 1 is refused."""
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        p = {k: body.get(k) for k in ("seed", "temperature", "top_p", "repetition_penalty", "model")}
        if not chat and "max_completion_tokens" in body:
            raise ValueError("Unrecognized request argument supplied: max_completion_tokens")
        for name in ("max_completion_tokens", "max_tokens"):
            v = body.get(name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"Invalid '{name}': expected an integer >= 1, got {v!r}")
        limit = body.get("max_completion_tokens") if chat else None
        p["max_new_tokens"] = limit if limit is not None else body.get("max_tokens", None if chat else 16)
        p["stop"] = stop or []
        if self.v1_server == "tgi":
            # router/src/server.rs completions and lib.rs ChatRequest::try_into_generate: temperature 0 is greedy,
            # the rest goes to the generate validation as sent (chat has no repetition_penalty: ignored there)
            presence = body.get("presence_penalty")
            if chat:  # ChatRequest has no repetition_penalty (ignored); presence_penalty + 2 stands for it
                p["repetition_penalty"] = presence + 2.0 if _number(presence) else None
            g = {"temperature": None if p["temperature"] == 0 else p["temperature"], "top_p": p["top_p"],
                 "seed": p["seed"], "stop": p["stop"], "max_new_tokens": p["max_new_tokens"],
                 "frequency_penalty": body.get("frequency_penalty"), "repetition_penalty": p["repetition_penalty"]}
            tgi_validate({k: v for k, v in g.items() if v is not None}, "-", self.max_stop_sequences)
        else:  # vLLM's SamplingParams checks (vllm/sampling_params.py _verify_args)
            t, top_p, rp = p["temperature"], p["top_p"], p["repetition_penalty"]
            if t is not None and (not _number(t) or t < 0):
                raise vllm_refusal(f"temperature must be non-negative, got {t}.")
            if top_p is not None and (not _number(top_p) or not 0 < top_p <= 1):
                raise vllm_refusal(f"top_p must be in (0, 1], got {top_p}.")
            if rp is not None and (not _number(rp) or rp <= 0):
                raise vllm_refusal(f"repetition_penalty must be greater than zero, got {rp}.")
        return p

    def _openai_error(self, status: int, msg: str) -> dict:
        if self.v1_server == "tgi":  # TGI answers its /v1 routes' errors in its own shape
            kind = {429: "overloaded", 422: "validation", 400: "validation", 424: "generation"}.get(status)
            return {"error": msg, "error_type": kind} if kind else {"error": msg}
        kind = {429: "rate_limit_exceeded", 401: "invalid_api_key", 404: "model_not_found"}.get(status, "server_error")
        return {"error": {"message": msg, "type": kind, "code": kind}}

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        def parse(body: dict) -> tuple[str, str | None, str | None, dict]:
            prompt = body["prompt"]
            if not isinstance(prompt, str):
                raise TypeError("prompt must be a string")
            return prompt, None, None, self._openai_params(body, chat=False)

        def render(call: Call, text: str, finish: str) -> dict:
            return {
                "id": f"cmpl-{call.n}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": call.params.get("model"),
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": "length" if finish == "length" else "stop"}],
                "usage": {"prompt_tokens": count_tokens(call.prompt), "completion_tokens": call.output_tokens,
                          "total_tokens": count_tokens(call.prompt) + call.output_tokens},
            }

        return await self._serve(request, "completions", parse, render, self._openai_error)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        def parse(body: dict) -> tuple[str, str | None, str | None, dict]:
            msgs = body["messages"]
            system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system") or None
            user = "\n\n".join(m["content"] for m in msgs if m["role"] == "user")
            prompt = "\n\n".join(x for x in (system, user) if x)
            return prompt, system, user, self._openai_params(body, chat=True)

        def render(call: Call, text: str, finish: str) -> dict:
            return {
                "id": f"chatcmpl-{call.n}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": call.params.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "length" if finish == "length" else "stop"}],
                "usage": {"prompt_tokens": count_tokens(call.prompt), "completion_tokens": call.output_tokens,
                          "total_tokens": count_tokens(call.prompt) + call.output_tokens},
            }

        return await self._serve(request, "chat/completions", parse, render, self._openai_error)

    # -- Anthropic ---------------------------------------------------------------------------
    async def _messages(self, request: web.Request) -> web.StreamResponse:
        def parse(body: dict) -> tuple[str, str | None, str | None, dict]:
            msgs = body["messages"]
            system = body.get("system")
            if isinstance(system, list):
                system = "\n\n".join(b["text"] for b in system)
            user = "\n\n".join(m["content"] if isinstance(m["content"], str) else
                               "".join(b["text"] for b in m["content"]) for m in msgs if m["role"] == "user")
            prompt = "\n\n".join(x for x in (system, user) if x)
            p = {k: body.get(k) for k in ("temperature", "top_p", "model")}
            p["max_new_tokens"] = body["max_tokens"]
            p["stop"] = body.get("stop_sequences") or []
            p["seed"] = None  # the Messages API has no seed
            return prompt, system, user, p

        def render(call: Call, text: str, finish: str) -> dict:
            return {
                "id": f"msg_{call.n}",
                "type": "message",
                "role": "assistant",
                "model": call.params.get("model"),
                "content": [{"type": "text", "text": text}],
                "stop_reason": {"eos": "end_turn", "stop": "stop_sequence", "length": "max_tokens"}[finish],
                "stop_sequence": call.params.get("_stop_hit"),
                "usage": {"input_tokens": count_tokens(call.prompt), "output_tokens": call.output_tokens},
            }

        def error(status: int, msg: str) -> dict:
            kind = {429: "rate_limit_error", 401: "authentication_error", 404: "not_found_error",
                    400: "invalid_request_error", 503: "overloaded_error"}.get(status, "api_error")
            return {"type": "error", "error": {"type": kind, "message": msg}}

        return await self._serve(request, "messages", parse, render, error)

    # -- control routes (for the benchmark's server process) ----------------------------------
    async def _info_route(self, request: web.Request) -> web.Response:
        self.info_asked += 1
        info: dict[str, Any] = {"model_id": "scripted/teacher", "version": "scripted"}
        if self.v1_server == "tgi":  # TGI's Info names its router (router/src/lib.rs Info.router, the crate's name)
            info["router"] = "text-generation-router"
        if self.max_concurrent_requests is not None:
            info["max_concurrent_requests"] = self.max_concurrent_requests
        return web.json_response(info)

    async def _health_route(self, request: web.Request) -> web.Response:
        """TGI's readiness route: 200 once the model serves (``healthy=False``: 503, a replica going away)."""
        return web.Response(status=200 if self.healthy else 503)

    async def _stats_route(self, request: web.Request) -> web.Response:
        s = asdict(self.stats())
        if self.capacity and self.calls:
            s["busy_fraction"] = self.busy_fraction()
            s["busy_fraction_answered"] = busy_fraction(self.calls, self.capacity, answered_only=True)
            s["busy_fraction_until_last_start"] = self.busy_fraction(t1=s["last_decode_start"])
        return web.json_response(s)

    async def _timeline_route(self, request: web.Request) -> web.Response:
        """Every call since the last reset, for the benchmark's timeline: ``[arrived, decode_start,
        finished, status, fault, max_new_tokens, key]`` (key: the prompt and seed, so a retry of the
        same request is known as one)."""
        with self._lock:
            calls = list(self.calls)
        rows = [[c.arrived, c.decode_start, c.finished, c.status, c.fault, c.params.get("max_new_tokens"),
                 f"{zlib.crc32(c.prompt.encode()):08x}-{c.params.get('seed')}"] for c in calls]
        return web.json_response(rows)

    async def _reset_route(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})


def tgi_timing_headers(call: Call, arrived: float) -> dict[str, str]:
    """The timing headers TGI's router puts on a generate answer (router/src/server.rs): milliseconds as
    whole numbers, ``x-compute-time`` in seconds; ``x-queue-time`` is the time the request waited in the
    server's queue for a decoding slot (the capacity model's), ``x-inference-time`` its decode."""
    start = call.decode_start if call.decode_start is not None else arrived
    end = call.finished if call.finished is not None else start
    queue_s, infer_s, total_s = start - arrived, end - start, end - arrived
    per_token = infer_s / call.output_tokens if call.output_tokens else 0.0
    return {"x-compute-type": "gpu+optimized", "x-compute-time": repr(total_s),
            "x-compute-characters": str(len(call.prompt)), "x-total-time": str(int(total_s * 1000)),
            "x-validation-time": "0", "x-queue-time": str(int(queue_s * 1000)),
            "x-inference-time": str(int(infer_s * 1000)), "x-time-per-token": str(int(per_token * 1000)),
            "x-prompt-tokens": str(count_tokens(call.prompt)), "x-generated-tokens": str(call.output_tokens)}


def answered_or_all(calls: Sequence[Call], attr: str) -> list[float]:
    """``attr`` (``decode_start`` or ``finished``) of the calls answered (status 200), else of all that have it.
    A stage's span ends with its last answer out: an attempt the client cancelled (a duplicate that lost its
    race) keeps its slot in this model until its decode would have ended, which TGI does not do (it stops a
    request whose client went away at its next step: backends/v3/src/backend.rs send_responses, queue.rs
    next_batch), so its computed end does not stretch the span."""
    have = [c for c in calls if getattr(c, attr) is not None]
    return [getattr(c, attr) for c in have if c.status == 200] or [getattr(c, attr) for c in have]


def busy_fraction(calls: Sequence[Call], capacity: int, t0: float | None = None, t1: float | None = None,
                  answered_only: bool = False) -> float:
    """Decoding slot-seconds over ``capacity * (t1 - t0)``. ``answered_only``: only the decodes whose answer
    went out (status 200), not those of attempts the client cancelled (a duplicate that lost its race, an
    abandoned attempt), which held a slot for nothing."""
    window = [c for c in calls if c.decode_start is not None and c.finished is not None]
    if not window:
        return 0.0
    done = [c for c in window if c.status == 200] if answered_only else window
    t0 = min(c.arrived for c in calls) if t0 is None else t0
    if t1 is None:
        t1 = max(answered_or_all(window, "finished"))
    if t1 <= t0:
        return 0.0
    busy = 0.0
    for c in done:
        assert c.decode_start is not None and c.finished is not None
        busy += max(0.0, min(c.finished, t1) - max(c.decode_start, t0))
    return busy / (capacity * (t1 - t0))


@contextlib.contextmanager
def running(**kwargs: Any) -> Iterator[LLMTestServer]:
    """``with running(script=...) as srv:`` starts a server and stops it afterwards."""
    srv = LLMTestServer(**kwargs).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def llm_server() -> Iterator[Callable[..., LLMTestServer]]:
    """A factory fixture: ``srv = llm_server(script=..., plan=[...])``; every server it started is
    stopped at teardown. Import it into a test module to use it."""
    started: list[LLMTestServer] = []

    def start(**kwargs: Any) -> LLMTestServer:
        srv = LLMTestServer(**kwargs).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--capacity", type=int, default=None, help="sequences decoding at once")
    ap.add_argument("--per-token-ms", type=float, default=0.0)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--longtail", action="store_true", help="log-normal answer lengths instead of echo answers")
    ap.add_argument("--mu", type=float, default=4.0)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="the answers' lengths (every replica of one model: the same)")
    ap.add_argument("--fault-seed", type=int, default=None, help="the fault draws (default: --seed)")
    ap.add_argument("--scripted", action="store_true",
                    help="the pipeline's scripted teacher and judge (tests/scripted.py), responses long-tailed")
    ap.add_argument("--rates", default="", help="fault rates, e.g. 429=0.1,503=0.1,hang=0.05,malformed=0.01")
    ap.add_argument("--hang-s", type=float, default=30.0)
    ap.add_argument("--retry-after", default="1", help="Retry-After of 429/503 answers ('' for none)")
    ap.add_argument("--max-concurrent-requests", type=int, default=None, help="TGI's admission limit (and /info)")
    a = ap.parse_args(argv)
    rates = {k: float(v) for k, v in (x.split("=") for x in a.rates.split(",") if x)} or None
    if a.scripted:
        from scripted import longtail_pipeline_script

        script: Script = longtail_pipeline_script(a.mu, a.sigma, a.seed)
    else:
        script = longtail_script(a.mu, a.sigma, a.seed) if a.longtail else default_script
    srv = LLMTestServer(
        script=script,
        capacity=a.capacity,
        per_token_s=a.per_token_ms / 1000,
        latency=a.latency_ms / 1000,
        port=a.port,
        rates=rates,
        hang_s=a.hang_s,
        retry_after=a.retry_after or None,
        max_concurrent_requests=a.max_concurrent_requests,
        seed=a.seed if a.fault_seed is None else a.fault_seed,
    )

    async def serve() -> None:
        await srv.start_async()
        print(f"PORT {srv.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await srv.stop_async()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
