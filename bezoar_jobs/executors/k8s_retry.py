"""Riding out API-server outages: every call the controller makes is retried with backoff while the
failure is one a later attempt can cure (connection refused or reset, a timeout, 429, 5xx), for up to
``controller.apiOutageToleranceSeconds`` (15 minutes by default: a control-plane upgrade or an etcd
leader election takes minutes, not seconds). Past that the call raises
:class:`~bezoar_jobs.errors.RetryableError`, the controller exits with the retryable code, and its
Job's next pod adopts the run's Jobs. Refusals (401, 403, 404, 409, 422) are never retried here:
the caller decides what they mean.

The stage Jobs do not need the controller while it waits: the kubelets and the Job controller keep
running them, and the watches resume from their last resourceVersion once the server answers again.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import RetryableError

T = TypeVar("T")

RETRY_STATUS = frozenset({0, 408, 429, 500, 502, 503, 504})
REPORT_EVERY_S = 30.0


def transient(e: BaseException) -> bool:
    """Whether another attempt may succeed (the server was unreachable or said "later")."""
    from .k8s_api import api_exception

    if isinstance(e, api_exception()):
        return getattr(e, "status", None) in RETRY_STATUS or getattr(e, "status", None) is None
    try:
        from urllib3.exceptions import HTTPError as Urllib3Error
    except ImportError:  # pragma: no cover - urllib3 comes with the kubernetes client
        Urllib3Error = OSError  # type: ignore[misc,assignment]
    return isinstance(e, Urllib3Error | OSError | TimeoutError)


class ApiRetry:
    """``call(what, fn, *args)``: ``fn(*args)`` with retries over an outage (see the module docstring)."""

    def __init__(self, tolerance_s: float, say: Callable[[str], None], stop: threading.Event | None = None,
                 base_s: float = 0.5, cap_s: float = 30.0):
        self.tolerance_s = tolerance_s
        self.say = say
        self.stop = stop or threading.Event()
        self.base_s = base_s
        self.cap_s = cap_s
        self._lock = threading.Lock()
        self._last_report = 0.0
        self.outages = 0  # calls that needed at least one retry (tests and the log read it)

    def delay(self, attempt: int) -> float:
        """Exponential backoff with jitter, capped."""
        return min(self.cap_s, self.base_s * 2**attempt) * random.uniform(0.5, 1.0)

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        first: float | None = None
        attempt = 0
        while True:
            try:
                result = fn(*args, **kwargs)
            except Exception as e:
                if not transient(e):
                    raise
                now = time.monotonic()
                if first is None:
                    first = now
                    with self._lock:
                        self.outages += 1
                down = now - first
                if down > self.tolerance_s or self.stop.is_set():
                    raise RetryableError(f"the Kubernetes API server did not answer {what} for {down:.0f} s "
                                         f"(tolerance {self.tolerance_s:.0f} s): {type(e).__name__}: {e}") from None
                self._report(f"API server not answering ({what}: {type(e).__name__}); retrying for up to "
                             f"{self.tolerance_s - down:.0f} s more")
                self.stop.wait(self.delay(attempt))
                attempt += 1
                continue
            if first is not None:
                self.say(f"API server answers again ({what}) after {time.monotonic() - first:.0f} s")
            return result

    def _report(self, msg: str) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last_report < REPORT_EVERY_S:
                return
            self._last_report = now
        self.say(msg)
