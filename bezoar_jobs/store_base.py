"""The run store's interface: what every backend (a local directory, S3) implements, and the
conveniences built on its primitives. Backends: :mod:`bezoar_jobs.store` (local, and
``open_store``), :mod:`bezoar_jobs.s3store` (S3). Every path handed to a store is *relative to the
run* and uses ``/``.
"""

from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from pathlib import Path

from .errors import BadInput


class NotFoundInStore(BadInput):
    """A path the caller needs is not in the run. Exit 2: a retry will not make it appear."""


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
