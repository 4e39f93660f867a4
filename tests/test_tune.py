"""Sweeps: the search-space parser and its errors, the log/int transforms, trial resources, and
a real BayesOpt sweep of the tiny config on the session's local Ray."""

import csv
import dataclasses
import json
import math
import random
from pathlib import Path

import pytest

from distrl import tune
from distrl.config import load_config
from distrl.config import space as tune_space
from distrl.errors import ConfigError, DistrlError
from distrl.outputs.metrics import MetricsLogger

SPACES = Path(__file__).resolve().parents[1] / "tune_spaces"


def load(tmp_path, text, base="tiny"):
    file = tmp_path / "space.yaml"
    file.write_text(text)
    space = tune_space.read_space(file)
    return tune_space.check_space(space, load_config(base, space.overrides))


def read_csv(file):
    with open(file, newline="") as f:
        return list(csv.DictReader(f))


GOOD = "metric: eval/reward\nparams:\n  learner.lr: {low: 1.0e-5, high: 1.0e-2, log: true}\n"


@pytest.mark.parametrize(
    "text, fragment",
    [
        (GOOD.replace("learner.lr", "learner.lrr"), "did you mean 'learner.lr'?"),
        (GOOD.replace("learner.lr", "lerner.lr"), "did you mean 'learner'?"),
        (GOOD.replace("learner.lr", "ppo"), "'ppo' is a config section, not a field"),
        (GOOD.replace("learner.lr", "model.name"), "only numeric fields can be searched"),
        (GOOD.replace("1.0e-2", "1.0e-6"), "low (1e-05) must be below high (1e-06)"),
        (GOOD.replace("1.0e-5", "0.0"), "a log range needs low > 0, got 0.0"),
        (GOOD.replace("log: true", "type: int"), "the field is float but the range says type: int"),
        (
            "metric: eval/reward\nparams:\n  ppo.epochs: {low: 1, high: 4, type: float}\n",
            "the field is int but the range says type: float",
        ),
        (
            "metric: eval/reward\nparams:\n  ppo.epochs: {low: 1.5, high: 4}\n",
            "an int field needs whole-number bounds",
        ),
        (GOOD.replace("eval/reward", "eval/rewrad"), "unknown metric 'eval/rewrad'"),
        (GOOD.replace("eval/reward", "eval/rewrad"), "reward/diversity, eval/reward_diversity"),
        (GOOD.replace("1.0e-2", "2.0"), "high 2.0 is not a valid value: learner.lr: 2.0 is out"),
        (
            "metric: eval/reward\nparams:\n  ppo.clip: {low: -0.1, high: 0.3}\n",
            "low -0.1 is not a valid value: ppo.clip: -0.1 is out of range (allowed: > 0.0",
        ),
        (
            "metric: eval/reward\nparams:\n  reward.components[1].weight: {low: 0.1, high: 2}\n",
            "reward.components has 1 item(s) in the base config, so index 1 does not exist",
        ),
        (GOOD.replace("metric:", "metrc:"), "unknown key 'metrc' (did you mean 'metric'?)"),
        (GOOD + "mode: maximise\n", "mode must be max or min"),
        (GOOD.replace("log: true", "log: yes please"), "'log' must be true or false"),
        (GOOD.replace("low:", "lo:"), "unknown key 'lo' (did you mean 'low'?)"),
        ("metric: eval/reward\nparams: {}\n", "params must map dotted config fields"),
        (GOOD + "overrides: {output.eval_every: 0}\n", "eval/reward needs evaluations"),
    ],
)
def test_space_errors_name_the_problem(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    assert fragment in str(err.value)
    assert "space.yaml" in str(err.value)


def test_list_items_by_index_in_either_spelling(tmp_path):
    space = load(
        tmp_path,
        "metric: reward/total\nbase: default\nparams:\n"
        "  reward.components.1.weight: {low: 0.1, high: 2.0}\n"
        "  ppo.epochs: {low: 1, high: 4}\n",
        base="default",
    )
    assert [p.path for p in space.params] == ["reward.components[1].weight", "ppo.epochs"]
    assert [p.type for p in space.params] == ["float", "int"]  # left out: the field's type
    config = tune_space.with_values(load_config("default"), {"reward.components[1].weight": 1.5})
    assert config.reward.components[1].weight == 1.5
    assert config.reward.components[0] == load_config("default").reward.components[0]


def test_shipped_spaces_check_against_their_base():
    ppo = tune_space.check_space(tune_space.read_space(SPACES / "ppo.yaml"), load_config("default"))
    assert {"learner.lr", "ppo.kl_coef", "ppo.clip", "ppo.epochs"} <= {p.path for p in ppo.params}
    tune_space.check_space(ppo, load_config("tiny"))  # the smoke-test base too
    dqn = tune_space.read_space(SPACES / "dqn.yaml")
    config = load_config(dqn.base, dqn.overrides)
    assert config.algo == "dqn"
    dqn = tune_space.check_space(dqn, config)
    assert {p.path.split(".")[0] for p in dqn.params} == {"learner", "dqn", "replay"}


@pytest.mark.parametrize(
    "param",
    [
        tune_space.Param("learner.lr", 1e-6, 1e-2, log=True),
        tune_space.Param("ppo.clip", 0.1, 0.3),
        tune_space.Param("ppo.epochs", 1, 4, type="int"),
        tune_space.Param("dqn.epsilon_decay_steps", 100, 10_000, log=True, type="int"),
    ],
)
def test_transforms_round_trip_and_stay_in_bounds(param):
    lo, hi = param.bounds()
    if param.log:
        assert lo == pytest.approx(math.log(param.low))
    for value in [param.low, param.high, *([2, 3, 777] if param.type == "int" else [])]:
        if param.low <= value <= param.high:
            back = param.to_real(param.to_search(value))
            assert back == pytest.approx(value) and type(back) is type(value)
    rng = random.Random(0)
    xs = [lo, hi, *(rng.uniform(lo, hi) for _ in range(2000))]
    values = [param.to_real(x) for x in xs]
    assert all(param.low <= v <= param.high for v in values)
    assert param.to_real(lo) == pytest.approx(param.low)
    assert param.to_real(hi) == pytest.approx(param.high)
    if param.type == "int":
        assert all(isinstance(v, int) for v in values)
        if not param.log:  # floor(uniform(low, high + 1)): every integer equally likely
            counts = [values.count(k) for k in range(param.low, param.high + 1)]
            assert min(counts) > 0.8 * max(counts)
    else:
        assert min(values) < param.low * 1.5 and max(values) > param.high / 1.5


def test_real_values_use_the_search_keys():
    space = tune_space.Space(
        "s.yaml",
        "tiny",
        "reward/total",
        "max",
        (
            tune_space.Param("learner.lr", 1e-5, 1e-2, log=True),
            tune_space.Param("ppo.epochs", 1, 4, type="int"),
        ),
    )
    assert [p.key for p in space.params] == ["log(learner.lr)", "ppo.epochs"]
    values = space.real_values({"log(learner.lr)": math.log(1e-3), "ppo.epochs": 2.99})
    assert values["learner.lr"] == pytest.approx(1e-3) and values["ppo.epochs"] == 2


def test_trial_bundles_reserve_every_actor():
    config = load_config(
        "tiny",
        {
            "resources.learner_gpus": 1,
            "resources.custom": "{rollout: {inference_node: 0.01}}",
            "reward.num_actors": 2,
        },
    )
    bundles = tune_space.trial_bundles(config, 0.5)
    assert bundles == [
        {"CPU": 0.5},
        {"CPU": 0.25, "GPU": 1.0},
        {"CPU": 0.25, "inference_node": 0.01},
        {"CPU": 0.25, "inference_node": 0.01},
        {"CPU": 0.25},
        {"CPU": 0.25},
    ]
    dqn = load_config("tiny", {"algo": "dqn", "resources.replay_cpus": 1})
    assert tune_space.trial_bundles(dqn, 0)[0] == {} and tune_space.trial_bundles(dqn, 0)[-1] == {
        "CPU": 1.0
    }


def test_a_failed_random_trial_is_replaced_not_waited_for():
    from ray.tune import uniform

    searcher = tune._searcher("reward/total", "max", random_steps=2, seed=0)
    searcher.set_search_properties(None, None, {"x": uniform(0.0, 1.0)})
    assert searcher.suggest("a") and searcher.suggest("b")
    assert searcher.suggest("c") is None  # waits for both random trials to complete
    searcher.on_trial_complete("a", error=True)
    assert searcher.suggest("c") is not None


def test_cli_errors_before_any_trial(tmp_path):
    with pytest.raises(ConfigError, match="both searched and set"):
        tune.main(["--space", str(SPACES / "ppo.yaml"), "--learner.lr", "0.1", "--dry-run"])
    with pytest.raises(ConfigError, match="did you mean --learner.lr"):
        tune.main(["--space", str(SPACES / "ppo.yaml"), "--learner.lrr", "0.1"])
    with pytest.raises(ConfigError, match="--resume needs --name"):
        tune.main(["--resume"])
    assert tune.main(["--space", str(SPACES / "dqn.yaml"), "--dry-run"]) == 0


def test_a_dqn_sweep_may_optimise_dqn_metrics(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "base: tiny\noverrides: {algo: dqn}\nmetric: learner/td_loss\nmode: min\n"
        "params:\n  dqn.gamma: {low: 0.9, high: 1.0}\n"
    )
    space = tune_space.read_space(path)
    space = tune_space.check_space(space, load_config(space.base, space.overrides))
    assert space.metric == "learner/td_loss"
    assert tune.main(["--space", str(path), "--dry-run"]) == 0


LR = tune_space.Param("learner.lr", 1e-5, 1e-2, log=True)


def summary_row(trial, best, last, lr=1e-4, status="finished"):
    return {
        "trial": trial,
        "status": status,
        "iterations": 2,
        "learner.lr": lr,
        "best_eval/reward": best,
        "last_eval/reward": last,
        "error": "",
    }


def test_best_trial_ties_go_to_the_better_last_value_then_the_first_folder():
    space = tune_space.Space("s.yaml", "tiny", "eval/reward", "max", (LR,))
    rows = [
        summary_row("trial_c", 1.0, 0.8),
        summary_row("trial_b", 1.0, 0.9),
        summary_row("trial_a", 1.0, 0.8),
        summary_row("trial_d", 0.5, 0.5),
        summary_row("trial_e", None, None, status="error"),
    ]
    assert tune.best_trial(rows, space)["trial"] == "trial_b"
    rows[1]["last_eval/reward"] = 0.8
    assert tune.best_trial(rows, space)["trial"] == "trial_a"
    low = dataclasses.replace(space, mode="min")
    assert tune.best_trial(rows, low)["trial"] == "trial_d"
    assert tune.best_trial(rows[4:], space) is None


def test_the_best_config_file_summary_and_printed_line_name_one_trial(tmp_path, capsys):
    space = tune_space.Space("s.yaml", "tiny", "eval/reward", "max", (LR,))
    rows = [
        summary_row("trial_b", 1.0, 1.0, lr=2e-4),
        summary_row("trial_a", 1.0, 1.0, lr=3e-4, status="stopped"),  # tie: first folder wins
        summary_row("trial_c", 0.5, 0.5, lr=4e-4),
    ]
    top = tune.write_results(rows, space, load_config("tiny"), tmp_path)
    out = capsys.readouterr().out
    assert top["trial"] == "trial_a"
    assert load_config(str(tmp_path / "best_config.yaml")).learner.lr == pytest.approx(3e-4)
    assert out.splitlines()[-2:] == [
        f"distrl.tune: best trial trial_a (max eval/reward 1): {tmp_path / 'trial_a'}",
        f"distrl.tune: its config (learner.lr=0.0003): {tmp_path / 'best_config.yaml'}",
    ]
    assert out.count("tensorboard --logdir") == 1
    assert [r["trial"] for r in read_csv(tmp_path / "summary.csv")] == [
        "trial_b",
        "trial_a",
        "trial_c",
    ]
    assert (tmp_path / "summary.png").stat().st_size > 10_000


def test_plot_trial_draws_a_trials_plots_from_its_metrics(tmp_path):
    logger = MetricsLogger(tmp_path / "trial_x" / "distrl", tensorboard=False, plots=False)
    logger.log(1, {"reward/total": 0.5, "learner/kl": 0.01})
    logger.log(2, {"reward/total": 0.7, "learner/kl": 0.02})
    logger.close()
    paths = tune.plot_trial(tmp_path / "trial_x")
    assert [p.name for p in paths] == ["training.png", "reward.png", "learner.png"]
    assert all(p.parent == tmp_path / "trial_x" / "distrl" / "plots" for p in paths)
    assert tune.plot_trial(tmp_path / "trial_y") == []  # died before its first iteration


@pytest.mark.slow  # about 2 minutes on 2 shared cores
def test_bayesopt_sweep_of_tiny_runs_summarises_and_its_best_config_trains(ray_session, tmp_path):
    from distrl.loop.driver import train

    # 2 trials x (trial + learner + rollout worker + reward actor) x 0.25 CPU = the session's 2
    # CPUs: the sweep only finishes if every actor lands in its trial's placement group.
    argv = [
        "--space",
        str(SPACES / "ppo.yaml"),
        "--config",
        "tiny",
        "--num-samples",
        "4",
        "--max-concurrent",
        "2",
        "--storage",
        str(tmp_path),
        "--name",
        "sweep",
        "--trial-cpus",
        "0.25",
        "--iterations",
        "2",
        "--rollout.num_workers",
        "1",
        "--output.plots",
        "false",
    ]
    assert tune.main(argv) == 0
    exp = tmp_path / "sweep"
    space = tune_space.check_space(tune_space.read_space(SPACES / "ppo.yaml"), load_config("tiny"))
    rows = read_csv(exp / "summary.csv")
    assert len(rows) == 4
    assert {r["status"] for r in rows} == {"finished"}
    assert all(r["iterations"] == "2" for r in rows)
    for p in space.params:
        values = [float(r[p.path]) for r in rows]
        assert all(p.low <= v <= p.high for v in values), (p, values)
        if p.type == "float":
            assert len(set(values)) == 4  # four different suggestions
    assert all(math.isfinite(float(r["best_eval/reward"])) for r in rows)
    # Every trial reported the real values, the same as the CSV, and Tune's files are there.
    for row in rows:
        trial = exp / row["trial"]
        last = json.loads((trial / "result.json").read_text().splitlines()[-1])
        for p in space.params:
            assert last[f"params/{p.path}"] == pytest.approx(float(row[p.path]))
        assert last["step"] == 2 and math.isfinite(last["eval/reward"])
        assert (trial / "progress.csv").is_file()
        assert list((trial / "distrl" / "tensorboard").glob("events.out.tfevents.*"))
        assert (trial / "distrl" / "final").is_dir()
        assert not (trial / "distrl" / "plots").exists()  # --output.plots false
    assert (exp / "summary.png").stat().st_size > 10_000

    best = load_config(str(exp / "best_config.yaml"))
    top = max(rows, key=lambda r: float(r["best_eval/reward"]))
    assert best.learner.lr == pytest.approx(float(top["learner.lr"]))
    assert best.ppo.epochs == int(top["ppo.epochs"])
    assert best.output.dir is None and best.rollout.num_workers == 1
    run_dir = train(
        load_config(
            str(exp / "best_config.yaml"),
            {"iterations": 1, "output.dir": str(tmp_path / "best"), "output.progress": False},
        )
    )
    assert (run_dir / "final").is_dir()

    # Resuming the finished sweep finishes at once and rewrites the summary.
    (exp / "summary.csv").unlink()
    assert tune.main(["--resume", "--name", "sweep", "--storage", str(tmp_path)]) == 0
    assert len(read_csv(exp / "summary.csv")) == 4
    with pytest.raises(DistrlError, match="already exists"):
        tune.main(argv)


@pytest.mark.slow  # about 1.5 minutes on 2 shared cores
def test_an_asha_sweep_of_grpo_plots_every_trial_and_prints_one_best_and_one_hint(
    ray_session, tmp_path, capfd
):
    """ASHA over the GRPO space: a critic-free algorithm sweeps, every trial draws its plots
    though ASHA stops it, and the sweep prints one best trial and one TensorBoard hint."""
    argv = [
        *("--space", str(SPACES / "grpo.yaml"), "--config", "tiny", "--scheduler", "asha"),
        *("--num-samples", "2", "--max-concurrent", "2", "--trial-cpus", "0.25"),
        *("--storage", str(tmp_path), "--name", "asha"),
        *("--iterations", "2", "--rollout.num_workers", "1"),
    ]
    assert tune.main(argv) == 0
    out = capfd.readouterr().out
    exp = tmp_path / "asha"
    rows = read_csv(exp / "summary.csv")
    assert len(rows) == 2 and {r["status"] for r in rows} == {"finished"}

    # ASHA stops each trial at its last report (max_t), before the trial could draw its plots.
    for row in rows:
        run_dir = exp / row["trial"] / "distrl"
        names = {p.name for p in (run_dir / "plots").glob("*.png")}
        assert {"training.png", "reward.png", "learner.png", "eval.png", "time.png"} <= names
        assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
        assert not list((exp / row["trial"]).glob("events.out.tfevents.*"))  # no Tune logger
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        assert "learner/value_loss" not in last and "learner/kl_loss" in last  # no critic
        assert last["learner/lr"] == pytest.approx(float(row["learner.lr"]))

    # One best: not Tune's "Current best trial", distrl's line, the trial of best_config.yaml.
    assert "Current best trial" not in out
    best = [line for line in out.splitlines() if line.startswith("distrl.tune: best trial")]
    assert len(best) == 1
    (top,) = [r for r in rows if f" {r['trial']} " in best[0]]
    assert best[0].endswith(str(exp / top["trial"]))
    config = load_config(str(exp / "best_config.yaml"))
    assert config.learner.lr == pytest.approx(float(top["learner.lr"]))
    assert config.algo == "grpo" and config.rollout.samples_per_prompt == 4
    # One TensorBoard hint, to the folder holding every trial's event files.
    assert [line for line in out.splitlines() if "tensorboard" in line.lower()] == [
        f"distrl.tune: curves: tensorboard --logdir {exp}"
    ]
