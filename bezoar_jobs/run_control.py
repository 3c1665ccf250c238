"""What controls a run beyond its stages, kept in the run store so every controller of the run sees it.

- **Cancelled** (``<run>/_control/cancelled.json``): ``bezoar cancel`` writes it before deleting the
  run's Jobs. Every ``bezoar run`` of the run (a retried controller pod, a CronJob retry, CI re-running
  the workflow, a laptop) refuses to start while it is there, and a running controller stops when it
  appears, so a cancel cannot be undone by a controller that happened to restart. ``bezoar cancel
  --undo`` removes it.
- **The frozen recipe, written once**: the first controller of a run writes ``<run>/recipe.yaml``; a
  later one (a retry, a restart) with the same text writes nothing, and one with a different text
  is refused (exit 2) unless told to replace it, so a retried controller never changes a run's
  recipe behind the stages already committed from it.
- **Controller status** (``<run>/_control/status.json``): what the Kubernetes controller last saw of
  each stage it runs (Pending and why the scheduler says so, suspended by Kueue and why, running),
  for ``bezoar status``, which shows what of it has the right shape and names the field that has not.
- **Where a run is**: a local run is a directory; ``--run`` naming a regular file is bad input.

Store operations only: no Kubernetes client, no stage code.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from .errors import BadInput
from .layout import CANCELLED_FILE, CONTROLLER_STATUS_FILE, RECIPE_FILE
from .store import Store

EXIT_CANCELLED = 4


class RunCancelled(BadInput):
    """The run was cancelled: no controller may start or go on. Exit 4 (the controller Job stops)."""

    exit_code = EXIT_CANCELLED


def check_run_location(run: str | None) -> None:
    """A local run is a directory: a ``--run`` path that is a regular file is bad input (exit 2),
    never an empty run. An ``s3://`` prefix is not looked at (nothing is opened for it here)."""
    from urllib.parse import urlparse

    from .store import LocalStore, open_store

    if not run or urlparse(str(run)).scheme == "s3":
        return
    store = open_store(run)
    if isinstance(store, LocalStore) and store.root.exists() and not store.root.is_dir():
        raise BadInput(f"--run {run}: {store.root} is a file, not a run directory (a run is a directory, "
                       "given as a path or file://, or s3://bucket/prefix)")


def cancel_run(store: Store, reason: str = "bezoar cancel") -> dict[str, Any]:
    """Mark the run cancelled (idempotent: the first marker is kept)."""
    existing = cancelled(store)
    if existing is not None:
        return existing
    marker = {"cancelled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "by": reason,
              "host": socket.gethostname()}
    store.write_text(CANCELLED_FILE, json.dumps(marker, indent=2) + "\n")
    return marker


def cancelled(store: Store) -> dict[str, Any] | None:
    """The cancel marker, or None while the run is not cancelled."""
    if not store.exists(CANCELLED_FILE):
        return None
    try:
        data = json.loads(store.read_text(CANCELLED_FILE))
    except (ValueError, BadInput):
        data = {}
    return data if isinstance(data, dict) else {}


def uncancel(store: Store) -> bool:
    """Remove the marker (``bezoar cancel --undo``); whether there was one."""
    if not store.exists(CANCELLED_FILE):
        return False
    store.delete(CANCELLED_FILE)
    return True


def refuse_if_cancelled(store: Store) -> None:
    marker = cancelled(store)
    if marker is not None:
        raise RunCancelled(
            f"run {store.uri} was cancelled at {marker.get('cancelled_at', '?')} "
            f"({marker.get('by', 'bezoar cancel')}): "
            f"nothing is started; `bezoar cancel --run {store.uri} --undo` lifts it, or start a new run id"
        )


def freeze_once(store: Store, text: str, source: str, replace: bool = False) -> str:
    """Freeze the recipe into the run unless the run already has it: ``"written"``, ``"unchanged"``
    or (``replace``) ``"replaced"``. A different frozen recipe without ``replace`` is BadInput."""
    from .state import freeze_recipe

    if store.exists(RECIPE_FILE):
        frozen = store.read_text(RECIPE_FILE)
        if frozen == text:
            return "unchanged"
        if not replace:
            raise BadInput(
                f"{source}: differs from the recipe frozen in {store.url(RECIPE_FILE)} when the run started; a run's "
                "recipe is written once, so a retried or restarted controller cannot change it. Start a new run id, "
                "or pass --refreeze to replace it (the stages whose parameters changed then rerun)"
            )
        freeze_recipe(store, text, source)
        return "replaced"
    freeze_recipe(store, text, source)
    return "written"


def write_controller_status(store: Store, status: dict[str, Any]) -> None:
    store.write_text(CONTROLLER_STATUS_FILE, json.dumps(status, indent=2, sort_keys=True) + "\n")


# what `bezoar status` reads of the controller status file (k8s_backend writes it; manifest.field_problem types)
_CONTROLLER_FIELDS = {"run_id": "text", "namespace": "text", "updated_at": "text"}
_CONTROLLER_STAGE_FIELDS = {"job": "text", "state": "text", "reason": "text", "message": "text", "since": "text"}


def checked_controller_status(store: Store) -> tuple[dict[str, Any] | None, list[str]]:
    """What the controller last wrote (None: nothing readable), each part of the wrong shape left out,
    and a problem naming the file and field for each: the controller writes this file, so a bad one
    is damage to report, never a reason to stop showing the rest."""
    from .errors import json_kind
    from .manifest import field_problem

    if not store.exists(CONTROLLER_STATUS_FILE):
        return None, []
    where = f"{store.url(CONTROLLER_STATUS_FILE)}: the controller's status file is damaged"
    try:
        data = json.loads(store.read_text(CONTROLLER_STATUS_FILE))
    except ValueError as e:  # JSON or UTF-8
        return None, [f"{where} (not valid JSON: {e})"]
    except BadInput as e:
        return None, [f"{where} (it cannot be read: {e})"]
    if not isinstance(data, dict):
        return None, [f"{where} (expected a table (JSON object) at the top level, got {json_kind(data)})"]
    out: dict[str, Any] = {}
    found: list[str | None] = []
    for key, value in data.items():
        if key == "stages" and isinstance(value, dict):
            checked = {s: field_problem(v, _CONTROLLER_STAGE_FIELDS, f"stages.{s}") for s, v in value.items()}
            found += checked.values()
            out[key] = {s: v for s, v in value.items() if checked[s] is None}
            continue
        problem = field_problem(value, {} if key == "stages" else _CONTROLLER_FIELDS.get(key, "any"), key)
        found.append(problem)
        if problem is None:
            out[key] = value
    return out, [f"{where} ({p})" for p in found if p]
