"""The real pipeline: `dvc repro` on a fresh copy of the project, with tiny params, checked through
DVC's own commands and the real MLflow store it writes. Tests that only read take `tiny_project`
(one repro for the session); every test that changes a project (params, files, a repro or
experiment, evaluate, cv) takes `own_project`, its private copy of that repro'd project, so the
tests pass in any order and alone."""

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

from conftest import browser_page, run, screenshot, set_params

STAGES = ["ingest", "split", "train", "evaluate", "plot"]
PLOTS = ["samples.png", "training_curves.png", "confusion_matrix.png", "predictions.png", "misclassified.png"]
MODEL = "clean-vs-messy"
COMPARE_DROP = "Created|.*/|roc_auc|auroc|flag_.*"  # as the README's `dvc exp show` for 100 columns

pytestmark = pytest.mark.slow


def ran(stdout: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", stdout)


def client(project) -> MlflowClient:
    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def run_info(project) -> dict:
    """run.json (class names, image size) and the id of the MLflow run that trained the model."""
    return {**json.loads((project / "pipeline/run.json").read_text()),
            **json.loads((project / "pipeline/mlflow_run.json").read_text())}


def evaluation(project) -> dict:
    return json.loads((project / "pipeline/evaluation.json").read_text())["test"]


def test_repro_runs_every_stage_and_writes_outputs(tiny_project):
    """One `dvc repro` runs the five stages in order and leaves each stage's outputs."""
    project, result = tiny_project
    assert ran(result.stdout) == STAGES
    manifest = pd.read_csv(project / "data/manifest.csv")
    assert sorted(manifest["label"].value_counts().to_dict().items()) == [("clean", 10), ("messy", 10)]
    splits = {s: pd.read_csv(project / f"data/splits/{s}.csv") for s in ("train", "val", "test")}
    assert sum(len(f) for f in splits.values()) == len(manifest)
    assert all(set(f["label"]) == {"clean", "messy"} for f in splits.values())
    history = pd.read_csv(project / "pipeline/history.csv")
    assert list(history.columns) == ["epoch", "phase", "train_loss", "train_accuracy", "val_loss", "val_accuracy"]
    assert len(history) == 1  # one epoch
    metrics = evaluation(project)
    assert metrics["n"] == len(splits["test"])
    assert 0 <= metrics["accuracy"] <= 1 and set(metrics["per_class"]) == {"clean", "messy"}
    assert sum(sum(row.values()) for row in metrics["confusion_matrix"].values()) == metrics["n"]
    for name in PLOTS:
        with Image.open(project / "pipeline/plots" / name) as img:
            assert img.format == "PNG" and img.width > 100


def test_mlflow_run_holds_params_metrics_figures_and_lineage(tiny_project):
    """The run has a readable name and description, the params the model used (and no others),
    train_/val_ per-epoch and test_ metrics, the figures at the artifact root (where the compare
    view shows them), the manifest as its dataset, and lineage tags."""
    project, _ = tiny_project
    mlflow_client = client(project)
    run_id = run_info(project)["run_id"]
    mlflow_run = mlflow_client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert re.fullmatch(r"seed_cnn-32px-\d{4}-\d{6}", mlflow_run.info.run_name), mlflow_run.info.run_name
    description = mlflow_run.data.tags["mlflow.note.content"]
    assert "**seed_cnn** trained on the embedded synthetic sample" in description and "16 training" in description
    params = mlflow_run.data.params
    assert params["train.epochs"] == "1" and params["base.image_size"] == "32"
    assert params["train.augment.flip"] == "horizontal" and params["train.filters"] == "[32, 64]"
    assert not {"train.weights", "train.alpha", "train.head_c", "ingest.source"} & set(params)  # seed_cnn ignores them
    for name in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert [m.step for m in mlflow_client.get_metric_history(run_id, name)] == [1], name
    assert "accuracy" not in mlflow_run.data.metrics and "loss" not in mlflow_run.data.metrics
    ood = json.loads((project / "pipeline/ood.json").read_text())
    assert mlflow_run.data.metrics["ood_auroc"] == pytest.approx(ood["auroc"], abs=1e-6)
    assert mlflow_run.data.metrics["ood_flag_rate_in"] == pytest.approx(ood["flag_in"], abs=1e-6)
    assert mlflow_run.data.metrics["ood_flag_rate_out"] == pytest.approx(ood["flag_out"], abs=1e-6)
    assert params["familiarity_k"] == "5" and params["familiarity_alpha"] == "0.05"
    test = evaluation(project)
    assert mlflow_run.data.metrics["test_accuracy"] == pytest.approx(test["accuracy"])
    assert "test_recall_messy" in mlflow_run.data.metrics
    tags = mlflow_run.data.tags
    head = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    assert tags["git_commit"] == head and tags["git_dirty"] == "false"
    manifest_sha256 = hashlib.sha256((project / "data/manifest.csv").read_bytes()).hexdigest()
    assert tags["data_manifest_sha256"] == manifest_sha256
    (dataset,) = mlflow_run.inputs.dataset_inputs
    assert dataset.dataset.digest == manifest_sha256[:32] and dataset.dataset.name == "sample-manifest"
    assert [t.value for t in dataset.tags if t.key == "mlflow.data.context"] == ["training"]
    root = {a.path for a in mlflow_client.list_artifacts(run_id)}
    assert set(PLOTS) <= root and {"evaluation.json", "model_card.md", "training_images.txt"} <= root


def test_model_is_registered_with_staging_and_production(tiny_project):
    """Version 1 is registered from the run, gets `staging`, and `production` (min_accuracy 0)."""
    project, _ = tiny_project
    mlflow_client = client(project)
    versions = mlflow_client.search_model_versions(f"name='{MODEL}'")
    assert [str(v.version) for v in versions] == ["1"]
    version = mlflow_client.get_model_version(MODEL, "1")  # search results carry no aliases
    assert version.run_id == run_info(project)["run_id"]
    assert set(version.aliases) == {"staging", "production"}
    assert version.description.startswith("promoted: test accuracy")
    assert "# Model card: clean-vs-messy" in version.description  # the version page shows the card
    assert float(version.tags["test_accuracy"]) == pytest.approx(evaluation(project)["accuracy"])
    assert "production" in mlflow_client.get_registered_model(MODEL).description


def test_registered_model_takes_photo_bytes_and_predicts_like_the_pipeline(tiny_project):
    """`models:/clean-vs-messy@production` is a pyfunc MLflow loads by itself: its signature takes
    one binary column `image` and answers label, a probability per class, familiarity, unfamiliar
    and error (the familiarity detector is an artifact of the model); MLflow wrote
    the input example users copy; on the test photos' bytes it gives evaluate's probabilities."""
    import json

    import mlflow

    project, _ = tiny_project
    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    preds = pd.read_csv(project / "pipeline/predictions.csv")
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@production")
    assert model.metadata.metadata["class_names"] == ["clean", "messy"]
    signature = model.metadata.signature
    assert [(c.name, c.type.name) for c in signature.inputs.inputs] == [("image", "binary")]
    assert [c.name for c in signature.outputs.inputs] == ["label", "clean", "messy", "familiarity", "unfamiliar",
                                                          "error"]
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{MODEL}@production"))
    example = json.loads((local / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == ["image"]  # base64, the form the scoring server decodes
    assert (local / "code" / "cleanmessy" / "pyfunc.py").is_file() and not list(local.rglob("*.pkl"))
    out = model.predict(pd.DataFrame({"image": [(project / p).read_bytes() for p in preds["path"]]}))
    assert (out["error"] == "").all() and list(out["label"]) == list(preds["predicted"])
    assert (local / "artifacts" / "familiarity.npz").is_file() and out["familiarity"].between(0, 1).all()
    assert out["messy"].to_numpy() == pytest.approx(preds["p_messy"].to_numpy(), abs=1e-5)


def test_second_repro_reruns_nothing(own_project):
    """Nothing changed, so nothing runs (also in a copy of the workspace: DVC compares content)."""
    project = own_project
    result = run(["dvc", "repro"], project)
    assert ran(result.stdout) == []
    assert "Data and pipelines are up to date" in result.stdout


def test_training_again_on_the_same_machine_is_byte_identical(own_project):
    """On one machine, training is deterministic: `dvc repro --force train` writes the same model
    and history, byte for byte, so DVC sees nothing new downstream. (Across CPUs it need not be:
    the README says what a fresh clone on another machine shows.)"""
    project = own_project
    before = {name: hashlib.md5((project / name).read_bytes()).hexdigest()
              for name in ("pipeline/model.keras", "pipeline/history.csv", "dvc.lock")}
    result = run(["dvc", "repro", "--force", "--single-item", "train"], project)
    assert ran(result.stdout) == ["train"]
    after = {name: hashlib.md5((project / name).read_bytes()).hexdigest() for name in before}
    assert after == before
    assert ran(run(["dvc", "repro"], project).stdout) == []  # evaluate and plot are still up to date


def test_dvc_metrics_show_reads_the_headline_metrics_at_100_columns(tiny_project):
    """metrics.json holds four headline test metrics, ood.json the familiarity detector's three;
    `dvc metrics show` prints them in 100 columns."""
    project, _ = tiny_project
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], project).stdout)
    files = next(iter(shown.values()))["data"]
    data = files["pipeline/metrics.json"]["data"]
    test = evaluation(project)
    assert set(data) == {"accuracy", "ci95_low", "ci95_high", "roc_auc"}
    assert data["accuracy"] == pytest.approx(test["accuracy"]) and data["ci95_low"] == test["accuracy_ci95_low"]
    ood = files["pipeline/ood.json"]["data"]
    report = json.loads((project / "pipeline/evaluation.json").read_text())["familiarity"]
    assert set(ood) == {"auroc", "flag_in", "flag_out"} and ood["auroc"] == pytest.approx(report["auroc"], abs=1e-6)
    assert report["n_in"] == len(pd.read_csv(project / "data/splits/test.csv")) and report["n_out"] >= 60
    table = run(["dvc", "metrics", "show"], project, COLUMNS="100").stdout
    assert max(len(line) for line in table.splitlines()) <= 100, table
    assert "ci95_high" in table and "flag_out" in table


