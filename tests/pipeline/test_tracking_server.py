"""The README's team setup: the pipeline against a real `mlflow server` (SQLite backend, proxied
artifacts) on a loopback port, as `MLFLOW_TRACKING_URI=http://127.0.0.1:<port> dvc repro`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import VENV_BIN, copy_project, free_port, run, server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """`mlflow server` as the README starts it; stopped (by its PID) after the module."""
    cwd = tmp_path_factory.mktemp("team")
    folder = cwd / "mlflow-server"
    folder.mkdir()
    port = free_port()
    log = cwd / "server.log"
    url = f"http://127.0.0.1:{port}"
    command = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", "sqlite:///mlflow-server/mlflow.db",
               "--artifacts-destination", "mlflow-server/artifacts", "--host", "127.0.0.1", "--port", str(port)]
    with server(command, cwd, log, f"{url}/health"):  # the README's command, on a free port
        yield url, folder


def test_pipeline_registers_and_serves_through_a_tracking_server(tracking_server, tmp_path):
    """dvc repro trains, logs, registers and promotes on the server (registration needs the
    LoggedModel's id there); nothing lands in the project's own mlruns/; predict loads the
    production version back from the server."""
    url, server_folder = tracking_server
    project = copy_project(tmp_path / "project")
    result = run(["dvc", "repro"], project, MLFLOW_TRACKING_URI=url)
    assert "Traceback" not in result.stderr
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    production = client.get_model_version_by_alias("clean-vs-messy", "production")
    run_id = json.loads((project / "pipeline/mlflow_run.json").read_text())["run_id"]
    assert production.run_id == run_id and production.description.startswith("**promoted")
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED" and "test_accuracy" in mlflow_run.data.metrics
    assert {a.path for a in client.list_artifacts(run_id)} >= {"training_curves.png", "model_card.md"}
    assert not (project / "mlruns" / "mlflow.db").exists()
    assert any(Path(server_folder, "artifacts").rglob("MLmodel"))  # the server holds the artifacts

    photo = sorted((project / "data/images").rglob("*.png"))[0]
    out = tmp_path / "predictions.csv"
    run(["cleanmessy", "predict", str(photo), "--out", str(out)], project, MLFLOW_TRACKING_URI=url)
    assert out.read_text().splitlines()[0].startswith("path,label")


def test_a_workspace_that_ran_locally_moves_to_the_server_with_force(tracking_server, tmp_path):
    """After a local run DVC sees nothing to do, whatever MLFLOW_TRACKING_URI says; `dvc repro
    --force` (as the README says) trains, evaluates and registers again, on the server."""
    url, _ = tracking_server
    project = copy_project(tmp_path / "project", params={"evaluate": {"model_name": "moved-to-server"}})
    run(["dvc", "repro"], project)
    assert "up to date" in run(["dvc", "repro"], project, MLFLOW_TRACKING_URI=url).stdout
    run(["dvc", "repro", "--force"], project, MLFLOW_TRACKING_URI=url)
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    version = client.get_model_version_by_alias("moved-to-server", "production")
    noted = json.loads((project / "pipeline/mlflow_run.json").read_text())
    assert version.run_id == noted["run_id"] and noted["tracking_uri"] == url
    assert client.get_run(noted["run_id"]).data.tags["registered_version"] == str(version.version)
