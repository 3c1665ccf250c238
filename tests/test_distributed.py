"""One training stage on several processes under torch.distributed.run (gloo on CPU), on the tiny model.

- two ranks train like one at the same global batch: the same loss at every step and the same merged
  weights (within 1e-5: only the order of float additions differs), through `bezoar run --nproc-per-node 2`;
- a rank killed mid-training: the launcher stops the group and exits non-zero, nothing is committed; a
  rerun with another world size is refused (exit 2) naming both sizes; a rerun with the same shape
  resumes every rank from the same checkpoint and commits the same weights as the uninterrupted run;
- the split of the global batch, and what cannot be split.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bezoar_jobs.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, BadInput
from bezoar_jobs.manifest import read_manifest
from bezoar_jobs.store import open_store

try:  # tests/ is not a package today
    from tests.test_training import _complete_steps, commit_filter, lamini_rows, make_recipe, training_section
    from tests.tiny_model import build_tiny_model
except ImportError:  # pragma: no cover
    from test_training import _complete_steps, commit_filter, lamini_rows, make_recipe, training_section  # type: ignore
    from tiny_model import build_tiny_model  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 40, 10


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _bezoar(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bezoar_jobs.cli", *args], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _weights(run: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(run / "sft-lamini" / "model" / "model.safetensors")


def _losses(run: Path) -> list[float]:
    lines = (run / "sft-lamini" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    per_step = {}
    for rec in map(json.loads, lines):
        if "loss" in rec and "event" not in rec:
            per_step[rec["step"]] = rec["loss"]
    return [per_step[s] for s in sorted(per_step)]


def _max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("dist")
    tiny = build_tiny_model(tmp / "model")
    # the recipe's global batch: 2 examples x 2 accumulation steps on one device. Without dropout one and two
    # ranks compute the same thing; with it (the kill test) the result depends on every rank's restored RNG
    # state, and one and two ranks draw different masks (each rank has its own generator)
    sft = {"max_steps": STEPS, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
           "learning_rate": 3e-3}
    paths = {}
    for dropout in (0.0, 0.1):
        d = tmp / f"dropout-{dropout}"
        d.mkdir()
        training = training_section(checkpoint_every=EVERY, lora={"lora_dropout": dropout}, sft_args=sft)
        paths[dropout] = make_recipe(d, tiny, training)[1]
    runs = {}
    for name in ("one", "two", "killed", "uninterrupted"):
        runs[name] = tmp / name
        commit_filter(open_store(runs[name]), "lamini", lamini_rows(16), tmp)
    return {"tmp": tmp, "tiny": tiny, "sft": sft, "recipe_path": paths[0.0], "dropout_recipe": paths[0.1],
            "runs": runs}


def test_global_batch_split_keeps_the_recipes_batch() -> None:
    from bezoar_jobs.training.config import split_global_batch

    def split(b: int, g: int, w: int) -> tuple[int, int]:
        kw = {"per_device_train_batch_size": b, "gradient_accumulation_steps": g}
        got = split_global_batch(kw, w, "training.sft_args")
        assert got["global_batch"] == b * g == kw["per_device_train_batch_size"] * kw["gradient_accumulation_steps"] * w
        return kw["per_device_train_batch_size"], kw["gradient_accumulation_steps"]

    assert split(4, 4, 1) == (4, 4)
    assert split(4, 4, 2) == (4, 2)  # the paper's 16 on 2 GPUs: the same micro-batches, half the accumulation
    assert split(4, 4, 4) == (4, 1)
    assert split(4, 4, 8) == (2, 1)  # more ranks than accumulation steps: smaller micro-batches
    assert split(3, 1, 3) == (1, 1)
    with pytest.raises(BadInput, match=r"training.sft_args: the global batch of 6 .* cannot be split evenly over 4"):
        split(3, 2, 4)


def test_two_ranks_train_like_one_at_the_same_global_batch(setup: dict[str, Any]) -> None:
    import torch

    one, two, rp = setup["runs"]["one"], setup["runs"]["two"], str(setup["recipe_path"])
    p1 = _bezoar("stage", "sft-lamini", "--recipe", rp, "--run", str(one))
    _, err1 = p1.communicate(timeout=300)
    assert p1.returncode == 0, err1[-3000:]
    p2 = _bezoar("run", "--recipe", rp, "--run", str(two), "--only", "sft-lamini", "--nproc-per-node", "2")
    _, err2 = p2.communicate(timeout=300)
    assert p2.returncode == 0, err2[-3000:]
    assert "global batch 4 kept = 2 per device x 1 accumulation x 2 ranks" in err2
    m = read_manifest(open_store(two), "sft-lamini")
    d = m["training"]["distributed"]
    assert d["world_size"] == 2 and d["global_batch"] == 4 and d["per_device_batch"] == 2
    assert d["gradient_accumulation_steps"] == 1 and d["launcher"] == "torch.distributed.run" and d["backend"] == "gloo"
    ref = read_manifest(open_store(one), "sft-lamini")["training"]
    assert ref["distributed"]["world_size"] == 1
    # both ranks' batches are counted, not rank 0's alone
    assert m["training"]["real_tokens"] == ref["real_tokens"]
    assert m["counts"]["steps"] == STEPS
    # the loss curve and the merged weights: equal up to the order of float additions
    assert torch.allclose(torch.tensor(_losses(two)), torch.tensor(_losses(one)), atol=1e-5)
    assert len(_losses(two)) == STEPS
    assert _max_diff(_weights(one), _weights(two)) < 1e-5
    # rank 0 alone wrote checkpoints: one per step, each with both ranks' RNG states
    marker = json.loads((two / "sft-lamini/_work/checkpoints" / f"step-{STEPS}" / "COMPLETE").read_text())
    assert marker["world_size"] == 2
    assert {"trainer/rng_state_0.pth", "trainer/rng_state_1.pth"} <= set(marker["files"])


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the worker with RANK=rank among the launcher's children."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


def test_a_killed_rank_reruns_to_the_same_weights(setup: dict[str, Any]) -> None:
    run, rp = setup["runs"]["killed"], str(setup["dropout_recipe"])
    store = open_store(run)
    args = ("stage", "sft-lamini", "--recipe", rp, "--run", str(run))
    p = _bezoar(*args, "--nproc-per-node", "2")
    end = time.time() + 240
    while not _complete_steps(store, "sft-lamini"):
        assert p.poll() is None and time.time() < end, "no checkpoint before the launcher ended"
        time.sleep(0.02)
    pid = _rank_pid(p.pid, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGKILL, err[-3000:]  # the killed worker's own code, not torchrun's 1
    assert "worker rank 1 failed" in err
    assert read_manifest(store, "sft-lamini") is None
    killed_at = max(_complete_steps(store, "sft-lamini"))
    assert 0 < killed_at < STEPS

    # another world size: refused, naming both, nothing trained or deleted
    p = _bezoar(*args)
    _, err = p.communicate(timeout=300)
    assert p.returncode == EXIT_BAD_INPUT, err[-3000:]
    assert "written by 2 training process(es) and this attempt runs 1" in err
    assert max(_complete_steps(store, "sft-lamini")) == killed_at

    # SIGTERM to the launcher (what a pod gets): it passes it on, every rank stops at the same step with a
    # final checkpoint, the exit code says interrupted
    p = _bezoar(*args, "--nproc-per-node", "2")
    end = time.time() + 240
    while max(_complete_steps(store, "sft-lamini")) <= killed_at:
        assert p.poll() is None and time.time() < end, "no new checkpoint before the launcher ended"
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert err.count(f"resuming from the checkpoint at step {killed_at}") == 2  # both ranks
    assert "SIGTERM" in err and read_manifest(store, "sft-lamini") is None
    stopped = max(_complete_steps(store, "sft-lamini"))
    assert killed_at < stopped < STEPS

    # the same shape: every rank resumes from the same checkpoint, and the result is the uninterrupted run's
    p = _bezoar(*args, "--nproc-per-node", "2")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert err.count(f"resuming from the checkpoint at step {stopped}") == 2  # both ranks
    m = read_manifest(store, "sft-lamini")
    assert m["training"]["resumed_from_step"] == stopped and m["counts"]["steps"] == STEPS
    ref = setup["runs"]["uninterrupted"]
    p = _bezoar("stage", "sft-lamini", "--recipe", rp, "--run", str(ref), "--nproc-per-node", "2")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert _max_diff(_weights(ref), _weights(run)) < 1e-5
    assert _losses(run) == pytest.approx(_losses(ref), abs=1e-5)
    assert len(_losses(run)) == STEPS


# ---------------------------------------------------------------------------------------------
# Kubernetes: a 2-pod training group as an Indexed Job + headless Service, in the loopback harness
# ---------------------------------------------------------------------------------------------
def _real_group(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(runs volume, run, recipe) for a 2-node training run in the harness: the smallest shape that trains."""
    runs = tmp_path / "runs"
    tiny = build_tiny_model(runs / "model")  # on the runs volume: the pods see nothing else of this machine
    training = training_section(checkpoint_every=5, sft_args={"max_steps": 10, "per_device_train_batch_size": 2,
                                                               "gradient_accumulation_steps": 2})
    _, recipe_path = make_recipe(runs, tiny, training)
    run = runs / "r1"
    commit_filter(open_store(run), "lamini", lamini_rows(8), tmp_path)
    _open_to_pods(runs)
    return runs, run, recipe_path


