"""Audit of the DAG walk and the local executor (`bezoar run`), each finding shown on real `bezoar run` processes.

1. A stage process killed by a signal (the OOM killer's SIGKILL) made `bezoar run` exit with Popen's minus the
   signal, modulo 256: 247 for SIGKILL, where a shell and the launcher (bezoar_jobs/launch.py) say 128 + signal.
2. SIGTERM to `bezoar run` killed it alone, at once: its stages ran on, orphaned, their output going nowhere;
   SIGINT to it alone made it return 130 at once, the same. Now the stages are stopped (SIGTERM: they save what
   they can), `bezoar run` waits for them and exits 143 or 130.
3. An error of the walk itself (here: `--force` of a stage whose lease another process holds) left the stages
   it had already started running, orphaned: `bezoar run` exited 3 while they went on and committed after it.
4. A stage's last line without its newline (a progress bar cut short) ran into the next line of the output.
5. A stage that wrote a byte that is not UTF-8 killed the thread relaying its output: its end was never told, and
   `bezoar run` waited for it for ever.
6. `bezoar --log-format json run`: every line relayed from a stage was `[stage] {...}`, no JSON object, although
   the stages write JSON (they inherit the format) and each of their lines names its stage.
7. A local run cancelled while it ran (`bezoar cancel`: "no controller of it will start or go on") went on starting
   stages and exited 0; the Kubernetes controller stops (exit 4). The local one now does the same.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.llm_server import LLMTestServer
from tests.scripted import scripted_answer, scripted_recipe
from tests.test_lease import _alive

ENV = {**os.environ, "SCRIPTED_JUDGE_KEY": "test-key"}
GENERATE = ("generate-lamini", "generate-evol", "generate-orca")


def _wait_for(pred, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not pred():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _holder(run: Path, stage: str) -> int | None:
    try:
        return int(json.loads((run / "_leases" / f"{stage}.json").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def _default_sigint() -> None:
    # a suite run in the background (`sh -c '... &'`, nohup) starts with SIGINT ignored, and `bezoar run` keeps a
    # signal it was started with ignored (as a backgrounded job expects): the test's SIGINT would then do nothing
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _bezoar_run(recipe: Path, run: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "bezoar_jobs.cli", "run", "--recipe", str(recipe), "--run", str(run),
                             *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,  # a signal the test sends reaches `bezoar run` alone
                            preexec_fn=_default_sigint)


def _kill_left(pids: list[int]) -> None:
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_stage_killed_by_a_signal_makes_bezoar_run_exit_128_plus_the_signal(tmp_path):
    with LLMTestServer(script=scripted_answer, api_key="test-key", latency=0.5) as srv:
        recipe = scripted_recipe(tmp_path, srv.url, **{"teacher.max_concurrency": 2})
        run = tmp_path / "run"
        parent = _bezoar_run(recipe, run, "--only", "generate-orca")
        try:
            _wait_for(lambda: _holder(run, "generate-orca") is not None and len(srv.calls) >= 1)
            stage = _holder(run, "generate-orca")
            assert stage is not None
            os.kill(stage, signal.SIGKILL)  # what the OOM killer does
            _, err = parent.communicate(timeout=60)
        finally:
            parent.kill()
        assert parent.returncode == 128 + signal.SIGKILL, err[-2000:]  # was 247 (-9 modulo 256)
        assert "generate-orca failed: killed by SIGKILL (exit code 137)" in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_bezoar_run_stops_its_stages_and_waits_for_them(tmp_path, sig):
    """SIGTERM (or SIGINT) sent to `bezoar run` alone, as a supervisor, `timeout` or `kill` sends it: the stages it
    runs are stopped too (SIGTERM: they save their records), it waits for them, and exits 128 + the signal."""
    with LLMTestServer(script=scripted_answer, api_key="test-key", latency=0.5) as srv:
        recipe = scripted_recipe(tmp_path, srv.url, **{"teacher.max_concurrency": 2, "generation.flush_every": 1})
        run = tmp_path / "run"
        parent = _bezoar_run(recipe, run, "--until", "generate-orca")
        pids: list[int] = []
        try:
            _wait_for(lambda: all(_holder(run, s) is not None for s in GENERATE) and len(srv.calls) >= 6)
            pids = [p for p in (_holder(run, s) for s in GENERATE) if p is not None]
            parent.send_signal(sig)
            _, err = parent.communicate(timeout=60)
            left = [p for p in pids if _alive(p)]
        finally:
            parent.kill()
            _kill_left(pids)
        assert parent.returncode == 128 + sig, err[-3000:]  # SIGTERM: was -15 (killed); SIGINT: 130, but at once
        assert not left, f"stage processes left running after `bezoar run` exited: {left}\n{err[-3000:]}"
        assert f"interrupted by {sig.name}" in err
        assert "stopped unfinished" in err
        assert not list((run / "_leases").glob("*.json"))  # every lease released, the run's too
        # what the stages had received is saved for the next run
        assert list(run.glob("generate-*/_work/records-*/**/part-*.jsonl"))


def test_a_run_started_with_sigint_ignored_keeps_it_ignored(tmp_path):
    """`bezoar run ... &` in a script (or under nohup) starts with SIGINT ignored, so that a Ctrl-C at the terminal
    leaves it alone: its handler must not take SIGINT back."""
    with LLMTestServer(script=scripted_answer, api_key="test-key", latency=0.2) as srv:
        recipe = scripted_recipe(tmp_path, srv.url)
        run = tmp_path / "run"
        parent = subprocess.Popen(
            [sys.executable, "-m", "bezoar_jobs.cli", "run", "--recipe", str(recipe), "--run", str(run), "--only",
             "generate-orca"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        try:
            _wait_for(lambda: _holder(run, "generate-orca") is not None and len(srv.calls) >= 2)
            parent.send_signal(signal.SIGINT)
            _, err = parent.communicate(timeout=120)
        finally:
            parent.kill()
    assert parent.returncode == 0, err[-3000:]
    assert "interrupted" not in err and (run / "generate-orca" / "_MANIFEST.json").is_file()


def test_an_error_of_the_walk_waits_for_the_stages_it_started(tmp_path):
    """`--force` of generate-evol while another process holds its lease: the walk stops (exit 3, naming the
    holder), but only after generate-lamini, which it had already started, has ended. Before, `bezoar run` exited
    at once and generate-lamini ran on, orphaned, committing after it."""
    with LLMTestServer(script=scripted_answer, api_key="test-key", latency=0.3) as srv:
        recipe = scripted_recipe(tmp_path, srv.url, **{"teacher.max_concurrency": 4})
        run = tmp_path / "run"
        holder = subprocess.Popen(
            [sys.executable, "-c",
             "import sys, time\n"
             "from bezoar_jobs.lease import Lease\n"
             "from bezoar_jobs.store import open_store\n"
             f"Lease(open_store({str(run)!r}), 'generate-evol', 'someone else').acquire()\n"
             "print('held', flush=True)\n"
             "sys.stdin.read()\n"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            res = subprocess.run([sys.executable, "-m", "bezoar_jobs.cli", "run", "--recipe", str(recipe), "--run",
                                  str(run), "--until", "generate-orca", "--force"],
                                 env=ENV, capture_output=True, text=True, timeout=120)
            committed_at_exit = (run / "generate-lamini" / "_MANIFEST.json").exists()
            lamini = _holder(run, "generate-lamini")
        finally:
            holder.kill()
            holder.wait()
            # the old code's orphan: let it end before the temporary directory goes
            _wait_for(lambda: _holder(run, "generate-lamini") is None, timeout=60)
        assert res.returncode == 3, res.stderr[-2000:]
        assert "generate-evol" in res.stderr and "someone else" in res.stderr
        assert lamini is None and committed_at_exit, \
            f"generate-lamini was left running after `bezoar run` exited\n{res.stderr[-2000:]}"
        assert "waiting for generate-lamini" in res.stderr


def test_a_stages_last_line_without_a_newline_keeps_its_own_line(tmp_path, monkeypatch, capfd):
    """The relay of a stage's output (a real subprocess): a last line cut short ends with a newline of its own."""
    from bezoar_jobs.executors import local, scheduler
    from bezoar_jobs.recipe import load_recipe
    from bezoar_jobs.store import open_store

    recipe, _ = load_recipe(scripted_recipe(tmp_path, "http://127.0.0.1:9"))
    script = "import sys; print('working'); sys.stdout.write('progress 3/24'); sys.stdout.flush(); sys.exit(3)"
    monkeypatch.setattr(local, "stage_command", lambda name, store, **kw: [sys.executable, "-c", script])
    monkeypatch.setattr(scheduler, "up_to_date", lambda store, r, s: (False, "stub"))
    said: list[str] = []
    lock = threading.Lock()

    def say(msg: str) -> None:
        with lock:
            said.append(msg)
            sys.stderr.write(f"SAID {msg}\n")

    out = local.run_local(recipe, open_store(str(tmp_path / "run")), ["generate-orca"], say=say)
    err = capfd.readouterr().err
    assert out.exit_code == 3 and out.last_log_lines[-1] == "progress 3/24"
    assert "[generate-orca] progress 3/24\n" in err, err


