"""Records written while a stage works, so an interrupted stage resumes without duplicates.

Each finished request becomes a JSON record with a stable id. Records are buffered and written as
new part objects under ``<stage>/_work/<key>/<phase>/part-<uuid>.jsonl`` (S3 has no append, and a
part object is either whole or absent). On restart every part is read back; ids already present
are not asked again. ``key`` is the stage's parameter hash and, for a stage that reads committed
inputs, their manifest hashes (stages/common.work_key), so work done under other parameters or on
other inputs is never mixed in. A line of a part that is not a record (torn, damaged) is dropped with
a WARNING naming the part and the line, and its request is asked again. With ``valid`` (a test of
a record: "the verdict parses"), a record that fails it does not count as done: a later valid record
of the same id replaces it.

When the run store stops answering (every store operation is bounded, see s3store.py), the answers
already received are not lost: the part that could not be written, and every record after it, go
to a local *spool* (``$BEZOAR_SPOOL_DIR``, default ``~/.cache/bezoar-jobs/spool``, one directory per
run and stage) and :class:`StoreUnavailable` tells the caller to stop asking. The next start of the
stage on this machine uploads the spooled parts before anything else, so no answer is asked twice.
(On Kubernetes the spool lives as long as the pod's filesystem: a replacement pod asks again for
what its predecessor had spooled.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import RetryableError
from ..runner import WorkArea

log = logging.getLogger("bezoar")


class StoreUnavailable(RetryableError):
    """The run store did not take a part of records; they are kept in the local spool."""


def spool_root() -> Path:
    return Path(os.environ.get("BEZOAR_SPOOL_DIR") or Path.home() / ".cache" / "bezoar-jobs" / "spool")


def stable_hash(*parts: Any) -> int:
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()
    return int(h[:16], 16)


def in_shard(unit_id: str, shard: tuple[int, int] | None) -> bool:
    if shard is None:
        return True
    i, n = shard
    return stable_hash(unit_id) % n == i


class RecordLog:
    def __init__(self, work: WorkArea, key: str, phase: str, flush_every: int = 16, flush_seconds: float = 5.0,
                 valid: Callable[[dict[str, Any]], bool] | None = None):
        self.work = work
        self.valid = valid
        self.sub = f"{key}/{phase}"
        run = hashlib.sha256(work.store.uri.encode()).hexdigest()[:16]
        self.spool = spool_root() / run / work.prefix / self.sub
        self.spooling = False  # the store failed in this run: every later part goes to the spool
        self._unspool()
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.records: dict[str, dict[str, Any]] = {}
        self._pending: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()
        for name in work.list(self.sub + "/"):
            for rec in self._read_part(name):
                if self._replaces(rec):  # first usable write wins: no duplicates
                    self.records[rec["id"]] = rec
        self.resumed = len(self.records)

    def _read_part(self, name: str) -> list[dict[str, Any]]:
        """The records of one part. A line that is not a record (a part torn by a crash, bytes damaged
        in the store) is dropped with a WARNING naming the part and the line: its request is simply not
        done, and is asked again. Raising instead would fail every resume of the stage for good, since
        ``_work/`` survives ``--force`` and ``bezoar repair``."""
        out = []
        for n, raw in enumerate(self.work.get_bytes(name).split(b"\n"), 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                why = f"not a JSON record ({e})"
            else:
                if isinstance(rec, dict) and isinstance(rec.get("id"), str):
                    out.append(rec)
                    continue
                why = "not a record with a string 'id'"
            log.warning("%s line %d: %s: dropped, its request is asked again", self.work.url(name), n, why)
        return out

    def __contains__(self, rid: str) -> bool:
        return rid in self.records

    def get(self, rid: str) -> dict[str, Any] | None:
        return self.records.get(rid)

    def _replaces(self, rec: dict[str, Any]) -> bool:
        old = self.records.get(rec["id"])
        if old is None:
            return True
        return self.valid is not None and not self.valid(old) and self.valid(rec)

    def add(self, rec: dict[str, Any]) -> None:
        if not self._replaces(rec):
            return
        self.records[rec["id"]] = rec
        self._pending.append(rec)
        if len(self._pending) >= self.flush_every or time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write the pending records as one part; StoreUnavailable (after spooling them) when the
        store does not take it."""
        if not self._pending:
            return
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self._pending).encode("utf-8")
        name = f"part-{uuid.uuid4().hex}.jsonl"
        self._pending = []
        self._last_flush = time.monotonic()
        if self.spooling:
            self._to_spool(name, body)
            return
        try:
            self.work.put_bytes(f"{self.sub}/{name}", body)
        except RetryableError as e:
            self.spooling = True
            try:
                self._to_spool(name, body)
            except OSError as oe:
                raise StoreUnavailable(
                    f"the run store did not take {self.work.url(self.sub)}/{name} ({e}), and the local spool "
                    f"{self.spool} cannot be written ({oe.strerror}): these answers are lost"
                ) from None
            raise StoreUnavailable(
                f"the run store did not take {self.work.url(self.sub)}/{name} ({e}); the answers received are "
                f"kept in {self.spool} and uploaded first when this stage starts again on this machine"
            ) from None

    def _to_spool(self, name: str, body: bytes) -> None:
        # flushed to disk before it is named a part, and the name flushed too: a machine that crashes
        # leaves the part whole or absent, never a torn one that _unspool would upload to the store
        self.spool.mkdir(parents=True, exist_ok=True)
        tmp = self.spool / f".tmp-{name}"
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.spool / name)
        fd = os.open(self.spool, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _unspool(self) -> None:
        """Upload what an earlier run could not write (before the store's parts are read)."""
        if not self.spool.is_dir():
            return
        parts = sorted(self.spool.glob("part-*.jsonl"))
        for p in parts:
            try:
                body = p.read_bytes()
            except FileNotFoundError:  # another process on this machine (a shard of the stage) uploaded it first
                continue
            self.work.put_bytes(f"{self.sub}/{p.name}", body)  # the same name and bytes: uploading twice is harmless
            p.unlink(missing_ok=True)
        if parts:
            log.info("%s: uploaded %d part(s) of records kept in %s while the store was unavailable",
                     self.work.url(self.sub), len(parts), self.spool)
