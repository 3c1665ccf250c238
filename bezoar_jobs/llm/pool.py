"""The engine every remote client shares: a continuous pool of requests in flight.

``RemoteClient.run`` starts an event loop in a worker thread. At most ``max_concurrency`` requests
are in flight at any moment and a new one starts as soon as one finishes (a semaphore around each
attempt, not batch-and-wait), so one long answer never holds up the others and the server's
decoding slots stay busy. Around every attempt:

* rate limits: token buckets for ``requests_per_minute`` and ``tokens_per_minute`` (a request is
  charged ``len(prompt)/4 + max_new_tokens`` up front, corrected by the server's usage afterwards);
* retries: 429, 5xx, timeouts, connection errors and malformed bodies are retried up to
  ``max_retries`` times after ``uniform(0, min(backoff_max_s, backoff_base_s * 2**k))`` seconds
  ("full jitter"); a ``Retry-After`` from the server is honoured, and also pauses every other new
  attempt until then (the server said it is saturated). A request waiting to retry gives its slot to
  another request;
* errors that a retry cannot cure: 401/403/404 mean every request would fail, so the whole run
  stops with ``BadInput``; 400/413/422 fail that one request (``GenResult.error``), unless the
  first several requests are all refused, which again means a configuration problem (``BadInput``);
* exhausted retries: the request gets ``GenResult.error``, except connection failures (the server is
  unreachable: ``RetryableError`` for the run, since no request can succeed);
* spending cap: with prices and ``spend_cap_usd``, a request starts only while the money spent plus
  the worst-case cost of everything in flight stays under the cap; when nothing more fits, no new
  request starts, the ones in flight finish and are delivered, then ``RetryableError`` is raised;
* draining: an ``on_result`` that raises :class:`~bezoar_jobs.llm.base.StopRequests` (the run store
  stopped taking records) works the same way: no new request or retry starts, the answers in flight
  are still delivered (they are paid for, and kept), then its error is raised.

Threads: ``on_result`` is always called in the thread that called ``run()``, one result at a
time; the event loop never waits for it, so a slow ``on_result`` (writing a part file to S3) does
not idle the pool. If ``on_result`` raises (e.g. the stage was asked to stop), requests in flight
are cancelled and the exception propagates from ``run()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import queue
import random
import sys
import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import BadInput, RetryableError
from ..recipe import Endpoint
from ..redact import redact, redact_known
from .base import GenRequest, GenResult, LLMClient, StopRequests, UsageTotals
from .ratelimit import TokenBucket
from .render import estimate_tokens

log = logging.getLogger("bezoar.llm")

# after this many refused (4xx) requests without a single success, the run stops as bad input
REFUSED_BEFORE_ANY_SUCCESS = 8


class Transient(Exception):
    """This attempt failed in a way a retry may cure. ``reason`` is redacted (it may carry a
    server's text, see :mod:`bezoar_jobs.redact`)."""

    def __init__(self, reason: str, *, kind: str = "server", retry_after: float | None = None,
                 status: int | None = None):
        reason = redact(reason)
        super().__init__(reason)
        self.reason = reason
        self.kind = kind  # server | rate | timeout | connection | malformed
        self.retry_after = retry_after
        self.status = status

    @property
    def cause(self) -> str:
        """The failure's cause, for counts by cause (``HTTP 503``, ``timeout``, ``connection``, ...)."""
        return f"HTTP {self.status}" if self.status is not None else self.kind


class Rejected(Exception):
    """The server refused this one request (400/413/422): a retry will not help, others may work."""

    def __init__(self, reason: str, status: int | None = None):
        reason = redact(reason)
        super().__init__(reason)
        self.status = status

    @property
    def cause(self) -> str:
        return f"HTTP {self.status} refused" if self.status is not None else "refused"


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
    if status == 429:
        return Transient(f"HTTP 429 rate limited: {short}", kind="rate", retry_after=retry_after, status=429)
    if status in (408, 409) or status >= 500:
        return Transient(f"HTTP {status}: {short}", kind="server", retry_after=retry_after, status=status)
    if status in (401, 403):
        return BadInput(f"{where}: HTTP {status} (authentication refused: {short}); check {key_hint}")
    if status == 404:
        return BadInput(f"{where}: HTTP 404 ({short}): wrong base_url or unknown model")
    return Rejected(f"HTTP {status}: {short}", status=status)


class RemoteClient(LLMClient):
    """A client that talks HTTP to a server; subclasses implement one request (``_send``)."""

    backend = "remote"

    def __init__(self, endpoint: Endpoint, api_key: str | None = None, role: str = "endpoint"):
        if endpoint.spend_cap_usd is not None and (
            endpoint.price_input_per_mtok is None or endpoint.price_output_per_mtok is None
        ):
            raise BadInput(f"{role}.spend_cap_usd needs {role}.price_input_per_mtok and {role}.price_output_per_mtok")
        self.endpoint = endpoint
        self.model_id = endpoint.model
        self.role = role
        for name in ("httpx", "httpx2"):
            # the SDKs' HTTP library logs every request at INFO: thousands of lines per stage.
            # Quiet it unless someone configured that logger on purpose
            lg = logging.getLogger(name)
            if lg.level == logging.NOTSET:
                lg.setLevel(logging.WARNING)
        self.usage = UsageTotals()
        self._api_key = api_key
        self.spent_usd = 0.0  # paid by this client (all runs)
        self.prior_spent_usd = 0.0  # paid before this process (CachedClient sets it from its cache)
        self.key_hint = (
            f"the key in ${endpoint.api_key_env}" if endpoint.api_key_env
            else f"the key in {endpoint.api_key_file}" if endpoint.api_key_file
            else f"{role}.api_key_env / {role}.api_key_file (no key is configured)"
        )

    def __repr__(self) -> str:  # never shows the key
        return f"{type(self).__name__}(model={self.model_id!r}, base_url={redact(self.endpoint.base_url)!r})"

    @property
    def where(self) -> str:
        url = redact(self.endpoint.base_url) if self.endpoint.base_url else "default URL"
        return f"{self.role} ({self.backend} {url}, model {self.model_id})"

    @property
    def cache_identity(self) -> dict[str, Any]:
        """What, besides the request, decides the answer: part of CachedClient's key."""
        e = self.endpoint
        # the endpoint too: two servers under one model name (a misconfigured proxy, a fixed base_url)
        # do not give the same answers
        return {"backend": self.backend, "base_url": e.base_url, "model": e.model, "revision": e.revision,
                "prompt_format": e.prompt_format, "system_prompt_supported": e.system_prompt_supported}

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return self.endpoint.cost(prompt_tokens, completion_tokens)

    # -- what a backend implements (all called on the pool's event loop) --------------------
    @abstractmethod
    def prompt_text(self, req: GenRequest) -> str:
        """The text sent as prompt (for token estimates)."""

    async def _open(self) -> None:
        """Create the SDK client: it binds to the running event loop."""

    async def _close(self) -> None:
        """Close what ``_open`` created: by default the SDK client kept in ``self._client``."""
        client = getattr(self, "_client", None)
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
            self._client = None

    @abstractmethod
    async def _send(self, req: GenRequest) -> GenResult:
        """One attempt. Raise Transient, Rejected or BadInput; return the result otherwise."""

    # -- the interface -----------------------------------------------------------------------
    def run(
        self, requests: Sequence[GenRequest], on_result: Callable[[GenResult], None], desc: str = "generate"
    ) -> None:
        if not requests:
            return
        _PoolRun(self, list(requests), on_result, desc).run()


@dataclass
class _Msg:
    kind: str  # result | retry | done
    result: GenResult | None = None
    error: BaseException | None = None


class _PoolRun:
    def __init__(
        self, client: RemoteClient, requests: list[GenRequest], on_result: Callable[[GenResult], None], desc: str
    ):
        self.client = client
        self.ep = client.endpoint
        self.requests = requests
        self.on_result = on_result
        self.desc = desc
        self.out: queue.Queue[_Msg] = queue.Queue()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None  # the first run-stopping error
        self.halted = False
        self.capped = False
        self.draining = False  # on_result asked to stop: no new attempt, deliver what is in flight
        self.unsent = 0
        self.successes = 0
        self.refused_streak = 0
        self.pause_until = 0.0
        self.reserved = 0.0
        self.tasks: set[asyncio.Task] = set()

    # ---------------------------------------------------------------- the caller's thread
    def run(self) -> None:
        from tqdm import tqdm

        started = time.monotonic()
        tty = sys.stderr.isatty()
        bar = tqdm(total=len(self.requests), desc=self.desc, unit="req", file=sys.stderr, dynamic_ncols=True,
                   mininterval=0.5 if tty else 15.0, smoothing=0.1)
        ready = threading.Event()
        thread = threading.Thread(target=self._thread_main, args=(ready,), name=f"bezoar-llm-{self.desc}", daemon=True)
        thread.start()
        usage = self.client.usage
        tokens = answered = failed = retries = 0
        error: BaseException | None = None
        stop: BaseException | None = None
        try:
            while True:
                try:
                    msg = self.out.get(timeout=0.5)  # a timeout keeps the thread responsive to signals
                except queue.Empty:
                    continue
                if msg.kind == "result":
                    assert msg.result is not None
                    usage.add(msg.result)
                    answered += 1
                    failed += 0 if msg.result.ok else 1
                    tokens += msg.result.completion_tokens
                    bar.update(1)
                    bar.set_postfix_str(f"{tokens / max(time.monotonic() - started, 1e-6):.0f} tok/s", refresh=False)
                    try:
                        self.on_result(msg.result)
                    except StopRequests as e:
                        if stop is None:
                            stop = e.error
                            ready.wait(10)
                            if self.loop is not None and not self.loop.is_closed():
                                with contextlib.suppress(RuntimeError):
                                    self.loop.call_soon_threadsafe(self._drain)
                elif msg.kind == "retry":
                    usage.retries += 1
                    retries += 1
                else:
                    error = msg.error
                    break
        except BaseException:
            ready.wait(10)
            if self.loop is not None and not self.loop.is_closed():
                try:
                    self.loop.call_soon_threadsafe(self._halt, None)
                except RuntimeError:  # the loop closed meanwhile: nothing left to stop
                    pass
            thread.join()
            raise
        finally:
            bar.close()
            usage.seconds += time.monotonic() - started
        thread.join()
        log.info("%s: %d answers (%d failed, %d retries), %d output tokens in %.1f s%s", self.desc, answered,
                 failed, retries, tokens, time.monotonic() - started,
                 f", ${self.client.spent_usd:.4f} spent" if self.ep.spend_cap_usd or self.ep.priced else "")
        if stop is not None:
            raise stop
        if error is not None:
            raise error

    def _thread_main(self, ready: threading.Event) -> None:
        try:
            asyncio.run(self._main(ready))
            self.out.put(_Msg("done", error=self.error))
        except BaseException as e:  # an unexpected error: hand it to the caller as is
            self.out.put(_Msg("done", error=self.error or e))
        finally:
            ready.set()

    # ---------------------------------------------------------------- the event loop's thread
    async def _main(self, ready: threading.Event) -> None:
        self.loop = asyncio.get_running_loop()
        ready.set()
        n = self.ep.max_concurrency
        self.inflight = asyncio.Semaphore(n)
        # live tasks (in flight, waiting for a slot, or sleeping before a retry): bounded so a
        # million requests do not become a million coroutines, loose enough that requests in
        # backoff never starve the in-flight slots
        live = asyncio.Semaphore(4 * n)
        self.budget_changed = asyncio.Event()
        self.rpm = (
            TokenBucket(self.ep.requests_per_minute / 60, self.ep.requests_per_minute / 60)
            if self.ep.requests_per_minute
            else None
        )
        self.tpm = (
            TokenBucket(self.ep.tokens_per_minute / 60, self.ep.tokens_per_minute / 60)
            if self.ep.tokens_per_minute
            else None
        )
        await self.client._open()
        try:
            for i, req in enumerate(self.requests):
                await live.acquire()
                if self.halted or self.capped or self.draining:
                    live.release()
                    self.unsent += len(self.requests) - i
                    break
                task = asyncio.create_task(self._one(req))
                self.tasks.add(task)

                def done(t: asyncio.Task) -> None:
                    self.tasks.discard(t)
                    live.release()
                    if not t.cancelled() and t.exception() is not None:  # a bug, not a server failure
                        self._halt(t.exception())

                task.add_done_callback(done)
            while self.tasks:
                await asyncio.wait(set(self.tasks))
        finally:
            for t in list(self.tasks):
                t.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            await self.client._close()
        if self.capped and self.error is None:
            e = self.ep
            self.error = RetryableError(
                f"{self.client.where}: spending cap reached "
                f"(${self.client.prior_spent_usd + self.client.spent_usd:.4f} "
                f"spent of spend_cap_usd ${e.spend_cap_usd}); {self.unsent} requests were not sent"
            )

    def _halt(self, error: BaseException | None) -> None:
        """Stop the run: remember the first error, cancel every live request but the caller."""
        if error is not None and self.error is None:
            self.error = error
        self.halted = True
        me = asyncio.current_task()
        for t in list(self.tasks):
            if t is not me:
                t.cancel()

    def _drain(self) -> None:
        """No new request or retry from now on; those in flight finish and are delivered."""
        self.draining = True
        self.budget_changed.set()

    def _deliver(self, res: GenResult) -> None:
        if res.text:  # a server that echoes the request into its answer must not put a key into our data
            res.text = redact_known(res.text)
        self.out.put(_Msg("result", res))

    async def _reserve(self, amount: float) -> bool:
        """Hold ``amount`` dollars of the cap for a request about to start; False: cap reached."""
        cap = self.ep.spend_cap_usd
        if cap is None:
            return True
        while True:
            if self.halted or self.capped or self.draining:
                return False
            spent = self.client.prior_spent_usd + self.client.spent_usd
            if spent + self.reserved + amount <= cap:
                self.reserved += amount
                return True
            if self.reserved <= 1e-12:  # nothing in flight will free money: we are done
                self.capped = True
                self.budget_changed.set()
                return False
            self.budget_changed.clear()
            await self.budget_changed.wait()

    def _settle(self, reserved: float, actual: float) -> None:
        """A request that held ``reserved`` of the cap ended, costing ``actual``."""
        self.client.spent_usd += actual
        if self.ep.spend_cap_usd is not None:
            self.reserved -= reserved
            self.budget_changed.set()

    async def _one(self, req: GenRequest) -> None:
        ep, client = self.ep, self.client
        est_in = estimate_tokens(client.prompt_text(req))
        est_total = est_in + req.max_new_tokens
        worst_cost = client.cost(est_in, req.max_new_tokens)
        attempt = 0
        while True:
            while (wait := self.pause_until - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            if self.draining:
                self.unsent += 1
                return
            if self.rpm:
                await self.rpm.take(1)
            if self.tpm:
                await self.tpm.take(est_total)
            if not await self._reserve(worst_cost):
                self.unsent += 1
                return
            failure: Transient
            try:
                async with self.inflight:
                    if self.halted or self.draining:
                        self._settle(worst_cost, 0.0)
                        self.unsent += 1
                        return
                    try:
                        async with asyncio.timeout(ep.timeout_s):
                            res = await client._send(req)
                    except TimeoutError:
                        raise Transient(f"no answer within timeout_s={ep.timeout_s:g}", kind="timeout") from None
            except Transient as e:
                failure = e
                self._settle(worst_cost, 0.0)
            except Rejected as e:
                self._settle(worst_cost, 0.0)
                self.refused_streak += 1
                if self.successes == 0 and self.refused_streak >= REFUSED_BEFORE_ANY_SUCCESS:
                    self._halt(BadInput(f"{client.where}: the first {self.refused_streak} requests were all refused "
                                        f"(last: {e}); check the endpoint settings and decoding parameters"))
                    return
                self._deliver(GenResult(id=req.id, text="", error=f"refused by the server: {e}", cause=e.cause))
                return
            except BadInput as e:
                self._settle(worst_cost, 0.0)
                self._halt(e)
                return
            except asyncio.CancelledError:
                self._settle(worst_cost, 0.0)
                raise
            else:
                actual = client.cost(res.prompt_tokens, res.completion_tokens)
                self._settle(worst_cost, actual)
                if self.tpm:
                    self.tpm.adjust(res.prompt_tokens + res.completion_tokens - est_total)
                self.successes += 1
                self.refused_streak = 0
                self._deliver(res)
                return
            attempt += 1
            if attempt > ep.max_retries:
                if failure.kind == "connection":
                    self._halt(
                        RetryableError(f"{client.where}: unreachable after {attempt} attempts: {failure.reason}")
                    )
                    return
                self._deliver(GenResult(id=req.id, text="", error=f"failed after {attempt} attempts: {failure.reason}",
                                        cause=failure.cause))
                return
            delay = random.uniform(0.0, min(ep.backoff_max_s, ep.backoff_base_s * 2 ** (attempt - 1)))
            if failure.retry_after is not None:
                delay = max(delay, failure.retry_after)
                self.pause_until = max(self.pause_until, time.monotonic() + failure.retry_after)
            log.debug("%s: request %s attempt %d failed (%s); retrying in %.2f s", self.desc, req.id, attempt,
                      failure.reason, delay)
            self.out.put(_Msg("retry"))
            await asyncio.sleep(delay)
