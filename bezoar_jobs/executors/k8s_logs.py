"""Following the logs of a run's pods: one thread per pod streams its container's log
(``follow=True``) prefixed with ``[stage]`` (``[stage#i]`` for shard ``i``), keeping the last lines
of each stage for the failure report.

A log stream breaks for reasons that have nothing to do with the stage: the API server restarts, a
load balancer drops an idle connection, the kubelet rotates the file. A follower therefore asks for
timestamps (``timestamps=true``) and, when its stream ends while the container still runs, reconnects
with ``sinceSeconds`` reaching back past the last line it printed (plus a margin for clock skew
between this process and the node; the Python client has no ``sinceTime``) and drops the lines it
already printed, compared by their nanosecond timestamps, so every line is printed once. It stops
when the container has terminated and its log was read to the end, when the pod is gone, or when the
controller stops.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from .jobs import CONTAINER
from .k8s_api import api_exception, container_started, raw
from .k8s_retry import ApiRetry, transient

TAIL_LINES = 20  # log lines kept per stage for the failure report
Stamp = tuple[int, int]  # (unix seconds, nanoseconds)


def split_timestamp(line: str) -> tuple[Stamp | None, str]:
    """``"2026-01-02T03:04:05.123456789Z text"`` -> ((seconds, nanos), "text")."""
    head, sep, rest = line.partition(" ")
    if not sep or not head.endswith("Z") or "T" not in head:
        return None, line
    whole, _, frac = head[:-1].partition(".")
    try:
        secs = int(datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp())
        nanos = int((frac + "000000000")[:9]) if frac else 0
    except ValueError:
        return None, line
    return (secs, nanos), rest


SKEW_MARGIN_S = 30  # how far further back a resumed stream reaches, for clocks that disagree


def _since_seconds(stamp: Stamp) -> int:
    return max(1, math.ceil(time.time() - stamp[0]) + SKEW_MARGIN_S)


def container_terminated(pod: dict[str, Any]) -> bool:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER and "terminated" in (cs.get("state") or {}):
            return True
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


class LogFollower:
    def __init__(self, core: Any, namespace: str, emit: Callable[[str], None], say: Callable[[str], None],
                 stop: threading.Event, retry: ApiRetry | None = None, reconnect_s: float = 1.0):
        self.core = core
        self.ns = namespace
        self.emit = emit
        self.say = say
        self.stop = stop
        self.retry = retry or ApiRetry(900, say, stop)
        self.reconnect_s = reconnect_s
        self.tails: dict[str, deque[str]] = {}
        self.threads: dict[str, threading.Thread] = {}  # pod uid -> follower
        self.reconnects = 0  # streams resumed after a break (tests read it)
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

    def _pod(self, name: str) -> dict[str, Any] | None:
        """The pod now (None: gone)."""
        ApiException = api_exception()
        try:
            return raw(self.retry.call(f"get pod {name}", self.core.read_namespaced_pod, name, self.ns,
                                       _preload_content=False))
        except ApiException as e:
            if getattr(e, "status", None) == 404:
                return None
            raise

    def _follow(self, pod: str, stage: str, prefix: str) -> None:
        """Stream one pod's log to its end, reconnecting after breaks (see the module docstring)."""
        try:
            self._follow_loop(pod, stage, prefix)
        except Exception as e:  # a missing log is reported, never fatal
            if not self.stop.is_set():
                self.say(f"{stage}: stopped following the log of pod {pod}: {type(e).__name__}: {e}")

    def _follow_loop(self, pod: str, stage: str, prefix: str) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        ApiException = api_exception()
        tail = self.tail(stage)
        last: Stamp | None = None
        at_last = 0  # lines printed whose timestamp equals `last`
        breaks = 0
        final = False
        while not self.stop.is_set():
            kwargs: dict[str, Any] = {"container": CONTAINER, "follow": True, "timestamps": True,
                                      "_preload_content": False}
            if last is not None:
                kwargs["since_seconds"] = _since_seconds(last)
            try:
                resp = self.retry.call(f"log of pod {pod}", self.core.read_namespaced_pod_log, pod, self.ns, **kwargs)
            except ApiException as e:
                if getattr(e, "status", None) in (400, 404):  # not started yet, or gone: the caller retries later
                    return
                raise
            self._resps.add(resp)
            broke = False
            skip = at_last
            try:
                for line in iter_resp_lines(resp):
                    stamp, text = split_timestamp(line)
                    if stamp is not None and last is not None:
                        if stamp < last:
                            continue
                        if stamp == last and skip > 0:
                            skip -= 1
                            continue
                    if stamp is not None:
                        at_last = at_last + 1 if stamp == last else 1
                        last = stamp
                    tail.append(text)
                    self.emit(f"{prefix} {text}")
            except Exception as e:  # the stream broke (connection lost, server restarted)
                if self.stop.is_set():
                    return
                if not transient(e) and not isinstance(e, ValueError):
                    raise
                broke = True
            finally:
                self._resps.discard(resp)
                with contextlib.suppress(Exception):
                    resp.release_conn()
            if self.stop.is_set() or final:
                return
            cur = self._pod(pod)
            if cur is None:
                return
            if container_terminated(cur):
                if not broke:
                    return  # read to the end of a finished container's log
                final = True  # one more pass fetches what the break cut off
            breaks += 1
            self.reconnects += 1
            if breaks == 1 or breaks % 10 == 0:
                self.say(f"{stage}: log stream of pod {pod} {'broke' if broke else 'ended'}; reconnecting")
            self.stop.wait(self.retry.delay(min(breaks, 6)) if broke else self.reconnect_s)

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
