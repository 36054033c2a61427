"""evaluate: the test split -> pipeline/metrics.json, pipeline/predictions.csv; the same numbers in
the training run; the model logged to MLflow and registered as a new version, promoted by alias."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

from cleanmessy import familiarity, ood, tracking
from cleanmessy.card import describe_data, render_card, wilson_interval
from cleanmessy.errors import UserError
from cleanmessy.images import ImageError, open_rgb, to_model_input
from cleanmessy.inference import Predictor, load_model_file
from cleanmessy.inputs import ModelSpec, label_indices, read_split
from cleanmessy.lineage import manifest_hash
from cleanmessy.params import Params, used_train_params
from cleanmessy.project import Paths
from cleanmessy.pyfunc import (
    RegisteredBeforePhotoBytes,
    check_photo_classifier,
    load_photo_classifier,
    log_photo_classifier,
)

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


# pipeline/metrics.json's names -> the test evaluation's. Few and short, so that `dvc metrics
# show` (with pipeline/ood.json's three) fits 100 columns; the rest (loss, macro F1, per class) is in
# pipeline/evaluation.json and the MLflow run.
HEADLINE = {"accuracy": "accuracy", "ci95_low": "accuracy_ci95_low", "ci95_high": "accuracy_ci95_high",
            "roc_auc": "roc_auc"}
OOD_HEADLINE = {"auroc": "auroc", "flag_in": "flag_rate_in", "flag_out": "flag_rate_out"}  # pipeline/ood.json


def headline(test: dict[str, Any]) -> dict[str, Any]:
    """The test metrics pipeline/metrics.json holds (all on the test split): accuracy and its 95 %
    interval, ROC AUC."""
    return {name: None if test[key] is None else round(test[key], 6) for name, key in HEADLINE.items()}


def ood_headline(report: dict[str, Any]) -> dict[str, Any]:
    """pipeline/ood.json: the detector's AUROC and its flag rates on the test split and the OOD set."""
    return {name: None if report[key] is None else round(report[key], 6) for name, key in OOD_HEADLINE.items()}


def ood_set(trained_on_sample: bool, not_a_room: list[Path], image_size: int,
            seed: int) -> tuple[np.ndarray, list[str]]:
    """The out-of-distribution pictures as model inputs, and each one's kind: ood.pictures (made in
    code) and the photos users marked "not a room" (an unreadable one is skipped)."""
    arrays, kinds = [], []
    for kind, picture in ood.pictures(trained_on_sample, seed):
        arrays.append(to_model_input(picture, image_size))
        kinds.append(kind)
    for file in not_a_room:
        try:
            photo, _ = open_rgb(file)
        except (ImageError, OSError):
            continue
        arrays.append(to_model_input(photo, image_size))
        kinds.append("feedback")
    return np.stack(arrays), kinds


def familiarity_report(detector: familiarity.Familiarity, in_features: np.ndarray, out_features: np.ndarray,
                       kinds: list[str]) -> dict[str, Any]:
    """How well the detector tells the test split (in-distribution) from the OOD set: AUROC of the
    scores, the share of each flagged, and the flag rate of each kind of OOD picture."""
    in_scores, out_scores = detector.scores(in_features), detector.scores(out_features)
    in_flags = detector.unfamiliar(detector.familiarity(in_scores))
    out_flags = detector.unfamiliar(detector.familiarity(out_scores))
    by_kind = {}
    for kind in dict.fromkeys(kinds):
        mask = np.array([k == kind for k in kinds])
        by_kind[kind] = {"n": int(mask.sum()), "flag_rate": float(out_flags[mask].mean())}
    return {"auroc": familiarity.auroc(in_scores, out_scores),
            "flag_rate_in": float(in_flags.mean()) if len(in_flags) else None,
            "flag_rate_out": float(out_flags.mean()) if len(out_flags) else None,
            "n_in": int(len(in_scores)), "n_out": int(len(out_scores)), "flagged_in": int(in_flags.sum()),
            "flagged_out": int(out_flags.sum()), **detector.summary(), "by_kind": by_kind}


def ood_mlflow_metrics(report: dict[str, Any]) -> dict[str, float]:
    names = {"ood_auroc": "auroc", "ood_flag_rate_in": "flag_rate_in", "ood_flag_rate_out": "flag_rate_out"}
    return {name: float(report[key]) for name, key in names.items() if report[key] is not None}


