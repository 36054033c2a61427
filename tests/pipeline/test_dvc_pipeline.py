"""The real pipeline: `dvc repro` on a fresh copy of the project, with tiny params, checked through
DVC's own commands and the real MLflow store it writes. Tests run in file order on one project
copy; each test that changes the copy says so."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from conftest import run, set_params

STAGES = ["ingest", "split", "train", "evaluate", "plot"]
PLOTS = ["samples.png", "training_curves.png", "confusion_matrix.png", "predictions.png", "misclassified.png"]
MODEL = "clean-vs-messy"

pytestmark = pytest.mark.slow


def ran(stdout: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", stdout)


def client(project) -> MlflowClient:
    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def run_info(project) -> dict:
    return json.loads((project / "pipeline/run.json").read_text())


def test_repro_runs_every_stage_and_writes_outputs(tiny_project):
    """One `dvc repro` runs the five stages in order and leaves each stage's outputs."""
    project, result = tiny_project
    assert ran(result.stdout) == STAGES
    manifest = pd.read_csv(project / "data/manifest.csv")
    assert sorted(manifest["label"].value_counts().to_dict().items()) == [("clean", 10), ("messy", 10)]
    splits = {s: pd.read_csv(project / f"data/splits/{s}.csv") for s in ("train", "val", "test")}
    assert sum(len(f) for f in splits.values()) == len(manifest)
    assert all(set(f["label"]) == {"clean", "messy"} for f in splits.values())
    assert len(pd.read_csv(project / "pipeline/history.csv")) == 1  # one epoch
    metrics = json.loads((project / "pipeline/metrics.json").read_text())["test"]
    assert metrics["n"] == len(splits["test"])
    assert 0 <= metrics["accuracy"] <= 1 and set(metrics["per_class"]) == {"clean", "messy"}
    assert sum(sum(row.values()) for row in metrics["confusion_matrix"].values()) == metrics["n"]
    for name in PLOTS:
        with Image.open(project / "pipeline/plots" / name) as img:
            assert img.format == "PNG" and img.width > 100


def test_mlflow_run_holds_params_metrics_figures_and_lineage(tiny_project):
    """The run has all params, per-epoch and test metrics, the figures, the model, lineage tags."""
    project, _ = tiny_project
    mlflow_client = client(project)
    run_id = run_info(project)["run_id"]
    mlflow_run = mlflow_client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED"
    params = mlflow_run.data.params
    assert params["train.epochs"] == "1" and params["base.image_size"] == "32"
    assert params["ingest.source"] == "data/sample" and params["train.augment.flip"] == "horizontal"
    epochs = mlflow_client.get_metric_history(run_id, "val_loss")
    assert [m.step for m in epochs] == [1]
    metrics = json.loads((project / "pipeline/metrics.json").read_text())["test"]
    assert mlflow_run.data.metrics["test_accuracy"] == pytest.approx(metrics["accuracy"])
    assert "test_recall_messy" in mlflow_run.data.metrics
    tags = mlflow_run.data.tags
    head = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    assert tags["git_commit"] == head
    assert tags["data_manifest_sha256"] == hashlib.sha256((project / "data/manifest.csv").read_bytes()).hexdigest()
    plots = {a.path for a in mlflow_client.list_artifacts(run_id, "plots")}
    assert plots == {f"plots/{p}" for p in PLOTS}


def test_model_is_registered_with_staging_and_production(tiny_project):
    """Version 1 is registered from the run, gets `staging`, and `production` (min_accuracy 0)."""
    project, _ = tiny_project
    mlflow_client = client(project)
    versions = mlflow_client.search_model_versions(f"name='{MODEL}'")
    assert [str(v.version) for v in versions] == ["1"]
    version = mlflow_client.get_model_version(MODEL, "1")  # search results carry no aliases
    assert version.run_id == run_info(project)["run_id"]
    assert set(version.aliases) == {"staging", "production"}
    assert version.description.startswith("promoted")
    assert float(version.tags["test_accuracy"]) == pytest.approx(
        json.loads((project / "pipeline/metrics.json").read_text())["test"]["accuracy"])


def test_registered_model_loads_and_predicts_like_the_pipeline(tiny_project):
    """`models:/clean-vs-messy@production` loads through MLflow and gives evaluate's probabilities."""
    import mlflow

    from cleanmessy.images import load_for_model

    project, _ = tiny_project
    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    preds = pd.read_csv(project / "pipeline/predictions.csv")
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@production")
    assert model.metadata.metadata["class_names"] == ["clean", "messy"]
    batch = __import__("numpy").stack([load_for_model(project / p, 32) for p in preds["path"]])
    probs = model.predict(batch)
    assert probs[:, 1] == pytest.approx(preds["p_messy"].to_numpy(), abs=1e-5)


