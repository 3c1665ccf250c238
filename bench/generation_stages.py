"""Whole data stages against the scripted teacher: how busy do they keep it, clean and under faults?

``.venv/bin/python bench/generation.py stages [--quick] [--scale K] [--no-write]``

The teacher (and judge) is tests/llm_server.py as its own process with the capacity model of the
client benchmark (``--capacity`` sequences decoding at once, ``--per-token-ms`` per output token,
extra requests queued) answering with the pipeline's scripted answers (tests/scripted.py), the
responses and evolutions padded to log-normal lengths (median e**mu words). Each stage runs as
``bezoar stage NAME`` (its own process, exactly as ``bezoar run`` starts it), on generated seed files
(dolly-style rows, Flan-style rows), and is measured on the server side: decoding slot-seconds used
over capacity x the stage's span (its first request in to its last answer out, the final drain
included). Then the same stages under the issue's fault mix (429 10%, 503 10%, requests that hang
until the client gives up 5%, malformed bodies 1%), compared with the clean run's committed data;
then the three generate stages started together by ``bezoar run`` (the default: side by side within
one budget); then the fleet: two server processes listed in ``BEZOAR_TEACHER_ENDPOINTS``, and one of them killed
mid-stage.

Why the server decides the figures: its schedule is computed, not observed (see llm_server.py), so a
loaded machine slows the client (fewer requests queued) but does not inflate the busy figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from generation import write_section  # noqa: E402

from tests.scripted import scripted_recipe  # noqa: E402

SECTION = "## Generation stages"
# each stage's shape for the ideal client of bench/fault_bound.py: requests, log-normal length (mu, sigma),
# how many of them are 8-token checks. One step per request: LaMini's lists and Evol's rounds depend on
# each other, so for those two the bound is looser than the stage can reach
SHAPES = {"generate-lamini": (2358, 4.1, 1.0, 0), "generate-evol": (7200, 4.1, 1.0, 2400),
          "generate-orca": (3000, 4.1, 1.0, 0), "filter-lamini": (1956, 3.9, 0.4, 0)}
FAULTS = "429=0.10,503=0.10,hang=0.05,malformed=0.01"
STAGES = ("generate-lamini", "generate-evol", "generate-orca", "filter-lamini")
CATS = ["closed_qa", "open_qa", "summarization", "brainstorming", "classification", "creative_writing",
        "general_qa", "information_extraction"]
SOURCES = [("cot", "zs_noopt"), ("niv2", "zs_noopt"), ("t0", "zs_noopt"), ("flan", "zs_noopt")]


def start_server(a: argparse.Namespace, rates: str = "", seed: int = 0,
                 retry_after: str = "1") -> tuple[subprocess.Popen, str]:
    """``seed``: the fault draws' (the answers are the same whatever it is, as every replica of one model
    gives them); ``retry_after``: what a 429/503 says in ``Retry-After`` ("" for none, as TGI's own 429)."""
    cmd = [sys.executable, str(REPO / "tests" / "llm_server.py"), "--scripted", "--capacity", str(a.capacity),
           "--per-token-ms", str(a.per_token_ms), "--mu", str(a.mu), "--sigma", str(a.sigma),
           "--hang-s", "600", "--fault-seed", str(seed), "--retry-after", retry_after]
    if a.max_concurrent_requests:  # TGI's admission limit, reported at /info: the stages' budget divides it
        cmd += ["--max-concurrent-requests", str(a.max_concurrent_requests)]
    if rates:
        cmd += ["--rates", rates]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO / "tests")
    assert proc.stdout is not None
    m = re.match(r"PORT (\d+)", proc.stdout.readline())
    if not m:
        proc.terminate()
        raise RuntimeError("the scripted server did not start")
    return proc, f"http://127.0.0.1:{m.group(1)}"