def compare_with_production(name: str, family: str, test_frame: pd.DataFrame, correct: np.ndarray, root: Path,
                            class_names: list[str], batch_size: int) -> tracking.Comparison | None:
    """Score the production version (if any) on this version's test images that it never trained
    or validated on (by content hash), beside this version's score on the same images. A
    production version trained on another data family (card.data_family) is not scored at all; one
    that no server loads any more (registered before models took photo bytes) is replaced."""
    from mlflow import MlflowClient
    from mlflow.models import Model

    production = tracking.alias_version(MlflowClient(), name, tracking.PRODUCTION)
    if production is None:
        return None
    comparison = dict(production_version=str(production.version), n_test=len(test_frame), n_unseen=0,
                      candidate_correct=0, production_correct=0, candidate_family=family,
                      production_family=tracking.version_family(dict(production.tags or {})))
    if not tracking.Comparison(**comparison).same_family:  # never scored: decide_production refuses it
        return tracking.Comparison(**comparison)
    uri = f"models:/{name}/{production.version}"
    try:  # downloaded once: its metadata here, its model below
        local, meta = tracking.download_version(uri)
    except UserError as exc:
        return tracking.Comparison(**comparison, incomparable=(
            f"production version {production.version}'s model cannot be read here ({exc}), so the two cannot "
            "be compared"))
    try:
        check_photo_classifier(Model.load(str(local)).flavors, f"production version {production.version}")
    except RegisteredBeforePhotoBytes:
        return tracking.Comparison(**comparison, unservable=(
            f"production version {production.version} was registered before models took photo bytes and no "
            "server loads it any more, so this version replaces it"))
    seen = tracking.training_images(production.run_id) if production.run_id else None
    if seen is None:
        comparison["incomparable"] = (f"production version {production.version} does not record its training "
                                      "images, so the two cannot be compared on the same images")
    elif list(meta["class_names"]) != class_names:
        comparison["incomparable"] = (f"production version {production.version} tells {meta['class_names']} "
                                      f"apart, this version {class_names}: they cannot be compared")
    else:
        unseen = ~test_frame["sha256"].isin(seen).to_numpy()
        comparison.update(n_unseen=int(unseen.sum()), candidate_correct=int(correct[unseen].sum()))
        if unseen.any():
            try:
                other = load_photo_classifier(local, f"production version {production.version}")
            except UserError as exc:
                return tracking.Comparison(**{**comparison, "n_unseen": 0, "candidate_correct": 0, "incomparable": (
                    f"{exc}, so the two cannot be compared")})
            rows = test_frame[unseen]
            probs = Predictor(other.keras_model, int(meta["image_size"]), batch_size).predict_split(rows, root)
            comparison["production_correct"] = int((probs.argmax(axis=1) == label_indices(rows, class_names)).sum())
    return tracking.Comparison(**comparison)


def card_data(paths: Paths, report: dict[str, Any]) -> dict[str, Any]:
    """What the model card says about the data: the training data described, its source, the
    manifest's hash and the size of each split."""
    return {**describe_data(report), "source": report["source"], "manifest_sha256": manifest_hash(paths.manifest),
            "split_sizes": {s: len(read_split(paths.split_csv(s))) for s in ("train", "val", "test")}}


def log_and_register(spec: ModelSpec, test_frame: pd.DataFrame, paths: Paths, test: dict[str, Any],
                     correct: np.ndarray, card: str, run_id: str, params: Params,
                     training_data: dict[str, Any]) -> tracking.Promotion:
    """Into the active (training) run: the test metrics, the card and the model; then register the
    model as a new version, promoted as `decide_production` says."""
    name, min_acc = params.evaluate.model_name, params.evaluate.min_accuracy
    mlflow.log_metrics(mlflow_metrics(test))
    mlflow.log_dict({"test": test}, "evaluation.json")
    mlflow.log_text(card, "model_card.md")
    config = {"class_names": spec.class_names, "image_size": spec.image_size, "min_side": params.ingest.min_side,
              "max_pixels": params.ingest.max_pixels}
    example = (paths.root / test_frame["path"].iloc[0]).read_bytes()  # a test photo, as a client sends it
    with contextlib.redirect_stdout(io.StringIO()):  # MLflow's input-example check prints progress bars
        info = log_photo_classifier(paths.model, paths.familiarity, card, config, example,
                                             {**config, "training_data": training_data})
    # The few tags the registry's versions table shows; the run has the whole lineage.
    tags = {"data_family": training_data["family"], "test_images": str(test["n"]),
            "git_commit": mlflow.get_run(run_id).data.tags.get("git_commit", "none")}
    # Compared with production and promoted in one go: an experiment running beside this one must
    # not move `production` in between (`dvc queue start -j 2`).
    with tracking.store_lock(paths):
        comparison = compare_with_production(name, training_data["family"], test_frame, correct, paths.root,
                                             spec.class_names, params.train.batch_size)
        promotion = tracking.register_and_promote(info, name, run_id, test["accuracy"], min_acc, comparison, tags,
                                                  card)
    mlflow.set_tags({"registered_version": promotion.version, "promotion": promotion.reason})
    return promotion


