"""Training examples: filter-stage rows and HH-RLHF rows -> prompt/completion -> token ids + labels.

The loss is on response tokens only: every prompt position gets the label -100, the response
tokens and the final end-of-sequence token keep their ids. The prompt/response boundary is found
the way TRL does it (the longest common prefix of the tokenized prompt and the tokenized
prompt+response), so a token merged across the boundary counts as response, and the ids are
exactly those of the full text as the model will see it at inference.

Bad rows are errors naming the file and line (exit 2): a missing instruction or response, an empty
response. A prompt that alone fills ``max_length`` is an error or a dropped row
(``training.long_prompts``); too many drops, or nothing left to train on, is an error too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.prompt_format import render_example
from ..errors import BadInput

# (instruction column, response column, system column or None): each scheme module's TRAIN_COLUMNS
Columns = tuple[str, str, str | None]


@dataclass(frozen=True)
class Example:
    where: str  # file:line (or source row) for messages
    prompt: str
    completion: str


def read_filtered_rows(path: Path, label: str) -> list[tuple[str, dict[str, Any]]]:
    """(file:line, row) of a filter stage's ``data/train.jsonl``."""
    if not path.is_file():
        raise BadInput(f"{label}: no such file (the filter stage committed no train.jsonl)")
    from ..data.io import iter_jsonl

    return [(f"{label}:{n}", row) for n, row in iter_jsonl(path, label)]


def scheme_example(scheme: str, columns: Columns, where: str, row: dict[str, Any]) -> Example:
    """The (prompt, completion) of one filtered row of a generation scheme, from its ``columns``."""
    ins_col, resp_col, sys_col = columns
    for col in (ins_col, resp_col):
        if col not in row or row[col] is None:
            raise BadInput(f"{where}: field {col!r} is missing (every {scheme} row needs {ins_col!r} and {resp_col!r})")
        if not isinstance(row[col], str):
            raise BadInput(f"{where}: field {col!r} must be a string, got {type(row[col]).__name__}")
    if not row[resp_col].strip():
        raise BadInput(f"{where}: field {resp_col!r} is empty: a row without a response cannot be trained on")
    if not row[ins_col].strip():
        raise BadInput(f"{where}: field {ins_col!r} is empty")
    system = row.get(sys_col) if sys_col else None
    if system is not None and not isinstance(system, str):
        raise BadInput(f"{where}: field {sys_col!r} must be a string")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise BadInput(f"{where}: field 'input' must be a string")
    prompt, completion = render_example(row[ins_col], row[resp_col], system=system, input=extra)
    return Example(where, prompt, completion)


# ---------------------------------------------------------------------------------------------
# Tokenizing
# ---------------------------------------------------------------------------------------------
class PromptTooLong(ValueError):
    def __init__(self, n_prompt: int, max_length: int):
        super().__init__(f"the prompt alone is {n_prompt} tokens; max_length is {max_length}")
        self.n_prompt = n_prompt


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def starts_with_bos(tok: Any, add_bos: bool) -> bool:
    """Whether :func:`encode` begins a sequence with BOS: the tokenizer adds one, or the recipe asks for it."""
    if tok.bos_token_id is None:
        return False
    return add_bos or bool(encode(tok, "x", False)[:1] == [tok.bos_token_id])


def encode(tok: Any, text: str, add_bos: bool) -> list[int]:
    """Token ids of ``text`` with the tokenizer's own special tokens, plus BOS when the recipe asks
    for it and the tokenizer did not add one.

    The text is data, never markup: a special token's spelling inside it (an HTML ``<s>``
    strikethrough tag in a code answer, a ``</s>`` a teacher wrote out) is tokenized as the
    characters it is (``split_special_tokens``). Parsed as markup, Llama's ``</s>`` in a response
    became the EOS id in the middle of the response, trained as the point to stop, and ``<s>`` a
    BOS; the only BOS and EOS ids of an example are the ones the tokenizer and this module add."""
    ids = list(tok(text, add_special_tokens=True, split_special_tokens=True)["input_ids"])
    bos = tok.bos_token_id
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def tokenize_example(tok: Any, prompt: str, completion: str, max_length: int, add_bos: bool) -> dict[str, list[int]]:
    """input_ids and labels (-100 on the prompt) of prompt + completion + EOS, cut to max_length."""
    p_ids = encode(tok, prompt, add_bos)
    full = encode(tok, prompt + completion, add_bos)
    eos = tok.eos_token_id
    # a tokenizer that appends EOS itself already ended both texts with it
    if eos is not None and p_ids and p_ids[-1] == eos:
        p_ids = p_ids[:-1]
    if eos is not None and (not full or full[-1] != eos):
        full = [*full, eos]
    n = common_prefix(p_ids, full)
    if n >= max_length:
        raise PromptTooLong(len(p_ids), max_length)
    ids = full[:max_length]
    labels = [-100] * n + ids[n:]
    return {"input_ids": ids, "labels": labels}


@dataclass
class TokenizedSet:
    rows: list[dict[str, list[int]]]
    counts: dict[str, int] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)

    @property
    def tokens(self) -> int:
        return sum(len(r["input_ids"]) for r in self.rows)

    @property
    def response_tokens(self) -> int:
        return sum(sum(1 for x in r["labels"] if x != -100) for r in self.rows)


def tokenize_examples(
    tok: Any,
    examples: Iterable[Example],
    max_length: int,
    add_bos: bool,
    long_prompts: str,
    max_dropped_fraction: float,
    label: str,
    skipped: Counter | None = None,
) -> TokenizedSet:
    """Tokenize every example; apply the long-prompt policy; refuse an empty result."""
    out = TokenizedSet(rows=[], skipped=Counter(skipped or {}))
    truncated = 0
    seen = 0
    for ex in examples:
        seen += 1
        try:
            row = tokenize_example(tok, ex.prompt, ex.completion, max_length, add_bos)
        except PromptTooLong as e:
            if long_prompts == "error":
                raise BadInput(
                    f"{ex.where}: {e}: raise the stage's max_length or set training.long_prompts: drop"
                ) from None
            out.skipped["prompt_too_long"] += 1
            continue
        if row["input_ids"][-1] != tok.eos_token_id:
            truncated += 1
        out.rows.append(row)
    total = seen + sum((skipped or Counter()).values())
    dropped = total - len(out.rows)
    out.counts = {
        "rows_read": total,
        "examples": len(out.rows),
        "dropped": dropped,
        "responses_cut_at_max_length": truncated,
        **{f"dropped_{k}": v for k, v in sorted(out.skipped.items())},
    }
    if not out.rows:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(out.skipped.items())) or "the dataset is empty"
        raise BadInput(f"{label}: no examples to train on ({why})")
    if total and dropped / total > max_dropped_fraction:
        raise BadInput(
            f"{label}: {dropped} of {total} rows dropped ({dict(out.skipped)}), more than "
            f"training.max_dropped_fraction={max_dropped_fraction}"
        )
    return out
