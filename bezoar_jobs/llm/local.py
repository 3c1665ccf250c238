"""The in-process teacher / judge: transformers batched generation on this machine's CPU or GPU.

It is the embedded default (a CPU-sized demo runs the whole pipeline with SmolLM2 as teacher and
judge) and the judge behind ``filter.method: logprobs``.

* Prompts: ``prompt_format`` when the endpoint gives one (as the raw-prompt servers do), otherwise
  the tokenizer's chat template with ``add_generation_prompt``.
* Batching: requests with the same decoding settings are grouped, sorted by prompt length (less
  padding) and run ``batch_size`` at a time with LEFT padding (decoder-only models continue from
  the last position of each row).
* Seeds: each row of a batch samples from its own torch generator, seeded with its request's seed
  (``generate``'s own sampling draws from one generator for the whole batch, so a request's answer
  would depend on which requests shared its batch, and on its row in it). A request gives the same
  answer alone, in any batch, and after a resume that batches it with other requests. A request
  without a seed gets one drawn from torch's global RNG. Temperature 0 is greedy and needs no seed.
* Stop strings: matched in the answer only (never across the end of the prompt), like a server's; the
  answer ends before the first one, and its token count ends with the token that completed it (not
  the padding ``generate`` adds to a row that finished before the others).
* ``on_result`` is called in the calling thread after each batch.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import BadInput
from ..recipe import Endpoint
from .base import GenRequest, GenResult, LLMClient, UsageTotals
from .render import chat_messages, render_raw

log = logging.getLogger("bezoar.llm")


class LocalClient(LLMClient):
    backend = "local"

    def __init__(self, endpoint: Endpoint, role: str = "endpoint", *, model: Any = None, tokenizer: Any = None):
        """Load the endpoint's model, or use ``model``/``tokenizer`` objects already in memory."""
        from ..models import load_causal_lm, load_tokenizer, resolve_model

        self.endpoint = endpoint
        self.role = role
        self.model_id = endpoint.model
        self.usage = UsageTotals()
        if model is None or tokenizer is None:
            try:
                path = resolve_model(endpoint.model, endpoint.revision, trust_remote_code=endpoint.trust_remote_code)
            except BadInput as e:  # name the recipe field, not only the path
                raise BadInput(f"{role}.model: {e}") from None
            tokenizer = load_tokenizer(path, trust_remote_code=endpoint.trust_remote_code)
            model = load_causal_lm(path, endpoint.dtype, endpoint.device, trust_remote_code=endpoint.trust_remote_code)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model
        if endpoint.prompt_format is None and not getattr(self.tokenizer, "chat_template", None):
            raise BadInput(f"{role}.prompt_format: model {endpoint.model!r} has no chat template; give a prompt_format")

    @property
    def cache_identity(self) -> dict[str, Any]:
        e = self.endpoint
        return {"backend": "local", "model": e.model, "revision": e.revision, "prompt_format": e.prompt_format,
                "system_prompt_supported": e.system_prompt_supported, "batch_size": e.batch_size, "dtype": e.dtype}

    def render(self, req: GenRequest) -> str:
        if self.endpoint.prompt_format:
            return render_raw(self.endpoint.prompt_format, req.system, req.user)
        msgs = chat_messages(req.system, req.user, self.endpoint.system_prompt_supported)
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def _encode(self, texts: list[str]) -> Any:
        # chat templates already contain the BOS token where the model wants one
        add_special = self.endpoint.prompt_format is not None
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special)
        return enc.to(self.model.device)

    # ------------------------------------------------------------------------------ generation
    def run(
        self, requests: Sequence[GenRequest], on_result: Callable[[GenResult], None], desc: str = "generate"
    ) -> None:
        import torch
        from tqdm import tqdm

        groups: dict[tuple, list[tuple[GenRequest, str]]] = {}
        for req in requests:
            key = (req.max_new_tokens, req.temperature, req.top_p, req.repetition_penalty, req.stop)
            groups.setdefault(key, []).append((req, self.render(req)))
        bs = self.endpoint.batch_size
        t0 = time.monotonic()
        with tqdm(total=len(requests), desc=desc, unit="req", file=sys.stderr, mininterval=1.0) as bar:
            for items in groups.values():
                items.sort(key=lambda it: len(it[1]))
                for i in range(0, len(items), bs):
                    batch = items[i:i + bs]
                    with torch.inference_mode():
                        results = self._generate([r for r, _ in batch], [p for _, p in batch])
                    for res in results:
                        self.usage.add(res)
                        bar.update(1)
                        on_result(res)
        self.usage.seconds += time.monotonic() - t0

    def _generate(self, reqs: list[GenRequest], prompts: list[str]) -> list[GenResult]:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        first = reqs[0]
        enc = self._encode(prompts)
        start = enc["input_ids"].shape[1]
        # greedy argmax always: a sampled row's token is drawn by _RowSampler, which leaves it the only choice
        kw: dict[str, Any] = {"max_new_tokens": first.max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id,
                              "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        processors = LogitsProcessorList()
        if first.temperature > 0:
            processors.append(_RowSampler(first.temperature, first.top_p, [r.seed for r in reqs]))
        if first.repetition_penalty is not None:
            kw["repetition_penalty"] = first.repetition_penalty
        stops = [s for s in first.stop if s]
        criteria = StoppingCriteriaList()
        if stops:
            criteria.append(_StopInAnswer(self.tokenizer, stops, start))
        out = self.model.generate(**enc, **kw, logits_processor=processors, stopping_criteria=criteria)
        new = out[:, start:]
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        eos_ids.add(self.tokenizer.eos_token_id)
        results = []
        for row, req in enumerate(reqs):
            ids = new[row].tolist()
            # the answer's tokens: up to the first EOS (after it, only padding of a finished row)
            n = next((j for j, t in enumerate(ids) if t in eos_ids), len(ids))
            ended = n < len(ids)
            count = n + 1 if ended else n  # the EOS was generated: counted, as servers count it
            k = _stop_end(self.tokenizer, ids[:n], stops)
            if k is not None:  # the tokens through the one that completed the first stop string
                n, count, ended = k, k, True
            text = self.tokenizer.decode(ids[:n], skip_special_tokens=True)
            hit = [s for s in stops if s in text]
            if hit:
                text = text[: min(text.index(s) for s in hit)]
                ended = True
            results.append(GenResult(
                id=req.id,
                text=text,
                prompt_tokens=int(enc["attention_mask"][row].sum()),
                completion_tokens=count,
                finish_reason="stop" if ended else "length",
                extra={"seed": req.seed} if first.temperature > 0 else {},
            ))
        return results

    # ------------------------------------------------------------------------------ scoring
    def option_tokens(self, context: str, options: Sequence[str]) -> list[list[int]]:
        """Each option's token ids as they follow ``context`` (tokenised together, so a leading
        space or a merge across the boundary is what the model would really see)."""
        base = self._ids(context)
        out = []
        for opt in options:
            full = self._ids(context + opt)
            if full[: len(base)] == base and len(full) > len(base):
                out.append(full[len(base):])
            else:  # the boundary merged differently: fall back to the option on its own
                out.append(self.tokenizer(opt, add_special_tokens=False)["input_ids"])
            if not out[-1]:
                raise BadInput(f"rating option {opt!r} is empty after tokenisation")
        return out

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=self.endpoint.prompt_format is not None)["input_ids"]

    def rating_distribution(
        self, requests: Sequence[GenRequest], prefix: str, options: Sequence[str]
    ) -> list[dict[str, float]]:
        """For each request, P(option) after the rendered prompt + ``prefix``, normalised over
        ``options``, from the next-token distribution of ONE forward pass per batch.

        An option is scored by its first token. Where options share a first token (``"1"`` and
        ``"10"`` in most tokenisers), one more step on that token (reusing the KV cache) splits its
        probability: the longer options get P(first) * P(their second token), the option that ends
        there keeps the rest.
        """
        import torch

        if not options:
            raise BadInput("rating_distribution needs at least one option")
        contexts = [self.render(r) + prefix for r in requests]
        bs = self.endpoint.batch_size
        out: list[dict[str, float]] = []
        with torch.inference_mode():
            for i in range(0, len(contexts), bs):
                out.extend(self._rate_batch(contexts[i:i + bs], options))
        return out

    def _rate_batch(self, contexts: list[str], options: Sequence[str]) -> list[dict[str, float]]:
        import copy

        import torch

        enc = self._encode(contexts)
        mask = enc["attention_mask"]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        first_out = self.model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=pos, use_cache=True)
        probs = torch.softmax(first_out.logits[:, -1, :].float(), dim=-1)
        toks = [self.option_tokens(ctx, options) for ctx in contexts]
        # first tokens that several options share (per row; usually the same for every row)
        shared = sorted({t for row_toks in toks for t, n in _counts([o[0] for o in row_toks]).items() if n > 1})
        second: dict[int, Any] = {}  # shared first token -> next-token probabilities, all rows
        for g, first in enumerate(shared):
            # the step extends the KV cache in place: all but the last group work on a copy
            kv = _output_cache(first_out)
            cache = kv if g == len(shared) - 1 else copy.deepcopy(kv)
            step = self.model(
                input_ids=torch.full((len(contexts), 1), first, device=mask.device),
                attention_mask=torch.cat([mask, mask.new_ones((len(contexts), 1))], dim=-1),
                position_ids=pos[:, -1:] + 1,
                use_cache=True,
                **{_cache_arg(self.model): cache},
            )
            second[first] = torch.softmax(step.logits[:, -1, :].float(), dim=-1)
        results = []
        for row in range(len(contexts)):
            row_toks = toks[row]
            scores = [0.0] * len(options)
            by_first: dict[int, list[int]] = {}
            for k, t in enumerate(row_toks):
                by_first.setdefault(t[0], []).append(k)
            for first, members in by_first.items():
                p_first = float(probs[row, first])
                if len(members) == 1:
                    scores[members[0]] = p_first
                    continue
                p_next = second[first][row]
                longer = [k for k in members if len(row_toks[k]) > 1]
                ends_here = [k for k in members if len(row_toks[k]) == 1]
                taken = 0.0
                for k in longer:
                    q = float(p_next[row_toks[k][1]])
                    scores[k] = p_first * q
                    taken += q
                for k in ends_here:
                    scores[k] = p_first * max(0.0, 1.0 - taken) / len(ends_here)
            total = sum(scores)
            if total <= 0:
                results.append({o: 1.0 / len(options) for o in options})
            else:
                results.append({o: s / total for o, s in zip(options, scores, strict=True)})
        return results

    def close(self) -> None:
        self.model = None
        gc.collect()