def _committed_by_two_ranks(run: Path) -> None:
    m = read_manifest(open_store(run), "sft-lamini")
    assert m is not None and m["counts"]["steps"] == 10
    assert m["training"]["distributed"]["world_size"] == 2
    assert (run / "sft-lamini/model/model.safetensors").is_file()


def test_a_two_node_training_stage_runs_as_an_indexed_job_and_commits(tmp_path: Path) -> None:
    """The controller creates the group's headless Service and Indexed Job; each pod (sandboxed: its own
    user, read-only root, only its mounts) resolves node 0 as <job>-0.<service> through cluster DNS, the
    two torch.distributed.run agents meet there over loopback, rank 0 commits."""
    import io

    from bezoar_jobs.executors import kubernetes as k8s
    from bezoar_jobs.executors.jobs import job_name
    from tests.k8s_harness import FakeCluster

    ns = "bz-test"
    runs, run, recipe_path = _real_group(tmp_path)
    cluster = _group_settings(ns, runs, "job", port=29617)
    with FakeCluster(tmp_path / "k8s") as fc:
        fc.add_pvc(ns, "runs", runs)
        out = io.StringIO()
        rc = k8s.run_pipeline(recipe_path.read_text(), str(recipe_path), str(run), None, cluster, ["sft-lamini"],
                              False, fc.api_client(), out=out)
        text = out.getvalue()
        assert rc == 0, text[-6000:] + "\n".join(fc.errors)
        name = job_name("sft-lamini", "r1")
        job = next(j for j in fc.jobs(ns) if j["metadata"]["name"] == name)
        assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
        assert job["spec"]["backoffLimitPerIndex"] == 6 and job["spec"]["maxFailedIndexes"] == 0
        assert job["status"]["completedIndexes"] == "0,1" or job["status"]["completedIndexes"] == "0-1"
        pods = fc.pods(ns, name)
        assert sorted(p["spec"]["hostname"] for p in pods) == [f"{name}-0", f"{name}-1"]
        assert {p["spec"]["subdomain"] for p in pods} == {name}
        args = job["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--master-addr") + 1] == f"{name}-0.{name}"
        svc = fc.objects[("Service", ns, name)]
        assert svc["spec"]["clusterIP"] == "None"
        assert svc["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
        logs = "".join(fc.pod_log(p["metadata"]["name"], ns) for p in pods)
        assert "2 processes (rank 1)" in logs and "2 processes (rank 0)" in logs
    _committed_by_two_ranks(run)


def test_a_two_node_training_stage_runs_as_a_trainjob_and_commits(tmp_path: Path) -> None:
    """launcher trainjob: the controller creates a TrainJob on the torch ClusterTrainingRuntime; the harness's
    Trainer builds the JobSet (PET_* from the torch plugin, our labels and hardening from the runtime patch),
    JobSet makes the Indexed Job and its headless Service; the two pods meet at <trainjob>-node-0-0.<trainjob>
    (PET_MASTER_ADDR) and rank 0 commits. The TrainJob is the stage: its Complete condition ends it."""
    import io

    from bezoar_jobs.executors import kubernetes as k8s
    from bezoar_jobs.executors.jobs import job_name
    from tests.k8s_harness import FakeCluster

    ns = "bz-test"
    runs, run, recipe_path = _real_group(tmp_path)
    cluster = _group_settings(ns, runs, "trainjob")
    name = job_name("sft-lamini", "r1")
    with FakeCluster(tmp_path / "k8s", crds=("trainjob",)) as fc:
        fc.add_pvc(ns, "runs", runs)
        fc.add_training_runtime("torch-distributed")
        out = io.StringIO()
        rc = k8s.run_pipeline(recipe_path.read_text(), str(recipe_path), str(run), None, cluster, ["sft-lamini"],
                              False, fc.api_client(), out=out)
        text = out.getvalue()
        assert rc == 0, text[-6000:] + "\n".join(fc.errors)
        assert f"created TrainJob {name}" in text
        (tj,) = fc.custom_objects("TrainJob", ns)
        assert next(c for c in tj["status"]["conditions"] if c["type"] == "Complete")["reason"] == "AllJobsCompleted"
        (js,) = fc.custom_objects("JobSet", ns)
        assert js["metadata"]["ownerReferences"][0]["kind"] == "TrainJob" and js["metadata"]["name"] == name
        env = {e["name"]: e for e in js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
            "containers"][0]["env"]}
        assert env["PET_NNODES"]["value"] == "2" and env["PET_MASTER_ADDR"]["value"] == f"{name}-node-0-0.{name}"
        pods = [p for p in fc.pods(ns) if p["metadata"]["labels"].get("jobset.sigs.k8s.io/jobset-name") == name]
        assert sorted(p["spec"]["hostname"] for p in pods) == [f"{name}-node-0-0", f"{name}-node-0-1"]
        assert all(p["metadata"]["labels"]["bezoar.dev/stage"] == "sft-lamini" for p in pods)
        logs = "".join(fc.pod_log(p["metadata"]["name"], ns) for p in pods)
        assert "2 processes (rank 1)" in logs and "2 processes (rank 0)" in logs
    _committed_by_two_ranks(run)


