"""Parsers that face a teacher's or judge's free text."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from bezoar_jobs.recipe import EvolConfig
from bezoar_jobs.schemes.evol import clean_evolved, eliminate, parse_equal
from bezoar_jobs.schemes.lamini import parse_instructions
from bezoar_jobs.schemes.orca import choose_system_message, is_multiple_choice
from bezoar_jobs.stages.filter import decide, parse_verdict


def test_lamini_tags():
    text = "Sure!\n<example>Name three rivers in Africa.</example>\n<example>Write a limerick about a cat</example>"
    assert parse_instructions(text) == ["Name three rivers in Africa.", "Write a limerick about a cat"]


def test_lamini_numbered_and_bulleted_lists():
    text = (
        "Here you go:\n1. Explain how rainbows form.\n2) List four kinds of clouds\n- Why do cats purr at night?\n* ok"
    )
    assert parse_instructions(text) == [
        "Explain how rainbows form.",
        "List four kinds of clouds",
        "Why do cats purr at night?",
    ]


def test_lamini_unclosed_tags_and_labels():
    text = "<example>Task 1: Describe the water cycle briefly<example>Instruction: Plan a picnic for ten friends"
    assert parse_instructions(text) == ["Describe the water cycle briefly", "Plan a picnic for ten friends"]


def test_lamini_drops_too_short_and_headers():
    assert parse_instructions("<example>Hi</example><example>Tasks:</example>") == []


def test_verdict_json_first():
    v = parse_verdict('Verdict: {"status": "pass", "rating": 8, "reason": "good"} thanks')
    assert v == {"status": "pass", "rating": 8.0, "reason": "good"}


def test_verdict_tolerant_json():
    v = parse_verdict("{'status': 'fail', 'rating': '4', 'reason': 'wrong',}")
    assert v == {"status": "fail", "rating": 4.0, "reason": "wrong"}


def test_verdict_fallbacks():
    assert parse_verdict("I would give it 7/10, a pass.")["rating"] == 7.0
    assert parse_verdict("Rating: 9. Pass.")["status"] == "pass"
    assert parse_verdict("[[3]] fail")["rating"] == 3.0
    assert parse_verdict("no idea") is None
    assert parse_verdict('{"rating": 42}') is None  # out of range is not a rating


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_verdict_never_crashes_and_is_in_range(text):
    v = parse_verdict(text)
    assert v is None or 1.0 <= v["rating"] <= 10.0


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 10), st.sampled_from(["pass", "fail"]), st.text(max_size=40), st.text(max_size=40))
def test_verdict_roundtrip_inside_noise(rating, status, before, after):
    blob = json.dumps({"status": status, "rating": rating, "reason": "r"})
    v = parse_verdict(before.replace("{", "").replace("}", "") + blob + after.replace("{", "").replace("}", ""))
    assert v is not None and v["rating"] == rating and v["status"] == status


def test_decide_threshold_and_status():
    assert decide({"rating": 7, "status": "pass"}, 7, True)
    assert not decide({"rating": 9, "status": "fail"}, 7, True)
    assert decide({"rating": 9, "status": "fail"}, 7, False)
    assert not decide({"rating": 6.9, "status": "pass"}, 7, True)


def test_evol_elimination_rules():
    cfg = EvolConfig()
    orig = "Name a fruit."
    assert (
        eliminate(
            cfg, orig, "Name a red fruit that grows on trees.", "An apple is a red fruit that grows on trees.", False
        )
        is None
    )
    assert eliminate(cfg, orig, "Name a fruit please.", "Apple.", True).startswith("rule 1")
    assert eliminate(cfg, orig, "Name a rare fruit.", "Sorry, I cannot help with that.", False).startswith("rule 2")
    assert eliminate(cfg, orig, "Name a rare fruit.", "it is. the, a!", False).startswith("rule 3")
    assert eliminate(cfg, orig, "#Rewritten Prompt# name a fruit", "Apple is one.", False).startswith("rule 4")
    long_sorry = "Sorry to say " + "word " * 90
    assert eliminate(cfg, orig, "Name a rare fruit.", long_sorry, False) is None


def test_evol_cleaning_and_equality_parse():
    assert clean_evolved('New task: "Explain tides."\n\nTides are ...') == "Explain tides."
    assert parse_equal("Different") is False
    assert parse_equal("They are not equal.") is False
    assert parse_equal("Equal") is True
    assert parse_equal("hmm") is None


def test_orca_system_message_rules():
    """Multiple-choice messages are drawn only for Flan 2021 rows that show their options (Orca's
    mapping); a T0 or NIv2 row with options draws from its own sub-mix's messages."""
    import random

    msgs = [
        {"id": 1, "text": "cot-step", "submixes": ["cot"]},
        {"id": 2, "text": "mc-first", "submixes": ["flan2021_mc"]},
        {"id": 3, "text": "detailed", "submixes": ["t0", "flan2021"]},
        {"id": 4, "text": "teacher", "submixes": ["niv2"]},
    ]
    rng = random.Random(0)
    t0_opt = {"inputs": "Pick one.\nOptions:\n- a\n- b", "task_source": "T0", "template_type": "zs_opt"}
    assert not is_multiple_choice(t0_opt)
    assert {choose_system_message(msgs, t0_opt, rng)["text"] for _ in range(20)} == {"detailed"}
    flan_opt = {"inputs": "Pick one.\nOPTIONS:\n- a\n- b", "task_source": "Flan2021", "template_type": "zs_opt"}
    assert is_multiple_choice(flan_opt)
    assert {choose_system_message(msgs, flan_opt, rng)["text"] for _ in range(20)} == {"mc-first"}
    plain = {"inputs": "Summarize this.", "task_source": "flan2021", "template_type": "zs_noopt"}
    assert not is_multiple_choice(plain)
    assert {choose_system_message(msgs, plain, rng)["text"] for _ in range(20)} == {"detailed"}
    niv2 = {"inputs": "x\nOptions: a, b", "task_source": "NIv2", "template_type": "zs_opt"}
    assert not is_multiple_choice(niv2)
    assert {choose_system_message(msgs, niv2, rng)["text"] for _ in range(10)} == {"teacher"}
