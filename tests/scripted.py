"""A scripted teacher and judge for fast pipeline tests, and a recipe that points at them.

The answers are deterministic functions of the prompt (the test's counterpart, not a result):
LaMini prompts get ``<example>`` lists, evolution prompts a rewritten task, responses a sentence,
the equality check "Different", the judge a JSON verdict whose rating depends on the prompt hash
(so some rows pass and some fail), and judge prompts containing ``NONSENSE`` an unparseable text.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _h(text: str) -> int:
    return zlib.crc32(text.encode())


_TOPIC_WORDS = ["Astronomy", "Gardening", "Railways", "Chess", "Volcanoes", "Baking", "Sailing", "Opera", "Bees",
                "Glaciers", "Pottery", "Tennis", "Deserts", "Printing", "Jazz", "Bridges", "Coffee", "Knitting"]


def scripted_answer(prompt: str) -> str:
    h = _h(prompt)
    if "<topic>" in prompt:
        # LaMini topic proposals: tags, plus one sentence that the topic check must drop
        picks = [_TOPIC_WORDS[(h + 5 * i) % len(_TOPIC_WORDS)] + ("" if i % 2 else f" of {h % 7}th kind")
                 for i in range(5)]
        sentence = "<topic>This is a whole sentence about many things.</topic>"
        return "\n".join(f"<topic>{t}</topic>" for t in picks) + "\n" + sentence
    if "<example>" in prompt and "Write" in prompt:
        # LaMini instruction generation; one answer in three uses a numbered list instead of tags
        items = [f"Explain scripted topic number {h % 1000} item {i} in plain words" for i in range(6)]
        if h % 3 == 0:
            return "Here are the tasks:\n" + "\n".join(f"{i + 1}. {x}" for i, x in enumerate(items))
        return "\n".join(f"<example>{x}</example>" for x in items)
    if "Task A:" in prompt and "Task B:" in prompt:
        return "Different"
    if prompt.rstrip().endswith(("New task:", "Invented task:")):
        return f"Describe in three steps how scripted process {h % 997} works and why it matters"
    if "Reply with JSON only" in prompt:
        if "NONSENSE" in prompt:
            return "I cannot decide."
        rating = 3 + h % 8  # 3..10
        status = "pass" if rating >= 5 else "fail"
        return json.dumps({"status": status, "rating": rating, "reason": f"scripted verdict {rating}"})
    return f"Here is a careful answer number {h % 10007}: first consider the question, then reply clearly."


def scripted_recipe(tmp: Path, url: str, **overrides) -> Path:
    """demo.yaml with the teacher (TGI) and judge (OpenAI chat) pointed at the scripted server."""
    data = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())
    data["teacher"] = {
        "backend": "tgi",
        "model": "scripted/teacher",
        "revision": "0123456789abcdef0123456789abcdef01234567",  # pinned: a priced run refuses unpinned ones
        "base_url": url,
        "prompt_format": "<|prompt|>{user}<|endoftext|><|answer|>",  # h2oGPT: no system slot
        "api_key_env": "SCRIPTED_JUDGE_KEY",  # a TGI behind a gateway that wants a bearer token
        "max_concurrency": 8,
        "max_retries": 3,
        "backoff_base_s": 0.05,
        "backoff_max_s": 0.2,
        "timeout_s": 10,
    }
    data["judge"] = {
        "backend": "openai-chat",
        "model": "scripted/judge",
        "base_url": url + "/v1",
        "api_key_env": "SCRIPTED_JUDGE_KEY",
        "max_concurrency": 8,
        "max_retries": 3,
        "backoff_base_s": 0.05,
        "backoff_max_s": 0.2,
        "timeout_s": 10,
        "price_input_per_mtok": 10.0,
        "price_output_per_mtok": 30.0,
    }
    data["filter"] = {"judge_name": "gpt4", "method": "generate", "threshold": 5, "max_attempts": 2}
    for dotted, value in overrides.items():
        node = data
        keys = dotted.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def longtail_pipeline_script(mu: float = 4.0, sigma: float = 1.0, seed: int = 0):
    """``scripted_answer`` with the responses (and evolutions) padded to log-normal lengths (median
    e**mu words), fixed per prompt: the benchmark's teacher, as long-tailed as a real one."""
    import math
    import random

    def script(prompt: str) -> str:
        text = scripted_answer(prompt)
        rng = random.Random(_h(prompt) ^ seed)
        if text.startswith(("Here is a careful answer", "Describe in three steps")):
            n = max(1, round(math.exp(rng.gauss(mu, sigma))))
            text += " and" + " more" * n
        elif "Reply with JSON only" in prompt and text.startswith("{"):
            # a verdict runs to 50-80 tokens, as the estimates take it (at most 150 words: the JSON must close)
            verdict = json.loads(text)
            verdict["reason"] += " because" + " so" * min(150, round(math.exp(rng.gauss(mu - 0.3, sigma / 2))))
            text = json.dumps(verdict)
        return text

    return script


def edited_demo(tmp_path: Path, old: str, new: str, at: str, name: str = "bad.yaml") -> tuple[Path, int]:
    """recipes/demo.yaml with ``old`` replaced by ``new`` (once), written to ``tmp_path/name``; and the line
    holding ``at`` (where an error about the edit must point)."""
    demo = (REPO / "recipes" / "demo.yaml").read_text()
    assert old in demo, old
    text = demo.replace(old, new, 1)
    p = tmp_path / name
    p.write_text(text)
    return p, next(n for n, ln in enumerate(text.splitlines(), 1) if at in ln)
