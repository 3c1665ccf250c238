"""Teacher and judge clients behind one interface (:mod:`bezoar_jobs.llm.base`).

``make_client(endpoint)`` builds the client a recipe endpoint names; ``CachedClient`` wraps one so
a rerun never pays for the same answer twice. Everything but the small interface is imported on
first use, so importing this package pulls in neither torch/transformers nor the HTTP SDKs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import GenRequest, GenResult, LLMClient, UsageTotals

if TYPE_CHECKING:
    from .cache import CachedClient
    from .factory import make_client

__all__ = ["CachedClient", "GenRequest", "GenResult", "LLMClient", "UsageTotals", "make_client"]

_LAZY = {"make_client": ".factory", "CachedClient": ".cache"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