def test_launcher_flags_exit_codes_and_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from bezoar_jobs.cli import main
    from bezoar_jobs.launch import Shape, launcher_args, worker_exit_code

    # only training stages run on several processes (exit 2, naming the stage)
    assert main(["stage", "report", "--recipe", str(REPO / "recipes/demo.yaml"), "--run", str(tmp_path / "r"),
                 "--nproc-per-node", "2"]) == EXIT_BAD_INPUT
    with pytest.raises(BadInput, match="several nodes need --master-addr"):
        launcher_args(Shape(1, 2), [])
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")  # an Indexed Job's pod: its index is the node rank
    args = launcher_args(Shape(8, 2, master_addr="bz-r-sft-lamini-0.bz-r-sft-lamini"), ["stage", "sft-lamini"])
    assert "--node-rank=1" in args and "--rdzv-backend=static" in args and "--max-restarts=0" in args
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    with pytest.raises(BadInput, match=r"node rank 2: must be in 0\.\.1"):
        launcher_args(Shape(8, 2, master_addr="x"), [])
    # the first failed worker's own code: 2 stays 2 (not torchrun's 1), a signal is 128 + signal
    fail = SimpleNamespace(failures={1: SimpleNamespace(exitcode=2, timestamp=5),
                                     0: SimpleNamespace(exitcode=1, timestamp=9)})
    assert worker_exit_code(fail) == 2
    assert worker_exit_code(SimpleNamespace(failures={0: SimpleNamespace(exitcode=-9, timestamp=1)})) == 137


