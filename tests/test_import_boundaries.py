"""Machine-learning code and Kubernetes code stay apart (CONTRIBUTING.md, "Rules").

- The controller side (``bezoar_jobs.executors.{cluster,jobs,kubernetes}`` and ``bezoar_jobs.cli``)
  must not pull in torch, transformers, trl or peft (nor the ``data`` extra's packages, which the
  controller image does not install): checked in a fresh interpreter, after importing AND exercising
  it (rendering Jobs, building the CLI parser and a Controller), through ``sys.modules``.
- Nothing on the machine-learning side imports the Kubernetes client: an AST scan of every module
  under ``bezoar_jobs/stages/`` (and the other ML packages), function-level imports included.
- The executors never import the ML libraries or ``bezoar_jobs.stages`` anywhere in their source,
  not even lazily inside a function (which the runtime check alone could miss).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "bezoar_jobs"
HEAVY = ("torch", "transformers", "trl", "peft")
# Not in the controller image either (it installs only the `k8s` extra): the `data` extra's packages.
DATA_EXTRA = ("datasets", "huggingface_hub", "openai", "anthropic", "httpx", "aiohttp", "pyarrow", "accelerate")
EXECUTORS = sorted(p for p in (PKG / "executors").glob("*.py") if p.name != "__init__.py")

PROBE = r"""
import json, sys, tempfile
import bezoar_jobs.executors.kubernetes as k8s
import bezoar_jobs.cli as cli
from bezoar_jobs.executors.cluster import ClusterSettings
from bezoar_jobs.executors.jobs import render
cli.build_parser()
render("s3://b/runs/r", None, ClusterSettings.model_validate({"generationShards": 2}), tempfile.mkdtemp())
k8s.RunOutcome().describe()
# build what `bezoar run --executor kubernetes` builds before its first API call
tmp = tempfile.mkdtemp()
kc = tmp + "/kubeconfig"
open(kc, "w").write(
    "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
    "clusters: [{name: c, cluster: {server: 'http://127.0.0.1:9'}}]\n"
    "users: [{name: u, user: {token: t}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\n")
from bezoar_jobs.recipe import parse_recipe
from bezoar_jobs.store import open_store
recipe = parse_recipe("schema_version: 1\nname: p\nteacher: {backend: local, model: m}\n"
                      "judge: {backend: local, model: m}\nstudent: {model: m}\n")
from bezoar_jobs.executors.scheduler import RunOutcome
from bezoar_jobs.registry import CANONICAL
from bezoar_jobs.state import planned_actions, up_to_date
store = open_store(tmp + "/run")
backend = k8s.KubernetesBackend(k8s.make_api_client(kubeconfig=kc), ClusterSettings(), tmp + "/run", "r", store,
                                RunOutcome())
for stage in CANONICAL:  # the skip and commit checks of every stage, the report's included
    up_to_date(store, recipe, stage)
planned_actions(store, recipe, list(CANONICAL))
import kubernetes.watch
heavy = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY_NAMES)
extra = sorted(m for m in sys.modules if m.split(".")[0] in DATA_EXTRA_NAMES)
stages = sorted(m for m in sys.modules if m.startswith("bezoar_jobs.stages"))
print(json.dumps({"heavy": heavy, "data_extra": extra, "stages": stages, "kubernetes": "kubernetes" in sys.modules}))
"""


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every module a file imports (absolute names; relative ones resolved), with line numbers."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg_parts = path.relative_to(REPO).with_suffix("").parts[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(pkg_parts[: len(pkg_parts) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
                out += [(mod, node.lineno)] + [(f"{mod}.{a.name}", node.lineno) for a in node.names]
            else:
                out.append((node.module or "", node.lineno))
    return out


def test_controller_side_never_loads_ml_libraries():
    probe = f"HEAVY_NAMES = {HEAVY!r}\nDATA_EXTRA_NAMES = {DATA_EXTRA!r}\n" + PROBE
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr
    seen = json.loads(res.stdout.strip().splitlines()[-1])
    assert seen["heavy"] == [], f"the controller side imported {seen['heavy']}"
    assert seen["stages"] == [], f"the controller side imported {seen['stages']}"
    assert seen["data_extra"] == [], f"the controller image (k8s extra only) lacks {seen['data_extra']}"
    assert seen["kubernetes"]  # the probe did load the controller (it imports the client)


ML_MODULES = sorted(
    p for sub in ("stages", "training", "llm", "data") for p in (PKG / sub).rglob("*.py")
) + [p for p in (PKG / "models.py",) if p.exists()]


@pytest.mark.parametrize("path", ML_MODULES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_ml_code_never_imports_kubernetes(path):
    bad = [(m, ln) for m, ln in _imports(path) if m == "kubernetes" or m.startswith("kubernetes.")
           or m.startswith("bezoar_jobs.executors")]
    assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_stages_package_is_scanned():
    # the parametrised scan above is not vacuous
    assert any(p.parent.name == "stages" and p.name != "__init__.py" for p in ML_MODULES)


@pytest.mark.parametrize("path", EXECUTORS, ids=lambda p: p.name)
def test_executors_never_import_ml_code_even_lazily(path):
    bad = [(m, ln) for m, ln in _imports(path)
           if m.split(".")[0] in HEAVY or m.startswith("bezoar_jobs.stages") or m.startswith("bezoar_jobs.training")
           or m == "bezoar_jobs.models"]
    assert not bad, f"{path.name} imports {bad}"
