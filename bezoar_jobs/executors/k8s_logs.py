"""Following the logs of a run's pods: one thread per pod streams its container's log
(``follow=True``) prefixed with ``[stage]`` (``[stage#i]`` for shard ``i``), keeping the last lines
of each stage for the failure report."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .jobs import CONTAINER
from .k8s_api import container_started

TAIL_LINES = 20  # log lines kept per stage for the failure report


class LogFollower:
    def __init__(self, core: Any, namespace: str, emit: Callable[[str], None], say: Callable[[str], None],
                 stop: threading.Event):
        self.core = core
        self.ns = namespace
        self.emit = emit
        self.say = say
        self.stop = stop
        self.tails: dict[str, deque[str]] = {}
        self.threads: dict[str, threading.Thread] = {}  # pod uid -> follower
        self._resps: set[Any] = set()

    def tail(self, stage: str) -> deque[str]:
        return self.tails.setdefault(stage, deque(maxlen=TAIL_LINES))

    def follow(self, pod: dict[str, Any], stage: str, prefix: str) -> None:
        """Start following ``pod`` once its container has started (once per pod)."""
        meta = pod["metadata"]
        if meta["uid"] in self.threads or not container_started(pod):
            return
        th = threading.Thread(target=self._follow, args=(meta["name"], stage, prefix),
                              name=f"bezoar-log-{meta['name']}", daemon=True)
        self.threads[meta["uid"]] = th
        th.start()

    def _follow(self, pod: str, stage: str, prefix: str) -> None:
        """Stream one pod's log until the container ends (the API closes the stream then)."""
        from kubernetes.watch.watch import iter_resp_lines

        tail = self.tail(stage)
        try:
            resp = self.core.read_namespaced_pod_log(pod, self.ns, container=CONTAINER, follow=True,
                                                     _preload_content=False)
        except Exception as e:  # a missing log is reported, never fatal
            self.say(f"{stage}: cannot stream the log of pod {pod}: {getattr(e, 'reason', e)}")
            return
        self._resps.add(resp)
        try:
            for line in iter_resp_lines(resp):
                tail.append(line)
                self.emit(f"{prefix} {line}")
        except Exception as e:  # the stream broke (pod deleted, connection lost)
            if not self.stop.is_set():
                self.say(f"{stage}: log stream of pod {pod} ended early: {type(e).__name__}")
        finally:
            self._resps.discard(resp)
            with contextlib.suppress(Exception):
                resp.release_conn()

    def last_lines(self, stage: str, pods: list[dict[str, Any]]) -> list[str]:
        """The stage's last log lines: wait briefly for its followers, fetch logs they never got."""
        for pod in pods:
            t = self.threads.get(pod["metadata"]["uid"])
            if t is not None:
                t.join(timeout=5)
            elif container_started(pod):
                # The Job failed before the watch showed us this pod: read what it wrote.
                with contextlib.suppress(Exception):
                    resp = self.core.read_namespaced_pod_log(pod["metadata"]["name"], self.ns, container=CONTAINER,
                                                             tail_lines=TAIL_LINES, _preload_content=False)
                    text = resp.data.decode("utf-8", "replace")
                    resp.release_conn()
                    self.tail(stage).extend(text.splitlines())
        return list(self.tails.get(stage, ()))

    def close(self, grace: float = 3.0) -> None:
        """Let followers of finished pods print their last lines, then stop streaming the logs of
        pods still running (after a failure elsewhere): once `bezoar run` has returned, nothing of
        it should still be printing."""
        deadline = time.monotonic() + grace
        for th in list(self.threads.values()):
            th.join(timeout=max(0.0, deadline - time.monotonic()))
        for resp in list(self._resps):
            with contextlib.suppress(Exception):
                resp.shutdown()
