"""Secrets are never printed (issue 11, finding 5).

A server answering 401 with a body that quoted the Authorization header made us print the key on
stderr (openai-chat and anthropic judges, TGI teacher; `bezoar stage` and `bezoar run`): the
server's message was relayed verbatim. Here a key is planted, servers that echo the request headers
answer every backend, and every output stream and every file the run wrote is searched for it.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from bezoar_jobs import redact
from bezoar_jobs.manifest import read_manifest
from bezoar_jobs.store import open_store
from tests.llm_server import LLMTestServer
from tests.scripted import scripted_answer, scripted_recipe

# shaped like nothing in particular: only the configured-key redaction can know it is a key
KEY = "bz" + secrets.token_hex(24)
RAW = "<|prompt|>{system}{user}<|endoftext|><|answer|>"
BACKENDS = {
    "tgi": lambda url: {"backend": "tgi", "base_url": url, "prompt_format": RAW},
    "openai-completions": lambda url: {"backend": "openai-completions", "base_url": url + "/v1", "prompt_format": RAW},
    "openai-chat": lambda url: {"backend": "openai-chat", "base_url": url + "/v1"},
    "anthropic": lambda url: {"backend": "anthropic", "base_url": url},
}


def bezoar(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PLANTED_KEY": KEY}
    return subprocess.run([sys.executable, "-m", "bezoar_jobs.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def recipe_for(tmp: Path, backend: str, url: str, **more: object) -> Path:
    teacher = {"model": "scripted/teacher", "api_key_env": "PLANTED_KEY", "max_concurrency": 4, "max_retries": 2,
               "backoff_base_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 10, **BACKENDS[backend](url)}
    return scripted_recipe(tmp, url, teacher=teacher, **more)


def assert_nowhere(tmp: Path, *outputs: str) -> None:
    for text in outputs:
        assert KEY not in text
    files = [p for p in tmp.rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert KEY.encode() not in p.read_bytes(), f"the key is in {p}"


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_server_echoing_the_key_on_401_never_gets_it_printed(tmp_path, backend):
    with LLMTestServer(script=scripted_answer, api_key=KEY, plan=["401"] * 100, echo_headers=True) as srv:
        recipe = recipe_for(tmp_path, backend, srv.url)
        run = tmp_path / "run"
        stage = bezoar("stage", "generate-orca", "--recipe", str(recipe), "--run", str(run))
        whole = bezoar("run", "--recipe", str(recipe), "--run", str(run), "--only", "generate-orca",
                       "--allow-unpinned")  # the scripted teacher has no hub revision to pin
        assert srv.calls and all(c.auth == KEY for c in srv.calls)  # the key really was sent (and echoed)
    for res in (stage, whole):
        assert res.returncode == 2, res.stderr[-2000:]
        assert "HTTP 401" in res.stderr and "you sent" in res.stderr  # the server's text is relayed, masked
    assert_nowhere(tmp_path, stage.stdout, stage.stderr, whole.stdout, whole.stderr)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_echoed_keys_stay_out_of_records_manifests_and_logs(tmp_path, backend):
    """5xx answers (retried, logged with -v) and 400 answers (kept in the rejected rows that are
    committed) that quote the headers: the stage commits, and the key is in no stream and no file."""

    def rule(prompt: str) -> str | None:
        return "400" if zlib.crc32(prompt.encode()) % 4 == 0 else None

    with LLMTestServer(script=scripted_answer, api_key=KEY, plan=["500"] * 6, rule=rule, echo_headers=True) as srv:
        recipe = recipe_for(tmp_path, backend, srv.url, **{"generation.max_failed_fraction": 0.6})
        run = tmp_path / "run"
        res = bezoar("-v", "stage", "generate-orca", "--recipe", str(recipe), "--run", str(run))
    assert res.returncode == 0, res.stderr[-3000:]
    m = read_manifest(open_store(run), "generate-orca")
    assert m["requests"]["retries"] >= 1 and m["requests"]["failed_by_cause"].get("HTTP 400 refused", 0) >= 1
    rejected = (run / "generate-orca" / "rejected" / "rejected.jsonl").read_text()
    assert "refused by the server: HTTP 400" in rejected and "you sent" in rejected
    assert_nowhere(tmp_path, res.stdout, res.stderr)


def test_the_redactor():
    redact.register("configured-secret-value-123")
    cases = {
        "HTTP 401: {'authorization': 'Bearer abc.def-ghi_123'}": "abc.def-ghi_123",
        '{"x-api-key": "sk-ant-api03-AAAAAAAAAAAAAAAAAAAAAAAA"}': "sk-ant-api03",
        "Authorization: Basic dXNlcjpwYXNzd29yZA==": "dXNlcjpwYXNzd29yZA",
        "token hf_abcdefghijklmnopqrstuvwxyz01 leaked": "hf_abcdefghijklmnop",
        "key AKIAIOSFODNN7EXAMPLE in a message": "AKIAIOSFODNN7EXAMPLE",
        "https://user:pa55word@proxy.example/v1": "pa55word",
        "url?api_key=s3cr3tvalue&x=1": "s3cr3tvalue",
        '{"password": "hunter22"}': "hunter22",
        "the server said configured-secret-value-123 back": "configured-secret-value-123",
    }
    for text, secret in cases.items():
        out = redact.redact(text)
        assert secret not in out and redact.MASK in out, (text, out)
    # ordinary words survive
    for text in ("max token count exceeded", "basic validation failed", "the tokens: 12", "rating: 7"):
        assert redact.redact(text) == text


def test_log_lines_are_redacted_whatever_their_source(capsys):
    redact.register("another-planted-secret-42")
    handler = logging.StreamHandler(sys.stderr)
    redact.install(handler)
    lg = logging.getLogger("bezoar.test.redact")
    lg.addHandler(handler)
    try:
        lg.error("server said %s", "Authorization: Bearer another-planted-secret-42")
        try:
            raise RuntimeError("boom another-planted-secret-42")
        except RuntimeError:
            lg.exception("failed")
    finally:
        lg.removeHandler(handler)
    err = capsys.readouterr().err
    assert "another-planted-secret-42" not in err and "boom ***" in err and "Traceback" in err
