"""train: data/splits/{train,val}.csv -> pipeline/model.keras, pipeline/history.csv, pipeline/run.json.

Opens the MLflow run that evaluate and plot add to: all params, lineage tags, per-epoch metrics.
"""

from __future__ import annotations

import logging

import keras
import mlflow
import pandas as pd

from cleanmessy import tracking
from cleanmessy.inputs import image_read_errors, make_dataset, read_split
from cleanmessy.models import build_model
from cleanmessy.params import Params, flatten
from cleanmessy.project import Paths
from cleanmessy.stages.ingest import manifest_hash

log = logging.getLogger(__name__)


class MlflowEpochLogger(keras.callbacks.Callback):
    """Per-epoch metrics into the active MLflow run (step = epoch number, from 1)."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        mlflow.log_metrics({k: float(v) for k, v in (logs or {}).items()}, step=epoch + 1)


def fit(model: keras.Model, train_ds, val_ds, epochs: int, patience: int,
        callbacks: list[keras.callbacks.Callback] = ()) -> pd.DataFrame:
    """Train with early stopping on val loss, keeping the best epoch's weights; the history."""
    stop = keras.callbacks.EarlyStopping("val_loss", patience=patience, restore_best_weights=True)
    history = model.fit(train_ds, validation_data=val_ds, epochs=epochs, verbose=2,
                        callbacks=[stop, *callbacks])
    frame = pd.DataFrame(history.history)
    frame.insert(0, "epoch", range(1, len(frame) + 1))
    return frame


def main(paths: Paths, params: Params) -> None:
    b, p = params.base, params.train
    train_frame, val_frame = read_split(paths.split_csv("train")), read_split(paths.split_csv("val"))
    class_names = sorted(set(train_frame["label"]))
    train_ds = make_dataset(train_frame, paths.root, class_names, b.image_size, p.batch_size, shuffle_seed=b.seed)
    val_ds = make_dataset(val_frame, paths.root, class_names, b.image_size, p.batch_size)
    model = build_model(len(class_names), b.image_size, p, b.seed)

    experiment_id = tracking.setup(paths)
    tags = tracking.lineage_tags(paths, manifest_hash(paths.manifest), params.ingest.source)
    with mlflow.start_run(experiment_id=experiment_id, tags=tags) as run:
        log.info("train: MLflow run %s; %s on %d images, %d classes", run.info.run_id, p.arch,
                 len(train_frame), len(class_names))
        # Every param that shapes the model; evaluate's and plot's do not (they may change per rerun).
        mlflow.log_params({k: v for k, v in flatten(params).items()
                           if k.split(".")[0] in ("base", "ingest", "split", "train")})
        mlflow.log_params({"n_train": len(train_frame), "n_val": len(val_frame),
                           "class_names": ",".join(class_names)})
        with image_read_errors():
            history = fit(model, train_ds, val_ds, p.epochs, p.patience, [MlflowEpochLogger()])
        best = int(history["val_loss"].idxmin())
        mlflow.log_metrics({"best_epoch": best + 1, "epochs_run": len(history)})
        paths.model.parent.mkdir(parents=True, exist_ok=True)
        model.save(paths.model)
        history.to_csv(paths.history, index=False)
        tracking.RunInfo(run.info.run_id, experiment_id, class_names, b.image_size).save(paths.run_info)
    log.info("train: best epoch %d of %d, val_loss %.4f, val_accuracy %.4f", best + 1, len(history),
             history["val_loss"][best], history["val_accuracy"][best])
