"""The ``bezoar`` command.

  bezoar stage NAME --recipe FILE_OR_URI --run URI [--shard i/N] [--force]
               [--nproc-per-node N] [--nnodes M --master-addr HOST [--master-port P] [--node-rank I]]
  bezoar run --recipe FILE --run URI [--from S] [--until S] [--only S ...] [--force]
             [--executor local|kubernetes] [--cluster FILE] [--run-id ID] [--parallel N] [--refreeze]
             [--nproc-per-node N]
  bezoar plan --recipe FILE --run URI
  bezoar status --run URI [--json]
  bezoar verify --run URI [--fix]
  bezoar repair --run URI
  bezoar report --run URI
  bezoar render --recipe FILE --cluster FILE --run URI --out DIR [--run-id ID] [--image-digest FAMILY=sha256:...]
  bezoar cancel --run URI [--cluster FILE] [--run-id ID] [--undo]

Exit codes: 0 done, 2 bad input (do not retry), anything else a failure a retry may cure.
This module never imports torch or the Kubernetes client at import time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from typing import Any

from . import __version__, redact
from .errors import BadInput, BezoarError
from .launch import add_flags, launch_needed, launch_stage
from .manifest import manifest_state, read_manifest, verify
from .pipeline import select, stage_inputs
from .recipe import Recipe, load_recipe
from .registry import CANONICAL
from .store import Store, open_store

log = logging.getLogger("bezoar")


class _SurvivingStream:
    """stdout/stderr that outlive their reader: a stage whose `bezoar run` parent was killed keeps
    running to its commit (as a Kubernetes Job outlives its controller) instead of dying of a broken
    pipe at its next log line; once the reader is gone, output goes to /dev/null."""

    def __init__(self, stream: Any):  # noqa: ANN401 - a text stream
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return int(self._stream.write(text))
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        import os

        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - isatty, fileno, encoding ...
        return getattr(self._stream, name)


def _setup_logging(verbose: bool = False, log_format: str = "text") -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("botocore", "boto3", "urllib3", "httpx", "s3transfer", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # nothing we print carries a secret: the credentials in the environment and every key a client
    # resolves are masked in every log line, whatever a server echoed back
    redact.register_env()
    redact.install()
    from . import logfmt

    if log_format == "json" or os.environ.get(logfmt.LOG_FORMAT_ENV, "").lower() == "json":
        os.environ[logfmt.LOG_FORMAT_ENV] = "json"  # the stage processes of `bezoar run` inherit it
        logfmt.install()


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
    from .logfmt import STAGE_ENV
    from .runner import run_stage

    os.environ[STAGE_ENV] = a.name  # JSON log lines name it

    recipe, _ = load_recipe(a.recipe)
    store = open_store(a.run)
    if launch_needed(a, recipe):  # several processes (training; eval-harness data-parallel): under torchrun
        return launch_stage(a, recipe, store)
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


def _check_training_configs(recipe: Recipe, stages: list[str]) -> None:
    """Before anything is spent: the recipe's pass-through sections were checked against the TRL/PEFT
    fields when it loaded; where TRL is installed, also build each selected training stage's configs
    (the classes' own checks of combinations). The controller image has no TRL: nothing to import."""
    from .passthrough import build_all

    build_all(recipe, stages)


def _check_inputs(recipe: Recipe, actions: dict[str, str]) -> None:
    """Before anything is spent: the templates and seed files of the stages that will run (``actions``: each
    selected stage's "run" or "skip") are there and hold what those stages need (bezoar_jobs/preflight.py); a
    committed stage that is skipped reads nothing."""
    from .preflight import check_inputs

    check_inputs(recipe, [s for s, action in actions.items() if action == "run"])


def _register_keys(recipe: Recipe) -> None:
    """Mask the recipe's API keys in what this process relays (the stage processes mask them too)."""
    import os
    from pathlib import Path

    mt = getattr(getattr(recipe.evaluation, "mtbench", None), "judge", None)
    for e in (recipe.teacher, recipe.judge, mt):
        if e is None:
            continue
        if e.api_key_env:
            redact.register(os.environ.get(e.api_key_env))
        elif e.api_key_file:
            try:
                redact.register(Path(e.api_key_file).expanduser().read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError):
                pass  # the stage that needs it says what is wrong


def cmd_run(a: argparse.Namespace) -> int:
    """Freeze the recipe, then the one scheduler over the chosen backend (local processes or Jobs)."""
    from .run_control import refuse_if_cancelled

    recipe, text = load_recipe(a.recipe)
    recipe.check_pinned(a.recipe, a.allow_unpinned)
    store = open_store(a.run)
    refuse_if_cancelled(store)  # `bezoar cancel` holds for every executor
    stages = _stages_for(a, store, recipe)
    if a.executor == "kubernetes":  # the controller path never imports TRL: the schema check at load suffices
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
            refreeze=a.refreeze,
        )
    _check_training_configs(recipe, stages)
    from .state import planned_actions

    _check_inputs(recipe, {s: act for s, (act, _) in planned_actions(store, recipe, stages, a.force).items()})
    from .executors.local import run_local
    from .layout import RUN_LEASE
    from .lease import Lease
    from .state import freeze_recipe

    _register_keys(recipe)
    # one `bezoar run` per run: a second one would refreeze the recipe under the first one's stages
    with Lease(store, RUN_LEASE, "bezoar run" + (f" --only {' '.join(a.only)}" if a.only else "")):
        freeze_recipe(store, text, a.recipe)
        t0 = time.time()
        rc = run_local(recipe, store, stages, force=a.force, parallel=a.parallel,
                       nproc_per_node=a.nproc_per_node).exit_code
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
    stages = select(a.from_, a.until, a.only)
    _check_training_configs(recipe, stages)
    rows = plan(recipe, store, stages)
    _check_inputs(recipe, {r["stage"]: r["action"] for r in rows})  # the plan's own actions, not decided again
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


