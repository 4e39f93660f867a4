"""Faults met with real processes: actors SIGKILLed or SIGSTOPped by PID, a killed driver, runs
interrupted by signals, two runs on one directory, refused resumes, non-finite updates; each
either survived exactly (counted under ``faults/``) or stopped with one line."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from distrl.config import load_config
from distrl.data.prompts import prepare
from distrl.errors import DistrlError
from distrl.loop.driver import train
from distrl.loop.rundir import stopped_before_first_step
from distrl.loop.trainer import Trainer
from distrl.outputs.metrics import MetricsLogger, read_metrics
from distrl.runtime import actors
from distrl.runtime.checkpoint import latest_checkpoint, verify_checkpoint
from distrl.runtime.optimizer import NonFiniteError

# ---- faults with real processes ----------------------------------------------------------


def tiny(tmp_path, **overrides):
    base = {
        "output.dir": str(tmp_path / "run"),
        "output.progress": False,
        "output.plots": False,
        "output.tensorboard": False,
        "output.eval_every": 0,
    }
    return load_config("tiny", {**base, **overrides})


def run_with_kill(
    config, run_dir: Path, pick_victims, *, after_step: int = 1, sig=signal.SIGKILL, inspect=None
) -> list[dict]:
    """Run ``config`` in this process; once step ``after_step`` is logged, send ``sig`` to the
    processes of the actors ``pick_victims(trainer)`` returns (by PID, mid-iteration).
    ``inspect(trainer)``, if given, checks the finished trainer before its actors end."""
    return run_with_kills(config, run_dir, [(after_step, pick_victims)], sig=sig, inspect=inspect)


def run_with_kills(
    config, run_dir: Path, schedule, *, sig=signal.SIGKILL, inspect=None
) -> list[dict]:
    """``run_with_kill`` with several faults: ``schedule`` is ``(after_step, pick_victims)``
    pairs in step order, each victim's PID taken before the run starts; ``after_step`` 0 sends
    the signal before the run starts, while every actor is idle."""
    trainer = Trainer(config, run_dir, *prepare(config))
    run_dir.mkdir()
    logger = MetricsLogger(run_dir, tensorboard=False, plots=False)
    # Asked while idle: a busy actor answers late.
    victims = [(step, actors.pids(pick(trainer))) for step, pick in schedule]
    expected = sum(len(pids) for _, pids in victims)
    killed: list[int] = []

    for _, pids in [v for v in victims if v[0] == 0]:  # idle: before the run starts
        for pid in pids:
            os.kill(pid, sig)
            killed.append(pid)
    victims = [v for v in victims if v[0] > 0]

    def kill_after_steps():
        deadline = time.time() + 300
        for step, pids in victims:
            metrics = run_dir / "metrics.jsonl"
            while time.time() < deadline and len(read_metrics(metrics)) < step:
                time.sleep(0.02)
            for pid in pids:  # the next rollout is under way by now
                os.kill(pid, sig)
                killed.append(pid)

    killer = threading.Thread(target=kill_after_steps)
    killer.start()
    try:
        trainer.run(logger, progress=False)
        if inspect is not None:
            inspect(trainer)
    finally:
        killer.join()
        logger.close()
        trainer.shutdown()
        for pid in killed:  # a stopped process is ended by Ray; make sure of it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert len(killed) == expected
    return read_metrics(run_dir / "metrics.jsonl")


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "final" / "distrl_state.pt", weights_only=True)


@pytest.mark.slow  # a whole run on Ray with a restore
@pytest.mark.parametrize("mode, lag", [("sync", 1), ("async", 2)])
def test_sigkilled_reward_actor_worker_and_learner_cost_nothing_and_are_counted(
    ray_session, tmp_path, capfd, mode, lag
):
    """Three faults in one run, one after each of steps 1 to 3: a reward actor and a rollout
    worker (both restarted by Ray, the worker's stale batches redone), then the learner (restored
    from its step-2 checkpoint, step 3 redone). The run ends as an uninterrupted one would."""
    rollout = {"rollout.mode": mode, "rollout.max_policy_lag": lag}
    config = tiny(tmp_path, iterations=8, **{"output.checkpoint_every": 2}, **rollout)
    run_dir = tmp_path / "run"
    schedule = [
        (1, lambda t: t.pool.actors),
        (2, lambda t: t.workers[:1]),
        (3, lambda t: [t.learner]),
    ]
    records = run_with_kills(config, run_dir, schedule)
    assert [r["step"] for r in records] == list(range(1, 9))  # none lost, none twice
    assert all(np.isfinite(r["reward/total"]) for r in records)
    last = records[-1]
    assert records[0]["faults/reward_actor_restarts"] == 0
    assert last["faults/reward_actor_restarts"] >= 1
    # The restarted worker came back with its initial weights (version 0): in sync mode its
    # batch was then staler than the bound, redone and counted; at lag 2 it was not.
    assert last["faults/rollout_restarts"] == 1
    assert (last["faults/stale_batches"] >= 1) == (mode == "sync"), [
        (r["faults/rollout_restarts"], r["faults/stale_batches"], r["faults/learner_restarts"])
        for r in records
    ]
    assert last["faults/learner_restarts"] == 1
    assert "the learner actor died during step" in capfd.readouterr().err
    # Equal to an uninterrupted run: one version per step, 2 minibatch updates per step.
    state = final_state(run_dir)
    assert state["version"] == 8
    assert state["steps"] == 8 * (config.rollout.batch_size * 2 // config.ppo.minibatch_size)
    lags = [r["rollout/policy_lag"] for r in records]
    assert min(lags) >= 0 and max(lags) <= config.rollout.max_policy_lag  # none stale or future
    # Every step trained the prompts of the uninterrupted stream (all 8 rows of each logged).
    trained = [r["example"] for r in read_metrics(run_dir / "samples.jsonl")]
    assert trained == prepare(config)[0].next(8 * 8)


@pytest.mark.slow  # a run on Ray with a restore
def test_a_sigkilled_learner_rank_is_restored_with_its_group(ray_session, tmp_path, capfd):
    """One of two learner workers killed after step 3: the other's collective fails, the
    whole group is rebuilt and restored from step 2, and the run ends as an uninterrupted
    one would."""
    config = tiny(
        tmp_path,
        iterations=4,
        **{"resources.learner_workers": 2, "output.checkpoint_every": 2},
    )
    records = run_with_kills(config, tmp_path / "run", [(3, lambda t: t.learner.ranks[1:])])
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["faults/learner_restarts"] == 1
    assert "the learner actor lost one of its workers during step 4" in capfd.readouterr().err
    state = final_state(tmp_path / "run")
    assert state["version"] == 4
    assert state["steps"] == 4 * (config.rollout.batch_size * 2 // config.ppo.minibatch_size)
    # Restored from step 2, the run drew step 3's prompts again: every step trained the prompts
    # of the uninterrupted stream (all 8 rows of each step are in samples.jsonl).
    trained = [r["example"] for r in read_metrics(tmp_path / "run" / "samples.jsonl")]
    assert trained == prepare(config)[0].next(4 * 8)


@pytest.mark.slow  # two DQN runs
def test_a_sigkilled_replay_actor_and_an_idle_worker_cost_the_dqn_run_nothing(
    ray_session, tmp_path
):
    dqn = {
        "algo": "dqn",
        "iterations": 6,
        "output.checkpoint_every": 2,
        "dqn.learning_starts": 16,
        "dqn.batch_size": 16,
        "dqn.updates_per_iteration": 2,
        "dqn.action_top_k": 8,
    }
    reference = train(tiny(tmp_path / "ref", **dqn))
    config = tiny(tmp_path, **dqn)
    run_dir = tmp_path / "run"
    # A worker killed while idle (before the run starts) is restarted by Ray with the same
    # seed: it costs nothing, and it is counted.
    schedule = [(0, lambda t: t.workers[:1]), (3, lambda t: [t.algo.replay])]
    records = run_with_kills(config, run_dir, schedule)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert records[-1]["faults/replay_restarts"] == 1
    assert records[-1]["faults/rollout_restarts"] == 1
    ref_records = read_metrics(reference / "metrics.jsonl")
    assert records[-1]["learner/updates"] == ref_records[-1]["learner/updates"]
    assert final_state(run_dir)["steps"] == final_state(reference)["steps"]
    assert records[-1]["replay/size"] == ref_records[-1]["replay/size"]


@pytest.mark.slow  # waits out a timeout
def test_a_sigstopped_rollout_worker_is_replaced_after_its_timeout(ray_session, tmp_path):
    config = tiny(tmp_path, iterations=4, **{"faults.generate_timeout_s": 5})
    records = run_with_kill(config, tmp_path / "run", lambda t: t.workers[:1], sig=signal.SIGSTOP)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["faults/rollout_timeouts"] >= 1
    assert records[-1]["faults/rollout_restarts"] == 0  # replaced by the loop, not restarted
    lag = config.rollout.max_policy_lag
    assert max(r["rollout/policy_lag"] for r in records) <= lag


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (an embedded Ray's head processes and workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@pytest.mark.slow  # two tiny runs, one of them in its own process with its own Ray
@pytest.mark.parametrize("mode, lag", [("sync", 1), ("async", 2)])
def test_a_sigkilled_driver_resumes_without_losing_or_repeating_a_step(
    ray_session, tmp_path, mode, lag
):
    rollout = {"rollout.mode": mode, "rollout.max_policy_lag": lag}
    reference = train(tiny(tmp_path / "ref", iterations=6, **rollout))
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "distrl.run", "--config", "tiny", "--iterations", "6"]
    cmd += [f"--{key}={value}" for key, value in rollout.items()]
    cmd += ["--output-dir", str(run_dir), "--output.checkpoint_every", "1"]
    cmd += ["--output.eval_every", "0", "--output.progress", "false", "--output.plots", "false"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while (saved := latest_checkpoint(run_dir / "checkpoints")) is None or (
            int(saved.name.split("_")[1]) < 3
        ):
            assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
            assert time.time() < deadline
            time.sleep(0.1)
        below = descendants(driver.pid)
        driver.send_signal(signal.SIGKILL)  # mid-run: step 3 saved, later steps under way
        driver.wait(timeout=30)
    finally:
        for pid in [driver.pid, *descendants(driver.pid)]:
            with __import__("contextlib").suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for pid in below:  # the killed driver's own Ray: its head processes and actors
        with __import__("contextlib").suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not (run_dir / "final").exists()
    saved = int(latest_checkpoint(run_dir / "checkpoints").name.split("_")[1])

    config = load_config(str(run_dir / "config.yaml"))
    train(config, resume=True)
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # none lost, none twice
    assert saved >= 3
    state = torch.load(run_dir / "final" / "distrl_state.pt", weights_only=True)
    ref = torch.load(reference / "final" / "distrl_state.pt", weights_only=True)
    assert state["version"] == ref["version"] == 6
    assert state["steps"] == ref["steps"]  # total optimizer updates equal an uninterrupted run
    # The prompts queued or in flight at the saved step were drawn again: every step trained
    # the prompts of the uninterrupted run, in its order (samples.jsonl logs all 8 rows of
    # every step).
    examples = [
        [r["example"] for r in read_metrics(d / "samples.jsonl")] for d in (run_dir, reference)
    ]
    assert examples[0] == examples[1] and len(examples[0]) == 6 * 8


@pytest.mark.slow  # a whole run on Ray
def test_non_finite_updates_stop_the_run_with_the_last_good_state_saved(ray_session, tmp_path):
    # A reward of 3e38 is finite but its squared value error is not: every update is skipped.
    config = tiny(
        tmp_path,
        iterations=4,
        **{
            "reward.components": [{"name": "diversity", "weight": 3e38}],
            "learner.max_nonfinite_updates": 3,
            "output.checkpoint_every": 1,
        },
    )
    with pytest.raises(NonFiniteError) as caught:
        train(config)
    message = str(caught.value)
    assert "3 updates in a row had a non-finite loss or gradient" in message
    assert "learner.max_nonfinite_updates" in message and "--resume" in message
    run_dir = tmp_path / "run"
    saved = latest_checkpoint(run_dir / "checkpoints")
    assert saved is not None and str(saved) in message
    verify_checkpoint(saved)
    records = read_metrics(run_dir / "metrics.jsonl")
    assert records[0]["learner/skipped_updates"] == 2  # two minibatches per iteration
    state = torch.load(saved / "distrl_state.pt", weights_only=True)
    assert state["steps"] == 0  # no non-finite update ever touched the weights
    assert json.loads((saved / "distrl_checkpoint.json").read_text())["meta"]["step"] >= 1


# ---- the command line: refused resumes, a second run, a hung reward, signals ----------------


CLI = [sys.executable, "-m", "distrl.run", "--output.progress", "false"]
QUIET_RAY = {**os.environ, "RAY_AUTH_MODE": "disabled"}


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: what 'nothing touched' compares (the lock
    file only names the last process that held the directory)."""
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != ".distrl.lock"]
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def refused(*args: str) -> str:
    """Run the CLI, expect status 2 before Ray starts; return its one-line error."""
    out = subprocess.run([*CLI, *args], env=QUIET_RAY, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in out.stderr, out.stderr
    return lines[-1]


@pytest.mark.slow  # a whole run on Ray
def test_a_refused_resume_changes_nothing_and_says_why(finished_run, tmp_path):
    finished_run = finished_run.run_dir
    before = files_of(finished_run)
    line = refused("--resume", "--output-dir", str(finished_run), "--model.name", "tiny-gpt2")
    assert "--resume: model.name is 'tiny-gpt2' but the run in" in line
    assert "was started with 'tiny-llama'" in line
    line = refused("--resume", "--output-dir", str(finished_run), "--config", "tiny")
    assert "drop --config" in line
    assert files_of(finished_run) == before  # config.yaml included

    broken = tmp_path / "broken"
    shutil.copytree(finished_run, broken)
    for step in (broken / "checkpoints").glob("step_*"):  # every checkpoint torn
        weights = next(step.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:100])
    before = files_of(broken)
    line = refused("--resume", "--output-dir", str(broken))
    assert f"--resume: {broken}/checkpoints holds no complete checkpoint" in line
    assert files_of(broken) == before  # metrics.jsonl, checkpoints and final/ as they were


