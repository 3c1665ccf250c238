"""Errors that map onto the stage exit codes of the design.

Exit 0: committed. Exit 2: bad input (config, data, a model or task that does not exist): a retry
will not help. Any other non-zero code: a failure a retry may cure (network, 5xx, preemption).
"""

from __future__ import annotations

import json
from typing import Any

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_RETRYABLE = 3
EXIT_INTERRUPTED = 143  # 128 + SIGTERM, what a shell reports for a terminated process


class BezoarError(Exception):
    """Base class; ``exit_code`` is what the stage process exits with."""

    exit_code = EXIT_RETRYABLE


class BadInput(BezoarError):
    """Bad recipe, data, model or task: do not retry."""

    exit_code = EXIT_BAD_INPUT


class RetryableError(BezoarError):
    """A failure a retry may cure (network, server 5xx after all retries, a spending cap reached)."""

    exit_code = EXIT_RETRYABLE


class Interrupted(BezoarError):
    """The stage was asked to stop (SIGTERM); what could be saved was saved."""

    exit_code = EXIT_INTERRUPTED


def json_kind(value: Any) -> str:  # noqa: ANN401 - any value read from a data file or the run store
    """What a value is, in JSON's words, for an error message: ``null``, ``a boolean (true)``, ``a number (NaN)``,
    ``a string ("abc")``, ``a list``, ``an object`` (else its Python type: a parquet date, bytes)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str | int | float):
        text = json.dumps(value)
        what = "a string" if isinstance(value, str) else "a number"
        return f"{what} ({text[:40]}{'...' if len(text) > 40 else ''})"
    return type(value).__name__

