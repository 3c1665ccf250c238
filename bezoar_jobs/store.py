"""The run store: where a run lives (a local directory or ``s3://bucket/prefix``).

Every path handed to a store is *relative to the run* and uses ``/``. Objects are written whole:
a reader never sees half an object (local files are written to a temporary name and renamed; S3
PUTs are atomic per object). The commit rule (a stage exists once its ``_MANIFEST.json`` exists)
lives in :mod:`bezoar_jobs.manifest`; this module only moves bytes.

Credentials never come from the recipe: boto3 reads them from the environment
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``), a mounted shared credentials file
(``AWS_SHARED_CREDENTIALS_FILE``), or the pod's identity (IRSA / Workload Identity).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from urllib.parse import unquote, urlparse

from .errors import BadInput

_UMASK = os.umask(0)
os.umask(_UMASK)


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

    def upload_dir(self, local: Path, prefix: str) -> list[str]:
        """Upload every file under ``local`` to ``prefix/...``; return the relative paths written."""
        written = []
        for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            rel = f"{prefix.strip('/')}/{path.relative_to(local).as_posix()}".lstrip("/")
            self.upload_file(path, rel)
            written.append(rel)
        return written

    def download_dir(self, prefix: str, local: Path) -> list[Path]:
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


class LocalStore(Store):
    """A run in a local directory (``file:///abs/path`` or a plain path)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()

    def _path(self, rel: str) -> Path:
        rel = rel.lstrip("/")
        p = (self.root / rel).resolve()
        if p != self.root and self.root not in p.parents:
            raise BadInput(f"path {rel!r} escapes the run directory {self.root}")
        return p

    def read_bytes(self, rel: str) -> bytes:
        p = self._path(rel)
        try:
            return p.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFoundInStore(f"{self.url(rel)}: no such file in the run") from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        p = self._path(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-" + p.name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; committed files are ordinary files
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, rel: str) -> bool:
        return self._path(rel).is_file()

    def list(self, prefix: str = "") -> list[str]:
        # S3's meaning of a prefix, so both backends list the same paths: every file whose
        # run-relative path starts with ``prefix`` as a string ("stage/" is a directory,
        # "stage/part-" a partial name, "stage" also matches "stage-2/...").
        prefix = prefix.lstrip("/")
        head, _, partial = prefix.rpartition("/")
        base = self._path(head) if head else self.root
        if not base.is_dir():
            return []
        out = []
        for entry in base.iterdir():
            if not entry.name.startswith(partial):
                continue
            for p in [entry] if entry.is_file() else entry.rglob("*") if entry.is_dir() else []:
                # .tmp-* files are writes in progress, never objects
                if p.is_file() and not p.name.startswith(".tmp-"):
                    out.append(p.relative_to(self.root).as_posix())
        return sorted(out)

    def delete(self, rel: str) -> None:
        self._path(rel).unlink(missing_ok=True)

    def upload_file(self, local: Path, rel: str) -> None:
        p = self._path(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(".tmp-" + p.name)
        shutil.copyfile(local, tmp)
        os.replace(tmp, p)

    def download_file(self, rel: str, local: Path) -> None:
        p = self._path(rel)
        if not p.is_file():
            raise NotFoundInStore(f"{self.url(rel)}: no such file in the run")
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        # copy to a temporary name, then rename: a half copy never looks complete
        fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=".tmp-" + local.name)
        os.close(fd)
        try:
            shutil.copyfile(p, tmp)
            os.replace(tmp, local)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def open_store(uri: str | Path) -> Store:
    """Open a run location: ``s3://bucket/prefix``, ``file:///path`` or a plain path."""
    uri = str(uri)
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        from .s3store import S3Store

        if not parsed.netloc:
            raise BadInput(f"run URI {uri!r}: an s3:// URI needs a bucket (s3://bucket/prefix)")
        return S3Store(parsed.netloc, parsed.path.strip("/"))
    if parsed.scheme == "file":
        return LocalStore(unquote(parsed.path))  # LocalStore.uri percent-encodes (as_uri)
    if parsed.scheme in ("", ) or (len(parsed.scheme) == 1 and os.name == "nt"):
        return LocalStore(uri)
    raise BadInput(f"run URI {uri!r}: unsupported scheme {parsed.scheme!r} (use a path, file:// or s3://)")