@pytest.mark.slow  # a resume on Ray of the shared finished run
def test_a_step_checkpointed_but_not_logged_is_logged_from_its_checkpoint_on_resume(
    finished_run, tmp_path
):
    """A driver that dies after step 2's checkpoint and before its line: the resume writes the
    line from the checkpoint's manifest, and every step is logged once."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run.run_dir, run_dir)
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    original = json.loads(lines[-1])
    metrics.write_text(lines[0] + "\n")  # step 2's line never written
    overrides = {"output.dir": str(run_dir), "iterations": 3}
    train(load_config(str(run_dir / "config.yaml"), overrides), resume=True)
    records = read_metrics(metrics)
    assert [r["step"] for r in records] == [1, 2, 3]
    timings = ("time/checkpoint_s", "time/iteration_s")  # measured after the manifest was written
    numbers = {
        k: v
        for k, v in original.items()
        if k not in timings and isinstance(v, (int, float)) and np.isfinite(v)
    }
    assert records[1] == numbers and "reward/total" in numbers


@pytest.mark.slow  # a resume on Ray of the shared finished run
def test_a_forged_checkpoint_whose_losses_jump_stops_the_run_before_saving_anything(
    finished_run, tmp_path
):
    """A value head scaled by 1e5 in step 2's distrl_state.pt, the manifest rewritten to match:
    the checkpoint verifies, and the next step's value loss is a million times its history."""
    import hashlib

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run.run_dir, run_dir)
    step_2 = run_dir / "checkpoints" / "step_2"
    state = torch.load(step_2 / "distrl_state.pt", weights_only=True)
    state["value_head"] = {k: v * 1e5 for k, v in state["value_head"].items()}
    torch.save(state, step_2 / "distrl_state.pt")
    marker = json.loads((step_2 / "distrl_checkpoint.json").read_text())
    data = (step_2 / "distrl_state.pt").read_bytes()
    marker["files"]["distrl_state.pt"] = {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    (step_2 / "distrl_checkpoint.json").write_text(json.dumps(marker))
    verify_checkpoint(step_2)  # the forgery passes the manifest
    before = files_of(run_dir / "checkpoints")
    overrides = {"output.dir": str(run_dir), "iterations": 4}
    with pytest.raises(DistrlError) as stopped:
        train(load_config(str(run_dir / "config.yaml"), overrides), resume=True)
    message = str(stopped.value)
    assert message.startswith("step 3: learner/") and " jumped to " in message, message
    assert "a corrupted checkpoint or a diverging run" in message
    assert f"--resume --output-dir {run_dir}" in message and "\n" not in message
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2]  # not logged
    assert files_of(run_dir / "checkpoints") == before  # and not saved


