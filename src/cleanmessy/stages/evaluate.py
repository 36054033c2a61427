"""evaluate: the test split -> pipeline/metrics.json, pipeline/predictions.csv; the same numbers in
the training run; the model logged to MLflow and registered as a new version, promoted by alias."""

from __future__ import annotations

import json
import logging
from typing import Any

import keras
import mlflow
import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

from cleanmessy import tracking
from cleanmessy.card import render_card, wilson_interval
from cleanmessy.errors import UserError
from cleanmessy.inputs import image_read_errors, label_indices, make_dataset, read_split
from cleanmessy.models import photos_per_step  # (importing models registers its custom layers for loading)
from cleanmessy.params import Params, flatten
from cleanmessy.project import Paths

log = logging.getLogger(__name__)


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Loss, accuracy, per-class precision/recall/F1, ROC AUC and the confusion matrix."""
    y_pred = probs.argmax(axis=1)
    labels = list(range(len(class_names)))
    eps = 1e-7  # as Keras clips probabilities in its cross-entropy
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(y_true)), y_true], eps, 1.0))))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    if len(set(y_true.tolist())) < len(class_names):
        auc = None  # undefined (NaN in sklearn) when a class has no test image
    elif len(class_names) == 2:
        auc = float(roc_auc_score(y_true, probs[:, 1]))
    else:
        auc = float(roc_auc_score(y_true, probs, multi_class="ovr", labels=labels))
    matrix = confusion_matrix(y_true, y_pred, labels=labels)
    correct = int(np.sum(y_pred == y_true))
    low, high = wilson_interval(correct, len(y_true))
    return {
        "n": int(len(y_true)),
        "loss": loss,
        "accuracy": correct / len(y_true),
        "accuracy_ci95_low": low,  # Wilson score interval: 29/30 is not "97 %" without its error bar
        "accuracy_ci95_high": high,
        "roc_auc": auc,
        "macro_f1": float(np.mean(f1)),
        "per_class": {
            c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                "support": int(support[i])}
            for i, c in enumerate(class_names)
        },
        # rows: actual class, columns: predicted class
        "confusion_matrix": {a: {p: int(matrix[i, j]) for j, p in enumerate(class_names)}
                             for i, a in enumerate(class_names)},
    }


def mlflow_metrics(test: dict[str, Any]) -> dict[str, float]:
    """The flat `test_*` metric names shown in the MLflow UI's run table."""
    keys = ("loss", "accuracy", "accuracy_ci95_low", "accuracy_ci95_high", "macro_f1")
    out = {f"test_{k}": float(test[k]) for k in keys if test[k] is not None}
    if test["roc_auc"] is not None:
        out["test_roc_auc"] = test["roc_auc"]
    for c, m in test["per_class"].items():
        out.update({f"test_{name}_{c}": float(m[name]) for name in ("precision", "recall", "f1")})
    return out


def prediction_frame(frame: pd.DataFrame, probs: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    out = frame[["path", "label"]].copy()
    out["predicted"] = [class_names[i] for i in probs.argmax(axis=1)]
    for i, c in enumerate(class_names):
        out[f"p_{c}"] = probs[:, i]
    return out


def data_summary(paths: Paths, params: Params) -> dict[str, Any]:
    """What the model card says about the data."""
    from cleanmessy.stages.ingest import manifest_hash

    manifest = pd.read_csv(paths.manifest, keep_default_na=False)
    return {
        "source": params.ingest.source,
        "n_images": len(manifest),
        "classes": manifest["label"].value_counts().sort_index().to_dict(),
        "split_sizes": {s: len(read_split(paths.split_csv(s))) for s in ("train", "val", "test")},
        "manifest_sha256": manifest_hash(paths.manifest),
    }


def main(paths: Paths, params: Params) -> None:
    run = tracking.RunInfo.load(paths.run_info)
    test_frame = read_split(paths.split_csv("test"))
    name, min_acc = params.evaluate.model_name, params.evaluate.min_accuracy
    tracking.setup(paths)
    # All in the training run: if anything fails, MLflow marks the run FAILED and nothing is registered.
    with mlflow.start_run(run_id=run.run_id):
        try:
            model = keras.models.load_model(paths.model)
        except (OSError, TypeError, ValueError) as exc:
            raise UserError(f"cannot load {paths.model}: {exc}; run `cleanmessy train` (or `dvc repro`)") from None
        ds = make_dataset(test_frame, paths.root, run.class_names, run.image_size,
                          photos_per_step(model, params.train.batch_size))
        with image_read_errors():
            probs = model.predict(ds, verbose=0)
        test = compute_metrics(label_indices(test_frame, run.class_names), probs, run.class_names)
        log.info("evaluate: test accuracy %.4f [%.4f, %.4f] on %d images, loss %.4f", test["accuracy"],
             test["accuracy_ci95_low"], test["accuracy_ci95_high"], test["n"], test["loss"])
        mlflow.log_metrics(mlflow_metrics(test))
        mlflow.log_dict({"test": test}, "metrics.json")
        train_params = {"base.image_size": params.base.image_size,
                        **{k: v for k, v in flatten(params).items() if k.startswith("train.")}}
        card = render_card(name, data_summary(paths, params), train_params, test)
        mlflow.log_text(card, "model_card.md")
        example = next(iter(ds.unbatch().batch(1).take(1)))[0].numpy()
        info = tracking.log_keras_model(model, example, model.predict(example, verbose=0),
                                        {"class_names": run.class_names, "image_size": run.image_size},
                                        extra_files={"model_card.md": card})
        tags = {"run_id": run.run_id, "class_names": ",".join(run.class_names),
                "min_accuracy": str(min_acc), **mlflow.get_run(run.run_id).data.tags}
        tags = {k: v for k, v in tags.items() if not k.startswith("mlflow.")}
        promotion = tracking.register_and_promote(info.model_uri, name, run.run_id, test["accuracy"], min_acc, tags)
        mlflow.set_tags({"registered_version": promotion.version, "promotion": promotion.reason})
    paths.metrics.write_text(json.dumps({"test": test}, indent=2) + "\n")
    prediction_frame(test_frame, probs, run.class_names).to_csv(paths.predictions, index=False)
    log.info("evaluate: registered %s version %s (staging); %s", name, promotion.version, promotion.reason)
