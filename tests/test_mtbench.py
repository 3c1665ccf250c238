"""MT-Bench: verdict parsing, aggregation, turn-2 prompts, question checks, and the eval-mtbench
stage end to end on the tiny model with (a) the in-process judge rating from token probabilities
and (b) an Anthropic-API judge on a real loopback HTTP server; bad input exits 2, an unreachable
judge is a retryable failure."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bezoar_jobs.cli import main as cli_main
from bezoar_jobs.errors import EXIT_BAD_INPUT, EXIT_RETRYABLE, BadInput
from bezoar_jobs.eval.judge_prompts import KINDS, load_judge_prompts
from bezoar_jobs.eval.mtbench import (
    Question,
    aggregate,
    answer_prompt,
    judge_input,
    load_questions,
    parse_question,
    parse_rating,
)
from bezoar_jobs.manifest import CommitInfo, commit, read_manifest
from bezoar_jobs.recipe import parse_recipe
from bezoar_jobs.store import open_store
from tests.llm_server import LLMTestServer
from tests.tiny_model import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
DEMO_QUESTIONS = "pkg://bezoar_jobs/demo_data/mtbench/questions.jsonl"
OUR_PROMPTS = "pkg://bezoar_jobs/templates/mtbench_judge.txt"


# ---------------------------------------------------------------------------------------------
# verdict parsing
# ---------------------------------------------------------------------------------------------
# text that cannot contain a bracketed number: any characters but '['
_no_bracket = st.text(alphabet=st.characters(blacklist_characters="[", blacklist_categories=("Cs",)), max_size=200)
_rating = st.one_of(
    st.integers(1, 10).map(str), st.builds(lambda a, b: f"{a}.{b}", st.integers(1, 9), st.integers(0, 9))
)


@settings(max_examples=300, deadline=None)
@given(before=_no_bracket, after=st.text(max_size=200), r=_rating)
@example(before="Rating: ", after="", r="10")
@example(before="The answer is fine.\n\nRating:", after=" (final)", r="7.5")
def test_double_brackets_win_wherever_they_are(before, after, r):
    """The first [[n]] is the verdict, whatever odd text surrounds it."""
    assert parse_rating(f"{before}[[{r}]]{after}") == float(r)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("[]0123456789. \nabcRating:")), max_size=80))
def test_any_reading_is_a_bracketed_number_on_the_scale(text):
    """On arbitrary bracket soup the result is None or a 1-10 number that FastChat's patterns find."""
    got = parse_rating(text)
    first = re.search(r"\[\[(\d+\.?\d*)\]\]", text) or re.search(r"\[(\d+\.?\d*)\]", text)
    if first is None:
        assert got is None
    elif 1.0 <= float(first.group(1)) <= 10.0:
        assert got == float(first.group(1))
    else:
        assert got is None  # off the scale: excluded like an unreadable verdict


@settings(max_examples=200, deadline=None)
@given(text=_no_bracket)
def test_no_brackets_means_no_score(text):
    assert parse_rating(text) is None


@pytest.mark.parametrize(("text", "expected"), [
    ("Rating: [[8]]", 8.0),
    ("Rating: [[8.5]]", 8.5),
    ("Rating: [[5.]]", 5.0),
    ("score [3] ... final verdict [[9]]", 9.0),  # [[n]] beats an earlier [n], as in FastChat
    ("Rating: [7]", 7.0),  # the single-bracket fallback
    ("[[4]] then [[6]]", 4.0),  # the first double-bracket match
    ("Rating: [[ 7 ]]", None),  # spaces: neither pattern matches
    ("Rating: 7/10", None),
    ("Rating: [[0]]", None),  # off the 1-10 scale
    ("Rating: [[11]]", None),
    ("Rating: [[07]]", 7.0),  # FastChat's literal_eval would crash here; a float reads it
    ("", None),
    ("[[-3]]", None),
])
def test_odd_verdicts(text, expected):
    assert parse_rating(text) == expected


