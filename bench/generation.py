"""Generation-client benchmark: does the continuous pool keep a teacher server's decoding busy?

The teacher is tests/llm_server.py run as its own process (so the server's event loop does not
share a GIL with the client) with a capacity model: at most ``--capacity`` sequences decode at
once, each output token takes ``--per-token-ms``, extra requests queue in the server, and answer
lengths are log-normal (median e**mu tokens, a long tail cut at ``--max-new-tokens``), fixed per
prompt. The client is the real TGI client behind our pool.

Measured on the server side:
* busy fraction = decoding slot-seconds used / (capacity x wall time), over the whole run (first
  request in to last answer out) and over the part of the run while work was still queued (until
  the last request started decoding: after that, the tail of long answers drains with idle slots
  that no client could fill);
* speed-up over a sequential client (one request at a time), measured on the first
  ``--seq-sample`` prompts and extrapolated to the full set as ``a * requests + per_token * tokens``,
  with the per-request overhead ``a`` taken from the sample (decode time is known exactly from the
  server's token counts, so the long tail is accounted for rather than guessed from a small sample).

Run: ``.venv/bin/python bench/generation.py`` (defaults: 5,000 requests, capacity 32, 2 ms/token,
client concurrency 48). It prints the figures and writes them to docs/benchmarks.md under
"## Generation client", replacing only that section.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bezoar_jobs.llm import GenRequest, GenResult, make_client  # noqa: E402
from bezoar_jobs.recipe import Endpoint  # noqa: E402

SECTION = "## Generation client"


def start_server(a: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, str(REPO / "tests" / "llm_server.py"), "--capacity", str(a.capacity),
           "--per-token-ms", str(a.per_token_ms), "--longtail", "--mu", str(a.mu), "--sigma", str(a.sigma)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.match(r"PORT (\d+)", line)
    if not m:
        proc.terminate()
        raise RuntimeError(f"the test server did not start: {line!r}")
    return proc, f"http://127.0.0.1:{m.group(1)}"


def control(url: str, route: str, method: str = "GET") -> dict:
    req = urllib.request.Request(url + route, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def run_client(
    url: str, concurrency: int, reqs: list[GenRequest], desc: str, batch_and_wait: bool = False
) -> tuple[float, list[GenResult]]:
    """Run ``reqs`` through the pool; ``batch_and_wait``: the naive alternative, one ``run`` call
    per ``concurrency`` requests, each waiting for its slowest answer before the next starts."""
    ep = Endpoint(
        backend="tgi",
        model="bench/teacher",
        base_url=url,
        prompt_format="<|prompt|>{user}<|answer|>",
        max_concurrency=concurrency,
        timeout_s=120,
    )
    client = make_client(ep, role="teacher")
    out: list[GenResult] = []
    control(url, "/_reset", "POST")
    t0 = time.monotonic()
    step = concurrency if batch_and_wait else len(reqs)
    for i in range(0, len(reqs), step):
        client.run(reqs[i : i + step], out.append, desc=desc)
    wall = time.monotonic() - t0
    bad = [r for r in out if not r.ok]
    if bad or len(out) != len(reqs):
        raise RuntimeError(f"{desc}: {len(bad)} failed, {len(out)}/{len(reqs)} answered: {bad[:1]}")
    return wall, out


def write_section(path: Path, body: str, section: str = SECTION) -> None:
    text = (
        path.read_text()
        if path.exists()
        else "# Benchmarks\n\nFigures measured by the scripts in bench/; each section names the command that "
        "produced it.\n"
    )
    block = f"{section}\n\n{body.strip()}\n"
    start = text.find(section + "\n")
    if start < 0:
        text = text.rstrip() + "\n\n" + block
    else:
        nxt = text.find("\n## ", start + len(section))
        text = text[:start] + block + (text[nxt:] if nxt >= 0 else "")
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "stages":
        from generation_stages import main as stages_main  # bench/generation_stages.py

        stages_main(argv[1:])
        return
    ap = argparse.ArgumentParser(description="continuous-pool generation benchmark against the scripted server")
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--capacity", type=int, default=32, help="server: sequences decoding at once")
    ap.add_argument("--per-token-ms", type=float, default=2.0, help="server: time per output token")
    ap.add_argument("--mu", type=float, default=4.0, help="log-normal answer length: median e**mu tokens")
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--concurrency", type=int, default=48, help="client: max_concurrency")
    ap.add_argument("--seq-sample", type=int, default=150, help="requests in the sequential sample")
    ap.add_argument("--batch-sample", type=int, default=640, help="requests in the batch-and-wait comparison")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    ap.add_argument("--no-write", action="store_true", help="print only")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    load = os.getloadavg()[0]
    reqs = [GenRequest(id=f"r{i}", user=f"Benchmark prompt {i}: write something.", max_new_tokens=a.max_new_tokens,
                       temperature=0.7, seed=i) for i in range(a.requests)]
    proc, url = start_server(a)
    try:
        wall, out = run_client(url, a.concurrency, reqs, "concurrent")
        stats = control(url, "/_stats")
        seq_n = min(a.seq_sample, a.requests)
        seq_wall, seq_out = run_client(url, 1, reqs[:seq_n], "sequential sample")
        seq_stats = control(url, "/_stats")
        batch_n = min(a.batch_sample, a.requests)
        batch_wall, _ = run_client(url, a.capacity, reqs[:batch_n], "batch-and-wait", batch_and_wait=True)
        batch_stats = control(url, "/_stats")
    finally:
        proc.terminate()
        proc.wait(10)

    tokens = sum(r.completion_tokens for r in out)
    seq_tokens = sum(r.completion_tokens for r in seq_out)
    per_token = a.per_token_ms / 1000
    overhead = max(0.0, (seq_wall - per_token * seq_tokens) / seq_n)  # per request, besides decoding
    seq_est = overhead * a.requests + per_token * tokens
    ideal = per_token * tokens / a.capacity
    lengths = sorted(r.completion_tokens for r in out)
    fig = {
        "requests": a.requests,
        "output_tokens": tokens,
        "median_tokens": lengths[len(lengths) // 2],
        "p99_tokens": lengths[int(len(lengths) * 0.99)],
        "max_tokens": lengths[-1],
        "wall_s": wall,
        "ideal_s": ideal,
        "req_per_s": a.requests / wall,
        "tok_per_s": tokens / wall,
        "busy_fraction": stats["busy_fraction"],
        "busy_fraction_while_queued": stats["busy_fraction_until_last_start"],
        "server_max_in_flight": stats["max_in_flight"],
        "seq_sample": seq_n,
        "seq_sample_s": seq_wall,
        "seq_overhead_ms": overhead * 1000,
        "seq_estimate_s": seq_est,
        "speedup": seq_est / wall,
        "seq_server_max_in_flight": seq_stats["max_in_flight"],
        "batch_sample": batch_n,
        "batch_sample_s": batch_wall,
        "batch_busy_fraction": batch_stats["busy_fraction"],
    }
    print(json.dumps(fig, indent=1))
    command = " ".join(
        [".venv/bin/python", "bench/generation.py"]
        + [shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])]
    )
    cpu = f"{os.cpu_count()} CPU cores, Python {platform.python_version()}, load average {load:.1f} at the start"
    body = f"""
