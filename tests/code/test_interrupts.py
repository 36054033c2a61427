"""Ctrl-C and SIGTERM while TensorFlow runs: held until a step ends, then raised (raised
mid-step they broke TensorFlow's scope stack: `RuntimeError: Exiting device scope without
proper scope nesting`, a traceback instead of `cleanmessy train: terminated`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from cleanmessy import interrupts
from cleanmessy.params import TrainParams

from conftest import labelled_photos


@pytest.fixture
def handlers():
    """The CLI's handlers for the test (with Ctrl-C handled even where pytest was started with
    SIGINT ignored, as a background job is), then the previous ones back; no signal left held."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupts.install()
    yield
    for s, handler in before.items():
        signal.signal(s, handler)
    left = (interrupts._depth, interrupts._pending)
    interrupts._depth, interrupts._pending = 0, None
    assert left == (0, None), "a block left its depth or a held signal behind"


def send(signum: int = signal.SIGTERM) -> None:
    os.kill(os.getpid(), signum)


def test_a_signal_in_a_deferred_block_waits_for_the_next_step_boundary(handlers, capfd):
    reached = []
    with pytest.raises(interrupts.Terminated):
        with interrupts.deferred():
            send()
            reached.append("after the signal")
            interrupts.raise_pending()
            reached.append("after the boundary")
    assert reached == ["after the signal"]
    assert capfd.readouterr().err == interrupts.HELD.decode()  # the user knows it was heard


def test_the_block_end_is_a_boundary_and_outside_a_block_signals_raise_at_once(handlers):
    reached = []
    with pytest.raises(KeyboardInterrupt) as raised:
        with interrupts.deferred():
            send(signal.SIGINT)
            reached.append("after the signal")
    assert type(raised.value) is KeyboardInterrupt and reached == ["after the signal"]  # Ctrl-C's, not SIGTERM's
    with pytest.raises(interrupts.Terminated):
        send()


def test_a_second_signal_does_not_wait_and_takes_the_first_with_it(handlers):
    with pytest.raises(KeyboardInterrupt) as raised, interrupts.deferred():
        send(signal.SIGTERM)
        send(signal.SIGINT)  # the user insists
        pytest.fail("the second signal was held")
    assert type(raised.value) is KeyboardInterrupt  # the second's; the fixture checks nothing is left held


def test_a_block_stopped_by_its_own_error_drops_the_held_signal_but_an_inner_one_keeps_it(handlers):
    with pytest.raises(ValueError), interrupts.deferred():
        send()
        raise ValueError("an unreadable photo")
    with pytest.raises(interrupts.Terminated), interrupts.deferred():
        with contextlib.suppress(ValueError), interrupts.deferred():
            send()
            raise ValueError("caught inside the outer block, whose work goes on")
        interrupts.raise_pending()


def test_a_sigint_the_process_started_ignoring_stays_ignored(handlers):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    interrupts.install()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    send(signal.SIGINT)  # nothing happens


def test_other_threads_neither_hold_nor_raise_the_main_threads_signals(handlers):
    """The app predicts in worker threads: their blocks must not hold the server's Ctrl-C, nor
    raise a signal the main thread holds."""
    inside, leave, errors = threading.Event(), threading.Event(), []

    def predict() -> None:
        try:
            with interrupts.deferred():
                inside.set()
                leave.wait(10)
                interrupts.raise_pending()
        except BaseException as exc:  # noqa: BLE001 - the test asserts there is none
            errors.append(exc)

    def in_worker() -> threading.Thread:
        worker = threading.Thread(target=predict)
        inside.clear()
        leave.clear()
        worker.start()
        inside.wait(10)
        return worker

    worker = in_worker()
    try:
        with pytest.raises(KeyboardInterrupt):
            send(signal.SIGINT)
    finally:
        leave.set()
        worker.join(10)

    with pytest.raises(interrupts.Terminated), interrupts.deferred():
        send()  # held by the main thread while a worker passes a boundary
        worker = in_worker()
        leave.set()
        worker.join(10)
        interrupts.raise_pending()
    assert not worker.is_alive() and errors == []