# ---------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------
def test_aggregate_by_model_turn_and_category_excluding_unparseable():
    js = [
        {"model": "a", "category": "math", "turn": 1, "score": 8.0},
        {"model": "a", "category": "math", "turn": 2, "score": 4.0},
        {"model": "a", "category": "writing", "turn": 1, "score": 6.0},
        {"model": "a", "category": "writing", "turn": 2, "score": None},  # unparseable: excluded
        {"model": "a", "category": "coding", "turn": 1, "score": None},
        {"model": "b", "category": "math", "turn": 1, "score": 2.0},
        {"model": "b", "category": "math", "turn": 2, "score": 3.0},
    ]
    s = aggregate(js)
    a = s["a"]
    assert a["overall"] == pytest.approx(statistics.mean([8, 4, 6]))
    assert a["turns"] == {"1": pytest.approx(7.0), "2": pytest.approx(4.0)}
    assert a["categories"]["math"] == pytest.approx(6.0)
    assert a["categories"]["writing"] == pytest.approx(6.0)  # only the readable verdict counts
    assert a["categories"]["coding"] is None  # every verdict excluded: no score, but listed
    assert (a["judged"], a["excluded"], a["judgments"]) == (3, 2, 5)
    assert s["b"]["overall"] == pytest.approx(2.5)
    assert s["b"]["excluded"] == 0


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------
Q_MATH = Question(qid=7, category="math", turns=("What is 2+3?", "Now double it."), reference=("5", "10"), where="t:1")
Q_WRITE = Question(qid=8, category="writing", turns=("Write a haiku.", "Make it rhyme."), reference=(), where="t:2")


def test_turn2_judge_prompt_shows_the_conversation_and_references():
    prompts = load_judge_prompts(OUR_PROMPTS)
    p, text = judge_input(prompts, Q_MATH, ["It is 5.", "It is {10}."], 2, ("math", "reasoning", "coding"))
    assert p.kind == "turn2-ref"
    for part in ("What is 2+3?", "It is 5.", "Now double it.", "It is {10}.", "\n10\n"):
        assert part in text
    assert (
        text.index("What is 2+3?") < text.index("It is 5.") < text.index("Now double it.") < text.index("It is {10}.")
    )
    assert "{question_1}" not in text and "{answer_2}" not in text
    p1, text1 = judge_input(prompts, Q_MATH, ["It is 5.", "x"], 1, ("math",))
    assert p1.kind == "single-ref" and "It is 5." in text1 and "Now double it." not in text1
    p2, text2 = judge_input(prompts, Q_WRITE, ["a poem", "a rhyme"], 2, ("math",))
    assert p2.kind == "turn2" and "a poem" in text2 and "a rhyme" in text2
    assert "[[" in p.template  # the verdict format is asked for


def test_turn2_answer_prompt_carries_turn1_in_the_training_format():
    from bezoar_jobs.data.prompt_format import render_prompt

    p2 = answer_prompt(Q_MATH, 2, "It is 5.", None)
    assert p2 == render_prompt("Now double it.", history=[("What is 2+3?", "It is 5.")])
    assert p2.index("What is 2+3?") < p2.index("It is 5.") < p2.index("Now double it.")
    assert p2.endswith("### Response:\n")
    assert answer_prompt(Q_MATH, 1, None, None) == render_prompt("What is 2+3?")


def test_fastchat_judge_prompts_file_is_accepted(tmp_path):
    # our own words in FastChat's file layout (names, types, slots): the loader must take it
    lines = [
        {
            "name": "single-v1",
            "type": "single",
            "system_prompt": "S1",
            "prompt_template": "Q {question} A {answer} [[n]]",
            "description": "x",
            "category": "general",
            "output_format": "[[rating]]",
        },
        {
            "name": "single-math-v1",
            "type": "single",
            "system_prompt": "S2",
            "prompt_template": "Q {question} R {ref_answer_1} A {answer}",
            "output_format": "[[rating]]",
        },
        {
            "name": "single-v1-multi-turn",
            "type": "single",
            "system_prompt": "S3",
            "prompt_template": "{question_1} {answer_1} {question_2} {answer_2}",
            "output_format": "[[rating]]",
        },
        {
            "name": "single-math-v1-multi-turn",
            "type": "single",
            "system_prompt": "S4",
            "prompt_template": "{question_1} {ref_answer_1} {answer_1} {question_2} {ref_answer_2} {answer_2}",
            "output_format": "[[rating]]",
        },
        {
            "name": "pair-v2",
            "type": "pairwise",
            "system_prompt": "P",
            "prompt_template": "{question}",
            "output_format": "[[A]]",
        },
    ]
    f = tmp_path / "judge_prompts.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    prompts = load_judge_prompts(str(f))
    assert set(prompts.prompts) == set(KINDS)
    p, text = judge_input(prompts, Q_MATH, ["five", "ten"], 2, ("math",))
    assert p.name == "single-math-v1-multi-turn" and p.system == "S4"
    assert text == "What is 2+3? 5 five Now double it. 10 ten"
    lines[2]["prompt_template"] = "{question_1} {answer_1}"  # turn 2 without the second answer
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with pytest.raises(BadInput, match=r"single-v1-multi-turn.*\{question_2\}"):
        load_judge_prompts(str(f))
    # a broken line names the file and the line, as every JSON-lines file of the project does
    f.write_text(json.dumps(lines[0]) + "\n" + '{"name": "single-math-v1", "prompt_template": \n' + "[1, 2]\n")
    with pytest.raises(BadInput, match=r"judge_prompts.jsonl:2: not valid JSON \(.* at column \d+\)"):
        load_judge_prompts(str(f))
    f.write_text(json.dumps(lines[0]) + "\n[1, 2]\n")
    with pytest.raises(BadInput, match=r"judge_prompts.jsonl:2: each line must be a JSON object, got list"):
        load_judge_prompts(str(f))