def test_second_repro_reruns_nothing(tiny_project):
    """Nothing changed, so nothing runs."""
    project, _ = tiny_project
    result = run(["dvc", "repro"], project)
    assert ran(result.stdout) == []
    assert "Data and pipelines are up to date" in result.stdout


def test_dvc_metrics_show_reads_the_test_metrics(tiny_project):
    project, _ = tiny_project
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], project).stdout)
    test = json.loads((project / "pipeline/metrics.json").read_text())["test"]
    data = next(iter(shown.values()))["data"]["pipeline/metrics.json"]["data"]["test"]
    assert data["accuracy"] == pytest.approx(test["accuracy"])


def test_plot_param_change_reruns_only_plot(tiny_project):
    """Changes plot.dpi: only the plot stage runs again, and `dvc params diff` shows the change."""
    project, _ = tiny_project
    set_params(project, {"plot": {"dpi": 60}})
    result = run(["dvc", "repro"], project)
    assert ran(result.stdout) == ["plot"]
    diff = json.loads(run(["dvc", "params", "diff", "--json"], project).stdout)
    assert (diff["params.yaml"]["plot.dpi"]["old"], diff["params.yaml"]["plot.dpi"]["new"]) == (100, 60)


def test_source_change_is_noticed_by_dvc(tiny_project):
    """Editing the source (here: the sample recipe) marks ingest as changed, params untouched."""
    project, _ = tiny_project
    recipe = project / "data/sample/sample.yaml"
    original = recipe.read_text()
    recipe.write_text(yaml.safe_dump({**yaml.safe_load(original), "seed": 1}))
    try:
        status = json.loads(run(["dvc", "status", "--json"], project).stdout)
        assert "ingest" in status
    finally:
        recipe.write_text(original)
    assert "ingest" not in json.loads(run(["dvc", "status", "--json"], project).stdout)


def test_bad_params_give_a_message_naming_the_key(tiny_project):
    """A typo in params.yaml stops the stage with a message naming the key, no traceback."""
    project, _ = tiny_project
    params = project / "params.yaml"
    original = params.read_text()
    params.write_text(re.sub(r"(?m)^  epochs: 1$", "  epochs: ten", original))
    try:
        result = run(["cleanmessy", "train"], project, check=False)
    finally:
        params.write_text(original)
    assert result.returncode == 2
    assert "train.epochs must be int" in result.stderr and "Traceback" not in result.stderr


def test_failed_evaluate_registers_nothing(tiny_project):
    """An unreadable test image fails evaluate with a clear message; no version is registered
    and the run is marked failed. The image is restored afterwards."""
    project, _ = tiny_project
    mlflow_client = client(project)
    before = len(mlflow_client.search_model_versions(f"name='{MODEL}'"))
    image = project / pd.read_csv(project / "data/splits/test.csv")["path"][0]
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 3])
    try:
        result = run(["cleanmessy", "evaluate"], project, check=False)
    finally:
        image.write_bytes(data)
    assert result.returncode == 2, result.stderr
    assert "unreadable image" in result.stderr and image.name in result.stderr
    assert "Traceback" not in result.stderr
    assert len(mlflow_client.search_model_versions(f"name='{MODEL}'")) == before
    assert mlflow_client.get_run(run_info(project)["run_id"]).info.status == "FAILED"


def test_stricter_threshold_registers_staging_but_keeps_production(tiny_project):
    """min_accuracy 1.0 reruns evaluate (plot only if its inputs changed, which they need not: the
    model is the same); the new version gets `staging`, and `production` only if it reached 1.0
    and the current production's accuracy."""
    project, _ = tiny_project
    set_params(project, {"evaluate": {"min_accuracy": 1.0}})
    result = run(["dvc", "repro"], project)
    assert ran(result.stdout) in (["evaluate"], ["evaluate", "plot"])
    mlflow_client = client(project)
    new = mlflow_client.get_model_version_by_alias(MODEL, "staging")
    assert str(new.version) == "2"
    accuracy = json.loads((project / "pipeline/metrics.json").read_text())["test"]["accuracy"]
    production = mlflow_client.get_model_version_by_alias(MODEL, "production")
    if accuracy >= 1.0:
        assert str(production.version) == "2" and new.description.startswith("promoted")
    else:
        assert str(production.version) == "1"
        assert new.description.startswith("not promoted") and "min_accuracy" in new.description


