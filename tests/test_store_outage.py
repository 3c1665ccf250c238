"""A store that stops answering (issue 11, finding 6).

With the S3 server frozen (SIGSTOP) a stage was still blocked after 420 s while the teacher kept
answering, and 376 of 680 answers were lost and asked again. Here the real SeaweedFS server is
frozen in the middle of generate-orca: the stage must fail retryable within the bound its settings
give, keep every answer it received in the local spool, and the rerun (store back) must ask the
teacher for none of them again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from bezoar_jobs.manifest import read_manifest
from bezoar_jobs.s3store import S3Settings
from bezoar_jobs.store import open_store
from tests.llm_server import LLMTestServer
from tests.scripted import scripted_answer, scripted_recipe

FAST_FAIL = {"BEZOAR_S3_CONNECT_TIMEOUT": "1", "BEZOAR_S3_READ_TIMEOUT": "2", "BEZOAR_S3_MAX_ATTEMPTS": "2"}


def test_a_frozen_store_fails_the_stage_fast_and_loses_no_answer(tmp_path, s3_server, s3_run_uri):
    env = {**os.environ, **FAST_FAIL, "SCRIPTED_JUDGE_KEY": "test-key", "BEZOAR_SPOOL_DIR": str(tmp_path / "spool")}
    bound = S3Settings.from_env(env).worst_case_s  # one operation against a store that stopped answering
    with LLMTestServer(script=scripted_answer, api_key="test-key", latency=0.8) as srv:
        recipe = scripted_recipe(tmp_path, srv.url, **{"generation.flush_every": 1, "teacher.max_concurrency": 2})
        cmd = [sys.executable, "-m", "bezoar_jobs.cli", "stage", "generate-orca", "--recipe", str(recipe),
               "--run", s3_run_uri]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 60
        while time.time() < deadline and sum(c.status == 200 for c in srv.calls) < 4:
            time.sleep(0.05)
        os.kill(s3_server.process.pid, signal.SIGSTOP)
        frozen = time.time()
        try:
            _, err = proc.communicate(timeout=120)
            took = time.time() - frozen
        finally:
            os.kill(s3_server.process.pid, signal.SIGCONT)
        assert proc.returncode == 3, err[-3000:]
        # the stage gave up within a few bounded operations (a write, the lease's release), not minutes
        assert took < 4 * bound + 10, (took, bound)
        assert "the run store did not take" in err and "kept in" in err
        answered = {c.prompt for c in srv.calls if c.status == 200}
        assert len(answered) >= 4  # (and fewer than 24 when the drain stopped the pool in time)
        spooled = list((tmp_path / "spool").rglob("part-*.jsonl"))
        assert spooled, "the answers received after the store froze are in the local spool"

        srv.reset()
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
        asked_again = {c.prompt for c in srv.calls}
        assert not asked_again & answered, "an answer received before the outage was asked for again"
        assert len(asked_again) == 24 - len(answered)
    assert "uploaded" in res.stderr and "while the store was unavailable" in res.stderr
    assert not list((tmp_path / "spool").rglob("part-*.jsonl"))  # uploaded, then removed
    m = read_manifest(open_store(s3_run_uri), "generate-orca")
    assert m["counts"]["rows"] == 24