Measured {time.strftime("%Y-%m-%d")}; command: `{command}` ({cpu}: the machine was shared with other
work; client and server on it, the server in its own process).

Setup: the scripted TGI-compatible server (tests/llm_server.py) with a capacity model of {a.capacity}
sequences decoding at once, {a.per_token_ms:g} ms per output token, extra requests queued; answer
lengths log-normal (median e^{a.mu:g} tokens, sigma {a.sigma:g}, cut at {a.max_new_tokens}): median
{fig["median_tokens"]}, p99 {fig["p99_tokens"]}, max {fig["max_tokens"]} tokens. Client: `backend: tgi`
(llm/tgi.py) through the continuous pool with `max_concurrency: {a.concurrency}`
(above the server's capacity, so its queue does not run dry between one answer and the next request).

| figure | value |
|---|---|
| requests / output tokens | {a.requests:,} / {tokens:,} |
| wall time (ideal at full capacity) | {wall:.1f} s ({ideal:.1f} s) |
| throughput | {fig["req_per_s"]:.0f} req/s, {fig["tok_per_s"]:,.0f} tok/s |
| server decoding capacity kept busy, whole run | {fig["busy_fraction"]:.3f} |
| ... while requests were still queued (before the tail drained) | {fig["busy_fraction_while_queued"]:.3f} |
| most requests the server saw at once | {fig["server_max_in_flight"]} |
| sequential client: sample measured | {seq_n} requests in {seq_wall:.1f} s \
({fig["seq_overhead_ms"]:.1f} ms/request besides decoding) |
| sequential client: extrapolated to {a.requests:,} requests | {seq_est:.0f} s |
| speed-up over the sequential client | {fig["speedup"]:.1f}x |
| for comparison, batch-and-wait ({a.capacity} at a time, {batch_n} requests): capacity kept busy \
| {fig["batch_busy_fraction"]:.3f} |

The sequential figure is extrapolated, not measured: the first {seq_n} prompts were run one at a time,
the per-request overhead was taken from that sample, and the full set's time computed as overhead x
requests + {a.per_token_ms:g} ms x its output tokens (the server's decode time is exact, so the long
tail counts fully). The whole-run busy fraction includes the final drain, where the last long answers
decode alone; the second figure covers the time while work was still waiting, which is what a client
controls. The batch-and-wait row is the naive alternative (send {a.capacity}, wait for all
{a.capacity}, repeat) on the first {batch_n} prompts: with long-tailed answers each batch waits for its
longest one while the other slots idle.
"""
    print(body)
    if not a.no_write:
        write_section(a.out, body)
        print(f"written to {a.out}")


if __name__ == "__main__":
    main()
