"""Bad run-store state and bad arguments of the commands that read a run: a clear message naming the
file and the field, never a traceback (audit of bad input, findings 1, 2 and 4).

Finding 1: `bezoar status` crashed (exit 1, a traceback) on a stage manifest whose fields had the wrong
type (`"timings": null`, `"utilization": ["a"]` ...) while `bezoar verify` passed it, and on a
controller status file of the wrong shape. Finding 2: `status` / `verify` of a run path that is a
regular file said "no committed stage" (exit 0). Finding 4: `bezoar run --parallel 0` (or -2) was
silently taken as 1.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from bezoar_jobs.cli import main
from bezoar_jobs.errors import EXIT_BAD_INPUT, BadInput
from bezoar_jobs.manifest import CommitInfo, commit, read_manifest
from bezoar_jobs.report.collect import collect
from bezoar_jobs.store import open_store

STAGE = "generate-orca"


def committed_run(tmp_path: Path) -> Path:
    """A run with one stage committed as `commit` writes it (a data file, counts, timings)."""
    run, out = tmp_path / "run", tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "train.jsonl").write_text('{"instruction": "a", "response": "b"}\n')
    commit(open_store(run), out, CommitInfo(STAGE, "p" * 64, {}, {"rows": 1, "rejected": 0}, {"seconds": 1.5},
                                            {"utilization": {"teacher": {"utilization": 0.5, "retries": 1}}}))
    return run


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    rc = main(list(args))
    return rc, capsys.readouterr().out


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("counts", "x", "field 'counts': expected a table"),
        ("timings", None, "field 'timings': expected a table (JSON object), got null"),
        ("timings", {"seconds": "abc"}, "field 'timings.seconds': expected a number or null, got a string"),
        ("utilization", ["a"], "field 'utilization': expected a table (JSON object), got a list"),
        ("utilization", {"teacher": {"utilization": "high"}}, "field 'utilization.teacher.utilization'"),
        ("usage", {"teacher": {"completion_tokens": "many"}}, "field 'usage.teacher.completion_tokens'"),
        ("teacher_gpu", {"start": "noon"}, "field 'teacher_gpu.start'"),
        ("inputs", ["lamini"], "field 'inputs'"),
    ],
)
def test_a_manifest_field_of_the_wrong_type_is_a_damaged_manifest(tmp_path, capsys, field, value, named):
    run = committed_run(tmp_path)
    man = run / STAGE / "_MANIFEST.json"
    m = json.loads(man.read_text())
    m[field] = value
    man.write_text(json.dumps(m))
    where = f"{man.as_uri()}: the manifest is damaged ({named}"

    rc, out = cli(capsys, "status", "--run", str(run))
    assert rc == 0 and f"{STAGE}    damaged" in out and f"damaged: {where}" in out
    rc, out = cli(capsys, "status", "--run", str(run), "--json")
    row = next(r for r in json.loads(out)["stages"] if r["stage"] == STAGE)
    assert rc == 0 and row["state"] == "damaged" and where in row["problem"]
    assert collect(open_store(run)).states[STAGE] == "damaged"  # the report's view: no crash either

    rc, out = cli(capsys, "verify", "--run", str(run))
    assert rc == 1 and f"FAIL {where}" in out

    rc, out = cli(capsys, "repair", "--run", str(run))
    assert rc == 0 and f"moved {STAGE} aside" in out
    aside = list((run / "_damaged" / STAGE).iterdir())
    assert len(aside) == 1  # nothing committed is lost: manifest, files and why, moved aside together
    assert json.loads((aside[0] / "_MANIFEST.json").read_text())[field] == value
    assert (aside[0] / "data" / "train.jsonl").is_file() and named in (aside[0] / "PROBLEMS.txt").read_text()
    assert read_manifest(open_store(run), STAGE) is None  # not committed: the next run reruns it


def test_a_manifest_as_commit_writes_it_is_not_damaged(tmp_path, capsys):
    run = committed_run(tmp_path)
    rc, out = cli(capsys, "status", "--run", str(run))
    assert rc == 0 and f"{STAGE}    committed       1.5  rejected=0, rows=1; teacher busy 0.50 (1 retries)" in out
    assert cli(capsys, "verify", "--run", str(run)) == (0, f"ok   {STAGE}\n")


def test_commit_refuses_a_manifest_its_readers_would_take_as_damaged(tmp_path):
    """The readers' type checks and commit() must agree: commit wrote whatever the stage gave it, so a stage
    passing a field of the wrong type (a test did: ``"teacher": "m"``) committed a manifest that read back as
    damaged. Now commit refuses it before anything is touched: the stage's earlier commit stays as it was."""
    run = committed_run(tmp_path)
    before = (run / STAGE / "_MANIFEST.json").read_text()
    out = tmp_path / "out2"
    (out / "data").mkdir(parents=True)
    (out / "data" / "train.jsonl").write_text('{"instruction": "c", "response": "d"}\n')
    with pytest.raises(ValueError, match=r"not committed: the manifest would be damaged \(field 'teacher'"):
        commit(open_store(run), out, CommitInfo(STAGE, "q" * 64, {}, {"rows": 1}, {"seconds": 1.0}, {"teacher": "m"}))
    assert (run / STAGE / "_MANIFEST.json").read_text() == before
    assert read_manifest(open_store(run), STAGE) is not None


