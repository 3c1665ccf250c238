"""Everything validated before anything is spent (issue 11, finding 4).

Unknown keys inside the pass-through sections (training.lora.rr, training.sft_args.learning_rat)
passed `plan`, `run`'s freeze and every data stage; only the training stage refused them, after the
data stages had run and been paid for. Now the recipe's loading checks them against the TRL/PEFT
fields (the installed classes, or the schema shipped for them where TRL is not installed).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bezoar_jobs import passthrough
from bezoar_jobs.errors import BadInput
from bezoar_jobs.recipe import load_recipe, parse_recipe
from tests.llm_server import LLMTestServer
from tests.scripted import edited_demo, scripted_answer, scripted_recipe

REPO = Path(__file__).resolve().parents[1]
TYPOS = {"training": {"lora": {"rr": 8}, "sft_args": {"learning_rat": 1e-4}}}


def bezoar(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SCRIPTED_JUDGE_KEY": "test-key"}
    return subprocess.run([sys.executable, "-m", "bezoar_jobs.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_typos_in_pass_through_sections_stop_plan_run_and_every_stage_before_a_request(tmp_path):
    with LLMTestServer(script=scripted_answer, api_key="test-key") as srv:
        recipe = scripted_recipe(tmp_path, srv.url, **{"training.lora": {"rr": 8}})
        run = str(tmp_path / "run")
        results = [
            bezoar("plan", "--recipe", str(recipe), "--run", run),
            bezoar("run", "--recipe", str(recipe), "--run", run, "--until", "filter-orca"),
            bezoar("stage", "generate-orca", "--recipe", str(recipe), "--run", run),
            bezoar("stage", "filter-lamini", "--recipe", str(recipe), "--run", run),
        ]
        assert srv.calls == []  # nothing was asked, nothing paid
    line = next(n for n, text in enumerate(recipe.read_text().splitlines(), 1) if text.strip().startswith("rr:"))
    for res in results:
        assert res.returncode == 2, res.stderr[-2000:]
        err = [ln for ln in res.stderr.splitlines() if " ERROR " in ln]
        assert len(err) == 1 and "Traceback" not in res.stderr
        assert (f"{recipe}:{line}: training.lora.rr: unknown key: not a field of LoraConfig (did you mean 'r'?)"
                in err[0])
    assert not (tmp_path / "run" / "recipe.yaml").exists()  # never frozen


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"sft_args": {"learning_rat": 1e-4}}, "training.sft_args.learning_rat: unknown key"),
        ({"sft_args": {"optim": "adamw_torh"}}, "training.sft_args.optim: 'adamw_torh' is not one of its choices "
                                                "(did you mean 'adamw_torch'?)"),
        ({"sft_args": {"lr_scheduler_type": "cosin"}}, "training.sft_args.lr_scheduler_type: 'cosin' is not one"),
        ({"sft_args": {"num_train_epochs": "two"}}, "training.sft_args.num_train_epochs: 'two' is not a number"),
        ({"sft_args": {"max_length": None}}, "training.sft_args.max_length: must be set"),
        ({"stage_args": {"sft-orca": {"gradient_accumulation_step": 2}}},
         "training.stage_args.sft-orca.gradient_accumulation_step: unknown key"),
        ({"dpo": {"dpo_args": {"betta": 0.2}}}, "training.dpo.dpo_args.betta: unknown key"),
        ({"dpo": {"lora": {"lora_alpah": 8}}}, "training.dpo.lora.lora_alpah: unknown key"),
        ({"lora": {"bias": "some"}}, "training.lora.bias: 'some' is not one of its choices"),
        ({"lora": {"r": "sixteen"}}, "training.lora.r: 'sixteen' is not a number"),
        ({"lora": {"use_dora": "yes"}}, "training.lora.use_dora: expected true or false"),
        ({"lora": {"target_modules": {"q": 1}}}, "training.lora.target_modules: expected"),
        ({"sft_args": {"seed": 3}}, "training.sft_args.seed: set by the stage"),
    ],
)
def test_the_field_schema_catches(tmp_path, section, message):
    text = yaml.safe_dump({"schema_version": 1, "name": "t", "teacher": {"backend": "local", "model": "m"},
                           "judge": {"backend": "local", "model": "m"}, "student": {"model": "m"},
                           "training": section})
    with pytest.raises(BadInput) as e:
        parse_recipe(text, "r.yaml")
    assert message in str(e.value) and re.search(r"r\.yaml:\d+: ", str(e.value))


def test_a_flag_with_an_optional_value_takes_true_as_the_trainer_does():
    """TrainingArguments.fsdp is typed `str | None` but documented and parsed as `fsdp=True` (argparse's
    const): the recipe takes `fsdp: true` too, and still refuses a number there."""
    def recipe(value: object) -> str:
        return yaml.safe_dump({"schema_version": 1, "name": "t", "teacher": {"backend": "local", "model": "m"},
                               "judge": {"backend": "local", "model": "m"}, "student": {"model": "m"},
                               "training": {"sft_args": {"fsdp": value}}})
    assert parse_recipe(recipe(True), "r.yaml").training.sft_args["fsdp"] is True  # kept as true, not "True"
    assert parse_recipe(recipe("full_shard auto_wrap"), "r.yaml").training.sft_args["fsdp"] == "full_shard auto_wrap"
    with pytest.raises(BadInput, match=r"training\.sft_args\.fsdp"):
        parse_recipe(recipe(3), "r.yaml")


def test_a_combination_only_the_class_refuses_stops_plan_where_trl_is_installed(tmp_path):
    refused = {"loss_type": ["sigmoid", "hinge"], "loss_weights": [1.0]}  # TRL: one weight per loss type
    recipe = scripted_recipe(tmp_path, "http://127.0.0.1:9", **{"training.dpo": {"dpo_args": refused}})
    res = bezoar("plan", "--recipe", str(recipe), "--run", str(tmp_path / "run"))
    assert res.returncode == 2 and "training.dpo.dpo_args: DPOConfig refused the settings" in res.stderr
    data_only = bezoar("plan", "--recipe", str(recipe), "--run", str(tmp_path / "run"), "--until", "filter-orca")
    assert data_only.returncode == 0  # no training stage selected: nothing to build


def test_without_trl_the_shipped_schema_checks_and_nothing_heavy_is_imported(tmp_path):
    """The controller image: TRL, PEFT and transformers are not installed."""
    probe = r"""
