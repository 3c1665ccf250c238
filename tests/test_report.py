"""The run report from a complete run and from a run that stopped after the data stages.

The complete run is real where it matters for the report: data and training stages are committed
through the manifest commit rule with the files and manifest fields those stages write (counts,
usage, metrics.jsonl with losses, model/ checkpoints of the tiny model), and the two evaluation
stages really run on those checkpoints. Every embedded image must decode and every chart must have
data behind it; secrets must not appear.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from bezoar_jobs.manifest import CommitInfo, commit, read_manifest
from bezoar_jobs.recipe import parse_recipe
from bezoar_jobs.runner import run_stage
from bezoar_jobs.stages.report import build_report
from bezoar_jobs.state import freeze_recipe, params_hash, up_to_date
from bezoar_jobs.store import open_store
from tests.tiny_model import build_tiny_model

SECRET_URL_PASSWORD = "pa55-w0rd-not-for-reports"
SCHEMES = ("lamini", "evol", "orca")
TRAINING = ("sft-lamini", "sft-evol", "sft-orca", "sft-hh", "dpo")


def _recipe_text(tiny: Path) -> str:
    data = {
        "schema_version": 1,
        "name": "report-test",
        "teacher": {"backend": "local", "model": str(tiny), "prompt_format": "{user}"},
        "judge": {
            "backend": "openai-chat",
            "model": "gpt-4-0613",
            "api_key_env": "NO_SUCH_KEY_VAR",
            "base_url": f"https://team:{SECRET_URL_PASSWORD}@judge.example.com/v1",
            "price_input_per_mtok": 30.0,
            "price_output_per_mtok": 60.0,
        },
        "student": {"model": str(tiny)},
        "evaluation": {
            "checkpoints": ["base", "sft-orca", "dpo"],
            # a stand-in for the released DPO model (its counterpart named explicitly)
            "baselines": [{"name": "released-DPO", "model": str(tiny), "counterpart": "dpo"}],
            "harness": {
                "include_path": "pkg://bezoar_jobs/demo_data/harness_tasks",
                "bootstrap_iters": 100,
                "tasks": [
                    {"name": "bezoar_demo_facts", "num_fewshot": 1, "metric": "acc_norm"},
                    {"name": "bezoar_demo_cloze", "num_fewshot": 0, "metric": "acc"},
                ],
            },
            "mtbench": {
                "questions": {"path": "pkg://bezoar_jobs/demo_data/mtbench/questions.jsonl"},
                "categories": ["math", "writing", "stem"],
                "answer_max_new_tokens": 4,
                "judge_method": "logprobs",
                "judge_prompts": "pkg://bezoar_jobs/templates/mtbench_judge_short.txt",
                "judge": {
                    "backend": "local",
                    "model": str(tiny),
                    "prompt_format": "{system}\n{user}\n",
                    "batch_size": 8,
                },
            },
        },
        "report": {"gpu_hour_usd": 2.0, "judgments_shown": 2},
    }
    return yaml.safe_dump(data, sort_keys=False)


def _commit(
    store, tmp: Path, stage: str, files: dict[str, str | Path], counts: dict, seconds: float, extra: dict
) -> None:
    out = tmp / f"out-{stage}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for rel, content in files.items():
        dest = out / rel
        if isinstance(content, Path):
            shutil.copytree(content, dest)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(content)
    commit(store, out, CommitInfo(stage, "p", {}, counts, {"started": 0.0, "seconds": seconds}, extra))


def _data_stages(store, tmp: Path) -> dict[str, dict]:
    """generate-* and filter-* as those stages commit them (files, counts, usage, cost, endpoints)."""
    expected = {}
    for i, s in enumerate(SCHEMES):
        rows, rejected = 20 + 5 * i, 3 + i
        _commit(
            store,
            tmp,
            f"generate-{s}",
            {"data/train.jsonl": "".join(json.dumps({"id": f"{s}{k}"}) + "\n" for k in range(rows))},
            {"rows": rows, "rejected": rejected},
            30.0 + i,
            {
                "teacher": {
                    "backend": "tgi",
                    "model": "h2oai/falcon",
                    "model_id": "h2oai/falcon",
                    "revision": "abc123",
                    "base_url": "http://teacher:80",
                },
                "usage": {
                    "teacher": {"prompt_tokens": 1000 * (i + 1), "completion_tokens": 500 * (i + 1), "requests": 10}
                },
                "cost_usd": None,
                # what stages.common.Phase records: lost requests by cause, retries
                "requests": {"needed": rows + 2, "asked": rows + 2, "answered": rows, "retries": 5, "failed": 2,
                             "failed_by_cause": {"HTTP 503": 2}, "phases": {}},
            },
        )
        kept = rows - 2 - i
        _commit(
            store,
            tmp,
            f"filter-{s}",
            {"data/train.jsonl": "x\n", "rejected/rejected.jsonl": "y\n"},
            {
                "input_rows": rows,
                "kept": kept,
                "rejected": rows - kept,
                "unparseable": 1,
                "failed": 1,
                "retention": round(kept / rows, 4),
                "scheme": s,
            },
            12.0,
            {
                "judge": {
                    "backend": "openai-chat",
                    "model": "gpt-4-0613",
                    "model_id": "gpt-4-0613",
                    "revision": None,
                    "base_url": f"https://team:{SECRET_URL_PASSWORD}@judge.example.com/v1",
                    "method": "generate",
                },
                "usage": {"judge": {"prompt_tokens": 3000, "completion_tokens": 300, "requests": rows}},
                "cost_usd": 0.108,
            },
        )
        expected[s] = {"generated": rows + rejected, "kept": kept}
    return expected


@pytest.fixture(scope="module")
def complete_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("complete")
    tiny = build_tiny_model(tmp / "tiny")
    tuned = build_tiny_model(tmp / "tuned", seed=5)
    run = tmp / "run"
    store = open_store(run)
    text = _recipe_text(tiny)
    freeze_recipe(store, text)
    recipe = parse_recipe(text)
    expected = _data_stages(store, tmp)
    losses = {}
    for k, stage in enumerate(TRAINING):
        pts = [(step, 2.5 - 0.1 * step + 0.01 * k) for step in range(1, 7)]
        losses[stage] = pts
        metrics = "".join(
            json.dumps({"time": 1.0, "stage": stage, "step": st, "loss": lo, "learning_rate": 1e-4}) + "\n"
            for st, lo in pts
        )
        metrics += (
            json.dumps({"time": 2.0, "stage": stage, "step": 6, "train_runtime": 9.0}) + "\n"
        )  # no loss: not a point
        files: dict[str, str | Path] = {"metrics.jsonl": metrics}
        if stage in ("sft-orca", "sft-hh", "dpo"):
            files["model"] = tuned
        _commit(store, tmp, stage, files, {"examples": 40, "steps": 6}, 1800.0,
                {"base_model": "base", "training": {"mode": "qlora", "mode_description": "4-bit NF4 QLoRA on CUDA",
                                                     "real_tokens": 12345, "final_loss": pts[-1][1]}})
    assert run_stage("eval-harness", recipe, store) == 0
    assert run_stage("eval-mtbench", recipe, store) == 0
    assert run_stage("report", recipe, store) == 0
    return {"run": run, "store": store, "recipe": recipe, "expected": expected, "losses": losses}


FIGURE = re.compile(
    r'<figure data-chart="([a-z]+)" data-points="(\d+)"><img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">'
)


def _figures(html: str) -> dict[str, tuple[int, bytes]]:
    out = {}
    for name, points, b64 in FIGURE.findall(html):
        out[name] = (int(points), base64.b64decode(b64, validate=True))
    assert html.count("<img") == len(out), "every image is an embedded figure we can account for"
    return out


def _check_images(figs: dict[str, tuple[int, bytes]]) -> None:
    for name, (points, png) in figs.items():
        assert points > 0, f"chart {name} has no data behind it"
        img = Image.open(io.BytesIO(png))
        img.verify()  # raises on a broken PNG
        w, h = Image.open(io.BytesIO(png)).size
        assert w > 200 and h > 100, name


def test_report_from_a_complete_run(complete_run):
    store = complete_run["store"]
    m = read_manifest(store, "report")
    assert {"index.html", "report.md", "report.json"} <= set(m["files"])
    assert m["counts"]["partial"] is False and m["counts"]["charts"] == 5
    html = store.read_text("report/index.html")
    md = store.read_text("report/report.md")
    numbers = json.loads(store.read_text("report/report.json"))
    assert "Complete run: all 13 stages committed" in html and "Partial run" not in html
    figs = _figures(html)
    assert set(figs) == {"durations", "funnel", "loss", "harness", "mtbench"}
    _check_images(figs)
    # each chart's data is the run's data
    assert figs["durations"][0] == 13
    assert figs["funnel"][0] == 3
    assert figs["loss"][0] == sum(len(p) for p in complete_run["losses"].values()) == 30
    assert numbers["loss"]["dpo"] == [list(p) for p in complete_run["losses"]["dpo"]]
    mt = json.loads(store.read_text("eval-mtbench/results/scores.json"))
    assert (
        figs["mtbench"][0] == sum(v is not None for s in mt["models"].values() for v in s["categories"].values()) == 12
    )
    hs = json.loads(store.read_text("eval-harness/results/summary.json"))
    assert (
        figs["harness"][0]
        == sum(v["value"] is not None for s in hs["models"].values() for v in s["scores"].values())
        == 8
    )
    for name in figs:  # report.md links the same figures, committed beside it
        assert f"(figures/{name}.png)" in md and f"figures/{name}.png" in m["files"]
    # the funnel per scheme
    for row in numbers["funnel"]:
        exp = complete_run["expected"][row["scheme"]]
        assert (row["generated"], row["kept"]) == (exp["generated"], exp["kept"])
    # ... beside the released datasets' sizes (LaMini 1,504, Evol-Instruct 2,304, Orca 3,517)
    # failed rows, the requests lost by cause and the retries are part of the funnel (issue 11)
    assert "| lamini | 23 | 3 | 20 | 18 | 2 | 1 | 0.9 | 2 (HTTP 503: 2) | 5 | 1,504 (SurgeGlobal/LaMini) | -1,486 |" \
        in md
    assert {r["scheme"]: r["released_rows"] for r in numbers["funnel"]} == {"lamini": 1504, "evol": 2304, "orca": 3517}
    # each checkpoint beside its released counterpart, with the differences
    vs = [r for r in numbers["released"]["comparison"] if r[0] == "dpo vs OpenBezoar-HH-RLHF-DPO (released-DPO)"]
    assert [r[1] for r in vs] == ["bezoar_demo_facts (1-shot, acc_norm,none)", "bezoar_demo_cloze (0-shot, acc,none)",
                                  "MT-Bench overall", "MT-Bench turn 1", "MT-Bench turn 2"]
    ours, theirs = hs["models"]["dpo"]["scores"], hs["models"]["released-DPO"]["scores"]
    a, b = ours["bezoar_demo_facts"]["value"], theirs["bezoar_demo_facts"]["value"]
    assert float(vs[0][4]) == pytest.approx(a - b, abs=1e-4)
    m_ours, m_theirs = mt["models"]["dpo"]["overall"], mt["models"]["released-DPO"]["overall"]
    assert float(vs[2][4]) == pytest.approx(m_ours - m_theirs, abs=1e-4)
    assert "Against the released models" in html and "| dpo vs OpenBezoar-HH-RLHF-DPO (released-DPO) |" in md
    # evaluation tables across checkpoints; which judge produced the MT-Bench scores
    for label in ("base", "sft-orca", "dpo"):
        assert f"| {label} |" in md
    judge_id = mt["judge"]["model_id"]
    assert judge_id in html and "gpt-4-0613" in html and "h2oai/falcon" in html
    assert "Sample judgments" in html and html.count("<details>") == 2 * 4
    # tokens, time and cost: GPU-hours from the CUDA training stages, API spend where priced
    usage = {r["stage"]: r for r in numbers["usage"]}
    assert usage["sft-orca"]["gpu_hours"] == pytest.approx(0.5) and usage["sft-orca"]["gpu_cost_usd"] == pytest.approx(
        1.0
    )
    assert usage["filter-evol"]["api_cost_usd"] == pytest.approx(0.108)
    assert usage["generate-orca"]["prompt_tokens"] == 3000
    assert "| total |" in md
    # the recipe is shown, without the credentials in a URL
    assert "schema_version: 1" in md and "report-test" in html
    for text in (html, md, json.dumps(numbers)):
        assert SECRET_URL_PASSWORD not in text
    assert "https://***@judge.example.com/v1" in html


def test_report_reruns_only_when_the_run_changed_and_rebuilds_on_demand(complete_run, tmp_path):
    store, recipe = complete_run["store"], complete_run["recipe"]
    assert up_to_date(store, recipe, "report") == (True, "committed, built from the current stages")
    urls = build_report(str(complete_run["run"]))
    assert urls == [store.url("report/index.html"), store.url("report/report.md")]
    m = read_manifest(store, "report")
    assert m["built_by"] == "bezoar report" and m["params_hash"] == params_hash(recipe, "report")
    assert up_to_date(store, recipe, "report")[0]
    # a stage committed again (e.g. a forced rerun) makes the report stale
    _commit(
        store,
        tmp_path,
        "filter-orca",
        {"data/train.jsonl": "z\n"},
        {"input_rows": 30, "kept": 1, "rejected": 29},
        5.0,
        {},
    )
    ok, why = up_to_date(store, recipe, "report")
    assert not ok and "since the report was built" in why
    assert run_stage("report", recipe, store) == 0
    assert "| orca | 35 | 5 | 30 | 1 | 29 |" in store.read_text("report/report.md")
    assert "| 3,517 (SurgeGlobal/Orca) | -3,516 |" in store.read_text("report/report.md")


def test_report_from_a_run_stopped_after_the_data_stages(tmp_path):
    run = tmp_path / "run"
    store = open_store(run)
    text = _recipe_text(tmp_path / "no-model-needed")
    freeze_recipe(store, text)
    expected = _data_stages(store, tmp_path)
    store.write_text("sft-lamini/_work/checkpoints/step-5/COMPLETE", "{}")  # training had started
    urls = build_report(str(run))
    assert urls[0].endswith("/report/index.html")
    html = store.read_text("report/index.html")
    md = store.read_text("report/report.md")
    assert "Partial run: 6 of 13 stages committed" in html and "Partial run" in md
    assert "not committed: sft-lamini, sft-evol, sft-orca, sft-hh, dpo, eval-harness, eval-mtbench" in html
    assert "| sft-lamini | partial |" in md and "| dpo | not run |" in md
    figs = _figures(html)
    assert set(figs) == {"durations", "funnel"}  # no empty chart for what is not there
    _check_images(figs)
    assert figs["funnel"][0] == 3 and figs["durations"][0] == 6
    assert "eval-harness is not committed" in html and "No training stage with logged losses" in html
    numbers = json.loads(store.read_text("report/report.json"))
    assert numbers["partial"] is True
    assert {r["scheme"]: r["generated"] for r in numbers["funnel"]} == {s: e["generated"] for s, e in expected.items()}
    assert SECRET_URL_PASSWORD not in html + md
    assert read_manifest(store, "report")["counts"]["partial"] is True


def test_report_of_an_empty_location(tmp_path):
    urls = build_report(str(tmp_path / "nothing"))
    html = open_store(tmp_path / "nothing").read_text("report/index.html")
    assert "Partial run: 0 of 13 stages committed" in html and "<img" not in html
    assert "recipe.yaml does not exist" in html and urls[1].endswith("report.md")


def test_the_shared_teacher_is_counted_once_over_the_union_of_the_generate_spans(tmp_path):
    """Finding 12: teacher GPU time. The generate stages run side by side on one teacher: their own
    spans overlap, so the run's teacher GPU-hours are those of the union of the spans."""
    from bezoar_jobs.report.collect import RunData, teacher_gpu_union, usage_rows
    from bezoar_jobs.report.render import build_tables

    def gen(start: float, end: float) -> dict:
        span = end - start
        return {"teacher_gpu": {"start": start, "end": end, "span_s": span, "gpus": 2, "gpu_hour_usd": 3.0,
                                "gpu_hours": round(2 * span / 3600, 6), "gpu_cost_usd": round(6 * span / 3600, 6)},
                "gpu_hours": round(2 * span / 3600, 6), "timings": {"seconds": span}}

    data = RunData("file:///r", {"generate-lamini": gen(0, 3600), "generate-evol": gen(1800, 5400),
                                 "generate-orca": gen(9000, 10800)}, {}, None, None, None)
    union = teacher_gpu_union(data)
    assert union == {"seconds": 7200.0, "gpus": 2, "gpu_hours": 4.0, "gpu_cost_usd": 12.0}
    usage = usage_rows(data, gpu_hour_usd=None)
    assert sum(r["gpu_hours"] for r in usage) == pytest.approx(5.0)  # the stages' own figures overlap
    total = build_tables(data, [], [], usage, [], union)["usage"].rows[-1]
    assert total[0] == "total" and total[5] == "4" and total[7] == "12"
