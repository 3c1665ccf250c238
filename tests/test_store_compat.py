"""The S3 store on S3-compatible stores that refuse boto3's default checksums (boto3 >= 1.36).

The store behind the proxy is the session's SeaweedFS; the proxy (tests/s3_compat.py) refuses what such stores
were reported to refuse: checksum headers on uploads, aws-chunked bodies, a DeleteObjects without Content-MD5.
"""

from __future__ import annotations

import hashlib
import os
import urllib.parse
from pathlib import Path

import pytest

from bezoar_jobs.errors import BadInput
from bezoar_jobs.s3settings import S3Settings
from bezoar_jobs.s3store import S3Store
from bezoar_jobs.store import open_store
from tests.s3_compat import pre_checksum_store

MiB = 1 << 20


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_every_store_operation_works_on_a_store_without_the_new_checksums(
    s3_server, s3_run_uri: str, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With boto3's defaults every write to such a store was refused (InvalidArgument on the checksum headers),
    and the batch delete of a run's prefix was refused for its missing Content-MD5."""
    with pre_checksum_store(s3_server.endpoint) as (url, seen):
        monkeypatch.setenv("BEZOAR_S3_ENDPOINT_URL", url)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", url)
        monkeypatch.setenv("BEZOAR_S3_MULTIPART_THRESHOLD", "5MiB")
        monkeypatch.setenv("BEZOAR_S3_MULTIPART_CHUNKSIZE", "5MiB")
        store = open_store(s3_run_uri)
        assert isinstance(store, S3Store) and store.settings.checksums == "when_required"

        store.write_bytes("a/one.json", b'{"n": 1}')
        assert store.read_bytes("a/one.json") == b'{"n": 1}' and store.exists("a/one.json")
        version = store.create_exclusive("lease", b"mine")
        assert version and store.create_exclusive("lease", b"theirs") is None  # If-None-Match still refuses
        assert store.replace_if("lease", b"renewed", version) and store.read_bytes("lease") == b"renewed"
        big = tmp_path / "model.safetensors"
        big.write_bytes(os.urandom(12 * MiB))  # three parts of a multipart upload
        store.upload_file(big, "sft/model/model.safetensors")
        back = tmp_path / "back" / "model.safetensors"
        store.download_file("sft/model/model.safetensors", back)
        assert _sha(back) == _sha(big)
        store.move("a/one.json", "b/one.json")
        assert store.list("b/") == ["b/one.json"] and not store.exists("a/one.json")
        for i in range(3):
            store.write_bytes(f"tmp/{i}", b"x")
        store.delete_prefix("tmp/")  # DeleteObjects
        assert store.list("tmp/") == []
        store.delete("lease")
        assert store.clean_temp("") == 0

        assert seen.refused == []
        asked = [(m, urllib.parse.parse_qs(urllib.parse.urlsplit(p).query, keep_blank_values=True))
                 for m, p, _ in seen.requests]
        for method, word in (("POST", "uploads"), ("PUT", "partNumber"), ("POST", "delete")):  # all exercised
            assert any(m == method and word in q for m, q in asked), (method, word)
        deletes = [h for m, p, h in seen.requests if m == "POST" and "?delete" in p]
        assert deletes and all("content-md5" in h for h in deletes)


def test_the_checksums_boto3_adds_by_default_are_refused_there_and_can_be_asked_for(
    s3_server, s3_run_uri: str, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the stand-in is as strict as the stores it stands for: with boto3's default the first write is refused
    with pre_checksum_store(s3_server.endpoint) as (url, seen):
        monkeypatch.setenv("BEZOAR_S3_ENDPOINT_URL", url)
        monkeypatch.setenv("BEZOAR_S3_CHECKSUMS", "when_supported")
        store = open_store(s3_run_uri)
        with pytest.raises(BadInput, match=r"InvalidArgument.*Unsupported header 'x-amz-"):
            store.write_bytes("a", b"x")
        assert [code for _, _, code in seen.refused] == ["InvalidArgument"]
    # SeaweedFS itself takes them: a user of a store that does keeps them with BEZOAR_S3_CHECKSUMS
    monkeypatch.setenv("BEZOAR_S3_ENDPOINT_URL", s3_server.endpoint)
    store = open_store(s3_run_uri)
    store.write_bytes("a", b"x")
    assert store.read_bytes("a") == b"x"


def test_which_checksums_the_settings_ask_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "absent"))  # no profile of whoever runs the tests
    aws = {"AWS_REGION": "r"}
    assert S3Settings.from_env(aws).checksums is None  # AWS itself: botocore's default (when_supported)
    custom = {**aws, "BEZOAR_S3_ENDPOINT_URL": "http://minio:9000"}
    assert S3Settings.from_env(custom).checksums == "when_required"
    assert S3Settings.from_env({**aws, "AWS_ENDPOINT_URL_S3": "http://minio:9000"}).checksums == "when_required"
    # botocore's own variables are left to botocore; ours wins over them
    assert S3Settings.from_env({**custom, "AWS_REQUEST_CHECKSUM_CALCULATION": "when_supported"}).checksums is None
    assert S3Settings.from_env({**custom, "BEZOAR_S3_CHECKSUMS": "When_Supported"}).checksums == "when_supported"
    assert S3Settings.from_env({**aws, "BEZOAR_S3_CHECKSUMS": "when_required"}).checksums == "when_required"
    with pytest.raises(BadInput, match=r"BEZOAR_S3_CHECKSUMS='sometimes': expected when_supported"):
        S3Settings.from_env({**custom, "BEZOAR_S3_CHECKSUMS": "sometimes"})


def test_a_profile_that_sets_the_checksums_is_left_to_botocore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config"
    config.write_text("[default]\nrequest_checksum_calculation = when_supported\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    assert S3Settings.from_env({"AWS_REGION": "r", "BEZOAR_S3_ENDPOINT_URL": "http://minio:9000"}).checksums is None
