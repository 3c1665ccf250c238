"""EleutherAI's LM Evaluation Harness (``lm_eval.simple_evaluate``) on one model.

Tasks come from the recipe with their shot counts and pinned versions. Each task (or group, such
as ``mmlu``) is loaded through a ``TaskManager`` first, so an unknown name or a version that differs
from the pin fails (exit 2) before any model is loaded; its leaf tasks then get the recipe's
``num_fewshot`` (but those whose own config says ``num_fewshot: 0``, which lm_eval's ``--num_fewshot``
leaves zero-shot too) and the loaded objects go to ``simple_evaluate``, so one call evaluates tasks
with different shot counts.

Local tasks (the demo's, or a user's) are YAML files in ``evaluation.harness.include_path``. The
demo's take their data from a ``custom_dataset`` function beside them, so they run as shipped with
the ``lm_eval`` CLI too. For a user's YAML that names data files relative to itself, the harness
resolves relative ``data_files`` against the working directory, so the directory is copied to
scratch and ``${task_dir}`` in each YAML is replaced with the YAML's own absolute directory.

Seeds are lm_eval's own defaults (0, 1234, 1234, 1234: few-shot seed 1234, as the Open LLM
Leaderboard ran) unless the recipe gives ``evaluation.harness.seed``; every results file records the
``lm_eval`` command lines that reproduce it (:func:`cli_commands`).
When every task is found there, the harness's ~15k built-in task configs are not indexed at all
(that alone takes tens of seconds on a small CPU).
"""

from __future__ import annotations

import difflib
import logging
import math
import shutil
from pathlib import Path
from typing import Any

from ..errors import BadInput
from ..recipe_eval import HarnessConfig, HarnessTask

log = logging.getLogger("bezoar")

TASK_DIR_TOKEN = "${task_dir}"
_FIELD = "evaluation.harness"


def prepare_include_dir(uri: str | None, scratch: Path) -> Path | None:
    """A local copy of the include directory with ``${task_dir}`` filled in, or None."""
    if not uri:
        return None
    dest = scratch / "harness_tasks"
    if dest.exists():
        shutil.rmtree(dest)
    if uri.startswith("s3://"):
        from ..store import open_store

        open_store(uri.rstrip("/")).download_dir("", dest)
    else:
        if uri.startswith("pkg://"):
            from ..data.io import resolve_pkg

            src = resolve_pkg(uri)
        else:
            src = Path(uri.removeprefix("file://")).expanduser()
        if not src.is_dir():
            raise BadInput(f"{_FIELD}.include_path: {uri} is not a directory")
        shutil.copytree(src, dest)
    n = 0
    for y in sorted(list(dest.rglob("*.yaml")) + list(dest.rglob("*.yml"))):
        text = y.read_text(encoding="utf-8")
        if TASK_DIR_TOKEN in text:
            y.write_text(text.replace(TASK_DIR_TOKEN, str(y.parent.resolve())), encoding="utf-8")
        n += 1
    if n == 0:
        raise BadInput(f"{_FIELD}.include_path: {uri} holds no task YAML files")
    return dest


