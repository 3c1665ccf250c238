"""How a :class:`GenRequest` becomes the text or messages a backend sends.

Raw-prompt backends (TGI, OpenAI-compatible completions, the in-process model with a
``prompt_format``) fill the endpoint's ``prompt_format``: ``{system}`` and ``{user}`` are the only
placeholders, substituted in one pass so braces inside the texts (JSON, code) are left alone.

Where each text goes is the format's business, with two rules so that a system message is never
dropped or glued to the user text:

- a format without ``{system}`` (h2oGPT's ``<|prompt|>{user}<|endoftext|><|answer|>``, which has no
  system slot) gets the system text in front of the user text, separated by a blank line;
- a format that puts ``{system}`` directly before ``{user}`` with nothing between them gets the
  same blank line after a non-empty system text (and nothing when the system text is empty), so
  ``...Think step by step.Premise: ...`` cannot happen.

Chat backends send the system text in the API's own system slot (the ``system`` role, Anthropic's
``system`` parameter, the model's chat template), or merged as above when the endpoint says the
model has none (``system_prompt_supported: false``).
"""

from __future__ import annotations

import re

_PLACEHOLDER = re.compile(r"\{(system|user)\}")
SEPARATOR = "\n\n"


def merge_system(system: str | None, user: str) -> str:
    """The user text with the system text in front, for formats and APIs without a system slot."""
    if system and system.strip():
        return f"{system.strip()}{SEPARATOR}{user}"
    return user


def render_raw(prompt_format: str, system: str | None, user: str) -> str:
    """``prompt_format`` filled with the system and user texts (see the module docstring)."""
    if "{system}" not in prompt_format:
        values = {"user": merge_system(system, user)}
    else:
        sys_text = (system or "").strip()
        if sys_text and "{system}{user}" in prompt_format:
            # adjacent slots: keep the two texts apart (only where they touch)
            prompt_format = prompt_format.replace("{system}{user}", "{system}" + SEPARATOR + "{user}")
        values = {"system": sys_text, "user": user}
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
