"""Text Generation Inference over plain HTTP: ``POST`` to the base URL (TGI's compatible route ``/``).

The request is ``{"inputs": prompt, "parameters": {...}}``; the answer a one-element list (``/``) or an
object (``/generate``) with ``generated_text`` and ``details`` (finish reason, generated tokens, seed,
prefill). The client speaks it itself with aiohttp, one connection pool per lane, instead of going through
``huggingface_hub.AsyncInferenceClient`` on httpx: the same requests, at about a tenth of the client's
CPU per request (0.4 ms against 1.9 ms, docs/benchmarks.md), which is what decides how busy one stage process keeps a
fast server on shared cores (docs/benchmarks.md "Generation stages"). What the earlier client had to be
told, this one does by construction:

* Offline mode: nothing here asks the Hugging Face Hub, so ``HF_HUB_OFFLINE=1`` (set in our pods and CI)
  does not stand between the stage and the TGI server named by ``base_url``.
* No ambient token: the only credential sent is the recipe's key (``Authorization: Bearer``); a Hugging
  Face token in the environment or a login never reaches whatever server ``base_url`` names.
* Greedy decoding: TGI refuses ``temperature <= 0``; temperature 0 in a recipe means greedy, which TGI
  spells ``do_sample=False`` with no temperature (and no top_p: TGI wants ``0 < top_p < 1``).

TGI's ``details`` give the number of generated tokens but not the prompt's (``prefill`` is empty unless
``decoder_input_details``); the router says it in the ``x-prompt-tokens`` header (router/src/server.rs), which
``prompt_tokens`` takes. Without it (a proxy that drops headers) it is estimated (``len(prompt)/4``) and
flagged in ``GenResult.extra``.
"""

from __future__ import annotations

import contextlib
import json
import urllib.parse
from typing import Any

from ..errors import BadInput
from ..recipe import Endpoint
from .base import GenRequest, GenResult
from .faults import Transient, classify_status
from .fleet import REPLICA
from .pool import RemoteClient
from .render import estimate_tokens, render_raw

FINISH = {"length": "length"}  # TGI's eos_token / stop_sequence are both a natural stop here


class TGIClient(RemoteClient):
    backend = "tgi"
    fleet_capable = True

    def __init__(self, endpoint: Endpoint, api_key: str | None = None, role: str = "endpoint"):
        super().__init__(endpoint, api_key, role)
        if not endpoint.base_url or not endpoint.prompt_format:
            raise BadInput(f"{role}: backend 'tgi' needs base_url and prompt_format")
        self._session: Any = None

    def prompt_text(self, req: GenRequest) -> str:
        assert self.endpoint.prompt_format is not None
        return render_raw(self.endpoint.prompt_format, req.system, req.user)

    async def _open(self) -> None:
        import aiohttp

        n = self.max_slots()
        headers = {"Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        # connections for every attempt the pool may have out: its slots, as many overdue attempts that gave
        # their slot away (llm/pool.py) and their hedges. Sized to the slots alone, an attempt that hung kept
        # its connection and the request that took its slot waited for one: the server idled
        # trust_env: HTTP(S)_PROXY / NO_PROXY as the SDKs before (httpx) and urllib honour them
        self._session = aiohttp.ClientSession(
            headers=headers, trust_env=True, connector=aiohttp.TCPConnector(limit=3 * n),
            timeout=aiohttp.ClientTimeout(total=self.endpoint.timeout_s))

    async def _close(self) -> None:
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
        self._session = None

    def parameters(self, req: GenRequest) -> dict[str, Any]:
        p: dict[str, Any] = {"max_new_tokens": req.max_new_tokens, "details": True}
        if req.seed is not None:
            p["seed"] = req.seed
        if req.temperature > 0:
            p["do_sample"] = True
            p["temperature"] = req.temperature
            if req.top_p < 1.0:
                p["top_p"] = req.top_p
        else:
            p["do_sample"] = False
        if req.repetition_penalty is not None:
            p["repetition_penalty"] = req.repetition_penalty
        if req.stop:
            p["stop"] = list(req.stop)
        return p

    async def _send(self, req: GenRequest) -> GenResult:
        import aiohttp

        prompt = self.prompt_text(req)
        url = REPLICA.get() or self.endpoint.base_url
        assert url is not None and self._session is not None
        if not urllib.parse.urlsplit(url).path:  # TGI's "/" route, said explicitly (a proxy needs a path)
            url += "/"
        body = {"inputs": prompt, "parameters": self.parameters(req), "stream": False}
        try:
            async with self._session.post(url, json=body) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise classify_status(resp.status, _error_text(raw), resp.headers, self.where, self.key_hint)
                counted = _header_count(resp.headers.get("x-prompt-tokens"))
        except TimeoutError:
            raise Transient(f"timed out after timeout_s={self.endpoint.timeout_s:g}", kind="timeout") from None
        except aiohttp.ClientError as e:
            raise Transient(f"connection failed: {type(e).__name__}: {e}", kind="connection") from None
        try:
            out = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Transient(f"malformed answer (not JSON): {e}", kind="malformed") from None
        if isinstance(out, list) and len(out) == 1:
            out = out[0]
        text = out.get("generated_text") if isinstance(out, dict) else None
        details = out.get("details") if isinstance(out, dict) else None
        tokens = details.get("generated_tokens") if isinstance(details, dict) else None
        if not isinstance(text, str) or not isinstance(tokens, int) or isinstance(tokens, bool):
            raise Transient("malformed answer: no generated_text/details in the body", kind="malformed")
        assert isinstance(details, dict)
        reason = details.get("finish_reason")
        if reason == "stop_sequence":
            # TGI keeps the matched stop sequence at the end of the text; OpenAI-style APIs do not
            for s in req.stop:
                if s and text.endswith(s):
                    text = text[: -len(s)]
                    break
        # the prompt's tokens: the prefill's (with decoder_input_details), else the router's x-prompt-tokens
        # header (its validated input length, router/src/server.rs), else estimated (a proxy that drops headers)
        prefill = details.get("prefill") or []
        known = len(prefill) or counted
        return GenResult(
            id=req.id,
            text=text,
            prompt_tokens=known or estimate_tokens(prompt),
            completion_tokens=tokens,
            finish_reason=FINISH.get(str(reason), "stop"),
            extra={"prompt_tokens_estimated": not known, "seed": details.get("seed")},
        )


def _error_text(raw: bytes) -> str:
    """TGI's error body (``{"error": ..., "error_type": ...}``) as one line, else the body's start."""
    text = raw.decode("utf-8", "replace")
    with contextlib.suppress(ValueError):
        said = tgi_error(json.loads(text))
        if said is not None:
            return said
    return text[:300]


def tgi_error(body: Any) -> str | None:
    """A parsed TGI error body (``{"error": ..., "error_type": ...}``, on its own and its ``/v1`` routes) as one
    line; None when the body is not one."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        return None
    kind = body.get("error_type")
    return body["error"] + (f" ({kind})" if isinstance(kind, str) else "")


def _header_count(value: str | None) -> int | None:
    """A token count from a response header (a whole number above 0), else None."""
    if value is None or not value.strip().isdigit():
        return None
    return int(value) or None
