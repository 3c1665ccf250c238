"""Secrets are never printed: the one redactor every message we relay from a server passes through.

A server can put anything in an error body, including the ``Authorization`` header it received (some
gateways and debug proxies echo the request back). Everything that carries text we did not write
ourselves (an HTTP error's body, an SDK's exception text, a store's error, a traceback) passes
through :func:`redact` before it reaches a log line, an exception message, a record, a manifest or
a report. It removes

- the *configured* secrets: every API key the clients resolved (:func:`register`, called by
  ``llm.keys``) and the values of the environment variables that hold credentials by convention
  (:data:`SECRET_ENV`, and any variable whose name ends in ``_API_KEY``, ``_TOKEN``, ``_SECRET``,
  ``_PASSWORD`` or ``_SECRET_ACCESS_KEY``);
- anything *shaped* like a credential: ``Bearer``/``Basic`` tokens, ``Authorization``/``x-api-key``
  style headers, ``api_key=``/``"token": "..."`` pairs, provider key formats (OpenAI/Anthropic
  ``sk-...``, Hugging Face ``hf_...``, AWS access key ids, GitHub and Slack tokens, Google API keys),
  the user:password part of a URL.

The CLI installs :class:`RedactingFormatter` on its log handler, so even a message that skipped
redaction at its source is redacted before it is printed (defence in depth); the local executor
redacts the stage output it relays. This module imports nothing but the standard library.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Mapping

MASK = "***"

# environment variables that hold a credential by convention (their values are always redacted)
SECRET_ENV: tuple[str, ...] = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
    "WANDB_API_KEY",
)
_SECRET_SUFFIXES = ("_API_KEY", "_TOKEN", "_SECRET", "_PASSWORD", "_SECRET_ACCESS_KEY", "_APIKEY")
# shorter configured values are not redacted (they would mask ordinary words); keys are longer
MIN_SECRET_LEN = 6

_lock = threading.Lock()
_secrets: set[str] = set()

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # header lines and header-like pairs: "Authorization: Bearer x", 'x-api-key': 'x', "cookie=..."
    (re.compile(r"(?i)\b((?:proxy-)?authorization|x-api-key|api-key|x-goog-api-key|x-amz-security-token|"
                r"cookie|set-cookie)(['\"]?\s*[:=]\s*['\"]?)[^'\"\r\n,}]+"), r"\1\2" + MASK),
    # a scheme and a credential: "Bearer abc...", "Basic dXNlcjpw..."
    (re.compile(r"(?i)\b(bearer)(\s+)[A-Za-z0-9._~+/=-]{6,}"), r"\1\2" + MASK),
    (re.compile(r"\b(Basic)(\s+)[A-Za-z0-9+/]{8,}={0,2}"), r"\1\2" + MASK),
    # key/value pairs in JSON, query strings, form bodies, Python reprs
    (re.compile(r"(?i)(['\"]?\b(?:api[_-]?key|access[_-]?token|refresh[_-]?token|auth[_-]?token|client[_-]?secret|"
                r"secret[_-]?access[_-]?key|secret|password|passwd|token|sig|signature)['\"]?\s*[:=]\s*['\"]?)"
                r"[^'\"\s,&}\]]{4,}"), r"\1" + MASK),
    # provider key formats
    (re.compile(r"\bsk-(?:ant-|proj-)?[A-Za-z0-9_-]{16,}"), MASK),
    (re.compile(r"\bhf_[A-Za-z0-9]{16,}"), MASK),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), MASK),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"), MASK),
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), MASK),
    (re.compile(r"\bAIza[0-9A-Za-z_-]{35}"), MASK),
    # user:password@ in a URL
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"]+@"), r"\1" + MASK + "@"),
)


def register(value: str | None) -> None:
    """Redact ``value`` from every later message (an API key the process resolved)."""
    if value is None:
        return
    v = value.strip()
    if len(v) >= MIN_SECRET_LEN:
        with _lock:
            _secrets.add(v)


def register_env(env: Mapping[str, str] | None = None) -> None:
    """Register the credentials the environment holds by convention (see the module docstring)."""
    env = os.environ if env is None else env
    for name, value in env.items():
        if name in SECRET_ENV or name.upper().endswith(_SECRET_SUFFIXES):
            register(value)


def known() -> list[str]:
    """The registered secrets, longest first (a key that contains another is masked whole)."""
    with _lock:
        return sorted(_secrets, key=len, reverse=True)


def redact_known(text: str) -> str:
    """Only the registered secrets (for texts that are data, e.g. an answer a server echoed a key into:
    the shape patterns would also mask legitimate words there)."""
    for s in known():
        if s in text:
            text = text.replace(s, MASK)
    return text


def redact(text: object) -> str:
    """``text`` (any object, as ``str``) without registered secrets or anything shaped like one."""
    out = redact_known(str(text))
    for rx, repl in _PATTERNS:
        out = rx.sub(repl, out)
    return out


class RedactingFormatter(logging.Formatter):
    """A log formatter whose output (message, arguments and traceback) passes through :func:`redact`."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def install(handler: logging.Handler | None = None) -> None:
    """Redact what ``handler`` (default: every handler of the root logger) prints."""
    handlers = [handler] if handler is not None else logging.getLogger().handlers
    for h in handlers:
        fmt = h.formatter
        new = RedactingFormatter(fmt._fmt if fmt else None, fmt.datefmt if fmt else None)
        h.setFormatter(new)
