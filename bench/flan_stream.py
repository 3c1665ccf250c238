"""generate-orca on a Flan Collection file of several GB: peak memory must not grow with the file.

    .venv/bin/python bench/flan_stream.py [--gb 2] [--seeds 3600] [--paths file,json-builder] [--keep]

Writes a Flan-format JSONL (inputs, targets, task_source, task_name, template_type: four sub-mixes,
zero- and few-shot templates, ~1,900 tasks, inputs of 60-3,000 characters, 3% of 1,300-2,500 words) of at least ``--gb``
GB under /tmp, starts the scripted TGI teacher (tests/llm_server.py) in this process, and runs
``bezoar stage generate-orca`` on it as a subprocess under ``/usr/bin/time -v`` (peak resident
memory of the stage process). The recipe is the demo's with the paper's Orca settings: 3,600 seeds
at Orca's sub-mix proportions, zero-shot templates, the reservoir sample (one full pass), and the
teacher's context guard on (a 2,048-token context measured with a one-token-per-word tokenizer, as
the scripted server counts). ``--paths``: ``file`` reads the file with the stage's own incremental
reader; ``json-builder`` goes through ``datasets.load_dataset("json", data_files=..., streaming=True)``,
the code path a hub dataset takes. The file is deleted at the end unless ``--keep``. Figures go to
docs/benchmarks.md ("Flan streaming").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SUBS = (("CoT", 74), ("NIv2", 1556), ("T0", 193), ("Flan2021", 142))  # sub-mix, tasks (Orca's counts)
TEMPLATES = ("zs_opt", "zs_noopt", "fs_opt", "fs_noopt")
WORDS = ("the of and to a in that is was he for it with as his on be at by i this had not are but from or have "
         "an they which one you were her all she there would their we him been has when who will more no if out "
         "so said what up its about into than them can only other new some could time these two may then do "
         "first any my now such like our over man me even most made after also did many before must through "
         "back years where much your way well down should because each just those people how too little").split()


def write_flan(path: Path, gigabytes: float, seed: int = 0) -> dict[str, Any]:
    rnd = random.Random(seed)
    target = int(gigabytes * 1e9)
    n, size = 0, 0
    t0 = time.time()
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            src, tasks = SUBS[n % 4]
            words = int(min(600, max(10, rnd.lognormvariate(4.6, 0.8))))  # median ~100 words
            if rnd.random() < 0.03:  # a few NIv2-style definitions too long for a 2,048-token teacher
                words = rnd.randint(1300, 2500)
            inputs = " ".join(rnd.choice(WORDS) for _ in range(words))
            if n % 4 == 3 and n % 8 == 3:
                inputs += "\nOPTIONS:\n- yes\n- no\n- it is not possible to tell"
            line = json.dumps({
                "inputs": f"Task {n}: {inputs}",
                "targets": " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, 40))),
                "task_source": src,
                "task_name": f"{src.lower()}_task_{rnd.randrange(tasks)}",
                "template_type": TEMPLATES[(n // 4) % 4],
            }) + "\n"
            f.write(line)
            size += len(line.encode("utf-8"))
            n += 1
    return {"rows": n, "bytes": size, "write_s": round(time.time() - t0, 1)}


def answer(prompt: str) -> str:
    return "An explanation: first read the task, then reason about it, then answer it."


def run_stage(source: dict[str, Any], workdir: Path, url: str, tok: Path, seeds: int) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())
    data["teacher"] = {"backend": "tgi", "model": "scripted/teacher", "revision": "0" * 40, "base_url": url,
                       "prompt_format": "<|prompt|>{user}<|endoftext|><|answer|>", "max_concurrency": 32,
                       "context_tokens": 2048, "tokenizer": str(tok), "timeout_s": 30}
    data["seeds"]["flan"] = source
    data["generation"]["orca"] = {"seeds": seeds, "response_decoding": {"max_new_tokens": 768, "temperature": 0.3}}
    data["generation"]["flush_every"] = 256
    recipe = workdir / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    run = workdir / "run"
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "bezoar_jobs.cli", "stage", "generate-orca", "--recipe",
           str(recipe), "--run", str(run)]
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.time() - t0
    if res.returncode != 0:
        raise SystemExit(f"generate-orca failed:\n{res.stderr[-4000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))  # type: ignore[union-attr]
    manifest = json.loads((run / "generate-orca" / "_MANIFEST.json").read_text())
    card = (run / "generate-orca" / "data" / "README.md").read_text()
    sampling = json.loads(card.split("```json")[1].split("```")[0])["sampling"]
    return {"wall_s": round(wall, 1), "peak_rss_mib": round(rss_kb / 1024, 1), "rows": manifest["counts"]["rows"],
            "by_submix": manifest["counts"]["by_submix"], "sampling": sampling}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--seeds", type=int, default=3600)
    ap.add_argument("--paths", default="file,json-builder")
    ap.add_argument("--file", type=Path, default=Path("/tmp/bezoar-flan-bench.jsonl"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    from tests.llm_server import LLMTestServer
    from tests.tiny_model import build_word_tokenizer

    out: dict[str, Any] = {"gb_asked": a.gb}
    try:
        if not a.file.exists():
            out["file"] = write_flan(a.file, a.gb)
        else:
            out["file"] = {"bytes": a.file.stat().st_size, "reused": True}
        print(json.dumps(out["file"]), flush=True)
        with tempfile.TemporaryDirectory(prefix="bezoar-flan-bench-") as tmp, \
                LLMTestServer(script=answer, context_tokens=2048) as srv:
            tok = build_word_tokenizer(Path(tmp) / "tok")
            for kind in a.paths.split(","):
                source = {"path": str(a.file)} if kind == "file" else {"path": "json", "data_files": [str(a.file)]}
                work = Path(tmp) / kind
                work.mkdir()
                srv.reset()
                r = run_stage(source, work, srv.url, tok, a.seeds)
                r["refused_422"] = sum(1 for c in srv.calls if c.status == 422)
                out[kind] = r
                print(json.dumps({kind: r}), flush=True)
    finally:
        if not a.keep and a.file.exists():
            a.file.unlink()
    print(json.dumps(out, indent=2))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
