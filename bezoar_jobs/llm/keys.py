"""API keys for remote teachers and judges: from the environment variable named by
``api_key_env`` or the mounted file named by ``api_key_file``; never from the recipe and never
logged. Error messages name the variable or file, never the value.

On Kubernetes the keys are mounted files, not environment variables: ``api_key_env: OPENAI_API_KEY``
then reads ``$BEZOAR_KEYS_DIR/OPENAI_API_KEY`` when the variable itself is not set (the Job builder
mounts each key a stage uses there)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..errors import BadInput
from ..recipe import Endpoint
from ..redact import register

KEYS_DIR_ENV = "BEZOAR_KEYS_DIR"


def resolve_api_key(endpoint: Endpoint, role: str = "endpoint") -> str | None:
    """The key, or None when the endpoint names no key (a local vLLM/TGI server without auth)."""
    if endpoint.api_key_env:
        value = os.environ.get(endpoint.api_key_env, "").strip()
        keys_dir = os.environ.get(KEYS_DIR_ENV, "")
        if not value and keys_dir:
            with contextlib.suppress(OSError):
                value = (Path(keys_dir) / endpoint.api_key_env).read_text(encoding="utf-8").strip()
        if not value:
            raise BadInput(
                f"{role}.api_key_env: environment variable {endpoint.api_key_env} is not set or empty "
                f"(it must hold the API key for {endpoint.backend} model {endpoint.model!r})"
            )
        register(value)  # never printed, whatever a server echoes back
        return value
    if endpoint.api_key_file:
        path = Path(endpoint.api_key_file).expanduser()
        try:
            value = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise BadInput(
                f"{role}.api_key_file: {path} does not exist (mount the secret holding the API key there)"
            ) from None
        except OSError as e:
            raise BadInput(f"{role}.api_key_file: {path} cannot be read: {e.strerror}") from None
        if not value:
            raise BadInput(f"{role}.api_key_file: {path} is empty")
        register(value)
        return value
    return None
