"""The S3 store's client and transfer settings, read from the environment (the table is in
:mod:`bezoar_jobs.s3store`): endpoint, region, addressing style, attempts, timeouts, multipart sizes,
conditional writes, checksums. Apart from the store itself so each module stays small."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import boto3

from .errors import BadInput

MiB = 1 << 20
DEFAULT_PART = 64 * MiB
MIN_PART = 5 * MiB  # S3's smallest allowed part (all but the last)
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 20.0
DEFAULT_REGION = "us-east-1"
CHECKSUM_MODES = ("when_supported", "when_required")
# botocore's own switches for the same (environment, then the profile's keys of the same names in lower case)
BOTOCORE_CHECKSUM_ENV = ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION")

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)


def parse_size(text: str, var: str) -> int:
    """``"64MiB"``, ``"5M"``, ``"5242880"`` -> bytes (binary units: S3 part sizes are MiB)."""
    m = _SIZE.match(text)
    if not m:
        raise BadInput(f"{var}={text!r}: not a size (write bytes, or a number with KiB, MiB or GiB)")
    unit = (m.group(2) or "b").lower()[0]
    return int(m.group(1)) * {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit]


def _int_env(env: Mapping[str, str], var: str, default: int, minimum: int = 1) -> int:
    raw = env.get(var)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadInput(f"{var}={raw!r}: not an integer") from None
    if value < minimum:
        raise BadInput(f"{var}={raw!r}: must be at least {minimum}")
    return value


def _float_env(env: Mapping[str, str], var: str, default: float) -> float:
    raw = env.get(var)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadInput(f"{var}={raw!r}: not a number of seconds") from None
    if not value > 0:
        raise BadInput(f"{var}={raw!r}: must be more than 0 seconds")
    return value


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class S3Settings:
    """Client and transfer settings, read from the environment (see the module docstring)."""

    endpoint_url: str | None
    region: str
    addressing_style: str
    max_attempts: int
    multipart_threshold: int
    multipart_chunksize: int
    max_concurrency: int
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    conditional_writes: bool = True
    # request_checksum_calculation / response_checksum_validation for botocore; None: botocore's own choice
    checksums: str | None = None

    @property
    def worst_case_s(self) -> float:
        """The longest one operation can take against a store that stopped answering (botocore's
        standard mode sleeps at most 2**attempt seconds with jitter between attempts)."""
        backoff = sum(min(2.0**i, 20.0) for i in range(self.max_attempts - 1))
        return self.max_attempts * (self.connect_timeout + self.read_timeout) + backoff

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> S3Settings:
        env = os.environ if env is None else env
        endpoint = (env.get("BEZOAR_S3_ENDPOINT_URL") or "").strip() or None
        if endpoint and not re.match(r"^https?://[^/\s]+", endpoint):
            raise BadInput(f"BEZOAR_S3_ENDPOINT_URL={endpoint!r}: expected http(s)://host[:port]")
        # boto3 itself reads AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL; we only need to know whether one
        # is set, to pick path-style addressing for it.
        custom_endpoint = bool(endpoint) or (
            not _truthy(env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"))
            and bool(env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"))
        )
        style = (env.get("BEZOAR_S3_ADDRESSING_STYLE") or "").strip().lower()
        if style and style not in ("path", "virtual", "auto"):
            raise BadInput(f"BEZOAR_S3_ADDRESSING_STYLE={style!r}: expected path, virtual or auto")
        if not style:
            style = "path" if custom_endpoint else "auto"
        region = (env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "").strip()
        if not region:
            # the profile's region (shared config file), then S3's historical default
            region = boto3.session.Session().region_name or DEFAULT_REGION
        attempts_var = "BEZOAR_S3_MAX_ATTEMPTS" if env.get("BEZOAR_S3_MAX_ATTEMPTS") else "AWS_MAX_ATTEMPTS"
        threshold = parse_size(
            env.get("BEZOAR_S3_MULTIPART_THRESHOLD") or str(DEFAULT_PART), "BEZOAR_S3_MULTIPART_THRESHOLD"
        )
        chunk_raw = env.get("BEZOAR_S3_MULTIPART_CHUNKSIZE") or str(DEFAULT_PART)
        chunk = parse_size(chunk_raw, "BEZOAR_S3_MULTIPART_CHUNKSIZE")
        if chunk < MIN_PART:
            raise BadInput(f"BEZOAR_S3_MULTIPART_CHUNKSIZE={chunk_raw!r}: S3 parts must be at least 5MiB")
        return cls(
            checksums=_checksums(env, custom_endpoint),
            endpoint_url=endpoint,
            region=region,
            addressing_style=style,
            max_attempts=_int_env(env, attempts_var, DEFAULT_MAX_ATTEMPTS),
            multipart_threshold=max(threshold, 1),
            multipart_chunksize=chunk,
            max_concurrency=_int_env(env, "BEZOAR_S3_MAX_CONCURRENCY", 4),
            connect_timeout=_float_env(env, "BEZOAR_S3_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT),
            read_timeout=_float_env(env, "BEZOAR_S3_READ_TIMEOUT", DEFAULT_READ_TIMEOUT),
            conditional_writes=_truthy(env.get("BEZOAR_S3_CONDITIONAL_WRITES") or "true"),
        )


def _checksums(env: Mapping[str, str], custom_endpoint: bool) -> str | None:
    """``BEZOAR_S3_CHECKSUMS``; else botocore's own settings where the user made any (its environment variables
    or the profile's keys); else ``when_required`` for an S3-compatible endpoint, and botocore's default for AWS.

    boto3 1.36 began to add CRC checksums to every upload (``x-amz-sdk-checksum-algorithm`` and
    ``x-amz-checksum-*`` headers, or an ``aws-chunked`` body with a trailer over HTTPS) and to ask for them on
    downloads. Many S3-compatible stores refuse those requests (Backblaze B2, Cloudflare R2, Storj, Swift's s3api,
    Huawei OBS, older MinIO and Ceph: boto/boto3#4392, #4409, s3transfer#327), so a store that worked with
    boto3 1.35 failed every write. ``when_required`` sends a checksum only where the operation requires one; a
    committed file is still checked end to end against the sha256 its manifest records."""
    raw = (env.get("BEZOAR_S3_CHECKSUMS") or "").strip().lower()
    if raw:
        if raw not in CHECKSUM_MODES:
            raise BadInput(f"BEZOAR_S3_CHECKSUMS={raw!r}: expected when_supported (AWS's default) or when_required "
                           "(for a store that refuses the checksum headers)")
        return raw
    if any((env.get(v) or "").strip() for v in BOTOCORE_CHECKSUM_ENV):
        return None  # botocore reads them itself
    if not custom_endpoint:
        return None
    try:
        profile = boto3.session.Session()._session.get_scoped_config()
    except Exception:  # a broken or missing profile: botocore says so when the client is made
        profile = {}
    if any(k.lower().removeprefix("aws_") in profile for k in BOTOCORE_CHECKSUM_ENV):
        return None
    return "when_required"
