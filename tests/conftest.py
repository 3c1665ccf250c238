"""Shared fixtures. Keep this file to fixtures only; helpers live in their own modules.

S3 (a real SeaweedFS server, see seaweed.py):

- ``s3_server`` (session): the running server: ``.endpoint``, ``.access_key``, ``.secret_key``,
  ``.region``, ``.env()``. Started once per session, stopped (SIGTERM) at the end. Fails, never
  skips, when the ``weed`` binary is missing.
- ``s3_client`` (session): a raw boto3 client with the server's keys, to set up or inspect objects
  behind the back of the code under test.
- ``s3_env`` (function): puts the server's endpoint and keys into ``os.environ`` (through
  monkeypatch, undone after the test) and removes every other AWS_* / BEZOAR_S3_* setting, so the
  code under test AND any subprocess it starts (``subprocess.run(...)`` without ``env=``, or with
  ``env={**os.environ, ...}``) talk to this server. Returns the variables it set.
- ``s3_run_uri`` (function, implies ``s3_env``): a fresh, empty bucket per test; returns
  ``s3://<bucket>/runs/<test-name>``.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

try:  # tests/ is not a package today; keep working if it becomes one
    from tests import seaweed
except ImportError:
    import seaweed  # type: ignore[no-redef]

_bucket_numbers = itertools.count()

# Settings from the caller's shell that would point boto3 somewhere else or change its identity.
_AWS_VARS_TO_CLEAR = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_ENDPOINT_URL",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[seaweed.SeaweedServer]:
    workdir = tmp_path_factory.mktemp("seaweedfs")
    try:
        server = seaweed.start(workdir)
    except (seaweed.WeedNotFound, RuntimeError) as e:
        failure = str(e)
    else:
        failure = ""
    if failure:  # outside the except block: the report shows the message, not a chained traceback
        pytest.fail(failure, pytrace=False)
    try:
        yield server
    finally:
        seaweed.stop(server)
        shutil.rmtree(server.data_dir, ignore_errors=True)  # keep weed.log for a post-mortem


@pytest.fixture(scope="session")
def s3_client(s3_server: seaweed.SeaweedServer) -> Any:
    return s3_server.client()


@pytest.fixture
def s3_env(s3_server: seaweed.SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for var in list(os.environ):
        if var in _AWS_VARS_TO_CLEAR or var.startswith("BEZOAR_S3_"):
            monkeypatch.delenv(var)
    env = s3_server.env()
    # no ~/.aws files of whoever runs the tests: point both at a path that does not exist
    absent = str(s3_server.data_dir.parent / "no-such-aws-file")
    env["AWS_CONFIG_FILE"] = absent
    env["AWS_SHARED_CREDENTIALS_FILE"] = absent
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    return env


@pytest.fixture
def s3_run_uri(
    s3_server: seaweed.SeaweedServer, s3_client: Any, s3_env: dict[str, str], request: pytest.FixtureRequest
) -> str:
    bucket = f"bz-{next(_bucket_numbers):04d}-{secrets.token_hex(3)}"
    s3_client.create_bucket(Bucket=bucket)
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:48] or "run"
    return f"s3://{bucket}/runs/{name}"
