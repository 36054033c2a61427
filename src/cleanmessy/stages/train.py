"""train: data/splits/{train,val}.csv -> pipeline/model.keras, pipeline/history.csv, pipeline/run.json.

Opens the MLflow run that evaluate and plot add to: all params, lineage tags, per-epoch metrics.
Under `train.distribute: multi_worker` every worker runs this stage; only the chief opens the run
and writes the outputs, the others train their shard and exit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from datetime import datetime

import mlflow
import pandas as pd

from cleanmessy import familiarity, tracking
from cleanmessy.card import describe_data, ordinal
from cleanmessy.distribute import Task, check_same_inputs, make_strategy
from cleanmessy.inference import Predictor
from cleanmessy.inputs import ModelSpec, read_split
from cleanmessy.lineage import lineage_tags, manifest_hash, run_name
from cleanmessy.models import build_model, save_model
from cleanmessy.params import Params, TrainParams, flatten, used_train_params
from cleanmessy.project import Paths
from cleanmessy.training import train_model

log = logging.getLogger(__name__)


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


def inputs_fingerprint(paths: Paths, params: Params) -> bytes:
    """What every worker must share: the params training reads and the train/val splits."""
    digest = hashlib.sha256(json.dumps({"seed": params.base.seed, "image_size": params.base.image_size,
                                        "train": flatten(params.train)}, sort_keys=True, default=str).encode())
    for name in ("train", "val"):
        digest.update(paths.split_csv(name).read_bytes())
    return digest.digest()


def train_as_worker(frames: tuple[pd.DataFrame, pd.DataFrame], params: Params, paths: Paths, strategy,
                    task: Task) -> None:
    """A worker other than the chief: train its shard in lockstep with the others, log nothing
    and write nothing (the chief logs the one MLflow run and saves the model)."""
    b, p = params.base, params.train
    class_names = sorted(set(frames[0]["label"]))
    with strategy.scope():
        model = build_model(len(class_names), b.image_size, p, b.seed)
    log.info("train: worker %d of %d, in step with the chief, which logs the run and saves the model",
             task.index, task.workers)
    train_model(model, *frames, paths.root, class_names, b.image_size, p, b.seed, strategy=strategy)
    log.info("train: worker %d of %d done", task.index, task.workers)


def fit_familiarity(model, train_frame: pd.DataFrame, paths: Paths, image_size: int, batch_size: int,
                    seed: int) -> familiarity.Familiarity:
    """The familiarity detector of the trained model: its features of the training photos,
    calibrated leave-one-out (familiarity.fit)."""
    _, stats = Predictor(model, image_size, batch_size).split_with_features(train_frame, paths.root)
    detector = familiarity.fit(familiarity.embed(stats), seed=seed)
    if detector.can_flag:
        log.info("train: familiarity detector of %d training photos: unfamiliar beyond distance %.4f to the %s "
                 "nearest (%.0f %% of training photos, each left out)", len(detector.bank), detector.threshold,
                 ordinal(detector.k), detector.alpha * 100)
    else:
        log.warning("train: familiarity detector of %d training photos flags no photo: at least %d are needed to "
                    "flag at %.0f %%", len(detector.bank), detector.min_photos, detector.alpha * 100)
    return detector


def main(paths: Paths, params: Params) -> None:
    b, p = params.base, params.train
    train_frame, val_frame = read_split(paths.split_csv("train")), read_split(paths.split_csv("val"))
    # Before any other TensorFlow work: MultiWorkerMirroredStrategy sets up the cluster.
    strategy, task = make_strategy(p, os.environ.get("TF_CONFIG"))
    if p.distribute == "multi_worker":
        check_same_inputs(strategy, inputs_fingerprint(paths, params))
    if not task.chief:
        train_as_worker((train_frame, val_frame), params, paths, strategy, task)
        return
    class_names = sorted(set(train_frame["label"]))
    report = json.loads(paths.ingest_report.read_text())
    data = describe_data(report)
    manifest_sha256 = manifest_hash(paths.manifest)

    experiment_id = tracking.open_experiment(paths)
    tracking.reap_dead_runs(experiment_id, "train")
    tags = {**lineage_tags(paths.root, manifest_sha256, report["source"]), **tracking.process_tags()}
    tags["mlflow.note.content"] = describe_run(p, data, len(train_frame), len(val_frame), tags)
    name = run_name(tags.get("dvc_exp_name"), p.arch, b.image_size, datetime.now())
    # The run starts before the model is built: building seeds Python's random generator, and
    # MLflow would then draw the same random run name every time.
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags) as run:
        with strategy.scope() if strategy else contextlib.nullcontext():
            model = build_model(len(class_names), b.image_size, p, b.seed)
        replicas = strategy.num_replicas_in_sync if strategy else 1
        log.info("train: MLflow run %s (%s); %s on %d images, %d classes%s", name, run.info.run_id, p.arch,
                 len(train_frame), len(class_names),
                 f", {replicas} replicas on {task.workers} worker(s)" if strategy else "")
        mlflow.log_params({"base.seed": b.seed, "base.image_size": b.image_size, **used_train_params(p),
                           "n_train": len(train_frame), "n_val": len(val_frame), "class_names": ",".join(class_names),
                           "replicas": replicas,
                           # the app's corrections ingest merged into the data (data/feedback)
                           "feedback_images": report.get("feedback", {}).get("used", 0)})
        tracking.log_manifest(pd.read_csv(paths.manifest, keep_default_na=False), report["source"],
                              f"{data['kind']}-manifest", manifest_sha256)
        tracking.log_training_images(list(train_frame["sha256"]) + list(val_frame["sha256"]))
        started = time.perf_counter()
        history = train_model(model, train_frame, val_frame, paths.root, class_names, b.image_size, p, b.seed,
                              on_epoch=lambda metrics, step: mlflow.log_metrics(metrics, step=step), strategy=strategy)
        mlflow.log_metric("train_seconds", time.perf_counter() - started)
        best = int(history["val_loss"].idxmin())
        mlflow.log_metrics({"train_best_epoch": best + 1, "train_epochs_run": len(history)})
        detector = fit_familiarity(model, train_frame, paths, b.image_size, p.batch_size, b.seed)
        mlflow.log_params(detector.summary())
        paths.model.parent.mkdir(parents=True, exist_ok=True)
        save_model(model, paths.model)
        detector.save(paths.familiarity)
        history.to_csv(paths.history, index=False)
        ModelSpec(class_names, b.image_size).save(paths.run_info)
        tracking.remember_training_run(paths, run.info.run_id)
    log.info("train: best epoch %d of %d, val_loss %.4f, val_accuracy %.4f", best + 1, len(history),
             history["val_loss"][best], history["val_accuracy"][best])
