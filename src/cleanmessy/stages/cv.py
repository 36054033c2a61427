"""cv: repeated stratified k-fold cross-validation of the `train.*` configuration on all ingested
images -> pipeline/cv.json; one MLflow parent run with a child run per fold.

Test sets of 10-30 photos swing 5-10 points per image; the mean over k folds x r repeats, with
its 95 % interval, is the figure to compare configurations by. Not a `dvc repro` stage: it trains
folds x repeats models. Run it as `cleanmessy cv` after ingest (or `dvc repro ingest`).
"""

from __future__ import annotations

import json
import logging
import time

import mlflow
import numpy as np
import pandas as pd
from sklearn.model_selection import RepeatedStratifiedKFold, train_test_split

from cleanmessy import tracking
from cleanmessy.card import wilson_interval
from cleanmessy.errors import UserError
from cleanmessy.inputs import image_read_errors, label_indices, make_dataset, manifest_hash
from cleanmessy.models import build_model, fine_tunes, photos_per_step
from cleanmessy.params import Params, used_train_params
from cleanmessy.project import Paths
from cleanmessy.stages.train import train_model

log = logging.getLogger(__name__)


def fold_plan(manifest: pd.DataFrame, folds: int, repeats: int, val_fraction: float, seed: int):
    """Yield `(repeat, fold, train_rows, val_rows, test_rows)`: stratified folds, and a stratified
    val part of each training part for early stopping. Deterministic for a seed."""
    labels = manifest["label"].to_numpy()
    smallest = manifest["label"].value_counts().min()
    if smallest < folds:
        raise UserError(f"cv.folds is {folds}, but a class has only {smallest} images")
    splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    for i, (train_idx, test_idx) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        n_val = max(round(len(train_idx) * val_fraction), len(set(labels)))  # one per class at least
        fit_idx, val_idx = train_test_split(train_idx, test_size=n_val, stratify=labels[train_idx],
                                            random_state=seed + i)
        yield i // folds, i % folds, manifest.iloc[fit_idx], manifest.iloc[val_idx], manifest.iloc[test_idx]


def summarize(fold_accuracies: list[float], n_images: int) -> dict[str, float]:
    """Mean fold accuracy, its spread, and a 95 % Wilson interval on the mean taken over the
    n_images that each repeat predicts once (folds share training data, so a t-interval over
    folds would understate the uncertainty)."""
    mean = float(np.mean(fold_accuracies))
    low, high = wilson_interval(round(mean * n_images), n_images)
    return {"accuracy_mean": mean, "accuracy_std": float(np.std(fold_accuracies, ddof=1)) if len(fold_accuracies) > 1 else 0.0,
            "accuracy_ci95_low": low, "accuracy_ci95_high": high, "folds_run": len(fold_accuracies),
            "n_images": n_images}


def inference_speed(model, frame: pd.DataFrame, paths: Paths, image_size: int, batch_size: int) -> float:
    """Images per second through the compiled forward pass (decoding excluded), best of 3."""
    import tensorflow as tf

    from cleanmessy.images import load_for_model

    batch = np.stack([load_for_model(paths.root / p, image_size) for p in frame["path"]])
    forward = tf.function(lambda x: model(x, training=False))
    chunks = [batch[i:i + batch_size] for i in range(0, len(batch), batch_size)]
    for chunk in chunks:
        forward(chunk)  # trace once per shape
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for chunk in chunks:
            forward(chunk).numpy()
        best = min(best, time.perf_counter() - started)
    return len(batch) / best


def main(paths: Paths, params: Params) -> dict:
    try:
        manifest = pd.read_csv(paths.manifest, keep_default_na=False)
    except FileNotFoundError:
        raise UserError(f"{paths.manifest} not found: run `dvc repro ingest` first") from None
    b, p, c = params.base, params.train, params.cv
    class_names = sorted(manifest["label"].unique())
    experiment_id = tracking.setup(paths)
    tags = {**tracking.lineage_tags(paths, manifest_hash(paths.manifest), params.ingest.source), "kind": "cv"}
    results: list[dict] = []
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"cv-{p.arch}", tags=tags) as parent:
        mlflow.log_params({"base.seed": b.seed, "base.image_size": b.image_size, "ingest.source": params.ingest.source,
                           **used_train_params(p), "cv.folds": c.folds, "cv.repeats": c.repeats})
        for repeat, fold, fit_rows, val_rows, test_rows in fold_plan(manifest, c.folds, c.repeats,
                                                                      params.split.val_fraction, b.seed):
            with mlflow.start_run(experiment_id=experiment_id, run_name=f"fold-{repeat}.{fold}", nested=True,
                                  tags={"kind": "cv_fold"}):
                started = time.perf_counter()
                if p.head == "logistic" and not fine_tunes(p):
                    # no early stopping to feed: the val part trains too (it is still only reported)
                    fit_rows = pd.concat([fit_rows, val_rows])
                model = build_model(len(class_names), b.image_size, p, b.seed)
                history = train_model(model, fit_rows, val_rows, paths.root, class_names, b.image_size, p, b.seed,
                                      log_to_mlflow=False)
                seconds = time.perf_counter() - started
                ds = make_dataset(test_rows, paths.root, class_names, b.image_size, photos_per_step(model, p.batch_size))
                with image_read_errors():
                    probs = model.predict(ds, verbose=0)
                accuracy = float(np.mean(probs.argmax(1) == label_indices(test_rows, class_names)))
                mlflow.log_params({"repeat": repeat, "fold": fold, "n_train": len(fit_rows), "n_test": len(test_rows)})
                mlflow.log_metrics({"test_accuracy": accuracy, "train_seconds": seconds, "epochs_run": len(history)})
            results.append({"repeat": repeat, "fold": fold, "accuracy": accuracy, "train_seconds": seconds,
                            "n_test": len(test_rows), "epochs_run": len(history)})
            log.info("cv: repeat %d fold %d: accuracy %.4f (%d test images), %.1f s", repeat, fold, accuracy,
                     len(test_rows), seconds)
        summary = summarize([r["accuracy"] for r in results], len(manifest))
        summary["train_seconds_mean"] = float(np.mean([r["train_seconds"] for r in results]))
        summary["infer_images_per_s"] = inference_speed(model, test_rows, paths, b.image_size,
                                                        photos_per_step(model, p.batch_size))
        mlflow.log_metrics({f"cv_{k}": v for k, v in summary.items()})
        report = {"arch": p.arch, "summary": summary, "folds": results, "run_id": parent.info.run_id}
        mlflow.log_dict(report, "cv.json")
    paths.root.joinpath("pipeline").mkdir(exist_ok=True)
    paths.cv_report.write_text(json.dumps(report, indent=2) + "\n")
    log.info("cv: %s accuracy %.4f, 95%% interval [%.4f, %.4f] over %d folds; %.1f s training per fold",
             p.arch, summary["accuracy_mean"], summary["accuracy_ci95_low"], summary["accuracy_ci95_high"],
             len(results), summary["train_seconds_mean"])
    return report
