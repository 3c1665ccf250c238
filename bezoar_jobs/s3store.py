"""The S3 run store: a run under ``s3://bucket/prefix``, through boto3.

Works with AWS S3 and S3-compatible stores (SeaweedFS, MinIO, Ceph RGW, ...). Settings come from
the environment only, so a stage process and a Kubernetes Job see the same store with the same
variables:

=================================  ==============================================================
``BEZOAR_S3_ENDPOINT_URL``         custom endpoint; wins over ``AWS_ENDPOINT_URL_S3`` and
                                   ``AWS_ENDPOINT_URL`` (which boto3 reads by itself)
``AWS_REGION``                     region (then ``AWS_DEFAULT_REGION``, the profile, ``us-east-1``)
``BEZOAR_S3_ADDRESSING_STYLE``     ``path``, ``virtual`` or ``auto``; default ``path`` when a custom
                                   endpoint is set (most S3-compatible stores need it), else ``auto``
``BEZOAR_S3_MAX_ATTEMPTS``         attempts per request in botocore's ``standard`` retry mode
                                   (then ``AWS_MAX_ATTEMPTS``, default 3)
``BEZOAR_S3_CONNECT_TIMEOUT``      seconds to open a connection (default 5)
``BEZOAR_S3_READ_TIMEOUT``         seconds a socket may wait without progress (default 20)
``BEZOAR_S3_CONDITIONAL_WRITES``   ``true`` (default): leases use ``If-None-Match``/``If-Match`` on
                                   PutObject (AWS S3 since 2024, SeaweedFS, recent MinIO and Ceph);
                                   ``false`` for a store without them (then a lease is written and
                                   read back: two writers racing within that window both win)
``BEZOAR_S3_MULTIPART_THRESHOLD``  size from which transfers go multipart (default ``64MiB``)
``BEZOAR_S3_MULTIPART_CHUNKSIZE``  part size of multipart transfers (default ``64MiB``, min ``5MiB``)
``BEZOAR_S3_MAX_CONCURRENCY``      threads per multipart transfer (default 4)
``BEZOAR_S3_CHECKSUMS``            ``when_supported`` or ``when_required``: the CRC checksums boto3 adds
                                   to uploads and asks of downloads since 1.36; default
                                   ``when_required`` with a custom endpoint (many S3-compatible
                                   stores refuse them), botocore's own (``when_supported``) for AWS,
                                   or what ``AWS_REQUEST_CHECKSUM_CALCULATION`` / the profile say
=================================  ==============================================================

Every operation is bounded: a store that stops answering (a frozen server, a dead connection) costs
at most ``max_attempts * (connect_timeout + read_timeout)`` plus botocore's backoff per operation
(about 80 s with the defaults) and then raises :class:`RetryableError`, so a stage fails retryable
instead of hanging (a frozen SeaweedFS, SIGSTOPped, once kept a stage blocked for over 7 minutes).

Credentials come only from boto3's own chain (environment variables, the shared credentials file
named by ``AWS_SHARED_CREDENTIALS_FILE``, a web identity as IRSA mounts it, instance metadata):
never from the recipe, and this module never logs or formats them.

Errors map onto the stage exit codes: a missing object is :class:`NotFoundInStore`; a missing
bucket, refused credentials or an invalid request are :class:`BadInput` (a retry will not help);
connection failures and 5xx answers that outlived botocore's retries are :class:`RetryableError`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import boto3.exceptions
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.awsrequest import AWSRequest
from botocore.config import Config

from .errors import BadInput, RetryableError
from .s3settings import MiB, S3Settings, parse_size
from .store_base import NotFoundInStore, ObjectInfo, Store

__all__ = ["MiB", "S3Settings", "S3Store", "parse_size"]

# after an operation found the store unreachable, further operations fail at once for this long
UNREACHABLE_PAUSE_S = 60.0

# Said in every credentials error so an operator knows where to look, without naming any value.
CREDENTIAL_SOURCES = (
    "credentials are read only by boto3's chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
    "(+AWS_SESSION_TOKEN), the shared credentials file AWS_SHARED_CREDENTIALS_FILE (profile AWS_PROFILE), "
    "a web identity (IRSA: AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE), or instance metadata; "
    "never from the recipe"
)

_DENIED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
    "AccountProblem",
    "InvalidSecurity",
    "403",
    "Forbidden",
}
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_RETRYABLE_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling", "503"}

class S3Store(Store):
    """A run under ``s3://bucket/prefix``. Each object is written whole (S3 PUTs are atomic)."""

    def __init__(self, bucket: str, prefix: str = "", settings: S3Settings | None = None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.settings = settings or S3Settings.from_env()
        s = self.settings
        # A session of our own: boto3's default session is shared module state and not thread-safe.
        self._session = boto3.session.Session()
        config = Config(
            region_name=s.region,
            s3={"addressing_style": s.addressing_style},
            retries={"mode": "standard", "total_max_attempts": s.max_attempts},  # incl. the first
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
            # one connection per transfer thread, plus one for the caller
            max_pool_connections=max(10, s.max_concurrency + 1),
            # None: botocore's own choice (s3settings._checksums)
            request_checksum_calculation=s.checksums,
            response_checksum_validation=s.checksums,
        )
        try:
            self.client = self._session.client("s3", endpoint_url=s.endpoint_url, config=config)
        except ValueError as e:  # botocore refuses a malformed endpoint here
            raise BadInput(
                f"S3 endpoint {s.endpoint_url!r} (BEZOAR_S3_ENDPOINT_URL / AWS_ENDPOINT_URL*): {e}"
            ) from None
        # DeleteObjects requires an integrity header: botocore >= 1.36 sends a CRC32 one where it sent Content-MD5,
        # which stores from before that change refuse (MissingContentMD5: older MinIO, Ceph). Content-MD5 too, as
        # botocore did before; AWS takes both.
        self.client.meta.events.register("before-sign.s3.DeleteObjects", _add_content_md5)
        self.transfer = TransferConfig(
            multipart_threshold=s.multipart_threshold,
            multipart_chunksize=s.multipart_chunksize,
            max_concurrency=s.max_concurrency,
            # s3transfer retries a broken download stream on top of botocore's attempts: bound it too
            num_download_attempts=s.max_attempts,
            # the CRT client (when awscrt is installed) resolves credentials and endpoints its own way
            preferred_transfer_client="classic",
        )
        self._bucket_seen = False  # set once the bucket answered: a later 404 then means "no object"
        self._unreachable: tuple[float, str] | None = None  # (when, why) the store last did not answer

    # ---- keys -----------------------------------------------------------------------------
    def _key(self, rel: str) -> str:
        rel = rel.lstrip("/")
        if not rel:
            raise BadInput(f"{self.uri}: an empty object path")
        # Keys are literal in S3, but servers behind path-style URLs may normalise "..": refuse
        # both so a path can never leave the run's prefix.
        if any(part in (".", "..") for part in rel.split("/")):
            raise BadInput(f"path {rel!r} escapes the run {self.uri} ('.' and '..' are not allowed)")
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _list_prefix(self, prefix: str) -> str:
        prefix = prefix.lstrip("/")
        if any(part in (".", "..") for part in prefix.split("/")[:-1]):
            raise BadInput(f"prefix {prefix!r} escapes the run {self.uri}")
        base = self.prefix + "/" if self.prefix else ""
        return base + prefix

    # ---- error mapping ----------------------------------------------------------------------
    def _endpoint(self) -> str:
        return self.client.meta.endpoint_url

    def _credential_source(self) -> str:
        try:
            creds = self._session.get_credentials()
        except botocore.exceptions.BotoCoreError:
            return "none could be loaded"
        if creds is None:
            return "none found"
        return getattr(creds, "method", None) or "unknown"

    def _bucket_exists(self) -> bool:
        """After a bare 404 (HEAD has no error body): is it the object or the bucket that is missing?"""
        if self._bucket_seen:
            return True
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError as e:
            if _status(e) == 404 or _code(e) in ("NoSuchBucket", "404", "NotFound"):
                return False
            return True  # e.g. 403 without s3:ListBucket: we cannot tell, so report the object
        except botocore.exceptions.BotoCoreError:
            return True  # the server went away between two requests: the object error stands
        self._bucket_seen = True
        return True

    def _translate(self, exc: BaseException, what: str) -> Exception:
        """The exception (of ours) to raise for a boto3/botocore failure while handling ``what``."""
        cause = _client_error_in(exc)
        if cause is not None:
            code, status = _code(cause), _status(cause)
            if code == "NoSuchBucket" or (code in _NOT_FOUND and not self._bucket_exists()):
                return BadInput(
                    f"{what}: bucket {self.bucket!r} does not exist at {self._endpoint()} "
                    "(create it first; buckets are never created implicitly)"
                )
            if code in _NOT_FOUND:
                return NotFoundInStore(f"{what}: no such object in the run")
            if code in _DENIED or status == 403:
                return BadInput(
                    f"{what}: access refused by {self._endpoint()} ({code}); {CREDENTIAL_SOURCES}. "
                    f"The credentials in use came from: {self._credential_source()}. "
                    "(AWS also answers 403 for a missing object when s3:ListBucket is not granted.)"
                )
            if code in _RETRYABLE_CODES or (status is not None and (status >= 500 or status == 429)):
                return RetryableError(
                    f"{what}: {self._endpoint()} answered {status} {code} after "
                    f"{self.settings.max_attempts} attempts; a retry may succeed"
                )
            if code == "InvalidBucketName":
                return BadInput(f"{what}: {self.bucket!r} is not a valid bucket name")
            if status is not None and 400 <= status < 500:
                return BadInput(f"{what}: the request was refused ({status} {code}): {cause}")
            return RetryableError(f"{what}: {cause}")
        if isinstance(exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError):
            return BadInput(f"{what}: no usable S3 credentials ({exc}); {CREDENTIAL_SOURCES}")
        if isinstance(exc, botocore.exceptions.ParamValidationError):
            return BadInput(f"{what}: {exc}")
        if isinstance(exc, botocore.exceptions.ConnectionError | botocore.exceptions.HTTPClientError):
            return RetryableError(
                f"{what}: cannot reach {self._endpoint()} ({type(exc).__name__}) after "
                f"{self.settings.max_attempts} attempts; a retry may succeed"
            )
        # anything else from botocore or s3transfer (retries exhausted, credential refresh, ...)
        return RetryableError(f"{what}: {type(exc).__name__}: {exc}")

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        # a store that just did not answer (every attempt timed out or could not connect) is not asked
        # again for a while: the stage is failing anyway, and each further operation (the last records,
        # the cache, the lease) would wait out its own timeouts before it too gave up
        down = self._unreachable
        if down is not None:
            ago = time.monotonic() - down[0]
            if ago < UNREACHABLE_PAUSE_S:
                raise RetryableError(f"{what}: cannot reach {self._endpoint()} (it did not answer {ago:.0f} s ago: "
                                     f"{down[1]}); a retry may succeed")
            self._unreachable = None
        try:
            yield
        except (
            botocore.exceptions.ClientError,
            botocore.exceptions.BotoCoreError,
            boto3.exceptions.Boto3Error,
        ) as e:
            err = self._translate(e, what)
            cause = _unreachable_in(e)
            if cause is not None:
                self._unreachable = (time.monotonic(), type(cause).__name__)
            raise err from e

    # ---- the primitives ---------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        key = self._key(rel)
        with self._errors(self.url(rel)):
            resp = self.client.get_object(Bucket=self.bucket, Key=key)
            self._bucket_seen = True
            return resp["Body"].read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        key = self._key(rel)
        with self._errors(self.url(rel)):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
            self._bucket_seen = True

    def exists(self, rel: str) -> bool:
        key = self._key(rel)
        try:
            with self._errors(self.url(rel)):
                self.client.head_object(Bucket=self.bucket, Key=key)
                self._bucket_seen = True
                return True
        except NotFoundInStore:
            return False

    def list(self, prefix: str = "") -> list[str]:
        full = self._list_prefix(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = []
        with self._errors(f"s3://{self.bucket}/{full}"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    # folder markers that some tools create are not objects of the run
                    if not key.endswith("/"):
                        out.append(key[strip:])
            self._bucket_seen = True
        return sorted(out)

    def list_info(self, prefix: str = "") -> dict[str, ObjectInfo]:
        full = self._list_prefix(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = {}
        with self._errors(f"s3://{self.bucket}/{full}"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    if not obj["Key"].endswith("/"):
                        out[obj["Key"][strip:]] = ObjectInfo(int(obj.get("Size", 0)), str(obj.get("ETag", "")))
            self._bucket_seen = True
        return dict(sorted(out.items()))

    # ---- conditional writes ------------------------------------------------------------------
    def create_exclusive(self, rel: str, data: bytes) -> str | None:
        key = self._key(rel)
        if not self.settings.conditional_writes:
            # no If-None-Match: look, write, read back (two writers racing inside this window both win)
            if self.exists(rel):
                return None
            self.write_bytes(rel, data)
            body, version = self.read_versioned(rel)
            return version if body == data else None
        try:
            with self._errors(self.url(rel)):
                resp = self.client.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
        except BadInput as e:
            if _precondition_failed(e):
                return None
            raise
        return str(resp.get("ETag", ""))

    def read_versioned(self, rel: str) -> tuple[bytes, str]:
        key = self._key(rel)
        with self._errors(self.url(rel)):
            resp = self.client.get_object(Bucket=self.bucket, Key=key)
            return resp["Body"].read(), str(resp.get("ETag", ""))

    def replace_if(self, rel: str, data: bytes, version: str) -> str | None:
        key = self._key(rel)
        if not self.settings.conditional_writes:
            try:
                _, now = self.read_versioned(rel)
            except NotFoundInStore:
                return None
            if now != version:
                return None
            self.write_bytes(rel, data)
            return self.read_versioned(rel)[1]
        try:
            with self._errors(self.url(rel)):
                resp = self.client.put_object(Bucket=self.bucket, Key=key, Body=data, IfMatch=version)
        except (BadInput, NotFoundInStore) as e:
            if isinstance(e, NotFoundInStore) or _precondition_failed(e):
                return None
            raise
        return str(resp.get("ETag", ""))

    def clean_temp(self, prefix: str) -> int:
        """S3 writes no temporary objects, but an upload killed mid-way leaves an unfinished multipart
        upload (billed storage, invisible in listings): abort those under ``prefix``."""
        full = self._list_prefix(prefix)
        n = 0
        with self._errors(f"s3://{self.bucket}/{full}"):
            for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                                     Prefix=full):
                for up in page.get("Uploads", []) or []:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                    n += 1
        return n

    def move(self, src: str, dst: str) -> None:
        """A server-side copy (multipart for large objects: no download), then the delete."""
        skey, dkey = self._key(src), self._key(dst)
        with self._errors(self.url(src)):
            self.client.copy({"Bucket": self.bucket, "Key": skey}, self.bucket, dkey, Config=self.transfer)
        self.delete(src)

    def delete(self, rel: str) -> None:
        key = self._key(rel)
        with self._errors(self.url(rel)):
            self.client.delete_object(Bucket=self.bucket, Key=key)  # absent keys are fine in S3

    def delete_prefix(self, prefix: str) -> None:
        # One request per 1000 keys instead of one per key.
        rels = self.list(prefix)
        for start in range(0, len(rels), 1000):
            batch = [{"Key": self._key(r)} for r in rels[start : start + 1000]]
            with self._errors(self.url(prefix)):
                resp = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            errors = resp.get("Errors") or []
            if errors:
                first = errors[0]
                fake = botocore.exceptions.ClientError(
                    {"Error": {"Code": first.get("Code", ""), "Message": first.get("Message", "")}}, "DeleteObjects"
                )
                raise self._translate(fake, f"s3://{self.bucket}/{first.get('Key')} ({len(errors)} keys not deleted)")

    def upload_file(self, local: Path, rel: str) -> None:
        key = self._key(rel)
        with self._errors(self.url(rel)):
            self.client.upload_file(str(local), self.bucket, key, Config=self.transfer)
            self._bucket_seen = True

    def download_file(self, rel: str, local: Path) -> None:
        key = self._key(rel)
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        # A temporary name in the same directory, renamed when complete: a reader never mistakes a
        # half-downloaded file for the object.
        tmp = local.with_name(f".tmp-{local.name}.{secrets.token_hex(4)}")
        try:
            with self._errors(self.url(rel)):
                self.client.download_file(self.bucket, key, str(tmp), Config=self.transfer)
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)


def _unreachable_in(exc: BaseException) -> BaseException | None:
    """The connection failure or timeout behind ``exc`` (s3transfer wraps them), if that is what it was."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, botocore.exceptions.ConnectionError | botocore.exceptions.HTTPClientError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__ or getattr(cur, "last_exception", None)
    return None


def _precondition_failed(e: BaseException) -> bool:
    """A conditional write refused: 412 PreconditionFailed, or 409 ConditionalRequestConflict (a
    concurrent conditional write to the same key)."""
    cause = _client_error_in(e)
    return cause is not None and (_status(cause) in (409, 412) or _code(cause) in (
        "PreconditionFailed", "ConditionalRequestConflict"))


def _client_error_in(exc: BaseException) -> botocore.exceptions.ClientError | None:
    """The ClientError behind ``exc``: boto3 wraps upload failures (S3UploadFailedError) and
    s3transfer wraps exhausted retries, keeping the original as the cause or context."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, botocore.exceptions.ClientError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__ or getattr(cur, "last_exception", None)
    return None


def _code(e: botocore.exceptions.ClientError) -> str:
    err: dict[str, Any] = e.response.get("Error", {}) or {}
    return str(err.get("Code", ""))


def _status(e: botocore.exceptions.ClientError) -> int | None:
    status = (e.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode")
    return int(status) if status is not None else None


def _add_content_md5(request: AWSRequest, **_: object) -> None:
    """botocore event hook: a DeleteObjects request's body gets its Content-MD5 (see S3Store.__init__)."""
    if "Content-MD5" in request.headers:
        return
    body = request.body
    if isinstance(body, str):
        body = body.encode("utf-8")
    if isinstance(body, bytes | bytearray):
        digest = hashlib.md5(body, usedforsecurity=False).digest()
        request.headers["Content-MD5"] = base64.b64encode(digest).decode("ascii")
