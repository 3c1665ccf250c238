"""Benchmark the Kubernetes controller against the loopback API server of tests/k8s_harness.py.

Two figures:

- **Hand-over gap**: the time from a stage's Job getting its ``Complete`` condition (as the harness
  records it) to the creation of the next Job that was waiting on it. The controller learns of the
  condition through its watch, checks the manifest, decides, and creates the next Job; the target
  is well under 1 s. Measured on every dependent stage of the pipeline (the data stages, the SFT
  chain and DPO), over several runs.
- **Peak RSS of the controller**: the real ``bezoar run --executor kubernetes`` CLI in its own
  process (what the controller pod runs), from ``getrusage(RUSAGE_SELF).ru_maxrss`` at its exit.

Stage pods run the scripted stand-in stage (tests/k8s_harness.py ``fake-stage``: parses the
contract's args and commits a real manifest), so the figures are the controller's own overhead,
not a stage's work. Usage::

    .venv/bin/python bench/controller.py [--runs 3] [--no-write]

The figures and the command are appended to docs/benchmarks.md under "## Controller".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bezoar_jobs.pipeline import waits_for  # noqa: E402
from bezoar_jobs.registry import CANONICAL  # noqa: E402
from tests.k8s_harness import FakeCluster, fake_entrypoints, write_plan  # noqa: E402

NS = "bench"
RECIPE = """schema_version: 1
name: controller-bench
teacher: {backend: local, model: pkg://none/teacher.gguf}
judge: {backend: local, model: pkg://none/judge.gguf}
student: {model: pkg://none/student.gguf}
"""
# The controller runs in its own process; it reports its peak RSS on the last line of stderr.
CONTROLLER = (
    "import resource, sys\n"
    "from bezoar_jobs.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def one_run(workdir: Path, stages: list[str]) -> tuple[list[float], float, float]:
    """Run the pipeline once; return (gaps in s, controller peak RSS in MiB, wall seconds)."""
    fake = workdir / "fake"
    fake.mkdir()
    plan = fake / "plan.json"
    env_extra = write_plan(plan, {})
    runs = workdir / "runs"
    # the pods are sandboxed (tests/k8s_sandbox.py): the runs live on a PVC they mount where this
    # process sees them too, and the fake stage's plan on a host share
    with FakeCluster(workdir / "k8s", entrypoints=fake_entrypoints(), extra_env=env_extra,
                     host_shares=[fake]) as fc:
        fc.add_pvc(NS, "runs", runs)
        recipe = workdir / "recipe.yaml"
        recipe.write_text(RECIPE)
        cluster = workdir / "cluster.yaml"
        cluster.write_text(yaml.safe_dump({"namespace": NS, "secrets": {"s3": {"name": ""}},
                                           "storage": {"runVolume": {"claimName": "runs", "mountPath": str(runs)}}}))
        env = {**os.environ, "KUBECONFIG": str(fc.kubeconfig), "PYTHONPATH": str(REPO)}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-c", CONTROLLER, "run", "--executor", "kubernetes", "--recipe", str(recipe),
             "--run", str(runs / "run"), "--cluster", str(cluster), "--until", stages[-1]],
            capture_output=True, text=True, timeout=600, env=env,
        )
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            raise SystemExit(f"controller failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        rss_kb = int(next(ln.split()[1] for ln in proc.stderr.splitlines() if ln.startswith("MAXRSS_KB")))
        created = {n: t for t, w, n in fc.timeline if w == "created"}
        complete = {n: t for t, w, n in fc.timeline if w == "complete"}
    gaps = []
    for s in stages:
        # what the controller waits for: declared inputs; the report waits for every other stage
        inputs = waits_for(s, stages)
        if not inputs:
            continue
        gaps.append(created[f"bz-run-{s}"] - max(complete[f"bz-run-{i}"] for i in inputs))
    return gaps, rss_kb / 1024, wall


def append_section(path: Path, block: str) -> None:
    """Add ``block`` to the end of the "## Controller" section (created at the end if absent)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if "\n## Controller\n" not in "\n" + text:
        path.write_text(text.rstrip("\n") + "\n\n## Controller\n\n" + block)
        return
    start = ("\n" + text).index("\n## Controller\n")
    nxt = text.find("\n## ", start + len("## Controller\n"))
    if nxt == -1:
        path.write_text(text.rstrip("\n") + "\n\n" + block)
    else:
        path.write_text(text[:nxt].rstrip("\n") + "\n\n" + block + "\n" + text[nxt + 1:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="controller hand-over gap and peak RSS")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only; do not touch docs/benchmarks.md")
    a = ap.parse_args(argv)
    stages = list(CANONICAL)
    gaps: list[float] = []
    rss: list[float] = []
    walls: list[float] = []
    for i in range(a.runs):
        with tempfile.TemporaryDirectory(prefix=f"bench-controller-{i}-") as tmp:
            g, r, w = one_run(Path(tmp), stages)
        gaps += g
        rss.append(r)
        walls.append(w)
    gaps.sort()
    result = {
        "stages": len(stages),
        "runs": a.runs,
        "gap_samples": len(gaps),
        "gap_median_ms": round(statistics.median(gaps) * 1000, 1),
        "gap_p90_ms": round(gaps[int(0.9 * (len(gaps) - 1))] * 1000, 1),
        "gap_max_ms": round(gaps[-1] * 1000, 1),
        "controller_peak_rss_mib": round(max(rss), 1),
        "run_wall_s_median": round(statistics.median(walls), 2),
    }
    print(json.dumps(result, indent=2))
    ok = result["gap_max_ms"] < 1000
    if not a.no_write:
        cmd = ".venv/bin/python bench/controller.py" + (f" --runs {a.runs}" if a.runs != 3 else "")
        block = (
            f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} CPU cores, "
            f"Python {platform.python_version()}; command: `{cmd}`.\n"
            f"The controller (`bezoar run --executor kubernetes`, its own process) against the loopback API "
            f"server of tests/k8s_harness.py, {result['stages']} stages per run with scripted stand-in stages, "
            f"{a.runs} runs.\n\n"
            "| figure | value |\n|---|---|\n"
            f"| Job Complete -> next Job created, median ({len(gaps)} hand-overs) | {result['gap_median_ms']} ms |\n"
            f"| same, 90th percentile | {result['gap_p90_ms']} ms |\n"
            f"| same, worst | {result['gap_max_ms']} ms (target < 1000 ms: {'met' if ok else 'NOT met'}) |\n"
            f"| controller peak RSS | {result['controller_peak_rss_mib']} MiB |\n"
            f"| whole run, median wall time | {result['run_wall_s_median']} s |\n"
        )
        append_section(REPO / "docs" / "benchmarks.md", block)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
