"""The generate stages of each scheme through the real CLI against the scripted teacher/judge
(TGI and OpenAI chat over HTTP): the findings of the data review, each shown on a committed run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bezoar_jobs.manifest import read_manifest
from bezoar_jobs.store import open_store
from tests.llm_server import LLMTestServer
from tests.scripted import scripted_answer, scripted_recipe
from tests.tiny_model import build_word_tokenizer

PASSAGES = [
    "The Nile flows north through eleven countries and ends in a wide delta on the Mediterranean Sea.",
    "Honey bees live in colonies of up to sixty thousand workers, one queen and a few hundred drones.",
    "The first public railway opened in 1825 between Stockton and Darlington in the north of England.",
]


def bezoar(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "SCRIPTED_JUDGE_KEY": "test-key"}
    return subprocess.run([sys.executable, "-m", "bezoar_jobs.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _task_of(prompt: str) -> str:
    """The task an evolution prompt asks about (between its last 'Task:' line and the label after)."""
    m = re.search(r"\nTask: (.*)\n(?:New|Invented) task:\s*(?:<\|endoftext\|>.*)?$", prompt, re.S)
    assert m, prompt
    return m.group(1)


def evolving_script(drop_passage_every: int = 0):
    """Scripted answers; an evolution repeats the task's first line with a few words more and, when
    the task has a passage, the passage (dropped by every n-th answer when asked)."""
    def script(prompt: str) -> str:
        if prompt.rstrip().endswith(("New task:<|endoftext|><|answer|>", "Invented task:<|endoftext|><|answer|>")):
            task = _task_of(prompt)
            head, _, rest = task.partition("\n\n")
            n = sum(map(ord, prompt)) % 9973
            new = f"New task: {head.rstrip('.?')} and explain step {n}."
            if rest and not (drop_passage_every and n % drop_passage_every == 0):
                new += f"\n\n{rest}"
            return new + "\n\nAnswer: this is what the model wrote after its rewrite."
        return scripted_answer(prompt)
    return script


def dolly_file(tmp: Path, n: int = 12) -> Path:
    path = tmp / "dolly.jsonl"
    cats = ["closed_qa", "open_qa", "summarization", "brainstorming"]
    lines = []
    for i in range(n):
        ctx = PASSAGES[i % 3] if i % 2 == 0 else ""
        lines.append(json.dumps({"instruction": f"Seed task number {i}: describe what the text says about it.",
                                 "context": ctx, "response": "r", "category": cats[i % 4]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_evol_keeps_dolly_passages_and_counts_the_equality_judge(tmp_path):
    """Findings 2 and 12: passages survive evolution (put back when the teacher drops them), and
    the equality judge's dollars are in the stage's cost_usd."""
    with LLMTestServer(script=evolving_script(drop_passage_every=3), api_key="test-key") as srv:
        recipe = scripted_recipe(tmp_path, srv.url, **{
            "seeds.dolly": {"path": str(dolly_file(tmp_path))},
            "generation.evol.seeds": 12, "generation.evol.rounds": 2,
            "teacher.gpus": 2, "teacher.gpu_hour_usd": 3.0,
        })
        run = tmp_path / "run"
        res = bezoar("stage", "generate-evol", "--recipe", str(recipe), "--run", str(run))
        assert res.returncode == 0, res.stderr[-3000:]
    out = rows(run / "generate-evol" / "data" / "train.jsonl")
    by_id = {r["id"]: r for r in out}
    with_passage = [r for r in out if any(p in r["instruction"] for p in PASSAGES)]
    assert with_passage, "no evolved task kept its passage"
    for r in out:
        lineage_seed = int(r["id"].split("-")[1])
        parent = by_id.get(r["parent_id"])  # a task a kept in-breadth step made has no passage to keep
        carried = parent is None or PASSAGES[lineage_seed % 3] in parent["instruction"]
        if lineage_seed % 2 == 0 and r["evolution_strategy"] == "in-depth" and carried:
            assert PASSAGES[lineage_seed % 3] in r["instruction"], r
        assert "Answer:" not in r["instruction"]
    m = read_manifest(open_store(run), "generate-evol")
    assert m["counts"]["input_restored"] > 0
    assert m["counts"]["rows"] == len(by_id)
    # the equality judge is priced (OpenAI chat, 10 / 30 USD per 1M tokens): its dollars are counted
    j = m["usage"]["judge"]
    assert j["requests"] > 0
    expected = round((j["prompt_tokens"] * 10.0 + j["completion_tokens"] * 30.0) / 1e6, 6)
    assert m["cost_usd_by_role"]["judge"] == expected and m["cost_usd"] == pytest.approx(expected)
    # the teacher's GPU time over the span it served the stage
    tg = m["teacher_gpu"]
    assert tg["gpus"] == 2 and tg["span_s"] > 0
    assert tg["gpu_hours"] == pytest.approx(2 * tg["span_s"] / 3600, abs=1e-6)
    assert tg["gpu_cost_usd"] == pytest.approx(3.0 * tg["gpu_hours"], abs=1e-5)


def _evolve_calls(srv: LLMTestServer) -> list[str]:
    """The evolution prompts the teacher answered."""
    return [c.prompt for c in srv.calls
            if c.status == 200 and c.prompt.rstrip().endswith("task:<|endoftext|><|answer|>")]


def _check_chain(out: list[dict], seeds: dict[str, str], asked: list[str]) -> None:
    """Every committed row evolved its parent: a committed row of the same lineage from an earlier
    round, or the seed; and the teacher was asked to evolve exactly the parent's text."""
    by_id = {r["id"]: r for r in out}
    tasks = {_task_of(p) for p in asked}
    for r in out:
        lid, rnd = r["id"].rsplit("-r", 1)
        assert r["epoch"] == int(rnd)
        parent = r["parent_id"]
        assert parent.startswith(lid + "-r")
        if parent == f"{lid}-r0":
            parent_text = seeds[lid]
        else:
            assert parent in by_id, f"{r['id']}: parent {parent} is not committed"
            assert by_id[parent]["epoch"] < r["epoch"]
            parent_text = by_id[parent]["instruction"]
        assert parent_text in tasks, f"{r['id']}: the teacher was never asked to evolve its parent"


