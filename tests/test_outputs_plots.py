"""Plots: one panel per metric with its raw points and EMA, units from the key, the overview
in training.png, gaps, single points, the sweep summary's legend, and MetricsLogger.plot."""

import math

import pytest

from distrl.outputs import plots
from distrl.outputs.metrics import MetricsLogger

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAN = math.nan


def history():
    """Four iterations of a PPO-like run: eval every other step, a None (gap) and a key that
    never has a finite value."""
    records = []
    for step in range(1, 5):
        record = {
            "step": step,
            "reward/total": 0.1 * step,
            "reward/diversity": 0.9,
            "reward/dropped": 0.0,
            "learner/kl": None if step == 2 else 0.01 * step,
            "learner/tokens_per_s": 400.0 + step,
            "learner/policy_loss": -0.01,
            "learner/value_clipfrac": None,  # never finite: no panel
            "publish/bytes": 26 * 2**20,
            "time/iteration_s": 1.5,
        }
        if step % 2 == 0:
            record.update({"eval/reward": 0.5 * step, "eval/ref_perplexity": 5.1e4 / step})
        records.append(record)
    return records


def panels(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]


def test_one_panel_per_finite_metric_each_with_its_raw_points_and_ema():
    series = plots.metric_series(history())
    learner = {k: v for k, v in series.items() if k.startswith("learner/")}
    assert list(learner) == ["learner/kl", "learner/policy_loss", "learner/tokens_per_s"]
    fig = plots.figure(learner, "run: learner")
    axes = panels(fig)
    assert [ax.get_title() for ax in axes] == list(learner)
    for ax, (steps, values) in zip(axes, learner.values()):
        raw, smooth = ax.get_lines()  # exactly one metric per panel: its raw line and its EMA
        assert list(raw.get_xdata()) == steps == [1, 2, 3, 4]
        assert raw.get_ydata() == pytest.approx(values, nan_ok=True)
        assert smooth.get_ydata() == pytest.approx(plots.ema(values), nan_ok=True)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["raw", f"EMA (weight {plots.SMOOTHING})"]
    assert fig.get_suptitle() == "run: learner" and fig.get_supxlabel() == "iteration"


def test_a_none_is_a_gap_and_a_step_without_the_key_is_left_out():
    series = plots.metric_series(history())
    steps, values = series["learner/kl"]
    assert steps == [1, 2, 3, 4] and math.isnan(values[1])
    assert series["eval/reward"] == ([2, 4], [1.0, 2.0])  # evaluated every other step
    assert "learner/value_clipfrac" not in series
    assert math.isnan(plots.ema(values)[1])


def test_ema_is_tensorboards_debiased_average():
    # weight 0.5: last = 0.5 * last + 0.5 * v, divided by 1 - 0.5**n
    assert plots.ema([2.0, 4.0, NAN, 8.0], 0.5) == pytest.approx(
        [2.0, (0.5 * 1.0 + 2.0) / 0.75, NAN, (0.5 * 2.5 + 4.0) / 0.875], nan_ok=True
    )
    assert plots.ema([3.0]) == pytest.approx([3.0])


@pytest.mark.parametrize(
    "key, label",
    [
        ("time/iteration_s", "seconds"),
        ("learner/tokens_per_s", "tokens/s"),
        ("rollout/tokens_per_s", "tokens/s"),
        ("publish/bytes", "MiB"),
        ("learner/kl", "nats"),
        ("learner/approx_kl", "nats"),
        ("learner/entropy", "nats"),
        ("reward/total", "reward"),
        ("eval/reward_diversity", "reward"),
        ("reward/dropped", "count"),
        ("learner/policy_loss", "loss"),
        ("learner/clipfrac", "fraction"),
        ("rollout/response_length", "tokens"),
        ("learner/kl_coef", "value"),
        ("learner/logprob_mismatch_max", "nats"),
        ("faults/rollout_restarts", "count"),
    ],
)
def test_units_come_from_the_key(key, label):
    assert plots.unit(key) == label


def test_panels_carry_units_bytes_in_mib_and_perplexity_on_a_log_axis():
    series = plots.metric_series(history())
    fig = plots.figure(series, "run")
    axes = {ax.get_title(): ax for ax in panels(fig)}
    assert len(axes) == len(series) == 10
    assert axes["time/iteration_s"].get_ylabel() == "seconds"
    assert axes["learner/tokens_per_s"].get_ylabel() == "tokens/s"
    assert axes["publish/bytes"].get_ylabel() == "MiB"
    assert list(axes["publish/bytes"].get_lines()[0].get_ydata()) == [26.0] * 4
    assert axes["eval/ref_perplexity"].get_yscale() == "log"
    assert axes["eval/ref_perplexity"].get_ylabel() == "perplexity (log)"
    assert axes["eval/reward"].get_yscale() == "linear"
    assert axes["learner/kl"].get_ylabel() == "nats"


def test_training_png_shows_the_overview_and_each_namespace_every_metric(tmp_path):
    records = history()
    paths = plots.plot_history(records, tmp_path, "run")
    names = [p.name for p in paths]
    assert names == [
        "training.png",
        "reward.png",
        "learner.png",
        "eval.png",
        "time.png",
        "publish.png",
    ]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # no temp files left
    overview = plots.figures(records, "run")["training.png"]
    assert [ax.get_title() for ax in panels(overview)] == [
        "reward/total",
        "reward/diversity",
        "eval/reward",
        "learner/kl",
        "learner/policy_loss",
        "time/iteration_s",
    ]  # not reward/dropped, learner/tokens_per_s, publish/bytes, eval/ref_perplexity
    learner = plots.figures(records, "run")["learner.png"]
    assert [ax.get_title() for ax in panels(learner)] == [
        "learner/kl",
        "learner/policy_loss",
        "learner/tokens_per_s",
    ]