def cmd_status(a: argparse.Namespace) -> int:
    from .status import show_status

    return show_status(a.run, a.json)


def cmd_verify(a: argparse.Namespace) -> int:
    """Re-hash every committed file of every stage; report every problem and go on. ``--fix``: then
    repair (move the damaged stages aside)."""
    store = open_store(a.run)
    checked = 0
    damaged: dict[str, list[str]] = {}
    for name in CANONICAL:
        state, _, why = manifest_state(store, name)
        if state == "pending":
            continue
        checked += 1
        problems = [why] if state == "damaged" else verify(store, name)
        if problems:
            damaged[name] = problems
            for p in problems:
                print(f"FAIL {p}")
        else:
            print(f"ok   {name}")
    if not checked:
        print(f"no committed stage in {store.uri}")
    if damaged and a.fix:
        return _repair(store, damaged)
    if damaged:
        print(f"{len(damaged)} stage(s) damaged: `bezoar repair --run {a.run}` moves them aside so they rerun")
    return 1 if damaged else 0


def cmd_repair(a: argparse.Namespace) -> int:
    """Move every damaged stage aside (a manifest that does not parse or has a field of the wrong type,
    a file that differs from its manifest) so that the next `bezoar run` reruns it; remove what
    interrupted writes left."""
    store = open_store(a.run)
    damaged: dict[str, list[str]] = {}
    for name in CANONICAL:
        state, _, why = manifest_state(store, name)
        if state == "damaged":
            damaged[name] = [why]
        elif state == "committed":
            problems = verify(store, name)
            if problems:
                damaged[name] = problems
    return _repair(store, damaged)


def _repair(store: Store, damaged: dict[str, list[str]]) -> int:
    from .repair import repair_stage

    for name, problems in damaged.items():
        where = repair_stage(store, name, problems)
        print(f"moved {name} aside to {where} ({problems[0]}); it reruns on the next `bezoar run`")
    from .repair import clean_leftovers

    for name, n in clean_leftovers(store).items():
        print(f"removed {n} temporary object(s) an interrupted write left under {store.url(name)}")
    if not damaged:
        print(f"nothing to repair in {store.uri}")
    return 0


