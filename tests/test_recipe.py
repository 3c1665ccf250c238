"""The typed recipe: every file in recipes/ loads, bad input names path, file and line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml
from pydantic import Field

from bezoar_jobs.errors import BadInput
from bezoar_jobs.recipe import load_recipe, parse_recipe
from bezoar_jobs.recipe_base import Strict
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


# ---------------------------------------------------------------------------------------------
# docs/recipe-reference.md: generated from the models, every field described
# ---------------------------------------------------------------------------------------------
def _reference_generator():
    spec = importlib.util.spec_from_file_location("gen_recipe_reference", REPO / "scripts" / "gen_recipe_reference.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_recipe_reference_is_current():
    """docs/recipe-reference.md is what scripts/gen_recipe_reference.py makes of the models now."""
    mod = _reference_generator()
    doc = (REPO / "docs" / "recipe-reference.md").read_text(encoding="utf-8")
    assert doc == mod.render(), "docs/recipe-reference.md is stale: run scripts/gen_recipe_reference.py"
    # every section, a shared block's fields, a list entry's fields and a pass-through row are in it
    for key in ("`student.add_bos`", "`<endpoint>.system_prompt_supported`", "`<decoding>.stop`",
                "`evaluation.baselines[].trust_remote_code`", "`training.push.token_env`", "`training.dpo.dpo_args`"):
        assert key in doc, key


def test_every_recipe_field_has_a_description():
    """Every field of the recipe (pass-through mappings aside) says what it does, for the reference."""
    mod = _reference_generator()
    assert mod.undocumented() == [], "add Field(description=...) to these recipe fields"


def test_a_field_without_a_description_is_found():
    """Broken on purpose: a model with an undescribed field of its own and one in a block it uses twice."""
    mod = _reference_generator()

    class Block(Strict):
        described: int = Field(1, description="has one")
        bare: int = 2

    class Root(Strict):
        first: Block = Field(Block(), description="a block")
        second: Block | None = Field(None, description="the same block again")
        plain: str = "x"

    assert mod.undocumented(Root) == ["plain", "<block>.bare"]
