"""train.distribute: TF_CONFIG parsing, which configurations train across replicas, and the
distributed training loop on this machine (MirroredStrategy: one replica on a CPU)."""

from __future__ import annotations

import json

import pytest

from cleanmessy.distribute import ONE_MACHINE, Task, make_strategy, task_from_tf_config, why_not_distributed
from cleanmessy.errors import UserError
from cleanmessy.params import AugmentParams, TrainParams

from conftest import labelled_photos


def tf_config(cluster: dict, kind: str, index: int) -> str:
    return json.dumps({"cluster": cluster, "task": {"type": kind, "index": index}})


WORKERS = {"worker": ["a:1", "b:1", "c:1"]}


@pytest.mark.parametrize(("cluster", "kind", "index", "expected"), [
    (WORKERS, "worker", 0, Task(3, 0, True)),  # no chief entry: worker 0 is the chief
    (WORKERS, "worker", 2, Task(3, 2, False)),
    ({"chief": ["a:1"], "worker": ["b:1"]}, "chief", 0, Task(2, 0, True)),
    ({"chief": ["a:1"], "worker": ["b:1"]}, "worker", 0, Task(2, 1, False)),
])
def test_the_chief_is_the_chief_task_or_else_worker_0(cluster, kind, index, expected):
    assert task_from_tf_config(tf_config(cluster, kind, index)) == expected


@pytest.mark.parametrize(("raw", "says"), [
    (None, "needs TF_CONFIG"),
    ("", "needs TF_CONFIG"),
    ("{not json", "TF_CONFIG is not"),
    (json.dumps({"cluster": WORKERS}), "TF_CONFIG is not"),
    (tf_config(WORKERS, "worker", 3), "task 'worker' 3 is not in its cluster"),
    (tf_config(WORKERS, "ps", 0), "task 'ps' 0 is not in its cluster"),
])
def test_a_missing_or_bad_tf_config_is_one_line(raw, says):
    with pytest.raises(UserError, match=says) as caught:
        task_from_tf_config(raw)
    assert "\n" not in str(caught.value) and "Scaling out" in str(caught.value)


NO_AUGMENT = AugmentParams(flip="none", rotation=0.0)


@pytest.mark.parametrize(("params", "refused_because"), [
    (TrainParams(), None),  # seed_cnn, dense, augmented
    (TrainParams(augment=NO_AUGMENT), None),  # seed_cnn trains end to end either way
    (TrainParams(arch="mobilenet"), None),  # augmented transfer: the whole model trains
    (TrainParams(arch="mobilenet_v2", alpha=0.35, fine_tune_layers=10), None),
    (TrainParams(arch="mobilenet", augment=NO_AUGMENT), "cached features"),
    (TrainParams(arch="mobilenet_v2", alpha=0.35, augment=NO_AUGMENT, head="logistic"), "scikit-learn"),
])
def test_every_arch_and_head_trains_distributed_or_says_why_not(params, refused_because):
    reason = why_not_distributed(params)
    assert (reason is None) if refused_because is None else (refused_because in reason)
    if reason:
        with pytest.raises(UserError, match=f"train.distribute mirrored: .*{refused_because}"):
            make_strategy(TrainParams(**{**params.__dict__, "distribute": "mirrored"}), None)


def test_none_needs_no_strategy_and_multi_worker_needs_tf_config():
    assert make_strategy(TrainParams(), tf_config(WORKERS, "worker", 1)) == (None, ONE_MACHINE)
    with pytest.raises(UserError, match="needs TF_CONFIG"):
        make_strategy(TrainParams(distribute="multi_worker"), None)


def test_mirrored_training_runs_kerass_steps_across_replicas_with_early_stopping(tmp_path):
    """The loop every strategy trains through: Keras's own train/test steps under strategy.run,
    epochs of one pass over the split in global batches, early stopping. Here one replica (this
    machine has one CPU device); two replicas on two workers: tests/pipeline/test_distribute_workers.py."""
    import tensorflow as tf

    from cleanmessy.models import build_model
    from cleanmessy.training import train_model

    frame = labelled_photos(tmp_path, 24, 16)
    p = TrainParams(epochs=3, batch_size=4, patience=1, filters=[4], dense_units=4, distribute="mirrored")
    strategy, task = make_strategy(p, None)
    assert isinstance(strategy, tf.distribute.MirroredStrategy) and task == ONE_MACHINE
    with strategy.scope():
        model = build_model(2, 16, p, seed=0)
    before = [w.copy() for w in model.get_weights()]
    history = train_model(model, frame.iloc[:16], frame.iloc[16:], tmp_path, ["clean", "messy"], 16, p, 0,
                          strategy=strategy)
    assert 1 <= len(history) <= 3 and list(history["phase"].unique()) == ["train"]
    assert history[["train_loss", "train_accuracy", "val_loss", "val_accuracy"]].notna().all().all()
    assert any((a != b).any() for a, b in zip(before, model.get_weights()))


def test_a_split_smaller_than_the_cluster_stops_every_worker_with_one_line():
    """Checked on the split's length, which all workers share (their inputs are compared first),
    so worker 0, which would still get a row, stops too instead of waiting for the others."""
    import types

    import pandas as pd

    from cleanmessy.distribute import distributed_batches

    def strategy_of(n_workers: int, worker: int):
        context = types.SimpleNamespace(input_pipeline_id=worker, num_input_pipelines=n_workers,
                                        get_per_replica_batch_size=lambda global_batch: global_batch // n_workers)
        return types.SimpleNamespace(num_replicas_in_sync=n_workers,
                                     distribute_datasets_from_function=lambda fn: fn(context))

    one_photo = pd.DataFrame({"path": ["a.png"], "label": ["clean"]})
    for worker in (0, 1):
        with pytest.raises(UserError, match="1 photos cannot be shared by 2 workers"):
            distributed_batches(strategy_of(2, worker), one_photo, 4, lambda shard, batch: shard)
    made = distributed_batches(strategy_of(2, 1), pd.concat([one_photo] * 3), 4, lambda shard, batch: (shard, batch))
    assert len(made.dataset[0]) == 1 and made.dataset[1] == 4 and made.steps == 1