def task_manager(include_dir: Path | None, names: list[str]) -> Any:
    """A TaskManager that knows every name in ``names``; BadInput naming the unknown ones."""
    from lm_eval.tasks import TaskManager

    if include_dir is not None:
        local = TaskManager(include_path=str(include_dir), include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    tm = TaskManager(include_path=str(include_dir) if include_dir else None)
    for i, n in enumerate(names):
        if n not in tm.all_tasks:
            close = difflib.get_close_matches(n, tm.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise BadInput(f"{_FIELD}.tasks.{i}.name: the harness (lm_eval) has no task or group {n!r}{hint}")
    return tm


def _same_version(a: Any, b: Any) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a).strip() == str(b).strip()


def load_tasks(tm: Any, tasks: tuple[HarnessTask, ...]) -> tuple[list[Any], dict[str, Any]]:
    """The task/group objects to evaluate (shots set) and each recipe task's installed version."""
    from lm_eval.api.group import Group

    objects: list[Any] = []
    versions: dict[str, Any] = {}
    for i, t in enumerate(tasks):
        loaded = tm.load([t.name])
        top: Any
        if t.name in loaded.get("groups", {}):
            top = loaded["groups"][t.name]
            meta = getattr(top, "metadata", None) or {}  # lm_eval 0.4.13's Group: metadata, no config
            version = meta.get("version") if isinstance(meta, dict) else None
        elif t.name in loaded["tasks"]:
            top = loaded["tasks"][t.name]
            version = getattr(top, "VERSION", None)
        else:  # a tag has no aggregate score of its own: the recipe must list its tasks
            raise BadInput(
                f"{_FIELD}.tasks.{i}.name: {t.name!r} is a tag of {len(loaded['tasks'])} tasks, not a task or "
                f"group; list the tasks you want ({', '.join(sorted(loaded['tasks'])[:5])}, ...)"
            )
        if t.version is not None and (version is None or not _same_version(version, t.version)):
            raise BadInput(
                f"{_FIELD}.tasks.{i}.version: {t.name!r} is pinned to version {t.version} but the installed "
                f"lm_eval has version {version} (update the pin or install the matching lm_eval)"
            )
        versions[t.name] = version
        # lm_eval's --num_fewshot never overrides a task whose own config says num_fewshot: 0 (simple_evaluate,
        # lm_eval/evaluator.py): those leaves stay zero-shot here too, so the recorded command reproduces the run
        leaves = loaded["tasks"]
        zero_only = [n for n, leaf in leaves.items() if leaf.get_config("num_fewshot") == 0]
        if t.num_fewshot > 0 and len(zero_only) == len(leaves):
            raise BadInput(
                f"{_FIELD}.tasks.{i}.num_fewshot: {t.name!r} is zero-shot in lm_eval (its config sets "
                f"num_fewshot: 0, which lm_eval's --num_fewshot does not override); use num_fewshot: 0"
            )
        for name, leaf in leaves.items():
            if t.num_fewshot > 0 and name in zero_only:
                log.warning("harness: %s (in %s) stays zero-shot, as lm_eval keeps it (num_fewshot: 0 in its config)",
                            name, t.name)
                continue
            leaf.set_config(key="num_fewshot", value=t.num_fewshot)
        objects.append(top)
        if isinstance(top, Group):
            log.info("harness: %s is a group of %d tasks", t.name, len(loaded["tasks"]))
    return objects, versions


# lm_eval's own default seeds (python random, numpy, torch, few-shot sampler): its CLI's --seed default
LM_EVAL_SEEDS: tuple[int, int, int, int] = (0, 1234, 1234, 1234)


def seeds(cfg: HarnessConfig) -> tuple[int | None, int | None, int | None, int | None]:
    """The four seeds the harness runs with: the recipe's, else lm_eval's defaults."""
    return cfg.seed if cfg.seed is not None else LM_EVAL_SEEDS


def cli_commands(model_dir: str, dtype: str, device: str, include_path: str | None, cfg: HarnessConfig,
                 revision: str | None = None, trust_remote_code: bool = False) -> list[str]:
    """The ``lm_eval`` command lines that reproduce an evaluation: one per shot count (the CLI sets
    one ``--num_fewshot`` for all the tasks it is given). ``DISABLE_MULTIPROC=1`` as the stage runs
    it (see :func:`evaluate`). The CLI always bootstraps 100,000 times: with another
    ``bootstrap_iters`` the metrics are reproduced, the bootstrapped stderrs not
    (:func:`cli_note`)."""
    import shlex

    margs = [f"pretrained={model_dir}", *([f"revision={revision}"] if revision else [])]
    if cfg.backend == "vllm":  # exactly the keywords the stage gives lm_eval's VLLM (its engine seed included)
        kw = vllm_model_args(model_dir, cfg, dtype, trust_remote_code)
        margs += [f"{k}={v}" for k, v in kw.items() if k not in ("pretrained", "batch_size")]
    else:
        margs.append(f"dtype={dtype}")
        if cfg.max_length is not None:
            margs.append(f"max_length={cfg.max_length}")
        if cfg.add_bos_token is not None:
            margs.append(f"add_bos_token={cfg.add_bos_token}")
        if trust_remote_code:
            margs.append("trust_remote_code=True")
    seed = ",".join("None" if x is None else str(x) for x in seeds(cfg))
    by_shots: dict[int, list[str]] = {}
    for t in cfg.tasks:
        by_shots.setdefault(t.num_fewshot, []).append(t.name)
    out = []
    for shots, names in by_shots.items():
        argv = ["lm_eval", "--model", cfg.backend, "--model_args", ",".join(margs), "--tasks", ",".join(names),
                "--num_fewshot", str(shots), "--batch_size", str(cfg.batch_size)]
        if cfg.backend == "hf":  # vLLM places the model itself
            argv += ["--device", device]
        if include_path:
            argv += ["--include_path", include_path]
        if cfg.limit is not None:
            argv += ["--limit", str(cfg.limit)]
        argv += ["--seed", seed]  # (the CLI has no --bootstrap_iters: it always takes lm_eval's 100,000)
        out.append("DISABLE_MULTIPROC=1 " + shlex.join(argv))
    return out


def cli_note(cfg: HarnessConfig) -> str | None:
    """What the recorded command lines cannot reproduce, if anything."""
    if cfg.bootstrap_iters == 0:  # lm_eval then records every stderr as N/A (lm_eval/evaluator_utils.py)
        return ("bootstrap_iters 0: no stderr was computed (all null here), the lm_eval CLI (always 100000) "
                "computes them; every metric value is reproduced")
    if cfg.bootstrap_iters != 100_000:
        return (f"bootstrap_iters {cfg.bootstrap_iters}: the lm_eval CLI always uses 100000, so the stderrs of "
                "bootstrapped metrics (perplexity, ...) differ; every metric value is reproduced")
    return None


def include_path_for_cli(uri: str | None) -> str | None:
    """The include directory as the lm_eval CLI can be given it (a package's installed directory)."""
    if not uri:
        return None
    if uri.startswith("pkg://"):
        from ..data.io import resolve_pkg

        return str(resolve_pkg(uri))
    return uri.removeprefix("file://")


def check_backend(cfg: HarnessConfig) -> None:
    """The vllm backend needs CUDA, the vllm package and, for data parallelism, ray: refused up front (exit 2)
    naming the field, before any model is loaded."""
    if cfg.backend != "vllm":
        return
    from importlib.util import find_spec

    if find_spec("vllm") is None:
        raise BadInput("evaluation.harness.backend: 'vllm' needs the vllm package (a CUDA eval image); it is not "
                       "installed here (use backend: hf)")
    if cfg.data_parallel_size > 1 and find_spec("ray") is None:
        raise BadInput("evaluation.harness.data_parallel_size: lm_eval runs vLLM replicas with ray, which is not "
                       "installed")
    import torch

    have = torch.cuda.device_count()
    if have < cfg.gpus:
        raise BadInput(f"evaluation.harness: data_parallel_size x tensor_parallel_size = {cfg.gpus} GPUs, this pod has "
                       f"{have}")


def vllm_model_args(model_dir: str, cfg: HarnessConfig, dtype: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """The keywords of lm_eval's ``VLLM`` model for one checkpoint. ``dtype`` is the recipe's
    ``evaluation.dtype`` as is: lm_eval's wrapper and vLLM's engine both take auto, float32, bfloat16
    and float16 (auto: vLLM's own choice from the checkpoint's config). ``trust_remote_code``: the
    model's (a baseline's ``trust_remote_code``); lm_eval's VLLM defaults to False for the engine,
    the config and the tokenizer."""
    torch_seed = seeds(cfg)[2]
    kw: dict[str, Any] = {"pretrained": model_dir, "batch_size": cfg.batch_size, "dtype": dtype,
                          "tensor_parallel_size": cfg.tensor_parallel_size,
                          "data_parallel_size": cfg.data_parallel_size,
                          "gpu_memory_utilization": cfg.gpu_memory_utilization,
                          "seed": torch_seed if torch_seed is not None else 1234}
    if cfg.max_length is not None:
        kw["max_length"] = cfg.max_length
    if cfg.add_bos_token is not None:
        kw["add_bos_token"] = cfg.add_bos_token
    if trust_remote_code:
        kw["trust_remote_code"] = True
    return kw


def evaluate_vllm(model_dir: str, tm: Any, task_objects: list[Any], cfg: HarnessConfig,
                  dtype: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """The same evaluation with lm_eval's vLLM backend, data- and tensor-parallel as the recipe says,
    the weights in ``dtype`` (the recipe's ``evaluation.dtype``)."""
    import os

    import lm_eval
    from lm_eval.models.vllm_causallms import VLLM

    os.environ["DISABLE_MULTIPROC"] = "1"
    random_seed, numpy_seed, torch_seed, fewshot_seed = seeds(cfg)
    kw = vllm_model_args(model_dir, cfg, dtype, trust_remote_code)
    out = lm_eval.simple_evaluate(
        model=VLLM(**kw), tasks=task_objects, task_manager=tm, limit=cfg.limit, bootstrap_iters=cfg.bootstrap_iters,
        log_samples=False, random_seed=random_seed, numpy_random_seed=numpy_seed, torch_random_seed=torch_seed,
        fewshot_random_seed=fewshot_seed,
    )
    if out is None:  # pragma: no cover
        raise RuntimeError("lm_eval returned no results")
    return out


def tokenizer_with_bos(tokenizer: Any, add_bos_token: bool) -> Any:
    """The tokenizer as lm_eval's CLI loads it for ``add_bos_token=``: HFLM hands ``add_bos_token`` to
    ``AutoTokenizer.from_pretrained`` only for a tokenizer it loads itself (``HFLM._create_tokenizer``,
    lm_eval/models/huggingface.py); one passed in is used as is, and its ``tok_encode`` then asks for
    ``add_special_tokens=True``, which adds no BOS to a tokenizer that does not add one by itself."""
    return type(tokenizer).from_pretrained(tokenizer.name_or_path, add_bos_token=add_bos_token)


def evaluate(model: Any, tokenizer: Any, tm: Any, task_objects: list[Any], cfg: HarnessConfig) -> dict[str, Any] | None:
    """Run simple_evaluate on an in-memory model with the recipe's seeds (lm_eval's defaults unless
    the recipe says otherwise); return lm_eval's result dict. In a group of processes (the stage under
    torch.distributed.run, :mod:`bezoar_jobs.eval.parallel`) each rank runs a share of the model's
    requests; rank 0 gets the result, the other ranks None."""
    import os

    import lm_eval

    from ..ranks import world
    from .parallel import hflm_class

    # lm_eval bootstraps stderrs (perplexity and the like) in a fork()ed multiprocessing pool; a
    # fork of this process (torch, tokenizers and pyarrow threads running) can deadlock in the
    # child, which we saw happen. Its single-process loop is the same bootstrap without the fork.
    os.environ["DISABLE_MULTIPROC"] = "1"
    kw: dict[str, Any] = {"pretrained": model, "tokenizer": tokenizer, "batch_size": cfg.batch_size}
    if cfg.max_length is not None:
        kw["max_length"] = cfg.max_length
    if cfg.add_bos_token is not None:
        kw["add_bos_token"] = cfg.add_bos_token
        kw["tokenizer"] = tokenizer_with_bos(tokenizer, cfg.add_bos_token)
    lm = hflm_class(world().size)(**kw)
    random_seed, numpy_seed, torch_seed, fewshot_seed = seeds(cfg)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=task_objects,
        task_manager=tm,
        limit=cfg.limit,
        # the other ranks' results are dropped: they need not bootstrap stderrs (CPU the GPU pods are short of)
        bootstrap_iters=cfg.bootstrap_iters if world().zero else 0,
        log_samples=False,
        random_seed=random_seed,
        numpy_random_seed=numpy_seed,
        torch_random_seed=torch_seed,
        fewshot_random_seed=fewshot_seed,
    )
    if not world().zero:  # simple_evaluate returns results where LOCAL_RANK is 0 only (rank 0 keeps them)
        return None
    if out is None:  # pragma: no cover
        raise RuntimeError("lm_eval returned no results")
    return out


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def summarize(raw: dict[str, Any], tasks: tuple[HarnessTask, ...], versions: dict[str, Any]) -> dict[str, Any]:
    """Per recipe task: version, shots, every metric with its stderr, and the primary metric.

    lm_eval keys metrics ``"<metric>,<filter>"`` with stderrs under ``"<metric>_stderr,<filter>"``
    ("N/A" when not computed, recorded here as null). Group members are kept under ``subtasks``.
    """
    results = raw.get("results", {})
    out: dict[str, Any] = {}
    for i, t in enumerate(tasks):
        entry = results.get(t.name, {})
        metrics = _metrics(entry)
        primary = metrics.get(t.metric_key)
        if primary is None:
            raise BadInput(
                f"{_FIELD}.tasks.{i}.metric: {t.name!r} reports no metric {t.metric_key!r}; "
                f"it reports {', '.join(sorted(metrics)) or 'nothing'}"
            )
        subtasks = {}
        for child in raw.get("group_subtasks", {}).get(t.name, []):
            if child in results:
                subtasks[child] = {"metrics": _metrics(results[child]), "version": raw.get("versions", {}).get(child)}
        out[t.name] = {
            "version": versions.get(t.name, raw.get("versions", {}).get(t.name)),
            "num_fewshot": t.num_fewshot,
            # a group has no n-samples entry: its sample_len is the sum of its tasks' documents
            "n_samples": raw.get("n-samples", {}).get(t.name, {}).get("effective", entry.get("sample_len")),
            "metric": t.metric_key,
            "value": primary["value"],
            "stderr": primary["stderr"],
            "metrics": metrics,
            "higher_is_better": raw.get("higher_is_better", {}).get(t.name, {}),
            **({"subtasks": subtasks} if subtasks else {}),
        }
    return out


def _metrics(entry: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    metrics: dict[str, dict[str, float | None]] = {}
    for key, value in entry.items():
        if "," not in key or "_stderr," in key:
            continue
        name, _, flt = key.partition(",")
        v = _num(value)
        if v is None:
            continue
        metrics[key] = {"value": v, "stderr": _num(entry.get(f"{name}_stderr,{flt}"))}
    return metrics


def raw_subset(raw: dict[str, Any]) -> dict[str, Any]:
    """The parts of lm_eval's output worth keeping (no per-task prompt configs, no samples)."""
    keep = ("results", "groups", "group_subtasks", "versions", "n-shot", "n-samples", "higher_is_better",
            "lm_eval_version", "transformers_version", "max_length")
    return {k: raw[k] for k in keep if k in raw}
