"""The README's quick start, as a new user runs it: `make run` on a fresh clone of the committed
repository (its own uv, its own .venv, the default params), then the commands the README shows
next: `dvc metrics show`, `make ui` and `make serve`, looked at in a real browser.

This clones the last commit: uncommitted changes are not in it (CI tests a clean clone anyway)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from conftest import (REAL_PHOTOS, REPO, VENV_BIN, browser_page, free_port, readme_api_lines, requires_real_photos,
                      screenshot, server, tool_env)

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


# What training writes that git tracks: on a CPU other than the committer's, TensorFlow's kernels
# can round differently, so these may differ from the commit (the README says so). Nothing else may.
TRAINING_OUTPUTS = {"dvc.lock", "pipeline/metrics.json", "pipeline/ood.json", "pipeline/evaluation.json",
                    "pipeline/history.csv",
                    "pipeline/predictions.csv", "pipeline/plots/training_curves.png",
                    "pipeline/plots/confusion_matrix.png", "pipeline/plots/predictions.png",
                    "pipeline/plots/misclassified.png"}
METRIC_TOLERANCE = 0.05  # test accuracy and ROC AUC against the committed ones (3 of the 60 test images)


def git_status(folder: Path) -> set[str]:
    """The tracked files that differ from the commit, and the untracked files git does not ignore."""
    out = subprocess.run(["git", "status", "--porcelain"], cwd=folder, capture_output=True, text=True).stdout
    return {line[3:] for line in out.splitlines()}


def test_make_run_reruns_every_stage_and_touches_only_training_outputs(clone):
    """What the README promises on any CPU: `make run` on a fresh clone runs every stage; git then
    shows at most the training outputs as modified (none on the committer's CPU), with test metrics
    within the stated tolerance of the committed ones; the MLflow run is not 'dirty' either way."""
    folder, result = clone
    assert re.findall(r"Running stage '(\w+)'", result.stdout) == ["ingest", "split", "train", "evaluate", "plot"]
    assert git_status(folder) <= TRAINING_OUTPUTS, git_status(folder) - TRAINING_OUTPUTS
    committed = json.loads(subprocess.run(["git", "show", "HEAD:pipeline/metrics.json"], cwd=folder,
                                          capture_output=True, text=True, check=True).stdout)
    made = json.loads((folder / "pipeline/metrics.json").read_text())
    for name in ("accuracy", "roc_auc"):
        assert abs(made[name] - committed[name]) <= METRIC_TOLERANCE, (name, made[name], committed[name])
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
    header = ["Path", "accuracy", "auroc", "ci95_high", "ci95_low", "flag_in", "flag_out", "roc_auc"]
    assert table.splitlines()[0].split() == header
    assert max(map(len, table.splitlines())) <= 100


def test_dvc_plots_show_writes_the_figures(clone):
    folder, _ = clone
    sh("dvc plots show", folder, activated=True)
    page = (folder / "dvc_plots" / "index.html").read_text()
    assert page.count("<img") == 5 and '"loss"' in page and '"confusion"' in page


def test_dvc_repro_works_without_activating_the_venv(clone):
    """`.venv/bin/dvc repro` with the venv not activated: src/stage.sh finds the project's .venv."""
    folder, _ = clone
    before = git_status(folder)
    result = sh(".venv/bin/dvc repro --force split", folder)
    assert "Running stage 'split'" in result.stdout
    assert git_status(folder) == before  # the same splits again: nothing more to commit


def test_make_ui_opens_the_experiment_on_its_runs(clone, tmp_path):
    """`make ui` prints the link to the runs table; the browser shows the run there, not MLflow 3's
    empty GenAI page."""
    folder, _ = clone
    port = free_port()
    log = tmp_path / "ui.log"
    with server(f"make ui UI_PORT={port}", folder, log, f"http://127.0.0.1:{port}/health", user_env(folder)):
        deadline = time.monotonic() + 30  # `cleanmessy ui` prints the link once its own /health poll answers
        while not (found := re.search(r"open (http://\S+)", log.read_text())):
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        link = found.group(1)
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


def test_make_api_answers_the_readme_request_for_a_photo(clone, tmp_path):
    """The issue's promise: a fresh clone runs `make run`, then `make api`; the README's request
    for a photo (a real one when ../shared has them, else a test picture) answers with the class
    and its probabilities, from the production version as `make api` resolved it at start."""
    folder, _ = clone
    real = sorted(REAL_PHOTOS.rglob("*.png"))[:1] if REAL_PHOTOS.is_dir() else []
    photo = real[0] if real else folder / pd.read_csv(folder / "data/splits/test.csv")["path"].iloc[0]
    (tmp_path / "photo.jpg").write_bytes(photo.read_bytes())  # its format is read from its bytes
    port = free_port()
    lines = readme_api_lines()
    assert lines[0] == "make api"
    with server(f"make api API_PORT={port}", folder, tmp_path / "api.log", f"http://127.0.0.1:{port}/ping",
                user_env(folder)):
        script = "\n".join(line.replace("127.0.0.1:5001", f"127.0.0.1:{port}") for line in lines[1:])
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 60  # `make api` prints its line once its own /ping poll answers
        while "serving models:/" not in (ready := (tmp_path / "api.log").read_text()):
            assert time.monotonic() < deadline, ready[-3000:]
            time.sleep(0.2)
    (row,) = json.loads(result.stdout)["predictions"]
    assert row["error"] == "" and row["label"] in ("clean", "messy"), row
    assert row["clean"] + row["messy"] == pytest.approx(1.0, abs=1e-5)
    assert "serving models:/clean-vs-messy/1 on " in ready and "resolved at start" in ready


def test_make_serve_with_feedback_flags_a_real_photo_and_dvc_repro_learns_its_correction(clone, tmp_path):
    """Issue 20's promise on a fresh clone after `make run`: `make serve FEEDBACK=on`; a real room
    photo (generated noise where ../shared has none) gets the persistent "unlike the photos this
    model was trained on" warning beside its label, and is logged; its correction, clicked in the
    browser, is kept under data/feedback/<label>/; the next `make run` (`dvc repro`) reruns ingest
    and train, and the photo is in the training data's manifest."""
    import hashlib

    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect

    from cleanmessy import requestlog

    folder, _ = clone
    real = sorted(REAL_PHOTOS.rglob("*.png")) if REAL_PHOTOS.is_dir() else []
    if real:
        photo, label = real[0], real[0].parent.name
    else:
        photo, label = tmp_path / "noise.png", "messy"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(photo)
    digest = hashlib.sha256(photo.read_bytes()).hexdigest()
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with server(f"make serve SERVE_PORT={port} FEEDBACK=on", folder, tmp_path / "serve.log", url, user_env(folder)):
        with browser_page() as page:
            page.goto(url)
            expect(page.locator("#model-info")).to_contain_text("clean-vs-messy", timeout=30_000)
            page.locator("#photo input[type=file]").set_input_files(str(photo))
            page.locator("#classify").click()
            familiar = page.locator("#familiarity")
            expect(familiar).to_contain_text("Unlike the photos this model was trained on; don't trust this label",
                                             timeout=30_000)
            assert "unfamiliar" in (familiar.get_attribute("class") or "")
            page.wait_for_timeout(3000)  # a toast would be gone by now: the warning stays beside the label
            expect(familiar).to_be_visible()
            screenshot(page, tmp_path / "unfamiliar.png")
            page.locator(f"#feedback-{label}").click()
            expect(page.locator("#feedback-status")).to_contain_text(f"data/feedback/{label}/{digest}.png",
                                                                     timeout=30_000)
    assert (folder / f"data/feedback/{label}/{digest}.png").read_bytes() == photo.read_bytes()
    records, _ = requestlog.read(folder / requestlog.DEFAULT_PATH)
    (line,) = [r for r in records if r["sha256"] == digest and r["source"] == "app"]  # (REST had it too)
    assert line["unfamiliar"] is True and line["model"] == "clean-vs-messy/1"

    # The README's monitoring lines, as they are: the log's one request is not enough to judge; a
    # folder of 30 real photos (noise without ../shared) is drift for the sample-trained model.
    monitored = sh("cleanmessy monitor", folder, activated=True)
    assert monitored.stdout.startswith("monitor: not enough data — "), monitored.stdout  # the requests so far
    new = folder / "new-photos"
    new.mkdir()
    for i, source in enumerate(real[::6][:30]):
        (new / f"{i}.png").write_bytes(source.read_bytes())
    for i in range(0 if real else 30):
        pixels = np.random.default_rng(i).integers(0, 256, (96, 96, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(new / f"{i}.png")
    drift = subprocess.run("cleanmessy monitor --photos new-photos/ --fail-on-drift", shell=True, cwd=folder,
                           env=user_env(folder, activated=True), capture_output=True, text=True)
    assert drift.returncode == 1 and drift.stdout.startswith("monitor: drift — "), drift.stdout + drift.stderr
    assert "experiment clean-vs-messy-monitoring" in drift.stdout
    shutil.rmtree(new)

    result = sh("make run", folder)
    ran = re.findall(r"Running stage '(\w+)'", result.stdout)
    assert {"ingest", "train"} <= set(ran), result.stdout[-3000:]
    manifest = pd.read_csv(folder / "data/manifest.csv")
    (row,) = manifest[manifest["sha256"] == digest].itertuples()
    assert row.label == label
    report = json.loads((folder / "data/ingest_report.json").read_text())
    assert report["feedback"]["used"] == 1


@requires_real_photos
def test_readme_sequence_leaves_the_photo_model_in_production(clone, tmp_path):
    """The README in order, as a new user walks it: `make run` (the fixture), `make real` on the real
    photos, back to the committed params (`git checkout params.yaml`), then `make grid` on the sample.
    Photo models have their own registered model (experiments/real-photos.yaml), where the photo
    model stays in production; the grid's sample model is compared with sample models only. Each
    experiment is named after what it changes, and `cleanmessy predict` says what its model knows."""
    folder, _ = clone
    store = f"sqlite:///{folder / 'mlruns/mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    sample_production = client.get_model_version_by_alias("clean-vs-messy", "production")  # make run's

    weights = str(REAL_PHOTOS.parents[1] / "keras-weights")
    sh(f"make real SOURCE={REAL_PHOTOS}", folder, CLEANMESSY_KERAS_WEIGHTS=weights)
    real_run = client.get_run(json.loads((folder / "pipeline/mlflow_run.json").read_text())["run_id"])
    assert real_run.info.run_name == "real-clean-messy-mobilenet_v2-224"
    photos = client.get_model_version_by_alias("clean-vs-messy-photos", "production")
    assert photos.run_id == real_run.info.run_id and photos.tags["data_family"] == f"folder:{REAL_PHOTOS}"
    assert photos.description.startswith("promoted: ") and "first production version" in photos.description
    assert "Trained on photos from the folder" in photos.description

    sh("git checkout params.yaml", folder)
    sh('make grid GRID="train.epochs=2" JOBS=1', folder)  # a short sample run: its data family is the point
    (grid_run,) = [r for r in client.search_runs(["1"]) if r.info.run_name == "epochs-2"]
    grid_version = client.get_model_version("clean-vs-messy", grid_run.data.tags["registered_version"])
    assert grid_version.tags["data_family"] == "sample"
    assert f"production version {sample_production.version}" in grid_version.description.splitlines()[0]
    # The photo model is still production of its own name, the only version there.
    assert client.get_model_version_by_alias("clean-vs-messy-photos", "production").version == photos.version
    assert len(client.search_model_versions("name='clean-vs-messy-photos'")) == 1

    some = sorted(REAL_PHOTOS.rglob("*.png"))[::9][:20]  # 20 photos of both classes
    out = tmp_path / "photos.csv"
    result = sh(f"cleanmessy predict {' '.join(map(str, some))} --model-name clean-vs-messy-photos --out {out}",
                folder, activated=True)
    assert "warning" not in result.stderr
    frame = pd.read_csv(out, keep_default_na=False)
    assert set(frame["trained_on"]) == {f"folder:{REAL_PHOTOS}"} and (frame["error"] == "").all()
    assert set(frame["model"]) == {f"models:/clean-vs-messy-photos/{photos.version}"}
    # The REST API serves the same photo model and gives the same answers (issue 19: to 1e-6).
    port = free_port()
    with server(f"cleanmessy api --model-name clean-vs-messy-photos --port {port}", folder, tmp_path / "api.log",
                f"http://127.0.0.1:{port}/ping", user_env(folder, activated=True)):
        request = {"dataframe_split": {"columns": ["image"],
                                       "data": [[base64.b64encode(p.read_bytes()).decode()] for p in some]}}
        answer = urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", json.dumps(request).encode(),
            {"Content-Type": "application/json"}), timeout=300)
        rows = json.loads(answer.read())["predictions"]
    assert [r["label"] for r in rows] == list(frame["label"]) and all(r["error"] == "" for r in rows)
    for name in ("clean", "messy"):
        assert [r[name] for r in rows] == pytest.approx(list(frame[name]), abs=1e-6)
    # The workspace's params are the committed ones again: `predict` serves the sample model, and says so.
    result = sh(f"cleanmessy predict {some[0]}", folder, activated=True)
    assert "predict: warning: models:/clean-vs-messy/" in result.stderr and "Not trained on photos" in result.stderr

    # The app on the photo model: no sample warning, and its examples are test photos of its own data
    # (the workspace still holds make real's data: the grid ran in DVC's own copy).
    port = free_port()
    with server(f"cleanmessy serve --model-name clean-vs-messy-photos --port {port}", folder, tmp_path / "serve.log",
                f"http://127.0.0.1:{port}/", user_env(folder, activated=True)):
        with browser_page() as page:
            page.goto(f"http://127.0.0.1:{port}/")
            panel = page.locator("#model-info")
            panel.wait_for(timeout=30_000)
            assert f"version {photos.version} · stage: production, staging" in panel.inner_text()
            assert "Trained on photos from the folder" in panel.inner_text()
            assert not page.locator("#data-warning").is_visible()
            gallery = page.get_by_text("Examples (test photos of the model's own data)")
            gallery.wait_for(timeout=30_000)
            screenshot(page, tmp_path / "app-photos.png")
