"""Audit of the LLM-judge filter (stages/filter.py): verdicts read on the wrong scale or with the wrong
status. Each test failed on the code before its fix. (Verdicts saved for one text and read back for another:
tests/test_commit_audit.py, fixed in stages/common.work_key.)"""

from __future__ import annotations

import pytest

from bezoar_jobs.stages.filter import decide, parse_verdict

# ---- a number that is not a rating on the 1-10 scale is never read as one ------------------------


@pytest.mark.parametrize("text,rating", [
    ("Rating (1-10): 8. Pass.", 8.0),  # the scale note is not the rating (was 1)
    ("**Rating** [1-10]: 9", 9.0),
    ('{"status": "pass", "rating": "8/10", "reason": "good"}', 8.0),
    ("Rating: 3/10", 3.0),
    ("Rating: 7.5 out of 10", 7.5),
])
def test_a_scale_note_is_not_the_rating(text, rating):
    v = parse_verdict(text)
    assert v is not None and v["rating"] == rating


@pytest.mark.parametrize("text", [
    "Rating: 4/5",  # 4 on a 1-5 scale is not 4 on ours (was read as 4: rejected)
    "rating: 4 out of 5, pass",
    '{"status": "pass", "rating": "4/5", "reason": "good"}',
    'Rating: 1-10 scale, and the answer deserves it.',  # the range's start (was 1)
    # the rubric's own format line echoed back (was rating 1: a quiet rejection instead of a re-ask)
    '{"status": "pass" or "fail", "rating": <1-10>, "reason": "<one sentence>"}',
    '{"status": "pass", "rating": true, "reason": "good"}',  # a boolean is not a rating (was 1)
])
def test_a_rating_on_another_scale_or_a_range_is_unparseable(text):
    assert parse_verdict(text) is None


# ---- the status is the judge's, not a word found in its reason -----------------------------------


def test_a_brace_in_the_reason_does_not_lose_the_json_verdict():
    """A reason quoting code ("{}") cut the non-greedy "{...}" match short: the JSON was not read, and the
    fallback took status "fail" from "fails" in the reason, so a pass rated 9 was rejected."""
    text = '{"status": "pass", "rating": 9, "reason": "the dict literal {} is right and never fails"}'
    v = parse_verdict(text)
    assert v == {"status": "pass", "rating": 9.0, "reason": "the dict literal {} is right and never fails"}
    assert decide(v, 7, True)


@pytest.mark.parametrize("text,status", [
    # a verdict cut at max_new_tokens: its labelled status, not the "fails" of the reason (was fail)
    ('{"status": "pass", "rating": 8, "reason": "correct, though it fails to mention', "pass"),
    ("Status: pass. Rating: 8. It does not fail any part of the task.", "pass"),
    ("Verdict: FAIL. Rating: 8", "fail"),
    # "failure", "fails", "passage" are not verdicts (was fail)
    ("Rating: 8. It handles failure cases and quotes the passage well.", None),
    ("Pass/fail: pass. Rating: 9", None),  # both words and no label: the rating decides (was fail)
    ("Rating: 9. Pass.", "pass"),
    ("[[3]] fail", "fail"),
])
def test_status_from_free_text(text, status):
    v = parse_verdict(text)
    assert v is not None and v["status"] == status
    assert decide(v, 7, True) == (v["rating"] >= 7 and status != "fail")
