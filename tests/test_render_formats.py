"""Teacher rendering: where each backend's prompt format puts the system and the user text.

One test per format, each showing the exact string (or messages) the backend sends for an Orca
request (a system message plus a Flan task).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from bezoar_jobs.llm.anthropic_api import AnthropicClient
from bezoar_jobs.llm.base import GenRequest
from bezoar_jobs.llm.openai_api import OpenAIChatClient, OpenAICompletionsClient
from bezoar_jobs.llm.render import chat_messages, render_raw
from bezoar_jobs.recipe import Endpoint

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "You are an AI assistant. Think step by step."
USER = "Premise: A man is sleeping. Hypothesis: A man is awake. Does the premise entail the hypothesis?"


def _paper_teacher_format() -> str:
    recipe = yaml.safe_load((REPO / "recipes" / "openbezoar.yaml").read_text())
    return str(recipe["teacher"]["prompt_format"])


def test_h2ogpt_format_of_the_paper_teacher_puts_the_system_text_first_then_a_blank_line():
    # h2oGPT's oasst1 models have one prompt slot: the system message goes in front of the task
    fmt = _paper_teacher_format()
    assert fmt == "<|prompt|>{user}<|endoftext|><|answer|>"
    assert render_raw(fmt, SYSTEM, USER) == (
        "<|prompt|>You are an AI assistant. Think step by step.\n\n"
        "Premise: A man is sleeping. Hypothesis: A man is awake. Does the premise entail the hypothesis?"
        "<|endoftext|><|answer|>"
    )
    # Orca's message 1 is empty: the task alone
    assert render_raw(fmt, "", USER) == f"<|prompt|>{USER}<|endoftext|><|answer|>"


def test_adjacent_system_and_user_slots_are_never_glued():
    # the old paper recipe's format: the two texts used to touch ("...step by step.Premise: ...")
    fmt = "<|prompt|>{system}{user}<|endoftext|><|answer|>"
    out = render_raw(fmt, SYSTEM, USER)
    assert "step.Premise" not in out
    assert out == f"<|prompt|>{SYSTEM}\n\n{USER}<|endoftext|><|answer|>"
    assert render_raw(fmt, None, USER) == f"<|prompt|>{USER}<|endoftext|><|answer|>"


def test_chatml_raw_format_for_openai_completions():
    fmt = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    ep = Endpoint(backend="openai-completions", model="m", base_url="http://x/v1", prompt_format=fmt)
    client = OpenAICompletionsClient(ep, api_key="k", role="teacher")
    assert client.prompt_text(GenRequest(id="a", user=USER, system=SYSTEM)) == (
        "<|im_start|>system\nYou are an AI assistant. Think step by step.<|im_end|>\n"
        f"<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_llama2_raw_format():
    fmt = "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]"
    assert render_raw(fmt, SYSTEM, USER) == f"[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{USER} [/INST]"


def test_openbezoar_format_as_a_raw_teacher_format():
    fmt = "### System:\n{system}\n\n### Instruction:\n{user}\n\n### Response:\n"
    assert render_raw(fmt, SYSTEM, USER) == f"### System:\n{SYSTEM}\n\n### Instruction:\n{USER}\n\n### Response:\n"


def test_openai_chat_sends_the_system_role():
    ep = Endpoint(backend="openai-chat", model="gpt-x", base_url="http://x/v1")
    client = OpenAIChatClient(ep, api_key="k", role="judge")
    req = GenRequest(id="a", user=USER, system=SYSTEM)
    assert client.messages(req) == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    # a model without a system role: merged, with the blank line
    assert chat_messages(SYSTEM, USER, system_supported=False) == [{"role": "user", "content": f"{SYSTEM}\n\n{USER}"}]


def test_anthropic_sends_the_system_parameter():
    client = AnthropicClient(Endpoint(backend="anthropic", model="claude-x"), api_key="k", role="judge")
    assert client._parts(GenRequest(id="a", user=USER, system=SYSTEM)) == (SYSTEM, USER)
    ep = Endpoint(backend="anthropic", model="claude-x", system_prompt_supported=False)
    merged = AnthropicClient(ep, api_key="k", role="judge")._parts(GenRequest(id="a", user=USER, system=SYSTEM))
    assert merged == (None, f"{SYSTEM}\n\n{USER}")


def test_local_backend_uses_the_chat_template_system_turn(tmp_path):
    from bezoar_jobs.llm.local import LocalClient
    from bezoar_jobs.models import load_tokenizer
    from tests.tiny_model import build_tiny_model

    tok = load_tokenizer(build_tiny_model(tmp_path / "m"))
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    client = LocalClient(Endpoint(backend="local", model="tiny"), "teacher", model=object(), tokenizer=tok)
    assert client.render(GenRequest(id="a", user=USER, system=SYSTEM)) == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n"
    )
    raw = LocalClient(Endpoint(backend="local", model="tiny", prompt_format="<|prompt|>{user}<|endoftext|><|answer|>"),
                      "teacher", model=object(), tokenizer=tok)
    expected = f"<|prompt|>{SYSTEM}\n\n{USER}<|endoftext|><|answer|>"
    assert raw.render(GenRequest(id="a", user=USER, system=SYSTEM)) == expected
