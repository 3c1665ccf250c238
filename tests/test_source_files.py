"""A local file a stage reads (a seed file, a template) edited in place (bezoar_jobs/source_files.py).

Before: the parameter hash named the file by its path only, so after an edit ``bezoar run`` called the committed
stage current, and a forced rerun reused the records saved for the old file (keyed by unit: the nth prompt,
whatever seeds it samples now): the committed data still came from the old seeds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from bezoar_jobs import runner, source_files
from bezoar_jobs.recipe import load_recipe
from bezoar_jobs.state import up_to_date
from bezoar_jobs.store import open_store
from tests.llm_server import LLMTestServer
from tests.scripted import scripted_answer, scripted_recipe

DEMO_DOLLY = Path(__file__).resolve().parents[1] / "bezoar_jobs" / "demo_data" / "dolly.jsonl"
NEW = "Which planet in our solar system has the longest day?"


def _edit(seeds: Path) -> None:
    """Every seed instruction replaced by NEW (same size or not: the content is what counts)."""
    rows = [json.loads(line) for line in seeds.read_text().splitlines()]
    seeds.write_text("".join(json.dumps({**r, "instruction": f"{NEW} ({i})"}) + "\n" for i, r in enumerate(rows)))


def test_a_seed_file_edited_in_place_reruns_its_stage_on_the_new_rows(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCRIPTED_JUDGE_KEY", "test-key")
    seeds = tmp_path / "dolly.jsonl"
    shutil.copyfile(DEMO_DOLLY, seeds)
    original = seeds.read_bytes()
    store = open_store(tmp_path / "run")
    with LLMTestServer(script=scripted_answer, api_key="test-key") as srv:
        recipe, _ = load_recipe(scripted_recipe(tmp_path, srv.url, **{"seeds.dolly.path": str(seeds)}))
        assert runner.run_stage("generate-lamini", recipe, store) == 0
        assert up_to_date(store, recipe, "generate-lamini")[0]

        # the same content written again (a touch, a copy): still current, nothing asked
        os.utime(seeds, ns=(1, 1))
        assert up_to_date(store, recipe, "generate-lamini") == (True, "committed, parameters and inputs unchanged")

        _edit(seeds)
        ok, why = up_to_date(store, recipe, "generate-lamini")
        assert not ok and why == f"seeds.dolly: {seeds} was changed since the stage was committed: it reruns"
        asked = len(srv.calls)
        assert runner.run_stage("generate-lamini", recipe, store) == 0
        fresh = srv.calls[asked:]
        assert fresh and any(NEW in c.prompt for c in fresh)  # asked again, from the new seeds
        assert all("boiling point of water" not in c.prompt for c in fresh)
        assert up_to_date(store, recipe, "generate-lamini")[0]

        # the old file put back: the records saved for it are found again, nothing is asked
        seeds.write_bytes(original)
        assert not up_to_date(store, recipe, "generate-lamini")[0]
        asked = len(srv.calls)
        assert runner.run_stage("generate-lamini", recipe, store) == 0
        assert len(srv.calls) == asked
    m = json.loads((tmp_path / "run" / "generate-lamini" / "_MANIFEST.json").read_text())
    f = m["input_files"]["files"]["seeds.dolly"]
    assert f["path"] == str(seeds.resolve()) and f["size"] == len(original)


def test_fingerprints_are_compared_only_on_the_host_that_took_them(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A controller on another machine than the stage's pod: the path there need not be the same file here."""
    seeds = tmp_path / "dolly.jsonl"
    shutil.copyfile(DEMO_DOLLY, seeds)
    recipe, _ = load_recipe(scripted_recipe(tmp_path, "http://127.0.0.1:9", **{"seeds.dolly.path": str(seeds)}))
    taken = source_files.fingerprints(recipe, "generate-lamini")
    assert list(taken["files"]) == ["seeds.dolly"]  # the templates are pkg:// files: the package's
    _edit(seeds)
    assert source_files.changed(taken) == f"seeds.dolly: {seeds} was changed since the stage was committed"
    monkeypatch.setattr(source_files.socket, "gethostname", lambda: "the-controller")
    assert source_files.changed(taken) is None
    seeds.unlink()
    monkeypatch.undo()
    assert source_files.changed(taken) == f"seeds.dolly: {seeds} is gone since the stage was committed"
