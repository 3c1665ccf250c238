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

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

from .errors import BadInput
from .store_base import NotFoundInStore, ObjectInfo, Store

__all__ = ["LocalStore", "NotFoundInStore", "ObjectInfo", "Store", "open_store"]

_UMASK = os.umask(0)
os.umask(_UMASK)


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

    # Durability: every object is written to a temporary name, flushed to disk (fsync), renamed, and
    # the directory that now names it is flushed too (as is every directory created for it). So what
    # was written before the manifest is on disk before the manifest is, and a machine that crashes
    # (not only a killed process) never leaves a manifest, or a checkpoint's COMPLETE marker, naming
    # files that came back empty or missing.
    def write_bytes(self, rel: str, data: bytes) -> None:
        p = self._path(rel)
        _make_dirs(p.parent)
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
        _fsync_dir(p.parent)

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

    def list_info(self, prefix: str = "") -> dict[str, ObjectInfo]:
        out = {}
        for rel in self.list(prefix):
            try:
                st = self._path(rel).stat()
            except FileNotFoundError:  # deleted between the listing and the stat
                continue
            out[rel] = ObjectInfo(st.st_size, str(st.st_mtime_ns))
        return out

    def delete(self, rel: str) -> None:
        self._path(rel).unlink(missing_ok=True)

    # ---- conditional writes: a hard link is an atomic create-if-absent; replacements happen under
    # an flock of the directory, so a version checked is still the version replaced
    @staticmethod
    def _version(p: Path) -> str:
        st = p.stat()
        return f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"

    def _temp_file(self, p: Path, data: bytes) -> str:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-" + p.name)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        return tmp

    def create_exclusive(self, rel: str, data: bytes) -> str | None:
        p = self._path(rel)
        tmp = self._temp_file(p, data)
        try:
            with _dir_lock(p.parent):
                os.link(tmp, p)
                return self._version(p)
        except FileExistsError:
            return None
        finally:
            Path(tmp).unlink(missing_ok=True)

    def read_versioned(self, rel: str) -> tuple[bytes, str]:
        p = self._path(rel)
        with _dir_lock(p.parent):
            try:
                return p.read_bytes(), self._version(p)
            except (FileNotFoundError, NotADirectoryError):
                raise NotFoundInStore(f"{self.url(rel)}: no such file in the run") from None

    def replace_if(self, rel: str, data: bytes, version: str) -> str | None:
        p = self._path(rel)
        tmp = self._temp_file(p, data)
        try:
            with _dir_lock(p.parent):
                try:
                    if self._version(p) != version:
                        return None
                except FileNotFoundError:
                    return None
                os.replace(tmp, p)
                return self._version(p)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def clean_temp(self, prefix: str) -> int:
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        n = 0
        if base.is_dir():
            for p in base.rglob(".tmp-*"):
                if p.is_file():
                    p.unlink(missing_ok=True)
                    n += 1
        return n

    def move(self, src: str, dst: str) -> None:
        s, d = self._path(src), self._path(dst)
        if not s.is_file():
            raise NotFoundInStore(f"{self.url(src)}: no such file in the run")
        _make_dirs(d.parent)
        os.replace(s, d)
        _fsync_dir(d.parent)
        _fsync_dir(s.parent)

    def upload_file(self, local: Path, rel: str) -> None:
        # a temporary name of its own (mkstemp), flushed before the rename: see write_bytes
        p = self._path(rel)
        _make_dirs(p.parent)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-" + p.name)
        try:
            try:
                shutil.copyfile(local, tmp)  # zero-copy where the kernel can
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(tmp, 0o666 & ~_UMASK)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(p.parent)

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


def _fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (a rename or a new name in it) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(directory: Path) -> None:
    """``mkdir -p``, each directory it creates flushed into its parent (a file's name is only as
    durable as the directories above it)."""
    missing = []
    d = directory
    while not d.is_dir():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            if not d.is_dir():
                raise
        _fsync_dir(d.parent)


@contextlib.contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    """An exclusive flock on a directory (held by this process until the block ends)."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


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