def test_plot_param_change_reruns_only_plot(own_project):
    """Changes plot.dpi: only the plot stage runs again, and `dvc params diff` shows the change."""
    project = own_project
    set_params(project, {"plot": {"dpi": 60}})
    result = run(["dvc", "repro"], project)
    assert ran(result.stdout) == ["plot"]
    diff = json.loads(run(["dvc", "params", "diff", "--json"], project).stdout)
    assert (diff["params.yaml"]["plot.dpi"]["old"], diff["params.yaml"]["plot.dpi"]["new"]) == (100, 60)


def test_source_change_is_noticed_by_dvc(own_project):
    """Editing the source (here: the sample recipe) marks ingest as changed, params untouched;
    putting the recipe back makes it up to date again (DVC compares content, not times)."""
    project = own_project
    recipe = project / "data/sample/sample.yaml"
    original = recipe.read_text()
    recipe.write_text(yaml.safe_dump({**yaml.safe_load(original), "seed": 1}))
    status = json.loads(run(["dvc", "status", "--json"], project).stdout)
    assert "ingest" in status
    recipe.write_text(original)
    assert "ingest" not in json.loads(run(["dvc", "status", "--json"], project).stdout)


def test_bad_params_give_a_message_naming_the_key(own_project):
    """A typo in params.yaml stops the stage with a message naming the key, no traceback."""
    project = own_project
    params = project / "params.yaml"
    typo = re.sub(r"(?m)^  epochs: 1$", "  epochs: ten", params.read_text())
    assert "epochs: ten" in typo
    params.write_text(typo)
    result = run(["cleanmessy", "train"], project, check=False)
    assert result.returncode == 2
    assert "train.epochs must be int" in result.stderr and "Traceback" not in result.stderr