def test_our_template_sections_are_checked(tmp_path):
    f = tmp_path / "judge.txt"
    f.write_text("@@ system\nS\n@@ single\n{question} {answer}\n@@ single-ref\n{question} {answer} {ref_answer_1}\n"
                 "@@ turn2\n{question_1} {answer_1} {question_2} {answer_2}\n@@ oops\nx\n")
    with pytest.raises(BadInput, match=r"judge.txt:9: unknown section '@@ oops'"):
        load_judge_prompts(str(f))


# ---------------------------------------------------------------------------------------------
# questions
# ---------------------------------------------------------------------------------------------
def test_demo_questions_are_valid_mtbench_format():
    cfg = parse_recipe((REPO / "recipes" / "demo.yaml").read_text()).evaluation.mtbench
    qs = load_questions(cfg)
    assert len(qs) >= 8
    assert {q.category for q in qs} >= {
        "writing",
        "roleplay",
        "reasoning",
        "math",
        "coding",
        "extraction",
        "stem",
        "humanities",
    }
    assert all(len(q.reference) == 2 for q in qs if q.category in ("math", "reasoning", "coding"))


def test_hub_column_names_are_understood():
    q = parse_question({"prompt_id": 81, "category": "writing", "prompt": ["a", "b"], "reference": []}, "hub: row 1")
    assert (q.qid, q.turns, q.reference) == (81, ("a", "b"), ())


def _mt_files(tmp: Path) -> tuple[Path, Path, Path]:
    """The hub copy's layout (hashed prompt_id, its own references), FastChat's question file (ids
    81-83) and FastChat's reference answers for those ids."""
    texts = [("math", "What is 7 times 6?"), ("coding", "Write a function that adds two numbers."),
             ("writing", "Write a postcard from Rome.")]
    hub = tmp / "hub.jsonl"
    hub.write_text("".join(json.dumps({"prompt_id": 1000 + 17 * i, "category": c, "prompt": [t, "And then?"],
                                       "reference": ["OLD-REF", "OLD-REF"] if c != "writing" else []}) + "\n"
                           for i, (c, t) in enumerate(texts)))
    fq = tmp / "question.jsonl"
    fq.write_text("".join(json.dumps({"question_id": 81 + i, "category": c, "turns": [t, "And then?"]}) + "\n"
                          for i, (c, t) in enumerate(texts)))
    fa = tmp / "gpt-4.jsonl"
    fa.write_text("".join(
        json.dumps({"question_id": 81 + i, "model_id": "gpt-4",
                    "choices": [{"index": 0, "turns": [f"REF-{81 + i}-1", f"REF-{81 + i}-2"]}]}) + "\n"
        for i, (c, _) in enumerate(texts) if c != "writing"))
    return hub, fq, fa


def _mt_cfg(**kw):
    from bezoar_jobs.recipe_eval import MTBenchConfig

    return MTBenchConfig.model_validate(kw)


