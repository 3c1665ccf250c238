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


def test_the_saved_chat_template_renders_the_trained_layout(tmp_path) -> None:
    """A trained checkpoint's tokenizer kept its base model's chat template (SmolLM2's ChatML in the demo), so a
    server's chat route (vLLM, TGI, transformers' apply_chat_template) prompted the model in a layout it was
    never trained on. merge_adapter now saves the template of this format, which renders byte for byte what
    training and MT-Bench answering render."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bezoar_jobs.data.prompt_format import chat_template
    from bezoar_jobs.training.lora import merge_adapter
    from tests.tiny_model import build_tiny_model

    base = build_tiny_model(tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"  # the base's
    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                   LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    merge_adapter(base, adapter, tmp_path / "model", "float32", tok, chat_template=chat_template(bos=True))
    assert tok.chat_template.startswith("{% for m in messages %}")  # the caller's tokenizer is left as it was
    saved = AutoTokenizer.from_pretrained(tmp_path / "model")
    bos, eos = saved.bos_token, saved.eos_token

    def chat(msgs: list[dict[str, str]]) -> str:
        return saved.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    assert chat([{"role": "user", "content": " Name three fruits. "}]) == bos + render_prompt("Name three fruits.")
    assert chat([{"role": "system", "content": "  "}, {"role": "user", "content": "Hi"}]) == bos + render_prompt("Hi")
    turns = [{"role": "system", "content": "Be brief, 'please'."}, {"role": "user", "content": "Hi there"},
             {"role": "assistant", "content": " Hello! "}, {"role": "user", "content": "Sum {a} and {b}?"}]
    assert chat(turns) == bos + render_prompt("Sum {a} and {b}?", system="Be brief, 'please'.",
                                              history=[Turn("Hi there", "Hello!")])
    whole = [*turns, {"role": "assistant", "content": "It is a+b."}]  # a whole example, as trained: EOS at its end
    prompt, completion = render_example("Sum {a} and {b}?", "It is a+b.", system="Be brief, 'please'.",
                                        history=[Turn("Hi there", "Hello!")])
    assert saved.apply_chat_template(whole, tokenize=False) == bos + prompt + completion + eos
    no_bos = chat_template(bos=False)
    saved.chat_template = no_bos
    assert chat(turns[1:2]) == render_prompt("Hi there")
