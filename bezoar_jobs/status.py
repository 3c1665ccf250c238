"""``bezoar status``: each stage's state, counts, duration and teacher/judge utilization; damaged
stages; for a Kubernetes run, what its controller saw of the stages not committed.

A manifest is only read through :func:`~bezoar_jobs.manifest.manifest_state`, which has checked the
types of the fields used here (a wrong one makes the stage *damaged*, shown with why); the
controller's status file is read through ``checked_controller_status``, which leaves out and names
what has the wrong shape."""

from __future__ import annotations

import json
from typing import Any

from .llm.base import TAIL_COUNTS, tails_text
from .manifest import manifest_state
from .registry import CANONICAL
from .store import Store, open_store


def status_rows(store: Store) -> list[dict[str, Any]]:
    from .state import stage_state

    rows = []
    for name in CANONICAL:
        mstate, m, why = manifest_state(store, name)
        state = "committed" if m is not None else "damaged" if mstate == "damaged" else stage_state(store, name)
        rows.append(
            {
                "stage": name,
                "state": state,
                **({"problem": why} if why else {}),
                "counts": (m or {}).get("counts", {}),
                "seconds": (m or {}).get("timings", {}).get("seconds"),
                "committed_at": (m or {}).get("committed_at"),
                # teacher/judge slots kept busy over the stage's span, as its client saw it
                "utilization": {role: u.get("utilization") for role, u in ((m or {}).get("utilization") or {}).items()},
                # what the pool did for them: retries after failures, hedged and abandoned attempts
                "tails": {role: {k: u[k] for k in TAIL_COUNTS if isinstance(u.get(k), int)}
                          for role, u in ((m or {}).get("utilization") or {}).items() if isinstance(u, dict)},
            }
        )
    return rows


def show_status(run: str, as_json: bool = False) -> int:
    """``bezoar status``: print the run's stages (``as_json``: as one JSON object)."""
    from .run_control import cancelled, checked_controller_status

    store = open_store(run)
    rows = status_rows(store)
    cluster, cluster_problems = checked_controller_status(store)  # what of it has the right shape
    marker = cancelled(store)
    if as_json:
        print(json.dumps({"run": store.uri, "stages": rows, "cancelled": marker, "controller": cluster,
                          "controller_problems": cluster_problems}, indent=2))
        return 0
    print(f"run: {store.uri}" + (f"  (CANCELLED at {marker.get('cancelled_at', '?')})" if marker is not None else ""))
    print(f"{'stage':<16} {'state':<10} {'seconds':>8}  counts")
    for r in rows:
        counts = ", ".join(f"{k}={v}" for k, v in r["counts"].items() if not isinstance(v, dict))
        if r["utilization"]:
            counts += "; " + ", ".join(f"{role} busy {u:.2f}" + tails_text(r["tails"].get(role))
                                       for role, u in r["utilization"].items() if u is not None)
        secs = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        print(f"{r['stage']:<16} {r['state']:<10} {secs:>8}  {counts}")
    damaged = [r for r in rows if r["state"] == "damaged"]
    for r in damaged:
        print(f"damaged: {r['problem']}")
    for problem in cluster_problems:
        print(f"damaged: {problem}")
    seen = cluster or {}
    committed = {r["stage"] for r in rows if r["state"] == "committed"}
    waiting = {s: v for s, v in (seen.get("stages") or {}).items()
               if v.get("state") != "Succeeded" and s not in committed}
    if waiting:
        print(f"on the cluster (namespace {seen.get('namespace', '?')}, as the controller saw it at "
              f"{seen.get('updated_at', '?')}):")
        for s, v in waiting.items():
            why = ": ".join(x for x in (v.get("reason"), v.get("message")) if x)
            print(f"  {s:<16} {v.get('state', '?'):<10} Job {v.get('job', '?')}" + (f"  {why}" if why else ""))
    return 0
