"""``bezoar repair``: the way out of a damaged run.

A stage whose manifest does not parse or has a field of the wrong type (manifest.FIELD_TYPES), or
whose committed files differ from it, is moved aside to
``<run>/_damaged/<stage>/<UTC time>/`` (manifest first, so the stage stops counting as committed at
once, then its committed files, then a ``PROBLEMS.txt`` saying what was wrong): the next ``bezoar
run`` reruns it. Its ``_work/`` (paid-for records, checkpoints) stays where it is, so the rerun
resumes from it. A stage another process holds (a live lease) is never touched.

Leftovers of interrupted writes (``.tmp-*`` files of a local run, unfinished S3 multipart uploads)
are removed from every stage nobody holds.
"""

from __future__ import annotations

import time

from .layout import DAMAGED_DIR, MANIFEST, is_work_path, manifest_path
from .lease import check_free, current
from .registry import CANONICAL
from .store_base import NotFoundInStore, Store


def repair_stage(store: Store, stage: str, problems: list[str]) -> str:
    """Move ``stage``'s manifest and committed files aside; the URL of where they went."""
    check_free(store, stage)
    dest = f"{DAMAGED_DIR}/{stage}/{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    try:
        store.move(manifest_path(stage), f"{dest}/{MANIFEST}")
    except NotFoundInStore:
        pass
    for rel in store.list(stage + "/"):
        if not is_work_path(rel, stage):
            store.move(rel, f"{dest}/{rel[len(stage) + 1:]}")
    store.write_text(f"{dest}/PROBLEMS.txt", "\n".join(problems) + "\n")
    return store.url(dest)


def clean_leftovers(store: Store) -> dict[str, int]:
    """Remove half-written objects under every stage no live process holds; ``{stage: count}``."""
    out = {}
    for stage in CANONICAL:
        if current(store, stage) is not None:
            continue
        n = store.clean_temp(stage + "/")
        if n:
            out[stage] = n
    return out
