"""The commit rule: a stage's output exists only once ``<run>/<stage>/_MANIFEST.json`` exists.

The manifest is written last, after every output file is in the store, and it lists every file
with its size, sha256 and change token (S3 ETag / local mtime, as a listing shows it right after the
upload). Readers (later stages, the controller, ``status``, ``verify``, the report) only ever trust
what a manifest lists, and check it:

- a stage hashes every committed file it reads and checks it against its manifest before using it
  (:func:`check_against`, through ``StageContext.fetch_input``), refusing a damaged one;
- ``bezoar run`` and ``plan`` treat a stage whose files differ from its manifest as not committed
  (:func:`quick_check`: one listing per stage; a changed token is confirmed by hashing that file);
- a manifest that does not parse, or one with a field of the wrong type (:data:`FIELD_TYPES`, the
  fields its readers use), is *damaged* (:class:`DamagedManifest`): the stage counts as not committed
  (it reruns, ``--force`` works), its readers refuse it by name, ``bezoar repair`` moves it aside.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .errors import BadInput, json_kind
from .layout import MANIFEST, WORK_DIR, is_work_path, manifest_path
from .store import NotFoundInStore, ObjectInfo, Store

MANIFEST_SCHEMA = 1


class DamagedManifest(BadInput):
    """A ``_MANIFEST.json`` that cannot be read (truncated, edited): the stage is not committed."""


class DamagedInput(BadInput):
    """A committed file differs from its manifest (size or sha256): never read, never trusted."""


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
    where = store.url(manifest_path(stage))
    hint = f"run `bezoar repair --run {store.uri}` to move it aside so {stage} reruns"
    try:
        m = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedManifest(f"{where}: the manifest is damaged (not valid JSON: {e}); {hint}") from None
    files = m.get("files") if isinstance(m, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
        for v in files.values()
    ):
        raise DamagedManifest(f"{where}: the manifest is damaged (no valid 'files' table); {hint}")
    unsafe = next((rel for rel in files if not _plain_relative(rel)), None)
    if unsafe is not None:  # a reader downloads each file to <its directory>/<name>: never outside it
        raise DamagedManifest(f"{where}: the manifest is damaged (file name {unsafe!r} is not a plain relative "
                              f"path inside the stage); {hint}")
    problem = field_problem(m, FIELD_TYPES)
    if problem:
        raise DamagedManifest(f"{where}: the manifest is damaged ({problem}); {hint}")
    result: dict[str, Any] = m
    return result


def _plain_relative(rel: str) -> bool:
    """A committed file's name as commit() writes it: POSIX segments, none empty, ``.`` or ``..``."""
    parts = rel.split("/")
    return bool(rel) and "\\" not in rel and "\0" not in rel and all(p not in ("", ".", "..") for p in parts)


# The fields the readers of a manifest (status, the report, plan, `bezoar run`, the stages) use, with
# the JSON types commit() and the stages write them with. A field may be absent (older manifests); a
# field present with another type makes the manifest damaged, so no reader has to check it again.
# A dict is a table (JSON object) whose listed keys, where present, have those types ("*": every
# value); "text" a string, "number" an int or float, "number?" a number or null, "any" anything.
_NUMBERS = ("start", "end", "span_s", "gpus", "gpu_hours", "gpu_hour_usd", "gpu_cost_usd")
FIELD_TYPES: dict[str, Any] = {
    "stage": "text",
    "params_hash": "text",
    "code_version": "text",
    "committed_at": "text",
    "base_model": "text",
    "inputs": {"*": "text"},
    "counts": {"rows": "number", "rejected": "number", "input_rows": "number", "kept": "number",
               "failed": "number?", "unparseable": "number?"},
    "timings": {"seconds": "number?"},
    "usage": {"*": {"prompt_tokens": "number?", "completion_tokens": "number?"}},
    "requests": {"failed": "number?", "retries": "number?", "failed_by_cause": {"*": "number"}},
    "utilization": {"*": {"utilization": "number?"}},
    "teacher_gpu": {k: "number?" for k in _NUMBERS},
    "cost_usd": "number?",
    "gpu_hours": "number?",
    "training": {},
    "answers": {},
    "teacher": {},
    "judge": {},
    "evaluator": {},
}


def field_problem(value: Any, spec: Any, path: str = "") -> str | None:  # noqa: ANN401 - any JSON value
    """The first field of ``value`` whose type differs from ``spec`` (see :data:`FIELD_TYPES`), as
    ``field 'a.b': expected ..., got ...``; None when every field has its type."""
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return f"field {path!r}: expected a table (JSON object), got {json_kind(value)}"
        for key, sub in spec.items():
            for k in (value if key == "*" else [key] if key in value else []):
                problem = field_problem(value[k], sub, f"{path}.{k}" if path else str(k))
                if problem:
                    return problem
        return None
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if spec == "text" and not isinstance(value, str):
        return f"field {path!r}: expected a string, got {json_kind(value)}"
    if spec == "number" and not is_number:
        return f"field {path!r}: expected a number, got {json_kind(value)}"
    if spec == "number?" and not (is_number or value is None):
        return f"field {path!r}: expected a number or null, got {json_kind(value)}"
    return None


def manifest_state(store: Store, stage: str) -> tuple[str, dict[str, Any] | None, str]:
    """``("committed", manifest, "")``, ``("pending", None, "")`` or ``("damaged", None, why)``."""
    try:
        m = read_manifest(store, stage)
    except DamagedManifest as e:
        return "damaged", None, str(e)
    return ("committed", m, "") if m is not None else ("pending", None, "")


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


