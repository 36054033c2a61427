"""Every command the README (and docs/team.md, its team manual) shows is run by a test. This maps
each command line of their ```bash blocks to the test file that runs it and a snippet proving it
does: a documented command with no entry here (or an entry whose test no longer runs it) fails, so
no documented path goes unchecked. The tests named here assert what the docs say of each
command's outcome."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PIPELINE = "tests/pipeline/test_dvc_pipeline.py"
FRESH = "tests/pipeline/test_fresh_clone.py"
SERVER = "tests/pipeline/test_tracking_server.py"
SERVING = "tests/serving/test_serving.py"
API = "tests/serving/test_api.py"
TEAM = "tests/pipeline/test_team.py"
WORKERS = "tests/pipeline/test_distribute_workers.py"
MANUALS = ("README.md", "docs/team.md")

# README command -> (file that runs it, text in that file showing it runs it)
TESTED = {
    "make run": (FRESH, 'sh("make run"'),
    "make test": (".ci/run", "make test"),
    # collected, not run, by its test (running it would run the suite inside the suite)
    "make test-fast": ("tests/test_readme.py", '["make", "-n", "test-fast", "UV=/usr/bin/true"]'),
    "source .venv/bin/activate": (FRESH, "activated=True"),
    "dvc metrics show": (FRESH, 'sh("dvc metrics show"'),
    "dvc plots show": (FRESH, 'sh("dvc plots show"'),
    "dvc params diff": (PIPELINE, '["dvc", "params", "diff"'),
    "make ui": (FRESH, 'f"make ui UI_PORT='),
    "dvc exp run -n lr-high -S train.learning_rate=0.002":
        (PIPELINE, '["dvc", "exp", "run", "-n", "lr-high", "-S", "train.learning_rate=0.002"]'),
    "dvc exp run -n more-test -S split.test_fraction=0.3":
        (PIPELINE, '["dvc", "exp", "run", "-n", "more-test", "-S", "split.test_fraction=0.3"]'),
    "dvc exp show --only-changed --drop 'Created|.*/|roc_auc|auroc|flag_.*'":
        (PIPELINE, 'COMPARE_DROP = "Created|.*/|roc_auc|auroc|flag_.*"'),
    "dvc exp show --only-changed --drop 'Created|.*/|roc_auc|auroc|flag_.*' --md":
        (PIPELINE, '"--only-changed", "--drop", COMPARE_DROP, "--md"], project)'),
    "dvc exp show": (PIPELINE, '["dvc", "exp", "show", "--no-pager"], project, COLUMNS="300"'),
    "dvc metrics diff main lr-high": (PIPELINE, '["dvc", "metrics", "diff", "main", "lr-high"]'),
    "dvc plots diff main lr-high": (PIPELINE, '["dvc", "plots", "diff", "main", "lr-high"'),
    "git checkout params.yaml": (PIPELINE, '["git", "checkout", "params.yaml"]'),
    "make real SOURCE=path/to/photos": (FRESH, 'f"make real SOURCE={REAL_PHOTOS}"'),
    "cleanmessy cv": (PIPELINE, '["cleanmessy", "cv"]'),
    "make serve": (FRESH, 'f"make serve SERVE_PORT='),
    "make serve FEEDBACK=on": (FRESH, 'f"make serve SERVE_PORT={port} FEEDBACK=on"'),
    "cleanmessy monitor": (FRESH, 'sh("cleanmessy monitor", folder, activated=True)'),
    "cleanmessy monitor --photos new-photos/ --fail-on-drift":
        (FRESH, '"cleanmessy monitor --photos new-photos/ --fail-on-drift"'),
    "make docker": ("tests/serving/test_docker.py", 'MAKE_DOCKER = ["make", "docker", '),
    "cleanmessy serve --stage staging": (SERVING, 'serving(project, "--stage", "staging")'),
    "cleanmessy predict photos/ --out predictions.csv":
        (SERVING, '["cleanmessy", "predict", str(folder), "--out", str(out)]'),
    # the README's REST API block: the module's server runs `make api`'s recipe, a test runs the other two as they are
    "make api": (API, 'api_server(["make", "-o", "setup", "api", "RUN=", f"API_PORT={port}"]'),
    "printf '{\"dataframe_split\": {\"columns\": [\"image\"], \"data\": [[\"%s\"]]}}' \"$(base64 -w0 photo.jpg)\" "
    "> request.json": (API, 'script = "\\n".join(line.replace("127.0.0.1:5001"'),
    "curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d @request.json":
        (API, 'script = "\\n".join(line.replace("127.0.0.1:5001"'),
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server --backend-store-uri sqlite:///mlflow-server/mlflow.db "
    "--artifacts-destination mlflow-server/artifacts --host 127.0.0.1 --port 5050":
        (SERVER, '"server", "--backend-store-uri", "sqlite:///mlflow-server/mlflow.db",\n'
                 '               "--artifacts-destination", "mlflow-server/artifacts", "--host", "127.0.0.1", '
                 '"--port", str(port)]\n'
                 '    with server(command, cwd, log, f"{url}/health", env=tool_env(**JOB_RUNNER_OFF))'),
    "MLFLOW_TRACKING_URI=http://127.0.0.1:5050 dvc repro":
        (SERVER, 'run(["dvc", "repro"], project, MLFLOW_TRACKING_URI=url)'),
    'TF_CONFIG=\'{"cluster": {"worker": ["host-a:2222", "host-b:2222"]}, "task": {"type": "worker", "index": 0}}\' '
    "dvc repro": (WORKERS, 'run_workers([(["dvc", "repro"], chief_dir),'),
    'TF_CONFIG=\'{"cluster": {"worker": ["host-a:2222", "host-b:2222"]}, "task": {"type": "worker", "index": 1}}\' '
    "cleanmessy train": (WORKERS, '([str(VENV_BIN / "cleanmessy"), "train"], worker_dir)], tmp_path)'),
    # docs/team.md
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server --backend-store-uri "
    "postgresql://mlflow:PASSWORD@127.0.0.1:5432/mlflow --artifacts-destination mlflow-server/artifacts "
    "--host 127.0.0.1 --port 5050":
        (SERVER, 'database = f"postgresql://mlflow:{password}@127.0.0.1:{db_port}/mlflow"\n'
                 '        command = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", database,'),
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_FLASK_SERVER_SECRET_KEY=change-me "
    "MLFLOW_AUTH_ADMIN_PASSWORD=change-me-too mlflow server --app-name "
    "basic-auth --backend-store-uri sqlite:///mlflow-server/mlflow.db --artifacts-destination mlflow-server/artifacts "
    "--host 127.0.0.1 --port 5050": (SERVER, '"server", "--app-name", "basic-auth", "--backend-store-uri",'),
    "MLFLOW_TRACKING_URI=http://127.0.0.1:5050 MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=change-me-too "
    "dvc repro": (SERVER, 'run(["dvc", "repro"], project, MLFLOW_TRACKING_URI=url, **admin)'),
    "dvc remote add -d shared /srv/team/dvc-store": (TEAM, '["dvc", "remote", "add", "-d", "shared", str(remote)]'),
    "dvc push": (TEAM, 'run(["dvc", "push"], origin)'),
    "dvc pull": (TEAM, 'run(["dvc", "pull"], mate)'),
    "dvc status": (TEAM, 'run(["dvc", "status"], mate)'),
    "dvc exp push origin mate-lr": (TEAM, '["dvc", "exp", "push", "origin", "mate-lr"]'),
    "dvc exp pull origin mate-lr": (TEAM, '["dvc", "exp", "pull", "origin", "mate-lr"]'),
    "make grid": (TEAM, 'make_grid = ["make", "grid", '),
    'make grid GRID="train.learning_rate=0.0005 train.learning_rate=0.002" JOBS=2':
        (TEAM, '"GRID=train.learning_rate=0.002 train.learning_rate=0.003", "JOBS=2"'),
}


def readme_commands() -> list[str]:
    """Command lines of the manuals' ```bash blocks, comments stripped."""
    text = "\n".join((REPO / manual).read_text() for manual in MANUALS)
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [re.sub(r"\s+#.*$", "", line).strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_is_run_by_a_test(command):
    assert command in TESTED, f"the docs show `{command}`, but no test runs it: add one, and an entry here"
    path, snippet = TESTED[command]
    assert snippet in (REPO / path).read_text(), f"{path} no longer runs `{command}`"


def test_readme_is_the_manual_not_the_lab_notebook():
    """At most ~22 KB (17 KB before the REST API and the Docker image joined the manual, 18.5 KB
    before familiarity, monitoring and feedback): benchmarks and the story of what was tried live
    in docs/."""
    assert len((REPO / "README.md").read_bytes()) <= 22_000
    for link in re.findall(r"\]\((docs/[^)#]+)", (REPO / "README.md").read_text()):
        assert (REPO / link).is_file(), link


def collect(*args: str) -> tuple[set[str], int]:
    """The test ids pytest collects here with these arguments, and how many tests there are in all."""
    done = subprocess.run([sys.executable, "-m", "pytest", *args, "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTEST_ADDOPTS": ""})
    assert done.returncode == 0, done.stdout[-3000:]
    (total,) = re.findall(r"^\d+/(\d+) tests collected", done.stdout, flags=re.M)
    return {line for line in done.stdout.splitlines() if "::" in line}, int(total)


def test_make_test_fast_runs_the_code_tests_and_one_smoke_test_of_each_server():
    """`make test-fast`, the edit loop: its recipe's pytest command (read from `make -n`, so the
    Makefile is what is checked) selects every test not marked slow, and of the slow ones exactly
    one of each server: the Gradio app, the REST API, the MLflow UI and a tracking server. It is
    collected here, not run (that would run the suite inside the suite); docs/testing.md gives its
    time."""
    recipe = subprocess.run(["make", "-n", "test-fast", "UV=/usr/bin/true"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    (command,) = [shlex.split(line) for line in recipe if line.startswith("/usr/bin/true run --frozen pytest")]
    (tier, total), (slow, _) = collect(*command[4:]), collect("-m", "slow")
    servers = sorted(test.split("::")[0] for test in tier & slow)
    assert servers == ["tests/code/test_ui.py", "tests/pipeline/test_tracking_server.py", "tests/serving/test_api.py",
                       "tests/serving/test_serving.py"], servers  # one test each
    assert len(tier | slow) == total and len(tier) > len(slow) > 50  # and every test not marked slow
