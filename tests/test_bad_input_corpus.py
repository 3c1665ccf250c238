"""The bad-input corpus (issue 11, finding 9): every case ends with exit 2, one error line that names
the place (file, field, line, URI), and no traceback.

Recipes, seed and template files, server answers and run-store states, each through the real CLI
in a subprocess (what a Kubernetes Job runs). A case is ``(args, expected fragments)`` built in its
own directory; the fragments must all be on the one ERROR line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.llm_server import LLMTestServer
from tests.scripted import scripted_answer, scripted_recipe

DEAD = "http://127.0.0.1:9"  # never contacted: these cases fail before the first request
GOOD_DOLLY = {"instruction": "Name a colour.", "context": "", "response": "Red.", "category": "open_qa"}
Case = Callable[[Path, dict[str, str]], tuple[list[str], list[str]]]
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def add(fn: Case) -> Case:
        CASES[name] = fn
        return fn

    return add


def recipe(tmp: Path, url: str = DEAD, **over: Any) -> Path:
    return scripted_recipe(tmp, url, **over)


def raw_recipe(tmp: Path, text: str | bytes) -> Path:
    p = tmp / "bad.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def plan(r: Path, tmp: Path) -> list[str]:
    return ["plan", "--recipe", str(r), "--run", str(tmp / "run")]


def stage(name: str, r: Path, tmp: Path | str, *more: str) -> list[str]:
    run = tmp if isinstance(tmp, str) else str(tmp / "run")
    return ["stage", name, "--recipe", str(r), "--run", run, *more]


def edited(tmp: Path, **over: Any) -> str:
    """The scripted recipe's text with ``over`` (dotted keys) applied, for raw edits."""
    return recipe(tmp, **over).read_text()


# ---- recipes -------------------------------------------------------------------------------------
@case("recipe-missing")
def _(tmp, env):
    return plan(tmp / "nope.yaml", tmp), [f"{tmp / 'nope.yaml'}: recipe file not found"]


@case("recipe-is-a-directory")
def _(tmp, env):
    (tmp / "dir.yaml").mkdir()
    return plan(tmp / "dir.yaml", tmp), [f"{tmp / 'dir.yaml'}: is a directory"]


@case("recipe-not-utf8")
def _(tmp, env):
    text = edited(tmp).replace("name: openbezoar-demo", "name: caf\xe9").encode("latin-1")
    r = raw_recipe(tmp, text)
    line = text.split(b"\n").index(b"name: caf\xe9") + 1
    return plan(r, tmp), [f"{r}:{line}: the recipe is not UTF-8 text (byte 0xe9"]


@case("recipe-not-yaml")
def _(tmp, env):
    r = raw_recipe(tmp, "schema_version: 1\nname: [unclosed\nseed: 1\n")
    return plan(r, tmp), [f"{r}:", "recipe is not valid YAML"]


@case("recipe-not-a-mapping")
def _(tmp, env):
    r = raw_recipe(tmp, "- a\n- b\n")
    return plan(r, tmp), [f"{r}: a recipe must be a YAML mapping"]


@case("recipe-no-schema-version")
def _(tmp, env):
    r = raw_recipe(tmp, "name: x\n")
    return plan(r, tmp), [f"{r}: schema_version: missing"]


@case("recipe-schema-version-2")
def _(tmp, env):
    r = raw_recipe(tmp, edited(tmp).replace("schema_version: 1", "schema_version: 2"))
    return plan(r, tmp), [f"{r}:1: schema_version: 2 is not supported"]


def _field_case(name: str, dotted: str, value: Any, *fragments: str) -> None:
    @case(name)
    def _(tmp: Path, env: dict[str, str]) -> tuple[list[str], list[str]]:
        r = recipe(tmp, **{dotted: value})
        return plan(r, tmp), [f"{r}:", *fragments]


