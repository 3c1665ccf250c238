"""MT-Bench against FastChat's llm_judge (lm-sys/FastChat, fastchat/llm_judge/): what the audit found."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def tiny_loaded(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path: Path = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _spy(monkeypatch) -> list[str]:
    """The order in which the answer sampler's logits steps run: our per-row temperature, top-k, top-p."""
    from transformers import LogitsProcessor
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from bezoar_jobs.eval import mtbench

    calls: list[str] = []
    make = mtbench._row_temperature

    def row_temperature(temps):
        inner = make(temps)

        class Spy(LogitsProcessor):
            def __call__(self, input_ids, scores):
                calls.append("temperature")
                return inner(input_ids, scores)

        return Spy()

    monkeypatch.setattr(mtbench, "_row_temperature", row_temperature)
    def counted(name, orig):
        def call(self, input_ids, scores):  # transformers checks a step's signature: exactly these two
            calls.append(name)
            return orig(self, input_ids, scores)

        return call

    for name, cls in (("top_k", TopKLogitsWarper), ("top_p", TopPLogitsWarper)):
        monkeypatch.setattr(cls, "__call__", counted(name, cls.__call__))
    return calls


def test_sampled_answers_keep_the_models_top_k_and_top_p_as_fastchat_does(tiny_loaded, monkeypatch):
    """FastChat's gen_model_answer.py calls ``model.generate(do_sample=..., temperature=...,
    max_new_tokens=...)`` and nothing else, so a sampled answer (writing, roleplay at 0.7, stem,
    humanities at 0.1) is also cut by the model's generation config: top_k 50 (transformers'
    default) and its top_p. Ours switched both off (top_k 0, top_p 1): sampling from the whole
    vocabulary, a different answer distribution than FastChat's for the same model."""
    from bezoar_jobs.data.prompt_format import render_prompt
    from bezoar_jobs.eval.mtbench import _generate

    model, tok = tiny_loaded
    calls = _spy(monkeypatch)
    prompts = [render_prompt("Write a short poem about the sea."), render_prompt("Name a colour of the sky.")]
    _generate(model, tok, prompts, [0.7, 0.0], 3, True, seed=1)
    # the per-row temperature first, then transformers' default top-k, every step
    assert calls[:2] == ["temperature", "top_k"] and calls.count("top_k") == calls.count("temperature") == 3
    assert "top_p" not in calls  # transformers' default top_p 1: off
    # a model whose generation config asks for nucleus sampling gets it, after the temperature
    monkeypatch.setattr(model.generation_config, "top_p", 0.9)
    calls.clear()
    _generate(model, tok, prompts, [0.7, 0.0], 2, True, seed=1)
    assert calls[:3] == ["temperature", "top_k", "top_p"]


def test_greedy_batches_are_untouched(tiny_loaded, monkeypatch):
    """All rows at temperature 0 (math, coding, reasoning, extraction): greedy, no sampling step at all."""
    from bezoar_jobs.data.prompt_format import render_prompt
    from bezoar_jobs.eval.mtbench import _generate

    model, tok = tiny_loaded
    calls = _spy(monkeypatch)
    a = _generate(model, tok, [render_prompt("What is 2+3?")], [0.0], 4, True, seed=1)
    b = _generate(model, tok, [render_prompt("What is 2+3?")], [0.0], 4, True, seed=2)
    assert calls == [] and a == b
