"""Stage selection over the canonical order."""

from __future__ import annotations

import pytest

from bezoar_jobs.errors import BadInput
from bezoar_jobs.pipeline import in_dependency_order, select, waits_for
from bezoar_jobs.registry import CANONICAL, STAGES, StageDef

DATA = ["generate-lamini", "generate-evol", "generate-orca", "filter-lamini", "filter-evol", "filter-orca"]


def test_canonical_order_starts_with_the_data_stages():
    assert list(CANONICAL[:6]) == DATA


def test_from_until_are_inclusive():
    assert select("generate-orca", "filter-evol") == ["generate-orca", "filter-lamini", "filter-evol"]
    assert select(until="generate-lamini") == ["generate-lamini"]
    assert select() == list(CANONICAL)


def test_only_keeps_canonical_order():
    assert select(only=["filter-orca", "generate-lamini"]) == ["generate-lamini", "filter-orca"]


@pytest.mark.parametrize(
    "kw",
    [
        {"from_": "nope"},
        {"only": ["x"]},
        {"from_": "filter-orca", "until": "generate-lamini"},
        {"only": ["generate-evol"], "from_": "generate-evol"},
    ],
)
def test_bad_selection(kw):
    with pytest.raises(BadInput):
        select(**kw)


def test_stages_wait_for_their_selected_inputs():
    assert [waits_for(s, DATA) for s in DATA[:3]] == [[], [], []]
    assert [waits_for(s, DATA) for s in DATA[3:]] == [[g] for g in DATA[:3]]
    # inputs outside the selection count as already committed
    assert waits_for("filter-evol", ["filter-evol"]) == []
    # the report reads the whole run: it waits for every other selected stage
    assert waits_for("report", [*DATA, "report"]) == DATA
    # the dependency order puts every input first, though the canonical order lists sft-evol before
    # sft-orca (the default chain is lamini, orca, evol)
    order = in_dependency_order(CANONICAL)
    for name in CANONICAL:
        for inp in STAGES[name].inputs:
            assert order.index(inp) < order.index(name)
    assert order.index("sft-orca") < order.index("sft-evol")
    assert CANONICAL.index("sft-evol") < CANONICAL.index("sft-orca")


def test_force_restarts_training_work_but_keeps_paid_for_records(tmp_path, monkeypatch):
    """--force clears a training stage's _work/ (checkpoints) but keeps a generate stage's records."""
    from pathlib import Path

    from bezoar_jobs import runner
    from bezoar_jobs.recipe import load_recipe
    from bezoar_jobs.store import open_store

    recipe, _ = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml")
    store = open_store(tmp_path / "run")
    seen: dict[str, list[str]] = {}

    def fake_stage(ctx):
        seen[ctx.name] = ctx.work.list()
        ctx.work.put_bytes("checkpoints/step-5/COMPLETE", b"")
        (ctx.out / "marker.txt").write_text(ctx.name)
        return runner.StageOutput(counts={"ok": 1})

    monkeypatch.setattr(StageDef, "function", lambda self: fake_stage)
    for name in ("generate-orca", "dpo"):
        if name == "dpo":  # its input must be committed
            monkeypatch.setattr(runner, "input_hashes", lambda store, name, recipe=None: {})
        assert runner.run_stage(name, recipe, store) == 0
        assert runner.run_stage(name, recipe, store) == 0  # committed: returns at once
        assert runner.run_stage(name, recipe, store, force=True) == 0
    assert seen["generate-orca"] == ["checkpoints/step-5/COMPLETE"]  # records kept for the rerun
    assert seen["dpo"] == []  # training restarted from scratch


def test_evaluation_reads_the_checkpoints_the_recipe_evaluates():
    """A checkpoint evaluated is an input (ordered before, hashed, so a retrained one re-evaluates);
    one not evaluated is not required."""
    from bezoar_jobs.pipeline import stage_inputs
    from bezoar_jobs.recipe import parse_recipe

    base = ("schema_version: 1\nname: t\nteacher: {backend: local, model: m}\njudge: {backend: local, model: m}\n"
            "student: {model: m}\n")
    r = parse_recipe(base + "evaluation: {checkpoints: [dpo, base, sft-lamini]}\n")
    for stage in ("eval-harness", "eval-mtbench"):
        assert stage_inputs(stage, r) == ("sft-lamini", "dpo")  # canonical order, base needs no stage
        assert stage_inputs(stage) == ("sft-evol", "sft-hh", "dpo")  # without a recipe: the default list
    # "sft" is OpenBezoar-SFT: the last scheme stage of the recipe's order
    custom = parse_recipe(
        base + "training: {sft_order: [evol, lamini, orca]}\nevaluation: {checkpoints: [base, sft]}\n"
    )
    assert stage_inputs("eval-harness", custom) == ("sft-orca",)
    with pytest.raises(BadInput, match="names one stage twice"):
        parse_recipe(base + "evaluation: {checkpoints: [sft, sft-evol]}\n")
    assert waits_for("eval-harness", ["sft-lamini", "dpo", "eval-harness"], r) == ["sft-lamini", "dpo"]
    only_base = parse_recipe(base + "evaluation: {checkpoints: [base]}\n")
    assert stage_inputs("eval-harness", only_base) == ()
    default = parse_recipe(base)
    assert stage_inputs("eval-mtbench", default) == STAGES["eval-mtbench"].inputs
