"""How busy can ANY client keep the scripted teacher under the fault mix? A simulation of an ideal one.

``.venv/bin/python bench/fault_bound.py [--requests 3000] [--runs 20]``

bench/generation_stages.py measures the real client. This asks what the best possible client could
reach on the same server under the same faults, so a figure short of a target can be told apart from
a target out of reach. The server is the benchmark's capacity model (``--capacity`` sequences decoding
at once, ``--per-token-ms`` per output token, answer lengths log-normal with median e**mu tokens, cut at
``--max-new-tokens``, the rest queued first come first served). The client is ideal: it costs no time,
keeps ``--concurrency`` requests at the server, sends a retry the moment it may (before any first
attempt), and knows at once that a request hangs (no deadline to wait for). Each attempt, as the
benchmark's server decides it at arrival: 10% 429 and 10% 503, each with ``Retry-After: 1`` (the
request may not be sent again for a second), 5% hang (sent again at once here), 1% malformed (decoded,
then sent again). One step per request (generate-orca's shape; a stage with dependent steps, LaMini's
lists or Evol's rounds, can only do worse).

Printed: the clean run's span and busy fraction, the faulted run's (mean, min, max over ``--runs``
seeds), and the faulted span over the clean one.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics


def simulate(n: int, capacity: int, concurrency: int, per_token_s: float, mu: float, sigma: float, cap_tokens: int,
             faults: bool, seed: int, retry_after_s: float = 1.0, short: int = 0,
             short_tokens: int = 8) -> dict[str, float]:
    """One run: ``n`` requests (``short`` of them ``short_tokens`` long, spread evenly: Evol's equality
    checks), the span and the busy fraction."""
    rng = random.Random(seed)
    lengths = [min(cap_tokens, max(1, round(math.exp(rng.gauss(mu, sigma))))) for _ in range(n)]
    for i in range(short):
        lengths[i * n // short] = short_tokens
    fresh = list(range(n))[::-1]  # a stack: pop() gives the next first attempt
    retry_ready: list[tuple[float, int]] = []  # (when it may be sent, request)
    slot_free = [0.0] * capacity  # when each decoding slot is next free (the server's FIFO schedule)
    answers: list[tuple[float, int, bool]] = []  # (answered at, request, ok) of attempts in flight
    t = 0.0
    in_flight = 0
    busy = 0.0
    last = 0.0
    done = 0
    while done < n:
        # send what may be sent now, retries first, while below the client's concurrency
        while in_flight < concurrency:
            if retry_ready and retry_ready[0][0] <= t:
                _, r = heapq.heappop(retry_ready)
            elif fresh:
                r = fresh.pop()
            else:
                break
            u = rng.random() if faults else 1.0
            if u < 0.20:  # 429 / 503 at arrival: back after Retry-After
                heapq.heappush(retry_ready, (t + retry_after_s, r))
                continue
            if u < 0.25:  # hangs: the ideal client sends it again at once
                fresh.append(r)
                continue
            start = max(t, heapq.heappop(slot_free))
            end = start + lengths[r] * per_token_s
            heapq.heappush(slot_free, end)
            busy += end - start
            heapq.heappush(answers, (end, r, u >= 0.26))  # 1% malformed: decoded, not usable
            in_flight += 1
        # the next event: an answer, or a retry becoming sendable
        nxt = [x for x in (answers[0][0] if answers else None,
                           retry_ready[0][0] if retry_ready and in_flight < concurrency else None) if x is not None]
        t = min(nxt)
        while answers and answers[0][0] <= t:
            end, r, ok = heapq.heappop(answers)
            in_flight -= 1
            last = max(last, end)
            if ok:
                done += 1
            else:
                heapq.heappush(retry_ready, (end, r))
    return {"span_s": last, "busy": busy / (capacity * last)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--capacity", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=48)
    ap.add_argument("--per-token-ms", type=float, default=2.0)
    ap.add_argument("--mu", type=float, default=4.0)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--retry-after", type=float, default=1.0, help="seconds a 429/503 holds its request back")
    ap.add_argument("--short", type=int, default=0, help="of the requests, this many 8 tokens long")
    a = ap.parse_args()
    print(json.dumps(bound(a.requests, a.runs, capacity=a.capacity, concurrency=a.concurrency,
                           per_token_s=a.per_token_ms / 1000, mu=a.mu, sigma=a.sigma, cap_tokens=a.max_new_tokens,
                           retry_after_s=a.retry_after, short=a.short)))


def bound(n: int, runs: int, **kw: float) -> dict[str, object]:
    """Clean and faulted runs of the ideal client over ``runs`` seeds: [mean, min, max] of each figure."""
    clean = [simulate(n, **kw, faults=False, seed=s) for s in range(runs)]  # type: ignore[arg-type]
    bad = [simulate(n, **kw, faults=True, seed=s) for s in range(runs)]  # type: ignore[arg-type]
    ratio = [b["span_s"] / c["span_s"] for b, c in zip(bad, clean, strict=True)]

    def summary(xs: list[float]) -> list[float]:
        return [round(statistics.mean(xs), 3), round(min(xs), 3), round(max(xs), 3)]

    return {"requests": n, "clean_span_s": summary([c["span_s"] for c in clean]),
            "clean_busy": summary([c["busy"] for c in clean]), "faults_span_s": summary([b["span_s"] for b in bad]),
            "faults_busy": summary([b["busy"] for b in bad]), "faults_over_clean": summary(ratio)}


if __name__ == "__main__":
    main()
