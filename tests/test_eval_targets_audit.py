"""How an evaluated model's weights are found and recorded (bezoar_jobs/eval/targets.py, models.py): a hub
model with its own code (trust_remote_code) and a hub model whose revision is not pinned, against a
stand-in for the hub (no network)."""

from __future__ import annotations

import json
import shutil
from fnmatch import fnmatch
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from tests.tiny_model import build_tiny_model

SHA_1 = "1" * 40
SHA_2 = "2" * 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _with_own_code(src: Path, dest: Path) -> Path:
    """The tiny model as a hub repository whose config names its own classes (``auto_map``)."""
    shutil.copytree(src, dest)
    (dest / "configuration_tinyremote.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass TinyRemoteConfig(LlamaConfig):\n"
        "    model_type = 'tiny_remote'\n")
    (dest / "modeling_tinyremote.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_tinyremote import TinyRemoteConfig\n\n\n"
        "class TinyRemoteForCausalLM(LlamaForCausalLM):\n    config_class = TinyRemoteConfig\n")
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(model_type="tiny_remote", architectures=["TinyRemoteForCausalLM"],
               auto_map={"AutoConfig": "configuration_tinyremote.TinyRemoteConfig",
                         "AutoModelForCausalLM": "modeling_tinyremote.TinyRemoteForCausalLM"})
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