def test_failed_evaluate_registers_nothing(own_project):
    """An unreadable test image fails evaluate with a clear message; no version is registered
    and the run is marked failed."""
    project = own_project
    mlflow_client = client(project)
    assert len(mlflow_client.search_model_versions(f"name='{MODEL}'")) == 1
    image = project / pd.read_csv(project / "data/splits/test.csv")["path"][0]
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 3])
    result = run(["cleanmessy", "evaluate"], project, check=False)
    assert result.returncode == 2, result.stderr
    assert "unreadable image" in result.stderr and image.name in result.stderr
    assert "Traceback" not in result.stderr
    assert len(mlflow_client.search_model_versions(f"name='{MODEL}'")) == 1
    assert mlflow_client.get_run(run_info(project)["run_id"]).info.status == "FAILED"


def test_stricter_threshold_registers_without_aliases_unless_reached(own_project):
    """min_accuracy 1.0 reruns evaluate (plot only if its inputs changed, which they need not: the
    model is the same); the new version is compared with production on the same test images, and
    takes staging and production only if it reached 1.0."""
    project = own_project
    set_params(project, {"evaluate": {"min_accuracy": 1.0}})
    result = run(["dvc", "repro"], project)
    assert ran(result.stdout) in (["evaluate"], ["evaluate", "plot"])
    mlflow_client = client(project)
    new = mlflow_client.get_model_version(MODEL, "2")
    test = evaluation(project)
    correct = round(test["accuracy"] * test["n"])
    # the same model on the same (never trained on) test images: a tie, stated in the description
    assert (f"on the {test['n']} of {test['n']} test images that production version 1 never trained on, "
            f"this version got {correct} right") in new.description
    assert f"version 1 {correct} (" in new.description
    production = mlflow_client.get_model_version_by_alias(MODEL, "production")
    if test["accuracy"] >= 1.0:
        assert str(production.version) == "2" and set(new.aliases) == {"staging", "production"}
    else:
        assert str(production.version) == "1" and new.aliases == []
        assert new.description.startswith("not promoted") and "min_accuracy" in new.description


