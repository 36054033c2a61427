"""Training, as stages and benchmarks call it: fit with early stopping, the transfer-learning
phases (a head on cached backbone features, then fine-tuning the top of the backbone), and the
logistic head. No I/O and no tracking: each epoch's metrics go to an `on_epoch` callback."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from cleanmessy.inputs import image_read_errors, label_indices, make_dataset
from cleanmessy.models import (
    DROPOUT,
    PROBABILITIES,
    VIEW_FEATURES,
    compile_model,
    fine_tunes,
    has_layer,
    is_transfer,
    photos_per_step,
    unfreeze_top,
)
from cleanmessy.params import TrainParams

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


def fit(model: keras.Model, train_ds, val_ds, epochs: int, patience: int, phase: str = "train",
        first_epoch: int = 1, on_epoch: OnEpoch | None = None) -> pd.DataFrame:
    """Train with early stopping on val loss, keeping the best epoch's weights; the history."""
    callbacks: list = [keras.callbacks.EarlyStopping("val_loss", patience=patience, restore_best_weights=True),
                       EpochReporter(first_epoch, epochs, phase, on_epoch)]
    # shuffle=False: the dataset shuffles itself (Keras warns that it ignores shuffle=True here)
    history = model.fit(train_ds, validation_data=val_ds, epochs=epochs, verbose=0, shuffle=False,
                        callbacks=callbacks)
    frame = pd.DataFrame([epoch_metrics(dict(zip(history.history, values)))
                          for values in zip(*history.history.values())])
    frame.insert(0, "epoch", range(first_epoch, first_epoch + len(frame)))
    frame.insert(1, "phase", phase)
    return frame[HISTORY_COLUMNS]


def cached_features(model: keras.Model, images) -> np.ndarray:
    """(photos, views, features): the pooled backbone features of every view of every photo, from
    one forward pass each."""
    extractor = keras.Model(model.inputs, model.get_layer(VIEW_FEATURES).output)
    return extractor.predict(images, verbose=0)


def head_model(model: keras.Model, n_features: int) -> keras.Model:
    """The layers after `view_mean` (dropout, probabilities) as a model on feature vectors; it
    shares their weights with `model`."""
    features = keras.Input((n_features,), name="features")
    out = features
    if has_layer(model, DROPOUT):
        out = model.get_layer(DROPOUT)(out)
    return keras.Model(features, model.get_layer(PROBABILITIES)(out))


def fit_logistic(features: np.ndarray, labels: np.ndarray, n_classes: int, c: float) -> tuple[np.ndarray, np.ndarray]:
    """An L2-regularised logistic regression on standardised features, returned as the `(kernel,
    bias)` of a softmax Dense layer on the raw features: the standardisation is folded in, and a
    binary model's one logit z becomes the pair (-z/2, z/2), whose softmax is the same sigmoid."""
    from sklearn.linear_model import LogisticRegression

    features = features.astype(np.float64)  # float32 variances of tiny features underflow to 0
    mean, scale = features.mean(axis=0), features.std(axis=0)
    scale[scale == 0] = 1.0  # constant features (dead units) carry no information
    fitted = LogisticRegression(C=c, max_iter=5000).fit((features - mean) / scale, labels)
    if list(fitted.classes_) != list(range(n_classes)):
        raise ValueError(f"training labels {list(fitted.classes_)} do not cover all {n_classes} classes")
    coef, intercept = fitted.coef_, fitted.intercept_
    if n_classes == 2:
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    kernel = (coef / scale).T
    return kernel.astype("float32"), (intercept - kernel.T @ mean).astype("float32")


def fit_head_on_features(model: keras.Model, train_images, val_images, labels: tuple[np.ndarray, np.ndarray],
                         p: TrainParams, seed: int, on_epoch: OnEpoch | None = None) -> pd.DataFrame:
    """Phase 1 with a frozen backbone and no augmentation: the backbone sees every image once,
    and only the head trains, on the cached features. Same result as training the whole model
    with the backbone frozen, at the cost of one forward pass instead of one per epoch. Every view
    of a training photo is a training sample; validation uses the views' mean, as the model does."""
    import tensorflow as tf

    train_views = cached_features(model, train_images)
    _, n_views, n_features = train_views.shape
    train_x, train_y = train_views.reshape(-1, n_features), np.repeat(labels[0], n_views)
    val_x = cached_features(model, val_images).mean(axis=1)
    head = compile_model(head_model(model, n_features), p.learning_rate)
    if p.head == "logistic":
        n_classes = model.get_layer(PROBABILITIES).units
        model.get_layer(PROBABILITIES).set_weights(list(fit_logistic(train_x, train_y, n_classes, p.head_c)))
        loss, accuracy = head.evaluate(train_x, train_y, verbose=0)
        val_loss, val_accuracy = head.evaluate(val_x, labels[1], verbose=0)
        row = {"train_loss": loss, "train_accuracy": accuracy, "val_loss": val_loss, "val_accuracy": val_accuracy}
        if on_epoch:
            on_epoch(row, 1)
        return pd.DataFrame([{"epoch": 1, "phase": "head", **row}])
    train_ds = (tf.data.Dataset.from_tensor_slices((train_x, train_y))
                .shuffle(len(train_x), seed=seed).batch(p.batch_size))
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
    compile_model(model, p.fine_tune_learning_rate)
    tuned = fit(model, train_ds, val_ds, p.fine_tune_epochs, p.patience, "fine_tune",
                first_epoch=len(history) + 1, on_epoch=on_epoch)
    if tuned["val_loss"].min() > best_before:
        log.info("train: fine-tuning did not beat the head's val_loss %.4f; keeping the head's weights", best_before)
        model.set_weights(before)
    return pd.concat([history, tuned], ignore_index=True)


def train_model(model: keras.Model, train_frame: pd.DataFrame, val_frame: pd.DataFrame, root: Path,
                class_names: list[str], image_size: int, p: TrainParams, seed: int,
                on_epoch: OnEpoch | None = None) -> pd.DataFrame:
    """All training phases `train.*` asks for; returns the history (one row per epoch). Each
    epoch's metrics go to `on_epoch(metrics, step)` (the train stage logs them to MLflow)."""
    train_ds = make_dataset(train_frame, root, class_names, image_size, p.batch_size, shuffle_seed=seed)
    val_ds = make_dataset(val_frame, root, class_names, image_size, p.batch_size)
    augmenting = p.augment.flip != "none" or p.augment.rotation > 0
    with image_read_errors():
        if is_transfer(p) and not augmenting:
            step = photos_per_step(model, p.batch_size)  # feature extraction only: small steps, less memory
            ordered = [make_dataset(frame, root, class_names, image_size, step) for frame in (train_frame, val_frame)]
            labels = (label_indices(train_frame, class_names), label_indices(val_frame, class_names))
            history = fit_head_on_features(model, *ordered, labels, p, seed, on_epoch)
        else:
            history = fit(model, train_ds, val_ds, p.epochs, p.patience, on_epoch=on_epoch)
        if fine_tunes(p):
            history = fine_tune(model, train_ds, val_ds, p, history, on_epoch)
    return history
