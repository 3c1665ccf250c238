"""Audit of the LaMini and Orca schemes against their papers and upstream code (docs/recipe.md):
Orca's multiple-choice system messages go to Flan 2021 rows that list options, not to every ``zs_opt``
row; the LaMini topic proposals ask for the word limit the recipe checks."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from bezoar_jobs.data.io import load_rows
from bezoar_jobs.recipe import LaminiConfig
from bezoar_jobs.recipe_base import DatasetSource
from bezoar_jobs.schemes.lamini import parse_topics, topic_requests
from bezoar_jobs.schemes.orca import choose_system_message, is_multiple_choice, pool_key


def _messages() -> list[dict]:
    src = DatasetSource(path="pkg://bezoar_jobs/templates/orca_system_messages.jsonl")
    return load_rows(src, ("id", "text", "submixes"))


def _flan(inputs: str, targets: str, template_type: str = "zs_opt") -> dict:
    return {"inputs": inputs, "targets": targets, "task_source": "Flan2021", "task_name": "demo",
            "template_type": template_type}


# Flan 2021 registers every task under zs_opt (google-research/FLAN flan/v2/tasks.py), translation and
# summarisation included; only tasks with options show any, in the formats of flan/v2/preprocessors.py
# (format_options: "OPTIONS:\n- ...") and templates.py (OPT_START_STRING_CANDIDATES, the empty header
# included, and item markers such as " (i) ", "\nB). ", "\n - ").
NOT_MC = [
    _flan("Translate \"The house is big.\" to German.", "Das Haus ist gross."),
    _flan("Summarize this article: The city opened a new cycle lane along the river on Monday.",
          "New riverside cycle lane opens."),
    _flan("Read this: He was born in 1964. He moved to Paris in 2010.\nWhen did he move to Paris?", "2010"),
    _flan("Write a sentence about the weather. The sky ended. The rain came later.", "The rain came later"),
    _flan("Is it raining?\nOPTIONS:\n- yes\n- no", "no", "zs_noopt"),  # noopt never shows options
]
MC = [
    _flan("Does the premise entail the hypothesis?\nOPTIONS:\n- yes\n- it is not possible to tell\n- no", "no"),
    _flan("Premise: x. Hypothesis: y.\nPossible answers:\n (i) yes\n (ii) no", "(ii) no"),
    _flan("What is the sentiment of this review? Great film.\nPick your answer from: + negative + positive",
          "positive"),
    _flan("Which word fits? The cat ___ on the mat.\n - sat\n - sky\n - seven", "sat"),  # Flan's empty header
    _flan("Choose the best ending. He opened the fridge\n(A). to take milk (B). to fly", "(A)."),  # label answer
    _flan("Is the statement true?\nOPTIONS:\n- yes\n- no", "yes", ""),  # no template type: the text decides
]


@pytest.mark.parametrize("row", NOT_MC)
def test_flan2021_rows_without_listed_options_do_not_get_multiple_choice_messages(row):
    """Finding: every Flan 2021 zs_opt row (translation, summarisation, extractive QA) got Orca's messages 8
    and 10, which Orca samples only for multiple-choice questions."""
    assert not is_multiple_choice(row)
    assert pool_key(row) == "flan2021"
    rng = random.Random(1)
    assert {choose_system_message(_messages(), row, rng)["id"] for _ in range(200)} == {3, 4, 7}


@pytest.mark.parametrize("row", MC)
def test_flan2021_rows_that_list_options_get_the_multiple_choice_messages(row):
    assert is_multiple_choice(row)
    assert pool_key(row) == "flan2021_mc"
    rng = random.Random(1)
    assert {choose_system_message(_messages(), row, rng)["id"] for _ in range(200)} == {8, 10}


def test_options_count_only_in_flan2021():
    from bezoar_jobs.schemes.orca import shows_options

    t0 = {**MC[0], "task_source": "T0"}
    assert not is_multiple_choice(t0) and pool_key(t0) == "t0"
    assert shows_options(MC[0]["inputs"]) and not shows_options(NOT_MC[0]["inputs"], NOT_MC[0]["targets"])


def _topic_ctx(cfg: LaminiConfig) -> SimpleNamespace:
    recipe = SimpleNamespace(seed=7, generation=SimpleNamespace(lamini=cfg))
    return SimpleNamespace(name="generate-lamini", recipe=recipe)


@pytest.mark.parametrize("max_words", [1, 2, 3])
def test_topic_proposals_ask_for_the_word_limit_the_recipe_checks(max_words):
    """Finding: the proposal prompt always said "one to three words" while parse_topics drops topics longer
    than generation.lamini.topic_max_words (LaMini kept Wikipedia categories of under three words): with
    topic_max_words 2 the teacher was asked for three-word topics that were then thrown away."""
    cfg = LaminiConfig(topic_max_words=max_words, topics_per_category=5)
    seeds = [{"instruction": f"Tell me about thing number {i}", "category": c}
             for i, c in enumerate(["open_qa", "open_qa", "open_qa", "brainstorming", "brainstorming"])]
    items, by_cat = topic_requests(_topic_ctx(cfg), seeds)
    assert sorted(by_cat) == ["brainstorming", "open_qa"] and len(items) == 2
    for req, _ in items:
        assert f"at most {max_words} words" in req.user and "three words" not in req.user
        assert "{" not in req.user  # every placeholder filled
    # what the prompt asks is what the check keeps
    assert parse_topics("<topic>Deep sea fishing</topic><topic>Chess</topic>", max_words) == (
        ["Deep sea fishing", "Chess"] if max_words >= 3 else ["Chess"])


def test_a_messages_file_without_a_multiple_choice_pool_is_refused_before_any_request(tmp_path):
    """A user's messages file with nothing mapped to flan2021_mc failed only when the first multiple-choice row
    drew its message, after the whole sampling pass over the Flan stream."""
    import json as _json

    from tests.llm_server import LLMTestServer
    from tests.scripted import scripted_answer, scripted_recipe
    from tests.test_losses import bezoar

    src = Path(__file__).resolve().parents[1] / "bezoar_jobs" / "templates" / "orca_system_messages.jsonl"
    mine = tmp_path / "messages.jsonl"
    rows = [_json.loads(x) for x in src.read_text().splitlines() if x.strip()]
    mine.write_text("".join(_json.dumps({**m, "submixes": [s for s in m["submixes"] if s != "flan2021_mc"]}) + "\n"
                            for m in rows))
    with LLMTestServer(script=scripted_answer, api_key="test-key") as srv:
        recipe = scripted_recipe(tmp_path, srv.url, **{"generation.orca.system_messages": {"path": str(mine)}})
        res = bezoar("stage", "generate-orca", "--recipe", str(recipe), "--run", str(tmp_path / "run"))
        assert res.returncode == 2, res.stderr[-2000:]
        assert "no message is mapped to sub-mix 'flan2021_mc'" in res.stderr
        assert not srv.calls
