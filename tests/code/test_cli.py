"""The command line as a user meets it first: help and argument mistakes answer at once, without
loading TensorFlow or MLflow (importing TensorFlow alone takes 7-13 s)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("tensorflow", "keras", "mlflow", "gradio", "sklearn", "matplotlib")

# Runs the CLI in a fresh interpreter and reports which heavy packages it imported.
PROBE = """
import sys
from cleanmessy.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as exc:
    status = exc.code
heavy = sorted({m.split('.')[0] for m in sys.modules} & set(HEAVY_NAMES))
print('HEAVY=' + ','.join(heavy), file=sys.stderr)
sys.exit(status)
""".replace("HEAVY_NAMES", repr(HEAVY))


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=cwd)


def heavy_modules(result: subprocess.CompletedProcess) -> str:
    return result.stderr.rsplit("HEAVY=", 1)[1].strip()


@pytest.mark.parametrize("args", [["--help"], ["predict", "--help"], ["serve", "--help"], ["train", "--help"],
                                  ["ui", "--help"], ["api", "--help"]])
def test_help_loads_no_heavy_package(args):
    result = cli(*args)
    assert result.returncode == 0 and "usage: cleanmessy" in result.stdout
    assert heavy_modules(result) == ""


@pytest.mark.parametrize(("args", "message"), [
    (["predict"], "the following arguments are required: PATH"),
    (["nonsense"], "invalid choice: 'nonsense'"),
    (["serve", "--port", "eighty"], "invalid int value: 'eighty'"),
    (["predict", "x.jpg", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["predict", "x.jpg", "--out", "/no/such/folder/out.csv"], "folder /no/such/folder does not exist"),
])
def test_argument_mistakes_are_one_line_and_load_no_heavy_package(args, message, tmp_path):
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert heavy_modules(result) == ""


def test_exp_flags_outside_a_project_is_a_clear_error(tmp_path):
    result = cli("exp-flags", "experiments/real-photos.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "no Clean vs Messy project found" in result.stderr


def test_exp_name_prints_the_grids_names_and_refuses_one_this_commit_has(tmp_path):
    """`cleanmessy exp-name --each` (make grid's first step) prints one name per change, loading no
    heavy package; a name that an experiment of the current commit has (DVC's ref
    refs/exps/<commit[:2]>/<commit[2:]>/<name>), or two changes with one name, is one line, exit 2."""
    import shutil

    from conftest import REPO, run

    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    run(["git", "init", "-q", "-b", "main"], tmp_path)
    run(["git", "add", "-A"], tmp_path)
    run(["git", "commit", "-qm", "base"], tmp_path)
    grid = ["exp-name", "--each", "-S", "train.learning_rate=0.002", "-S", "split.test_fraction=0.3"]
    result = cli(*grid, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.split() == ["lr-0.002", "test_fraction-0.3"], result.stderr
    assert heavy_modules(result) == ""

    commit = run(["git", "rev-parse", "HEAD"], tmp_path).stdout.strip()
    run(["git", "update-ref", f"refs/exps/{commit[:2]}/{commit[2:]}/test_fraction-0.3", "HEAD"], tmp_path)
    result = cli(*grid, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[0] == (
        f"cleanmessy exp-name: error: experiment test_fraction-0.3 already ran on this commit ({commit[:7]}) and "
        "`dvc exp show` compares it; to run it again, `dvc exp remove test_fraction-0.3` first")

    result = cli("exp-name", "--each", "-S", "train.learning_rate=0.001", "-S", "train.learning_rate=1e-3",
                 cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.splitlines()[0] == (
        "cleanmessy exp-name: error: `-S train.learning_rate=0.001` and `-S train.learning_rate=1e-3` would both be "
        "named lr-0.001: change one of them")


def test_stage_launcher_without_cleanmessy_gives_a_hint(tmp_path):
    """`dvc repro` from a shell where cleanmessy is not installed (no active env, no .venv/):
    src/stage.sh says how to set up, exit 127, instead of the shell's bare 'command not found'."""
    from conftest import REPO

    result = subprocess.run(["sh", str(REPO / "src" / "stage.sh"), "split"], cwd=tmp_path, capture_output=True,
                            text=True, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 127
    assert "cleanmessy is not installed here: run `make setup`, then `source .venv/bin/activate`" in result.stderr


def test_ui_refuses_a_remote_tracking_server(tmp_path, monkeypatch):
    """`cleanmessy ui` serves the project's own store; with MLFLOW_TRACKING_URI set it says to open
    that server's UI instead."""
    from conftest import REPO

    result = subprocess.run([sys.executable, "-c", PROBE, "ui"], cwd=REPO, capture_output=True, text=True,
                            env={**__import__("os").environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert result.returncode == 2
    assert "MLFLOW_TRACKING_URI is set (http://127.0.0.1:9): open that server's UI" in result.stderr


def test_unreachable_tracking_server_fails_in_seconds_before_tensorflow(tmp_path):
    """MLFLOW_TRACKING_URI naming a port where nobody listens: one line, exit 2, within seconds,
    without loading TensorFlow (MLflow alone would retry for minutes, then print tracebacks)."""
    import socket
    import time

    from conftest import REPO

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", PROBE, "train"], cwd=REPO, capture_output=True, text=True,
                            env={**__import__("os").environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    assert time.monotonic() - started < 15
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"the MLflow tracking server at http://127.0.0.1:{port} does not answer" in result.stderr
    assert "tensorflow" not in heavy_modules(result)


@pytest.mark.parametrize(("uri", "message"), [
    ("htp://127.0.0.1:5000", "MLFLOW_TRACKING_URI=htp://127.0.0.1:5000 is not a tracking store"),
    ("127.0.0.1:5000", "MLFLOW_TRACKING_URI=127.0.0.1:5000 is not a tracking store"),
])
def test_a_tracking_uri_typo_is_one_line_for_training_and_serving(uri, message):
    """A typo in MLFLOW_TRACKING_URI stops train and predict with one line, before TensorFlow."""
    from conftest import REPO

    for command in (["train"], ["predict", "README.md"]):
        result = subprocess.run([sys.executable, "-c", PROBE, *command], cwd=REPO, capture_output=True, text=True,
                                env={**__import__("os").environ, "MLFLOW_TRACKING_URI": uri})
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
        assert "tensorflow" not in heavy_modules(result)


def test_read_only_local_store_is_one_line(tmp_path):
    """mlruns/mlflow.db that cannot be written (here made immutable with chattr, which stops root
    too): train says so in one line before loading TensorFlow, instead of MLflow's traceback."""
    import shutil
    import sqlite3

    from conftest import copy_project, tool_env

    if not shutil.which("chattr"):
        pytest.skip("chattr (e2fsprogs) is not installed")
    project = copy_project(tmp_path / "project")
    db = project / "mlruns" / "mlflow.db"
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE t (x INTEGER)")
    subprocess.run(["chattr", "+i", str(db)], check=True)
    try:
        # tool_env: no MLFLOW_TRACKING_URI that an earlier test's MLflow calls exported into this process
        result = subprocess.run([sys.executable, "-c", PROBE, "train"], cwd=project, capture_output=True, text=True,
                                env=tool_env())
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"the MLflow store {db} cannot be written (attempt to write a readonly database)" in result.stderr
    assert "tensorflow" not in heavy_modules(result)


def test_check_removes_what_a_killed_ingest_left_unless_an_ingest_runs(tmp_path):
    """SIGKILL leaves ingest's temporary outputs (data/.images.partial, ...) and its scratch folder;
    `cleanmessy check` (run by `make run`) removes them, one line each, but not while an ingest
    holds data/.ingest.lock; such an ingest refuses a second one in one line."""
    import shutil

    from cleanmessy.errors import UserError
    from cleanmessy.params import Params
    from cleanmessy.project import Paths
    from cleanmessy.stages import ingest

    from conftest import REPO

    project = tmp_path / "project"
    (project / "data" / ".images.partial" / "clean").mkdir(parents=True)
    (project / "data" / ".images.partial" / "clean" / "a.png").write_bytes(b"x" * 1000)
    (project / "data" / ".manifest.csv.partial").write_text("path,label\n")
    (project / ".dvc" / "tmp" / "ingest-k1ll3d").mkdir(parents=True)
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    with ingest.running(Paths(project)) as free:  # an ingest is running
        assert free
        held = cli("check", cwd=project)
        assert held.returncode == 0 and held.stderr == "HEAVY=\n" and (project / "data" / ".images.partial").is_dir()
        with pytest.raises(UserError, match=r"^another ingest is running in this project \(it holds "
                                            r"data/.ingest.lock\); wait for it to finish$"):
            ingest.main(Paths(project), Params())
    cleaned = cli("check", cwd=project)
    assert cleaned.returncode == 0 and cleaned.stderr.splitlines()[:3] == [
        f"cleanmessy check: removed {name}, left by an ingest that was killed"
        for name in ("data/.images.partial", "data/.manifest.csv.partial", ".dvc/tmp/ingest-k1ll3d")]
    assert sorted(p.name for p in (project / "data").iterdir()) == [".ingest.lock"]
    assert list((project / ".dvc" / "tmp").iterdir()) == []


def test_check_catches_what_dvc_would_choke_on_before_dvc_runs(tmp_path):
    """`make run` runs `cleanmessy check` before `dvc repro`: an alias bomb in params.yaml (DVC
    itself took gigabytes on one) and a named pipe in the folder source (DVC waits on it forever)
    are one line each, exit 2, in well under a second and without TensorFlow. All well: silent."""
    import os
    import shutil

    from conftest import REPO

    project = tmp_path / "project"
    (project / "photos" / "clean").mkdir(parents=True)
    (project / "photos" / "messy").mkdir()
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    params = (REPO / "params.yaml").read_text().replace("source: data/sample", "source: photos")
    (project / "params.yaml").write_text(params)
    ok = cli("check", cwd=project)
    assert ok.returncode == 0 and ok.stdout == "" and ok.stderr == "HEAVY=\n", ok.stderr
    os.mkfifo(project / "photos" / "clean" / "pipe.png")
    piped = cli("check", cwd=project)
    assert piped.returncode == 2 and piped.stderr.count("\n") == 2, piped.stderr  # its line, the probe's
    assert "pipe.png is a named pipe, not a photo" in piped.stderr and "tensorflow" not in heavy_modules(piped)
    (project / "photos" / "clean" / "pipe.png").unlink()
    bomb = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"b{i}: &b{i} [{', '.join([f'*b{i - 1}' if i else '*a'] * 9)}]\n" for i in range(8))
    (project / "params.yaml").write_text(params + bomb)
    bombed = cli("check", cwd=project)
    assert bombed.returncode == 2 and "YAML aliases (*name) are not allowed" in bombed.stderr
    assert len(bombed.stderr) < 400
