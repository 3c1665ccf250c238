"""OpenAI-compatible servers over plain HTTP (aiohttp).

* ``openai-completions``: ``POST {base_url}/completions`` with the raw prompt rendered from
  ``prompt_format`` (vLLM, SGLang serving a teacher).
* ``openai-chat``: ``POST {base_url}/chat/completions`` with system + user messages (GPT-4-class
  judges; any server that applies its own chat template).

``base_url`` includes the ``/v1`` suffix (``http://vllm:8000/v1``); absent, ``https://api.openai.com/v1``.
The client builds the documented request bodies and reads ``choices`` and ``usage`` itself, without the
``openai`` package's client: the same requests, at a fraction of its CPU per request (the pool has one
retry policy for every backend, so the SDK's retries were off anyway, and its response models cost more
than the answer). The key, when one is configured, goes as ``Authorization: Bearer``; nothing ambient
(``OPENAI_API_KEY``) is ever picked up. The seed is sent with every request. ``repetition_penalty`` is
not an OpenAI parameter: it goes in the body as vLLM/SGLang read it, only when the recipe sets it. TGI's
completions route reads it too, but its chat route ignores it and takes ``presence_penalty + 2`` as the
repetition penalty (``router/src/lib.rs`` ChatRequest::try_into_generate): to a server whose ``/info`` names
TGI's router (asked once, only when a chat request carries a penalty) it goes as that.

``temperature`` and ``top_p`` are always sent, 1.0 included: vLLM fills a parameter the request leaves out
from the model's ``generation_config.json`` before the OpenAI default (``to_sampling_params``, "user -> server
default -> OpenAI default"), so leaving ``top_p: 1.0`` out could change a sampled answer. TGI's ``/v1`` routes
pass ``top_p`` to the router's validation, which wants ``0 < top_p < 1`` and refuses 1.0 with HTTP 422
(``router/src/validation.rs``); TGI reads an absent ``top_p`` as 1.0, so on exactly that refusal the request is
sent again without it (the same sampling) and the client leaves it out at that server from then on
(:meth:`_OpenAIBase._post`; per replica in a fleet).
Temperature 0 needs nothing of the kind: TGI's ``/v1`` routes turn it into greedy decoding themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import urllib.parse
from typing import Any

from ..recipe import Endpoint
from .base import GenRequest, GenResult
from .budget import INFO_TIMEOUT_S
from .faults import Rejected, Transient, classify_status
from .fleet import REPLICA
from .pool import RemoteClient
from .render import chat_messages, render_raw
from .tgi import tgi_error

log = logging.getLogger("bezoar.llm")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# TGI's refusal of top_p 1.0 (router/src/validation.rs ValidationError::TopP), relayed as a 422
TGI_TOP_P_REFUSAL = "`top_p` must be > 0.0 and < 1.0"


class _OpenAIBase(RemoteClient):
    route = ""  # chat/completions | completions
    fleet_capable = True  # each request to {replica}/{route} (_post): TGI, vLLM and SGLang serve both routes

    def __init__(self, endpoint: Endpoint, api_key: str | None = None, role: str = "endpoint"):
        super().__init__(endpoint, api_key, role)
        self._session: Any = None
        # the servers (base URLs) that refused top_p 1.0 as TGI does: left out there (their default). Per server: in a
        # fleet mixing TGI and vLLM replicas, the vLLM ones still get it (they fill an absent one from the model)
        self._omit_top_p_1: set[str] = set()
        self._tgi: dict[str, bool] = {}  # server (base URL) -> whether its /info names TGI's router
        self._tgi_asking: dict[str, asyncio.Future[bool]] = {}  # the question on its way, per server

    async def _open(self) -> None:
        import aiohttp

        headers = {"Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        # connections for the slots, the overdue attempts that gave theirs away, and their hedges (llm/pool.py)
        # trust_env: HTTP(S)_PROXY / NO_PROXY as the SDKs before (httpx) and urllib honour them
        self._session = aiohttp.ClientSession(
            headers=headers, trust_env=True, connector=aiohttp.TCPConnector(limit=3 * self.max_slots()),
            timeout=aiohttp.ClientTimeout(total=self.endpoint.timeout_s))

    async def _close(self) -> None:
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
        self._session = None

    def _common(self, req: GenRequest) -> dict[str, Any]:
        kw: dict[str, Any] = {"model": self.model_id, "temperature": req.temperature}
        if req.top_p < 1.0 or self._base() not in self._omit_top_p_1:
            kw["top_p"] = req.top_p
        if req.seed is not None:
            kw["seed"] = req.seed
        if req.stop:
            kw["stop"] = list(req.stop)
        if req.repetition_penalty is not None:
            kw["repetition_penalty"] = req.repetition_penalty
        return kw

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """One request to ``{base_url}/{route}`` (a fleet replica's, llm/fleet.py): the answer's JSON object.
        Refused as TGI refuses ``top_p: 1.0`` (module docstring), sent again at once without it."""
        if self.route == "chat/completions" and "repetition_penalty" in body and await self._is_tgi():
            # TGI's chat route has no repetition_penalty (the field is ignored): it takes presence_penalty + 2 as
            # the repetition penalty (router/src/lib.rs ChatRequest::try_into_generate)
            rp = body["repetition_penalty"]
            body = {**{k: v for k, v in body.items() if k != "repetition_penalty"}, "presence_penalty": rp - 2.0}
        try:
            return await self._post_once(body)
        except Rejected as e:
            if not (e.status == 422 and body.get("top_p", 0.0) >= 1.0 and TGI_TOP_P_REFUSAL in str(e)):
                raise
            self._omit_top_p_1.add(self._base())
            return await self._post_once({k: v for k, v in body.items() if k != "top_p"})

    async def _is_tgi(self) -> bool:
        """Whether the current attempt's server is TGI: its ``GET /info`` (at the server's root, whatever the
        route's path) names TGI's router. Asked once per server (the attempts that need it meanwhile wait for
        that one answer), and only for a request that needs to know."""
        base = self._base()
        if base in self._tgi:
            return self._tgi[base]
        asking = self._tgi_asking.get(base)
        if asking is None or asking.get_loop() is not asyncio.get_running_loop():
            asking = self._tgi_asking[base] = asyncio.ensure_future(self._ask_tgi(base))
        return await asyncio.shield(asking)  # a cancelled attempt (a lost hedge) leaves the question asked

    async def _ask_tgi(self, base: str) -> bool:
        import aiohttp

        u = urllib.parse.urlsplit(base)
        try:
            assert self._session is not None
            async with self._session.get(f"{u.scheme}://{u.netloc}/info",
                                         timeout=aiohttp.ClientTimeout(total=INFO_TIMEOUT_S)) as resp:
                info = await resp.json(content_type=None) if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            info = None
        router = info.get("router") if isinstance(info, dict) else None
        self._tgi[base] = is_tgi = isinstance(router, str) and router.startswith("text-generation-router")
        self._tgi_asking.pop(base, None)
        if is_tgi:
            log.info("%s: %s is TGI: its chat route gets the repetition penalty as presence_penalty + 2",
                     self.role, base)
        return is_tgi

    def _base(self) -> str:
        """Where the current attempt goes: its fleet replica's URL, else the endpoint's."""
        return (REPLICA.get() or self.endpoint.base_url or DEFAULT_BASE_URL).rstrip("/")

    async def _post_once(self, body: dict[str, Any]) -> dict[str, Any]:
        import aiohttp

        base = self._base()
        assert self._session is not None
        try:
            async with self._session.post(f"{base}/{self.route}", json=body) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise classify_status(resp.status, _error_text(resp.status, raw), resp.headers, self.where,
                                          self.key_hint)
        except TimeoutError:
            raise Transient("timed out", kind="timeout") from None
        except aiohttp.ClientError as e:
            raise Transient(f"connection failed: {type(e).__name__}: {e}", kind="connection") from None
        try:
            out = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Transient(f"malformed answer (not JSON): {e}", kind="malformed") from None
        if not isinstance(out, dict):
            raise Transient("malformed answer: not a JSON object", kind="malformed")
        return out

    @staticmethod
    def _usage(resp: dict[str, Any]) -> tuple[int, int]:
        usage = resp.get("usage")
        p = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        c = usage.get("completion_tokens") if isinstance(usage, dict) else None
        if not isinstance(p, int) or not isinstance(c, int):
            raise Transient("malformed answer: no usage token counts", kind="malformed")
        return p, c

    @staticmethod
    def _choice(resp: dict[str, Any]) -> dict[str, Any]:
        choices = resp.get("choices")
        first = choices[0] if isinstance(choices, list) and choices else None
        return first if isinstance(first, dict) else {}

    @staticmethod
    def _finish(reason: Any) -> str:
        return "length" if reason == "length" else "stop"


def _error_text(status: int, raw: bytes) -> str:
    """An error body as one line: OpenAI's and vLLM's (``{"error": {"message": ...}}``), TGI's (``{"error": ...,
    "error_type": ...}``), older vLLM's (``{"object": "error", "message": ...}``); else the body's start."""
    text = raw.decode("utf-8", "replace")
    with contextlib.suppress(ValueError):
        body = json.loads(text)
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return f"Error code: {status} - {err['message']}"
        said = tgi_error(body)  # TGI's /v1 routes: {"error": "...", "error_type": "..."}
        if said is not None:
            return f"Error code: {status} - {said}"
        if isinstance(body, dict) and isinstance(body.get("message"), str):
            # vLLM before its OpenAI-shaped errors: {"object": "error", "message": ..., "type": ..., "code": ...}
            return f"Error code: {status} - {body['message']}"
    return f"Error code: {status} - {text[:300]}"


class OpenAICompletionsClient(_OpenAIBase):
    backend = "openai-completions"
    route = "completions"

    def prompt_text(self, req: GenRequest) -> str:
        assert self.endpoint.prompt_format is not None
        return render_raw(self.endpoint.prompt_format, req.system, req.user)

    async def _send(self, req: GenRequest) -> GenResult:
        resp = await self._post({"prompt": self.prompt_text(req), "max_tokens": req.max_new_tokens,
                                 **self._common(req)})
        choice = self._choice(resp)
        if not isinstance(choice.get("text"), str):
            raise Transient("malformed answer: no choices[0].text", kind="malformed")
        p, c = self._usage(resp)
        return GenResult(id=req.id, text=choice["text"], prompt_tokens=p, completion_tokens=c,
                         finish_reason=self._finish(choice.get("finish_reason")))


class OpenAIChatClient(_OpenAIBase):
    backend = "openai-chat"
    route = "chat/completions"

    def messages(self, req: GenRequest) -> list[dict[str, str]]:
        return chat_messages(req.system, req.user, self.endpoint.system_prompt_supported)

    def prompt_text(self, req: GenRequest) -> str:
        return "\n\n".join(m["content"] for m in self.messages(req))

    async def _send(self, req: GenRequest) -> GenResult:
        # max_completion_tokens: what current OpenAI models require (max_tokens is refused by
        # the newer ones); vLLM and SGLang accept it too
        resp = await self._post({"messages": self.messages(req), "max_completion_tokens": req.max_new_tokens,
                                 **self._common(req)})
        choice = self._choice(resp)
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str):
            raise Transient("malformed answer: no choices[0].message.content", kind="malformed")
        p, c = self._usage(resp)
        return GenResult(id=req.id, text=text, prompt_tokens=p, completion_tokens=c,
                         finish_reason=self._finish(choice.get("finish_reason")))
