"""The local executor: runs each stage as a subprocess of ``bezoar stage`` on this machine.

Exactly the command a Kubernetes Job's container runs, so a pipeline that works here works there.
Independent stages may run side by side (``--parallel``); the default is one at a time, which is
what a 2-core laptop wants.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from ..pipeline import STAGES, stage_inputs
from ..recipe import Recipe
from ..runner import RECIPE_FILE, up_to_date
from ..store import Store

log = logging.getLogger("bezoar")


def stage_command(name: str, store: Store, force: bool = False, shard: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "bezoar_jobs.cli", "stage", name, "--recipe", store.url(RECIPE_FILE), "--run", store.uri]
    if shard:
        cmd += ["--shard", shard]
    if force:
        cmd.append("--force")
    return cmd


def _run_one(name: str, store: Store, force: bool) -> int:
    t0 = time.time()
    log.info("[%s] starting", name)
    proc = subprocess.Popen(stage_command(name, store, force), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=os.environ.copy())
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stderr.write(f"[{name}] {line}")
    rc = proc.wait()
    log.info("[%s] exit %d after %.1f s", name, rc, time.time() - t0)
    return rc


def run_local(recipe: Recipe, store: Store, stages: list[str], force: bool = False, parallel: int = 1) -> int:
    """Run ``stages`` (canonical order) to commit; return the first failing stage's exit code."""
    todo = []
    for name in stages:
        ok, why = up_to_date(store, recipe, name)
        if ok and not force:
            log.info("[%s] skipped: %s", name, why)
        else:
            todo.append(name)
    done: set[str] = set()
    running: dict[Future, str] = {}
    first_failure = 0
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        while todo or running:
            if not first_failure:
                for name in list(todo):
                    if len(running) >= parallel:
                        break
                    # the report reads whatever is committed, so it waits for every other stage
                    inputs = [n for n in stages if n != name] if STAGES[name].family == "report" else stage_inputs(name, recipe)
                    deps = [d for d in inputs if d in todo or d in running.values()]
                    if not deps:
                        todo.remove(name)
                        running[pool.submit(_run_one, name, store, force)] = name
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                name = running.pop(fut)
                rc = fut.result()
                if rc != 0 and not first_failure:
                    first_failure = rc
                    log.error("[%s] failed with exit code %d: stopping the pipeline", name, rc)
                done.add(name)
    return first_failure
