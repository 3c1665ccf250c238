"""The one OpenBezoar prompt format (bezoar_jobs.data.prompt_format)."""

from __future__ import annotations

from bezoar_jobs.data.prompt_format import (
    DEFAULT_SYSTEM,
    Turn,
    cut_at_stop,
    render_example,
    render_prompt,
)


def test_default_layout_is_exact() -> None:
    assert render_prompt("Name three fruits.") == (
        "### System:\n"
        "Below is an instruction that describes a task, optionally paired with an input that provides further "
        "context following that instruction. Write a response that appropriately completes the request.\n"
        "\n"
        "### Instruction:\n"
        "Name three fruits.\n"
        "\n"
        "### Response:\n"
    )
    assert DEFAULT_SYSTEM.startswith("Below is an instruction")


def test_orca_system_message_replaces_the_default_and_empty_falls_back() -> None:
    p = render_prompt("Solve 2+2.", system="You are a math tutor. Explain each step.")
    assert p.startswith("### System:\nYou are a math tutor. Explain each step.\n\n### Instruction:\nSolve 2+2.")
    assert DEFAULT_SYSTEM not in p
    for empty in ("", "   ", None):
        assert render_prompt("Solve 2+2.", system=empty) == render_prompt("Solve 2+2.")


def test_input_is_appended_after_a_blank_line() -> None:
    p = render_prompt("Summarise the text.", input="The cat sat on the mat.")
    assert "### Instruction:\nSummarise the text.\n\nThe cat sat on the mat.\n\n### Response:\n" in p
    # an empty input changes nothing
    assert render_prompt("Summarise.", input="  ") == render_prompt("Summarise.")


def test_history_renders_completed_pairs_before_the_final_instruction() -> None:
    p = render_prompt("And goodbye?", history=[Turn("How do I say hello in Spanish?", "Hola.")])
    assert p == (
        f"### System:\n{DEFAULT_SYSTEM}\n\n"
        "### Instruction:\nHow do I say hello in Spanish?\n\n### Response:\nHola.\n\n"
        "### Instruction:\nAnd goodbye?\n\n### Response:\n"
    )
    # tuples work the same as Turn objects
    assert render_prompt("And goodbye?", history=[("How do I say hello in Spanish?", "Hola.")]) == p


def test_render_example_strips_and_splits_prompt_and_completion() -> None:
    prompt, completion = render_example("  What is 2+2?\n", "\n 4 \n")
    assert prompt.endswith("### Instruction:\nWhat is 2+2?\n\n### Response:\n")
    assert completion == "4"


def test_cut_at_stop_removes_a_block_the_model_started_itself() -> None:
    assert cut_at_stop("Paris.\n### Instruction:\nWhat else?") == "Paris."
    assert cut_at_stop("Paris.\n\n### System:\nx") == "Paris."
    assert cut_at_stop("  Just an answer.  ") == "Just an answer."