_field_case("unknown-top-level-key", "teachr", {"backend": "local"}, "teachr: unknown key")
_field_case("unknown-backend", "teacher.backend", "vllm", "teacher.backend: Input should be")
_field_case("tgi-without-base-url", "teacher.base_url", None, "teacher: Value error, backend 'tgi' needs base_url")
_field_case("prompt-format-without-user", "teacher.prompt_format", "{system}", "prompt_format must contain {user}")
_field_case("key-env-and-file", "judge.api_key_file", "/k", "judge: Value error, give api_key_env or api_key_file")
_field_case("negative-prompts", "generation.lamini.example_prompts", -1, "generation.lamini.example_prompts:")
_field_case("no-lamini-prompts", "generation.lamini", {"example_prompts": 0, "topic_prompts": 0},
            "generation.lamini: Value error, example_prompts and topic_prompts are both 0")
_field_case("threshold-out-of-range", "filter.threshold", 11, "filter.threshold: Input should be less than")
_field_case("logprobs-remote-judge", "filter.method", "logprobs", "filter.method 'logprobs' needs judge.backend")
_field_case("sft-order-incomplete", "training.sft_order", ["lamini", "orca"], "training.sft_order:")
_field_case("lora-typo", "training.lora", {"rr": 8}, "training.lora.rr: unknown key: not a field of LoraConfig")
_field_case("sft-args-typo", "training.sft_args", {"learning_rat": 1e-4}, "training.sft_args.learning_rat: unknown")
_field_case("optim-typo", "training.sft_args", {"optim": "adamw_torh"}, "training.sft_args.optim: 'adamw_torh'")
_field_case("unknown-stage-args", "training.stage_args", {"sft-x": {}}, "training.stage_args: Value error")
_field_case("unknown-attention", "training.attention", "sdpaa", "training.attention: Value error")
_field_case("failed-fraction-above-1", "generation.max_failed_fraction", 1.5, "generation.max_failed_fraction:")
_field_case("empty-name", "name", " ", "name: Value error, must not be empty")
_field_case("seed-not-int", "seed", "abc", "seed: Input should be a valid integer")
_field_case("owned-trl-key", "training.sft_args", {"output_dir": "/x"},
            "training.sft_args.output_dir: set by the stage")


# ---- seed and template files ---------------------------------------------------------------------
def _seed_case(name: str, write: Callable[[Path], Path], fragment: Callable[[Path], str],
               stage_name: str = "generate-lamini", field: str = "seeds.dolly") -> None:
    @case(name)
    def _(tmp: Path, env: dict[str, str]) -> tuple[list[str], list[str]]:
        path = write(tmp)
        r = recipe(tmp, **{field: {"path": str(path)}})
        return stage(stage_name, r, tmp), [fragment(path)]


def _lines(tmp: Path, name: str, lines: list[str | bytes]) -> Path:
    p = tmp / name
    p.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return p


_seed_case("seed-missing", lambda t: t / "none.jsonl", lambda p: f"{p}: file not found")
_seed_case("seed-is-a-directory", lambda t: (t / "dir.jsonl").mkdir() or t / "dir.jsonl",
           lambda p: f"{p}: is a directory")
_seed_case("seed-not-utf8", lambda t: _lines(t, "d.jsonl", [json.dumps(GOOD_DOLLY), b'{"instruction": "caf\xe9"}']),
           lambda p: f"{p}:2: not UTF-8 text (byte 0xe9")
_seed_case("seed-broken-json", lambda t: _lines(t, "d.jsonl", [json.dumps(GOOD_DOLLY)] * 2 + ["{broken"]),
           lambda p: f"{p}:3: not valid JSON")
_seed_case("seed-missing-field", lambda t: _lines(t, "d.jsonl", [json.dumps(GOOD_DOLLY), '{"instruction": "x"}']),
           lambda p: f"{p}:2: missing field(s) 'context', 'response', 'category'")
