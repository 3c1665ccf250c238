"""Evol-Instruct checked against WizardLM (arXiv 2304.12244 and nlpxucan/WizardLM Evol_Instruct/):
defects found by the audit, each shown failing on the code before its fix."""

from __future__ import annotations

import json

from bezoar_jobs.data.io import load_template
from bezoar_jobs.manifest import read_manifest
from bezoar_jobs.recipe import EvolConfig
from bezoar_jobs.schemes import evol
from bezoar_jobs.schemes.evol import eliminate, leaked, parse_equal, template_labels
from tests.llm_server import LLMTestServer
from tests.scripted import scripted_answer, scripted_recipe

EVOL_DIR = "pkg://bezoar_jobs/templates/evol"
PASSAGE = "The Nile flows north through eleven countries and ends in a wide delta on the Mediterranean Sea."


def _labels() -> tuple[str, ...]:
    ops = ("constraints", "deepen", "concretize", "reasoning", "complicate_input", "breadth")
    return template_labels([load_template(f"{EVOL_DIR}/{op}.txt", op, ("instruction",)) for op in ops])


def test_rule_4_ignores_words_the_evolved_instruction_already_had():
    """Rule 4 (WizardLM: the evolution copies words *from the evolving prompt*). A dolly task whose own
    text holds one of our leak phrases ("the task below", "original task") had every evolution of
    its lineage eliminated, though nothing was copied from our prompt."""
    cfg, labels = EvolConfig(), _labels()
    original = f"Read the text and answer the task below: which sea does the river end in?\n\n{PASSAGE}"
    evolved = (f"Read the text and answer the task below: which sea does the river end in, and through how "
               f"many countries does it flow first?\n\n{PASSAGE}")
    assert eliminate(cfg, original, evolved, "It ends in the Mediterranean, after eleven countries.", False,
                     labels) is None
    assert leaked(cfg, evolved, labels, original) is None
    # a phrase the evolution adds is still a leak, even where the original had it once already
    twice = evolved.replace("which sea", "(as the task below says) which sea")
    assert leaked(cfg, twice, labels, original) == "the task below"
    # so is one of our templates' labels the evolution copied, and everything without an original
    label = eliminate(cfg, original, evolved + "\nNew task: list the countries.", "Egypt and Sudan.", False, labels)
    assert label is not None and label.startswith("rule 4")
    assert leaked(cfg, evolved, labels) == "the task below"


def test_equality_verdict_with_a_negated_equal_word_is_different():
    """Rule 1: "Not identical" / "not equivalent" were read as Equal (the evolution eliminated)."""
    assert parse_equal("Not identical.") is False
    assert parse_equal("They are not equivalent") is False
    assert parse_equal("Not Equal") is False  # WizardLM's own answer word
    assert parse_equal("Different") is False
    assert parse_equal("Equal") is True
    assert parse_equal("Identical") is True
    assert parse_equal("The same.") is True
    assert parse_equal("I cannot tell") is None


def _script(prompt: str) -> str:
    """In-breadth: a new task without the seed's passage. In-depth: the task's first line with a
    requirement more, the passage dropped (so a put-back shows)."""
    p = prompt.rstrip()
    if p.endswith("Invented task:<|endoftext|><|answer|>"):
        return "Invented task: Write a four-line poem about a mountain lake at dawn."
    if p.endswith("New task:<|endoftext|><|answer|>"):
        task = p.rsplit("\nTask: ", 1)[1].split("\nNew task:", 1)[0]
        return "New task: " + task.split("\n\n", 1)[0].rstrip(".") + ", using no more than forty words."
    return scripted_answer(prompt)


def test_in_depth_step_after_a_kept_in_breadth_step_gets_no_stale_passage(tmp_path, monkeypatch):
    """A kept in-breadth evolution makes a new task without the seed's passage; the next in-depth
    evolution of it had the seed's dolly passage appended (keep_input compared with the seed's
    passage, not with the task being evolved), glueing an unrelated text onto the new task."""
    from bezoar_jobs import runner
    from bezoar_jobs.recipe import load_recipe
    from bezoar_jobs.store import open_store

    dolly = tmp_path / "dolly.jsonl"
    dolly.write_text(json.dumps({"instruction": "Which sea does the river in the text end in?", "context": PASSAGE,
                                 "response": "r", "category": "closed_qa"}) + "\n")
    picks = iter([("breadth", "in-breadth"), ("constraints", "in-depth")])  # round 1, round 2 (one lineage)
    monkeypatch.setattr(evol, "choose_operation", lambda cfg, rng: next(picks))
    monkeypatch.setenv("SCRIPTED_JUDGE_KEY", "test-key")
    with LLMTestServer(script=_script, api_key="test-key") as srv:
        path = scripted_recipe(tmp_path, srv.url, **{"seeds.dolly": {"path": str(dolly)},
                                                      "generation.evol.seeds": 1, "generation.evol.rounds": 2})
        recipe, _ = load_recipe(path)
        store = open_store(tmp_path / "run")
        assert runner.run_stage("generate-evol", recipe, store) == 0
    out = [json.loads(x) for x in (tmp_path / "run" / "generate-evol" / "data" / "train.jsonl").read_text().splitlines()
           if x.strip()]
    by_epoch = {r["epoch"]: r for r in out}
    assert by_epoch[1]["evolution_strategy"] == "in-breadth"
    assert by_epoch[1]["instruction"] == "Write a four-line poem about a mountain lake at dawn."
    assert by_epoch[2]["evolution_strategy"] == "in-depth"
    assert by_epoch[2]["parent_id"] == by_epoch[1]["id"]
    poem = "Write a four-line poem about a mountain lake at dawn"
    assert by_epoch[2]["instruction"] == f"{poem}, using no more than forty words."
    assert PASSAGE not in by_epoch[2]["instruction"]
    assert read_manifest(store, "generate-evol")["counts"]["input_restored"] == 0
