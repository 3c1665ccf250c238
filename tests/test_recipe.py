"""The typed recipe: every file in recipes/ loads, bad input names path, file and line."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml
from pydantic import Field

from bezoar_jobs.errors import BadInput
from bezoar_jobs.recipe import load_recipe, parse_recipe
from bezoar_jobs.recipe_base import Strict
from bezoar_jobs.registry import CANONICAL
from bezoar_jobs.state import params_hash
from tests.scripted import edited_demo

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


def test_a_temperature_the_anthropic_api_refuses_is_an_error_naming_the_field():
    claude = {"backend": "anthropic", "model": "claude-2.1", "api_key_env": "ANTHROPIC_API_KEY"}
    d = _demo()
    d["judge"] = claude
    d["filter"] = {**d.get("filter", {}), "method": "generate", "retry_temperature": 1.5}
    # greedy verdicts re-ask at retry_temperature: 1.5 is past the Messages API's 0-1
    with pytest.raises(BadInput, match=r"filter.retry_temperature: 1.5 is above 1, the most the Anthropic"):
        parse_recipe(yaml.safe_dump(d), "r.yaml")
    # sampled verdicts re-ask at their own temperature: retry_temperature is never sent
    d["filter"]["decoding"] = {"max_new_tokens": 64, "temperature": 0.5}
    assert parse_recipe(yaml.safe_dump(d), "r.yaml").filter.retry_temperature == 1.5
    d = _demo()
    d["teacher"] = claude
    d["generation"]["orca"]["response_decoding"] = {"max_new_tokens": 64, "temperature": 1.2}
    with pytest.raises(BadInput, match=r"generation.orca.response_decoding.temperature: 1.2 is above 1.*teacher"):
        parse_recipe(yaml.safe_dump(d), "r.yaml")
    d = _demo()
    d["evaluation"]["mtbench"].update(judge=claude, judge_method="generate")
    d["evaluation"]["mtbench"]["judge_decoding"] = {"max_new_tokens": 64, "temperature": 1.1}
    with pytest.raises(BadInput, match=r"judge_decoding.temperature: 1.1 .*\(evaluation.mtbench.judge.backend"):
        parse_recipe(yaml.safe_dump(d), "r.yaml")
    # other APIs take more: the same temperature on an OpenAI-compatible judge loads
    d["evaluation"]["mtbench"]["judge"] = {"backend": "openai-chat", "model": "gpt-4", "base_url": "http://x/v1"}
    assert parse_recipe(yaml.safe_dump(d), "r.yaml").evaluation.mtbench.judge_decoding.temperature == 1.1


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


# ---------------------------------------------------------------------------------------------
# bad values that used to load (and crash a stage later), duplicate keys, lax scalars, messages
# ---------------------------------------------------------------------------------------------


def _write(tmp_path: Path, old: str, new: str, at: str) -> tuple[Path, int]:
    """demo.yaml with ``old`` replaced by ``new`` (once), written to a file; the line holding ``at``."""
    return edited_demo(tmp_path, old, new, at)


def _refused(p: Path) -> str:
    with pytest.raises(BadInput) as e:
        load_recipe(p)
    return str(e.value)


@pytest.mark.parametrize(
    ("old", "new", "at", "message"),
    [  # submix .inf crashed plan (NaN to int); timeout .inf crashed aiohttp; a price .inf wrote Infinity to JSON
        ("{cot: 1,", "{cot: .inf,", "cot: .inf", "generation.orca.submix_weights.cot: the value is infinite"),
        ("  batch_size: 32 ", "  timeout_s: .inf\n  batch_size: 32 ", "timeout_s:",
         "teacher.timeout_s: the value is infinite"),
        ("  batch_size: 16\n", "  batch_size: 16\n  price_input_per_mtok: .inf\n", "price_input_per_mtok",
         "judge.price_input_per_mtok: the value is infinite"),
        ("  threshold: 3.5", "  threshold: .nan", "threshold:", "filter.threshold: the value is NaN (not a number)"),
        ("temperature: 0.7, top_p: 0.9}\n    response", "temperature: -.inf, top_p: 0.9}\n    response",
         "-.inf", "generation.lamini.instruction_decoding.temperature: the value is minus infinite"),
        ("    learning_rate: 2.0e-4", "    learning_rate: .nan", "learning_rate: .nan",
         "training.sft_args.learning_rate: the value is NaN"),
        ("    learning_rate: 2.0e-4", "    learning_rate: nan", "learning_rate: nan",
         "training.sft_args.learning_rate: 'nan': the value is NaN"),
    ],
)
def test_nan_and_infinity_are_refused_naming_field_file_and_line(tmp_path, old, new, at, message):
    p, line = _write(tmp_path, old, new, at)
    msg = _refused(p)
    assert f"{p}:{line}: {message}" in msg and "\n" not in msg, msg
    assert "less than or equal" not in msg  # NaN used to fail the range check, saying nothing of NaN


@pytest.mark.parametrize(
    ("value", "message"),
    [("-1", "seed: Input should be greater than or equal to 0"),
     ("123456789012345678901234567890", "seed: Input should be less than or equal to 4294967295"),
     ("7.0", "seed: Input should be a valid integer, got 7.0")],
)
def test_the_seed_is_what_set_seed_takes(tmp_path, value, message):
    p, line = _write(tmp_path, "seed: 42", f"seed: {value}", "seed:")
    assert f"{p}:{line}: {message}" in _refused(p)


def test_the_harness_seeds_are_what_set_seed_takes(tmp_path):
    p, line = _write(tmp_path, "  harness:\n", "  harness:\n    seed: [0, 1234, -1, 1234]\n", "seed: [0")
    assert f"{p}:{line}: evaluation.harness.seed.2: Input should be greater than or equal to 0" in _refused(p)
    for ok in ("0", "4294967295"):
        p, _ = _write(tmp_path, "seed: 42", f"seed: {ok}", "seed:")
        assert load_recipe(p)[0].seed == int(ok)


@pytest.mark.parametrize(
    ("old", "new", "at", "first"),
    [("  batch_size: 32 ", "  batch_size: 32\n  batch_size: 1 ", "batch_size: 1", 14),  # two under teacher:
     ("evaluation:\n", "seed: 7\nevaluation:\n", "seed: 7", 8)],  # one more at the top level
)
def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path, old, new, at, first):
    p, line = _write(tmp_path, old, new, at)
    key = at.split(":")[0]
    assert f"{p}:{line}: key '{key}' appears twice (first at line {first})" in _refused(p)


def test_the_cluster_settings_refuse_a_key_given_twice(tmp_path):
    from bezoar_jobs.executors.cluster import load_cluster_settings

    p = tmp_path / "cluster.yaml"
    p.write_text("namespace: bezoar\ngenerationShards: 2\nnamespace: other\n")
    with pytest.raises(BadInput, match=rf"^{re.escape(str(p))}:3: key 'namespace' appears twice \(first at line 1\)"):
        load_cluster_settings(p)


def test_merge_keys_still_load_as_yaml_safe_load_reads_them():
    from bezoar_jobs.yamlmodel import parse_yaml

    text = "base: &b {x: 1, y: 2}\nover: {<<: *b, x: 3}\nagain: {<<: [*b], z: 4}\n"
    assert parse_yaml(text, "m.yaml", "recipe") == yaml.safe_load(text) == {
        "base": {"x": 1, "y": 2}, "over": {"x": 3, "y": 2}, "again": {"x": 1, "y": 2, "z": 4}}


@pytest.mark.parametrize(
    ("old", "new", "at", "message"),
    [("schema_version: 1", "schema_version: true", "schema_version", "schema_version: true is not supported"),
     ("schema_version: 1", "schema_version: 1.0", "schema_version", "schema_version: 1.0 is not supported"),
     ("  flush_every: 8", "  flush_every: true", "flush_every", "generation.flush_every: Input should be a valid "
                                                               "integer, got true"),
     ("  flush_every: 8", "  flush_every: 8.0", "flush_every", "generation.flush_every: Input should be a valid "
                                                              "integer, got 8.0"),
     ("    rounds: 1", "    rounds: '1'", "rounds:", "generation.evol.rounds: Input should be a valid integer, got "
                                                     "the text '1'"),
     ("  response_head: true ", "  response_head: 1 ", "response_head", "training.response_head: Input should be "
                                                                        "true or false, got 1"),
     ("  threshold: 3.5", "  threshold: true", "threshold: true",
      "filter.threshold: Input should be a number, got true"),
     ("{cot: 1,", "{cot: false,", "cot: false", "generation.orca.submix_weights.cot: Input should be a number")],
)
def test_a_bool_is_no_number_and_a_float_no_integer(tmp_path, old, new, at, message):
    p, line = _write(tmp_path, old, new, at)
    assert f"{p}:{line}: {message}" in _refused(p)


def test_a_float_field_still_takes_an_integer(tmp_path):
    p, _ = _write(tmp_path, "  threshold: 3.5", "  threshold: 4", "threshold")
    r, _ = load_recipe(p)
    assert r.filter.threshold == 4.0 and isinstance(r.filter.threshold, float)


def test_every_number_and_flag_of_the_recipe_is_strict():
    """Each int and bool of the recipe's schema is strict, and each float refuses true/false, so a
    field added later with a bare ``int``, ``float`` or ``bool`` fails here (use Int... from recipe_base:
    PosInt, NonNegInt, Seed, Float, Prob, Bool). Pass-through values are checked by passthrough.py."""
    from bezoar_jobs.recipe import Recipe
    from bezoar_jobs.recipe_base import _number_not_bool

    def lax(schema: object, path: str = "", guarded: bool = False) -> list[str]:
        out: list[str] = []
        if isinstance(schema, dict):
            kind = schema.get("type")
            fn = schema["function"].get("function") if isinstance(schema.get("function"), dict) else None
            if (kind in ("int", "bool") and not schema.get("strict")) or (kind == "float" and not guarded):
                out.append(path)
            if kind == "function-wrap" and getattr(fn, "__name__", "") == "_check_pass_value":
                return out
            for k, v in schema.items():
                out += lax(v, f"{path}.{k}", kind == "function-before" and fn is _number_not_bool and k == "schema")
        elif isinstance(schema, list | tuple):
            for i, v in enumerate(schema):
                out += lax(v, f"{path}[{i}]")
        return out

    assert lax(Recipe.__pydantic_core_schema__) == []


@pytest.mark.parametrize("char", ["\x07", "\x00"])
def test_a_control_character_names_its_line_and_column(tmp_path, char):
    p, line = _write(tmp_path, "name: openbezoar-demo", f"name: openbezoar{char}demo", "name: openbezoar")
    assert (f"{p}:{line}: recipe is not valid YAML: unacceptable character #x{ord(char):04x} at line {line}, "
            f"column {len('name: openbezoar') + 1}") in _refused(p)


def test_a_key_that_is_not_text_names_its_line(tmp_path):
    p, line = _write(tmp_path, "evaluation:\n", "1: x\nevaluation:\n", "1: x")
    assert f"{p}:{line}: 1: key 1 should be text" in _refused(p)


def test_a_nested_pass_through_value_is_one_clear_line(tmp_path):
    p, line = _write(tmp_path, "    learning_rate: 2.0e-4", "    learning_rate: 2.0e-4\n    lr_scheduler_kwargs:\n"
                     "      a: {b: 1}", "      a: {b: 1}")
    msg = _refused(p)
    assert msg == (f"invalid recipe: {p}:{line}: training.sft_args.lr_scheduler_kwargs.a: expected a number, text, "
                   "true/false or null, got a mapping")