def test_fastchat_references_are_matched_by_question_text_or_id_map_and_a_mismatch_is_an_error(tmp_path):
    """Finding 11: FastChat's reference_answer/gpt-4.jsonl (ids 81-160) matched against the hub
    questions' hashed ids found nothing, and the questions' own references were silently kept."""
    hub, fq, fa = _mt_files(tmp_path)
    with pytest.raises(BadInput, match=r"gpt-4.jsonl:1: the reference for question_id 81 matches none of the "
                                       r"questions by question_id \(2 of 2 references unmatched"):
        load_questions(_mt_cfg(questions={"path": str(hub)}, reference_answers={"path": str(fa)}))
    by_text = load_questions(_mt_cfg(questions={"path": str(hub)}, reference_answers={"path": str(fa)},
                                     reference_questions={"path": str(fq)}))
    assert [q.reference for q in by_text] == [("REF-81-1", "REF-81-2"), ("REF-82-1", "REF-82-2"), ()]
    by_map = load_questions(_mt_cfg(questions={"path": str(hub)}, reference_answers={"path": str(fa)},
                                    reference_id_map={"81": "1000", "82": "1017"}))
    assert [q.reference for q in by_map] == [q.reference for q in by_text]
    # a reference category question the file does not cover is an error, not a silent fallback
    only_math = tmp_path / "only-math.jsonl"
    only_math.write_text(fa.read_text().splitlines()[0] + "\n")
    with pytest.raises(BadInput, match=r"no reference answer for question 1017 \(coding"):
        load_questions(_mt_cfg(questions={"path": str(hub)}, reference_answers={"path": str(only_math)},
                               reference_id_map={"81": "1000"}))
    with pytest.raises(BadInput, match=r"question_id 99 is not in evaluation\.mtbench\.reference_questions"):
        extra = tmp_path / "extra.jsonl"
        extra.write_text(fa.read_text() + json.dumps({"question_id": 99, "choices": [{"turns": ["a", "b"]}]}) + "\n")
        load_questions(_mt_cfg(questions={"path": str(hub)}, reference_answers={"path": str(extra)},
                               reference_questions={"path": str(fq)}))


def test_the_paper_recipe_judges_with_fastchats_reference_answers_at_a_pinned_commit(tmp_path):
    """The paper recipe read the hub copy with its own references: question.jsonl's short human ones, not the
    GPT-4 answers FastChat's judge reads (reference_answer/gpt-4.jsonl), and none for coding question 123,
    which made every real eval-mtbench stop as bad input. It now reads FastChat's two files at one pinned
    commit; here local copies in their layout (raw GitHub URLs cannot be fetched offline)."""
    import re

    from bezoar_jobs.recipe import load_recipe

    cfg = load_recipe(str(REPO / "recipes" / "openbezoar.yaml"))[0].evaluation.mtbench
    assert cfg.questions.path == cfg.reference_answers.path == "json" and cfg.reference_questions is None
    (qurl,), (aurl,) = cfg.questions.data_files, cfg.reference_answers.data_files
    raw = r"https://raw\.githubusercontent\.com/lm-sys/FastChat/([0-9a-f]{40})/fastchat/llm_judge/data/mt_bench/"
    mq, ma = re.fullmatch(raw + "question.jsonl", qurl), re.fullmatch(raw + "reference_answer/gpt-4.jsonl", aurl)
    assert mq and ma and mq.group(1) == ma.group(1)  # one pinned commit
    # FastChat's layout: 123 (coding) has no reference of its own; the answers file has it
    questions = tmp_path / "question.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in (
        {"question_id": 81, "category": "writing", "turns": ["Write a postcard.", "Shorter."]},
        {"question_id": 111, "category": "math", "turns": ["7 x 6?", "And 7 x 7?"], "reference": ["42", "49"]},
        {"question_id": 123, "category": "coding", "turns": ["Write a joke site.", "Add CSS."]})))
    answers = tmp_path / "gpt-4.jsonl"
    answers.write_text("".join(json.dumps({"question_id": i, "model_id": "gpt-4", "choices": [
        {"index": 0, "turns": [f"GPT4-{i}-1", f"GPT4-{i}-2"]}]}) + "\n" for i in (111, 123)))
    local = cfg.model_copy(update={
        "questions": cfg.questions.model_copy(update={"data_files": (str(questions),)}),
        "reference_answers": cfg.reference_answers.model_copy(update={"data_files": (str(answers),)})})
    refs = {q.qid: q.reference for q in load_questions(local)}
    assert refs == {81: (), 111: ("GPT4-111-1", "GPT4-111-2"), 123: ("GPT4-123-1", "GPT4-123-2")}
    # the questions' own references alone (the old setting) stop at 123
    with pytest.raises(BadInput, match=r"question 123 \(coding\) needs a reference answer"):
        load_questions(local.model_copy(update={"reference_answers": None}))