_seed_case("seed-line-not-an-object", lambda t: _lines(t, "d.jsonl", [json.dumps(GOOD_DOLLY), "[1, 2]"]),
           lambda p: f"{p}:2: each line must be a JSON object")
_seed_case("seed-empty", lambda t: _lines(t, "d.jsonl", [""]), lambda p: f"seeds.dolly.path: {p}: the dataset is empty")
_seed_case("seed-unsupported-type", lambda t: _lines(t, "d.txt", ["x"]),
           lambda p: f"{p}: unsupported dataset file type '.txt'")
_seed_case("flan-csv-not-utf8", lambda t: _lines(t, "f.csv", ["inputs,targets", b"caf\xe9,x"]),
           lambda p: f"{p}:2: not UTF-8 text", stage_name="generate-orca", field="seeds.flan")
_seed_case("flan-json-broken", lambda t: _lines(t, "f.json", ['[{"inputs": 1},']),
           lambda p: f"{p}:2: not valid JSON", stage_name="generate-orca", field="seeds.flan")


def _bytes(tmp: Path, name: str, data: bytes) -> Path:
    p = tmp / name
    p.write_bytes(data)
    return p


def _gzip(tmp: Path, name: str, lines: list[str | bytes], cut: bool = False) -> Path:
    """A gzip-compressed JSONL file; ``cut``: only the first half of the compressed bytes."""
    import gzip

    data = gzip.compress(_lines(tmp, name, lines).read_bytes())
    return _bytes(tmp, name, data[: len(data) // 2] if cut else data)


def _parquet(tmp: Path, name: str, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp / name)
    return tmp / name


GOOD_FLAN = {"inputs": "Q: 1 + 1?", "targets": "2", "task_source": "Flan2021", "task_name": "add",
             "template_type": "zs_opt"}
# damaged files: bad input naming the file (and the last line or row read), not a traceback and exit 1
_seed_case("flan-parquet-garbage", lambda t: _bytes(t, "f.parquet", b"PAR1garbagegarbagePAR1"),
           lambda p: f"seeds.flan: {p}: not a readable parquet file: damaged at the start",
           stage_name="generate-orca", field="seeds.flan")
_seed_case("seed-gz-not-gzip", lambda t: _lines(t, "d.jsonl.gz", [json.dumps(GOOD_DOLLY)]),
           lambda p: f"seeds.dolly: {p}: not valid gzip data at the start")
_seed_case("seed-gz-cut-off",
           lambda t: _gzip(t, "d.jsonl.gz", [json.dumps({**GOOD_DOLLY, "instruction": f"Colour {i}?"})
                                             for i in range(2000)], cut=True),
           lambda p: f"seeds.dolly: {p}: the gzip data is cut off after line ")
_seed_case("seed-gz-not-utf8",
           lambda t: _gzip(t, "d.jsonl.gz", [json.dumps(GOOD_DOLLY), b'{"instruction": "caf\xe9"}']),
           lambda p: f"seeds.dolly: {p}:2: not UTF-8 text (byte 0xe9")
_seed_case("flan-csv-short-row",
           lambda t: _lines(t, "f.csv", [",".join(GOOD_FLAN), ",".join(GOOD_FLAN.values()), "a,b"]),
           lambda p: f"{p}:3: row 2 has fewer columns than the header", stage_name="generate-orca", field="seeds.flan")
# a field of the wrong type: never turned into the text "None" and sent to the teacher
_seed_case("flan-inputs-null", lambda t: _lines(t, "f.jsonl", [json.dumps(GOOD_FLAN)] * 2
                                                + [json.dumps({**GOOD_FLAN, "inputs": None})]),
           lambda p: f"seeds.flan: {p}:3: field 'inputs' must be text, got null",
           stage_name="generate-orca", field="seeds.flan")
_seed_case("flan-parquet-targets-null", lambda t: _parquet(t, "f.parquet", [GOOD_FLAN, {**GOOD_FLAN, "targets": None}]),
           lambda p: f"seeds.flan: {p}: row 2: field 'targets' must be text, got null",
           stage_name="generate-orca", field="seeds.flan")
_seed_case("seed-instruction-a-list",
           lambda t: _lines(t, "d.jsonl", [json.dumps(GOOD_DOLLY), json.dumps({**GOOD_DOLLY, "instruction": ["x"]})]),
           lambda p: f"seeds.dolly: {p}:2: field 'instruction' must be text, got a list")
_seed_case("seed-context-an-object",
           lambda t: _lines(t, "d.jsonl", [json.dumps({**GOOD_DOLLY, "context": {"a": 1}})]),
           lambda p: f"seeds.dolly: {p}:1: field 'context' must be text, got an object", stage_name="generate-evol")
_seed_case("seed-instruction-nan",
           lambda t: _lines(t, "d.jsonl", [json.dumps(GOOD_DOLLY), json.dumps({**GOOD_DOLLY, "instruction": "x"})
                                           .replace('"x"', "NaN")]),
           lambda p: f"seeds.dolly: {p}:2: field 'instruction' must be text, got a number (NaN)")


@case("template-missing-placeholder")
def _(tmp, env):
    t = tmp / "example.txt"
    t.write_text("Write some tasks.\n")
    r = recipe(tmp, **{"generation.lamini.example_template": {"path": str(t)}})
    return stage("generate-lamini", r, tmp), [f"generation.lamini.example_template: template {t} lacks placeholder"]


@case("template-not-utf8")
def _(tmp, env):
    t = tmp / "example.txt"
    t.write_bytes(b"{examples} {n}\ncaf\xe9\n")
    r = recipe(tmp, **{"generation.lamini.example_template": {"path": str(t)}})
    return stage("generate-lamini", r, tmp), [f"generation.lamini.example_template: {t}:2: not UTF-8 text"]


@case("topics-missing")
def _(tmp, env):
    r = recipe(tmp, **{"generation.lamini.topics": {"path": str(tmp / "topics.jsonl")}})
    return stage("generate-lamini", r, tmp), [f"{tmp / 'topics.jsonl'}: file not found"]


@case("system-messages-missing-field")
def _(tmp, env):
    p = _lines(tmp, "sys.jsonl", ['{"id": 1, "text": "be brief"}'])
    r = recipe(tmp, **{"generation.orca.system_messages": {"path": str(p)}})
    return stage("generate-orca", r, tmp), [f"{p}:1: missing field(s) 'submixes'"]


@case("topics-null")
def _(tmp, env):
    p = _lines(tmp, "topics.jsonl", ['{"topic": "rivers"}', '{"topic": null}'])
    r = recipe(tmp, **{"generation.lamini.topics": {"path": str(p)}})
    return stage("generate-lamini", r, tmp), [f"generation.lamini.topics: {p}:2: field 'topic' must be text, got null"]


@case("system-messages-text-null")
def _(tmp, env):
    p = _lines(tmp, "sys.jsonl", ['{"id": 1, "text": null, "submixes": ["niv2", "t0", "flan2021", "cot"]}'])
    r = recipe(tmp, **{"generation.orca.system_messages": {"path": str(p)}})
    return stage("generate-orca", r, tmp), [f"{p}:1: field 'text' must be text, got null"]


@case("api-key-env-unset")
def _(tmp, env):
    env.pop("SCRIPTED_JUDGE_KEY", None)
    return stage("generate-orca", recipe(tmp), tmp), ["teacher.api_key_env: environment variable SCRIPTED_JUDGE_KEY"]


@case("api-key-file-missing")
def _(tmp, env):
    r = recipe(tmp, **{"teacher.api_key_env": None, "teacher.api_key_file": str(tmp / "key")})
    return stage("generate-orca", r, tmp), [f"teacher.api_key_file: {tmp / 'key'} does not exist"]


@case("student-model-missing")
def _(tmp, env):
    from bezoar_jobs.store import open_store
    from tests.test_training import commit_filter, lamini_rows

    r = recipe(tmp, **{"student.model": str(tmp / "no-model")})
    commit_filter(open_store(tmp / "run"), "lamini", lamini_rows(3), tmp, None)
    return stage("sft-lamini", r, tmp), [f"student.model: model {str(tmp / 'no-model')!r}: directory"]


# ---- server answers --------------------------------------------------------------------------------
def _server_case(name: str, fault: str, *fragments: str) -> None:
    @case(name)
    def _(tmp: Path, env: dict[str, str]) -> tuple[list[str], list[str]]:
        url = env.pop("_SERVERS_" + fault)
        return stage("generate-orca", recipe(tmp, url), tmp), list(fragments)


_server_case("server-401", "401", "teacher (tgi http://127.0.0.1:", "HTTP 401 (authentication refused",
             "check the key in $SCRIPTED_JUDGE_KEY")
_server_case("server-404", "404", "teacher (tgi http://127.0.0.1:", "HTTP 404", "wrong base_url or unknown model")
_server_case("server-400-every-request", "400", "teacher (tgi http://127.0.0.1:",
             "the first 8 requests were all refused")


@case("judge-keeps-nothing")
def _(tmp, env):
    url = env.pop("_SERVERS_harsh")
    r = recipe(tmp, url)
    subprocess.run([sys.executable, "-m", "bezoar_jobs.cli", *stage("generate-orca", r, tmp)], env=env,
                   capture_output=True, check=True, timeout=120)
    return stage("filter-orca", r, tmp), ["filter-orca: the judge kept none of the 24 rows", "filter.allow_empty"]


# ---- run store states -------------------------------------------------------------------------------
def _committed_orca(tmp: Path, env: dict[str, str]) -> Path:
    url = env.pop("_SERVERS_good")
    r = recipe(tmp, url)
    subprocess.run([sys.executable, "-m", "bezoar_jobs.cli", *stage("generate-orca", r, tmp)], env=env,
                   capture_output=True, check=True, timeout=120)
    return r


@case("input-not-committed")
def _(tmp, env):
    return stage("filter-orca", recipe(tmp), tmp), ["filter-orca: input stage 'generate-orca' is not committed in"]


@case("input-manifest-truncated")
def _(tmp, env):
    r = _committed_orca(tmp, env)
    m = tmp / "run" / "generate-orca" / "_MANIFEST.json"
    m.write_text(m.read_text()[:50])
    return stage("filter-orca", r, tmp), [f"{m.as_uri()}: the manifest is damaged", "bezoar repair"]


@case("input-manifest-without-files")
def _(tmp, env):
    r = _committed_orca(tmp, env)
    m = tmp / "run" / "generate-orca" / "_MANIFEST.json"
    m.write_text("{}")
    return stage("filter-orca", r, tmp), [f"{m.as_uri()}: the manifest is damaged (no valid 'files' table)"]


@case("input-file-edited")
def _(tmp, env):
    r = _committed_orca(tmp, env)
    data = tmp / "run" / "generate-orca" / "data" / "train.jsonl"
    data.write_text(data.read_text() + "\n")
    return stage("filter-orca", r, tmp), [f"input {data.as_uri()}: ", "its manifest says", "bezoar repair"]


@case("input-file-missing")
def _(tmp, env):
    r = _committed_orca(tmp, env)
    (tmp / "run" / "generate-orca" / "data" / "train.jsonl").unlink()
    return stage("filter-orca", r, tmp), [f"{(tmp / 'run' / 'generate-orca' / 'data' / 'train.jsonl').as_uri()}",
                                          "no such file in the run"]


@case("frozen-recipe-missing")
def _(tmp, env):
    (tmp / "run").mkdir()
    return ["stage", "generate-orca", "--recipe", str(tmp / "run" / "recipe.yaml"), "--run", str(tmp / "run")], [
        f"{tmp / 'run' / 'recipe.yaml'}: recipe file not found"]


@case("frozen-recipe-damaged")
def _(tmp, env):
    (tmp / "run").mkdir()
    (tmp / "run" / "recipe.yaml").write_bytes(b"schema_version: 1\nname: \xff\n")
    return ["stage", "generate-orca", "--recipe", str(tmp / "run" / "recipe.yaml"), "--run", str(tmp / "run")], [
        f"{tmp / 'run' / 'recipe.yaml'}:2: the recipe is not UTF-8 text"]


@case("run-uri-unsupported-scheme")
def _(tmp, env):
    return stage("generate-orca", recipe(tmp), "gs://bucket/run"), ["run URI 'gs://bucket/run': unsupported scheme"]


@case("s3-bucket-missing")
def _(tmp, env):
    env.update(json.loads(env.pop("_S3_ENV")))
    return stage("generate-orca", recipe(tmp), "s3://no-such-bucket-bz/run"), [
        "s3://no-such-bucket-bz/run/", "bucket 'no-such-bucket-bz' does not exist"]


@case("s3-frozen-recipe-missing")
def _(tmp, env):
    env.update(json.loads(env.pop("_S3_ENV")))
    uri = env.pop("_S3_RUN")
    return ["stage", "generate-orca", "--recipe", f"{uri}/recipe.yaml", "--run", uri], [
        f"{uri}/recipe.yaml: no such object in the run"]


@case("shard-out-of-range")
def _(tmp, env):
    return stage("generate-orca", recipe(tmp), tmp, "--shard", "3/2"), ["--shard '3/2': need 0 <= i < N"]


@case("only-without-committed-input")
def _(tmp, env):
    r = recipe(tmp)
    return ["run", "--recipe", str(r), "--run", str(tmp / "run"), "--only", "filter-evol"], [
        "--only filter-evol: its input stage 'generate-evol' is not committed"]


# ---- the test -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def servers():
    harsh = json.dumps({"status": "fail", "rating": 1, "reason": "no"})
    made = {
        "401": LLMTestServer(script=scripted_answer, api_key="test-key", rule=lambda p: "401"),
        "404": LLMTestServer(script=scripted_answer, api_key="test-key", rule=lambda p: "404"),
        "400": LLMTestServer(script=scripted_answer, api_key="test-key", rule=lambda p: "400"),
        "good": LLMTestServer(script=scripted_answer, api_key="test-key"),
        "harsh": LLMTestServer(script=lambda p: harsh if "Reply with JSON only" in p else scripted_answer(p),
                               api_key="test-key"),
    }
    for s in made.values():
        s.start()
    yield {k: s.url for k, s in made.items()}
    for s in made.values():
        s.stop()


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 70


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_exits_2_with_one_line_naming_the_place(name, tmp_path, servers, request):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BEZOAR_S3_"))}
    env["SCRIPTED_JUDGE_KEY"] = "test-key"
    env.update({f"_SERVERS_{k}": v for k, v in servers.items()})
    if name.startswith("s3-"):
        s3 = request.getfixturevalue("s3_server")
        env["_S3_ENV"] = json.dumps({**s3.env(), "AWS_CONFIG_FILE": "/nonexistent",
                                     "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"})
        env["_S3_RUN"] = request.getfixturevalue("s3_run_uri")
    args, fragments = CASES[name](tmp_path, env)
    env = {k: v for k, v in env.items() if not k.startswith("_")}
    res = subprocess.run([sys.executable, "-m", "bezoar_jobs.cli", *args], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if " ERROR " in ln]
    assert len(errors) == 1, res.stderr[-3000:]
    tail = res.stderr[res.stderr.index(errors[0]) + len(errors[0]):].strip()
    if args[0] != "run":  # nothing follows the error line: it is the whole message
        assert tail == "", res.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
