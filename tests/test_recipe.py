"""The typed recipe: every file in recipes/ loads, bad input names path, file and line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bezoar_jobs.errors import BadInput
from bezoar_jobs.recipe import load_recipe, parse_recipe
from bezoar_jobs.registry import CANONICAL
from bezoar_jobs.state import params_hash

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def test_recipes_dir_has_the_paper_and_the_demo():
    assert {p.name for p in RECIPES} >= {"openbezoar.yaml", "demo.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_hashes_every_stage(path):
    recipe, _ = load_recipe(path)
    assert recipe.schema_version == 1
    hashes = {stage: params_hash(recipe, stage) for stage in CANONICAL}
    assert all(len(h) == 64 for h in hashes.values())
    # a parameter a stage does not read must not change its key
    assert hashes["filter-lamini"] == hashes["filter-evol"]


def test_paper_recipe_values():
    r, _ = load_recipe(REPO / "recipes" / "openbezoar.yaml")
    assert r.teacher.model == "h2oai/h2ogpt-gm-oasst1-en-2048-falcon-40b-v2"
    assert r.teacher.backend == "tgi" and "<|prompt|>" in r.teacher.prompt_format
    assert r.student.model == "openlm-research/open_llama_3b_v2"
    assert r.judge.backend == "openai-chat"
    assert r.generation.lamini.examples_per_prompt == 3 and r.generation.lamini.instructions_per_prompt == 20


def _demo() -> dict:
    return yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())


def test_unknown_key_names_dotted_path_file_and_line(tmp_path):
    text = (REPO / "recipes" / "demo.yaml").read_text().replace("  evol:\n", "  evol:\n    roundz: 3\n", 1)
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    line = text.splitlines().index("    roundz: 3") + 1
    with pytest.raises(BadInput) as e:
        load_recipe(p)
    assert f"{p}:{line}: generation.evol.roundz: unknown key" in str(e.value)


def test_wrong_type_and_range(tmp_path):
    d = _demo()
    d["filter"]["threshold"] = 42
    d["generation"]["orca"]["seeds"] = "many"
    with pytest.raises(BadInput) as e:
        parse_recipe(yaml.safe_dump(d), "x.yaml")
    msg = str(e.value)
    assert "filter.threshold" in msg and "less than or equal to 10" in msg
    assert "generation.orca.seeds" in msg


def test_schema_version_missing_or_unsupported():
    d = _demo()
    d.pop("schema_version")
    with pytest.raises(BadInput, match="schema_version: missing"):
        parse_recipe(yaml.safe_dump(d), "r.yaml")
    d["schema_version"] = 99
    with pytest.raises(BadInput, match="schema_version: 99 is not supported"):
        parse_recipe(yaml.safe_dump(d), "r.yaml")


def test_invalid_yaml_names_line():
    with pytest.raises(BadInput, match=r"r.yaml:4: recipe is not valid YAML: .*at line 3\)"):
        parse_recipe("schema_version: 1\nname: x\nteacher: [unclosed\n", "r.yaml")


def test_cross_field_rules():
    d = _demo()
    d["judge"] = {"backend": "openai-chat", "model": "gpt-4", "base_url": "http://x/v1"}
    with pytest.raises(BadInput, match="logprobs"):
        parse_recipe(yaml.safe_dump(d), "r.yaml")
    d = _demo()
    d["teacher"] = {"backend": "tgi", "model": "m", "base_url": "http://x"}
    with pytest.raises(BadInput, match="prompt_format is required"):
        parse_recipe(yaml.safe_dump(d), "r.yaml")


def test_secrets_are_names_not_values():
    # the recipe has no field that could hold a key itself
    d = _demo()
    d["judge"]["api_key"] = "sk-123"
    with pytest.raises(BadInput, match=r"judge\.api_key: unknown key"):
        parse_recipe(yaml.safe_dump(d), "r.yaml")


def test_missing_recipe_file(tmp_path):
    with pytest.raises(BadInput, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
