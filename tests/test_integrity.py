"""Damaged inputs are never consumed, and a damaged run has a way out (issue 11, findings 3 and 8).

Finding 3: `bezoar verify` detected an edited committed file, but the next stage read it (exit 0)
and `bezoar run` then skipped both as unchanged. Finding 8: a truncated _MANIFEST.json blocked
status, verify (it stopped instead of reporting and going on), the next stage, the rerun and
--force, and no command repaired it; orphan .tmp-_MANIFEST.json* files survived a kill in the commit
window.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bezoar_jobs.manifest import read_manifest
from bezoar_jobs.store import open_store
from tests.llm_server import LLMTestServer
from tests.scripted import scripted_answer, scripted_recipe

ORCA = ("--only", "generate-orca", "filter-orca")


def bezoar(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SCRIPTED_JUDGE_KEY": "test-key"}
    return subprocess.run([sys.executable, "-m", "bezoar_jobs.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def errors(res: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in res.stderr.splitlines() if " ERROR " in ln]


@pytest.fixture
def server():
    with LLMTestServer(script=scripted_answer, api_key="test-key") as srv:
        yield srv


def test_an_edited_input_is_refused_at_read_and_rerun_by_bezoar_run(tmp_path, server):
    recipe, run = scripted_recipe(tmp_path, server.url), tmp_path / "run"
    assert bezoar("run", "--recipe", str(recipe), "--run", str(run), "--only", "generate-orca").returncode == 0
    data = run / "generate-orca" / "data" / "train.jsonl"
    rows = data.read_text().splitlines()
    edited = json.loads(rows[0])
    edited["explained_targets"] = edited["explained_targets"].upper()  # same size, other bytes
    data.write_text("\n".join([json.dumps(edited, ensure_ascii=False), *rows[1:]]) + "\n")

    res = bezoar("stage", "filter-orca", "--recipe", str(recipe), "--run", str(run))
    assert res.returncode == 2, res.stderr[-2000:]
    err = errors(res)
    assert len(err) == 1 and "generate-orca/data/train.jsonl" in err[0] and "differs from its manifest" in err[0]
    assert "Traceback" not in res.stderr
    assert read_manifest(open_store(run), "filter-orca") is None

    plan = json.loads(bezoar("plan", "--recipe", str(recipe), "--run", str(run), "--json", *ORCA).stdout)
    assert plan[0]["action"] == "run" and "committed files differ from its manifest" in plan[0]["why"]
    asked = len(server.calls)
    res = bezoar("run", "--recipe", str(recipe), "--run", str(run), *ORCA)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "generate-orca: skipped" not in res.stderr and "[generate-orca] starting" in res.stderr
    # regenerated from its saved records: the teacher is not asked again, only the judge
    assert [c for c in server.calls[asked:] if "Reply with JSON only" not in c.prompt] == []
    assert data.read_text().splitlines() == rows
    assert bezoar("verify", "--run", str(run)).returncode == 0


def test_an_edited_input_on_s3_is_caught_by_its_etag(tmp_path, server, s3_env, s3_run_uri, s3_client):
    recipe = scripted_recipe(tmp_path, server.url)
    assert bezoar("run", "--recipe", str(recipe), "--run", s3_run_uri, "--only", "generate-orca").returncode == 0
    store = open_store(s3_run_uri)
    key = f"{s3_run_uri.split('/', 3)[3]}/generate-orca/data/train.jsonl"
    bucket = s3_run_uri.split("/")[2]
    body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3_client.put_object(Bucket=bucket, Key=key, Body=body.replace(b"a", b"e", 1))  # same size
    plan = json.loads(bezoar("plan", "--recipe", str(recipe), "--run", s3_run_uri, "--json").stdout)
    row = next(r for r in plan if r["stage"] == "generate-orca")
    assert row["action"] == "run" and "differ from its manifest" in row["why"]
    res = bezoar("stage", "filter-orca", "--recipe", str(recipe), "--run", s3_run_uri)
    assert res.returncode == 2 and "generate-orca/data/train.jsonl" in errors(res)[0]
    assert read_manifest(store, "filter-orca") is None


def test_a_truncated_manifest_has_a_way_out(tmp_path, server):
    recipe, run = scripted_recipe(tmp_path, server.url), tmp_path / "run"
    assert bezoar("run", "--recipe", str(recipe), "--run", str(run), *ORCA).returncode == 0
    man = run / "generate-orca" / "_MANIFEST.json"
    man.write_text(man.read_text()[:100])  # truncated

    st = bezoar("status", "--run", str(run))
    assert st.returncode == 0 and "generate-orca    damaged" in st.stdout
    assert "filter-orca      committed" in st.stdout
    v = bezoar("verify", "--run", str(run))
    assert v.returncode == 1
    assert "FAIL" in v.stdout and "generate-orca/_MANIFEST.json: the manifest is damaged" in v.stdout
    assert "ok   filter-orca" in v.stdout  # it reported and went on
    nxt = bezoar("stage", "filter-orca", "--recipe", str(recipe), "--run", str(run), "--force")
    assert nxt.returncode == 2 and len(errors(nxt)) == 1
    assert "generate-orca/_MANIFEST.json: the manifest is damaged" in errors(nxt)[0]
    assert "bezoar repair" in errors(nxt)[0]

    rep = bezoar("repair", "--run", str(run))
    assert rep.returncode == 0, rep.stderr
    assert "moved generate-orca aside" in rep.stdout
    aside = list((run / "_damaged" / "generate-orca").iterdir())
    assert len(aside) == 1 and (aside[0] / "_MANIFEST.json").is_file() and (aside[0] / "PROBLEMS.txt").is_file()
    assert (aside[0] / "data" / "train.jsonl").is_file()
    assert (run / "generate-orca" / "_work").is_dir()  # the paid-for records stay
    asked = len(server.calls)
    res = bezoar("run", "--recipe", str(recipe), "--run", str(run), *ORCA)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [c for c in server.calls[asked:] if "Reply with JSON only" not in c.prompt] == []
    assert bezoar("verify", "--run", str(run)).returncode == 0


def test_a_damaged_manifest_reruns_with_stage_and_force(tmp_path, server):
    recipe, run = scripted_recipe(tmp_path, server.url), tmp_path / "run"
    assert bezoar("stage", "generate-orca", "--recipe", str(recipe), "--run", str(run)).returncode == 0
    man = run / "generate-orca" / "_MANIFEST.json"
    man.write_text("{")
    res = bezoar("stage", "generate-orca", "--recipe", str(recipe), "--run", str(run))
    assert res.returncode == 0, res.stderr[-2000:]  # damaged = not committed: it reruns
    assert read_manifest(open_store(run), "generate-orca") is not None
    man.write_text("[]")
    res = bezoar("stage", "generate-orca", "--recipe", str(recipe), "--run", str(run), "--force")
    assert res.returncode == 0, res.stderr[-2000:]
    assert read_manifest(open_store(run), "generate-orca") is not None
    st = bezoar("status", "--run", str(run))
    assert "generate-orca    committed" in st.stdout


def test_half_written_files_are_cleaned_at_the_next_start(tmp_path, server):
    recipe, run = scripted_recipe(tmp_path, server.url), tmp_path / "run"
    stage_dir = run / "generate-orca"
    stage_dir.mkdir(parents=True)
    # what a kill in the commit window leaves (LocalStore writes a temporary name, then renames)
    (stage_dir / ".tmp-_MANIFEST.jsonab12cd").write_text('{"stage": "generate-or')
    (stage_dir / "data").mkdir()
    (stage_dir / "data" / ".tmp-train.jsonl").write_text("half")
    res = bezoar("stage", "generate-orca", "--recipe", str(recipe), "--run", str(run))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "removed 2 temporary object(s)" in res.stderr
    assert not list(stage_dir.rglob(".tmp-*"))
    # and `bezoar repair` cleans those of a stage nobody runs
    (stage_dir / ".tmp-_MANIFEST.jsonzz").write_text("{")
    rep = bezoar("repair", "--run", str(run))
    assert rep.returncode == 0 and "removed 1 temporary object(s)" in rep.stdout
    assert not list(stage_dir.rglob(".tmp-*"))