def test_dvc_exp_run_tags_the_mlflow_run(tiny_project):
    """`dvc exp run -S` trains again; its MLflow run carries the DVC experiment's name."""
    project, _ = tiny_project
    result = run(["dvc", "exp", "run", "-n", "lr-test", "-S", "train.learning_rate=0.002"], project)
    assert ran(result.stdout) == ["train", "evaluate", "plot"]
    mlflow_run = client(project).get_run(run_info(project)["run_id"])
    assert mlflow_run.data.tags["dvc_exp_name"] == "lr-test"
    assert mlflow_run.data.params["train.learning_rate"] == "0.002"


def test_registered_version_carries_a_model_card(tiny_project):
    """The model card is logged inside the registered model, with the test interval and the data hash."""
    import mlflow

    project, _ = tiny_project
    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{MODEL}@staging")
    card = (Path(local) / "model_card.md").read_text()
    metrics = json.loads((project / "pipeline/metrics.json").read_text())["test"]
    assert f"95 % Wilson interval **[{metrics['accuracy_ci95_low']:.3f}, {metrics['accuracy_ci95_high']:.3f}]**" in card
    assert hashlib.sha256((project / "data/manifest.csv").read_bytes()).hexdigest() in card
    assert "Known limits" in card


def test_cv_logs_a_parent_run_with_one_child_per_fold(tiny_project):
    """`cleanmessy cv` (2 folds x 1 repeat) writes pipeline/cv.json and logs a parent run whose
    children are the folds."""
    project, _ = tiny_project
    set_params(project, {"cv": {"folds": 2, "repeats": 1}})
    run(["cleanmessy", "cv"], project)
    report = json.loads((project / "pipeline/cv.json").read_text())
    assert [(f["repeat"], f["fold"]) for f in report["folds"]] == [(0, 0), (0, 1)]
    summary = report["summary"]
    assert summary["accuracy_ci95_low"] <= summary["accuracy_mean"] <= summary["accuracy_ci95_high"]
    mlflow_client = client(project)
    parent = mlflow_client.get_run(report["run_id"])
    assert parent.data.metrics["cv_accuracy_mean"] == pytest.approx(summary["accuracy_mean"])
    children = mlflow_client.search_runs([parent.info.experiment_id],
                                         f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.metrics["test_accuracy"] for c in children) == sorted(f["accuracy"] for f in report["folds"])


def test_multi_view_experiment_registers_a_model_that_predict_loads(tiny_project, tmp_path):
    """A transfer experiment with the logistic head and multi-view TTA (random weights: no
    download) trains, is registered under its own name, and the predict CLI loads it from the
    registry (custom layers included) and classifies the photos. params.yaml is put back after,
    since `dvc exp run` leaves the experiment's params in the workspace and the serving tests
    read evaluate.model_name from it."""
    project, _ = tiny_project
    name = "clean-vs-messy-multiview"
    params_before = (project / "params.yaml").read_text()
    try:
        _run_multi_view_experiment(project, name, tmp_path)
    finally:
        (project / "params.yaml").write_text(params_before)


def _run_multi_view_experiment(project: Path, name: str, tmp_path: Path) -> None:
    run(["dvc", "exp", "run", "-n", "multiview", "-S", "train.arch=mobilenet", "-S", "train.weights=none",
         "-S", "train.augment.flip=none", "-S", "train.augment.rotation=0", "-S", "train.head=logistic",
         "-S", "train.views.regions=[[0.8,2]]", "-S", "train.views.flip=true", "-S", "train.views.normalize=true", "-S", f"evaluate.model_name={name}"],
        project)
    history = pd.read_csv(project / "pipeline/history.csv")
    assert list(history["phase"]) == ["head"]
    params = client(project).get_run(run_info(project)["run_id"]).data.params
    assert params["train.head"] == "logistic" and params["train.views.regions"] == "[[0.8, 2.0]]"
    photos = sorted((project / "data/images").rglob("*.png"))[:4]
    out = tmp_path / "predictions.csv"
    run(["cleanmessy", "predict", *map(str, photos), "--model-name", name, "--stage", "staging", "--out", str(out)],
        project)
    frame = pd.read_csv(out, keep_default_na=False)
    assert len(frame) == 4 and (frame["error"] == "").all()
    assert set(frame["label"]) <= {"clean", "messy"}
    assert np.allclose(frame[["clean", "messy"]].sum(axis=1), 1.0, atol=1e-4)
