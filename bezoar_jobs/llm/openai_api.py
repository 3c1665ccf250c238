"""OpenAI-compatible servers through the ``openai`` package's ``AsyncOpenAI``.

* ``openai-completions``: ``/v1/completions`` with the raw prompt rendered from ``prompt_format``
  (vLLM, SGLang serving a teacher).
* ``openai-chat``: ``/v1/chat/completions`` with system + user messages (GPT-4-class judges; any
  server that applies its own chat template).

``base_url`` includes the ``/v1`` suffix (``http://vllm:8000/v1``); absent, the SDK's default
(api.openai.com) is used. The SDK's own retries are off (``max_retries=0``): the pool retries, with
one policy for every backend. The seed is sent with every request. ``repetition_penalty`` is not an
OpenAI parameter: it goes in the body as vLLM/SGLang read it, only when the recipe sets it.
"""

from __future__ import annotations

import json
from typing import Any

from ..recipe import Endpoint
from .base import GenRequest, GenResult
from .faults import Transient, classify_status
from .fleet import REPLICA
from .pool import RemoteClient
from .render import chat_messages, render_raw


class _OpenAIBase(RemoteClient):
    def __init__(self, endpoint: Endpoint, api_key: str | None = None, role: str = "endpoint"):
        super().__init__(endpoint, api_key, role)
        self._client: Any = None
        self._replicas: dict[str, Any] = {}

    async def _open(self) -> None:
        import openai

        # a placeholder key when none is configured (local vLLM without auth): the SDK refuses
        # to start without one, and must not pick up an ambient OPENAI_API_KEY by itself
        self._client = openai.AsyncOpenAI(api_key=self._api_key or "no-key", base_url=self.endpoint.base_url,
                                          max_retries=0, timeout=self.endpoint.timeout_s)

    def _common(self, req: GenRequest) -> dict[str, Any]:
        kw: dict[str, Any] = {"model": self.model_id, "temperature": req.temperature, "top_p": req.top_p}
        if req.seed is not None:
            kw["seed"] = req.seed
        if req.stop:
            kw["stop"] = list(req.stop)
        if req.repetition_penalty is not None:
            kw["extra_body"] = {"repetition_penalty": req.repetition_penalty}
        return kw

    async def _call(self, fn: Any, **kw: Any) -> Any:
        import openai

        try:
            return await fn(**kw)
        except openai.APITimeoutError:
            raise Transient("timed out", kind="timeout") from None
        except openai.APIConnectionError as e:
            raise Transient(f"connection failed: {e.__cause__ or e}", kind="connection") from None
        except openai.APIStatusError as e:
            raise classify_status(e.status_code, e.message, e.response.headers, self.where, self.key_hint) from None
        except openai.APIResponseValidationError as e:
            raise Transient(f"malformed answer: {e}", kind="malformed") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Transient(f"malformed answer (not JSON): {e}", kind="malformed") from None

    @staticmethod
    def _usage(resp: Any) -> tuple[int, int]:
        usage = getattr(resp, "usage", None)
        p = getattr(usage, "prompt_tokens", None)
        c = getattr(usage, "completion_tokens", None)
        if not isinstance(p, int) or not isinstance(c, int):
            raise Transient("malformed answer: no usage token counts", kind="malformed")
        return p, c

    @staticmethod
    def _finish(reason: Any) -> str:
        return "length" if reason == "length" else "stop"


class OpenAICompletionsClient(_OpenAIBase):
    backend = "openai-completions"
    fleet_capable = True

    async def _close(self) -> None:
        for c in self._replicas.values():
            await c.close()
        self._replicas.clear()
        await super()._close()

    def _for_replica(self) -> Any:
        """The SDK client of the replica this attempt goes to (llm/fleet.py), else the base URL's."""
        url = REPLICA.get()
        if url is None:
            return self._client
        if url not in self._replicas:
            import openai

            self._replicas[url] = openai.AsyncOpenAI(api_key=self._api_key or "no-key", base_url=url, max_retries=0,
                                                     timeout=self.endpoint.timeout_s)
        return self._replicas[url]

    def prompt_text(self, req: GenRequest) -> str:
        assert self.endpoint.prompt_format is not None
        return render_raw(self.endpoint.prompt_format, req.system, req.user)

    async def _send(self, req: GenRequest) -> GenResult:
        resp = await self._call(self._for_replica().completions.create, prompt=self.prompt_text(req),
                                max_tokens=req.max_new_tokens, **self._common(req))
        choices = getattr(resp, "choices", None)
        if not choices or not isinstance(getattr(choices[0], "text", None), str):
            raise Transient("malformed answer: no choices[0].text", kind="malformed")
        p, c = self._usage(resp)
        return GenResult(id=req.id, text=choices[0].text, prompt_tokens=p, completion_tokens=c,
                         finish_reason=self._finish(choices[0].finish_reason))


class OpenAIChatClient(_OpenAIBase):
    backend = "openai-chat"

    def messages(self, req: GenRequest) -> list[dict[str, str]]:
        return chat_messages(req.system, req.user, self.endpoint.system_prompt_supported)

    def prompt_text(self, req: GenRequest) -> str:
        return "\n\n".join(m["content"] for m in self.messages(req))

    async def _send(self, req: GenRequest) -> GenResult:
        # max_completion_tokens: what current OpenAI models require (max_tokens is refused by
        # the newer ones); vLLM and SGLang accept it too
        resp = await self._call(self._client.chat.completions.create, messages=self.messages(req),
                                max_completion_tokens=req.max_new_tokens, **self._common(req))
        choices: Any = getattr(resp, "choices", None)
        message = getattr(choices[0], "message", None) if choices else None
        text = getattr(message, "content", None)
        if not isinstance(text, str):
            raise Transient("malformed answer: no choices[0].message.content", kind="malformed")
        p, c = self._usage(resp)
        return GenResult(id=req.id, text=text, prompt_tokens=p, completion_tokens=c,
                         finish_reason=self._finish(choices[0].finish_reason))
