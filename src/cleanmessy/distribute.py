"""Training across devices and machines with TensorFlow's own engine, tf.distribute.

`train.distribute`: `none` (one device), `mirrored` (MirroredStrategy: the GPUs of one machine) or
`multi_worker` (MultiWorkerMirroredStrategy: several machines, as TF_CONFIG describes them). The
global batch is `train.batch_size` per replica times the replicas; each worker decodes and reads
only its shard of the data.

Keras 3's `model.fit` cannot train under MultiWorkerMirroredStrategy (it reduces scalar metrics
along an axis they do not have: keras-team/keras#20585), so `distributed_fit` runs Keras's own
`train_step`/`test_step` through `strategy.run` (the optimizer all-reduces the gradients) and
Keras's callbacks (early stopping keeps the best weights) for every strategy alike."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd

from cleanmessy import interrupts
from cleanmessy.errors import UserError
from cleanmessy.models import trains_head_on_features
from cleanmessy.params import TrainParams

SCALING_OUT = 'see README "Scaling out"'


@dataclass(frozen=True)
class Task:
    """This process's place in the cluster: the chief alone logs to MLflow and writes outputs."""

    workers: int
    index: int  # 0 .. workers-1, the chief first
    chief: bool


ONE_MACHINE = Task(workers=1, index=0, chief=True)


def task_from_tf_config(raw: str | None) -> Task:
    """This process's task in TF_CONFIG (`{"cluster": {"worker": [host:port, ...]}, "task": {"type":
    "worker", "index": i}}`; a "chief" entry may list the chief separately). As TensorFlow decides:
    the chief is the "chief" task, or worker 0 when there is none."""
    if not raw:
        raise UserError("train.distribute multi_worker needs TF_CONFIG, the cluster's workers and this one's index, "
                        f"in each worker's environment; {SCALING_OUT}")
    try:
        config = json.loads(raw)
        cluster, kind, index = config["cluster"], config["task"]["type"], int(config["task"]["index"])
        chiefs, workers = list(cluster.get("chief", [])), list(cluster.get("worker", []))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError('TF_CONFIG is not {"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", '
                        f'"index": 0}}}}; {SCALING_OUT}') from None
    members = {"chief": chiefs, "worker": workers}
    if kind not in members or not 0 <= index < len(members[kind]):
        raise UserError(f"TF_CONFIG's task {kind!r} {index} is not in its cluster "
                        f"({len(chiefs)} chief, {len(workers)} workers); {SCALING_OUT}")
    position = index if kind == "chief" else len(chiefs) + index
    return Task(workers=len(chiefs) + len(workers), index=position, chief=position == 0)


def why_not_distributed(p: TrainParams) -> str | None:
    """Why `train.*` cannot train under a tf.distribute strategy, or None when it can: what runs
    distributed is the whole model trained by gradient steps."""
    if p.head == "logistic":
        return ("train.head logistic is fitted by scikit-learn on one machine; use train.head dense to train "
                "across replicas, or train.distribute none")
    if trains_head_on_features(p):
        return ("a frozen backbone without augmentation trains its head on cached features, one machine's work "
                "(the backbone sees each photo once); turn on train.augment to train the whole model across "
                "replicas, or set train.distribute none")
    return None


def make_strategy(p: TrainParams, tf_config: str | None):
    """The tf.distribute strategy `train.distribute` names (None for `none`) and this process's task.
    Create it before any other TensorFlow work: MultiWorkerMirroredStrategy sets up the cluster."""
    if p.distribute == "none":
        return None, ONE_MACHINE
    reason = why_not_distributed(p)
    if reason:
        raise UserError(f"train.distribute {p.distribute}: {reason}")
    task = task_from_tf_config(tf_config) if p.distribute == "multi_worker" else ONE_MACHINE
    import tensorflow as tf

    if p.distribute == "mirrored":
        return tf.distribute.MirroredStrategy(), task
    return tf.distribute.MultiWorkerMirroredStrategy(), task


