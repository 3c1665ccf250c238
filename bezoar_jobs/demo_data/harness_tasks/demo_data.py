"""The demo tasks' data, found next to this file: ``custom_dataset: !function demo_data.<task>`` in
the task YAMLs, which lm_eval resolves relative to the YAML, so the tasks run as shipped with the
``lm_eval`` CLI (``--include_path``) as well as in the eval-harness stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _load(name: str) -> Any:  # noqa: ANN401 - a datasets.DatasetDict
    from datasets import Dataset, DatasetDict

    rows = [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return DatasetDict({"test": Dataset.from_list(rows)})


def facts(**metadata: Any) -> Any:  # noqa: ANN401 - lm_eval passes the task's metadata as keywords
    return _load("facts.jsonl")


def cloze(**metadata: Any) -> Any:  # noqa: ANN401
    return _load("cloze.jsonl")
