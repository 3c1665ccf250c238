"""How a :class:`GenRequest` becomes the text or messages a backend sends.

Raw-prompt backends (TGI, OpenAI-compatible completions, the in-process model with a
``prompt_format``) fill the endpoint's ``prompt_format``: ``{system}`` and ``{user}`` are the only
placeholders, substituted in one pass so braces inside the texts (JSON, code) are left alone. A
format without ``{system}`` gets the system text in front of the user text, separated by a blank
line, so a system message is never silently dropped.
"""

from __future__ import annotations

import re

_PLACEHOLDER = re.compile(r"\{(system|user)\}")


def merge_system(system: str | None, user: str) -> str:
    """The user text with the system text in front, for formats and APIs without a system slot."""
    if system and system.strip():
        return f"{system.strip()}\n\n{user}"
    return user


def render_raw(prompt_format: str, system: str | None, user: str) -> str:
    if "{system}" in prompt_format:
        values = {"system": system or "", "user": user}
    else:
        values = {"user": merge_system(system, user)}
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), prompt_format)


def chat_messages(system: str | None, user: str, system_supported: bool = True) -> list[dict[str, str]]:
    if not (system and system.strip()):
        return [{"role": "user", "content": user}]
    if system_supported:
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return [{"role": "user", "content": merge_system(system, user)}]


def estimate_tokens(text: str) -> int:
    """A server-independent guess (about four characters per token in English) used for rate
    limits and the spending cap before the server has said how many tokens a request used."""
    return len(text) // 4 + 1
