"""The local files a stage reads (seed data, templates), fingerprinted, so a file edited in place is seen.

A stage's parameter hash names a file by its path. So a seed file or a template edited in place left the
committed stage current for ``bezoar run``; and a rerun (``--force``) reused the records saved for the old file,
which are keyed by unit (``lamini-example-00003``: the third prompt, whatever seeds it now samples). Now:

* a stage records in its manifest (``input_files``) every local file it reads, as it was when the stage
  started: path, size, modification time and sha256 (:func:`fingerprints`);
* :func:`bezoar_jobs.state.up_to_date` compares them (size and modification time first; a file whose either
  changed is hashed): a committed stage whose file now holds something else is not current, so it reruns, and
  every stage after it (:func:`changed`);
* the stage's saved records are keyed by those sha256s too (stages/common.work_key): records made from another
  version of a file are not reused. They stay in ``_work/``, found again if the file is put back.

Covered: local paths and ``file://``. Not covered: ``pkg://`` files (they change with the installed package),
``s3://`` files and hub datasets (the recipe pins a revision; an ``s3://`` object's content is not hashed here).
A fingerprint taken on another machine (a stage pod, seen from a controller elsewhere) is compared only where it
was taken (``host``): a path there need not be the same file here. The cost: one sha256 pass over each local
file when the stage starts (not measured for this; a sha256 pass over committed inputs: docs/benchmarks.md).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .manifest import sha256_file

if TYPE_CHECKING:
    from .recipe import Recipe


def local_path(uri: str) -> Path | None:
    """The local file a recipe's path names, or None for a package file, an ``s3://`` object or a hub dataset."""
    from .recipe_base import is_file_path

    if uri.startswith(("pkg://", "s3://")) or not is_file_path(uri):
        return None
    return Path(uri.removeprefix("file://")).expanduser()


def fingerprints(recipe: Recipe, stage: str) -> dict[str, Any]:
    """``{"host", "files": {field: {path, size, mtime_ns, sha256}}}`` for the local files ``stage`` reads (see
    the module docstring); empty when it reads none. A file that is missing is left out: the stage names it."""
    from .preflight import files_read
    from .recipe import TemplateRef
    from .recipe_base import DatasetSource

    files: dict[str, dict[str, Any]] = {}
    for field, ref in sorted(files_read(recipe, [stage]).items()):
        uri = ref.path if isinstance(ref, TemplateRef | DatasetSource) else ref
        path = local_path(uri)
        if path is None or not path.is_file():
            continue
        st = path.stat()
        files[field] = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                        "sha256": sha256_file(path)}
    return {"host": socket.gethostname(), "files": files} if files else {}


def digests(recorded: dict[str, Any]) -> dict[str, str]:
    """``{field: sha256}`` of :func:`fingerprints`' answer (what the stage's saved records are keyed by)."""
    return {field: f["sha256"] for field, f in recorded.get("files", {}).items()}


def changed(recorded: Any) -> str | None:  # noqa: ANN401 - a manifest's field, as read
    """Why a committed stage's local files are not what it read (the first one found), or None: the same, or not
    comparable here (recorded on another host, or no fingerprints in the manifest)."""
    if not isinstance(recorded, dict) or recorded.get("host") != socket.gethostname():
        return None
    files = recorded.get("files")
    if not isinstance(files, dict):
        return None
    for field, f in sorted(files.items()):
        try:
            path, size, mtime, sha = Path(f["path"]), f["size"], f["mtime_ns"], f["sha256"]
        except (KeyError, TypeError):
            continue  # a damaged entry: the manifest's readers judge the manifest, not this
        try:
            st = path.stat()
        except OSError:
            return f"{field}: {path} is gone since the stage was committed"
        if (st.st_size, st.st_mtime_ns) == (size, mtime):
            continue
        if sha256_file(path) != sha:
            return f"{field}: {path} was changed since the stage was committed"
    return None
