"""Anthropic's Messages API through the ``anthropic`` package's ``AsyncAnthropic``.

The system text goes in the top-level ``system`` parameter, the user text as the one user message.
``base_url`` is the API root (``https://api.anthropic.com``, without ``/v1``); absent, the SDK's
default. The SDK's own retries are off: the pool retries.

Decoding: the installed SDK no longer lists ``temperature``/``top_p`` as arguments, but the API
(and the older models the paper used, e.g. Claude 2.1 as MT-Bench judge) read them from the body,
so they are sent there (``top_p`` only when below 1: newer models refuse both at once). The
Messages API has no seed: ``GenRequest.seed`` cannot be honoured here, and a judge at temperature 0
is the closest to reproducible this API offers.
"""

from __future__ import annotations

import json
from typing import Any

from ..recipe import Endpoint
from .base import GenRequest, GenResult
from .faults import Transient, classify_status
from .pool import RemoteClient
from .render import merge_system


class AnthropicClient(RemoteClient):
    backend = "anthropic"

    def __init__(self, endpoint: Endpoint, api_key: str | None = None, role: str = "endpoint"):
        super().__init__(endpoint, api_key, role)
        self._client: Any = None

    def _parts(self, req: GenRequest) -> tuple[str | None, str]:
        if req.system and req.system.strip() and self.endpoint.system_prompt_supported:
            return req.system, req.user
        return None, merge_system(req.system, req.user)

    def prompt_text(self, req: GenRequest) -> str:
        system, user = self._parts(req)
        return f"{system}\n\n{user}" if system else user

    async def _open(self) -> None:
        import anthropic

        self._client = anthropic.AsyncAnthropic(api_key=self._api_key or "no-key", base_url=self.endpoint.base_url,
                                                max_retries=0, timeout=self.endpoint.timeout_s)

    async def _send(self, req: GenRequest) -> GenResult:
        import anthropic

        system, user = self._parts(req)
        kw: dict[str, Any] = {"model": self.model_id, "max_tokens": req.max_new_tokens,
                              "messages": [{"role": "user", "content": user}]}
        if system:
            kw["system"] = system
        if req.stop:
            kw["stop_sequences"] = list(req.stop)
        body: dict[str, Any] = {"temperature": req.temperature}
        if req.top_p < 1.0:
            body["top_p"] = req.top_p
        kw["extra_body"] = body
        try:
            resp = await self._client.messages.create(**kw)
        except anthropic.APITimeoutError:
            raise Transient("timed out", kind="timeout") from None
        except anthropic.APIConnectionError as e:
            raise Transient(f"connection failed: {e.__cause__ or e}", kind="connection") from None
        except anthropic.APIStatusError as e:
            raise classify_status(e.status_code, e.message, e.response.headers, self.where, self.key_hint) from None
        except anthropic.APIResponseValidationError as e:
            raise Transient(f"malformed answer: {e}", kind="malformed") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Transient(f"malformed answer (not JSON): {e}", kind="malformed") from None
        blocks = getattr(resp, "content", None)
        usage = getattr(resp, "usage", None)
        p, c = getattr(usage, "input_tokens", None), getattr(usage, "output_tokens", None)
        if not isinstance(blocks, list) or not isinstance(p, int) or not isinstance(c, int):
            raise Transient("malformed answer: no content blocks / usage in the body", kind="malformed")
        text = "".join(getattr(b, "text", "") or "" for b in blocks if getattr(b, "type", None) == "text")
        return GenResult(id=req.id, text=text, prompt_tokens=p, completion_tokens=c,
                         finish_reason="length" if resp.stop_reason == "max_tokens" else "stop")