def test_committed_experiments_compare_side_by_side(own_project, tmp_path):
    """What a user does after a run: commit it, run two experiments, compare them. Every revision
    carries its metrics and plots (git tracks them), the MLflow runs carry the experiments' names,
    `-S` changes one line of params.yaml, and the candidate that changed the split is compared with
    production (whichever version holds it after the first experiment) on the test images
    production never trained on. `dvc plots diff`'s page fits the browser window."""
    project = own_project
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-q", "-m", "baseline run"], project)
    baseline = run(["git", "rev-parse", "HEAD"], project).stdout.strip()

    run(["dvc", "exp", "run", "-n", "lr-high", "-S", "train.learning_rate=0.002"], project)
    changed = [line for line in run(["git", "diff", "-U0", "params.yaml"], project).stdout.splitlines()
               if line.startswith(("-", "+")) and not line.startswith(("---", "+++"))]
    assert changed == ["-  learning_rate: 0.001", "+  learning_rate: 0.002"]
    run_a = run_info(project)["run_id"]
    # lr-high's version takes production if it did at least as well as version 1 on the same images
    production = client(project).get_model_version_by_alias(MODEL, "production")
    result = run(["dvc", "exp", "run", "-n", "more-test", "-S", "split.test_fraction=0.3"], project)
    assert ran(result.stdout) == ["split", "train", "evaluate", "plot"]
    run_b = run_info(project)["run_id"]

    # dvc exp show: numbers, not "!", for the baseline and both experiments
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    rows = {(exp.get("name") or exp["rev"]): exp
            for row in shown for exp in [row] + [e for x in row.get("experiments") or [] for e in x["revs"]]}
    for name in ("lr-high", "more-test", baseline):
        rev = next(r for key, r in rows.items() if key == name or r.get("rev") == name)
        metrics = rev["data"]["metrics"]["pipeline/metrics.json"]["data"]
        assert isinstance(metrics["accuracy"], float | int), (name, metrics)
    # the README's compare command, at 100 columns: the changed params are not cut off
    table = run(["dvc", "exp", "show", "--no-pager", "--only-changed", "--drop", COMPARE_DROP], project,
                COLUMNS="100").stdout
    lines = table.splitlines()
    assert max(map(len, lines)) <= 100, table
    assert any("[lr-high]" in line for line in lines) and any("[more-test]" in line for line in lines), table
    assert "!" not in table and "…" not in table, table
    assert "train.learning_rate" in table and "split.test_fraction" in table and "ci95_low" in table, table

    full = run(["dvc", "exp", "show", "--no-pager"], project, COLUMNS="300").stdout  # every column
    assert "[lr-high]" in full and "[more-test]" in full and "!" not in full

    diff = run(["dvc", "metrics", "diff", "main", "lr-high"], project)
    assert "failed to load" not in diff.stdout + diff.stderr
    out = project / "plots-diff"
    run(["dvc", "plots", "diff", "main", "lr-high", "-o", str(out)], project)
    page = (out / "index.html").read_text()
    for plot_id in ("loss", "accuracy", "confusion"):  # the data plots (vega specs) ...
        assert f'"{plot_id}"' in page
    assert '"rev": "main"' in page and '"rev": "lr-high"' in page  # ... with both revisions' data on one chart
    assert page.count("<img") == 2 * len(PLOTS)  # and the five PNGs of each revision

    run(["git", "checkout", "params.yaml"], project)  # as the README does: back to the committed params
    assert run(["git", "diff", "params.yaml"], project).stdout == ""

    # MLflow: two runs with distinct, meaningful names
    mlflow_client = client(project)
    names = {mlflow_client.get_run(r).info.run_name for r in (run_a, run_b)}
    assert names == {"lr-high", "more-test"}
    assert mlflow_client.get_run(run_b).data.tags["dvc_exp_name"] == "more-test"

    # more-test's version was compared with production on the same images: its test images minus
    # those production trained or validated on, scored by both models
    test = pd.read_csv(project / "data/splits/test.csv")
    seen = set(mlflow_client.download_artifacts(production.run_id, "training_images.txt", str(project / "tmp-seen"))
               and Path(project / "tmp-seen/training_images.txt").read_text().split())
    shared = test[~test["sha256"].isin(seen)]
    assert 0 < len(shared) < len(test)  # some of the new test images were production's training images
    import mlflow

    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}/{production.version}")  # the registered model: photo bytes
    answers = model.predict(pd.DataFrame({"image": [(project / p).read_bytes() for p in shared["path"]]}))
    production_correct = int((answers["label"].to_numpy() == shared["label"].to_numpy()).sum())
    version = mlflow_client.get_model_version(MODEL, mlflow_client.get_run(run_b).data.tags["registered_version"])
    assert (f"on the {len(shared)} of {len(test)} test images that production version {production.version} never "
            f"trained on") in version.description
    assert f"version {production.version} {production_correct} (" in version.description

    # `dvc plots diff`'s page in a 1280 px window (last: it skips without Chromium). DVC sets each
    # revision's PNG at full width in one row; .dvc/plots-page.html has them share the window.
    with browser_page(1280, 900) as page:
        page.route(re.compile(r"^https?://"), lambda route: route.abort())  # vega's CDN: offline here
        page.goto((out / "index.html").as_uri())
        page.wait_for_function("[...document.images].every(image => image.complete && image.naturalWidth > 0)")
        layout = page.evaluate("""() => ({
            width: window.innerWidth, page: document.documentElement.scrollWidth,
            images: [...document.images].map(image => {
                const box = image.getBoundingClientRect();
                return {left: box.left, right: box.right, top: box.top, natural: image.naturalWidth};
            }),
            cut: [...document.querySelectorAll("div")].filter(div => div.scrollWidth > div.clientWidth + 1)
                .map(div => div.id)})""")
        screenshot(page, tmp_path / "plots-diff.png")
    images = layout["images"]
    assert len(images) == 2 * len(PLOTS) and layout["page"] <= layout["width"], layout
    assert all(0 <= image["left"] and image["right"] <= layout["width"] for image in images), layout
    assert not layout["cut"], layout  # no image cut off inside its plot's box either
    assert sum(image["natural"] for image in images[:2]) > layout["width"] or any(  # some pair needed scaling
        a["natural"] + b["natural"] > layout["width"] for a, b in zip(images[::2], images[1::2])), layout
    assert all(a["top"] == b["top"] for a, b in zip(images[::2], images[1::2])), layout  # still side by side