import importlib.metadata as md, json, sys
real = md.version
def version(name):
    if name in ("trl", "peft", "transformers"):
        raise md.PackageNotFoundError(name)
    return real(name)
md.version = version
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("trl", "peft", "transformers", "torch"):
            raise ImportError(f"{name} is not installed here")
sys.meta_path.insert(0, Block())
from bezoar_jobs.errors import BadInput
from bezoar_jobs.recipe import load_recipe, parse_recipe
try:
    parse_recipe(sys.argv[1], "r.yaml")
except BadInput as e:
    print(json.dumps({"error": str(e)}))
"""
    text = yaml.safe_dump({"schema_version": 1, "name": "t", "teacher": {"backend": "local", "model": "m"},
                           "judge": {"backend": "local", "model": "m"}, "student": {"model": "m"}, **TYPOS})
    res = subprocess.run([sys.executable, "-c", probe, text], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode == 0, res.stderr
    err = json.loads(res.stdout.strip().splitlines()[-1])["error"]
    assert "training.lora.rr: unknown key" in err and "training.sft_args.learning_rat: unknown key" in err


def test_other_installed_versions_get_their_own_schema_once(tmp_path, monkeypatch):
    monkeypatch.setenv("BEZOAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(passthrough, "installed_versions", lambda: {"trl": "0.0-other", "peft": "x",
                                                                    "transformers": "y"})
    passthrough.schema.cache_clear()
    try:
        fields = passthrough.schema()["classes"]["LoraConfig"]
        assert "r" in fields and "rr" not in fields
        cached = list((tmp_path / "cache").glob("passthrough-*.json"))
        assert len(cached) == 1  # built for these versions and cached
        built = cached[0].stat().st_mtime_ns
        passthrough.schema.cache_clear()  # a new process: it reads the cache instead of building again
        monkeypatch.setattr(passthrough.subprocess, "run",  # the build runs in a subprocess: none this time
                            lambda *a, **k: pytest.fail("built again: the cache was not used"))
        assert passthrough.schema()["classes"]["LoraConfig"] == fields
        assert cached[0].stat().st_mtime_ns == built
    finally:
        passthrough.schema.cache_clear()


def test_the_shipped_schema_is_that_of_the_pinned_libraries():
    shipped = json.loads(passthrough.PACKAGED.read_text())
    lock = dict(ln.split("==") for ln in (REPO / "requirements" / "lock.txt").read_text().split() if "==" in ln)
    assert shipped["versions"] == {lib: lock[lib] for lib in passthrough.LIBRARIES}
    # the test venv is the lock's (make test installs it): a venv of other versions is a broken setup, not a pass
    assert passthrough.installed_versions() == shipped["versions"], "the venv differs from requirements/lock.txt"
    # regenerate with: python -m bezoar_jobs.passthrough --write bezoar_jobs/passthrough_schema.json
    assert passthrough.build_schema() == shipped


# ---------------------------------------------------------------------------------------------
# numbers the classes take unchecked: a batch size of -3, a negative learning rate
# ---------------------------------------------------------------------------------------------
SFT = "    learning_rate: 2.0e-4\n"  # the last line of demo.yaml's training.sft_args
DPO = "      learning_rate: 5.0e-5\n"  # the last line of its training.dpo.dpo_args
LORA = "  lora: {r: 8, lora_alpha: 16, lora_dropout: 0.05, target_modules: [q_proj, k_proj, v_proj]}\n"


def _demo_with(tmp_path: Path, old: str, new: str, at: str) -> tuple[Path, int]:
    return edited_demo(tmp_path, old, new, at, name="bounds.yaml")


@pytest.mark.parametrize(
    ("old", "new", "at", "message"),
    [
        ("    per_device_train_batch_size: 3", "    per_device_train_batch_size: -3", "size: -3",
         "training.sft_args.per_device_train_batch_size: -3 is out of range: must be at least 1"),
        (SFT, "    learning_rate: -2.0e-4\n", "learning_rate: -2",
         "training.sft_args.learning_rate: -0.0002 is out of range: must be above 0"),
        (SFT, "    learning_rate: -2e-4\n", "learning_rate: -2",  # YAML 1.1 text: the stage converts it
         "training.sft_args.learning_rate: -2e-4 is out of range: must be above 0"),
        ("    gradient_accumulation_steps: 1", "    gradient_accumulation_steps: 0", "steps: 0",
         "training.sft_args.gradient_accumulation_steps: 0 is out of range: must be at least 1"),
        (SFT, SFT + "    warmup_steps: -0.1\n", "warmup_steps",
         "training.sft_args.warmup_steps: -0.1 is out of range: must be at least 0"),
        ("    max_steps: 10", "    max_steps: 0", "max_steps: 0",
         "training.sft_args.max_steps: 0 is out of range: must be -1 or at least 1"),
        (SFT, SFT + "    weight_decay: -0.01\n", "weight_decay",
         "training.sft_args.weight_decay: -0.01 is out of range: must be at least 0"),
        (SFT, SFT + "    max_grad_norm: -1.0\n", "max_grad_norm",
         "training.sft_args.max_grad_norm: -1.0 is out of range: must be at least 0"),
        ("  hh:\n", "  stage_args:\n    sft-orca: {num_train_epochs: 0}\n  hh:\n", "sft-orca:",
         "training.stage_args.sft-orca.num_train_epochs: 0 is out of range: must be above 0"),
        ("      max_length: 160\n", "      max_length: 0\n", "max_length: 0",
         "training.dpo.dpo_args.max_length: 0 is out of range: must be at least 1"),
        (DPO, DPO + "      beta: 0.0\n", "beta:", "training.dpo.dpo_args.beta: 0.0 is out of range: must be above 0"),
        (LORA, LORA.replace("r: 8", "r: 0"), "lora: {r: 0", "training.lora.r: 0 is out of range: must be at least 1"),
        (LORA, LORA.replace("lora_dropout: 0.05", "lora_dropout: 1.0"), "lora: {",
         "training.lora.lora_dropout: 1.0 is out of range: must be at least 0 and below 1"),
        (LORA, LORA.replace("lora_alpha: 16", "lora_alpha: -16"), "lora: {",
         "training.lora.lora_alpha: -16 is out of range: must be above 0"),
        ("  dpo:\n", "  dpo:\n    lora: {r: -8}\n", "lora: {r: -8}",
         "training.dpo.lora.r: -8 is out of range: must be at least 1"),
    ],
)
def test_numbers_out_of_their_range_are_refused_naming_field_file_and_line(tmp_path, old, new, at, message):
    p, line = _demo_with(tmp_path, old, new, at)
    with pytest.raises(BadInput) as e:
        load_recipe(p)
    assert f"{p}:{line}: {message}" in str(e.value), str(e.value)


@pytest.mark.parametrize(("old", "new"), [("    max_steps: 10\n", "    max_steps: -1\n"),
                                          (SFT, "    learning_rate: 1e-4\n    warmup_steps: 0.03\n"),
                                          (SFT, SFT + "    max_grad_norm: 0\n    weight_decay: 0.1\n"),
                                          (SFT, SFT + "    num_train_epochs: 0.5\n")])
def test_numbers_in_range_load(tmp_path, old, new):
    p, _ = _demo_with(tmp_path, old, new, new.split(":")[0])
    args = load_recipe(p)[0].training.sft_args
    for line in new.strip().splitlines():  # each value as written, not dropped or defaulted on the way
        key, value = (x.strip() for x in line.split(":", 1))
        assert float(args[key]) == float(value), (key, args.get(key))


def test_every_bound_is_a_field_the_recipe_may_set():
    """BOUNDS names fields of SFTConfig, DPOConfig or LoraConfig (as installed, or as shipped) that the
    stage does not own: a renamed field in a new TRL shows up here, not as a silently dead check."""
    from bezoar_jobs.training.config import _OWNED_COMMON, _OWNED_DPO, _OWNED_LORA, _OWNED_SFT

    classes = passthrough.schema()["classes"]
    owned = {**_OWNED_COMMON, **_OWNED_SFT, **_OWNED_DPO, **_OWNED_LORA}
    for key in passthrough.BOUNDS:
        assert any(key in fields for fields in classes.values()), key
        assert key not in owned, key
        numeric = {k for fields in classes.values() if key in fields for k in fields[key]["kinds"]}
        assert numeric & {"int", "float"}, key