def test_a_lineage_whose_request_fails_for_good_stops_and_force_continues_the_chain(tmp_path):
    """Finding 5: a failed round-k request made round k+1 evolve the seed under epoch k+1, and a
    --force rerun kept that stale round."""
    marker = "Seed task number 4:"

    def rule(prompt: str) -> str | None:
        # round 1 of lineage 4 fails for good (the prompt evolves the seed itself)
        if failing and prompt.rstrip().endswith("task:<|endoftext|><|answer|>") and f"Task: {marker}" in prompt:
            return "500"
        return None

    failing = True
    with LLMTestServer(script=evolving_script(), api_key="test-key", rule=rule) as srv:
        recipe = scripted_recipe(tmp_path, srv.url, **{
            "seeds.dolly": {"path": str(dolly_file(tmp_path))},
            "generation.evol.seeds": 12, "generation.evol.rounds": 3, "teacher.max_retries": 0,
            # one lineage of 12 is lost on purpose: within the limit, so the stage commits without it
            "generation.max_failed_fraction": 0.1,
        })
        run = tmp_path / "run"
        res = bezoar("stage", "generate-evol", "--recipe", str(recipe), "--run", str(run))
        assert res.returncode == 0, res.stderr[-3000:]
        out = rows(run / "generate-evol" / "data" / "train.jsonl")
        lid = next(r["id"].rsplit("-r", 1)[0] for r in rows(run / "generate-evol" / "rejected" / "rejected.jsonl")
                   if "request failed for good in round 1" in r["reason"])
        assert not [r for r in out if r["id"].startswith(lid + "-")]  # rounds 2 and 3 were not made up
        assert sum(1 for p in _evolve_calls(srv) if marker in p) == 0  # nothing evolved the seed after round 1
        m = read_manifest(open_store(run), "generate-evol")
        assert m["counts"]["lineages_stopped_by_teacher_errors"] == 1
        first_run = _evolve_calls(srv)
        # the teacher recovers; --force reruns (paid-for records are kept): round 1 is asked again and
        # rounds 2 and 3 evolve its answer, not the seed
        failing = False
        srv.reset()
        res = bezoar("stage", "generate-evol", "--recipe", str(recipe), "--run", str(run), "--force")
        assert res.returncode == 0, res.stderr[-3000:]
        out = rows(run / "generate-evol" / "data" / "train.jsonl")
        chain = sorted((r for r in out if r["id"].startswith(lid + "-")), key=lambda r: r["epoch"])
        assert [r["epoch"] for r in chain] == [1, 2, 3]
        assert [r["parent_id"] for r in chain] == [f"{lid}-r0", chain[0]["id"], chain[1]["id"]]
        asked = _evolve_calls(srv)
        seed_text = _seed_texts(tmp_path)[int(lid.split("-")[1])]
        assert sum(1 for p in asked if _task_of(p) == seed_text) == 1  # round 1, once
        assert any(f"Task: {chain[0]['instruction']}" in p for p in asked)  # round 2 evolved round 1's answer
        seeds = {f"evol-{i:06d}": t for i, t in _seed_texts(tmp_path).items()}
        _check_chain(out, seeds, first_run + asked)


