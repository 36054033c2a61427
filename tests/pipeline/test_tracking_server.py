"""The team setup: the pipeline against a real `mlflow server` with proxied artifacts on a
loopback port, as `MLFLOW_TRACKING_URI=http://127.0.0.1:<port> dvc repro`: backed by SQLite (the
README's command), by a real PostgreSQL (a throwaway cluster made with Debian's initdb/pg_ctl,
logins by password as Debian's default), and with the server's basic-auth logins (docs/team.md).
Every server runs as the docs start it: without MLflow's job runner, its files in the git- and
DVC-ignored `mlflow-server/` of the folder it starts in."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from secrets import token_urlsafe
from urllib.parse import urlsplit

import pytest
from mlflow import MlflowClient

from cleanmessy import tracking

from conftest import (VENV_BIN, copy_project, free_port, job_runner_processes, run, server, serving, set_params,
                      tool_env)

pytestmark = pytest.mark.slow

JOB_RUNNER_OFF = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # as the docs start every server


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """`mlflow server` as the README starts it, in a clone of the project (where a team starts it);
    yields its URL, that folder and the server's process group; stopped after the module."""
    cwd = copy_project(tmp_path_factory.mktemp("team") / "server-clone")
    port = free_port()
    log = cwd.parent / "server.log"
    url = f"http://127.0.0.1:{port}"
    command = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", "sqlite:///mlflow-server/mlflow.db",
               "--artifacts-destination", "mlflow-server/artifacts", "--host", "127.0.0.1", "--port", str(port)]
    with server(command, cwd, log, f"{url}/health", env=tool_env(**JOB_RUNNER_OFF)) as process:  # on a free port
        yield url, cwd, process.pid


@pytest.mark.smoke  # `make test-fast`: this server starts and answers
def test_the_server_runs_without_the_job_runner(tracking_server):
    """MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: none of MLflow's job runner processes (huey) beside
    the server, which otherwise start with it and slow everything on a small machine."""
    _, _, group = tracking_server
    assert job_runner_processes(group) == []


def test_pipeline_registers_and_serves_through_a_tracking_server(tracking_server, tmp_path):
    """dvc repro trains, logs, registers and promotes on the server (registration needs the
    LoggedModel's id there); nothing lands in the project's own mlruns/; predict loads the
    production version back from the server."""
    url, server_clone, _ = tracking_server
    project = copy_project(tmp_path / "project")
    result = run(["dvc", "repro"], project, MLFLOW_TRACKING_URI=url)
    assert "Traceback" not in result.stderr
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    production = client.get_model_version_by_alias("clean-vs-messy", "production")
    run_id = json.loads((project / "pipeline/mlflow_run.json").read_text())["run_id"]
    assert production.run_id == run_id and production.description.startswith("promoted")
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED" and "test_accuracy" in mlflow_run.data.metrics
    assert {a.path for a in client.list_artifacts(run_id)} >= {"training_curves.png", "model_card.md"}
    assert not (project / "mlruns" / "mlflow.db").exists()
    assert any((server_clone / "mlflow-server/artifacts").rglob("MLmodel"))  # the server holds the artifacts
    # evaluate names the runs table (machine-learning view, not MLflow 3's GenAI page) on the server
    link = tracking.runs_page(url, mlflow_run.info.experiment_id)
    assert link.endswith("/runs?workflowType=machine_learning") and link in result.stdout + result.stderr
    # The server's database and artifacts, in the clone it runs in, are neither git's nor DVC's
    assert run(["git", "status", "--porcelain", "--untracked-files=all"], server_clone).stdout == ""
    run(["dvc", "check-ignore", "mlflow-server/mlflow.db"], server_clone)  # exit 1 when not ignored

    photo = sorted((project / "data/images").rglob("*.png"))[0]
    out = tmp_path / "predictions.csv"
    run(["cleanmessy", "predict", str(photo), "--out", str(out)], project, MLFLOW_TRACKING_URI=url)
    assert out.read_text().splitlines()[0].startswith("path,label")


def test_a_workspace_that_ran_locally_moves_to_the_server_with_force(tracking_server, own_project):
    """After a local run DVC sees nothing to do, whatever MLFLOW_TRACKING_URI says; `dvc repro
    --force` (as the README says) trains, evaluates and registers again, on the server."""
    url, _, _ = tracking_server
    project = own_project  # the session's local run, copied; evaluated again under a name of its own
    set_params(project, {"evaluate": {"model_name": "moved-to-server"}})
    assert "Running stage 'train'" not in run(["dvc", "repro"], project).stdout
    assert "up to date" in run(["dvc", "repro"], project, MLFLOW_TRACKING_URI=url).stdout
    forced = run(["dvc", "repro", "--force"], project, MLFLOW_TRACKING_URI=url)
    assert "Running stage 'train'" in forced.stdout
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    version = client.get_model_version_by_alias("moved-to-server", "production")
    noted = json.loads((project / "pipeline/mlflow_run.json").read_text())
    assert version.run_id == noted["run_id"] and noted["tracking_uri"] == url
    assert client.get_run(noted["run_id"]).data.tags["registered_version"] == str(version.version)


