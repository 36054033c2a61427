"""A team's setup with real processes: data and models in a DVC remote shared by two clones, and
experiments queued and run two at a time, each a separate MLflow run in one store."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import copy_project, run

pytestmark = pytest.mark.slow
MODEL = "clean-vs-messy"


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def store(project: Path) -> MlflowClient:
    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_a_teammate_pulls_the_pipeline_from_a_dvc_remote_and_reruns_nothing(tmp_path):
    """As the README's team section: `dvc remote add -d`, `dvc push` after a run; a teammate clones,
    `dvc pull`s, and `dvc status` is clean, `dvc repro` reruns nothing, the model is the same; with
    the team's tracking store the teammate serves the registered model. An experiment goes the other
    way with `dvc exp push` and `dvc exp pull`."""
    remote = tmp_path / "dvc-remote"
    origin = copy_project(tmp_path / "origin")
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], origin)
    run(["dvc", "repro"], origin)
    run(["git", "add", "-A"], origin)
    run(["git", "commit", "-qm", "a run"], origin)
    run(["dvc", "push"], origin)
    team_store = f"sqlite:///{origin / 'mlruns' / 'mlflow.db'}"  # stands in for the team's server

    mate = tmp_path / "mate"
    run(["git", "clone", "-q", str(origin), str(mate)], tmp_path)
    run(["dvc", "pull"], mate)
    assert "Data and pipelines are up to date." in run(["dvc", "status"], mate).stdout
    assert "Running stage" not in run(["dvc", "repro"], mate, MLFLOW_TRACKING_URI=team_store).stdout
    assert md5(mate / "pipeline/model.keras") == md5(origin / "pipeline/model.keras")
    predicted = run(["cleanmessy", "predict", "data/images", "--out", "predictions-mate.csv"], mate,
                    MLFLOW_TRACKING_URI=team_store)
    assert "predict: wrote" in predicted.stderr

    # The teammate's experiment, shared through git (its commit) and the DVC remote (its outputs).
    run(["dvc", "exp", "run", "-n", "mate-lr", "-S", "train.learning_rate=0.003"], mate,
        MLFLOW_TRACKING_URI=team_store)
    run(["dvc", "exp", "push", "origin", "mate-lr"], mate)
    other = tmp_path / "other"
    run(["git", "clone", "-q", str(origin), str(other)], tmp_path)
    run(["dvc", "exp", "pull", "origin", "mate-lr"], other)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], other).stdout)
    experiments = {exp["name"]: exp for rev in shown for exp in (rev.get("experiments") or [])}
    assert "mate-lr" in experiments
    (mate_lr,) = experiments["mate-lr"]["revs"]
    data = mate_lr["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["learning_rate"] == 0.003
    assert isinstance(data["metrics"]["pipeline/metrics.json"]["data"]["accuracy"], float)
    runs = store(origin).search_runs(["1"], "tags.dvc_exp_name = 'mate-lr'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def wait_for_queue(project: Path, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], project, check=False).stdout
        if "Running" not in status and "Queued" not in status:
            return status
        time.sleep(3)
    raise AssertionError(f"the queue did not finish in {timeout} s:\n{status}")


def test_two_queued_experiments_run_at_once_into_one_store(tmp_path):
    """`dvc exp run --queue` twice, `dvc queue start -j 2`: both run at the same time in DVC's
    temporary copies, and both land in the project's one SQLite store (not in the copies DVC
    deletes): two FINISHED runs named after their experiments, overlapping in time, two registered
    versions, no "database is locked"; `dvc exp show` lists both with metrics."""
    project = copy_project(tmp_path / "project")
    run(["dvc", "repro", "split"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "split"], project)
    for name, rate in (("q1", "0.002"), ("q2", "0.003")):
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.learning_rate={rate}"], project)
    run(["dvc", "queue", "start", "-j", "2"], project)
    status = wait_for_queue(project)
    logs = "\n".join(run(["dvc", "queue", "logs", n], project, check=False).stdout for n in ("q1", "q2"))
    assert status.count("Success") == 2, f"{status}\n{logs[-3000:]}"
    assert "database is locked" not in logs

    client = store(project)
    runs = {r.data.tags.get("dvc_exp_name"): r for r in client.search_runs(["1"])}
    assert set(runs) == {"q1", "q2"}
    assert all(r.info.status == "FINISHED" and r.info.run_name in ("q1", "q2") for r in runs.values())
    first, second = sorted(runs.values(), key=lambda r: r.info.start_time)
    assert second.info.start_time < first.info.end_time, "the two experiments did not run at the same time"
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in runs.values())
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    names = {exp["name"] for rev in shown for exp in (rev.get("experiments") or [])}
    assert {"q1", "q2"} <= names