def wait_for_steps(run_dir: Path, n: int, proc: subprocess.Popen, limit: float = 300) -> None:
    deadline, metrics = time.time() + limit, run_dir / "metrics.jsonl"
    while not metrics.exists() or len(read_metrics(metrics)) < n:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.1)


def start_run(run_dir: Path, *args: str, env=None) -> subprocess.Popen:
    cmd = [*CLI, "--config", "tiny", "--output-dir", str(run_dir), *args]
    cmd += ["--output.eval_every", "0", "--output.tensorboard", "false"]
    return subprocess.Popen(
        cmd, env=env or QUIET_RAY, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def stopped_run(run_dir: Path, *args: str, env: dict[str, str]) -> tuple[str, str]:
    """Run the tiny config with ``args`` to its end, which must be status 2 (an error);
    returns stderr's last line and the whole of it."""
    run = start_run(run_dir, *args, env=env)
    try:
        _, err = run.communicate(timeout=600)
    finally:
        end(run)
    assert run.returncode == 2, err[-3000:]
    return err.strip().splitlines()[-1], err


def end(proc: subprocess.Popen) -> None:
    """Kill a run that a failed assertion left behind, with its own Ray."""
    if proc.poll() is None:
        for pid in [*descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow  # two runs in their own processes
def test_a_second_run_on_the_same_directory_is_refused_naming_the_first(tmp_path):
    run_dir = tmp_path / "run"
    first = start_run(run_dir, "--iterations", "500", "--output.plots", "false")
    try:
        wait_for_steps(run_dir, 1, first)
        line = refused("--resume", "--output-dir", str(run_dir))
        assert f"is in use by another distrl run (PID {first.pid})" in line
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
        assert first.returncode == 128 + signal.SIGINT, err[-2000:]
    finally:
        end(first)
    assert "checkpoints/.tmp" not in err and not list((run_dir / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow  # a run in its own process, waiting out two timeouts
def test_a_reward_function_that_never_returns_stops_the_run_with_one_line(tmp_path):
    # It passes the trial before Ray starts (empty replies) and hangs on the model's replies.
    (tmp_path / "hangmod.py").write_text(
        "import time\n\ndef hang(completions):\n"
        "    if any(completions):\n        time.sleep(3600)\n    return [0.0] * len(completions)\n"
    )
    env = {**QUIET_RAY, "PYTHONPATH": str(tmp_path)}
    args = ["--reward.components", "[{name: 'hangmod:hang'}]", "--output.plots", "false"]
    args += ["--faults.score_timeout_s", "3", "--faults.call_retries", "1"]
    last, _ = stopped_run(tmp_path / "run", *args, env=env)
    assert last.startswith(
        "error: reward actor 0: score did not return within faults.score_timeout_s=3 s on 2 tries"
    ), last
    assert "no checkpoint was written yet" in last
    # Nothing of value was written: the same command may start afresh in the folder.
    assert stopped_before_first_step(tmp_path / "run")


@pytest.mark.slow  # a run of the packaged model in its own process, with its own Ray
def test_an_object_store_that_cannot_spill_stops_the_run_with_one_line(tmp_path):
    # The packaged model's weights (about 540 MB) do not fit an 80 MB store, and a spill
    # threshold of 0 makes the disk count as full, as on a machine whose disk is 95% used.
    env = {**QUIET_RAY, "RAY_local_fs_capacity_threshold": "0"}
    args = ["--model.name", "default", "--tokenizer.name", "auto", "--output.plots", "false"]
    args += ["--resources.object_store_memory", str(80 * 1024**2)]
    last, err = stopped_run(tmp_path / "run", *args, env=env)
    assert last.startswith(
        "error: Ray's object store is full and cannot spill to disk (OutOfDiskError); "
    ), last
    assert "resources.object_store_memory" in last and "no checkpoint was written yet" in last
    assert "Traceback" not in err, err[-3000:]


@pytest.mark.slow  # runs in their own processes
@pytest.mark.parametrize(
    "algo, sig",
    [("ppo", signal.SIGINT), ("dqn", signal.SIGTERM)],
    ids=["ppo-SIGINT", "dqn-SIGTERM"],
)
def test_a_signal_stops_the_run_within_seconds_with_a_checkpoint_and_plots(tmp_path, algo, sig):
    run_dir = tmp_path / "run"
    args = ["--algo", algo, "--iterations", "500", "--output.checkpoint_every", "100"]
    if algo == "dqn":
        args += ["--dqn.learning_starts", "16", "--dqn.batch_size", "16"]
    run = start_run(run_dir, *args)
    try:
        wait_for_steps(run_dir, 2, run)
        sent = time.time()
        run.send_signal(sig)
        _, err = run.communicate(timeout=120)
        took = time.time() - sent
    finally:
        end(run)
    assert run.returncode == 128 + sig, err[-3000:]
    step = read_metrics(run_dir / "metrics.jsonl")[-1]["step"]
    last = err.strip().splitlines()[-1]
    saved = run_dir / "checkpoints" / f"step_{step}"
    assert last == (
        f"error: stopped by {signal.Signals(sig).name}: step {step} is saved in {saved}; "
        f"continue with: python -m distrl.run --resume --output-dir {run_dir}"
    ), err[-3000:]
    verify_checkpoint(saved)
    assert "Traceback" not in err and "(raylet)" not in err, err[-3000:]  # nothing after it
    # It said what it waited for: an abandoned wait, or the stretch it let finish.
    said = [line for line in err.splitlines() if line.startswith("distrl: ") and "received" in line]
    assert len(said) == 1 and said[0].startswith(f"distrl: {signal.Signals(sig).name} received: ")
    assert re.search(r"(abandoning|stopping after) step \d+'s \w+", said[0]), said[0]
    assert (run_dir / "plots" / "training.png").is_file()
    print(f"{algo} stopped {took:.1f} s after {signal.Signals(sig).name}")  # for the README
    if algo == "ppo":  # the checkpoint resumes: one more step, then done
        cmd = ["--resume", "--output-dir", str(run_dir), "--iterations", str(step + 1)]
        out = subprocess.run(
            [*CLI, *cmd], env=QUIET_RAY, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr[-3000:]
        steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]
        assert steps == list(range(1, step + 2))