def test_a_grid_of_queued_experiments_runs_two_at_a_time_against_the_server(tracking_server, tmp_path):
    """`make grid` with MLFLOW_TRACKING_URI set: both experiments, run at once by DVC's queue, are
    FINISHED runs on the server named after their experiments, each with a registered version;
    nothing lands in the project's own store."""
    url, _, _ = tracking_server
    project = copy_project(tmp_path / "project", params={"evaluate": {"model_name": "grid-on-server"}})
    run(["dvc", "repro", "split"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "split"], project)
    run(["make", "grid", "GRID=train.learning_rate=0.002 train.learning_rate=0.003", "JOBS=2", "UV=/usr/bin/true",
         "RUN="], project, MLFLOW_TRACKING_URI=url)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    names = {exp["name"] for rev in shown for exp in (rev.get("experiments") or [])}
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    versions = client.search_model_versions("name='grid-on-server'")
    runs = [client.get_run(v.run_id) for v in versions]
    assert len(names) == 2 and sorted(r.data.tags["dvc_exp_name"] for r in runs) == sorted(names)
    assert all(r.info.status == "FINISHED" and r.info.run_name in names for r in runs)
    assert not (project / "mlruns" / "mlflow.db").exists()


# ---------------------------------------------------------------- PostgreSQL (docs/team.md)


def postgres_programs() -> Path:
    """Debian's PostgreSQL server programs (not on PATH: in the versioned lib folder)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's postgresql (make test does)")
        pytest.skip("PostgreSQL's initdb is missing (`make test` installs Debian's postgresql)")
    return found[-1].parent


@contextlib.contextmanager
def postgres_cluster() -> Iterator[tuple[int, str]]:
    """A throwaway PostgreSQL cluster on a free loopback port that logs users in by password
    (scram-sha-256, Debian's default), with the user `mlflow` owning an empty database `mlflow`, as
    docs/team.md asks; yields the port and mlflow's password; stopped by its postmaster's PID and
    removed afterwards. PostgreSQL refuses to run as root, so as root it runs as Debian's `postgres`
    user."""
    programs = postgres_programs()
    base = Path(tempfile.mkdtemp(prefix="cleanmessy-pg-"))  # not under pytest's 0700 root-only folders
    as_owner: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    port, data = free_port(), base / "data"
    superuser_password, password = token_urlsafe(16), token_urlsafe(16)  # URI-safe characters
    (base / "superuser-password").write_text(superuser_password + "\n")
    try:
        subprocess.run([*as_owner, str(programs / "initdb"), "-D", str(data), "-U", "postgres", "--auth=scram-sha-256",
                        f"--pwfile={base / 'superuser-password'}", "-E", "UTF8"], check=True, capture_output=True)
        subprocess.run([*as_owner, str(programs / "pg_ctl"), "-D", str(data), "-l", str(base / "postgres.log"), "-w",
                        "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start"],
                       check=True, capture_output=True)
        # `createuser --pwprompt mlflow` and `createdb -O mlflow mlflow`, without the prompt
        subprocess.run([str(programs / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "postgres",
                        "-v", "ON_ERROR_STOP=1", "-c", f"CREATE ROLE mlflow LOGIN PASSWORD '{password}'",
                        "-c", "CREATE DATABASE mlflow OWNER mlflow"],
                       check=True, capture_output=True, env={**os.environ, "PGPASSWORD": superuser_password})
        yield port, password
    finally:
        pid_file = data / "postmaster.pid"
        if pid_file.is_file():
            pid = int(pid_file.read_text().split()[0])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
            for _ in range(100):
                if not pid_file.exists():
                    break
                time.sleep(0.1)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_server(tmp_path_factory):
    """`mlflow server` on PostgreSQL with proxied artifacts, as docs/team.md starts it: the
    password in the database URI. Yields its URL, that URI and the server's process group."""
    cwd = tmp_path_factory.mktemp("team-pg")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with postgres_cluster() as (db_port, password):
        database = f"postgresql://mlflow:{password}@127.0.0.1:{db_port}/mlflow"
        command = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", database,
                   "--artifacts-destination", "mlflow-server/artifacts", "--host", "127.0.0.1", "--port", str(port)]
        with server(command, cwd, cwd / "server.log", f"{url}/health", env=tool_env(**JOB_RUNNER_OFF)) as process:
            yield url, database, process.pid


