"""The training loop end to end on a real local Ray, with the tiny config."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from distrl.config import load_config
from distrl.driver import train
from distrl.metrics import read_metrics
from distrl.models import load_policy
from distrl.prompts import prepare


def tiny(tmp_path, **overrides):
    base = {
        "output.dir": str(tmp_path / "run"),
        "output.progress": False,
        "output.plots": True,
        "iterations": 4,
    }
    return load_config("tiny", {**base, **overrides})


def test_tiny_run_trains_logs_and_checkpoints(ray_session, tmp_path):
    config = tiny(tmp_path)
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
    ):
        assert key in records[-1], key
    assert "eval/reward" in records[1] and "eval/ref_perplexity" in records[1]
    assert max(r["learner/version"] for r in records) == 4
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "tensorboard").iterdir())
    assert (run_dir / "plots" / "training.png").stat().st_size > 1000
    # The final policy is a Hugging Face folder whose weights moved away from the initial ones.
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final")
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
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} >= {"step_2", "step_4", "best"}


def test_resume_continues_at_the_next_step(ray_session, tmp_path):
    train(tiny(tmp_path, iterations=2))
    run_dir = train(tiny(tmp_path, iterations=4), resume=True)
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]
    state = torch.load(run_dir / "final" / "distrl_state.pt", weights_only=True)
    assert state["version"] == 4 and state["extra"]["step"] == 4


def test_cli_rejects_bad_config_before_ray_starts(tmp_path):
    for argv, fragment in [
        (["--learner.lrr", "1"], "did you mean --learner.lr?"),
        (["--learner.lr", "-1"], "learner.lr: -1.0 is out of range"),
        (["--data.train", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
    ]:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "distrl.run",
                "--config",
                "tiny",
                *argv,
                "--output-dir",
                str(tmp_path / "out"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2, result.stderr
        assert fragment in result.stderr
        assert "Started a local Ray" not in result.stderr
        assert not (tmp_path / "out").exists()


def test_cli_help_lists_fields():
    result = subprocess.run(
        [sys.executable, "-m", "distrl.run", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    assert "--learner.lr" in result.stdout and "AdamW learning rate" in result.stdout
    assert "--resume" in result.stdout


def test_config_yaml_is_the_resolved_config(ray_session, tmp_path):
    config = tiny(tmp_path, iterations=1, **{"learner.lr": "2e-3"})
    run_dir = train(config)
    again = load_config(str(run_dir / "config.yaml"))
    assert again == config
    assert (
        json.loads((run_dir / "final" / "distrl_tokenizer.json").read_text())["spec"]
        == "tiktoken:gpt2"
    )


def test_no_held_out_prompts_is_said_not_hidden():
    config = load_config("tiny", {"data.val_fraction": 0.0})
    with pytest.warns(UserWarning, match="eval/\\* metrics use the first training prompts"):
        train_prompts, val_prompts = prepare(config)
    assert val_prompts.ids == train_prompts.ids[: config.output.eval_examples]