def commit(store: Store, local_out: Path, info: CommitInfo, fence: Callable[[], None] | None = None) -> dict[str, Any]:
    """Upload everything under ``local_out`` to ``<run>/<stage>/`` then write the manifest last.

    Any previous output of the stage (from a forced rerun) is removed first, so the committed
    directory holds exactly what the manifest lists (``_work/`` is left alone).

    ``fence`` (the stage lease's ``check``) raises when this process no longer holds the stage; it is
    called before anything is removed, before each upload and right before the manifest is written:
    the uploads can take minutes (a model), and a holder that lost its lease meanwhile (paused, cut off
    from the store past the lease's expiry) must neither overwrite the files nor write its manifest
    over those of the process that took the stage over.
    """
    stage = info.stage
    # what its readers would take as damaged is never written (a stage's bug, found before anything is touched)
    problem = field_problem({"stage": stage, "params_hash": info.params_hash, "inputs": info.inputs,
                             "counts": info.counts, "timings": info.timings, **info.extra}, FIELD_TYPES)
    if problem:
        raise ValueError(f"{stage}: not committed: the manifest would be damaged ({problem})")
    if fence is not None:
        fence()
    old_manifest = store.exists(manifest_path(stage))
    if old_manifest:
        store.delete(manifest_path(stage))
    for rel in store.list(stage + "/"):
        if not is_work_path(rel, stage):
            store.delete(rel)
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in Path(local_out).rglob("*") if p.is_file()):
        rel = path.relative_to(local_out).as_posix()
        if rel == MANIFEST or rel.startswith(WORK_DIR + "/"):
            continue
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        if fence is not None:
            fence()
        store.upload_file(path, f"{stage}/{rel}")
    # the change token of each object as stored: `bezoar run` compares a listing against it
    listed = _list_committed(store, stage, files)
    for rel, meta in files.items():
        obj = listed.get(f"{stage}/{rel}")
        if obj is not None and obj.size == meta["size"]:
            meta["token"] = obj.token
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
    if fence is not None:
        fence()
    store.write_text(manifest_path(stage), json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def check_against(meta: dict[str, Any], size: int, sha256: str) -> str | None:
    """What differs between a file (its size and sha256) and its manifest entry; None: nothing."""
    if size != meta["size"]:
        return f"{size} bytes, but its manifest says {meta['size']}"
    if sha256 != meta["sha256"]:
        return "its sha256 differs from its manifest"
    return None


# (stage, file, token) whose content was hashed and found right: a touched file is hashed once
_CONFIRMED: set[tuple[str, str, str]] = set()


def quick_check(store: Store, stage: str, m: dict[str, Any]) -> list[str]:
    """Problems of a committed stage's files found cheaply: one listing (missing, size, change token);
    a file whose token changed is hashed (downloaded from S3) to tell an edit from a mere touch."""
    problems = []
    listed = _list_committed(store, stage, m.get("files", {}))
    for rel, meta in sorted(m.get("files", {}).items()):
        info = listed.get(f"{stage}/{rel}")
        if info is None:
            problems.append(f"{stage}/{rel}: listed in the manifest but missing")
        elif info.size != meta["size"]:
            problems.append(f"{stage}/{rel}: size {info.size} != {meta['size']}")
        elif meta.get("token") and info.token != meta["token"] and (stage, rel, info.token) not in _CONFIRMED:
            problem = _hash_check(store, stage, rel, meta)
            if problem:
                problems.append(problem)
            else:
                _CONFIRMED.add((stage, rel, info.token))
    return problems


def _list_committed(store: Store, stage: str, rels: dict[str, Any]) -> dict[str, ObjectInfo]:
    """Sizes and change tokens of a stage's committed objects: one listing per top-level entry they
    are under (data, rejected, model, metrics.jsonl ...), never the stage's ``_work/``, which may hold
    thousands of record parts and checkpoints."""
    listed: dict[str, ObjectInfo] = {}
    for top in sorted({rel.split("/", 1)[0] for rel in rels}):
        listed.update(store.list_info(f"{stage}/{top}"))
    return listed


def _hash_check(store: Store, stage: str, rel: str, meta: dict[str, Any]) -> str | None:
    with tempfile.TemporaryDirectory(prefix="bezoar-verify-") as tmp:
        local = Path(tmp) / "f"
        try:
            store.download_file(f"{stage}/{rel}", local)
        except NotFoundInStore:
            return f"{stage}/{rel}: listed in the manifest but missing"
        if local.stat().st_size != meta["size"]:
            return f"{stage}/{rel}: size {local.stat().st_size} != {meta['size']}"
        if sha256_file(local) != meta["sha256"]:
            return f"{stage}/{rel}: sha256 differs from the manifest"
    return None


def verify(store: Store, stage: str) -> list[str]:
    """Re-hash every file a committed stage lists; return a list of problems (empty = good). A
    damaged manifest is one problem, reported, not raised."""
    try:
        m = read_manifest(store, stage)
    except DamagedManifest as e:
        return [str(e)]
    if m is None:
        return [f"{stage}: not committed"]
    problems = []
    for rel, meta in sorted(m.get("files", {}).items()):
        problem = _hash_check(store, stage, rel, meta)
        if problem:
            problems.append(problem)
    return problems
