"""Training, as stages and benchmarks call it: fit with early stopping (on one device, or across
devices and machines through tf.distribute), the transfer-learning phases (a head on cached
backbone features, then fine-tuning the top of the backbone), and the logistic head. Memory is
bounded by `train.memory_mb`, not by the number of photos: features spill to a scratch file and
the logistic head then trains by SGD in chunks. No tracking: each epoch's metrics go to an
`on_epoch` callback."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from cleanmessy import interrupts
from cleanmessy.distribute import DistributedBatches, distributed_batches, distributed_fit, strategy_scope
from cleanmessy.inputs import RowStore, decode_batches, label_indices, make_dataset, store_dataset
from cleanmessy.models import (
    DROPOUT,
    PROBABILITIES,
    VIEW_FEATURES,
    compile_model,
    fine_tunes,
    has_layer,
    photos_per_step,
    trains_head_on_features,
    unfreeze_top,
)
from cleanmessy.params import TrainParams
from cleanmessy.project import scratch_dir

log = logging.getLogger(__name__)

OnEpoch = Callable[[dict[str, float], int], None]  # (metrics, step): e.g. mlflow.log_metrics

HISTORY_COLUMNS = ["epoch", "phase", "train_loss", "train_accuracy", "val_loss", "val_accuracy"]


def epoch_metrics(logs: dict) -> dict[str, float]:
    """Keras's per-epoch names with a train_ prefix where Keras has none, so MLflow sorts and
    labels them as train_/val_/test_ (an unprefixed `accuracy` reads as the model's accuracy)."""
    return {(k if k.startswith("val_") else f"train_{k}"): float(v) for k, v in logs.items()}


class EpochReporter(keras.callbacks.Callback):
    """One log line per epoch (instead of Keras's progress bars), and the epoch's metrics handed
    to `on_epoch` (step = epoch number over all phases, from 1)."""

    def __init__(self, first_epoch: int, epochs: int, phase: str, on_epoch: OnEpoch | None) -> None:
        super().__init__()
        self.first_epoch, self.epochs, self.phase, self.on_epoch = first_epoch, epochs, phase, on_epoch

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        metrics = epoch_metrics(logs or {})
        phase = "" if self.phase == "train" else f" ({self.phase})"
        log.info("train: epoch %d/%d%s  %s", epoch + 1, self.epochs, phase,
                 "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if self.on_epoch:
            self.on_epoch(metrics, self.first_epoch + epoch)


class StepBoundary(keras.callbacks.Callback):
    """Raises a Ctrl-C or SIGTERM that arrived during a step before the next one starts (see
    `interrupts`), in blocks that defer them because TensorFlow cannot take them mid-step.
    Batch-begin hooks, because Keras calls them in the main thread, where signals arrive; a
    batch-end hook would make Keras copy every step's metrics to Python and stop dispatching
    batch-end callbacks to its thread pool, so a GPU would wait on each step."""

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        interrupts.raise_pending()

    def on_test_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        interrupts.raise_pending()


def fit(model: keras.Model, train_ds, val_ds, epochs: int, patience: int, phase: str = "train",
        first_epoch: int = 1, on_epoch: OnEpoch | None = None) -> pd.DataFrame:
    """Train with early stopping on val loss, keeping the best epoch's weights; the history. The
    datasets are tf.data datasets, or `DistributedBatches` to train across replicas."""
    callbacks: list = [keras.callbacks.EarlyStopping("val_loss", patience=patience, restore_best_weights=True),
                       EpochReporter(first_epoch, epochs, phase, on_epoch), StepBoundary()]
    with interrupts.deferred():
        if isinstance(train_ds, DistributedBatches):
            values = distributed_fit(model, train_ds, val_ds, epochs, callbacks)
        else:
            # shuffle=False: the dataset shuffles itself (Keras warns that it ignores shuffle=True)
            values = model.fit(train_ds, validation_data=val_ds, epochs=epochs, verbose=0, shuffle=False,
                               callbacks=callbacks).history
    frame = pd.DataFrame([epoch_metrics(dict(zip(values, row))) for row in zip(*values.values())])
    frame.insert(0, "epoch", range(first_epoch, first_epoch + len(frame)))
    frame.insert(1, "phase", phase)
    return frame[HISTORY_COLUMNS]


def cached_features(model: keras.Model, batches: Iterable[np.ndarray], n_photos: int, budget_bytes: int,
                    scratch: Path) -> RowStore:
    """The pooled backbone features of every view of every photo, from one forward pass each: one
    row per (photo, view), photo by photo, in memory up to `budget_bytes`, else in a scratch file."""
    import tensorflow as tf

    extractor = keras.Model(model.inputs, model.get_layer(VIEW_FEATURES).output)
    _, n_views, n_features = extractor.output_shape
    forward = tf.function(lambda x: extractor(x, training=False), input_signature=[
        tf.TensorSpec([None, *model.input_shape[1:]], tf.uint8)])
    store = RowStore(n_photos * n_views, (n_features,), "float32", budget_bytes, scratch)
    with interrupts.deferred():
        for batch in batches:
            interrupts.raise_pending()
            store.append(forward(batch).numpy().reshape(-1, n_features))
    return store


def view_means(store: RowStore, n_views: int, chunk: int = 1024) -> np.ndarray:
    """(photos, features): the mean of each photo's views, as the model averages them."""
    n_photos, n_features = store.n_rows // n_views, store.row_shape[0]
    return np.concatenate([store.read_range(i * n_views, min(i + chunk, n_photos) * n_views)
                           .reshape(-1, n_views, n_features).mean(axis=1) for i in range(0, n_photos, chunk)])


def head_model(model: keras.Model, n_features: int) -> keras.Model:
    """The layers after `view_mean` (dropout, probabilities) as a model on feature vectors; it
    shares their weights with `model`."""
    features = keras.Input((n_features,), name="features")
    out = features
    if has_layer(model, DROPOUT):
        out = model.get_layer(DROPOUT)(out)
    return keras.Model(features, model.get_layer(PROBABILITIES)(out))


SGD_PASSES = 5  # passes of the chunked SGD over the features (the exact solver needs none)


def _moments(store: RowStore, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of every feature, two passes over chunks. In float64: float32
    variances of tiny features underflow to 0."""
    n = store.n_rows
    total = sum(store.read_range(i, min(i + chunk, n)).astype(np.float64).sum(axis=0) for i in range(0, n, chunk))
    mean = total / n
    squares = sum(((store.read_range(i, min(i + chunk, n)) - mean) ** 2).sum(axis=0) for i in range(0, n, chunk))
    return mean, np.sqrt(squares / n)


def _sgd_logistic(store: RowStore, labels: np.ndarray, mean: np.ndarray, scale: np.ndarray, n_classes: int,
                  c: float, chunk: int, seed: int):
    """LogisticRegression(C=c)'s L2-regularised log loss (divided by C·n; one-vs-rest where there
    are more than 2 classes), by averaged SGD over chunks of rows read from `store`: for features
    that do not fit in memory. Each chunk is a random sample of all rows: the store holds them in
    split order (one class after the other), and a chunk of one class would teach only that class."""
    from sklearn.linear_model import SGDClassifier

    n = store.n_rows
    sgd = SGDClassifier(loss="log_loss", alpha=1.0 / (c * n), average=True, random_state=seed)
    rng = np.random.default_rng(seed)
    for _ in range(SGD_PASSES):
        order = rng.permutation(n)
        for start in range(0, n, chunk):
            rows = order[start:start + chunk]
            x = (store.read(rows).astype(np.float64) - mean) / scale
            sgd.partial_fit(x, labels[rows], classes=np.arange(n_classes))
    return sgd


def fit_logistic(store: RowStore, labels: np.ndarray, n_classes: int, c: float, budget_bytes: int,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An L2-regularised logistic regression on standardised features, returned as the `(kernel,
    bias)` of a softmax Dense layer on the raw features: the standardisation is folded in, and a
    binary model's one logit z becomes the pair (-z/2, z/2), whose softmax is the same sigmoid.
    scikit-learn's exact solver when the float64 features and their standardised copy fit
    `budget_bytes`, else SGD on chunks of that size."""
    from sklearn.linear_model import LogisticRegression

    n_features = store.row_shape[0]
    exact = 2 * store.n_rows * n_features * 8 <= budget_bytes
    chunk = max(store.n_rows, 1) if exact else max(1024, budget_bytes // (4 * n_features * 8))
    mean, scale = _moments(store, chunk)
    scale[scale == 0] = 1.0  # constant features (dead units) carry no information
    if exact:
        features = store.read_range(0, store.n_rows).astype(np.float64)
        fitted = LogisticRegression(C=c, max_iter=5000).fit((features - mean) / scale, labels)
    else:
        log.info("train: %d feature rows (%.0f MB) over train.memory_mb: logistic head by SGD in chunks of %d",
                 store.n_rows, store.nbytes / 1e6, chunk)
        fitted = _sgd_logistic(store, labels, mean, scale, n_classes, c, chunk, seed)
    if list(fitted.classes_) != list(range(n_classes)) or len(set(labels.tolist())) < n_classes:
        raise ValueError(f"training labels {sorted(set(labels.tolist()))} do not cover all {n_classes} classes")
    coef, intercept = fitted.coef_, fitted.intercept_
    if n_classes == 2:
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    kernel = (coef / scale).T
    return kernel.astype("float32"), (intercept - kernel.T @ mean).astype("float32")


def fit_head_on_features(model: keras.Model, train_features: RowStore, val_x: np.ndarray,
                         labels: tuple[np.ndarray, np.ndarray], p: TrainParams, seed: int,
                         on_epoch: OnEpoch | None = None) -> pd.DataFrame:
    """Phase 1 with a frozen backbone and no augmentation: the backbone sees every image once,
    and only the head trains, on the cached features. Same result as training the whole model
    with the backbone frozen, at the cost of one forward pass instead of one per epoch. Every view
    of a training photo is a training sample; validation uses the views' mean, as the model does."""
    import tensorflow as tf

    n_views, n_features = train_features.n_rows // len(labels[0]), train_features.row_shape[0]
    train_y = np.repeat(labels[0], n_views)
    head = compile_model(head_model(model, n_features), p.learning_rate)
    if p.head == "logistic":
        n_classes = model.get_layer(PROBABILITIES).units
        weights = fit_logistic(train_features, train_y, n_classes, p.head_c, p.memory_mb << 20, seed)
        model.get_layer(PROBABILITIES).set_weights(list(weights))
        with interrupts.deferred():
            loss, accuracy = head.evaluate(store_dataset(train_features, train_y, 32), verbose=0,
                                           callbacks=[StepBoundary()])
            val_loss, val_accuracy = head.evaluate(val_x, labels[1], verbose=0, callbacks=[StepBoundary()])
        row = {"train_loss": loss, "train_accuracy": accuracy, "val_loss": val_loss, "val_accuracy": val_accuracy}
        if on_epoch:
            on_epoch(row, 1)
        return pd.DataFrame([{"epoch": 1, "phase": "head", **row}])
    train_ds = store_dataset(train_features, train_y, p.batch_size, shuffle_seed=seed)
    val_ds = tf.data.Dataset.from_tensor_slices((val_x, labels[1])).batch(p.batch_size)
    return fit(head, train_ds, val_ds, p.epochs, p.patience, "head", on_epoch=on_epoch)


def fine_tune(model: keras.Model, train_ds, val_ds, p: TrainParams, history: pd.DataFrame,
              on_epoch: OnEpoch | None = None) -> pd.DataFrame:
    """Phase 2: the top of the backbone trains too, at `fine_tune_learning_rate`. If no epoch beats
    phase 1's best val loss, phase 1's weights are put back."""
    before = model.get_weights()
    best_before = float(history["val_loss"].min())
    trainable = unfreeze_top(model, p.fine_tune_layers)
    log.info("train: fine-tuning the top %d backbone layers (%d trainable)", p.fine_tune_layers, trainable)
    with strategy_scope(train_ds):  # a new optimizer: its variables are mirrored like the model's
        compile_model(model, p.fine_tune_learning_rate)
    tuned = fit(model, train_ds, val_ds, p.fine_tune_epochs, p.patience, "fine_tune",
                first_epoch=len(history) + 1, on_epoch=on_epoch)
    if tuned["val_loss"].min() > best_before:
        log.info("train: fine-tuning did not beat the head's val_loss %.4f; keeping the head's weights", best_before)
        model.set_weights(before)
    return pd.concat([history, tuned], ignore_index=True)


def train_model(model: keras.Model, train_frame: pd.DataFrame, val_frame: pd.DataFrame, root: Path,
                class_names: list[str], image_size: int, p: TrainParams, seed: int,
                on_epoch: OnEpoch | None = None, strategy=None) -> pd.DataFrame:
    """All training phases `train.*` asks for; returns the history (one row per epoch). Each
    epoch's metrics go to `on_epoch(metrics, step)` (the train stage logs them to MLflow). With a
    tf.distribute `strategy` (the model built in its scope), each worker trains on its shard."""
    with contextlib.ExitStack() as cleanup:  # every cache of decoded images or features is freed at the end
        return _train_phases(model, train_frame, val_frame, root, class_names, image_size, p, seed, on_epoch,
                             strategy, cleanup)


def _train_phases(model: keras.Model, train_frame: pd.DataFrame, val_frame: pd.DataFrame, root: Path,
                  class_names: list[str], image_size: int, p: TrainParams, seed: int, on_epoch: OnEpoch | None,
                  strategy, cleanup: contextlib.ExitStack) -> pd.DataFrame:
    budget, scratch = p.memory_mb << 20, scratch_dir(root)

    def images(frame: pd.DataFrame, shuffle: bool):
        if strategy is None:
            return make_dataset(frame, root, class_names, image_size, p.batch_size,
                                shuffle_seed=seed if shuffle else None, memory_mb=p.memory_mb, cleanup=cleanup)
        return distributed_batches(strategy, frame, p.batch_size, lambda shard, batch_size: make_dataset(
            shard, root, class_names, image_size, batch_size, shuffle_seed=seed if shuffle else None,
            memory_mb=p.memory_mb, repeat=True, cleanup=cleanup))

    datasets: list = []  # built once (each decodes its split): phase 2 reuses phase 1's

    def image_datasets() -> list:
        if not datasets:
            datasets.extend([images(train_frame, True), images(val_frame, False)])
        return datasets

    if trains_head_on_features(p):
        labels = (label_indices(train_frame, class_names), label_indices(val_frame, class_names))
        step = photos_per_step(model, p.batch_size)  # feature extraction only: small steps, less memory
        stores = [cached_features(model, decode_batches([str(root / f) for f in frame["path"]], image_size, step,
                                                        f"features ({name})"), len(frame), budget, scratch)
                  for name, frame in (("train", train_frame), ("val", val_frame))]
        for store in stores:
            cleanup.callback(store.close)
        val_x = view_means(stores[1], stores[1].n_rows // len(val_frame))
        history = fit_head_on_features(model, stores[0], val_x, labels, p, seed, on_epoch)
    else:
        history = fit(model, *image_datasets(), p.epochs, p.patience, on_epoch=on_epoch)
    if fine_tunes(p):
        history = fine_tune(model, *image_datasets(), p, history, on_epoch)
    return history
