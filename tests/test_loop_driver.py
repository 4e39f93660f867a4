"""The training loop end to end on a real local Ray, with the tiny config."""

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from distrl.config import load_config
from distrl.data.prompts import prepare
from distrl.errors import DistrlError
from distrl.loop.driver import train
from distrl.models.loading import load_policy
from distrl.outputs.metrics import read_metrics
from distrl.runtime.checkpoint import OPTIMIZER_FILE, verify_checkpoint


def tiny(tmp_path, **overrides):
    base = {
        "output.dir": str(tmp_path / "run"),
        "output.progress": False,
        "output.plots": False,
        "iterations": 4,
    }
    return load_config("tiny", {**base, **overrides})


@pytest.mark.slow  # a whole run on Ray
def test_tiny_run_trains_logs_and_checkpoints(ray_session, tmp_path):
    config = tiny(tmp_path, **{"output.plots": True})
    run_dir = train(config)
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in (
        "reward/total",
        "reward/diversity",
        "learner/policy_loss",
        "learner/value_loss",
        "learner/entropy",
        "learner/kl",
        "learner/clipfrac",
        "learner/approx_kl",
        "rollout/tokens_per_s",
        "rollout/policy_lag",
        "time/score_s",
        "time/publish_s",
        "publish/bytes",
    ):
        assert key in records[-1], key
    assert "eval/reward" in records[1] and "eval/ref_perplexity" in records[1]
    # The iteration's time is all of it: evaluation and checkpoint included (steps 2 and 4).
    for r in records:
        parts = ["time/rollout_wait_s", "time/score_s", "time/train_s", "time/publish_s"]
        if r["step"] % 2 == 0:
            parts += ["time/eval_s", "time/checkpoint_s"]
        else:
            assert "time/eval_s" not in r and "time/checkpoint_s" not in r
        assert r["time/iteration_s"] >= sum(r[k] for k in parts), r
    assert max(r["learner/version"] for r in records) == 4
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "tensorboard").iterdir())
    assert (run_dir / "plots" / "training.png").stat().st_size > 1000
    # The final policy is a Hugging Face folder whose weights moved away from the initial ones.
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    # The published weights are the policy's, once each (tied tensors once): float32 bytes.
    unique = {p.data_ptr(): p for p in final.parameters()}.values()
    assert records[-1]["publish/bytes"] == sum(p.numel() * 4 for p in unique)
    initial = load_policy(
        "tiny-llama",
        vocab_size=final.config.vocab_size,
        special_ids={"eos_token_id": final.config.eos_token_id},
        seed=0,
    )
    changed = [
        n
        for n, p in final.named_parameters()
        if not torch.equal(p, dict(initial.named_parameters())[n])
    ]
    assert len(changed) > 0
    checkpoints = run_dir / "checkpoints"
    assert {p.name for p in checkpoints.iterdir()} >= {"step_2", "step_4", "best"}
    # Optimizer state only where a resume starts: the newest step checkpoint.
    assert (checkpoints / "step_4" / OPTIMIZER_FILE).is_file()
    for folder in (checkpoints / "step_2", checkpoints / "best", run_dir / "final"):
        assert not (folder / OPTIMIZER_FILE).exists(), folder
    verify_checkpoint(checkpoints / "step_2")
    # Every iteration's first completions, with their rewards and the version that made them.
    samples = read_metrics(run_dir / "samples.jsonl")
    assert sorted({r["step"] for r in samples}) == [1, 2, 3, 4]
    row = samples[-1]
    assert row["prompt"] and isinstance(row["response"], str) and row["version"] >= 2
    assert {"reward/total", "reward/diversity"} <= set(row)


def trained_prompts(run_dir: Path) -> list[int]:
    """The training prompt of every row ``samples.jsonl`` logged, in order."""
    return [row["example"] for row in read_metrics(run_dir / "samples.jsonl")]


def prompt_stream(config, n: int) -> list[int]:
    """The first ``n`` training prompts an uninterrupted run draws."""
    return prepare(config)[0].next(n)


