"""The S3 store's client and transfer settings, read from the environment (the table is in
:mod:`bezoar_jobs.s3store`): endpoint, region, addressing style, attempts, timeouts, multipart sizes,
conditional writes. Apart from the store itself so each module stays small."""

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