def test_pipeline_cv_serve_and_predict_through_a_postgresql_backed_server(postgres_server, tmp_path):
    """On a server whose database is PostgreSQL: dvc repro trains, registers and promotes; the run
    names its git commit and its dataset (the manifest); `cleanmessy cv` logs its parent and fold
    runs; `serve` and `predict` load the production version from the server."""
    url, _, group = postgres_server
    assert job_runner_processes(group) == []
    project = copy_project(tmp_path / "project", params={"cv": {"folds": 2, "repeats": 1}})
    run(["dvc", "repro"], project, MLFLOW_TRACKING_URI=url)
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    production = client.get_model_version_by_alias("clean-vs-messy", "production")
    mlflow_run = client.get_run(production.run_id)
    assert mlflow_run.info.status == "FINISHED" and "test_accuracy" in mlflow_run.data.metrics
    assert mlflow_run.data.tags["git_commit"] == run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    assert mlflow_run.inputs.dataset_inputs[0].dataset.digest == mlflow_run.data.tags["data_manifest_sha256"][:32]
    assert len(client.get_metric_history(production.run_id, "train_loss")) >= 1
    assert not (project / "mlruns" / "mlflow.db").exists()

    run(["cleanmessy", "cv"], project, MLFLOW_TRACKING_URI=url)
    cv_runs = client.search_runs([mlflow_run.info.experiment_id], "tags.kind = 'cv_fold'")
    assert len(cv_runs) == 2

    out = tmp_path / "predictions.csv"
    run(["cleanmessy", "predict", "data/images", "--out", str(out)], project, MLFLOW_TRACKING_URI=url)
    assert len(out.read_text().splitlines()) > 10
    from gradio_client import Client

    with serving(project, MLFLOW_TRACKING_URI=url) as app:
        info = Client(app, verbose=False).predict(api_name="/model_info")
    assert info["version"] == production.version and info["stages"] == ["production", "staging"]


def test_a_pgpass_file_can_hold_the_database_password_instead_of_the_uri(postgres_server, tmp_path, monkeypatch):
    """docs/team.md: with the password out of the URI (where `ps` shows it) and in a pgpass file
    (~/.pgpass, or PGPASSFILE as here), MLflow logs in to the same database."""
    _, database, _ = postgres_server
    parts = urlsplit(database)
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:{parts.port}:mlflow:mlflow:{parts.password}\n")
    pgpass.chmod(0o600)  # libpq ignores a pgpass that others can read
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    store = f"postgresql://mlflow@127.0.0.1:{parts.port}/mlflow"
    # The server made the database (every store has MLflow's Default experiment): this login reads it.
    assert "Default" in {e.name for e in MlflowClient(tracking_uri=store).search_experiments()}


# ---------------------------------------------------------------- basic-auth (docs/team.md)


def test_a_server_with_logins_refuses_a_wrong_password_before_tensorflow_loads_and_accepts_the_right_one(tmp_path, monkeypatch):
    """`mlflow server --app-name basic-auth`: a wrong password, or none, is one line, said before
    TensorFlow is imported; with the right MLFLOW_TRACKING_USERNAME/PASSWORD the pipeline registers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    secrets = {"MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-secret",
               "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-pass-for-tests"}
    command = [str(VENV_BIN / "mlflow"), "server", "--app-name", "basic-auth", "--backend-store-uri",
               "sqlite:///mlflow-server/mlflow.db", "--artifacts-destination", "mlflow-server/artifacts",
               "--host", "127.0.0.1", "--port", str(port)]
    (tmp_path / "mlflow-server").mkdir()
    project = copy_project(tmp_path / "project", params={"evaluate": {"model_name": "behind-logins"}})
    with server(command, tmp_path, tmp_path / "server.log", f"{url}/health",
                env=tool_env(**JOB_RUNNER_OFF, **secrets)) as process:
        assert job_runner_processes(process.pid) == []
        for login in ({}, {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "wrong"}):
            # Python lists every module it imports: "before TensorFlow loads" is a fact to read, not a time.
            refused = run(["cleanmessy", "train"], project, check=False, MLFLOW_TRACKING_URI=url,
                          PYTHONPROFILEIMPORTTIME="1", **login)
            imported = {line.rsplit("|", 1)[1].strip() for line in refused.stderr.splitlines()
                        if line.startswith("import time:")}
            assert refused.returncode == 2 and "cleanmessy.cli" in imported and not {"tensorflow", "keras"} & imported
            said = [line for line in refused.stderr.splitlines() if not line.startswith("import time:")]
            assert f"the MLflow tracking server at {url} refused the login of" in "\n".join(said)
            assert "Traceback" not in refused.stderr
        admin = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "admin-pass-for-tests"}
        run(["dvc", "repro"], project, MLFLOW_TRACKING_URI=url, **admin)
        for key, value in admin.items():  # MlflowClient reads the login from the environment
            monkeypatch.setenv(key, value)
        client = MlflowClient(tracking_uri=url, registry_uri=url)
        assert client.get_model_version_by_alias("behind-logins", "production").version == "1"
