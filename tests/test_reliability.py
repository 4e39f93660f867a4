"""Faults met with real processes: actors SIGKILLed or SIGSTOPped by PID, a killed driver, runs
interrupted by signals, two runs on one directory, refused resumes, non-finite updates; each
either survived exactly (counted under ``faults/``) or stopped with one line."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from distrl import actors
from distrl.checkpoint import latest_checkpoint, verify_checkpoint
from distrl.config import load_config
from distrl.driver import Trainer, prepare, train
from distrl.learner import NonFiniteError
from distrl.metrics import MetricsLogger, read_metrics

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


def run_with_kill(config, run_dir: Path, pick_victims) -> list[dict]:
    """Run ``config`` in this process; once step 1 is logged, SIGKILL the processes of the
    actors ``pick_victims(trainer)`` returns (by PID, mid-iteration)."""
    trainer = Trainer(config, run_dir, *prepare(config))
    run_dir.mkdir()
    logger = MetricsLogger(run_dir, tensorboard=False, plots=False)
    victims = actors.pids(pick_victims(trainer))  # asked while idle: a busy actor answers late
    killed: list[int] = []

    def kill_after_first_step():
        deadline = time.time() + 120
        while time.time() < deadline and not read_metrics(run_dir / "metrics.jsonl"):
            time.sleep(0.02)
        for pid in victims:  # the next rollout is under way by now
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_after_first_step)
    killer.start()
    try:
        trainer.run(logger, progress=False)
    finally:
        killer.join()
        logger.close()
        trainer.shutdown()
    assert killed
    return read_metrics(run_dir / "metrics.jsonl")


def test_a_sigkilled_reward_actor_is_restarted_and_counted(ray_session, tmp_path):
    config = tiny(tmp_path, iterations=5)
    records = run_with_kill(config, tmp_path / "run", lambda t: t.pool.actors)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["faults/reward_actor_restarts"] == 0
    assert records[-1]["faults/reward_actor_restarts"] >= 1
    assert all(np.isfinite(r["reward/total"]) for r in records)


def test_a_sigkilled_rollout_worker_is_restarted_and_its_stale_batch_redone(ray_session, tmp_path):
    config = tiny(tmp_path, iterations=5)
    records = run_with_kill(config, tmp_path / "run", lambda t: t.workers[:1])
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    # The restarted worker came back with its initial weights: its batch was redone, counted.
    assert records[-1]["faults/stale_batches"] >= 1
    lag = config.rollout.max_policy_lag
    assert max(r["rollout/policy_lag"] for r in records) <= lag  # no stale batch was trained on


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
def test_a_sigkilled_driver_resumes_without_losing_or_repeating_a_step(ray_session, tmp_path):
    reference = train(tiny(tmp_path / "ref", iterations=6))
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "distrl.run", "--config", "tiny", "--iterations", "6"]
    cmd += ["--output-dir", str(run_dir), "--output.checkpoint_every", "1"]
    cmd += ["--output.eval_every", "0", "--output.progress", "false", "--output.plots", "false"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while latest_checkpoint(run_dir / "checkpoints") is None or (
            int(latest_checkpoint(run_dir / "checkpoints").name.split("_")[1]) < 3
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


def test_a_corrupted_newest_checkpoint_is_reported_and_the_previous_one_resumed(
    ray_session, tmp_path
):
    train(tiny(tmp_path, iterations=2, **{"output.checkpoint_every": 1}))
    run_dir = tmp_path / "run"
    newest = run_dir / "checkpoints" / "step_2"
    weights = next(newest.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a torn write
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint.*step_2"):
        train(tiny(tmp_path, iterations=3, **{"output.checkpoint_every": 1}), resume=True)
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]  # step 2 redone from step 1's state
    state = torch.load(run_dir / "final" / "distrl_state.pt", weights_only=True)
    assert state["version"] == 3
