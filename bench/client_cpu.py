"""The client's CPU per request: what decides how fast one stage process can feed a fast server.

``.venv/bin/python bench/client_cpu.py [--requests 3000]``

Runs ``--requests`` requests through the real pool and client of each HTTP backend (``tgi``,
``openai-chat``) against tests/llm_server.py in its own process (64 decoding slots, 0.2 ms per token:
faster than the client, so the client is what is measured) with ``max_concurrency: 48``, and prints
the client process's CPU time (user + system, every thread: the pool's event loop, the flow, the
progress line) per request and the requests per second.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bezoar_jobs.llm import GenRequest, make_client  # noqa: E402
from bezoar_jobs.recipe import Endpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=3000)
    a = ap.parse_args()
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "llm_server.py"), "--capacity", "64",
                             "--per-token-ms", "0.2", "--longtail"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    m = re.match(r"PORT (\d+)", proc.stdout.readline())
    assert m, "the scripted server did not start"
    url = f"http://127.0.0.1:{m.group(1)}"
    out = {}
    try:
        for backend in ("tgi", "openai-chat"):
            ep = Endpoint(backend=backend, model="bench/model", base_url=url + ("/v1" if backend != "tgi" else ""),
                          prompt_format="<|prompt|>{user}<|answer|>" if backend == "tgi" else None,
                          max_concurrency=48, timeout_s=60)
            client = make_client(ep, role="judge")
            reqs = [GenRequest(id=f"r{i}", user=f"prompt {i} " * 20, max_new_tokens=64, seed=i)
                    for i in range(a.requests)]
            got: list = []
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
            client.run(reqs, got.append, desc=backend)
            r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
            cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
            assert len(got) == a.requests and all(r.ok for r in got)
            out[backend] = {"cpu_ms_per_request": round(cpu / a.requests * 1000, 2),
                            "req_per_s": round(a.requests / (t1 - t0))}
    finally:
        proc.terminate()
        proc.wait(10)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