def test_a_stage_that_writes_bytes_that_are_not_text_does_not_hang_the_run(tmp_path, monkeypatch, capfd):
    from bezoar_jobs.executors import local, scheduler
    from bezoar_jobs.recipe import load_recipe
    from bezoar_jobs.store import open_store

    recipe, _ = load_recipe(scripted_recipe(tmp_path, "http://127.0.0.1:9"))
    script = ("import sys; sys.stdout.buffer.write(b'caf\\xe9 from a native library\\n'); sys.stdout.flush(); "
              "print('the last words'); sys.exit(3)")
    monkeypatch.setattr(local, "stage_command", lambda name, store, **kw: [sys.executable, "-c", script])
    monkeypatch.setattr(scheduler, "up_to_date", lambda store, r, s: (False, "stub"))
    result: list[object] = []
    th = threading.Thread(target=lambda: result.append(
        local.run_local(recipe, open_store(str(tmp_path / "run")), ["generate-orca"], say=lambda m: None)),
        daemon=True)
    th.start()
    th.join(30)
    assert result, "bezoar run never saw the stage end"
    out = result[0]
    assert out.exit_code == 3 and out.last_log_lines[-1] == "the last words"  # type: ignore[attr-defined]
    assert "[generate-orca] caf\ufffd from a native library\n" in capfd.readouterr().err


