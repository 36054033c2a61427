"""A real two-worker MultiWorkerMirroredStrategy training on loopback, as README "Scaling out"
runs it: the chief runs `dvc repro` and a second worker, in its own clone of the project, runs
`cleanmessy train`, each with its TF_CONFIG."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import VENV_BIN, clone_project, fingerprint, free_port, run, set_params, tool_env

pytestmark = pytest.mark.slow
TIME_LIMIT = 420  # seconds for both workers; a worker that never meets the other would wait forever


def start(cmd: list[str], cwd, tf_config: dict, log) -> subprocess.Popen:
    env = tool_env(TF_CONFIG=json.dumps(tf_config))
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def run_workers(commands: list[tuple[list[str], Path]], tmp_path: Path) -> tuple[list[int], list[str], list[int]]:
    """Start one process per (command, folder), each with its TF_CONFIG task index, on free loopback
    ports; wait for all (killed past TIME_LIMIT). Their exit codes, outputs and ports."""
    ports = [free_port() for _ in commands]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    logs = [(tmp_path / f"worker{i}.log").open("w") for i in range(len(commands))]
    started = time.monotonic()
    workers = [start(cmd, cwd, {"cluster": cluster, "task": {"type": "worker", "index": i}}, logs[i])
               for i, (cmd, cwd) in enumerate(commands)]
    try:
        codes = [w.wait(timeout=max(1, TIME_LIMIT - (time.monotonic() - started))) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
        for log in logs:
            log.close()
    return codes, [(tmp_path / f"worker{i}.log").read_text() for i in range(len(commands))], ports


def test_two_workers_train_one_model_logged_as_one_run_by_the_chief(own_project, tmp_path):
    chief_dir = own_project
    set_params(chief_dir, {"train": {"distribute": "multi_worker", "epochs": 2}})
    run(["git", "commit", "-qam", "train on two workers"], chief_dir)
    worker_dir = clone_project(chief_dir, tmp_path / "worker")  # the second machine's clone, data pulled
    untouched = fingerprint(worker_dir)
    store = MlflowClient(tracking_uri=f"sqlite:///{chief_dir / 'mlruns' / 'mlflow.db'}")
    runs_before = {r.info.run_id for r in store.search_runs(["1"])}

    codes, output, ports = run_workers([(["dvc", "repro"], chief_dir),
                                        ([str(VENV_BIN / "cleanmessy"), "train"], worker_dir)], tmp_path)
    assert codes == [0, 0], f"exit codes {codes}\n--- chief\n{output[0][-4000:]}\n--- worker 1\n{output[1][-4000:]}"

    # The chief: one new run, FINISHED, trained on 2 replicas, with the model and its evaluation.
    new = [r for r in store.search_runs(["1"]) if r.info.run_id not in runs_before]
    assert len(new) == 1, f"{len(new)} new MLflow runs: only the chief logs"
    (trained,) = new
    assert trained.info.status == "FINISHED"
    assert trained.data.params["replicas"] == "2" and trained.data.params["train.distribute"] == "multi_worker"
    assert "test_accuracy" in trained.data.metrics and 1 <= trained.data.metrics["train_epochs_run"] <= 2
    assert "2 replicas on 2 worker(s)" in output[0]
    status = run(["dvc", "status"], chief_dir).stdout
    assert "Data and pipelines are up to date" in status, status
    # The other worker: trained its shard in lockstep, wrote nothing, logged nothing.
    assert "worker 1 of 2" in output[1] and "worker 1 of 2 done" in output[1]
    assert fingerprint(worker_dir) == untouched
    # Both processes are gone (waited for above), and nothing listens on their ports any more.
    for port in ports:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_workers_with_different_inputs_all_stop_with_one_line_and_log_nothing(own_project, tmp_path):
    """A worker left on other params (or other splits) would stall the others or fail with
    TensorFlow's trace; every worker says so in one line instead, before any run is opened."""
    chief_dir = own_project
    set_params(chief_dir, {"train": {"distribute": "multi_worker", "epochs": 1}})
    worker_dir = clone_project(chief_dir, tmp_path / "worker")
    set_params(worker_dir, {"train": {"learning_rate": 0.002}})
    store = MlflowClient(tracking_uri=f"sqlite:///{chief_dir / 'mlruns' / 'mlflow.db'}")
    runs_before = len(store.search_runs(["1"]))
    train = [str(VENV_BIN / "cleanmessy"), "train"]
    codes, output, _ = run_workers([(train, chief_dir), (train, worker_dir)], tmp_path)
    assert codes == [2, 2], f"exit codes {codes}\n{output[0][-3000:]}\n{output[1][-3000:]}"
    said = ("cleanmessy train: error: the workers' inputs differ (params.yaml's base/train, or data/splits): give "
            'every worker the same commit and data (git pull, dvc pull); see README "Scaling out"')
    for text in output:
        assert [line for line in text.splitlines() if "error" in line.lower()] == [said], text
        assert "Traceback" not in text
    assert len(store.search_runs(["1"])) == runs_before