# ---------------------------------------------------------------------------------------------
# the stage end to end (tiny model)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _recipe(tmp: Path, tiny: Path, **mtbench) -> Path:
    data = {
        "schema_version": 1,
        "name": "mtbench-test",
        "teacher": {"backend": "local", "model": str(tiny), "prompt_format": "{user}"},
        "judge": {"backend": "local", "model": str(tiny), "prompt_format": "{system}\n\n{user}\n", "batch_size": 8},
        "student": {"model": str(tiny)},
        "evaluation": {
            "checkpoints": ["base", "sft-orca"],
            "harness": {"enabled": False},
            "mtbench": {"questions": {"path": DEMO_QUESTIONS}, "answer_max_new_tokens": 6, "answer_batch_size": 4,
                        "judge_method": "logprobs", **mtbench},
        },
    }
    p = tmp / "recipe.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def _commit_checkpoints(run: Path, tiny: Path, stages=("sft-orca", "sft-hh", "dpo")) -> None:
    """Committed training outputs (the tiny model as each stage's model/), as the training stages commit them."""
    import shutil

    store = open_store(run)
    for s in stages:
        out = run.parent / f"_{s}"
        shutil.copytree(tiny, out / "model", dirs_exist_ok=True)
        commit(store, out, CommitInfo(s, "p", {}, {"steps": 1}, {"seconds": 1.0}, {}))


def test_mtbench_stage_with_a_logprobs_judge(tmp_path, tiny):
    run = tmp_path / "run"
    _commit_checkpoints(run, tiny)
    recipe = _recipe(tmp_path, tiny)
    assert cli_main(["stage", "eval-mtbench", "--recipe", str(recipe), "--run", str(run)]) == 0
    store = open_store(run)
    m = read_manifest(store, "eval-mtbench")
    assert m["counts"]["judgments"] == 2 * 2 * 10 and m["counts"]["excluded"] == 0
    assert m["judge"]["method"] == "logprobs" and m["judge"]["model_id"] == str(tiny)
    scores = json.loads(store.read_text("eval-mtbench/results/scores.json"))
    assert scores["order"] == ["base", "sft-orca"]
    for label in ("base", "sft-orca"):
        s = scores["models"][label]
        assert 1.0 <= s["overall"] <= 10.0 and set(s["turns"]) == {"1", "2"}
        js = [json.loads(x) for x in store.read_text(f"eval-mtbench/results/judgments/{label}.jsonl").splitlines()]
        assert len(js) == 20 and all(j["judge"] == str(tiny) and j["judgment"] for j in js)
        # the expected rating is the mean under the recorded distribution
        for j in js:
            assert j["score"] == pytest.approx(sum(int(k) * p for k, p in j["distribution"].items()), abs=2e-3)
        # the per-category score is the mean of that category's judgments
        maths = [j["score"] for j in js if j["category"] == "math"]
        assert s["categories"]["math"] == pytest.approx(statistics.mean(maths), abs=1e-3)
        answers = [json.loads(x) for x in store.read_text(f"eval-mtbench/results/answers/{label}.jsonl").splitlines()]
        assert len(answers) == 10 and all(len(a["choices"][0]["turns"]) == 2 for a in answers)