def test_log_format_json_run_writes_one_json_object_per_line_the_stages_lines_included(tmp_path):
    with LLMTestServer(script=scripted_answer, api_key="test-key") as srv:
        recipe = scripted_recipe(tmp_path, srv.url)
        res = subprocess.run([sys.executable, "-m", "bezoar_jobs.cli", "--log-format", "json", "run", "--recipe",
                              str(recipe), "--run", str(tmp_path / "run"), "--only", "generate-orca"],
                             env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    events = []
    for ln in res.stderr.splitlines():
        try:
            events.append(json.loads(ln))
        except ValueError:
            pytest.fail(f"not a JSON object: {ln[:200]!r}")
    assert any(e.get("stage") == "generate-orca" and e.get("event") == "flow_done" for e in events)
    assert any(e.get("msg") == "generate-orca: committed (file://" + str(tmp_path / "run" / "generate-orca") + ")"
               for e in events)


def test_a_local_run_cancelled_while_it_runs_starts_nothing_more_and_stops(tmp_path):
    from bezoar_jobs.run_control import EXIT_CANCELLED

    with LLMTestServer(script=scripted_answer, api_key="test-key", latency=0.5) as srv:
        recipe = scripted_recipe(tmp_path, srv.url, **{"teacher.max_concurrency": 2})
        run = tmp_path / "run"
        parent = _bezoar_run(recipe, run, "--until", "filter-orca", "--parallel", "2")
        pids: list[int] = []
        try:
            _wait_for(lambda: all(_holder(run, s) is not None for s in GENERATE) and len(srv.calls) >= 4)
            pids = [p for p in (_holder(run, s) for s in GENERATE) if p is not None]
            # `bezoar cancel` where no Kubernetes is configured: it marks the run and stops there (it went on to ask
            # for a cluster's Jobs and failed, after writing the mark)
            env = {k: v for k, v in ENV.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
            said = subprocess.run([sys.executable, "-m", "bezoar_jobs.cli", "cancel", "--run", str(run)],
                                  env={**env, "HOME": str(tmp_path / "home")}, capture_output=True, text=True,
                                  timeout=60)
            assert said.returncode == 0, said.stdout + said.stderr
            assert "no Kubernetes configuration here" in said.stdout
            _, err = parent.communicate(timeout=60)
            left = [p for p in pids if _alive(p)]
        finally:
            parent.kill()
            _kill_left(pids)
    assert parent.returncode == EXIT_CANCELLED, err[-3000:]  # was 0, every filter run after the cancel
    assert not left, err[-3000:]
    assert "Cancelled: run file://" in err and "--undo" in err
    assert "[filter-lamini] starting" not in err and "[filter-evol] starting" not in err
    assert not list(run.glob("filter-*/_MANIFEST.json"))
