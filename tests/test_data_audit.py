"""How the data readers treat the real datasets' formats (bezoar_jobs.data.io, bezoar_jobs.data.hh)."""

from __future__ import annotations

import json

import pytest

from bezoar_jobs.data.hh import SkipRow, dpo_pair, load_hh_rows
from bezoar_jobs.data.inputs import row_checks
from bezoar_jobs.data.io import load_rows, render
from bezoar_jobs.errors import BadInput
from bezoar_jobs.recipe_base import DatasetSource

HH_ROWS = [
    {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."},
    {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4.", "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5."},
    {"chosen": "\n\nHuman: Bye\n\nAssistant: Bye!", "rejected": "\n\nHuman: Bye\n\nAssistant: Whatever."},
]


def test_render_fills_the_template_only_not_placeholders_quoted_in_a_value() -> None:
    # the filter's rubric gets instruction, then response: an instruction quoting "{response}" (a question
    # about templates, code with f-strings) used to get the response pasted into it
    t = "Instruction: {instruction}\nResponse: {response}"
    ins = "In Jinja, what does {response} print?"
    assert render(t, instruction=ins, response="It prints the variable.") == (
        "Instruction: In Jinja, what does {response} print?\nResponse: It prints the variable."
    )
    # lamini's topic prompt: dolly examples (code with "{n}") go in before n
    assert render("{examples}\nWrite {n}.", examples="print(f'{n}')", n="20") == "print(f'{n}')\nWrite 20."
    # unchanged: every occurrence of a named slot, other braces left alone
    assert render('{"a": 1} {x} and {x} {y}', x="X") == '{"a": 1} X and X {y}'


def test_json_lines_saved_under_a_json_name_reads_like_datasets_reads_it(tmp_path) -> None:
    """datasets' Dataset.to_json writes JSON Lines by default, and its json builder reads such a .json file
    row by row; so does ours (HH-RLHF's first rows saved with to_json were refused as 'not valid JSON')."""
    from datasets import Dataset

    path = tmp_path / "hh.json"
    Dataset.from_list(HH_ROWS).to_json(str(path))
    assert len(path.read_text().splitlines()) == 3  # JSON Lines, not one document
    items = load_hh_rows(DatasetSource(path=str(path), limit=2), "training.hh.data")
    assert [row for _, row in items] == HH_ROWS[:2]
    assert dpo_pair(items[0][1])["chosen"] == "Hello."
    # a broken line of such a file is named by its line
    path.write_text("".join(json.dumps(r) + "\n" for r in HH_ROWS[:2]) + "{broken\n")
    with pytest.raises(BadInput, match=rf"{path}:3: not valid JSON"):
        load_hh_rows(DatasetSource(path=str(path)), "training.hh.data")
    # and a dolly row missing a field too
    dolly = tmp_path / "dolly.json"
    good = {"instruction": "Name a fruit.", "context": "", "response": "Apple.", "category": "open_qa"}
    dolly.write_text(json.dumps(good) + "\n" + json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(BadInput, match=rf"{dolly}:2: missing field\(s\) 'context'"):
        load_rows(DatasetSource(path=str(dolly)), field="seeds.dolly", **row_checks("seeds.dolly"))


def test_a_json_document_is_still_read_whole_and_a_broken_one_named(tmp_path) -> None:
    path = tmp_path / "hh.json"
    path.write_text(json.dumps(HH_ROWS, indent=2))
    assert [row for _, row in load_hh_rows(DatasetSource(path=str(path)), "training.hh.data")] == HH_ROWS
    path.write_text(json.dumps({"data": HH_ROWS}))
    assert len(load_hh_rows(DatasetSource(path=str(path)), "training.hh.data")) == 3
    path.write_text('[{"chosen": "x"},\n')
    with pytest.raises(BadInput, match=rf"{path}:2: not valid JSON"):
        load_hh_rows(DatasetSource(path=str(path)), "training.hh.data")
    # one object, on one line or pretty-printed, is one row (datasets' json builder reads it so); before, refused
    for text in (json.dumps(HH_ROWS[0]) + "\n", json.dumps(HH_ROWS[0], indent=2)):
        path.write_text(text)
        assert [row for _, row in load_hh_rows(DatasetSource(path=str(path)), "training.hh.data")] == HH_ROWS[:1]
    path.write_text(json.dumps({"data": {"chosen": "x"}}))
    with pytest.raises(BadInput, match="must be a list of objects"):
        load_hh_rows(DatasetSource(path=str(path)), "training.hh.data")
    # two pretty-printed objects one after the other are neither a document nor JSON Lines
    path.write_text(json.dumps(HH_ROWS[0], indent=2) + "\n" + json.dumps(HH_ROWS[1], indent=2))
    with pytest.raises(BadInput, match=r"not valid JSON \(Extra data\)"):
        load_hh_rows(DatasetSource(path=str(path)), "training.hh.data")


def test_hh_rows_that_real_data_has() -> None:
    """Checked and kept: the shared prompt is compared turn by turn after stripping, so whitespace at a turn's
    ends does not matter; a row whose dialogues differ earlier, or whose final reply is empty, is skipped."""
    pair = dpo_pair({"chosen": "\n\nHuman: Hi \n\nAssistant: Hello ", "rejected": "\n\nHuman: Hi\n\nAssistant:  Bye\n"})
    assert (pair["chosen"], pair["rejected"]) == ("Hello", "Bye")
    # the first row of HH-RLHF's harmless-base: a reply with blank lines inside stays one turn
    first = ("\n\nHuman: What are some words?\n\nAssistant: Here's a list.\n\nA, b, c,\n\nHuman: Your favourite?"
             "\n\nAssistant: ")
    pair = dpo_pair({"chosen": first + "I haven't thought about it.", "rejected": first + "A."})
    assert "Here's a list.\n\nA, b, c," in pair["prompt"] and pair["chosen"] == "I haven't thought about it."
    for rejected, reason in [
        ("\n\nHuman: What are some words?\n\nAssistant: None.\n\nHuman: Your favourite?\n\nAssistant: A.",
         "context_mismatch"),
        (first, "empty_reply"),
    ]:
        with pytest.raises(SkipRow) as e:
            dpo_pair({"chosen": first + "I haven't thought about it.", "rejected": rejected})
        assert e.value.reason == reason


def test_a_gzipped_json_document_or_json_lines_file_is_read(tmp_path) -> None:
    """recipe_base.FILE_SUFFIXES takes .json.gz as a file, and the reader refused it as an unsupported type."""
    import gzip

    doc = tmp_path / "hh.json.gz"
    doc.write_bytes(gzip.compress(json.dumps(HH_ROWS).encode()))
    assert [row for _, row in load_hh_rows(DatasetSource(path=str(doc)), "training.hh.data")] == HH_ROWS
    lines = tmp_path / "lines.json.gz"
    lines.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in HH_ROWS).encode()))
    assert [row for _, row in load_hh_rows(DatasetSource(path=str(lines)), "training.hh.data")] == HH_ROWS
    broken = tmp_path / "broken.json.gz"
    broken.write_bytes(gzip.compress(b'[{"chosen": "x"},\n'))
    with pytest.raises(BadInput, match=rf"{broken}:2: not valid JSON"):
        load_hh_rows(DatasetSource(path=str(broken)), "training.hh.data")
    plain = tmp_path / "plain.json.gz"
    plain.write_text(json.dumps(HH_ROWS))
    with pytest.raises(BadInput, match=r"not valid gzip data .*must not be named \.gz"):
        load_hh_rows(DatasetSource(path=str(plain)), "training.hh.data")
