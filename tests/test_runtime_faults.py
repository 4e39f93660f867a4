"""Signals during a run (what a first SIGINT abandons or waits for, and says; a second one)
and the loss-jump guard."""

import os
import signal

import pytest

from distrl.runtime.faults import Interrupt, StopSignals, loss_jump


def test_a_signal_abandons_a_wait_and_says_so(capsys):
    signals = StopSignals()
    with signals, pytest.raises(Interrupt), signals.abandonable("step 3's rollouts"):
        os.kill(os.getpid(), signal.SIGINT)
    assert signals.signum == signal.SIGINT
    assert capsys.readouterr().err.strip() == (
        "distrl: SIGINT received: abandoning step 3's rollouts (nothing learned is lost) "
        "and stopping now"
    )


def test_a_signal_during_an_update_says_what_it_waits_for_and_a_second_stops_at_once(capsys):
    # What was there before (SIG_IGN, not Python's handler, under a shell's background job).
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        signals.doing = "step 7's update"
        os.kill(os.getpid(), signal.SIGTERM)  # remembered: the update goes on
        assert signals.signum == signal.SIGTERM
        with pytest.raises(Interrupt), signals.abandonable("step 7's evaluation"):
            pass  # the next wait is not entered
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert capsys.readouterr().err.strip() == (
        "distrl: SIGTERM received: stopping after step 7's update and a checkpoint; send it "
        "again to stop at once"
    )
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def steps(key, values):
    return [{"step": i + 1, key: v} for i, v in enumerate(values)]


@pytest.mark.parametrize(
    "key, past, now, jumped",
    [
        ("learner/value_loss", [0.9, 1.2, 0.7], 6_151_293.0, True),  # a corrupted value head
        ("learner/grad_norm", [3.0, 5.0, 4.0, 6.0], 45_630_552.0, True),
        ("learner/td_loss", [0.02, 0.03], 40.0, True),  # 2 steps of history are enough
        ("learner/value_loss", [0.9, 1.2, 0.7], 300.0, False),  # large, but not 1000 times
        ("learner/value_loss", [1e-6, 2e-6, 1e-6], 5.0, False),  # measured against 0.01 at least
        ("learner/value_loss", [0.9], 6e6, False),  # one step is no history
        ("learner/policy_loss", [1e-4, -1e-4, 2e-4], 0.5, False),  # it changes sign: not read
        ("learner/value_loss", [0.9, float("nan"), 1.1, None], 2e3, True),  # gaps are skipped
    ],
)
def test_a_loss_far_above_its_recent_median_is_a_jump(key, past, now, jumped):
    said = loss_jump(steps(key, past), {key: now}, 1000.0)
    assert (said is not None) == jumped, said
    if jumped:
        assert (
            said.startswith(f"{key} jumped to {now:.4g}, ")
            and "(faults.max_loss_jump=1000)" in said
        )
    assert loss_jump(steps(key, past), {key: now}, 0.0) is None  # off


def test_only_the_last_ten_steps_make_the_median():
    past = [1000.0] * 20 + [1.0] * 10
    assert loss_jump(steps("learner/grad_norm", past), {"learner/grad_norm": 5e3}, 1000.0)