def _seed_texts(tmp: Path) -> dict[int, str]:
    out = {}
    for i, line in enumerate((tmp / "dolly.jsonl").read_text().splitlines()):
        r = json.loads(line)
        out[i] = f"{r['instruction']}\n\n{r['context']}" if r["context"] else r["instruction"]
    return out


def test_lineages_chain_under_a_teacher_fault_mix(tmp_path):
    """Finding 5 under 10% 429, 10% 503 and 5% hangs: every committed row evolved its parent."""
    with LLMTestServer(script=evolving_script(), api_key="test-key", rates={"429": 0.1, "503": 0.1, "hang": 0.05},
                       retry_after=None, hang_s=1.5, seed=7) as srv:
        recipe = scripted_recipe(tmp_path, srv.url, **{
            "seeds.dolly": {"path": str(dolly_file(tmp_path))},
            "generation.evol.seeds": 12, "generation.evol.rounds": 3, "teacher.max_retries": 8,
            "teacher.timeout_s": 0.5, "judge.timeout_s": 0.5, "judge.max_retries": 8,
        })
        run = tmp_path / "run"
        res = bezoar("stage", "generate-evol", "--recipe", str(recipe), "--run", str(run), timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert any(c.status in (429, 503) for c in srv.calls) and any(c.fault == "hang" for c in srv.calls)
        out = rows(run / "generate-evol" / "data" / "train.jsonl")
        assert {r["epoch"] for r in out} == {1, 2, 3}
        seeds = {f"evol-{i:06d}": t for i, t in _seed_texts(tmp_path).items()}
        _check_chain(out, seeds, _evolve_calls(srv))


# ---------------------------------------------------------------------------------------------
# Orca
# ---------------------------------------------------------------------------------------------
SUBS = ["CoT", "NIv2", "T0", "Flan2021"]


def flan_file(tmp: Path, n: int, long_every: int = 0, broken_tail: bool = False) -> Path:
    """A Flan-format file: four sub-mixes, zero- and few-shot templates; every ``long_every``-th row
    has a long input (too long for a small teacher context)."""
    path = tmp / "flan.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            words = 200 if long_every and i % long_every == 0 else 6
            template = ["zs_opt", "zs_noopt", "fs_opt", "fs_noopt"][(i // 4) % 4]
            # some option templates list their options, as Flan's do for the tasks that have them
            options = f"\nOPTIONS:\n- gold answer {i}\n- another answer" if template.endswith("_opt") and i % 3 else ""
            f.write(json.dumps({
                "inputs": f"Question {i} of {SUBS[i % 4]}: " + " ".join(f"w{j}" for j in range(words)) + options,
                "targets": f"gold answer {i}",
                "task_source": SUBS[i % 4], "task_name": f"task{i % 7}",
                "template_type": template,
            }) + "\n")
        if broken_tail:
            f.write("{this line is not json\n")
    return path


def test_orca_samples_submixes_zero_shot_and_shows_the_gold_target_as_the_recipe_says(tmp_path):
    """Finding 6: gold target to the teacher (show_gold_target) and to the judge (judge_sees_target),
    dataset_source is the sub-mix, zero-shot templates only, sub-mix proportions from the recipe."""
    with LLMTestServer(script=scripted_answer, api_key="test-key") as srv:
        recipe = scripted_recipe(tmp_path, srv.url, **{
            "seeds.flan": {"path": str(flan_file(tmp_path, 400))},
            "generation.orca.seeds": 20,
            "generation.orca.submix_weights": {"cot": 1, "niv2": 1, "t0": 3, "flan2021": 5},
            "generation.orca.show_gold_target": True,
        })
        run = tmp_path / "run"
        res = bezoar("run", "--recipe", str(recipe), "--run", str(run), "--only", "generate-orca", "filter-orca")
        assert res.returncode == 0, res.stderr[-3000:]
        out = rows(run / "generate-orca" / "data" / "train.jsonl")
        assert {s: sum(r["dataset_source"] == s for r in out) for s in ("cot", "niv2", "t0", "flan2021")} == {
            "cot": 2, "niv2": 2, "t0": 6, "flan2021": 10}
        assert all(r["template_type"] in ("zs_opt", "zs_noopt") for r in out)
        teacher = [c.prompt for c in srv.calls if c.route == "tgi"]
        n_mc = 0
        for r in out:
            asked = next(p for p in teacher if r["inputs"] in p)
            assert r["targets"] in asked  # the teacher saw the gold target
            if r["system_message"]:
                # the system text comes first, then a blank line, then the task: never glued together
                assert asked.startswith(f"<|prompt|>{r['system_message']}\n\n{r['inputs']}")
            # multiple choice: a Flan 2021 zs_opt row whose prompt lists options (orca.is_multiple_choice)
            mc = r["dataset_source"] == "flan2021" and r["template_type"] == "zs_opt" and "OPTIONS:" in r["inputs"]
            assert (r["system_message_id"] in (8, 10)) == mc
            n_mc += mc
        assert 0 < n_mc < sum(r["dataset_source"] == "flan2021" for r in out)  # both kinds of Flan 2021 row
        judged = [c.prompt for c in srv.calls if c.route == "chat/completions"]
        for r in out:
            assert any(r["inputs"] in p and f"Reference answer from the dataset: {r['targets']}" in p for p in judged)
        m = read_manifest(open_store(run), "generate-orca")
        assert m["counts"]["by_submix"] == {"cot": 2, "niv2": 2, "t0": 6, "flan2021": 10}


def test_orca_skips_rows_too_long_for_the_teachers_context_instead_of_sending_them(tmp_path):
    """Finding 7: an over-long row was refused with HTTP 422 on every retry until the stage failed.
    The teacher's tokenizer (one token per word, as the server counts) measures each candidate."""
    tok = build_word_tokenizer(tmp_path / "tok")
    with LLMTestServer(script=scripted_answer, api_key="test-key", context_tokens=150) as srv:
        recipe = scripted_recipe(tmp_path, srv.url, **{
            "seeds.flan": {"path": str(flan_file(tmp_path, 400, long_every=3))},
            "generation.orca.seeds": 24,
            "teacher.context_tokens": 150, "teacher.tokenizer": str(tok),
        })
        run = tmp_path / "run"
        res = bezoar("stage", "generate-orca", "--recipe", str(recipe), "--run", str(run))
        assert res.returncode == 0, res.stderr[-3000:]
        assert srv.calls and not [c for c in srv.calls if c.status == 422]
        m = read_manifest(open_store(run), "generate-orca")
        assert m["counts"]["rows"] == 24 and m["counts"]["seeds_too_long"] > 0
        sampling = json.loads((run / "generate-orca" / "data" / "README.md").read_text().split("```json")[1]
                              .split("```")[0])["sampling"]
        assert sampling["too_long_for_teacher"] == m["counts"]["seeds_too_long"]
        assert sampling["length_checked"] < sampling["rows_scanned"]  # only candidates were tokenized
    # without the guard the same rows are sent and refused (what the stage did before)
    with LLMTestServer(script=scripted_answer, api_key="test-key", context_tokens=150) as srv:
        recipe = scripted_recipe(tmp_path, srv.url, **{
            "seeds.flan": {"path": str(flan_file(tmp_path, 400, long_every=3))},
            "generation.orca.seeds": 24, "teacher.max_retries": 0,
        })
        res = bezoar("stage", "generate-orca", "--recipe", str(recipe), "--run", str(tmp_path / "run2"))
        assert [c for c in srv.calls if c.status == 422]


def test_orca_streams_the_collection_and_says_when_a_submix_is_short(tmp_path):
    """Finding 7 and 12: a shuffle-buffer sample stops reading once full (a broken tail is never
    reached); a reservoir reads every row (and names the broken line); asking more than a sub-mix
    holds is counted and said, not silently capped."""
    path = flan_file(tmp_path, 4000, broken_tail=True)
    with LLMTestServer(script=scripted_answer, api_key="test-key") as srv:
        base = {"seeds.flan": {"path": str(path)}, "generation.orca.seeds": 12}
        buffered = scripted_recipe(tmp_path, srv.url, **base, **{"generation.orca.sampling": "shuffle_buffer",
                                                                 "generation.orca.shuffle_buffer_size": 50})
        res = bezoar("stage", "generate-orca", "--recipe", str(buffered), "--run", str(tmp_path / "a"))
        assert res.returncode == 0, res.stderr[-3000:]
        reservoir = scripted_recipe(tmp_path, srv.url, **base)
        res = bezoar("stage", "generate-orca", "--recipe", str(reservoir), "--run", str(tmp_path / "b"))
        assert res.returncode == 2 and f"{path}:4001: not valid JSON" in res.stderr
        # the demo's seed file holds 10 rows per sub-mix (6-10 zero-shot): 40 seeds cannot be met
        short = scripted_recipe(tmp_path, srv.url, **{"generation.orca.seeds": 48})
        res = bezoar("stage", "generate-orca", "--recipe", str(short), "--run", str(tmp_path / "c"))
        assert res.returncode == 0, res.stderr[-3000:]
        assert "fewer eligible rows than asked" in res.stderr
        m = read_manifest(open_store(tmp_path / "c"), "generate-orca")
        assert m["counts"]["seeds_asked"] == 48 and m["counts"]["seeds"] == 40


def test_the_same_sample_through_the_hub_streaming_path(tmp_path):
    """Finding 7: the hub path (datasets streaming, here the json builder over a local file) and the
    file path give the same sample: keys come from the rows' content, not their order or source."""
    path = flan_file(tmp_path, 600)
    samples = []
    with LLMTestServer(script=scripted_answer, api_key="test-key") as srv:
        for i, src in enumerate(({"path": str(path)}, {"path": "json", "data_files": [str(path)]})):
            recipe = scripted_recipe(tmp_path, srv.url, **{"seeds.flan": src, "generation.orca.seeds": 16})
            run = tmp_path / f"run{i}"
            res = bezoar("stage", "generate-orca", "--recipe", str(recipe), "--run", str(run))
            assert res.returncode == 0, res.stderr[-3000:]
            samples.append(sorted(r["inputs"] for r in rows(run / "generate-orca" / "data" / "train.jsonl")))
    assert samples[0] == samples[1] and len(samples[0]) == 16


# ---------------------------------------------------------------------------------------------
# LaMini
# ---------------------------------------------------------------------------------------------
def test_lamini_topics_proposed_by_the_teacher_when_no_file_is_given(tmp_path):
    """Finding 8: topic-guided generation works out of the box: the teacher proposes topics per
    dolly category (checked, deduplicated, committed), and the topic prompts use them."""
    with LLMTestServer(script=scripted_answer, api_key="test-key") as srv:
        recipe = scripted_recipe(tmp_path, srv.url, **{"generation.lamini.topics": None})
        run = tmp_path / "run"
        res = bezoar("stage", "generate-lamini", "--recipe", str(recipe), "--run", str(run))
        assert res.returncode == 0, res.stderr[-3000:]
        topics = rows(run / "generate-lamini" / "topics.jsonl")
        assert len(topics) >= 3 and len({t["topic"].lower() for t in topics}) == len(topics)
        assert all(1 <= len(t["topic"].split()) <= 3 and "sentence" not in t["topic"] for t in topics)
        cats = {"open_qa", "general_qa", "brainstorming", "creative_writing", "classification", "closed_qa",
                "information_extraction", "summarization"}
        assert {t["category"] for t in topics} <= cats and len({t["category"] for t in topics}) >= 4
        asked = [c.prompt for c in srv.calls if "<topic>" in c.prompt]
        assert len(asked) == 8  # one per category
        names = {t["topic"] for t in topics}
        topic_prompts = [c.prompt for c in srv.calls if "each one about one of these subjects" in c.prompt]
        assert topic_prompts and all(any(n in p for n in names) for p in topic_prompts)
        m = read_manifest(open_store(run), "generate-lamini")
        assert m["counts"]["topics_source"] == "teacher" and "topics.jsonl" in m["files"]