def test_registered_version_carries_a_model_card(tiny_project):
    """The model card is logged inside the registered model, with the test interval and the data hash."""
    import mlflow

    project, _ = tiny_project
    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    version = client(project).get_run(run_info(project)["run_id"]).data.tags["registered_version"]
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{MODEL}/{version}")
    card = (Path(local) / "artifacts" / "model_card.md").read_text()
    metrics = evaluation(project)
    assert f"95 % Wilson interval **[{metrics['accuracy_ci95_low']:.3f}, {metrics['accuracy_ci95_high']:.3f}]**" in card
    assert hashlib.sha256((project / "data/manifest.csv").read_bytes()).hexdigest() in card
    assert "Known limits" in card and "never seen a photo" in card


def test_cv_logs_a_parent_run_with_one_child_per_fold(own_project):
    """`cleanmessy cv` (2 folds x 1 repeat) writes pipeline/cv.json and logs a parent run whose
    children are the folds."""
    project = own_project
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


def test_photos_under_the_sample_models_name_are_registered_but_never_promoted(own_project, tmp_path):
    """Promotion never crosses kinds of data: pointed at a folder of photos without a name of its
    own, the pipeline registers the photo model next to the sample models, but production stays on
    the sample version; the version's description and evaluate's log say why in one line. The
    version carries few tags (the registry's table shows every one) and a plain-text first line."""
    from conftest import labelled_photos

    labelled_photos(tmp_path / "photos", 40, 40)
    set_params(own_project, {"ingest": {"source": str(tmp_path / "photos" / "images")}})
    result = run(["dvc", "repro"], own_project)
    mlflow_client = client(own_project)
    production = mlflow_client.get_model_version_by_alias(MODEL, "production")
    assert str(production.version) == "1" and production.tags["data_family"] == "sample"
    candidate = mlflow_client.get_model_version(MODEL, "2")
    family = f"folder:{tmp_path / 'photos' / 'images'}"
    reason = (f"not promoted: production version 1 was trained on sample, this version on {family}: promotion "
              "never crosses kinds of data (give each its own evaluate.model_name, as experiments/real-photos.yaml "
              "does)")
    assert candidate.description.split("\n\n")[0] == reason
    assert reason in (result.stdout + result.stderr) and "Skipping variable loading" not in result.stderr
    assert set(candidate.tags) == {"data_family", "test_accuracy", "test_images", "git_commit"}
    assert candidate.tags["data_family"] == family and "production" not in candidate.aliases


