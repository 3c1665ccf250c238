"""The commit rule: a stage's output exists only once ``<run>/<stage>/_MANIFEST.json`` exists.

The manifest is written last, after every output file is in the store, and it lists every file
with its size and sha256. Readers (later stages, the controller, ``status``, ``verify``, the report)
only ever trust what a manifest lists.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .errors import BadInput
from .layout import MANIFEST, WORK_DIR, is_work_path, manifest_path
from .store import NotFoundInStore, Store

MANIFEST_SCHEMA = 1


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(store: Store, stage: str) -> dict[str, Any] | None:
    """The stage's manifest, or None when the stage is not committed."""
    try:
        raw = store.read_bytes(manifest_path(stage))
    except NotFoundInStore:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise BadInput(f"{store.url(manifest_path(stage))}: manifest is not valid JSON: {e}") from None


def manifest_hash(m: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(m, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class CommitInfo:
    stage: str
    params_hash: str
    inputs: dict[str, str]  # input stage -> its manifest hash
    counts: dict[str, Any]
    timings: dict[str, float]
    extra: dict[str, Any]


def commit(store: Store, local_out: Path, info: CommitInfo) -> dict[str, Any]:
    """Upload everything under ``local_out`` to ``<run>/<stage>/`` then write the manifest last.

    Any previous output of the stage (from a forced rerun) is removed first, so the committed
    directory holds exactly what the manifest lists (``_work/`` is left alone).
    """
    stage = info.stage
    old_manifest = store.exists(manifest_path(stage))
    if old_manifest:
        store.delete(manifest_path(stage))
    for rel in store.list(stage + "/"):
        if not is_work_path(rel, stage):
            store.delete(rel)
    files = {}
    for path in sorted(p for p in Path(local_out).rglob("*") if p.is_file()):
        rel = path.relative_to(local_out).as_posix()
        if rel == MANIFEST or rel.startswith(WORK_DIR + "/"):
            continue
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        store.upload_file(path, f"{stage}/{rel}")
    manifest = {
        "stage": stage,
        "manifest_schema": MANIFEST_SCHEMA,
        "params_hash": info.params_hash,
        "inputs": info.inputs,
        "files": files,
        "counts": info.counts,
        "timings": info.timings,
        "code_version": __version__,
        "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **info.extra,
    }
    store.write_text(manifest_path(stage), json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def verify(store: Store, stage: str) -> list[str]:
    """Re-hash every file a committed stage lists; return a list of problems (empty = good)."""
    m = read_manifest(store, stage)
    if m is None:
        return [f"{stage}: not committed"]
    problems = []
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for rel, meta in sorted(m.get("files", {}).items()):
            local = Path(tmp) / "f"
            try:
                store.download_file(f"{stage}/{rel}", local)
            except NotFoundInStore:
                problems.append(f"{stage}/{rel}: listed in the manifest but missing")
                continue
            if local.stat().st_size != meta["size"]:
                problems.append(f"{stage}/{rel}: size {local.stat().st_size} != {meta['size']}")
            elif sha256_file(local) != meta["sha256"]:
                problems.append(f"{stage}/{rel}: sha256 differs from the manifest")
    return problems
