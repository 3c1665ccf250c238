"""The ``bezoar`` command.

  bezoar stage NAME --recipe FILE_OR_URI --run URI [--shard i/N] [--force]
  bezoar run --recipe FILE --run URI [--from S] [--until S] [--only S ...] [--force]
             [--executor local|kubernetes] [--cluster FILE] [--run-id ID] [--parallel N]
  bezoar plan --recipe FILE --run URI
  bezoar status --run URI [--json]
  bezoar verify --run URI
  bezoar report --run URI
  bezoar render --recipe FILE --cluster FILE --run URI --out DIR [--run-id ID]
  bezoar cancel --run URI [--cluster FILE] [--run-id ID]

Exit codes: 0 done, 2 bad input (do not retry), anything else a failure a retry may cure.
This module never imports torch or the Kubernetes client at import time.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from typing import Any

from . import __version__
from .errors import BadInput, BezoarError
from .manifest import read_manifest, verify
from .pipeline import select, stage_inputs
from .recipe import Recipe, load_recipe
from .registry import CANONICAL
from .store import Store, open_store

log = logging.getLogger("bezoar")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("botocore", "boto3", "urllib3", "httpx", "s3transfer", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise BadInput(f"--shard {text!r}: expected i/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise BadInput(f"--shard {text!r}: need 0 <= i < N")
    return i, n


def run_id_of(run_uri: str, given: str | None) -> str:
    return given or run_uri.rstrip("/").rsplit("/", 1)[-1]


# ---- commands -----------------------------------------------------------------------------------
def cmd_stage(a: argparse.Namespace) -> int:
    from .runner import run_stage

    recipe, _ = load_recipe(a.recipe)
    store = open_store(a.run)
    return run_stage(a.name, recipe, store, shard=_parse_shard(a.shard), force=a.force)


def _stages_for(a: argparse.Namespace, store: Store, recipe: Recipe) -> list[str]:
    stages = select(a.from_, a.until, a.only)
    if a.only:
        from .state import up_to_date

        for name in stages:
            for inp in stage_inputs(name, recipe):
                if inp in stages:
                    continue
                if read_manifest(store, inp) is None:
                    raise BadInput(f"--only {name}: its input stage {inp!r} is not committed in {store.uri}")
                ok, why = up_to_date(store, recipe, inp)
                if not ok:
                    log.warning("--only %s: input %s is committed but %s", name, inp, why)
    return stages


def check_pinned(recipe: Recipe, source: str, allow: bool) -> None:
    """A run that costs money (the recipe prices API tokens or GPU-hours) must name the exact hub
    revisions it loads, or the user says --allow-unpinned; the error lists every field to pin."""
    missing = recipe.unpinned()
    if not missing or not recipe.paid:
        return
    if allow:
        log.warning("%s: unpinned hub revisions (--allow-unpinned): %s", source, "; ".join(missing))
        return
    raise BadInput(
        f"{source}: this recipe prices its run but loads hub revisions that are not pinned, so the run could not be "
        f"reproduced: {'; '.join(missing)}. Pin each to a commit sha, or pass --allow-unpinned"
    )


def cmd_run(a: argparse.Namespace) -> int:
    """Freeze the recipe, then the one scheduler over the chosen backend (local processes or Jobs)."""
    recipe, text = load_recipe(a.recipe)
    check_pinned(recipe, a.recipe, a.allow_unpinned)
    store = open_store(a.run)
    stages = _stages_for(a, store, recipe)
    if a.executor == "kubernetes":
        from .executors.cluster import ClusterSettings, load_cluster_settings
        from .executors.kubernetes import run_pipeline

        cluster = load_cluster_settings(a.cluster) if a.cluster else ClusterSettings()
        return run_pipeline(
            recipe_text=text,
            recipe_source=a.recipe,
            run_uri=store.uri if not a.run.startswith("s3://") else a.run,
            run_id=run_id_of(a.run, a.run_id),
            cluster=cluster,
            stages=stages,
            force=a.force,
        )
    from .executors.local import run_local
    from .state import freeze_recipe

    freeze_recipe(store, text, a.recipe)
    t0 = time.time()
    rc = run_local(recipe, store, stages, force=a.force, parallel=a.parallel).exit_code
    log.info("pipeline %s after %.1f s", "finished" if rc == 0 else f"FAILED (exit {rc})", time.time() - t0)
    if rc == 0:
        for name in stages:
            m = read_manifest(store, name)
            files = m.get("files", {}) if m else {}
            if "data/train.jsonl" in files and m is not None:
                print(f"{name}: {store.url(name + '/data')}  ({m['counts'].get('rows', m['counts'].get('kept'))} rows)")
            elif any(f.startswith("model/") for f in files):
                print(f"{name}: {store.url(name + '/model')}  (checkpoint)")
            elif "index.html" in files:
                print(f"report: {store.url(name + '/index.html')}")
    return rc


def cmd_plan(a: argparse.Namespace) -> int:
    from .plan import plan

    recipe, _ = load_recipe(a.recipe)
    store = open_store(a.run)
    rows = plan(recipe, store, select(a.from_, a.until, a.only))
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0

    def money(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    print(f"{'stage':<16} {'action':<5} {'requests':>9} {'tokens in':>10} {'tokens out':>11} {'out worst':>10} "
          f"{'cost $':>8} {'worst $':>8}  why")
    for r in rows:
        print(
            f"{r['stage']:<16} {r['action']:<5} {r['requests']:>9} {r['prompt_tokens']:>10} "
            f"{r['completion_tokens']:>11} {r['completion_tokens_max']:>10} {money(r['cost_usd']):>8} "
            f"{money(r['cost_usd_max']):>8}  {r['why']}"
        )
    total = [r for r in rows if r["action"] == "run"]
    costs = [r["cost_usd"] for r in total if r["cost_usd"] is not None]
    worst = [r["cost_usd_max"] for r in total if r["cost_usd_max"] is not None]
    gpu = [r["teacher_gpu_hours"] for r in total if r["teacher_gpu_hours"] is not None]
    print(
        f"to run: {len(total)} stage(s), ~{sum(r['requests'] for r in total)} requests"
        + (f", ~${sum(costs):.2f} at the recipe's prices (worst case ${sum(worst):.2f})" if costs else "")
        + (f", ~{sum(gpu):.2f} teacher GPU-hours at the throughput this run measured" if gpu else "")
    )
    print("(tokens out: typical answer lengths; 'worst': every answer at max_new_tokens, the bound)")
    return 0


def status_rows(store: Store) -> list[dict[str, Any]]:
    from .state import stage_state

    rows = []
    for name in CANONICAL:
        m = read_manifest(store, name)
        state = "committed" if m is not None else stage_state(store, name)
        rows.append(
            {
                "stage": name,
                "state": state,
                "counts": (m or {}).get("counts", {}),
                "seconds": (m or {}).get("timings", {}).get("seconds"),
                "committed_at": (m or {}).get("committed_at"),
            }
        )
    return rows


def cmd_status(a: argparse.Namespace) -> int:
    store = open_store(a.run)
    rows = status_rows(store)
    if a.json:
        print(json.dumps({"run": store.uri, "stages": rows}, indent=2))
        return 0
    print(f"run: {store.uri}")
    print(f"{'stage':<16} {'state':<10} {'seconds':>8}  counts")
    for r in rows:
        counts = ", ".join(f"{k}={v}" for k, v in r["counts"].items() if not isinstance(v, dict))
        secs = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        print(f"{r['stage']:<16} {r['state']:<10} {secs:>8}  {counts}")
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    store = open_store(a.run)
    bad = 0
    checked = 0
    for name in CANONICAL:
        if read_manifest(store, name) is None:
            continue
        problems = verify(store, name)
        checked += 1
        if problems:
            bad += 1
            for p in problems:
                print(f"FAIL {p}")
        else:
            print(f"ok   {name}")
    if not checked:
        print(f"no committed stage in {store.uri}")
    return 1 if bad else 0


def cmd_render(a: argparse.Namespace) -> int:
    from .executors.cluster import load_cluster_settings
    from .executors.jobs import render

    load_recipe(a.recipe)  # never render Jobs for an invalid recipe
    cluster = load_cluster_settings(a.cluster)
    written = render(run_uri=a.run, run_id=run_id_of(a.run, a.run_id), cluster=cluster, out_dir=a.out)
    for p in written:
        print(p)
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from .stages.report import build_report

    for path in build_report(a.run):
        print(path)
    return 0


def cmd_cancel(a: argparse.Namespace) -> int:
    from .executors.cluster import ClusterSettings, load_cluster_settings
    from .executors.kubernetes import cancel

    cluster = load_cluster_settings(a.cluster) if a.cluster else ClusterSettings()
    return cancel(run_uri=a.run, run_id=run_id_of(a.run, a.run_id), cluster=cluster)


# ---- argument parsing ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bezoar", description="OpenBezoar instruction tuning as stage jobs")
    p.add_argument("--version", action="version", version=f"bezoar-jobs {__version__}")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("stage", help="run one stage to commit")
    s.add_argument("name", choices=CANONICAL, metavar="NAME")
    s.add_argument("--recipe", required=True, help="recipe file or URI (Jobs use <run>/recipe.yaml)")
    s.add_argument("--run", required=True, help="run location: a path, file:// or s3://bucket/prefix")
    s.add_argument("--shard", help="i/N: do slice i of N (records only; the run without --shard commits)")
    s.add_argument("--force", action="store_true", help="rerun even when committed and unchanged (generation and "
                   "filter stages reuse the teacher/judge answers already recorded; training and evaluation restart)")
    s.set_defaults(fn=cmd_stage)

    def selection(x: argparse.ArgumentParser) -> None:
        x.add_argument("--from", dest="from_", metavar="STAGE", help="first stage (canonical order, inclusive)")
        x.add_argument("--until", metavar="STAGE", help="last stage (inclusive)")
        x.add_argument("--only", nargs="+", metavar="STAGE", help="just these stages (their inputs must be committed)")

    r = sub.add_parser("run", help="freeze the recipe into the run and run the stages in order")
    r.add_argument("--recipe", required=True)
    r.add_argument("--run", required=True)
    r.add_argument("--run-id", help="Kubernetes run id (default: the run URI's last component)")
    selection(r)
    r.add_argument("--force", action="store_true")
    r.add_argument("--executor", choices=["local", "kubernetes"], default="local")
    r.add_argument("--cluster", help="cluster settings YAML (kubernetes executor)")
    r.add_argument("--parallel", type=int, default=1, help="local executor: independent stages side by side")
    r.add_argument("--allow-unpinned", action="store_true",
                   help="run a priced recipe although some hub revisions are not pinned (not reproducible)")
    r.set_defaults(fn=cmd_run)

    pl = sub.add_parser("plan", help="what would run or be skipped, with expected requests, tokens and cost")
    pl.add_argument("--recipe", required=True)
    pl.add_argument("--run", required=True)
    selection(pl)
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(fn=cmd_plan)

    st = sub.add_parser("status", help="the run's stages: state, counts, durations")
    st.add_argument("--run", required=True)
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_status)

    v = sub.add_parser("verify", help="re-hash every committed file against its manifest")
    v.add_argument("--run", required=True)
    v.set_defaults(fn=cmd_verify)

    rd = sub.add_parser("render", help="write one Kubernetes Job manifest per stage")
    rd.add_argument("--recipe", required=True)
    rd.add_argument("--cluster", required=True)
    rd.add_argument("--run", required=True)
    rd.add_argument("--run-id")
    rd.add_argument("--out", required=True)
    rd.set_defaults(fn=cmd_render)

    rp = sub.add_parser("report", help="rebuild <run>/report/ (HTML + Markdown) from what is committed")
    rp.add_argument("--run", required=True)
    rp.set_defaults(fn=cmd_report)

    c = sub.add_parser("cancel", help="delete the run's Kubernetes Jobs")
    c.add_argument("--run", required=True)
    c.add_argument("--run-id")
    c.add_argument("--cluster")
    c.set_defaults(fn=cmd_cancel)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.fn(args) or 0)
    except BezoarError as e:
        log.error("%s", e)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception:  # a bug or an unexpected failure: retryable by contract, with the traceback
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