# ---------------------------------------------------------------------------------------------
# Experiment trackers (training.report_to), offline, read back
# ---------------------------------------------------------------------------------------------
def _wandb_records(path: Path) -> list[Any]:
    """The protobuf records of an offline ``.wandb`` file: a 7-byte header, then 32 KiB blocks of chunks
    (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) as wandb's transaction log writes them."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, out, part = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        kind = data[pos + 6]
        if length == 0 and kind == 0:
            break
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(part)
            out.append(rec)
            part = b""
    return out


def test_report_to_tensorboard_wandb_offline_and_mlflow_file_store(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = build_tiny_model(tmp_path / "model")
    steps = 4
    training = training_section(report_to=["tensorboard", "wandb", "mlflow"], sft_args={"max_steps": steps})
    _, recipe_path = make_recipe(tmp_path, tiny, training)
    run = tmp_path / "r7"
    commit_filter(open_store(run), "lamini", lamini_rows(8), tmp_path)
    env = {k: v for k, v in _env().items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    p = subprocess.run([sys.executable, "-m", "bezoar_jobs.cli", "stage", "sft-lamini", "--recipe", str(recipe_path),
                        "--run", str(run)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = run / "sft-lamini"
    m = read_manifest(open_store(run), "sft-lamini")
    losses = _losses(run)
    assert len(losses) == steps
    # TensorBoard: the event file, committed with the stage, holds every step's loss
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [f for f in m["files"] if f.startswith("tensorboard/") and "tfevents" in f]
    assert events
    acc = EventAccumulator(str((out / events[0]).parent))
    acc.Reload()
    tb = [e.value for e in acc.Scalars("train/loss")]
    assert tb == pytest.approx(losses, rel=1e-5)
    # MLflow: a local file store in the stage, one run named after the stage, tagged with run id and stage
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == "tiny-test"]
    (mrun,) = client.search_runs([exp.experiment_id])
    assert mrun.data.tags["bezoar.run_id"] == "r7" and mrun.data.tags["bezoar.stage"] == "sft-lamini"
    assert mrun.info.run_name == "sft-lamini" and mrun.info.status == "FINISHED"
    assert mrun.data.metrics["loss"] == pytest.approx(losses[-1], rel=1e-5)
    (hist_file,) = [p for p in (out / "mlruns").rglob("metrics/loss") if mrun.info.run_id in p.parts]
    per_step = sorted((int(line.split()[2]), float(line.split()[1])) for line in hist_file.read_text().splitlines())
    assert [v for _, v in per_step] == pytest.approx(losses, rel=1e-5)
    # Weights & Biases, offline (no network): the run's transaction log, finished before the commit
    (wfile,) = [f for f in m["files"] if f.startswith("wandb/offline-run-") and f.endswith(".wandb")]
    recs = _wandb_records(out / wfile)
    (wrun,) = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    assert wrun.display_name == "sft-lamini" and wrun.run_group == "r7" and wrun.project == "bezoar"
    assert {"run:r7", "stage:sft-lamini"} <= set(wrun.tags)
    hist = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in recs if r.WhichOneof("record_type") == "history"]
    assert [h["train/loss"] for h in hist if "train/loss" in h] == pytest.approx(losses, rel=1e-5)
    assert any(r.WhichOneof("record_type") == "exit" for r in recs)
    assert not [f for f in out.rglob("*") if f.is_symlink()]


# ---------------------------------------------------------------------------------------------
# eval-harness at scale: lm_eval's vLLM backend, data- and tensor-parallel, chosen in the recipe
# ---------------------------------------------------------------------------------------------
def test_harness_parallel_backend_is_validated_rendered_and_sized(tmp_path: Path) -> None:
    import yaml

    from bezoar_jobs.eval.harness import check_backend, cli_commands
    from bezoar_jobs.executors.cluster import ClusterSettings
    from bezoar_jobs.executors.jobs import build_job
    from bezoar_jobs.recipe import load_recipe, parse_recipe

    base = yaml.safe_load((REPO / "recipes/openbezoar.yaml").read_text())

    def recipe(**harness: Any) -> Any:
        data = copy.deepcopy(base)
        data.setdefault("evaluation", {}).setdefault("harness", {}).update(harness)
        return parse_recipe(yaml.safe_dump(data), "r.yaml")

    # tp without vllm: refused when the recipe loads, naming the field (hf runs data-parallel: test_eval_parallel.py)
    with pytest.raises(BadInput, match=r"evaluation.harness.*tensor_parallel_size needs backend: vllm"):
        recipe(tensor_parallel_size=2)
    r = recipe(backend="vllm", data_parallel_size=4, tensor_parallel_size=2)
    cfg = r.evaluation.harness
    assert cfg.gpus == 8
    # the recorded command reproduces it with lm_eval's own vllm model
    (cmd, *_) = cli_commands("/m", "bfloat16", "cuda", None, cfg)
    assert "--model vllm" in cmd and "tensor_parallel_size=2,data_parallel_size=4" in cmd and "--device" not in cmd
    # no vllm here: refused before any model loads (exit 2), naming the field
    with pytest.raises(BadInput, match=r"evaluation.harness.backend: 'vllm' needs the vllm package"):
        check_backend(cfg)
    check_backend(load_recipe(REPO / "recipes/demo.yaml")[0].evaluation.harness)  # hf: nothing to check
    # the eval pod must have the GPUs: refused when the Job is built
    cluster = ClusterSettings.model_validate({"stageOverrides": {"eval-harness": {"gpus": 4}}})
    with pytest.raises(BadInput, match=r"= 8 GPUs, but the eval-harness pod gets 4"):
        build_job("eval-harness", "s3://b/r", "r", cluster, recipe=r)
    cluster = ClusterSettings.model_validate({"stageOverrides": {"eval-harness": {"gpus": 8}}})
    job = build_job("eval-harness", "s3://b/r", "r", cluster, recipe=r)
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"


# ---------------------------------------------------------------------------------------------
# FSDP: CUDA only; FSDP + QLoRA with the loader and trainer settings of PEFT's FSDP-QLoRA guide
# ---------------------------------------------------------------------------------------------
def _fsdp_configs(tmp_path: Path, quantization: str, sft_args: dict[str, Any], cuda: bool = True,
                  bf16: bool = True) -> Any:
    import yaml

    from bezoar_jobs.recipe import parse_recipe
    from bezoar_jobs.training.config import build_stage_configs, device_plan

    text = yaml.safe_dump({"schema_version": 1, "name": "t", "teacher": {"backend": "local", "model": "x"},
                           "judge": {"backend": "local", "model": "x"}, "student": {"model": "x"},
                           "training": training_section(quantization=quantization, sft_args=sft_args)})
    recipe = parse_recipe(text, "r.yaml")
    plan = device_plan(recipe.training, cuda=cuda, bf16_ok=bf16)
    # one process: TrainingArguments with a DDP backend cannot be built outside a process group (accelerate asks
    # it for the world size); the FSDP settings do not depend on it
    return build_stage_configs(recipe.training, recipe.seed, "sft-lamini", tmp_path, plan=plan, world_size=1)


def test_fsdp_is_cuda_only_and_fsdp_qlora_gets_the_guides_settings(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from bezoar_jobs.training.lora import weights_placement

    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # TrainingArguments sets it: restored after
    shard = {"fsdp": "full_shard auto_wrap"}
    # CPU (gloo): accelerate never turns FSDP on for a CPU group; the Trainer would silently run DDP
    with pytest.raises(BadInput, match=r"training.sft_args.fsdp: FSDP needs CUDA GPUs"):
        _fsdp_configs(tmp_path, "none", shard, cuda=False, bf16=False)
    # DDP + QLoRA (unchanged): each rank's own 4-bit copy on its own GPU, bitsandbytes' uint8 storage
    c = _fsdp_configs(tmp_path, "4bit", {})
    w = weights_placement(c.plan)
    assert not c.plan.fsdp and "sharding" not in c.distributed and w["device_map"] == {"": 0}
    assert w["quantization_config"].bnb_4bit_quant_storage == torch.uint8
    # FSDP (2, transformers' default) + QLoRA, bf16: 4-bit weights packed in bf16, loaded in bf16, no device
    # map; rank 0 reads the checkpoint (cpu_ram_efficient_loading)
    c = _fsdp_configs(tmp_path, "4bit", shard)
    a, w = c.trainer_args, weights_placement(c.plan)
    assert a.fsdp is True and a.fsdp_plugin_args["fsdp_version"] == 2
    assert a.fsdp_config["cpu_ram_efficient_loading"] is True and a.fsdp_plugin_args["cpu_ram_efficient_loading"]
    assert a.fsdp_plugin_args["state_dict_type"] == "FULL_STATE_DICT"
    assert c.plan.fsdp and "device_map" not in w and w["dtype"] == torch.bfloat16
    q = w["quantization_config"]
    assert q.bnb_4bit_quant_storage == torch.bfloat16 and q.bnb_4bit_compute_dtype == torch.bfloat16
    assert q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert c.distributed["sharding"] == "fsdp2" and c.distributed["bnb_4bit_quant_storage"] == "bfloat16"
    # FSDP1 + QLoRA with fp16 compute (a GPU without bf16): use_orig_params false, module states synced for
    # the broadcast, storage float32 (the guide: for stable fp16 mixed precision)
    c = _fsdp_configs(tmp_path, "4bit", {**shard, "fsdp_config": {"version": 1}}, bf16=False)
    a, w = c.trainer_args, weights_placement(c.plan)
    assert a.fsdp_plugin_args["use_orig_params"] is False and a.fsdp_plugin_args["sync_module_states"] is True
    assert w["quantization_config"].bnb_4bit_quant_storage == torch.float32 and w["dtype"] == torch.float32
    assert w["quantization_config"].bnb_4bit_compute_dtype == torch.float16 and a.fp16
    # the recipe's own fsdp_config wins over the defaults (with or without the fsdp_ prefix)
    c = _fsdp_configs(tmp_path, "4bit", {**shard, "fsdp_config": {"version": 1, "fsdp_use_orig_params": True}})
    assert c.trainer_args.fsdp_plugin_args["use_orig_params"] is True
    # FSDP + LoRA on 16-bit weights: the weights in the plan's dtype, placed by the trainer
    c = _fsdp_configs(tmp_path, "none", shard)
    assert c.plan.fsdp and c.plan.quant_storage is None and weights_placement(c.plan) == {"dtype": torch.bfloat16}
    assert "cpu_ram_efficient_loading" not in c.trainer_args.fsdp_config
    # a sharded state dict would leave the other ranks' shards in their own directories
    with pytest.raises(BadInput, match=r"training.sft_args.fsdp_config.state_dict_type: SHARDED_STATE_DICT: only "):
        _fsdp_configs(tmp_path, "4bit", {**shard, "fsdp_config": {"state_dict_type": "SHARDED_STATE_DICT"}})


def test_fsdp_qlora_loader_and_adapter_saving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the loader hands from_pretrained for FSDP-QLoRA, without the k-bit preparation (it would cast the
    non-4-bit weights to float32 beside the bf16-packed 4-bit ones), and who saves the adapter: under FSDP every
    rank calls save_model (it gathers the shards), under DDP rank 0 alone saves."""
    import dataclasses

    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from bezoar_jobs.training import lora
    from bezoar_jobs.training.run import save_adapter

    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    tiny = build_tiny_model(tmp_path / "m")
    plan = _fsdp_configs(tmp_path, "4bit", {"fsdp": "full_shard auto_wrap"}).plan
    seen: dict[str, Any] = {}

    class Loaded:
        config = SimpleNamespace(use_cache=True)

        def enable_input_require_grads(self) -> None:
            seen["input_grads"] = True

    def fake_load(path: str, **kw: Any) -> Loaded:
        seen.update(kw, env=os.environ.get("ACCELERATE_USE_FSDP"))
        return Loaded()

    def no_prepare(*a: Any, **k: Any) -> None:
        raise AssertionError("prepare_model_for_kbit_training under FSDP")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_load)
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", no_prepare)
    model = lora.load_for_training(tiny, plan, False, True)
    assert model.config.use_cache is False and seen["input_grads"] and seen["env"] == "true"
    assert "device_map" not in seen and seen["dtype"] == torch.bfloat16
    assert seen["quantization_config"].bnb_4bit_quant_storage == torch.bfloat16
    # DDP QLoRA keeps the k-bit preparation
    with pytest.raises(AssertionError, match="prepare_model_for_kbit_training"):
        lora.load_for_training(tiny, dataclasses.replace(plan, fsdp=False), False, True)

    calls: list[tuple[str, int]] = []

    def trainer(fsdp: bool, rank: int) -> Any:
        model = SimpleNamespace(save_pretrained=lambda d: calls.append(("save_pretrained", rank)))
        return SimpleNamespace(is_fsdp_enabled=fsdp, model=model,
                               save_model=lambda d: calls.append(("save_model", rank)))

    for rank in (0, 1):
        save_adapter(trainer(True, rank), tmp_path / "a", rank == 0)
    assert calls == [("save_model", 0), ("save_model", 1)]
    calls.clear()
    for rank in (0, 1):
        save_adapter(trainer(False, rank), tmp_path / "a", rank == 0)
    assert calls == [("save_pretrained", 0)]