def _counts(items: list[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def _cache_arg(model: Any) -> str:
    """The KV-cache argument's name: ``cache`` in transformers 5.x, ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _output_cache(out: Any) -> Any:
    return out["cache"] if "cache" in out else out["past_key_values"]


def _stop_end(tokenizer: Any, ids: list[int], stops: Sequence[str]) -> int | None:
    """The fewest leading tokens of ``ids`` whose text contains a stop string (None: none does)."""

    def has(k: int) -> bool:
        text = tokenizer.decode(ids[:k], skip_special_tokens=False)
        return any(s in text for s in stops)

    if not stops or not ids or not has(len(ids)):
        return None
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if has(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


# transformers' StoppingCriteria and LogitsProcessor protocols (callables; ``generate`` needs no base
# class), so that importing this module does not import transformers
class _StopInAnswer:
    """Ends a row once its ANSWER (the tokens after ``start``, the padded prompt's length) contains a
    stop string. transformers' ``stop_strings`` match the end of the whole sequence, prompt included:
    a stop string that begins in the prompt (a blank line, after a prompt that ends with a newline)
    ended the answer after its first token."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], start: int):
        self.tokenizer, self.stops, self.start = tokenizer, list(stops), start
        # the last tokens that can hold a stop string just completed: a character is at most 4 byte tokens
        self.window = 4 * max(len(s) for s in self.stops) + 4

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        tails = input_ids[:, self.start:][:, -self.window:].tolist()
        done = [any(s in self.tokenizer.decode(t, skip_special_tokens=False) for s in self.stops) for t in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _RowSampler:
    """Samples each row's next token with its own generator (its request's seed) after temperature and
    top-p, and leaves that token the only one with a finite score, so ``generate``'s greedy step takes it.
    A row's draws then depend on its own seed and logits only, not on the other rows of its batch."""

    def __init__(self, temperature: float, top_p: float, seeds: Sequence[int | None]):
        import torch

        self.temperature, self.top_p = temperature, top_p
        self.seeds = [int(torch.randint(0, 2**62, (1,))) if s is None else s for s in seeds]
        self.generators: list[Any] | None = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch
        from transformers import TopPLogitsWarper

        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            logits = TopPLogitsWarper(self.top_p)(input_ids, logits)
        probs = torch.softmax(logits, dim=-1)
        picks = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.generators)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, picks[:, None], 0.0)