def test_multi_view_experiment_registers_a_model_that_predict_loads(own_project, tmp_path):
    """A transfer experiment with the logistic head and multi-view TTA (random weights: no
    download) trains, is registered under its own name, and the predict CLI loads it from the
    registry (custom layers included) and classifies the photos."""
    project = own_project
    name = "clean-vs-messy-multiview"
    result = run(["dvc", "exp", "run", "-n", "multiview", "-S", "train.arch=mobilenet", "-S", "train.weights=none",
                  "-S", "train.augment.flip=none", "-S", "train.augment.rotation=0", "-S", "train.head=logistic",
                  "-S", "train.views.regions=[[0.8,2]]", "-S", "train.views.flip=true", "-S",
                  "train.views.normalize=true", "-S", f"evaluate.model_name={name}"], project)
    # The head trained apart (on cached features): the saved model's optimizer never stepped, and
    # Keras would warn on every load that it skips its variables. Loads only predict: not shown.
    assert "Skipping variable loading" not in result.stdout + result.stderr
    # Many changed params: the README's 100-column compare would cut them; its --md form holds them all.
    cut = run(["dvc", "exp", "show", "--no-pager", "--only-changed", "--drop", COMPARE_DROP], project, COLUMNS="100")
    assert "…" in cut.stdout, cut.stdout
    table = run(["dvc", "exp", "show", "--no-pager", "--only-changed", "--drop", COMPARE_DROP, "--md"], project).stdout
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in table.splitlines() if line.startswith("|")]
    header, experiment = rows[0], next(row for row in rows if row[0].endswith("[multiview]"))
    changed = {"train.arch": "mobilenet", "train.weights": "none", "train.augment.flip": "none",
               "train.augment.rotation": "0", "train.head": "logistic", "train.views.regions": "[[0.8,2]]",
               "train.views.flip": "True", "train.views.normalize": "True", "evaluate.model_name": name}
    shown = {key: re.sub(r"[' ]", "", experiment[header.index(key)]) for key in changed if key in header}
    assert shown == changed, table  # (DVC rounds numbers in lists to strings: [['0.8', 2]])
    assert {"accuracy", "ci95_low", "ci95_high"} <= set(header) and "loss" not in header, table
    history = pd.read_csv(project / "pipeline/history.csv")
    assert list(history["phase"]) == ["head"]
    params = client(project).get_run(run_info(project)["run_id"]).data.params
    assert params["train.head"] == "logistic" and params["train.views.regions"] == "[[0.8, 2.0]]"
    photos = sorted((project / "data/images").rglob("*.png"))[:4]
    out = tmp_path / "predictions.csv"
    predicted = run(["cleanmessy", "predict", *map(str, photos), "--model-uri", f"models:/{name}/1", "--out",
                     str(out)], project)
    assert "Skipping variable loading" not in predicted.stdout + predicted.stderr
    frame = pd.read_csv(out, keep_default_na=False)
    assert len(frame) == 4 and (frame["error"] == "").all()
    assert set(frame["label"]) <= {"clean", "messy"}
    assert np.allclose(frame[["clean", "messy"]].sum(axis=1), 1.0, atol=1e-4)