def test_fsdp2_on_two_cpu_ranks_trains_like_one_and_resumes(setup: dict[str, Any]) -> None:
    """The FSDP path end to end (the stage's settings, accelerate's FSDP2 preparation, the Trainer's FSDP
    checkpoints, every rank gathering the adapter, resume) on 2 gloo ranks, with the CUDA-only gates lifted by
    the test-only tests/fsdp_on_cpu/sitecustomize.py (production refuses fsdp on CPU: the test above). A
    SIGTERM after the first checkpoint, a rerun that resumes on both ranks, and the result is the one-process
    run's: the loss at every step and the merged weights within 1e-5."""
    tmp, rp = setup["tmp"], str(setup["recipe_path"])
    one = setup["runs"]["one"]
    if read_manifest(open_store(one), "sft-lamini") is None:  # run alone (-k): the one-process reference
        p = _bezoar("stage", "sft-lamini", "--recipe", rp, "--run", str(one))
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    d = tmp / "fsdp"
    d.mkdir()
    training = training_section(checkpoint_every=EVERY, lora={"lora_dropout": 0.0},
                                sft_args={**setup["sft"], "fsdp": "full_shard auto_wrap"})
    recipe = str(make_recipe(d, setup["tiny"], training)[1])
    run = tmp / "fsdp-run"
    store = open_store(run)
    commit_filter(store, "lamini", lamini_rows(16), tmp)
    env = {**_env(), "BEZOAR_TEST_FSDP_ON_CPU": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests/fsdp_on_cpu"), os.environ.get("PYTHONPATH", "")])}

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "bezoar_jobs.cli", "stage", "sft-lamini", "--recipe", recipe,
                                 "--run", str(run), "--nproc-per-node", "2"], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    p = start()
    end = time.time() + 240
    while not _complete_steps(store, "sft-lamini"):
        assert p.poll() is None and time.time() < end, p.communicate()[1][-3000:]
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == EXIT_INTERRUPTED, err[-3000:]
    stopped = max(_complete_steps(store, "sft-lamini"))
    assert 0 < stopped < STEPS and read_manifest(store, "sft-lamini") is None
    p = start()
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert err.count(f"resuming from the checkpoint at step {stopped}") == 2  # both ranks
    m = read_manifest(store, "sft-lamini")
    d = m["training"]["distributed"]
    assert d["sharding"] == "fsdp2" and d["world_size"] == 2 and d["global_batch"] == 4
    assert m["training"]["resumed_from_step"] == stopped and m["counts"]["steps"] == STEPS
    assert torch_allclose(_losses(run), _losses(one))
    assert _max_diff(_weights(one), _weights(run)) < 1e-5


def torch_allclose(a: list[float], b: list[float]) -> bool:
    import torch

    return len(a) == len(b) == STEPS and torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Kubernetes: the group as a JobSet or a Kubeflow Trainer v2 TrainJob (executors/k8s_groups.py), in the
# loopback harness's models of their controllers and webhooks (tests/k8s_jobset.py)
# ---------------------------------------------------------------------------------------------
FAKE_RECIPE = """schema_version: 1
name: k8s-group
teacher: {backend: local, model: pkg://none/teacher.gguf}
judge: {backend: local, model: pkg://none/judge.gguf}
student: {model: pkg://none/student.gguf}
"""


def _open_to_pods(runs: Path) -> None:
    """The pods run as another user (the sandbox): what this process wrote must be theirs to use."""
    runs.chmod(0o777)
    for p in runs.rglob("*"):
        p.chmod(0o777 if p.is_dir() else 0o666)


def _group_settings(ns: str, runs: Path, launcher: str, port: int = 29618, **train: Any) -> Any:
    from bezoar_jobs.executors.cluster import ClusterSettings

    return ClusterSettings.model_validate({
        "namespace": ns, "secrets": {"s3": {"name": ""}},
        "storage": {"runVolume": {"claimName": "runs", "mountPath": str(runs)}},
        "scheduling": {"train": {"gpus": 0, "nodes": 2, "processesPerNode": 1, "tolerations": [],
                                 "ephemeralStorage": "4Gi", "shmSize": "256Mi",
                                 "resources": {"requests": {"cpu": "1", "memory": "2Gi"},
                                               "limits": {"memory": "8Gi"}}, **train}},
        "distributed": {"launcher": launcher, "port": port},
    })


