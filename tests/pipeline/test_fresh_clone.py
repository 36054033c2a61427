"""The README's quick start, as a new user runs it: `make run` on a fresh clone of the committed
repository (its own uv, its own .venv, the default params), then the commands the README shows
next: `dvc metrics show`, `make ui` and `make serve`, looked at in a real browser.

This clones the last commit: uncommitted changes are not in it (CI tests a clean clone anyway)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import (REAL_PHOTOS, REPO, VENV_BIN, browser_page, free_port, requires_real_photos, screenshot, server,
                      tool_env)

pytestmark = pytest.mark.slow


def user_env(clone: Path, activated: bool = False) -> dict[str, str]:
    """A new user's shell: nothing of the test's venv on PATH (optionally the clone's .venv activated)."""
    env = tool_env()
    path = [p for p in env["PATH"].split(os.pathsep) if Path(p) != VENV_BIN]
    if activated:
        path.insert(0, str(clone / ".venv" / "bin"))
    env["PATH"] = os.pathsep.join(path)
    env.pop("VIRTUAL_ENV", None)
    return env


def sh(cmd: str, clone: Path, activated: bool = False, **extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, shell=True, cwd=clone, env={**user_env(clone, activated), **extra},
                            capture_output=True, text=True)
    assert result.returncode == 0, f"{cmd} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A fresh clone on which `make run` has run."""
    folder = tmp_path_factory.mktemp("fresh") / "clean-vs-messy"
    subprocess.run(["git", "clone", "-q", str(REPO), str(folder)], check=True)
    return folder, sh("make run", folder)


def test_make_run_leaves_the_clone_unchanged(clone):
    """The committed outputs are what the pipeline makes: after `make run`, git sees no change
    (dvc.lock, metrics, plots, history: all identical), so the MLflow run is not 'dirty'."""
    folder, result = clone
    assert re.findall(r"Running stage '(\w+)'", result.stdout) == ["ingest", "split", "train", "evaluate", "plot"]
    status = subprocess.run(["git", "status", "--porcelain"], cwd=folder, capture_output=True, text=True).stdout
    assert status == "", status
    store = f"sqlite:///{folder / 'mlruns/mlflow.db'}"
    (mlflow_run,) = MlflowClient(tracking_uri=store).search_runs(["1"])
    assert mlflow_run.data.tags["git_dirty"] == "false"
    assert re.fullmatch(r"seed_cnn-64px-\d{4}-\d{6}", mlflow_run.info.run_name)


def test_output_is_the_projects_own_progress(clone):
    """What the user reads: one line per epoch, no TensorFlow start-up lines, no Keras progress bars,
    no MLflow environment warnings."""
    _, result = clone
    out = result.stdout + result.stderr
    for noise in ("absl::InitializeLog", "oneDNN custom operations", "━━", "Failed to resolve installed pip",
                  "shuffle=True", "UserWarning", "Traceback"):
        assert noise not in out, noise
    assert re.search(r"train: epoch 1/40 +train_", out)


def test_dvc_metrics_show_in_the_activated_venv(clone):
    folder, _ = clone
    table = sh("dvc metrics show", folder, activated=True, COLUMNS="100").stdout
    assert table.splitlines()[0].split() == ["Path", "accuracy", "ci95_high", "ci95_low", "loss", "macro_f1", "roc_auc"]
    assert max(map(len, table.splitlines())) <= 100


def test_dvc_plots_show_writes_the_figures(clone):
    folder, _ = clone
    sh("dvc plots show", folder, activated=True)
    page = (folder / "dvc_plots" / "index.html").read_text()
    assert page.count("<img") == 5 and '"loss"' in page and '"confusion"' in page


def test_dvc_repro_works_without_activating_the_venv(clone):
    """`.venv/bin/dvc repro` with the venv not activated: src/stage.sh finds the project's .venv."""
    folder, _ = clone
    result = sh(".venv/bin/dvc repro --force split", folder)
    assert "Running stage 'split'" in result.stdout
    assert subprocess.run(["git", "status", "--porcelain"], cwd=folder, capture_output=True, text=True).stdout == ""


def test_make_ui_opens_the_experiment_on_its_runs(clone, tmp_path):
    """`make ui` prints the link to the runs table; the browser shows the run there, not MLflow 3's
    empty GenAI page."""
    folder, _ = clone
    port = free_port()
    log = tmp_path / "ui.log"
    with server(f"make ui UI_PORT={port}", folder, log, f"http://127.0.0.1:{port}/health", user_env(folder)):
        link = re.search(r"open (http://\S+)", log.read_text()).group(1)
        assert link.endswith("/runs?workflowType=machine_learning")
        run_name = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlruns/mlflow.db'}").search_runs(["1"])[0].info.run_name
        with browser_page(1400, 900) as page:
            page.goto(link)
            page.get_by_text(run_name).first.wait_for(timeout=60_000)
            time.sleep(1)  # let the table finish drawing before the screenshot
            screenshot(page, tmp_path / "mlflow-runs.png")
            assert "Traces" not in page.locator("main").inner_text()[:200]


def test_make_serve_names_the_training_data(clone, tmp_path):
    """`make serve` serves the production version; its model panel says the model was trained on
    the synthetic sample, not on photos."""
    folder, _ = clone
    port = free_port()
    log = tmp_path / "serve.log"
    with server(f"make serve SERVE_PORT={port}", folder, log, f"http://127.0.0.1:{port}/", user_env(folder)):
        with browser_page() as page:
            page.goto(f"http://127.0.0.1:{port}/")
            panel = page.locator("#model-info")
            panel.wait_for(timeout=30_000)
            assert "embedded synthetic sample" in panel.inner_text()
            screenshot(page, tmp_path / "app.png")


@requires_real_photos
def test_make_real_is_compared_with_the_sample_model_on_real_photos(clone):
    """`make real SOURCE=...` runs the real-photo configuration as a DVC experiment. Its version is
    compared with the production (sample-trained) model on the same real test photos, none of
    which the sample model trained on, and takes production when it gets at least as many right."""
    folder, _ = clone
    sh(f"make real SOURCE={REAL_PHOTOS}", folder, CLEANMESSY_KERAS_WEIGHTS=str(REAL_PHOTOS.parents[1] / "keras-weights"))
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlruns/mlflow.db'}",
                          registry_uri=f"sqlite:///{folder / 'mlruns/mlflow.db'}")
    run_id = json.loads((folder / "pipeline/mlflow_run.json").read_text())["run_id"]
    version = client.get_model_version("clean-vs-messy", client.get_run(run_id).data.tags["registered_version"])
    n_test = len((folder / "data/splits/test.csv").read_text().splitlines()) - 1
    assert (f"on the {n_test} of {n_test} test images that production version 1 never trained on"
            in version.description), version.description
    assert "Trained on photos from the folder" in version.description
    counts = re.search(r"this version got (\d+) right \([^)]*\), version 1 (\d+) \(", version.description)
    candidate, production = map(int, counts.groups())
    accuracy = json.loads((folder / "pipeline/metrics.json").read_text())["accuracy"]
    assert ("production" in version.aliases) == (candidate >= production and accuracy >= 0.8), version.description
    assert "staging" in version.aliases or accuracy < 0.8