def check_same_inputs(strategy, fingerprint: bytes) -> None:
    """Stop every worker with one line when their inputs differ (params, splits): they would
    otherwise stall on unequal step counts or fail on unequal model shapes with TensorFlow's
    own trace. Each worker's `fingerprint` is gathered by all, so all stop alike."""
    import numpy as np
    import tensorflow as tf

    mine = tf.constant(np.frombuffer(fingerprint[:16], np.int32)[None, :])

    @tf.function  # the gather runs as one collective op, not eagerly per replica
    def everyone() -> tf.Tensor:
        return strategy.gather(strategy.run(lambda: tf.identity(mine)), axis=0)

    with interrupts.deferred():
        gathered = everyone().numpy()
    if (gathered != gathered[0]).any():
        raise UserError("the workers' inputs differ (params.yaml's base/train, or data/splits): give every worker the "
                        f"same commit and data (git pull, dvc pull); {SCALING_OUT}")


@dataclass
class DistributedBatches:
    """A dataset spread over a strategy's replicas, and how many global steps make one epoch."""

    strategy: Any
    dataset: Any  # tf.distribute.DistributedDataset, endless (every worker steps in lockstep)
    steps: int


def distributed_batches(strategy, frame: pd.DataFrame, batch_size: int,
                        make: Callable[[pd.DataFrame, int], Any]) -> DistributedBatches:
    """`make(shard, per_replica_batch)` called once per input pipeline (one a worker) with that
    worker's rows of `frame`; the datasets it makes must repeat. An epoch is one pass over
    `frame` in global batches, so every worker runs the same number of steps."""
    global_batch = batch_size * strategy.num_replicas_in_sync

    def dataset_fn(context):
        # Checked on the length every worker shares, so all stop, not only those left without rows.
        if len(frame) < context.num_input_pipelines:
            raise UserError(f"{len(frame)} photos cannot be shared by {context.num_input_pipelines} workers: each "
                            "needs at least one training and one validation photo")
        shard = frame.iloc[context.input_pipeline_id::context.num_input_pipelines]
        return make(shard, context.get_per_replica_batch_size(global_batch))

    return DistributedBatches(strategy, strategy.distribute_datasets_from_function(dataset_fn),
                              max(1, math.ceil(len(frame) / global_batch)))


def strategy_scope(batches) -> contextlib.AbstractContextManager:
    """The scope to create variables in (an optimizer's) for training on `batches`."""
    return batches.strategy.scope() if isinstance(batches, DistributedBatches) else contextlib.nullcontext()


def distributed_fit(model, train: DistributedBatches, val: DistributedBatches, epochs: int,
                    callbacks: list) -> dict[str, list[float]]:
    """What `model.fit(...).history` returns, trained across `train.strategy`'s replicas: Keras's
    train and test steps run on every replica, and each epoch's metrics are their mean."""
    import keras
    import tensorflow as tf

    strategy = train.strategy

    def stepper(step: Callable) -> Callable[[Iterator], dict]:
        @tf.function
        def run(iterator: Iterator) -> dict:
            per_replica = strategy.run(step, args=(next(iterator),))
            return {k: strategy.reduce("MEAN", v, axis=None) for k, v in per_replica.items()}
        return run

    train_step, test_step = stepper(model.train_step), stepper(model.test_step)
    train_batches = iter(train.dataset)
    callback_list = keras.callbacks.CallbackList(callbacks, model=model)
    history: dict[str, list[float]] = {}
    model.stop_training = False
    callback_list.on_train_begin()
    for epoch in range(epochs):
        callback_list.on_epoch_begin(epoch)
        model.reset_metrics()
        for step in range(train.steps):
            callback_list.on_train_batch_begin(step)  # a step boundary (training.StepBoundary)
            logs = train_step(train_batches)
        logs = {k: float(v) for k, v in logs.items()}
        model.reset_metrics()
        # From the start each epoch: the same rows every time (each worker's shard, wrapped round
        # to fill the last global batch), so epochs' val_loss compare, as early stopping needs.
        val_batches = iter(val.dataset)
        for step in range(val.steps):
            callback_list.on_test_batch_begin(step)
            val_logs = test_step(val_batches)
        logs.update({f"val_{k}": float(v) for k, v in val_logs.items()})
        for key, value in logs.items():
            history.setdefault(key, []).append(value)
        callback_list.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callback_list.on_train_end()
    return history