def not_a_room_photos(paths: Paths) -> list[Path]:
    """The photos users marked "not a room" (data/feedback/not-a-room), in name order."""
    from cleanmessy.images import is_image_name

    folder = paths.not_a_room
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_name(p)) if folder.is_dir() else []


def main(paths: Paths, params: Params) -> None:
    spec = ModelSpec.load(paths.run_info)
    test_frame = read_split(paths.split_csv("test"))
    data = card_data(paths, json.loads(paths.ingest_report.read_text()))
    training_data = {k: data[k] for k in ("kind", "family", "description", "n_images", "classes")}
    model = load_model_file(paths.model)
    detector = familiarity.Familiarity.load(paths.familiarity)
    # All in the training run: if anything fails, MLflow marks the run FAILED and nothing is registered.
    with tracking.resume_training_run(paths) as run_id:
        y_true = label_indices(test_frame, spec.class_names)
        predictor = Predictor(model, spec.image_size, params.train.batch_size)
        probs, stats = predictor.split_with_features(test_frame, paths.root)
        test = compute_metrics(y_true, probs, spec.class_names)
        log.info("evaluate: test accuracy %.4f [%.4f, %.4f] on %d images, loss %.4f", test["accuracy"],
                 test["accuracy_ci95_low"], test["accuracy_ci95_high"], test["n"], test["loss"])
        # The same OOD set for every model (its own seed, not base.seed): figures compare across runs.
        pictures, kinds = ood_set(data["kind"] == "sample", not_a_room_photos(paths), spec.image_size, seed=0)
        _, ood_stats = predictor.with_features(pictures)
        unfamiliar = familiarity_report(detector, familiarity.embed(stats), familiarity.embed(ood_stats), kinds)
        log.info("evaluate: familiarity flags %d of %d test photos (%.1f %%) and %d of %d out-of-distribution "
                 "pictures (%.1f %%); AUROC %.3f", unfamiliar["flagged_in"], unfamiliar["n_in"],
                 100 * (unfamiliar["flag_rate_in"] or 0), unfamiliar["flagged_out"], unfamiliar["n_out"],
                 100 * (unfamiliar["flag_rate_out"] or 0), unfamiliar["auroc"] or float("nan"))
        mlflow.log_metrics(ood_mlflow_metrics(unfamiliar))
        card = render_card(params.evaluate.model_name, data,
                           {"base.image_size": spec.image_size, **used_train_params(params.train)}, test,
                           unfamiliar)
        promotion = log_and_register(spec, test_frame, paths, test, probs.argmax(axis=1) == y_true,
                                     card, run_id, params, training_data)
    paths.metrics.write_text(json.dumps(headline(test), indent=2) + "\n")
    paths.ood_metrics.write_text(json.dumps(ood_headline(unfamiliar), indent=2) + "\n")
    paths.evaluation.write_text(json.dumps({"test": test, "familiarity": unfamiliar}, indent=2) + "\n")
    prediction_frame(test_frame, probs, spec.class_names).to_csv(paths.predictions, index=False)
    # Nothing run-specific here (no version, run id or model hash): the file only has to exist, so
    # switching revisions (`dvc exp apply`) does not register the same model again (Paths.registered).
    paths.registered.write_text(json.dumps({"registered_model": params.evaluate.model_name}) + "\n")
    aliases = [alias for alias, on in ((tracking.STAGING, promotion.staging),
                                       (tracking.PRODUCTION, promotion.production)) if on]
    log.info("evaluate: registered %s version %s (%s); %s", params.evaluate.model_name, promotion.version,
             ", ".join(aliases) or "no alias", promotion.reason)
    if link := tracking.server_runs_link(run_id):  # a team server: where to look at the run
        log.info("evaluate: the runs on the tracking server: %s", link)
