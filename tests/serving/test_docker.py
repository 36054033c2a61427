"""`make docker`: the Docker build context of the registered model, written by `mlflow models
generate-dockerfile` from the project's store, and the image built where a Docker daemon answers.
Writing the context writes build/docker into the project, so the test takes `own_project`."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import mlflow.models
import pytest

from conftest import run

pytestmark = pytest.mark.slow
MAKE_DOCKER = ["make", "docker", "UV=/usr/bin/true", "RUN="]  # this environment's tools, no `uv sync` in the copy


def docker_daemon() -> bool:
    docker = shutil.which("docker")
    return bool(docker) and subprocess.run([docker, "info"], capture_output=True, timeout=60).returncode == 0


@pytest.mark.timeout(1800)
def test_make_docker_writes_the_model_context_and_builds_only_where_docker_runs(own_project: Path):
    """The context holds MLflow's Dockerfile (a python base image, MLflow pinned to this one, its
    scoring server as entrypoint, which listens on 8080), the production version's model folder
    with the Keras file, the package as code and the pinned requirements. Without a Docker daemon
    the build is skipped in one line that says why; with one, the image is built for real."""
    tag = f"cleanmessy-test-{uuid.uuid4().hex[:8]}"
    daemon = docker_daemon()
    result = run([*MAKE_DOCKER, f"DOCKER_TAG={tag}"], own_project)
    context = own_project / "build" / "docker"

    dockerfile = (context / "Dockerfile").read_text()
    assert dockerfile.startswith("# Build an image that can serve mlflow models.\nFROM python:3."), dockerfile[:200]
    assert f"pip install mlflow=={mlflow.__version__}" in dockerfile
    assert "COPY model_dir /opt/ml/model" in dockerfile
    assert "env_manager='local'" in dockerfile  # offline: the requirements are installed at build time
    assert 'ENTRYPOINT ["python", "-c", "from mlflow.models import container as C; C._serve(\'local\')"]' in dockerfile
    nginx = Path(mlflow.models.__file__).parent / "container" / "scoring_server" / "nginx.conf"
    assert "listen 8080" in nginx.read_text()  # the port the image serves, as the README says

    model = context / "model_dir"
    meta = (model / "registered_model_meta").read_text()
    assert "model_name: clean-vs-messy" in meta and "model_version: 1" in meta  # production's version
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in (model / "MLmodel").read_text()
    assert (model / "artifacts" / "model.keras").stat().st_size > 1000
    assert (model / "artifacts" / "model.keras").read_bytes() == (own_project / "pipeline" / "model.keras").read_bytes()
    for module in ("pyfunc.py", "images.py", "inference.py", "layers.py"):
        assert (model / "code" / "cleanmessy" / module).is_file(), module
    assert (model / "serving_input_example.json").is_file()
    requirements = (model / "requirements.txt").read_text().split()
    assert any(line.startswith(("tensorflow==", "tensorflow-cpu==")) for line in requirements), requirements
    assert f"mlflow=={mlflow.__version__}" in requirements
    assert all("==" in line for line in requirements), requirements
    assert not [p for p in context.parent.iterdir() if p.name != "docker"]  # no half-written context left

    written = f"Docker context for clean-vs-messy version 1 (models:/clean-vs-messy@production) in {context}"
    assert written in result.stdout, result.stdout
    if daemon:
        assert f"built image {tag}:" in result.stdout, result.stdout[-3000:]
        run(["docker", "image", "inspect", tag], own_project)
    else:
        (skipped,) = [line for line in result.stdout.splitlines() if line.startswith("Docker image not built: ")]
        reason = "is not installed here" if shutil.which("docker") is None else "no Docker daemon answers"
        assert reason in skipped, skipped
        assert f"docker build -t {tag} {context} && docker run -p 8080:8080 {tag}" in skipped
        assert "built image" not in result.stdout
        assert "Traceback" not in result.stdout + result.stderr

    # Again: the old context is replaced, not merged into (a second build is Docker's cache).
    (model / "stale.txt").write_text("from an earlier run")
    try:
        run([*MAKE_DOCKER, f"DOCKER_TAG={tag}"], own_project)
    finally:
        if daemon:
            subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True)
    assert not (model / "stale.txt").exists()
    assert (model / "artifacts" / "model.keras").is_file()


def test_docker_refuses_a_folder_it_did_not_write_and_a_missing_stage(own_project: Path):
    """A --dir holding other files is never deleted; a stage with no version is one line."""
    other = own_project / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    refused = run(["cleanmessy", "docker", "--dir", str(other)], own_project, check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"cleanmessy docker: error: {other} exists and is not a Docker context this command wrote: "
        "choose another --dir")
    assert (other / "keep.txt").read_text() == "mine"

    missing = run(["cleanmessy", "docker", "--stage", "nowhere"], own_project, check=False)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith(
        "cleanmessy docker: error: the registry at sqlite:///")
    assert "Traceback" not in missing.stderr
    assert not (own_project / "build").exists()
