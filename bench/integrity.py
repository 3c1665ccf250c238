"""Benchmark the check of committed inputs at read (issue 11: "inputs verified at read").

A stage hashes every committed file it reads and compares it with its manifest before using it. Three
ways to read a file of ``--mib`` MiB, on a local run directory and on a real S3 server (SeaweedFS, as
in the tests), each the best of ``--repeat``:

- ``download``: the copy alone (what a stage did before: no check);
- ``fetch_hashed``: what ``StageContext.fetch_input`` does now: the copy, then a sha256 of the file
  (still in the page cache);
- ``one streamed pass``: the alternative we did not take: one read (one GET on S3) hashed and written
  chunk by chunk.

Usage::

    .venv/bin/python bench/integrity.py [--mib 256] [--repeat 3] [--no-write]

The figures and the command are appended to docs/benchmarks.md under "## Reading committed inputs".
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from bezoar_jobs.manifest import sha256_file  # noqa: E402
from bezoar_jobs.s3store import S3Store  # noqa: E402
from bezoar_jobs.store import LocalStore, open_store  # noqa: E402
from bezoar_jobs.store_base import Store  # noqa: E402


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def streamed(src: BinaryIO, dest: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with src, open(dest, "wb") as out:
        for block in iter(lambda: src.read(chunk), b""):
            h.update(block)
            out.write(block)
    return h.hexdigest()


def one_pass(store: Store, rel: str, dest: Path) -> str:
    if isinstance(store, LocalStore):
        return streamed(open(store.root / rel, "rb"), dest)
    assert isinstance(store, S3Store)
    return streamed(store.client.get_object(Bucket=store.bucket, Key=store._key(rel))["Body"], dest)


def measure(store: Store, src: Path, tmp: Path, repeat: int) -> dict[str, float]:
    rel = "stage/data/big.bin"
    store.upload_file(src, rel)
    dest = tmp / "dest.bin"
    expected = sha256_file(src)
    assert store.fetch_hashed(rel, dest)[1] == one_pass(store, rel, dest) == expected
    return {
        "download (no check)": best(lambda: store.download_file(rel, dest), repeat),
        "fetch_hashed (download, then sha256)": best(lambda: store.fetch_hashed(rel, dest), repeat),
        "one streamed pass (not used)": best(lambda: one_pass(store, rel, dest), repeat),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    import seaweed

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bezoar-bench-") as t:
        tmp = Path(t)
        src = tmp / "big.bin"
        with open(src, "wb") as f:
            for _ in range(a.mib):
                f.write(os.urandom(1 << 20))
        results["local"] = measure(open_store(tmp / "run"), src, tmp, a.repeat)
        srv = seaweed.start(tmp / "weed")
        try:
            srv.client().create_bucket(Bucket="bench")
            os.environ.update(srv.env())
            results["s3 (SeaweedFS)"] = measure(open_store("s3://bench/run"), src, tmp, a.repeat)
        finally:
            seaweed.stop(srv)
    lines = [
        "| store | read | seconds | MiB/s |",
        "|---|---|---|---|",
    ]
    for where, figs in results.items():
        for how, secs in figs.items():
            lines.append(f"| {where} | {how} | {secs:.2f} | {a.mib / secs:.0f} |")
    table = "\n".join(lines)
    print(table)
    if a.no_write:
        return
    doc = REPO / "docs" / "benchmarks.md"
    head = (
        f"\n## Reading committed inputs\n\nMeasured {time.strftime('%Y-%m-%d')} on {platform.machine()}, "
        f"{os.cpu_count()} CPU cores (shared), Python {platform.python_version()}; command: "
        f"`.venv/bin/python bench/integrity.py --mib {a.mib} --repeat {a.repeat}`.\n"
        f"A {a.mib} MiB file read from a committed stage, best of {a.repeat}: the copy alone (no check), "
        "`fetch_hashed` (what a stage does now: the copy, then sha256 over the file in the page cache), and one "
        "streamed pass hashing as it writes (one GET on S3), which we measured and did not take.\n\n"
    )
    doc.write_text(doc.read_text(encoding="utf-8").rstrip("\n") + "\n" + head + table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
