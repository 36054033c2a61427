"""Ctrl-C and SIGTERM while TensorFlow runs: held until a step ends, then raised (raised
mid-step they broke TensorFlow's scope stack: `RuntimeError: Exiting device scope without
proper scope nesting`, a traceback instead of `cleanmessy train: terminated`)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import pytest

from cleanmessy import interrupts
from cleanmessy.params import TrainParams

from conftest import labelled_photos


@pytest.fixture
def handlers():
    """The CLI's handlers for the test, then the previous ones back."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    interrupts.install()
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


def test_a_signal_in_a_deferred_block_waits_for_the_next_step_boundary(handlers):
    reached = []
    with pytest.raises(interrupts.Terminated):
        with interrupts.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            reached.append("after the signal")
            interrupts.raise_pending()
            reached.append("after the boundary")
    assert reached == ["after the signal"]
    interrupts.raise_pending()  # nothing left pending


def test_the_block_end_is_a_boundary_and_outside_a_block_signals_raise_at_once(handlers):
    with pytest.raises(KeyboardInterrupt) as raised:
        with interrupts.deferred():
            os.kill(os.getpid(), signal.SIGINT)
    assert type(raised.value) is KeyboardInterrupt  # Ctrl-C, not SIGTERM's Terminated
    with pytest.raises(interrupts.Terminated):
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_second_signal_does_not_wait(handlers):
    with pytest.raises(KeyboardInterrupt), interrupts.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # the user insists
        pytest.fail("the second signal was held")
    interrupts.raise_pending()  # the first went with it: nothing is left to raise later


def test_other_threads_neither_hold_nor_raise_the_main_threads_signals(handlers):
    """The app predicts in worker threads: their blocks must not hold the server's Ctrl-C."""
    inside = threading.Event()
    leave = threading.Event()

    def predict() -> None:
        with interrupts.deferred():
            inside.set()
            leave.wait(10)
            interrupts.raise_pending()

    worker = threading.Thread(target=predict)
    worker.start()
    inside.wait(10)
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        leave.set()
        worker.join(10)
    assert not worker.is_alive()


@pytest.mark.parametrize("distribute", ["none", "mirrored"])
def test_sigterm_during_training_stops_at_the_next_step_boundary(handlers, tmp_path, distribute):
    """Sent at the end of epoch 1, SIGTERM is raised before epoch 2's first step, through Keras's
    fit and through the loop every tf.distribute strategy trains with."""
    from cleanmessy.distribute import make_strategy
    from cleanmessy.models import build_model
    from cleanmessy.training import train_model

    frame = labelled_photos(tmp_path, 24, 16)
    p = TrainParams(epochs=5, batch_size=4, patience=5, filters=[4], dense_units=4, distribute=distribute)
    strategy, _ = make_strategy(p, None)
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = build_model(2, 16, p, seed=0)
    epochs_ended = []

    def on_epoch(metrics: dict, step: int) -> None:
        epochs_ended.append(step)
        os.kill(os.getpid(), signal.SIGTERM)
        epochs_ended.append("survived the signal")

    with pytest.raises(interrupts.Terminated):
        train_model(model, frame.iloc[:16], frame.iloc[16:], tmp_path, ["clean", "messy"], 16, p, 0,
                    on_epoch=on_epoch, strategy=strategy)
    assert epochs_ended == [1, "survived the signal"]
