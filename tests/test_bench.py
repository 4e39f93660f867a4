"""``python -m distrl.bench`` end to end on the tiny model: the JSON has every figure.

Speed is never asserted (the machine is shared and noisy); only that each figure exists and
each ratio to its raw reference is a finite positive number.
"""

import json
import math
import subprocess
import sys

import pytest


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    sections = ["rollout", "learner", "replay", "attention", "pipeline"]
    cmd = [sys.executable, "-m", "distrl.bench", *sections]
    done = subprocess.run(
        [*cmd, "--model", "tiny", "--quick", "--json", str(out)],
        timeout=600,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_machine_and_sections(report):
    machine = report["machine"]
    for key in ("cpu_count", "torch_threads", "device", "torch", "ray", "transformers"):
        assert machine[key], key
    assert report["model"] == "tiny" and report["quick"] is True
    assert "reward" not in report  # only the sections asked for


def test_rollout_figures(report):
    rollout = report["rollout"]
    assert rollout["batch_size"] == 8 and rollout["max_new_tokens"] == 32
    assert rollout["note"]
    assert positive(rollout["raw"]["tokens_per_s"])
    assert positive(rollout["raw"]["driver_peak_rss_mb"])
    assert set(rollout["distrl"]) == {"1 worker", "2 workers"}
    for row in rollout["distrl"].values():
        assert positive(row["reference_tokens_per_s"])
        assert positive(row["tokens_per_s"]) and positive(row["ratio"])
        assert len(row["peak_rss_mb"]) == row["workers"]
        assert all(positive(mb) for mb in row["peak_rss_mb"])


def test_learner_figures(report):
    learner = report["learner"]
    assert learner["note"] and learner["tokens"] > 0
    assert positive(learner["raw"]["tokens_per_s"])
    assert positive(learner["driver_peak_rss_mb"])
    rows = learner["distrl"]
    assert set(rows) == {"train, 1 epoch", "train, 3 epochs", "update phase, one epoch"}
    for row in rows.values():
        assert row["reference_tokens_per_s"] == learner["raw"]["tokens_per_s"]
        assert positive(row["tokens_per_s"]) and positive(row["ratio"])
        assert positive(row["peak_rss_mb"])
    for row in (rows["train, 1 epoch"], rows["train, 3 epochs"]):
        assert positive(row["learner_reported_tokens_per_s"])


def test_replay_figures(report):
    replay = report["replay"]
    assert replay["capacity"] == 100_000 and replay["batch"] == 512
    assert set(replay["figures"]) == {
        "add_transitions_per_s",
        "sample_per_s",
        "update_per_s",
        "sample_update_per_s",
    }
    for row in replay["figures"].values():
        for key in ("distrl", "distrl_ray_actor", "rllib", "ratio", "ratio_ray_actor"):
            assert positive(row[key]), key


def test_attention_figures(report):
    attention = report["attention"]
    lengths = [row["length"] for row in attention["rows"]]
    assert lengths == sorted(lengths) and attention["length_growth"] == lengths[-1] / lengths[0]
    for row in attention["rows"]:
        assert positive(row["favor_ms"]) and positive(row["favor_peak_mb"])
    assert positive(attention["favor_memory_growth"])


def test_pipeline_figures(report):
    pipeline = report["pipeline"]
    for name in ("distrl_overlap", "distrl_alternate"):
        row = pipeline[name]
        assert positive(row["seconds_per_step"]) and positive(row["completions_per_s"])
        assert len(row["seconds"]) == 3  # the quick run's timed steps, after a warm-up
    # The tiny models use tiktoken, which TRL cannot take: the comparison says it was skipped.
    assert pipeline["trl_grpo"] is None and "TRL comparison skipped" in pipeline["note"]