@pytest.mark.parametrize(
    ("status", "named"),
    [
        ({"stages": {"dpo": "Pending"}}, "field 'stages.dpo': expected a table (JSON object), got a string"),
        ({"stages": ["dpo"]}, "field 'stages': expected a table (JSON object), got a list"),
        ({"stages": {"dpo": {"state": "Pending", "reason": 3}}}, "field 'stages.dpo.reason': expected a string"),
        ([1], "expected a table (JSON object) at the top level, got a list"),
        ("{", "not valid JSON"),
    ],
)
def test_a_controller_status_file_of_the_wrong_shape_is_named_and_the_rest_shown(tmp_path, capsys, status, named):
    run = committed_run(tmp_path)
    good = {"state": "Pending", "job": "bz-sft", "reason": "Unschedulable", "message": "0/3 nodes have a GPU"}
    if isinstance(status, dict):
        status = {**status, "namespace": "ns1"}
        status["stages"] = {**status["stages"], "sft-lamini": good} if isinstance(status["stages"], dict) else status[
            "stages"]
    f = run / "_control" / "status.json"
    f.parent.mkdir()
    f.write_text(status if isinstance(status, str) else json.dumps(status))

    rc, out = cli(capsys, "status", "--run", str(run))
    assert rc == 0 and f"{STAGE}    committed" in out
    assert f"damaged: {f.as_uri()}: the controller's status file is damaged ({named}" in out
    if isinstance(status, dict) and isinstance(status["stages"], dict):  # what is right is still shown
        assert "sft-lamini       Pending    Job bz-sft  Unschedulable: 0/3 nodes have a GPU" in out
    rc, out = cli(capsys, "status", "--run", str(run), "--json")
    shown = json.loads(out)
    assert rc == 0 and len(shown["controller_problems"]) == 1 and named in shown["controller_problems"][0]


@pytest.mark.parametrize("command", ["status", "verify", "repair"])
def test_a_run_path_that_is_a_file_is_bad_input(tmp_path, capsys, caplog, command):
    path = tmp_path / "a_file"
    path.write_text("not a run\n")
    with caplog.at_level(logging.ERROR, logger="bezoar"):
        rc, out = cli(capsys, command, "--run", str(path))
    assert rc == EXIT_BAD_INPUT and "no committed stage" not in out
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and f"{path} is a file, not a run directory" in errors[0]
    assert path.read_text() == "not a run\n"


@pytest.mark.parametrize("flag", ["--parallel", "--nproc-per-node"])
@pytest.mark.parametrize(("value", "said"), [("0", "0 is not allowed: it must be at least 1"),
                                             ("-2", "-2 is not allowed: it must be at least 1"),
                                             ("two", "'two' is not a whole number")])
def test_run_parallel_below_one_is_refused_at_parsing(tmp_path, capsys, flag, value, said):
    with pytest.raises(SystemExit) as e:
        main(["run", "--recipe", str(tmp_path / "r.yaml"), "--run", str(tmp_path / "run"), flag, value])
    assert e.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"argument {flag}: {said}" in err, err
    assert not (tmp_path / "run").exists()


def test_the_local_backend_refuses_parallel_below_one(tmp_path):
    from bezoar_jobs.executors.local import LocalBackend

    with pytest.raises(BadInput, match="at least 1"):
        LocalBackend(open_store(tmp_path / "run"), parallel=0)
