"""Stage ``report`` and ``bezoar report --run URI``: the run report (bezoar_jobs.report) committed
under ``<run>/report/``. The report reads the whole run: it is current while every committed stage
is the one it was built from (its manifest's ``built_from``, see bezoar_jobs.state)."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

from ..errors import BadInput
from ..layout import RECIPE_FILE
from ..report import write_report
from ..runner import StageContext, StageOutput, commit_output
from ..state import built_from, params_hash
from ..store import NotFoundInStore, open_store

log = logging.getLogger("bezoar")

STAGE = "report"


def run_report(ctx: StageContext) -> StageOutput:
    """The ``report`` stage: build from whatever the run has committed."""
    counts = write_report(ctx.store, ctx.out)
    log.info("report: %s (%s)", ctx.store.url(f"{STAGE}/index.html"),
             "partial run" if counts["partial"] else "complete run")
    return StageOutput(counts=counts, extra={"built_from": built_from(ctx.store)})


def build_report(run_uri: str) -> list[str]:
    """``bezoar report --run URI``: rebuild and commit ``<run>/report/``, whatever the run holds (a
    run without a readable recipe too: the report then says so); return the files' URLs."""
    from ..recipe import parse_recipe

    store = open_store(run_uri)
    ph, name = "", None
    try:
        recipe = parse_recipe(store.read_text(RECIPE_FILE), store.url(RECIPE_FILE))
        ph, name = params_hash(recipe, STAGE), recipe.name
    except (NotFoundInStore, BadInput):
        pass  # no (valid) frozen recipe: the report shows why; its manifest has no parameter key
    tmp = Path(tempfile.mkdtemp(prefix="bezoar-report-"))
    try:
        t0 = time.time()
        counts = write_report(store, tmp)
        result = StageOutput(counts=counts, extra={"built_from": built_from(store), "built_by": "bezoar report"})
        commit_output(store, STAGE, tmp, ph, {}, result, t0, name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [store.url(f"{STAGE}/index.html"), store.url(f"{STAGE}/report.md")]
