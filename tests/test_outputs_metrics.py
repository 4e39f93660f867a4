import json
import math

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distrl.errors import DataError
from distrl.outputs.metrics import MetricsLogger, format_progress, read_metrics


def scalars(run_dir, tag):
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_log_writes_one_json_line_per_step(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(1, {"reward/total": 0.5, "learner/policy_loss": np.float32(0.25)})
    logger.log(2, {"reward/total": float("nan"), "time/rollout_s": float("inf"), "replay/size": 7})
    logger.log(3, {"learner/kl": torch.tensor(0.125)})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    logger.close()

    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0] == {"step": 1, "reward/total": 0.5, "learner/policy_loss": 0.25}
    assert records[1] == {"step": 2, "reward/total": None, "time/rollout_s": None, "replay/size": 7}
    assert "NaN" not in lines[1] and "Infinity" not in lines[1]
    assert records[2]["learner/kl"] == 0.125
    assert read_metrics(tmp_path / "metrics.jsonl") == records


def test_log_rejects_non_numbers_and_a_step_key(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    with pytest.raises(TypeError, match="reward/total"):
        logger.log(1, {"reward/total": [1.0]})
    with pytest.raises(ValueError, match="step"):
        logger.log(1, {"step": 3.0})
    logger.close()


def test_tensorboard_holds_the_finite_scalars(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log(1, {"reward/total": 0.5, "learner/kl": float("nan")})
    logger.log(2, {"reward/total": 0.75, "learner/kl": 0.01})
    logger.close()

    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert scalars(tmp_path, "reward/total") == [(1, 0.5), (2, 0.75)]
    assert [(s, pytest.approx(v)) for s, v in scalars(tmp_path, "learner/kl")] == [(2, 0.01)]


def test_tensorboard_shows_an_episode_turn_by_turn(tmp_path):
    turns = [
        {"role": "assistant", "content": "4", "tokens": 2, "reward": 0.1},
        {"role": "user", "content": "Higher."},
        {"role": "assistant", "content": "a | b\nc", "error": "step raised ValueError: x"},
    ]
    logger = MetricsLogger(tmp_path)
    logger.log_samples(3, [{"prompt": "Guess.", "response": "a", "turns": turns}])
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    (text,) = events.Tensors("samples/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    assert text.step == 3
    assert (
        "assistant: 4 (reward 0.1)<br>user: Higher.<br>"
        "assistant: a \\| b c (error: step raised ValueError: x)"
    ) in table
    saved = json.loads((tmp_path / "samples.jsonl").read_text())
    assert saved["turns"] == turns  # the file keeps every field as it is


def test_resume_drops_a_truncated_last_line_and_appends(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "reward/total": 0.5}\n{"step": 2, "reward/total": 0.7}\n{"step": 3, "rew'
    )
    with pytest.warns(UserWarning, match="truncated"):
        logger = MetricsLogger(tmp_path, tensorboard=False, resume=True)
    assert [r["step"] for r in logger.history] == [1, 2]
    assert path.read_text().endswith("0.7}\n")
    logger.log(3, {"reward/total": 0.9})
    logger.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_resume_completes_a_last_line_missing_its_newline(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "reward/total": 0.5}')
    logger = MetricsLogger(tmp_path, tensorboard=False, resume=True)
    logger.log(2, {"reward/total": 0.6})
    logger.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_truncate_after_drops_later_steps_in_file_and_tensorboard(tmp_path):
    first = MetricsLogger(tmp_path)
    for step in range(1, 6):
        first.log(step, {"reward/total": float(step)})
    first.close()

    logger = MetricsLogger(tmp_path, resume=True)
    logger.truncate_after(3)
    logger.log(4, {"reward/total": 40.0})
    logger.log(5, {"learner/kl": 0.5})  # reward/total's old step 5 must not come back
    logger.close()

    assert [
        (r["step"], r.get("reward/total")) for r in read_metrics(tmp_path / "metrics.jsonl")
    ] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
        (5, None),
    ]
    assert scalars(tmp_path, "reward/total") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_without_resume_an_old_file_is_replaced(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 9}\n')
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(0, {"reward/total": 1.0})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0]


def test_read_metrics_names_a_bad_middle_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2"):
        read_metrics(path)


def test_format_progress_is_short_and_skips_missing_or_nan():
    metrics = {"reward/total": 0.51234, "learner/kl": math.nan, "rollout/tokens_per_s": 1234.5}
    keys = ["reward/total", "learner/kl", "eval/reward", "rollout/tokens_per_s"]
    assert format_progress(metrics, keys) == "total=0.5123 tokens_per_s=1234"
    both = {"reward/total": 1.0, "eval/total": 2.0}
    assert format_progress(both, ["reward/total", "eval/total"]) == "reward/total=1 eval/total=2"


def test_format_progress_shows_round_off_as_zero():
    metrics = {"learner/kl": -2.078e-08, "reward/total": 0.00012}
    assert format_progress(metrics, ["learner/kl", "reward/total"]) == "kl=0 total=0.00012"
