"""A stage's parameter hash covers exactly the recipe fields it reads, and it cannot read others.

- For every stage and every field it declares, changing that field (on the paper recipe and on the
  demo) changes the hash of exactly the stages that declare it; changing an unhashed field changes
  none.
- The recipe a stage sees is a view that refuses undeclared fields (the generate-evol bug: it read
  ``filter.decoding`` without hashing it).
- ``bezoar plan`` follows a rerun downstream, as ``bezoar run`` does.
"""

from __future__ import annotations

import copy
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from bezoar_jobs.manifest import CommitInfo, commit
from bezoar_jobs.pipeline import downstream, stage_inputs
from bezoar_jobs.recipe import Recipe, load_recipe
from bezoar_jobs.recipe_view import UndeclaredRead, covered, view
from bezoar_jobs.registry import CANONICAL, STAGES, STAGES_LIST, StageDef
from bezoar_jobs.state import built_from, params_hash, planned_actions
from bezoar_jobs.store import open_store

REPO = Path(__file__).resolve().parents[1]
RECIPES = {p.name: load_recipe(p)[0] for p in sorted((REPO / "recipes").glob("*.yaml"))}

# Values for fields whose default cannot be mutated by a generic rule (an empty list of models, an
# unset optional section): a valid other value.
OVERRIDES: dict[str, Any] = {
    "evaluation.baselines": [{"name": "released", "model": "org/model"}],
    "training.push": {"repo_prefix": "org/name"},
    "training.dpo.data": {"path": "org/pairs"},
    "training.dpo.lora": {"r": 4},
    "evaluation.mtbench.judge": {"backend": "anthropic", "model": "claude-x"},
    "evaluation.mtbench.reference_answers": {"path": "org/refs"},
    "evaluation.mtbench.categories": ["math"],
    "generation.lamini.topics": {"path": "org/topics"},
    "training.attention": "sdpa",
    "training.report_to": ["tensorboard"],
    "training.stage_args": {"sft-hh": {"learning_rate": 1e-4}},
}


def _unwrap(ann: Any) -> list[Any]:
    """The alternatives of an annotation (Optional/Union/Annotated flattened)."""
    origin = typing.get_origin(ann)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(ann)[0])
    if origin in (typing.Union, types.UnionType):
        return [x for a in typing.get_args(ann) for x in _unwrap(a)]
    return [ann]


