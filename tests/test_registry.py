"""The stage registry is the one place a stage is declared: everything else derives from it, and a
broken declaration is caught."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from bezoar_jobs import registry
from bezoar_jobs.cli import build_parser
from bezoar_jobs.executors.cluster import ALL_STAGES, STAGE_FAMILIES, ClusterSettings
from bezoar_jobs.executors.jobs import render_jobs
from bezoar_jobs.recipe import Recipe
from bezoar_jobs.registry import CANONICAL, EVALUATIONS, SCHEMES, STAGES, STAGES_LIST, StageDef, check

REPO = Path(__file__).resolve().parents[1]

# the canonical order as README.md ("What a run looks like") lists it
DESIGN_ORDER = ["generate-lamini", "generate-evol", "generate-orca", "filter-lamini", "filter-evol", "filter-orca",
                "sft-lamini", "sft-evol", "sft-orca", "sft-hh", "dpo", "eval-harness", "eval-mtbench", "report"]


def test_the_canonical_order_is_designs():
    assert list(CANONICAL) == DESIGN_ORDER


def test_the_registry_is_sound():
    assert check(STAGES_LIST) == []


@pytest.mark.parametrize("broken, problem", [
    (lambda s: [*s, s[0]], "declared twice"),
    (lambda s: [dataclasses.replace(s[0], inputs=("dpo",)), *s[1:]], "the inputs form a cycle: generate-lamini -> dpo"),
    (lambda s: [dataclasses.replace(s[0], inputs=("nope",)), *s[1:]], "input 'nope' is not a declared stage"),
    (lambda s: [dataclasses.replace(s[0], needs=("oracle",)), *s[1:]], "unknown server"),
    (lambda s: [*s[:-1], dataclasses.replace(s[-1], inputs=("dpo",))], "declares no inputs"),
    (lambda s: [dataclasses.replace(s[0], unhashed=("seed",)), *s[1:]], "both hashed and unhashed"),
    (lambda s: [dataclasses.replace(s[0], scheme="orca"), *s[1:]], "is named <family>-orca"),
])
def test_a_broken_registry_is_caught(broken, problem):
    assert any(problem in p for p in check(tuple(broken(list(STAGES_LIST)))))


def _field_exists(model: type[BaseModel], dotted: str) -> bool:
    cls: Any = model
    for key in dotted.split("."):
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or key not in cls.model_fields:
            return False
        ann = cls.model_fields[key].annotation
        # Optional[Section] / Section: walk into the model; anything else ends the path
        args = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        cls = ann if isinstance(ann, type) else (args[0] if args else None)
    return True


@pytest.mark.parametrize("stage", STAGES_LIST, ids=lambda s: s.name)
def test_every_declared_field_is_a_recipe_field(stage: StageDef):
    for dotted in stage.readable:
        assert _field_exists(Recipe, dotted), f"{stage.name} declares {dotted!r}, which the recipe does not have"


def test_a_misspelt_declaration_is_caught():
    assert not _field_exists(Recipe, "filter.decodng") and not _field_exists(Recipe, "generation.lamini.nope")


@pytest.mark.parametrize("stage", STAGES_LIST, ids=lambda s: s.name)
def test_every_stage_function_and_estimate_resolves(stage: StageDef):
    assert callable(stage.function())
    if stage.estimate:
        assert callable(registry.load_attr(stage.estimate))
    if stage.family in ("generate", "filter"):
        assert stage.estimate, f"{stage.name} sends requests: `bezoar plan` needs its estimate"


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_each_scheme_module_provides_what_the_stages_use(scheme):
    mod = scheme.load()
    for name in ("generate", "judge_pair", "judge_tokens", "estimate", "expected_rows", "TRAIN_COLUMNS"):
        assert hasattr(mod, name), f"{scheme.module} lacks {name}"
    assert [f"{f}-{scheme.name}" in STAGES for f in ("generate", "filter", "sft")] == [True] * 3


@pytest.mark.parametrize("ev", EVALUATIONS, ids=lambda e: e.name)
def test_each_evaluation_module_provides_what_the_report_and_plan_use(ev):
    mod = ev.load()
    assert callable(mod.run) and callable(mod.report_section)
    assert hasattr(mod, "estimate") == ev.sends_requests


def test_cluster_settings_cli_and_manifests_derive_from_the_registry():
    assert ALL_STAGES == CANONICAL
    assert STAGE_FAMILIES == {s.name: s.pod for s in STAGES_LIST}
    stage_cmd = next(a for a in build_parser()._subparsers._group_actions[0].choices["stage"]._actions  # type: ignore[union-attr]
                     if a.dest == "name")
    assert tuple(stage_cmd.choices) == CANONICAL
    assert set(render_jobs("s3://b/runs/r", None, ClusterSettings())) == {f"{s}.yaml" for s in CANONICAL}
    assert sorted(p.stem for p in (REPO / "manifests" / "jobs").glob("*.yaml")) == sorted(CANONICAL)


def test_a_fourth_scheme_is_one_line_in_the_registry(monkeypatch):
    """What a new scheme gets from one Scheme(...) line: its three stages, in place, wired."""
    extra = registry.Scheme("alpaca", "bezoar_jobs.schemes.lamini", "seeds.dolly")
    monkeypatch.setattr(registry, "SCHEMES", (*registry.SCHEMES, extra))
    stages = {s.name: s for s in registry._build()}
    assert {"generate-alpaca", "filter-alpaca", "sft-alpaca"} <= set(stages)
    assert stages["filter-alpaca"].inputs == ("generate-alpaca",)
    # it trains after the paper's three (lamini, orca, evol)
    assert stages["sft-alpaca"].inputs == ("filter-alpaca", "sft-evol")
    assert stages["sft-hh"].inputs == ("sft-alpaca",)
    assert check(tuple(stages.values())) == []


def test_the_default_training_chain_is_lamini_orca_evol():
    """The model card's order and the authors' checkpoint name (docs/recipe.md); the canonical order
    (what --from/--until cut) stays DESIGN's."""
    assert registry.DEFAULT_SFT_ORDER == ("lamini", "orca", "evol")
    assert STAGES["sft-lamini"].inputs == ("filter-lamini",)
    assert STAGES["sft-orca"].inputs == ("filter-orca", "sft-lamini")
    assert STAGES["sft-evol"].inputs == ("filter-evol", "sft-orca")
    assert STAGES["sft-hh"].inputs == ("sft-evol",)
    assert Recipe.model_fields["training"].default.sft_order == ("lamini", "orca", "evol")
    # OpenBezoar-SFT, the first model evaluated after the base, is the last of the chain
    assert registry.resolve_checkpoint("sft", None) == "sft-evol"
    assert STAGES["eval-harness"].inputs == ("sft-evol", "sft-hh", "dpo")
    for name in ("openbezoar.yaml", "demo.yaml"):
        from bezoar_jobs.recipe import load_recipe

        r, _ = load_recipe(REPO / "recipes" / name)
        assert r.training.sft_order == ("lamini", "orca", "evol"), name
        assert r.evaluated_checkpoints()[1] == "sft-evol", name
