"""The six data stages through the real CLI, against the scripted teacher/judge over real HTTP.

The stages run as subprocesses (exactly what a Kubernetes Job runs); the teacher speaks TGI, the
judge the OpenAI chat API; runs live in a local directory or on the SeaweedFS S3 server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bezoar_jobs.manifest import read_manifest
from bezoar_jobs.store import open_store
from tests.llm_server import LLMTestServer
from tests.scripted import scripted_answer, scripted_recipe

DATA = ["generate-lamini", "generate-evol", "generate-orca", "filter-lamini", "filter-evol", "filter-orca"]
UNTIL = ("--until", "filter-orca")  # this file is about the data half


ENV = {**os.environ, "SCRIPTED_JUDGE_KEY": "test-key"}


def bezoar(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    e = {**os.environ, "SCRIPTED_JUDGE_KEY": "test-key", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "bezoar_jobs.cli", *args], capture_output=True, text=True, env=e, timeout=timeout
    )


@pytest.fixture
def server():
    with LLMTestServer(script=scripted_answer, api_key="test-key") as srv:
        yield srv


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_data_stages_end_to_end_local(tmp_path, server):
    recipe = scripted_recipe(tmp_path, server.url)
    run = tmp_path / "run"
    res = bezoar("run", "--recipe", str(recipe), "--run", str(run), *UNTIL)
    assert res.returncode == 0, res.stderr[-3000:]
    store = open_store(run)
    for stage in DATA:
        m = read_manifest(store, stage)
        assert m is not None, stage
        assert "data/train.jsonl" in m["files"] and "data/README.md" in m["files"]
    # every output has the authors' columns and loads with datasets.load_dataset
    from datasets import load_dataset

    lam = load_dataset(str(run / "filter-lamini" / "data"), split="train")
    assert {"instruction", "source", "response", "gpt4_status", "gpt4_rating", "gpt4_reason"} <= set(lam.column_names)
    evol = _rows(run / "filter-evol" / "data" / "train.jsonl")
    assert {"instruction", "response", "category", "evolution_strategy", "in-depth-evolving_operation", "epoch"} <= set(
        evol[0]
    )
    orca = _rows(run / "filter-orca" / "data" / "train.jsonl")
    assert {"original_index", "inputs", "targets", "task_source", "task_name", "template_type", "system_message",
            "explained_targets", "dataset_source"} <= set(orca[0])
    # the judge kept exactly the rows rated >= threshold with status pass; the others are in rejected/
    for scheme in ("lamini", "evol", "orca"):
        kept = _rows(run / f"filter-{scheme}" / "data" / "train.jsonl")
        dropped = _rows(run / f"filter-{scheme}" / "rejected" / "rejected.jsonl")
        gen = _rows(run / f"generate-{scheme}" / "data" / "train.jsonl")
        assert len(kept) + len(dropped) == len(gen) and kept and dropped
        assert all(r["gpt4_rating"] >= 5 and r["gpt4_status"] == "pass" for r in kept)
        assert all(r["gpt4_rating"] < 5 or r["gpt4_status"] != "pass" for r in dropped)
        m = read_manifest(store, f"filter-{scheme}")
        assert m["counts"]["retention"] == round(len(kept) / len(gen), 4)
        assert m["judge"]["model_id"] == "scripted/judge"
    # LaMini: answers given as a numbered list were parsed too, and nothing is duplicated
    lam_gen = _rows(run / "generate-lamini" / "data" / "train.jsonl")
    assert len({r["instruction"] for r in lam_gen}) == len(lam_gen)
    # status shows them committed; verify re-hashes them
    st = json.loads(bezoar("status", "--run", str(run), "--json").stdout)
    assert [s["state"] for s in st["stages"] if s["stage"] in DATA] == ["committed"] * 6
    assert bezoar("verify", "--run", str(run)).returncode == 0
    # a second run skips every stage and asks the servers nothing
    before = len(server.calls)
    res2 = bezoar("run", "--recipe", str(recipe), "--run", str(run), *UNTIL)
    assert res2.returncode == 0
    assert res2.stderr.count("skipped (committed") == 6
    assert len(server.calls) == before
    # tampering is caught
    (run / "filter-orca" / "data" / "train.jsonl").write_text("{}\n")
    bad = bezoar("verify", "--run", str(run))
    assert bad.returncode == 1 and "filter-orca/data/train.jsonl" in bad.stdout


def test_data_stages_on_s3(tmp_path, server, s3_env, s3_run_uri):
    recipe = scripted_recipe(tmp_path, server.url)
    res = bezoar("run", "--recipe", str(recipe), "--run", s3_run_uri, *UNTIL)
    assert res.returncode == 0, res.stderr[-3000:]
    st = json.loads(bezoar("status", "--run", s3_run_uri, "--json").stdout)
    assert [s["state"] for s in st["stages"] if s["stage"] in DATA] == ["committed"] * 6
    store = open_store(s3_run_uri)
    assert store.exists("recipe.yaml")
    assert bezoar("verify", "--run", s3_run_uri).returncode == 0
    rows = store.read_text("filter-orca/data/train.jsonl").splitlines()
    assert len(rows) == read_manifest(store, "filter-orca")["counts"]["kept"]


def test_changed_parameters_rerun_only_affected_stages(tmp_path, server):
    run = tmp_path / "run"
    recipe = scripted_recipe(tmp_path, server.url)
    assert bezoar("run", "--recipe", str(recipe), "--run", str(run), *UNTIL).returncode == 0
    recipe2 = scripted_recipe(tmp_path, server.url, **{"filter.threshold": 8})
    res = bezoar("run", "--recipe", str(recipe2), "--run", str(run), *UNTIL)
    assert res.returncode == 0
    assert res.stderr.count("skipped (committed") == 3  # the generate stages
    for s in ("filter-lamini", "filter-evol", "filter-orca"):
        assert f"[{s}] starting" in res.stderr
    # the judge cache: the same prompts were not paid for twice
    judge_calls = [
        c for c in server.calls if c.route.endswith("chat/completions") and "Reply with JSON only" in c.prompt
    ]
    prompts = [c.prompt for c in judge_calls]
    assert len(prompts) == len(set(prompts))


def test_plan_counts_and_cost(tmp_path, server):
    recipe = scripted_recipe(tmp_path, server.url)
    run = tmp_path / "run"
    res = bezoar("plan", "--recipe", str(recipe), "--run", str(run), "--json")
    assert res.returncode == 0
    rows = {r["stage"]: r for r in json.loads(res.stdout)}
    assert rows["generate-orca"]["requests"] == 24 and rows["generate-orca"]["action"] == "run"
    assert rows["generate-orca"]["cost_usd"] is None  # the teacher has no price
    assert rows["filter-orca"]["cost_usd"] > 0
    assert bezoar("run", "--recipe", str(recipe), "--run", str(run), "--until", "generate-orca").returncode == 0
    rows = {
        r["stage"]: r for r in json.loads(bezoar("plan", "--recipe", str(recipe), "--run", str(run), "--json").stdout)
    }
    assert rows["generate-orca"]["action"] == "skip" and rows["generate-orca"]["requests"] == 0
    n = read_manifest(open_store(run), "generate-orca")["counts"]["rows"]
    assert rows["filter-orca"]["requests"] == n  # sized from the committed input


def test_only_refuses_without_committed_inputs(tmp_path, server):
    recipe = scripted_recipe(tmp_path, server.url)
    res = bezoar("run", "--recipe", str(recipe), "--run", str(tmp_path / "run"), "--only", "filter-evol")
    assert res.returncode == 2
    assert "generate-evol" in res.stderr and "not committed" in res.stderr


def test_bad_seed_file_names_file_and_line(tmp_path, server):
    seeds = tmp_path / "dolly.jsonl"
    good = json.dumps({"instruction": "Name a colour.", "context": "", "response": "Red.", "category": "open_qa"})
    seeds.write_text(good + "\n" + good + "\n{broken json\n")
    recipe = scripted_recipe(tmp_path, server.url, **{"seeds.dolly": {"path": str(seeds)}})
    run = tmp_path / "run"
    res = bezoar("stage", "generate-lamini", "--recipe", str(recipe), "--run", str(run))
    assert res.returncode == 2
    assert f"{seeds}:3: not valid JSON" in res.stderr
    assert read_manifest(open_store(run), "generate-lamini") is None
    seeds.write_text(good + "\n" + json.dumps({"instruction": "x"}) + "\n")
    res = bezoar("stage", "generate-evol", "--recipe", str(recipe), "--run", str(run))
    assert res.returncode == 2 and f"{seeds}:2: missing field(s) 'context', 'response', 'category'" in res.stderr


def test_missing_s3_seed_object(tmp_path, server, s3_env, s3_run_uri):
    bucket = s3_run_uri.split("/")[2]
    recipe = scripted_recipe(tmp_path, server.url, **{"seeds.flan": {"path": f"s3://{bucket}/seeds/flan.jsonl"}})
    res = bezoar("stage", "generate-orca", "--recipe", str(recipe), "--run", s3_run_uri)
    assert res.returncode == 2
    assert f"s3://{bucket}/seeds/flan.jsonl" in res.stderr
    assert read_manifest(open_store(s3_run_uri), "generate-orca") is None


def test_unauthorised_teacher_is_bad_input(tmp_path):
    with LLMTestServer(script=scripted_answer, api_key="test-key", plan=["401"] * 50) as srv:
        recipe = scripted_recipe(tmp_path, srv.url)
        res = bezoar("run", "--recipe", str(recipe), "--run", str(tmp_path / "run"), *UNTIL)
        assert res.returncode == 2
        # the pipeline stopped at the first failure: the teacher's stages start together (they share it), and
        # nothing starts after them
        assert "[filter-lamini] starting" not in res.stderr and "[filter-evol] starting" not in res.stderr


def test_sharded_generation_then_commit(tmp_path, server):
    recipe = scripted_recipe(tmp_path, server.url)
    run = tmp_path / "run"
    for i in range(3):
        res = bezoar("stage", "generate-orca", "--recipe", str(recipe), "--run", str(run), "--shard", f"{i}/3")
        assert res.returncode == 0, res.stderr[-2000:]
        assert read_manifest(open_store(run), "generate-orca") is None  # shards never commit
    asked = len(server.calls)
    assert asked == 24
    res = bezoar("stage", "generate-orca", "--recipe", str(recipe), "--run", str(run))
    assert res.returncode == 0
    assert len(server.calls) == asked  # every record was there: nothing asked again
    rows = _rows(run / "generate-orca" / "data" / "train.jsonl")
    assert len(rows) == 24 and len({r["id"] for r in rows}) == 24


def test_resume_after_sigkill(tmp_path):
    with LLMTestServer(script=scripted_answer, api_key="test-key", latency=0.15) as srv:
        recipe = scripted_recipe(tmp_path, srv.url, **{"generation.flush_every": 1, "teacher.max_concurrency": 2})
        run = tmp_path / "run"
        cmd = [
            sys.executable,
            "-m",
            "bezoar_jobs.cli",
            "stage",
            "generate-orca",
            "--recipe",
            str(recipe),
            "--run",
            str(run),
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        work = run / "generate-orca" / "_work"
        deadline = time.time() + 60
        while time.time() < deadline and len(list(work.rglob("part-*.jsonl"))) < 6:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        parts = list(work.rglob("part-*.jsonl"))
        done = {json.loads(line)["id"] for p in parts for line in p.read_text().splitlines()}
        assert 6 <= len(done) < 24, "the kill should land part-way"
        assert read_manifest(open_store(run), "generate-orca") is None
        asked_before = [c.prompt for c in srv.calls]
        srv.reset()
        res = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
        assert res.returncode == 0, res.stderr[-2000:]
        rows = _rows(run / "generate-orca" / "data" / "train.jsonl")
        ids = [r["id"] for r in rows]
        assert len(ids) == 24 and len(set(ids)) == 24  # nothing lost, nothing duplicated
        # finished requests were not asked again; only the rest (plus any in flight at the kill)
        asked_after = [c.prompt for c in srv.calls]
        assert len(asked_after) <= 24 - len(done)
        in_flight_at_kill = len(asked_before) - len(done)
        assert len(asked_after) >= 24 - len(done) - in_flight_at_kill
        done_prompts = {p for p in asked_before} - set(asked_after)
        assert len(done_prompts) >= len(done)


def test_sigterm_saves_records_and_exits_nonzero(tmp_path):
    with LLMTestServer(script=scripted_answer, api_key="test-key", latency=0.2) as srv:
        recipe = scripted_recipe(tmp_path, srv.url, **{"generation.flush_every": 50, "teacher.max_concurrency": 2})
        run = tmp_path / "run"
        cmd = [sys.executable, "-m", "bezoar_jobs.cli", "stage", "generate-orca", "--recipe", str(recipe),
               "--run", str(run)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        deadline = time.time() + 60
        while time.time() < deadline and len(srv.calls) < 6:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode not in (0, 2), err[-2000:]
        assert "SIGTERM" in err
        parts = list((run / "generate-orca" / "_work").rglob("part-*.jsonl"))
        assert parts, "records answered before SIGTERM are flushed although flush_every was not reached"
        assert read_manifest(open_store(run), "generate-orca") is None
        assert yaml is not None
