"""The run store's interface: what every backend (a local directory, S3) implements, and the
conveniences built on its primitives. Backends: :mod:`bezoar_jobs.store` (local, and
``open_store``), :mod:`bezoar_jobs.s3store` (S3). Every path handed to a store is *relative to the
run* and uses ``/``.
"""

from __future__ import annotations

import builtins
import hashlib
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput


class NotFoundInStore(BadInput):
    """A path the caller needs is not in the run. Exit 2: a retry will not make it appear."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing says of an object: its size and a token that changes whenever the object is
    rewritten (S3: the ETag; a local file: its modification time in nanoseconds)."""

    size: int
    token: str


class Store(ABC):
    """One run location. Paths are relative to the run root."""

    uri: str

    @abstractmethod
    def read_bytes(self, rel: str) -> bytes:
        """Return an object's bytes; raise NotFoundInStore naming the full URI when absent."""

    @abstractmethod
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write an object whole (atomically as seen by readers)."""

    @abstractmethod
    def exists(self, rel: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All object paths under ``prefix`` (recursive), relative to the run, sorted."""

    @abstractmethod
    def delete(self, rel: str) -> None:
        """Delete one object; absent is fine."""

    @abstractmethod
    def upload_file(self, local: Path, rel: str) -> None:
        """Copy a local file into the run (multipart for large files on S3)."""

    @abstractmethod
    def download_file(self, rel: str, local: Path) -> None:
        """Copy an object to a local path (parents created); NotFoundInStore when absent."""

    @abstractmethod
    def list_info(self, prefix: str = "") -> dict[str, ObjectInfo]:
        """Like :meth:`list`, with each object's size and change token (one listing, no download)."""

    def fetch_hashed(self, rel: str, local: Path) -> tuple[int, str]:
        """Download an object and return its (size, sha256). A download (zero-copy locally, parallel
        ranges on S3) then a hash of the file still in the page cache: measured no slower than hashing
        while streaming one GET (docs/benchmarks.md, "Reading committed inputs")."""
        self.download_file(rel, local)
        h = hashlib.sha256()
        with open(local, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return Path(local).stat().st_size, h.hexdigest()

    # ---- conditional writes (leases) --------------------------------------------------------
    @abstractmethod
    def create_exclusive(self, rel: str, data: bytes) -> str | None:
        """Write ``rel`` only if it does not exist (an atomic test-and-set): the new version, or None
        when it exists."""

    @abstractmethod
    def read_versioned(self, rel: str) -> tuple[bytes, str]:
        """An object's bytes and its version (for :meth:`replace_if`); NotFoundInStore when absent."""

    @abstractmethod
    def replace_if(self, rel: str, data: bytes, version: str) -> str | None:
        """Overwrite ``rel`` only if it is still at ``version``: the new version, or None when it
        changed or vanished."""

    # ---- housekeeping -----------------------------------------------------------------------
    def clean_temp(self, prefix: str) -> int:
        """Remove what interrupted writes left under ``prefix`` (temporary files, unfinished
        multipart uploads); the number removed. Only call it while no one else writes there."""
        return 0

    def move(self, src: str, dst: str) -> None:
        """Move one object inside the run (a copy, then the delete)."""
        with tempfile.TemporaryDirectory(prefix="bezoar-move-") as tmp:
            local = Path(tmp) / "obj"
            self.download_file(src, local)
            self.upload_file(local, dst)
        self.delete(src)

    # ---- conveniences built on the primitives -------------------------------------------
    def url(self, rel: str = "") -> str:
        return self.uri.rstrip("/") + ("/" + rel.lstrip("/") if rel else "")

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def delete_prefix(self, prefix: str) -> None:
        for rel in self.list(prefix):
            self.delete(rel)

    def upload_dir(self, local: Path, prefix: str) -> builtins.list[str]:
        """Upload every file under ``local`` to ``prefix/...``; return the relative paths written."""
        written = []
        for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            rel = f"{prefix.strip('/')}/{path.relative_to(local).as_posix()}".lstrip("/")
            self.upload_file(path, rel)
            written.append(rel)
        return written

    def download_dir(self, prefix: str, local: Path) -> builtins.list[Path]:
        """Download every object under ``prefix`` into ``local`` keeping the relative layout."""
        prefix = prefix.strip("/")
        prefix = prefix + "/" if prefix else ""  # "" is the whole run, not "/"
        out = []
        for rel in self.list(prefix):
            dest = Path(local) / rel[len(prefix):]
            self.download_file(rel, dest)
            out.append(dest)
        if not out:
            raise NotFoundInStore(f"{self.url(prefix)}: nothing stored under this prefix")
        return out