def _candidates(ann: Any, value: Any) -> list[Any]:
    out: list[Any] = []
    for alt in _unwrap(ann):
        if typing.get_origin(alt) is Literal:
            out += [v for v in typing.get_args(alt) if v != value]
    if isinstance(value, bool):
        out.append(not value)
    elif isinstance(value, int):
        out += [value + 1, max(1, value // 2)]
    elif isinstance(value, float):
        out += [round(value * 0.5, 6) if value else 0.5, round(value + 0.05, 6)]
    elif isinstance(value, str):
        out += [value + "-x", "x"]
    elif isinstance(value, list):
        out += [value[::-1]] if len(value) > 1 else []
        out += [value[:-1]] if value else []
        out += [value + value[:1]] if value else []
    elif isinstance(value, dict):
        out.append({**value, "zz_changed": 1})  # a pass-through mapping (TRL/PEFT keys are checked later)
    elif value is None:
        out += ["x", 1, 0.5, True]
    return [c for c in out if c != value]


def _annotation(model: type[BaseModel], path: list[str]) -> Any:
    cls: Any = model
    ann: Any = None
    for key in path:
        models = [a for a in _unwrap(cls) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not models or key not in models[0].model_fields:
            return None
        ann = models[0].model_fields[key].annotation
        cls = ann
    return ann


def _get(data: Any, path: list[str]) -> Any:
    for k in path:
        data = data[k]
    return data


def _set(data: Any, path: list[str], value: Any) -> None:
    for k in path[:-1]:
        data = data[k]
    data[path[-1]] = value


def _leaves(data: Any, path: list[str]) -> list[list[str]]:
    """Paths to try under ``path``: itself, or its scalar leaves when it is a section."""
    value = _get(data, path)
    ann = _annotation(Recipe, path)
    is_model = any(isinstance(a, type) and issubclass(a, BaseModel) for a in _unwrap(ann))
    if isinstance(value, dict) and is_model:
        return [p for k in value for p in _leaves(data, [*path, k])]
    return [path]


def mutate(recipe: Recipe, dotted: str) -> tuple[Recipe, str]:
    """A valid recipe that differs from ``recipe`` in one leaf under ``dotted``; (recipe, leaf path)."""
    base = recipe.model_dump(mode="json")
    tries: list[tuple[list[str], Any]] = []
    if dotted in OVERRIDES:
        tries.append((dotted.split("."), OVERRIDES[dotted]))
    for leaf in _leaves(base, dotted.split(".")):
        value = _get(base, leaf)
        tries += [(leaf, c) for c in _candidates(_annotation(Recipe, leaf), value)]
    for leaf, value in tries:
        data = copy.deepcopy(base)
        _set(data, leaf, value)
        try:
            new = Recipe.model_validate(data)
        except Exception:
            continue
        if json.dumps(new.model_dump(mode="json"), sort_keys=True) != json.dumps(base, sort_keys=True):
            return new, ".".join(leaf)
    raise AssertionError(f"no valid change found for {dotted}")


def _hashed_by(leaf: str) -> set[str]:
    return {s.name for s in STAGES_LIST if any(covered(leaf, [r]) or r.startswith(leaf + ".") for r in s.reads)}


CASES = sorted({(name, f) for name in RECIPES for s in STAGES_LIST for f in (*s.reads, *s.unhashed)})


@pytest.mark.parametrize("recipe_name, field", CASES, ids=[f"{r}:{f}" for r, f in CASES])
def test_changing_a_field_changes_the_hash_of_exactly_the_stages_reading_it(recipe_name, field):
    recipe = RECIPES[recipe_name]
    changed, leaf = mutate(recipe, field)
    moved = {s for s in CANONICAL if params_hash(recipe, s) != params_hash(changed, s)}
    assert moved == _hashed_by(leaf), f"{leaf}: hashes moved for {sorted(moved)}"
    if any(field in s.unhashed for s in STAGES_LIST):
        assert moved == set(), f"{field} is declared unhashed, yet it moved {sorted(moved)}"
    else:
        assert moved, f"{field} is declared but moves no stage's hash"


def test_generate_evol_reruns_when_the_filter_decoding_changes():
    """The bug of issue 9: generate-evol asks its equality checks with filter.decoding but hashed
    without it, so a stale generate-evol was skipped after that change."""
    recipe = RECIPES["openbezoar.yaml"]
    data = recipe.model_dump(mode="json")
    data["filter"]["decoding"]["temperature"] = 0.2
    changed = Recipe.model_validate(data)
    moved = {s for s in CANONICAL if params_hash(recipe, s) != params_hash(changed, s)}
    assert moved == {"generate-evol", "filter-lamini", "filter-evol", "filter-orca"}


def test_the_filter_retry_temperature_is_a_recipe_field_in_the_filters_hash():
    recipe = RECIPES["openbezoar.yaml"]
    data = recipe.model_dump(mode="json")
    assert data["filter"]["retry_temperature"] == 0.7
    data["filter"]["retry_temperature"] = 0.9
    changed = Recipe.model_validate(data)
    assert {s for s in CANONICAL if params_hash(recipe, s) != params_hash(changed, s)} == {
        "filter-lamini", "filter-evol", "filter-orca"}


# ---------------------------------------------------------------------------------------------
# the view
# ---------------------------------------------------------------------------------------------
def test_a_stage_cannot_read_a_field_it_does_not_declare():
    r = RECIPES["openbezoar.yaml"]
    lamini = view(r, "generate-lamini", STAGES["generate-lamini"].readable)
    assert lamini.generation.lamini.examples_per_prompt == r.generation.lamini.examples_per_prompt
    assert lamini.teacher is r.teacher and lamini.seed == r.seed and lamini.name == r.name
    with pytest.raises(UndeclaredRead, match=r"stage generate-lamini reads recipe field 'filter'"):
        _ = lamini.filter
    with pytest.raises(UndeclaredRead, match=r"generation\.evol"):
        _ = lamini.generation.evol
    with pytest.raises(UndeclaredRead, match="model_dump"):
        lamini.generation.model_dump()
    evol = view(r, "generate-evol", STAGES["generate-evol"].readable)
    assert evol.filter.decoding == r.filter.decoding  # declared since issue 9
    with pytest.raises(UndeclaredRead, match=r"filter\.threshold"):
        _ = evol.filter.threshold
    # the recipe's helpers run against the view: what they read is checked too
    sft = view(r, "sft-lamini", STAGES["sft-lamini"].readable)
    assert sft.training.stage_sft_args("sft-lamini") == r.training.stage_sft_args("sft-lamini")
    dpo = view(r, "dpo", STAGES["dpo"].readable)
    assert dpo.training.dpo_lora() == r.training.dpo_lora()
    with pytest.raises(UndeclaredRead, match=r"training\.sft_args"):
        dpo.training.stage_sft_args("sft-hh")
    with pytest.raises(TypeError):
        lamini.seed = 1


def test_a_stage_reading_an_undeclared_field_fails_in_the_runner(tmp_path, monkeypatch):
    from bezoar_jobs import runner

    def sneaky(ctx: Any) -> Any:
        return ctx.recipe.filter.decoding  # generate-orca does not read the filter

    monkeypatch.setattr(StageDef, "function", lambda self: sneaky)
    with pytest.raises(UndeclaredRead, match="generate-orca reads recipe field 'filter'"):
        runner.run_stage("generate-orca", RECIPES["demo.yaml"], open_store(tmp_path / "run"))


# ---------------------------------------------------------------------------------------------
# plan follows reruns downstream
# ---------------------------------------------------------------------------------------------
def _commit_all(store: Any, recipe: Recipe, tmp: Path) -> None:
    """Every stage committed as the runner would (real parameter and input hashes)."""
    from bezoar_jobs.pipeline import in_dependency_order
    from bezoar_jobs.state import input_hashes

    for name in in_dependency_order(CANONICAL, recipe):
        out = tmp / name
        out.mkdir(parents=True)
        (out / "x.txt").write_text(name)
        extra = {"built_from": built_from(store)} if STAGES[name].reads_whole_run else {}
        commit(store, out, CommitInfo(name, params_hash(recipe, name), input_hashes(store, name, recipe),
                                      {}, {"seconds": 0.0}, extra))


def test_plan_marks_every_stage_downstream_of_a_rerun(tmp_path):
    recipe = RECIPES["openbezoar.yaml"]
    store = open_store(tmp_path / "run")
    _commit_all(store, recipe, tmp_path / "out")
    assert {a for a, _ in planned_actions(store, recipe, list(CANONICAL)).values()} == {"skip"}
    data = recipe.model_dump(mode="json")
    data["filter"]["decoding"]["max_new_tokens"] = 300
    changed = Recipe.model_validate(data)
    actions = planned_actions(store, changed, list(CANONICAL))
    direct = {"generate-evol", "filter-lamini", "filter-evol", "filter-orca"}
    expected = direct | {d for s in direct for d in downstream(s, changed)}
    assert {s for s, (a, _) in actions.items() if a == "run"} == expected
    assert expected >= {"sft-lamini", "dpo", "eval-harness", "report"} and "generate-lamini" not in expected
    assert actions["sft-lamini"] == ("run", "an input stage reruns (filter-lamini)")
    assert actions["generate-evol"] == ("run", "recipe parameters changed")
    assert actions["generate-orca"][0] == "skip"
    from bezoar_jobs.plan import plan

    rows = {r["stage"]: r for r in plan(changed, store, list(CANONICAL))}
    assert rows["sft-orca"]["action"] == "run" and "an input stage reruns" in rows["sft-orca"]["why"]
    assert rows["generate-orca"]["action"] == "skip" and rows["generate-orca"]["requests"] == 0


def test_downstream_follows_the_recipes_training_order():
    r = RECIPES["demo.yaml"]
    data = r.model_dump(mode="json")
    data["training"]["sft_order"] = ["lamini", "orca", "evol"]
    other = Recipe.model_validate(data)
    assert stage_inputs("sft-evol", other) == ("filter-evol", "sft-orca")
    assert "sft-evol" in downstream("filter-orca", other) and "sft-orca" not in downstream("filter-evol", other)