def test_a_jobset_group_restarts_as_a_whole_fails_clearly_then_commits(tmp_path: Path) -> None:
    """launcher jobset, the scripted stage: node rank 1 fails; JobSet deletes and recreates both Jobs (one restart:
    backoffLimit 1 = failurePolicy.maxRestarts), then fails with ReachedMaxRestarts: the stage fails (exit 5) with
    one line naming the JobSet, the reason, the restarts and the exit codes. A rerun deletes the failed JobSet and
    commits; exit 2 on a rank fails the group at once (the FailJobSet rule), exit code 2."""
    import io

    from bezoar_jobs.executors import kubernetes as k8s
    from bezoar_jobs.executors.jobs import job_name
    from tests.k8s_harness import FakeCluster, fake_calls, fake_entrypoints, write_plan

    ns = "bz-test"
    runs = tmp_path / "runs"
    run = runs / "r1"
    commit_filter(open_store(run), "lamini", lamini_rows(4), tmp_path)
    recipe = runs / "recipe.yaml"
    recipe.write_text(FAKE_RECIPE)
    _open_to_pods(runs)
    fake = tmp_path / "fake"
    fake.mkdir()
    plan_path = fake / "plan.json"
    # node 0 holds long enough for node 1 to fail first, even on a loaded machine (it is stopped when the Job fails)
    env = write_plan(plan_path, {"sft-lamini": {"rank_exit": {"1": {"exit": 3, "times": 2}}, "sleep": 4.0,
                                                "resolve_master": True}})
    cluster = _group_settings(ns, runs, "jobset", backoffLimit=1)
    name = job_name("sft-lamini", "r1")
    with FakeCluster(tmp_path / "k8s", entrypoints=fake_entrypoints(), extra_env=env, host_shares=[fake],
                     crds=("jobset",)) as fc:
        fc.add_pvc(ns, "runs", runs)

        def go(force: bool = False) -> tuple[int, str]:
            out = io.StringIO()
            rc = k8s.run_pipeline(recipe.read_text(), str(recipe), str(run), None, cluster, ["sft-lamini"], force,
                                  fc.api_client(), out=out, tick_s=0.2)
            return rc, out.getvalue()

        rc, text = go()
        assert rc == k8s.EXIT_RUN_FAILED, text
        (js,) = fc.custom_objects("JobSet", ns)
        assert js["metadata"]["name"] == name and js["status"]["restarts"] == 1
        assert js["status"]["conditions"][-1]["type"] in ("Failed", "RestartingJobSet")
        failed = next(c for c in js["status"]["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "ReachedMaxRestarts", (failed, text)
        line = next(ln for ln in text.splitlines() if "ReachedMaxRestarts" in ln)
        assert f"JobSet {name}" in line and "restarted 1 time" in line and "exit code" in line and " 3" in line
        assert "the whole group restarts (restart 1 of at most 1)" in text
        # both attempts ran both nodes (rank 1 twice), the Jobs as JobSet names and labels them
        calls = fake_calls(plan_path)
        # (rank 1 fails only after its group has met: node 0 started in each attempt, as under torchrun's rendezvous)
        assert [c["rank"] for c in calls].count("1") == 2 and [c["rank"] for c in calls].count("0") == 2
        assert {c["master"] for c in calls} == {f"{name}-node-0-0.{name}"}
        assert [n for n in fc.created_jobs() if n.startswith(name + "-")] == [f"{name}-node-0"] * 2
        pods = [p for p in fc.pods(ns) if p["metadata"]["labels"].get("jobset.sigs.k8s.io/jobset-name") == name]
        assert pods and all(p["spec"]["subdomain"] == name for p in pods)
        assert {p["metadata"]["labels"]["jobset.sigs.k8s.io/restart-attempt"] for p in pods} <= {"0", "1"}
        assert all(p["metadata"]["labels"]["bezoar.dev/run"] == "r1" for p in pods)
        svc = fc.objects[("Service", ns, name)]
        assert svc["spec"]["selector"] == {"jobset.sigs.k8s.io/jobset-name": name}
        assert svc["metadata"]["ownerReferences"][0]["kind"] == "JobSet"
        assert read_manifest(open_store(run), "sft-lamini") is None

        # the rerun: rank 1 has used up its scripted failures; the failed JobSet is replaced, node 0 commits
        write_plan(plan_path, {"sft-lamini": {"rank_exit": {"1": {"exit": 3, "times": 2}}, "sleep": 0.5}})
        rc, text = go()
        assert rc == 0, text
        assert f"deleting finished JobSet {name}" in text and f"created JobSet {name}" in text
        assert read_manifest(open_store(run), "sft-lamini") is not None
        (js,) = fc.custom_objects("JobSet", ns)
        assert any(c["type"] == "Completed" and c["status"] == "True" for c in js["status"]["conditions"])

        # bad input on one rank: the child Job fails by its podFailurePolicy, the JobSet's FailJobSet rule ends it
        write_plan(plan_path, {"sft-lamini": {"rank_exit": {"1": {"exit": 2}}, "sleep": 4.0}})
        rc, text = go(force=True)
        assert rc == EXIT_BAD_INPUT, text
        (js,) = fc.custom_objects("JobSet", ns)
        assert js["status"]["restarts"] == 0
        assert "FailJobSetFailurePolicyAction" in text and "restarted 0 times" in text


def test_a_running_group_is_adopted_after_a_controller_restart_and_cancelled_with_its_jobs(tmp_path: Path) -> None:
    """A JobSet made by an earlier controller (same name, run and stage) is adopted, not made twice; `bezoar cancel`
    deletes the JobSet first (its Jobs and pods go with it: nothing makes them again) and the run stops (exit 4)."""
    import io
    import threading

    from kubernetes import client

    from bezoar_jobs.executors import kubernetes as k8s
    from bezoar_jobs.executors.distributed import group_objects
    from bezoar_jobs.executors.jobs import build_job, job_name
    from tests.k8s_harness import FakeCluster, fake_calls, fake_entrypoints, write_plan

    ns = "bz-test"
    runs = tmp_path / "runs"
    run = runs / "r1"
    commit_filter(open_store(run), "lamini", lamini_rows(4), tmp_path)
    recipe = runs / "recipe.yaml"
    recipe.write_text(FAKE_RECIPE)
    _open_to_pods(runs)
    fake = tmp_path / "fake"
    fake.mkdir()
    plan_path = fake / "plan.json"
    env = write_plan(plan_path, {"sft-lamini": {"sleep": 60}})
    cluster = _group_settings(ns, runs, "jobset")
    name = job_name("sft-lamini", "r1")
    with FakeCluster(tmp_path / "k8s", entrypoints=fake_entrypoints(), extra_env=env, host_shares=[fake],
                     crds=("jobset",)) as fc:
        fc.add_pvc(ns, "runs", runs)
        api = fc.api_client()
        (body,) = group_objects(build_job("sft-lamini", str(run), "r1", cluster), "sft-lamini", cluster)
        client.CustomObjectsApi(api).create_namespaced_custom_object("jobset.x-k8s.io", "v1alpha2", ns, "jobsets",
                                                                     body, field_validation="Strict")
        fc.wait_for(lambda: len(fake_calls(plan_path)) == 2, timeout=30, what="both nodes of the group to start")
        out = io.StringIO()
        rcs: list[int] = []
        th = threading.Thread(target=lambda: rcs.append(k8s.run_pipeline(
            recipe.read_text(), str(recipe), str(run), None, cluster, ["sft-lamini"], False, api, out=out,
            tick_s=0.2)), daemon=True)
        th.start()
        fc.wait_for(lambda: f"adopting running JobSet {name}" in out.getvalue(), timeout=20, what="the adoption")
        cancel_out = io.StringIO()
        assert k8s.cancel(str(run), None, cluster, api, out=cancel_out) == 0
        # the JobSet first (its Job goes with it; the Job sweep after it may still find it terminating)
        assert re.search(rf"cancel: deleted [12] JobSet\(s\) and Job\(s\) of run r1 in namespace {ns}: {name}(, |\n)",
                         cancel_out.getvalue()), cancel_out.getvalue()
        th.join(timeout=30)
        assert rcs == [4], out.getvalue()
        assert fc.custom_objects("JobSet", ns) == []
        fc.wait_for(lambda: not [j for j in fc.jobs(ns) if j["metadata"]["name"].startswith(name)], timeout=20,
                    what="the JobSet's Jobs to go")
        fc.wait_for(lambda: not fc.pods(ns), timeout=20, what="the group's pods to go")
        assert fc.created_jobs().count(name) == 1  # the JobSet itself, made once; its Job once
        assert len(fake_calls(plan_path)) == 2


def test_group_launchers_are_refused_where_the_cluster_cannot_run_them(tmp_path: Path) -> None:
    """No JobSet CRD (the group's API answers 404, as a real API server's discovery does), or a TrainJob's
    ClusterTrainingRuntime missing: exit 2 before anything is created, naming the setting. And the harness's
    webhooks refuse what upstream's refuse (a rule name with '-', unknown fields under fieldValidation=Strict,
    immutable fields, PET_* in the trainer's env, a patch of a container the runtime lacks)."""
    import io

    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from bezoar_jobs.executors import kubernetes as k8s
    from bezoar_jobs.executors.distributed import group_objects
    from bezoar_jobs.executors.jobs import build_job
    from tests.k8s_harness import FakeCluster

    ns = "bz-test"
    runs = tmp_path / "runs"
    run = runs / "r1"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(FAKE_RECIPE)

    def go(fc: FakeCluster, launcher: str) -> tuple[int, str]:
        out = io.StringIO()
        rc = k8s.run_pipeline(recipe.read_text(), str(recipe), str(run), None, _group_settings(ns, runs, launcher),
                              ["sft-lamini"], False, fc.api_client(), out=out)
        return rc, out.getvalue()

    with FakeCluster(tmp_path / "k8s") as fc:  # neither installed
        rc, text = go(fc, "jobset")
        assert rc == EXIT_BAD_INPUT and "distributed.launcher: 'jobset'" in text
        assert "jobsets.jobset.x-k8s.io/v1alpha2" in text and "JobSet is not installed" in text
        rc, text = go(fc, "trainjob")
        assert rc == EXIT_BAD_INPUT and "Kubeflow Trainer v2 is not installed" in text
        with pytest.raises(ApiException) as e:
            client.CustomObjectsApi(fc.api_client()).get_api_resources("jobset.x-k8s.io", "v1alpha2")
        assert e.value.status == 404
        assert fc.jobs() == [] and fc.custom_objects("JobSet") == []
    with FakeCluster(tmp_path / "k8s2", crds=("trainjob",)) as fc:
        rc, text = go(fc, "trainjob")
        assert rc == EXIT_BAD_INPUT
        assert "distributed.trainingRuntime: ClusterTrainingRuntime 'torch-distributed' does not exist" in text
        custom = client.CustomObjectsApi(fc.api_client())
        cluster = _group_settings(ns, runs, "jobset")
        job = build_job("sft-lamini", str(run), "r1", cluster)
        (js,) = group_objects(job, "sft-lamini", cluster)

        def refused(status: int, body: dict[str, Any], *, plural: str = "jobsets", strict: bool = True) -> str:
            group, version = body["apiVersion"].split("/")
            with pytest.raises(ApiException) as e:
                custom.create_namespaced_custom_object(group, version, ns, plural, body,
                                                       field_validation="Strict" if strict else None)
            assert e.value.status == status, e.value.body
            return str(e.value.body)

        bad = copy.deepcopy(js)
        bad["spec"]["failurePolicy"]["rules"][0]["name"] = "bad-input"  # what we rendered before: JobSet refuses it
        assert "invalid failure policy rule name 'bad-input'" in refused(422, bad)
        bad = copy.deepcopy(js)
        bad["spec"]["network"]["dnsHostnames"] = True
        assert 'unknown field \\\\"spec.network.dnsHostnames\\\\"' in refused(400, bad).replace('\\"', '\\\\"') or \
            "spec.network.dnsHostnames" in refused(400, bad)
        bad = copy.deepcopy(js)
        bad["metadata"]["name"] = "bz-" + "x" * 56
        assert "job names generated for this JobSet will exceed 63 characters" in refused(422, bad)
        made = custom.create_namespaced_custom_object("jobset.x-k8s.io", "v1alpha2", ns, "jobsets", js,
                                                      field_validation="Strict")
        assert made["spec"]["startupPolicy"] == {"startupPolicyOrder": "AnyOrder"}  # the webhook's defaults
        with pytest.raises(ApiException) as e:
            custom.patch_namespaced_custom_object("jobset.x-k8s.io", "v1alpha2", ns, "jobsets", js["metadata"]["name"],
                                                  {"spec": {"failurePolicy": {"maxRestarts": 9}}})
        assert e.value.status == 422 and "Value is immutable" in str(e.value.body)
        custom.delete_namespaced_custom_object("jobset.x-k8s.io", "v1alpha2", ns, "jobsets", js["metadata"]["name"])
        # TrainJob: the runtime must exist (webhook), reserved env and unknown containers are refused
        tcluster = _group_settings(ns, runs, "trainjob")
        (tj,) = group_objects(build_job("sft-lamini", str(run), "r1", tcluster), "sft-lamini", tcluster)
        assert "specified clusterTrainingRuntime must be created before the TrainJob" in refused(
            422, tj, plural="trainjobs")
        fc.add_training_runtime("torch-distributed")
        bad = copy.deepcopy(tj)
        bad["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "3"})
        assert "must not have reserved envs" in refused(422, bad, plural="trainjobs")
        bad = copy.deepcopy(tj)
        rjob = bad["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
        rjob["template"]["spec"]["template"]["spec"]["containers"][0]["name"] = "trainer"
        assert "must not have container that doesn't exist" in refused(422, bad, plural="trainjobs")
        made = custom.create_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", ns, "trainjobs", tj,
                                                      field_validation="Strict")
        with pytest.raises(ApiException) as e:
            custom.patch_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", ns, "trainjobs",
                                                  tj["metadata"]["name"], {"spec": {"trainer": {"numNodes": 3}}})
        assert e.value.status == 422 and "field is immutable" in str(e.value.body)


# docs/distributed.md, "A runtime for bezoar's TrainJobs": the stage contract kept by the runtime itself
BEZOAR_RUNTIME = {
    "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "ClusterTrainingRuntime",
    "metadata": {"name": "bezoar-torch", "labels": {"trainer.kubeflow.org/framework": "torch"}},
    "spec": {"mlPolicy": {"numNodes": 1, "torch": {}}, "template": {"spec": {
        "failurePolicy": {"maxRestarts": 1, "rules": [{"name": "bad_input", "action": "FailJobSet",
                                                       "onJobFailureReasons": ["PodFailurePolicy"]}]},
        "replicatedJobs": [{"name": "node", "template": {
            "metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
            "spec": {"backoffLimit": 0,
                     "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
                         "containerName": "node", "operator": "In", "values": [2]}}]},
                     "template": {"spec": {"restartPolicy": "Never",
                                           "containers": [{"name": "node", "image": "bezoar-train:x"}]}}}}}]}}},
}


