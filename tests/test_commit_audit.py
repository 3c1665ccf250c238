"""Commit and resume audit: what a kill, a crash or a second writer leaves must never be taken for
done work.

- a filter's saved verdicts belong to the input rows they judged: regenerated input (same row ids,
  other responses) is judged again, not handed the old verdicts;
- a record part with a torn or damaged line resumes (the line is dropped, named, and asked again)
  instead of failing every resume of the stage;
- the local store flushes every file (and the directories naming it) to disk before the manifest is
  renamed into place, so a machine crash never leaves a manifest naming empty or missing files; the
  local spool of records likewise;
- a commit whose fence (the stage lease) fails stops before it overwrites anything or writes a manifest.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bezoar_jobs.errors import RetryableError
from bezoar_jobs.layout import manifest_path
from bezoar_jobs.manifest import CommitInfo, commit, read_manifest
from bezoar_jobs.runner import WorkArea
from bezoar_jobs.stages.records import RecordLog, StoreUnavailable
from bezoar_jobs.store import LocalStore, open_store
from tests.llm_server import LLMTestServer
from tests.scripted import scripted_answer, scripted_recipe


def bezoar(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SCRIPTED_JUDGE_KEY": "test-key"}
    return subprocess.run([sys.executable, "-m", "bezoar_jobs.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


# ---- a filter's records are tied to the input they judged -----------------------------------------
def test_a_regenerated_input_is_judged_again_not_handed_the_old_verdicts(tmp_path: Path) -> None:
    teacher = {"v": 1}

    def script(prompt: str) -> str:
        text = scripted_answer(prompt)
        if teacher["v"] == 2 and text.startswith("Here is a careful answer"):
            text = text.replace("careful", "different and careful")  # the new teacher answers otherwise
        return text

    only = ("--only", "generate-lamini", "filter-lamini")
    with LLMTestServer(script=script, api_key="test-key") as srv:
        run, fresh = tmp_path / "run", tmp_path / "fresh"
        (tmp_path / "v1").mkdir()
        (tmp_path / "v2").mkdir()
        first = scripted_recipe(tmp_path / "v1", srv.url)
        assert bezoar("run", "--recipe", str(first), "--run", str(run), *only).returncode == 0
        # another teacher: generate-lamini reruns (same instructions, so the same row ids) with other
        # responses; filter-lamini's own parameters are unchanged
        teacher["v"] = 2
        second = scripted_recipe(tmp_path / "v2", srv.url, **{"teacher.model": "scripted/teacher-v2"})
        asked = len(srv.calls)
        res = bezoar("run", "--recipe", str(second), "--run", str(run), *only)
        assert res.returncode == 0, res.stderr[-3000:]
        judged = [c for c in srv.calls[asked:] if "Reply with JSON only" in c.prompt]
        assert judged, "the new responses were never shown to the judge"
        assert bezoar("run", "--recipe", str(second), "--run", str(fresh), *only).returncode == 0

    def committed(r: Path, rel: str) -> str:
        return (r / rel).read_text(encoding="utf-8")

    assert committed(run, "generate-lamini/data/train.jsonl") == committed(fresh, "generate-lamini/data/train.jsonl")
    for rel in ("filter-lamini/data/train.jsonl", "filter-lamini/rejected/rejected.jsonl"):
        assert committed(run, rel) == committed(fresh, rel), f"{rel}: verdicts on the old responses were reused"


# ---- a torn record line ---------------------------------------------------------------------------
def test_a_torn_or_damaged_record_line_is_dropped_and_named_not_fatal(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    store = LocalStore(tmp_path / "run")
    work = WorkArea(store, "generate-lamini")
    good = {"id": "a", "raw": "x"}
    whole = json.dumps({"id": "b", "raw": "y" * 40})
    body = (json.dumps(good) + "\n" + "[1, 2]\n" + json.dumps({"id": 7}) + "\n"
            + whole[: len(whole) // 2])  # a crash tore the last line
    work.put_bytes("records-k/p/part-1.jsonl", body.encode())
    work.put_bytes("records-k/p/part-2.jsonl", b'{"id": "c", "raw": "\xe2\x82"}\n')  # a cut multi-byte character
    with caplog.at_level(logging.WARNING, logger="bezoar"):
        log = RecordLog(work, "records-k", "p")
    assert log.records == {"a": good}
    assert "b" not in log and "c" not in log  # asked again
    said = "\n".join(r.getMessage() for r in caplog.records)
    for line in (2, 3, 4):
        assert f"part-1.jsonl line {line}:" in said
    assert "part-2.jsonl line 1:" in said


# ---- durability on a local disk -------------------------------------------------------------------
class _DiskEvents:
    """Every fsync (by the path of the descriptor) and rename, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.events: list[tuple[str, ...]] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: int) -> None:
            self.events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def replace(src: Any, dst: Any, **kw: Any) -> None:
            self.events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
            real_replace(src, dst, **kw)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def index(self, *event: str) -> int:
        return self.events.index(event)

    def renamed_to(self, dst: Path) -> tuple[int, str]:
        for i, e in enumerate(self.events):
            if e[0] == "replace" and e[2] == str(dst):
                return i, e[1]
        raise AssertionError(f"{dst} was never renamed into place")

    def flushed(self, path: Path | str, before: int, after: int = -1) -> bool:
        return any(e == ("fsync", str(path)) for e in self.events[after + 1:before])


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names descriptors through /proc")
def test_local_commit_puts_every_file_on_disk_before_the_manifest(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "train.jsonl").write_text('{"id": "a"}\n')
    (out / "data" / "README.md").write_text("card\n")
    (out / "metrics.jsonl").write_text("{}\n")
    root = (tmp_path / "run").resolve()
    store = LocalStore(root)
    disk = _DiskEvents(monkeypatch)
    commit(store, out, CommitInfo("generate-lamini", "p", {}, {"rows": 1}, {}, {}))
    m_at, m_tmp = disk.renamed_to(root / "generate-lamini" / "_MANIFEST.json")
    assert disk.flushed(m_tmp, m_at), "the manifest's bytes were not flushed before its rename"
    stage = root / "generate-lamini"
    for rel in ("data/train.jsonl", "data/README.md", "metrics.jsonl"):
        at, tmp = disk.renamed_to(stage / rel)
        assert at < m_at
        assert disk.flushed(tmp, at), f"{rel}: renamed into place without its bytes on disk"
        assert disk.flushed((stage / rel).parent, m_at, at), f"{rel}: its name was not on disk before the manifest"
    # the directories created for them are named on disk too
    assert disk.flushed(root, m_at) and disk.flushed(stage, m_at)
    assert disk.flushed(stage, len(disk.events), m_at), "the manifest's name was not flushed"
    assert read_manifest(store, "generate-lamini") is not None


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names descriptors through /proc")
def test_a_spooled_record_part_is_on_disk_before_it_is_named(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEZOAR_SPOOL_DIR", str(tmp_path / "spool"))
    work = WorkArea(LocalStore(tmp_path / "run"), "generate-lamini")

    def down(name: str, data: bytes) -> None:
        raise RetryableError("the store is down")

    monkeypatch.setattr(work, "put_bytes", down)
    log = RecordLog(work, "records-k", "p", flush_every=1)
    disk = _DiskEvents(monkeypatch)
    with pytest.raises(StoreUnavailable):
        log.add({"id": "a", "raw": "x"})
    part = next(log.spool.glob("part-*.jsonl")).resolve()
    at, tmp = disk.renamed_to(part)
    assert disk.flushed(tmp, at), "a crash could leave a torn part that the next start uploads"
    assert disk.flushed(part.parent, len(disk.events), at)


def test_a_spooled_part_another_process_uploaded_first_is_skipped(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes on one machine share a stage's spool (the shards of a stage): both list a part, one uploads
    and removes it, and the other crashed reading it (FileNotFoundError) at its start."""
    monkeypatch.setenv("BEZOAR_SPOOL_DIR", str(tmp_path / "spool"))
    work = WorkArea(LocalStore(tmp_path / "run"), "generate-lamini")
    first = RecordLog(work, "records-k", "p", flush_every=1)
    first.spool.mkdir(parents=True)
    (first.spool / "part-a.jsonl").write_text(json.dumps({"id": "a", "raw": "x"}) + "\n")
    real_glob = Path.glob

    def glob(self: Path, pattern: str) -> Any:
        found = list(real_glob(self, pattern))
        if self == first.spool:  # listed here; then the other process uploads and removes one of them
            found.append(self / "part-b.jsonl")
        return iter(found)

    monkeypatch.setattr(Path, "glob", glob)
    again = RecordLog(work, "records-k", "p", flush_every=1)
    assert "a" in again and not list(real_glob(first.spool, "part-*.jsonl"))


# ---- a second writer ------------------------------------------------------------------------------
def test_a_commit_whose_fence_fails_overwrites_nothing(tmp_path: Path) -> None:
    """The runner passes the stage lease's check as the fence: a holder that lost its lease while it
    uploaded stops before the next upload, and never writes its manifest over the new holder's."""
    store = open_store(tmp_path / "run")
    theirs = tmp_path / "theirs"
    (theirs / "data").mkdir(parents=True)
    (theirs / "data" / "a.jsonl").write_text("theirs a\n")
    (theirs / "data" / "b.jsonl").write_text("theirs b\n")
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "a.jsonl").write_text("mine a\n")
    (mine / "data" / "b.jsonl").write_text("mine b\n")

    calls = {"n": 0}

    class Lost(RetryableError):
        pass

    def fence() -> None:  # the lease is lost after the first upload (taken over meanwhile)
        calls["n"] += 1
        if calls["n"] == 3:
            commit(store, theirs, CommitInfo("filter-orca", "p", {}, {}, {}, {"who": "theirs"}))
        if calls["n"] >= 3:
            raise Lost("lost its lease")

    with pytest.raises(Lost):
        commit(store, mine, CommitInfo("filter-orca", "p", {}, {}, {}, {"who": "mine"}), fence=fence)
    m = json.loads(store.read_text(manifest_path("filter-orca")))
    assert m["who"] == "theirs"
    assert store.read_text("filter-orca/data/b.jsonl") == "theirs b\n"


def test_a_stage_that_loses_its_lease_while_it_uploads_commits_nothing(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner checked the lease once, before a commit whose uploads can take minutes: a holder paused past
    its lease's expiry went on uploading over the new holder's files, wrote its manifest over theirs and
    exited 0. It now checks before every upload and before the manifest, and exits 3 with nothing written."""
    import time

    from bezoar_jobs import runner
    from bezoar_jobs.layout import lease_path
    from bezoar_jobs.recipe import load_recipe

    monkeypatch.setenv("SCRIPTED_JUDGE_KEY", "test-key")
    store = open_store(tmp_path / "run")
    real_upload = LocalStore.upload_file
    uploads: list[str] = []

    def upload_file(self: LocalStore, path: Path, rel: str) -> None:  # another process takes the stage over
        if rel.startswith("generate-lamini/") and not uploads:
            self.write_text(lease_path("generate-lamini"), json.dumps(
                {"id": "the-other-holder", "expires_at": time.time() + 600, "host": "elsewhere", "pid": 1}))
        uploads.append(rel)
        real_upload(self, path, rel)

    monkeypatch.setattr(LocalStore, "upload_file", upload_file)
    with LLMTestServer(script=scripted_answer, api_key="test-key") as srv:
        recipe, _ = load_recipe(scripted_recipe(tmp_path, srv.url))
        with pytest.raises(RetryableError, match="lost its lease"):
            runner.run_stage("generate-lamini", recipe, store)
    assert len(uploads) == 1  # the one upload already under way when the lease was taken; no other
    assert read_manifest(store, "generate-lamini") is None


def test_a_damaged_checkpoint_is_passed_over_for_the_one_before_it(tmp_path: Path) -> None:
    """A checkpoint whose file was cut short or changed in the store raised RuntimeError at every start (a size
    check only, no content check), so the stage could never resume, nor start over. Now each file is checked
    against the sha256 its marker records, and a damaged checkpoint gives way to the one before it."""
    from bezoar_jobs.training.checkpoint import CKPT, StoreCheckpoints

    store = open_store(tmp_path / "run")
    ckpts = StoreCheckpoints(WorkArea(store, "sft-lamini"), {"params": "p"}, keep=3)
    for step in (2, 4):
        local = tmp_path / f"local-{step}"
        local.mkdir()
        (local / "adapter_model.safetensors").write_bytes(bytes([step]) * 64)
        (local / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        ckpts.upload(local, step)
    stored = tmp_path / "run" / "sft-lamini" / "_work" / CKPT / "step-4" / "trainer" / "adapter_model.safetensors"
    assert stored.is_file()
    stored.write_bytes(bytes([9]) * 64)  # the same size, other bytes: the size check alone took it

    restored = ckpts.restore(tmp_path / "out")
    assert restored is not None and restored[0] == 2
    assert (restored[1] / "adapter_model.safetensors").read_bytes() == bytes([2]) * 64
    assert ckpts.complete_steps() == [2]  # the damaged one is gone: the next start does not meet it again
    # every checkpoint damaged: the stage starts over instead of failing every start
    (tmp_path / "run" / "sft-lamini" / "_work" / CKPT / "step-2" / "trainer" / "trainer_state.json").unlink()
    assert ckpts.restore(tmp_path / "out2") is None and ckpts.complete_steps() == []


@pytest.mark.parametrize("name", ["model/../../../outside.txt", "../outside.txt", "/etc/outside", "data//x.jsonl",
                                  "data\\\\x.jsonl", "./data/x.jsonl"])
def test_a_manifest_naming_a_file_outside_its_stage_is_damaged(tmp_path: Path, name: str) -> None:
    """A reader downloads each listed file to <its directory>/<name>: a hand-edited or crafted manifest listing
    "model/../../../outside.txt" had fetch_input write outside the stage's scratch directory (the sha256 check
    comes after the download), and was taken as a manifest like any other."""
    from bezoar_jobs.manifest import DamagedManifest

    store = open_store(tmp_path / "run")
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")
    commit(store, out, CommitInfo("sft-lamini", "p", {}, {}, {}, {}))
    m = json.loads(store.read_text(manifest_path("sft-lamini")))
    assert read_manifest(store, "sft-lamini") is not None
    m["files"][name] = m["files"]["model/config.json"]
    store.write_text(manifest_path("sft-lamini"), json.dumps(m))
    with pytest.raises(DamagedManifest, match="is not a plain relative path inside the stage"):
        read_manifest(store, "sft-lamini")