def control(url: str, route: str, method: str = "GET") -> dict:
    req = urllib.request.Request(url + route, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def seed_files(d: Path, n_dolly: int, n_flan: int) -> tuple[Path, Path]:
    dolly, flan = d / "dolly.jsonl", d / "flan.jsonl"
    with dolly.open("w") as f:
        for i in range(n_dolly):
            f.write(json.dumps({"instruction": f"Seed task number {i}: explain what matters about subject {i}.",
                                "context": "", "response": "r", "category": CATS[i % len(CATS)]}) + "\n")
    with flan.open("w") as f:
        for i in range(n_flan):
            src, tt = SOURCES[i % len(SOURCES)]
            f.write(json.dumps({"inputs": f"Flan task {i}: answer the question about item {i}.", "targets": f"t{i}",
                                "task_source": src, "task_name": f"task_{i % 37}", "template_type": tt}) + "\n")
    return dolly, flan


def recipe(d: Path, url: str, a: argparse.Namespace, dolly: Path, flan: Path) -> Path:
    ep = {"max_concurrency": a.concurrency, "max_retries": 8, "backoff_base_s": 0.2, "backoff_max_s": 2.0,
          "timeout_s": a.timeout}
    r = scripted_recipe(d, url, **{
        **{f"teacher.{k}": v for k, v in ep.items()}, **{f"judge.{k}": v for k, v in ep.items()},
        "seeds.dolly": {"path": str(dolly)}, "seeds.flan": {"path": str(flan)},
        "generation.lamini.example_prompts": a.lamini_prompts, "generation.lamini.topic_prompts": 0,
        "generation.lamini.max_instructions": None,
        "generation.lamini.response_decoding": {"max_new_tokens": a.max_new_tokens, "temperature": 0.7},
        "generation.evol.seeds": a.evol_seeds, "generation.evol.rounds": 2,
        "generation.evol.evolve_decoding": {"max_new_tokens": a.max_new_tokens, "temperature": 0.7},
        "generation.evol.response_decoding": {"max_new_tokens": a.max_new_tokens, "temperature": 0.7},
        "generation.orca.seeds": a.orca_seeds, "generation.orca.submix_weights": {"cot": 1, "niv2": 1, "t0": 1,
                                                                                 "flan2021": 1},
        "generation.orca.response_decoding": {"max_new_tokens": a.max_new_tokens, "temperature": 0.7},
        "filter.decoding": {"max_new_tokens": 256, "temperature": 0.7},
        "generation.max_failed_fraction": 0.0,
    })
    return r


def bezoar(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SCRIPTED_JUDGE_KEY": "bench-key", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "bezoar_jobs.cli", *args], capture_output=True, text=True, env=env,
                          timeout=3600)


def manifest(run: Path, stage: str) -> dict[str, Any]:
    return json.loads((run / stage / "_MANIFEST.json").read_text())


def data(run: Path, stage: str) -> str:
    return (run / stage / "data" / "train.jsonl").read_text()


def run_stage(url: str, rec: Path, run: Path, stage: str, a: argparse.Namespace) -> dict[str, Any]:
    control(url, "/_reset", "POST")
    t0 = time.monotonic()
    res = bezoar("stage", stage, "--recipe", str(rec), "--run", str(run))
    wall = time.monotonic() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{stage} failed:\n{res.stderr[-3000:]}")
    st = control(url, "/_stats")
    m = manifest(run, stage)
    util = m.get("utilization", {})
    rows = control(url, "/_timeline") if a.timeline else None
    tl = timeline(rows, a.capacity) if rows else None
    if rows and a.timeline_dir:
        a.timeline_dir.mkdir(parents=True, exist_ok=True)
        (a.timeline_dir / f"{run.name}-{stage}.json").write_text(json.dumps(rows))
    role = "judge" if stage.startswith("filter") else "teacher"
    return {"stage": stage, "wall_s": round(wall, 1), "span_s": round(st["last_finish"] - st["first_arrival"], 2),
            "requests": st["requests"], "by_status": st["by_status"], "busy": round(st["busy_fraction"], 3),
            "busy_answered": round(st["busy_fraction_answered"], 3),
            "client_seen": util.get(role, {}).get("utilization"),
            "rows": m["counts"].get("rows", m["counts"].get("kept")),
            "retries": sum(p.get("retries", 0) for p in m.get("requests", {}).get("phases", {}).values()),
            "hedged": util.get(role, {}).get("hedged"), "abandoned": util.get(role, {}).get("abandoned"),
            **({"timeline": tl} if tl else {})}


def timeline(rows: list[list[Any]], capacity: int, bin_s: float = 1.0) -> dict[str, Any]:
    """Where the idle time of one stage went, from the server's calls (``GET /_timeline``): per ``bin_s``
    the decoding capacity used and the attempts that arrived (first attempts and repeats of a request
    already seen); the tail: from the last first attempt's arrival to the last answer."""
    if not rows:
        return {}
    t0 = min(r[0] for r in rows)
    t1 = max(r[2] for r in rows if r[2] is not None)
    n = max(1, int((t1 - t0) / bin_s) + 1)
    busy = [0.0] * n
    fresh = [0] * n
    again = [0] * n
    seen: set[str] = set()
    last_fresh = t0
    for arrived, start, end, status, _fault, _mx, key in sorted(rows, key=lambda r: r[0]):
        b = min(n - 1, int((arrived - t0) / bin_s))
        if key in seen:
            again[b] += 1
        else:
            seen.add(key)
            fresh[b] += 1
            last_fresh = arrived
        if start is not None and end is not None and status == 200:
            for i in range(int((start - t0) / bin_s), min(n, int((end - t0) / bin_s) + 1)):
                lo, hi = t0 + i * bin_s, t0 + (i + 1) * bin_s
                busy[i] += max(0.0, min(end, hi) - max(start, lo))
    used = [round(x / (capacity * bin_s), 2) for x in busy]
    tail_busy = sum(u for i, u in enumerate(used) if t0 + i * bin_s >= last_fresh) * bin_s
    tail = t1 - last_fresh
    return {"span_s": round(t1 - t0, 2), "last_first_attempt_s": round(last_fresh - t0, 2), "tail_s": round(tail, 2),
            "tail_busy": round(tail_busy / tail, 2) if tail > 0 else None,
            "busy_before_tail": round(sum(used[: int((last_fresh - t0) / bin_s)]) * bin_s
                                      / max(1e-9, (last_fresh - t0)), 3),
            "used": used, "fresh": fresh, "again": again}


def series(a: argparse.Namespace, d: Path, rates: str, name: str, dolly: Path, flan: Path,
           retry_after: str = "1", seed: int = 0) -> tuple[list, Path]:
    proc, url = start_server(a, rates, seed=seed, retry_after=retry_after)
    try:
        run = d / f"run-{name}"
        (d / name).mkdir()
        rec = recipe(d / name, url, a, dolly, flan)
        out = [run_stage(url, rec, run, s, a) for s in a.stages]
    finally:
        proc.terminate()
        proc.wait(10)
    return out, run


def as_fleet(rec: Path, servers: list[tuple[subprocess.Popen, str]], a: argparse.Namespace,
             orca_seeds: int | None = None) -> dict[str, str]:
    """Point ``rec`` at a fleet of ``servers`` (the client's budget that many times one server's; ``orca_seeds``
    when given); the environment that lists them (``BEZOAR_TEACHER_ENDPOINTS``)."""
    import yaml

    doc = yaml.safe_load(rec.read_text())
    doc["teacher"]["max_concurrency"] = len(servers) * a.concurrency
    if orca_seeds is not None:
        doc["generation"]["orca"]["seeds"] = orca_seeds
    rec.write_text(yaml.safe_dump(doc, sort_keys=False))
    return {"BEZOAR_TEACHER_ENDPOINTS": ",".join(u for _, u in servers)}


def stop(servers: list[tuple[subprocess.Popen, str]]) -> None:
    for pr, _ in servers:
        if pr.poll() is None:
            pr.terminate()
            pr.wait(10)


def together(a: argparse.Namespace, d: Path, dolly: Path, flan: Path, replicas: int = 1) -> dict[str, Any]:
    """The three generate stages by ``bezoar run`` (side by side, one budget) against ``replicas`` servers
    (more than one: listed in ``BEZOAR_TEACHER_ENDPOINTS``, the client's budget that many times one's)."""
    servers = [start_server(a, seed=i) for i in range(replicas)]
    name = "together" if replicas == 1 else f"together-{replicas}"
    try:
        (d / name).mkdir()
        rec = recipe(d / name, servers[0][1], a, dolly, flan)
        env = as_fleet(rec, servers, a) if replicas > 1 else {}
        for _, u in servers:
            control(u, "/_reset", "POST")
        run = d / f"run-{name}"
        t0 = time.monotonic()
        res = bezoar("run", "--recipe", str(rec), "--run", str(run), "--only", "generate-lamini", "generate-evol",
                     "generate-orca", env=env)
        wall = time.monotonic() - t0
        if res.returncode != 0:
            raise RuntimeError(f"bezoar run failed:\n{res.stderr[-3000:]}")
        stats = [control(u, "/_stats") for _, u in servers]
    finally:
        stop(servers)
    out: dict[str, Any] = {
        "wall_s": round(wall, 1), "span_s": [round(st["last_finish"] - st["first_arrival"], 2) for st in stats],
        "requests": [st["requests"] for st in stats], "busy": [round(st["busy_fraction"], 3) for st in stats],
        "busy_answered": [round(st["busy_fraction_answered"], 3) for st in stats],
        "max_in_flight": [st["max_in_flight"] for st in stats]}
    if replicas == 1:  # one server: plain figures, as the table has always printed them
        out = {k: v[0] if isinstance(v, list) else v for k, v in out.items()}
    return out


def fleet(a: argparse.Namespace, d: Path, dolly: Path, flan: Path, kill: bool, seeds: int) -> dict[str, Any]:
    """generate-orca on ``seeds`` seeds against two replicas behind one endpoint list; ``kill``: one dies
    mid-stage."""
    servers = [start_server(a, seed=i) for i in range(2)]
    name = f"fleet-{seeds}" + ("-kill" if kill else "")
    try:
        (d / name).mkdir()
        rec = recipe(d / name, servers[0][1], a, dolly, flan)
        fleet_env = as_fleet(rec, servers, a, orca_seeds=seeds)
        for _, u in servers:
            control(u, "/_reset", "POST")
        run = d / f"run-{name}"
        env = {**os.environ, "SCRIPTED_JUDGE_KEY": "k", "PYTHONPATH": str(REPO), **fleet_env}
        p = subprocess.Popen([sys.executable, "-m", "bezoar_jobs.cli", "stage", "generate-orca", "--recipe", str(rec),
                              "--run", str(run)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        killed_at = None
        if kill:
            time.sleep(a.kill_after)
            killed = servers[1][0]
            killed.send_signal(signal.SIGKILL)
            killed_at = a.kill_after
        _, err = p.communicate(timeout=3600)
        if p.returncode != 0:
            raise RuntimeError(f"fleet stage failed:\n{err[-3000:]}")
        stats = [control(u, "/_stats") for i, (_, u) in enumerate(servers) if not (kill and i == 1)]
        m = manifest(run, "generate-orca")
    finally:
        stop(servers)
    return {"busy": [round(s["busy_fraction"], 3) for s in stats],
            "busy_answered": [round(s["busy_fraction_answered"], 3) for s in stats],
            "busy_until_last_start": [round(s["busy_fraction_until_last_start"], 3) for s in stats],
            "rows": m["counts"]["rows"],
            "seeds": m["counts"]["seeds"], "killed_after_s": killed_at, "requests": [s["requests"] for s in stats]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--capacity", type=int, default=32)
    ap.add_argument("--per-token-ms", type=float, default=2.0)
    ap.add_argument("--mu", type=float, default=4.0)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--concurrency", type=int, default=48)
    ap.add_argument("--max-concurrent-requests", type=int, default=128,
                    help="the server's admission limit, as TGI's flag (its default 128) and its /info report it: "
                         "stages run together divide it (llm/budget.py); 0: the server says nothing")
    ap.add_argument("--timeout", type=float, default=60.0, help="the client's timeout_s (hangs last longer)")
    ap.add_argument("--lamini-prompts", type=int, default=400)
    ap.add_argument("--evol-seeds", type=int, default=1200)
    ap.add_argument("--orca-seeds", type=int, default=3000)
    ap.add_argument("--kill-after", type=float, default=6.0)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each fault mix (fault draws seeded 0, 1, ...)")
    ap.add_argument("--parts", default="clean,faults,faults-tgi,together,fleet",
                    help="faults: 429/503 say Retry-After: 1; faults-tgi: the same mix without Retry-After, as "
                    "TGI's router answers its 429 (and as an ingress answers a 503)")
    ap.add_argument("--stages", default=",".join(STAGES), help="the data stages to measure (in this order; the "
                    "filter needs generate-lamini before it)")
    ap.add_argument("--timeline", action="store_true", help="add each stage's server timeline (where the idle "
                    "time went) to the figures printed")
    ap.add_argument("--timeline-dir", type=Path, default=None, help="with --timeline: also write each stage's "
                    "calls there (for a closer look)")
    ap.add_argument("--quick", action="store_true", help="a tenth of the sizes (a smoke run)")
    ap.add_argument("--scale", type=int, default=1, help="every stage this many times its size (LaMini prompts, "
                    "Evol-Instruct and Orca seeds; the filter follows LaMini), the ideal client's bound too: a "
                    "refusal chain's few seconds weigh less on a longer stage")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.lamini_prompts, a.evol_seeds, a.orca_seeds = a.lamini_prompts // 10, a.evol_seeds // 10, a.orca_seeds // 10
    a.lamini_prompts, a.evol_seeds, a.orca_seeds = (a.scale * a.lamini_prompts, a.scale * a.evol_seeds,
                                                    a.scale * a.orca_seeds)
    parts = set(a.parts.split(","))
    a.stages = tuple(x for x in a.stages.split(",") if x)
    load = os.getloadavg()
    fig: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bezoar-stages-") as tmp:
        d = Path(tmp)
        dolly, flan = seed_files(d, a.evol_seeds + 10, 2 * a.orca_seeds + 10)
        if "clean" in parts:
            fig["clean"], clean_run = series(a, d, "", "clean", dolly, flan)
        # each fault mix --repeat times, the server's fault draws seeded 0, 1, ...: a faulted stage's figure
        # moves with where its last hangs and refusal chains fall, so one run says little
        for part, key, retry_after, ra_s in (("faults", "faults", "1", 1.0), ("faults-tgi", "faults_tgi", "", 0.0)):
            if part not in parts:
                continue
            runs = []
            for r in range(a.repeat):
                out, frun = series(a, d, FAULTS, f"{part}-{r}", dolly, flan, retry_after=retry_after, seed=r)
                for x in out:
                    x["identical"] = data(clean_run, x["stage"]) == data(frun, x["stage"]) if "clean" in parts else None
                runs.append(out)
            fig[key + "_runs"] = runs
            # per stage: the run with the median busy figure
            fig[key] = [sorted((run[i] for run in runs), key=lambda x: x["busy"])[len(runs) // 2]
                        for i in range(len(a.stages))]
            # None: not compared (no clean run in --parts), never False for a comparison not made
            fig["identical" if key == "faults" else "identical_tgi"] = {
                s: all(run[i]["identical"] for run in runs) if "clean" in parts else None
                for i, s in enumerate(a.stages)}
            # at the clean run's request count where it ran (a stage's count is not its size times a constant:
            # LaMini's deduplication keeps fewer of a bigger stage's instructions, and the filter follows)
            asked = {x["stage"]: x["requests"] for x in fig.get("clean", [])}
            fig["bound" if key == "faults" else "bound_tgi"] = {s: shape_bound(a, s, ra_s, asked.get(s))
                                                                 for s in a.stages}
        if "together" in parts:
            fig["together"] = together(a, d, dolly, flan)
        if "fleet" in parts:
            # the stage's own size (half of it per replica), then twice it (each replica as much work as the
            # one server has in the table above); the ideal client's clean figure at each replica's share
            fig["fleet"] = fleet(a, d, dolly, flan, kill=False, seeds=a.orca_seeds)
            fig["fleet_equal"] = fleet(a, d, dolly, flan, kill=False, seeds=2 * a.orca_seeds)
            fig["fleet_kill"] = fleet(a, d, dolly, flan, kill=True, seeds=a.orca_seeds)
            # what `bezoar run` does by default (the three generate stages side by side) against the fleet
            fig["fleet_together"] = together(a, d, dolly, flan, replicas=2)
            from fault_bound import bound  # bench/fault_bound.py

            mu, sigma = SHAPES["generate-orca"][1:3]
            fig["fleet_bound"] = {str(n): bound(n, 10, capacity=a.capacity, concurrency=a.concurrency,
                                                per_token_s=a.per_token_ms / 1000, mu=mu, sigma=sigma,
                                                cap_tokens=a.max_new_tokens)["clean_busy"]
                                  for n in (a.orca_seeds // 2, a.orca_seeds)}
    fig["load_before"] = [round(x, 1) for x in load]
    fig["load_after"] = [round(x, 1) for x in os.getloadavg()]
    print(json.dumps(fig, indent=1))
    if not a.no_write:
        write_section(a.out, render(a, fig, argv if argv is not None else sys.argv[1:]), SECTION)
        print(f"written to {a.out}")


def shape_bound(a: argparse.Namespace, stage: str, retry_after_s: float, requests: int | None = None) -> dict[str, Any]:
    """The ideal client of bench/fault_bound.py on ``stage``'s shape (SHAPES) under the fault mix; ``requests``:
    the stage's request count (the clean run's), else SHAPES' at ``--scale``."""
    from fault_bound import bound  # bench/fault_bound.py

    n0, mu, sigma, short0 = SHAPES[stage]
    n = requests or a.scale * n0
    short = round(short0 * n / n0)
    return bound(n, 10, capacity=a.capacity, concurrency=a.concurrency, per_token_s=a.per_token_ms / 1000, mu=mu,
                 sigma=sigma, cap_tokens=a.max_new_tokens, short=short, retry_after_s=retry_after_s)


def render(a: argparse.Namespace, fig: dict[str, Any], argv: list[str]) -> str:
    cmd = " ".join([".venv/bin/python", "bench/generation.py", "stages"] + [shlex.quote(x) for x in argv])
    adm = (f" up to an admission limit of {a.max_concurrent_requests} at once (TGI's `--max-concurrent-requests`, "
           "its default, reported at `/info` as TGI does; past it a request is refused at once with 429 \"Model is "
           "overloaded\"; the stages sharing the server divide it)") if a.max_concurrent_requests else ""
    lines = [f"Measured {time.strftime('%Y-%m-%d')}; command: `{cmd}` ({os.cpu_count()} CPU cores shared with other "
             f"work, Python {platform.python_version()}; load average {fig['load_before'][0]} at the start, "
             f"{fig['load_after'][0]} at the end).", "",
             f"Server: tests/llm_server.py, {a.capacity} sequences decoding at once, {a.per_token_ms:g} ms per output "
             f"token, extra requests queued{adm}; the pipeline's scripted answers, responses and evolutions log-normal "
             f"(median e^{a.mu:g} words, sigma {a.sigma:g}, cut at {a.max_new_tokens}). Client: `max_concurrency: "
             f"{a.concurrency}` for teacher and judge (one server plays both), `timeout_s: {a.timeout:g}`. Sizes: "
             f"generate-lamini {a.lamini_prompts} prompts x 8 instructions, generate-evol {a.evol_seeds} seeds x 2 "
             f"rounds (evolve, response, 8-token equality check), generate-orca {a.orca_seeds} seeds, filter-lamini "
             "one verdict per generated row. \"busy\" is the server's decoding capacity kept busy over the stage's "
             "span (first request in to last answer out, the final drain included); \"answered only\" leaves out "
             "the decodes of attempts the client cancelled (a duplicate that lost its race, an abandoned attempt); "
             "\"client\" is what the stage's manifest records (`utilization`: answered attempts in flight over the "
             "client's slots).", ""]
    if "clean" in fig:
        lines += ["| stage | clean: busy (client) | span | requests |", "|---|---|---|---|"]
        for c in fig["clean"]:
            lines.append(f"| {c['stage']} | {c['busy']:.3f} ({c['client_seen']}) | {c['span_s']:.1f} s | "
                         f"{c['requests']:,} |")
        lines.append("")
    mixes = (("faults", "bound", "identical", "Under the fault mix, a 429/503 saying `Retry-After: 1`. Ideal "
              "client: a refused request may be sent again after that second."),
             ("faults_tgi", "bound_tgi", "identical_tgi", "The same fault mix as TGI answers it: no `Retry-After` on "
              "the 429s and 503s (TGI's router puts none on its 429, router/src/server.rs `From<InferError>`; TGI "
              "itself answers 503 only on /health: a 503 comes from a proxy in front of it, which need not say one "
              "either), so the client waits its own backoff (full jitter, `backoff_base_s: 0.2`, `backoff_max_s: "
              "2`). Ideal client: a refused request may be sent again at once."))
    for key, bkey, ikey, text in mixes:
        if key not in fig or "clean" not in fig:
            continue
        runs = fig[key + "_runs"]
        lines += [f"{text} {len(runs)} runs (the server's fault draws seeded 0 to {len(runs) - 1}): the median run "
                  "and, in brackets, the lowest and highest.", "",
                  "| stage | busy (answered only) | span (x clean) | retries, hedged, abandoned | data identical | "
                  "ideal client: busy (x clean) |", "|---|---|---|---|---|---|"]
        for i, c in enumerate(fig["clean"]):
            f, b = fig[key][i], fig[bkey][c["stage"]]
            busy = sorted(run[i]["busy"] for run in runs)
            over = sorted(run[i]["span_s"] / c["span_s"] for run in runs)
            lines.append(f"| {c['stage']} | {f['busy']:.3f} ({busy[0]:.3f}-{busy[-1]:.3f}; answered only "
                         f"{f['busy_answered']:.3f}) | {f['span_s']:.1f} s, {f['span_s'] / c['span_s']:.2f}x "
                         f"({over[0]:.2f}-{over[-1]:.2f}x) | {f['retries']}, {f.get('hedged', '-')}, "
                         f"{f.get('abandoned', '-')} | {'yes' if fig[ikey][c['stage']] else '**no**'} | "
                         f"{b['faults_busy'][0]:.3f} ({b['faults_busy'][1]:.2f}-{b['faults_busy'][2]:.2f}), "
                         f"{b['faults_over_clean'][0]:.2f}x |")
        lines.append("")
    if "together" in fig:
        t = fig["together"]
        lines += [f"The three generate stages started together by `bezoar run --only generate-lamini generate-evol "
                  f"generate-orca` (the default now runs them side by side within one budget): busy {t['busy']:.3f} "
                  f"over {t['span_s']:.1f} s, {t['requests']:,} requests, at most {t['max_in_flight']} in flight at "
                  "the server.", ""]
    if "fleet" in fig:
        f, e, k, fb = fig["fleet"], fig["fleet_equal"], fig["fleet_kill"], fig["fleet_bound"]

        def busy(x: dict[str, Any]) -> str:
            return ", ".join(f"{b:.3f} ({u:.3f})" for b, u in zip(x["busy"], x["busy_answered"], strict=True))

        lines += [f"Fleet (generate-orca, two replicas of the server listed in `BEZOAR_TEACHER_ENDPOINTS`, client "
                  f"`max_concurrency: {2 * a.concurrency}`; busy, and in brackets answered only): {a.orca_seeds} "
                  f"seeds: busy {busy(f)} "
                  f"({', '.join(str(r) for r in f['requests'])} requests; until each replica's last decode started: "
                  f"{', '.join(f'{b:.3f}' for b in f['busy_until_last_start'])}); {2 * a.orca_seeds} seeds (each "
                  f"replica as much work as the one server above): busy {busy(e)} "
                  f"({', '.join(str(r) for r in e['requests'])} requests). An ideal client, clean, at "
                  f"{a.orca_seeds // 2} requests on one server: {fb[str(a.orca_seeds // 2)][0]:.3f} "
                  f"({fb[str(a.orca_seeds // 2)][1]:.2f}-{fb[str(a.orca_seeds // 2)][2]:.2f}); at {a.orca_seeds}: "
                  f"{fb[str(a.orca_seeds)][0]:.3f} ({fb[str(a.orca_seeds)][1]:.2f}-{fb[str(a.orca_seeds)][2]:.2f}): "
                  "what a replica loses is its final drain (the longest answers started last, up to "
                  f"{a.max_new_tokens} tokens), which weighs twice as much on half the work. With the second "
                  f"replica killed {k['killed_after_s']:g} s into the {a.orca_seeds}-seed stage: the stage committed "
                  f"{k['rows']} of {k['seeds']} rows, the surviving replica {k['busy'][0]:.3f} busy.", ""]
        if "fleet_together" in fig:
            t = fig["fleet_together"]
            lines += [f"The fleet as `bezoar run` uses it by default (the three generate stages side by side, one "
                      f"budget of {2 * a.concurrency} over both replicas): busy {busy(t)} over "
                      f"{', '.join(f'{x:.1f}' for x in t['span_s'])} s "
                      f"({', '.join(f'{r:,}' for r in t['requests'])} requests).", ""]
    lines += ["Reading the figures. The client runs on the same 2 shared cores as the server and the other work "
              "here: where a stage needs more requests per second than the client process can make, the server is "
              "under-fed by the client's CPU, not by waiting; the server's figures are computed from its schedule, "
              "so contention can lower them but never raise them. Under faults the stage ends with the retry "
              "chains of its last records: a 429/503 says `Retry-After: 1`, honoured for that request, and among "
              "the records asked in the last second or two some meet three to six refusals in a row (about 26% of "
              "attempts fail; 0.2^k per record for k refusals) while no fresh work is left to fill the server. The "
              "last column bounds what any client could do about that: `bench/fault_bound.py` simulates an ideal "
              "client (no CPU cost, retries sent the moment they may, hangs known at once) on the same server and "
              "fault mix with the stage's request count and lengths, one step per request (LaMini's lists and "
              "Evol's rounds depend on each other, so for those the bound is looser than reachable), mean and "
              "range over 10 seeds. Where it is below 0.85 or above 1.3x, the target is out of reach at this "
              "stage size; it grows with the stage (the tail costs a few seconds whatever the stage's length: "
              "an ideal client keeps a 12,000-request stage 0.96 busy).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
