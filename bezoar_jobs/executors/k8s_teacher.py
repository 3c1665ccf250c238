"""The teacher's lifecycle, when the cluster settings name its Deployment (``teacher.deployment``):
before the first stage that needs the teacher, scale it up to ``teacher.replicas`` if it is at 0
and (``waitReady``) wait until it has a ready replica (the Deployment is polled with ``get``: the
chart's Role grants no watch on Deployments); once every generate stage of the recipe is committed
and none of this run's is still going, scale it to 0 (``scaleDownAfterGeneration``).

Readiness is found in a thread; the outcome arrives as a ``("teacher", "ready" | "failed" | "bad",
message)`` event on the controller's queue (``bad``: 403/404, a setup error).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from ..manifest import read_manifest
from ..registry import stages_of
from ..store import Store
from .cluster import Teacher
from .k8s_api import api_exception, raw

TEACHER_READY_TIMEOUT_S = 3600.0


class TeacherLifecycle:
    def __init__(self, apps: Any, namespace: str, settings: Teacher, store: Store, say: Callable[[str], None],
                 events: queue.Queue[tuple[str, str, Any]], stop: threading.Event,
                 timeout_s: float = TEACHER_READY_TIMEOUT_S, poll_s: float = 2.0):
        self.apps = apps
        self.ns = namespace
        self.t = settings
        self.store = store
        self.say = say
        self.events = events
        self.stop = stop
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.state = "unknown"  # unknown | starting | ready | failed
        self._scaled_down = False

    @property
    def managed(self) -> bool:
        return bool(self.t.deployment)

    def request(self) -> None:
        """Make sure the teacher is coming up (once)."""
        if self.state == "unknown":
            self.state = "starting"
            threading.Thread(target=self._up, name="bezoar-teacher", daemon=True).start()

    def _up(self) -> None:
        """Scale the teacher up if it is at 0 and wait until a replica is ready (in a thread)."""
        ApiException = api_exception()
        t = self.t
        try:
            scale = raw(self.apps.read_namespaced_deployment_scale(t.deployment, self.ns, _preload_content=False))
            if not (scale.get("spec") or {}).get("replicas"):
                self.say(f"teacher: scaling Deployment {t.deployment} to {t.replicas}")
                self.apps.patch_namespaced_deployment_scale(t.deployment, self.ns, {"spec": {"replicas": t.replicas}},
                                                            _preload_content=False).release_conn()
            if t.waitReady:
                self.say(f"teacher: waiting for Deployment {t.deployment} to be ready")
                deadline = time.monotonic() + self.timeout_s
                polls = 0
                while not self.stop.is_set():
                    dep = raw(self.apps.read_namespaced_deployment(t.deployment, self.ns, _preload_content=False))
                    st = dep.get("status") or {}
                    fresh = (st.get("observedGeneration") or 0) >= (dep["metadata"].get("generation") or 0)
                    if fresh and (st.get("readyReplicas") or 0) >= 1:
                        break
                    if time.monotonic() > deadline:
                        self.events.put(("teacher", "failed", f"Deployment {t.deployment} had no ready replica after "
                                                              f"{self.timeout_s:.0f} s"))
                        return
                    # quick at first (a warm server is ready in a second), then every poll_s
                    polls += 1
                    time.sleep(min(self.poll_s, 0.1 * 2**polls))
                self.say(f"teacher: Deployment {t.deployment} is ready")
            self.events.put(("teacher", "ready", None))
        except ApiException as e:
            status = getattr(e, "status", None)
            self.events.put(("teacher", "bad" if status in (403, 404) else "failed",
                             f"Deployment {self.ns}/{t.deployment}: {status} {getattr(e, 'reason', '')}"))
        except Exception as e:  # reported as the waiting stage's failure
            self.events.put(("teacher", "failed", f"Deployment {self.ns}/{t.deployment}: {e}"))

    def after_generation(self, running: list[str]) -> None:
        """Scale the teacher to 0 once every generate stage is committed and none of ``running``
        (this run's stages still going) is one."""
        t = self.t
        if self._scaled_down or not t.deployment or not t.scaleDownAfterGeneration:
            return
        generate = stages_of("generate")
        if any(s in generate for s in running):
            return  # a generate Job of this run is still going (it may have committed, not ended)
        if any(read_manifest(self.store, s) is None for s in generate):
            return
        self._scaled_down = True
        ApiException = api_exception()
        try:
            scale = raw(self.apps.read_namespaced_deployment_scale(t.deployment, self.ns, _preload_content=False))
            if (scale.get("spec") or {}).get("replicas"):
                self.apps.patch_namespaced_deployment_scale(t.deployment, self.ns, {"spec": {"replicas": 0}},
                                                            _preload_content=False).release_conn()
                self.say(f"teacher: every generate stage is committed; scaled Deployment {t.deployment} to 0")
        except ApiException as e:  # a teacher left running costs money but breaks nothing: say so, go on
            self.say(f"teacher: could not scale Deployment {t.deployment} to 0: {getattr(e, 'status', '')} "
                     f"{getattr(e, 'reason', '')}")
