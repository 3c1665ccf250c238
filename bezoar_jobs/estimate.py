"""The pieces ``bezoar plan``'s request estimates are made of (each stage module estimates its own).

Figures are computed from the recipe alone: request counts from its counts, completion tokens at
each request's ``max_new_tokens``, prompt sizes from the template lengths at about four characters
a token, so a user can price a run before paying for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import BadInput
from .recipe_base import Decoding, Endpoint

CHARS_PER_TOKEN = 4
TYPICAL_INSTRUCTION_TOKENS = 40  # a seed or generated instruction, for prompt-size estimates


@dataclass(frozen=True)
class Ask:
    """``requests`` requests to ``endpoint`` of about ``prompt_tokens`` each, decoded with ``decoding``."""

    endpoint: Endpoint
    requests: int
    prompt_tokens: int
    decoding: Decoding

    @property
    def completion_tokens(self) -> int:
        return self.requests * self.decoding.max_new_tokens


def template_tokens(uri: str) -> int:
    """A template file's length in tokens (100 when it cannot be read here)."""
    from .data.io import read_text_uri

    try:
        return len(read_text_uri(uri)) // CHARS_PER_TOKEN
    except BadInput:
        return 100