@pytest.mark.slow  # a run and its resume on Ray
@pytest.mark.parametrize("lag", [0, 2])
def test_resume_skips_a_torn_newest_checkpoint_and_continues_at_the_next_step(
    ray_session, tmp_path, lag
):
    # Checkpoints every few minutes too: here every step, though checkpoint_every is 5.
    minutes = {"output.checkpoint_every": 5, "output.checkpoint_minutes": 1e-6}
    # Every row of every step logged: each prompt once (one sample each), 4 per worker.
    minutes.update({"rollout.max_policy_lag": lag, "output.samples_logged": 8})
    train(tiny(tmp_path, iterations=2, **minutes))
    run_dir = tmp_path / "run"
    assert (run_dir / "checkpoints" / "step_1").is_dir()
    newest = run_dir / "checkpoints" / "step_2"
    weights = next(newest.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a torn write
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint.*step_2"):
        train(tiny(tmp_path, iterations=4, **minutes), resume=True)
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]  # step 2 redone from step 1's state, none twice in the log
    state = torch.load(run_dir / "final" / "distrl_state.pt", weights_only=True)
    assert state["version"] == 4 and state["extra"]["step"] == 4
    # Step 1's checkpoint was written while step 2's batches were drawn and in flight: the
    # resumed run drew them again, so it trained the prompts an uninterrupted run trains.
    config = tiny(tmp_path)
    assert trained_prompts(run_dir) == prompt_stream(config, 4 * 8)