def test_a_trainjob_group_fails_through_its_jobset_with_one_clear_line(tmp_path: Path) -> None:
    """launcher trainjob on the runtime docs/distributed.md recommends, the scripted stage: node rank 1 fails, the
    TrainJob's JobSet restarts the group once (the runtime's maxRestarts), then fails; the TrainJob copies the
    JobSet's Failed condition and the stage fails (exit 5) with one line naming the TrainJob, the reason and the
    restarts read from its JobSet."""
    import io

    from bezoar_jobs.executors import kubernetes as k8s
    from bezoar_jobs.executors.cluster import ClusterSettings
    from bezoar_jobs.executors.jobs import job_name
    from tests.k8s_harness import FakeCluster, fake_calls, fake_entrypoints, write_plan

    ns = "bz-test"
    runs = tmp_path / "runs"
    run = runs / "r1"
    commit_filter(open_store(run), "lamini", lamini_rows(4), tmp_path)
    recipe = runs / "recipe.yaml"
    recipe.write_text(FAKE_RECIPE)
    _open_to_pods(runs)
    fake = tmp_path / "fake"
    fake.mkdir()
    plan_path = fake / "plan.json"
    env = write_plan(plan_path, {"sft-lamini": {"rank_exit": {"1": {"exit": 3}}, "sleep": 4.0,
                                                "resolve_master": True}})
    settings = _group_settings(ns, runs, "trainjob").model_dump(mode="json", exclude_none=True)
    settings["distributed"]["trainingRuntime"] = "bezoar-torch"
    cluster = ClusterSettings.model_validate(settings)
    name = job_name("sft-lamini", "r1")
    with FakeCluster(tmp_path / "k8s", entrypoints=fake_entrypoints(), extra_env=env, host_shares=[fake],
                     crds=("trainjob",)) as fc:
        fc.add_pvc(ns, "runs", runs)
        fc.add_training_runtime("bezoar-torch", body=BEZOAR_RUNTIME)
        out = io.StringIO()
        rc = k8s.run_pipeline(recipe.read_text(), str(recipe), str(run), None, cluster, ["sft-lamini"], False,
                              fc.api_client(), out=out, tick_s=0.2)
        text = out.getvalue()
        assert rc == k8s.EXIT_RUN_FAILED, text
        line = next(ln for ln in text.splitlines() if "ReachedMaxRestarts" in ln)
        assert f"stage sft-lamini failed: ReachedMaxRestarts: TrainJob {name}: jobset failed due to reaching max " \
            "number of restarts" in line
        assert "restarted 1 time" in line
        (tj,) = fc.custom_objects("TrainJob", ns)
        assert next(c for c in tj["status"]["conditions"] if c["type"] == "Failed")["reason"] == "ReachedMaxRestarts"
        (js,) = fc.custom_objects("JobSet", ns)
        assert js["status"]["restarts"] == 1
        calls = fake_calls(plan_path)
        assert [c["rank"] for c in calls].count("1") == 2 and {c["nnodes"] for c in calls} == {"2"}
        assert {c["master"] for c in calls} == {f"{name}-node-0-0.{name}"}  # PET_MASTER_ADDR, resolved by node 0
        assert read_manifest(open_store(run), "sft-lamini") is None


