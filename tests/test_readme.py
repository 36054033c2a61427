"""Every command the README shows is run by a test. This maps each command line of the README's
```bash blocks to the test file that runs it and a snippet proving it does: a README command with
no entry here (or an entry whose test no longer runs it) fails, so no documented path goes
unchecked. The tests named here assert what the README says of each command's outcome."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PIPELINE = "tests/pipeline/test_dvc_pipeline.py"
FRESH = "tests/pipeline/test_fresh_clone.py"
SERVER = "tests/pipeline/test_tracking_server.py"
SERVING = "tests/serving/test_serving.py"

# README command -> (file that runs it, text in that file showing it runs it)
TESTED = {
    "make run": (FRESH, 'sh("make run"'),
    "make test": (".ci/run", "make test"),
    "source .venv/bin/activate": (FRESH, "activated=True"),
    "dvc metrics show": (FRESH, 'sh("dvc metrics show"'),
    "dvc plots show": (FRESH, 'sh("dvc plots show"'),
    "dvc params diff": (PIPELINE, '["dvc", "params", "diff"'),
    "make ui": (FRESH, 'f"make ui UI_PORT='),
    "dvc exp run -n lr-high -S train.learning_rate=0.002":
        (PIPELINE, '["dvc", "exp", "run", "-n", "lr-high", "-S", "train.learning_rate=0.002"]'),
    "dvc exp run -n more-test -S split.test_fraction=0.3":
        (PIPELINE, '["dvc", "exp", "run", "-n", "more-test", "-S", "split.test_fraction=0.3"]'),
    "dvc exp show --only-changed --drop 'Created|.*/|roc_auc|macro_f1|loss'":
        (PIPELINE, 'COMPARE_DROP = "Created|.*/|roc_auc|macro_f1|loss"'),
    "dvc exp show": (PIPELINE, '["dvc", "exp", "show", "--no-pager"], project, COLUMNS="300"'),
    "dvc metrics diff main lr-high": (PIPELINE, '["dvc", "metrics", "diff", "main", "lr-high"]'),
    "dvc plots diff main lr-high": (PIPELINE, '["dvc", "plots", "diff", "main", "lr-high"'),
    "git checkout params.yaml": (PIPELINE, '["git", "checkout", "params.yaml"]'),
    "make real SOURCE=path/to/photos": (FRESH, 'f"make real SOURCE={REAL_PHOTOS}"'),
    "cleanmessy cv": (PIPELINE, '["cleanmessy", "cv"]'),
    "make serve": (FRESH, 'f"make serve SERVE_PORT='),
    "cleanmessy serve --stage staging": (SERVING, 'serving(project, "--stage", "staging")'),
    "cleanmessy predict photos/ --out predictions.csv":
        (SERVING, '["cleanmessy", "predict", str(folder), "--out", str(out)]'),
    "mlflow server --backend-store-uri sqlite:///mlflow-server/mlflow.db --artifacts-destination "
    "mlflow-server/artifacts --host 127.0.0.1 --port 5000":
        (SERVER, '"server", "--backend-store-uri", "sqlite:///mlflow-server/mlflow.db",\n'
                 '               "--artifacts-destination", "mlflow-server/artifacts", "--host", "127.0.0.1", '
                 '"--port"'),
    "MLFLOW_TRACKING_URI=http://127.0.0.1:5000 dvc repro":
        (SERVER, 'run(["dvc", "repro"], project, MLFLOW_TRACKING_URI=url)'),
}


def readme_commands() -> list[str]:
    """Command lines of the README's ```bash blocks, comments stripped."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    lines = [re.sub(r"\s+#.*$", "", line).strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_is_run_by_a_test(command):
    assert command in TESTED, f"README shows `{command}`, but no test runs it: add one, and an entry here"
    path, snippet = TESTED[command]
    assert snippet in (REPO / path).read_text(), f"{path} no longer runs `{command}`"


def test_readme_is_the_manual_not_the_lab_notebook():
    """At most ~15 KB: benchmarks and the story of what was tried live in docs/."""
    assert len((REPO / "README.md").read_bytes()) <= 15_500
    for link in re.findall(r"\]\((docs/[^)#]+)", (REPO / "README.md").read_text()):
        assert (REPO / link).is_file(), link
