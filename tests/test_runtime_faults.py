"""Signals during a run: what a first SIGINT abandons or waits for, and says; a second one."""

import os
import signal

import pytest

from distrl.runtime.faults import Interrupt, StopSignals


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
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
