"""What a run has committed, and whether each committed stage is still current.

A stage is current when its manifest exists and is readable, its committed files are what the
manifest lists (a listing: sizes and change tokens; a changed token is confirmed by hashing), its
parameter hash (the hash of exactly the recipe fields its registry entry declares) matches the
recipe, and the manifest hashes of its inputs match what it was built from. A stage whose manifest is
damaged or whose files were changed after commit is not current: ``bezoar run`` reruns it (and so
everything downstream) instead of handing damaged data on. A stage that reads the whole run (the
report) is current while every stage committed now is the one it was built from. Both schedulers,
``bezoar plan``, ``bezoar status`` and the runner decide with these functions; none of them imports a
stage.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .errors import BadInput
from .layout import RECIPE_FILE, manifest_path, work_prefix
from .manifest import manifest_hash, manifest_state, quick_check, read_manifest
from .pipeline import in_dependency_order, stage_inputs, waits_for
from .registry import CANONICAL, STAGES, spec
from .source_files import changed
from .store import Store

if TYPE_CHECKING:
    from .recipe import Recipe

log = logging.getLogger("bezoar")

# Families whose _work/ survives --force: their records are paid-for teacher and judge answers,
# keyed by the parameter hash, so a forced rerun re-parses and re-filters without paying again.
KEEP_WORK_ON_FORCE = frozenset({"generate", "filter"})


def params_hash(recipe: Recipe, stage: str) -> str:
    """The stage's parameter key: the hash of the recipe fields it declares (registry ``reads``)."""
    return str(recipe.section_hash(*spec(stage).reads))


def input_hashes(store: Store, name: str, recipe: Recipe | None = None) -> dict[str, str]:
    """Manifest hash of every input stage (BadInput naming the first one not committed)."""
    out = {}
    for inp in stage_inputs(name, recipe):
        m = read_manifest(store, inp)
        if m is None:
            raise BadInput(f"{name}: input stage {inp!r} is not committed in {store.uri}")
        out[inp] = manifest_hash(m)
    return out


def built_from(store: Store) -> dict[str, str]:
    """Manifest hash of every committed stage that a whole-run reader (the report) reads."""
    out = {}
    for name in CANONICAL:
        if STAGES[name].reads_whole_run:
            continue
        _, m, _ = manifest_state(store, name)
        if m is not None:
            out[name] = manifest_hash(m)
    return out


def up_to_date(store: Store, recipe: Recipe, name: str) -> tuple[bool, str]:
    """Whether the committed output of ``name`` matches the recipe and inputs, and why not."""
    state, m, _ = manifest_state(store, name)
    if state == "damaged":
        return False, "its manifest is damaged (it reruns)"
    if m is None:
        return False, "not committed"
    if m.get("params_hash") != params_hash(recipe, name):
        return False, "recipe parameters changed"
    edited = changed(m.get("input_files"))  # a seed file or template edited in place (source_files.py)
    if edited:
        return False, f"{edited}: it reruns"
    problems = quick_check(store, name, m)
    if problems:
        more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
        return False, f"committed files differ from its manifest ({problems[0]}{more}): it reruns"
    if spec(name).reads_whole_run:
        if m.get("built_from") != built_from(store):
            return False, f"stages were committed or changed since the {name} was built"
        return True, "committed, built from the current stages"
    for inp in stage_inputs(name, recipe):
        istate, im, _ = manifest_state(store, inp)
        if istate == "damaged":
            return False, f"input {inp}'s manifest is damaged"
        if im is None:
            return False, f"input {inp} not committed"
        if m.get("inputs", {}).get(inp) != manifest_hash(im):
            return False, f"input {inp} changed"
    return True, "committed, parameters and inputs unchanged"


def planned_actions(store: Store, recipe: Recipe, stages: list[str], force: bool = False) -> dict[str, tuple[str, str]]:
    """``{stage: ("run" | "skip", why)}``: what ``bezoar run`` would do with the selected stages.

    A stage downstream of one that reruns runs too ("an input stage reruns"), whatever its own
    manifest says: its inputs are about to change. This is the schedulers' rule, decided ahead.
    """
    out: dict[str, tuple[str, str]] = {}
    for name in in_dependency_order(stages, recipe):
        if force:
            out[name] = ("run", "--force")
            continue
        rerun = [d for d in waits_for(name, stages, recipe) if out.get(d, ("skip",))[0] == "run"]
        if rerun:
            more = f" and {len(rerun) - 3} more" if len(rerun) > 3 else ""
            out[name] = ("run", f"an input stage reruns ({', '.join(rerun[:3])}{more})")
            continue
        ok, why = up_to_date(store, recipe, name)
        out[name] = ("skip" if ok else "run", why)
    return {n: out[n] for n in stages}


def prepare_force(store: Store, name: str, holder: str | None = None) -> None:
    """What ``--force`` does before a stage reruns, whichever executor runs it: remove its manifest
    and, except for the data stages (whose records are paid-for answers), its ``_work/`` (training
    restarts from its base model, evaluation re-scores). Refused while another process holds the
    stage's lease (``holder``: the lease id of the caller, who may)."""
    from .lease import check_free

    check_free(store, name, holder)
    store.delete(manifest_path(name))
    if spec(name).family not in KEEP_WORK_ON_FORCE:
        store.delete_prefix(work_prefix(name) + "/")


def stage_state(store: Store, name: str) -> str:
    """committed | damaged (its manifest does not parse) | partial (work under _work/) | pending."""
    state, _, _ = manifest_state(store, name)
    if state in ("committed", "damaged"):
        return state
    return "partial" if store.list(work_prefix(name) + "/") else "pending"


def freeze_recipe(store: Store, text: str, source: str = "<recipe>") -> None:
    """Write the recipe into ``<run>/recipe.yaml`` when the run starts.

    Every stage of a run reads this frozen copy, so concurrent runs never share a mutable file. A
    run that already has a different frozen recipe keeps running with the new one only when the
    caller asked for it (``bezoar run`` refreezes: changed parameters then make the affected
    stages rerun, which is what the parameter hashes are for).
    """
    from .recipe import parse_recipe

    parse_recipe(text, source)  # never freeze an invalid recipe
    store.write_text(RECIPE_FILE, text)
