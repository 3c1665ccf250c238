"""HH-RLHF dialogue parsing, SFT examples and DPO pairs (bezoar_jobs.data.hh)."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from bezoar_jobs.data.hh import (
    ASSISTANT,
    HUMAN,
    Message,
    SkipRow,
    dpo_pair,
    load_hh_rows,
    parse_dialogue,
    sft_example,
    split_final,
)
from bezoar_jobs.data.prompt_format import Turn, render_prompt
from bezoar_jobs.recipe_base import DatasetSource


def test_single_turn() -> None:
    msgs = parse_dialogue("\n\nHuman: What is 2+2?\n\nAssistant: 4.")
    assert msgs == [Message(HUMAN, "What is 2+2?"), Message(ASSISTANT, "4.")]


def test_multi_turn_keeps_order_and_text() -> None:
    text = "\n\nHuman: Hi!\n\nAssistant: Hello.\n\nHuman: Tell me a joke.\n\nAssistant: Why did the\nchicken cross?"
    msgs = parse_dialogue(text)
    assert [m.role for m in msgs] == [HUMAN, ASSISTANT, HUMAN, ASSISTANT]
    assert msgs[-1].text == "Why did the\nchicken cross?"
    parts = split_final(msgs)
    assert parts.history == (Turn("Hi!", "Hello."),)
    assert parts.instruction == "Tell me a joke."
    assert parts.reply == "Why did the\nchicken cross?"


def test_speaker_names_inside_a_turn_stay_text() -> None:
    # "Human:" / "Assistant:" that do not start a paragraph are part of the message
    text = (
        "\n\nHuman: In a script, how do I write a line like Human: hello?"
        "\n\nAssistant: Write the name, a colon, then the line, e.g. Assistant: hi there.\nHuman: is fine too."
    )
    msgs = parse_dialogue(text)
    assert len(msgs) == 2
    assert msgs[0].text == "In a script, how do I write a line like Human: hello?"
    assert msgs[1].text.endswith("e.g. Assistant: hi there.\nHuman: is fine too.")


def test_empty_turns() -> None:
    # an empty human turn in the context is kept (as empty text); an empty final reply is skipped
    msgs = parse_dialogue("\n\nHuman:\n\nAssistant: Can I help?\n\nHuman: Yes, a recipe.\n\nAssistant: Sure: pancakes.")
    assert msgs[0] == Message(HUMAN, "")
    parts = split_final(msgs)
    assert parts.history == (Turn("", "Can I help?"),)
    with pytest.raises(SkipRow) as e:
        split_final(parse_dialogue("\n\nHuman: Hello?\n\nAssistant:"))
    assert e.value.reason == "empty_reply"
    with pytest.raises(SkipRow) as e:
        split_final(parse_dialogue("\n\nHuman: \n\nAssistant: Hi."))
    assert e.value.reason == "empty_instruction"


def test_double_turns_are_joined_and_missing_leading_blank_line_is_accepted() -> None:
    msgs = parse_dialogue("Human: First part.\n\nHuman: Second part.\n\nAssistant: Got both.")
    assert msgs == [Message(HUMAN, "First part.\n\nSecond part."), Message(ASSISTANT, "Got both.")]


@pytest.mark.parametrize("lead", ["\n", " ", "\n \n", "\r\n"])
def test_white_space_other_than_a_blank_line_before_the_first_turn_is_accepted(lead: str) -> None:
    # one line break before the first "Human:" had found no turn at all: the row was dropped as unparseable
    msgs = parse_dialogue(f"{lead}Human: Hi.\n\nAssistant: Hello.")
    assert msgs == [Message(HUMAN, "Hi."), Message(ASSISTANT, "Hello.")]


def test_unparseable_and_unfinished_dialogues() -> None:
    with pytest.raises(ValueError, match="no 'Human:'"):
        parse_dialogue("just some text")
    with pytest.raises(ValueError, match="text before the first turn"):
        parse_dialogue("Preamble\n\nHuman: hi\n\nAssistant: hello")
    with pytest.raises(SkipRow) as e:
        split_final(parse_dialogue("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye"))
    assert e.value.reason == "no_final_assistant"
    with pytest.raises(SkipRow) as e:
        sft_example({"chosen": "no markers here"})
    assert e.value.reason == "unparseable"
    with pytest.raises(SkipRow) as e:
        sft_example({"rejected": "\n\nHuman: a\n\nAssistant: b"})
    assert e.value.reason == "missing_chosen"


def test_sft_example_targets_the_final_chosen_reply_with_earlier_turns_as_context() -> None:
    row = {
        "chosen": "\n\nHuman: I am going to Paris.\n\nAssistant: How long?\n\nHuman: Three days."
        "\n\nAssistant: See the Louvre.",
        "rejected": "\n\nHuman: I am going to Paris.\n\nAssistant: How long?\n\nHuman: Three days."
        "\n\nAssistant: Stay home.",
    }
    prompt, completion = sft_example(row)
    assert completion == "See the Louvre."
    assert prompt == render_prompt("Three days.", history=[Turn("I am going to Paris.", "How long?")])


def test_dpo_pair_shares_the_prompt_and_splits_the_final_replies() -> None:
    row = {
        "chosen": "\n\nHuman: Capital of Australia?\n\nAssistant: Canberra.",
        "rejected": "\n\nHuman: Capital of Australia?\n\nAssistant: Sydney.",
    }
    pair = dpo_pair(row)
    assert pair == {"prompt": render_prompt("Capital of Australia?"), "chosen": "Canberra.", "rejected": "Sydney."}
    with pytest.raises(SkipRow) as e:
        dpo_pair({"chosen": row["chosen"], "rejected": "\n\nHuman: Capital of France?\n\nAssistant: Paris."})
    assert e.value.reason == "context_mismatch"
    with pytest.raises(SkipRow) as e:
        dpo_pair({"chosen": row["chosen"], "rejected": row["chosen"]})
    assert e.value.reason == "identical_replies"


def test_demo_file_parses_completely_with_multi_turn_rows() -> None:
    path = resources.files("bezoar_jobs") / "demo_data" / "hh" / "train.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 64
    turns = []
    for row in rows:
        prompt, completion = sft_example(row)
        pair = dpo_pair(row)
        assert completion and pair["chosen"] == completion and pair["rejected"] != completion
        assert pair["prompt"] == prompt
        turns.append(prompt.count("### Instruction:"))
    assert max(turns) == 3 and sum(t > 1 for t in turns) >= 20
    # the first 32 rows (the demo's limit in tests) already mix single and multi-turn dialogues
    assert sum(t > 1 for t in turns[:32]) >= 8


def test_load_hh_rows_honours_the_limit() -> None:
    src = DatasetSource(path="pkg://bezoar_jobs/demo_data/hh/train.jsonl", limit=5)
    items = load_hh_rows(src, "training.hh.data")
    assert len(items) == 5
    assert items[0][0] == "pkg://bezoar_jobs/demo_data/hh/train.jsonl row 1"
    assert set(items[0][1]) == {"chosen", "rejected"}


def test_dropped_rows_are_named_not_only_counted(tmp_path, caplog) -> None:
    """Issue 11, finding 10: an HH-RLHF row without an assistant turn was dropped and counted but
    never named. sft-hh names the first ones in a WARNING and in its manifest's data entry; DPO in a
    WARNING."""
    from types import SimpleNamespace

    from bezoar_jobs.stages.sft import hh_examples
    from bezoar_jobs.training.dpo import dpo_pairs

    good = "\n\nHuman: Hi there\n\nAssistant: Hello!"
    path = tmp_path / "hh.jsonl"
    rows = [{"chosen": good, "rejected": good + " Go away."}, {"chosen": "\n\nHuman: only a question",
                                                               "rejected": "\n\nHuman: only a question"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = DatasetSource(path=str(path))
    ctx = SimpleNamespace(name="sft-hh", recipe=SimpleNamespace(training=SimpleNamespace(hh=SimpleNamespace(data=src))))
    with caplog.at_level("WARNING", logger="bezoar"):
        examples, skipped, info = hh_examples(ctx)  # type: ignore[arg-type]
    assert len(examples) == 1 and skipped == {"no_final_assistant": 1}
    assert info["dropped_rows"] == [{"row": f"{path} row 2",
                                     "reason": "no_final_assistant: the dialogue does not end with an assistant turn"}]
    assert f"{path} row 2: no_final_assistant" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="bezoar"), pytest.raises(Exception, match="no preference pairs"):
        dpo_pairs([(f"{path} row 2", rows[1])], None, 64, False, "drop", 1.0, "training.hh.data", str(path))
    assert f"{path} row 2: no_final_assistant" in caplog.text


def test_hh_rows_stream_and_stop_at_the_limit(tmp_path) -> None:
    """Finding 7: HH-RLHF comes through the same streaming path as Flan and dolly: rows are read one at
    a time and reading stops at the limit (the paper's first 100K rows), through our file reader and
    through datasets' streaming (the hub's code path) alike."""
    good = json.dumps({"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go."})
    path = tmp_path / "hh.jsonl"
    path.write_text(good + "\n" + good + "\n{a broken line the reader never reaches\n")
    assert len(load_hh_rows(DatasetSource(path=str(path), limit=2), "training.hh.data")) == 2
    big = tmp_path / "big.jsonl"
    big.write_text((good + "\n") * 5000)
    hub_like = DatasetSource(path="json", data_files=(str(big),), limit=3)
    items = load_hh_rows(hub_like, "training.hh.data")
    assert len(items) == 3 and items[0][0] == "json row 1"


def test_preference_rows_in_another_format_are_refused_saying_what_format_is_read() -> None:
    """A dataset in the separate prompt/chosen/rejected format (TRL's, with message lists or bare replies) had every
    row dropped as 'unparseable' and the stage said only "no preference pairs ({'unparseable': N})"."""
    from bezoar_jobs.errors import BadInput
    from bezoar_jobs.training.dpo import dpo_pairs

    rows = [("prefs.jsonl:1", {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."}),
            ("prefs.jsonl:2", {"prompt": [{"role": "user", "content": "Hi"}],
                               "chosen": [{"role": "assistant", "content": "Hello"}],
                               "rejected": [{"role": "assistant", "content": "Go"}]})]
    with pytest.raises(BadInput) as e:
        dpo_pairs(rows, None, 64, False, "drop", 1.0, "training.dpo.data", "prefs.jsonl")
    msg = str(e.value)
    assert "training.dpo.data (prefs.jsonl): no preference pairs" in msg
    assert "prefs.jsonl:1: unparseable: no 'Human:' or 'Assistant:' turn found" in msg
    assert "whole HH-RLHF transcript" in msg and "'prompt' column is not read" in msg