def test_sigterm_marks_the_run_failed_and_the_previous_model_is_evaluated(own_project):
    """A scheduler or `docker stop` sends SIGTERM: train stops with exit 143, its MLflow run is
    FAILED (not RUNNING forever), and the previous model file is untouched (written to a temporary
    name and renamed). The next `evaluate` evaluates that model and logs into the run that trained
    it (a second evaluation there, a second version from it), never into the failed run."""
    import signal
    import subprocess
    import time

    from conftest import tool_env

    project = own_project  # trained, evaluated and registered once by the session's `dvc repro`
    model = project / "pipeline" / "model.keras"
    model_md5 = hashlib.md5(model.read_bytes()).hexdigest()
    mlflow_client = client(project)
    (trained,) = mlflow_client.search_runs(["1"])
    evaluations = len(mlflow_client.get_metric_history(trained.info.run_id, "test_accuracy"))
    versions = len(mlflow_client.search_model_versions(f"run_id='{trained.info.run_id}'"))
    assert (evaluations, versions) == (1, 1)

    set_params(project, {"train": {"epochs": 500, "patience": 500}})
    process = subprocess.Popen(["cleanmessy", "train"], cwd=project, env=tool_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        runs = [r for r in mlflow_client.search_runs(["1"]) if r.info.run_id != trained.info.run_id]
        if runs and mlflow_client.get_metric_history(runs[0].info.run_id, "train_loss"):
            break  # the second training is under way
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 143, output
    assert "cleanmessy train: terminated" in output and "Traceback" not in output
    (failed,) = [r for r in mlflow_client.search_runs(["1"]) if r.info.run_id != trained.info.run_id]
    assert failed.info.status == "FAILED"
    assert hashlib.md5(model.read_bytes()).hexdigest() == model_md5

    run(["cleanmessy", "evaluate"], project)
    assert len(mlflow_client.get_metric_history(trained.info.run_id, "test_accuracy")) == evaluations + 1
    assert len(mlflow_client.search_model_versions(f"run_id='{trained.info.run_id}'")) == versions + 1
    assert "test_accuracy" not in mlflow_client.get_run(failed.info.run_id).data.metrics
    assert not mlflow_client.search_model_versions(f"run_id='{failed.info.run_id}'")


def test_broken_link_in_the_source_is_refused_by_dvc_and_by_ingest_alike(tmp_path):
    """One rule for DVC and ingest: a folder source holding a link to nothing is refused. `dvc
    repro` fails while hashing the source (its own one line naming the link, before ingest
    runs); `cleanmessy ingest` run directly says the same and what to do. Nothing is written."""
    from conftest import copy_project

    project = copy_project(tmp_path / "project", params={"ingest": {"source": "photos"}})
    for i, label in enumerate(["clean", "clean", "messy", "messy"]):
        (project / "photos" / label).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), (40 * i, 90, 160)).save(project / "photos" / label / f"{i}.png")
    (project / "photos/messy/dangling.png").symlink_to(tmp_path / "moved-away.png")

    repro = run(["dvc", "repro", "ingest"], project, check=False)
    assert repro.returncode != 0
    assert "No such file or directory" in repro.stderr and "photos/messy/dangling.png" in repro.stderr
    assert "Traceback" not in repro.stderr + repro.stdout
    direct = run(["cleanmessy", "ingest"], project, check=False)
    assert direct.returncode == 2
    assert direct.stderr.strip().splitlines()[-1].endswith(
        "photos/messy/dangling.png is a broken link (to " + str(tmp_path / "moved-away.png")
        + "); DVC cannot hash a source that holds one: remove the link or restore what it points to")
    assert "Traceback" not in direct.stderr
    assert not (project / "data/images").exists() and not (project / "data/manifest.csv").exists()
