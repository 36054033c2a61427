"""train: data/splits/{train,val}.csv -> pipeline/model.keras, pipeline/history.csv, pipeline/run.json.

Opens the MLflow run that evaluate and plot add to: all params, lineage tags, per-epoch metrics.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd

from cleanmessy import tracking
from cleanmessy.inputs import image_read_errors, label_indices, make_dataset, manifest_hash, read_split
from cleanmessy.card import describe_data
from cleanmessy.models import (build_model, compile_model, fine_tunes, is_transfer, photos_per_step, save_model,
                               unfreeze_top)
from cleanmessy.params import Params, TrainParams, used_train_params
from cleanmessy.project import Paths

log = logging.getLogger(__name__)


HISTORY_COLUMNS = ["epoch", "phase", "train_loss", "train_accuracy", "val_loss", "val_accuracy"]


def epoch_metrics(logs: dict) -> dict[str, float]:
    """Keras's per-epoch names with a train_ prefix where Keras has none, so MLflow sorts and
    labels them as train_/val_/test_ (an unprefixed `accuracy` reads as the model's accuracy)."""
    return {(k if k.startswith("val_") else f"train_{k}"): float(v) for k, v in logs.items()}


class EpochReporter(keras.callbacks.Callback):
    """One log line per epoch (instead of Keras's progress bars) and, optionally, the epoch's
    metrics in the active MLflow run (step = epoch number over all phases, from 1)."""

    def __init__(self, first_epoch: int, epochs: int, phase: str, log_to_mlflow: bool) -> None:
        super().__init__()
        self.first_epoch, self.epochs, self.phase, self.log_to_mlflow = first_epoch, epochs, phase, log_to_mlflow

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        metrics = epoch_metrics(logs or {})
        log.info("train: epoch %d/%d%s  %s", epoch + 1, self.epochs, "" if self.phase == "train" else f" ({self.phase})",
                 "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if self.log_to_mlflow:
            mlflow.log_metrics(metrics, step=self.first_epoch + epoch)


def fit(model: keras.Model, train_ds, val_ds, epochs: int, patience: int, phase: str = "train",
        first_epoch: int = 1, log_to_mlflow: bool = True) -> pd.DataFrame:
    """Train with early stopping on val loss, keeping the best epoch's weights; the history."""
    callbacks: list = [keras.callbacks.EarlyStopping("val_loss", patience=patience, restore_best_weights=True),
                       EpochReporter(first_epoch, epochs, phase, log_to_mlflow)]
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
    extractor = keras.Model(model.inputs, model.get_layer("view_features").output)
    return extractor.predict(images, verbose=0)


def head_model(model: keras.Model, n_features: int) -> keras.Model:
    """The layers after `view_mean` (dropout, probabilities) as a model on feature vectors; it
    shares their weights with `model`."""
    features = keras.Input((n_features,), name="features")
    out = features
    if "dropout" in {layer.name for layer in model.layers}:
        out = model.get_layer("dropout")(out)
    return keras.Model(features, model.get_layer("probabilities")(out))


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
                         p: TrainParams, seed: int, log_to_mlflow: bool = True) -> pd.DataFrame:
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
        n_classes = model.get_layer("probabilities").units
        model.get_layer("probabilities").set_weights(list(fit_logistic(train_x, train_y, n_classes, p.head_c)))
        loss, accuracy = head.evaluate(train_x, train_y, verbose=0)
        val_loss, val_accuracy = head.evaluate(val_x, labels[1], verbose=0)
        row = {"train_loss": loss, "train_accuracy": accuracy, "val_loss": val_loss, "val_accuracy": val_accuracy}
        if log_to_mlflow:
            mlflow.log_metrics(row, step=1)
        return pd.DataFrame([{"epoch": 1, "phase": "head", **row}])
    train_ds = (tf.data.Dataset.from_tensor_slices((train_x, train_y))
                .shuffle(len(train_x), seed=seed).batch(p.batch_size))
    val_ds = tf.data.Dataset.from_tensor_slices((val_x, labels[1])).batch(p.batch_size)
    return fit(head, train_ds, val_ds, p.epochs, p.patience, "head", log_to_mlflow=log_to_mlflow)


def fine_tune(model: keras.Model, train_ds, val_ds, p: TrainParams, history: pd.DataFrame,
              log_to_mlflow: bool = True) -> pd.DataFrame:
    """Phase 2: the top of the backbone trains too, at `fine_tune_learning_rate`. If no epoch beats
    phase 1's best val loss, phase 1's weights are put back."""
    before = model.get_weights()
    best_before = float(history["val_loss"].min())
    trainable = unfreeze_top(model, p.fine_tune_layers)
    log.info("train: fine-tuning the top %d backbone layers (%d trainable)", p.fine_tune_layers, trainable)
    compile_model(model, p.fine_tune_learning_rate)
    tuned = fit(model, train_ds, val_ds, p.fine_tune_epochs, p.patience, "fine_tune",
                first_epoch=len(history) + 1, log_to_mlflow=log_to_mlflow)
    if tuned["val_loss"].min() > best_before:
        log.info("train: fine-tuning did not beat the head's val_loss %.4f; keeping the head's weights", best_before)
        model.set_weights(before)
    return pd.concat([history, tuned], ignore_index=True)


def train_model(model: keras.Model, train_frame: pd.DataFrame, val_frame: pd.DataFrame, root: Path,
                class_names: list[str], image_size: int, p: TrainParams, seed: int,
                log_to_mlflow: bool = True) -> pd.DataFrame:
    """All training phases `train.*` asks for; returns the history (one row per epoch)."""
    train_ds = make_dataset(train_frame, root, class_names, image_size, p.batch_size, shuffle_seed=seed)
    val_ds = make_dataset(val_frame, root, class_names, image_size, p.batch_size)
    augmenting = p.augment.flip != "none" or p.augment.rotation > 0
    with image_read_errors():
        if is_transfer(p) and not augmenting:
            step = photos_per_step(model, p.batch_size)  # feature extraction only: small steps, less memory
            ordered = [make_dataset(frame, root, class_names, image_size, step) for frame in (train_frame, val_frame)]
            labels = (label_indices(train_frame, class_names), label_indices(val_frame, class_names))
            history = fit_head_on_features(model, *ordered, labels, p, seed, log_to_mlflow)
        else:
            history = fit(model, train_ds, val_ds, p.epochs, p.patience, log_to_mlflow=log_to_mlflow)
        if fine_tunes(p):
            history = fine_tune(model, train_ds, val_ds, p, history, log_to_mlflow)
    return history


def describe_run(p: TrainParams, data: dict, n_train: int, n_val: int, tags: dict[str, str]) -> str:
    """The run's description in the MLflow UI (markdown): what was trained on what, from where."""
    lines = [f"**{p.arch}** trained on {data['description']}: {n_train} training and {n_val} validation "
             f"images ({', '.join(f'{c} {n}' for c, n in data['classes'].items())} in all)."]
    if tags["git_commit"] != "none":  # outside git there is nothing to say about the code's version
        lines.append(f"Code: git `{tags['git_commit'][:7]}`"
                     + (" with uncommitted changes." if tags["git_dirty"] == "true" else "."))
    if "dvc_exp_name" in tags:
        lines.append(f"DVC experiment `{tags['dvc_exp_name']}` (`dvc exp show` lists it).")
    return "\n\n".join(lines)


def main(paths: Paths, params: Params) -> None:
    b, p = params.base, params.train
    train_frame, val_frame = read_split(paths.split_csv("train")), read_split(paths.split_csv("val"))
    class_names = sorted(set(train_frame["label"]))
    report = json.loads(paths.ingest_report.read_text())
    data = describe_data(report)
    manifest_sha256 = manifest_hash(paths.manifest)

    experiment_id = tracking.setup(paths)
    tags = tracking.lineage_tags(paths, manifest_sha256, report["source"])
    tags["mlflow.note.content"] = describe_run(p, data, len(train_frame), len(val_frame), tags)
    name = tracking.run_name(tags.get("dvc_exp_name"), p.arch, b.image_size, datetime.now())
    # The run starts before the model is built: building seeds Python's random generator, and
    # MLflow would then draw the same random run name every time.
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags) as run:
        model = build_model(len(class_names), b.image_size, p, b.seed)
        log.info("train: MLflow run %s (%s); %s on %d images, %d classes", name, run.info.run_id, p.arch,
                 len(train_frame), len(class_names))
        mlflow.log_params({"base.seed": b.seed, "base.image_size": b.image_size, **used_train_params(p),
                           "n_train": len(train_frame), "n_val": len(val_frame), "class_names": ",".join(class_names)})
        tracking.log_manifest(pd.read_csv(paths.manifest, keep_default_na=False), report["source"],
                              f"{data['kind']}-manifest", manifest_sha256)
        tracking.log_training_images(list(train_frame["sha256"]) + list(val_frame["sha256"]))
        started = time.perf_counter()
        history = train_model(model, train_frame, val_frame, paths.root, class_names, b.image_size, p, b.seed)
        mlflow.log_metric("train_seconds", time.perf_counter() - started)
        best = int(history["val_loss"].idxmin())
        mlflow.log_metrics({"train_best_epoch": best + 1, "train_epochs_run": len(history)})
        paths.model.parent.mkdir(parents=True, exist_ok=True)
        save_model(model, paths.model)
        history.to_csv(paths.history, index=False)
        tracking.RunInfo(class_names, b.image_size).save(paths.run_info)
        tracking.remember_training_run(paths, run.info.run_id)
    log.info("train: best epoch %d of %d, val_loss %.4f, val_accuracy %.4f", best + 1, len(history),
             history["val_loss"][best], history["val_accuracy"][best])
