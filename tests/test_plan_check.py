"""`bezoar plan` against what the data stages really send: the paper recipe, scaled down, pointed at
the scripted teacher and judge, with answers of the lengths a real teacher typically writes (the
figures the plan assumes, estimate.Typical). Requests, prompt tokens and completion tokens of every
data stage must come within 25% of the plan made before the run. What this checks: the request
counts, the prompt sizes (templates, seed data, the pipeline's structure) and the arithmetic; what
it cannot check here is the typical answer lengths themselves (no real teacher runs here).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import yaml

from tests.llm_server import LLMTestServer

REPO = Path(__file__).resolve().parents[1]
DATA = ["generate-lamini", "generate-evol", "generate-orca", "filter-lamini", "filter-evol", "filter-orca"]


def bezoar(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SCRIPTED_JUDGE_KEY": "test-key"}
    return subprocess.run([sys.executable, "-m", "bezoar_jobs.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_plan_of_the_paper_recipe_runs_offline_with_typical_and_worst_figures(tmp_path):
    res = bezoar("plan", "--recipe", str(REPO / "recipes" / "openbezoar.yaml"), "--run", str(tmp_path / "r"), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {r["stage"]: r for r in json.loads(res.stdout)}
    for s in (*DATA, "eval-mtbench"):
        r = rows[s]
        assert r["requests"] > 0 and r["completion_tokens"] < r["completion_tokens_max"], s
        assert r["cost_usd"] is None or r["cost_usd"] <= r["cost_usd_max"], s
    # verdicts at 70 tokens, not their 256 cap; MT-Bench judgments at 300, not 2,048
    assert rows["filter-orca"]["completion_tokens"] == 70 * rows["filter-orca"]["requests"]
    assert rows["eval-mtbench"]["completion_tokens"] == 300 * rows["eval-mtbench"]["requests"]
    # the equality checks of generate-evol are paid judge requests
    assert rows["generate-evol"]["cost_usd"] > 0
    # judge prompts carry a whole response (a few hundred tokens), not a ~200-token guess
    assert rows["filter-evol"]["prompt_tokens"] / rows["filter-evol"]["requests"] > 450
    text = bezoar("plan", "--recipe", str(REPO / "recipes" / "openbezoar.yaml"), "--run", str(tmp_path / "r")).stdout
    assert "worst case" in text


_WORDS = ["one", "two", "six", "ten", "red", "sky", "sea", "owl", "map", "cup", "sun", "pen", "art", "oak"]


def _words(n: int, h: int) -> str:
    """n three-letter words: one token each both as the server counts (words) and as the plan
    counts (four characters a token), so the two units agree."""
    return " ".join(_WORDS[(h + i) % len(_WORDS)] for i in range(n))


def typical_script(prompt: str, params: dict) -> str:
    """Answers of the lengths estimate.Typical assumes (the server counts one token a word)."""
    cap = int(params.get("max_new_tokens") or 16)
    h = zlib.crc32(prompt.encode())
    if "<topic>" in prompt:  # 20 short topic names, about half of the cap
        return " ".join(f"<topic>Subject {h % 9973}x{i}</topic>" for i in range(20))
    if "<example>" in prompt and "Write" in prompt:  # 20 instructions, about half of the cap
        per = max(3, cap // 2 // 20)
        return "\n".join(f"<example>Explain {h % 100000}-{i} {_words(per - 2, h + i)}</example>" for i in range(20))
    if prompt.rstrip().endswith("task:<|endoftext|><|answer|>"):  # an evolution: the task and ~20 words more
        task = re.search(r"\nTask: (.*)\n(?:New|Invented) task:", prompt, re.S)
        return (task.group(1) if task else "a task") + " " + _words(20, h)
    if "Task A:" in prompt and "Task B:" in prompt:
        return "Different"
    if "Reply with JSON only" in prompt:  # a verdict of ~70 tokens
        return json.dumps({"status": "pass", "rating": 8, "reason": _words(62, h)})
    # a long-form answer: three quarters of its cap
    return _words(round(0.75 * cap), h)


def _recipe(tmp: Path, url: str) -> Path:
    data = yaml.safe_load((REPO / "recipes" / "openbezoar.yaml").read_text())
    data["teacher"].update({"base_url": url, "context_tokens": None, "max_concurrency": 8, "max_retries": 2,
                            "backoff_base_s": 0.05, "backoff_max_s": 0.2, "timeout_s": 20})
    data["judge"].update({"base_url": url + "/v1", "api_key_env": "SCRIPTED_JUDGE_KEY", "max_concurrency": 8,
                          "requests_per_minute": None, "tokens_per_minute": None, "max_retries": 2,
                          "backoff_base_s": 0.05, "timeout_s": 20})
    data["seeds"] = {"dolly": {"path": "pkg://bezoar_jobs/demo_data/dolly.jsonl"},
                     "flan": {"path": "pkg://bezoar_jobs/demo_data/flan.jsonl"}}
    g = data["generation"]
    g["lamini"].update({"example_prompts": 4, "topic_prompts": 2})
    g["evol"].update({"seeds": 10, "rounds": 2})
    g["orca"].update({"seeds": 16})  # Orca's proportions: niv2 1, t0 6, flan2021 8 (cot 0.5 rounds down)
    p = tmp / "recipe.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


@pytest.mark.parametrize("unused", [None])
def test_plan_figures_match_a_recorded_run_of_the_data_stages(tmp_path, unused):
    with LLMTestServer(script=typical_script) as srv:
        recipe = _recipe(tmp_path, srv.url)
        run = tmp_path / "run"
        res = bezoar("plan", "--recipe", str(recipe), "--run", str(run), "--json")
        assert res.returncode == 0, res.stderr[-2000:]
        planned = {r["stage"]: r for r in json.loads(res.stdout)}
        recorded = {}
        for stage in DATA:
            before = len(srv.calls)
            res = bezoar("run", "--recipe", str(recipe), "--run", str(run), "--only", stage, "--allow-unpinned")
            assert res.returncode == 0, (stage, res.stderr[-3000:])
            calls = [c for c in srv.calls[before:] if c.status == 200]
            recorded[stage] = {"requests": len(calls), "prompt_tokens": sum(len(c.prompt) // 4 for c in calls),
                               "completion_tokens": sum(c.output_tokens for c in calls)}
    report = []
    for stage in DATA:
        for k in ("requests", "prompt_tokens", "completion_tokens"):
            p, r = planned[stage][k], recorded[stage][k]
            report.append(f"{stage} {k}: plan {p} recorded {r} ({(p - r) / r:+.0%})")
    print("\n".join(report))
    bad = [line for line, stage, k in zip(report, [s for s in DATA for _ in range(3)],
                                          ["requests", "prompt_tokens", "completion_tokens"] * 6, strict=True)
           if abs(planned[stage][k] - recorded[stage][k]) > 0.25 * recorded[stage][k]]
    assert not bad, "\n".join(bad)


def test_a_priced_run_refuses_unpinned_hub_revisions_unless_allowed(tmp_path):
    """Finding 10: every hub revision of the paper recipe is null; a paid run now names each field to
    pin, and --allow-unpinned lets it start (here it then stops at the next check: nothing committed)."""
    recipe = str(REPO / "recipes" / "openbezoar.yaml")
    res = bezoar("run", "--recipe", recipe, "--run", str(tmp_path / "r"), "--only", "filter-lamini")
    assert res.returncode == 2
    for field in ("teacher.revision (h2oai/h2ogpt-gm-oasst1-en-2048-falcon-40b-v2)",
                  "student.revision (openlm-research/open_llama_3b_v2)", "seeds.dolly.revision", "seeds.flan.revision",
                  "training.hh.data.revision",
                  "evaluation.baselines.0.revision (SurgeGlobal/OpenBezoar-SFT)", "evaluation.baselines.2.revision"):
        assert field in res.stderr, field
    assert "evaluation.mtbench" not in res.stderr  # FastChat's files, pinned by the commit in their URLs
    assert "--allow-unpinned" in res.stderr
    res = bezoar("run", "--recipe", recipe, "--run", str(tmp_path / "r"), "--only", "filter-lamini", "--allow-unpinned")
    assert res.returncode == 2 and "unpinned hub revisions (--allow-unpinned)" in res.stderr
    assert "is not committed" in res.stderr


def test_files_fetched_by_url_are_pinned_only_by_a_commit_in_the_url():
    """A datasets builder reading a URL (the paper recipe's MT-Bench files) on a branch moves with it; and
    reference_questions, a hub dataset like the others, was not checked at all."""
    from bezoar_jobs.recipe import load_recipe

    recipe = load_recipe(str(REPO / "recipes" / "openbezoar.yaml"))[0]
    assert not [f for f in recipe.unpinned() if f.startswith("evaluation.mtbench")]  # at a commit sha
    m = recipe.evaluation.mtbench
    moving = m.model_copy(update={
        "reference_answers": m.reference_answers.model_copy(update={"data_files": (
            "https://raw.githubusercontent.com/lm-sys/FastChat/main/fastchat/llm_judge/data/mt_bench/x.jsonl",)}),
        "reference_questions": m.questions.model_copy(update={"path": "HuggingFaceH4/mt_bench_prompts",
                                                              "data_files": ()}),
        "questions": m.questions.model_copy(update={"data_files": (
            "hf://datasets/org/qs@0123456789abcdef0123456789abcdef01234567/question.jsonl",)})})
    ev = recipe.evaluation.model_copy(update={"mtbench": moving})
    found = [f for f in recipe.model_copy(update={"evaluation": ev}).unpinned() if f.startswith("evaluation.mtbench")]
    assert found == [
        "evaluation.mtbench.reference_answers.data_files.0 (https://raw.githubusercontent.com/lm-sys/FastChat/main/"
        "fastchat/llm_judge/data/mt_bench/x.jsonl: no commit in the URL)",
        "evaluation.mtbench.reference_questions.revision (HuggingFaceH4/mt_bench_prompts)"]


def test_plan_counts_the_orca_seeds_a_local_file_can_give(tmp_path):
    """Finding 12: the demo's seed file holds fewer rows than 48 seeds ask for; the plan (and the
    stage, see test_schemes_e2e) say how many will really be sent."""
    data = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())
    data["generation"]["orca"]["seeds"] = 48
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    res = bezoar("plan", "--recipe", str(recipe), "--run", str(tmp_path / "run"), "--json")
    assert res.returncode == 0, res.stderr
    rows = {r["stage"]: r for r in json.loads(res.stdout)}
    assert rows["generate-orca"]["requests"] == 40 and rows["filter-orca"]["requests"] == 40