def test_prediction_and_feature_loops_stop_at_the_next_batch(handlers, tmp_path):
    """A signal during a batch is raised before the next batch's forward pass, in evaluate's
    loop, the predict command's loop and the cached features' loop."""
    from cleanmessy.inference import Predictor
    from cleanmessy.models import build_model
    from cleanmessy.params import parse_params
    from cleanmessy.training import cached_features

    frame = labelled_photos(tmp_path, 6, 16)
    model = build_model(2, 16, TrainParams(filters=[4], dense_units=4), seed=0)
    predictor = Predictor(model, 16, max_photos=2)
    forward, forwarded = predictor._forward, []

    def forward_then_signal(x):
        forwarded.append(len(x))
        send()
        return forward(x)

    predictor._forward = forward_then_signal
    with pytest.raises(interrupts.Terminated):
        predictor.predict_split(frame, tmp_path)
    with pytest.raises(interrupts.Terminated):
        predictor(np.zeros((6, 16, 16, 3), np.uint8))
    assert forwarded == [2, 2]  # one step each, of three

    views = parse_params({"train": {"arch": "mobilenet", "weights": "none", "head": "logistic",
                                    "augment": {"flip": "none", "rotation": 0},
                                    "views": {"regions": [[0.8, 2]], "size": 32}}}).train
    multi_view = build_model(2, 40, views, seed=0)
    batches = []

    def batches_that_signal():
        for i in range(3):
            batches.append(i)
            yield np.zeros((1, 40, 40, 3), np.uint8)
            if i == 0:
                send()

    with pytest.raises(interrupts.Terminated):
        cached_features(multi_view, batches_that_signal(), 3, 1 << 20, tmp_path)
    assert batches == [0, 1]  # the second batch was decoded, not run


@pytest.mark.parametrize("distribute", ["none", "mirrored"])
def test_sigterm_during_training_stops_at_the_next_step_boundary(handlers, tmp_path, distribute):
    """Sent at the end of epoch 1, SIGTERM is raised as epoch 2's first step begins, through
    Keras's fit and through the loop every tf.distribute strategy trains with."""
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
        send()
        epochs_ended.append("survived the signal")

    with pytest.raises(interrupts.Terminated) as raised:
        train_model(model, frame.iloc[:16], frame.iloc[16:], tmp_path, ["clean", "messy"], 16, p, 0,
                    on_epoch=on_epoch, strategy=strategy)
    assert epochs_ended == [1, "survived the signal"]
    assert [entry.name for entry in raised.traceback][-2:] == ["on_train_batch_begin", "raise_pending"]


# ---------------------------------------------------------------- dying with dvc (issue 21)

WATCHED = """
import subprocess, sys, time
from cleanmessy import interrupts

interrupts.install()
dvc = subprocess.Popen(["sleep", "60"])
interrupts.die_with(dvc.pid, 0.05)
print("watching", flush=True)
sys.stdin.readline()
dvc.kill()  # SIGKILL, and never reaped: a zombie counts as gone
try:
    time.sleep(60)
    print("still running")
except interrupts.Terminated:
    print("terminated")
"""


def test_a_stage_stops_when_its_dvc_is_killed():
    """`kill -9` of dvc alone: the stage gets SIGTERM from its watcher and stops as terminated
    (its MLflow run FAILED), instead of running on as an orphan."""
    child = subprocess.Popen([sys.executable, "-c", WATCHED], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "watching"
    child.stdin.write("\n")
    child.stdin.flush()
    out, err = child.communicate(timeout=30)
    assert out.strip() == "terminated", (out, err)
    assert "the dvc process that started this stage is gone: stopping" in err


def test_the_dvc_ancestor_is_found_through_the_shells(tmp_path):
    """dvc runs `sh -c 'sh src/stage.sh train'`: the watcher looks up the process tree for it."""
    fake = tmp_path / "dvc"
    fake.write_text(f'#!/bin/sh\necho "$$"\nsh -c \'{sys.executable} -c "from cleanmessy import interrupts; '
                    f'print(interrupts.dvc_ancestor())"\'\n')
    fake.chmod(0o755)
    dvc_pid, found = subprocess.run([str(fake)], capture_output=True, text=True, timeout=60).stdout.split()
    assert found == dvc_pid
    probe = "from cleanmessy import interrupts; print(interrupts.dvc_ancestor())"
    alone = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60).stdout.strip()
    assert alone == "None"
