"""``make_client(endpoint)``: the one place that turns a recipe endpoint into a client.

Backend modules are imported here, inside the function, so importing ``bezoar_jobs.llm`` stays
light (no torch, transformers or HTTP SDKs): the Kubernetes controller imports recipe code
without any of them installed.
"""

from __future__ import annotations

from ..errors import BadInput
from ..recipe import Endpoint
from .base import LLMClient
from .keys import resolve_api_key


def make_client(endpoint: Endpoint, role: str = "endpoint") -> LLMClient:
    """Build the client for ``endpoint``; ``role`` ("teacher", "judge") names it in error messages.

    The local backend loads its model here (it may take a while); remote clients connect lazily on
    their first ``run``.
    """
    backend = endpoint.backend
    if backend == "local":
        from .local import LocalClient

        return LocalClient(endpoint, role=role)
    key = resolve_api_key(endpoint, role)
    if backend == "tgi":
        from .tgi import TGIClient

        return TGIClient(endpoint, key, role)
    if backend == "openai-completions":
        from .openai_api import OpenAICompletionsClient

        return OpenAICompletionsClient(endpoint, key, role)
    if backend == "openai-chat":
        from .openai_api import OpenAIChatClient

        return OpenAIChatClient(endpoint, key, role)
    if backend == "anthropic":
        from .anthropic_api import AnthropicClient

        return AnthropicClient(endpoint, key, role)
    raise BadInput(f"{role}.backend: unknown backend {backend!r}")
