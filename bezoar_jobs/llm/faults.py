"""How a remote client's attempt failed, and what the pool does about it: :class:`Transient`
(a retry may cure it), :class:`Rejected` (this one request is refused), and the mapping of an HTTP
status (and its ``Retry-After``) onto them. Every server text is redacted before it is kept."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping

from ..errors import BadInput
from ..redact import redact


class Transient(Exception):
    """This attempt failed in a way a retry may cure. ``reason`` is redacted (it may carry a
    server's text, see :mod:`bezoar_jobs.redact`)."""

    def __init__(self, reason: str, *, kind: str = "server", retry_after: float | None = None,
                 status: int | None = None):
        reason = redact(reason)
        super().__init__(reason)
        self.reason = reason
        self.kind = kind  # server | rate | overloaded | timeout | connection | malformed
        self.retry_after = retry_after
        self.status = status
        self.replica: str | None = None  # the fleet replica that failed it (llm/fleet.py), when there is one

    @property
    def cause(self) -> str:
        """The failure's cause, for counts by cause (``HTTP 503``, ``timeout``, ``connection``, ...)."""
        return f"HTTP {self.status}" if self.status is not None else self.kind


class Rejected(Exception):
    """The server refused this one request (400/413/422, TGI's validation errors and vLLM's too-long prompt
    among them): a retry will not help, others may work."""

    def __init__(self, reason: str, status: int | None = None):
        reason = redact(reason)
        super().__init__(reason)
        self.status = status

    @property
    def cause(self) -> str:
        return f"HTTP {self.status} refused" if self.status is not None else "refused"


def is_refusal(cause: str) -> bool:
    """Whether a failure's cause (:attr:`Rejected.cause`, or stages/common.py ``cause_of`` of its text) is the
    server's refusal of the request as sent: sent again, it would be refused again."""
    return cause.endswith("refused")


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def classify_status(
    status: int, message: str, headers: Mapping[str, str] | None, where: str, key_hint: str
) -> Exception:
    """Map an HTTP error status onto what the pool does with it. The server's ``message`` is
    relayed only after redaction (a server may echo the request's headers, the key included)."""
    retry_after = parse_retry_after(headers)
    short = redact(" ".join(redact(message).split()))[:300]
    if status == 429 and ("insufficient_quota" in message or "exceeded your current quota" in message.lower()):
        # OpenAI's used-up quota (error code insufficient_quota, "You exceeded your current quota, please check your
        # plan and billing details"): not a rate limit, no wait brings it back; retried, every request failed slowly
        return BadInput(f"{where}: HTTP 429 (the account's quota is used up: {short}); retrying will not help: "
                        "check the plan and billing of the key's account")
    if status == 429:
        # TGI's own refusal past --max-concurrent-requests ({"error_type": "overloaded"}): too many at once from
        # everyone calling it, which the pool answers by sending fewer (llm/pool.py), not only by waiting
        kind = "overloaded" if "overloaded" in message.lower() else "rate"
        return Transient(f"HTTP 429 rate limited: {short}", kind=kind, retry_after=retry_after, status=429)
    if status in (408, 409) or status >= 500:
        return Transient(f"HTTP {status}: {short}", kind="server", retry_after=retry_after, status=status)
    if status == 424:
        # TGI's InferError::GenerationError ("Request failed during generation: ...", error_type "generation"):
        # the shard failed the whole batch this request was decoding in (backends/v3/src/backend.rs send_errors,
        # e.g. CUDA out of memory), not a refusal of this request; TGI goes on serving, so a retry may answer it
        return Transient(f"HTTP 424 generation failed: {short}", kind="server", retry_after=retry_after, status=424)
    if status in (401, 403):
        return BadInput(f"{where}: HTTP {status} (authentication refused: {short}); check {key_hint}")
    if status == 404:
        return BadInput(f"{where}: HTTP 404 ({short}): wrong base_url or unknown model")
    return Rejected(f"HTTP {status}: {short}", status=status)