@pytest.mark.slow  # a whole run on Ray
@pytest.mark.parametrize("algo", ["ppo", "grpo", "dqn"])
def test_async_training_runs_ahead_within_its_staleness_bound_on_every_prompt_in_order(
    ray_session, tmp_path, algo
):
    lag = 2
    options = {"rollout.mode": "async", "rollout.max_policy_lag": lag}
    if algo == "dqn":  # updates from the first step on
        options.update({"dqn.learning_starts": 16, "dqn.batch_size": 16})
    config = tiny(tmp_path, algo=algo, iterations=5, **options, **{"output.samples_logged": 64})
    run_dir = train(config)
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    rows = read_metrics(run_dir / "samples.jsonl")
    group = config.rollout.samples_per_prompt
    per_step = config.rollout.batch_size * config.rollout.num_workers * group
    assert len(rows) == 5 * per_step  # every sample of every step logged
    # Step s trains from version s - 1: every sample was made at most ``lag`` versions before,
    # and from step 3 on the batches queued ahead were made exactly that far behind.
    lags = [r["step"] - 1 - r["version"] for r in rows]
    assert min(lags) >= 0 and max(lags) == lag, lags
    assert all(r["step"] - 1 - r["version"] == lag for r in rows if r["step"] >= 3)
    assert [r["rollout/policy_lag"] for r in records] == [0, 1, 2, 2, 2]
    assert all(r["rollout/queue_depth"] == lag * config.rollout.num_workers for r in records)
    assert all(r["time/learner_idle_s"] >= r["time/rollout_wait_s"] for r in records)
    # The prompts trained are those a synchronous run trains, in the same order.
    stream = prompt_stream(config, 5 * per_step // group)
    assert [r["example"] for r in rows] == [i for i in stream for _ in range(group)]
    assert records[-1]["faults/stale_batches"] == 0
    state = torch.load(run_dir / "final" / "distrl_state.pt", weights_only=True)
    assert state["version"] == 5


def test_cli_rejects_bad_config_before_ray_starts(tmp_path, monkeypatch, capsys):
    from distrl import run
    from distrl.config import cli
    from distrl.loop import driver

    cases = [
        (["--learner.lrr", "1"], "did you mean --learner.lr?"),
        (["--learner.lr", "-1"], "learner.lr: -1.0 is out of range"),
        (["--data.train", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
    ]
    out = ["--output-dir", str(tmp_path / "out")]
    # The first as a user meets it: its own process, status 2, one line, no Ray.
    argv, fragment = cases[0]
    result = subprocess.run(
        [sys.executable, "-m", "distrl.run", "--config", "tiny", *argv, *out],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr and "Started a local Ray" not in result.stderr

    # The others through the same entry point in this process; Ray must not start.
    def no_ray(*args, **kwargs):
        raise AssertionError("the run went on to start Ray")

    monkeypatch.setattr(driver, "_train", no_ray)
    for argv, fragment in cases[1:]:
        monkeypatch.setattr(sys, "argv", ["distrl.run", "--config", "tiny", *argv, *out])
        with pytest.raises(SystemExit) as stopped:
            cli.run_main(run.main)
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and fragment in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_folder_whose_run_stopped_before_its_first_step_is_reused(tmp_path, monkeypatch, capsys):
    """What a run leaves when its reward fails at the first scoring: the same command starts
    afresh there. A metrics record, a checkpoint or a file distrl did not write: refused."""
    from distrl.loop import driver

    def unstarted(run_dir):
        run_dir.mkdir(parents=True)
        for name in ("config.yaml", "metrics.jsonl", "samples.jsonl", ".distrl.lock"):
            (run_dir / name).write_text("algo: ppo\n" if name == "config.yaml" else "")
        (run_dir / "tensorboard").mkdir()
        (run_dir / "tensorboard" / "events.out.tfevents.1").write_bytes(b"\0")
        return run_dir

    seen = []
    monkeypatch.setattr(driver, "_train", lambda c, d, *a: seen.append(sorted(d.iterdir())))
    unstarted(tmp_path / "run")
    driver.train(tiny(tmp_path))
    assert seen == [[tmp_path / "run" / ".distrl.lock"]]  # held, and all the rest cleared
    assert "stopped before its first step; starting afresh there" in capsys.readouterr().out
    for kept, write in [
        ("metrics.jsonl", lambda p: p.write_text('{"step": 1}\n')),
        ("checkpoints", lambda p: (p / "step_1").mkdir()),
        ("notes.txt", lambda p: p.write_text("mine")),
    ]:
        run_dir = unstarted(tmp_path / kept / "run")
        (run_dir / "checkpoints").mkdir()
        write(run_dir / kept)
        before = sorted(run_dir.rglob("*"))
        with pytest.raises(DistrlError, match="is not empty; pass --resume"):
            driver.train(tiny(tmp_path / kept))
        assert sorted(run_dir.rglob("*")) == before


def test_cli_help_lists_fields():
    result = subprocess.run(
        [sys.executable, "-m", "distrl.run", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    assert "--learner.lr" in result.stdout and "AdamW learning rate" in result.stdout
    assert "--resume" in result.stdout


@pytest.mark.slow  # the shared finished run on Ray
def test_config_yaml_is_the_resolved_config(finished_run):
    again = load_config(str(finished_run.run_dir / "config.yaml"))
    assert again == finished_run.config and again.learner.lr == 2e-3
    tokenizer = finished_run.run_dir / "final" / "distrl_tokenizer.json"
    assert json.loads(tokenizer.read_text())["spec"] == "tiktoken:gpt2"


def test_no_held_out_prompts_is_said_not_hidden():
    config = load_config("tiny", {"data.val_fraction": 0.0})
    with pytest.warns(UserWarning, match="eval/\\* metrics use the first training prompts"):
        train_prompts, val_prompts = prepare(config)
    assert val_prompts.ids == train_prompts.ids[: config.output.eval_examples]


# What the loop does with an algorithm depends only on its entry's traits: a critic or not, groups
# or not, the KL in the reward or in the loss. One run per critic-free combination: RLOO (groups,
# KL loss) and REINFORCE++ (no groups, KL in the reward); PPO is the tiny run above. GRPO runs on
# Ray in the dynamic-sampling test below, in the documented `--config tiny --algo grpo` command
# (tests/test_docs.py) and in the GRPO sweep (tests/test_tune.py). Every algorithm's own maths runs
# in the real Learner in tests/test_algos_learning.py (it learns) and tests/test_pg_learner.py.
@pytest.mark.slow  # two runs
@pytest.mark.parametrize("algo", ["rloo", "reinforce_pp"])
def test_critic_free_algorithms_run_end_to_end_with_groups(ray_session, tmp_path, algo):
    config = tiny(
        tmp_path,
        algo=algo,
        iterations=2,
        **{"rollout.samples_per_prompt": 2, "ppo.kl_loss_coef": 0.01, "output.plots": False},
    )
    run_dir = train(config)
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    last = records[-1]
    assert "learner/value_loss" not in last  # no critic
    assert "learner/kl_loss" in last and "learner/kl" in last
    assert last["learner/version"] == 2 and last["sampling/rounds"] == 1
    state = torch.load(run_dir / "final" / "distrl_state.pt", weights_only=True)
    # 2 workers x 4 prompts x 2 samples = 16 sequences, minibatches of 4, 1 epoch: 4 steps each.
    assert state["steps"] == 2 * 4
    from distrl.validate import run_config_for, validate

    final = str(run_dir / "final")
    report = validate(run_config_for(final, None), examples=2, checkpoint=final)
    assert report["validate/examples"] == 2


@pytest.mark.slow  # a run whose every group ties: dynamic sampling collects its most rounds
def test_dynamic_sampling_drops_groups_without_signal_and_says_so(ray_session, tmp_path):
    # The diversity reward of 8 random tokens is 1 for every sample: no group has signal.
    config = tiny(
        tmp_path,
        algo="grpo",
        iterations=1,
        **{
            "rollout.samples_per_prompt": 2,
            "ppo.dynamic_sampling": True,
            "ppo.max_sampling_rounds": 3,
            "ppo.overlong_buffer": 4,
            "output.plots": False,
            "output.samples_logged": 48,
            "rollout.max_policy_lag": 0,  # each round drawn after the one before it
        },
    )
    run_dir = train(config)
    records = read_metrics(run_dir / "metrics.jsonl")
    assert records[0]["sampling/rounds"] == 3 and records[0]["sampling/kept_fraction"] == 0.0
    # 3 rounds of new prompts (2 workers x 4, each sampled twice), none a round's repeat.
    assert trained_prompts(run_dir) == [i for i in prompt_stream(config, 24) for _ in (0, 1)]
    assert records[0]["reward/overlong_penalty"] < 0  # 8-token replies hit the length limit


@pytest.mark.slow  # starts a Ray of its own
def test_embedded_ray_prints_the_real_dashboard_url_and_no_token_notice():
    """With 8265 taken the dashboard moves to another port: distrl prints that one (it answers),
    and not Ray's token-authentication notice (token auth stays on, as Ray decides)."""
    code = (
        "import contextlib, io, re, urllib.request, ray\n"
        "from distrl.config import load_config\n"
        "from distrl.loop.driver import init_ray\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    init_ray(load_config('tiny'))\n"
        "print(out.getvalue(), end='')\n"
        "url = re.search(r'dashboard at (\\S+)', out.getvalue())\n"
        "if url:\n"
        "    print('status', urllib.request.urlopen(url[1] + '/', timeout=30).status)\n"
        "print('auth', ray._private.authentication.authentication_utils.is_token_auth_enabled())\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    with socket.socket() as taken:
        with contextlib.suppress(OSError):  # another process holding 8265 does as well
            taken.bind(("127.0.0.1", 8265))
            taken.listen()
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
    assert run.returncode == 0, run.stderr
    printed = re.fullmatch(
        r"distrl: local Ray dashboard at http://127\.0\.0\.1:(\d+) "
        r"\(token auth: `ray get-auth-token` prints the token\)\nstatus 200\nauth True\n",
        run.stdout,
    )
    assert printed, run.stdout
    assert int(printed[1]) != 8265
    assert "Token authentication is enabled" not in run.stderr, run.stderr
    assert "View the dashboard" not in run.stderr, run.stderr
