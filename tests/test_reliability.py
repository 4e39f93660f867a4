"""Reliability: every bad input answered clearly (one test per case), faults survived with real
processes killed by PID, a killed driver resumed without losing or repeating a step, and
non-finite updates stopping the run with the last good state saved."""

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
from distrl.chat import read_history
from distrl.checkpoint import latest_checkpoint, verify_checkpoint
from distrl.clusters import check_cluster_file
from distrl.config import ModelConfig, TokenizerConfig, load_config
from distrl.data import load_examples
from distrl.driver import Trainer, prepare, train
from distrl.errors import ConfigError, DataError, DistrlError, ModelError, RewardError
from distrl.learner import NonFiniteError
from distrl.metrics import MetricsLogger, read_metrics
from distrl.models import load_policy, tiny_model
from distrl.policy import build_model, build_tokenizer
from distrl.rewards import RewardBatch, RewardScorer, check_reward_config
from distrl.tune_space import read_space

USER_MODULE = """
def boom(completions):
    raise ValueError("bad thing")

def nan(completions):
    return [float("nan")] * len(completions)

def short(completions):
    return [1.0]
"""


def write(tmp: Path, name: str, data: str | bytes) -> str:
    path = tmp / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return str(path)


def reward_config(name: str):
    return load_config("tiny", {"reward.components": [{"name": name}]}).reward


def score(name: str):
    return RewardScorer(reward_config(name)).score(RewardBatch(["a", "b"]))


def mismatched_vocab(tmp: Path):
    folder = tmp / "small-vocab-model"
    tiny_model("tiny-llama", vocab_size=1000, seed=0).save_pretrained(folder)
    tokenizer = build_tokenizer(ModelConfig(), TokenizerConfig(name="tiktoken:gpt2"))
    return build_model(ModelConfig(name=str(folder)), tokenizer, seed=0)


def unwritable_output(tmp: Path):
    (tmp / "a-file").write_text("not a folder")
    config = load_config("tiny", {"output.dir": str(tmp / "a-file" / "run")})
    return train(config)


# (case, error type, what the message must contain; {tmp} is the test's folder), and the call.
BAD_INPUTS = {
    "malformed JSONL line": (
        DataError,
        r"{tmp}/a\.jsonl:2: malformed JSON",
        lambda t: load_examples(write(t, "a.jsonl", '{"text": "ok"}\n{"text": oops}\n')),
    ),
    "empty data file": (
        DataError,
        r"{tmp}/e\.jsonl: no examples",
        lambda t: load_examples(write(t, "e.jsonl", "\n\n")),
    ),
    "missing messages/text": (
        DataError,
        r'{tmp}/m\.jsonl:2: no "messages", "prompt" or "text" key \(keys: foo\)',
        lambda t: load_examples(write(t, "m.jsonl", '{"text": "ok"}\n{"foo": 1}\n')),
    ),
    "wrong types in a line": (
        DataError,
        r'{tmp}/t\.jsonl:1: "messages" must be a list',
        lambda t: load_examples(write(t, "t.jsonl", '{"messages": "hi"}\n')),
    ),
    "non-UTF-8 bytes": (
        DataError,
        r"{tmp}/u\.jsonl:2: not UTF-8 at byte 10",
        lambda t: load_examples(write(t, "u.jsonl", b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')),
    ),
    "an enormous line": (
        DataError,
        r"{tmp}/h\.jsonl:1: line is longer than 1048576 bytes",
        lambda t: load_examples(write(t, "h.jsonl", '{"text": "' + "x" * (2 << 20) + '"}\n')),
    ),
    "unknown config key": (
        ConfigError,
        r"unknown config key 'learner\.lrr' \(did you mean 'learner\.lr'\?\)",
        lambda t: load_config("tiny", {"learner.lrr": 1}),
    ),
    "wrong config type": (
        ConfigError,
        r"rollout\.batch_size: expected an integer, got str 'eight'",
        lambda t: load_config("tiny", {"rollout.batch_size": "eight"}),
    ),
    "negative learning rate": (
        ConfigError,
        r"learner\.lr: -0\.0001 is out of range \(allowed: > 0\.0",
        lambda t: load_config("tiny", {"learner.lr": -1e-4}),
    ),
    "invalid YAML": (
        ConfigError,
        r"{tmp}/c\.yaml: line 3, column 1 invalid YAML",
        lambda t: load_config(write(t, "c.yaml", "algo: ppo\nlearner: [\n")),
    ),
    "missing model path": (
        ModelError,
        r"model path {tmp}/nope does not exist",
        lambda t: load_policy(str(t / "nope")),
    ),
    "a folder that is not a model": (
        ModelError,
        r"{tmp} is not a Hugging Face model folder \(no config\.json\)",
        lambda t: load_policy(str(t)),
    ),
    "tokenizer/model vocabulary mismatch": (
        ModelError,
        r"tokenizer 'tiktoken:gpt2' has vocab size 50257 but the model's vocab size is 1000",
        mismatched_vocab,
    ),
    "reward function import error": (
        RewardError,
        r"reward component 'nosuchmod:f': cannot import module 'nosuchmod'",
        lambda t: check_reward_config(reward_config("nosuchmod:f")),
    ),
    "reward function that raises": (
        RewardError,
        r"reward component 'usermod:boom' failed on sample 0 \('a'\): ValueError: bad thing",
        lambda t: score("usermod:boom"),
    ),
    "reward function returns NaN": (
        RewardError,
        r"reward component 'usermod:nan' failed on sample 0 \('a'\): returned nan",
        lambda t: score("usermod:nan"),
    ),
    "reward function returns the wrong length": (
        RewardError,
        r"reward component 'usermod:short' .*returned 1 values for 2 samples",
        lambda t: score("usermod:short"),
    ),
    "tune space with bad bounds": (
        ConfigError,
        r"{tmp}/s\.yaml: params 'learner\.lr': low \(0\.1\) must be below high \(0\.01\)",
        lambda t: read_space(
            write(
                t,
                "s.yaml",
                "base: tiny\nmetric: eval/reward\nmode: max\n"
                "params:\n  learner.lr: {low: 0.1, high: 0.01}\n",
            )
        ),
    ),
    "invalid cluster YAML": (
        ConfigError,
        r"cluster file {tmp}/k\.yaml: max_workers: -3 is less than the minimum of 0",
        lambda t: check_cluster_file(
            write(
                t,
                "k.yaml",
                "cluster_name: x\nprovider: {type: aws, region: us-west-2}\nmax_workers: -3\n",
            )
        ),
    ),
    "a history file that is not a history": (
        DataError,
        r"history file {tmp}/hist\.json: message 0 has role 'robot'",
        lambda t: read_history(
            write(t, "hist.json", '{"messages": [{"role": "robot", "content": "x"}]}')
        ),
    ),
    "an output directory that is not writable": (
        DistrlError,
        r"cannot write to output directory {tmp}/a-file/run",
        unwritable_output,
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_answered_clearly(case, tmp_path, monkeypatch):
    error, message, call = BAD_INPUTS[case]
    (tmp_path / "usermod.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(error) as caught:
        call(tmp_path)
    pattern = message.replace("{tmp}", str(tmp_path))
    assert caught.match(pattern), str(caught.value)
    assert "\n" not in str(caught.value).strip() or case == "invalid YAML"


def test_the_table_has_at_least_twenty_cases():
    assert len(BAD_INPUTS) >= 20


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
