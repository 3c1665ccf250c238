"""Text Generation Inference through ``huggingface_hub.AsyncInferenceClient(base_url=...)``.

The client posts ``{"inputs": prompt, "parameters": {...}}`` to the base URL itself (TGI's
compatible route) and parses ``generated_text`` and ``details``. Three things needed care:

* Offline mode: with ``HF_HUB_OFFLINE=1`` (our pods and CI set it so nothing reaches the Hub),
  huggingface_hub's default HTTP client refuses every request, loopback included. We give the
  inference client an HTTP client of our own without that hook, so the TGI server named by
  ``base_url`` is reachable while the Hub stays off limits for everything else in the process.
* No ambient token: without a key of its own, huggingface_hub would send the process's Hugging Face
  token (``HF_TOKEN`` or a login) to whatever server ``base_url`` names. The request hook removes it:
  a TGI server gets a key only when the recipe names one.
* Greedy decoding: TGI refuses ``temperature <= 0``; temperature 0 in a recipe means greedy, which
  TGI spells ``do_sample=False`` with no temperature (and no top_p: TGI wants ``0 < top_p < 1``).

TGI's ``details`` give the number of generated tokens but not the prompt's, so ``prompt_tokens``
is estimated (``len(prompt)/4``) and flagged in ``GenResult.extra``.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from ..errors import BadInput
from ..recipe import Endpoint
from .base import GenRequest, GenResult
from .faults import Transient, classify_status
from .fleet import REPLICA
from .pool import RemoteClient
from .render import estimate_tokens, render_raw


class TGIClient(RemoteClient):
    backend = "tgi"
    fleet_capable = True

    def __init__(self, endpoint: Endpoint, api_key: str | None = None, role: str = "endpoint"):
        super().__init__(endpoint, api_key, role)
        if not endpoint.base_url or not endpoint.prompt_format:
            raise BadInput(f"{role}: backend 'tgi' needs base_url and prompt_format")
        self._hf: Any = None
        self._http: Any = None
        self._replicas: dict[str, Any] = {}  # a fleet's replicas: base URL -> inference client

    def prompt_text(self, req: GenRequest) -> str:
        assert self.endpoint.prompt_format is not None
        return render_raw(self.endpoint.prompt_format, req.system, req.user)

    async def _open(self) -> None:
        import httpx2
        from huggingface_hub import AsyncInferenceClient

        n = self.max_slots()
        self._hf = AsyncInferenceClient(
            base_url=self.endpoint.base_url, api_key=self._api_key, timeout=self.endpoint.timeout_s
        )
        if not hasattr(self._hf, "_async_client"):  # a huggingface_hub that manages its client differently
            raise RuntimeError(
                "huggingface_hub.AsyncInferenceClient has no _async_client: this version is not supported"
            )
        # our own connection pool (sized to the concurrency), without huggingface_hub's
        # offline-mode request hook: see the module docstring
        hooks = {} if self._api_key else {"request": [_drop_ambient_token]}
        # connections for every attempt the pool may have out: its slots, as many overdue attempts that gave
        # their slot away (llm/pool.py) and their hedges. Sized to the slots alone, an attempt that hung kept
        # its connection, and the request that took its slot waited inside httpx for one: the server idled
        self._http = httpx2.AsyncClient(follow_redirects=True, timeout=None, event_hooks=hooks,
                                        limits=httpx2.Limits(max_connections=3 * n, max_keepalive_connections=n))
        self._hf._async_client = self._http

    def _inference(self) -> Any:
        """The inference client of the replica this attempt goes to (llm/fleet.py), else the base URL's."""
        url = REPLICA.get()
        if url is None:
            return self._hf
        hf = self._replicas.get(url)
        if hf is None:
            from huggingface_hub import AsyncInferenceClient

            hf = self._replicas[url] = AsyncInferenceClient(base_url=url, api_key=self._api_key,
                                                             timeout=self.endpoint.timeout_s)
            hf._async_client = self._http  # one connection pool for every replica
        return hf

    async def _close(self) -> None:
        self._replicas.clear()
        if self._hf is not None:
            with contextlib.suppress(Exception):
                await self._hf.close()
        if self._http is not None:
            await self._http.aclose()
        self._hf = self._http = None

    def parameters(self, req: GenRequest) -> dict[str, Any]:
        p: dict[str, Any] = {"max_new_tokens": req.max_new_tokens, "details": True, "seed": req.seed}
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
        import httpx2
        from huggingface_hub.errors import HfHubHTTPError, InferenceTimeoutError, TextGenerationError

        prompt = self.prompt_text(req)
        try:
            out = await self._inference().text_generation(prompt, **self.parameters(req))
        except InferenceTimeoutError as e:
            raise Transient(f"timed out: {e}", kind="timeout") from None
        except (HfHubHTTPError, TextGenerationError) as e:
            http = e if isinstance(e, HfHubHTTPError) else e.__cause__
            response = getattr(http, "response", None)
            if response is None:
                raise Transient(f"{type(e).__name__}: {e}", kind="server") from None
            raise classify_status(response.status_code, str(e), response.headers, self.where, self.key_hint) from None
        except httpx2.TimeoutException as e:
            raise Transient(f"timed out: {type(e).__name__}", kind="timeout") from None
        except httpx2.TransportError as e:
            raise Transient(f"connection failed: {type(e).__name__}: {e}", kind="connection") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Transient(f"malformed answer (not JSON): {e}", kind="malformed") from None
        text = getattr(out, "generated_text", None)
        details = getattr(out, "details", None)
        if not isinstance(text, str) or details is None or getattr(details, "generated_tokens", None) is None:
            raise Transient("malformed answer: no generated_text/details in the body", kind="malformed")
        finish = "length" if details.finish_reason == "length" else "stop"
        if details.finish_reason == "stop_sequence":
            # TGI keeps the matched stop sequence at the end of the text; OpenAI-style APIs do not
            for s in req.stop:
                if s and text.endswith(s):
                    text = text[: -len(s)]
                    break
        prefill = getattr(details, "prefill", None) or []
        return GenResult(
            id=req.id,
            text=text,
            prompt_tokens=len(prefill) or estimate_tokens(prompt),
            completion_tokens=int(details.generated_tokens),
            finish_reason=finish,
            extra={"prompt_tokens_estimated": not prefill, "seed": getattr(details, "seed", None)},
        )



async def _drop_ambient_token(request: Any) -> None:
    request.headers.pop("authorization", None)
