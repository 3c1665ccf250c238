"""One writer per stage: a lease in the run store.

``<run>/_leases/<name>.json`` says who is running a stage (``name`` is the stage, ``<stage>.shard-i-of-n``
for a shard, ``run`` for a whole ``bezoar run``): a holder id, the command, host, pid, when it was
taken, renewed and when it expires. It is

- **taken atomically**: created with a conditional write (S3 ``If-None-Match: *``; a hard link on a
  local disk), so of two processes starting the same stage exactly one gets it; the other stops at
  once, exit 3, with a message naming the holder;
- **renewed while running**: a daemon thread rewrites it every ``ttl/4`` seconds, conditionally on
  the version it last wrote (S3 ``If-Match``), so a lease someone else took over is never
  overwritten; a holder that could not renew before its expiry, or found the lease taken, has *lost*
  it: the stage stops and commits nothing (:meth:`Lease.check` before the commit);
- **stale when its holder is gone**: a lease not renewed past its expiry (``BEZOAR_LEASE_TTL_S``,
  default 60 s; a 5 s allowance for clock skew between hosts) is taken over, and so, at once, is one
  whose holder was a process on this same machine that no longer runs (a SIGKILLed stage, found by
  pid, process start time and boot id). A lease that stopped being renewed is waited for until it
  expires, so a preempted Job's replacement pod continues after at most one ``ttl``;
- **released** when the holder ends (deleted, only if it is still its own).

Where the store has no conditional writes (``BEZOAR_S3_CONDITIONAL_WRITES=false``) a lease is
written and read back: two processes starting within that moment could both proceed (see
docs/reliability.md). ``prepare_force`` refuses to remove a stage held by someone else
(:func:`check_free`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import RetryableError
from .layout import lease_path
from .store_base import NotFoundInStore, Store

log = logging.getLogger("bezoar")

DEFAULT_TTL_S = 60.0
CLOCK_SKEW_S = 5.0


class LeaseHeld(RetryableError):
    """Another process holds the lease: a retry after it finishes may succeed (exit 3)."""


class LeaseLost(RetryableError):
    """This process could not keep its lease (not renewed in time, or taken over): nothing is committed."""


def ttl_s() -> float:
    raw = os.environ.get("BEZOAR_LEASE_TTL_S", "").strip()
    try:
        return max(1.0, float(raw)) if raw else DEFAULT_TTL_S
    except ValueError:
        return DEFAULT_TTL_S


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with the pid
    and the boot id, it names one process even after its pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def holder_gone(info: dict[str, Any]) -> bool:
    """Whether the holder was a process on this machine that no longer runs (False when unknown)."""
    if info.get("host") != socket.gethostname() or not info.get("boot_id") or info.get("boot_id") != _boot_id():
        return False
    pid = info.get("pid")
    if not isinstance(pid, int):
        return False
    start = _pid_start(pid)
    return start is None or (info.get("pid_start") is not None and start != info["pid_start"])


def describe(info: dict[str, Any] | None, now: float | None = None) -> str:
    if not info:
        return "an unreadable lease"
    now = time.time() if now is None else now
    renewed = info.get("renewed_at", 0)
    expires = info.get("expires_at", 0)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("acquired_at", 0)))
    return (f"`{info.get('command', '?')}` (pid {info.get('pid', '?')} on host {info.get('host', '?')}, since "
            f"{started}; renewed {max(0.0, now - renewed):.0f} s ago, expires in {max(0.0, expires - now):.0f} s "
            "unless renewed)")


def _parse(body: bytes) -> dict[str, Any] | None:
    try:
        info = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("expires_at"), int | float) else None


def _stale(info: dict[str, Any] | None, now: float) -> bool:
    return info is None or now > float(info["expires_at"]) + CLOCK_SKEW_S or holder_gone(info)


def current(store: Store, name: str) -> dict[str, Any] | None:
    """The lease on ``name`` if a live holder has it (None when free or stale)."""
    try:
        body, _ = store.read_versioned(lease_path(name))
    except NotFoundInStore:
        return None
    info = _parse(body)
    return None if _stale(info, time.time()) else info


def check_free(store: Store, name: str, holder: str | None = None) -> None:
    """Raise LeaseHeld when someone other than ``holder`` (a lease id) holds ``name``."""
    info = current(store, name)
    if info is not None and info.get("id") != holder:
        raise LeaseHeld(f"{name}: {store.url(lease_path(name))} is held by {describe(info)}: another process is "
                        "running it; wait for it to finish, or stop it")


class Lease:
    """A held lease; use as a context manager (``with Lease(store, name, command):``)."""

    def __init__(self, store: Store, name: str, command: str, ttl: float | None = None,
                 on_lost: Callable[[str], None] | None = None):
        self.store = store
        self.name = name
        self.rel = lease_path(name)
        self.command = command
        self.ttl = ttl if ttl is not None else ttl_s()
        self.every = self.ttl / 4
        self.on_lost = on_lost
        self.id = uuid.uuid4().hex
        self.version: str | None = None
        self.expires_at = 0.0
        self.lost: str | None = None
        self._acquired_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the record -----------------------------------------------------------------------------
    def _record(self, now: float) -> bytes:
        pid = os.getpid()
        return json.dumps({
            "id": self.id, "name": self.name, "command": self.command, "host": socket.gethostname(), "pid": pid,
            "pid_start": _pid_start(pid), "boot_id": _boot_id(), "acquired_at": self._acquired_at,
            "renewed_at": now, "expires_at": now + self.ttl, "ttl_s": self.ttl,
        }, indent=1).encode()

    # -- taking it ------------------------------------------------------------------------------
    def acquire(self) -> Lease:
        deadline = time.time() + self.ttl + CLOCK_SKEW_S + 2 * self.every
        waited = False
        while True:
            now = self._acquired_at = time.time()
            version = self.store.create_exclusive(self.rel, self._record(now))
            if version is None:
                try:
                    body, old = self.store.read_versioned(self.rel)
                except NotFoundInStore:
                    continue  # released meanwhile: try again
                info = _parse(body)
                if _stale(info, now):
                    log.info("%s: taking over the stale lease of %s", self.name, describe(info, now))
                    version = self.store.replace_if(self.rel, self._record(now), old)
                    if version is None:
                        continue  # someone else was faster: look again
                elif info is not None and now - float(info.get("renewed_at", 0)) > 2.5 * self.every \
                        and now < deadline:
                    # not renewed for a while: its holder is probably gone; it expires by itself
                    if not waited:
                        log.warning("%s: waiting for the lease of %s to expire", self.name, describe(info, now))
                        waited = True
                    time.sleep(min(2.0, max(0.2, float(info["expires_at"]) + CLOCK_SKEW_S - now)))
                    continue
                else:
                    raise LeaseHeld(f"{self.name}: another process is running it: {describe(info, now)} "
                                    f"({self.store.url(self.rel)}); wait for it to finish, or stop it")
            self.version, self.expires_at = version, now + self.ttl
            self._thread = threading.Thread(target=self._renew_loop, name=f"bezoar-lease-{self.name}", daemon=True)
            self._thread.start()
            return self

    # -- keeping it -----------------------------------------------------------------------------
    def _renew_loop(self) -> None:
        while not self._stop.wait(self.every):
            self.renew()

    def renew(self) -> None:
        if self.lost or self.version is None:
            return
        now = time.time()
        try:
            version = self.store.replace_if(self.rel, self._record(now), self.version)
        except Exception as e:  # the store is unreachable: keep trying until the lease expires
            if time.time() > self.expires_at:
                self._lose(f"it could not be renewed before it expired ({type(e).__name__}: {e})")
            else:
                log.warning("%s: could not renew the lease (%s); retrying", self.name, e)
            return
        if version is None:
            self._lose("another process took it over")
            return
        self.version, self.expires_at = version, now + self.ttl

    def _lose(self, why: str) -> None:
        self.lost = why
        log.error("%s: lost the lease %s: %s; this process stops and commits nothing",
                  self.name, self.store.url(self.rel), why)
        if self.on_lost is not None:
            self.on_lost(why)

    def check(self) -> None:
        """Raise LeaseLost unless this process still holds the lease (read back from the store)."""
        if self.lost is None:
            try:
                body, _ = self.store.read_versioned(self.rel)
            except NotFoundInStore:
                self.lost = "the lease object was deleted"
            else:
                info = _parse(body)
                if info is None or info.get("id") != self.id:
                    self.lost = f"it is now held by {describe(info)}"
        if self.lost is not None:
            raise LeaseLost(f"{self.name}: lost its lease ({self.lost}): nothing is committed; a rerun continues "
                            "from the saved progress")

    # -- giving it back -------------------------------------------------------------------------
    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost is not None or self.version is None:
            return
        try:
            body, _ = self.store.read_versioned(self.rel)
            info = _parse(body)
            if info is not None and info.get("id") == self.id:
                self.store.delete(self.rel)
        except Exception as e:  # a store that is down: the lease expires by itself
            log.warning("%s: could not release the lease (%s); it expires in %.0f s", self.name, e,
                        max(0.0, self.expires_at - time.time()))

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