def test_many_metrics_wrap_into_rows_of_readable_panels():
    series = {f"learner/m{i:02d}": ([1, 2], [0.0, 1.0]) for i in range(14)}
    fig = plots.figure(series, "run")
    fig.canvas.draw()  # constrained layout places the panels when drawn
    width, height = fig.get_size_inches()
    assert width < 14 and height < 16  # 3 per row, 5 rows
    for ax in panels(fig):
        box = ax.get_position()
        assert box.width * width > 3 and box.height * height > 1.8  # inches
        assert all(float(t).is_integer() for t in ax.get_xticks())


def test_a_single_point_still_plots(tmp_path):
    fig = plots.figure({"reward/total": ([7], [0.25])}, "run")
    (ax,) = panels(fig)
    assert list(ax.get_lines()[0].get_ydata()) == [0.25]
    assert [p.name for p in plots.plot_history([{"step": 7, "x": 1.0}], tmp_path, "r")] == [
        "training.png",
        "other.png",
    ]


def whole(ticks) -> bool:
    return all(float(t).is_integer() for t in ticks)


def test_counters_are_steps_with_whole_ticks_and_no_ema():
    series = {
        "learner/version": ([1, 2, 3, 4], [1.0, 2.0, 3.0, 4.0]),
        "faults/stale_batches": ([1, 2, 3, 4], [0.0, 0.0, 1.0, 1.0]),
        "learner/kl": ([1, 2, 3, 4], [0.1, 0.2, 0.1, 0.3]),
        "reward/dropped": ([1, 2, 3, 4], [0.0, 0.0, 0.0, 0.0]),  # flat: still whole ticks
    }
    fig = plots.figure(series, "run")
    axes = {ax.get_title(): ax for ax in panels(fig)}
    for key in ("learner/version", "faults/stale_batches", "reward/dropped"):
        (line,) = axes[key].get_lines()  # no EMA beside it
        assert line.get_drawstyle() == "steps-post"
        assert whole(axes[key].get_yticks()) and axes[key].get_ylim()[0] == 0
    assert len(axes["learner/kl"].get_lines()) == 2  # raw and EMA
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["count (no smoothing)", "raw", f"EMA (weight {plots.SMOOTHING})"]


def test_fault_counters_that_stayed_zero_get_no_panel_and_none_at_all_one_line():
    records = [
        {
            "step": s,
            "reward/total": 0.5,
            "faults/stale_batches": 0,
            "faults/learner_restarts": s - 1,
        }
        for s in (1, 2)
    ]
    faults = plots.figures(records, "run")["faults.png"]
    assert [ax.get_title() for ax in panels(faults)] == ["faults/learner_restarts"]
    quiet = [{**r, "faults/learner_restarts": 0} for r in records]
    faults = plots.figures(quiet, "run")["faults.png"]
    assert panels(faults) == []
    assert faults.get_suptitle() == "run: faults"
    assert [t.get_text() for t in faults.texts][-1] == "no faults: every faults/* counter stayed 0"


def test_one_point_has_whole_iteration_ticks():
    fig = plots.figure({"eval/reward": ([2], [0.5])}, "run")
    (ax,) = panels(fig)
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert 2 in ticks and whole(ticks)


def test_nothing_finite_draws_nothing(tmp_path):
    assert plots.plot_history([{"step": 1, "reward/total": None}], tmp_path / "p", "r") == []
    assert not (tmp_path / "p").exists()


def test_sweep_summary_legend_names_the_colours_and_the_best_trial(tmp_path):
    rows = [
        {"trial": "trial_a", "status": "finished", "best_eval/reward": 1.0, "learner.lr": 1e-4},
        {"trial": "trial_b", "status": "stopped", "best_eval/reward": 0.5, "learner.lr": 1e-5},
        {"trial": "trial_c", "status": "error", "best_eval/reward": None, "learner.lr": 1e-3},
    ]
    path = plots.plot_sweep(
        rows,
        metric="eval/reward",
        mode="max",
        params=[("learner.lr", True)],
        best="trial_a",
        path=tmp_path / "summary.png",
    )
    assert path.read_bytes()[:8] == PNG_MAGIC
    fig = plots.sweep_figure(
        rows, metric="eval/reward", mode="max", params=[("learner.lr", True)], best="trial_a"
    )
    bars_ax, lr_ax = fig.axes
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["finished", "stopped early (ASHA or interrupted)", "best trial"]
    colours = [b.get_facecolor() for b in bars_ax.patches]
    assert colours[0] != colours[1]
    assert lr_ax.get_xscale() == "log"


def test_metrics_logger_plot_writes_pngs_and_is_off_or_empty_without_data(tmp_path):
    logger = MetricsLogger(tmp_path / "run", tensorboard=False)
    logger.log(0, {"reward/total": 0.1, "time/rollout_s": 2.0, "eval/reward": 0.3})
    logger.log(1, {"reward/total": 0.2, "learner/policy_loss": float("nan"), "replay/size": 4})
    paths = logger.plot()
    logger.close()
    # learner/* has no finite value, so no learner.png
    assert [p.name for p in paths] == [
        "training.png",
        "reward.png",
        "eval.png",
        "time.png",
        "replay.png",
    ]
    assert all(p.parent == tmp_path / "run" / "plots" for p in paths)

    assert MetricsLogger(tmp_path / "a", tensorboard=False).plot() == []
    off = MetricsLogger(tmp_path / "b", tensorboard=False, plots=False)
    off.log(0, {"reward/total": 1.0})
    assert off.plot() == []
    assert not (tmp_path / "b" / "plots").exists()
