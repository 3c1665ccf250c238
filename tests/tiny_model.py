"""A tiny random Llama and a byte-level BPE tokenizer trained on the fly, saved as a checkpoint dir.

ENVIRONMENT.md's recipe: vocab ~500, hidden 64, 2 layers, 4 heads (2 KV heads): ~100k parameters,
built in well under a second, LoRA SFT at a few hundredths of a second per step on CPU. The
tokenizer has BOS/EOS/UNK but deliberately no pad token, so the training code's "pad = eos or unk
when missing" rule is exercised; it does not add BOS by itself (the recipe's ``add_bos`` does).
"""

from __future__ import annotations

from pathlib import Path

# Text the BPE merges are learned from: the prompt layout plus plain English, so prompts tokenize
# into a reasonable number of tokens.
_CORPUS = [
    "### System:\nBelow is an instruction that describes a task. Write a response.\n\n",
    "### Instruction:\nName a colour of the sky.\n\n### Response:\nThe sky is blue.",
    "Human: How do I boil an egg?\n\nAssistant: Put it in boiling water for eight minutes.",
    "The quick brown fox jumps over the lazy dog. A small model learns to count one two three four five.",
    "Write a short poem about the sea. Explain why the grass is green. List three fruits: apple, pear, plum.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12. Question answer reason because therefore step by step.",
]


def build_tiny_model(dest: Path, seed: int = 0, vocab_size: int = 512) -> Path:
    """Write a tiny LlamaForCausalLM + fast tokenizer (safetensors) into ``dest``; return ``dest``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(dest)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        tie_word_embeddings=False,
        initializer_range=0.3,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    model.save_pretrained(dest, safe_serialization=True)
    (dest / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny random llama (tests)\n", encoding="utf-8")
    return dest


def build_word_tokenizer(dest: Path) -> Path:
    """A tokenizer that counts one token per whitespace-separated word, as the scripted server
    (tests/llm_server.py) counts them: the teacher's tokenizer for context-window tests."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "</s>": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")
    fast.save_pretrained(dest)
    return dest
