"""Shared fixtures: a throw-away copy of the project, run with the real tools (dvc, MLflow)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cleanmessy.params import with_changes

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_PHOTOS = SHARED / "datasets" / "clean-messy"
VENV_BIN = Path(sys.executable).parent

# What a fresh clone holds that the pipeline needs (outputs, stores and caches excluded).
PROJECT_FILES = ["dvc.yaml", "params.yaml", "pyproject.toml", ".gitignore", ".dvc/config", ".dvc/.gitignore", ".dvcignore",
                 "data/.gitignore", "pipeline/.gitignore", "mlruns/.gitignore"]
PROJECT_DIRS = ["src", "data/sample"]

# Tiny settings: a full `dvc repro` in well under a minute on 2 cores.
TINY_PARAMS = {
    "base": {"image_size": 32},
    "train": {"epochs": 1, "batch_size": 8, "patience": 1},
    "evaluate": {"min_accuracy": 0.0},
}
TINY_SAMPLE = {"per_class": 10, "size": 32, "seed": 0}


def tool_env(**extra: str) -> dict[str, str]:
    """The environment a user's shell would have after `make setup`: the venv's tools on PATH,
    no remote tracking server, no telemetry."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "CLEANMESSY_ROOT", "DVC_EXP_NAME", "PYTEST_CURRENT_TEST")}
    env.update({
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
    })
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
    """Run a real command; on an unexpected failure the assertion shows its output."""
    result = subprocess.run(cmd, cwd=cwd, env=tool_env(**extra_env), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n--- stdout\n{result.stdout[-6000:]}"
                             f"\n--- stderr\n{result.stderr[-6000:]}")
    return result


def set_params(project: Path, changes: dict) -> None:
    """Edit params.yaml as `dvc exp run -S` does (DVC's own round-trip writer: comments and style kept)."""
    from dvc.utils.serialize import modify_yaml

    def apply(target: dict, nested: dict) -> None:
        for key, value in nested.items():
            if isinstance(value, dict):
                apply(target.setdefault(key, {}), value)
            else:
                target[key] = value

    with modify_yaml(project / "params.yaml") as data:
        apply(data, changes)


def copy_project(dest: Path, params: dict | None = None, sample: dict | None = None) -> Path:
    """A fresh-clone-like copy of the project in `dest`, committed to its own git repository."""
    for name in PROJECT_FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)
    for name in PROJECT_DIRS:
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    set_params(dest, with_changes(TINY_PARAMS, params or {}))
    (dest / "data/sample/sample.yaml").write_text(yaml.safe_dump({**TINY_SAMPLE, **(sample or {})}))
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "-m", "fresh clone"], dest)
    return dest


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """A project copy on which the real `dvc repro` has run once with tiny params."""
    project = copy_project(tmp_path_factory.mktemp("project"))
    return project, run(["dvc", "repro"], project)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Poll until the server answers; fail with its log if it died or never answered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{log.read_text()[-6000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    process.kill()
    raise AssertionError(f"{url} did not answer within {timeout} s")


@contextlib.contextmanager
def server(cmd: list[str] | str, cwd: Path, log: Path, ready_url: str, env: dict[str, str] | None = None,
           timeout: float = 180) -> Iterator[subprocess.Popen]:
    """A real server (a command line, or a shell command such as `make ui`) in its own process
    group, its output in `log` (a file, not a pipe: a pipe nobody reads fills and blocks the
    server); yields once `ready_url` answers; stops the whole group after."""
    with log.open("w") as out:
        process = subprocess.Popen(cmd, shell=isinstance(cmd, str), cwd=cwd, env=env or tool_env(), stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(ready_url, process, log, timeout)
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have stopped by itself
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def serving(project: Path, *args: str, **extra_env: str) -> Iterator[str]:
    """A real `cleanmessy serve` on a free loopback port; yields its URL, stops it after."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with server(["cleanmessy", "serve", "--port", str(port), *args], project, project / f"serve-{port}.log", url,
                env=tool_env(**extra_env)):
        yield url


CHROMIUM = Path("/usr/bin/chromium")  # Debian's; `make test` installs it (Playwright downloads no browser)
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
SCREENSHOTS = os.environ.get("CLEANMESSY_SCREENSHOTS")  # a folder to keep the tests' screenshots in


@contextlib.contextmanager
def browser_page(width: int = 1280, height: int = 900) -> Iterator:
    """A Playwright page in headless Chromium; skips without Chromium, except in CI where it fails."""
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (make test does)")
        pytest.skip("Debian's chromium is not installed (`make test` installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def screenshot(page, path: Path) -> None:
    """Save a full-page screenshot, and a copy in $CLEANMESSY_SCREENSHOTS when set (to look at)."""
    page.screenshot(path=str(path), full_page=True)
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(SCREENSHOTS) / path.name)


requires_real_photos = pytest.mark.skipif(
    not REAL_PHOTOS.is_dir(), reason=f"real photos not available at {REAL_PHOTOS} (only on the team's machines)")
