"""`cleanmessy cv`: repeated stratified k-fold cross-validation of the `train.*` configuration on
all ingested images -> pipeline/cv.json; one MLflow parent run with a child run per fold.

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
from cleanmessy.inference import Predictor
from cleanmessy.inputs import decode_batches, label_indices
from cleanmessy.lineage import lineage_tags, manifest_hash
from cleanmessy.models import build_model, fine_tunes
from cleanmessy.params import Params, used_train_params
from cleanmessy.project import Paths
from cleanmessy.training import train_model

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
    std = float(np.std(fold_accuracies, ddof=1)) if len(fold_accuracies) > 1 else 0.0
    return {"accuracy_mean": mean, "accuracy_std": std,
            "accuracy_ci95_low": low, "accuracy_ci95_high": high, "folds_run": len(fold_accuracies),
            "n_images": n_images}


def run_fold(fit_rows: pd.DataFrame, val_rows: pd.DataFrame, test_rows: pd.DataFrame, class_names: list[str],
             paths: Paths, params: Params) -> dict[str, float]:
    """Train `train.*` on one fold and score it on the fold's test rows: accuracy, training time,
    epochs, and the forward pass's speed on those rows (decoding excluded)."""
    b, p = params.base, params.train
    started = time.perf_counter()
    if p.head == "logistic" and not fine_tunes(p):
        # no early stopping to feed: the val part trains too (it is still only reported)
        fit_rows = pd.concat([fit_rows, val_rows])
    model = build_model(len(class_names), b.image_size, p, b.seed)
    history = train_model(model, fit_rows, val_rows, paths.root, class_names, b.image_size, p, b.seed)
    seconds = time.perf_counter() - started
    predictor = Predictor(model, b.image_size, p.batch_size)
    probs = predictor.predict_split(test_rows, paths.root)
    # the speed of the forward pass alone, on (up to) one decoded step of the fold's test photos
    batch = next(decode_batches([str(paths.root / path) for path in test_rows["path"][:256]], b.image_size, 256))
    return {"accuracy": float(np.mean(probs.argmax(1) == label_indices(test_rows, class_names))),
            "train_seconds": seconds, "epochs_run": len(history), "n_train": len(fit_rows), "n_test": len(test_rows),
            "infer_images_per_s": predictor.photos_per_second(batch)}


def main(paths: Paths, params: Params) -> dict:
    try:
        manifest = pd.read_csv(paths.manifest, keep_default_na=False)
    except FileNotFoundError:
        raise UserError(f"{paths.manifest} not found: run `dvc repro ingest` first") from None
    b, p, c = params.base, params.train, params.cv
    class_names = sorted(manifest["label"].unique())
    experiment_id = tracking.open_experiment(paths)
    tags = {**lineage_tags(paths.root, manifest_hash(paths.manifest), params.ingest.source), "kind": "cv"}
    results: list[dict] = []
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"cv-{p.arch}", tags=tags) as parent:
        mlflow.log_params({"base.seed": b.seed, "base.image_size": b.image_size, "ingest.source": params.ingest.source,
                           **used_train_params(p), "cv.folds": c.folds, "cv.repeats": c.repeats})
        for repeat, fold, fit_rows, val_rows, test_rows in fold_plan(manifest, c.folds, c.repeats,
                                                                      params.split.val_fraction, b.seed):
            with mlflow.start_run(experiment_id=experiment_id, run_name=f"fold-{repeat}.{fold}", nested=True,
                                  tags={"kind": "cv_fold"}):
                result = run_fold(fit_rows, val_rows, test_rows, class_names, paths, params)
                mlflow.log_params({"repeat": repeat, "fold": fold, "n_train": result["n_train"],
                                   "n_test": result["n_test"]})
                mlflow.log_metrics({"test_accuracy": result["accuracy"], "train_seconds": result["train_seconds"],
                                    "epochs_run": result["epochs_run"]})
            results.append({"repeat": repeat, "fold": fold, **result})
            log.info("cv: repeat %d fold %d: accuracy %.4f (%d test images), %.1f s", repeat, fold, result["accuracy"],
                     result["n_test"], result["train_seconds"])
        summary = summarize([r["accuracy"] for r in results], len(manifest))
        summary["train_seconds_mean"] = float(np.mean([r["train_seconds"] for r in results]))
        summary["infer_images_per_s"] = float(np.median([r["infer_images_per_s"] for r in results]))
        mlflow.log_metrics({f"cv_{k}": v for k, v in summary.items()})
        report = {"arch": p.arch, "summary": summary, "folds": results, "run_id": parent.info.run_id}
        mlflow.log_dict(report, "cv.json")
    paths.cv_report.parent.mkdir(parents=True, exist_ok=True)
    paths.cv_report.write_text(json.dumps(report, indent=2) + "\n")
    log.info("cv: %s accuracy %.4f, 95%% interval [%.4f, %.4f] over %d folds; %.1f s training per fold",
             p.arch, summary["accuracy_mean"], summary["accuracy_ci95_low"], summary["accuracy_ci95_high"],
             len(results), summary["train_seconds_mean"])
    return report