class FakeHub:
    """huggingface_hub's HfApi.list_repo_files / HfApi.model_info / snapshot_download over local directories:
    ``repos[repo][sha]`` is a commit's files, ``heads[repo]`` the commit the default branch points at."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.repos: dict[str, dict[str, Path]] = {}
        self.heads: dict[str, str] = {}
        self.downloads: list[tuple[str, str | None, list[str]]] = []
        self.asked: list[tuple[str, str | None]] = []  # model_info requests

    def _commit(self, repo: str, revision: str | None) -> str:
        return revision if revision in self.repos[repo] else self.heads[repo]

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import huggingface_hub

        hub = self

        def list_repo_files(self: Any, repo_id: str, revision: str | None = None, **kw: Any) -> list[str]:
            d = hub.repos[repo_id][hub._commit(repo_id, revision)]
            return sorted(p.name for p in d.iterdir())

        def model_info(self: Any, repo_id: str, revision: str | None = None, **kw: Any) -> Any:
            hub.asked.append((repo_id, revision))
            return SimpleNamespace(sha=hub._commit(repo_id, revision))

        def snapshot_download(repo_id: str, revision: str | None = None, allow_patterns: Any = None,
                              ignore_patterns: Any = None, **kw: Any) -> str:
            sha = hub._commit(repo_id, revision)
            hub.downloads.append((repo_id, revision, list(allow_patterns or [])))
            dest = hub.root / f"models--{repo_id.replace('/', '--')}" / "snapshots" / sha
            dest.mkdir(parents=True, exist_ok=True)
            for p in hub.repos[repo_id][sha].iterdir():
                if (allow_patterns is None or any(fnmatch(p.name, pat) for pat in allow_patterns)) and not any(
                        fnmatch(p.name, pat) for pat in ignore_patterns or []):
                    shutil.copy2(p, dest / p.name)
            return str(dest)

        monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
        monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    import transformers.dynamic_module_utils as dmu

    # the trusted code transformers copies and imports goes under this test's directory, not ~/.cache
    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    h = FakeHub(tmp_path / "hub")
    h.install(monkeypatch)
    return h


def _recipe(tiny: Path, baselines: list[dict[str, Any]], **harness: Any) -> Any:
    from bezoar_jobs.recipe import parse_recipe

    return parse_recipe(yaml.safe_dump({
        "schema_version": 1, "name": "targets-audit",
        "teacher": {"backend": "local", "model": str(tiny), "prompt_format": "{user}"},
        "judge": {"backend": "local", "model": str(tiny), "prompt_format": "{user}"},
        "student": {"model": str(tiny)},
        "evaluation": {
            "checkpoints": [], "baselines": baselines, "dtype": "float32", "device": "cpu",
            "harness": {"include_path": "pkg://bezoar_jobs/demo_data/harness_tasks",
                        "tasks": [{"name": "bezoar_demo_facts", "num_fewshot": 2, "metric": "acc_norm"}], **harness},
            "mtbench": {"enabled": False},
        },
    }))


def test_a_hub_baseline_with_its_own_code_is_downloaded_with_it_and_loads(tiny: Path, tmp_path: Path,
                                                                         hub: FakeHub) -> None:
    """A baseline (or student) with trust_remote_code: its config's auto_map names classes in the repository's
    .py files, which transformers imports from the downloaded directory. resolve_model took trust_remote_code
    and dropped it: only configs, tokenizer files and weights were downloaded, and loading failed ("does not
    appear to have a file named configuration_tinyremote.py"). Untrusted models still get no code."""
    from bezoar_jobs.eval import targets
    from bezoar_jobs.models import hub_patterns

    hub.repos["org/remote"] = {SHA_1: _with_own_code(tiny, tmp_path / "remote")}
    hub.heads["org/remote"] = SHA_1
    ctx = SimpleNamespace(name="eval-harness", recipe=_recipe(tiny, [
        {"name": "remote", "model": "org/remote", "revision": SHA_1, "trust_remote_code": True}]))
    (t,) = targets.targets(ctx)  # type: ignore[arg-type]
    model, tok = targets.load(ctx, t)  # type: ignore[arg-type]
    assert type(model).__name__ == "TinyRemoteForCausalLM" and tok.eos_token == "</s>"
    assert "*.py" in hub.downloads[-1][2]
    assert "*.py" not in hub_patterns(["config.json", "model.safetensors", "modeling_x.py"])


def test_an_unpinned_hub_model_is_evaluated_and_recorded_at_one_commit(tiny: Path, tmp_path: Path,
                                                                       hub: FakeHub,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """revision null (the paper recipe's student and released baselines run so with --allow-unpinned): the
    results, the manifest and the lm_eval command recorded revision null, i.e. "whatever the branch is at when
    you rerun it", not the commit that was loaded; and a resumed stage reused a model's results from _work/
    after the branch had moved. Now the commit is resolved once, downloaded, recorded and keys the progress."""
    from bezoar_jobs.eval import harness, targets
    from bezoar_jobs.runner import run_stage
    from bezoar_jobs.store import open_store

    hub.repos["org/released"] = {SHA_1: tiny, SHA_2: tiny}
    hub.heads["org/released"] = SHA_1
    recipe = _recipe(tiny, [{"name": "released", "model": "org/released"}], backend="vllm")
    loaded: list[str] = []

    def fake_vllm(model_dir: str, tm: Any, task_objects: Any, cfg: Any, dtype: str, **kw: Any) -> dict[str, Any]:
        loaded.append(model_dir)
        return {"results": {"bezoar_demo_facts": {"acc_norm,none": 0.5, "acc_norm_stderr,none": 0.1}}}

    monkeypatch.setattr(harness, "check_backend", lambda cfg: None)
    monkeypatch.setattr(harness, "evaluate_vllm", fake_vllm)
    run = tmp_path / "run"
    assert run_stage("eval-harness", recipe, open_store(run)) == 0
    assert [d[1] for d in hub.downloads] == [SHA_1] and loaded[0].endswith(f"/snapshots/{SHA_1}")
    per = json.loads(open_store(run).read_text("eval-harness/results/released.json"))
    assert per["revision"] == SHA_1 and per["recipe_revision"] is None
    assert f"revision={SHA_1}" in per["lm_eval_command"][0]
    manifest = json.loads(open_store(run).read_text("eval-harness/_MANIFEST.json"))
    assert manifest["models"]["released"]["revision"] == SHA_1

    # the branch moves: another commit's weights are another model (not the results saved for the first)
    ctx = SimpleNamespace(name="eval-harness", recipe=recipe)
    (before,) = targets.targets(ctx)  # type: ignore[arg-type]
    hub.heads["org/released"] = SHA_2
    (after,) = targets.targets(ctx)  # type: ignore[arg-type]
    assert (before.revision, after.revision) == (SHA_1, SHA_2)
    assert before.work_key("p") != after.work_key("p")


def test_a_pinned_commit_keeps_its_identity_and_asks_the_hub_nothing(tiny: Path, hub: FakeHub) -> None:
    """A recipe that pins a commit: the same identity (and _work/ keys) as before, no hub request to resolve it."""
    from bezoar_jobs.eval import targets

    ctx = SimpleNamespace(name="eval-harness", recipe=_recipe(tiny, [
        {"name": "released", "model": "org/released", "revision": SHA_1}]))
    (t,) = targets.targets(ctx)  # type: ignore[arg-type]
    assert t.revision == SHA_1 and t.identity == json.dumps({"model": "org/released", "revision": SHA_1})
    assert "recipe_revision" not in t.info() and hub.asked == []


def test_an_unpinned_hub_student_is_trained_from_and_recorded_at_one_commit(tiny: Path, hub: FakeHub) -> None:
    """The first SFT stage's base: with revision null it recorded base_revision null (the manifest named no
    weights) and loaded whatever the branch was at; the evaluation of the base resolved the branch on its own.
    Now training loads and records the commit the branch points at, as the evaluation does."""
    from bezoar_jobs.stages.training import resolve_base

    hub.repos["org/student"] = {SHA_1: tiny, SHA_2: tiny}
    hub.heads["org/student"] = SHA_2
    base = _recipe(tiny, [{"name": "b", "model": str(tiny)}])
    recipe = base.model_copy(update={"student": base.student.model_copy(update={"model": "org/student"})})
    path, info = resolve_base(SimpleNamespace(name="sft-lamini", recipe=recipe), None)  # type: ignore[arg-type]
    assert info == {"base_model": "org/student", "base_revision": SHA_2, "recipe_revision": None}
    assert path.name == SHA_2 and [d[1] for d in hub.downloads] == [SHA_2]
    recipe = recipe.model_copy(update={"student": recipe.student.model_copy(update={"revision": SHA_1})})
    asked = len(hub.asked)
    _, info = resolve_base(SimpleNamespace(name="sft-lamini", recipe=recipe), None)  # type: ignore[arg-type]
    assert info == {"base_model": "org/student", "base_revision": SHA_1} and len(hub.asked) == asked


def test_an_adapter_left_beside_a_hub_models_full_weights_is_not_applied_on_top(tiny: Path, tmp_path: Path,
                                                                                hub: FakeHub) -> None:
    """A repository holding a merged model and the LoRA adapter it was merged from: every *.json and
    *.safetensors was downloaded, and transformers, loading a directory with config.json and adapter_config.json,
    applies the adapter over the weights (integrations/peft.py maybe_load_adapters): the LoRA counted twice."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from bezoar_jobs.eval import targets

    repo = tmp_path / "merged"
    shutil.copytree(tiny, repo)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(repo)  # adapter_config.json and adapter_model.safetensors beside the full weights
    assert (repo / "adapter_config.json").is_file() and (repo / "adapter_model.safetensors").is_file()
    hub.repos["org/merged"] = {SHA_1: repo}
    hub.heads["org/merged"] = SHA_1
    ctx = SimpleNamespace(name="eval-harness", recipe=_recipe(tiny, [
        {"name": "merged", "model": "org/merged", "revision": SHA_1}]))
    (t,) = targets.targets(ctx)  # type: ignore[arg-type]
    model, _ = targets.load(ctx, t)  # type: ignore[arg-type]
    plain = AutoModelForCausalLM.from_pretrained(tiny)
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits.float(), plain(ids).logits.float(), atol=1e-5)
