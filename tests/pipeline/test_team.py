"""A team's setup with real processes: data and models in a DVC remote shared by two clones, and
experiments queued and run two at a time, each a separate MLflow run in one store."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import clone_project, copy_project, run

pytestmark = pytest.mark.slow
MODEL = "clean-vs-messy"


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def store(project: Path) -> MlflowClient:
    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_a_teammate_pulls_the_pipeline_from_a_dvc_remote_and_reruns_nothing(tiny_project, tmp_path):
    """As the README's team section: `dvc remote add -d`, `dvc push` after a run (a copy of the
    session's `dvc repro`); a teammate clones, `dvc pull`s, and `dvc status` is clean, `dvc repro`
    reruns nothing, the model is the same; with the team's tracking store the teammate serves the
    registered model. An experiment goes the other way with `dvc exp push` and `dvc exp pull`."""
    remote = tmp_path / "dvc-remote"
    origin = clone_project(tiny_project[0], tmp_path / "origin")
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], origin)
    assert "Data and pipelines are up to date." in run(["dvc", "status"], origin).stdout  # it ran
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


def test_make_grid_runs_two_queued_experiments_at_once_into_one_store(tmp_path):
    """`make grid` (docs/team.md) queues one experiment per change, named after it, and runs them two
    at a time (`dvc queue start -j 2`) in DVC's temporary copies; both land in the project's one
    SQLite store (not in the copies DVC deletes): FINISHED runs with the experiments' names,
    overlapping in time, one registered version each, no "database is locked"; the comparison table
    is printed. The same grid again on the same commit is refused in one line, queueing nothing."""
    project = copy_project(tmp_path / "project")
    run(["dvc", "repro", "split"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "split"], project)
    # This environment's tools instead of a uv-made .venv in the copy (UV=/usr/bin/true: no setup).
    make_grid = ["make", "grid", "GRID=train.learning_rate=0.002 train.learning_rate=0.003", "JOBS=2",
                 "UV=/usr/bin/true", "RUN="]
    grid = run(make_grid, project)
    assert "Task " in grid.stdout, grid.stdout[-3000:]
    status = grid.stdout.split("Task ", 1)[1].split("Worker status", 1)[0]  # `dvc queue status`'s table
    assert status.count("Success") == 2 and "Failed" not in status, grid.stdout[-3000:]
    comparison = grid.stdout.rsplit("Worker status", 1)[1]  # the last command's table, after the status

    names = {"lr-0.002", "lr-0.003"}  # params.exp_name: each experiment named after its change
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    experiments = {exp["name"]: exp for rev in shown for exp in (rev.get("experiments") or [])}
    assert set(experiments) == names
    assert set(run(["dvc", "exp", "ls", "--name-only"], project).stdout.split()) == names
    for name in names:
        assert f"[{name}]" in comparison, comparison  # the printed comparison lists it
        assert "database is locked" not in run(["dvc", "queue", "logs", name], project, check=False).stdout
    client = store(project)
    runs = {r.data.tags.get("dvc_exp_name"): r for r in client.search_runs(["1"])}
    assert set(runs) == names
    assert all(r.info.status == "FINISHED" and r.info.run_name == name for name, r in runs.items())
    first, second = sorted(runs.values(), key=lambda r: r.info.start_time)
    assert second.info.start_time < first.info.end_time, "the two experiments did not run at the same time"
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in runs.values())

    again = run(make_grid, project, check=False)
    assert again.returncode != 0
    refusal = [line for line in again.stderr.splitlines() if line.startswith("cleanmessy exp-name: error:")]
    assert refusal == ["cleanmessy exp-name: error: experiments lr-0.002, lr-0.003 already ran on this commit "
                       f"({run(['git', 'rev-parse', 'HEAD'], project).stdout[:7]}) and `dvc exp "
                       "show` compares them; to run them again, `dvc exp remove lr-0.002 lr-0.003` first"], again.stderr
    assert "Traceback" not in again.stderr and "dvc exp run" not in again.stdout  # refused before queueing any
    assert "Queued" not in run(["dvc", "queue", "status"], project).stdout
