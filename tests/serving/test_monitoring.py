"""`cleanmessy monitor` end to end, on the model the session's tiny real pipeline run registered:
folders of photos (like the training photos, real photos, noise), a request log written by the
registered model's own logging, the MLflow monitoring run it logs, exit codes and user mistakes.
Monitoring logs runs, so the module works on a private copy of `tiny_project`."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from cleanmessy.monitor import EXPERIMENT, FIGURE, REPORT
from cleanmessy.sample import render

from conftest import REAL_PHOTOS, clone_project, requires_real_photos, run

pytestmark = pytest.mark.slow
N = 60  # photos a folder: enough for the verdict (monitor.MIN_REQUESTS is 20), quick on 2 cores


@pytest.fixture(scope="module")
def project(tiny_project, tmp_path_factory) -> Path:
    source, _ = tiny_project
    return clone_project(source, tmp_path_factory.mktemp("monitor") / "project")


def like_training(project: Path, folder: Path, n: int = N, first: int = 1000) -> Path:
    """`n` pictures from the generator that made the project's training data, at its size and seed,
    but numbered past the training pictures: photos like the training photos that the model never
    saw. (The tiny project's own test split has 2 photos: too few for a verdict.)"""
    recipe = yaml.safe_load((project / "data/sample/sample.yaml").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        label = ("clean", "messy")[i % 2]
        render(label, first + i, recipe["size"], recipe["seed"]).save(folder / f"{label}_{first + i}.png")
    return folder


def noise(folder: Path, n: int = N, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / f"noise_{i}.png")
    return folder


def real_photos(folder: Path, n: int = N, seed: int = 0) -> Path:
    files = sorted(REAL_PHOTOS.glob("train/*/*.png"))
    folder.mkdir(parents=True, exist_ok=True)
    for i in np.random.default_rng(seed).choice(len(files), min(n, len(files)), replace=False):
        shutil.copy(files[i], folder / f"{files[i].parent.name}_{files[i].name}")
    return folder


def monitor(project: Path, *args: str, check_rc: int | None = 0):
    result = run(["cleanmessy", "monitor", *args], project, check=False)
    if check_rc is not None:
        assert result.returncode == check_rc, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}"
    return result


def monitoring_run(project: Path, run_id: str):
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    found = client.get_run(run_id)
    assert client.get_experiment(found.info.experiment_id).name == EXPERIMENT
    return client, found


def run_id_of(stdout: str) -> str:
    (line,) = [line for line in stdout.splitlines() if "MLflow run " in line]
    return line.split("MLflow run ", 1)[1].split()[0]


def test_photos_like_the_training_photos_are_no_drift(project, tmp_path):
    result = monitor(project, "--photos", str(like_training(project, tmp_path / "like")), "--fail-on-drift")
    verdict = result.stdout.splitlines()[0]
    assert verdict.startswith(f"monitor: no drift — {N} photos"), result.stdout
    assert len(verdict) <= 100
    client, found = monitoring_run(project, run_id_of(result.stdout))
    metrics, tags = found.data.metrics, found.data.tags
    assert {"n", "flag_rate", "expected_flag_rate", "flag_rate_p", "label_mix_p", "mmd", "drift_p",
            "drift"} <= set(metrics), metrics
    assert metrics["n"] == N and metrics["drift"] == 0 and metrics["drift_p"] >= 0.01 / 3
    assert tags["source"] == "photos" and tags["model_name"] == "clean-vs-messy" and tags["model_version"] == "1"
    assert tags["verdict"] == "no drift"
    assert {a.path for a in client.list_artifacts(found.info.run_id)} == {FIGURE, REPORT}
    report = json.loads(Path(client.download_artifacts(found.info.run_id, REPORT, str(tmp_path))).read_text())
    assert report["verdict"] == "no drift" and report["line"] == verdict
    assert [c["name"] for c in report["checks"]] == ["flag_rate", "label_mix", "features"]
    assert Path(client.download_artifacts(found.info.run_id, FIGURE, str(tmp_path))).read_bytes()[:4] == b"\x89PNG"


@requires_real_photos
@pytest.mark.realdata
def test_real_photos_are_drift_for_a_model_trained_on_the_sample(project, tmp_path):
    result = monitor(project, "--photos", str(real_photos(tmp_path / "real")), "--fail-on-drift", check_rc=1)
    verdict = result.stdout.splitlines()[0]
    assert verdict.startswith("monitor: drift — ") and "features differ (MMD p ≤ 0.002)" in verdict, result.stdout
    _, found = monitoring_run(project, run_id_of(result.stdout))
    assert found.data.metrics["drift"] == 1 and found.data.metrics["drift_p"] < 0.01 / 3
    assert found.data.tags["verdict"] == "drift"


def test_noise_is_drift_and_exits_0_without_fail_on_drift(project, tmp_path):
    result = monitor(project, "--photos", str(noise(tmp_path / "noise")), check_rc=0)
    assert result.stdout.startswith("monitor: drift — "), result.stdout
    assert "features differ" in result.stdout.splitlines()[0]


# Writes request-log lines as a server does: the registered model's own `predict` with a request log
# set. Arguments: LOG=FOLDER ..., each folder's files into its log.
LOG_WRITER = """
import sys
from pathlib import Path

import pandas as pd

from cleanmessy import requestlog, tracking
from cleanmessy.monitor import load_model

tracking.connect()
model = load_model("models:/clean-vs-messy@production", classify=True)
classifier = model.classifier
classifier.served_as, classifier.log_source = model.label, "app"
for pair in sys.argv[1:]:
    log, folder = pair.split("=")
    classifier.request_log = requestlog.RequestLog(Path(log))
    files = sorted(Path(folder).iterdir())
    for i in range(0, len(files), 32):
        classifier.predict(None, pd.DataFrame({"image": [f.read_bytes() for f in files[i:i + 32]]}))
print(model.label)
"""


def test_request_log(project, tmp_path):
    """The project's own request log (data/served/requests.jsonl, removed after), written by the model."""
    log, later = project / "data" / "served" / "requests.jsonl", tmp_path / "later.jsonl"
    try:
        check_request_log(project, tmp_path, log, later)
    finally:
        shutil.rmtree(log.parent, ignore_errors=True)


def check_request_log(project: Path, tmp_path: Path, log: Path, later: Path) -> None:
    like = like_training(project, tmp_path / "like", n=40, first=3000)
    other = tmp_path / "other"
    other.mkdir()
    (other / "not-a-photo.png").write_bytes(b"not a photo")  # a request that gets an error
    written = run([sys.executable, "-c", LOG_WRITER, f"{log}={like}", f"{log}={other}",
                   f"{later}={noise(tmp_path / 'noise', n=40)}"], project)
    assert written.stdout.strip().endswith("clean-vs-messy/1")
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 41 and lines[0]["model"] == "clean-vs-messy/1" and len(lines[0]["projection"]) > 2
    # Lines of an older version, and one cut short, before the newest ones.
    older = [{**line, "model": "clean-vs-messy/0"} for line in lines[:5]]
    log.write_text("".join(json.dumps(line) + "\n" for line in [*older, *lines[:20]]) + '{"time": "2026-'
                   + "\n" + "".join(json.dumps(line) + "\n" for line in lines[20:]))

    result = monitor(project)  # the project's request log, by default
    verdict, details = result.stdout.splitlines()[:2]
    assert verdict.startswith("monitor: no drift — 40 photos"), result.stdout
    assert "(lines skipped: 5 of other versions, 1 unreadable)" in details
    assert "1 not classified, left out" in details
    _, found = monitoring_run(project, run_id_of(result.stdout))
    assert found.data.tags["source"] == "log" and found.data.tags["log"] == str(log)
    assert found.data.metrics["n"] == 40 and found.data.metrics["n_errors"] == 1

    # Then the requests are noise: the last 40 lines say drift.
    with log.open("a") as f:
        f.write(later.read_text())
    recent = monitor(project, "--log", str(log), "--last", "40", "--fail-on-drift", check_rc=1)
    assert recent.stdout.startswith("monitor: drift — "), recent.stdout
    assert "the last 40 of 81 requests to clean-vs-messy/1" in recent.stdout

    # --model-uri picks a version's lines; one the registry does not hold is a one-line error.
    gone = monitor(project, "--log", str(log), "--model-uri", "models:/clean-vs-messy/0", check_rc=2)
    assert len(gone.stderr.strip().splitlines()) == 1 and "has no version 0" in gone.stderr


def test_user_mistakes_are_one_line_errors(own_project, tmp_path):
    project = own_project
    missing = monitor(project, check_rc=2)  # no request log in the project yet
    assert missing.stderr.strip().splitlines() == [
        f"cleanmessy monitor: error: no request log at {project / 'data/served/requests.jsonl'}: servers write it "
        "as they classify photos; or compare a folder of photos with --photos DIR"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert monitor(project, "--log", str(empty), check_rc=2).stderr.strip() == (
        f"cleanmessy monitor: error: the request log {empty} holds no requests")
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"model": "clean-vs-messy/99", "label": "clean", "error": ""}) + "\n")
    lines = monitor(project, "--log", str(unknown), check_rc=2).stderr.strip().splitlines()
    assert len(lines) == 1 and "has no version 99 of model 'clean-vs-messy'" in lines[0]
    nameless = tmp_path / "nameless.jsonl"
    nameless.write_text(json.dumps({"model": "", "label": "clean", "error": ""}) + "\n")
    assert "names the model that served it" in monitor(project, "--log", str(nameless), check_rc=2).stderr
    (tmp_path / "no-photos").mkdir()
    assert "no photos in" in monitor(project, "--photos", str(tmp_path / "no-photos"), check_rc=2).stderr
    assert "--last must be at least 1" in monitor(project, "--last", "0", check_rc=2).stderr
