"""Training on several ranks and resuming: what a checkpoint resumes from, and what the manifest counts.

- a checkpoint resumes only on the rows it was written for (a data source that changed under the same recipe
  starts the stage over, instead of continuing the old data position on new rows);
- the token counters count the batches trained, once: not the batch the dataloader collates ahead of the
  step that uses it (counted again after a resume, and never trained at the end), on one rank or two.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bezoar_jobs.manifest import CommitInfo, commit, read_manifest
from bezoar_jobs.runner import run_stage
from bezoar_jobs.store import open_store
from tests.test_training import (
    commit_filter,
    lamini_rows,
    make_recipe,
    one_torch_thread,
    tiny,
    training_section,
)

SHARED_FIXTURES = (one_torch_thread, tiny)  # test_training.py's fixtures, found here by name

REPO = Path(__file__).resolve().parents[1]
HH = REPO / "bezoar_jobs" / "demo_data" / "hh" / "train.jsonl"




def _interrupt_after(store: Any, stage: str, step: int) -> None:
    """What a kill right after the checkpoint at ``step`` leaves: no manifest, no later checkpoint."""
    store.delete(f"{stage}/_MANIFEST.json")
    for rel in store.list(f"{stage}/_work/checkpoints/"):
        if int(rel.split("/step-", 1)[1].split("/", 1)[0]) > step:
            store.delete(rel)


def test_a_checkpoint_is_not_resumed_on_changed_training_data(tmp_path: Path, tiny: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """sft-hh reads training.hh.data, a local file here (or an unpinned hub dataset, as recipes/openbezoar.yaml):
    its rows can change under the same recipe, so the stage's fingerprint (parameters, input manifests, code)
    stays the same. The checkpoint's data position (steps into an epoch of those rows) was resumed on the new
    rows, and the committed model, trained on a mix, claimed the new data."""
    rows = HH.read_text(encoding="utf-8").splitlines()
    data = tmp_path / "hh.jsonl"
    data.write_text("\n".join(rows[:16]) + "\n", encoding="utf-8")
    training = training_section(checkpoint_every=2, hh={"data": {"path": str(data), "limit": 16, "licence": "MIT"}},
                                stage_args={"sft-hh": {"max_length": 320, "max_steps": 4}})
    recipe, _ = make_recipe(tmp_path, tiny, training)
    store = open_store(tmp_path / "run")
    base = tmp_path / "sft-evol-out"  # sft-hh starts from the last scheme SFT stage: the tiny model stands in
    shutil.copytree(tiny, base / "model")
    commit(store, base, CommitInfo("sft-evol", "test", {}, {}, {}, {}))

    assert run_stage("sft-hh", recipe, store) == 0
    first = read_manifest(store, "sft-hh")["training"]
    assert first["resumed_from_step"] is None

    # the same rows: the checkpoint is resumed (the digest is the same in a new process)
    _interrupt_after(store, "sft-hh", 2)
    assert run_stage("sft-hh", recipe, store) == 0
    again = read_manifest(store, "sft-hh")["training"]
    assert again["resumed_from_step"] == 2

    # other rows under the same recipe: the checkpoint is not resumed, the stage trains them from step 0
    _interrupt_after(store, "sft-hh", 2)
    data.write_text("\n".join(rows[32:48]) + "\n", encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="bezoar"):
        assert run_stage("sft-hh", recipe, store) == 0
    changed = read_manifest(store, "sft-hh")["training"]
    assert changed["resumed_from_step"] is None
    assert "written for other training data" in caplog.text
    # the manifest names the rows trained on
    assert first["train_data_sha256"] == again["train_data_sha256"] != changed["train_data_sha256"]


def test_a_resumed_run_counts_each_trained_token_once(tmp_path: Path, tiny: Path) -> None:
    """12 examples, 2 x 2 per step: 3 steps an epoch; 6 steps train every example exactly twice. Killed after
    the checkpoint at step 4 (inside the second epoch) and resumed, the run counted the batch the dataloader
    had collated ahead of step 5 twice: once before the checkpoint, once after the resume."""
    training = training_section(checkpoint_every=2, sft_args={"max_steps": 6, "per_device_train_batch_size": 2,
                                                              "gradient_accumulation_steps": 2})
    recipe, _ = make_recipe(tmp_path, tiny, training)
    store = open_store(tmp_path / "run")
    commit_filter(store, "lamini", lamini_rows(12), tmp_path)
    assert run_stage("sft-lamini", recipe, store) == 0
    m = read_manifest(store, "sft-lamini")
    assert m["training"]["real_tokens"] == 2 * m["counts"]["tokens"]

    _interrupt_after(store, "sft-lamini", 4)
    assert run_stage("sft-lamini", recipe, store) == 0
    m = read_manifest(store, "sft-lamini")
    assert m["training"]["resumed_from_step"] == 4
    assert m["training"]["real_tokens"] == 2 * m["counts"]["tokens"]


def test_tokens_collated_in_dataloader_workers_are_counted(tmp_path: Path, tiny: Path) -> None:
    """With dataloader_num_workers the collator runs in worker processes: its counters there never reached the
    trainer's process, and the manifest said 0 tokens trained (and 0 tokens/s)."""
    figures = {}
    for workers in (0, 2):
        (tmp_path / str(workers)).mkdir()
        training = training_section(sft_args={"max_steps": 6, "per_device_train_batch_size": 2,
                                              "gradient_accumulation_steps": 2, "dataloader_num_workers": workers})
        recipe, _ = make_recipe(tmp_path / str(workers), tiny, training)
        store = open_store(tmp_path / str(workers) / "run")
        commit_filter(store, "lamini", lamini_rows(12), tmp_path / str(workers))
        assert run_stage("sft-lamini", recipe, store) == 0
        m = read_manifest(store, "sft-lamini")
        assert m["training"]["real_tokens"] == 2 * m["counts"]["tokens"] > 0, workers  # every example twice
        figures[workers] = (m["training"]["real_tokens"], m["training"]["total_tokens"])
    assert figures[2] == figures[0]