def _image_digests(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for p in pairs or []:
        family, sep, digest = p.partition("=")
        if not sep or family not in ("data", "train", "eval"):
            raise BadInput(f"--image-digest {p!r}: expected data|train|eval=sha256:<64 hex digits>")
        out[family] = digest
    return out


def cmd_render(a: argparse.Namespace) -> int:
    from .executors.cluster import load_cluster_settings
    from .executors.jobs import render

    _, text = load_recipe(a.recipe)  # never render Jobs for an invalid recipe; it picks each stage's keys
    cluster = load_cluster_settings(a.cluster)
    written = render(run_uri=a.run, run_id=run_id_of(a.run, a.run_id), cluster=cluster, out_dir=a.out,
                     image_digests=_image_digests(a.image_digest), recipe_text=text, recipe_source=a.recipe)
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
    # a local run (no --cluster, and no Kubernetes to reach): the mark alone stops it (its `bezoar run` looks
    # for it every few seconds); asking for a cluster's Jobs failed after the mark was written
    kube = bool(a.cluster or os.environ.get("KUBERNETES_SERVICE_HOST") or os.environ.get("KUBECONFIG")
                or os.path.exists(os.path.expanduser("~/.kube/config")))
    return cancel(run_uri=a.run, run_id=run_id_of(a.run, a.run_id), cluster=cluster, undo=a.undo, delete_jobs=kube)


# ---- argument parsing ---------------------------------------------------------------------------
def _at_least_one(text: str) -> int:
    """An argparse type: an integer >= 1 (a bad one is a usage error, exit 2)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not allowed: it must be at least 1")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bezoar", description="OpenBezoar instruction tuning as stage jobs")
    p.add_argument("--version", action="version", version=f"bezoar-jobs {__version__}")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="json: one JSON object per log event (stage, phase, counts, rates), for log stacks")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("stage", help="run one stage to commit")
    s.add_argument("name", choices=CANONICAL, metavar="NAME")
    s.add_argument("--recipe", required=True, help="recipe file or URI (Jobs use <run>/recipe.yaml)")
    s.add_argument("--run", required=True, help="run location: a path, file:// or s3://bucket/prefix")
    s.add_argument("--shard", help="i/N: do slice i of N (records only; the run without --shard commits)")
    s.add_argument("--force", action="store_true", help="rerun even when committed and unchanged (generation and "
                   "filter stages reuse the teacher/judge answers already recorded; training and evaluation restart)")
    add_flags(s)
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
    r.add_argument("--parallel", type=_at_least_one, default=1, metavar="N",
                   help="local executor: up to N independent stages side by side (N >= 1)")
    r.add_argument("--nproc-per-node", type=_at_least_one, default=1, metavar="N",
                   help="local executor: each training stage on N processes (torch.distributed.run)")
    r.add_argument("--refreeze", action="store_true",
                   help="kubernetes executor: replace a frozen recipe that differs (it is otherwise written once)")
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

    v = sub.add_parser("verify", help="re-hash every committed file against its manifest; report every problem")
    v.add_argument("--run", required=True)
    v.add_argument("--fix", action="store_true", help="then repair: move the damaged stages aside so they rerun")
    v.set_defaults(fn=cmd_verify)

    rr = sub.add_parser("repair", help="move damaged stages aside (they rerun) and remove half-written files")
    rr.add_argument("--run", required=True)
    rr.set_defaults(fn=cmd_repair)

    rd = sub.add_parser("render", help="write one Kubernetes Job manifest per stage")
    rd.add_argument("--recipe", required=True)
    rd.add_argument("--cluster", required=True)
    rd.add_argument("--run", required=True)
    rd.add_argument("--run-id")
    rd.add_argument("--out", required=True)
    rd.add_argument("--image-digest", action="append", metavar="FAMILY=sha256:...",
                    help="pin the data, train or eval image by digest (repeatable; or images.digests in --cluster)")
    rd.set_defaults(fn=cmd_render)

    rp = sub.add_parser("report", help="rebuild <run>/report/ (HTML + Markdown) from what is committed")
    rp.add_argument("--run", required=True)
    rp.set_defaults(fn=cmd_report)

    c = sub.add_parser("cancel", help="cancel the run: mark it cancelled, delete its Kubernetes Jobs")
    c.add_argument("--run", required=True)
    c.add_argument("--run-id")
    c.add_argument("--cluster")
    c.add_argument("--undo", action="store_true", help="lift the cancel: controllers of the run may start again")
    c.set_defaults(fn=cmd_cancel)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and not isinstance(sys.stderr, _SurvivingStream):  # the program, not a caller in process
        sys.stdout = _SurvivingStream(sys.stdout)
        sys.stderr = _SurvivingStream(sys.stderr)
    _setup_logging(args.verbose, args.log_format)
    try:
        if args.command != "render":  # render only writes the run URI into the Jobs it renders
            from .run_control import check_run_location

            check_run_location(getattr(args, "run", None))
        return int(args.fn(args) or 0)
    except BezoarError as e:
        log.error("%s", e)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception:  # a bug or an unexpected failure: retryable by contract, with the traceback
        sys.stderr.write(redact.redact(traceback.format_exc()))
        return 1


if __name__ == "__main__":
    sys.exit(main())