def test_mtbench_with_an_anthropic_judge_over_http(tmp_path, tiny, monkeypatch):
    def verdict(prompt: str) -> str:
        if "bakery" in prompt:  # the muffin question gets an unreadable verdict, both turns
            return "I would rather not give a number."
        if "<turn_2_assistant>" in prompt:
            return "The second reply is off topic.\n\nRating: [[2]]"
        return "Short and vague.\n\nRating: [[6]]"

    monkeypatch.setenv("TEST_ANTHROPIC_KEY", "sk-test-not-a-real-key-1234")
    with LLMTestServer(script=verdict, api_key="sk-test-not-a-real-key-1234") as srv:
        judge = {"backend": "anthropic", "model": "claude-test-2024-01-01", "base_url": srv.url,
                 "api_key_env": "TEST_ANTHROPIC_KEY", "max_retries": 2, "backoff_base_s": 0.05, "backoff_max_s": 0.1,
                 "price_input_per_mtok": 8.0, "price_output_per_mtok": 24.0}
        recipe = _recipe(tmp_path, tiny, judge=judge, judge_method="generate", categories=["math", "writing", "coding"],
                         judge_decoding={"max_new_tokens": 512, "temperature": 0.0, "stop": ["\n\n### END"]})
        run = tmp_path / "run"
        # other weights for the checkpoint, so its answers (and judge prompts) differ from the base's
        _commit_checkpoints(run, build_tiny_model(tmp_path / "other", seed=1))
        assert cli_main(["stage", "eval-mtbench", "--recipe", str(recipe), "--run", str(run)]) == 0
        asked = len(srv.calls)
        # the recipe's judge decoding reaches the API, stop sequences included
        assert {tuple(c.params["stop"]) for c in srv.calls} == {("\n\n### END",)}
    store = open_store(run)
    scores = json.loads(store.read_text("eval-mtbench/results/scores.json"))
    assert scores["judge"]["model_id"] == "claude-test-2024-01-01" and scores["judge"]["backend"] == "anthropic"
    s = scores["models"]["base"]
    # 4 questions x 2 turns; the 2 muffin verdicts are excluded
    assert (s["judged"], s["excluded"]) == (6, 2)
    assert s["turns"] == {"1": 6.0, "2": 2.0} and s["overall"] == pytest.approx(4.0)
    js = [json.loads(x) for x in store.read_text("eval-mtbench/results/judgments/base.jsonl").splitlines()]
    muffin = [j for j in js if "bakery" in j["user_prompt"]]
    assert len(muffin) == 2 and all(j["score"] is None and j["excluded"] and j["judgment"] for j in muffin)
    # math and coding prompts carry the reference answers; turn 2 uses the conversation prompt
    assert all(
        "<reference_answer>" in j["user_prompt"] for j in js if j["category"] in ("math", "coding") and j["turn"] == 1
    )
    assert all(j["judge_prompt"].startswith("turn2") for j in js if j["turn"] == 2)
    m = read_manifest(store, "eval-mtbench")
    assert asked == 2 * 8 and m["usage"]["judge"]["requests"] == 16
    # the requests are accounted as every request-sending stage accounts them (issue 11): asked, lost
    # by cause, retried, and the verdicts without a rating (2 per model: the muffin question)
    req = m["requests"]
    assert (req["needed"], req["asked"], req["failed"], req["unparseable"]) == (16, 16, 0, 4)
    assert req["retries"] == m["usage"]["judge"]["retries"] == 0
    assert m["cost_usd"] is not None and m["cost_usd"] > 0
    assert "sk-test" not in json.dumps(m)  # the key never reaches a manifest


def test_missing_turn_is_bad_input_exit_2(tmp_path, tiny):
    qfile = tmp_path / "questions.jsonl"
    qfile.write_text(json.dumps({"question_id": 1, "category": "writing", "turns": ["one", "two"]}) + "\n"
                     + json.dumps({"question_id": 2, "category": "stem", "turns": ["only one turn"]}) + "\n")
    recipe = _recipe(tmp_path, tiny, questions={"path": str(qfile)})
    run = tmp_path / "run"
    _commit_checkpoints(run, tiny)
    cfg = parse_recipe(recipe.read_text()).evaluation.mtbench
    with pytest.raises(BadInput, match=r"questions.jsonl:2: question 2: 'turns' has 1 non-empty turn"):
        load_questions(cfg)
    assert cli_main(["stage", "eval-mtbench", "--recipe", str(recipe), "--run", str(run)]) == EXIT_BAD_INPUT
    assert read_manifest(open_store(run), "eval-mtbench") is None


