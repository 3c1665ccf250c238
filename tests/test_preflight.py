"""Before a run spends anything, the files its stages will read are looked at (bezoar_jobs/preflight.py).

`bezoar plan` used to exit 0 on a recipe naming a missing template or a broken seed file (its estimate fell back
to default sizes), and `bezoar run` found a bad filter rubric only once the generate stages had paid for their
data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bezoar_jobs.data.inputs import SOURCE_FIELDS, TEMPLATE_PLACEHOLDERS
from bezoar_jobs.errors import BadInput
from bezoar_jobs.preflight import check_inputs, files_read
from bezoar_jobs.recipe import Recipe, TemplateRef, load_recipe
from bezoar_jobs.recipe_base import DatasetSource
from tests.scripted import scripted_recipe

DEAD = "http://127.0.0.1:9"  # never contacted: everything here fails before the first request
GOOD = '{"instruction": "Name a colour.", "context": "", "response": "Red.", "category": "open_qa"}\n'


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BEZOAR_S3_"))}
    env["SCRIPTED_JUDGE_KEY"] = "test-key"
    return subprocess.run([sys.executable, "-m", "bezoar_jobs.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def error_line(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if " ERROR " in ln]
    assert len(errors) == 1, res.stderr[-3000:]
    return errors[0]


def test_plan_names_every_file_the_run_could_not_use_and_exits_2(tmp_path: Path):
    (tmp_path / "no_slots.txt").write_text("Write instructions like these.\n")
    (tmp_path / "dolly.jsonl").write_text(GOOD + '{"instruction": "Add", "context": ""}\n')  # line 2: no response
    r = scripted_recipe(tmp_path, DEAD, **{
        "generation.lamini.example_template": {"path": str(tmp_path / "missing.txt")},
        "generation.lamini.topic_template": {"path": str(tmp_path / "no_slots.txt")},
        "seeds.dolly.path": str(tmp_path / "dolly.jsonl"),
    })
    line = error_line(cli("plan", "--recipe", str(r), "--run", str(tmp_path / "run")))
    assert f"generation.lamini.example_template.path: {tmp_path / 'missing.txt'}" in line, line
    assert "generation.lamini.topic_template.path: template" in line and "lacks placeholder(s) {examples}" in line
    assert f"seeds.dolly: {tmp_path / 'dolly.jsonl'}:2" in line and "'response'" in line, line


def test_run_refuses_a_bad_filter_rubric_before_the_generate_stages_spend_anything(tmp_path: Path):
    (tmp_path / "rubric.txt").write_text("Rate this answer: {response}\n")  # no {instruction}
    r = scripted_recipe(tmp_path, DEAD, **{"filter.rubric_template": {"path": str(tmp_path / "rubric.txt")}})
    run = tmp_path / "run"
    line = error_line(cli("run", "--recipe", str(r), "--run", str(run), "--until", "filter-lamini"))
    assert "filter.rubric_template.path: template" in line and "lacks placeholder(s) {instruction}" in line, line
    started = [p.name for p in run.iterdir() if p.name.startswith(("generate-", "filter-"))] if run.exists() else []
    assert started == [], started  # the old code ran generate-lamini first (against the teacher)


def _refused(recipe: Recipe, stages: list[str]) -> BadInput:
    try:
        check_inputs(recipe, stages)
    except BadInput as e:
        return e
    raise AssertionError("not refused")


def _demo() -> Recipe:
    return load_recipe(str(Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"))[0]


def test_only_the_files_the_stages_to_run_read_are_looked_at(tmp_path: Path):
    recipe = _demo()
    missing = TemplateRef(path=str(tmp_path / "missing.txt"))
    broken = recipe.model_copy(update={"filter": recipe.filter.model_copy(
        update={"rubric_template": missing, "rating_template": missing})})
    assert "filter.rating_template" in str(_refused(broken, ["filter-lamini"]))  # what the next lines leave out
    check_inputs(broken, ["sft-lamini", "dpo", "report"])  # training and the report read no template
    check_inputs(broken, [])  # every stage committed and skipped: nothing is read
    read = files_read(recipe, ["filter-lamini"])
    # the demo's filter rates by token scores: its rating template is read, the rubric is not
    assert recipe.filter.method == "logprobs" and set(read) == {"filter.rating_template"}, read
    evol = files_read(recipe, ["generate-evol"])
    assert "generation.evol.templates_dir (breadth.txt)" in evol and "seeds.dolly" in evol, sorted(evol)


def test_every_template_and_seed_field_of_the_recipe_is_in_the_table():
    """A TemplateRef the table does not know would make the preflight fail with a KeyError; a seed file the table
    lacks would be read without its row checks."""
    from bezoar_jobs.preflight import _walk

    found = dict(_walk(_demo(), "recipe"))
    templates = {k.removeprefix("recipe.") for k, v in found.items() if isinstance(v, TemplateRef)}
    assert templates == set(TEMPLATE_PLACEHOLDERS) - {"generation.evol.templates_dir"}, templates
    sources = {k.removeprefix("recipe.") for k, v in found.items() if isinstance(v, DatasetSource)}
    assert set(SOURCE_FIELDS) <= sources, sources
    # the rest check their rows themselves: HH-RLHF skips and counts a bad pair, MT-Bench names a bad question
    assert sources - set(SOURCE_FIELDS) == {"training.hh.data", "evaluation.mtbench.questions"}, sources


def test_a_stage_loads_a_template_with_the_placeholders_the_preflight_checked(tmp_path: Path):
    """The stages and the preflight read one table (bezoar_jobs/data/inputs.py): a stage that named its
    placeholders at its own call could pass a template the preflight refused, or the other way round."""
    import pytest

    from bezoar_jobs.data.io import load_template

    t = tmp_path / "rubric.txt"
    t.write_text("Instruction: {instruction}\nAnswer: {response}\n")
    assert load_template(str(t), "filter.rubric_template").startswith("Instruction:")
    t.write_text("Instruction: {instruction}\n")
    with pytest.raises(BadInput, match=r"filter.rubric_template: template .* lacks placeholder\(s\) \{response\}"):
        load_template(str(t), "filter.rubric_template")
    t.write_text("Make it harder.\n")
    with pytest.raises(BadInput, match=r"lacks placeholder\(s\) \{instruction\}"):  # an operation's file
        load_template(str(t), "generation.evol.templates_dir (deepen.txt)")
