"""Records written while a stage works, so an interrupted stage resumes without duplicates.

Each finished request becomes a JSON record with a stable id. Records are buffered and written as
new part objects under ``<stage>/_work/<key>/<phase>/part-<uuid>.jsonl`` (S3 has no append, and a
part object is either whole or absent). On restart every part is read back; ids already present
are not asked again. ``key`` is the stage's parameter hash, so work done under other parameters
is never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any

from ..runner import WorkArea


def stable_hash(*parts: Any) -> int:
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()
    return int(h[:16], 16)


def in_shard(unit_id: str, shard: tuple[int, int] | None) -> bool:
    if shard is None:
        return True
    i, n = shard
    return stable_hash(unit_id) % n == i


class RecordLog:
    def __init__(self, work: WorkArea, key: str, phase: str, flush_every: int = 16, flush_seconds: float = 5.0):
        self.work = work
        self.sub = f"{key}/{phase}"
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.records: dict[str, dict[str, Any]] = {}
        self._pending: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()
        for name in work.list(self.sub + "/"):
            for line in work.get_bytes(name).decode("utf-8").splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self.records.setdefault(rec["id"], rec)  # first write wins: no duplicates
        self.resumed = len(self.records)

    def __contains__(self, rid: str) -> bool:
        return rid in self.records

    def get(self, rid: str) -> dict[str, Any] | None:
        return self.records.get(rid)

    def add(self, rec: dict[str, Any]) -> None:
        if rec["id"] in self.records:
            return
        self.records[rec["id"]] = rec
        self._pending.append(rec)
        if len(self._pending) >= self.flush_every or time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self._pending)
        self.work.put_bytes(f"{self.sub}/part-{uuid.uuid4().hex}.jsonl", body.encode("utf-8"))
        self._pending = []
        self._last_flush = time.monotonic()