def test_unreachable_judge_is_retryable_and_answers_are_kept(tmp_path, tiny, caplog):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = {"backend": "openai-chat", "model": "gpt-test", "base_url": f"http://127.0.0.1:{port}/v1", "max_retries": 1,
             "backoff_base_s": 0.05, "backoff_max_s": 0.1, "timeout_s": 2}
    recipe = _recipe(tmp_path, tiny, judge=judge, judge_method="generate", categories=["math"])
    run = tmp_path / "run"
    _commit_checkpoints(run, tiny)
    assert cli_main(["stage", "eval-mtbench", "--recipe", str(recipe), "--run", str(run)]) == EXIT_RETRYABLE
    store = open_store(run)
    assert read_manifest(store, "eval-mtbench") is None
    # both models' answers were saved before judging: a rerun only asks the judge
    assert len([p for p in store.list("eval-mtbench/_work/mtbench/") if "/answers-" in p]) == 2
    # a rerun with another judge reuses those answers: only the judging is done again
    import logging

    caplog.set_level(logging.INFO, logger="bezoar")
    recipe2 = _recipe(tmp_path, tiny, categories=["math"])  # the in-process judge, by token probabilities
    assert cli_main(["stage", "eval-mtbench", "--recipe", str(recipe2), "--run", str(run)]) == 0
    assert caplog.text.count("already generated (resumed from _work/)") == 2
    assert read_manifest(store, "eval-mtbench")["counts"]["judgments"] == 2 * 2 * 2


def test_judge_requests_refused_as_sent_are_bad_input_not_retryable(tmp_path, tiny, monkeypatch):
    """A judge that refuses the second-turn judgments as sent (HTTP 400: e.g. a prompt over its context) refuses
    them again on every rerun; with the first turns answered the pool did not stop, and the stage failed retryable
    (exit 3), so the Job was retried to the same refusals. Refusals over the limit are bad input (exit 2)."""
    def refuse_turn2(prompt: str) -> str | None:
        return "400" if "<turn_2_assistant>" in prompt else None

    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test-not-a-real-key-1234")
    with LLMTestServer(script=lambda p: "Fine.\n\nRating: [[6]]", rule=refuse_turn2,
                       api_key="sk-test-not-a-real-key-1234") as srv:
        judge = {"backend": "openai-chat", "model": "gpt-test", "base_url": srv.url + "/v1",
                 "api_key_env": "TEST_JUDGE_KEY", "max_retries": 2, "backoff_base_s": 0.05, "backoff_max_s": 0.1}
        recipe = _recipe(tmp_path, tiny, judge=judge, judge_method="generate", categories=["math", "writing", "coding"])
        run = tmp_path / "run"
        _commit_checkpoints(run, tiny)
        assert cli_main(["stage", "eval-mtbench", "--recipe", str(recipe), "--run", str(run)]) == EXIT_BAD_INPUT
        assert [c.status for c in srv.calls].count(400) == 4 and [c.status for c in srv.calls].count(200) == 4
    assert read_manifest(open_store(run), "eval-mtbench") is None


def test_a_recipes_temperatures_are_laid_over_fastchats():
    """Naming one category's temperature replaced the whole table: math, coding, reasoning and extraction went
    from greedy to default_temperature (0.7) without a word."""
    from bezoar_jobs.recipe_eval import MTBENCH_TEMPERATURES

    t = _mt_cfg(temperatures={"writing": 0.5}).temperatures
    assert t == {**MTBENCH_TEMPERATURES, "writing": 0.5} and t["math"] == t["coding"] == 0.0
    assert _mt_cfg(temperatures={"poetry": 1.0}).temperatures["poetry"] == 1.0  # a category of another file
    with pytest.raises(ValueError, match=r"temperatures\.writing"):
        _mt_cfg(temperatures={"writing": 3.0})


def test_each_row_decodes_at_its_categorys_temperature():
    import torch

    from bezoar_jobs.eval.mtbench import _row_temperature, temperature_for

    cfg = parse_recipe((REPO / "recipes" / "demo.yaml").read_text()).evaluation.mtbench
    temps = [temperature_for(cfg, c) for c in ("math", "writing", "stem", "no-such-category")]
    assert temps == [0.0, 0.7, 0.1, cfg.default_temperature]
    scores = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0], [0.5, 0.1, 0.2], [0.0, 1.0, 2.0]])
    out = _row_temperature(temps)(None, scores.clone())
    # greedy row: only its argmax survives, so sampling must pick it
    assert torch.isinf(out[0, 0]) and torch.isinf(out[0, 2]) and out[0, 1] == 0.0
    assert torch.allclose(out[1], scores[1] / 0.7)
    assert torch.allclose(out[2], scores[2] / 0.1)
    assert torch.allclose(out[3], scores[3] / cfg.default_temperature)
