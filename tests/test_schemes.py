"""The schemes' own rules, as the Evol-Instruct, Orca and LaMini papers state them (docs/recipe.md),
without a server: templates, cleaning, elimination, the operation mix, Orca's system messages and
their mapping, sampling per sub-mix, topic parsing, the plan's figures."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import yaml

from bezoar_jobs.data.io import load_rows, load_template, stream_rows
from bezoar_jobs.data.sampling import SampleStats, allocate, bottom_k, first_k, shuffled
from bezoar_jobs.errors import BadInput
from bezoar_jobs.recipe import EvolConfig, load_recipe
from bezoar_jobs.recipe_base import DatasetSource
from bezoar_jobs.schemes.evol import (
    choose_operation,
    clean_evolved,
    eliminate,
    keep_input,
    leaked,
    template_labels,
)
from bezoar_jobs.schemes.lamini import parse_topics
from bezoar_jobs.schemes.orca import choose_system_message, is_multiple_choice, pool_key, submix

REPO = Path(__file__).resolve().parents[1]
EVOL_DIR = "pkg://bezoar_jobs/templates/evol"
DEPTH = ("constraints", "deepen", "concretize", "reasoning", "complicate_input")
PASSAGE = ("The Nile flows north through eleven countries. It is about 6,650 km long and ends in a delta on "
           "the Mediterranean Sea.")


def _templates() -> dict[str, str]:
    return {op: load_template(f"{EVOL_DIR}/{op}.txt", op, ("instruction",)) for op in (*DEPTH, "breadth")}


# ---------------------------------------------------------------------------------------------
# Evol-Instruct (WizardLM)
# ---------------------------------------------------------------------------------------------
def test_evolution_of_a_task_with_a_passage_keeps_the_passage():
    """Finding 2: the old cleaning kept the first paragraph only, so a dolly task lost its passage."""
    labels = template_labels(list(_templates().values()))
    answer = f"New task: Summarize the text in two sentences, naming every country it mentions.\n\n{PASSAGE}"
    got = clean_evolved(answer, labels, keep_paragraphs=True)
    assert got == f"Summarize the text in two sentences, naming every country it mentions.\n\n{PASSAGE}"
    # a model that answers after its rewrite: the answer goes, the passage stays
    got = clean_evolved(answer + "\n\nAnswer: The Nile flows north.", labels, keep_paragraphs=True)
    assert got.endswith(PASSAGE)
    # a rewrite that dropped the passage gets it back (in-depth must keep the input)
    dropped = "Summarize the text in two sentences, naming every country it mentions."
    assert keep_input(dropped, PASSAGE, "in-depth") == (f"{dropped}\n\n{PASSAGE}", True)
    assert keep_input(got, PASSAGE, "in-depth") == (got, False)
    assert keep_input(dropped, PASSAGE, "in-breadth") == (dropped, False)  # a new task: left alone
    # a task without input: what follows the first paragraph is the model answering it
    assert clean_evolved('New task: "Explain tides."\n\nTides are ...') == "Explain tides."


def test_in_depth_templates_ask_to_keep_the_input_and_not_to_mention_the_rewrite():
    """Finding 2 (WizardLM's in-depth prompts: keep the given input; the rewrite must not mention itself)."""
    t = _templates()
    for op in DEPTH:
        text = " ".join(t[op].split())
        assert "word for word" in text, op
        assert "Do not say that the task was changed" in text, op
    assert "Do not refer to the task below" in " ".join(t["breadth"].split())


def test_rule_4_checks_the_words_of_our_own_templates():
    """Finding 3: leak_phrases were WizardLM's markers only, and a 'New task:' after the start was kept."""
    labels = template_labels(list(_templates().values()))
    assert {"Task:", "New task:", "Invented task:"} <= set(labels)
    cfg = EvolConfig()
    orig = "Summarize the text."
    kept = eliminate(cfg, orig, "Summarize the text in one line.", "A short summary of it.", False, labels)
    assert kept is None
    leak = eliminate(cfg, orig, "Summarize the text. New task: do X", "Done.", False, labels)
    assert leak is not None and leak.startswith("rule 4")
    given = eliminate(cfg, orig, "Rewrite the given task for children.", "A version for kids.", False, labels)
    assert given is not None and given.startswith("rule 4")
    assert leaked(cfg, "Invented task: plan a trip", labels) == "invented task"
    assert leaked(cfg, "Your task: plan a trip to Rome in May", labels) is None  # a task may say "task"
    # the leading label is stripped, a later one is left for rule 4 to see
    assert clean_evolved("New task: Summarize the text. New task: do X", labels) == "Summarize the text. New task: do X"
    # WizardLM's own prompt files: their labels are found the same way
    wiz = "I want you act as a Prompt Rewriter.\n#The Given Prompt#:\n{instruction}\n#Rewritten Prompt#:\n"
    assert template_labels([wiz]) == ("#The Given Prompt#:", "#Rewritten Prompt#:")


def test_operations_are_drawn_uniformly_over_the_prompts_as_wizardlm():
    """Finding 4: WizardLM picks uniformly among its five prompts (in-depth 0.8), not 0.5/0.5."""
    cfg = EvolConfig()
    assert cfg.in_depth_weight is None
    rng = random.Random(1)
    draws = Counter(choose_operation(cfg, rng) for _ in range(20000))
    depth = sum(n for (op, s), n in draws.items() if s == "in-depth") / 20000
    assert depth == pytest.approx(0.8, abs=0.015)
    for op in (*cfg.depth_operations, "breadth"):
        assert sum(n for (o, _), n in draws.items() if o == op) / 20000 == pytest.approx(0.2, abs=0.015)
    # the paper's fifth in-depth operation exists and can be chosen
    five = EvolConfig(depth_operations=DEPTH)
    ops = Counter(choose_operation(five, rng)[0] for _ in range(6000))
    assert ops["complicate_input"] / 6000 == pytest.approx(1 / 6, abs=0.02)
    # an explicit weight still works
    half = EvolConfig(in_depth_weight=0.5)
    share = sum(choose_operation(half, rng)[1] == "in-depth" for _ in range(10000)) / 10000
    assert share == pytest.approx(0.5, abs=0.02)


# ---------------------------------------------------------------------------------------------
# Orca
# ---------------------------------------------------------------------------------------------
ORCA_MAP = {
    "cot": {6, 11, 16},
    "niv2": {1, 2, 5, 7, 9, 12, 13, 14, 15},
    "t0": {1, 2, 3, 5, 7},
    "flan2021": {3, 4, 7},
    "flan2021_mc": {8, 10},
}


def _messages() -> list[dict]:
    src = DatasetSource(path="pkg://bezoar_jobs/templates/orca_system_messages.jsonl")
    return load_rows(src, ("id", "text", "submixes"))


def test_orca_has_all_sixteen_system_messages_numbered_and_mapped_as_orca():
    """Finding 6: 13 of Orca's 16 (3, 12, 16 missing) plus three of our own, and a mapping that
    departed from Orca's."""
    msgs = _messages()
    assert [m["id"] for m in msgs] == list(range(1, 17))
    assert msgs[0]["text"] == ""  # Orca's first message is empty
    for key, ids in ORCA_MAP.items():
        assert {m["id"] for m in msgs if key in m["submixes"]} == ids, key
    by_id = {m["id"]: m["text"].lower() for m in msgs}
    assert "long answer" in by_id[3] and "step by step" in by_id[12] and "five-year-old" in by_id[4]
    assert by_id[16] == "you are an ai assistant that helps people find information."
    assert "multiple-choice" in by_id[8] and "multiple-choice" in by_id[10]


@pytest.mark.parametrize("row, pool", [
    ({"task_source": "Flan2021", "template_type": "zs_opt", "inputs": "x\nOPTIONS:\n- a"}, "flan2021_mc"),
    ({"task_source": "Flan2021", "template_type": "zs_noopt", "inputs": "x"}, "flan2021"),
    ({"task_source": "T0", "template_type": "zs_opt", "inputs": "x\nOptions:\n- a"}, "t0"),
    ({"task_source": "NIv2", "template_type": "zs_opt", "inputs": "x"}, "niv2"),
    ({"task_source": "CoT", "template_type": "zs_opt", "inputs": "x"}, "cot"),
])
def test_multiple_choice_messages_only_where_orca_uses_them(row, pool):
    """Finding 6: every *_opt row got multiple-choice messages, T0 and NIv2 included."""
    assert pool_key(row) == pool
    assert is_multiple_choice(row) == (pool == "flan2021_mc")
    rng = random.Random(0)
    drawn = {choose_system_message(_messages(), row, rng)["id"] for _ in range(300)}
    assert drawn == ORCA_MAP[pool]


def test_flan_task_sources_name_orcas_submixes():
    assert [submix({"task_source": s}) for s in ("Flan2021", "T0", "NIv2", "CoT", "flan", "P3")] == [
        "flan2021", "t0", "niv2", "cot", "flan2021", "t0"]


def test_orca_defaults_follow_orca():
    r, _ = load_recipe(REPO / "recipes" / "openbezoar.yaml")
    c = r.generation.orca
    total = sum(c.submix_weights.values())
    shares = {k: round(v / total, 3) for k, v in c.submix_weights.items()}
    assert shares == {"cot": 0.029, "niv2": 0.086, "t0": 0.393, "flan2021": 0.491}  # 150K/440K/2M/2.5M
    assert c.template_types == ("zs_opt", "zs_noopt")
    assert allocate(3600, dict(c.submix_weights)) == {"cot": 106, "niv2": 311, "t0": 1415, "flan2021": 1768}


# ---------------------------------------------------------------------------------------------
# streaming and sampling
# ---------------------------------------------------------------------------------------------
def _flan_rows(n: int) -> list[dict]:
    subs = ["CoT", "NIv2", "T0", "Flan2021"]
    return [{"inputs": f"task {i} of {subs[i % 4]}: answer the question number {i}", "targets": f"answer {i}",
             "task_source": subs[i % 4], "task_name": f"t{i % 13}",
             "template_type": ["zs_opt", "zs_noopt", "fs_opt", "fs_noopt"][(i // 4) % 4]} for i in range(n)]


def test_bottom_k_is_a_uniform_sample_independent_of_order_and_lazily_checked():
    rows = _flan_rows(4000)
    quotas = {"cot": 5, "niv2": 10, "t0": 20, "flan2021": 40}

    def key(r, g):
        return hash((g, r["inputs"])) & 0xFFFFFFFF

    checked = []

    def accept(r):
        checked.append(r["inputs"])
        return "7" not in r["inputs"]  # "too long"

    st = SampleStats()
    got = bottom_k(iter(rows), quotas, submix, key, lambda r: r["template_type"].startswith("zs"), accept, st)
    assert {g: len(v) for g, v in got.items()} == quotas
    assert all(r["template_type"].startswith("zs") and "7" not in r["inputs"] for v in got.values() for _, r in v)
    assert st.scanned == 4000 and st.filtered == 2000 and st.refused > 0
    # the costly check ran on the rows that would enter the sample only, not on all 2000 eligible
    assert len(checked) < 700
    # the same sample whatever the order of the stream
    again = bottom_k(iter(reversed(rows)), quotas, submix, key, lambda r: r["template_type"].startswith("zs"), accept)
    assert {g: [r["inputs"] for _, r in v] for g, v in got.items()} == {
        g: [r["inputs"] for _, r in v] for g, v in again.items()}
    # and it is exactly the smallest keys among the eligible rows
    elig = [r for r in rows if submix(r) == "t0" and r["template_type"].startswith("zs") and "7" not in r["inputs"]]
    assert [r["inputs"] for _, r in got["t0"]] == [r["inputs"] for r in sorted(elig, key=lambda r: key(r, "t0"))[:20]]


def test_shuffle_buffer_stops_once_every_submix_is_full():
    consumed = []

    def stream():
        for r in _flan_rows(100000):
            consumed.append(1)
            yield r

    got = first_k(shuffled(stream(), 200, seed=3), {"cot": 3, "t0": 3}, submix, lambda r, g: hash(r["inputs"]))
    assert {g: len(v) for g, v in got.items()} == {"cot": 3, "t0": 3}
    assert len(consumed) < 1000  # it did not read the collection


def test_stream_rows_reads_files_and_the_datasets_streaming_path_alike(tmp_path):
    """Finding 7: the same rows through our incremental reader and through
    datasets.load_dataset(..., streaming=True) (the hub path), one at a time."""
    path = tmp_path / "flan.jsonl"
    rows = _flan_rows(50)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    local = list(stream_rows(DatasetSource(path=str(path), limit=30), ("inputs",)))
    hub = stream_rows(DatasetSource(path="json", data_files=(str(path),), limit=30), ("inputs",))
    assert not isinstance(hub, list)  # a generator: nothing is read until asked
    assert [r["inputs"] for r in local] == [r["inputs"] for r in hub] == [r["inputs"] for r in rows[:30]]
    with pytest.raises(BadInput, match=r"row 1: missing field\(s\) 'nope'"):
        next(iter(stream_rows(DatasetSource(path="json", data_files=(str(path),)), ("nope",), "seeds.flan")))


# ---------------------------------------------------------------------------------------------
# LaMini topics
# ---------------------------------------------------------------------------------------------
def test_topics_are_parsed_and_checked():
    text = ("<topic>Astronomy</topic>\n<topic>Home cooking</topic>\n<topic>1. Job interviews</topic>\n"
            "<topic>This is a whole sentence about things.</topic>\n<topic>Hi!</topic>")
    assert parse_topics(text, 3) == ["Astronomy", "Home cooking", "Job interviews"]
    assert parse_topics("- Railways\n- Deep sea fishing boats\n- Chess", 3) == ["Railways", "Chess"]


def test_the_paper_recipe_has_no_placeholder_topic_source():
    """Finding 8: topics: s3://YOUR-BUCKET/... could not run as shipped."""
    text = (REPO / "recipes" / "openbezoar.yaml").read_text()
    assert "YOUR-BUCKET" not in text
    data = yaml.safe_load(text)
    assert data["generation"]["lamini"]["topics"] is None  # the teacher proposes them
    r, _ = load_recipe(REPO / "recipes" / "openbezoar.yaml")
    assert r.generation.lamini.topic_prompts > 0 and r.generation.lamini.topics is None