def _stage(recipe: Path, run: Path, *extra: str) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "bezoar_jobs.cli", "stage", "sft-lamini", "--recipe", str(recipe),
                        "--run", str(run), *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]


def test_two_ranks_count_the_tokens_one_rank_trains(tmp_path: Path, tiny: Path) -> None:
    """5 steps of 4 examples on 12: the run ends inside an epoch. Each rank's dataloader had collated one batch
    ahead that was never trained: one rank over-counted one batch, two ranks two, so the same training (the
    same losses) reported other token counts on one rank and on two."""
    training = training_section(sft_args={"max_steps": 5, "per_device_train_batch_size": 2,
                                          "gradient_accumulation_steps": 2})
    _, recipe = make_recipe(tmp_path, tiny, training)
    figures = {}
    for name, extra in (("one", ()), ("two", ("--nproc-per-node", "2"))):
        run = tmp_path / name
        commit_filter(open_store(run), "lamini", lamini_rows(12), tmp_path)
        _stage(recipe, run, *extra)
        m = read_manifest(open_store(run), "sft-lamini")
        losses = [r["loss"] for r in map(json.loads, (run / "sft-lamini/metrics.jsonl").read_text().splitlines())
                  if "loss" in r and "event" not in r]
        figures[name] = (m["training"]["real_tokens"], m["training"]["total_tokens"], losses)
        # what an optimizer step holds, over every rank (it said 2 on two ranks: one rank's share)
        assert m["training"]["batch_rows_per_step"] == 4, name
    (real1, total1, loss1), (real2, total2, loss2) = figures["one"], figures["two"]
    assert loss2 == pytest.approx(loss1, abs=1e-5)  # the same examples were trained
    assert (real2, total2) == (real1, total1)


def test_auto_find_batch_size_is_refused_on_more_than_one_process(tmp_path: Path) -> None:
    """The Trainer's auto_find_batch_size halves a rank's batch on that rank's out-of-memory error alone: the
    ranks' batches then differ (the recipe's global batch broken) and their collectives can wait forever."""
    import yaml

    from bezoar_jobs.errors import BadInput
    from bezoar_jobs.recipe import parse_recipe
    from bezoar_jobs.training.config import build_stage_configs, device_plan

    text = yaml.safe_dump({"schema_version": 1, "name": "t", "teacher": {"backend": "local", "model": "x"},
                           "judge": {"backend": "local", "model": "x"}, "student": {"model": "x"},
                           "training": training_section(sft_args={"auto_find_batch_size": True})})
    recipe = parse_recipe(text, "r.yaml")
    plan = device_plan(recipe.training, cuda=False, bf16_ok=False)
    with pytest.raises(BadInput, match=r"training.sft_args.auto_find_batch_size: not with 2 training processes"):
        build_stage_configs(recipe.training, recipe.seed, "sft-lamini", tmp_path, plan=plan, world_size=2)
    build_stage_configs(recipe.training, recipe.seed, "sft-lamini", tmp_path, plan=plan, world_size=1)  # one: fine