def test_a_group_whose_pods_pod_security_refuses_fails_as_bad_input(tmp_path: Path) -> None:
    """A TrainJob on a runtime whose pods break the namespace's restricted Pod Security level (hostNetwork): the
    JobSet's Job gets FailedCreate events and no pod; the controller reads them off the group's Job, as for its own
    Jobs, and fails the stage with exit 2 instead of waiting forever."""
    import io

    from bezoar_jobs.executors import kubernetes as k8s
    from bezoar_jobs.executors.cluster import ClusterSettings
    from tests.k8s_harness import FakeCluster

    ns = "bz-test"
    runs = tmp_path / "runs"
    run = runs / "r1"
    commit_filter(open_store(run), "lamini", lamini_rows(4), tmp_path)
    recipe = runs / "recipe.yaml"
    recipe.write_text(FAKE_RECIPE)
    settings = _group_settings(ns, runs, "trainjob").model_dump(mode="json", exclude_none=True)
    settings["distributed"]["trainingRuntime"] = "bezoar-torch"
    runtime = copy.deepcopy(BEZOAR_RUNTIME)
    runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
        "hostNetwork"] = True
    with FakeCluster(tmp_path / "k8s", crds=("trainjob",)) as fc:
        fc.add_pvc(ns, "runs", runs)
        fc.add_training_runtime("bezoar-torch", body=runtime)
        out = io.StringIO()
        rc = k8s.run_pipeline(recipe.read_text(), str(recipe), str(run), None, ClusterSettings.model_validate(settings),
                              ["sft-lamini"], False, fc.api_client(), out=out, tick_s=0.2, report_pending_s=0)
        text = out.getvalue()
        assert rc == EXIT_BAD_INPUT, text
        assert "PodSecurity" in text and "bz-r1-sft-lamini-node-0 may not create its pods" in text
        assert "hostNetwork" in text
        assert fc.pods(ns) == []
